"""Whole-model prefill of smollm2-135m with a sparse plan against the same model dense, in one run.

    python benchmarks/bench_prefill.py [--lengths 4096,8192] [--impls auto,sdpa,flex] [--dtype float32]
    python benchmarks/bench_prefill.py --lengths 4096 --profile      # + torch.profiler op breakdown

Prefill = one forward over the prompt that fills the KV cache (ragged under a plan) and computes the
logits of the last position only, as ``generate`` does. Cases are interleaved round by round (dense,
plan 1, plan 2, ...), so load from other jobs hits them alike; the table gives the median of
``--repeats`` rounds after one warm-up round (flex compiles, ``auto`` times its candidates, both
cached). Times are process CPU seconds (with ``--threads 1``: the work done, unaffected by other jobs
on a shared machine) and wall seconds. Plans:

- uniform d: every KV head sink 64 + an elastic window (StreamingLLM), density d at N;
- heterogeneous d: per layer the three KV heads keep d/2, d and min(1, 3d/2) (rotating by layer),
  mean density d, three distinct rules per layer and 3 x 30 rules in all;
- ``--plan-file LABEL=PATH``: a plan from ``mixattn compress`` (its elastic rules evaluated at N), e.g.
  the searched ``full+window`` plans, whose full heads run plain causal SDPA.

"work bound" = the prefill time if attention time were proportional to the (query, key) pairs kept,
from the dense profile's attention share: 1 / (1 - a + a * kept / causal), a = the attention share.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model, plan_files, stamp, table  # noqa: E402

import mixattn  # noqa: E402
from mixattn.compress import HeadRule, Plan, apply_plan, remove_plan  # noqa: E402


def het_plan(layers: int, heads: int, density: float, N: int, sink: int = 64) -> Plan:
    ds = [density / 2, density, min(1.0, 1.5 * density)]
    rows = []
    for i in range(layers):
        rot = ds[i % 3 :] + ds[: i % 3]
        rows.append(tuple(HeadRule(sink, 0.0, round(max(0.0, d - sink / N), 6)) if d < 1 else HeadRule()
                          for d in rot[:heads]))  # fmt: skip
    return Plan(tuple(rows))


def plans(N: int, densities) -> dict:
    out = {}
    for d in densities:
        out[f"uniform {d}"] = Plan.uniform(30, 3, d, N, sink=64)
        out[f"heterogeneous {d}"] = het_plan(30, 3, d, N)
    return out


def kept_fraction(plan: Plan, T: int, N: int) -> float:
    """Kept causal (query, key) pairs over all of them, averaged over the plan's heads."""
    i = torch.arange(T, dtype=torch.float64)
    tot = [float(torch.minimum(i + 1, torch.tensor(float(r.kept(N)))).sum()) for r in plan.rules()]
    return sum(tot) / len(tot) / (T * (T + 1) / 2)


def prefill(model, ids, N) -> tuple[float, float]:
    """(wall s, process CPU s) of one prefill."""
    cache = model.new_cache(N)
    t, c = time.perf_counter(), time.process_time()
    with torch.no_grad():
        model(ids, cache, ref_len=N, logits_to_keep=1)
    return time.perf_counter() - t, time.process_time() - c


def attention_share(model, ids, N) -> float:
    """Share of a dense prefill's CPU time spent in SDPA (torch.profiler)."""
    from torch.profiler import profile

    remove_plan(model)
    with profile() as p, torch.no_grad():
        model(ids, model.new_cache(N), ref_len=N, logits_to_keep=1)
    ev = p.key_averages()
    total = sum(e.self_cpu_time_total for e in ev)
    attn = sum(e.cpu_time_total for e in ev if e.key == "aten::scaled_dot_product_attention")
    return attn / total


def profile_table(model, ids, N, plan, impl, rows=14) -> str:
    from torch.profiler import profile

    remove_plan(model)
    if plan is not None:
        apply_plan(model, plan, impl)
    with profile() as p, torch.no_grad():
        model(ids, model.new_cache(N), ref_len=N, logits_to_keep=1)
    return p.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="4096,8192")
    ap.add_argument("--densities", default="0.5,0.25")
    ap.add_argument("--impls", default="auto", help="sparse_attention kernels to time (auto, sdpa, flex)")
    ap.add_argument("--plans", help="comma-separated subset of plan names (default: all; 'none' for no synthetic plan)")
    ap.add_argument("--plan-file", action="append", metavar="[LABEL=]PATH", help="also time this plan JSON (repeatable)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--threads", type=int)
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    model = mixattn.load("smollm2-135m", a.dtype).eval()
    dtype = next(model.parameters()).dtype
    print(f"## Whole-model prefill, smollm2-135m, batch 1\n\nCPU: {cpu_model()}; {stamp(dtype)}\n")
    densities = [float(x) for x in a.densities.split(",")]
    impls = a.impls.split(",")
    rows = []
    for T in map(int, a.lengths.split(",")):
        N = T + 1
        ids = torch.randint(0, model.cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))
        ps = plans(N, densities)
        if a.plans:
            ps = {k: v for k, v in ps.items() if k in a.plans.split(",")}
        ps.update(plan_files(a.plan_file))
        cases = [("dense", None, None)] + [(f"{n} [{i}]", p, i) for n, p in ps.items() for i in impls]
        times = {c[0]: [] for c in cases}
        for r in range(a.repeats + 1):  # round 0: warm-up
            for name, plan, impl in cases:
                remove_plan(model)
                if plan is not None:
                    apply_plan(model, plan, impl)
                t = prefill(model, ids, N)
                print(f"T={T} round {r} {name}: wall {t[0]:.2f} s, CPU {t[1]:.2f} s", file=sys.stderr, flush=True)
                if r:
                    times[name].append(t)
        share = attention_share(model, ids, N)
        med = {n: [statistics.median(t[i] for t in ts) for i in (0, 1)] for n, ts in times.items()}
        for name, plan, _ in cases:
            kept = 1.0 if plan is None else kept_fraction(plan, T, N)
            bound = 1 / (1 - share + share * kept)
            (w, c), (dw, dc) = med[name], med["dense"]
            rows.append([T, name, f"{kept:.3f}", f"{c:.2f}", " / ".join(f"{t[1]:.2f}" for t in times[name]),
                         f"**{dc / c:.2f}x**", f"{w:.2f}", f"{dw / w:.2f}x", f"{bound:.2f}x"])  # fmt: skip
        rows.append([T, f"(dense attention share {share:.0%})", "", "", "", "", "", "", ""])
        if a.profile:
            for name, plan, impl in cases[:2]:
                print(f"\n### profile T={T} {name}\n\n```\n{profile_table(model, ids, N, plan, impl)}\n```")
    print(table(rows, ["T", "plan [kernel]", "kept pairs", "median CPU s", "runs CPU s", "vs dense (CPU)",
                       "median wall s", "vs dense (wall)", "work bound"]))  # fmt: skip


if __name__ == "__main__":
    main()
