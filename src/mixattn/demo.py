"""``make demo``: compress the embedded SmolLM2-135M for long context and compare, side by side,
dense, uniform StreamingLLM, DuoAttention-style and mixattn plans at KV densities 0.5 and 0.25 on
passkey retrieval up to 4k tokens, perplexity at 4k, KV memory and decode speed.

Head scores are compared within one plan family: DuoAttention-style plans whose retrieval heads
are picked by (a) attention mass outside sink + local window, (b) the gradient profile's influence
outside that window, at the same density.
"""

from __future__ import annotations

from pathlib import Path

from .compress import optimize
from .compress.pipeline import CORPORA, baseline, compress, load_model, work_dir_for
from .compress.plan import HeadRule, Plan
from .compress.profile import LOCAL, SINK, Profile
from .eval.suite import evaluate, write


def gradient_duo(profile: Profile, density: float, length: int, name: str) -> Plan:
    """Duo-style plan with heads ranked by the profiled loss of a streaming (sink + local) rule."""
    streaming = HeadRule(SINK, float(LOCAL), 0.0)
    loss = optimize.loss_matrix(profile, [streaming])[:, 0]
    L, H = profile.influence[profile.lengths[0]].shape[:2]
    plan = Plan.duo(loss.reshape(L, H).tolist(), density, length, SINK, LOCAL, model_name=name)
    plan.meta["method"] = "duo-gradient"
    return plan


def run(source: str = "smollm2-135m", densities=(0.5, 0.25), lengths=(1024, 2048), eval_lengths=(1024, 2048, 4096),
        depths=(0.25, 0.75), samples: int = 2, out: str | Path = "runs/demo", progress: bool = True) -> str:  # fmt: skip
    out = Path(out)
    model, tok = load_model(source)
    N = eval_lengths[-1]
    plans = {"dense": None}
    for d in densities:
        plan = compress(source, d, tuple(lengths), out=out / f"plan_{d}.json", samples=samples, model=model, tok=tok,
                        progress=progress)  # fmt: skip
        plans[f"uniform {d}"] = baseline(source, "uniform", d, N, model=model, tok=tok)
        plans[f"duo {d}"] = baseline(source, "duo", d, N, model=model, tok=tok)
        if d == densities[0]:
            prof = Profile.load(work_dir_for(source, tuple(lengths), samples, 0, CORPORA) / "profile.pt")
            plans[f"duo-gradient {d}"] = gradient_duo(prof, d, N, source)
        plans[f"mixattn {d}"] = plan
    for label, plan in plans.items():
        if plan is not None:
            plan.save(out / "plans" / f"{label.replace(' ', '_')}.json")
    fast = {"dense"} | {f"{m} {d}" for m in ("uniform", "mixattn") for d in densities}
    results = {"retrieval": [], "ppl": {}, "speed": {}}
    for label, plan in plans.items():
        tasks = ["passkey", "ppl"] + (["speed"] if label in fast else [])
        r = evaluate(model, tok, {label: plan}, tasks, list(eval_lengths), list(depths), samples=1,
                     ppl_tokens=N, speed_context=N, progress=progress)  # fmt: skip
        results["retrieval"] += r["retrieval"]
        results["ppl"].update(r["ppl"])
        results["speed"].update(r["speed"])
    table = write(results, out, list(plans), list(eval_lengths))
    header = (f"{source}: passkey (exact match of the greedy answer, teacher-forced token accuracy) at depths "
              f"{list(depths)}; perplexity on {N} held-out Shakespeare tokens; decode after a {N}-token prompt\n")
    return header + "\n" + table
