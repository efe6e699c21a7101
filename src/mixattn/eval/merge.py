"""One report from several ``mixattn eval`` runs (``mixattn report``).

The full grid is too long for one process on a small machine, so it runs as several evals, each
with its own results folder (one per core, or one per density: ``--no-dense`` on all but one).
Prompts are seeded by (task, length, depth, index), so the runs score the same prompts and their
records can be joined. ``merge`` joins them and refuses what would make the joined tables wrong:

- a record (method, task, length, depth, index) that two runs both scored must agree (seed, the
  generated text, the hit): the same prompt under the same method is deterministic, so a
  difference means the runs differ (another model, dtype or code) and their rows must not be mixed;
- a method's measured KV density at a length, and its perplexity windows, must agree likewise;
- a plan's searched density (``budgets``, which the verdict lines read) must not differ.

Speed is a timing, so two runs never agree on it: the first run's row is kept, and the others are
reported in ``notes``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

KEY = ("method", "task", "length", "depth", "index")
AGREE = ("seed", "generated", "hit")  # what must match where two runs scored the same prompt


def read(src: str | Path) -> tuple[str, dict]:
    """(name, results) from an eval folder (its ``results.json``) or a results.json path."""
    p = Path(src)
    f = p / "results.json" if p.is_dir() else p
    if not f.is_file():
        hint = " (a run still in progress: `mixattn eval ... --so-far` writes SRC/so-far/results.json)" if p.is_dir() else ""
        raise FileNotFoundError(f"{src}: no results.json{hint}")
    try:
        res = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: not JSON ({e})") from None
    if not isinstance(res, dict) or not isinstance(res.get("retrieval"), list):
        raise ValueError(f"{f}: not a mixattn eval results.json (no 'retrieval' list)")
    return str(f), res


def _close(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    return a == b


def merge(runs: list[tuple[str, dict]]) -> tuple[dict, list[tuple[str, str]], list[str]]:
    """Join eval results: ``runs`` is [(name, results)], in the order their rows should appear.
    -> (results, pairs, notes): one results dict (retrieval, density, ppl, speed, budgets), the
    union of the runs' paired comparisons, and notes on what was dropped. Raises ValueError naming
    the run and the record where two runs disagree."""
    if not runs:
        raise ValueError("nothing to merge: give at least one eval results folder")
    recs: dict[tuple, tuple[str, dict]] = {}
    out = {"retrieval": [], "density": {}, "ppl": {}, "speed": {}, "budgets": {}}
    pairs: list[tuple[str, str]] = []
    notes: list[str] = []
    for name, res in runs:
        for r in res["retrieval"]:
            missing = [k for k in (*KEY, *AGREE) if k not in r]
            if missing:
                raise ValueError(f"{name}: a retrieval record lacks {', '.join(missing)}: {r}")
            k = tuple(r[f] for f in KEY)
            if k in recs:
                first, seen = recs[k]
                bad = [f for f in AGREE if seen[f] != r[f]]
                if bad:
                    raise ValueError(f"{name} and {first} both scored {dict(zip(KEY, k))} and differ in "
                                     f"{', '.join(bad)}: the runs are not of the same model, dtype or code")  # fmt: skip
                continue
            recs[k] = (name, r)
            out["retrieval"].append(r)
        for part in ("density", "ppl"):
            for m, by_len in res.get(part, {}).items():
                into = out[part].setdefault(m, {})
                for N, v in by_len.items():
                    if N in into and not _close(into[N], v):
                        raise ValueError(f"{name}: {m}'s {part} at {N} differs from an earlier run's")
                    into.setdefault(N, v)
        for m, v in res.get("speed", {}).items():
            if m in out["speed"]:
                notes.append(f"speed of {m}: kept the first run's timing, not {name}'s (timings are not merged)")
            else:
                out["speed"][m] = v
        for m, d in res.get("budgets", {}).items():
            if out["budgets"].setdefault(m, d) != d:
                raise ValueError(f"{name}: plan {m} is marked as searched at density {d}, an earlier run at {out['budgets'][m]}")
        pairs += [tuple(p) for p in res.get("pairs", []) if tuple(p) not in pairs]
    methods = list(dict.fromkeys(["dense", *out["density"], *(r["method"] for r in out["retrieval"])]))
    rank = {m: i for i, m in enumerate(methods)}
    tasks = {t: i for i, t in enumerate(dict.fromkeys(r["task"] for r in out["retrieval"]))}  # first-seen order
    out["retrieval"].sort(key=lambda r: (rank[r["method"]], tasks[r["task"]], r["length"], r["depth"], r["index"]))
    out["density"] = {m: out["density"][m] for m in methods if m in out["density"]}
    return out, pairs, notes
