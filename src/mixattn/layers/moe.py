"""Sparse Mixture-of-Experts SwiGLU feed-forward (Switch, arXiv 2101.03961; Mixtral; JetMoE
arXiv 2404.07413), with DeepSeekMoE's always-on shared experts and fine-grained experts
(arXiv 2401.06066).

Each token is routed to K of E SwiGLU experts; fine-grained segmentation is simply more, narrower
experts (``fine_grained``). Shared experts form one dense SwiGLU that every token passes through.
The expert input projection is one (E, 2f, d) tensor, gate half first (HF JetMoe ``input_linear``).

The routed experts run one of two paths with the same result up to rounding. With gradients, the
autograd-friendly one: gather, grouped GEMMs, SwiGLU, un-sort and sum (``combine``). When nothing
is differentiated (inference, CPU), a cheaper one: the SwiGLU is computed in place in the gate half
of the first projection's output, and the gated rows are added straight into their tokens' output
rows, with no un-sort and no (N, K, d) temporary. When the model leaves ``grouped_linear`` on
``auto`` this runs one expert at a time through cache-resident buffers
(``swiglu_experts_by_expert``); with a named kernel (``MixtureConfig.kernels``, or ``impl=`` here)
or under expert parallelism, through the ``ExpertLinear`` modules' grouped kernel and ``combine_add``.

Legend: B batch, T tokens, N = B*T, K top-k, M = N*K, E experts, d hidden dim, f expert ffn dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttnContext, LayerOutput, check_input
from .dispatch import chosen
from .experts import ExpertLinear, combine, combine_add, make_dispatch, sort_by_expert, swiglu_experts_by_expert
from .norm import SwiGLU
from .routers import Router, RouterConfig


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    router: RouterConfig = field(default_factory=lambda: RouterConfig(num_experts=8, top_k=2))
    expert_ffn_dim: int = 0  # width of each routed expert; 0 means the model's ffn_dim
    shared_experts: int = 0  # always-on experts (DeepSeekMoE), fused into one dense SwiGLU
    bias: bool = False  # output bias after the gated sum (JetMoE)

    def __post_init__(self):
        if self.expert_ffn_dim < 0 or self.shared_experts < 0:
            raise ValueError("expert_ffn_dim and shared_experts must be >= 0")

    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    @property
    def top_k(self) -> int:
        return self.router.top_k

    def fine_grained(self, m: int, ffn_dim: int) -> MoEConfig:
        """DeepSeekMoE segmentation: m x more experts, each 1/m as wide, m x larger top-k."""
        if m < 1 or ffn_dim % m:
            raise ValueError(f"granularity m={m} must be >= 1 and divide ffn_dim={ffn_dim}")
        r = self.router
        router = replace(r, num_experts=r.num_experts * m, top_k=r.top_k * m)
        return replace(self, router=router, expert_ffn_dim=(self.expert_ffn_dim or ffn_dim) // m)


def _plain(lin: ExpertLinear) -> bool:
    """A plain local weight and no hooks (expert parallelism wraps the module in hooks and shards
    its weight): its weight may be used directly."""
    return not hasattr(lin.weight, "to_local") and not lin._forward_hooks and not lin._forward_pre_hooks


class MoE(nn.Module):
    """forward(x (B, T, d), ctx) -> LayerOutput(y (B, T, d), router)."""

    def __init__(self, hidden_dim: int, ffn_dim: int, cfg: MoEConfig):
        super().__init__()
        self.cfg, self.hidden_dim = cfg, hidden_dim
        f, E = cfg.expert_ffn_dim or ffn_dim, cfg.num_experts
        self.router = Router(hidden_dim, cfg.router)
        self.input_linear = ExpertLinear(E, hidden_dim, 2 * f)  # (E, 2f, d): [gate; up]
        self.output_linear = ExpertLinear(E, f, hidden_dim)  # (E, d, f)
        self.shared = SwiGLU(hidden_dim, f * cfg.shared_experts) if cfg.shared_experts else None
        self.bias = nn.Parameter(torch.zeros(hidden_dim)) if cfg.bias else None

    def experts(self, x_Nd: torch.Tensor, indices_NK: torch.Tensor, weights_NK: torch.Tensor,
                impl: str = "auto") -> torch.Tensor:  # fmt: skip
        """The routed experts alone: (N, d) -> (N, d) given the routing; ``impl`` names the
        ``grouped_linear`` kernel."""
        tensors = (x_Nd, weights_NK, self.input_linear.weight, self.output_linear.weight)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return self.experts_train(x_Nd, indices_NK, weights_NK, impl)
        return self.experts_inference(x_Nd, indices_NK, weights_NK, impl)

    def experts_train(self, x_Nd: torch.Tensor, indices_NK: torch.Tensor, weights_NK: torch.Tensor,
                      impl: str = "auto") -> torch.Tensor:  # fmt: skip
        """The differentiable path: sorted gather, grouped GEMMs, SwiGLU, un-sort and sum over K."""
        disp = make_dispatch(indices_NK, self.cfg.num_experts)
        x_Md = x_Nd[disp.token]  # gather: one row per (token, slot), sorted by expert
        gate_Mf, up_Mf = self.input_linear(x_Md, disp.counts, impl=impl).chunk(2, dim=-1)
        h_Md = self.output_linear(F.silu(gate_Mf) * up_Mf, disp.counts, impl=impl)
        return combine(h_Md, weights_NK, disp)

    @torch.no_grad()
    def experts_inference(self, x_Nd: torch.Tensor, indices_NK: torch.Tensor, weights_NK: torch.Tensor,
                          impl: str = "auto") -> torch.Tensor:  # fmt: skip
        """The no-grad path (never differentiable): in-place SwiGLU, no un-sort on CPU."""
        if x_Nd.device.type != "cpu":  # index_add_ on GPUs sums with atomics: keep the deterministic combine
            return self.experts_train(x_Nd, indices_NK, weights_NK, impl)
        order_M, token_M, counts_E = sort_by_expert(indices_NK, self.cfg.num_experts)
        linears = (self.input_linear, self.output_linear)
        if impl == "auto" and all(_plain(lin) for lin in linears):
            w_in, w_out = (lin.weight for lin in linears)
            return swiglu_experts_by_expert(x_Nd, w_in, w_out, weights_NK, order_M, token_M, counts_E)
        h_M2f = self.input_linear(x_Nd.index_select(0, token_M), counts_E, impl=impl)
        f = h_M2f.shape[1] // 2
        act_Mf = F.silu(h_M2f[:, :f], inplace=True).mul_(h_M2f[:, f:])  # SwiGLU in the gate half
        return combine_add(self.output_linear(act_Mf, counts_E, impl=impl), weights_NK, order_M, token_M)

    def forward(self, x_BTd: torch.Tensor, ctx: AttnContext | None = None, graph_qk=None) -> LayerOutput:
        check_input(x_BTd, self.hidden_dim, "MoE")
        B, T, d = x_BTd.shape
        r = self.router(x_BTd, graph_qk=graph_qk, ctx=ctx)
        y_Nd = self.experts(x_BTd.reshape(B * T, d), r.indices, r.weights, chosen(ctx, "grouped_linear"))
        y = y_Nd.view(B, T, d)
        if self.shared is not None:
            y = y + self.shared(x_BTd)
        if self.bias is not None:
            y = y + self.bias
        return LayerOutput(y, r)
