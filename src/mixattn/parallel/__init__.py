"""Scale-out on torch.distributed: expert parallelism (all-to-all token dispatch) composed with FSDP2
on a ``(dp, ep)`` DeviceMesh, global-batch load balancing, DCP checkpoints that reshard, and launch.

Typical use inside each rank (``mixattn train --nproc N`` does exactly this)::

    session = init_distributed("cpu")            # gloo on CPU, nccl on CUDA; collectives time out
    mesh = make_mesh(ep=None)                      # ep defaults to the world size
    torch.manual_seed(seed); model = MixtureLM(cfg)  # same weights on every rank
    parallelize(model, mesh)                       # experts over ep, FSDP2 over the rest
    train(model, data, tcfg, out, world=Distributed(mesh))
"""

from .expert import ExpertParallel, FFNExpertParallel, expert_major_order
from .fsdp import apply_expert_parallel, apply_fsdp, clip_grad_norm_, parallelize
from .launch import RankFailed, Session, WorkerFailed, init_distributed, shutdown, spawn, torchrun_argv
from .mesh import Mesh, backend_for, make_mesh
from .world import Distributed

__all__ = [
    "Distributed", "ExpertParallel", "FFNExpertParallel", "Mesh", "RankFailed", "Session",
    "WorkerFailed", "apply_expert_parallel", "apply_fsdp", "backend_for", "clip_grad_norm_",
    "expert_major_order", "init_distributed", "make_mesh", "parallelize", "shutdown", "spawn", "torchrun_argv",
]  # fmt: skip
