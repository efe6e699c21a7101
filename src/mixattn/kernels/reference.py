"""Slow, obviously-correct reference kernels. Fast paths are tested against these.

Legend: N routed rows (tokens x slots, sorted by expert), E experts, B batch, H query heads,
Hkv key/value heads, T tokens, D head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import register
from .sdpa import causal_mask, causal_sdpa


def masked_attention(q_BHQD, k_BKTD, v_BKTD, mask=None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + mask) v in fp32 math, GQA by repeating K/V.

    ``mask``: boolean, broadcastable to (B, H, Tq, Tk), True where a key is seen. (B, H, Tq, Dv)."""
    G = q_BHQD.shape[1] // k_BKTD.shape[1]
    k, v = k_BKTD.repeat_interleave(G, 1).float(), v_BKTD.repeat_interleave(G, 1).float()
    s = q_BHQD.float() @ k.transpose(-1, -2) / math.sqrt(q_BHQD.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return (s.softmax(-1) @ v).to(q_BHQD.dtype)


@register("attention", "reference")
def attention_reference(q_BHQD, k_BKTD, v_BKTD, q_offset: int = 0, left_pad=None) -> torch.Tensor:
    """Causal attention by the definition (``causal_sdpa``'s contract; the mask is ``causal_mask``)."""
    mask = causal_mask(q_BHQD.shape[2], k_BKTD.shape[2], q_offset, left_pad, q_BHQD.device)
    return masked_attention(q_BHQD, k_BKTD, v_BKTD, mask)


@register("grouped_linear", "reference")
def grouped_linear_reference(x_NI: torch.Tensor, w_EOI: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Per-expert loop. Rows of ``x`` are sorted by expert; expert e owns ``counts[e]`` rows.

    Loops over ``w.unbind(0)``: indexing ``w[e]`` in a loop makes the backward 4-8x slower, because
    each index op materialises a full (E, out, in) zero gradient.
    """
    chunks = x_NI.split(counts_E.tolist(), dim=0)
    outs = [F.linear(xc, we) for xc, we in zip(chunks, w_EOI.unbind(0))]
    return torch.cat(outs, dim=0) if outs else x_NI.new_zeros(0, w_EOI.shape[1])


@register("head_sparse_attention", "reference")
def head_sparse_attention_reference(
    q_BHTD: torch.Tensor,
    k_BKTD: torch.Tensor,
    v_BKTD: torch.Tensor,
    active_BTH: torch.Tensor,
    q_offset: int = 0,
    left_pad: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mask-after-compute: every head attends for every token, then inactive pairs are zeroed."""
    out_BHTD = causal_sdpa(q_BHTD, k_BKTD, v_BKTD, q_offset, left_pad)
    return out_BHTD.transpose(1, 2) * active_BTH.unsqueeze(-1).to(out_BHTD.dtype)  # (B, T, H, D)
