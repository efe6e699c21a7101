"""FSDP2 (``fully_shard``) over a model whose experts are already expert-parallel, on the 2-D
``(dp, ep)`` mesh (the torchtitan composition; Zhao et al., "PyTorch FSDP", arXiv 2304.11277).

- Each expert projection (a DTensor sharded over ``ep``) is fully sharded again over ``dp``: its
  parameter becomes a DTensor on the whole mesh, and every rank holds 1/(dp*ep) of it.
- Each block, and the embeddings, are fully sharded over all ranks (the flattened mesh).
- Expert gradients: a rank's expert receives gradients from the tokens of every rank (through the
  all-to-all backward), i.e. the *sum* over the ep ranks' losses; FSDP's reduce-scatter over ``dp``
  would divide by dp only, so its divide factor is set to dp*ep, the factor the dense weights get.

Gradient clipping needs the norm over every shard of every mesh: ``clip_grad_norm_`` below sums the
squares of the local shards (each element lives on exactly one rank) and all-reduces once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor.parallel import parallelize_module

from ..layers.experts import ExpertLinear
from ..layers.moa import MoAAttention
from ..layers.moe import MoE
from .expert import ExpertParallel, FFNExpertParallel
from .mesh import Mesh

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def apply_expert_parallel(model: nn.Module, mesh: Mesh) -> list[ExpertLinear]:
    """Apply the expert-parallel styles to every MoE FFN and MoA attention of ``model`` (in place).

    Returns the expert projections now sharded over ``mesh.ep``. Raises ValueError when ep does not
    divide a layer's expert count.
    """
    sharded = []
    for module in model.modules():
        if isinstance(module, MoE):
            parallelize_module(module, mesh.ep, FFNExpertParallel())
        elif isinstance(module, MoAAttention):
            parallelize_module(module, mesh.ep, {"input_linear": ExpertParallel(), "output_linear": ExpertParallel()})
        else:
            continue
        sharded += [module.input_linear, module.output_linear]
    return sharded


def apply_fsdp(model: nn.Module, mesh: Mesh, experts: list[ExpertLinear], precision: str = "fp32") -> None:
    """``fully_shard`` the expert projections over dp, then each block and the embeddings over all ranks.

    precision: fp32 | bf16 | fp16 compute dtype for parameters (gradients are reduced in fp32);
    low precision needs a device that supports it (bf16 works on CPU, fp16 on CUDA).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {tuple(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype is not None else MixedPrecisionPolicy()
    for linear in experts:
        fully_shard(linear, mesh=mesh.dp, mp_policy=mp)
        linear.set_gradient_divide_factor(float(mesh.world_size))
        if mesh.dp_size > 1:  # sum, then divide: gloo has no PREMUL_SUM. (On one rank FSDP skips the
            linear.set_force_sum_reduction_for_comms(True)  # collective and would divide twice, torch 2.13.)
    for block in model.layers:
        fully_shard(block, mesh=mesh.world, mp_policy=mp)
    if not model.cfg.tie_embeddings:  # a tied embedding is also the lm_head: it stays with the root
        fully_shard(model.embed, mesh=mesh.world, mp_policy=mp)
    fully_shard(model, mesh=mesh.world, mp_policy=mp)


def parallelize(model: nn.Module, mesh: Mesh, precision: str = "fp32") -> nn.Module:
    """Expert parallelism over ``mesh.ep`` and FSDP2 over the rest, in place; returns ``model``.

    Every rank must build ``model`` with the same weights (same seed) before calling this: each
    keeps only its shards.
    """
    experts = apply_expert_parallel(model, mesh)
    apply_fsdp(model, mesh, experts, precision)
    return model


def local_part(t: torch.Tensor) -> torch.Tensor:
    """This rank's elements of a (possibly DTensor) tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def clip_grad_norm_(params, max_norm: float) -> float:
    """Global-norm gradient clipping over sharded parameters (same rule as ``torch.nn.utils.clip_grad_norm_``).

    Every element of a fully sharded parameter lives on exactly one rank, so the global squared norm
    is the all-reduced sum of the local squared norms, whatever mesh each parameter is on.
    """
    grads = [p.grad for p in params if p.grad is not None]
    local = [local_part(g) for g in grads]
    device = local[0].device if local else ("cuda" if dist.get_backend() == "nccl" else "cpu")  # a rank may hold no grads
    sq = torch.zeros((), dtype=torch.float32, device=device)
    for g in local:
        sq += g.float().square().sum()
    dist.all_reduce(sq)
    norm = float(sq.sqrt())
    coef = min(1.0, max_norm / (norm + 1e-6))
    for g in local:  # in place on the shards: the DTensor grads see it
        g.mul_(coef)
    return norm
