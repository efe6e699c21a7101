"""Inference linears over oneDNN-prepacked weights (CPU).

A decode step multiplies one row per sequence by every weight matrix, so it is bound by how fast the
weights stream through the matmul. ``F.linear`` hands oneDNN the plain (out, in) weight on every
call; prepacking it once into oneDNN's blocked layout (the path ``torch.compile`` takes with
``freezing``) lets the kernel stream it directly. Measured on an AMD EPYC with AVX512_BF16, one
thread, the matmuls of one SmolLM2-135M step (``benchmarks/bench_packed.py``): bf16 1.4-1.6x at 1 row
and 1.9-2.1x at 4 rows, fp32 1.05-1.45x, a 1024-row prefill chunk 1.07-1.12x; the whole model:
``benchmarks/bench_vs_transformers.py --packed``.

``PackedLinear`` is an ``nn.Linear`` (same parameters, same state-dict keys, tied weights stay
tied) that also holds the packed copy. It uses the copy only where the plain product would give the
same function: no gradient needed, a CPU input of the weight's dtype, and a weight unchanged since
packing (its version counter); anywhere else it is ``F.linear``, the reference the tests compare it
to. Linears that read the same input (q/k/v, gate/up) share one packed weight and one call
(``fused_linear``): at batch 1 the step pays per-call costs as well as bytes (a SmolLM2-135M bf16
decode step 1.05-1.06x faster in a same-process A/B, ``benchmarks/README.md`` session 10). The packed
copies cost the weights' bytes again. The ops are torch's private oneDNN ops
(``torch.ops.mkldnn``): where this torch build lacks them, ``pack`` leaves the model as it was.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module


def _ops_available() -> bool:
    ops = torch.ops.mkldnn
    try:
        return torch.backends.mkldnn.is_available() and all(
            hasattr(ops, name) for name in ("_reorder_linear_weight", "_linear_pointwise")
        )
    except (AttributeError, RuntimeError):
        return False


class _Held:
    """A packed copy and what it was made from. oneDNN's packed tensors are opaque and cannot be
    copied, so a deep copy of a packed model gets None in its place: the copy computes ``F.linear``
    (the same function) until ``pack`` runs on it."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __deepcopy__(self, memo):
        return None


class PackedLinear(nn.Linear):
    """``nn.Linear`` with a oneDNN-prepacked weight for gradient-free CPU inference. x (..., in) -> (..., out)."""

    def refresh(self) -> bool:
        """Pack the current weight (again); False (and no packed copy) where it cannot be packed."""
        w = self.weight
        packed = _reorder(w)
        self._packed = None if packed is None else _Held((packed, w._version, w.data_ptr()))
        return packed is not None

    def _fast(self, x: torch.Tensor) -> bool:
        p = getattr(self, "_packed", None)
        if p is None or _plain_needed(x, [self]):
            return False
        p = p.value
        return self.weight._version == p[1] and self.weight.data_ptr() == p[2]  # not modified, moved or recast since

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fast(x):
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self._packed.value[0], self.bias, "none", [], "")


def _reorder(w: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's packed copy of a weight (out, in), or None where it cannot be packed (device, dtype)."""
    if w.device.type != "cpu" or w.dtype not in (torch.float32, torch.bfloat16):
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(w.detach(), 1)
    except RuntimeError:
        return None


def _plain_needed(x: torch.Tensor, lins) -> bool:
    """Whether ``F.linear`` must run instead of a packed copy of ``lins``: an input off the CPU or
    of another dtype than their weights, or a gradient needed (the packed op has no backward)."""
    if x.device.type != "cpu" or x.dtype != lins[0].weight.dtype:
        return True
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for m in lins for p in m.parameters()))


def _stamp(t: torch.Tensor | None) -> tuple | None:
    return None if t is None else (t._version, t.data_ptr(), t.dtype)


def _pack_group(module: nn.Module, names: tuple[str, ...]) -> bool:
    """One packed weight for the linears ``names`` of ``module`` (same input, outputs side by side),
    kept in ``module._packed_groups``; False where they cannot share one (devices, dtypes, biases)."""
    lins = [getattr(module, n) for n in names]
    if any(type(x) not in (nn.Linear, PackedLinear) for x in lins):  # a subclass's own forward must run
        return False
    w = lins[0].weight
    same = all(x.weight.device == w.device and x.weight.dtype == w.dtype and x.in_features == lins[0].in_features
               for x in lins)  # fmt: skip
    biased = [x.bias is not None for x in lins]
    packed = _reorder(torch.cat([x.weight.detach() for x in lins])) if same and len(set(biased)) == 1 else None
    if packed is None:
        return False
    bias = torch.cat([x.bias.detach() for x in lins]) if biased[0] else None
    stamps = [(_stamp(x.weight), _stamp(x.bias)) for x in lins]
    value = (packed, bias, [x.out_features for x in lins], stamps, tuple(lins))
    module.__dict__.setdefault("_packed_groups", {})[names] = _Held(value)
    return True


def fused_linear(module: nn.Module, names: tuple[str, ...], x: torch.Tensor) -> list[torch.Tensor] | None:
    """[lin(x) for lin in module's linears ``names``] by one oneDNN call over the weight ``pack`` fused
    for them (q/k/v, or gate/up: a decode step is bound by its per-call costs as much as by bytes);
    None where that would not compute the same function (not packed, a gradient needed, another
    dtype, a weight or bias changed or a linear replaced since packing) or would skip a forward hook
    on one of them: the caller then runs the linears one by one."""
    group = module.__dict__.get("_packed_groups", {}).get(names)
    if group is None:
        return None
    packed, bias, sizes, stamps, members = group.value
    lins = [getattr(module, n) for n in names]
    if any(a is not b for a, b in zip(lins, members)) or _plain_needed(x, lins):
        return None  # a member replaced since packing (wrapped, swapped); or F.linear must run
    if any(m._forward_hooks or m._forward_pre_hooks for m in lins) or _global_hooks():
        return None  # hooks expect each linear to be called (the profiler captures v_proj's output)
    if any((_stamp(m.weight), _stamp(m.bias)) != st for m, st in zip(lins, stamps)):
        return None
    return list(torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "").split(sizes, -1))


def _global_hooks() -> bool:
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks)


def pack(model: nn.Module) -> int:
    """Turn every ``nn.Linear`` of ``model`` into a ``PackedLinear`` in place; those on the CPU in fp32
    or bf16 get their packed copy now (cast the model first). A module whose class names
    ``PACK_GROUPS`` (linears of one input: ``Attention``'s q/k/v, ``SwiGLU``'s gate/up) gets one packed
    weight per group instead, used through ``fused_linear``. Returns how many linears were packed (0
    where torch lacks the ops)."""
    if not _ops_available():
        return 0
    n, grouped = 0, set()
    for m in model.modules():
        m.__dict__.pop("_packed_groups", None)
        for names in getattr(type(m), "PACK_GROUPS", ()):
            if _pack_group(m, names):
                grouped |= {id(getattr(m, x)) for x in names}
                n += len(names)
    for m in model.modules():
        if type(m) in (nn.Linear, PackedLinear):
            m.__class__ = PackedLinear  # same parameters and state-dict keys: only forward changes
            if id(m) in grouped:  # its group's copy serves it; alone it computes F.linear
                m._packed = None
            else:
                n += m.refresh()
    return n


def unpack(model: nn.Module) -> None:
    """Drop the packed copies: every ``PackedLinear`` becomes a plain ``nn.Linear`` again."""
    for m in model.modules():
        m.__dict__.pop("_packed_groups", None)
        if isinstance(m, PackedLinear):
            m._packed = None
            m.__class__ = nn.Linear
