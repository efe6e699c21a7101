"""Kernel edge cases the shape-drawn tests do not reach: no experts at all, the alignment rule of
grouped_mm on each weight dimension, and the default query offset of the head-sparse kernels."""

import pytest
import torch

from mixattn.kernels import grouped
from mixattn.kernels.head_sparse import head_sparse_attention_gather
from mixattn.kernels.reference import grouped_linear_reference, head_sparse_attention_reference


def test_grouped_linear_reference_with_no_experts_returns_zero_rows_of_the_output_width():
    x = torch.zeros(0, 6)
    w = torch.zeros(0, 10, 6)  # E = 0, O = 10, I = 6
    y = grouped_linear_reference(x, w, torch.zeros(0, dtype=torch.long))
    assert y.shape == (0, 10) and y.dtype == x.dtype


@pytest.mark.parametrize(
    "dtype, O, I, ok",
    [
        (torch.float32, 8, 8, True),  # fp32: dims must be multiples of 4 (16 bytes)
        (torch.float32, 12, 4, True),
        (torch.float32, 6, 8, False),  # out dim unaligned
        (torch.float32, 8, 6, False),  # in dim unaligned
        (torch.bfloat16, 8, 16, True),  # bf16: multiples of 8
        (torch.bfloat16, 12, 16, False),
        (torch.bfloat16, 16, 12, False),
        (torch.float64, 8, 8, False),  # grouped_mm has no fp64
    ],
)
def test_grouped_mm_alignment_rule_checks_both_weight_dims(dtype, O, I, ok):
    x = torch.zeros(5, I, dtype=dtype)
    w = torch.zeros(3, O, I, dtype=dtype)
    reason = grouped.grouped_mm_unsupported(x, w)
    assert (reason is None) == ok, reason
    if not ok and dtype != torch.float64:
        assert f"({O}, {I})" in reason


def test_grouped_mm_needs_matching_dtypes():
    assert "dtype" in grouped.grouped_mm_unsupported(torch.zeros(2, 8), torch.zeros(1, 8, 8, dtype=torch.bfloat16))


@pytest.mark.parametrize("kernel", [head_sparse_attention_reference, head_sparse_attention_gather], ids=["reference", "gather"])
def test_head_sparse_default_query_offset_is_zero(kernel):
    g = torch.Generator().manual_seed(3)
    B, H, Hkv, T, D = 2, 4, 2, 9, 8
    q = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, T, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, T, D, generator=g, dtype=torch.float64)
    active = torch.rand(B, T, H, generator=g) < 0.6
    default = kernel(q, k, v, active)
    explicit = kernel(q, k, v, active, q_offset=0)
    assert torch.equal(default, explicit)
    # and offset 0 is causal from the first key: the first query sees only key 0
    first = torch.where(active[:, 0, :, None], v.repeat_interleave(H // Hkv, 1)[:, :, 0], 0.0)  # (B, H, D)
    torch.testing.assert_close(default[:, 0], first)


def test_rule_mask_with_more_keys_than_queries_reach():
    """Tk beyond q_offset + T (keys the queries cannot reach yet) are masked, not dropped."""
    from mixattn.kernels.sparse import rule_mask

    m = rule_mask(2, torch.tensor([1]), torch.tensor([2]), q_offset=1, Tk=6)
    assert m.shape == (1, 2, 6)
    assert m[0].tolist() == [[True, True, False, False, False, False], [True, True, True, False, False, False]]
