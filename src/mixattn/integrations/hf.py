"""``mixattn.hf``: a lazy alias of ``mixattn.integrations.transformers``, so ``import mixattn`` does not
import transformers; the first attribute read (``mixattn.hf.apply_plan``) does."""

from __future__ import annotations

_NAMES = ["SparseCache", "apply_plan", "has_plan", "remove_plan"]


def __getattr__(name: str):
    if name not in _NAMES:
        raise AttributeError(f"module 'mixattn.hf' has no attribute {name!r}")
    from . import transformers as _impl

    return getattr(_impl, name)


def __dir__():
    return sorted(_NAMES)
