"""Checkpoints: a directory with ``config.json`` and ``model.safetensors`` (plus ``train_state.pt``
when saved by the training loop). Saves are atomic: everything is written to a temporary sibling
directory which then replaces the target, so an interrupted save never leaves a half-written
checkpoint, and the previous one survives until the new one is complete.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..paths import atomic_dir, load_torch, read_json
from .config import MixtureConfig
from .decoder import MixtureLM

FORMAT = "mixattn/1"


def model_tensors(model: MixtureLM) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint holds (the tied lm_head is implied by embed.weight)."""
    state = model.state_dict()
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)  # shares storage with embed.weight
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save(
    model: MixtureLM,
    directory: str | os.PathLike,
    train_state: dict | None = None,
    extra: dict | None = None,
    tokenizer=None,
):
    """Save ``model`` (and optionally the training state and tokenizer) atomically to ``directory``."""

    def write(tmp: Path):
        if tokenizer is not None:
            tokenizer.save(tmp)
        meta = {"format": FORMAT, "model": model.cfg.to_dict(), **(extra or {})}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
        save_file(model_tensors(model), str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        if train_state is not None:
            torch.save(train_state, tmp / "train_state.pt")

    return atomic_dir(Path(directory), write)


def read_config(directory: str | os.PathLike) -> tuple[MixtureConfig, dict]:
    """The model config and the whole config.json of a mixattn checkpoint directory."""
    path = Path(directory) / "config.json"
    meta = read_json(path, missing=f"{directory}: no config.json (not a checkpoint directory)")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}")
    return MixtureConfig.from_dict(meta["model"]), meta


def load(directory: str | os.PathLike) -> MixtureLM:
    """Load a mixattn checkpoint; tensors that don't match the config raise naming the first key."""
    cfg, _ = read_config(directory)
    model = MixtureLM(cfg)
    load_weights(model, directory)
    return model


def load_weights(model: MixtureLM, directory: str | os.PathLike) -> None:
    """Copy a checkpoint's tensors into an existing ``model`` of the same shape."""
    path = Path(directory) / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no model.safetensors")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: unreadable safetensors file ({e})") from None
    load_state(model, tensors, str(path))


def load_train_state(directory: str | os.PathLike) -> dict:
    """The optimizer/step/RNG state saved beside the weights by the training loop."""
    state = load_torch(Path(directory) / "train_state.pt", what="training state")
    missing = [k for k in ("optimizer", "step", "rng") if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{Path(directory) / 'train_state.pt'}: not a mixattn training state (no {missing[0]!r})")
    return state


def check_finite(model: MixtureLM, source: str) -> None:
    """Refuse a model with NaN or infinite weights, naming the first such tensor: it would otherwise
    train, save and generate garbage with exit status 0."""
    for name, p in model.state_dict().items():
        # a sum is NaN or inf when any element is (or, rarely, when finite values overflow: then the
        # exact element-wise check below decides); it is several times cheaper than isfinite().all()
        if p.is_floating_point() and not math.isfinite(float(p.sum(dtype=torch.float32))) and not bool(torch.isfinite(p).all()):
            bad = int((~torch.isfinite(p)).sum())
            raise ValueError(f"{source}: tensor {name!r} has {bad} non-finite values (NaN or inf); the weights are corrupt")


def load_state(model: MixtureLM, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``tensors`` into ``model``, refusing missing, unexpected or mis-shaped keys."""
    want = model_tensors(model)
    for key in sorted(set(want) | set(tensors)):
        if key not in tensors:
            raise ValueError(f"{source}: missing tensor {key!r} (expected shape {tuple(want[key].shape)})")
        if key not in want:
            raise ValueError(f"{source}: unexpected tensor {key!r} not in the model config")
        if tuple(tensors[key].shape) != tuple(want[key].shape):
            raise ValueError(
                f"{source}: tensor {key!r} has shape {tuple(tensors[key].shape)}, "
                f"config expects {tuple(want[key].shape)}"
            )
    model.load_state_dict(tensors, strict=False)
