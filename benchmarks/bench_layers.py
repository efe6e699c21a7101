"""Layer benchmark (issue: core layers): MoE FFN, MoH and MoA against their baselines, fp32.

    python benchmarks/bench_layers.py [--quick] [--threads N] [--rounds R] [--moe-only]

Prints markdown tables. Every ratio compares two timings taken in the same run; every fast path is
checked against its baseline's output before it is timed. The MoE cases interleave their variants
round by round (R rounds after one warm-up call each) and report medians: times as the median of
the rounds, ratios as the median of the per-round ratios, so that load from other jobs on a shared
machine hits every variant alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model, stamp, table, timeit  # noqa: E402

from mixattn import kernels  # noqa: E402
from mixattn.kernels.sdpa import causal_sdpa  # noqa: E402
from mixattn.layers import Attention, AttentionConfig, MoAAttention, MoAConfig, MoE, MoEConfig, RouterConfig  # noqa: E402
from mixattn.layers.attention import AttnContext, RotaryEmbedding  # noqa: E402


def hf_style_moe(x, w_in, w_out, topi, topw):
    """HF Mixtral-style loop: per expert, torch.where over the routing, index the stacked weight w[e]."""
    out = torch.zeros_like(x)
    for e in range(w_in.shape[0]):
        tok, slot = torch.where(topi == e)
        gate, up = F.linear(x[tok], w_in[e]).chunk(2, -1)
        y = F.linear(F.silu(gate) * up, w_out[e]) * topw[tok, slot, None]
        out = out.index_add(0, tok, y)
    return out


def interleaved(fns: dict, rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Wall times of each ``fn``, one call of every variant per round, variants in turn."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times


def median_ratio(num: list[float], den: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(num, den))


def bench_moe(T, d, f, E, k, rounds):
    """Routed experts only. "fwd" runs under no_grad, as inference does: MoE then takes its no-grad
    path (with impl "auto": one expert at a time through reused buffers, in-place SwiGLU, index_add
    combine); "fwd+bwd" takes the differentiable path. Extra forward columns: the no-grad path with
    impl "grouped" (whole-batch grouped GEMMs + combine_add), and the differentiable path's forward
    under no_grad, which is what "fwd" ran before the no-grad path existed."""
    moe = MoE(d, f, MoEConfig(router=RouterConfig(num_experts=E, top_k=k, gate_norm="renorm")))
    x = torch.randn(T, d, requires_grad=True)
    r = moe.router(x.detach()[None])
    topi, topw = r.indices, r.weights.detach()
    w_in, w_out = moe.input_linear.weight, moe.output_linear.weight

    def ours(impl, path="experts"):
        def run():
            return getattr(moe, path)(x, topi, topw, impl)

        return run

    hf = lambda: hf_style_moe(x, w_in, w_out, topi, topw)  # noqa: E731
    with torch.no_grad():
        torch.testing.assert_close(ours("auto")(), hf(), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours("reference")(), hf(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours("auto")(), hf(), atol=1e-4, rtol=1e-4)
    g = torch.randn(T, d)

    def fb(fn):
        return lambda: torch.autograd.grad(fn(), [x, w_in, w_out], g)

    flops = 6 * T * k * d * f  # 2 * rows * (d*2f + f*d)
    a = torch.randn(T * k, d)
    b1, b2 = torch.randn(d, 2 * f), torch.randn(f, d)
    h = torch.randn(T * k, f)
    rows = []
    for mode, wrap in (("fwd", lambda fn: fn), ("fwd+bwd", fb)):
        fns = {"hf": wrap(hf), "loop": wrap(ours("reference")), "ours": wrap(ours("auto"))}
        if mode == "fwd":
            fns["dense"] = lambda: (a @ b1, h @ b2)
            fns["grouped"] = ours("grouped")
            fns["grad path"] = ours("auto", "experts_train")
        with torch.set_grad_enabled(mode != "fwd"):
            ts = interleaved(fns, rounds)
        med = {name: statistics.median(v) for name, v in ts.items()}
        row = [f"MoE T={T} d={d} f={f} E={E} k={k}", mode, f"{T / med['ours']:,.0f}", f"{T / med['loop']:,.0f}",
               f"{T / med['hf']:,.0f}", f"**{median_ratio(ts['hf'], ts['ours']):.2f}x**"]  # fmt: skip
        if mode == "fwd":
            pct, pct_before = median_ratio(ts["dense"], ts["ours"]), median_ratio(ts["dense"], ts["grad path"])
            row.append(f"{flops / med['ours'] / 1e9:.1f} / {flops / med['dense'] / 1e9:.1f} = **{pct:.0%}**")
            pct_grouped = median_ratio(ts["dense"], ts["grouped"])
            row.append(f"{median_ratio(ts['hf'], ts['grouped']):.2f}x, {pct_grouped:.0%}")
            row.append(f"{median_ratio(ts['hf'], ts['grad path']):.2f}x, {pct_before:.0%}")
        else:
            row += ["", "", ""]
        rows.append(row)
    return rows


def bench_moh(T, H, D, shared, topk, repeats):
    q, k, v = (torch.randn(1, H, T, D) for _ in range(3))
    routed = H - shared
    scores = torch.rand(1, T, routed)
    active = torch.zeros(1, T, routed, dtype=torch.bool).scatter_(2, scores.topk(topk, -1).indices, True)
    sparse = kernels.get("head_sparse_attention", "gather")
    ref = kernels.get("head_sparse_attention", "reference")
    qr, kr, vr = q[:, shared:], k[:, shared:], v[:, shared:]
    torch.testing.assert_close(sparse(qr, kr, vr, active), ref(qr, kr, vr, active), atol=1e-5, rtol=1e-5)

    def moh(kernel=sparse):
        causal_sdpa(q[:, :shared], k[:, :shared], v[:, :shared])
        kernel(qr, kr, vr, active)

    t_dense = timeit(lambda: causal_sdpa(q, k, v), repeats)
    t_moh = timeit(moh, repeats)
    t_mask = timeit(lambda: moh(ref), repeats)
    frac = (shared + topk) / H
    return [f"MoH T={T} H={H} D={D}", f"{frac:.0%} ({shared} shared + top-{topk} of {routed})",
            f"{t_dense * 1e3:.0f}", f"{t_moh * 1e3:.0f}", f"**{t_moh / t_dense:.2f}x**",
            f"{t_mask / t_dense:.2f}x"]  # fmt: skip


def bench_moa(T, d, Hkv, D, E, k, repeats):
    acfg = AttentionConfig(hidden_dim=d, num_heads=Hkv * k, num_kv_heads=Hkv, head_dim=D)
    dense = Attention(acfg)
    moa = MoAAttention(acfg, MoAConfig(router=RouterConfig(num_experts=E, top_k=k, gate_norm="softmax_topk")))
    cos, sin = RotaryEmbedding(D)(torch.arange(T))
    ctx = AttnContext(cos, sin)
    x = torch.randn(1, T, d, requires_grad=True)
    g = torch.randn(1, T, d)
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        if mode == "fwd":
            run = lambda layer: lambda: layer(x, ctx)  # noqa: E731
        else:
            run = lambda layer: lambda: torch.autograd.grad(layer(x, ctx).y, [x], g)  # noqa: E731
        with torch.set_grad_enabled(mode != "fwd"):
            t_dense, t_moa = timeit(run(dense), repeats), timeit(run(moa), repeats)
        rows.append([f"MoA T={T} d={d} E={E} k={k} ({Hkv * k} active q heads)", mode, f"{t_dense * 1e3:.0f}",
                     f"{t_moa * 1e3:.0f}", f"**{t_moa / t_dense:.2f}x**"])  # fmt: skip
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--rounds", type=int, help="interleaved MoE rounds (default 5, 1 with --quick)")
    ap.add_argument("--moe-only", action="store_true", help="only the MoE table")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    rep = 1 if a.quick else 3
    print(f"## Layer benchmark\n\nCPU: {cpu_model()}; {stamp()}\n")
    moe_cases = [(256, 64, 128, 8, 2), (256, 64, 64, 16, 4)] if a.quick else [
        (4096, 512, 1024, 8, 2), (4096, 512, 1024, 64, 8)]  # fmt: skip
    rounds = a.rounds or (1 if a.quick else 5)
    rows = [r for c in moe_cases for r in bench_moe(*c, rounds)]
    print(f"### MoE FFN (routed experts only; tokens/s, higher is better; medians of {rounds} interleaved rounds)\n")
    print(table(rows, ["case", "mode", "ours (auto)", "ours (reference loop)", "HF-style where loop",
                       "ours vs HF", "fwd GFLOP/s: ours / dense matmul", "fwd, impl=grouped: vs HF, % of dense",
                       "fwd by the grad path (before): vs HF, % of dense"]))  # fmt: skip
    if a.moe_only:
        return
    T_moh = [256] if a.quick else [2048, 8192]
    rows = [bench_moh(T, 16, 64, s, k, rep) for T in T_moh for s, k in ((4, 4), (8, 4))]
    print("\n### MoH attention core vs dense causal MHA (ms, lower is better)\n")
    print(table(rows, ["case", "active heads", "dense ms", "MoH ms", "MoH / dense", "mask-after-compute / dense"]))
    rows = bench_moa(256 if a.quick else 2048, 512, 4, 64, 8, 2, rep)
    print("\n### MoA (E=8, k=2) vs dense GQA with the same active query heads (ms)\n")
    print(table(rows, ["case", "mode", "dense GQA ms", "MoA ms", "MoA / dense"]))


if __name__ == "__main__":
    main()
