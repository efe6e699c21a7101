"""``grouped_linear`` through ``torch.nn.functional.grouped_mm``.

Sharp edges of ``F.grouped_mm`` (torch 2.13, measured on CPU):
every stride must be a multiple of 16 bytes, offsets must be int32, fp64 is refused, and the
backward rejects expanded (stride-0) gradients. Unaligned shapes fall back to the reference
loop, with one log line per process so users know they are on the slow path.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from . import register
from .reference import grouped_linear_reference

log = logging.getLogger(__name__)


@functools.cache
def _log_fallback_once(reason: str) -> None:
    log.warning("grouped_linear: F.grouped_mm unavailable (%s); using the reference loop", reason)


def grouped_mm_unsupported(x: torch.Tensor, w: torch.Tensor) -> str | None:
    """Why ``F.grouped_mm`` cannot take these operands, or None when it can."""
    if not hasattr(F, "grouped_mm"):
        return "torch has no F.grouped_mm"
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or w.dtype != x.dtype:
        return f"dtype {x.dtype}/{w.dtype}"
    align = 16 // x.element_size()
    if w.shape[1] % align or w.shape[2] % align:
        return f"dims ({w.shape[1]}, {w.shape[2]}) not multiples of {align} (16-byte alignment)"
    return None


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (grouped_mm needs it)."""

    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


def _aligned_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when grouped_mm takes it as is (unit column stride, 16-byte aligned rows and
    start), else a contiguous copy. Spares the copy of a strided view such as the gate half of a
    (N, 2f) projection output."""
    align = 16 // x.element_size()
    if x.stride(-1) == 1 and x.stride(0) % align == 0 and x.data_ptr() % 16 == 0:
        return x
    return x.contiguous()


@register("grouped_linear", "grouped")
def grouped_linear_grouped(x_NI: torch.Tensor, w_EOI: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """One grouped GEMM over all experts; empty experts are fine. Static shapes, no host sync."""
    reason = grouped_mm_unsupported(x_NI, w_EOI)
    if reason is not None:
        _log_fallback_once(reason)
        return grouped_linear_reference(x_NI, w_EOI, counts_E)
    offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
    if not torch.is_grad_enabled():  # inference: no copy of an aligned strided input, no grad wrapper
        return F.grouped_mm(_aligned_rows(x_NI), w_EOI.transpose(-2, -1), offs=offs_E)
    y_NO = F.grouped_mm(x_NI.contiguous(), w_EOI.transpose(-2, -1), offs=offs_E)
    return _ContiguousGrad.apply(y_NO)


# The fast default: grouped_mm where it applies (it is a loop internally on CPU, with the same speed).
register("grouped_linear", "auto")(grouped_linear_grouped)
