"""``mixattn eval``: several plans side by side on one model, one run.

Tasks: passkey / multikey / lines / passage retrieval over a length x depth grid (exact match and
teacher-forced accuracy), perplexity on long real text, and speed (prefill time, decode tokens/s,
KV bytes). Writes results.json, results.md and PNG plots (accuracy vs length per method, a depth x
length heatmap per method, memory/speed bars).
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm.auto import tqdm

from ..compress.apply import apply_plan, remove_plan
from . import retrieval, speed, tasks
from .perplexity import corpus_tokens, perplexity
from .report import markdown_table

RETRIEVAL = tuple(tasks.TASKS)


def evaluate(model, tok, plans: dict, task_names, lengths, depths, samples: int = 1, haystack_corpus="shakespeare",
             ppl_corpus="shakespeare", ppl_tokens: int = 4096, speed_context: int = 4096, out_dir=None,
             progress: bool = True) -> dict:  # fmt: skip
    """``plans``: label -> Plan (None = dense). Returns {"retrieval": [...], "ppl": {...}, "speed": {...}}."""
    from ..train.data import load_corpus

    unknown = [t for t in task_names if t not in (*RETRIEVAL, "ppl", "speed")]
    if unknown:
        raise ValueError(f"unknown task {unknown[0]!r}; valid: {', '.join((*RETRIEVAL, 'ppl', 'speed'))}")
    if max(lengths) > model.cfg.max_seq_len:
        raise ValueError(f"length {max(lengths)} exceeds the model's max_seq_len {model.cfg.max_seq_len}")
    hay = load_corpus(haystack_corpus, tokenizer=tok).val
    items = [(t, N, d, s) for t in task_names if t in RETRIEVAL for N in lengths for d in depths for s in range(samples)]
    built = {it: tasks.make(it[0], tok, hay, it[1], it[2], seed=1000 * it[3] + it[1]) for it in items}
    results: dict = {"retrieval": [], "ppl": {}, "speed": {}}
    for label, plan in plans.items():
        remove_plan(model)
        if plan is not None:
            apply_plan(model, plan)
        for it in tqdm(items, desc=f"eval {label}", disable=not progress):
            exact, acc = retrieval.score(model, built[it])
            results["retrieval"].append({"method": label, "task": it[0], "length": it[1], "depth": it[2],
                                         "sample": it[3], "exact": exact, "token_acc": acc})  # fmt: skip
        if "ppl" in task_names:
            results["ppl"][label] = perplexity(model, corpus_tokens(ppl_corpus, tok, ppl_tokens), context=ppl_tokens)
        if "speed" in task_names:
            results["speed"][label] = speed.measure(model, speed_context)
    remove_plan(model)
    if out_dir is not None:
        write(results, Path(out_dir), list(plans), lengths)
    return results


def summary_rows(results: dict, methods, lengths) -> list[dict]:
    rows = []
    for m in methods:
        row = {"method": m}
        for N in lengths:
            hits = [r for r in results["retrieval"] if r["method"] == m and r["length"] == N]
            if hits:
                row[f"exact@{N}"] = sum(r["exact"] for r in hits) / len(hits)
                row[f"acc@{N}"] = sum(r["token_acc"] for r in hits) / len(hits)
        row["ppl"] = results["ppl"].get(m)
        sp = results["speed"].get(m)
        if sp:
            row.update(prefill_s=sp["prefill_s"], decode_tok_s=sp["decode_tok_s"], kv_mib=sp["kv_bytes"] / 2**20)
        rows.append(row)
    return rows


def write(results: dict, out: Path, methods, lengths) -> str:
    out.mkdir(parents=True, exist_ok=True)
    rows = summary_rows(results, methods, lengths)
    cols = [("method", "method")] + [(f"exact@{N}", f"exact @{N}") for N in lengths]
    cols += [(f"acc@{N}", f"token acc @{N}") for N in lengths]
    cols += [("ppl", "ppl"), ("prefill_s", "prefill s"), ("decode_tok_s", "decode tok/s"), ("kv_mib", "KV MiB")]
    cols = [c for c in cols if any(c[0] in r and r[c[0]] is not None for r in rows)]
    table = markdown_table(rows, cols)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(table + "\n")
    _plots(results, rows, out, methods, lengths)
    return table


def _plots(results, rows, out: Path, methods, lengths):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if results["retrieval"]:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for r in rows:
            ys = [r.get(f"acc@{N}") for N in lengths]
            ax.plot(lengths, ys, marker="o", label=r["method"])
        ax.set(xlabel="context length (tokens)", ylabel="teacher-forced answer accuracy", ylim=(-0.02, 1.02),
               xscale="log", xticks=lengths, xticklabels=[str(N) for N in lengths], title="retrieval vs length")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "accuracy_vs_length.png", dpi=110)
        plt.close(fig)
        depths = sorted({r["depth"] for r in results["retrieval"]})
        fig, axes = plt.subplots(1, len(methods), figsize=(2.4 * len(methods) + 1, 2.8), squeeze=False)
        for ax, m in zip(axes[0], methods):
            grid = np.full((len(depths), len(lengths)), np.nan)
            for di, d in enumerate(depths):
                for li, N in enumerate(lengths):
                    v = [r["token_acc"] for r in results["retrieval"] if (r["method"], r["depth"], r["length"]) == (m, d, N)]
                    grid[di, li] = np.mean(v) if v else np.nan
            ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            ax.set(title=m, xticks=range(len(lengths)), xticklabels=lengths, yticks=range(len(depths)),
                   yticklabels=[f"{d:.2f}" for d in depths], xlabel="length")  # fmt: skip
        axes[0][0].set_ylabel("depth")
        fig.tight_layout()
        fig.savefig(out / "depth_length_heatmap.png", dpi=110)
        plt.close(fig)
    if results["speed"]:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        names = list(results["speed"])
        axes[0].bar(names, [results["speed"][n]["kv_bytes"] / 2**20 for n in names], color="tab:blue")
        axes[0].set(ylabel="KV cache MiB allocated", title="memory")
        axes[1].bar(names, [results["speed"][n]["decode_tok_s"] for n in names], color="tab:green")
        axes[1].set(ylabel="decode tokens/s", title="speed")
        for ax in axes:
            ax.tick_params(axis="x", rotation=45, labelsize=8)
        fig.tight_layout()
        fig.savefig(out / "memory_speed.png", dpi=110)
        plt.close(fig)
