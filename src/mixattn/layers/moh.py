"""Mixture-of-Head attention (MoH, Jin et al., arXiv 2410.11842).

Multi-head attention as a sum over heads, sum_i g_i H^i W_O^i, where each token uses the first
``shared_heads`` heads always and top-k of the remaining routed heads. Two scorings:

- ``learned`` (paper eqs. 5-6): g = [a1 * softmax(W_s x), a2 * softmax(W_r x) on the top-k],
  [a1, a2] = softmax(W_h x). With ``gate_scale="mha"`` the ViT/DiT code's factors are applied
  (routed renormalised x k, shared x h_s, alpha x 2) and routers start at zero, so an untrained
  router weighs every selected head by exactly 1, i.e. plain MHA on those heads.
- ``query_norm`` (MoH-LLaMA3 conversion): no parameters; routed heads are scored by the L2 norm
  of their query (before RoPE) normalised per token, gates are binary with a straight-through
  gradient, and shared heads have gate 1.

Unselected (token, head) pairs are never computed: shared heads run as dense causal attention,
routed heads through the ``head_sparse_attention`` kernel, which gathers each head's tokens. With a
sparse span plan applied, every head runs through the span kernel and is masked afterwards.

Legend: B batch, T tokens, N = B*T, H heads (Hs shared + Hr routed), Hkv KV heads, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .attention import Attention, AttentionConfig, AttnContext, LayerOutput, apply_rotary, check_input
from .cache import RaggedKVCache
from .dispatch import attend, dense, kernel
from .routers import Router, RouterConfig, query_norm_logits


@dataclass(frozen=True, kw_only=True)
class MoHConfig:
    shared_heads: int = 0  # always-on heads (the first ones)
    top_k: int = 1  # routed heads chosen per token among the num_heads - shared_heads others
    scoring: str = "learned"  # learned (two-stage routing) | query_norm (parameter-free, MoH-LLaMA3)
    gate_scale: str = "mha"  # mha: code scale factors, untrained router == MHA | paper: eqs. 5-6 as written
    # The routed heads' router. None: the MoH papers' routing, derived from scoring and gate_scale.
    # Given: any RouterConfig (noise, selection bias, graphs...) with num_experts = the routed heads
    # and top_k = top_k above.
    router: RouterConfig | None = None

    def __post_init__(self):
        if self.router is not None and self.router.top_k != self.top_k:
            raise ValueError(f"MoH router.top_k={self.router.top_k} must equal MoH top_k={self.top_k}")
        if self.scoring not in ("learned", "query_norm"):
            raise ValueError(f"MoH scoring={self.scoring!r} is not one of ('learned', 'query_norm')")
        if self.gate_scale not in ("mha", "paper"):
            raise ValueError(f"MoH gate_scale={self.gate_scale!r} is not one of ('mha', 'paper')")
        if self.shared_heads < 0 or self.top_k < 1:
            raise ValueError(f"MoH needs shared_heads >= 0 and top_k >= 1, got {self.shared_heads}, {self.top_k}")

    def active_fraction(self, num_heads: int) -> float:
        return (self.shared_heads + self.top_k) / num_heads


class MoHAttention(Attention):
    """Same projections (and parameter names) as ``Attention``, plus head routers.
    forward(x (B, T, d), ctx) -> LayerOutput(y (B, T, d), routed-head router, (q, k))."""

    PACK_GROUPS = ()  # its forward projects q and k/v separately: each linear keeps its own packed copy

    def __init__(self, attn: AttentionConfig, cfg: MoHConfig):
        super().__init__(attn)
        H, Hs = attn.num_heads, cfg.shared_heads
        Hr = H - Hs
        if not 1 <= cfg.top_k <= Hr:
            raise ValueError(f"MoH top_k={cfg.top_k} must be in [1, routed heads={Hr}] (num_heads={H})")
        self.moh = cfg
        learned, mha = cfg.scoring == "learned", cfg.gate_scale == "mha"
        self.router = Router(attn.hidden_dim, cfg.router or self.default_router(cfg, Hr))
        if self.router.cfg.num_experts != Hr:
            raise ValueError(f"MoH router.num_experts={self.router.cfg.num_experts} must equal the routed heads {Hr}")
        if (self.router.cfg.scoring == "query_norm") != (not learned):
            raise ValueError(f"MoH scoring={cfg.scoring!r} needs router.scoring "
                             f"{'query_norm' if not learned else 'softmax or sigmoid'}")  # fmt: skip
        two_stage = learned and Hs > 0
        self.shared_router = nn.Linear(attn.hidden_dim, Hs, bias=False) if two_stage else None  # W_s
        self.mix_router = nn.Linear(attn.hidden_dim, 2, bias=False) if two_stage else None  # W_h
        if mha:
            for lin in (self.router.proj, self.shared_router, self.mix_router):
                if lin is not None:
                    nn.init.zeros_(lin.weight)

    @staticmethod
    def default_router(cfg: MoHConfig, routed_heads: int) -> RouterConfig:
        """The MoH routing: learned softmax scores with gates x k (MoH, arXiv 2410.11842), or the
        parameter-free query-norm scores with binary straight-through gates (MoH-LLaMA3)."""
        learned, mha = cfg.scoring == "learned", cfg.gate_scale == "mha"
        return RouterConfig(num_experts=routed_heads, top_k=cfg.top_k, scoring="softmax" if learned else "query_norm",
                            select_on="logits" if learned else "probs",
                            gate_norm=("scale_k" if mha else "none") if learned else "none",
                            gate="soft" if learned else "binary_ste")  # fmt: skip

    def head_gates(self, x_BTd: torch.Tensor, q_raw_BHTD: torch.Tensor):
        """Gates (N, H) (zero for unselected heads), active mask (N, H) and the routed RouterOutput."""
        B, T, d = x_BTd.shape
        H, Hs, N = self.cfg.num_heads, self.moh.shared_heads, B * T
        logits = None
        if self.moh.scoring == "query_norm":
            logits = query_norm_logits(q_raw_BHTD[:, Hs:].permute(0, 2, 1, 3).reshape(N, H - Hs, -1))
        r = self.router(x_BTd, logits_NE=logits)
        routed_NH = torch.zeros_like(r.probs).scatter(1, r.indices, r.weights)  # (N, Hr)
        active_NH = torch.cat([r.mask.new_ones(N, Hs), r.mask], dim=1)
        if self.shared_router is None:
            gates_NH = torch.cat([routed_NH.new_ones(N, Hs), routed_NH], dim=1)
            return gates_NH, active_NH, r
        x_Nd = x_BTd.reshape(N, d)
        scale = self.moh.gate_scale == "mha"
        # gate math in at least fp32 (as the routers), in float64 for float64 models
        shared_NH = torch.softmax(self.shared_router(x_Nd).to(r.probs.dtype), -1) * (Hs if scale else 1)
        alpha_N2 = torch.softmax(self.mix_router(x_Nd).to(r.probs.dtype), -1) * (2 if scale else 1)
        gates_NH = torch.cat([alpha_N2[:, :1] * shared_NH, alpha_N2[:, 1:] * routed_NH], dim=1)
        return gates_NH, active_NH, r

    def _kv_for(self, heads: range, k: torch.Tensor) -> torch.Tensor:
        """The KV head of each query head in ``heads``: (B, len(heads), Tk, D) (a view for MHA)."""
        G = self.cfg.group_size
        if G == 1:
            return k[:, heads.start : heads.stop]
        return k.index_select(1, torch.arange(heads.start, heads.stop, device=k.device) // G)

    def forward(self, x_BTd: torch.Tensor, ctx: AttnContext) -> LayerOutput:
        check_input(x_BTd, self.cfg.hidden_dim, "MoHAttention")
        B, T, _ = x_BTd.shape
        H, Hs = self.cfg.num_heads, self.moh.shared_heads
        q_raw = self.project_q(x_BTd, ctx, rope=False)  # (B, H, T, D), pre-RoPE for query-norm scores
        q = apply_rotary(q_raw, ctx.cos, ctx.sin)
        k, v = self.project_kv(x_BTd, ctx)
        gates_NH, active_NH, r = self.head_gates(x_BTd, q_raw)
        N = ctx.ref_len or ctx.q_offset + T
        ragged = isinstance(ctx.cache, RaggedKVCache)
        if self.sparse is not None and (ragged or not self.sparse.is_dense_at(N)):
            # per-head spans: every head through the sparse path, then the head mask
            o = attend(q, k, v, ctx, self.sparse).transpose(1, 2) * active_NH.view(B, T, H, 1).to(q.dtype)
            y = self.o_proj((o * gates_NH.view(B, T, H, 1).to(q.dtype)).reshape(B, T, -1))
            return LayerOutput(y, r, (q, k))

        parts = []
        if Hs:
            shared = range(0, Hs)
            o_sh = dense(q[:, :Hs], self._kv_for(shared, k), self._kv_for(shared, v), ctx)
            parts.append(o_sh.transpose(1, 2))  # (B, T, Hs, D)
        routed = range(Hs, H)
        sparse = kernel(ctx, "head_sparse_attention")
        parts.append(
            sparse(
                q[:, Hs:],
                self._kv_for(routed, k),
                self._kv_for(routed, v),
                active_NH[:, Hs:].view(B, T, H - Hs),
                q_offset=ctx.q_offset,
                left_pad=ctx.left_pad,
            )
        )
        o_BTHD = torch.cat(parts, dim=2) * gates_NH.view(B, T, H, 1).to(q.dtype)
        y = self.o_proj(o_BTHD.reshape(B, T, -1))  # (B, T, H*D) -> (B, T, d)
        return LayerOutput(y, r, (q, k))
