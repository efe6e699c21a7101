"""Expert projections with sort-based, dropless dispatch (MegaBlocks arXiv 2211.15841; ScatterMoE
arXiv 2403.08245; torchtitan). Each projection is one 3-D parameter (E, out, in): the layout of HF,
JetMoE and ScatterMoE, so checkpoints convert by renaming.

Dispatch sorts the N*K (token, slot) pairs by expert once; every tensor then has a static shape
(N*K rows) whatever the routing, so there is no capacity factor, no dropped token and no host sync
in the fast path. Combining un-sorts and sums over K (deterministic, no atomics). When nothing is
differentiated, ``combine_add`` skips the un-sort: it scales the sorted rows in place and adds
each into its token's output row (on CPU, in row order: deterministic too), and
``swiglu_experts_by_expert`` runs a whole SwiGLU expert FFN that way, one expert at a time.

Legend: N tokens, K slots per token, M = N*K routed rows, E experts, I in dim, O out dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
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


def sort_by_expert(indices_NK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stable sort of the flattened expert ids (tokens keep their order inside an expert).

    Returns order (M,): sorted row -> flat (token * K + slot) index; token (M,); counts (E,)."""
    flat_M = indices_NK.reshape(-1)
    order_M = torch.argsort(flat_M, stable=True)
    counts_E = torch.bincount(flat_M, minlength=num_experts)
    return order_M, order_M // indices_NK.shape[1], counts_E


def make_dispatch(indices_NK: torch.Tensor, num_experts: int) -> Dispatch:
    """``sort_by_expert`` plus the inverse permutation that ``combine`` un-sorts with."""
    order_M, token_M, counts_E = sort_by_expert(indices_NK, num_experts)
    inverse_M = torch.empty_like(order_M)
    inverse_M[order_M] = torch.arange(order_M.numel(), device=order_M.device)
    return Dispatch(order_M, token_M, inverse_M, counts_E, indices_NK.shape[1])


def combine(y_MO: torch.Tensor, weights_NK: torch.Tensor, d: Dispatch) -> torch.Tensor:
    """Un-sort expert outputs back to (token, slot), scale by the gates (in fp32), sum over slots."""
    N, K = weights_NK.shape
    y_NKO = y_MO[d.inverse].view(N, K, -1)
    return (y_NKO.float() * weights_NK.float().unsqueeze(-1)).sum(1).to(y_MO.dtype)  # (N, O)


def combine_add(y_MO: torch.Tensor, weights_NK: torch.Tensor, order_M: torch.Tensor, token_M: torch.Tensor) -> torch.Tensor:
    """``combine`` without the un-sort, for when nothing is differentiated (CPU): (N, O).

    Scales each sorted row by its gate (in fp32) and adds it into its token's row of a zero fp32
    output, rows in sorted order; a token's K rows are summed in expert order rather than slot
    order, so the result differs from ``combine`` by the rounding of a K-term sum. Consumes
    ``y_MO`` (scaled in place when it is fp32). Not differentiable.

    The index is int32 on purpose: with an int64 index (and alpha 1), CPU ``index_add_`` takes a
    ``scatter_add_`` path that measured ~10x slower here than its serial row loop (torch 2.13).
    """
    N, O = weights_NK.shape[0], y_MO.shape[1]
    w_M1 = weights_NK.reshape(-1).index_select(0, order_M).float().unsqueeze(1)
    acc_MO = y_MO.mul_(w_M1) if y_MO.dtype == torch.float32 else y_MO.float().mul_(w_M1)
    out_NO = torch.zeros(N, O, dtype=torch.float32, device=y_MO.device)
    return out_NO.index_add_(0, token_M.to(torch.int32), acc_MO).to(y_MO.dtype)


def swiglu_experts_by_expert(
    x_Nd: torch.Tensor,
    w_in_EFd: torch.Tensor,
    w_out_EdF: torch.Tensor,
    weights_NK: torch.Tensor,
    order_M: torch.Tensor,
    token_M: torch.Tensor,
    counts_E: torch.Tensor,
) -> torch.Tensor:
    """Routed SwiGLU experts without gradients, one expert at a time (CPU): (N, d).

    w_in (E, 2f, d) is [gate; up], w_out (E, d, f). For expert e, owning sorted rows [s, s + c):
    gather its tokens, h = x_e W_in[e]^T, SwiGLU in place in h's gate half, y = act W_out[e]^T,
    scale by the gates (fp32) and ``index_add_`` into the fp32 output (as ``combine_add``). Every
    step writes into buffers sized for the largest expert and reused across experts, so the
    elementwise work runs on data still in cache from the GEMM and no (M, 2f) tensor is allocated:
    this is what lets it beat the whole-batch grouped GEMM path (measured; see benchmarks/README.md).
    Reads ``counts`` on the host.
    """
    N, d = x_Nd.shape
    f = w_out_EdF.shape[2]
    out_Nd = torch.zeros(N, d, dtype=torch.float32, device=x_Nd.device)
    counts = counts_E.tolist()
    c_max = max(counts, default=0)
    if c_max == 0:
        return out_Nd.to(x_Nd.dtype)
    tok_M = token_M.to(torch.int32)  # int32: see combine_add
    w_M1 = weights_NK.reshape(-1).index_select(0, order_M).float().unsqueeze(1)
    x_buf, h_buf, y_buf = x_Nd.new_empty(c_max, d), x_Nd.new_empty(c_max, 2 * f), x_Nd.new_empty(c_max, d)
    s = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        tok_c = tok_M[s : s + c]
        x_cd = torch.index_select(x_Nd, 0, tok_c, out=x_buf[:c])
        h_cF = torch.mm(x_cd, w_in_EFd[e].t(), out=h_buf[:c])
        act_cf = F.silu(h_cF[:, :f], inplace=True).mul_(h_cF[:, f:])
        y_cd = torch.mm(act_cf, w_out_EdF[e].t(), out=y_buf[:c])
        y_cd = y_cd.mul_(w_M1[s : s + c]) if y_cd.dtype == torch.float32 else y_cd.float().mul_(w_M1[s : s + c])
        out_Nd.index_add_(0, tok_c, y_cd)
        s += c
    return out_Nd.to(x_Nd.dtype)


class ExpertLinear(nn.Module):
    """E independent linear maps stored as weight (E, out_dim, in_dim).

    forward(x_sorted (M, in_dim), counts (E,), impl="auto") -> (M, out_dim): rows sorted by expert,
    expert e owning ``counts[e]`` consecutive rows. ``impl`` names the ``grouped_linear`` kernel; the
    mixture layers pass the model's choice (``MixtureConfig.kernels``) at each call.
    """

    def __init__(self, num_experts: int, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, out_dim, in_dim))
        bound = 1 / math.sqrt(in_dim)  # same distribution as nn.Linear's default init
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x_MI: torch.Tensor, counts_E: torch.Tensor, impl: str = "auto") -> torch.Tensor:
        # Under expert parallelism (mixattn.parallel) the weight is a DTensor sharded on dim 0 and
        # x_MI holds the rows of this rank's experts only: jagged per-expert counts are not
        # expressible as DTensors, so the kernel runs on the local shard (as torchtitan does). Duck-typed
        # so that importing the layers never loads torch.distributed.
        w = self.weight.to_local() if hasattr(self.weight, "to_local") else self.weight
        return kernels.get("grouped_linear", impl)(x_MI, w, counts_E)

    def extra_repr(self) -> str:
        E, O, I = self.weight.shape
        return f"num_experts={E}, in_dim={I}, out_dim={O}"
