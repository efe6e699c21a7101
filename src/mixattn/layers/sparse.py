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
from ..kernels.sdpa import causal_sdpa
from .cache import RaggedKVCache


@dataclass(frozen=True)
class SparseSpec:
    """Rules for one layer's KV heads: sink (Hkv,), alpha (Hkv,), beta (Hkv,); ``impl`` names the
    ``sparse_attention`` kernel ("auto": blocked when gradients are needed, flex otherwise)."""

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


def _pick(impl: str, q: torch.Tensor) -> str:
    if impl != "auto":
        return impl
    if q.requires_grad and torch.is_grad_enabled():
        return "blocked"  # flex has no CPU backward; blocked is exact and differentiable everywhere
    # inference: compiled flex never materialises scores and beats dense flash SDPA from ~1k tokens
    # (benchmarks/bench_sparse.py); blocked materialises T x (span + block) scores per head
    return "flex"


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
        if cache.length and q.shape[2] > 1:
            raise ValueError("a ragged KV cache decodes one token at a time after the prefill")
        if cache.length == 0 and spec is not None:  # prefill: attention over the prompt itself
            N = cache.ref_len
            cache.write(k, v, left_pad=pad)
            if spec.is_dense_at(N):
                return causal_sdpa(q, k, v, left_pad=pad)
            return kernels.get("sparse_attention", _pick(spec.impl, q))(q, k, v, spec.sinks(), spec.spans(N), pad)
        cache.write(k, v)
        return cache.attend(q)
    if spec is None:
        return causal_sdpa(q, k, v, ctx.q_offset, pad)
    N = ctx.ref_len or k.shape[2]
    if spec.is_dense_at(N):
        return causal_sdpa(q, k, v, ctx.q_offset, pad)
    if ctx.q_offset:  # chunked decoding over a dense cache: only the reference handles the offset
        return kernels.get("sparse_attention", "reference")(q, k, v, spec.sinks(), spec.spans(N), pad, ctx.q_offset)
    return kernels.get("sparse_attention", _pick(spec.impl, q))(q, k, v, spec.sinks(), spec.spans(N), pad)
