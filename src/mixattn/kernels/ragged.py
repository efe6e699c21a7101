"""Attention over a per-KV-head ragged cache (sink + circular window per head; the storage is
``layers.cache.RaggedKVCache``, which only stores: the math is here).

- ``ragged_attention`` (decode): one new query per row over the cache. The cache hands over, per
  group of heads with equal capacity, the first ``n = min(length, cap)`` slots of each head, which
  hold exactly the keys the newest query may see, so no window mask is needed; with left padding a
  row's own length bounds its valid slots.
- ``ragged_chunk_attention`` (chunked prefill): T new queries at positions ``L .. L+T-1`` over each
  head's kept keys (given with their positions) plus the new keys, masked by the head's rule.

``sdpa`` calls the fused kernel (the chunk in blocks of ``CHUNK_ROWS`` queries, each over the keys
it can reach); ``reference`` is the explicit softmax (``masked_attention``) over every kept key.
Query heads of one KV head ride on the query axis, so GQA needs no K/V expansion.

Legend: B batch, H query heads, Hkv KV heads, G = H / Hkv, T new queries, n kept keys, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import decode, register
from .reference import masked_attention


def _decode(attn, q_BH1D, groups, perm, row_len) -> torch.Tensor:
    B, H, _, D = q_BH1D.shape
    Hkv = sum(k.shape[1] for k, _ in groups)
    q_BKGD = q_BH1D.reshape(B, Hkv, H // Hkv, D)
    if perm is not None:
        q_BKGD = q_BKGD.index_select(1, perm[0])  # buffer order
    outs, h0 = [], 0
    for k_BhnD, v_BhnD in groups:
        heads, n = k_BhnD.shape[1], k_BhnD.shape[2]
        # a padded row has written fewer slots: its first min(row length, cap) are the valid ones
        mask = None if row_len is None else torch.arange(n, device=q_BH1D.device) < row_len[:, None, None, None]
        outs.append(attn(q_BKGD[:, h0 : h0 + heads], k_BhnD, v_BhnD, mask))
        h0 += heads
    o_BKGD = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    if perm is not None:
        o_BKGD = o_BKGD.index_select(1, perm[1])  # back to head order
    return o_BKGD.reshape(B, H, 1, D)


def _sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


@register("ragged_attention", "sdpa")
def ragged_attention_sdpa(q_BH1D, groups, perm=None, row_len=None) -> torch.Tensor:
    """q (B, H, 1, D); groups: [(k, v) each (B, heads, n, D)] in buffer order; perm: (order,
    inverse) head index tensors when the buffer order is not the head order; row_len (B,) | None:
    valid slots per row (left padding). -> (B, H, 1, D)."""
    return _decode(decode.sdpa_attention, q_BH1D, groups, perm, row_len)


@register("ragged_attention", "matmul")
def ragged_attention_matmul(q_BH1D, groups, perm=None, row_len=None) -> torch.Tensor:
    """``ragged_attention_sdpa``'s contract by two GEMMs per group (``decode.matmul_attention``)."""
    return _decode(decode.matmul_attention, q_BH1D, groups, perm, row_len)


@register("ragged_attention", "reference")
def ragged_attention_reference(q_BH1D, groups, perm=None, row_len=None) -> torch.Tensor:
    return _decode(masked_attention, q_BH1D, groups, perm, row_len)


@register("ragged_attention", "auto")
def ragged_attention_auto(q_BH1D, groups, perm=None, row_len=None) -> torch.Tensor:
    """The faster of ``sdpa`` and ``matmul`` on this machine for this shape (``decode.fastest``)."""
    n = max((k.shape[2] for k, _ in groups), default=0)
    impls = {"sdpa": ragged_attention_sdpa, "matmul": ragged_attention_matmul}
    return decode.fastest("ragged_attention", q_BH1D, n, impls, q_BH1D, groups, perm, row_len)


def _chunk(attn, q_BHTD, k_BKTD, v_BKTD, kept, sink, span, L) -> torch.Tensor:
    H, T, Hkv = q_BHTD.shape[1], q_BHTD.shape[2], k_BKTD.shape[1]
    G = H // Hkv
    qp = torch.arange(L, L + T, device=q_BHTD.device)[:, None]
    outs = []
    for h, (pos, k_old, v_old) in enumerate(kept):
        kp = torch.cat([pos, qp[:, 0]])[None, :]
        mask = (kp <= qp) & ((kp < sink[h]) | (qp - kp < span[h]))  # (T, n + T)
        kk = torch.cat([k_old, k_BKTD[:, h]], dim=1)[:, None]  # (B, 1, n + T, D)
        vv = torch.cat([v_old, v_BKTD[:, h]], dim=1)[:, None]
        outs.append(attn(q_BHTD[:, h * G : (h + 1) * G], kk, vv, mask))  # (B, G, T, D)
    return torch.cat(outs, dim=1)


CHUNK_ROWS = 256  # query rows per SDPA call of the chunked prefill: bounds the mask to ROWS x (sink + span + ROWS)


def _chunk_rows(q_BHTD, k_BKTD, v_BKTD, kept, sink, span, L: int, rows: int = CHUNK_ROWS) -> torch.Tensor:
    """``_chunk`` with the queries in blocks of ``rows``: each block attends to the sink and the keys
    its window reaches only (positions are sorted: kept ones, then the new ones), so the transient
    mask and scores are rows x (sink + span + rows) instead of T x (kept + T)."""
    H, T, Hkv = q_BHTD.shape[1], q_BHTD.shape[2], k_BKTD.shape[1]
    G = H // Hkv
    dev = q_BHTD.device
    outs = []
    for h, (pos, k_old, v_old) in enumerate(kept):
        s, w = int(sink[h]), int(span[h])
        kp = torch.cat([pos, torch.arange(L, L + T, device=dev)])  # (n + T,) ascending
        kk = torch.cat([k_old, k_BKTD[:, h]], dim=1)[:, None]  # (B, 1, n + T, D)
        vv = torch.cat([v_old, v_BKTD[:, h]], dim=1)[:, None]
        ns = int(torch.searchsorted(kp, s))  # keys in the sink
        head = []
        for a in range(0, T, rows):
            c = min(rows, T - a)
            hi = len(pos) + a + c  # keys up to the block's last query (new key t sits at len(pos) + t)
            sk = min(ns, hi)  # sink keys this block can reach (all of them, unless it is still inside the sink)
            lo = max(sk, int(torch.searchsorted(kp, L + a - w + 1)))  # the block's first query's window start
            idx = torch.cat([torch.arange(sk, device=dev), torch.arange(lo, hi, device=dev)])
            qp, p = torch.arange(L + a, L + a + c, device=dev)[:, None], kp[idx][None, :]
            mask = (p <= qp) & ((p < s) | (qp - p < w))  # (c, sk + hi - lo)
            head.append(_sdpa(q_BHTD[:, h * G : (h + 1) * G, a : a + c], kk[:, :, idx], vv[:, :, idx], mask))
        outs.append(torch.cat(head, dim=2))  # (B, G, T, D)
    return torch.cat(outs, dim=1)


@register("ragged_chunk_attention", "sdpa")
def ragged_chunk_attention_sdpa(q_BHTD, k_BKTD, v_BKTD, kept, sink, span, L: int) -> torch.Tensor:
    """q (B, H, T, D) at positions L..L+T-1; k, v (B, Hkv, T, D) the new keys; kept: per KV head
    (positions (n,), k (B, n, D), v (B, n, D)) read from the cache; sink, span: ints per KV head.
    -> (B, H, T, D)."""
    return _chunk_rows(q_BHTD, k_BKTD, v_BKTD, kept, sink, span, L)


@register("ragged_chunk_attention", "reference")
def ragged_chunk_attention_reference(q_BHTD, k_BKTD, v_BKTD, kept, sink, span, L: int) -> torch.Tensor:
    return _chunk(masked_attention, q_BHTD, k_BKTD, v_BKTD, kept, sink, span, L)


register("ragged_chunk_attention", "auto")(ragged_chunk_attention_sdpa)
