"""Train several model variants with one token budget and compare them side by side.

This is the from-scratch experiment behind ``make demo`` (until the compression pipeline takes
over) and docs/experiments.md: validation loss, tokens/s, total and active parameters, and for
routed models the MaxVio imbalance and routing fluctuation between the last two evaluations.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from ..data import TokenData
from ..models.config import apply_overrides, from_name
from ..models.decoder import MixtureLM
from ..paths import write_json, write_text
from ..train.loop import TrainConfig, train
from .report import markdown_table, plot_curves, read_metrics

COLUMNS = [
    ("label", "variant"),
    ("val_loss", "val loss"),
    ("tok_s", "tokens/s"),
    ("params", "params"),
    ("active_params", "active params"),
    ("max_vio", "MaxVio"),
    ("fluctuation", "fluctuation"),
]


LABEL = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")  # a plain folder name: no separators, no "..", no leading dot
MARKER = "variant.json"  # written by compare in each folder it creates; only such folders are ever replaced


def parse_variant(spec: str) -> tuple[str, str, list[str]]:
    """``label=preset[,key=value...]`` or just ``preset`` -> (label, preset, overrides)."""
    head, *overrides = spec.split(",")
    label, _, preset = head.rpartition("=")
    label = label or preset
    if not LABEL.fullmatch(label) or ".." in label:
        raise ValueError(f"variant {spec!r}: label {label!r} must be a plain folder name (letters, digits, _ . + -)")
    return label, preset, overrides


def compare(variants: list[str], data: TokenData, cfg: TrainConfig, out_dir: str | Path, progress=True) -> str:
    """Train each variant (``label=preset,key=value,...``) from the same seed; return the markdown table.
    Writes ``results.json``, ``results.md`` and ``val_loss.png`` under ``out_dir``."""
    out_dir = Path(out_dir)
    parsed = {}
    for spec in variants:  # every variant is checked before the first one trains
        label, preset, overrides = parse_variant(spec)
        if label in parsed:
            raise ValueError(f"variant label {label!r} is given twice; name them label=preset")
        parsed[label] = (spec, apply_overrides(from_name(preset), overrides))
        run_dir = out_dir / label
        if run_dir.exists() and not (run_dir / MARKER).is_file() and (not run_dir.is_dir() or any(run_dir.iterdir())):
            raise ValueError(f"{run_dir} exists and was not made by `mixattn compare`; move it or choose another --out")
    rows, curves = [], {}
    for label, (spec, model_cfg) in parsed.items():
        torch.manual_seed(cfg.seed)
        model = MixtureLM(model_cfg)
        run_dir = out_dir / label
        key = {"spec": spec, "train": repr(cfg), "data": data.name}
        done = run_dir / MARKER
        if done.is_file() and json.loads(done.read_text()).get("key") == key and (run_dir / "summary.json").is_file():
            summary = json.loads((run_dir / "summary.json").read_text())  # cached: same spec, same budget
        else:
            if run_dir.is_dir():  # ours (checked above): an earlier, different or unfinished variant
                shutil.rmtree(run_dir)
            write_json(done, {"key": key, "done": False})
            summary = train(model, data, cfg, run_dir, progress=progress)
            write_json(done, {"key": key, "done": True})
        rows.append({"label": label, **summary})
        curves[label] = [(m["step"], m["val_loss"]) for m in read_metrics(run_dir / "metrics.jsonl") if "val_loss" in m]
    table = markdown_table(rows, COLUMNS)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "results.json", rows)
    write_text(out_dir / "results.md", table + "\n")
    title = f"{data.name}: validation loss"
    plot_curves(curves, out_dir / "val_loss.png", "step", "validation loss (nats/byte)", title)
    return table
