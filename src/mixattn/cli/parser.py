"""The argument parser: every subcommand, its flags (typed, so bad values fail before any work) and examples."""

from __future__ import annotations

import argparse

from ..argtypes import (
    OneLineParser,
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
from .examples import EXAMPLES
from .model_cmds import cmd_convert, cmd_export, cmd_generate, cmd_mil, cmd_presets
from .plan_cmds import cmd_compress, cmd_demo, cmd_eval, cmd_plan, cmd_report
from .train_cmds import _add_train_args, cmd_compare, cmd_train


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
    p.add_argument("--nproc", type=positive_int, help="train on N local processes (torchrun; experts sharded over "
                   "them, the rest with FSDP2); --batch-size is the global batch")  # fmt: skip
    _add_train_args(p)

    p = add("generate", "generate text from a checkpoint", cmd_generate)
    p.add_argument("checkpoint")
    p.add_argument("--prompt", default="")
    p.add_argument("--max-new-tokens", type=positive_int, default=200)
    p.add_argument("--temperature", type=nonneg_float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=positive_int)
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--packed", action="store_true",
                   help="keep oneDNN-prepacked weights (CPU inference; the weights' bytes again in memory)")
    _add_dtype(p, "inference dtype")
    p.add_argument("--prefill-chunk", type=positive_int, help="run the prompt this many tokens at a time")

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
    p.add_argument("--validate-samples", type=positive_int, default=8, help="held-out prompts for --validate-length")
    p.add_argument("--ppl-length", type=nonneg_int,
                   help="rule out candidates whose perplexity at this length is over (1 + --ppl-tolerance) x dense "
                   "(default: --validate-length; 0: no perplexity guard)")
    p.add_argument("--ppl-windows", type=positive_int, default=2, help="text windows for --ppl-length")
    p.add_argument("--ppl-tolerance", type=float, default=0.05, help="perplexity ratio allowed over dense (0.05: +5%%)")
    p.add_argument("--save-candidates", action="store_true",
                   help="also write every candidate plan as OUT_STEM.LABEL.json (to evaluate them side by side)")
    p.add_argument("--rebuild", action="store_true",
                   help="rebuild the cached stages (calibration, profile, held-out set) instead of reusing them; "
                   "the cache is keyed by the model's content and the calibration settings, so reuse is the default")
    p.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for old scripts
    p.add_argument("--out", required=True)

    p = add("eval", "evaluate plans side by side: retrieval, perplexity, speed and memory", cmd_eval)
    _add_dtype(p, "evaluation dtype (the search itself stays fp32)")
    p.add_argument("model")
    p.add_argument("--plan", action="append", default=[], help="plan JSON (repeatable)")
    p.add_argument("--baseline", action="append", default=[], metavar="KIND:DENSITY",
                   help="uniform:0.5, duo:0.25, or KIND:match (one per --plan, at its measured density per length); "
                   "duo-gradient:match ranks heads by the --plan's own cached gradient profile")  # fmt: skip
    p.add_argument("--tasks", help="passkey,multikey,multivalue,vartrack,lines,passage,ppl,speed "
                   "(default passkey,ppl,speed; --full: all retrieval tasks)")
    p.add_argument("--lengths", type=checked_text(positive_ints), help="default 1024,2048,4096 (--full: 1024,2048,4096,8192)")
    p.add_argument("--depths", type=checked_text(unit_floats),
                   help="needle depths in [0, 1] (default 0.25,0.75; --full: 5 depths)")
    p.add_argument("--samples", type=positive_int, help="prompts per (task, length, depth) (default 1; --full: 4)")
    p.add_argument("--ppl-windows", type=positive_int, help="perplexity windows per length (default 2; --full: 8)")
    p.add_argument("--full", action="store_true", help="the big grid: 5 tasks x 1k-8k x 5 depths x 4 = 20 per cell")
    p.add_argument("--no-dense", action="store_true",
                   help="skip the dense reference (prompts are seeded: merge with an earlier run's dense rows)")
    p.add_argument("--only-baselines", action="store_true",
                   help="evaluate the baselines only; each --plan just sizes its KIND:match baselines")
    p.add_argument("--restart", action="store_true",
                   help="discard --out's journal of finished prompts (by default a rerun resumes from it)")
    p.add_argument("--so-far", action="store_true",
                   help="compute nothing: tables of what --out's journal holds now (a run in progress "
                   "may be writing it), into --out/so-far/")
    p.add_argument("--out", required=True)

    p = add("report", "one report (tables, plots, verdicts) from several eval results folders, e.g. the full "
            "grid run as one eval per core", cmd_report)  # fmt: skip
    p.add_argument("sources", nargs="+", metavar="SRC", help="an eval --out folder, its so-far/ folder, or a results.json")
    p.add_argument("--budget", action="append", default=[], metavar="LABEL=DENSITY",
                   help="mark a plan as searched at 0.5 or 0.25 for the verdict lines, where its results.json "
                   "predates the record (eval now writes it from the plan's meta)")  # fmt: skip
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
    p.add_argument("--kind", choices=["uniform", "duo", "dense"], default="uniform",
                   help="duo-gradient needs a compress run's profile: see eval --baseline duo-gradient:match")
    p.add_argument("--density", type=fraction)
    p.add_argument("--length", type=positive_int, help="reference length (baseline sizing; show: heatmap length)")
    p.add_argument("--lengths", type=positive_ints, help="show: lengths for the density summary")
    p.add_argument("--png")
    p.add_argument("--out")

    p = add("demo", "the main job: compress smollm2-135m and compare plans (what `make demo` runs)", cmd_demo)
    _add_dtype(p, "evaluation dtype (the search itself stays fp32)")
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


def _add_dtype(p, what: str) -> None:
    from ..models.dtype import CHOICES

    p.add_argument("--dtype", choices=list(CHOICES), default="float32",
                   help=f"{what}; auto: bfloat16 where the CPU has AMX or AVX512_BF16 (or CUDA)")  # fmt: skip
