"""Inference dtype: ``auto`` from the CPU flags, the cast keeps RoPE in fp32, and a bf16 model (dense
and with a sparse plan + ragged cache) agrees with fp32 to bf16 rounding."""

import pytest
import torch

from mixattn import kernels
from mixattn.compress import HeadRule, Plan, apply_plan
from mixattn.models import PRESETS, MixtureLM
from mixattn.models import dtype as dt


@pytest.mark.parametrize("flags,want", [
    ({"avx2", "avx512f"}, torch.float32),  # AVX-512 without BF16 dot products: emulated bf16 is slower
    ({"avx2", "avx512f", "avx512_bf16"}, torch.bfloat16),  # Zen 4 / Cooper Lake
    ({"avx2", "amx_bf16", "amx_tile"}, torch.bfloat16),  # Sapphire Rapids
    (set(), torch.float32),
])  # fmt: skip
def test_auto_is_bf16_exactly_where_the_cpu_has_bf16_dot_products(monkeypatch, flags, want):
    monkeypatch.setattr(dt, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert dt.resolve_dtype("auto") == want
    assert dt.resolve_dtype("float32") == torch.float32 and dt.resolve_dtype("bfloat16") == torch.bfloat16
    assert dt.resolve_dtype(torch.float64) == torch.float64
    with pytest.raises(ValueError, match="dtype must be one of"):
        dt.resolve_dtype("fp8")


def test_float32_cast_changes_nothing_and_bf16_keeps_rope_frequencies():
    model = MixtureLM(PRESETS["tiny"]).eval()
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        before = model(ids).logits
        assert torch.equal(dt.cast(model, "float32")(ids).logits, before)
    inv = model.rope.inv_freq.clone()
    dt.cast(model, "bfloat16")
    assert model.embed.weight.dtype == torch.bfloat16 and model.layers[0].attn.q_proj.weight.dtype == torch.bfloat16
    assert model.rope.inv_freq.dtype == torch.float32 and torch.equal(model.rope.inv_freq, inv)
    assert model.double().rope.inv_freq.dtype == torch.float64  # higher precision is not clamped down


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("plan", [False, True])
def test_bf16_model_agrees_with_fp32_to_bf16_rounding(plan):
    """Logits of every position within a few bf16 epsilons (relative norm); generation runs with
    bf16 caches (dense or ragged) and its prefill logits match the uncached forward's."""
    torch.manual_seed(0)
    cfg = PRESETS["tiny"]
    model = MixtureLM(cfg).eval()
    if plan:
        rules = (HeadRule(2, 8.0, 0.0), HeadRule(0, 0.0, 0.5), HeadRule(0, 0.0, 1.0))
        apply_plan(model, Plan(tuple(rules[: cfg.num_kv_heads] for _ in range(cfg.num_layers))))
    ids = torch.randint(0, 256, (2, 150))
    with torch.no_grad():
        ref = model(ids, ref_len=160).logits  # spans at N = 160, as the cached run below
        low = dt.cast(model, "bfloat16")(ids, ref_len=160).logits
        assert low.dtype == torch.bfloat16
        assert _rel(low, ref) < 16 * torch.finfo(torch.bfloat16).eps
        cache = model.new_cache(160)
        cached = model(ids, cache, ref_len=160, logits_to_keep=1).logits
        assert all(c.k.dtype == torch.bfloat16 for c in cache) if plan else True
        assert _rel(cached[:, -1], low[:, -1]) < 4 * torch.finfo(torch.bfloat16).eps
    assert model.generate(ids, 3).shape == (2, 153)


@pytest.mark.parametrize("impl", ["sdpa", "merge", "flex", "blocked"])
def test_bf16_sparse_kernels_agree_with_the_fp32_reference(impl):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, 400, 64, generator=g) for n in (6, 2, 2))
    sink, span = torch.tensor([4, 0]), torch.tensor([100, 250])
    with torch.no_grad():
        want = kernels.get("sparse_attention", "reference")(q, k, v, sink, span)
        out = kernels.get("sparse_attention", impl)(q.bfloat16(), k.bfloat16(), v.bfloat16(), sink, span)
    assert out.dtype == torch.bfloat16
    assert _rel(out, want) < 8 * torch.finfo(torch.bfloat16).eps
