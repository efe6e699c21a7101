"""RCMHA and its ablations (MDHA, RMHA): slow references for the causal depth-wise convolution and
the relative-position scores (outputs and gradients), degenerate cases equal to ``Attention``,
causality, left padding, and cached decoding (with the convolution's state) equal to the full forward."""

import math

import pytest
import torch

from mixattn import kernels
from mixattn.compress.apply import apply_plan
from mixattn.compress.plan import Plan
from mixattn.layers import Attention, AttentionConfig, ConvKVCache, KVCache, RCMHAConfig, RCMHAttention
from mixattn.layers.attention import apply_rotary
from mixattn.layers.dispatch import attend
from mixattn.layers.rcmha import causal_depthwise_conv
from mixattn.layers.sparse import SparseSpec
from mixattn.models.config import PRESETS, from_name
from mixattn.models.decoder import MixtureLM
from tests.conftest import assert_fp_close, grads, make_ctx

D = 8
TERMS = 64  # longest reduction: hidden 24, heads x head_dim 48, sequence <= 13


def _attn_cfg(H=6, Hkv=2, d=24):
    return AttentionConfig(hidden_dim=d, num_heads=H, num_kv_heads=Hkv, head_dim=D)


def _randomize(module: torch.nn.Module) -> None:
    """Move the identity-initialised conv and zero biases away from their start, so tests see them."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, RCMHAttention):
                if m.conv_weight is not None:
                    m.conv_weight.normal_(0, 0.6)
                if m.pos_bias_u is not None:
                    m.pos_bias_u.normal_()
                    m.pos_bias_v.normal_()


# ---------------------------------------------------------------- slow references


def slow_conv(x_BTC, w_CK):
    """y[b, t, c] = sum_k w[c, k] x[b, t - K + 1 + k, c], zero before the start."""
    B, T, C = x_BTC.shape
    K = w_CK.shape[1]
    rows = []
    for t in range(T):
        acc = torch.zeros(B, C, dtype=x_BTC.dtype)
        for k in range(K):
            s = t - K + 1 + k
            if s >= 0:
                acc = acc + w_CK[:, k] * x_BTC[:, s]
        rows.append(acc)
    return torch.stack(rows, dim=1)


def slow_relative(qc, qp, k, v, r, q_offset=0, pad=None):
    """Per (batch, head, query) loop: softmax_j((qc_i k_j + qp_i r_{i-j}) / sqrt(D)) over visible j."""
    B, H, Tq, Dh = qc.shape
    G = H // k.shape[1]
    out = torch.zeros(B, H, Tq, v.shape[-1], dtype=qc.dtype)
    for b in range(B):
        start = 0 if pad is None else int(pad[b])
        for h in range(H):
            for t in range(Tq):
                i = q_offset + t
                js = list(range(start, i + 1)) if i >= start else [i]
                s = torch.stack([qc[b, h, t] @ k[b, h // G, j] + qp[b, h, t] @ r[h, i - j] for j in js])
                p = torch.softmax(s / math.sqrt(Dh), 0)
                out[b, h, t] = (p[:, None] * v[b, h // G, js]).sum(0)
    return out


# ---------------------------------------------------------------- kernels vs references


@pytest.mark.parametrize("K,T", [(3, 7), (1, 4), (4, 1), (5, 3)])
def test_causal_conv_matches_loop_outputs_and_grads(K, T):
    x = torch.randn(2, T, 5, requires_grad=True)
    w = torch.randn(5, K, requires_grad=True)
    a, b = causal_depthwise_conv(x, w), slow_conv(x, w)
    assert_fp_close(a, b, terms=K)
    for ga, gb in zip(grads(a, [x, w]), grads(b, [x, w])):
        assert_fp_close(ga, gb, terms=K * T * 2)


@pytest.mark.parametrize("impl", ["sdpa", "reference"])
@pytest.mark.parametrize("H,Hkv,Tq,Tk", [(4, 2, 5, 5), (2, 2, 1, 1), (3, 1, 1, 6), (2, 1, 3, 7)])
def test_relative_attention_matches_loop_outputs_and_grads(impl, H, Hkv, Tq, Tk):
    qc, qp = torch.randn(2, H, Tq, D), torch.randn(2, H, Tq, D)
    k, v = torch.randn(2, Hkv, Tk, D), torch.randn(2, Hkv, Tk, D)
    r = torch.randn(H, Tk, D)
    leaves = [t.requires_grad_() for t in (qc, qp, k, v, r)]
    offset = Tk - Tq  # queries are the last Tq positions (decode/chunked prefill)
    a = kernels.get("relative_attention", impl)(qc, qp, k, v, r, offset)
    b = slow_relative(qc, qp, k, v, r, offset)
    assert_fp_close(a, b, terms=2 * D * Tk)
    for ga, gb in zip(grads(a, leaves), grads(b, leaves)):
        assert_fp_close(ga, gb, terms=2 * D * Tk, chain=8)


def test_relative_attention_left_pad_matches_loop():
    qc, qp, k, v = (torch.randn(3, 2, 6, D) for _ in range(4))
    r = torch.randn(2, 6, D)
    pad = torch.tensor([0, 2, 5])
    a = kernels.get("relative_attention", "sdpa")(qc, qp, k, v, r, 0, pad)
    assert_fp_close(a, slow_relative(qc, qp, k, v, r, 0, pad), terms=2 * D * 6)


def test_position_term_moves_the_output():
    """The kernel must use r: with the table zeroed the output changes (guards a dropped term)."""
    qc, qp, k, v = (torch.randn(1, 2, 5, D) for _ in range(4))
    r = torch.randn(2, 5, D)
    f = kernels.get("relative_attention", "sdpa")
    assert (f(qc, qp, k, v, r) - f(qc, qp, k, v, torch.zeros_like(r))).abs().max() > 1e-3


# ---------------------------------------------------------------- the layer


def test_no_conv_rope_equals_attention_and_untrained_mdha_too():
    cfg = _attn_cfg()
    dense = Attention(cfg)
    x = torch.randn(2, 7, 24, requires_grad=True)
    ctx = make_ctx(7, D)
    want = dense(x, ctx).y
    want_grad = grads(want, x)[0]
    for rc in (RCMHAConfig(conv_kernel=0, position="rope"), RCMHAConfig(position="rope")):
        layer = RCMHAttention(cfg, rc)
        layer.load_state_dict(dense.state_dict(), strict=False)  # conv starts at the identity
        got = layer(x, ctx).y
        assert_fp_close(got, want, terms=TERMS)
        assert_fp_close(grads(got, x)[0], want_grad, terms=TERMS, chain=8)


@pytest.mark.parametrize("rc", [RCMHAConfig(), RCMHAConfig(position="rope"), RCMHAConfig(conv_kernel=0)])
def test_layer_matches_slow_composition(rc):
    """Projection -> loop conv -> (RoPE | loop relative attention) -> output projection."""
    layer = RCMHAttention(_attn_cfg(), rc)
    _randomize(layer)
    x = torch.randn(2, 6, 24, requires_grad=True)
    ctx = make_ctx(6, D)
    got = layer(x, ctx).y
    assert got.shape == (2, 6, 24)

    qkv = torch.cat([layer.q_proj(x), layer.k_proj(x), layer.v_proj(x)], -1)
    if layer.conv_weight is not None:
        qkv = slow_conv(qkv, layer.conv_weight)
    q, k, v = qkv.split([48, 16, 16], -1)
    q = q.reshape(2, 6, 6, D).transpose(1, 2)
    k = k.reshape(2, 6, 2, D).transpose(1, 2)
    v = v.reshape(2, 6, 2, D).transpose(1, 2)
    if rc.position == "rope":
        q, k = apply_rotary(q, ctx.cos, ctx.sin), apply_rotary(k, ctx.cos, ctx.sin)
        o = attend(q, k, v, ctx, None)
    else:
        r = layer.distance_table(6, x.device)
        o = slow_relative(q + layer.pos_bias_u[:, None], q + layer.pos_bias_v[:, None], k, v, r)
    want = layer.o_proj(o.transpose(1, 2).reshape(2, 6, 48))
    assert_fp_close(got, want, terms=TERMS)
    params = [x] + [p for p in layer.parameters()]
    for ga, gb in zip(grads(got, params), grads(want, params)):
        assert_fp_close(ga, gb, terms=TERMS, chain=8)


@pytest.mark.parametrize("rc", [RCMHAConfig(), RCMHAConfig(position="rope", conv_kernel=4)])
def test_causal_future_tokens_do_not_change_the_past(rc):
    layer = RCMHAttention(_attn_cfg(), rc)
    _randomize(layer)
    x = torch.randn(1, 9, 24)
    y = x.clone()
    y[:, 5:] = torch.randn(1, 4, 24)
    a, b = layer(x, make_ctx(9, D)).y, layer(y, make_ctx(9, D)).y
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert (a[:, 5:] - b[:, 5:]).abs().max() > 1e-3


def test_left_padded_row_equals_unpadded_row():
    layer = RCMHAttention(_attn_cfg(), RCMHAConfig(conv_kernel=3))
    _randomize(layer)
    x = torch.randn(1, 5, 24)
    padded = torch.cat([torch.randn(1, 3, 24), x], dim=1)  # 3 padding tokens of junk
    ctx = make_ctx(8, D)
    ctx.left_pad = torch.tensor([3])
    got = layer(padded, ctx).y[:, 3:]
    assert_fp_close(got, layer(x, make_ctx(5, D)).y, terms=TERMS)


def test_bad_config_and_misuse_raise_clear_errors():
    with pytest.raises(ValueError, match="conv_kernel"):
        RCMHAConfig(conv_kernel=-1)
    with pytest.raises(ValueError, match="position"):
        RCMHAConfig(position="alibi")
    with pytest.raises(ValueError, match="implementation 'flash' for 'relative_attention'"):
        PRESETS["tiny-rcmha"].evolve(kernels={"relative_attention": "flash"})  # kernels are a model setting
    layer = RCMHAttention(_attn_cfg(), RCMHAConfig())
    with pytest.raises(ValueError, match="ConvKVCache"):
        layer(torch.randn(1, 3, 24), make_ctx(3, D, cache=KVCache()))
    model = MixtureLM(from_name("tiny-rcmha"))
    with pytest.raises(ValueError, match="do not apply to RCMHA"):
        apply_plan(model, Plan.dense(2, 2))  # refused up front
    model.layers[0].attn.sparse = SparseSpec((0, 0), (0.0, 0.0), (1.0, 1.0), "auto")  # set by hand: the layer refuses too
    with pytest.raises(ValueError, match="RCMHA"):
        model(torch.zeros(1, 4, dtype=torch.long))


# ---------------------------------------------------------------- decoding


@pytest.mark.parametrize("name", ["tiny-rcmha", "tiny-mdha", "tiny-rmha"])
@pytest.mark.parametrize("chunks", [(5, 1, 1, 1, 1, 1, 1), (1,) * 7, (4, 3, 1, 2)])
def test_cached_decode_equals_full_forward(name, chunks):
    torch.manual_seed(0)
    model = MixtureLM(from_name(name)).eval()
    _randomize(model)
    T = sum(chunks)
    ids = torch.randint(0, 256, (2, T))
    full = model(ids).logits
    cache, outs, pos = model.new_cache(), [], 0
    for n in chunks:
        outs.append(model(ids[:, pos : pos + n], cache, start_pos=pos).logits)
        pos += n
    assert_fp_close(torch.cat(outs, 1), full, terms=TERMS, chain=12)


def test_conv_state_holds_the_last_raw_projections_across_steps():
    """Width 4 with one-token steps: each step reads three earlier steps' projections from the state."""
    cfg = _attn_cfg()
    layer = RCMHAttention(cfg, RCMHAConfig(conv_kernel=4))
    _randomize(layer)
    x = torch.randn(1, 6, 24)
    full = layer(x, make_ctx(6, D)).y
    cache, outs = layer.new_cache(), []
    for t in range(6):
        outs.append(layer(x[:, t : t + 1], make_ctx(1, D, offset=t, cache=cache)).y)
        raw = torch.cat([layer.q_proj(x), layer.k_proj(x), layer.v_proj(x)], -1)[:, max(0, t - 2) : t + 1]
        state = cache.conv_state["qkv"]
        assert state.shape == (1, 3, raw.shape[-1])
        torch.testing.assert_close(state[:, 3 - raw.shape[1] :], raw)
    assert isinstance(cache, ConvKVCache)
    assert_fp_close(torch.cat(outs, 1), full, terms=TERMS)


def test_generate_with_cache_equals_without():
    model = MixtureLM(from_name("tiny-rcmha"))
    _randomize(model)
    ids = torch.randint(0, 256, (2, 5))
    a = model.generate(ids, max_new_tokens=6)
    b = model.generate(ids, max_new_tokens=6, use_cache=False)
    torch.testing.assert_close(a, b)


def test_presets_round_trip_through_config_json_and_checkpoints(tmp_path):
    import mixattn
    from mixattn.models.config import MixtureConfig, apply_overrides

    for name in ("tiny-rcmha", "tiny-mdha", "tiny-rmha", "small-rcmha", "small-mdha", "small-rmha"):
        cfg = from_name(name)
        assert MixtureConfig.from_dict(cfg.to_dict()) == cfg
    cfg = apply_overrides(from_name("tiny-rcmha"), ["rcmha.conv_kernel=5", "rcmha.position=rope"])
    assert cfg.rcmha == RCMHAConfig(conv_kernel=5, position="rope")
    with pytest.raises(ValueError, match="position"):
        apply_overrides(cfg, ["rcmha.position=alibi"])
    model = MixtureLM(from_name("tiny-rcmha")).eval()
    _randomize(model)
    mixattn.save(model, tmp_path / "ckpt")
    again = mixattn.load(tmp_path / "ckpt").eval()
    ids = torch.randint(0, 256, (1, 9))
    torch.testing.assert_close(again(ids).logits, model(ids).logits)
