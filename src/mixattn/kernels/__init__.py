"""Kernel registry: pure functions selected by name, never nn.Modules.

Every op has a slow ``reference`` implementation (in ``reference.py``) that tests compare the fast
ones against, outputs and gradients. Layers pick an implementation by name through ``get(op, impl)``;
an unknown op or impl raises ``ValueError`` listing the valid names.

Ops registered here (every op has an ``auto`` implementation: the fast path, or a chooser that
picks one of the others for the inputs at hand; ``auto`` is resolved nowhere else):
    attention(q (B, H, Tq, D), k, v (B, Hkv, Tk, D), q_offset, left_pad) -> (B, H, Tq, D): dense causal
    grouped_linear(x_sorted (N, in), weight (E, out, in), counts (E,)) -> (N, out)
    head_sparse_attention(q (B, H, T, D), k, v (B, Hkv, T, D), active (B, T, H) bool, q_offset, left_pad)
        -> (B, T, H, D)
    sparse_attention(q (B, H, T, D), k, v (B, Hkv, T, D), sink (Hkv,), span (Hkv,), left_pad) -> (B, H, T, D)
    ragged_attention(q (B, H, 1, D), groups, perm, row_len) -> (B, H, 1, D): decode over a ragged cache
    ragged_chunk_attention(q (B, H, T, D), k, v (B, Hkv, T, D), kept, sink, span, L): chunked prefill
    relative_attention(...): RCMHA's content + relative-position scores (``relative.py``)

Where several fast implementations compute the same function and the winner depends on the machine,
``autotune.choose`` picks one by timing them on first use (cached on disk per CPU, torch, dtype, shape).
"""

from __future__ import annotations

from collections.abc import Callable

_REGISTRY: dict[str, dict[str, Callable]] = {}


def register(op: str, impl: str) -> Callable[[Callable], Callable]:
    """Decorator that registers ``fn`` as implementation ``impl`` of ``op`` (done once, at import)."""

    def wrap(fn: Callable) -> Callable:
        _REGISTRY.setdefault(op, {})[impl] = fn
        return fn

    return wrap


def available(op: str) -> list[str]:
    """Names of the implementations of ``op``."""
    if op not in _REGISTRY:
        raise ValueError(f"unknown kernel op {op!r}; valid ops: {sorted(_REGISTRY)}")
    return sorted(_REGISTRY[op])


def get(op: str, impl: str = "auto") -> Callable:
    """Return implementation ``impl`` of ``op``. ``auto`` is the op's default fast path."""
    impls = _REGISTRY.get(op)
    if impls is None:
        raise ValueError(f"unknown kernel op {op!r}; valid ops: {sorted(_REGISTRY)}")
    if impl not in impls:
        raise ValueError(f"unknown implementation {impl!r} for {op!r}; valid: {sorted(impls)}")
    return impls[impl]


# Registration happens on import of these modules (they only define functions).
from . import grouped, head_sparse, ragged, reference, relative, sdpa, sparse, sparse_auto, sparse_merge, sparse_sdpa  # noqa: E402,F401
