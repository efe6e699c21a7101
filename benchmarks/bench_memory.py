"""Peak resident memory of ``generate`` as a user sees it: one process per case.

    python benchmarks/bench_memory.py [--length 8192] [--new 8] [--chunk 1024] [--dtype float32]

Each case runs in its own process: load smollm2-135m, apply the plan, warm up with a 256-token
generation (allocator pools), reset the peak RSS
(Linux ``/proc/self/clear_refs``), then ``generate(--new tokens)`` after a ``--length``-token prompt.
Reported: the process's peak RSS (VmHWM) over that call, its growth above the resident size just
before the call, and the KV cache bytes. The check the issue asks for: the plan's peak-RSS saving
against dense, divided by its KV saving (1.00 = the saving is exactly the cache's).

A first process runs the plan once at both lengths, so ``auto``'s kernel choice is timed and cached
on disk before the measured processes start, as on a machine where mixattn has run before: a
measured process compiles flex only where flex is the cached winner (and then its RSS shows it).

``--repeats R`` runs the case list R times, interleaved (a fresh process each time), and reports
each case's median peak with the spread of its runs: RSS differs between identical processes by
tens of MiB, about the size of the 10% window the check needs.

Cases: dense and a uniform density-0.5 plan, each in one pass and with ``prefill_chunk``; and
dense with every position's logits (the old prefill: ``logits_to_keep=0``), to show what keeping
only the last position saves.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model, stamp, table  # noqa: E402

CASES = ["dense", "dense, all logits", "uniform 0.5", "dense, chunked", "uniform 0.5, chunked"]


def _kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def child(a) -> dict:
    import mixattn
    from mixattn.compress import Plan, apply_plan

    if a.threads:
        torch.set_num_threads(a.threads)
    model = mixattn.load("smollm2-135m", a.dtype).eval()
    N = a.length + a.new
    if "uniform" in a.case:
        density = float(a.case.split("uniform ")[1].split(",")[0])
        apply_plan(model, Plan.uniform(30, 3, density, N, sink=64), a.impl)
    chunk = a.chunk if "chunked" in a.case else None
    ids = torch.randint(0, model.cfg.vocab_size, (1, a.length), generator=torch.Generator().manual_seed(0))
    if a.case.startswith("calibrate"):  # kernel choices for these shapes land in the on-disk cache
        model.generate(ids[:, :256], 2)
        model.generate(ids, 1)
        model.generate(ids, 1, prefill_chunk=a.chunk)  # the first chunk's shape
        return {}
    model.generate(ids[:, :256], 2)  # warm-up: allocator pools, any compile
    gc.collect()
    rss0 = _kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    kv = 0
    if a.case == "dense, all logits":  # the old prefill: logits (T, V) for every prompt position
        with torch.no_grad():
            cache = model.new_cache(N)
            model(ids, cache, ref_len=N)
            kv = model.kv_cache_bytes(cache)
    else:
        orig = model.new_cache

        def spy(ref_len=None):
            nonlocal kv
            caches = orig(ref_len)
            spy.caches = caches
            return caches

        model.new_cache = spy
        model.generate(ids, a.new, prefill_chunk=chunk)
        kv = model.kv_cache_bytes(spy.caches)
    peak = _kib("VmHWM")
    return {"peak": peak * 1024, "growth": (peak - rss0) * 1024, "kv": kv,
            "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # fmt: skip


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--new", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--impl", default="auto", help="sparse_attention kernel for the plans")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--repeats", type=int, default=1, help="runs of every case, interleaved; medians reported")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.case:
        print(json.dumps(child(a)))
        return
    runs: dict[str, list[dict]] = {}
    for case in ["calibrate uniform 0.5", *CASES * a.repeats]:
        cmd = [sys.executable, __file__, "--case", case, "--length", str(a.length), "--new", str(a.new),
               "--chunk", str(a.chunk), "--dtype", a.dtype, "--impl", a.impl]  # fmt: skip
        if a.threads:
            cmd += ["--threads", str(a.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{case} failed:\n{out.stderr[-3000:]}")
        runs.setdefault(case, []).append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{case}: {runs[case][-1]}", file=sys.stderr, flush=True)
    del runs["calibrate uniform 0.5"]
    res = {c: {k: statistics.median(r[k] for r in rs) for k in ("peak", "growth", "kv")} for c, rs in runs.items()}
    print(f"## Peak RSS, generate {a.new} tokens after {a.length}, one process per case\n")
    print(f"CPU: {cpu_model()}; {stamp(torch.float32 if a.dtype == 'float32' else a.dtype)}; chunk {a.chunk}; "
          f"median of {a.repeats} process(es) per case\n")
    mib = 2**20
    rows = []
    for case, r in res.items():
        base = res["dense, chunked" if "chunked" in case else "dense"]
        saving, kv_saving = base["peak"] - r["peak"], base["kv"] - r["kv"]
        ratio = f"{saving / kv_saving:.2f}" if kv_saving > 0 and "logits" not in case else ""
        spread = "–".join(f"{x / mib:.0f}" for x in (min(p["peak"] for p in runs[case]), max(p["peak"] for p in runs[case])))
        rows.append([case, f"{r['peak'] / mib:.0f}", spread, f"{r['growth'] / mib:.0f}", f"{r['kv'] / mib:.1f}",
                     f"{saving / mib:.0f}" if case != "dense" else "", f"{kv_saving / mib:.1f}" if kv_saving else "",
                     ratio])  # fmt: skip
    print(table(rows, ["case", "peak RSS MiB", "runs MiB", "peak - start MiB", "KV MiB", "RSS saving vs dense MiB",
                       "KV saving MiB", "RSS saving / KV saving"]))  # fmt: skip


if __name__ == "__main__":
    main()
