"""Process group and device mesh for scale-out: a 2-D ``(dp, ep)`` mesh on PyTorch's DeviceMesh.

Every rank reads its own slice of the global batch, so the whole world is data-parallel; ``ep``
ranks additionally split each mixture layer's experts between them (expert parallelism carved out
of data parallelism, as torchtitan and DeepSpeed-MoE do). Dense parameters are sharded by FSDP2
over all ``dp * ep`` ranks; expert shards are sharded again over ``dp``.

The backend follows the device: gloo on CPU, nccl on CUDA (``launch.init_distributed``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


def backend_for(device: str) -> str:
    """gloo for CPU tensors, nccl for CUDA ones (gloo cannot move CUDA tensors efficiently)."""
    kind = torch.device(device).type
    if kind == "cpu":
        return "gloo"
    if kind == "cuda":
        return "nccl"
    raise ValueError(f"device {device!r}: scale-out supports cpu (gloo) and cuda (nccl)")


@dataclass(frozen=True)
class Mesh:
    """The ``(dp, ep)`` device mesh and the sub-meshes the parallel styles use.

    full: 2-D mesh named ("dp", "ep"); ep: 1-D mesh of the ranks sharing one copy of the experts'
    tokens (all-to-all group); dp: 1-D mesh of the ranks holding the same expert shard (FSDP2 shards
    the expert shard over it); world: 1-D flattened mesh of all ranks (FSDP2 shards dense weights).
    """

    full: DeviceMesh
    device: str

    @property
    def dp(self) -> DeviceMesh:
        return self.full["dp"]

    @property
    def ep(self) -> DeviceMesh:
        return self.full["ep"]

    @property
    def world(self) -> DeviceMesh:
        return self.full._flatten("dp_ep")  # cached by DeviceMesh: the same sub-mesh on every call

    @property
    def dp_size(self) -> int:
        return self.full.size(0)

    @property
    def ep_size(self) -> int:
        return self.full.size(1)

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def world_size(self) -> int:
        return self.full.size()


def make_mesh(ep: int | None = None, device: str = "cpu") -> Mesh:
    """Build the ``(dp, ep)`` mesh over the initialised world; ``ep`` defaults to the world size.

    Raises ValueError when ``ep`` does not divide the world size.
    """
    if not dist.is_initialized():
        raise ValueError("make_mesh needs an initialised process group (call init_distributed first)")
    world = dist.get_world_size()
    ep = world if ep is None else ep
    if ep < 1 or world % ep:
        raise ValueError(f"expert-parallel size {ep} must be >= 1 and divide the world size {world}")
    full = init_device_mesh(torch.device(device).type, (world // ep, ep), mesh_dim_names=("dp", "ep"))
    return Mesh(full, device)
