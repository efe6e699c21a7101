"""One-line verdicts on the long-context targets, computed from an ``evaluate`` result.

Targets (generation-scored retrieval, all tasks pooled, methods labelled "<kind> <density>"):

- density 0.5: the searched plan's accuracy averaged over the lengths >= 2048 is >= 0.9 x dense's,
  and at no length is it below uniform (StreamingLLM) at equal density;
- density 0.25: >= 2 x uniform (accuracy averaged over lengths >= 2048);
- perplexity at lengths >= 4096, density 0.5: within 5% of dense.

Each line states the numbers, n and whether the target is met; "not met" is stated as plainly as
"met". A verdict from fewer than ``FULL_N`` prompts per (task, length) cell, or where dense itself
retrieves almost nothing, is marked as inconclusive: it compares point estimates only.
"""

from __future__ import annotations

from ..metrics.stats import paired_ratio
from .report import cells, length_label, paired

FULL_N = 20  # prompts per (task, length) cell in the full grid


def _caveat(results, lengths, dense) -> str:
    sizes = [c["n"] for (m, t, N), c in cells(results).items() if t != "all" and N in lengths]
    notes = []
    if sizes and min(sizes) < FULL_N:
        notes.append(f"n={min(sizes)} per task cell < {FULL_N}")
    if dense is not None and dense < 0.3:
        notes.append(f"dense itself only {dense:.2f}")
    return f" (INCONCLUSIVE: {'; '.join(notes)})" if notes else ""


def _span(lengths) -> str:
    return "/".join(map(length_label, lengths))


def _mean_acc(c, method, lengths):
    accs = [c[(method, "all", N)]["acc"] for N in lengths if (method, "all", N) in c]
    return (sum(accs) / len(accs)) if accs else None, sum(c[(method, "all", N)]["n"] for N in lengths if (method, "all", N) in c)


def verdicts(results, densities=(0.5, 0.25), labels: dict | None = None) -> list[str]:
    """The target lines. ``labels``: {density: (plan label, uniform label)} where the methods are not
    named "mixattn D" / "uniform D" (``mixattn eval`` names a plan by its file)."""
    labels = labels or {}
    c = cells(results)
    lengths = sorted({r["length"] for r in results["retrieval"]})
    long_ = [N for N in lengths if N >= 2048] or lengths
    out = []

    def both(*ms) -> list[int]:  # like with like: the lengths every method in a line was scored at
        return [N for N in long_ if all((x, "all", N) in c for x in ms)]

    for d in densities:
        m, u = labels.get(d, (f"mixattn {d}", f"uniform {d}"))
        if _mean_acc(c, m, long_)[0] is None:
            continue
        with_dense = both(m, "dense")
        dense = _mean_acc(c, "dense", with_dense)[0] if with_dense else None
        if d == 0.5 and dense is None:  # judged against dense: without it, not against the 0.25 target
            acc, n = _mean_acc(c, m, long_)
            out.append(f"density 0.5: {m} {acc:.2f} over {_span(long_)} (n={n}); dense not evaluated in this run -> NOT SHOWN")
        elif d == 0.5:
            acc, n = _mean_acc(c, m, with_dense)
            ratio = acc / dense if dense else float("inf")
            below = [N for N in lengths if (u, "all", N) in c and (m, "all", N) in c
                     and c[(m, "all", N)]["acc"] < c[(u, "all", N)]["acc"]]  # fmt: skip
            uni = _mean_acc(c, u, long_)[0]
            ok = ratio >= 0.9 and not below and uni is not None
            p = paired(results, m, "dense", with_dense)["p"]
            vs_u = f"below uniform at {', '.join(map(str, below)) if below else 'no length'}" if uni is not None else (
                "uniform not evaluated (the second half of the target is not shown)")  # fmt: skip
            out.append(f"density 0.5: {m} {acc:.2f} vs dense {dense:.2f} over {_span(with_dense)} (n={n} each; "
                       f"ratio {ratio:.2f}, target >= 0.90; paired p={p:.2g}); {vs_u} -> {'MET' if ok else 'NOT MET'}"
                       + _caveat(results, with_dense, dense))  # fmt: skip
        elif not both(m, u):
            acc, n = _mean_acc(c, m, long_)
            out.append(f"density {d}: {m} {acc:.2f} over {_span(long_)} (n={n}); {u} not evaluated -> NOT SHOWN")
        else:
            common = both(m, u)
            acc, n = _mean_acc(c, m, common)
            uni = _mean_acc(c, u, common)[0]
            dense_c = _mean_acc(c, "dense", common)[0] if both(m, u, "dense") == common else None
            ratio = f"{acc / uni:.2f}" if uni else "undefined (uniform 0)"
            p = paired(results, m, u, common)["p"]
            ok = acc >= 2 * uni if uni else acc > 0
            out.append(f"density {d}: {m} {acc:.2f} vs {u} {uni:.2f} over {_span(common)} (n={n} each; ratio {ratio}, "
                       f"target >= 2; paired p={p:.2g}); vs dense {dense_c if dense_c is None else f'{dense_c:.2f}'} -> "
                       f"{'MET' if ok else 'NOT MET'}" + _caveat(results, common, dense_c))  # fmt: skip
    ppl = results.get("ppl", {})
    half = labels.get(0.5, ("mixattn 0.5",))[0]
    if "dense" in ppl and half in ppl:
        rows = []
        for N, p in ppl[half].items():
            dense_nll = ppl["dense"].get(N, {}).get("nll")
            if int(N) >= 4096 and dense_nll and len(p.get("nll", ())) == len(dense_nll):
                rows.append((N, paired_ratio(p["nll"], dense_nll)))
        if rows:
            point = all(r["ratio"] <= 1.05 for _, r in rows)
            sure = all(r["hi"] <= 1.05 for _, r in rows)
            txt = ", ".join(f"{r['ratio'] - 1:+.1%} [{r['lo'] - 1:+.1%}, {r['hi'] - 1:+.1%}] @{N} ({r['windows']} windows)"
                            for N, r in rows)  # fmt: skip
            verdict = "MET" if sure else "MET on the point estimate (the interval reaches past +5%)" if point else "NOT MET"
            out.append(f"perplexity, density 0.5 vs dense (paired over windows): {txt}; target within +5% -> {verdict}")
        else:
            out.append("perplexity at >= 4096 tokens: not measured in this grid -> NOT SHOWN")
    if "wall_s" in results:
        out.append(f"wall time {results['wall_s'] / 60:.1f} min (make demo target <= 15 min on 2 cores)")
    return out


def searched_verdicts(results) -> list[str] | None:
    """The target lines for the plans in ``results["budgets"]`` ({plan label: the density it was
    searched at}, written by ``mixattn eval`` from each plan's ``meta["budget"]``) at 0.5 and 0.25,
    each against its ``uniform @<label>`` row (``uniform:match``); None when no plan has such a budget."""
    labels = {}
    for name, d in results.get("budgets", {}).items():
        if d in (0.5, 0.25) and d not in labels:
            labels[d] = (name, f"uniform @{name}")
    return verdicts(results, tuple(labels), labels) if labels else None

