"""A decode step with a plan against the same step dense, interleaved step by step in one process.

    python benchmarks/bench_decode_step.py [--threads 1] [--context 4096] [--plan-file LABEL=PATH] [--steps 60]

Two copies of smollm2-135m (bf16 where the CPU has it, else fp32; oneDNN-prepacked weights), one
dense and one per plan, each prefilled with the same random ``--context`` tokens. Then each copy
takes one greedy decode step in turn, ``--steps`` times after 4 warm-up rounds: load from other
jobs hits every case alike, which a benchmark that runs the cases one after another cannot promise.
Times are the process's CPU time per step, medians; "speed-up" is dense's median over the plan's.
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
from mixattn.compress import apply_plan  # noqa: E402
from mixattn.layers.packed import pack  # noqa: E402
from mixattn.models.dtype import resolve_dtype  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--plan-file", action="append", required=True, metavar="LABEL=PATH")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dtype = resolve_dtype(a.dtype)
    cases = {"dense": None, **plan_files(a.plan_file)}
    N = a.context + a.steps + 8
    ids = torch.randint(100, 20000, (1, a.context), generator=torch.Generator().manual_seed(0))
    state = {}
    with torch.no_grad():
        for name, plan in cases.items():
            model = mixattn.load("smollm2-135m", dtype).eval()
            if plan is not None:
                apply_plan(model, plan)
            pack(model)
            cache = model.new_cache(N)
            state[name] = [model, cache, model(ids, cache, ref_len=N, logits_to_keep=1).logits[:, -1], a.context]

        def step(name) -> float:
            model, cache, logits, pos = state[name]
            t = time.process_time()
            logits = model(logits.argmax(-1)[:, None], cache, start_pos=pos, ref_len=N).logits[:, -1]
            state[name][2:] = [logits, pos + 1]
            return time.process_time() - t

        times = {name: [] for name in cases}
        for i in range(4 + a.steps):
            for name in cases:
                dt = step(name)
                if i >= 4:
                    times[name].append(dt)
    base = statistics.median(times["dense"])
    rows = [[name, a.context, f"{statistics.median(ts) * 1e3:.1f}", f"{1 / statistics.median(ts):.2f}",
             f"**{base / statistics.median(ts):.2f}x**"] for name, ts in times.items()]  # fmt: skip
    print(f"## Decode step, plan vs dense, interleaved (smollm2-135m, batch 1, packed)\n\nCPU: {cpu_model()}; {stamp(dtype)}\n")
    print(table(rows, ["path", "context", "ms/step (median)", "tok/s", "speed-up vs dense"]))


if __name__ == "__main__":
    main()
