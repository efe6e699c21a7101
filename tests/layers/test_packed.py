"""``PackedLinear`` (oneDNN-prepacked weights) against ``F.linear``, its reference: outputs within the
dtype's rounding, the fallback wherever the packed copy would not compute the same function
(gradients, a changed or recast weight), and ``pack`` on a whole model (parameters, state-dict keys,
tied weights, logits)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixattn.layers.packed import PackedLinear, _ops_available, pack, unpack
from mixattn.models import PRESETS, MixtureLM

pytestmark = pytest.mark.skipif(not _ops_available(), reason="this torch build has no oneDNN linear ops")
EPS = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}  # unit roundoff


def _bound(x, w, dtype):
    """|packed - F.linear| <= both products' error: fp32 accumulation over K terms (gamma_K sum |x w|)
    plus, in bf16, each result's final rounding to the output dtype (u |y| each)."""
    K = x.shape[-1]
    mag = x.abs().double() @ w.abs().double().T
    acc = 2 * K * 2.0**-24 * mag
    out = 2 * EPS[dtype] * mag if dtype == torch.bfloat16 else 0
    return acc + out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 96), (7, 96), (2, 5, 96), (3, 1, 96)])
def test_packed_matches_f_linear_within_rounding(dtype, shape):
    torch.manual_seed(0)
    lin = nn.Linear(96, 80, bias=False).to(dtype)
    x = torch.randn(*shape).to(dtype)
    want = F.linear(x, lin.weight)
    pack(lin)
    assert isinstance(lin, PackedLinear) and not lin._fast(x)  # the weight requires grad: F.linear
    with torch.no_grad():
        assert lin._fast(x)
        got = lin(x)
    assert got.shape == want.shape and got.dtype == dtype
    err = (got.double() - want.double()).abs()
    assert (err <= _bound(x, lin.weight, dtype)).all(), err.max()


def test_bias_is_added():
    torch.manual_seed(1)
    lin = nn.Linear(64, 32)
    x = torch.randn(4, 64)
    want = F.linear(x, lin.weight, lin.bias)
    pack(lin)
    with torch.no_grad():
        got = lin(x)
    assert (got - want).abs().max() <= _bound(x, lin.weight, torch.float32).max() + 1e-6


def test_gradients_and_changed_weights_take_f_linear():
    torch.manual_seed(2)
    lin = nn.Linear(48, 40, bias=False)
    pack(lin)
    x = torch.randn(3, 48, requires_grad=True)
    assert not lin._fast(x)  # autograd: the packed op has no backward
    lin(x).sum().backward()
    gx, gw = x.grad.clone(), lin.weight.grad.clone()
    x.grad, lin.weight.grad = None, None
    F.linear(x, lin.weight).sum().backward()
    assert torch.equal(gx, x.grad) and torch.equal(gw, lin.weight.grad)
    with torch.no_grad():
        lin.weight.mul_(2)  # an in-place update (an optimizer step): the packed copy is stale
        y = torch.randn(2, 48)
        assert not lin._fast(y) and torch.equal(lin(y), F.linear(y, lin.weight))
        assert lin.refresh() and lin._fast(y)
    lin.to(torch.bfloat16)  # recast after packing: the copy no longer matches
    with torch.no_grad():
        y = torch.randn(2, 48).bfloat16()
        assert not lin._fast(y) and torch.equal(lin(y), F.linear(y, lin.weight))


def test_pack_a_model_keeps_parameters_keys_ties_and_logits():
    torch.manual_seed(3)
    model = MixtureLM(PRESETS["tiny"]).eval()
    keys = list(model.state_dict())
    params = {n: p for n, p in model.named_parameters()}
    ids = torch.randint(0, model.cfg.vocab_size, (2, 40))
    with torch.no_grad():
        want = model(ids).logits
    n = pack(model)
    assert n == sum(isinstance(m, nn.Linear) for m in model.modules()) > 0
    assert list(model.state_dict()) == keys and all(p is params[k] for k, p in model.named_parameters())
    if model.cfg.tie_embeddings:
        assert model.lm_head.weight is model.embed.weight
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    unpack(model)
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)
