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
to. The packed copy costs the weights' bytes again. The ops are torch's private oneDNN ops
(``torch.ops.mkldnn``): where this torch build lacks them, ``pack`` leaves the model as it was.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _ops_available() -> bool:
    ops = torch.ops.mkldnn
    try:
        return torch.backends.mkldnn.is_available() and all(
            hasattr(ops, name) for name in ("_reorder_linear_weight", "_linear_pointwise")
        )
    except (AttributeError, RuntimeError):
        return False


class PackedLinear(nn.Linear):
    """``nn.Linear`` with a oneDNN-prepacked weight for gradient-free CPU inference. x (..., in) -> (..., out)."""

    def refresh(self) -> bool:
        """Pack the current weight (again); False (and no packed copy) where it cannot be packed."""
        self._packed = None
        w = self.weight
        if w.device.type != "cpu" or w.dtype not in (torch.float32, torch.bfloat16):
            return False
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), 1)
        except RuntimeError:
            return False
        self._packed = (packed, w._version, w.data_ptr())
        return True

    def _fast(self, x: torch.Tensor) -> bool:
        p = getattr(self, "_packed", None)
        if p is None or x.device.type != "cpu" or x.dtype != self.weight.dtype:
            return False
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return False
        return self.weight._version == p[1] and self.weight.data_ptr() == p[2]  # not modified, moved or recast since

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fast(x):
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self._packed[0], self.bias, "none", [], "")


def pack(model: nn.Module) -> int:
    """Turn every ``nn.Linear`` of ``model`` into a ``PackedLinear`` in place; those on the CPU in fp32
    or bf16 get their packed copy now (cast the model first). Returns how many were packed (0 where
    torch lacks the ops)."""
    if not _ops_available():
        return 0
    n = 0
    for m in model.modules():
        if type(m) in (nn.Linear, PackedLinear):
            m.__class__ = PackedLinear  # same parameters and state-dict keys: only forward changes
            n += m.refresh()
    return n


def unpack(model: nn.Module) -> None:
    """Drop the packed copies: every ``PackedLinear`` becomes a plain ``nn.Linear`` again."""
    for m in model.modules():
        if isinstance(m, PackedLinear):
            m._packed = None
            m.__class__ = nn.Linear
