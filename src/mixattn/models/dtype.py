"""Inference dtype: ``auto`` is bfloat16 where the hardware computes it natively, float32 elsewhere.

bf16 halves the bytes a decode step reads (weights and KV cache) and, with native bf16 dot products
(Intel AMX, AVX512_BF16 on Intel and AMD Zen 4+, CUDA), runs matmuls faster too. Without them torch
emulates bf16 through fp32 conversions, which is slower than fp32, so ``auto`` stays fp32 there.
The decision reads the CPU's flags (/proc/cpuinfo), never its brand.

Norms and softmax statistics stay fp32 inside the layers (RMSNorm upcasts; SDPA accumulates in
fp32), and the RoPE frequencies stay fp32 whatever the model dtype (``RotaryEmbedding``).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CHOICES = ("auto", *DTYPES)
BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # either gives native bf16 dot products on x86


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def has_native_bf16(device: str | torch.device = "cpu") -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    return any(f in cpu_flags() for f in BF16_FLAGS) or torch.backends.cpu.get_cpu_capability() == "AMX"


def resolve_dtype(dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu") -> torch.dtype:
    """``"auto"`` | ``"float32"`` | ``"bfloat16"`` (or a torch dtype) -> torch dtype for ``device``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if has_native_bf16(device) else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {CHOICES}, got {dtype!r}")
    return DTYPES[dtype]


def cast(model: torch.nn.Module, dtype: str | torch.dtype = "float32") -> torch.nn.Module:
    """Cast ``model``'s floating parameters and buffers to ``dtype`` in place (and return it)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return model.to(resolve_dtype(dtype, device))
