"""Every fast kernel against its reference: outputs and gradients, odd shapes, empty groups."""

import pytest
import torch

from mixattn import kernels
from tests.conftest import grads


def _grouped_case(N, I, O, E, empty=()):
    counts = torch.randint(0, 5, (E,))
    for e in empty:
        counts[e] = 0
    counts[-1] += N - counts.sum() if counts.sum() < N else 0
    x = torch.randn(int(counts.sum()), I, requires_grad=True)
    w = torch.randn(E, O, I, requires_grad=True)
    return x, w, counts


@pytest.mark.parametrize("I,O,E,empty", [(8, 12, 4, ()), (16, 4, 3, (0,)), (7, 5, 3, (1,)), (8, 8, 1, ())])
def test_grouped_linear_matches_reference(I, O, E, empty):
    x, w, counts = _grouped_case(11, I, O, E, empty)
    ref = kernels.get("grouped_linear", "reference")(x, w, counts)
    out = kernels.get("grouped_linear", "grouped")(x, w, counts)
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads(out, (x, w)), grads(ref, (x, w))):
        torch.testing.assert_close(a, b)


def test_grouped_linear_single_row_and_sum_backward():
    w = torch.randn(3, 8, 4, requires_grad=True)
    x = torch.randn(1, 4, requires_grad=True)
    counts = torch.tensor([0, 1, 0])
    out = kernels.get("grouped_linear", "grouped")(x, w, counts)
    out.sum().backward()  # expanded grad: grouped_mm alone would reject it
    torch.testing.assert_close(out, x @ w[1].T)
    assert w.grad[0].abs().sum() == 0 and w.grad[1].abs().sum() > 0


def test_unknown_kernel_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="reference"):
        kernels.get("grouped_linear", "nope")
    with pytest.raises(ValueError, match="grouped_linear"):
        kernels.get("nope")


@pytest.mark.parametrize("B,H,Hkv,T,offset", [(1, 4, 4, 37, 0), (2, 6, 2, 19, 0), (1, 4, 1, 1, 0), (2, 4, 2, 5, 9)])
def test_head_sparse_matches_reference(B, H, Hkv, T, offset):
    D = 8
    q = torch.randn(B, H, T, D, requires_grad=True)
    k = torch.randn(B, Hkv, offset + T, D, requires_grad=True)
    v = torch.randn(B, Hkv, offset + T, D, requires_grad=True)
    active = torch.rand(B, T, H) < 0.5
    active[..., 0] = False  # a head that no token selects
    ref = kernels.get("head_sparse_attention", "reference")(q, k, v, active, q_offset=offset)
    out = kernels.get("head_sparse_attention", "gather")(q, k, v, active, q_offset=offset, chunk=4)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
