"""Kernel choice by measurement: the first call of an op in a shape bucket times every candidate
implementation on the real inputs and keeps the fastest, in memory and on disk.

Which kernel wins depends on the CPU (flex's compiled kernel beats dense SDPA on some x86 CPUs and
loses on others), the dtype and the shape, so the choice is keyed by all of them: CPU model (or GPU
name), torch version, dtype, op and a shape bucket the caller builds. The disk cache is one JSON file,
``$MIXATTN_KERNEL_CHOICES`` or ``<cache_dir>/kernel_choices.json``; ``MIXATTN_AUTOTUNE=0`` turns the
timing off (the first candidate is used), which keeps test runs deterministic and quick.

All candidates of a call must compute the same function; the tests compare each against the reference.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch

_CHOICES: dict[str, str] = {}
_LOADED = False


@cache
def device_name(device_type: str = "cpu") -> str:
    """CPU model name from /proc/cpuinfo (or the GPU name): the part of the key that changes the winner."""
    if device_type == "cuda":
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _path() -> Path:
    env = os.environ.get("MIXATTN_KERNEL_CHOICES")
    if env:
        return Path(env)
    from ..paths import cache_dir

    return cache_dir() / "kernel_choices.json"


def _load() -> None:
    global _LOADED
    if not _LOADED:
        _LOADED = True
        try:
            _CHOICES.update(json.loads(_path().read_text()))
        except (OSError, ValueError):
            pass


def _save(new_key: str) -> None:
    """Add this process's new choice to the file as it is now: other processes (parallel test
    workers, a benchmark's children) write it too, and rewriting our own view would drop theirs."""
    path = _path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            on_disk = json.loads(path.read_text())
        except (OSError, ValueError):
            on_disk = {}
        on_disk[new_key] = _CHOICES[new_key]
        _CHOICES.update(on_disk)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(on_disk, indent=1, sort_keys=True))
        tmp.replace(path)  # atomic: concurrent processes never read a half-written file
    except OSError:
        pass  # a read-only cache only costs a re-measurement next time


def key(op: str, x: torch.Tensor, bucket: tuple) -> str:
    return f"{device_name(x.device.type)}|torch {torch.__version__}|{str(x.dtype).removeprefix('torch.')}|{op}|{bucket}"


def enabled() -> bool:
    return os.environ.get("MIXATTN_AUTOTUNE", "1") != "0"


MIN_TIMED_S = 0.005  # a call shorter than this is repeated until the timed total reaches it


def _time(fn: Callable[[], object], cuda: bool) -> float:
    """Seconds per call after a warm-up (compilation, allocator, caches); calls shorter than
    ``MIN_TIMED_S`` (decode steps: ~0.1 ms) are repeated so that one scheduler tick cannot decide.
    On a CPU this is the process's CPU time: wall time on a machine shared with other jobs mostly
    measures the other jobs."""
    clock = time.perf_counter if cuda else time.process_time
    fn()
    calls, t = 0, clock()
    while True:
        fn()
        calls += 1
        if cuda:
            torch.cuda.synchronize()
        elapsed = clock() - t
        if elapsed >= MIN_TIMED_S or calls >= 100:
            return elapsed / calls


def choose(op: str, bucket: tuple, candidates: dict[str, Callable[[], torch.Tensor]], like: torch.Tensor) -> str:
    """Name of the fastest candidate for (op, bucket) on this machine; times them on first use.

    ``candidates`` maps impl names to zero-argument calls on the real inputs; the first name is the
    choice when timing is off. Each is run twice (warm-up, then timed); the timings are kept in the
    cache file beside the choice so a reader can see the margin.
    """
    names = list(candidates)
    if len(names) == 1 or not enabled():
        return names[0]
    _load()
    k = key(op, like, bucket)
    if k in _CHOICES:
        choice = _CHOICES[k].split(" ")[0]
        if choice in candidates:
            return choice
    times = {name: _time(fn, like.is_cuda) for name, fn in candidates.items()}
    best = min(times, key=times.get)
    _CHOICES[k] = best + " (" + ", ".join(f"{n} {t * 1e3:.1f} ms" for n, t in times.items()) + ")"
    _save(k)
    return best


def forget() -> None:
    """Drop the in-memory choices (tests; the file is left alone)."""
    global _LOADED
    _CHOICES.clear()
    _LOADED = False
