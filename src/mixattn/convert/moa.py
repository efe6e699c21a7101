"""Dense GQA -> MoA attention experts, exactly (MoA: Zhang et al. 2022, arXiv 2210.05144; JetMoE, arXiv 2404.07413).

Llama maps query head h to KV head h // G (G = heads per KV head). Expert g takes the query heads
{j*G + g : j < Hkv}, one per KV head, which is exactly JetMoE's layout (expert slot s, head j reads
KV head j). With k = E = G and every gate equal to 1 (``scale_k`` gates on a zero-initialised
router) the model computes the same function as the dense one; lowering k then sparsifies it and
continue-training teaches the router.
"""

from __future__ import annotations

import torch

from ..layers.moa import MoAConfig
from ..layers.routers import RouterConfig
from ..models.decoder import MixtureLM
from .common import copy_shared, require_dense


def gqa_to_moa(model: MixtureLM, top_k: int | None = None) -> MixtureLM:
    """Return a new MoA model; ``top_k`` defaults to G (exact). Weights are copied, not shared."""
    cfg = model.cfg
    require_dense(cfg, "GQA -> MoA")
    if cfg.qk_norm != "none" or cfg.attention_bias or cfg.attention_out_bias:
        raise ValueError("GQA -> MoA supports attention without q/k norms or biases (JetMoE has none)")
    G, Hkv, D = cfg.num_heads // cfg.num_kv_heads, cfg.num_kv_heads, cfg.head_dim
    k = top_k or G
    if not 1 <= k <= G:
        raise ValueError(f"top_k={k} must be in [1, G={G}] (G = query heads per KV head)")
    router = RouterConfig(num_experts=G, top_k=k, gate_norm="scale_k")
    new = MixtureLM(cfg.evolve(attention="moa", moa=MoAConfig(router=router, bias=False)))
    copy_shared(model, new, skip=(".attn.",))
    with torch.no_grad():
        for dense, moa in zip(model.layers, new.layers):
            a, m = dense.attn, moa.attn
            m.kv_proj.weight.copy_(torch.cat([a.k_proj.weight, a.v_proj.weight]))
            wq = a.q_proj.weight.view(Hkv, G, D, -1)  # rows of head j*G + g
            m.input_linear.weight.copy_(wq.permute(1, 0, 2, 3).reshape(G, Hkv * D, -1))
            wo = a.o_proj.weight.view(-1, Hkv, G, D)  # columns of head j*G + g
            m.output_linear.weight.copy_(wo.permute(2, 0, 1, 3).reshape(G, -1, Hkv * D))
            m.router.proj.weight.zero_()
    return new
