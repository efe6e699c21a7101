"""``sparse_attention`` ``auto``: which sparse prefill kernel runs for these inputs.

- gradients needed: ``blocked`` (exact and differentiable everywhere: profiling, sparse training);
- inference: the fused-SDPA-on-kept-keys kernels (``sdpa``: band-masked blocks; ``merge``: unmasked
  and causal pieces joined by log-sum-exp, CPU only) or compiled ``flex``, whichever this machine
  runs faster for this shape, timed once per shape bucket (``autotune.choose``). The ranking differs
  by CPU and by span: flex wins on some x86 CPUs and loses on others, ``merge`` beats ``sdpa`` on
  long windows (no per-pair mask) and loses on short ones. Sequences shorter than one flex block
  take ``sdpa`` without timing (there is no block to skip).

Legend: B batch, H query heads, Hkv KV heads, T tokens, D head dim.
"""

from __future__ import annotations

from functools import partial

import torch

from . import autotune, get, register
from .sparse import FLEX_MIN_LEN


def kept_fraction(T: int, sink: torch.Tensor, span: torch.Tensor) -> float:
    """Mean over heads of the causal (query, key) pairs a rule keeps, as a fraction of all of them."""
    i = torch.arange(T, dtype=torch.float64)[:, None]
    return float(torch.minimum(i + 1, (sink + span)[None].double()).sum(0).mean()) / (T * (T + 1) / 2)


def choose(q, k, v, sink, span, left_pad=None) -> str:
    """The implementation ``auto`` runs for these inputs (see the module docstring)."""
    if q.requires_grad and torch.is_grad_enabled():
        return "blocked"
    T = q.shape[2]
    long_ = T >= FLEX_MIN_LEN  # shorter: one block, nothing for merge or flex to skip; sdpa alone, untimed
    names = ["sdpa"] + (["merge"] if long_ and q.device.type == "cpu" else []) + (["flex"] if long_ else [])
    cands = {n: partial(get("sparse_attention", n), q, k, v, sink, span, left_pad) for n in names}
    bucket = (q.shape[0], q.shape[1], k.shape[1], q.shape[3], 1 << (T - 1).bit_length(),
              round(kept_fraction(T, sink, span), 1), len(set(zip(sink.tolist(), span.tolist()))))  # fmt: skip
    return autotune.choose("sparse_attention", bucket, cands, q)


@register("sparse_attention", "auto")
def sparse_attention_auto(q, k, v, sink, span, left_pad=None) -> torch.Tensor:
    """(B, H, T, D) by the implementation ``choose`` names."""
    return get("sparse_attention", choose(q, k, v, sink, span, left_pad))(q, k, v, sink, span, left_pad)
