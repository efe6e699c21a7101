import pytest
import torch

from mixattn.layers import Router, RouterConfig
from mixattn.layers.routers import query_norm_logits


def _router(**kw):
    cfg = RouterConfig(**{"num_experts": 6, "top_k": 2, **kw})
    return Router(16, cfg)


@pytest.mark.parametrize("top_k", [0, 7])
def test_bad_top_k_is_a_clear_error(top_k):
    with pytest.raises(ValueError, match="top_k"):
        RouterConfig(num_experts=6, top_k=top_k)


@pytest.mark.parametrize("field,value", [("scoring", "relu"), ("gate_norm", "l2"), ("graph", "knn")])
def test_unknown_option_lists_valid_ones(field, value):
    with pytest.raises(ValueError, match=field):
        RouterConfig(num_experts=4, top_k=1, **{field: value})


def test_gate_normalisations():
    x = torch.randn(2, 5, 16)
    base = _router()
    for norm in ("none", "renorm", "softmax_topk", "scale_k"):
        r = _router(gate_norm=norm)
        r.load_state_dict(base.state_dict())
        out = r(x)
        picked = out.probs.gather(1, out.indices)
        if norm == "none":
            torch.testing.assert_close(out.weights, picked)
        elif norm == "renorm":
            torch.testing.assert_close(out.weights.sum(-1), torch.ones(10))
        elif norm == "softmax_topk":  # JetMoE: softmax over the k logits == renormalised probs
            torch.testing.assert_close(out.weights, picked / picked.sum(-1, keepdim=True))
        else:
            torch.testing.assert_close(out.weights.sum(-1), torch.full((10,), 2.0))


def test_topk_on_probs_equals_on_logits_for_softmax_and_mask_matches_indices():
    x = torch.randn(3, 7, 16)
    a, b = _router(select_on="logits"), _router(select_on="probs")
    b.load_state_dict(a.state_dict())
    ra, rb = a(x), b(x)
    assert torch.equal(ra.indices, rb.indices)
    assert torch.equal(ra.mask.sum(-1), torch.full((21,), 2))
    assert torch.equal(ra.mask.gather(1, ra.indices), torch.ones_like(ra.indices, dtype=torch.bool))


def test_soft_routing_k_equals_e_uses_every_expert():
    r = _router(top_k=6)(torch.randn(1, 4, 16))
    assert r.mask.all()
    torch.testing.assert_close(r.weights.sum(-1), torch.ones(4))


def test_binary_ste_forward_is_one_backward_is_the_gate_gradient():
    soft, hard = _router(), _router(gate="binary_ste")
    hard.load_state_dict(soft.state_dict())
    x = torch.randn(1, 4, 16)
    rs, rh = soft(x), hard(x)
    assert torch.equal(rh.weights, torch.ones_like(rh.weights))
    gs = torch.autograd.grad(rs.weights.sum(), soft.proj.weight)[0]
    gh = torch.autograd.grad(rh.weights.sum(), hard.proj.weight)[0]
    torch.testing.assert_close(gs, gh)


def test_noise_only_in_training():
    r = _router(noise_std=1.0).eval()
    x = torch.randn(1, 8, 16)
    assert torch.equal(r(x).logits, r(x).logits)
    r.train()
    assert not torch.equal(r(x).logits, r(x).logits)


def test_selection_bias_steers_selection_not_gates_and_update_rule():
    r = _router(bias_rate=0.5, scoring="sigmoid")
    x = torch.randn(1, 8, 16)
    plain = r(x)
    r.selection_bias[:] = torch.tensor([0, 0, 0, 0, 10.0, 10.0])
    biased = r(x)
    assert (biased.indices.sort(-1).values == torch.tensor([4, 5])).all()
    torch.testing.assert_close(biased.weights, plain.probs.gather(1, biased.indices))
    r.selection_bias.zero_()
    r.update_bias(torch.tensor([10.0, 0, 0, 0, 0, 2.0]))
    assert r.selection_bias[0] == -0.5 and r.selection_bias[1] == 0.5 and r.selection_bias[5] == 0.0  # load == mean


def test_query_norm_router_is_parameter_free():
    r = _router(scoring="query_norm", select_on="probs")
    assert sum(p.numel() for p in r.parameters()) == 0
    q = torch.randn(5, 6, 8)
    out = r(torch.randn(1, 5, 16), logits_NE=query_norm_logits(q))
    assert torch.equal(out.indices[:, 0], q.norm(dim=-1).argmax(-1))
    with pytest.raises(ValueError, match="query_norm"):
        r(torch.randn(1, 5, 16))


def _identity_graph(T, d, scale=1e3):
    """Token states that are orthogonal with a large norm: the causal softmax graph is the identity."""
    return torch.eye(T, d) * scale


def test_similarity_graph_router_with_identity_graph_equals_plain_router():
    T, d = 6, 16
    plain, graph = _router(select_on="probs"), _router(graph="similarity", graph_temperature=0.1)
    graph.load_state_dict(plain.state_dict())
    x = _identity_graph(T, d, scale=30.0).unsqueeze(0)
    rp, rg = plain(x), graph(x)
    torch.testing.assert_close(rg.probs, rp.probs)
    assert torch.equal(rg.indices, rp.indices)


def test_attention_graph_router_with_identity_attention_equals_plain_router():
    T, d = 6, 16
    plain, graph = _router(select_on="probs"), _router(graph="attention")
    graph.load_state_dict(plain.state_dict())
    x = torch.randn(1, T, d)
    qk = _identity_graph(T, 8).view(1, 1, T, 8)
    rp, rg = plain(x), graph(x, graph_qk=(qk.expand(1, 2, T, 8), qk))
    torch.testing.assert_close(rg.probs, rp.probs)
    assert torch.equal(rg.indices, rp.indices)


def test_graph_smoothing_is_causal():
    g = _router(graph="similarity")
    x = torch.randn(1, 8, 16)
    x2 = x.clone()
    x2[0, 5:] = torch.randn(3, 16)
    torch.testing.assert_close(g(x).probs[:5], g(x2).probs[:5])
