"""Mixture of attention heads with shared keys/values: MoA (Zhang et al., arXiv 2210.05144) in the
JetMoE (arXiv 2404.07413) / ModuleFormer form.

Each expert owns a query projection d -> Hkv*D and an output projection Hkv*D -> d; K and V come
from one shared projection with Hkv heads, so the KV cache is that of an Hkv-head model whatever
E is. A token picks K experts, so it has K*Hkv query heads; expert slot s, head j reads KV head j
(HF JetMoe's tiled layout). Parameter names and shapes match HF JetMoe (``kv_proj`` K-first,
``input_linear`` (E, Hkv*D, d), ``output_linear`` (E, d, Hkv*D), ``bias`` (d,)).

SDPA ``enable_gqa`` maps query head i to KV head i // K, so queries are ordered (Hkv, K) before
attention; the token-order (K, Hkv) layout would silently pair heads with the wrong KV head.

Legend: B batch, T tokens, N = B*T, K top-k, M = N*K, E experts, Hkv KV heads, D head dim, d hidden.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .attention import AttentionConfig, AttnContext, LayerOutput, apply_rotary, check_input
from .cache import KVCache
from .dispatch import attend, chosen
from .experts import ExpertLinear, combine, make_dispatch
from .routers import Router, RouterConfig
from .sparse import SparseSpec


@dataclass(frozen=True, kw_only=True)
class MoAConfig:
    # JetMoE gates: softmax over the K selected logits
    router: RouterConfig = field(default_factory=lambda: RouterConfig(num_experts=8, top_k=2, gate_norm="softmax_topk"))
    bias: bool = True  # output bias added once after the gated sum (JetMoE)


class MoAAttention(nn.Module):
    """forward(x (B, T, d), ctx) -> LayerOutput(y (B, T, d), router, (q, k))."""

    def __init__(self, attn: AttentionConfig, cfg: MoAConfig):
        super().__init__()
        self.attn_cfg, self.cfg = attn, cfg
        Hkv, D, d, E = attn.num_kv_heads, attn.head_dim, attn.hidden_dim, cfg.router.num_experts
        self.kv_proj = nn.Linear(d, 2 * Hkv * D, bias=False)  # rows: [K; V]
        self.router = Router(d, cfg.router)
        self.input_linear = ExpertLinear(E, d, Hkv * D)  # per-expert W_q
        self.output_linear = ExpertLinear(E, Hkv * D, d)  # per-expert W_o
        self.bias = nn.Parameter(torch.zeros(d)) if cfg.bias else None
        self.sparse: SparseSpec | None = None  # set by compress.apply_plan (one rule per shared KV head)

    def forward(self, x_BTd: torch.Tensor, ctx: AttnContext) -> LayerOutput:
        check_input(x_BTd, self.attn_cfg.hidden_dim, "MoAAttention")
        B, T, d = x_BTd.shape
        Hkv, D, K = self.attn_cfg.num_kv_heads, self.attn_cfg.head_dim, self.cfg.router.top_k
        r = self.router(x_BTd)
        disp = make_dispatch(r.indices, self.cfg.router.num_experts)
        impl = chosen(ctx, "grouped_linear")

        q_M = self.input_linear(x_BTd.reshape(B * T, d)[disp.token], disp.counts, impl=impl)  # (M, Hkv*D) sorted
        q = q_M[disp.inverse].view(B, T, K, Hkv, D).permute(0, 3, 2, 1, 4)  # (B, Hkv, K, T, D)
        q = apply_rotary(q.reshape(B, Hkv * K, T, D), ctx.cos, ctx.sin)  # heads ordered (kv, slot)

        k, v = self.kv_proj(x_BTd).view(B, T, 2, Hkv, D).permute(2, 0, 3, 1, 4)  # 2 x (B, Hkv, T, D)
        k = apply_rotary(k, ctx.cos, ctx.sin)
        if isinstance(ctx.cache, KVCache):
            k, v = ctx.cache.extend("k", k), ctx.cache.extend("v", v)

        o = attend(q, k, v, ctx, self.sparse)  # (B, Hkv*K, T, D); query head (kv, slot) reads KV head kv
        o_M = o.view(B, Hkv, K, T, D).permute(0, 3, 2, 1, 4).reshape(B * T * K, Hkv * D)[disp.order]
        y = combine(self.output_linear(o_M, disp.counts, impl=impl), r.weights, disp).view(B, T, d)
        if self.bias is not None:
            y = y + self.bias
        return LayerOutput(y, r, (q, k))
