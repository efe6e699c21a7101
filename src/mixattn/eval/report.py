"""Results as markdown tables, JSON and matplotlib PNGs (every file written atomically).

``write(results, out)`` renders an ``eval.suite.evaluate`` result: retrieval cells with n, accuracy
and 95% Wilson interval, every method's measured KV density at every length, paired exact McNemar
tests against a reference method on the same prompts, perplexity with its window interval, speed;
plus results.json, accuracy_vs_length.png (Wilson bars) and depth_length_heatmap.png.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..metrics.stats import fmt_cell, mcnemar, paired_ratio, paired_scores, proportion
from ..paths import save_figure, write_json, write_text


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """``columns``: (key, header) pairs. Missing values print as an en dash."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def length_label(N: int) -> str:
    """A context length as the tables and plots name it: 4096 -> "4k", 1000 -> "1000"."""
    return f"{N // 1024}k" if N % 1024 == 0 else str(N)


def _order(results) -> tuple[list, list, list]:
    recs = results["retrieval"]
    methods = list(dict.fromkeys([*results.get("density", {}), *(r["method"] for r in recs)]))
    lengths = sorted({r["length"] for r in recs} | {int(N) for d in results.get("density", {}).values() for N in d})
    task_names = list(dict.fromkeys(r["task"] for r in recs))
    return methods, lengths, task_names


def cells(results) -> dict:
    """{(method, task, length): proportion cell}, with task "all" pooling every task."""
    out = {}
    methods, lengths, task_names = _order(results)
    for m in methods:
        for t in [*task_names, "all"]:
            for N in lengths:
                hits = [r["hit"] for r in results["retrieval"] if r["method"] == m and r["length"] == N
                        and (t == "all" or r["task"] == t)]  # fmt: skip
                if hits:
                    out[(m, t, N)] = proportion(hits)
    return out


def _matched(results, a: str, b: str, field: str, length=None, task=None) -> tuple[list, list]:
    """``field`` of methods ``a`` and ``b`` on the prompts both were scored on, in the same order
    (optionally one length, or a list of lengths, and one task)."""
    key = lambda r: (r["task"], r["length"], r["depth"], r["index"])  # noqa: E731
    keep = None if length is None else set(length) if isinstance(length, (list, tuple, set)) else {length}
    sel = [r for r in results["retrieval"] if (keep is None or r["length"] in keep) and (task is None or r["task"] == task)]
    ra = {key(r): r[field] for r in sel if r["method"] == a}
    rb = {key(r): r[field] for r in sel if r["method"] == b}
    common = sorted(set(ra) & set(rb))
    return [ra[k] for k in common], [rb[k] for k in common]


def paired(results, a: str, b: str, length=None, task=None) -> dict:
    """Exact McNemar of methods ``a`` vs ``b`` on the prompts both were scored on (optionally one
    length, or a list of lengths, and one task)."""
    return mcnemar(*_matched(results, a, b, "hit", length, task))


def logprob_table(results, pairs) -> str:
    """The secondary score, paired: per pair of methods, on how many prompts the answer's content
    tokens are more likely under a than under b, the median difference of their log-probability
    (nats), and exact sign and Wilcoxon signed-rank p. No threshold: greedy hits say whether the
    model emits the key; this says whether the plan kept what it needs to, where the model is weak."""
    rows = []
    for a, b in pairs:
        la, lb = _matched(results, a, b, "logprob")
        if not la:
            continue
        t = paired_scores(la, lb)
        rows.append({"a": a, "b": b, "n": t["n"], "higher in a": t["a_higher"], "higher in b": t["b_higher"],
                     "median log p(a) - log p(b)": f"{t['median_diff']:+.2f}", "sign p": f"{t['sign_p']:.3g}",
                     "Wilcoxon p": f"{t['wilcoxon_p']:.3g}"})  # fmt: skip
    cols = ("a", "b", "n", "higher in a", "higher in b", "median log p(a) - log p(b)", "sign p", "Wilcoxon p")
    return markdown_table(rows, [(k, k) for k in cols])


def retrieval_table(results) -> str:
    methods, lengths, task_names = _order(results)
    c = cells(results)
    rows = []
    for m in methods:
        for t in [*task_names, "all"] if len(task_names) > 1 else task_names:
            rows.append({"method": m, "task": t, **{f"@{N}": fmt_cell(c.get((m, t, N))) for N in lengths}})
    return markdown_table(rows, [("method", "method"), ("task", "task")] + [(f"@{N}", f"{N}") for N in lengths])


def density_table(results) -> str:
    """Each method's measured mean KV density per length (mean over the scored prompts' reference lengths)."""
    methods, lengths, _ = _order(results)
    rows = []
    for m in methods:
        row = {"method": m}
        for N in lengths:
            ds = [r["density"] for r in results["retrieval"] if r["method"] == m and r["length"] == N]
            planned = results["density"].get(m, {})  # lengths are ints in memory, strings once read back from JSON
            row[N] = f"{sum(ds) / len(ds):.3f}" if ds else f"{planned.get(N, planned.get(str(N), float('nan'))):.3f}"
        rows.append(row)
    return markdown_table(rows, [("method", "method")] + [(N, f"KV density @{N}") for N in lengths])


def paired_table(results, pairs) -> str:
    _, lengths, _ = _order(results)
    rows = []
    for a, b in pairs:
        for N in [*lengths, None]:
            t = paired(results, a, b, N)
            if t["n"]:
                rows.append({"a": a, "b": b, "length": str(N or "all"), "n": t["n"], "a only": t["a_only"],
                             "b only": t["b_only"], "acc a - b": f"{t['diff']:+.3f}", "p": f"{t['p']:.3g}"})  # fmt: skip
    cols = [(k, k) for k in ("a", "b", "length", "n", "a only", "b only", "acc a - b", "p")]
    return markdown_table(rows, cols)


def other_table(results) -> str:
    rows = []
    methods = list(dict.fromkeys([*results.get("ppl", {}), *results.get("speed", {})]))
    for m in methods:
        row = {"method": m}
        for N, p in sorted(results.get("ppl", {}).get(m, {}).items(), key=lambda kv: int(kv[0])):
            row[f"ppl@{N}"] = f"{p['ppl']:.2f} [{p['ppl_lo']:.2f}, {p['ppl_hi']:.2f}] w={p['windows']}"
        sp = results.get("speed", {}).get(m)
        if sp:
            row.update(prefill_s=sp["prefill_s"], decode_tok_s=sp["decode_tok_s"], kv_mib=sp["kv_bytes"] / 2**20)
        rows.append(row)
    keys = list(dict.fromkeys(k for r in rows for k in r if k != "method"))
    heads = {"prefill_s": "prefill s (median)", "decode_tok_s": "decode tok/s (median)", "kv_mib": "KV MiB"}
    return markdown_table(rows, [("method", "method")] + [(k, heads.get(k, k)) for k in keys]) if keys else ""


def ppl_paired_table(results, pairs) -> str:
    """Perplexity of a over b on the same windows: ratio with its paired 95% t interval (``paired_ratio``)."""
    ppl, rows = results.get("ppl", {}), []
    for a, b in pairs:
        for N in sorted(set(ppl.get(a, {})) & set(ppl.get(b, {})), key=int):
            na, nb = ppl[a][N]["nll"], ppl[b][N]["nll"]
            if len(na) != len(nb):
                continue
            r = paired_ratio(na, nb)
            rows.append({"a": a, "b": b, "length": str(N), "windows": r["windows"], "higher in a": r["a_higher"],
                         "ppl a / ppl b": f"{r['ratio']:.4f} [{r['lo']:.4f}, {r['hi']:.4f}]"})  # fmt: skip
    cols = ("a", "b", "length", "windows", "higher in a", "ppl a / ppl b")
    return markdown_table(rows, [(k, k) for k in cols]) if rows else ""


def write(results: dict, out: Path, pairs=None, verdicts=None, header: str = "") -> str:
    """results.json, results.md and the plots under ``out``; returns the markdown.

    ``pairs``: (a, b) method pairs for paired tests (default: every method against the first).
    ``verdicts``: lines to print under the tables.
    """
    out = Path(out)
    methods, _, _ = _order(results)
    pairs = pairs if pairs is not None else [(m, methods[0]) for m in methods[1:]]
    parts = [header] if header else []
    if results["retrieval"]:
        parts += ["## Retrieval (greedy generation contains the key; accuracy [95% Wilson interval] n)",
                  retrieval_table(results), "## Measured KV density", density_table(results)]  # fmt: skip
        if pairs:
            parts += ["## Paired exact McNemar tests (same prompts; 'a only' = prompts only a got right)",
                      paired_table(results, pairs),
                      "## The answer's log-probability, paired (content tokens, nats; sign and Wilcoxon tests)",
                      logprob_table(results, pairs)]  # fmt: skip
    other = other_table(results)
    if other:
        parts += ["## Perplexity (95% interval over windows) and speed", other]
    ppl_pairs = ppl_paired_table(results, pairs) if pairs else ""
    if ppl_pairs:
        parts += ["## Perplexity ratio, paired (same windows; 95% t interval of the per-window NLL difference)", ppl_pairs]
    if verdicts:
        parts += ["## Verdicts", "\n".join(f"- {v}" for v in verdicts)]
    text = "\n\n".join(parts) + "\n"
    saved = dict(results, pairs=[list(p) for p in pairs], verdicts=list(verdicts or []))  # tables.py renders from it
    write_json(out / "results.json", _jsonable(saved), indent=1)
    write_text(out / "results.md", text)
    if results["retrieval"]:
        from .plots import plot_accuracy, plot_heatmap

        plot_accuracy(results, out / "accuracy_vs_length.png")
        plot_heatmap(results, out / "depth_length_heatmap.png")
    if results.get("speed"):
        from .plots import plot_speed

        plot_speed(results, out / "memory_speed.png")
    return text


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def plot_curves(curves: dict[str, list[tuple[float, float]]], path: Path, xlabel: str, ylabel: str, title: str):
    """One line per label; ``curves[label]`` is a list of (x, y)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, pts in curves.items():
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", markersize=3, label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
