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


def _prepare(a, out: Path, writer: bool = True) -> dict:
    """Validate the flags against ``out`` and load what the run needs: the model config, training
    config, data, tokenizer, saved run.json (on --resume) and the --init model. Only the ``writer``
    (rank 0 of a distributed run) clears ``out`` on --overwrite."""
    from .. import load, load_tokenizer
    from ..models import checkpoint
    from ..models.config import apply_overrides, from_name
    from ..train.data import load_corpus
    from ..train.loop import check_data

    if a.resume and (a.init or a.overwrite):
        raise ValueError("--resume continues the run in --out; it cannot be combined with --init or --overwrite")
    tokenizer, saved, init = None, None, None
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
        if writer:
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
    return {"cfg": cfg, "tcfg": tcfg, "settings": settings, "corpus": corpus, "data": data, "tokenizer": tokenizer,
            "saved": saved, "init": init}  # fmt: skip


def _build_model(a, run: dict):
    import torch

    from ..models import checkpoint
    from ..models.decoder import MixtureLM

    torch.manual_seed(run["settings"]["seed"])  # every rank of a distributed run builds the same weights
    model = MixtureLM(run["cfg"])
    if a.init and not a.resume:
        checkpoint.load_state(model, checkpoint.model_tensors(run["init"]), a.init)
    return model


def _write_run_json(a, out: Path, run: dict) -> None:
    saved = run["saved"]
    if saved is None:
        write_json(out / "run.json", {"preset": a.preset, "init": a.init, "corpus": run["corpus"], "overrides": _overrides(a),
                                      "train": run["settings"], "argv": sys.argv[1:]})  # fmt: skip
    else:
        write_json(out / "run.json", {**saved, "resumes": saved.get("resumes", []) + [sys.argv[1:]]})


def _in_torchrun() -> bool:
    """True inside a process started by torchrun (or any launcher setting the torch.distributed variables)."""
    import os

    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def cmd_train(a) -> int:
    from ..train.loop import train

    if _in_torchrun():
        return _train_rank(a)
    if a.nproc is not None:
        return _launch(a)
    out = Path(a.out)
    with locked(out):
        run = _prepare(a, out)
        model = _build_model(a, run)
        _write_run_json(a, out, run)
        summary = train(model, run["data"], run["tcfg"], out, resume=a.resume, stop_at=a.stop_at, tokenizer=run["tokenizer"])
    print(json.dumps(summary, indent=2))
    print(f"checkpoint: {out / 'checkpoint'}")
    return 0


def _launch(a) -> int:
    """--nproc N: run this same command on N local processes with torchrun; its status is ours."""
    import subprocess

    from ..parallel.launch import torchrun_argv

    argv = sys.argv[1:]
    if "train" not in argv:  # called as a library function, not from the command line
        raise ValueError("--nproc launches `mixattn train` from the command line; from Python, use mixattn.parallel")
    # the ranks learn the world size from torchrun; torchrun itself would read --nproc as its own ambiguous prefix
    keep = [x for i, x in enumerate(argv) if not x.startswith("--nproc") and not (i and argv[i - 1] == "--nproc")]
    return subprocess.run(torchrun_argv(a.nproc, keep)).returncode


def _train_rank(a) -> int:
    """One rank of a distributed run: experts sharded over the ranks (expert parallelism), the rest
    with FSDP2, each rank reading an equal share of every batch; rank 0 owns the run folder."""
    from contextlib import nullcontext

    import torch.distributed as dist

    from ..parallel import Distributed, init_distributed, make_mesh, parallelize, shutdown
    from ..train.loop import train

    device = "cpu"  # where the training loop runs, as in a single process: gloo
    session = init_distributed(device)
    if a.nproc is not None and a.nproc != session.world_size:
        raise ValueError(f"--nproc {a.nproc} but the launcher started {session.world_size} processes")
    out = Path(a.out)
    with session.guard(), (locked(out) if session.is_main else nullcontext()):
        if not session.is_main:
            dist.barrier()  # rank 0 checks and clears --out, and tokenises the corpus once for the cache
        run = _prepare(a, out, writer=session.is_main)
        if session.is_main:
            _write_run_json(a, out, run)
            dist.barrier()
        model, mesh = _build_model(a, run), make_mesh(device=device)  # ep = all ranks
        parallelize(model, mesh)
        summary = train(model, run["data"], run["tcfg"], out, resume=a.resume, stop_at=a.stop_at,
                        tokenizer=run["tokenizer"], world=Distributed(mesh))  # fmt: skip
        shutdown()
    if session.is_main:
        print(json.dumps(summary, indent=2))
        print(f"checkpoint: {out / 'checkpoint'} (consolidated; shards for resuming in {out / 'checkpoint' / 'dcp'})")
    return 0


def cmd_compare(a) -> int:
    from ..eval.compare import compare
    from ..train.data import load_corpus

    tcfg = _train_config(_train_settings(a))
    with locked(a.out):
        data = load_corpus(a.corpus or ["shakespeare"])
        table = compare(a.variants, data, tcfg, a.out)
    print(table)
    print(f"\nresults: {Path(a.out) / 'results.md'}, plot: {Path(a.out) / 'val_loss.png'}")
    return 0


