"""Expert projections with sort-based, dropless dispatch (MegaBlocks arXiv 2211.15841; ScatterMoE
arXiv 2403.08245; torchtitan). Each projection is one 3-D parameter (E, out, in): the layout of HF,
JetMoE and ScatterMoE, so checkpoints convert by renaming.

Dispatch sorts the N*K (token, slot) pairs by expert once; every tensor then has a static shape
(N*K rows) whatever the routing, so there is no capacity factor, no dropped token and no host sync
in the fast path. Combining un-sorts and sums over K (deterministic, no atomics).

Legend: N tokens, K slots per token, M = N*K routed rows, E experts, I in dim, O out dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .. import kernels


@dataclass(frozen=True)
class Dispatch:
    """Routing metadata shared by every expert projection of one layer.

    order (M,): sorted row -> flat (token * K + slot) index; token (M,): token of each sorted row;
    inverse (M,): flat index -> sorted row; counts (E,): rows per expert.
    """

    order: torch.Tensor
    token: torch.Tensor
    inverse: torch.Tensor
    counts: torch.Tensor
    top_k: int


def make_dispatch(indices_NK: torch.Tensor, num_experts: int) -> Dispatch:
    """Stable sort of the flattened expert ids (tokens keep their order inside an expert)."""
    flat_M = indices_NK.reshape(-1)
    order_M = torch.argsort(flat_M, stable=True)
    inverse_M = torch.empty_like(order_M)
    inverse_M[order_M] = torch.arange(order_M.numel(), device=order_M.device)
    counts_E = torch.bincount(flat_M, minlength=num_experts)
    return Dispatch(order_M, order_M // indices_NK.shape[1], inverse_M, counts_E, indices_NK.shape[1])


def combine(y_MO: torch.Tensor, weights_NK: torch.Tensor, d: Dispatch) -> torch.Tensor:
    """Un-sort expert outputs back to (token, slot), scale by the gates (in fp32), sum over slots."""
    N, K = weights_NK.shape
    y_NKO = y_MO[d.inverse].view(N, K, -1)
    return (y_NKO.float() * weights_NK.float().unsqueeze(-1)).sum(1).to(y_MO.dtype)  # (N, O)


class ExpertLinear(nn.Module):
    """E independent linear maps stored as weight (E, out_dim, in_dim).

    forward(x_sorted (M, in_dim), counts (E,)) -> (M, out_dim): rows sorted by expert, expert e
    owning ``counts[e]`` consecutive rows. ``impl`` names a ``grouped_linear`` kernel.
    """

    def __init__(self, num_experts: int, in_dim: int, out_dim: int, impl: str = "auto"):
        super().__init__()
        kernels.get("grouped_linear", impl)  # fail early on an unknown impl
        self.impl = impl
        self.weight = nn.Parameter(torch.empty(num_experts, out_dim, in_dim))
        bound = 1 / math.sqrt(in_dim)  # same distribution as nn.Linear's default init
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x_MI: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        # Under expert parallelism (mixattn.parallel) the weight is a DTensor sharded on dim 0 and
        # x_MI holds the rows of this rank's experts only: jagged per-expert counts are not
        # expressible as DTensors, so the kernel runs on the local shard (as torchtitan does). Duck-typed
        # so that importing the layers never loads torch.distributed.
        w = self.weight.to_local() if hasattr(self.weight, "to_local") else self.weight
        return kernels.get("grouped_linear", self.impl)(x_MI, w, counts_E)

    def extra_repr(self) -> str:
        E, O, I = self.weight.shape
        return f"num_experts={E}, in_dim={I}, out_dim={O}, impl={self.impl!r}"
