"""Causal scaled-dot-product attention with a query offset (for KV-cached decoding).

Legend: B batch, H query heads, Hkv KV heads, Tq queries, Tk keys, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import decode, register


def causal_mask(Tq: int, Tk: int, q_offset: int = 0, left_pad=None, device=None) -> torch.Tensor:
    """The ``attention`` op's mask, True where seen: query i sits at position q_offset + i and sees
    key j <= that position; with ``left_pad`` (B,) a row's padded keys are never seen and a padded
    query sees only itself. (Tq, Tk), or (B, 1, Tq, Tk) with ``left_pad``."""
    q_pos = torch.arange(q_offset, q_offset + Tq, device=device)[:, None]
    k_pos = torch.arange(Tk, device=device)[None, :]
    mask = k_pos <= q_pos  # (Tq, Tk)
    if left_pad is not None:
        pad = left_pad.to(device)[:, None, None, None]  # (B, 1, 1, 1)
        mask = (mask & (k_pos >= pad)) | ((q_pos < pad) & (k_pos == q_pos))
    return mask


@register("attention", "sdpa")
def causal_sdpa(
    q_BHQD: torch.Tensor,
    k_BKTD: torch.Tensor,
    v_BKTD: torch.Tensor,
    q_offset: int = 0,
    left_pad: torch.Tensor | None = None,
) -> torch.Tensor:
    """Queries sit at positions ``q_offset .. q_offset+Tq-1``; keys at ``0 .. Tk-1``; query i sees key j <= i.

    ``left_pad`` (B,): row b's first ``left_pad[b]`` tokens are padding, never seen as keys. A padded
    query sees only itself (its output is finite and meaningless; callers ignore it).

    SDPA's ``is_causal`` aligns the mask top-left, which is only right when Tq == Tk, so other
    cases get an explicit mask (or none for a single query that sees every key). GQA is native
    (``enable_gqa``, or folded onto the query axis for one decode query): query head h reads KV head h // (H / Hkv).
    """
    Tq, Tk = q_BHQD.shape[2], k_BKTD.shape[2]
    gqa = q_BHQD.shape[1] != k_BKTD.shape[1]
    if left_pad is not None and bool(left_pad.any()):
        mask_B1QT = causal_mask(Tq, Tk, q_offset, left_pad, q_BHQD.device)
        return F.scaled_dot_product_attention(q_BHQD, k_BKTD, v_BKTD, attn_mask=mask_B1QT, enable_gqa=gqa)
    if q_offset == 0 and Tq == Tk:
        return F.scaled_dot_product_attention(q_BHQD, k_BKTD, v_BKTD, is_causal=True, enable_gqa=gqa)
    if Tq == 1 and q_offset == Tk - 1:  # one decode query sees every key
        return _one_query("sdpa", q_BHQD, k_BKTD, v_BKTD)
    mask_QT = causal_mask(Tq, Tk, q_offset, None, q_BHQD.device)
    return F.scaled_dot_product_attention(q_BHQD, k_BKTD, v_BKTD, attn_mask=mask_QT, enable_gqa=gqa)


def _one_query(impl: str, q_BHQD, k_BKTD, v_BKTD) -> torch.Tensor:
    """A single decode query that sees every key, by ``decode.ATTN[impl]``: the query heads of a KV
    head ride on the query axis (no K/V expansion for GQA)."""
    B, H, _, D = q_BHQD.shape
    Hkv = k_BKTD.shape[1]
    o_BKGV = decode.ATTN[impl](q_BHQD.reshape(B, Hkv, H // Hkv, D), k_BKTD, v_BKTD)
    return o_BKGV.reshape(B, H, 1, v_BKTD.shape[-1])  # values may be narrower than D (graph routers)


@register("attention", "matmul")
def causal_matmul(q_BHQD, k_BKTD, v_BKTD, q_offset: int = 0, left_pad=None) -> torch.Tensor:
    """``causal_sdpa``'s contract; a single unpadded decode query runs as two GEMMs
    (``decode.matmul_attention``), everything else as ``causal_sdpa``."""
    if _single_query(q_BHQD, k_BKTD, q_offset, left_pad):
        return _one_query("matmul", q_BHQD, k_BKTD, v_BKTD)
    return causal_sdpa(q_BHQD, k_BKTD, v_BKTD, q_offset, left_pad)


def _single_query(q_BHQD, k_BKTD, q_offset, left_pad) -> bool:
    return q_BHQD.shape[2] == 1 and q_offset == k_BKTD.shape[2] - 1 and (left_pad is None or not bool(left_pad.any()))


@register("attention", "auto")
def causal_auto(q_BHQD, k_BKTD, v_BKTD, q_offset: int = 0, left_pad=None) -> torch.Tensor:
    """The fused kernel, except a single decode query without gradients, which takes the faster of
    ``sdpa`` and ``matmul`` on this machine for its shape (``decode.fastest``)."""
    args = (q_BHQD, k_BKTD, v_BKTD, q_offset, left_pad)
    if not _single_query(q_BHQD, k_BKTD, q_offset, left_pad):
        return causal_sdpa(*args)
    return decode.fastest("attention", q_BHQD, k_BKTD.shape[2], {"sdpa": causal_sdpa, "matmul": causal_matmul}, *args)
