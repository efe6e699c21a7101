"""The ``merge`` sparse prefill kernel (unmasked and causal pieces joined by log-sum-exp) against the
brute force: outputs in float64, fp32 and bf16 with tolerances from the dtype, and its deferral to
``sdpa`` under autograd (outputs and gradients)."""

import pytest
import torch
from hypothesis import example, given

from mixattn import kernels
from mixattn.kernels.sparse_merge import MIN_BLOCK, merge_rows

from .test_prefill_kernel import _check, _long_case
from .test_sparse_kernels import FAST, _three_blocks, assert_close_bound, brute_force, rounding_bound, sparse_cases

merge = kernels.get("sparse_attention", "merge")


def _no_grad_check(case):
    q, k, v, sink, span, pad = case
    with torch.no_grad():
        out = merge(q, k, v, sink, span, pad)
    assert_close_bound(out, brute_force(q, k, v, sink, span, pad), rounding_bound(q.dtype, q, k, v))


@FAST
@given(case=sparse_cases())
@example(case=_three_blocks())
def test_merge_matches_brute_force(case):
    _no_grad_check(case)


@pytest.mark.parametrize("T,sinks,spans,pad", [
    (700, [4], [20], None),  # C = 18 rows, the rectangle's middle is a single key
    (700, [0, 7, 3], [33, 150, 600], None),  # no sink; three rules; one head dense at T
    (700, [5, 5, 0], [40, 300, 40], None),  # equal rules apart: a gather and an un-permute
    (701, [2, 1], [50, 17], torch.tensor([0, 37])),  # left padding; a trailing partial block
    (1200, [64], [326], None),  # the searched plans' window head: C = 81, several full blocks
    (600, [3], [MIN_BLOCK + 1], None),  # too short to cut: the masked kernel
])  # fmt: skip
def test_merge_past_several_query_blocks(T, sinks, spans, pad):
    """Every piece boundary (window start, middle rectangle, diagonal), the sink and the tail block
    are inside the range; kills an off-by-one between the pieces, a dropped piece, a wrong flip."""
    B = 1 if pad is None else 2
    _no_grad_check(_long_case(T, sinks, spans, B=B, pad=pad))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_in_low_precision_within_rounding(dtype):
    """The merge is summed in fp32; the error is the dtype's rounding of the inputs and output."""
    q, k, v, sink, span, pad = _long_case(900, [64, 0, 8], [200, 90, 900], G=3)
    want = brute_force(q, k, v, sink, span)
    with torch.no_grad():
        out = merge(*(x.to(dtype) for x in (q, k, v)), sink, span).double()
    assert_close_bound(out, want, rounding_bound(dtype, q, k, v))


def test_merge_under_autograd_is_exact_and_differentiable():
    """With gradients needed it runs the ``sdpa`` kernel (the flash op's log-sum-exp has no gradient)."""
    _check(_long_case(700, [5, 0], [40, 300]), impl="merge")


def test_merge_rows_leaves_a_middle_key():
    for w in range(MIN_BLOCK + 2, 3000, 7):
        C = merge_rows(w)
        assert MIN_BLOCK <= C <= min(256, w - 2)


@pytest.mark.parametrize("blocks_per_call", [1, 2, 3])
def test_merge_split_into_several_gathers_matches_brute_force(monkeypatch, blocks_per_call):
    """Blocks go in batches that fit ``GATHER_BYTES``; a batch that starts past the first block must
    take its own window (kills a middle or first-keys offset tied to the first block)."""
    from mixattn.kernels import sparse_merge

    case = _long_case(1200, [64, 5], [326, 90], B=1)  # 3 and 11 full blocks, then a partial one
    k = case[1]
    per_block = 2 * k.shape[0] * 1 * (64 + 326) * k.shape[3] * k.element_size()  # the largest group's block
    monkeypatch.setattr(sparse_merge, "GATHER_BYTES", blocks_per_call * per_block)
    _no_grad_check(case)
