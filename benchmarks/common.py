"""Benchmark helpers: a stamp line (device, dtype, torch, threads, git SHA) and a min-of-N timer."""

from __future__ import annotations

import platform
import subprocess
import time

import torch


def stamp(dtype=torch.float32) -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        sha = "?"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'x86_64'})"
    return (
        f"device: {device}; dtype: {str(dtype).replace('torch.', '')}; torch {torch.__version__}; "
        f"threads: {torch.get_num_threads()}; git {sha or '?'}"
    )


def cpu_model() -> str:
    """``lscpu``'s model name: which CPU a table was measured on (kernels rank differently per CPU)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def timeit(fn, repeats: int = 3, warmup: int = 1) -> float:
    """Minimum wall time of ``fn()`` in seconds (min is the least noisy estimator on shared machines)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def plan_files(specs) -> dict:
    """``LABEL=PATH`` or ``PATH`` (labelled by file stem) for each spec -> {label: Plan}: a searched plan
    (``mixattn compress``) timed beside the synthetic ones."""
    from pathlib import Path

    from mixattn.compress import Plan

    out = {}
    for spec in specs or ():
        label, _, path = spec.rpartition("=") if "=" in spec else (Path(spec).stem, "", spec)
        out[label] = Plan.load(path)
    return out


def table(rows: list[list], header: list[str]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)
