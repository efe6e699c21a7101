"""calibrate -> profile -> optimize, with each stage cached under a work directory and resumable.

    plan = compress("smollm2-135m", density=0.5, lengths=(1024, 2048), out="plan.json")
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..paths import cache_dir
from . import calibration, optimize
from . import profile as profiling
from .plan import Plan

CORPORA = ("shakespeare", "stdlib")


def work_dir_for(source: str, lengths, samples: int, seed: int, corpora) -> Path:
    key = hashlib.sha256(json.dumps([str(source), list(lengths), samples, seed, list(corpora)]).encode()).hexdigest()
    return cache_dir() / "compress" / key[:16]


def load_model(source):
    from .. import load, load_tokenizer

    return load(source), load_tokenizer(source)


def compress(source, density: float, lengths=(1024, 2048), out=None, samples: int = 2, corpora=CORPORA,
             max_rules_per_layer: int | None = None, resume: bool = True, seed: int = 0, work_dir=None,
             validate_length: int | None = None, progress: bool = True, model=None, tok=None) -> Plan:  # fmt: skip
    """Find a plan with mean KV density <= ``density`` at every length in ``lengths``.

    Stages are cached in ``work_dir`` (default: under the user cache, keyed by the inputs):
    calibration samples (the dense model's own answers), then the gradient profile (saved after
    every sample, so an interrupted run resumes), then the MILP. ``validate_length``: also build a
    plan with at most 2 rules per layer and keep whichever has the lower answer loss at that
    (longer, unseen) length.
    """
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if model is None:
        model, tok = load_model(source)
    longest = max(lengths + ((validate_length,) if validate_length else ()))
    if longest > model.cfg.max_seq_len:
        raise ValueError(f"length {longest} exceeds the model's max_seq_len {model.cfg.max_seq_len}")
    work = Path(work_dir) if work_dir else work_dir_for(source, lengths, samples, seed, corpora)
    work.mkdir(parents=True, exist_ok=True)
    calib_path = work / "calibration.pt"
    if resume and calib_path.is_file():
        samples_ = torch.load(calib_path, weights_only=False)
    else:
        samples_ = calibration.build(model, tok, list(corpora), lengths, samples, seed, progress=progress)
        torch.save(samples_, calib_path)
    prof = profiling.run(model, samples_, lengths, work / "profile.pt", resume=resume, progress=progress)
    name = str(source)
    plan = optimize.optimize(prof, density, max_rules_per_layer=max_rules_per_layer, model_name=name)
    if validate_length:
        other = optimize.optimize(prof, density, max_rules_per_layer=2, model_name=name)
        val = calibration.build(model, tok, list(corpora), (validate_length,), 1, seed + 1, progress=progress)
        plan, losses = optimize.select_by_validation(model, [plan, other], val)
        plan.meta["validation_losses"] = losses
    plan.meta.update(samples=len(samples_), lengths=list(lengths))
    if out is not None:
        plan.save(out)
        plan.plot(Path(out).with_suffix(".png"))
    return plan


def baseline(source, kind: str, density: float, length: int, sink: int = 64, model=None, tok=None) -> Plan:
    """uniform (StreamingLLM), duo (DuoAttention-style, heads scored by attention mass outside the
    sink + local window on real text) or dense."""
    if kind == "dense" or kind == "uniform":
        if model is None:
            model, tok = load_model(source)
        L, H = model.cfg.num_layers, model.cfg.num_kv_heads
        kw = {"model_name": str(source), "profile_lengths": (length,)}
        return Plan.dense(L, H, **kw) if kind == "dense" else Plan.uniform(L, H, density, length, sink, **kw)
    if kind != "duo":
        raise ValueError(f"unknown baseline {kind!r}; valid: uniform, duo, dense")
    if model is None:
        model, tok = load_model(source)
    from ..eval.perplexity import corpus_tokens

    scores = profiling.mass_outside_scores(model, corpus_tokens("shakespeare", tok, min(length, 2048)))
    return Plan.duo(scores.tolist(), density, length, sink, model_name=str(source), profile_lengths=(length,))
