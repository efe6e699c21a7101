"""``sparse_attention`` impl ``sdpa``: the fused SDPA kernel run on the kept keys only.

For one group of KV heads with the same rule (sink s, span w) and T queries:

- queries ``0 .. P-1`` with ``P = min(T, s + w)`` see every earlier key (a query at position i < s + w
  keeps all i + 1 keys), so they are one causal SDPA call over the first P keys;
- the rest go in blocks of C queries. Block ``[a, a + C)`` (a >= P) sees the sink ``[0, s)`` and the
  window span ``[a - w + 1, a + C)``; the two never overlap (a - w + 1 > s). One SDPA call per block
  over those ``s + w + C - 1`` keys with a fixed (C, s + w + C - 1) band mask, the same for every block.

The work is the plan's kept (query, key) pairs plus C^2 per block (the two masked triangles at the
band's edges), all of it in the fused kernel (flash on CPU, which skips nothing inside a block but
never materialises the scores). Unlike ``flex`` it needs no compilation and no block mask, and it is
differentiable (SDPA's own backward), so it serves training as well as inference.

Signature as the other ``sparse_attention`` kernels: (q (B, H, T, D), k, v (B, Hkv, T, D), sink (Hkv,),
span (Hkv,), left_pad (B,) | None) -> (B, H, T, D).

Legend: B batch, H query heads, Hkv KV heads, G = H / Hkv, T tokens, D head dim, C query block.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import register
from .sparse import _per_sample, _rule_groups


def block_rows(span: int) -> int:
    """Query block C for a window of ``span`` keys: the masked triangles cost C^2 per block against
    C * span kept pairs, so C grows with the span (a quarter of it), within [128, 1024] and a multiple
    of 64. Measured (4k, density 0.25 and 0.5, 2 threads): C of span/4 to span/2 is within noise of
    the best; 128 for a 2k span is 2x slower (per-call overhead)."""
    return max(128, min(1024, (span // 4) // 64 * 64))


@functools.lru_cache(maxsize=64)
def _band_mask(C: int, sink: int, span: int, device: str) -> torch.Tensor:
    """(C, sink + span + C - 1) bool: row r (query a + r) sees every sink key and window key m
    (position a - span + 1 + m) when r <= m <= r + span - 1."""
    r = torch.arange(C, device=device)[:, None]
    m = torch.arange(span + C - 1, device=device)[None, :]
    band = (m >= r) & (m <= r + span - 1)
    return torch.cat([torch.ones(C, sink, dtype=torch.bool, device=device), band], dim=1)


def _causal_head(q, k, v, P: int) -> torch.Tensor:
    """Queries [0, P) see every earlier key: one causal SDPA call over the first P keys."""
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q[:, :, :P], k[:, :, :P], v[:, :, :P], is_causal=True, enable_gqa=gqa)


def _group(q, k, v, sink: int, span: int) -> torch.Tensor:
    """One rule for all heads: q (B, Hg*G, T, D), k, v (B, Hg, T, D) -> (B, Hg*G, T, D)."""
    T = q.shape[2]
    P = min(T, sink + span)
    if P == T:  # every query keeps all its keys: plain causal attention
        return _causal_head(q, k, v, P)
    out = torch.empty_like(q)  # written block by block: no list of partial outputs and no final cat
    out[:, :, :P] = _causal_head(q, k, v, P)
    masked_blocks(q, k, v, sink, span, P, block_rows(span), out[:, :, P:])
    return out


def masked_blocks(q, k, v, sink: int, span: int, start: int, C: int, out: torch.Tensor) -> torch.Tensor:
    """Queries [start, T) (start >= sink + span) in blocks of C rows, one band-masked SDPA call each,
    over the sink and the block's window keys, written into ``out`` (B, Hg*G, T - start, D)."""
    T = q.shape[2]
    gqa = q.shape[1] != k.shape[1]
    mask = _band_mask(C, sink, span, str(q.device))
    for a in range(start, T, C):
        c = min(C, T - a)
        lo = a - span + 1  # first window key of the block's first query; > sink since a >= sink + span
        kk = torch.cat([k[:, :, :sink], k[:, :, lo : a + c]], dim=2) if sink else k[:, :, lo : a + c]
        vv = torch.cat([v[:, :, :sink], v[:, :, lo : a + c]], dim=2) if sink else v[:, :, lo : a + c]
        out[:, :, a - start : a - start + c] = F.scaled_dot_product_attention(
            q[:, :, a : a + c], kk, vv, attn_mask=mask[:c, : sink + span + c - 1], enable_gqa=gqa)  # fmt: skip
    return out


def _by_rule(q, k, v, sink, span, group) -> torch.Tensor:
    """Run ``group(q_g, k_g, v_g, sink, span)`` once per set of KV heads with equal rules and put the
    query heads back in order: (B, H, T, D) -> (B, H, T, D)."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    groups = _rule_groups(sink, span)
    if len(groups) == 1:
        return group(q, k, v, int(sink[0]), int(span[0]))
    out = torch.empty_like(q)  # each group's query heads written in place: no cat, no un-permute
    for heads in groups:
        h0, n = heads[0], len(heads)
        if heads == list(range(h0, h0 + n)):  # contiguous heads: views, no gather
            qg, kg, vg = q[:, h0 * G : (h0 + n) * G], k[:, h0 : h0 + n], v[:, h0 : h0 + n]
            out[:, h0 * G : (h0 + n) * G] = group(qg, kg, vg, int(sink[h0]), int(span[h0]))
        else:
            idx = torch.tensor(heads, device=q.device)
            q_idx = (idx[:, None] * G + torch.arange(G, device=q.device)).flatten()
            qg, kg, vg = q.index_select(1, q_idx), k.index_select(1, idx), v.index_select(1, idx)
            out.index_copy_(1, q_idx, group(qg, kg, vg, int(sink[h0]), int(span[h0])))
    return out


@register("sparse_attention", "sdpa")
@_per_sample
def sparse_sdpa(q, k, v, sink, span):
    return _by_rule(q, k, v, sink, span, _group)
