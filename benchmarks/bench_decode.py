"""Decode attention kernels: one query per row over a cache slice, fused SDPA vs two GEMMs.

    python benchmarks/bench_decode.py --threads 1

The shapes are SmolLM2-135M's (3 KV heads, 3 query heads each, head dim 64); the keys are the
first n of 8192 preallocated slots, as the caches hand them over (strided views). Each round calls
every kernel ``--calls`` times in turn; the table gives medians over ``--rounds`` rounds of CPU time
per call and of the per-round ratio. ``auto`` (``kernels.decode.fastest``) keeps the faster per
shape bucket on the machine it runs on; this table shows why the choice is measured, not assumed.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model, stamp, table  # noqa: E402

from mixattn.kernels import decode  # noqa: E402


def per_call(fn, calls: int) -> float:
    t = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - t) / calls


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="512,2048,4096,8000")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--threads", type=int)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for B in map(int, a.batches.split(",")):
            for n in map(int, a.lengths.split(",")):
                g = torch.Generator().manual_seed(n)
                k_, v_ = (torch.randn(B, 3, 8192, 64, generator=g).to(dtype) for _ in range(2))
                k, v = k_[:, :, :n], v_[:, :, :n]  # strided views, as the cache's
                q = torch.randn(B, 3, 3, 64, generator=g).to(dtype)
                fns = {name: functools.partial(f, q, k, v) for name, f in decode.ATTN.items()}
                err = (fns["matmul"]().float() - fns["sdpa"]().float()).abs().max().item()
                times = {name: [] for name in fns}
                for _ in range(a.rounds):
                    for name, fn in fns.items():
                        times[name].append(per_call(fn, a.calls))
                ratio = statistics.median(s / m for s, m in zip(times["sdpa"], times["matmul"]))
                rows.append([str(dtype).removeprefix("torch."), B, n, f"{statistics.median(times['sdpa']) * 1e6:.0f}",
                             f"{statistics.median(times['matmul']) * 1e6:.0f}", f"**{ratio:.2f}x**", f"{err:.1e}"])  # fmt: skip
                print(f"{dtype} B={B} n={n} done", file=sys.stderr, flush=True)
    print(f"## Decode attention: one query per row, 3 KV heads x 3 query heads, D 64\n\nCPU: {cpu_model()}; "
          f"{stamp().replace('dtype: float32; ', '')}; {a.rounds} rounds x {a.calls} calls\n")  # fmt: skip
    print(table(rows, ["dtype", "batch", "keys n", "sdpa us/call", "matmul us/call", "matmul speed-up",
                       "max |matmul - sdpa|"]))  # fmt: skip


if __name__ == "__main__":
    main()
