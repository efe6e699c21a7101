"""Degenerate-case equivalences and fast-vs-reference parity for MoE, MoA, MoH and BAM."""

import dataclasses

import pytest
import torch

from mixattn.layers import (
    Attention,
    AttentionConfig,
    BAMAttention,
    BAMSharedKVAttention,
    KVCache,
    MoAAttention,
    MoAConfig,
    MoE,
    MoEConfig,
    MoHAttention,
    MoHConfig,
    RouterConfig,
    SwiGLU,
)
from tests.conftest import assert_fp_close, grads, make_ctx

D = 8
TERMS = 64  # longest reduction in these layers: hidden 24, heads x head_dim 48, sequence <= 11


def _attn_cfg(H=6, Hkv=2, d=24):
    return AttentionConfig(hidden_dim=d, num_heads=H, num_kv_heads=Hkv, head_dim=D)


# ---------------------------------------------------------------- MoE FFN


def test_one_expert_moe_equals_dense_swiglu():
    d, f = 12, 20
    dense = SwiGLU(d, f)
    moe = MoE(d, f, MoEConfig(router=RouterConfig(num_experts=1, top_k=1, gate_norm="renorm")))
    with torch.no_grad():
        moe.input_linear.weight[0] = torch.cat([dense.gate_proj.weight, dense.up_proj.weight])
        moe.output_linear.weight[0] = dense.down_proj.weight
    x = torch.randn(2, 5, d, requires_grad=True)
    a, b = moe(x).y, dense(x)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(grads(a, x)[0], grads(b, x)[0])


@pytest.mark.parametrize("E,K,T", [(4, 2, 7), (4, 4, 3), (5, 1, 1), (8, 2, 3)])
def test_moe_grouped_equals_reference_outputs_and_grads(E, K, T):
    cfg = MoEConfig(router=RouterConfig(num_experts=E, top_k=K, gate_norm="renorm"), shared_experts=1)
    fast = MoE(16, 12, cfg)
    ref = MoE(16, 12, cfg)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(1, T, 16, requires_grad=True)
    a, b = fast(x).y, ref(x, dataclasses.replace(make_ctx(T, D), kernels={"grouped_linear": "reference"})).y
    torch.testing.assert_close(a, b)
    params = [x, fast.input_linear.weight, fast.output_linear.weight, fast.router.proj.weight]
    params_ref = [x, ref.input_linear.weight, ref.output_linear.weight, ref.router.proj.weight]
    for g1, g2 in zip(grads(a, params), grads(b, params_ref)):
        torch.testing.assert_close(g1, g2)


def test_moe_expert_with_no_tokens_gets_zero_grad():
    moe = MoE(8, 8, MoEConfig(router=RouterConfig(num_experts=4, top_k=1)))
    with torch.no_grad():
        moe.router.proj.weight.zero_()
        moe.router.proj.weight[0] = 1.0  # logit 0 dominates for positive inputs...
    x = torch.rand(1, 5, 8) + 0.1  # ...so every token picks expert 0
    out = moe(x)
    (gw,) = grads(out.y, [moe.input_linear.weight])
    assert gw[1:].abs().sum() == 0 and gw[0].abs().sum() > 0


def test_fine_grained_config():
    cfg = MoEConfig(router=RouterConfig(num_experts=4, top_k=1)).fine_grained(4, ffn_dim=64)
    assert (cfg.num_experts, cfg.top_k, cfg.expert_ffn_dim) == (16, 4, 16)
    with pytest.raises(ValueError, match="granularity"):
        cfg.fine_grained(3, ffn_dim=64)


def test_bad_inputs_raise_clear_errors():
    moe = MoE(8, 8, MoEConfig())
    with pytest.raises(ValueError, match="floating-point"):
        moe(torch.zeros(1, 2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(batch, tokens, 8\)"):
        moe(torch.zeros(2, 9))
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        AttentionConfig(hidden_dim=8, num_heads=6, num_kv_heads=4, head_dim=2)
    with pytest.raises(ValueError, match="routed heads"):
        MoHAttention(_attn_cfg(), MoHConfig(shared_heads=4, top_k=3))


# ---------------------------------------------------------------- MoA


def moa_from_dense(dense: Attention) -> MoAAttention:
    """GQA -> MoA exactly (architectures.md §8.3c): expert g = query heads {j*G + g}, k = E = G,
    gates 1 (scale_k renorm), no bias."""
    c = dense.cfg
    G, Hkv = c.group_size, c.num_kv_heads
    moa = MoAAttention(c, MoAConfig(router=RouterConfig(num_experts=G, top_k=G, gate_norm="scale_k"), bias=False))
    wq = dense.q_proj.weight.view(Hkv, G, D, -1)  # (Hkv, G, D, d)
    wo = dense.o_proj.weight.view(-1, Hkv, G, D)  # (d, Hkv, G, D)
    with torch.no_grad():
        moa.kv_proj.weight.copy_(torch.cat([dense.k_proj.weight, dense.v_proj.weight]))
        moa.input_linear.weight.copy_(wq.permute(1, 0, 2, 3).reshape(G, Hkv * D, -1))
        moa.output_linear.weight.copy_(wo.permute(2, 0, 1, 3).reshape(G, -1, Hkv * D))
        moa.router.proj.weight.zero_()
    return moa


def test_moa_with_all_experts_and_equal_gates_equals_dense_gqa():
    dense = Attention(_attn_cfg(H=6, Hkv=2))
    moa = moa_from_dense(dense)
    x = torch.randn(2, 9, 24)
    assert_fp_close(moa(x, make_ctx(9, D)).y, dense(x, make_ctx(9, D)).y, TERMS)


def test_moa_reference_impl_matches_grouped():
    cfg = _attn_cfg(H=4, Hkv=2)
    mcfg = MoAConfig(router=RouterConfig(num_experts=4, top_k=2, gate_norm="softmax_topk"))
    fast, ref = MoAAttention(cfg, mcfg), MoAAttention(cfg, mcfg)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(1, 7, 24, requires_grad=True)
    ctx_ref = dataclasses.replace(make_ctx(7, D), kernels={"grouped_linear": "reference"})
    a, b = fast(x, make_ctx(7, D)).y, ref(x, ctx_ref).y
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(grads(a, x)[0], grads(b, x)[0])


# ---------------------------------------------------------------- MoH


def test_moh_with_all_heads_and_unit_gates_equals_mha():
    dense = Attention(_attn_cfg(H=6, Hkv=3))
    moh = MoHAttention(dense.cfg, MoHConfig(shared_heads=2, top_k=4))  # every routed head on
    moh.load_state_dict(dense.state_dict(), strict=False)  # routers start at zero: gates are 1
    x = torch.randn(2, 11, 24)
    assert_fp_close(moh(x, make_ctx(11, D)).y, dense(x, make_ctx(11, D)).y, TERMS)


@pytest.mark.parametrize("scoring,shared", [("learned", 2), ("learned", 0), ("query_norm", 3)])
def test_moh_gather_matches_mask_after_compute_reference(scoring, shared):
    cfg = _attn_cfg(H=6, Hkv=3)
    fast = MoHAttention(cfg, MoHConfig(shared_heads=shared, top_k=2, scoring=scoring))
    ref = MoHAttention(cfg, MoHConfig(shared_heads=shared, top_k=2, scoring=scoring))
    for lin in (fast.router.proj, fast.shared_router, fast.mix_router):
        if lin is not None:
            torch.nn.init.normal_(lin.weight)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, 13, 24, requires_grad=True)
    slow = {"head_sparse_attention": "reference", "attention": "reference"}  # the model-level kernel choice
    out_a, out_b = fast(x, make_ctx(13, D)), ref(x, make_ctx(13, D, kernels=slow))
    assert_fp_close(out_a.y, out_b.y, TERMS)
    params = [x, fast.q_proj.weight, fast.k_proj.weight, fast.v_proj.weight]
    params_ref = [x, ref.q_proj.weight, ref.k_proj.weight, ref.v_proj.weight]
    for g1, g2 in zip(grads(out_a.y, params), grads(out_b.y, params_ref)):
        assert_fp_close(g1, g2, TERMS)
    active = out_a.router.mask.float().sum(-1) + shared
    assert torch.all(active == shared + 2)


# ---------------------------------------------------------------- BAM


def test_bam_with_identical_experts_equals_single_attention():
    dense = Attention(_attn_cfg(H=4, Hkv=2))
    x = torch.randn(2, 6, 24)
    want = dense(x, make_ctx(6, D)).y
    full, shared = BAMAttention(dense.cfg, 3), BAMSharedKVAttention(dense.cfg, 3)
    with torch.no_grad():
        for bam in (full, shared):
            bam.q_proj.copy_(dense.q_proj.weight.expand(3, -1, -1))
            bam.o_proj.copy_(dense.o_proj.weight.expand(3, -1, -1))
        full.k_proj.copy_(dense.k_proj.weight.expand(3, -1, -1))
        full.v_proj.copy_(dense.v_proj.weight.expand(3, -1, -1))
        shared.k_proj.weight.copy_(dense.k_proj.weight)
        shared.v_proj.weight.copy_(dense.v_proj.weight)
    assert_fp_close(full(x, make_ctx(6, D)).y, want, TERMS)
    assert_fp_close(shared(x, make_ctx(6, D)).y, want, TERMS)


# ---------------------------------------------------------------- cached decode


def _all_attention_types():
    cfg = _attn_cfg(H=4, Hkv=2)
    return {
        "dense": Attention(cfg),
        "moa": MoAAttention(cfg, MoAConfig(router=RouterConfig(num_experts=4, top_k=2, gate_norm="softmax_topk"))),
        "moh": MoHAttention(cfg, MoHConfig(shared_heads=1, top_k=2)),
        "moh_qnorm": MoHAttention(cfg, MoHConfig(shared_heads=2, top_k=1, scoring="query_norm")),
        "bam": BAMAttention(cfg, 2),
        "bam_kv": BAMSharedKVAttention(cfg, 2),
    }


@pytest.mark.parametrize("name", list(_all_attention_types()))
def test_cached_step_by_step_decode_equals_full_forward(name):
    layer = _all_attention_types()[name].eval()
    for p in layer.parameters():  # non-zero routers so routing differs per token
        if p.dim() == 2 and p.shape[0] <= 4:
            torch.nn.init.normal_(p)
    x = torch.randn(2, 10, 24)
    full = layer(x, make_ctx(10, D)).y
    cache = KVCache()
    steps = [layer(x[:, :4], make_ctx(4, D, 0, cache)).y]  # a prefill chunk, then one token at a time
    for t in range(4, 10):
        steps.append(layer(x[:, t : t + 1], make_ctx(1, D, t, cache)).y)
    assert_fp_close(torch.cat(steps, 1), full, TERMS)


def test_moh_takes_a_router_config_and_old_configs_still_load():
    import dataclasses

    from mixattn.layers.moh import MoHAttention, MoHConfig
    from mixattn.layers.routers import RouterConfig
    from mixattn.models import PRESETS, MixtureConfig, MixtureLM

    base = PRESETS["tiny-moh"]
    Hr = base.num_heads - base.moh.shared_heads
    default = MoHAttention.default_router(base.moh, Hr)
    noisy = dataclasses.replace(default, noise_std=0.5, bias_rate=0.01)
    cfg = base.evolve(moh=dataclasses.replace(base.moh, router=noisy))
    model = MixtureLM(cfg)
    assert model.layers[0].attn.router.cfg == noisy  # the given router, not the derived one
    again = MixtureConfig.from_dict(cfg.to_dict())  # the nested RouterConfig round-trips through JSON
    assert again == cfg and isinstance(again.moh.router, RouterConfig)
    old = base.to_dict()
    old["layers"]["moh"].pop("router")  # a config.json written before MoH had a router field
    assert MixtureConfig.from_dict(old) == base and MixtureLM(base).layers[0].attn.router.cfg == default
    with pytest.raises(ValueError, match="must equal MoH top_k"):
        MoHConfig(top_k=1, router=dataclasses.replace(default, top_k=2))
    with pytest.raises(ValueError, match="must equal the routed heads"):
        wide = dataclasses.replace(default, num_experts=Hr + 1)
        MixtureLM(base.evolve(moh=dataclasses.replace(base.moh, router=wide)))
