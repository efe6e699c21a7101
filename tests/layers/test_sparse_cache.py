"""Per-head sparse attention kernels and the ragged KV cache, against the reference."""

import math

import pytest
import torch

from mixattn import kernels
from mixattn.compress import HeadRule, Plan, apply_plan, remove_plan
from mixattn.layers.cache import RaggedKVCache
from mixattn.models import PRESETS, MixtureLM
from tests.conftest import grads

CASES = [  # (B, H, Hkv, T, sinks, spans, left_pad)
    (1, 2, 2, 37, [0, 3], [1, 5], None),  # odd length, sink 0, span 1
    (2, 4, 2, 50, [4, 0], [7, 50], [0, 9]),  # span >= N, left padding
    (1, 4, 1, 65, [2], [16], None),  # 4 query heads per KV head
    (3, 6, 3, 29, [1, 5, 0], [3, 40, 2], [0, 4, 11]),  # 2 per KV head, batch 3
]


def _qkv(B, H, Hkv, T, D=8):
    g = torch.Generator().manual_seed(B * 100 + T)
    return [torch.randn(B, n, T, D, generator=g, requires_grad=True) for n in (H, Hkv, Hkv)]


@pytest.mark.parametrize("B,H,Hkv,T,sinks,spans,pad", CASES)
def test_blocked_matches_reference_outputs_and_grads(B, H, Hkv, T, sinks, spans, pad):
    q, k, v = _qkv(B, H, Hkv, T)
    sink, span = torch.tensor(sinks), torch.tensor(spans).clamp(max=T)
    pad = torch.tensor(pad) if pad else None
    ref = kernels.get("sparse_attention", "reference")(q, k, v, sink, span, pad)
    out = kernels.get("sparse_attention", "blocked")(q, k, v, sink, span, pad)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_reference_is_the_rule():
    """The reference equals attention computed from the rule by hand, one query at a time."""
    q, k, v = _qkv(1, 2, 1, 12)
    sink, span = torch.tensor([2]), torch.tensor([3])
    out = kernels.get("sparse_attention", "reference")(q, k, v, sink, span)
    for i in range(12):
        keys = [j for j in range(i + 1) if j < 2 or i - j < 3]
        s = (q[0, :, i] @ k[0, 0, keys].T) / math.sqrt(8)
        torch.testing.assert_close(out[0, :, i], torch.softmax(s, -1) @ v[0, 0, keys])


def test_flex_matches_reference():
    with torch.no_grad():
        # the last case has blocks wholly inside a 200-token sink and a 300-token window (full blocks)
        # heads with equal rules share one flex call; KV heads 0 and 2 of the 4th case do, apart
        cases = CASES[1:2] + [(1, 4, 2, 200, [0, 16], [40, 1], None), (2, 6, 3, 700, [200, 0, 5], [300, 700, 129], [0, 37]),
                              (1, 8, 4, 300, [3, 0, 3, 0], [50, 300, 50, 7], None)]
        for B, H, Hkv, T, sinks, spans, pad in cases:
            q, k, v = (t.detach() for t in _qkv(B, H, Hkv, T))
            sink, span = torch.tensor(sinks), torch.tensor(spans).clamp(max=T)
            pad = torch.tensor(pad) if pad else None
            ref = kernels.get("sparse_attention", "reference")(q, k, v, sink, span, pad)
            out = kernels.get("sparse_attention", "flex")(q, k, v, sink, span, pad)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_flex_does_not_recompile_for_new_lengths_or_rules():
    """Compiled once (dynamic shapes), flex serves other lengths, rules and head-group sizes."""
    flex = kernels.get("sparse_attention", "flex")
    with torch.no_grad():
        # warm-up: one call with two single-head groups, one with a two-head group (sizes 1 are
        # specialised by dynamic shapes, so these are the two graphs a GQA model needs)
        for T, sinks, spans in ((300, [3, 0], [50, 7]), (301, [5, 5], [20, 20])):
            q, k, v = (t.detach() for t in _qkv(1, 4, 2, T))
            flex(q, k, v, torch.tensor(sinks), torch.tensor(spans))
        with torch._dynamo.config.patch(error_on_recompile=True):
            for T, sinks, spans in ((517, [0, 0], [100, 9]), (1000, [64, 64], [200, 200]), (333, [1, 2], [3, 4])):
                q, k, v = (t.detach() for t in _qkv(1, 4, 2, T))
                sink, span = torch.tensor(sinks), torch.tensor(spans)
                ref = kernels.get("sparse_attention", "reference")(q, k, v, sink, span)
                torch.testing.assert_close(flex(q, k, v, sink, span), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("B,H,Hkv,T,sinks,spans,pad", CASES)
@pytest.mark.parametrize("extra", [1, 6])
@pytest.mark.parametrize("impl", ["sdpa", "matmul", "auto", "reference"])
def test_ragged_cache_decode_matches_reference(B, H, Hkv, T, sinks, spans, pad, extra, impl):
    """Prefill a (left-padded) prompt, then decode one query at a time past every window: each step
    equals the reference's row for that position (heads of unequal capacity are regrouped)."""
    q, k, v = (t.detach() for t in _qkv(B, H, Hkv, T))
    sink, span = torch.tensor(sinks), torch.tensor(spans).clamp(max=T)
    pad = torch.tensor(pad) if pad else None
    prompt = extra + (int(pad.max()) if pad is not None else 0)  # every row has a real prompt token
    ref = kernels.get("sparse_attention", "reference")(q, k, v, sink, span, pad)
    cache = RaggedKVCache(sink, span, T)
    cache.write(k[:, :, :prompt], v[:, :, :prompt], left_pad=pad)
    rows = []
    for t in range(prompt, T):
        cache.write(k[:, :, t : t + 1], v[:, :, t : t + 1])
        rows.append(kernels.get("ragged_attention", impl)(q[:, :, t : t + 1], *cache.decode_view()))
    torch.testing.assert_close(torch.cat(rows, 2), ref[:, :, prompt:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="sized for"):
        cache.write(k[:, :, :1], v[:, :, :1])


def test_ragged_cache_rejects_a_row_of_padding_only():
    k = torch.randn(2, 1, 4, 8)
    with pytest.raises(ValueError, match=r"left_pad values must be in \[0, 4\)"):
        RaggedKVCache(torch.tensor([1]), torch.tensor([2]), 10).write(k, k, left_pad=torch.tensor([0, 4]))


def _random_plan(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(cfg.num_layers):
        heads = []
        for _ in range(cfg.num_kv_heads):
            sink, alpha = int(torch.randint(0, 4, (1,), generator=g)), float(torch.randint(1, 6, (1,), generator=g))
            heads.append(HeadRule(sink, alpha, round(float(torch.rand(1, generator=g)) * 0.3, 3)))
        layers.append(tuple(heads))
    return Plan(tuple(layers))


@pytest.mark.parametrize("preset", ["tiny", "tiny-moa", "tiny-moh"])
def test_ragged_decode_equals_full_forward_past_the_window(preset):
    model = MixtureLM(PRESETS[preset]).eval()
    apply_plan(model, _random_plan(model.cfg))
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    N = 40
    with torch.no_grad():
        full = model(ids, ref_len=N).logits
        cache = model.new_cache(N)
        assert all(isinstance(c, RaggedKVCache) for c in cache)
        steps = [model(ids[:, :7], cache, ref_len=N).logits]
        for t in range(7, 40):  # spans here are <= 17, so every circular window wraps
            steps.append(model(ids[:, t : t + 1], cache, start_pos=t, ref_len=N).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert torch.equal(model.generate(ids[:, :9], 20), model.generate(ids[:, :9], 20, use_cache=False))


@pytest.mark.parametrize("preset", ["tiny", "tiny-moa"])
def test_left_padded_chunked_decoding_over_a_dense_cache_equals_full_forward(preset):
    """A plan with a dense ``KVCache`` (no ref_len): decode steps go through the reference kernel with
    a query offset. Its rows of a left-padded sample used to be masked out entirely (error ~1)."""
    model = MixtureLM(PRESETS[preset]).double().eval()  # float64: rounding ~1e-15, the bug's error ~1
    apply_plan(model, _random_plan(model.cfg))
    ids = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(2))
    pad, N = torch.tensor([0, 5]), 30
    tol = torch.finfo(torch.float64).eps ** 0.5  # half the float64 digits
    with torch.no_grad():
        full = model(ids, ref_len=N, left_pad=pad).logits
        cache = model.new_cache()
        assert not any(isinstance(c, RaggedKVCache) for c in cache)
        steps = [model(ids[:, :20], cache, ref_len=N, left_pad=pad).logits]
        for t in range(20, 30):
            steps.append(model(ids[:, t : t + 1], cache, start_pos=t, ref_len=N, left_pad=pad).logits)
    torch.testing.assert_close(torch.cat(steps, 1)[1, 5:], full[1, 5:], atol=tol, rtol=0)
    torch.testing.assert_close(torch.cat(steps, 1)[0], full[0], atol=tol, rtol=0)


def test_cache_bytes_are_the_sum_over_heads():
    model = MixtureLM(PRESETS["tiny"])
    plan = _random_plan(model.cfg, seed=3)
    apply_plan(model, plan)
    N, D = 64, model.cfg.head_dim
    cache = model.new_cache(N)
    model(torch.randint(0, 256, (1, 10)), cache, ref_len=N)
    for layer_cache, rules in zip(cache, plan.layers):
        want = sum(min(N, r.sink + r.span(N)) for r in rules) * D * 2 * 4
        assert layer_cache.nbytes() == want
    remove_plan(model)  # the dense baseline is sized once for N too (no doubling on the first decode step)
    dense = model.new_cache(N)
    ids = torch.randint(0, 256, (1, 10))
    model(ids, dense, ref_len=N)
    model(ids[:, :1], dense, start_pos=10, ref_len=N)
    assert model.kv_cache_bytes(dense) == model.cfg.num_layers * model.cfg.num_kv_heads * N * D * 2 * 4
