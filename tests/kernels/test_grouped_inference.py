"""``grouped_linear`` (grouped_mm) without gradients: aligned strided inputs go in without a copy,
the output carries no autograd wrapper; with gradients the operand is made contiguous as before."""

import pytest
import torch
import torch.nn.functional as F

from mixattn import kernels
from mixattn.layers.experts import combine, combine_add, make_dispatch, sort_by_expert


def _case(N, I, O, E, pad, empty=(1,)):
    """x: the first I columns of an (N, I + pad) tensor (row stride I + pad)."""
    counts = torch.full((E,), N // (E - len(empty)))
    counts[list(empty)] = 0
    counts[-1] += N - counts.sum()
    base = torch.randn(N, I + pad)
    return base, base[:, :I], torch.randn(E, O, I), counts


def _brute(x, w, counts):
    owner = torch.repeat_interleave(torch.arange(len(counts)), counts)
    return torch.einsum("ni,noi->no", x.double(), w.double()[owner])


def _spy(monkeypatch):
    seen = []
    real = F.grouped_mm

    def spy(a, *args, **kw):
        seen.append(a)
        return real(a, *args, **kw)

    monkeypatch.setattr(F, "grouped_mm", spy)
    return seen


@pytest.mark.parametrize("pad,copied", [(16, False), (3, True)])  # row stride 32 floats vs 19 (unaligned)
def test_no_grad_takes_an_aligned_strided_input_without_a_copy(pad, copied, monkeypatch):
    base, x, w, counts = _case(20, 16, 8, 4, pad)
    seen = _spy(monkeypatch)
    with torch.no_grad():
        out = kernels.get("grouped_linear", "grouped")(x, w, counts)
    assert len(seen) == 1 and (seen[0].data_ptr() == base.data_ptr()) != copied and out.grad_fn is None
    bound = torch.finfo(torch.float32).eps * x.shape[1] * float(x.abs().max() * w.abs().max())  # length-I dots
    torch.testing.assert_close(out.double(), _brute(x, w, counts), atol=bound, rtol=0)


def test_with_grad_the_operand_is_contiguous_and_differentiable(monkeypatch):
    _, x, w, counts = _case(20, 16, 8, 4, 16)
    w.requires_grad_()
    seen = _spy(monkeypatch)
    out = kernels.get("grouped_linear", "grouped")(x, w, counts)
    assert seen[0].is_contiguous() and out.grad_fn is not None
    with torch.no_grad():
        assert torch.equal(out, kernels.get("grouped_linear", "grouped")(x, w, counts))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_add_equals_combine_up_to_the_slot_sum_order(dtype):
    """Experts 2 and 5 get no rows. Both sum K fp32 gate products (each sum within K eps32 / 2 of
    sum_k |w_k y_k| of the exact value) and store once in the dtype."""
    N, K, E, O = 13, 3, 6, 8
    gen = torch.Generator().manual_seed(0)
    topi = torch.tensor([0, 1, 3, 4])[torch.rand(N, 4, generator=gen).topk(K, -1).indices]
    w = torch.rand(N, K, generator=gen).to(dtype)
    y = torch.randn(N * K, O, generator=gen).to(dtype)
    disp = make_dispatch(topi, E)
    order, token, counts = sort_by_expert(topi, E)
    assert torch.equal(order, disp.order) and torch.equal(token, disp.token) and torch.equal(counts, disp.counts)
    assert counts[2] == counts[5] == 0
    want = combine(y, w, disp).double()
    gated_abs = (y.double()[disp.inverse].view(N, K, O).abs() * w.double().abs().unsqueeze(-1)).sum(1)
    out = combine_add(y.clone(), w, order, token)
    assert out.dtype == dtype and torch.equal(out, combine_add(y.clone(), w, order, token))
    bound = K * torch.finfo(torch.float32).eps * gated_abs + torch.finfo(dtype).eps * want.abs()
    assert ((out.double() - want).abs() <= bound).all()
