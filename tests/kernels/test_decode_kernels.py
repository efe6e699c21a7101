"""Decode kernels (one query per row over a long cache): the GEMM form and the fused kernel equal
the definition within the dtype's rounding bound, and ``auto`` records the one it measured faster."""

import json

import pytest
import torch

from mixattn import kernels
from mixattn.kernels import autotune
from mixattn.layers.cache import RaggedKVCache

from .test_sparse_kernels import assert_close_bound, brute_force, rounding_bound


def _case(B, H, Hkv, n, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, 1, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, Hkv, n, D, generator=g, dtype=torch.float64) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["sdpa", "matmul", "auto"])
@pytest.mark.parametrize("B,H,Hkv,n", [(1, 9, 3, 700), (2, 4, 4, 33), (3, 6, 2, 1)])
def test_dense_decode_within_the_rounding_bound(B, H, Hkv, n, impl, dtype):
    """The last query over every key, in ``dtype``, against fp64 attention of the same rounded inputs."""
    q, k, v = (x.to(dtype).double() for x in _case(B, H, Hkv, n))
    want = brute_force(q, k, v, torch.zeros(Hkv, dtype=torch.long), torch.full((Hkv,), n), q_offset=n - 1)
    with torch.no_grad():
        out = kernels.get("attention", impl)(*(x.to(dtype) for x in (q, k, v)), n - 1).double()
    assert_close_bound(out, want, rounding_bound(dtype, q, k, v))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["sdpa", "matmul", "auto"])
def test_ragged_decode_within_the_rounding_bound(impl, dtype):
    """Heads of three capacities (a full head, a sink + window one, a short window), decoded past
    every window in ``dtype``: each step equals the sparse rule's fp64 attention within the bound."""
    B, H, Hkv, T, prompt = 2, 6, 3, 300, 250
    _, k, v = (x.to(dtype).double() for x in _case(B, H, Hkv, T, seed=1))
    q = torch.randn(B, H, T, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype).double()
    sink, span = torch.tensor([0, 4, 1]), torch.tensor([T, 90, 17])
    want = brute_force(q, k, v, sink, span)
    low = [x.to(dtype) for x in (q, k, v)]
    cache = RaggedKVCache(sink, span, T)
    rows = []
    with torch.no_grad():
        cache.write(low[1][:, :, :prompt], low[2][:, :, :prompt])
        for t in range(prompt, T):
            cache.write(low[1][:, :, t : t + 1], low[2][:, :, t : t + 1])
            rows.append(kernels.get("ragged_attention", impl)(low[0][:, :, t : t + 1], *cache.decode_view()))
    assert_close_bound(torch.cat(rows, 2).double(), want[:, :, prompt:], rounding_bound(dtype, q, k, v))


def test_auto_decode_times_both_and_stores_the_choice(tmp_path, monkeypatch):
    """With timing on, the first decode call of a shape bucket measures sdpa and matmul and writes the
    winner (with both timings) under its op; the output is the chosen kernel's."""
    monkeypatch.setenv("MIXATTN_KERNEL_CHOICES", str(tmp_path / "c.json"))
    monkeypatch.setenv("MIXATTN_AUTOTUNE", "1")
    autotune.forget()
    q, k, v = (x.float() for x in _case(1, 9, 3, 500))
    cache = RaggedKVCache(torch.tensor([0, 4, 1]), torch.tensor([500, 90, 17]), 500)
    with torch.no_grad():
        out = kernels.get("attention", "auto")(q, k, v, 499)
        cache.write(k, v)
        ragged = kernels.get("ragged_attention", "auto")(q, *cache.decode_view())
    stored = json.loads((tmp_path / "c.json").read_text())
    ops = {key.split("|")[3]: val.split(" ")[0] for key, val in stored.items()}
    assert set(ops) == {"attention", "ragged_attention"} and set(ops.values()) <= {"sdpa", "matmul"}
    assert all("sdpa" in val and "matmul" in val for val in stored.values())  # both were timed
    torch.testing.assert_close(out, kernels.get("attention", ops["attention"])(q, k, v, 499), atol=0, rtol=0)
    torch.testing.assert_close(ragged, kernels.get("ragged_attention", ops["ragged_attention"])(q, *cache.decode_view()),
                               atol=0, rtol=0)  # fmt: skip
    autotune.forget()
