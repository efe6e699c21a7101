"""Every fast kernel against its reference: outputs and gradients, odd shapes, empty groups."""

import pytest
import torch
import torch.nn.functional as F

from mixattn import kernels
from mixattn.kernels import grouped
from tests.conftest import grads


def _grouped_case(N, I, O, E, empty=()):
    counts = torch.randint(0, 5, (E,))
    for e in empty:
        counts[e] = 0
    counts[-1] += N - counts.sum() if counts.sum() < N else 0
    x = torch.randn(int(counts.sum()), I, requires_grad=True)
    w = torch.randn(E, O, I, requires_grad=True)
    return x, w, counts


def _grouped_brute(x, w, counts):
    """Row r of the expert-sorted input times its expert's weight, one row at a time."""
    owner = [e for e, c in enumerate(counts.tolist()) for _ in range(c)]
    rows = [w[e] @ x[r] for r, e in enumerate(owner)]
    return torch.stack(rows) if rows else x.new_zeros(0, w.shape[1])


def _grouped_bounds(x, w, counts, g):
    """First-order fp32 rounding bounds (length-n dot products: n eps max|a| max|b|) of y = x w_e^T
    (n = in), dx = g w_e (n = out) and dw_e = sum of its rows' g x^T (n = rows of e)."""
    eps = torch.finfo(x.dtype).eps
    xm, wm, gm = (float(t.detach().abs().max()) for t in (x, w, g))
    return (eps * w.shape[2] * xm * wm, eps * w.shape[1] * gm * wm, eps * max(1, int(counts.max())) * gm * xm)


GROUPED_CASES = [(8, 12, 4, ()), (16, 4, 3, (0,)), (8, 8, 1, ()), (12, 20, 5, (1, 3)), (7, 5, 3, (1,))]


@pytest.mark.parametrize("I,O,E,empty", GROUPED_CASES)
def test_grouped_linear_matches_a_row_by_row_product(I, O, E, empty, monkeypatch):
    """``grouped`` against a brute-force row loop, outputs and gradients. Aligned shapes must run
    F.grouped_mm (the fallback is made to raise); the unaligned (7, 5, 3) must take the fallback."""
    x, w, counts = _grouped_case(11, I, O, E, empty)
    aligned = I % 4 == 0 and O % 4 == 0  # fp32: every stride a multiple of 16 bytes
    assert (grouped.grouped_mm_unsupported(x, w) is None) == aligned
    calls = {"grouped_mm": 0, "fallback": 0}
    real_mm, real_ref = F.grouped_mm, grouped.grouped_linear_reference

    def spy_mm(*a, **kw):
        calls["grouped_mm"] += 1
        return real_mm(*a, **kw)

    def spy_ref(*a, **kw):
        calls["fallback"] += 1
        return real_ref(*a, **kw)

    monkeypatch.setattr(F, "grouped_mm", spy_mm)
    monkeypatch.setattr(grouped, "grouped_linear_reference", spy_ref)
    out = kernels.get("grouped_linear", "grouped")(x, w, counts)
    assert calls == ({"grouped_mm": 1, "fallback": 0} if aligned else {"grouped_mm": 0, "fallback": 1})
    xd, wd = (t.detach().double().requires_grad_() for t in (x, w))
    want = _grouped_brute(xd, wd, counts)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    tol_y, tol_x, tol_w = _grouped_bounds(x, w, counts, g)
    torch.testing.assert_close(out.double(), want, atol=tol_y, rtol=0)
    gx, gw = torch.autograd.grad(out, (x, w), g)
    wx, ww = torch.autograd.grad(want, (xd, wd), g.double())
    torch.testing.assert_close(gx.double(), wx, atol=tol_x, rtol=0)
    torch.testing.assert_close(gw.double(), ww, atol=tol_w, rtol=0)
    for e in empty:
        assert torch.equal(gw[e], torch.zeros_like(gw[e]))  # an expert with no rows gets no gradient


def test_grouped_linear_single_row_and_sum_backward():
    w = torch.randn(3, 8, 4, requires_grad=True)
    x = torch.randn(1, 4, requires_grad=True)
    counts = torch.tensor([0, 1, 0])
    out = kernels.get("grouped_linear", "grouped")(x, w, counts)
    out.sum().backward()  # expanded grad: grouped_mm alone would reject it
    torch.testing.assert_close(out, x @ w[1].T)
    # d sum(W x) / dW = ones x^T (exact); d / dx = the column sums of W (8 terms)
    assert not w.grad[0].any() and not w.grad[2].any() and torch.equal(w.grad[1], x.detach().expand(8, 4))
    bound = torch.finfo(torch.float32).eps * 8 * float(w.detach().abs().max())
    torch.testing.assert_close(x.grad[0], w.detach()[1].sum(0), atol=bound, rtol=0)


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
