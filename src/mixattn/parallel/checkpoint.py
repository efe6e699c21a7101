"""Checkpoints of a sharded run, through ``torch.distributed.checkpoint`` (DCP).

A distributed save writes one ordinary checkpoint directory (atomically, like a single-process save):

- ``dcp/``: model and optimizer shards as DCP writes them. DCP records each tensor's global shape
  and placement, so a run saved at one world size (or ep size) loads at any other;
- ``config.json``, ``model.safetensors``, ``train_state.pt`` (optimizer included): the consolidated
  single-process files, gathered to rank 0. ``mixattn.load``, ``mixattn export``, ``generate`` and a
  single-process ``--resume`` read them exactly as they read a single-process run's checkpoint.

Restoring prefers ``dcp/``; a checkpoint without it (saved by a single process) is loaded from the
consolidated files, so a run can move from 1 process to N and back.

Gathering the full state on rank 0 costs one model + optimizer of host memory there; it is what
makes the export work from a distributed run.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)

from ..models import checkpoint
from ..paths import atomic_dir

DCP_DIR = "dcp"
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _fqns(model: nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's order: the position i of torch's index-keyed optimizer state."""
    names: dict[int, str] = {}
    for n, p in model.named_parameters():  # the first name of a tied parameter, as state dicts use
        names.setdefault(id(p), n)
    return [names[id(p)] for g in opt.param_groups for p in g["params"]]


def _to_indexed(full: dict, fqns: list[str]) -> dict:
    """DCP's name-keyed full optimizer state -> torch.optim's index-keyed ``state_dict()`` form."""
    index = {n: i for i, n in enumerate(fqns)}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in full["param_groups"]]
    return {"state": {index[n]: s for n, s in full["state"].items()}, "param_groups": groups}


def _to_named(indexed: dict, fqns: list[str]) -> dict:
    """The inverse of ``_to_indexed``."""
    groups = [{**g, "params": [fqns[i] for i in g["params"]]} for g in indexed["param_groups"]]
    return {"state": {fqns[int(i)]: s for i, s in indexed["state"].items()}, "param_groups": groups}


def save(run, rank: int) -> None:
    """Save ``run`` (a ``train.loop._Run`` over a sharded model) to ``run.ckpt_dir``; call on every rank."""
    model, opt = run.model, run.opt
    full_model = get_model_state_dict(model, options=_FULL)  # collectives: every rank takes part
    full_optim = get_optimizer_state_dict(model, opt, options=_FULL)
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"step": run.step, "prev_top1": run.prev_top1, "tok_time": run.tok_time, "rng": torch.get_rng_state(),
             "train": asdict(run.cfg)}  # fmt: skip

    def shards(tmp: Path) -> None:
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / DCP_DIR))

    if rank != 0:
        where = [None]
        dist.broadcast_object_list(where, src=0)
        shards(Path(where[0]))  # dcp.save returns on every rank once the whole checkpoint is written
        dist.barrier()
        return

    def write(tmp: Path) -> None:
        dist.broadcast_object_list([str(tmp)], src=0)
        shards(tmp)
        if run.tokenizer is not None:
            run.tokenizer.save(tmp)
        meta = {"format": checkpoint.FORMAT, "model": model.cfg.to_dict(), "step": run.step}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
        tensors = dict(full_model)
        if model.cfg.tie_embeddings:
            tensors.pop("lm_head.weight", None)  # implied by embed.weight, as in a single-process save
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": checkpoint.FORMAT})  # fmt: skip
        torch.save({**state, "optimizer": _to_indexed(full_optim, _fqns(model, opt))}, tmp / "train_state.pt")

    atomic_dir(run.ckpt_dir, write)
    dist.barrier()  # the checkpoint is complete and in place before any rank moves on


def restore(run) -> None:
    """Load ``run.ckpt_dir`` into the sharded ``run.model`` and ``run.opt``; call on every rank.

    Uses the DCP shards when present (any saving world size), else the consolidated single-process files.
    """
    ckpt = run.ckpt_dir
    if not (ckpt / "train_state.pt").is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {ckpt}")
    state = checkpoint.load_train_state(ckpt)
    model, opt = run.model, run.opt
    if (ckpt / DCP_DIR).is_dir():
        model_sd, optim_sd = get_state_dict(model, opt)
        sd = {"model": model_sd, "optim": optim_sd}
        dcp.load(sd, checkpoint_id=str(ckpt / DCP_DIR))  # reshards to this run's mesh
        set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    else:
        tensors = load_file(str(ckpt / "model.safetensors"))
        if model.cfg.tie_embeddings and "embed.weight" in tensors:
            tensors["lm_head.weight"] = tensors["embed.weight"]
        set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True))
        named = _to_named(state["optimizer"], _fqns(model, opt))
        set_optimizer_state_dict(model, opt, named, options=StateDictOptions(full_state_dict=True))
    run.step, run.prev_top1, run.tok_time = state["step"], state["prev_top1"], state["tok_time"]
    torch.set_rng_state(state["rng"])
