"""aux_loss as the sum the docstring states, with the balance terms written out here: switch
(E sum_i f_i P_i), sequence-wise, global with counts buffered over micro-batches, none; default
coefficients; and RouterConfig errors naming the field."""

import pytest
import torch

from mixattn.layers.losses import BalanceBuffer, aux_loss
from mixattn.layers.routers import Router, RouterConfig

E, K, d = 4, 2, 8


def _routed(seed, S=2, T=5):
    torch.manual_seed(seed)
    r = Router(d, RouterConfig(num_experts=E, top_k=K)).double()
    x = torch.randn(S, T, d, dtype=torch.float64)
    return r(x)


def _P(r):
    return r.probs.detach().mean(0)  # softmax rows already sum to 1


def _z(r):
    return torch.logsumexp(r.logits.detach(), -1).square().mean()


def _switch(r):
    f = r.mask.double().sum(0) / (r.mask.shape[0] * K)
    return E * (f * _P(r)).sum()


def _sequence(r, T=5):
    m, p = r.mask.double().view(-1, T, E), r.probs.detach().view(-1, T, E)
    return torch.stack([E * ((m[s].sum(0) / (T * K)) * p[s].mean(0)).sum() for s in range(m.shape[0])]).mean()


def test_default_is_switch_balance_plus_z_loss_summed_over_routers():
    rs = [("a", _routed(0)), ("b", _routed(1))]
    want = sum(0.01 * _switch(r) + 0.001 * _z(r) for _, r in rs)
    torch.testing.assert_close(aux_loss(rs).detach(), want)


@pytest.mark.parametrize("balance", ["switch", "sequence", "global", "none"])
def test_each_balance_kind(balance):
    rs = [("a", _routed(2)), ("b", _routed(3))]
    term = {"switch": _switch, "sequence": _sequence, "global": _switch, "none": lambda r: 0.0}[balance]
    want = sum(0.3 * term(r) + 0.02 * _z(r) for _, r in rs)  # global without a buffer: this batch's counts
    got = aux_loss(rs, balance, balance_coef=0.3, z_coef=0.02).detach()
    torch.testing.assert_close(got, torch.as_tensor(want).to(got.dtype))  # the z-loss is fp32 (logits.float())
    got = aux_loss(rs, balance, balance_coef=0.3, z_coef=0.0).detach()
    torch.testing.assert_close(got, torch.as_tensor(sum(0.3 * term(r) for _, r in rs)).to(got.dtype))


def test_global_balance_uses_the_counts_buffered_over_micro_batches():
    first, second = _routed(4), _routed(5)
    buf = BalanceBuffer()
    aux_loss([("a", first)], "global", balance_coef=1.0, z_coef=0.0, buffer=buf)
    got = aux_loss([("a", second)], "global", balance_coef=1.0, z_coef=0.0, buffer=buf)
    counts = first.mask.double().sum(0) + second.mask.double().sum(0)
    torch.testing.assert_close(got.detach(), E * ((counts / counts.sum()) * _P(second)).sum())
    assert not torch.allclose(got.detach(), _switch(second))  # the buffer matters here


def test_unknown_balance_and_no_routers():
    with pytest.raises(ValueError, match="balance='bogus'"):
        aux_loss([("a", _routed(0))], "bogus")
    assert aux_loss([]).item() == 0.0


@pytest.mark.parametrize("field, value", [("scoring", "relu"), ("select_on", "x"), ("gate_norm", "l2"), ("gate", "y"),
                                          ("graph", "knn")])  # fmt: skip
def test_router_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"router {field}={value!r} is not one of"):
        RouterConfig(num_experts=4, top_k=2, **{field: value})
