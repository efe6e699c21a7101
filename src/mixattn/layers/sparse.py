"""Per-KV-head heterogeneous sparse attention: each KV head keeps a sink plus an elastic sliding
window whose span grows with the reference length N, span(N) = min(N, max(1, floor(alpha + beta N))).
MoA: "Mixture of Sparse Attention" / "Mixture of Attention Spans" (Fu et al., arXiv 2406.14909).

``SparseSpec`` holds one layer's rules; ``attend`` is the single entry point every attention
variant calls once it has q and the new k, v: it picks dense SDPA, a sparse prefill kernel, or the
ragged decode cache.

Legend: B batch, H query heads, Hkv KV heads, T tokens, D head dim, N reference length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import kernels
from ..kernels import autotune
from ..kernels.sdpa import causal_sdpa
from .cache import RaggedKVCache


@dataclass(frozen=True)
class SparseSpec:
    """Rules for one layer's KV heads: sink (Hkv,), alpha (Hkv,), beta (Hkv,); ``impl`` names the
    ``sparse_attention`` kernel ("auto": blocked when gradients are needed, else the faster of sdpa
    and flex on this machine, measured on first use)."""

    sink: tuple[int, ...]
    alpha: tuple[float, ...]
    beta: tuple[float, ...]
    impl: str = "auto"

    def spans(self, N: int) -> torch.Tensor:
        return torch.tensor([min(N, max(1, math.floor(a + b * N))) for a, b in zip(self.alpha, self.beta)])

    def sinks(self) -> torch.Tensor:
        return torch.tensor(self.sink)

    def is_dense_at(self, N: int) -> bool:
        return all(s + w >= N for s, w in zip(self.sink, self.spans(N).tolist()))

    def new_cache(self, ref_len: int) -> RaggedKVCache:
        return RaggedKVCache(self.sinks(), self.spans(ref_len), ref_len)


def _kept_fraction(T: int, sink: torch.Tensor, span: torch.Tensor) -> float:
    """Mean over heads of the causal (query, key) pairs a rule keeps, as a fraction of all of them."""
    i = torch.arange(T, dtype=torch.float64)[:, None]
    return float(torch.minimum(i + 1, (sink + span)[None].double()).sum(0).mean()) / (T * (T + 1) / 2)


def _pick(impl: str, q: torch.Tensor, k=None, v=None, sink=None, span=None, pad=None) -> str:
    """The kernel ``impl`` names; for "auto", the one to use for these inputs (without k, v and the
    rule there is nothing to time: the static inference default, flex)."""
    if impl != "auto":
        return impl
    if q.requires_grad and torch.is_grad_enabled():
        return "blocked"  # exact and differentiable everywhere (profiling, sparse training)
    if k is None:
        return "flex"
    # inference: the fused-SDPA-on-kept-keys kernel or compiled flex, whichever this machine runs
    # faster for this shape (flex wins on some x86 CPUs and loses on others: benchmarks/README.md)
    T = q.shape[2]
    names = ["sdpa"] + (["flex"] if T >= kernels.sparse.FLEX_MIN_LEN else [])
    fns = {n: kernels.get("sparse_attention", n) for n in names}
    cands = {n: (lambda f=f: f(q, k, v, sink, span, pad)) for n, f in fns.items()}
    bucket = (q.shape[0], q.shape[1], k.shape[1], q.shape[3], 1 << (T - 1).bit_length(),
              round(_kept_fraction(T, sink, span), 1), len(set(zip(sink.tolist(), span.tolist()))))  # fmt: skip
    return autotune.choose("sparse_attention", bucket, cands, q)


def _sparse(q, k, v, spec: SparseSpec, N: int, pad) -> torch.Tensor:
    sink, span = spec.sinks(), spec.spans(N)
    return kernels.get("sparse_attention", _pick(spec.impl, q, k, v, sink, span, pad))(q, k, v, sink, span, pad)


def attend(q, k, v, ctx, spec: SparseSpec | None) -> torch.Tensor:
    """Causal attention for new queries q (B, H, T, D) over keys/values k, v (B, Hkv, Tk, D): every
    key so far with a dense ``KVCache`` (the caller extends it), only the new ones with a
    ``RaggedKVCache`` (written and read here).

    With no spec this is dense causal attention. With a spec, N is
    ``ctx.ref_len`` (generation: prompt + max_new_tokens) or the total length; an all-dense layer
    at N takes exactly the dense code path, so an all-dense plan changes nothing. ``ctx.left_pad``
    (B,) marks left padding: padded keys are never seen and sinks start at each row's first token.
    """
    cache, pad = ctx.cache, ctx.left_pad
    if isinstance(cache, RaggedKVCache):
        if cache.length and q.shape[2] > 1:  # a later chunk of a chunked prefill
            return cache.attend_chunk(q, k, v)
        if cache.length == 0 and spec is not None:  # prefill: attention over the prompt itself
            N = cache.ref_len
            cache.write(k, v, left_pad=pad)
            if spec.is_dense_at(N):
                return causal_sdpa(q, k, v, left_pad=pad)
            return _sparse(q, k, v, spec, N, pad)
        cache.write(k, v)
        return cache.attend(q)
    if spec is None:
        return causal_sdpa(q, k, v, ctx.q_offset, pad)
    N = ctx.ref_len or k.shape[2]
    if spec.is_dense_at(N):
        return causal_sdpa(q, k, v, ctx.q_offset, pad)
    if ctx.q_offset:  # chunked decoding over a dense cache: only the reference handles the offset
        return kernels.get("sparse_attention", "reference")(q, k, v, spec.sinks(), spec.spans(N), pad, ctx.q_offset)
    return _sparse(q, k, v, spec, N, pad)
