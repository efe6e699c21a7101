"""Sparse attention benchmark (issue: per-head sparse attention), fp32.

    python benchmarks/bench_sparse.py [--lengths 4096,8192,16384] [--decode-context 4096] [--threads N]

1. Prefill attention core at density 0.25 (SmolLM2 geometry: 9 query heads, 3 KV heads, head dim 64)
   for a uniform plan and a heterogeneous one, blocked and flex kernels, as a ratio to dense causal
   SDPA in the same run. Every sparse output is checked against another path first.
2. Decode tokens/s of MixtureLM from smollm2-135m at a long context with a density-0.5 uniform plan
   (ragged per-head cache) against the dense KV cache, and the KV bytes each allocates.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import stamp, table, timeit  # noqa: E402

import mixattn  # noqa: E402
from mixattn import kernels  # noqa: E402
from mixattn.compress import HeadRule, Plan, apply_plan, remove_plan  # noqa: E402
from mixattn.eval.speed import measure  # noqa: E402
from mixattn.kernels.sdpa import causal_sdpa  # noqa: E402


def plans(N: int, density: float = 0.25):
    """Uniform (StreamingLLM) and heterogeneous (one dense head, two narrow ones) at the same density."""
    uni = Plan.uniform(1, 3, density, N, sink=64).layers[0]
    narrow = HeadRule(64, 0.0, max(0.0, (3 * density - 1) / 2 - 64 / N))
    het = (HeadRule(0, 0.0, 1.0), narrow, narrow) if density > 1 / 3 else (
        HeadRule(64, 0.0, 2 * density - 64 / N), HeadRule(64, 0.0, density / 2 - 64 / N),
        HeadRule(64, 0.0, density / 2 - 64 / N))  # fmt: skip
    return {"uniform": uni, "heterogeneous": het}


def causal_pairs(N: int) -> int:
    return N * (N + 1) // 2


def kept_pairs(N: int, sink: torch.Tensor, span: torch.Tensor) -> float:
    """Mean over KV heads of the (query, key) pairs a sink + window rule keeps over N queries."""
    i = torch.arange(N, dtype=torch.float64)[:, None]  # query positions
    return float(torch.minimum(i + 1, (sink + span)[None].double()).sum(0).mean())


def bench_prefill(N, repeats):
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 9, N, 64), torch.randn(1, 3, N, 64), torch.randn(1, 3, N, 64)
    rows = []
    with torch.no_grad():
        t_dense = timeit(lambda: causal_sdpa(q, k, v), repeats)
        for name, rules in plans(N).items():
            sink = torch.tensor([r.sink for r in rules])
            span = torch.tensor([r.span(N) for r in rules])
            density = sum(r.density(N) for r in rules) / 3
            blocked = kernels.get("sparse_attention", "blocked")
            flex = kernels.get("sparse_attention", "flex")
            torch.testing.assert_close(flex(q, k, v, sink, span), blocked(q, k, v, sink, span), atol=1e-4, rtol=1e-4)
            t_b = timeit(lambda: blocked(q, k, v, sink, span), repeats)  # noqa: B023
            t_f = timeit(lambda: flex(q, k, v, sink, span), repeats)  # noqa: B023
            bound = causal_pairs(N) / kept_pairs(N, sink, span)
            rows.append([N, name, f"{density:.3f}", f"{t_dense * 1e3:.0f}", f"{t_b * 1e3:.0f}", f"{t_f * 1e3:.0f}",
                         f"**{t_dense / t_b:.2f}x**", f"**{t_dense / t_f:.2f}x**", f"{bound:.2f}x"])  # fmt: skip
    return rows


def bench_decode(context, new_tokens, density, batches):
    """Rows per batch size: dense KV cache, then the ragged cache under a uniform plan (same run)."""
    model = mixattn.load("smollm2-135m").eval()
    N = context + new_tokens
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # read once per step
    rows = []
    for batch in batches:
        res = {}
        for name in ("dense", f"uniform {density}"):
            remove_plan(model)
            if name != "dense":
                apply_plan(model, Plan.uniform(model.cfg.num_layers, model.cfg.num_kv_heads, density, N, sink=64))
            res[name] = r = measure(model, context, new_tokens, batch=batch)
            rows.append([batch, name, f"{r['prefill_s']:.1f}", f"{r['decode_tok_s']:.2f}", f"{r['kv_bytes'] / 2**20:.1f}"])
        dense, sparse = res.values()
        rows[-1][3] += f" (**{sparse['decode_tok_s'] / dense['decode_tok_s']:.2f}x**)"
        rows[-1][4] += f" (**{sparse['kv_bytes'] / dense['kv_bytes']:.3f}x**)"
        rows[-1].append(f"{(weights + dense['kv_bytes']) / (weights + sparse['kv_bytes']):.2f}x")
        rows[-2].append("")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="4096,8192,16384")
    ap.add_argument("--decode-context", type=int, default=4096)
    ap.add_argument("--decode-batches", default="1,4", help="comma-separated batch sizes for the decode rows")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--threads", type=int)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"## Sparse attention benchmark\n\n{stamp()}\n")
    rows = [r for N in map(int, a.lengths.split(",")) for r in bench_prefill(N, a.repeats)]
    print("### Prefill attention core, density 0.25 (ms; ratio = dense time / sparse time)\n")
    print(table(rows, ["N", "plan", "density", "dense SDPA", "blocked", "flex", "blocked speed-up",
                       "flex speed-up", "work bound"]))
    print("\nwork bound = causal (query, key) pairs / pairs the plan keeps: the speed-up if time were "
          "proportional to work. It is below 1/density because density counts the cache kept by the "
          "last query, while early queries see short prefixes under both masks.")  # fmt: skip
    if not a.skip_decode:
        rows = bench_decode(a.decode_context, a.new_tokens, 0.5, [int(b) for b in a.decode_batches.split(",")])
        print(f"\n### Decode, smollm2-135m, {a.decode_context}-token context, {a.new_tokens} new tokens\n")
        print(table(rows, ["batch", "KV cache", "prefill s", "decode tokens/s", "KV MiB allocated", "traffic bound"]))
        print("\ntraffic bound = (weight bytes + dense KV bytes) / (weight bytes + sparse KV bytes): the "
              "speed-up if a decode step were limited by the bytes it reads, as it is on a CPU. Weights "
              "are read once per step for the whole batch, the cache once per sequence.")


if __name__ == "__main__":
    main()
