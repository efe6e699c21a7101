"""Apply a sparse attention plan to a model, or remove it. Works on every attention whose heads read
one set of K/V: dense and GQA attention, MoA attention experts (a rule per shared KV head) and MoH."""

from __future__ import annotations

from ..layers.attention import Attention
from ..layers.moa import MoAAttention
from ..layers.rcmha import RCMHAttention
from ..layers.sparse import SparseSpec
from ..models.decoder import MixtureLM
from .plan import Plan


def apply_plan(model: MixtureLM, plan: Plan, impl: str = "auto") -> MixtureLM:
    """Attach ``plan`` to ``model`` in place (and return it). ``impl``: sparse_attention kernel name."""
    from .. import kernels

    if impl != "auto":
        kernels.get("sparse_attention", impl)
    plan.validate(model.cfg)
    for i, layer in enumerate(model.layers):  # check every layer before changing any
        if isinstance(layer.attn, RCMHAttention):
            raise ValueError(f"layer {i}: sparse attention plans do not apply to RCMHA (its scores carry "
                             "relative positions the sparse kernels do not add)")  # fmt: skip
        if not isinstance(layer.attn, (Attention, MoAAttention)):
            raise ValueError(f"layer {i}: {type(layer.attn).__name__} keeps one KV cache per expert; "
                             "sparse plans apply to dense, GQA, MoA and MoH attention")  # fmt: skip
        router = getattr(layer.ffn, "router", None)
        if router is not None and router.cfg.graph == "attention":
            raise ValueError(f"layer {i}: the FFN router's attention graph reads every past key, which a "
                             "sparse plan does not keep; use graph='similarity' or 'none'")  # fmt: skip
    for layer, rules in zip(model.layers, plan.layers):
        sinks, alphas, betas = zip(*((r.sink, float(r.alpha), float(r.beta)) for r in rules))
        layer.attn.sparse = SparseSpec(sinks, alphas, betas, impl)
    return model


def remove_plan(model: MixtureLM) -> MixtureLM:
    for layer in model.layers:
        if hasattr(layer.attn, "sparse"):
            layer.attn.sparse = None
    return model
