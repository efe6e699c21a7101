"""calibrate -> profile -> optimize -> select, each stage cached under a work directory and resumable.

    plan = compress("smollm2-135m", density=0.5, lengths=(1024, 2048), validate_length=4096, out="plan.json")

Following MoA (arXiv 2406.14909): calibration answers are the model's own where they are right and
the gold answers where they are not; the gradient profile is taken at every profile length; the MILP
picks one rule per KV head under the density budget at every profile (and validation) length; and
the final plan is chosen among several MILP solutions by greedy retrieval hits (then answer loss) on
held-out passkey and multi-key prompts at a longer length than any profile, among the candidates
whose perplexity there stays within 5% of dense. The cache key is the model's content digest, not
its path.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from ..paths import cache_dir, content_digest, load_torch, locked, save_torch
from . import calibration, optimize, select
from . import profile as profiling
from .plan import DENSE, HeadRule, Plan

CORPORA = ("shakespeare", "stdlib")
BASELINES = ("uniform", "duo", "duo-gradient", "dense")
log = logging.getLogger(__name__)
CACHE_VERSION = "calib-v5"  # bump when calibration or profiling changes meaning


def model_file(source) -> Path:
    """The file or directory a model source is read from (the embedded name resolves to its GGUF)."""
    from ..models.hf import EMBEDDED, embedded_gguf

    if str(source) in EMBEDDED:
        return embedded_gguf(str(source))
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"no such model: {source}")
    return path


def peek_max_seq_len(source) -> int:
    """The model's max_seq_len, read from its config or GGUF header without loading weights."""
    path = model_file(source)
    if path.is_file():
        from gguf import GGUFReader

        fields = GGUFReader(path).fields
        key = next((k for k in fields if k.endswith(".context_length")), None)
        if key is None:
            raise ValueError(f"{path}: GGUF header has no context_length")
        f = fields[key]
        return int(f.parts[f.data[0]][0])
    cfg = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    if "model" in cfg and "max_seq_len" in cfg["model"]:
        return int(cfg["model"]["max_seq_len"])
    return int(cfg.get("max_position_embeddings", 2048))


def work_dir_for(source, lengths, samples: int, seed: int, corpora, digest: str | None = None) -> Path:
    """Cache directory keyed by the model's content digest (not its path) and the calibration inputs."""
    digest = digest or content_digest(model_file(source))
    key = json.dumps([CACHE_VERSION, digest, list(lengths), samples, seed, list(corpora)])
    return cache_dir() / "compress" / hashlib.sha256(key.encode()).hexdigest()[:16]


def load_model(source):
    """(model, tokenizer) of a model source, fp32 (profiling and the MILP need full precision)."""
    from ..models.hf import load_pretrained, load_tokenizer

    return load_pretrained(source), load_tokenizer(source)


def check_args(density, lengths, samples, max_rules_per_layer, validate_length, max_seq_len=None,
               ppl_length=None) -> None:
    """Every argument of ``compress``; raised before anything is loaded or computed."""
    if not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    if not lengths or any(not isinstance(N, int) or isinstance(N, bool) or N <= 0 for N in lengths):
        raise ValueError(f"lengths must be positive integers, got {list(lengths) if lengths else lengths!r}")
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be an integer >= 1, got {samples!r}")
    if max_rules_per_layer is not None and (not isinstance(max_rules_per_layer, int) or max_rules_per_layer < 1):
        raise ValueError(f"max_rules_per_layer must be an integer >= 1, got {max_rules_per_layer!r}")
    if validate_length is not None and (not isinstance(validate_length, int) or validate_length <= 0):
        raise ValueError(f"validate_length must be a positive integer, got {validate_length!r}")
    if ppl_length is not None and (not isinstance(ppl_length, int) or isinstance(ppl_length, bool) or ppl_length == 1
                                   or ppl_length < 0):  # fmt: skip
        raise ValueError(f"ppl_length must be an integer >= 2 (or 0: no perplexity guard), got {ppl_length!r}")
    longest = max([*lengths, validate_length or 0, ppl_length or 0])
    if max_seq_len is not None and longest > max_seq_len:
        raise ValueError(f"length {longest} exceeds the model's max_seq_len {max_seq_len}")
    budget_lengths = sorted({*lengths, *(n for n in (validate_length, ppl_length) if n)})
    floor = min(max(r.density(N) for N in budget_lengths) for r in optimize.candidate_rules(budget_lengths))
    if density < floor - 1e-12:
        raise ValueError(f"density {density} cannot be met: the sparsest candidate rule keeps {floor:.3f} "
                         f"at lengths {budget_lengths}")  # fmt: skip


STREAMING_WINDOWS = (64, 128, 256, 448)  # sink 64 + these: the short-window heads of "full+window"
STREAMING_BETAS = (0.1, 0.2, 0.3)  # ... or sink 64 + an elastic window beta N, so the budget holds at every length
ELASTIC_BETAS = (0.05, 0.1, 0.2, 0.3, 0.5)  # the windows of "full+elastic": a share of N only, never fixed


def candidates(prof, density: float, budget_lengths, max_rules_per_layer, name: str) -> dict[str, Plan]:
    """Plans the validation chooses among, all within ``density`` at every budget length:

    - ``milp``: MoA's MILP over the whole rule grid, objective = gradient influence;
    - ``milp-2-rules``: the same with at most 2 distinct rules per layer;
    - ``milp+copy``: the whole grid, objective = influence + the retrieval (copy) attention dropped;
    - ``full+window``: every head either full or sink 64 + a short fixed or elastic window, chosen by
      influence + copy attention: "retrieval heads full, the rest streaming" (DuoAttention's shape,
      heads ranked by what the profile says they retrieve), with the budget met at every length;
    - ``full+elastic``: the same with elastic windows only (sink 64 + beta N): every head still sees a
      fixed share of the context at lengths far past the profile, where fixed short windows starve
      next-token prediction, and the plan's density stays at the budget instead of drifting down;
    - ``rank+window``, ``rank+elastic``: the same two shapes chosen by the gradient influence alone,
      without the copy term: the profile-ranked "top heads full, rest streaming" plan of the
      duo-gradient baseline, so the validation can pick it where the copy attention misleads
      (the two objectives keep different heads full: on SmolLM2 the copy term favours late layers,
      the influence early ones).
    """
    out = {}
    kw = {"model_name": name, "budget_lengths": budget_lengths}
    out["milp"] = optimize.optimize(prof, density, max_rules_per_layer=max_rules_per_layer, **kw)
    if max_rules_per_layer is None or max_rules_per_layer > 2:
        out["milp-2-rules"] = optimize.optimize(prof, density, max_rules_per_layer=2, **kw)
    if prof.copy:
        out["milp+copy"] = optimize.optimize(prof, density, max_rules_per_layer=max_rules_per_layer, copy_weight=1.0, **kw)
        streaming = [HeadRule(64, float(w), 0.0) for w in STREAMING_WINDOWS]
        streaming += [HeadRule(64, 0.0, b) for b in STREAMING_BETAS]
        elastic = [HeadRule(64, 0.0, b) for b in ELASTIC_BETAS]
        for shape, rules in (("window", streaming), ("elastic", elastic)):
            for prefix, copy_weight in (("full", 1.0), ("rank", 0.0)):
                try:
                    out[f"{prefix}+{shape}"] = optimize.optimize(prof, density, rules=[DENSE, *rules],
                                                                 copy_weight=copy_weight, **kw)  # fmt: skip
                except ValueError:  # even the sparsest rule is above the budget at a short length
                    pass
    for label, plan in out.items():
        plan.meta["candidate"] = label
    return out


def compress(source, density: float, lengths=(1024, 2048), out=None, samples: int = 16, corpora=CORPORA,
             max_rules_per_layer: int | None = None, resume: bool = True, seed: int = 0, work_dir=None,
             validate_length: int | None = None, validate_samples: int = 4, progress: bool = True, model=None,
             tok=None, save_candidates: bool = False, ppl_length: int | None = None, ppl_windows: int = 2,
             ppl_tolerance: float = 0.05) -> Plan:  # fmt: skip
    """Find a plan with mean KV density <= ``density`` at every length in ``lengths`` (and at
    ``validate_length`` and ``ppl_length``), choosing among candidate plans by retrieval hits and
    answer loss at ``validate_length`` (``select.select_by_validation``), among those whose perplexity
    at ``ppl_length`` (``ppl_windows`` windows of Shakespeare's training split, held out from
    evaluation) is within ``1 + ppl_tolerance`` of dense. ``ppl_length`` None means
    ``validate_length``; 0 turns the perplexity guard off.

    Stages cached in ``work_dir`` (default: under the user cache, keyed by the model's content):
    calibration.pt (``samples`` per length), profile.pt (saved after every sample: resumable),
    validation.pt. The MILP runs every time (seconds). ``save_candidates``: also write every
    candidate as ``<out stem>.<label>.json`` next to ``out``.
    """
    lengths = tuple(lengths)
    if ppl_length is None and validate_length:  # the perplexity guard is on unless ppl_length=0
        ppl_length = validate_length
    if out is not None and (Path(out).is_dir() or Path(out).with_suffix(".png").is_dir()):
        raise ValueError(f"out {out} (or its heatmap {Path(out).with_suffix('.png')}) is a folder; a plan file path is expected")
    check_args(density, lengths, samples, max_rules_per_layer, validate_length,
               model.cfg.max_seq_len if model is not None else None, ppl_length)  # fmt: skip
    if ppl_length and not validate_length:
        raise ValueError("ppl_length needs validate_length: the perplexity guard is part of plan selection")
    if ppl_length and (ppl_windows < 1 or not ppl_tolerance >= 0):
        raise ValueError(f"ppl_windows must be >= 1 and ppl_tolerance >= 0, got {ppl_windows}, {ppl_tolerance}")
    if model is None:
        check_args(density, lengths, samples, max_rules_per_layer, validate_length, peek_max_seq_len(source),
                   ppl_length)  # fmt: skip
        model, tok = load_model(source)
    work = Path(work_dir) if work_dir else work_dir_for(source, lengths, samples, seed, corpora)
    with locked(work, wait=True):  # a second compress of the same model waits, then reuses the cache
        samples_ = _cached(work / "calibration.pt", resume, lambda: calibration.build(
            model, tok, list(corpora), lengths, samples, seed, progress=progress))  # fmt: skip
        prof = profiling.run(model, samples_, lengths, work / "profile.pt", resume=resume, progress=progress)
    name = str(source)
    budget_lengths = tuple(sorted({*lengths, *(n for n in (validate_length, ppl_length) if n)}))
    plans = candidates(prof, density, budget_lengths, max_rules_per_layer, name)
    plan = plans["milp"]
    if validate_length:
        val = _cached(work / f"validation_{validate_length}_{validate_samples}_{'-'.join(calibration.VALIDATION_TASKS)}.pt",
                      resume, lambda: calibration.build(model, tok, list(corpora), (validate_length,), validate_samples,
                                                        seed + 7919, progress=progress,
                                                        task_names=calibration.VALIDATION_TASKS))  # fmt: skip
        stream = None
        if ppl_length:
            from ..data import corpus_tokens

            stream = corpus_tokens("shakespeare", tok, ppl_length * ppl_windows + 1, split="train")
        plan, scores = select.select_by_validation(model, list(plans.values()), val, tok, stream, ppl_length or 0,
                                                   ppl_windows, ppl_tolerance, progress)  # fmt: skip
        plan.meta["validation"] = {"length": validate_length, "samples": len(val), "own_answers": sum(s.own for s in val),
                                   **{k: dict(zip(plans, v)) for k, v in scores.items() if v is not None}}  # fmt: skip
        if ppl_length:
            plan.meta["validation"].update(ppl_length=ppl_length, ppl_windows=ppl_windows, ppl_tolerance=ppl_tolerance)
    plan.meta.update(samples=len(samples_), lengths=list(lengths), seed=seed, budget_lengths=list(budget_lengths),
                     calibration=calibration.summary(samples_))  # fmt: skip
    if out is not None:
        plan.save(out)
        plan.plot(Path(out).with_suffix(".png"))
        for label, cand in plans.items() if save_candidates else ():
            cand.save(Path(out).with_name(f"{Path(out).stem}.{label}.json"))
    return plan


def _cached(path: Path, resume: bool, build) -> list:
    """Calibration samples from ``path`` (with ``resume``) or built and saved there as plain data."""
    if resume and path.is_file():
        try:
            return calibration.from_plain(load_torch(path, "calibration cache", weights_only=True))
        except (ValueError, KeyError, TypeError) as e:  # an older cache (pickled classes): build anew
            log.warning("%s: %s; rebuilding it", path, str(e)[:160])
    value = build()
    save_torch(path, calibration.to_plain(value))
    return value


def baseline(source, kind: str, density: float, length: int, sink: int = 64, model=None, tok=None,
             scores=None, profile=None) -> Plan:  # fmt: skip
    """uniform (StreamingLLM), duo (DuoAttention-style, heads ranked by ``scores`` or by attention
    mass outside the sink + local window on real text), duo-gradient (heads ranked by the gradient
    ``profile``'s loss under a sink + local rule: the profile-ranked "top heads full, rest short
    window" plan) or dense, sized for ``length``."""
    if kind not in BASELINES:
        raise ValueError(f"unknown baseline {kind!r}; valid: {', '.join(BASELINES)}")
    if kind == "duo-gradient" and scores is None:
        if profile is None:
            raise ValueError("the duo-gradient baseline needs the gradient profile of a compress run")
        scores = gradient_scores(profile)
    if model is None and kind != "duo-gradient":
        model, tok = load_model(source)
    kw = {"model_name": str(source), "profile_lengths": (length,)}
    if kind == "dense":
        return Plan.dense(model.cfg.num_layers, model.cfg.num_kv_heads, **kw)
    if kind == "uniform":
        return Plan.uniform(model.cfg.num_layers, model.cfg.num_kv_heads, density, length, sink, **kw)
    if scores is None:
        scores = mass_scores(model, tok)
    plan = Plan.duo(scores, density, length, sink, duo_window(density, length, sink), **kw)
    if kind == "duo-gradient":
        plan.meta["method"] = "duo-gradient"
    return plan


def gradient_scores(profile: profiling.Profile) -> list:
    """(layers, KV heads) ranking of the duo-gradient baseline: each head's profiled loss under a
    sink + local rule (the heads a streaming rule hurts most stay full)."""
    streaming = HeadRule(profiling.SINK, float(profiling.LOCAL), 0.0)
    loss = optimize.loss_matrix(profile, [streaming])[:, 0]
    L, H = profile.influence[profile.lengths[0]].shape[:2]
    return loss.reshape(L, H).tolist()


def profile_for(source, plan: Plan, corpora=CORPORA) -> profiling.Profile:
    """The cached gradient profile ``compress`` built ``plan`` from (found by the model's content and
    the plan's calibration lengths, samples per length and seed)."""
    meta = plan.meta
    per_length = (meta.get("calibration") or {}).get("per_length") or {}
    if not meta.get("lengths") or not per_length:
        raise ValueError("the plan does not record its calibration (lengths, samples per length): "
                         "only a plan written by `mixattn compress` has a profile to rank heads by")  # fmt: skip
    samples = max(per_length.values())
    path = work_dir_for(source, meta["lengths"], samples, meta.get("seed", 0), corpora) / "profile.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no cached profile for this plan on this machine; rerun `mixattn compress "
                                f"{source} --lengths {','.join(map(str, meta['lengths']))} --samples {samples}` "
                                "(it rebuilds the profile and writes it there)")  # fmt: skip
    return profiling.Profile.load(path)


def duo_window(density: float, length: int, sink: int = 64, window: int = 256) -> int:
    """The streaming heads' window: ``window``, shrunk where sink + window alone would use more than
    3/4 of the budget at ``length`` (so that some heads can stay full and the density can be met)."""
    if (sink + window) / length <= 0.75 * density:
        return window
    return max(16, int(0.75 * density * length) - sink)


def mass_scores(model, tok) -> list:
    """DuoAttention/RazorAttention-style head scores: attention mass outside sink + local window."""
    from ..data import corpus_tokens

    return profiling.mass_outside_scores(model, corpus_tokens("shakespeare", tok, min(model.cfg.max_seq_len, 2048))).tolist()


def matched(source, kind: str, reference: Plan, lengths, model=None, tok=None, scores=None, slack: int = 16,
            profile=None) -> dict:  # fmt: skip
    """{L: baseline plan} whose density at L + ``slack`` equals ``reference``'s there (within ±0.01 for
    uniform; within half a head's share for duo): equal-density baselines at every eval length."""
    if model is None and kind != "duo-gradient":
        model, tok = load_model(source)
    if kind == "duo" and scores is None:  # the ranking once, for every length
        scores = mass_scores(model, tok)
    if kind == "duo-gradient" and scores is None and profile is not None:
        scores = gradient_scores(profile)
    out = {}
    for L in lengths:
        N = L + slack
        out[L] = baseline(source, kind, reference.density([N]), N, model=model, tok=tok, scores=scores)
    return out
