"""`compress`, `eval`, `plan` and `demo`: the long-context compression commands."""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

from ..argtypes import (
    positive_ints,
)
from ..paths import locked


def _ints(text, flag: str = "--lengths") -> tuple[int, ...]:
    """Comma-separated integers >= 1 (a tuple passes through, already parsed by argparse)."""
    if isinstance(text, tuple):
        return text
    try:
        return positive_ints(text)
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"{flag}: {e}") from None


def cmd_compress(a) -> int:
    from ..compress.pipeline import compress

    # compress() refuses a folder as ``out`` (and every bad argument) before loading anything
    plan = compress(a.model, a.density, _ints(a.lengths), out=a.out, samples=a.samples,
                    max_rules_per_layer=a.max_rules_per_layer, resume=not a.rebuild,
                    validate_length=a.validate_length, validate_samples=a.validate_samples,
                    save_candidates=a.save_candidates, ppl_length=a.ppl_length, ppl_windows=a.ppl_windows,
                    ppl_tolerance=a.ppl_tolerance)  # fmt: skip
    print(plan.summary(tuple(plan.meta.get("budget_lengths", plan.profile_lengths))))
    if "validation" in plan.meta:
        v = plan.meta["validation"]
        hits, ppl = v.get("hits", {}), v.get("ppl", {})
        guard = f" (perplexity at {v['ppl_length']} within {1 + v['ppl_tolerance']:.2f}x dense)" if ppl else ""
        print(f"chosen at {v['length']} tokens by retrieval hits on the {v.get('own_answers', 0)} of {v['samples']} "
              f"held-out prompts the dense model answers, then answer loss{guard}: "
              + ", ".join(f"{k} {hits.get(k, 0)} hits / loss {x:.4f}" + _ppl_note(ppl.get(k)) for k, x in v["losses"].items())
              + f" -> {plan.meta['candidate']}")  # fmt: skip
    print(f"plan: {a.out} (heatmap {Path(a.out).with_suffix('.png')})")
    return 0


def _ppl_note(ratio) -> str:
    """" / ppl 1.012x" for a candidate whose perplexity was measured; selection skips those behind the
    first candidate that passed the guard (``select.select_by_validation``)."""
    return "" if ratio is None else f" / ppl {ratio:.3f}x"


def cmd_eval(a) -> int:
    from ..compress.pipeline import BASELINES, baseline, load_model, mass_scores, matched, profile_for
    from ..compress.plan import Plan
    from ..demo import GRIDS
    from ..eval.report import write
    from ..eval.suite import evaluate
    from ..eval.verdict import searched_verdicts

    full = GRIDS["full"]
    lengths = _ints(a.lengths) if a.lengths else full["eval_lengths"] if a.full else (1024, 2048, 4096)
    depths = tuple(float(x) for x in a.depths.split(",")) if a.depths else full["depths"] if a.full else (0.25, 0.75)
    samples = a.samples or (full["per_depth"] if a.full else 1)
    task_names = a.tasks.split(",") if a.tasks else [*full["tasks"], "ppl", "speed"] if a.full else ["passkey", "ppl", "speed"]
    ppl_windows = a.ppl_windows or (full["ppl_windows"] if a.full else 2)
    if a.so_far and a.restart:
        raise ValueError("--so-far reads the journal that --restart would delete; give one of them")
    if a.no_dense and not (a.plan or a.baseline):
        raise ValueError("--no-dense leaves nothing to evaluate: give a --plan or a --baseline")
    if a.only_baselines and not a.baseline:
        raise ValueError("--only-baselines needs a --baseline to evaluate")
    plans = {} if a.no_dense else {"dense": None}
    for p in a.plan:
        plans[Path(p).stem] = Plan.load(p)
    specs = []
    for spec in a.baseline:
        kind, _, d = spec.partition(":")
        if d != "match" and not d.replace(".", "", 1).isdigit():
            raise ValueError(f"--baseline {spec!r}: expected KIND:DENSITY (uniform:0.5) or KIND:match")
        if d == "match" and not a.plan:
            raise ValueError(f"--baseline {spec!r}: 'match' needs a --plan to match")
        if kind not in BASELINES:
            raise ValueError(f"--baseline {spec!r}: unknown kind {kind!r}; valid: {', '.join(BASELINES)}")
        if kind == "duo-gradient" and d != "match":
            raise ValueError(f"--baseline {spec!r}: duo-gradient ranks heads by a compress run's profile; "
                             "use duo-gradient:match with that run's --plan")  # fmt: skip
        specs.append((kind, d))
    if Path(a.out).exists() and not Path(a.out).is_dir():
        raise ValueError(f"--out {a.out} is a file; a folder is expected")
    from ..models.dtype import cast

    given = [Path(p).stem for p in a.plan]
    needs_profile = any(kind == "duo-gradient" for kind, _ in specs)  # found before the model loads
    profiles = {name: profile_for(a.model, plans[name]) for name in given} if needs_profile else {}
    model, tok = load_model(a.model)
    cast(model, a.dtype)
    for name, plan in plans.items():  # before any prompt is built or any pass runs
        if plan is not None:
            try:
                plan.validate(model.cfg)
            except ValueError as e:
                raise ValueError(f"--plan {name}: {e}") from None
    scores = mass_scores(model, tok) if any(kind == "duo" for kind, _ in specs) else None  # once, not per length
    ref = [] if a.no_dense else ["dense"]
    pairs = [(name, r) for name in given for r in ref]  # every plan against dense, and against its own baselines
    for kind, d in specs:
        if d == "match":  # one baseline per plan, at that plan's measured density at every eval length
            for name in given:
                plans[f"{kind} @{name}"] = matched(a.model, kind, plans[name], lengths, model=model, tok=tok, scores=scores,
                                                   profile=profiles.get(name))  # fmt: skip
                pairs += [(name, f"{kind} @{name}"), *((f"{kind} @{name}", r) for r in ref)]
        else:  # elastic (uniform) or fitted at each length (duo): this density at every eval length
            plans[f"{kind} {d}"] = {N: baseline(a.model, kind, float(d), N + 16, model=model, tok=tok, scores=scores)
                                    for N in lengths}  # fmt: skip
            pairs += [(name, f"{kind} {d}") for name in given] + [(f"{kind} {d}", r) for r in ref]
    if a.only_baselines:  # the plans only size their matched baselines; their rows come from an earlier run
        plans = {k: v for k, v in plans.items() if k not in given}
        pairs = [(x, y) for x, y in pairs if x not in given and y not in given]
    with nullcontext() if a.so_far else locked(a.out):  # one writer per results folder; --so-far only reads
        journal_path = Path(a.out) / "journal.jsonl"
        if a.restart:
            journal_path.unlink(missing_ok=True)
        from .. import __version__
        from ..compress.pipeline import model_file
        from ..eval.journal import Journal
        from ..paths import content_digest

        header = {"model": str(a.model), "content": content_digest(model_file(a.model)), "dtype": a.dtype,
                  "mixattn": __version__}  # fmt: skip
        journal = Journal(journal_path, header, read_only=a.so_far)
        if a.so_far:
            print(f"so far: {len(journal)} finished prompts / perplexities in {journal_path}; nothing computed")
        elif len(journal):
            print(f"resuming: {len(journal)} finished prompts / perplexities read from {journal_path} (--restart to discard)")
        res = evaluate(model, tok, plans, task_names, lengths, depths, samples, ppl_windows=ppl_windows,
                       speed_context=max(lengths), journal=journal, so_far=a.so_far)  # fmt: skip
        if a.so_far:
            found = len(res["retrieval"]) + sum(len(v) for v in res["ppl"].values())
            print(f"so far: {found} of them belong to this grid")
            if len(journal) and not found:
                print("warning: none of the journal's prompts match these flags; give the --plan, --baseline, "
                      "--tasks, --lengths and --full of the eval that writes it", file=sys.stderr)  # fmt: skip
        out = Path(a.out) / "so-far" if a.so_far else Path(a.out)
        # the density each evaluated plan was searched at (``mixattn report`` reads it for the verdict lines)
        searched = {n: (plans[n].meta or {}).get("budget") for n in given if n in plans}  # --only-baselines drops them
        res["budgets"] = {n: d for n, d in searched.items() if d is not None}
        table = write(res, out, pairs=pairs or None, verdicts=searched_verdicts(res))
    print(table)
    print(f"\nresults: {out}/results.md, results.json, *.png")
    return 0


def cmd_report(a) -> int:
    """One report (tables, plots, verdict lines) from several ``mixattn eval`` results folders."""
    from ..eval.merge import merge, read
    from ..eval.report import write
    from ..eval.verdict import searched_verdicts
    from ..paths import atomic_dir

    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {a.out} is a file; a folder is expected")
    if (out / "journal.jsonl").exists() or (out / ".mixattn.lock").exists():
        raise ValueError(f"--out {a.out} is an eval's results folder; give a new folder for the report")
    for src in a.sources:
        if Path(src).resolve() in (out.resolve(), (out / "results.json").resolve()):
            raise ValueError(f"--out {a.out} is one of the sources; give a new folder for the report")
    runs = [read(src) for src in a.sources]
    res, pairs, notes = merge(runs)
    methods = {r["method"] for r in res["retrieval"]}
    for spec in a.budget:
        label, _, d = spec.rpartition("=")
        if not label or d not in ("0.5", "0.25"):
            raise ValueError(f"--budget {spec!r}: expected LABEL=0.5 or LABEL=0.25 (a plan's label in the results)")
        if label not in methods or label == "dense":
            raise ValueError(f"--budget {spec!r}: no searched plan {label!r} in the results")
        if res["budgets"].setdefault(label, float(d)) != float(d):
            raise ValueError(f"--budget {spec!r}: the results record {label} as searched at {res['budgets'][label]}")
    header = "Merged from " + ", ".join(f"`{name}`" for name, _ in runs) + " (`mixattn report`)."
    texts, lines = [], searched_verdicts(res)
    atomic_dir(out, lambda tmp: texts.append(write(res, tmp, pairs=pairs or None, verdicts=lines, header=header)))
    print(texts[0])
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"\nresults: {a.out}/results.md, results.json, *.png")
    return 0


def cmd_plan(a) -> int:
    from ..compress.pipeline import baseline
    from ..compress.plan import Plan

    if a.action in ("import", "export"):
        from .. import load
        from ..compress import interchange as ix

        if a.target not in ("moa", "duo"):
            raise ValueError(f"plan {a.action}: the format must be moa or duo, got {a.target!r}")
        if a.file is None or a.out is None:
            what = "a plan JSON" if a.action == "export" else {"moa": "moa_alpha_beta.json", "duo": "a gate TSV"}[a.target]
            raise ValueError(f"plan {a.action} {a.target} needs FILE ({what}) and --out")
        if a.action == "import" and a.target == "moa" and (a.config or a.sparsity is not None):
            raise ValueError("--config and --sparsity are for plan import duo")
        if a.action == "import" and a.target == "duo":
            if a.config is None or a.sparsity is None:
                raise ValueError("plan import duo needs --config (DuoAttention's config.json) and --sparsity")
            if not 0 <= a.sparsity <= 1:  # also refuses nan
                raise ValueError(f"--sparsity must be in [0, 1], got {a.sparsity}")
        needs_model = a.action == "import" or a.target == "moa"
        if needs_model and a.model is None:
            raise ValueError(f"plan {a.action} {a.target} needs --model (for its layer and head counts)")
        if a.action == "export":
            plan = Plan.load(a.file)
            if a.target == "duo":
                tsv, conf = ix.save_duo(plan, a.out)
                print(f"DuoAttention plan: {tsv} ({plan.num_layers} layers x {plan.num_kv_heads} KV heads), {conf}")
                return 0
            cfg = load(a.model).cfg
            plan.validate(cfg)
            path = ix.save_moa(plan, a.out, cfg.num_heads)
            print(f"MoA plan: {path} ({plan.num_layers} layers x {cfg.num_heads} query heads, each KV head's rule "
                  f"repeated for its {cfg.num_heads // cfg.num_kv_heads} query heads)")  # fmt: skip
            return 0
        if Path(a.out).is_dir():
            raise ValueError(f"--out {a.out} is a folder; a plan file path is expected")
        cfg = load(a.model).cfg
        kw = {"model_name": str(a.model), "profile_lengths": a.lengths or (1024, 2048, 4096)}
        if a.target == "moa":
            plan = ix.load_moa(a.file, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, a.gqa, **kw)
            other = "mean" if a.gqa == "max" else "max"
            alt = ix.load_moa(a.file, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, other, **kw)
            note = f"{plan.meta['note']}; mean density {plan.density():.3f} (--gqa {other}: {alt.density():.3f})"
        else:
            plan = ix.load_duo(a.file, a.config, a.sparsity, cfg.num_layers, cfg.num_kv_heads, **kw)
            note = plan.meta["note"]
        plan.save(a.out)
        print(plan.summary())
        print(note)
        print(f"plan: {a.out}")
        return 0
    if a.file is not None:
        raise ValueError(f"plan {a.action} takes one {'plan file' if a.action == 'show' else 'model'}, got {a.file!r} too")
    if a.action == "show":
        plan = Plan.load(a.target)
        png = Path(a.png or Path(a.target).with_suffix(".png"))
        if png.resolve() == Path(a.target).resolve():
            raise ValueError(f"the heatmap would overwrite the plan {a.target}; pass --png PATH")
        if png.suffix.lower() != ".png" or png.is_dir():
            raise ValueError(f"--png {png}: expected a .png file path")
        print(plan.summary(a.lengths))
        png = plan.plot(png, a.length)
        print(f"heatmap: {png}")
        return 0
    if a.out is None or a.density is None:
        raise ValueError("plan baseline needs --density and --out")
    if Path(a.out).is_dir():
        raise ValueError(f"--out {a.out} is a folder; a plan file path is expected")
    plan = baseline(a.target, a.kind, a.density, a.length or 4096)
    plan.save(a.out)
    print(plan.summary())
    return 0


def cmd_demo(a) -> int:
    from ..demo import run

    if Path(a.out).exists() and not Path(a.out).is_dir():
        raise ValueError(f"--out {a.out} is a file; a folder is expected")
    densities = tuple(float(x) for x in a.densities.split(",")) if a.densities else None
    print(run(a.model, a.grid, out=a.out, densities=densities, eval_lengths=_ints(a.eval_lengths) if a.eval_lengths
              else None, samples=a.samples, per_depth=a.per_depth, tasks=tuple(a.tasks.split(",")) if a.tasks else None,
              lengths=_ints(a.lengths) if a.lengths else None, validate_length=a.validate_length,
              dtype=a.dtype))  # fmt: skip
    print(f"\nplots and JSON in {a.out}/")
    return 0


