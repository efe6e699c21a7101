"""Train several model variants with one token budget and compare them side by side.

This is the from-scratch experiment behind ``make demo`` (until the compression pipeline takes
over) and docs/experiments.md: validation loss, tokens/s, total and active parameters, and for
routed models the MaxVio imbalance and routing fluctuation between the last two evaluations.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..eval.report import markdown_table, plot_curves, read_metrics
from ..models.config import apply_overrides, from_name
from ..models.decoder import MixtureLM
from .data import TokenData
from .loop import TrainConfig, train

COLUMNS = [
    ("label", "variant"),
    ("val_loss", "val loss"),
    ("tok_s", "tokens/s"),
    ("params", "params"),
    ("active_params", "active params"),
    ("max_vio", "MaxVio"),
    ("fluctuation", "fluctuation"),
]


def parse_variant(spec: str) -> tuple[str, str, list[str]]:
    """``label=preset[,key=value...]`` or just ``preset`` -> (label, preset, overrides)."""
    head, *overrides = spec.split(",")
    label, _, preset = head.rpartition("=")
    return label or preset, preset, overrides


def compare(variants: list[str], data: TokenData, cfg: TrainConfig, out_dir: str | Path, progress=True) -> str:
    """Train each variant (``label=preset,key=value,...``) from the same seed; return the markdown table.
    Writes ``results.json``, ``results.md`` and ``val_loss.png`` under ``out_dir``."""
    out_dir = Path(out_dir)
    rows, curves = [], {}
    for spec in variants:
        label, preset, overrides = parse_variant(spec)
        model_cfg = apply_overrides(from_name(preset), overrides)
        torch.manual_seed(cfg.seed)
        model = MixtureLM(model_cfg)
        run_dir = out_dir / label
        key = {"spec": spec, "train": repr(cfg), "data": data.name}
        done = run_dir / "variant.json"
        if done.is_file() and json.loads(done.read_text()) == key and (run_dir / "summary.json").is_file():
            summary = json.loads((run_dir / "summary.json").read_text())  # cached: same spec, same budget
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
            summary = train(model, data, cfg, run_dir, progress=progress)
            done.write_text(json.dumps(key))
        rows.append({"label": label, **summary})
        curves[label] = [(m["step"], m["val_loss"]) for m in read_metrics(run_dir / "metrics.jsonl") if "val_loss" in m]
    table = markdown_table(rows, COLUMNS)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(rows, indent=2))
    (out_dir / "results.md").write_text(table + "\n")
    title = f"{data.name}: validation loss"
    plot_curves(curves, out_dir / "val_loss.png", "step", "validation loss (nats/byte)", title)
    return table
