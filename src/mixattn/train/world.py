"""The training loop's view of the processes it runs in.

``train`` talks to the other processes only through this small interface, so the loop has no
distributed branches: ``SingleProcess`` (here) is the reference, and ``mixattn.parallel`` supplies
the multi-process implementation (FSDP2 + expert parallelism over torch.distributed).
"""

from __future__ import annotations

import torch


class SingleProcess:
    """One process holds the whole model and the whole batch: every method is the identity."""

    rank = 0
    world_size = 1
    is_main = True  # writes logs, metrics and summaries

    def local_rows(self, t: torch.Tensor) -> torch.Tensor:
        """This process's rows of a global batch (B, ...) -> (B / world_size, ...)."""
        return t

    def all_rows(self, t: torch.Tensor) -> torch.Tensor:
        """The inverse of ``local_rows``: every process's rows, concatenated in batch order."""
        return t.clone()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over processes (expert counts for the aux-loss-free bias, statistics)."""
        return t

    def mean(self, x: float) -> float:
        """Mean of a per-process scalar (losses of equal-sized shards of one batch)."""
        return x

    def any(self, flag: bool) -> bool:
        """True on every process when it is true on one (a stop signal seen by one rank stops all)."""
        return flag

    def clip_grad_norm_(self, params, max_norm: float) -> float:
        """Scale the gradients so that their global L2 norm is at most ``max_norm``; returns the norm."""
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def save(self, run) -> None:
        run.save()

    def restore(self, run) -> None:
        run.restore()
