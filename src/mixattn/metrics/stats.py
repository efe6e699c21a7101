"""Statistics for accuracy cells: Wilson score intervals and exact paired tests.

- ``wilson(k, n)``: the 95% Wilson score interval of a binomial proportion (Wilson 1927); unlike the
  normal approximation it stays inside [0, 1] and is not degenerate at 0/n or n/n.
- ``mcnemar(a, b)``: the exact McNemar test of two methods scored on the SAME prompts: only the
  discordant pairs count (a right and b wrong: ``b10``; a wrong and b right: ``b01``), and under the
  null each discordant pair is a fair coin, so the p-value is a two-sided binomial test of
  ``b10`` out of ``b10 + b01`` at 1/2 (the exact sign test).
"""

from __future__ import annotations

import math


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """(low, high) of the Wilson interval for ``k`` successes in ``n`` trials; (0, 1) when n == 0."""
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"wilson needs 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if k == 0 else max(0.0, centre - half)  # exact ends: rounding must not cut off p itself
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


def proportion(hits) -> dict:
    """{"n", "k", "acc", "lo", "hi"} of a list of booleans (acc None when empty)."""
    hits = [bool(h) for h in hits]
    n, k = len(hits), sum(hits)
    lo, hi = wilson(k, n)
    return {"n": n, "k": k, "acc": k / n if n else None, "lo": lo, "hi": hi}


def mcnemar(a, b) -> dict:
    """Exact McNemar (sign) test of paired booleans ``a`` and ``b`` (same prompts, same order).

    Returns {"n", "a_only" (b10), "b_only" (b01), "diff" (acc_a - acc_b), "p"}; p is 1 with no
    discordant pairs.
    """
    from scipy.stats import binomtest

    a, b = [bool(x) for x in a], [bool(x) for x in b]
    if len(a) != len(b):
        raise ValueError(f"paired test needs equal lengths, got {len(a)} and {len(b)}")
    a_only = sum(x and not y for x, y in zip(a, b))
    b_only = sum(y and not x for x, y in zip(a, b))
    m = a_only + b_only
    p = 1.0 if m == 0 else float(binomtest(a_only, m, 0.5).pvalue)
    diff = (sum(a) - sum(b)) / len(a) if a else 0.0
    return {"n": len(a), "a_only": a_only, "b_only": b_only, "diff": diff, "p": p}


def paired_scores(a, b) -> dict:
    """Paired continuous scores ``a``, ``b`` (same prompts, same order), e.g. the answer's log-probability.

    Returns {"n", "a_higher", "b_higher", "median_diff" (of a - b), "sign_p" (exact sign test),
    "wilcoxon_p" (Wilcoxon signed-rank, exact for small n: the sizes of the differences count too)};
    both p are 1 when every pair is tied.
    """
    from scipy.stats import wilcoxon

    a, b = [float(x) for x in a], [float(x) for x in b]
    if len(a) != len(b):
        raise ValueError(f"paired test needs equal lengths, got {len(a)} and {len(b)}")
    d = sorted(x - y for x, y in zip(a, b))
    sign = mcnemar([x > 0 for x in d], [x < 0 for x in d])
    nonzero = any(d)
    return {"n": len(d), "a_higher": sign["a_only"], "b_higher": sign["b_only"],
            "median_diff": (d[(len(d) - 1) // 2] + d[len(d) // 2]) / 2 if d else 0.0,
            "sign_p": sign["p"], "wilcoxon_p": float(wilcoxon(a, b).pvalue) if nonzero else 1.0}  # fmt: skip


def paired_ratio(nll_a, nll_b) -> dict:
    """Perplexity ratio of a over b from per-window mean NLLs on the SAME windows (same order).

    The per-window differences d = nll_a - nll_b carry the pairing (windows differ far more from each
    other than the methods do on one window), so the interval is the t interval of mean(d), mapped
    through exp: ratio = exp(mean d), lo/hi = exp(mean d -/+ t(0.975, W-1) sd(d) / sqrt(W)).
    Returns {"windows", "ratio", "lo", "hi", "a_higher"}; lo = hi = nan for one window.
    """
    if len(nll_a) != len(nll_b) or not nll_a:
        raise ValueError(f"paired ratio needs equal, non-empty window lists, got {len(nll_a)} and {len(nll_b)}")
    d = [float(x) - float(y) for x, y in zip(nll_a, nll_b)]
    mean, half = t_interval(d)
    return {"windows": len(d), "ratio": math.exp(mean), "lo": math.exp(mean - half), "hi": math.exp(mean + half),
            "a_higher": sum(x > 0 for x in d)}  # fmt: skip


def t_interval(xs) -> tuple[float, float]:
    """(mean, half-width of its 95% Student-t interval) of ``xs``; the half-width is nan for one value."""
    from scipy.stats import t as student_t

    n, mean = len(xs), sum(xs) / len(xs)
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return mean, float(student_t.ppf(0.975, n - 1)) * sd / math.sqrt(n)


def fmt_cell(cell: dict) -> str:
    """``0.65 [0.43, 0.82] n=20``; an en dash for an empty cell."""
    if not cell or not cell.get("n"):
        return "–"
    return f"{cell['acc']:.2f} [{cell['lo']:.2f}, {cell['hi']:.2f}] n={cell['n']}"
