"""The ``mixattn`` command. Each subcommand is a thin call into a library function; errors are
printed as one line (no traceback) and exit with status 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .argtypes import (
    OneLineParser,
    UsageError,
    checked_text,
    fraction,
    fractions,
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
    positive_ints,
    unit_floats,
)
from .paths import LOCK_NAME, locked, read_json, write_json

EXAMPLES = {
    "train": """examples:
  mixattn train --preset small-moh --corpus shakespeare --steps 300 --out runs/moh
  mixattn train --preset tiny-moe --corpus stdlib --corpus my_notes/ --set moe.router.graph=similarity --out runs/g
  mixattn train --out runs/moh --resume                      # continue an interrupted run
  mixattn train --init runs/smol-moh --corpus shakespeare --steps 50 --lr 1e-4 --out runs/smol-moh-ct
""",
    "generate": """examples:
  mixattn generate runs/moh/checkpoint --prompt "ROMEO." --max-new-tokens 200
  mixattn generate runs/moh/checkpoint --prompt "def " --temperature 0.8 --top-k 40 --seed 1
""",
    "convert": """examples:
  mixattn convert smollm2-135m --to moa --out runs/smol-moa                 # exact: k = E = G
  mixattn convert smollm2-135m --to moa --top-k 2 --out runs/smol-moa-k2    # sparsified, then continue-train
  mixattn convert smollm2-135m --to moh --active-fraction 0.75 --out runs/smol-moh
  mixattn convert runs/branch-0/checkpoint runs/branch-1/checkpoint --to bam --attention shared-kv --out runs/bam
""",
    "export": """examples:
  mixattn export runs/smol --format llama --out hf/smol          # dense models
  mixattn export runs/jet --format jetmoe --out hf/jet           # MoA + MoE models (transformers JetMoe)
""",
    "compress": """examples:
  mixattn compress smollm2-135m --density 0.5 --out runs/plan_0.5.json
  mixattn compress smollm2-135m --density 0.25 --lengths 1024,2048,4096 --samples 4 --out plan.json --resume
  mixattn compress runs/my-llama --density 0.5 --max-rules-per-layer 2 --validate-length 4096 --out plan.json
""",
    "eval": """examples:
  mixattn eval smollm2-135m --plan runs/plan_0.5.json --baseline uniform:0.5 --baseline duo:0.5 --out runs/eval
  mixattn eval smollm2-135m --plan a.json --plan b.json --tasks passkey,multikey,ppl,speed --lengths 1024,4096
""",
    "plan": """examples:
  mixattn plan show runs/plan_0.5.json                    # summary + heatmap PNG next to the plan
  mixattn plan baseline --kind uniform --density 0.5 smollm2-135m --out uniform.json
  mixattn plan baseline --kind duo --density 0.25 smollm2-135m --out duo.json
  mixattn plan import moa moa_alpha_beta.json --model smollm2-135m --out moa.json      # MoA (arXiv 2406.14909)
  mixattn plan import duo full_attention_heads.tsv --config config.json --sparsity 0.5 --model smollm2-135m --out duo.json
  mixattn plan export moa plan.json --model smollm2-135m --out moa_alpha_beta.json
  mixattn plan export duo plan.json --out duo/          # full_attention_heads.tsv + config.json (arXiv 2410.10819)
""",
    "demo": """examples:
  mixattn demo                       # the main job on the embedded smollm2-135m (make demo)
  mixattn demo --out runs/demo2 --densities 0.5
""",
    "compare": """examples:
  mixattn compare small small-moh small-moa --corpus shakespeare --steps 200 --out runs/compare
  mixattn compare softmax=small-moe sim=small-moe,moe.router.graph=similarity --steps 200 --out runs/routers
""",
    "presets": """examples:
  mixattn presets
""",
    "mil": """examples:
  mixattn --threads 1 mil --out runs/mil                      # ABMIL, MBA, MBA+STKIM on digit bags, 5 seeds
  mixattn mil --methods abmil,mba_stkim --seeds 3 --bag-mean 20 --target 7 --out runs/mil7
  (needs scikit-learn: pip install 'mixattn[mil]'; writes results.md, results.json and heatmap.png)
""",
}


# Training flags default to None so that a resumed run can tell a flag given again from one left out.
TRAIN_DEFAULTS = {"steps": 300, "batch_size": 16, "seq_len": 256, "grad_accum": 1, "lr": 1e-3, "schedule": "cosine",
                  "warmup_steps": 30, "eval_every": 50, "eval_batches": 8, "seed": 0, "on_nonfinite": "stop"}  # fmt: skip


def _add_train_args(p: argparse.ArgumentParser) -> None:
    d = TRAIN_DEFAULTS
    p.add_argument("--corpus", action="append", help="shakespeare, stdlib, or a text file/directory (repeatable)")
    p.add_argument("--steps", type=positive_int, help=f"optimizer steps (default {d['steps']})")
    p.add_argument("--batch-size", type=positive_int, help=f"sequences per micro-batch (default {d['batch_size']})")
    p.add_argument("--seq-len", type=positive_int, help=f"tokens per sequence (default {d['seq_len']})")
    p.add_argument("--grad-accum", type=positive_int, help="micro-batches per step (default 1)")
    p.add_argument("--lr", type=positive_float, help=f"peak learning rate (default {d['lr']})")
    p.add_argument("--schedule", choices=["cosine", "wsd"], help="default cosine")
    p.add_argument("--warmup-steps", type=nonneg_int, help=f"default {d['warmup_steps']}")
    p.add_argument("--eval-every", type=positive_int, help=f"validate and checkpoint every N steps (default {d['eval_every']})")
    p.add_argument("--eval-batches", type=positive_int, help=f"default {d['eval_batches']}")
    p.add_argument("--seed", type=nonneg_int, help="default 0")
    p.add_argument("--on-nonfinite", choices=["stop", "skip"], help="NaN/inf loss: stop (default) or skip the step")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model config field, dotted for nested ones (moe.router.top_k=1)")  # fmt: skip
    p.add_argument("--balance", choices=["switch", "sequence", "global", "none"])
    p.add_argument("--balance-coef", type=nonneg_float)
    p.add_argument("--z-coef", type=nonneg_float)


def _train_settings(a, saved: dict | None = None) -> dict:
    """The training settings: flags given, else the saved run's (on --resume), else the defaults.
    A flag given again on --resume must agree with the saved run."""
    out = {}
    for key, default in TRAIN_DEFAULTS.items():
        given = getattr(a, key)
        if saved is not None and key in saved:
            if given is not None and given != saved[key]:
                flag = "--" + key.replace("_", "-")
                raise ValueError(f"{flag} {given} conflicts with the run being resumed ({key}={saved[key]}); "
                                 f"drop the flag, or start a new run with --out")  # fmt: skip
            out[key] = saved[key]
        else:
            out[key] = default if given is None else given
    return out


def _train_config(settings: dict):
    from .train.loop import TrainConfig

    return TrainConfig(**{**settings, "warmup_steps": min(settings["warmup_steps"], settings["steps"])})


def _overrides(a) -> list[str]:
    extra = [f"{k}={v}" for k, v in (("balance", a.balance), ("balance_coef", a.balance_coef),
                                     ("z_coef", a.z_coef)) if v is not None]  # fmt: skip
    return a.overrides + extra


RUN_FILES = ("checkpoint", "metrics.jsonl", "summary.json", "run.json")  # what `train` writes in --out


def _prepare_out(out: Path, a) -> None:
    """Refuse to mix a new run into a folder that holds something, unless --overwrite (which removes
    only what `train` writes there)."""
    import shutil

    present = [p.name for p in out.iterdir() if p.name != LOCK_NAME] if out.is_dir() else []
    if not present:
        return
    if not a.overwrite:
        raise ValueError(f"--out {out} is not empty ({', '.join(sorted(present)[:3])}...); continue it with --resume, "
                         "replace it with --overwrite, or choose another folder")  # fmt: skip
    for name in RUN_FILES:
        p = out / name
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


def cmd_train(a) -> int:
    import torch

    from . import load, load_tokenizer
    from .models import checkpoint
    from .models.config import apply_overrides, from_name
    from .models.decoder import MixtureLM
    from .train.data import load_corpus
    from .train.loop import check_data, train

    out = Path(a.out)
    if a.resume and (a.init or a.overwrite):
        raise ValueError("--resume continues the run in --out; it cannot be combined with --init or --overwrite")
    with locked(out):
        tokenizer, saved = None, None
        if a.resume:
            saved = read_json(out / "run.json", missing=f"--resume: {out} has no run.json (not a mixattn train run)")
            cfg, _ = checkpoint.read_config(out / "checkpoint")
            for flag, key, given in (("--corpus", "corpus", a.corpus), ("--set", "overrides", _overrides(a) or None),
                                     ("--preset", "preset", a.preset), ("--init", "init", a.init)):  # fmt: skip
                if given is not None and given != saved.get(key):
                    raise ValueError(f"{flag} {given} conflicts with the run being resumed ({key}={saved.get(key)})")
            tokenizer = load_tokenizer(out / "checkpoint")
            settings = _train_settings(a, saved.get("train", {}))
            corpus = saved.get("corpus") or ["shakespeare"]
        else:
            _prepare_out(out, a)
            settings = _train_settings(a)
            corpus = a.corpus or ["shakespeare"]
            if a.init:
                init = load(a.init)  # any source mixattn.load accepts; its tokenizer comes along
                tokenizer = load_tokenizer(a.init)
                cfg = init.cfg
            else:
                cfg = from_name(a.preset or "small")
            cfg = apply_overrides(cfg, _overrides(a))
        tcfg = _train_config(settings)
        if tcfg.seq_len > cfg.max_seq_len:
            raise ValueError(f"--seq-len {tcfg.seq_len} exceeds the model's max_seq_len {cfg.max_seq_len}")
        data = load_corpus(corpus, tokenizer=tokenizer)
        check_data(data, tcfg)  # before anything is written
        torch.manual_seed(settings["seed"])
        model = MixtureLM(cfg)
        if a.init and not a.resume:
            checkpoint.load_state(model, checkpoint.model_tensors(init), a.init)
        if saved is None:
            write_json(out / "run.json", {"preset": a.preset, "init": a.init, "corpus": corpus, "overrides": _overrides(a),
                                          "train": settings, "argv": sys.argv[1:]})  # fmt: skip
        else:
            write_json(out / "run.json", {**saved, "resumes": saved.get("resumes", []) + [sys.argv[1:]]})
        summary = train(model, data, tcfg, out, resume=a.resume, stop_at=a.stop_at, tokenizer=tokenizer)
    print(json.dumps(summary, indent=2))
    print(f"checkpoint: {out / 'checkpoint'}")
    return 0


def cmd_generate(a) -> int:
    import torch

    from . import load, load_tokenizer

    model, tok = load(a.checkpoint), load_tokenizer(a.checkpoint)
    ids = torch.tensor([tok.encode(a.prompt)])
    if ids.shape[1] + a.max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(f"--max-new-tokens {a.max_new_tokens} after a {ids.shape[1]}-token prompt exceeds the model's "
                         f"max_seq_len {model.cfg.max_seq_len}")  # fmt: skip
    gen = torch.Generator().manual_seed(a.seed)
    stop = (tok.eos_token_id,) if tok.eos_token_id is not None else ()
    out = model.generate(ids, a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, generator=gen,
                         stop_tokens=stop)  # fmt: skip
    print(tok.decode(out[0].tolist()))
    return 0


def cmd_convert(a) -> int:
    from . import load, load_tokenizer
    from .convert import dense_to_moh, gqa_to_moa, upcycle_bam
    from .models import checkpoint

    if len(a.sources) > 1 and a.to != "bam":
        raise ValueError(f"--to {a.to} takes one source model; only bam mixes several")
    _new_folder(a.out)
    models = [load(s) for s in a.sources]
    if a.to == "moa":
        new = gqa_to_moa(models[0], a.top_k)
    elif a.to == "moh":
        new = dense_to_moh(models[0], a.active_fraction)
    else:
        block = "parallel" if a.parallel else "sequential"
        new = upcycle_bam(models, attention=a.attention.replace("-", "_"), block=block)
    checkpoint.save(new, a.out, tokenizer=load_tokenizer(a.sources[0]), extra={"converted_from": a.sources})
    print(f"{a.to} model ({sum(p.numel() for p in new.parameters()):,} params) saved to {a.out}")
    return 0


def cmd_export(a) -> int:
    from . import export, load, load_tokenizer

    _new_folder(a.out)
    out = export(load(a.source), a.out, format=a.format, tokenizer=load_tokenizer(a.source))
    print(f"{a.format} checkpoint written to {out}")
    return 0


def cmd_compare(a) -> int:
    from .train.compare import compare
    from .train.data import load_corpus

    tcfg = _train_config(_train_settings(a))
    with locked(a.out):
        data = load_corpus(a.corpus or ["shakespeare"])
        table = compare(a.variants, data, tcfg, a.out)
    print(table)
    print(f"\nresults: {Path(a.out) / 'results.md'}, plot: {Path(a.out) / 'val_loss.png'}")
    return 0


def _ints(text, flag: str = "--lengths") -> tuple[int, ...]:
    """Comma-separated integers >= 1 (a tuple passes through, already parsed by argparse)."""
    if isinstance(text, tuple):
        return text
    try:
        return positive_ints(text)
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"{flag}: {e}") from None


def _new_folder(out) -> None:
    """An output folder of a save: it may not be an existing file, nor a folder holding something
    other than a checkpoint (which the atomic save replaces whole)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; a folder is expected")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise ValueError(f"--out {out} is a non-empty folder that holds no checkpoint; choose another folder")


def cmd_compress(a) -> int:
    from .compress.pipeline import compress

    if Path(a.out).is_dir():
        raise ValueError(f"--out {a.out} is a folder; a plan file path is expected")
    plan = compress(a.model, a.density, _ints(a.lengths), out=a.out, samples=a.samples,
                    max_rules_per_layer=a.max_rules_per_layer, resume=a.resume,
                    validate_length=a.validate_length, validate_samples=a.validate_samples)  # fmt: skip
    print(plan.summary(tuple(plan.meta.get("budget_lengths", plan.profile_lengths))))
    if "validation" in plan.meta:
        v = plan.meta["validation"]
        print(f"chosen by answer loss at {v['length']} tokens ({v['samples']} prompts): "
              + ", ".join(f"{k} {x:.4f}" for k, x in v["losses"].items()) + f" -> {plan.meta['candidate']}")
    print(f"plan: {a.out} (heatmap {Path(a.out).with_suffix('.png')})")
    return 0


def cmd_eval(a) -> int:
    from .compress.pipeline import baseline, load_model, mass_scores, matched
    from .compress.plan import Plan
    from .demo import GRIDS
    from .eval.report import write
    from .eval.suite import evaluate

    full = GRIDS["full"]
    lengths = _ints(a.lengths) if a.lengths else full["eval_lengths"] if a.full else (1024, 2048, 4096)
    depths = tuple(float(x) for x in a.depths.split(",")) if a.depths else full["depths"] if a.full else (0.25, 0.75)
    samples = a.samples or (full["per_depth"] if a.full else 1)
    task_names = a.tasks.split(",") if a.tasks else [*full["tasks"], "ppl", "speed"] if a.full else ["passkey", "ppl", "speed"]
    ppl_windows = a.ppl_windows or (full["ppl_windows"] if a.full else 2)
    plans = {"dense": None}
    for p in a.plan:
        plans[Path(p).stem] = Plan.load(p)
    specs = []
    for spec in a.baseline:
        kind, _, d = spec.partition(":")
        if d != "match" and not d.replace(".", "", 1).isdigit():
            raise ValueError(f"--baseline {spec!r}: expected KIND:DENSITY (uniform:0.5) or KIND:match")
        if d == "match" and not a.plan:
            raise ValueError(f"--baseline {spec!r}: 'match' needs a --plan to match")
        specs.append((kind, d))
    if Path(a.out).exists() and not Path(a.out).is_dir():
        raise ValueError(f"--out {a.out} is a file; a folder is expected")
    model, tok = load_model(a.model)
    for name, plan in plans.items():  # before any prompt is built or any pass runs
        if plan is not None:
            try:
                plan.validate(model.cfg)
            except ValueError as e:
                raise ValueError(f"--plan {name}: {e}") from None
    scores = mass_scores(model, tok) if any(kind == "duo" for kind, _ in specs) else None  # once, not per length
    for kind, d in specs:
        if d == "match":  # the first plan's density at every eval length
            plans[f"{kind} @{Path(a.plan[0]).stem}"] = matched(a.model, kind, plans[Path(a.plan[0]).stem], lengths,
                                                               model=model, tok=tok, scores=scores)  # fmt: skip
        else:  # elastic (uniform) or fitted at each length (duo): this density at every eval length
            plans[f"{kind} {d}"] = {N: baseline(a.model, kind, float(d), N + 16, model=model, tok=tok, scores=scores)
                                    for N in lengths}  # fmt: skip
    with locked(a.out):  # one writer per results folder
        res = evaluate(model, tok, plans, task_names, lengths, depths, samples, ppl_windows=ppl_windows,
                       speed_context=max(lengths))  # fmt: skip
        table = write(res, Path(a.out))
    print(table)
    print(f"\nresults: {a.out}/results.md, results.json, *.png")
    return 0


def cmd_plan(a) -> int:
    from .compress.pipeline import baseline
    from .compress.plan import Plan

    if a.action in ("import", "export"):
        from . import load
        from .compress import interchange as ix

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
    from .demo import run

    if Path(a.out).exists() and not Path(a.out).is_dir():
        raise ValueError(f"--out {a.out} is a file; a folder is expected")
    densities = tuple(float(x) for x in a.densities.split(",")) if a.densities else None
    print(run(a.model, a.grid, out=a.out, densities=densities, eval_lengths=_ints(a.eval_lengths) if a.eval_lengths
              else None, samples=a.samples, per_depth=a.per_depth, tasks=tuple(a.tasks.split(",")) if a.tasks else None,
              lengths=_ints(a.lengths) if a.lengths else None, validate_length=a.validate_length))  # fmt: skip
    print(f"\nplots and JSON in {a.out}/")
    return 0


def cmd_presets(a) -> int:
    from .eval.report import markdown_table
    from .models.config import PRESETS
    from .models.decoder import MixtureLM, count_parameters

    rows = []
    for name, cfg in PRESETS.items():
        total, active = count_parameters(MixtureLM(cfg))
        rows.append({"name": name, "attention": cfg.attention, "ffn": cfg.ffn, "params": total, "active": active})
    cols = [("name", "preset"), ("attention", "attention"), ("ffn", "ffn"), ("params", "params"), ("active", "active")]
    print(markdown_table(rows, cols))
    return 0


def cmd_mil(a) -> int:
    from .mil import BagsConfig, MILTrainConfig, run_mil_experiment

    bags = BagsConfig(target=a.target, bag_mean=a.bag_mean, bag_std=a.bag_std, train_bags=a.train_bags,
                      test_bags=a.test_bags, positive_rate=a.positive_rate)  # fmt: skip
    train = MILTrainConfig(epochs=a.epochs, num_branches=a.branches, top_k=a.top_k, mask_rate=a.mask_rate,
                           diversity_coef=a.diversity_coef)  # fmt: skip
    methods = tuple(m.strip() for m in a.methods.split(","))
    with locked(a.out):
        table = run_mil_experiment(a.out, tuple(range(a.seeds)), methods, bags, train)
    print(table)
    print(f"\nresults: {Path(a.out) / 'results.md'}, heatmap: {Path(a.out) / 'heatmap.png'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="mixattn", description="Transformers whose attention is a mixture.")
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, help_, fn):
        p = sub.add_parser(name, help=help_, description=help_, epilog=EXAMPLES[name],
                           formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
        p.set_defaults(fn=fn)
        return p

    p = add("train", "train a mixture model from scratch (or continue one) on offline text", cmd_train)
    p.add_argument("--preset", help="model preset (see `mixattn presets`; default small)")
    p.add_argument("--out", required=True, help="run directory (checkpoint/, metrics.jsonl, summary.json, run.json)")
    p.add_argument("--resume", action="store_true", help="continue OUT's run with its saved settings at the saved step")
    p.add_argument("--overwrite", action="store_true", help="replace the run in a non-empty --out")
    p.add_argument("--init", help="start from this checkpoint's weights (continue-training)")
    p.add_argument("--stop-at", type=positive_int, help="stop and checkpoint after this many steps (resume later)")
    _add_train_args(p)

    p = add("generate", "generate text from a checkpoint", cmd_generate)
    p.add_argument("checkpoint")
    p.add_argument("--prompt", default="")
    p.add_argument("--max-new-tokens", type=positive_int, default=200)
    p.add_argument("--temperature", type=nonneg_float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=positive_int)
    p.add_argument("--seed", type=nonneg_int, default=0)

    p = add("convert", "convert a model: dense -> MoH, GQA -> MoA (exact), N dense models -> BAM", cmd_convert)
    p.add_argument("sources", nargs="+", help="model sources (smollm2-135m, checkpoint/HF dir, .gguf)")
    p.add_argument("--to", required=True, choices=["moh", "moa", "bam"])
    p.add_argument("--out", required=True)
    p.add_argument("--top-k", type=positive_int, help="moa: experts per token (default: all G, exact)")
    p.add_argument("--active-fraction", type=fraction, default=0.75, help="moh: share of heads active per token")
    p.add_argument("--attention", choices=["experts", "shared-kv", "averaged"], default="experts",
                   help="bam: full attention experts, experts sharing K/V, or averaged attention (BTX)")  # fmt: skip
    p.add_argument("--parallel", action="store_true", help="bam: parallel attention+FFN blocks (needs training)")

    p = add("export", "export a model as an HF checkpoint (llama: dense; jetmoe: MoA + MoE)", cmd_export)
    p.add_argument("source")
    p.add_argument("--format", required=True, choices=["llama", "jetmoe"])
    p.add_argument("--out", required=True)

    p = add("compress", "find a per-head sparse attention plan: calibrate -> profile -> optimize", cmd_compress)
    p.add_argument("model", help="smollm2-135m, an HF Llama-family dir, a .gguf, or a mixattn checkpoint")
    p.add_argument("--density", type=fraction, required=True, help="mean KV density budget at every profile length")
    p.add_argument("--lengths", type=checked_text(positive_ints), default="1024,2048", help="profile lengths (comma-separated)")
    p.add_argument("--samples", type=positive_int, default=16, help="calibration samples per length")
    p.add_argument("--max-rules-per-layer", type=positive_int)
    p.add_argument("--validate-length", type=positive_int, help="choose between candidate plans by loss at this length")
    p.add_argument("--validate-samples", type=positive_int, default=4, help="held-out prompts for --validate-length")
    p.add_argument("--resume", action="store_true", help="reuse cached stages (calibration, partial profile)")
    p.add_argument("--out", required=True)

    p = add("eval", "evaluate plans side by side: retrieval, perplexity, speed and memory", cmd_eval)
    p.add_argument("model")
    p.add_argument("--plan", action="append", default=[], help="plan JSON (repeatable)")
    p.add_argument("--baseline", action="append", default=[], metavar="KIND:DENSITY", help="uniform:0.5, duo:0.25")
    p.add_argument("--tasks", help="passkey,multikey,multivalue,vartrack,lines,passage,ppl,speed "
                   "(default passkey,ppl,speed; --full: all retrieval tasks)")
    p.add_argument("--lengths", type=checked_text(positive_ints), help="default 1024,2048,4096 (--full: 1024,2048,4096,8192)")
    p.add_argument("--depths", type=checked_text(unit_floats),
                   help="needle depths in [0, 1] (default 0.25,0.75; --full: 5 depths)")
    p.add_argument("--samples", type=positive_int, help="prompts per (task, length, depth) (default 1; --full: 4)")
    p.add_argument("--ppl-windows", type=positive_int, help="perplexity windows per length (default 2; --full: 8)")
    p.add_argument("--full", action="store_true", help="the big grid: 5 tasks x 1k-8k x 5 depths x 4 = 20 per cell")
    p.add_argument("--out", required=True)

    p = add("plan", "show a plan (summary + heatmap), build a baseline plan, or import / export MoA and "
            "DuoAttention plan files", cmd_plan)  # fmt: skip
    p.add_argument("action", choices=["show", "baseline", "import", "export"])
    p.add_argument("target", help="show: a plan JSON; baseline: the model; import / export: the format, moa or duo")
    p.add_argument("file", nargs="?", help="import: MoA's moa_alpha_beta.json or DuoAttention's "
                   "full_attention_heads.tsv; export: a plan JSON")  # fmt: skip
    p.add_argument("--model", help="import, export moa: the model, for its layer and head counts")
    p.add_argument("--config", help="import duo: DuoAttention's config.json (sink_size, recent_size)")
    p.add_argument("--sparsity", type=float, help="import duo: share of KV heads made streaming (gate below "
                   "this quantile of all gates), in [0, 1]")  # fmt: skip
    p.add_argument("--gqa", choices=["max", "mean"], default="max", help="import moa: how a KV head's query "
                   "heads' rules become one (max: each sees at least its MoA span; mean: keeps the density)")  # fmt: skip
    p.add_argument("--kind", choices=["uniform", "duo", "dense"], default="uniform")
    p.add_argument("--density", type=fraction)
    p.add_argument("--length", type=positive_int, help="reference length (baseline sizing; show: heatmap length)")
    p.add_argument("--lengths", type=positive_ints, help="show: lengths for the density summary")
    p.add_argument("--png")
    p.add_argument("--out")

    p = add("demo", "the main job: compress smollm2-135m and compare plans (what `make demo` runs)", cmd_demo)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--grid", choices=["demo", "full"], default="demo", help="demo: small grid (make demo); full: big")
    p.add_argument("--densities", type=checked_text(fractions), help="KV densities (default 0.5,0.25)")
    p.add_argument("--lengths", type=checked_text(positive_ints), help="profile lengths of the search")
    p.add_argument("--samples", type=positive_int, help="calibration samples per profile length")
    p.add_argument("--validate-length", type=positive_int, help="plan selection length")
    p.add_argument("--eval-lengths", type=checked_text(positive_ints), help="eval lengths")
    p.add_argument("--tasks", help="retrieval tasks")
    p.add_argument("--per-depth", type=positive_int, help="prompts per (task, length, depth)")
    p.add_argument("--out", default="runs/demo")

    p = add("compare", "train several variants with one token budget and print a comparison table", cmd_compare)
    p.add_argument("variants", nargs="+", help="preset, or label=preset[,key=value...]")
    p.add_argument("--out", required=True)
    _add_train_args(p)

    p = add("mil", "multiple instance learning on digit bags: ABMIL vs ACMIL (MBA, STKIM) attention pools", cmd_mil)
    p.add_argument("--out", required=True, help="folder for results.md, results.json and heatmap.png")
    p.add_argument("--methods", default="abmil,mba,mba_stkim", help="comma-separated subset of abmil,mba,mba_stkim")
    p.add_argument("--seeds", type=positive_int, default=5, help="seeds 0..N-1, each with its own bags (default 5)")
    p.add_argument("--target", type=nonneg_int, default=9, help="digit that makes a bag positive (default 9)")
    p.add_argument("--bag-mean", type=positive_float, default=10.0, help="mean bag size (default 10)")
    p.add_argument("--bag-std", type=nonneg_float, default=2.0, help="bag size std (default 2)")
    p.add_argument("--train-bags", type=positive_int, default=100, help="training bags (default 100)")
    p.add_argument("--test-bags", type=positive_int, default=400, help="test bags (default 400)")
    p.add_argument("--positive-rate", type=fraction, default=0.5, help="share of positive bags (default 0.5)")
    p.add_argument("--epochs", type=positive_int, default=40, help="training epochs (default 40)")
    p.add_argument("--branches", type=positive_int, default=5, help="MBA attention branches (default 5)")
    p.add_argument("--top-k", type=positive_int, default=3, help="STKIM candidates per branch (default 3)")
    p.add_argument("--mask-rate", type=fraction, default=0.6, help="STKIM share of the top-k masked (default 0.6)")
    p.add_argument("--diversity-coef", type=nonneg_float, default=1.0, help="branch diversity weight (default 1)")

    add("presets", "list the model presets with total and active parameters", cmd_presets)
    return parser


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status. Every error is one line on stderr, no traceback
    (set MIXATTN_DEBUG=1 to see one): 2 for bad input, 1 for an internal error, 130 for Ctrl-C and
    143 for SIGTERM (both after the training loop has saved a checkpoint)."""
    import os

    from .train.loop import Terminated

    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        print(f"mixattn: error: {_one_line(e)}", file=sys.stderr)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    debug = os.environ.get("MIXATTN_DEBUG") == "1"
    try:
        return args.fn(args)
    except (ValueError, OSError) as e:  # bad input: the message names the file, key or argument
        if debug:
            raise
        print(f"mixattn {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mixattn {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"mixattn {args.command}: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except Exception as e:
        if debug:
            raise
        print(f"mixattn {args.command}: internal error: {type(e).__name__}: {_one_line(e)} "
              "(MIXATTN_DEBUG=1 shows the traceback; please report it)", file=sys.stderr)  # fmt: skip
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
