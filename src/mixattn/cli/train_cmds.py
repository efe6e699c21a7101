"""`train` and `compare`: runs with saved settings, resume that restores them, one writer per folder."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..argtypes import (
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
)
from ..paths import LOCK_NAME, locked, read_json, write_json

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
    from ..train.loop import TrainConfig

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

    from .. import load, load_tokenizer
    from ..models import checkpoint
    from ..models.config import apply_overrides, from_name
    from ..models.decoder import MixtureLM
    from ..train.data import load_corpus
    from ..train.loop import check_data, train

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


def cmd_compare(a) -> int:
    from ..train.compare import compare
    from ..train.data import load_corpus

    tcfg = _train_config(_train_settings(a))
    with locked(a.out):
        data = load_corpus(a.corpus or ["shakespeare"])
        table = compare(a.variants, data, tcfg, a.out)
    print(table)
    print(f"\nresults: {Path(a.out) / 'results.md'}, plot: {Path(a.out) / 'val_loss.png'}")
    return 0


