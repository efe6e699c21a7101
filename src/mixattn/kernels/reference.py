"""Slow, obviously-correct reference kernels. Fast paths are tested against these.

Legend: N routed rows (tokens x slots, sorted by expert), E experts, B batch, H query heads,
Hkv key/value heads, T tokens, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import register
from .sdpa import causal_sdpa


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
