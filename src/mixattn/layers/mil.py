"""Attention pooling of a *set* of instances (multiple instance learning): a mixture of attention
heads over a bag, not a sequence, so there is no order, no causality and no position.

- ``ABMILPool``: attention-based MIL (Ilse, Tomczak and Welling, "Attention-based Deep Multiple
  Instance Learning", ICML 2018, arXiv 1802.04712): a_n = softmax_n(w^T (tanh(V h_n) * sigm(U h_n)))
  (the gated scorer; ``scorer="tanh"`` drops the gate), bag = sum_n a_n h_n.
- ``MultiBranchAttentionPool``: ACMIL (Zhang et al., "Attention-Challenging Multiple Instance
  Learning for Whole Slide Image Classification", ECCV 2024, arXiv 2311.07125): M attention
  branches (MBA), each with its own scores and pooled feature, plus the bag feature pooled with the
  branches' mean attention; and Stochastic Top-K Instance Masking (STKIM): in training, a random
  ``mask_rate`` share of each branch's ``top_k`` highest-scored instances is masked before the
  softmax, so their attention mass goes to the other instances. ``branch_diversity`` is the
  paper's term between branches (mean pairwise cosine similarity of their attention maps).

Bags of unequal size are padded: ``mask`` (B, N) marks real instances; padding never gets attention.

Legend: B bags, N instances per bag (padded), d instance feature dim, A scorer width, M branches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

SCORERS = ("gated", "tanh")


@dataclass(frozen=True, kw_only=True)
class MILPoolConfig:
    in_dim: int  # instance feature width d
    attn_dim: int = 64  # scorer width A (Ilse et al.: 128 on 500-d features)
    scorer: str = "gated"  # gated (tanh * sigmoid, Ilse et al. eq. 9) | tanh (eq. 8)
    num_branches: int = 5  # M attention branches (ACMIL: 5); 1 is ABMIL
    top_k: int = 10  # STKIM: the highest-scored instances each branch may lose (ACMIL: 10)
    mask_rate: float = 0.0  # STKIM: share of the top_k masked at random while training (ACMIL: 0.6); 0 = off

    def __post_init__(self):
        for name in ("in_dim", "attn_dim", "num_branches", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MIL pool {name} must be an integer >= 1, got {value!r}")
        if self.scorer not in SCORERS:
            raise ValueError(f"MIL pool scorer={self.scorer!r} is not one of {SCORERS}")
        if not 0.0 <= self.mask_rate < 1.0:
            raise ValueError(f"MIL pool mask_rate must be in [0, 1), got {self.mask_rate}")


@dataclass
class MILPoolOutput:
    """branch_feats (B, M, d) per-branch pooled features; bag_feat (B, d) pooled with the branches'
    mean attention; attn (B, M, N) attention (zero on padding and masked instances); scores
    (B, M, N) raw scores before masking; masked (B, M, N) bool, the instances STKIM removed."""

    branch_feats: torch.Tensor
    bag_feat: torch.Tensor
    attn: torch.Tensor
    scores: torch.Tensor
    masked: torch.Tensor


def check_bag(x_BNd: torch.Tensor, mask_BN: torch.Tensor | None, in_dim: int, who: str) -> torch.Tensor:
    """Validate a padded batch of bags; return the mask (B, N) (all True when none is given)."""
    if not torch.is_floating_point(x_BNd) or x_BNd.dim() != 3 or x_BNd.shape[-1] != in_dim:
        raise ValueError(f"{who} expects floating-point bags (bags, instances, {in_dim}), got {tuple(x_BNd.shape)} {x_BNd.dtype}")
    if mask_BN is None:
        return torch.ones(x_BNd.shape[:2], dtype=torch.bool, device=x_BNd.device)
    if mask_BN.shape != x_BNd.shape[:2] or mask_BN.dtype != torch.bool:
        raise ValueError(
            f"{who}: mask must be bool of shape {tuple(x_BNd.shape[:2])}, got {tuple(mask_BN.shape)} {mask_BN.dtype}"
        )
    if not bool(mask_BN.any(1).all()):
        raise ValueError(f"{who}: every bag needs at least one instance (a mask row is all False)")
    return mask_BN


class GatedScorer(nn.Module):
    """Attention scores of every instance for ``heads`` branches: (B, N, d) -> (B, heads, N)."""

    def __init__(self, in_dim: int, attn_dim: int, heads: int, scorer: str):
        super().__init__()
        self.V = nn.Linear(in_dim, attn_dim)
        self.U = nn.Linear(in_dim, attn_dim) if scorer == "gated" else None
        self.w = nn.Linear(attn_dim, heads)

    def forward(self, x_BNd: torch.Tensor) -> torch.Tensor:
        h_BNA = torch.tanh(self.V(x_BNd))
        if self.U is not None:
            h_BNA = h_BNA * torch.sigmoid(self.U(x_BNd))
        return self.w(h_BNA).transpose(1, 2)  # (B, N, M) -> (B, M, N)


def stkim_mask(scores_BMN: torch.Tensor, mask_BN: torch.Tensor, top_k: int, rate: float,
               generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
    """STKIM: for each (bag, branch), choose floor(rate * k) of the k = min(top_k, instances) highest
    scored real instances uniformly at random (rate < 1 keeps at least one instance). Returns the
    bool mask (B, M, N) of the instances to remove."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"STKIM mask rate must be in [0, 1), got {rate}")
    B, M, N = scores_BMN.shape
    K = min(top_k, N)
    k_B = mask_BN.sum(1).clamp(max=top_k)  # (B,)
    drop_B = (k_B.float() * rate).floor().long()  # (B,); < k_B <= the bag's size, as rate < 1
    s = scores_BMN.detach().masked_fill(~mask_BN[:, None], float("-inf"))
    top_BMK = s.topk(K, dim=-1).indices  # (B, M, K): ranks 0 .. K-1
    rank_ok_BK = torch.arange(K, device=s.device)[None, :] < k_B[:, None]  # rank within this bag's k
    u_BMK = torch.rand(B, M, K, generator=generator, device=s.device)
    u_BMK = u_BMK.masked_fill(~rank_ok_BK[:, None], 2.0)  # ranks beyond k are never drawn
    order_BMK = u_BMK.argsort(-1).argsort(-1)  # random order among the eligible ranks
    pick_BMK = order_BMK < drop_B[:, None, None]
    out = torch.zeros(B, M, N, dtype=torch.bool, device=s.device)
    return out.scatter(-1, top_BMK, pick_BMK)


def masked_softmax(scores_BMN: torch.Tensor, keep_BMN: torch.Tensor) -> torch.Tensor:
    return torch.softmax(scores_BMN.masked_fill(~keep_BMN, float("-inf")), dim=-1)


class ABMILPool(nn.Module):
    """Single-branch attention MIL pool. forward(x (B, N, d), mask (B, N)) -> MILPoolOutput with M = 1."""

    def __init__(self, in_dim: int, attn_dim: int = 64, scorer: str = "gated"):
        super().__init__()
        self.cfg = MILPoolConfig(in_dim=in_dim, attn_dim=attn_dim, scorer=scorer, num_branches=1)
        self.scorer = GatedScorer(in_dim, attn_dim, 1, scorer)

    def forward(self, x_BNd: torch.Tensor, mask_BN: torch.Tensor | None = None) -> MILPoolOutput:
        mask_BN = check_bag(x_BNd, mask_BN, self.cfg.in_dim, "ABMILPool")
        scores = self.scorer(x_BNd)  # (B, 1, N)
        attn = masked_softmax(scores, mask_BN[:, None])
        feats = attn @ x_BNd  # (B, 1, N) @ (B, N, d) -> (B, 1, d)
        return MILPoolOutput(feats, feats[:, 0], attn, scores, torch.zeros_like(attn, dtype=torch.bool))


class MultiBranchAttentionPool(nn.Module):
    """ACMIL's multi-branch attention with STKIM (active in training mode only).
    forward(x (B, N, d), mask (B, N), generator) -> MILPoolOutput."""

    def __init__(self, cfg: MILPoolConfig):
        super().__init__()
        self.cfg = cfg
        self.scorer = GatedScorer(cfg.in_dim, cfg.attn_dim, cfg.num_branches, cfg.scorer)

    def forward(self, x_BNd: torch.Tensor, mask_BN: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> MILPoolOutput:  # fmt: skip
        mask_BN = check_bag(x_BNd, mask_BN, self.cfg.in_dim, "MultiBranchAttentionPool")
        scores = self.scorer(x_BNd)  # (B, M, N)
        masked = torch.zeros_like(scores, dtype=torch.bool)
        if self.training and self.cfg.mask_rate > 0:
            masked = stkim_mask(scores, mask_BN, self.cfg.top_k, self.cfg.mask_rate, generator)
        attn = masked_softmax(scores, mask_BN[:, None] & ~masked)  # (B, M, N)
        feats = attn @ x_BNd  # (B, M, N) @ (B, N, d) -> (B, M, d)
        bag = attn.mean(1, keepdim=True) @ x_BNd  # (B, 1, d): the branches' mean attention
        return MILPoolOutput(feats, bag[:, 0], attn, scores, masked)


def branch_diversity(attn_BMN: torch.Tensor) -> torch.Tensor:
    """ACMIL's diversity term: mean cosine similarity over branch pairs and bags (0 for one branch).
    Minimising it pushes branches to attend to different instances."""
    M = attn_BMN.shape[1]
    if M < 2:
        return attn_BMN.new_zeros(())
    unit = torch.nn.functional.normalize(attn_BMN, dim=-1)
    sim_BMM = unit @ unit.transpose(1, 2)
    i, j = torch.triu_indices(M, M, offset=1, device=attn_BMN.device)
    return sim_BMM[:, i, j].mean()


def top_k_share(attn_BMN: torch.Tensor, k: int) -> torch.Tensor:
    """Attention concentration: the attention mass on each branch's k most-attended instances, (B, M)."""
    return attn_BMN.topk(min(k, attn_BMN.shape[-1]), dim=-1).values.sum(-1)
