"""Bag classifiers for the MIL benchmark: an instance encoder, an attention pool from
``layers/mil.py`` (ABMIL, ACMIL's multi-branch attention, optionally with STKIM) and linear heads;
plus training and evaluation (bag AUC, accuracy, attention concentration).

ACMIL's loss (Zhang et al., ECCV 2024, arXiv 2311.07125): the bag head's loss, the mean of the
branch heads' losses, and ``diversity_coef`` x the branch diversity term. ABMIL (Ilse et al. 2018)
has the bag head only.

Legend: B bags, N instances, F input features, d instance feature dim, M branches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.mil import ABMILPool, MILPoolConfig, MultiBranchAttentionPool, branch_diversity, top_k_share
from .data import Bags

METHODS = ("abmil", "mba", "mba_stkim")


@dataclass(frozen=True, kw_only=True)
class MILTrainConfig:
    method: str = "mba_stkim"  # abmil | mba (ACMIL without STKIM) | mba_stkim (ACMIL)
    hidden_dim: int = 64  # instance feature width d
    attn_dim: int = 32  # attention scorer width
    num_branches: int = 5  # MBA branches (ACMIL: 5)
    top_k: int = 3  # STKIM candidates per branch (ACMIL: 10 of thousands of patches; bags here hold ~10)
    mask_rate: float = 0.6  # STKIM masking share (ACMIL: 0.6); used by mba_stkim only
    diversity_coef: float = 1.0  # weight of the branch diversity term (ACMIL: 1)
    epochs: int = 40
    batch_size: int = 8  # bags per step
    lr: float = 5e-4
    weight_decay: float = 1e-4
    concentration_k: int = 1  # attention concentration: share of attention on the top-k instances

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"MIL method={self.method!r} is not one of {METHODS}")
        for name in ("hidden_dim", "attn_dim", "num_branches", "top_k", "epochs", "batch_size", "concentration_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"MIL {name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.mask_rate < 1.0:
            raise ValueError(f"MIL mask_rate must be in [0, 1), got {self.mask_rate}")
        if self.lr <= 0 or self.weight_decay < 0 or self.diversity_coef < 0:
            raise ValueError("MIL lr must be > 0, weight_decay and diversity_coef >= 0")


class MILClassifier(nn.Module):
    """forward(x (B, N, F), mask (B, N)) -> (bag logit (B,), branch logits (B, M), MILPoolOutput)."""

    def __init__(self, in_dim: int, cfg: MILTrainConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_dim
        self.encoder = nn.Sequential(nn.Linear(in_dim, d), nn.ReLU(), nn.Linear(d, d), nn.ReLU())
        if cfg.method == "abmil":
            self.pool = ABMILPool(d, cfg.attn_dim)
        else:
            rate = cfg.mask_rate if cfg.method == "mba_stkim" else 0.0
            pool_cfg = MILPoolConfig(in_dim=d, attn_dim=cfg.attn_dim, num_branches=cfg.num_branches,
                                     top_k=cfg.top_k, mask_rate=rate)  # fmt: skip
            self.pool = MultiBranchAttentionPool(pool_cfg)
        M = self.pool.cfg.num_branches
        self.branch_heads = nn.Parameter(torch.randn(M, d) / d**0.5) if M > 1 else None  # one linear head per branch
        self.branch_bias = nn.Parameter(torch.zeros(M)) if M > 1 else None
        self.bag_head = nn.Linear(d, 1)

    def forward(self, x_BNF: torch.Tensor, mask_BN: torch.Tensor):
        h_BNd = self.encoder(x_BNF)
        out = self.pool(h_BNd, mask_BN)
        branch_BM = None
        if self.branch_heads is not None:
            branch_BM = (out.branch_feats * self.branch_heads).sum(-1) + self.branch_bias
        return self.bag_head(out.bag_feat)[:, 0], branch_BM, out

    def loss(self, x_BNF, mask_BN, y_B) -> torch.Tensor:
        bag, branch, out = self(x_BNF, mask_BN)
        y = y_B.float()
        loss = F.binary_cross_entropy_with_logits(bag, y)
        if branch is not None:
            loss = loss + F.binary_cross_entropy_with_logits(branch, y[:, None].expand_as(branch))
            loss = loss + self.cfg.diversity_coef * branch_diversity(out.attn)
        return loss


def bag_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC as the Mann-Whitney statistic (ties count half)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("AUC needs both positive and negative bags")
    diff = pos.double()[:, None] - neg.double()[None, :]
    return float((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean())


def train_mil(model: MILClassifier, train: Bags, seed: int) -> list[float]:
    """AdamW over shuffled mini-batches of bags; returns the mean loss of each epoch."""
    cfg = model.cfg
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    history = []
    model.train()
    for _ in range(cfg.epochs):
        order, total = torch.randperm(len(train), generator=gen), 0.0
        for i in range(0, len(train), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            loss = model.loss(train.x[idx], train.mask[idx], train.y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        history.append(total / len(train))
    return history


@torch.no_grad()
def evaluate(model: MILClassifier, bags: Bags) -> dict:
    """Bag AUC and accuracy (threshold 0.5), and attention statistics of the bag attention (the
    branches' mean for MBA): concentration = mass on the top-k instances, and the mass on target
    instances in positive bags (localisation)."""
    model.eval()
    bag, _, out = model(bags.x, bags.mask)
    prob = torch.sigmoid(bag)
    attn_BN = out.attn.mean(1)
    pos = bags.y == 1
    k = model.cfg.concentration_k
    return {
        "auc": bag_auc(prob, bags.y),
        "accuracy": float(((prob > 0.5).long() == bags.y).float().mean()),
        "concentration": float(top_k_share(attn_BN[:, None], k).mean()),
        "branch_concentration": float(top_k_share(out.attn, k).mean()),
        "target_attention": float((attn_BN * bags.instance_y)[pos].sum(-1).mean()),
    }
