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
    """(name, results) from an eval folder (its ``results.json``) or a results.json path, as parsed;
    ``merge`` checks it (``check``)."""
    p = Path(src)
    f = p / "results.json" if p.is_dir() else p
    if not f.is_file():
        hint = " (a run still in progress: `mixattn eval ... --so-far` writes SRC/so-far/results.json)" if p.is_dir() else ""
        raise FileNotFoundError(f"{src}: no results.json{hint}")
    try:
        res = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{f}: not JSON ({e})") from None
    return str(f), res


def _fail(name: str, where: str, want: str, got) -> ValueError:
    return ValueError(f"{name}: {where} must be {want}, got {got!r:.80}")


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


RECORD = {"method": (str, "a string"), "task": (str, "a string"), "length": (int, "an integer"), "index": (int, "an integer"),
          "seed": (int, "an integer"), "generated": (str, "a string"), "hit": (bool, "true or false")}  # fmt: skip


def _by_length(name: str, where: str, d, value_ok, want: str) -> dict:
    """{method: {length: value}} with int lengths, each value checked."""
    if not isinstance(d, dict):
        raise _fail(name, where, "an object {method: {length: ...}}", d)
    out = {}
    for m, by_len in d.items():
        if not isinstance(by_len, dict):
            raise _fail(name, f"{where}[{m!r}]", "an object {length: ...}", by_len)
        out[m] = {}
        for N, v in by_len.items():
            if not str(N).isdigit():
                raise _fail(name, f"{where}[{m!r}] key", "a length (an integer)", N)
            if not value_ok(v):
                raise _fail(name, f"{where}[{m!r}][{N}]", want, v)
            out[m][int(N)] = v
    return out


def check(name: str, res) -> dict:
    """``res`` if it is an eval result (retrieval records, density, ppl, speed, pairs, budgets of the
    right types; a ValueError naming ``name`` and the field otherwise), with lengths made ints."""
    if not isinstance(res, dict) or not isinstance(res.get("retrieval"), list):
        raise ValueError(f"{name}: not a mixattn eval results.json (no 'retrieval' list)")
    for i, r in enumerate(res["retrieval"]):
        if not isinstance(r, dict):
            raise _fail(name, f"retrieval[{i}]", "an object", r)
        for k, (typ, want) in RECORD.items():
            if not isinstance(r.get(k), typ) or (typ is int and isinstance(r[k], bool)):
                raise _fail(name, f"retrieval[{i}].{k}", want, r.get(k))
        if not _num(r.get("depth")):
            raise _fail(name, f"retrieval[{i}].depth", "a number", r.get("depth"))
        for k in ("density", "logprob"):
            if r.get(k) is not None and not _num(r[k]):
                raise _fail(name, f"retrieval[{i}].{k}", "a number", r[k])
    out = dict(res)
    out["density"] = _by_length(name, "density", res.get("density", {}), _num, "a number")
    ppl_ok = lambda v: isinstance(v, dict) and isinstance(v.get("nll"), list) and all(map(_num, v["nll"]))  # noqa: E731
    out["ppl"] = _by_length(name, "ppl", res.get("ppl", {}), ppl_ok, "an object with an 'nll' list of numbers")
    speed = res.get("speed", {})
    if not isinstance(speed, dict) or not all(isinstance(v, dict) for v in speed.values()):
        raise _fail(name, "speed", "an object {method: {...}}", speed)
    pairs = res.get("pairs", [])
    if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p)
                                              for p in pairs):  # fmt: skip
        raise _fail(name, "pairs", "a list of [method, method]", pairs)
    budgets = res.get("budgets", {})
    if not isinstance(budgets, dict) or not all(v in (0.5, 0.25) or (_num(v) and 0 < v <= 1) for v in budgets.values()):
        raise _fail(name, "budgets", "an object {plan: density in (0, 1]}", budgets)
    return out


def _close(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    return a == b


def merge(runs: list[tuple[str, dict]]) -> tuple[dict, list[tuple[str, str]], list[str]]:
    """Join eval results: ``runs`` is [(name, results)], in the order their rows should appear.
    -> (results, pairs, notes): one results dict (retrieval, density, ppl, speed, budgets), the
    union of the runs' paired comparisons plus every scored method against dense (a ``--no-dense``
    run's plan meets another run's dense rows here), and notes on what was dropped. Raises ValueError naming
    the run and the record where two runs disagree."""
    if not runs:
        raise ValueError("nothing to merge: give at least one eval results folder")
    recs: dict[tuple, tuple[str, dict]] = {}
    out = {"retrieval": [], "density": {}, "ppl": {}, "speed": {}, "budgets": {}}
    pairs: list[tuple[str, str]] = []
    notes: list[str] = []
    for name, res in runs:
        res = check(name, res)
        for r in res["retrieval"]:
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
    if not out["retrieval"]:
        raise ValueError("no retrieval records in any source: nothing to report")
    methods = list(dict.fromkeys(["dense", *out["density"], *(r["method"] for r in out["retrieval"])]))
    scored = {r["method"] for r in out["retrieval"]}
    if "dense" in scored:  # dense may come from another run than a plan's: pair every method with it
        pairs += [(m, "dense") for m in methods if m in scored and m != "dense" and (m, "dense") not in pairs]
    rank = {m: i for i, m in enumerate(methods)}
    tasks = {t: i for i, t in enumerate(dict.fromkeys(r["task"] for r in out["retrieval"]))}  # first-seen order
    out["retrieval"].sort(key=lambda r: (rank[r["method"]], tasks[r["task"]], r["length"], r["depth"], r["index"]))
    out["density"] = {m: out["density"][m] for m in methods if m in out["density"]}
    return out, pairs, notes
