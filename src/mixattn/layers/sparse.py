"""Per-KV-head heterogeneous sparse attention: each KV head keeps a sink plus an elastic sliding
window whose span grows with the reference length N, span(N) = min(N, max(1, floor(alpha + beta N))).
MoA: "Mixture of Sparse Attention" / "Mixture of Attention Spans" (Fu et al., arXiv 2406.14909).

``SparseSpec`` holds one layer's rules, set on its attention module by ``compress.apply_plan``;
``layers.dispatch.attend`` reads it. The span rule itself is ``kernels.sparse.span_at``, the one
definition plans, layers, kernels and caches share.

Legend: B batch, H query heads, Hkv KV heads, T tokens, D head dim, N reference length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.sparse import span_at
from .cache import RaggedKVCache


@dataclass(frozen=True)
class SparseSpec:
    """Rules for one layer's KV heads: sink (Hkv,), alpha (Hkv,), beta (Hkv,); ``impl`` names the
    ``sparse_attention`` kernel for this layer ("auto": the model's choice, ``MixtureConfig.kernels``,
    whose own "auto" is ``kernels.sparse_auto``)."""

    sink: tuple[int, ...]
    alpha: tuple[float, ...]
    beta: tuple[float, ...]
    impl: str = "auto"

    def spans(self, N: int) -> torch.Tensor:
        return torch.tensor([span_at(a, b, N) for a, b in zip(self.alpha, self.beta)])

    def sinks(self) -> torch.Tensor:
        return torch.tensor(self.sink)

    def is_dense_at(self, N: int) -> bool:
        return all(s + w >= N for s, w in zip(self.sink, self.spans(N).tolist()))

    def new_cache(self, ref_len: int) -> RaggedKVCache:
        return RaggedKVCache(self.sinks(), self.spans(ref_len), ref_len)
