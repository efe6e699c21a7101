"""``PackedLinear`` (oneDNN-prepacked weights) against ``F.linear``, its reference: outputs within the
dtype's rounding, the fallback wherever the packed copy would not compute the same function
(gradients, a changed or recast weight), and ``pack`` on a whole model (parameters, state-dict keys,
tied weights, logits)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixattn.layers.attention import QKV
from mixattn.layers.packed import PackedLinear, _ops_available, fused_linear, pack, unpack
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_groups_equal_their_linears_within_rounding(dtype):
    """q/k/v (and gate/up) share one packed weight: each part of the fused output is within the
    rounding bound of its own ``F.linear``, and sits where that linear's output belongs."""
    torch.manual_seed(4)
    model = MixtureLM(PRESETS["tiny"]).to(dtype).eval()
    pack(model)
    x = torch.randn(2, 3, model.cfg.hidden_dim).to(dtype)
    checked = 0
    for m in model.modules():
        for names in getattr(type(m), "PACK_GROUPS", ()):
            with torch.no_grad():
                got = fused_linear(m, names, x)
            assert got is not None and len(got) == len(names)
            for out, name in zip(got, names):
                lin = getattr(m, name)
                want = F.linear(x, lin.weight, lin.bias)
                assert out.shape == want.shape and lin._packed is None  # the group's copy replaces its own
                assert ((out.double() - want.double()).abs() <= _bound(x, lin.weight, dtype)).all()
            checked += 1
    assert checked == 2 * model.cfg.num_layers  # every layer's attention and FFN


def test_fused_groups_step_aside_for_gradients_and_changed_weights():
    torch.manual_seed(5)
    model = MixtureLM(PRESETS["tiny"]).eval()
    pack(model)
    attn, x = model.layers[0].attn, torch.randn(1, 2, model.cfg.hidden_dim)
    names = type(attn).PACK_GROUPS[0]
    assert fused_linear(attn, names, x) is None  # the weights require grad: autograd needs F.linear
    with torch.no_grad():
        assert fused_linear(attn, names, x) is not None
        assert fused_linear(attn, names, x.bfloat16()) is None  # another dtype than the weights'
        attn.k_proj.weight.add_(1.0)  # an optimizer step on one member: the fused copy is stale
        assert fused_linear(attn, names, x) is None
        k, _ = attn.project_kv(x, _ctx(x))
    assert torch.equal(k, _rope_k(attn, x))  # the changed weight is the one used
    unpack(model)
    assert not any("_packed_groups" in m.__dict__ for m in model.modules())


def test_pack_groups_only_where_the_forward_uses_them():
    """MoH's attention projects q and k/v separately, so its linears keep their own packed copies;
    its FFN still fuses gate/up. The packed model's logits match the plain one's."""
    model, ids, want = _packed_with_plain_logits("tiny-moh", seed=6)
    attn = model.layers[0].attn
    assert "_packed_groups" not in attn.__dict__ and attn.q_proj._packed is not None
    assert "_packed_groups" in model.layers[0].ffn.__dict__  # the dense SwiGLU
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def _ctx(x):
    from mixattn.layers import AttnContext, RotaryEmbedding

    cos, sin = RotaryEmbedding(16)(torch.arange(x.shape[1]))
    return AttnContext(cos, sin)


def _rope_k(attn, x):
    from mixattn.layers.attention import apply_rotary

    B, T, _ = x.shape
    k = F.linear(x, attn.k_proj.weight).view(B, T, attn.cfg.num_kv_heads, -1).transpose(1, 2)
    ctx = _ctx(x)
    return apply_rotary(k, ctx.cos, ctx.sin)


def test_a_packed_model_deep_copies_and_the_copy_computes_f_linear_until_packed():
    """oneDNN's packed tensors cannot be copied; ``copy.deepcopy`` of a packed model (BAM upcycling
    copies a model) must still work, the copy computing the plain products, the original still packed."""
    import copy

    model, ids, plain = _packed_with_plain_logits("tiny", seed=7)
    twin = copy.deepcopy(model)
    x = torch.randn(1, 2, model.cfg.hidden_dim)
    with torch.no_grad():
        assert fused_linear(model.layers[0].attn, ("q_proj", "k_proj", "v_proj"), x) is not None
        assert fused_linear(twin.layers[0].attn, ("q_proj", "k_proj", "v_proj"), x) is None
        assert model.lm_head._fast(x) and not twin.lm_head._fast(x)
        assert torch.equal(twin(ids).logits, plain)  # every product is F.linear again
        assert pack(twin) > 0 and fused_linear(twin.layers[0].attn, ("q_proj", "k_proj", "v_proj"), x) is not None


def test_fused_groups_never_skip_hooks_or_a_replaced_linear():
    """A forward hook on a member (the profiler captures v_proj's output) must still fire, and a
    member swapped for another module after packing (a wrapper, a LoRA) must run its own forward;
    a subclass of nn.Linear is never fused."""
    from mixattn.compress.profile import induction_scores

    torch.manual_seed(8)
    model = MixtureLM(PRESETS["tiny"]).eval()
    want = induction_scores(model, n=16)
    pack(model)
    torch.testing.assert_close(induction_scores(model, n=16), want, rtol=1e-4, atol=1e-5)  # raised KeyError 'v'
    attn, x = model.layers[0].attn, torch.randn(1, 2, model.cfg.hidden_dim)
    calls = []
    handle = attn.q_proj.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        assert fused_linear(attn, QKV, x) is None
        attn(x, _ctx(x))
    handle.remove()
    assert calls == [1]

    class Shifted(nn.Linear):
        def forward(self, x):
            return super().forward(x) + 100

    old = attn.q_proj
    attn.q_proj = Shifted(old.in_features, old.out_features, bias=False)
    attn.q_proj.weight = old.weight  # same weight and stamps: only the module differs
    with torch.no_grad():
        assert fused_linear(attn, QKV, x) is None  # replaced since packing
        pack(model)
        assert fused_linear(attn, QKV, x) is None and "_packed_groups" not in attn.__dict__  # never fused


def _packed_with_plain_logits(preset: str, seed: int):
    """A packed model of ``preset``, a batch of ids, and the logits the model gave before packing."""
    torch.manual_seed(seed)
    model = MixtureLM(PRESETS[preset]).eval()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 24))
    with torch.no_grad():
        want = model(ids).logits
    pack(model)
    return model, ids, want
