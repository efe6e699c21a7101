"""Soft mixtures of attention experts, as upcycled by BAM ("Branch-Attend-Mix", Zhang et al.,
arXiv 2408.08274).

Every expert processes every token and the outputs are mixed by a softmax router (soft routing:
top-k routing of attention did not beat the BTX baseline in the paper's ablation). Two classes,
one per mechanism:

- ``BAMAttention``: each expert is a full attention block with its own Q, K, V and O (one KV cache
  per expert);
- ``BAMSharedKVAttention``: experts own Q and O only and read one shared K/V (one KV cache).

Projections are 3-D parameters (E, out, in) like every other expert in the package; with soft
routing every expert sees every token, so they run as batched matmuls over E.

Legend: B batch, T tokens, N = B*T, E experts, H heads, Hkv KV heads, D head dim, d hidden dim.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .attention import AttentionConfig, AttnContext, LayerOutput, apply_rotary, check_input
from .dispatch import dense, kernel
from .routers import Router, RouterConfig


def _expert_param(E: int, out_dim: int, in_dim: int) -> nn.Parameter:
    bound = 1 / math.sqrt(in_dim)
    return nn.Parameter(torch.empty(E, out_dim, in_dim).uniform_(-bound, bound))


def _per_expert(x_Nd: torch.Tensor, w_EOI: torch.Tensor) -> torch.Tensor:
    """Apply each expert's projection to every token: (N, I) x (E, O, I) -> (E, N, O)."""
    return torch.matmul(x_Nd.unsqueeze(0), w_EOI.transpose(1, 2))


class _SoftMixture(nn.Module):
    """Shared parts: config checks, the soft router, and the gated sum of expert outputs."""

    def __init__(self, attn: AttentionConfig, num_experts: int):
        super().__init__()
        if attn.bias or attn.out_bias or attn.qk_norm != "none":
            raise ValueError("BAM attention experts support neither q/k/v bias nor qk_norm")
        if num_experts < 1:
            raise ValueError(f"BAM needs num_experts >= 1, got {num_experts}")
        self.attn_cfg = attn
        self.router = Router(attn.hidden_dim, RouterConfig(num_experts=num_experts, top_k=num_experts))
        H, D, d = attn.num_heads, attn.head_dim, attn.hidden_dim
        self.q_proj = _expert_param(num_experts, H * D, d)
        self.o_proj = _expert_param(num_experts, d, H * D)

    def mix(self, y_ENd: torch.Tensor, r) -> torch.Tensor:
        gates_NE = torch.zeros_like(r.probs).scatter(1, r.indices, r.weights)  # soft: every expert
        return torch.einsum("end,ne->nd", y_ENd.float(), gates_NE).to(y_ENd.dtype)


class BAMAttention(_SoftMixture):
    """Soft mixture of full attention experts (own Q, K, V, O). (B, T, d) -> LayerOutput."""

    def __init__(self, attn: AttentionConfig, num_experts: int):
        super().__init__(attn, num_experts)
        Hkv, D, d = attn.num_kv_heads, attn.head_dim, attn.hidden_dim
        self.k_proj = _expert_param(num_experts, Hkv * D, d)
        self.v_proj = _expert_param(num_experts, Hkv * D, d)

    def forward(self, x_BTd: torch.Tensor, ctx: AttnContext) -> LayerOutput:
        cfg = self.attn_cfg
        check_input(x_BTd, cfg.hidden_dim, "BAMAttention")
        B, T, d = x_BTd.shape
        E, H, Hkv, D = self.q_proj.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        r = self.router(x_BTd)
        x_Nd = x_BTd.reshape(B * T, d)
        # experts folded into the batch: (E, N, H*D) -> (E*B, H, T, D)
        q = _per_expert(x_Nd, self.q_proj).view(E * B, T, H, D).transpose(1, 2)
        k = _per_expert(x_Nd, self.k_proj).view(E * B, T, Hkv, D).transpose(1, 2)
        v = _per_expert(x_Nd, self.v_proj).view(E * B, T, Hkv, D).transpose(1, 2)
        q, k = apply_rotary(q, ctx.cos, ctx.sin), apply_rotary(k, ctx.cos, ctx.sin)
        if ctx.cache is not None:  # one cache per expert, stacked along the batch axis
            k, v = ctx.cache.extend("k", k), ctx.cache.extend("v", v)
        pad = ctx.left_pad.repeat(E) if ctx.left_pad is not None else None  # rows are (expert, batch)
        o = kernel(ctx, "attention")(q, k, v, ctx.q_offset, pad).transpose(1, 2).reshape(E, B * T, H * D)
        y = self.mix(torch.matmul(o, self.o_proj.transpose(1, 2)), r)  # (E, N, d) -> (N, d)
        return LayerOutput(y.view(B, T, d), r, None)


class BAMSharedKVAttention(_SoftMixture):
    """Soft mixture of attention experts with own Q and O and one shared K/V. (B, T, d) -> LayerOutput."""

    def __init__(self, attn: AttentionConfig, num_experts: int):
        super().__init__(attn, num_experts)
        Hkv, D, d = attn.num_kv_heads, attn.head_dim, attn.hidden_dim
        self.k_proj = nn.Linear(d, Hkv * D, bias=False)
        self.v_proj = nn.Linear(d, Hkv * D, bias=False)

    def forward(self, x_BTd: torch.Tensor, ctx: AttnContext) -> LayerOutput:
        cfg = self.attn_cfg
        check_input(x_BTd, cfg.hidden_dim, "BAMSharedKVAttention")
        B, T, d = x_BTd.shape
        E, Hkv, D, G = self.q_proj.shape[0], cfg.num_kv_heads, cfg.head_dim, cfg.group_size
        r = self.router(x_BTd)
        q = _per_expert(x_BTd.reshape(B * T, d), self.q_proj).view(E, B, T, Hkv, G, D)
        # order query heads (kv, expert, group) so enable_gqa pairs each with its KV head
        q = q.permute(1, 3, 0, 4, 2, 5).reshape(B, Hkv * E * G, T, D)
        k = self.k_proj(x_BTd).view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x_BTd).view(B, T, Hkv, D).transpose(1, 2)
        q, k = apply_rotary(q, ctx.cos, ctx.sin), apply_rotary(k, ctx.cos, ctx.sin)
        if ctx.cache is not None:
            k, v = ctx.cache.extend("k", k), ctx.cache.extend("v", v)
        o = dense(q, k, v, ctx).view(B, Hkv, E, G, T, D)
        o = o.permute(2, 0, 4, 1, 3, 5).reshape(E, B * T, Hkv * G * D)  # (E, N, H*D), heads (kv, g)
        y = self.mix(torch.matmul(o, self.o_proj.transpose(1, 2)), r)
        return LayerOutput(y.view(B, T, d), r, (q, k))
