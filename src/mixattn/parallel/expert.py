"""Expert parallelism as a parallel style applied to a built model (torchtitan's ``ExpertParallel``;
DeepSpeed-MoE arXiv 2201.05596; GShard arXiv 2006.16668).

The experts of every mixture layer are split over the ``ep`` ranks: each projection's (E, O, I)
weight becomes a DTensor sharded on dim 0, so a rank holds E/ep experts and
``torch.distributed.checkpoint`` can reshard it to any other ``ep``. The layers themselves are not
changed: the style registers hooks around ``ExpertLinear.forward(x_sorted, counts)``, whose rows are
already sorted by global expert id, so the rows for each destination rank are contiguous:

1. exchange per-expert counts with ``all_to_all_single`` (each rank learns what it will receive);
2. send the rows with an uneven-split ``all_to_all_single`` (dropless: every row travels);
3. reorder the received rows from (source rank, expert) to (expert, source rank) and run the local
   experts;
4. undo the reorder and send the outputs back with the reverse all-to-all.

Steps 2 and 4 go through ``all_to_all_single_autograd``, whose backward is the reverse exchange, so
gradients flow to every rank's tokens and experts. The split sizes must be on the host, so step 1
costs one device-to-host copy (as in torchtitan).

Two styles: ``ExpertParallel`` wraps one ``ExpertLinear`` in a round trip (MoA's query and output
projections, which have attention between them), and ``FFNExpertParallel`` wraps a whole MoE FFN's
input -> output projections in one round trip (the SwiGLU between them is row-wise).

Legend: M rows (token, slot pairs) on this rank, E experts, ep expert-parallel ranks, L = E/ep local
experts, R rows received.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle

from ..layers.experts import ExpertLinear


def expert_major_order(counts_SL: torch.Tensor) -> torch.Tensor:
    """Permutation taking rows received in (source rank, local expert) order to (local expert,
    source rank) order, so each local expert's rows are contiguous: (R,) indices into the received rows.

    counts_SL: (S, L) rows received from each source rank for each local expert.
    """
    S, L = counts_SL.shape
    flat = counts_SL.reshape(-1)
    starts_SL = (torch.cumsum(flat, 0) - flat).view(S, L)  # where each block begins, source-major
    lens_LS, starts_LS = counts_SL.t().reshape(-1), starts_SL.t().reshape(-1)  # blocks in expert-major order
    R = int(flat.sum())
    block_begin = torch.cumsum(lens_LS, 0) - lens_LS  # where each block lands, expert-major
    return torch.repeat_interleave(starts_LS - block_begin, lens_LS, output_size=R) + torch.arange(R, device=flat.device)


@dataclass
class _Route:
    """What the dispatch of one call hands to its combine: split sizes and the local reorder."""

    input_splits: list[int]
    output_splits: list[int]
    order: torch.Tensor
    local_counts: torch.Tensor


@dataclass
class _Dispatcher:
    """Token exchange over one ep group (one instance per wrapped layer: it holds the current call's route)."""

    mesh: DeviceMesh
    route: _Route | None = field(default=None, repr=False)

    def dispatch(self, x_MI: torch.Tensor, counts_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, I) rows sorted by global expert, (E,) counts -> (R, I) rows for the local experts
        sorted by local expert, (L,) local counts."""
        group, ep = self.mesh.get_group(), self.mesh.size()
        E = counts_E.numel()
        if E % ep:
            raise ValueError(f"expert parallelism: {E} experts cannot be split evenly over ep={ep} ranks")
        send_SL = counts_E.to(torch.int64).view(ep, E // ep).contiguous()
        recv_SL = torch.empty_like(send_SL)
        dist.all_to_all_single(recv_SL, send_SL, group=group)  # step 1: counts first
        input_splits, output_splits = send_SL.sum(1).tolist(), recv_SL.sum(1).tolist()  # host sync
        x_RI = funcol.all_to_all_single_autograd(x_MI.contiguous(), output_splits, input_splits, group)
        x_RI = funcol.wait_tensor(x_RI) if isinstance(x_RI, funcol.AsyncCollectiveTensor) else x_RI
        order = expert_major_order(recv_SL)
        self.route = _Route(input_splits, output_splits, order, recv_SL.sum(0))
        return x_RI[order], self.route.local_counts

    def local_counts(self) -> torch.Tensor:
        if self.route is None:
            raise RuntimeError("expert parallelism: an expert projection ran before its dispatch")
        return self.route.local_counts

    def combine(self, y_RO: torch.Tensor) -> torch.Tensor:
        """(R, O) local-expert outputs -> (M, O) rows in this rank's original (sorted) order."""
        route, self.route = self.route, None
        if route is None:
            raise RuntimeError("expert parallelism: combine without a dispatch")
        inverse = torch.empty_like(route.order)
        inverse[route.order] = torch.arange(route.order.numel(), device=route.order.device)
        y_MO = funcol.all_to_all_single_autograd(y_RO[inverse].contiguous(), route.input_splits, route.output_splits,
                                                 self.mesh.get_group())  # fmt: skip
        y_MO = funcol.wait_tensor(y_MO) if isinstance(y_MO, funcol.AsyncCollectiveTensor) else y_MO
        return y_MO


def _shard_experts(linear: ExpertLinear, mesh: DeviceMesh) -> None:
    """Replace the (E, O, I) weight by a DTensor sharded over ``mesh`` on the expert dim."""
    E = linear.weight.shape[0]
    if E % mesh.size():
        raise ValueError(f"expert parallelism: {E} experts cannot be split evenly over ep={mesh.size()} ranks; "
                         "choose an ep size (or --nproc) that divides the expert count")  # fmt: skip
    linear.weight = nn.Parameter(distribute_tensor(linear.weight.data, mesh, [Shard(0)]))


class ExpertParallel(ParallelStyle):
    """Shard one ``ExpertLinear`` over the ep mesh and wrap its forward in a dispatch/combine round trip."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, ExpertLinear):
            raise TypeError(f"ExpertParallel applies to ExpertLinear, got {type(module).__name__}")
        _shard_experts(module, device_mesh)
        d = _Dispatcher(device_mesh)
        module.register_forward_pre_hook(lambda _m, args: d.dispatch(*args))
        module.register_forward_hook(lambda _m, _args, out: d.combine(out))
        return module


class FFNExpertParallel(ParallelStyle):
    """Shard a MoE FFN's two expert projections and wrap input -> output projection in one round trip.

    The rows stay on the expert's rank between the projections (the SwiGLU is row-wise), so the MoE
    layer exchanges tokens once each way instead of twice.
    """

    def __init__(self, first: str = "input_linear", last: str = "output_linear"):
        super().__init__()
        self.first, self.last = first, last

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        first, last = module.get_submodule(self.first), module.get_submodule(self.last)
        for linear in (first, last):
            if not isinstance(linear, ExpertLinear):
                raise TypeError(f"FFNExpertParallel: {type(module).__name__} has no ExpertLinear {self.first}/{self.last}")
            _shard_experts(linear, device_mesh)
        d = _Dispatcher(device_mesh)
        first.register_forward_pre_hook(lambda _m, args: d.dispatch(*args))
        # the second projection is called with the global counts: hand it the local ones of this call
        last.register_forward_pre_hook(lambda _m, args: (args[0], d.local_counts()))
        last.register_forward_hook(lambda _m, _args, out: d.combine(out))
        return module
