"""``make demo``: compress the embedded SmolLM2-135M for long context and compare plans at equal KV
density on the same prompts.

Methods at each density d: the searched plan (``mixattn d``), StreamingLLM (``uniform d``: the same
sink + elastic window for every head), DuoAttention-style head selection from attention mass
(``duo d``) and from the gradient profile (``duo-gradient d``: the heads whose loss under a sink +
local window is highest stay full, the profile-ranked "top heads full, rest short window" plan).
Every baseline is refitted at each eval length to the searched plan's density there, so all methods
of a density are compared at the same measured KV density (printed in the report).

``GRIDS["demo"]`` is the small grid ``make demo`` runs (about 15 minutes on 2 cores);
``GRIDS["full"]`` is the big grid of ``mixattn eval --full`` / ``mixattn demo --grid full``.
"""

from __future__ import annotations

import time
from pathlib import Path

from .compress.pipeline import compress, load_model, mass_scores, matched, profile_for
from .eval import suite
from .eval.report import write
from .eval.verdict import verdicts

GRIDS = {
    "demo": {"densities": (0.5, 0.25), "lengths": (1024,), "samples": 8, "validate_length": 2048,
             "validate_samples": 4, "eval_lengths": (1024, 2048), "tasks": ("passkey", "multikey"),
             "depths": (0.1, 0.5, 0.9), "per_depth": 1, "ppl_windows": 2,
             "methods": {0.5: ("uniform", "duo-gradient"), 0.25: ("uniform",)}},
    "full": {"densities": (0.5, 0.25), "lengths": (1024, 2048, 4096), "samples": 16, "validate_length": 8192,
             "validate_samples": 4, "eval_lengths": (1024, 2048, 4096, 8192),
             "tasks": ("passkey", "multikey", "multivalue", "vartrack", "lines"),
             "depths": (0.05, 0.275, 0.5, 0.725, 0.95), "per_depth": 4, "ppl_windows": 8,
             "methods": ("uniform", "duo", "duo-gradient")},
}  # fmt: skip


def build_plans(source, model, tok, grid: dict, out: Path, progress: bool = True) -> tuple[dict, list]:
    """{label: plan or {length: plan}} for every method of the grid, and the (a, b) pairs to test."""
    plans, pairs = {"dense": None}, []
    lengths, evals = tuple(grid["lengths"]), tuple(grid["eval_lengths"])
    methods = grid["methods"]  # kinds for every density, or {density: kinds}
    kinds_at = {d: methods.get(d, ()) if isinstance(methods, dict) else methods for d in grid["densities"]}
    scores = mass_scores(model, tok) if any("duo" in k for k in kinds_at.values()) else None
    for d in grid["densities"]:
        plan = compress(source, d, lengths, out=out / f"plan_{d}.json", samples=grid["samples"], model=model,
                        tok=tok, validate_length=grid["validate_length"], validate_samples=grid.get("validate_samples", 4),
                        progress=progress)  # fmt: skip
        label = f"mixattn {d}"
        for kind in kinds_at[d]:
            prof = profile_for(source, plan) if kind == "duo-gradient" else None
            plans[f"{kind} {d}"] = matched(source, kind, plan, evals, model=model, tok=tok, scores=scores, profile=prof)
            pairs.append((label, f"{kind} {d}"))
        plans[label] = plan
        pairs.append((label, "dense"))
    for label, plan in plans.items():
        for L, p in (plan.items() if isinstance(plan, dict) else [(None, plan)]):
            if p is not None:
                p.save(out / "plans" / f"{label.replace(' ', '_')}{'' if L is None else f'@{L}'}.json")
    return plans, pairs


def run(source: str = "smollm2-135m", grid: str | dict = "demo", out: str | Path = "runs/demo", progress: bool = True,
        dtype: str = "float32", **overrides) -> str:  # fmt: skip
    """Compress (fp32), evaluate every method on the same prompts in ``dtype``, and write the report
    under ``out``."""
    from .models.dtype import cast

    t0 = time.perf_counter()
    g = dict(GRIDS[grid] if isinstance(grid, str) else grid, **{k: v for k, v in overrides.items() if v is not None})
    out = Path(out)
    model, tok = load_model(source)
    plans, pairs = build_plans(source, model, tok, g, out, progress)
    cast(model, dtype)
    evals = list(g["eval_lengths"])
    ppl_lengths = [N for N in evals if N >= 2048] or evals[-1:]
    results = suite.evaluate(model, tok, plans, [*g["tasks"], "ppl"], evals, list(g["depths"]), g["per_depth"],
                             ppl_windows=g["ppl_windows"], ppl_lengths=ppl_lengths, progress=progress)  # fmt: skip
    results["grid"] = {k: list(v) if isinstance(v, tuple) else v for k, v in g.items()}
    results["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    results["wall_s"] = time.perf_counter() - t0
    header = (f"# {source}: long-context retrieval at equal KV density\n\nGrid: tasks {', '.join(g['tasks'])}; "
              f"lengths {evals}; depths {list(g['depths'])}; {g['per_depth']} prompt(s) per depth (own seed and "
              f"key each); greedy generation of up to 16 tokens (48 multivalue, 40 vartrack), correct iff it "
              f"contains the key. Search: profiles at {list(g['lengths'])}, {g['samples']} calibration samples per "
              f"length, selection at {g['validate_length']}. Wall time {results['wall_s'] / 60:.1f} min.")  # fmt: skip
    return write(results, out, pairs=pairs, verdicts=verdicts(results, g["densities"]), header=header)
