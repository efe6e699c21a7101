"""MoE's two routed-expert paths against a float64 per-token reference.

The no-grad path (``MoE.experts_inference``: in-place SwiGLU, no un-sort) runs whenever nothing is
differentiated, one expert at a time (``swiglu_experts_by_expert``) with impl "auto", through the
grouped kernel and ``combine_add`` with a named impl; the grad path (``MoE.experts_train``) is the
one training uses.
Both are checked against the same float64 evaluation, with an elementwise error bound derived from
the dtype's eps and the magnitudes of the operands (``_reference_and_bound``), at the benchmark's
(E, k) = (8, 2) and (64, 8), with experts that receive no token, in fp32 and bf16.
"""

import pytest
import torch
import torch.nn.functional as F

from mixattn.layers import MoE, MoEConfig, RouterConfig
from mixattn.layers import moe as moe_module
from mixattn.layers.experts import combine, make_dispatch

d, f = 32, 24  # every dim a multiple of 8: grouped_mm takes them in fp32 and bf16
SILU_MAX_SLOPE = 1.1  # max |d/dz z sigmoid(z)| = 1.0998 (at z ~ 2.4)


def _routing(T, E, K, empty, seed=0):
    """Top-K of random scores over the experts not in ``empty`` (they get no token); gates sum to 1."""
    gen = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(E) if e not in empty])
    topi = allowed[torch.rand(T, len(allowed), generator=gen).topk(K, -1).indices]
    topw = torch.rand(T, K, generator=gen) + 0.1
    return topi, topw / topw.sum(-1, keepdim=True)


def _reference_and_bound(x, w_in, w_out, topi, topw):
    """The routed SwiGLU experts in float64 from the given (already rounded) operands, one (token,
    slot) at a time, and an elementwise bound on the error of an evaluation that (i) accumulates
    every matmul in fp32 (CPU matmuls do so for bf16 too) and stores it in ``x.dtype``, (ii) computes
    silu(g) (exp, add, divide: 3 roundings, stored once more) and silu(g) * up in ``x.dtype``, and
    (iii) scales by the gates and sums the K slots in fp32 before the final store.

    A length-n dot product accumulated in fp32 is off by at most n eps32 sum|a_i b_i| (the standard
    gamma_n bound with a factor-2 margin, u = eps / 2); each store adds eps |value|. Errors are
    propagated to first order, plus the product of the two factor errors in silu(g) * up."""
    dt = x.dtype
    u, u32 = torch.finfo(dt).eps, torch.finfo(torch.float32).eps
    X, Wi, Wo, G = (t.detach().double() for t in (x, w_in, w_out, topw))
    N, K = topi.shape
    d, f = w_out.shape[1], w_out.shape[2]
    out, err, gated_abs = (torch.zeros(N, X.shape[1], dtype=torch.float64) for _ in range(3))
    for k in range(K):
        wi, wo = Wi[topi[:, k]], Wo[topi[:, k]]  # (N, 2f, d), (N, d, f)
        h = torch.einsum("ni,noi->no", X, wi)
        eh = d * u32 * torch.einsum("ni,noi->no", X.abs(), wi.abs()) + u * h.abs()
        g, up, eg, eu = h[:, :f], h[:, f:], eh[:, :f], eh[:, f:]
        s = F.silu(g)
        es = SILU_MAX_SLOPE * eg + 4 * u * s.abs()
        a = s * up
        ea = s.abs() * eu + up.abs() * es + es * eu + u * a.abs()
        y = torch.einsum("nf,nof->no", a, wo)
        ey = f * u32 * torch.einsum("nf,nof->no", a.abs() + ea, wo.abs()) + torch.einsum("nf,nof->no", ea, wo.abs())
        ey += u * (y.abs() + ey)
        out += G[:, k : k + 1] * y
        err += G[:, k : k + 1].abs() * ey
        gated_abs += (G[:, k : k + 1] * y).abs()
    err += K * u32 * gated_abs  # fp32 gate products and the K-term sum
    return out, err + u * (out.abs() + err)  # the final store in x.dtype


def _assert_within(actual, want, bound):
    excess = (actual.double() - want).abs() - bound
    assert excess.max() <= 0, f"error exceeds the derived bound by {float(excess.max()):.3g}"


def _spy_paths(monkeypatch):
    """Names of the no-grad combine routines MoE calls, in call order."""
    calls = []
    for name in ("combine_add", "swiglu_experts_by_expert"):
        real = getattr(moe_module, name)
        monkeypatch.setattr(moe_module, name, lambda *a, _n=name, _f=real: calls.append(_n) or _f(*a))
    return calls


NO_GRAD_PATH = {"auto": "swiglu_experts_by_expert", "grouped": "combine_add", "reference": "combine_add"}


def _moe(E, K, dtype):
    cfg = MoEConfig(router=RouterConfig(num_experts=E, top_k=K, gate_norm="renorm"))
    return MoE(d, f, cfg).to(dtype)


CASES = [  # (E, K, T, experts with no token)
    (8, 2, 37, (3,)),
    (8, 2, 9, tuple(range(2, 8))),  # every token on experts 0 and 1
    (64, 8, 29, (0, 5, 17, 63)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["auto", "grouped", "reference"])
@pytest.mark.parametrize("E,K,T,empty", CASES)
def test_both_paths_match_the_float64_reference_within_the_derived_bound(E, K, T, empty, impl, dtype, monkeypatch):
    moe = _moe(E, K, dtype)
    x = torch.randn(T, d).to(dtype)
    topi, topw = _routing(T, E, K, empty)
    topw = topw.to(dtype)
    want, bound = _reference_and_bound(x, moe.input_linear.weight, moe.output_linear.weight, topi, topw)
    calls = _spy_paths(monkeypatch)

    with torch.no_grad():
        y_inf = moe.experts(x, topi, topw, impl)
    assert calls == [NO_GRAD_PATH[impl]] and y_inf.dtype == dtype and y_inf.shape == (T, d)
    _assert_within(y_inf, want, bound)

    y_train = moe.experts(x.requires_grad_(), topi, topw, impl)
    assert len(calls) == 1 and y_train.requires_grad  # the grad path calls neither
    _assert_within(y_train.detach(), want, bound)


def test_inference_path_runs_whenever_nothing_is_differentiated(monkeypatch):
    moe = _moe(8, 2, torch.float32)
    x = torch.randn(11, d)
    topi, topw = _routing(11, 8, 2, ())
    calls = _spy_paths(monkeypatch)
    with torch.inference_mode():
        a = moe.experts(x, topi, topw)
    moe.requires_grad_(False)
    b = moe.experts(x, topi, topw)  # grad mode on, but nothing requires grad
    assert len(calls) == 2 and not b.requires_grad
    assert torch.equal(a, b)
    moe.requires_grad_(True)
    moe.experts(x, topi, topw)  # the weights require grad: the grad path
    moe.experts(x, topi, topw.requires_grad_())
    assert len(calls) == 2
    c = moe.experts_inference(x.requires_grad_(), topi, topw)  # called directly: never differentiable
    assert len(calls) == 3 and not c.requires_grad and torch.equal(c, a)


def test_inference_path_is_deterministic_and_leaves_the_inputs_alone():
    moe = _moe(64, 8, torch.float32)
    x = torch.randn(29, d)
    topi, topw = _routing(29, 64, 8, (1,))
    x0, w0 = x.clone(), topw.clone()
    with torch.no_grad():
        a, b = moe.experts(x, topi, topw), moe.experts(x, topi, topw)
    assert torch.equal(a, b) and torch.equal(x, x0) and torch.equal(topw, w0)


def test_grad_path_is_unchanged():
    """With gradients, ``experts`` is exactly the sorted-gather / grouped GEMM / SwiGLU / un-sort
    composition it was before the no-grad path existed: same output and gradients, bit for bit."""
    moe = _moe(8, 2, torch.float32)
    x = torch.randn(23, d, requires_grad=True)
    topi, topw = _routing(23, 8, 2, (4,))
    topw.requires_grad_()

    def before(x, w):
        disp = make_dispatch(topi, 8)
        gate, up = moe.input_linear(x[disp.token], disp.counts).chunk(2, dim=-1)
        return combine(moe.output_linear(F.silu(gate) * up, disp.counts), w, disp)

    params = [x, topw, moe.input_linear.weight, moe.output_linear.weight]
    a, b = moe.experts(x, topi, topw), before(x, topw)
    assert torch.equal(a, b)
    g = torch.randn(a.shape)
    for ga, gb in zip(torch.autograd.grad(a, params, g), torch.autograd.grad(b, params, g)):
        assert torch.equal(ga, gb)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_forward_under_no_grad_matches_the_grad_forward(dtype):
    """The whole layer (router, shared expert, bias) in both modes: the routing is identical, so the
    outputs differ only by the routed experts' rounding (twice the derived bound at most)."""
    cfg = MoEConfig(router=RouterConfig(num_experts=8, top_k=2, gate_norm="renorm"), shared_experts=1)
    moe = MoE(d, f, cfg).to(dtype)
    x = torch.randn(2, 13, d).to(dtype)
    with torch.no_grad():
        out_inf = moe(x)
    out = moe(x)
    assert torch.equal(out_inf.router.indices, out.router.indices)
    assert out.y.requires_grad and not out_inf.y.requires_grad
    x_N = x.reshape(-1, d)
    _, bound = _reference_and_bound(x_N, moe.input_linear.weight, moe.output_linear.weight,
                                    out.router.indices, out.router.weights)  # fmt: skip
    eps = torch.finfo(dtype).eps
    shared = moe.shared(x).reshape(-1, d).detach().double().abs()
    # the shared expert is computed identically; adding it rounds once more in each path
    tol = 2 * bound + 2 * eps * (shared + moe.experts(x_N, out.router.indices, out.router.weights).detach().double().abs())
    _assert_within(out_inf.y.reshape(-1, d), out.y.detach().reshape(-1, d).double(), tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["auto", "grouped", "reference"])
@pytest.mark.parametrize("E,K,T,empty", CASES)
def test_inference_path_differs_from_the_grad_path_only_in_the_slot_sum(E, K, T, empty, impl, dtype):
    """A tighter check than the float64 one (whose bf16 bound is loose): both paths run the same
    grouped GEMMs on the same rows and the same SwiGLU, so their expert rows y are equal and only
    the fp32 sum of the K gated rows differs in order (slot order vs expert order). Each fp32 sum
    (with its gate products) is within K eps32 / 2 sum_k |w_k y_k| of the exact one, so the two are
    within K eps32 sum_k |w_k y_k|: doubled here because that sum is itself computed in the dtype.
    The final stores in the dtype then differ by at most one rounding, eps |y|."""
    moe = _moe(E, K, dtype)
    x = torch.randn(T, d).to(dtype)
    topi, topw = _routing(T, E, K, empty)
    topw = topw.to(dtype)
    with torch.no_grad():
        y_inf = moe.experts(x, topi, topw, impl)
        disp = make_dispatch(topi, E)
        gate, up = moe.input_linear(x[disp.token], disp.counts).chunk(2, dim=-1)
        y_MO = moe.output_linear(F.silu(gate) * up, disp.counts)
        y_train = combine(y_MO, topw, disp)
        gated_abs = combine(y_MO.abs(), topw.abs(), disp).double()  # sum_k |w_k y_k|, up to rounding
    assert torch.equal(y_train, moe.experts_train(x, topi, topw, impl).detach())
    u, u32 = torch.finfo(dtype).eps, torch.finfo(torch.float32).eps
    bound = 2 * K * u32 * gated_abs + u * y_train.double().abs()
    _assert_within(y_inf, y_train.double(), bound)


def test_hooked_or_named_impl_linears_go_through_the_modules(monkeypatch):
    """Expert parallelism wraps the ExpertLinear modules in hooks (and shards their weights): then
    the no-grad path must call the modules, not read their weights."""
    moe = _moe(8, 2, torch.float32)
    x = torch.randn(11, d)
    topi, topw = _routing(11, 8, 2, ())
    calls = _spy_paths(monkeypatch)
    seen = []
    moe.output_linear.register_forward_pre_hook(lambda _m, args: seen.append(1))
    with torch.no_grad():
        moe.experts(x, topi, topw)
    assert calls == ["combine_add"] and seen == [1]
