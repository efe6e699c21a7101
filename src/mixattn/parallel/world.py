"""The multi-process side of the training loop's ``world`` interface (see ``train.world``).

``Distributed`` splits each global batch between the ranks, sums statistics over them, clips
gradients by their global norm over all shards, and saves and restores through DCP. The loop is the
same code as in a single process; only this object differs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import checkpoint
from .fsdp import clip_grad_norm_
from .mesh import Mesh


class Distributed:
    """One rank of a ``(dp, ep)`` job; every rank reads a different, equal share of each batch."""

    def __init__(self, mesh: Mesh):
        self.mesh = mesh
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0

    def local_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Rows ``rank * B/W .. (rank+1) * B/W`` of a global batch (B, ...)."""
        B, W = t.shape[0], self.world_size
        if B % W:
            raise ValueError(f"--batch-size {B} must be a multiple of the number of processes ({W}): "
                             "each rank takes an equal share of every batch")  # fmt: skip
        b = B // W
        return t[self.rank * b : (self.rank + 1) * b]

    def all_rows(self, t: torch.Tensor) -> torch.Tensor:
        local = t.detach().to(self.mesh.device).contiguous()  # nccl moves CUDA tensors only, gloo CPU ones
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local)
        return torch.cat(parts).to(t.device)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        total = t.detach().to(self.mesh.device, copy=True)
        dist.all_reduce(total)
        return total.to(t.device)

    def mean(self, x: float) -> float:
        return float(self.sum(torch.tensor(float(x), dtype=torch.float64))) / self.world_size

    def any(self, flag: bool) -> bool:
        return bool(self.sum(torch.tensor(int(flag))) > 0)

    def clip_grad_norm_(self, params, max_norm: float) -> float:
        return clip_grad_norm_(params, max_norm)

    def save(self, run) -> None:
        checkpoint.save(run, self.rank)

    def restore(self, run) -> None:
        checkpoint.restore(run)
