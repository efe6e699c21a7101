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


# ------------------------------------------------------------------ gate values from formulas written here


def _expected_gates(logits, indices, scoring, gate_norm, k):
    """Gate values in float64 from the router's fp32 logits, one formula per option:
    softmax p_e = exp(l_e) / sum_j exp(l_j), sigmoid p_e = 1 / (1 + exp(-l_e)); then for the
    selected experts S: none p_e, renorm p_e / sum_S p, softmax_topk exp(l_e) / sum_S exp(l),
    scale_k k p_e / sum_S p."""
    l = logits.double()
    if scoring == "softmax":
        p = torch.exp(l - l.max(-1, keepdim=True).values)
        p = p / p.sum(-1, keepdim=True)
    else:
        p = 1 / (1 + torch.exp(-l))
    picked = p.gather(1, indices)
    if gate_norm == "none":
        return p, picked
    if gate_norm == "renorm":
        return p, picked / picked.sum(-1, keepdim=True)
    if gate_norm == "scale_k":
        return p, k * picked / picked.sum(-1, keepdim=True)
    e = torch.exp(l.gather(1, indices) - l.gather(1, indices).max(-1, keepdim=True).values)
    return p, e / e.sum(-1, keepdim=True)


def _fp32_bound(E, k):
    """A softmax or sigmoid over E fp32 logits, then a sum over k and a division: relative
    rounding of at most (E + k + 4) eps on values up to k."""
    return torch.finfo(torch.float32).eps * (E + k + 4) * k


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("gate_norm", ["none", "renorm", "softmax_topk", "scale_k"])
@pytest.mark.parametrize("top_k", [1, 3])
def test_gate_values_match_the_formulas(scoring, gate_norm, top_k):
    E, d = 6, 16
    r = _router(scoring=scoring, gate_norm=gate_norm, top_k=top_k)
    with torch.no_grad():
        r.proj.weight.copy_(torch.randn(E, d))  # logits of order 1-10: gates far from uniform
    x = torch.randn(2, 9, d)
    out = r(x)
    want_logits = x.reshape(18, d).double() @ r.proj.weight.double().T
    bound = torch.finfo(torch.float32).eps * d * float(x.abs().max() * r.proj.weight.abs().max())  # length-d dots
    torch.testing.assert_close(out.logits.double(), want_logits, atol=bound, rtol=0)
    top = torch.argsort(out.logits.double(), dim=-1, descending=True)[:, :top_k]  # the k largest logits
    assert torch.equal(out.indices.sort(-1).values, top.sort(-1).values)
    want_mask = torch.tensor([[e in set(row) for e in range(E)] for row in top.tolist()])
    assert torch.equal(out.mask, want_mask)  # the selected experts, not only k of them
    probs, gates = _expected_gates(out.logits, out.indices, scoring, gate_norm, top_k)
    torch.testing.assert_close(out.probs.double(), probs, atol=_fp32_bound(E, 1), rtol=0)
    torch.testing.assert_close(out.weights.double(), gates, atol=_fp32_bound(E, top_k), rtol=0)
    if top_k > 1 and gate_norm != "none":  # the test can tell the formulas from uniform gates
        uniform = torch.full_like(gates, 1.0 / top_k) * (top_k if gate_norm == "scale_k" else 1)
        assert (gates - uniform).abs().max() > 100 * _fp32_bound(E, top_k)


def test_selection_bias_gates_are_the_unbiased_probs():
    """DeepSeek-V3: selection on sigmoid(l) + b, gate sigmoid(l) of the selected (renormalised)."""
    r = _router(scoring="sigmoid", gate_norm="renorm", top_k=2, bias_rate=0.1)
    x = torch.randn(1, 12, 16)
    r.selection_bias.copy_(torch.tensor([0.0, 0.3, -0.2, 0.0, 0.5, -0.4]))
    out = r(x)
    p = 1 / (1 + torch.exp(-out.logits.double()))
    top = torch.argsort(p + r.selection_bias.double(), dim=-1, descending=True)[:, :2]
    assert torch.equal(out.indices.sort(-1).values, top.sort(-1).values)
    picked = p.gather(1, out.indices)
    torch.testing.assert_close(out.weights.double(), picked / picked.sum(-1, keepdim=True),
                               atol=_fp32_bound(6, 2), rtol=0)  # fmt: skip


def test_query_norm_logits_formula():
    """MoH-LLaMA3's parameter-free score: |q_h|_2 divided by the unbiased std over the heads."""
    q = torch.randn(5, 6, 8).double()
    norms = [[sum(float(x) ** 2 for x in q[t, h]) ** 0.5 for h in range(6)] for t in range(5)]
    want = []
    for row in norms:
        mean = sum(row) / 6
        std = (sum((n - mean) ** 2 for n in row) / 5) ** 0.5
        want.append([n / std for n in row])
    got = query_norm_logits(q.float())
    bound = torch.finfo(torch.float32).eps * (8 + 6 + 4) * float(got.abs().max())  # sums of 8 and 6 terms
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), atol=bound, rtol=0)
