"""Router paths checked against formulas written here (float64, so any bug is far above rounding):
the token-graph smoothing (similarity and attention graphs) with left padding and cached decoding,
router noise, the selection-bias update, low-precision inputs, and the balance statistics."""

import math

import pytest
import torch

from mixattn.layers.attention import AttnContext
from mixattn.layers.cache import KVCache
from mixattn.layers.losses import max_vio, routing_fluctuation, sequence_balance_loss, switch_loss
from mixattn.layers.routers import Router, RouterConfig

E, K, d = 5, 2, 8


def _ctx(**kw) -> AttnContext:
    """A layer context for the router, which reads its cache, offset, padding and kernels only."""
    return AttnContext(cos=None, sin=None, **kw)


def _router(dtype=torch.float64, **kw):
    torch.manual_seed(0)
    r = Router(d, RouterConfig(num_experts=E, top_k=K, **kw)).to(dtype)
    with torch.no_grad():
        r.proj.weight.mul_(8)  # probabilities far from uniform
    return r


def _probs(r, x):
    return torch.softmax(x @ r.proj.weight.T, -1)  # (B, T, E)


def _similarity_smoothed(x, p, tau, pad=0):
    """sum_{pad <= s <= t} softmax_s(x_t . x_s / (sqrt(d) tau)) p_s, row by row."""
    B, T, _ = x.shape
    out = torch.zeros_like(p)
    for b in range(B):
        for t in range(T):
            s = torch.arange(pad if b == 0 else 0, t + 1) if t >= (pad if b == 0 else 0) else torch.arange(0)
            if len(s) == 0:
                continue
            w = torch.softmax(torch.stack([x[b, t] @ x[b, j] for j in s]) / (math.sqrt(d) * tau), 0)
            out[b, t] = sum(wi * p[b, j] for wi, j in zip(w, s))
    return out


def test_similarity_graph_probs_follow_the_formula_with_temperature():
    r = _router(graph="similarity", graph_temperature=0.5)
    x = torch.randn(2, 7, d, dtype=torch.float64)
    out = r(x)
    want = _similarity_smoothed(x, _probs(r, x), 0.5)
    torch.testing.assert_close(out.probs.view(2, 7, E), want.float())  # the graph path returns fp32


def test_similarity_graph_ignores_left_padding():
    r = _router(graph="similarity", graph_temperature=2.0)
    x = torch.randn(2, 6, d, dtype=torch.float64)
    out = r(x, ctx=_ctx(left_pad=torch.tensor([2, 0])))
    want = _similarity_smoothed(x, _probs(r, x), 2.0, pad=2)
    torch.testing.assert_close(out.probs.view(2, 6, E)[0, 2:], want[0, 2:].float())
    torch.testing.assert_close(out.probs.view(2, 6, E)[1], want[1].float())


@pytest.mark.parametrize("graph", ["similarity", "attention"])
def test_graph_router_decoding_with_a_cache_equals_the_full_pass(graph):
    r = _router(graph=graph)
    B, T, H, Hkv, D = 2, 6, 4, 2, 4
    x = torch.randn(B, T, d, dtype=torch.float64)
    q, k = torch.randn(B, H, T, D, dtype=torch.float64), torch.randn(B, Hkv, T, D, dtype=torch.float64)
    full = r(x, graph_qk=(q, k)).probs.view(B, T, E)
    cache, kc = KVCache(), None
    for t in range(T):
        kc = k[:, :, : t + 1]  # the attention's own cache holds keys 0..t
        step = r(x[:, t : t + 1], graph_qk=(q[:, :, t : t + 1], kc), ctx=_ctx(cache=cache, q_offset=t)).probs
        torch.testing.assert_close(step.view(B, E), full[:, t])


def test_attention_graph_probs_are_the_head_mean_attention_times_probs():
    r = _router(graph="attention")
    B, T, H, Hkv, D = 2, 5, 4, 2, 4
    x = torch.randn(B, T, d, dtype=torch.float64)
    q, k = torch.randn(B, H, T, D, dtype=torch.float64), torch.randn(B, Hkv, T, D, dtype=torch.float64)
    out = r(x, graph_qk=(q, k)).probs.view(B, T, E)
    p = _probs(r, x)
    want = torch.zeros_like(p)
    for b in range(B):
        for h in range(H):
            s = q[b, h] @ k[b, h // (H // Hkv)].T / math.sqrt(D)
            s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
            want[b] += torch.softmax(s, -1) @ p[b] / H
    torch.testing.assert_close(out, want.float())


def test_noise_is_added_in_training_only_and_scaled_by_its_std():
    r = _router(noise_std=0.3).train()
    x = torch.randn(1, 4, d, dtype=torch.float64)
    torch.manual_seed(11)
    noisy = r(x).logits
    torch.manual_seed(11)
    clean = x[0] @ r.proj.weight.T
    torch.testing.assert_close(noisy, clean + torch.randn_like(clean) * 0.3)
    torch.testing.assert_close(r.eval()(x).logits, clean)
    quiet = _router(noise_std=0.0).train()
    state = torch.get_rng_state()
    quiet(x)
    assert torch.equal(torch.get_rng_state(), state)  # no noise drawn when noise_std is 0


def test_selection_bias_accumulates_over_updates():
    r = _router(bias_rate=0.25)
    counts = torch.tensor([5.0, 1.0, 3.0, 3.0, 0.0])  # mean 2.4
    r.update_bias(counts)
    r.update_bias(counts)
    assert torch.equal(r.selection_bias, torch.tensor([-0.5, 0.5, -0.5, -0.5, 0.5], dtype=torch.float64))


def test_bfloat16_router_computes_in_float32():
    r = _router(dtype=torch.bfloat16)
    x = torch.randn(1, 4, d, dtype=torch.bfloat16)
    out = r(x)
    assert out.logits.dtype == torch.float32 and out.probs.dtype == torch.float32
    g = _router(dtype=torch.bfloat16, graph="similarity")
    assert g(x).probs.dtype == torch.float32  # the graph runs in the token dtype, returns fp32


def test_max_vio_and_fluctuation_values():
    assert max_vio(torch.tensor([1, 0, 0, 0])) == pytest.approx(3.0)  # mean 0.25 < 1
    assert routing_fluctuation(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 0])) == 0.25


def test_sequence_balance_with_sigmoid_scores_normalises_each_row():
    r = _router(scoring="sigmoid")
    with torch.no_grad():
        r.proj.weight.abs_().mul_(-1)  # negative logits for positive x: rows of sigmoid scores sum below 1
    S, T = 3, 4
    x = torch.rand(S, T, d, dtype=torch.float64)
    out = r(x)
    p = torch.sigmoid(x @ r.proj.weight.T).detach()
    assert float(p.sum(-1).max()) < 1
    p = p / p.sum(-1, keepdim=True)
    mask = out.mask.view(S, T, E).double()
    want = sum(E * ((mask[s].sum(0) / (T * K)) * p[s].mean(0)).sum() for s in range(S)) / S
    torch.testing.assert_close(sequence_balance_loss(out), want)
    f = mask.sum((0, 1)) / (S * T * K)
    torch.testing.assert_close(switch_loss(out), E * (f * p.reshape(-1, E).mean(0)).sum())
