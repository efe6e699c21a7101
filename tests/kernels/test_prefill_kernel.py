"""The ``sdpa`` sparse prefill kernel (fused SDPA on the kept keys) against the brute force of
``test_sparse_kernels``, outputs and gradients, and the measured kernel choice (``autotune``)."""

import json

import pytest
import torch
from hypothesis import example, given

from mixattn import kernels
from mixattn.kernels import autotune
from mixattn.kernels.sparse_sdpa import block_rows

from .test_sparse_kernels import (
    FAST,
    _grad_bound,
    _grads,
    _three_blocks,
    assert_close_bound,
    brute_force,
    rounding_bound,
    sparse_cases,
)


def _long_case(T, sinks, spans, G=2, B=1, pad=None, seed=0):
    """float64 inputs past several query blocks of the kernel (C >= 128 rows after sink + span)."""
    g = torch.Generator().manual_seed(seed)
    Hkv = len(sinks)
    q, k, v = (torch.randn(B, n, T, 8, generator=g, dtype=torch.float64) for n in (G * Hkv, Hkv, Hkv))
    return q, k, v, torch.tensor(sinks), torch.tensor(spans), pad


def _check(case, impl="sdpa"):
    q, k, v, sink, span, pad = (t.clone().requires_grad_() if i < 3 else t for i, t in enumerate(case))
    want = brute_force(q, k, v, sink, span, pad)
    out = kernels.get("sparse_attention", impl)(q, k, v, sink, span, pad)
    assert_close_bound(out, want, rounding_bound(torch.float64, q, k, v))
    tol = _grad_bound(torch.float64, q, k, v, want)
    for a, b in zip(_grads(out, (q, k, v)), _grads(want, (q, k, v))):
        assert_close_bound(a, b, tol)


@FAST
@given(case=sparse_cases())
@example(case=_three_blocks())
def test_sdpa_kernel_matches_brute_force_outputs_and_grads(case):
    _check(case)


@pytest.mark.parametrize("sinks,spans,pad", [
    ([4], [20], None),  # one rule: a 24-row causal head, then blocks of 128 (the last one partial)
    ([0, 7, 3], [33, 150, 600], None),  # three rules in head order; one head dense at T
    ([5, 5, 0], [40, 300, 40], None),  # equal rules apart (heads 0 and 2): a gather and an un-permute
    ([2, 1], [50, 17], torch.tensor([0, 37])),  # left padding: each row from its first real token
])  # fmt: skip
def test_sdpa_kernel_past_several_query_blocks(sinks, spans, pad):
    """T = 700 puts several full and one partial block after the causal head; the mask's band edges
    (window start, diagonal) and the sink are all inside blocks. Kills an off-by-one in the window
    start, a mask shifted by one, a dropped sink, and a wrong head order after the group split."""
    B = 1 if pad is None else 2
    _check(_long_case(700, sinks, spans, B=B, pad=pad))


def test_block_rows_grows_with_the_span():
    assert block_rows(10) == 128 and block_rows(2048) == 512 and block_rows(10**6) == 1024
    assert all(block_rows(w) % 64 == 0 for w in (1, 300, 777, 5000))


def test_autotune_keeps_the_fastest_and_caches_it_on_disk(tmp_path, monkeypatch):
    """The slow candidate loses; the choice is stored per (device, torch, dtype, op, bucket) and read
    back by a fresh process (simulated by forgetting the in-memory dict) without timing again."""
    import time

    path = tmp_path / "choices.json"
    monkeypatch.setenv("MIXATTN_KERNEL_CHOICES", str(path))
    monkeypatch.setenv("MIXATTN_AUTOTUNE", "1")
    autotune.forget()
    calls = []
    x = torch.zeros(2)

    def slow():  # busy: the timing counts CPU time, which a sleep does not use
        calls.append("slow")
        t = time.process_time()
        while time.process_time() - t < 2 * autotune.MIN_TIMED_S:
            pass

    def fast():
        calls.append("fast")

    assert autotune.choose("op", (1, 2), {"slow": slow, "fast": fast}, x) == "fast"
    # warm-up + one timed call for the slow one; the fast one repeats until the timed total is long enough
    assert calls[:2] == ["slow", "slow"] and set(calls[2:]) == {"fast"} and len(calls) > 4
    stored = json.loads(path.read_text())
    (k, v), = stored.items()
    assert k == autotune.key("op", x, (1, 2)) and autotune.device_name() in k and "float32" in k
    assert v.startswith("fast (")
    autotune.forget()
    n = len(calls)
    assert autotune.choose("op", (1, 2), {"slow": slow, "fast": fast}, x) == "fast" and len(calls) == n  # from disk
    assert autotune.choose("op", (1, 3), {"slow": slow, "fast": fast}, x) == "fast" and len(calls) > n  # new bucket
    n = len(calls)
    monkeypatch.setenv("MIXATTN_AUTOTUNE", "0")
    assert autotune.choose("op", (9,), {"slow": slow, "fast": fast}, x) == "slow" and len(calls) == n
    autotune.forget()


def test_auto_inference_runs_a_measured_kernel_and_matches_the_reference(tmp_path, monkeypatch):
    """attend() with impl "auto" and no gradient: whichever kernel the timing picks, the output is
    the reference's; the choice lands in the cache file under the sparse_attention op."""
    from mixattn.kernels.sparse_auto import choose

    monkeypatch.setenv("MIXATTN_KERNEL_CHOICES", str(tmp_path / "c.json"))
    monkeypatch.setenv("MIXATTN_AUTOTUNE", "1")
    autotune.forget()
    q, k, v, sink, span, _ = _long_case(300, [4, 4], [60, 60], seed=3)
    q, k, v = q.float(), k.float(), v.float()
    with torch.no_grad():
        name = choose(q, k, v, sink, span, None)
        assert name in ("sdpa", "merge", "flex")
        out = kernels.get("sparse_attention", name)(q, k, v, sink, span)
        want = kernels.get("sparse_attention", "reference")(q, k, v, sink, span)
    assert_close_bound(out, want, rounding_bound(torch.float32, q, k, v))
    assert "|sparse_attention|" in next(iter(json.loads((tmp_path / "c.json").read_text())))
    autotune.forget()


def test_autotune_adds_to_the_file_without_dropping_other_processes_choices(tmp_path, monkeypatch):
    """Another process wrote a choice after this one read the file: saving keeps it."""
    path = tmp_path / "choices.json"
    monkeypatch.setenv("MIXATTN_KERNEL_CHOICES", str(path))
    monkeypatch.setenv("MIXATTN_AUTOTUNE", "1")
    autotune.forget()
    x = torch.zeros(1)
    autotune.choose("op", (1,), {"a": lambda: None, "b": lambda: None}, x)
    other = json.loads(path.read_text())
    other["someone else's key"] = "b"
    path.write_text(json.dumps(other))
    autotune.choose("op", (2,), {"a": lambda: None, "b": lambda: None}, x)
    assert set(json.loads(path.read_text())) == {autotune.key("op", x, (1,)), autotune.key("op", x, (2,)),
                                                 "someone else's key"}  # fmt: skip
    autotune.forget()
