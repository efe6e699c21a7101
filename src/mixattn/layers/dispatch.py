"""The one way into attention kernels. Every attention variant (dense, GQA, MoH's shared and
routed heads, BAM's experts, token-graph routers, RCMHA, sparse plans, decode against any cache)
computes its scores, softmax and value product through a function here, and each of those calls a
registered kernel, ``kernels.get(op, impl)``.

Which implementation runs is one model-level setting, ``MixtureConfig.kernels`` ({op: impl}),
carried to the layers in ``AttnContext.kernels``; an op not named there runs ``auto`` (the kernel
registry resolves it, nowhere else). A sparse plan may name its own ``sparse_attention`` kernel
(``SparseSpec.impl``), which wins over the model's setting for that layer.

Legend: B batch, H query heads, Hkv KV heads, T new tokens, Tk keys, D head dim.
"""

from __future__ import annotations

import torch

from .. import kernels
from .cache import RaggedKVCache
from .sparse import SparseSpec


def chosen(ctx, op: str) -> str:
    """The name of the implementation of ``op`` the context's model chose ("auto" when it chose
    none, or when there is no context)."""
    return (getattr(ctx, "kernels", None) or {}).get(op, "auto")


def kernel(ctx, op: str):
    """The implementation of ``op`` the context's model chose (see ``chosen``)."""
    return kernels.get(op, chosen(ctx, op))


def dense(q, k, v, ctx) -> torch.Tensor:
    """Dense causal attention of q (B, H, T, D) over k, v (B, Hkv, Tk, Dv): (B, H, T, Dv)."""
    return kernel(ctx, "attention")(q, k, v, ctx.q_offset, ctx.left_pad)


def _sparse(q, k, v, ctx, spec: SparseSpec, N: int) -> torch.Tensor:
    impl = kernel(ctx, "sparse_attention") if spec.impl == "auto" else kernels.get("sparse_attention", spec.impl)
    return impl(q, k, v, spec.sinks(), spec.spans(N), ctx.left_pad)


def _ragged(q, k, v, ctx, spec: SparseSpec | None, cache: RaggedKVCache) -> torch.Tensor:
    if cache.length and q.shape[2] > 1:  # a later chunk of a chunked prefill: the old keys it still sees
        kept = cache.kept()
        out = kernel(ctx, "ragged_chunk_attention")(q, k, v, kept, cache.sink, cache.span, cache.length)
        cache.write(k, v)
        return out
    if cache.length == 0 and spec is not None:  # prefill: attention over the prompt itself
        cache.write(k, v, left_pad=ctx.left_pad)
        if spec.is_dense_at(cache.ref_len):
            return dense(q, k, v, ctx)
        return _sparse(q, k, v, ctx, spec, cache.ref_len)
    cache.write(k, v)
    return kernel(ctx, "ragged_attention")(q, *cache.decode_view())


def attend(q, k, v, ctx, spec: SparseSpec | None) -> torch.Tensor:
    """Causal attention for new queries q (B, H, T, D) over keys/values k, v (B, Hkv, Tk, D): every
    key so far with a dense ``KVCache`` (the caller extends it), only the new ones with a
    ``RaggedKVCache`` (written here, read by the ragged kernels).

    With no spec this is dense causal attention. With a spec, N is ``ctx.ref_len`` (generation:
    prompt + max_new_tokens) or the total length; an all-dense layer at N takes exactly the dense
    path, so an all-dense plan changes nothing. ``ctx.left_pad`` (B,) marks left padding: padded
    keys are never seen and sinks start at each row's first token.
    """
    if isinstance(ctx.cache, RaggedKVCache):
        return _ragged(q, k, v, ctx, spec, ctx.cache)
    N = ctx.ref_len or k.shape[2]
    if spec is None or spec.is_dense_at(N):
        return dense(q, k, v, ctx)
    if ctx.q_offset:  # chunked decoding over a dense cache: only the reference handles the offset
        ref = kernels.get("sparse_attention", "reference")
        return ref(q, k, v, spec.sinks(), spec.spans(N), ctx.left_pad, ctx.q_offset)
    return _sparse(q, k, v, ctx, spec, N)
