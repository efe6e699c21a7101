"""``sparse_attention`` impl ``merge``: the kept keys in unmasked and causal pieces, joined by log-sum-exp.

The ``sdpa`` kernel runs each query block over its sink + window keys with a band mask. On CPU the
masked flash kernel reads the mask for every (query, key) pair and skips nothing inside a block, so
a masked pair costs about 20% more than a causal one; at density 0.5 that eats the saving. Here the
band is cut into pieces that need no mask. For a group of KV heads with one rule (sink s, span w),
queries ``[0, P)``, P = min(T, s + w), are one causal call as in ``sdpa``. After that, query block
``[a, a + C)`` (row r is query a + r) sees:

- the sink ``[0, s)`` and the middle of its window ``[a - w + 1 + C, a)``: every row sees all of them,
  one unmasked rectangle (sink and middle are disjoint: a - w + 1 >= s + 1);
- the diagonal block ``[a, a + C)``: row r sees keys a .. a + r, a causal (top-left) square;
- the window's first C keys ``[a - w + 1, a - w + 1 + C)``: row r sees key m >= r, the causal
  square with rows and keys reversed.

All blocks of a piece go in ONE batched call (blocks are a batch dimension: unfold views, no Python
loop), each call returns its log-sum-exp, and the three partial outputs are merged exactly:
out = sum_i exp(lse_i - lse) out_i with lse = logsumexp_i lse_i. A trailing partial block uses the
``sdpa`` kernel's masked block. Inference only: the log-sum-exp output of the CPU flash op carries
no gradient, so under autograd (and off the CPU) this kernel defers to ``sdpa`` (exact, differentiable).

Signature as the other ``sparse_attention`` kernels: (q (B, H, T, D), k, v (B, Hkv, T, D), sink (Hkv,),
span (Hkv,), left_pad (B,) | None) -> (B, H, T, D).

Legend: B batch, H query heads, Hkv KV heads, Hg KV heads of one rule group, G = H / Hkv, T tokens,
D head dim, C query block, n blocks, R middle keys per block.
"""

from __future__ import annotations

import torch

from . import register
from .sparse import _per_sample
from .sparse_sdpa import _by_rule, _causal_head, masked_blocks
from .sparse_sdpa import _group as _masked_group

MIN_BLOCK = 16  # the smallest query block cut into pieces; shorter windows take the masked kernel
# Each batched call gathers every block's sink + middle keys (overlapping windows, copied once per
# block): n blocks cost n x (sink + span) keys of K and V. Calls take as many blocks as fit in this
# budget, so the transient stays far below the KV cache a plan saves (8k tokens at density 0.5
# gathered 94 MiB per layer in one call, more than half the cache's saving).
GATHER_BYTES = 16 << 20


def merge_rows(span: int) -> int:
    """Query block C for a window of ``span`` keys: large enough for the flash kernel's tiles, and
    C <= span - 2 so the middle rectangle (span - C - 1 keys) is never empty."""
    return min(256, max(MIN_BLOCK, span // 4), span - 2)


def _flash(q, k, v, causal: bool):
    """(out, lse) of SDPA over 4-D (batch, heads, L, D) inputs; lse (batch, heads, L)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)


def _blocks(x, start: int, n: int, C: int, width: int | None = None):
    """(B, h, T, D) -> (B, h, n, width, D): block b is x[:, :, start + b*C : start + b*C + width]."""
    width = C if width is None else width
    seg = x[:, :, start : start + (n - 1) * C + width]
    return seg.unfold(2, width, C).transpose(-1, -2)  # view (B, h, n, width, D)


def _merge(parts):
    """Exact softmax over the union of disjoint key sets: parts [(out (..., L, D), lse (..., L))],
    summed in at least fp32."""
    dtype = parts[0][0].dtype
    acc = torch.promote_types(dtype, torch.float32)
    lse = torch.logsumexp(torch.stack([p[1].to(acc) for p in parts]), dim=0)
    out = sum(p[0].to(acc) * torch.exp(p[1].to(acc) - lse)[..., None] for p in parts)
    return out.to(dtype)


def _pieces(q, k, v, sink: int, span: int, P: int, n: int, C: int):
    """Queries [P, P + n*C) of one group (P >= sink + span): q (B, Hg*G, T, D), k, v (B, Hg, T, D)
    -> (B, Hg*G, n*C, D)."""
    B, H, _, D = q.shape
    Hg = k.shape[1]
    G = H // Hg
    qb = _blocks(q, P, n, C).reshape(B, Hg, G, n, C, D)  # rows of block b: queries P + b*C ...
    # rectangle: sink + middle keys, seen by every row; the G query heads folded into the rows
    R = span - C - 1  # >= 1: merge_rows keeps C <= span - 2 (an empty rectangle would have no log-sum-exp)
    # block 0's middle starts after its window's first C keys: P - span + 1 + C (> sink)
    mid = lambda x: _blocks(x, P - span + 1 + C, n, C, R)  # noqa: E731  (B, Hg, n, R, D)
    sk = lambda x: x[:, :, None, :sink].expand(B, Hg, n, sink, D)  # noqa: E731
    kr, vr = (torch.cat([sk(x), mid(x)], dim=3).reshape(B * Hg, n, sink + R, D) for x in (k, v))
    qr = qb.permute(0, 1, 3, 2, 4, 5).reshape(B * Hg, n, G * C, D)
    o, l = _flash(qr, kr, vr, causal=False)
    rect = (o.reshape(B, Hg, n, G, C, D).permute(0, 1, 3, 2, 4, 5), l.reshape(B, Hg, n, G, C).permute(0, 1, 3, 2, 4))
    # causal squares: keys expanded to the G query heads (C keys per block: cheap)
    qs = qb.reshape(B, H * n, C, D)
    exp = lambda x: x[:, :, None].expand(B, Hg, G, n, C, D).reshape(B, H * n, C, D)  # noqa: E731
    o, l = _flash(qs, exp(_blocks(k, P, n, C)), exp(_blocks(v, P, n, C)), causal=True)
    diag = (o.reshape(B, Hg, G, n, C, D), l.reshape(B, Hg, G, n, C))
    first = lambda x: exp(_blocks(x, P - span + 1, n, C)).flip(2)  # noqa: E731  (reversed rows and keys)
    o, l = _flash(qs.flip(2), first(k), first(v), causal=True)
    edge = (o.flip(2).reshape(B, Hg, G, n, C, D), l.flip(2).reshape(B, Hg, G, n, C))
    return _merge([rect, diag, edge]).reshape(B, H, n * C, D)


def _group(q, k, v, sink: int, span: int) -> torch.Tensor:
    """One rule for all heads of the group: (B, Hg*G, T, D) -> (B, Hg*G, T, D)."""
    T = q.shape[2]
    P = min(T, sink + span)
    C = merge_rows(span)
    n = (T - P) // C if span >= MIN_BLOCK + 2 else 0
    if n == 0:  # no full block (or a window too short to cut): the masked kernel
        return _masked_group(q, k, v, sink, span)
    B, Hg, _, D = k.shape
    per_call = max(1, GATHER_BYTES // (2 * B * Hg * (sink + span) * D * k.element_size()))
    out = torch.empty_like(q)  # filled piece by piece: no list of partial outputs and no final cat
    out[:, :, :P] = _causal_head(q, k, v, P)
    for b in range(0, n, per_call):
        a, m = P + b * C, min(per_call, n - b)
        out[:, :, a : a + m * C] = _pieces(q, k, v, sink, span, a, m, C)
    if P + n * C < T:  # the trailing partial block: one masked call
        masked_blocks(q, k, v, sink, span, P + n * C, C, out[:, :, P + n * C :])
    return out


@register("sparse_attention", "merge")
@_per_sample
def sparse_merge(q, k, v, sink, span):
    if q.device.type != "cpu" or (torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))):
        return _by_rule(q, k, v, sink, span, _masked_group)  # a CPU op, and its lse has no gradient
    return _by_rule(q, k, v, sink, span, _group)
