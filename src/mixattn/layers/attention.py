"""Dense causal multi-head attention with GQA, RoPE and a KV cache: the reference every attention
variant reduces to (MoH with all heads on, MoA with k = E, BAM with identical experts).

RoPE as in RoFormer (arXiv 2104.09864) with HF Llama's rotate-half layout, plus Llama-3 frequency
scaling ("llama3") and linear position interpolation ("linear").

Legend: B batch, T tokens, d hidden dim, H query heads, Hkv KV heads, D head dim.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .cache import KVCache
from .dispatch import attend
from .norm import RMSNorm
from .packed import fused_linear
from .routers import RouterOutput
from .sparse import SparseSpec


@dataclass(frozen=True, kw_only=True)
class AttentionConfig:
    hidden_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qk_norm: str = "none"  # "none" | "rms": per-head RMSNorm on q and k before RoPE (OLMo-2, Qwen3)
    bias: bool = False  # biases on q/k/v projections (Qwen2, and Llama's attention_bias)
    out_bias: bool = False  # bias on the output projection (Llama's attention_bias; not Qwen2)
    norm_eps: float = 1e-5

    def __post_init__(self):
        for name in ("hidden_dim", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"attention {name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.qk_norm not in ("none", "rms"):
            raise ValueError(f"qk_norm={self.qk_norm!r} is not one of ('none', 'rms')")

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass
class AttnContext:
    """Per-forward inputs shared by every attention layer: RoPE tables for the current positions,
    the position of the first token (non-zero when decoding), and this layer's cache."""

    cos: torch.Tensor  # (T, D)
    sin: torch.Tensor  # (T, D)
    q_offset: int = 0
    cache: KVCache | None = None  # or a RaggedKVCache when a sparse plan is applied
    ref_len: int | None = None  # sparse plans: reference length N (generation: prompt + max_new_tokens)
    left_pad: torch.Tensor | None = None  # (B,) padding tokens at the start of each row, never attended to
    kernels: Mapping[str, str] | None = None  # {op: impl} the model chose (MixtureConfig.kernels); others "auto"


@dataclass
class LayerOutput:
    """A mixture layer's result: output (B, T, d), its routing (None for dense layers), and the
    attention's (q, k) for attention-aware routing in the next FFN."""

    y: torch.Tensor
    router: RouterOutput | None = None
    graph_qk: tuple[torch.Tensor, torch.Tensor] | None = None


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama-3.1 RoPE scaling: long wavelengths divided by ``factor``, short kept, smooth in between."""
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_ctx = scaling.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables (T, D) for integer positions. ``scaling``: None, or a dict with
    ``rope_type`` in {"default", "linear", "llama3"} and ``factor`` (HF ``rope_scaling`` layout)."""

    def __init__(self, head_dim: int, theta: float = 10000.0, scaling: dict | None = None):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        if kind == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, scaling)
        elif kind == "linear":
            inv_freq = inv_freq / scaling["factor"]
        elif kind != "default":
            raise ValueError(f"unsupported rope scaling type {kind!r}; supported: default, linear, llama3")
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) must not round the frequencies: an 8-bit mantissa puts position 4000's
        # angles off by whole turns. Keep them at least fp32 (float64 models keep float64).
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        if self.inv_freq.dtype in (torch.bfloat16, torch.float16):
            self.inv_freq = inv_freq.to(self.inv_freq.device)
        return self

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs_TD2 = positions.float()[:, None] * self.inv_freq[None, :]
        emb_TD = torch.cat([freqs_TD2, freqs_TD2], dim=-1)
        return emb_TD.cos(), emb_TD.sin()


def apply_rotary(x_BHTD: torch.Tensor, cos_TD: torch.Tensor, sin_TD: torch.Tensor) -> torch.Tensor:
    x1, x2 = x_BHTD.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x_BHTD * cos_TD + rotated * sin_TD).to(x_BHTD.dtype)


def check_input(x: torch.Tensor, hidden_dim: int, who: str) -> None:
    """Clear errors for the common misuse: wrong rank, width or dtype."""
    if not torch.is_floating_point(x):
        raise ValueError(f"{who} expects a floating-point input, got {x.dtype}")
    if x.dim() != 3 or x.shape[-1] != hidden_dim:
        raise ValueError(f"{who} expects input (batch, tokens, {hidden_dim}), got {tuple(x.shape)}")


QKV = ("q_proj", "k_proj", "v_proj")


class Attention(nn.Module):
    """Causal GQA attention. forward: (B, T, d) -> LayerOutput with y (B, T, d)."""

    PACK_GROUPS = (QKV,)  # one prepacked call for all three (``layers.packed``)

    def __init__(self, cfg: AttentionConfig):
        super().__init__()
        self.cfg = cfg
        H, Hkv, D, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_dim
        self.q_proj = nn.Linear(d, H * D, bias=cfg.bias)
        self.k_proj = nn.Linear(d, Hkv * D, bias=cfg.bias)
        self.v_proj = nn.Linear(d, Hkv * D, bias=cfg.bias)
        self.o_proj = nn.Linear(H * D, d, bias=cfg.out_bias)
        self.sparse: SparseSpec | None = None  # set by compress.apply_plan
        self.q_norm = RMSNorm(D, cfg.norm_eps) if cfg.qk_norm == "rms" else None
        self.k_norm = RMSNorm(D, cfg.norm_eps) if cfg.qk_norm == "rms" else None

    def project_kv(self, x_BTd: torch.Tensor, ctx: AttnContext, raw=None) -> tuple[torch.Tensor, torch.Tensor]:
        """K (after RoPE) and V for the new tokens, appended to the cache: (B, Hkv, Tk, D) each.
        ``raw``: (k_proj(x), v_proj(x)) when already computed (``fused_linear``)."""
        B, T, _ = x_BTd.shape
        k_raw, v_raw = raw if raw is not None else (self.k_proj(x_BTd), self.v_proj(x_BTd))
        k = k_raw.view(B, T, self.cfg.num_kv_heads, -1).transpose(1, 2)  # (B, Hkv, T, D)
        v = v_raw.view(B, T, self.cfg.num_kv_heads, -1).transpose(1, 2)  # (B, Hkv, T, D)
        if self.k_norm is not None:
            k = self.k_norm(k)
        k = apply_rotary(k, ctx.cos, ctx.sin)
        if isinstance(ctx.cache, KVCache):  # a ragged cache is written inside ``attend``
            k, v = ctx.cache.extend("k", k), ctx.cache.extend("v", v)
        return k, v

    def project_q(self, x_BTd: torch.Tensor, ctx: AttnContext, rope: bool = True, raw=None) -> torch.Tensor:
        B, T, _ = x_BTd.shape
        q = (self.q_proj(x_BTd) if raw is None else raw).view(B, T, self.cfg.num_heads, -1).transpose(1, 2)  # (B, H, T, D)
        if self.q_norm is not None:
            q = self.q_norm(q)
        return apply_rotary(q, ctx.cos, ctx.sin) if rope else q

    def forward(self, x_BTd: torch.Tensor, ctx: AttnContext) -> LayerOutput:
        check_input(x_BTd, self.cfg.hidden_dim, "Attention")
        B, T, _ = x_BTd.shape
        qkv = fused_linear(self, QKV, x_BTd)  # one prepacked call where ``pack`` fused them
        q = self.project_q(x_BTd, ctx, raw=None if qkv is None else qkv[0])
        k, v = self.project_kv(x_BTd, ctx, raw=None if qkv is None else qkv[1:])
        o_BHTD = attend(q, k, v, ctx, self.sparse)
        y = self.o_proj(o_BHTD.transpose(1, 2).reshape(B, T, -1))  # (B, T, H*D) -> (B, T, d)
        return LayerOutput(y, None, (q, k))
