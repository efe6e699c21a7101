"""Relative Convolutional Multi-Head Attention (RCMHA; Sugiharto, Aradea and Mubarok, "RCMHA:
Relative Convolutional Multi-Head Attention for Natural Language Modelling", arXiv 2308.03429),
with its two ablations as settings of one config:

- a depth-wise convolution over the sequence on the Q, K and V projections, as in Primer's
  Multi-DConv-Head Attention (MDHA; So et al., "Primer: Searching for Efficient Transformers for
  Language Modeling", arXiv 2109.08668, width 3 per channel);
- relative positions in the attention scores, as in Transformer-XL (Dai et al., arXiv 1901.02860,
  sec. 3.3: content bias u, position bias v, sinusoidal distance embeddings projected per head;
  the "RMHA" of the paper; Shaw et al., arXiv 1803.02155, introduced relative position scores).

``RCMHAConfig(conv_kernel=3, position="relative")`` is RCMHA, ``position="rope"`` keeps RoPE and
gives MDHA, ``conv_kernel=0`` gives RMHA, and both off is exactly ``Attention``.

The convolution is causal (output t reads inputs t-K+1 .. t), so the model stays autoregressive.
For decoding, ``ConvKVCache`` (from ``new_cache``, which ``MixtureLM.new_cache`` calls) keeps the
last K-1 raw projections next to K and V, so decode equals the full forward. Each tap starts as the
identity (last tap 1, others 0): an untrained MDHA layer is plain attention.

Legend: B batch, T new tokens, d hidden dim, H query heads, Hkv KV heads, D head dim,
C = (H + 2 Hkv) D projection channels, K conv width, L distances (= keys so far).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, AttentionConfig, AttnContext, LayerOutput, apply_rotary, check_input
from .cache import KVCache
from .dispatch import attend, kernel

POSITIONS = ("relative", "rope")


@dataclass(frozen=True, kw_only=True)
class RCMHAConfig:
    conv_kernel: int = 3  # causal depth-wise conv width on Q, K, V (Primer: 3); 0 = no convolution
    position: str = "relative"  # relative (Transformer-XL scores, no RoPE) | rope (as Attention)
    rel_theta: float = 10000.0  # base of the sinusoidal distance embeddings

    def __post_init__(self):
        if not isinstance(self.conv_kernel, int) or self.conv_kernel < 0:
            raise ValueError(f"RCMHA conv_kernel must be an integer >= 0 (0 = off), got {self.conv_kernel!r}")
        if self.position not in POSITIONS:
            raise ValueError(f"RCMHA position={self.position!r} is not one of {POSITIONS}")
        if self.rel_theta <= 1:
            raise ValueError(f"RCMHA rel_theta must be > 1, got {self.rel_theta}")


class ConvKVCache(KVCache):
    """A dense ``KVCache`` plus the causal convolution's state: the last ``keep`` raw inputs per name."""

    def __init__(self, capacity: int = 0):
        super().__init__(capacity)
        self.conv_state: dict[str, torch.Tensor] = {}

    def roll(self, name: str, x_BTC: torch.Tensor, keep: int) -> torch.Tensor:
        """The ``keep`` inputs before ``x`` (zeros before the first token) followed by ``x``:
        (B, keep + T, C); remembers the last ``keep`` of them for the next call."""
        prev = self.conv_state.get(name)
        if prev is None:
            prev = x_BTC.new_zeros(x_BTC.shape[0], keep, x_BTC.shape[2])
        full_BSC = torch.cat([prev.to(x_BTC.dtype), x_BTC], dim=1)  # S = keep + T
        self.conv_state[name] = full_BSC[:, full_BSC.shape[1] - keep :].detach()
        return full_BSC

    def nbytes(self) -> int:
        return super().nbytes() + sum(s.numel() * s.element_size() for s in self.conv_state.values())


def causal_depthwise_conv(x_BTC: torch.Tensor, w_CK: torch.Tensor, past_BPC: torch.Tensor | None = None) -> torch.Tensor:
    """y_t[c] = sum_k w[c, k] x_{t-K+1+k}[c], reading the K-1 inputs before x from ``past``
    (B, K-1, C) or zeros. (B, T, C) -> (B, T, C)."""
    K, T = w_CK.shape[1], x_BTC.shape[1]
    if past_BPC is None:
        x_BSC = F.pad(x_BTC, (0, 0, K - 1, 0))  # (B, K-1+T, C)
    else:
        x_BSC = torch.cat([past_BPC, x_BTC], dim=1)  # (B, K-1+T, C)
    # K shifted multiply-adds in (B, T, C) layout: the result stays channel-contiguous, so the heads
    # split from it keep stride 1 in D and SDPA can take its fused (flash) path; conv1d's (B, C, T)
    # output would force the math path, which stores every T x T attention matrix for backward
    w = w_CK.to(x_BTC.dtype)
    y_BTC = x_BSC[:, :T] * w[:, 0]
    for k in range(1, K):
        y_BTC = y_BTC + x_BSC[:, k : k + T] * w[:, k]
    return y_BTC


def sinusoid(distances: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    """Transformer-XL's distance embeddings: [sin(p f), cos(p f)] for distances p, (L,) -> (L, dim)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=distances.device) / dim)
    ang_LF = distances.float()[:, None] * inv_freq[None, :]
    return torch.cat([ang_LF.sin(), ang_LF.cos()], dim=-1)[:, :dim]


class RCMHAttention(Attention):
    """Same Q/K/V/O projections (and parameter names) as ``Attention``, plus the convolution
    ``conv_weight`` (C, K) and the relative-position parameters ``rel_proj`` (d -> H D), ``pos_bias_u``
    and ``pos_bias_v`` (H, D). forward(x (B, T, d), ctx) -> LayerOutput(y (B, T, d), None, (q, k))."""

    PACK_GROUPS = ()  # its forward projects q and k/v separately: each linear keeps its own packed copy

    def __init__(self, attn: AttentionConfig, cfg: RCMHAConfig):
        super().__init__(attn)
        self.rc = cfg
        H, Hkv, D, d = attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.hidden_dim
        self.conv_weight = None
        if cfg.conv_kernel:
            w = torch.zeros((H + 2 * Hkv) * D, cfg.conv_kernel)
            w[:, -1] = 1.0  # identity start: an untrained convolution passes the projections through
            self.conv_weight = nn.Parameter(w)
        self.rel_proj = self.pos_bias_u = self.pos_bias_v = None
        if cfg.position == "relative":
            self.rel_proj = nn.Linear(d, H * D, bias=False)  # Transformer-XL's W_{k,R}
            self.pos_bias_u = nn.Parameter(torch.zeros(H, D))  # content bias u
            self.pos_bias_v = nn.Parameter(torch.zeros(H, D))  # position bias v

    def new_cache(self, capacity: int = 0) -> ConvKVCache:
        return ConvKVCache(capacity)

    def distance_table(self, L: int, device) -> torch.Tensor:
        """Projected embeddings of distances 0 .. L-1, one per query head: (H, L, D)."""
        H, D = self.cfg.num_heads, self.cfg.head_dim
        emb_Ld = sinusoid(torch.arange(L, device=device), self.cfg.hidden_dim, self.rc.rel_theta)
        return self.rel_proj(emb_Ld.to(self.rel_proj.weight.dtype)).view(L, H, D).transpose(0, 1)  # (H, L, D)

    def _projections(self, x_BTd: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        """Q, K, V projections side by side, through the causal convolution: (B, T, C)."""
        B, T, _ = x_BTd.shape
        qkv_BTC = torch.cat([self.q_proj(x_BTd), self.k_proj(x_BTd), self.v_proj(x_BTd)], dim=-1)
        if self.conv_weight is None:
            return qkv_BTC
        if ctx.left_pad is not None:  # padding feeds zeros to the convolution, as before a sequence start
            pos = torch.arange(ctx.q_offset, ctx.q_offset + T, device=x_BTd.device)
            real_BT = pos[None, :] >= ctx.left_pad.to(x_BTd.device)[:, None]
            qkv_BTC = qkv_BTC * real_BT[..., None].to(qkv_BTC.dtype)
        if ctx.cache is None:
            if ctx.q_offset:
                raise ValueError("RCMHA with a convolution needs its cache (model.new_cache()) to decode at an offset")
            return causal_depthwise_conv(qkv_BTC, self.conv_weight)
        if not isinstance(ctx.cache, ConvKVCache):
            raise ValueError(f"RCMHA keeps its convolution state in a ConvKVCache (from model.new_cache()), "
                             f"got {type(ctx.cache).__name__}")  # fmt: skip
        K = self.conv_weight.shape[1]
        full_BSC = ctx.cache.roll("qkv", qkv_BTC, K - 1)  # S = K-1 + T
        return causal_depthwise_conv(full_BSC[:, K - 1 :], self.conv_weight, full_BSC[:, : K - 1])

    def forward(self, x_BTd: torch.Tensor, ctx: AttnContext) -> LayerOutput:
        check_input(x_BTd, self.cfg.hidden_dim, "RCMHAttention")
        if self.sparse is not None:
            raise ValueError("sparse attention plans do not apply to RCMHA (its scores carry relative positions)")
        B, T, _ = x_BTd.shape
        H, Hkv, D = self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim
        q, k, v = self._projections(x_BTd, ctx).split([H * D, Hkv * D, Hkv * D], dim=-1)
        q = q.reshape(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.reshape(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.reshape(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rc.position == "rope":
            q, k = apply_rotary(q, ctx.cos, ctx.sin), apply_rotary(k, ctx.cos, ctx.sin)
        if ctx.cache is not None:
            k, v = ctx.cache.extend("k", k), ctx.cache.extend("v", v)
        if self.rc.position == "rope":
            o_BHTD = attend(q, k, v, ctx, None)
        else:
            r_HLD = self.distance_table(k.shape[2], x_BTd.device)
            qc = q + self.pos_bias_u[None, :, None, :].to(q.dtype)
            qp = q + self.pos_bias_v[None, :, None, :].to(q.dtype)
            o_BHTD = kernel(ctx, "relative_attention")(qc, qp, k, v, r_HLD, ctx.q_offset, ctx.left_pad)
        y = self.o_proj(o_BHTD.transpose(1, 2).reshape(B, T, -1))  # (B, T, H*D) -> (B, T, d)
        return LayerOutput(y, None, (q, k))
