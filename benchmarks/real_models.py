"""Real-model checks on the embedded SmolLM2-135M-Instruct (issue: real checkpoints), CPU fp32.

    python benchmarks/real_models.py [--sections load,moh,moa,bam] [--steps 30] [--threads N]

Sections (results cached as JSON under runs/real_models/, printed as markdown):
  load  first (uncached) and cached load time; perplexity on 2k held-out tokens of Shakespeare and
        stdlib code, ours vs transformers' own GGUF-loaded model; a greedy sample.
  moh   dense -> MoH (75% of heads), perplexity before/after a short continue-training.
  moa   GQA -> MoA with k = E = 3 (exact), then k = 2 with the same continue-training.
  bam   branch into Shakespeare and Python specialists, upcycle (BTX, BAM full, BAM shared-KV),
        train each mixture with one budget, per-domain perplexity.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import stamp, table  # noqa: E402

import mixattn  # noqa: E402
from mixattn.convert import branch, dense_to_moh, gqa_to_moa, upcycle_bam  # noqa: E402
from mixattn.data import corpus_tokens  # noqa: E402
from mixattn.metrics.perplexity import perplexity  # noqa: E402
from mixattn.models.hf import embedded_gguf  # noqa: E402
from mixattn.train.data import load_corpus  # noqa: E402
from mixattn.train.loop import TrainConfig, train  # noqa: E402

OUT = Path("runs/real_models")
DOMAINS = ("shakespeare", "stdlib")


def ppl(model, tok, n=2048) -> dict:
    return {d: perplexity(model, corpus_tokens(d, tok, n)) for d in DOMAINS}


def finetune(model, tok, corpus, steps, out, lr=2e-4):
    cfg = TrainConfig(steps=steps, batch_size=4, seq_len=256, lr=lr, warmup_steps=max(1, steps // 10),
                      eval_every=steps, eval_batches=2)  # fmt: skip
    t0 = time.perf_counter()
    train(model, load_corpus(corpus, tokenizer=tok), cfg, out, progress=False, tokenizer=tok)
    return time.perf_counter() - t0


def section_load(args):
    with tempfile.TemporaryDirectory() as cache:
        os.environ["MIXATTN_CACHE"] = cache
        t0 = time.perf_counter()
        mixattn.load("smollm2-135m")
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        ours = mixattn.load("smollm2-135m")
        cached = time.perf_counter() - t0
        tok = mixattn.load_tokenizer("smollm2-135m")
    del os.environ["MIXATTN_CACHE"]
    from transformers import AutoModelForCausalLM

    path = embedded_gguf("smollm2-135m")
    theirs = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    rows = {}
    for d in DOMAINS:
        ids = corpus_tokens(d, tok, 2048)
        with torch.no_grad():
            ref = float(torch.nn.functional.cross_entropy(theirs(ids[None, :-1]).logits[0], ids[1:]).exp())
        rows[d] = {"ours": perplexity(ours, ids), "transformers": ref}
    prompt = tok.tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         add_generation_prompt=True, tokenize=False)  # fmt: skip
    ids = torch.tensor([tok.encode(prompt)])
    sample = tok.decode(ours.generate(ids, 24, stop_tokens=(tok.eos_token_id,))[0, ids.shape[1] :])
    return {"first_load_s": first, "cached_load_s": cached, "ppl": rows, "sample": sample}


def section_convert(args, kind):
    base = mixattn.load("smollm2-135m")
    tok = mixattn.load_tokenizer("smollm2-135m")
    res = {"dense": ppl(base, tok)}
    if kind == "moh":
        model = dense_to_moh(base, active_fraction=0.75)
        res["active_head_fraction"] = model.cfg.moh.active_fraction(model.cfg.num_heads)
        label = "moh"
    else:
        res["moa_k3_exact"] = ppl(gqa_to_moa(base), tok)
        model = gqa_to_moa(base, top_k=2)
        label = "moa_k2"
    res[f"{label}_converted"] = ppl(model, tok)
    res["train_s"] = finetune(model, tok, "shakespeare", args.steps, OUT / f"{label}-ct")
    res["steps"] = args.steps
    res[f"{label}_trained"] = ppl(model, tok)
    dense_ct = copy.deepcopy(base)  # the fair baseline: the dense model with the same continue-training
    finetune(dense_ct, tok, "shakespeare", args.steps, OUT / f"{label}-dense-ct")
    res["dense_trained"] = ppl(dense_ct, tok)
    return res


def section_bam(args):
    base = mixattn.load("smollm2-135m")
    tok = mixattn.load_tokenizer("smollm2-135m")
    spec_cfg = TrainConfig(steps=args.steps, batch_size=4, seq_len=256, lr=2e-4, warmup_steps=3,
                           eval_every=args.steps, eval_batches=2)  # fmt: skip
    t0 = time.perf_counter()
    specialists = branch(base, list(DOMAINS), spec_cfg, OUT / "branch", tokenizer=tok, progress=False)
    res = {"branch_s": time.perf_counter() - t0, "steps": args.steps, "base": ppl(base, tok)}
    for d, m in zip(DOMAINS, specialists):
        res[f"specialist_{d}"] = ppl(m, tok)
    avg = copy.deepcopy(base)
    avg.load_state_dict({k: (a + b) / 2 for (k, a), b in zip(specialists[0].state_dict().items(),
                                                            specialists[1].state_dict().values())})  # fmt: skip
    res["averaged"] = ppl(avg, tok)
    mix_cfg = TrainConfig(steps=args.steps, batch_size=4, seq_len=256, lr=1e-4, warmup_steps=3,
                          eval_every=args.steps, eval_batches=2)  # fmt: skip
    mixed = load_corpus(list(DOMAINS), tokenizer=tok)
    for name, attention in (("btx", "averaged"), ("bam_full", "experts"), ("bam_shared_kv", "shared_kv")):
        model = upcycle_bam(specialists, attention=attention)
        res[f"{name}_init"] = ppl(model, tok)
        t0 = time.perf_counter()
        train(model, mixed, mix_cfg, OUT / name, progress=False, tokenizer=tok)
        res[f"{name}_train_s"] = time.perf_counter() - t0
        res[name] = ppl(model, tok)
    return res


def fmt(p):
    return " / ".join(f"{p[d]:.2f}" for d in DOMAINS)


def report(results):
    print(f"## Real-model checks: SmolLM2-135M-Instruct\n\n{stamp()}\n")
    if "load" in results:
        r = results["load"]
        print(f"Load: first {r['first_load_s']:.1f} s (GGUF dequantise + cache), cached {r['cached_load_s']:.1f} s.\n")
        rows = [[d, f"{v['ours']:.3f}", f"{v['transformers']:.3f}", f"{abs(v['ours'] / v['transformers'] - 1):.2e}"]
                for d, v in r["ppl"].items()]  # fmt: skip
        print(table(rows, ["2048 held-out tokens", "mixattn ppl", "transformers ppl", "relative gap"]))
        print(f"\nGreedy sample (chat: 'What is the capital of France?'): {r['sample']!r}\n")
    for kind, label in (("moh", "moh"), ("moa", "moa_k2")):
        if kind in results:
            r = results[kind]
            rows = [["dense SmolLM2", fmt(r["dense"])]]
            if "moa_k3_exact" in r:
                rows.append(["MoA k=E=3 (exact conversion)", fmt(r["moa_k3_exact"])])
            rows += [[f"{label} converted, no training", fmt(r[f"{label}_converted"])],
                     [f"{label} after {r['steps']} steps ({r['train_s']:.0f} s)", fmt(r[f"{label}_trained"])],
                     [f"dense after the same {r['steps']} steps", fmt(r["dense_trained"])]]  # fmt: skip
            print(f"### {kind}\n")
            print(table(rows, ["model", "ppl shakespeare / stdlib"]) + "\n")
    if "bam" in results:
        r = results["bam"]
        rows = [["base SmolLM2", fmt(r["base"])]]
        rows += [[f"specialist: {d}", fmt(r[f"specialist_{d}"])] for d in DOMAINS]
        rows.append(["averaged specialists (merge, no training)", fmt(r["averaged"])])
        for name in ("btx", "bam_full", "bam_shared_kv"):
            rows.append([f"{name} upcycled, untrained", fmt(r[f"{name}_init"])])
            rows.append([f"{name} after {r['steps']} steps ({r[f'{name}_train_s']:.0f} s)", fmt(r[name])])
        print("### BAM (branch-train-mix)\n")
        print(table(rows, ["model", "ppl shakespeare / stdlib"]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="load,moh,moa,bam")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--report-only", action="store_true")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    results = {}
    run = {"load": section_load, "moh": lambda a: section_convert(a, "moh"),
           "moa": lambda a: section_convert(a, "moa"), "bam": section_bam}  # fmt: skip
    for name in a.sections.split(","):
        path = OUT / f"{name}.json"
        if not path.is_file() and not a.report_only:
            torch.manual_seed(0)
            path.write_text(json.dumps(run[name](a), indent=2))
            print(f"[{name} done]", file=sys.stderr)
        if path.is_file():
            results[name] = json.loads(path.read_text())
    report(results)


if __name__ == "__main__":
    main()
