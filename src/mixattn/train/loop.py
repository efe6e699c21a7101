"""The one training loop: AdamW, warm-up + cosine or WSD schedule, gradient clipping and
accumulation, explicit aux losses, periodic validation with routing statistics (MaxVio, routing
fluctuation), a tqdm bar, a metrics JSONL log, atomic checkpoints and exact resume.

Aux-loss settings (balance kind and coefficients) live in the model config, so they are saved
with the checkpoint; the CLI's --balance / --balance-coef / --z-coef override them.
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..layers.losses import BalanceBuffer, max_vio, routing_fluctuation
from ..models import checkpoint
from ..models.decoder import MixtureLM, count_parameters
from ..paths import write_json
from .data import TokenData
from .safety import NonFiniteLoss, Terminated, check_data, keep_metrics_until, raise_for, stop_at_step_end
from .world import SingleProcess

__all__ = ["NonFiniteLoss", "Terminated", "TrainConfig", "check_data", "evaluate", "lr_at", "train"]


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    steps: int = 1000  # optimizer steps
    batch_size: int = 16  # sequences per micro-batch
    seq_len: int = 256
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    warmup_steps: int = 50
    schedule: str = "cosine"  # cosine | wsd (warm-up, stable, linear decay over the last decay_frac)
    decay_frac: float = 0.2  # WSD decay share of the run
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_every: int = 100  # validation (and checkpoint) interval, in steps
    eval_batches: int = 8
    log_every: int = 10
    seed: int = 0
    on_nonfinite: str = "stop"  # stop (error, last checkpoint kept) | skip (drop the step's update)

    def __post_init__(self):
        if self.schedule not in ("cosine", "wsd"):
            raise ValueError(f"schedule={self.schedule!r} is not one of ('cosine', 'wsd')")
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_every", "eval_batches", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train {name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0) or not 0 <= self.min_lr_ratio <= 1 or not 0 < self.decay_frac <= 1:
            raise ValueError("need a finite lr > 0, 0 <= min_lr_ratio <= 1 and 0 < decay_frac <= 1")
        if self.warmup_steps < 0 or self.seed < 0:
            raise ValueError(f"train warmup_steps and seed must be >= 0, got {self.warmup_steps} and {self.seed}")
        if self.on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite={self.on_nonfinite!r} is not one of ('stop', 'skip')")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        decay_start = int(cfg.steps * (1 - cfg.decay_frac))
        if step < decay_start:
            return cfg.lr
        frac = (step - decay_start) / max(1, cfg.steps - decay_start)
        return cfg.lr - (cfg.lr - floor) * frac
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * min(1.0, frac)))


def _optimizer(model: MixtureLM, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]  # norms, biases
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


@torch.no_grad()
def evaluate(model: MixtureLM, data: TokenData, cfg: TrainConfig, world=None) -> dict:
    """Validation loss on fixed batches, MaxVio per router, and each router's top-1 on the first batch;
    when ``world`` splits batches between processes, all three cover the whole batches."""
    world = world or SingleProcess()
    was_training = model.training
    model.eval()
    losses, counts, top1 = [], {}, {}
    for i in range(cfg.eval_batches):
        x, y = (world.local_rows(t) for t in data.batch("val", i, cfg.batch_size, cfg.seq_len, cfg.seed))
        out = model(x)
        losses.append(world.mean(float(F.cross_entropy(out.logits.flatten(0, 1).float(), y.flatten()))))
        for name, r in out.routers:
            counts[name] = counts.get(name, 0) + r.counts()
            if i == 0:
                top1[name] = world.all_rows(r.indices[:, 0])  # the whole batch's: comparable across world sizes
    model.train(was_training)
    vio = {n: max_vio(world.sum(c)) for n, c in counts.items()}
    return {"val_loss": sum(losses) / len(losses), "max_vio": vio, "top1": top1}


@dataclass
class _Run:
    """The mutable state of one training run: what a checkpoint saves and a resume restores."""

    model: MixtureLM
    opt: torch.optim.Optimizer
    cfg: TrainConfig
    ckpt_dir: Path
    tokenizer: object = None
    world: object = field(default_factory=SingleProcess)  # the processes this run spans (train.world)
    step: int = 0
    prev_top1: dict | None = None
    tok_time: list = field(default_factory=lambda: [0, 0.0])  # tokens seen, seconds spent

    def restore(self) -> None:
        if not (self.ckpt_dir / "train_state.pt").is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {self.ckpt_dir}")
        state = checkpoint.load_train_state(self.ckpt_dir)
        checkpoint.load_weights(self.model, self.ckpt_dir)
        checkpoint.check_finite(self.model, str(self.ckpt_dir))
        self.opt.load_state_dict(state["optimizer"])
        self.step, self.prev_top1, self.tok_time = state["step"], state["prev_top1"], state["tok_time"]
        torch.set_rng_state(state["rng"])

    def save(self) -> None:
        state = {"optimizer": self.opt.state_dict(), "step": self.step, "prev_top1": self.prev_top1,
                 "tok_time": self.tok_time, "rng": torch.get_rng_state(), "train": asdict(self.cfg)}  # fmt: skip
        checkpoint.save(self.model, self.ckpt_dir, train_state=state, extra={"step": self.step}, tokenizer=self.tokenizer)

    @property
    def tokens_per_s(self) -> float:
        return self.tok_time[0] / max(self.tok_time[1], 1e-9)


def _step(run: _Run, data: TokenData, buffer, biased: set, log) -> tuple[float, float]:
    """One optimizer step over ``grad_accum`` micro-batches; returns (cross-entropy, aux loss)."""
    cfg, model, opt, world = run.cfg, run.model, run.opt, run.world
    t0 = time.perf_counter()
    for g in opt.param_groups:
        g["lr"] = lr_at(run.step, cfg)
    counts: dict[str, torch.Tensor] = {}
    total = aux_total = 0.0
    for micro in range(cfg.grad_accum):
        batch = data.batch("train", run.step * cfg.grad_accum + micro, cfg.batch_size, cfg.seq_len, cfg.seed)
        x, y = (world.local_rows(t) for t in batch)
        out = model(x, balance_buffer=buffer)
        ce = F.cross_entropy(out.logits.flatten(0, 1).float(), y.flatten())
        ((ce + out.aux_loss) / cfg.grad_accum).backward()
        total += float(ce.detach()) / cfg.grad_accum
        aux_total += float(out.aux_loss.detach()) / cfg.grad_accum
        for name, r in out.routers:
            counts[name] = counts.get(name, 0) + r.counts()
    total, aux_total = world.mean(total), world.mean(aux_total)  # every rank takes the same decision below
    norm = world.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    finite = math.isfinite(total) and math.isfinite(aux_total) and math.isfinite(norm)
    if finite:
        opt.step()
    elif cfg.on_nonfinite == "stop":
        raise NonFiniteLoss(f"step {run.step + 1}: loss {total} / gradient norm {norm} is not finite "
                            f"(lr {lr_at(run.step, cfg):.3g}); the last checkpoint in {run.ckpt_dir} is kept. "
                            "Lower --lr, or pass --on-nonfinite skip")  # fmt: skip
    else:
        log({"step": run.step + 1, "skipped": "non-finite loss or gradient", "loss": str(total)})
    opt.zero_grad(set_to_none=True)
    if buffer is not None:
        buffer.reset()
    for name in counts if finite else ():  # DeepSeek-V3 aux-loss-free bias, once per optimizer step
        if f"{name}.router" in biased:
            model.router(name).update_bias(world.sum(counts[name]))  # global counts: every rank's bias agrees
    run.step += 1
    run.tok_time[0] += cfg.batch_size * cfg.seq_len * cfg.grad_accum
    run.tok_time[1] += time.perf_counter() - t0
    return total, aux_total


def _validate(run: _Run, data: TokenData) -> dict:
    """Validation loss, mean MaxVio and routing fluctuation since the previous validation."""
    ev = evaluate(run.model, data, run.cfg, run.world)
    fluct = None
    if run.prev_top1 is not None and ev["top1"]:
        fluct = sum(routing_fluctuation(run.prev_top1[n], ev["top1"][n]) for n in ev["top1"]) / len(ev["top1"])
    run.prev_top1 = ev["top1"]
    vio = sum(ev["max_vio"].values()) / len(ev["max_vio"]) if ev["max_vio"] else None
    return {"step": run.step, "val_loss": ev["val_loss"], "max_vio": vio, "fluctuation": fluct}


def train(
    model: MixtureLM,
    data: TokenData,
    cfg: TrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    stop_at: int | None = None,
    progress: bool = True,
    tokenizer=None,
    world=None,
) -> dict:
    """Train ``model`` in place; checkpoints and metrics go to ``out_dir``.

    Args:
        resume: continue from ``out_dir/checkpoint`` (same step, same data order, same optimizer state).
        stop_at: stop (and checkpoint) after this many steps, as if interrupted.
        tokenizer: saved with every checkpoint (HF tokenizers; byte-level models need none).
        world: the processes the run spans (``train.world.SingleProcess`` by default; ``mixattn.parallel``
            gives a multi-process one, with ``model`` already sharded). ``cfg.batch_size`` is the
            global batch, split between processes.
    Returns a summary dict (final validation loss, tokens/s, parameters, routing statistics).

    Ctrl-C and SIGTERM finish the current step, save a checkpoint and raise ``KeyboardInterrupt`` or
    ``Terminated``; a second signal stops at once. A NaN or infinite loss raises ``NonFiniteLoss``
    (``cfg.on_nonfinite="stop"``) with the last checkpoint kept, or skips that step's update (``"skip"``).
    """
    from tqdm.auto import tqdm

    check_data(data, cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    world = world or SingleProcess()
    run = _Run(model, _optimizer(model, cfg), cfg, out_dir / "checkpoint", tokenizer, world)
    if resume:
        world.restore(run)
        if world.is_main:
            keep_metrics_until(out_dir / "metrics.jsonl", run.step)
    buffer = BalanceBuffer() if model.cfg.balance == "global" else None
    biased = {n for n, m in model.named_modules() if getattr(m, "selection_bias", None) is not None}
    end = min(cfg.steps, stop_at) if stop_at is not None else cfg.steps
    summary: dict = {}

    model.train()
    with stop_at_step_end() as stop, (out_dir / "metrics.jsonl").open("a") as f:

        def log(row: dict):  # flushed at once: a killed run's log ends at its last finished step
            if world.is_main:
                f.write(json.dumps(row) + "\n")
                f.flush()

        with tqdm(total=cfg.steps, initial=run.step, desc="train", unit="step", disable=not (progress and world.is_main)) as bar:
            say = bar.write if world.is_main else (lambda _line: None)  # one copy of each message, from rank 0
            while run.step < end:
                loss, aux = _step(run, data, buffer, biased, log)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{run.tokens_per_s:.0f}")
                if run.step % cfg.log_every == 0:
                    log({"step": run.step, "loss": loss, "aux": aux, "lr": lr_at(run.step - 1, cfg),
                         "tok_s": run.tokens_per_s})  # fmt: skip
                if run.step % cfg.eval_every == 0 or run.step == cfg.steps:
                    summary = _validate(run, data)
                    log(summary)
                    say(f"step {run.step}: val_loss {summary['val_loss']:.4f}")
                    world.save(run)
                if world.any(stop.signum is not None):  # one rank's signal stops every rank at this step
                    world.save(run)
                    say(f"stopped by signal {stop.signum}: checkpoint saved at step {run.step}; continue with --resume")
                    raise_for(stop.signum or signal.SIGTERM)
    if stop_at is not None and run.step < cfg.steps:
        world.save(run)
    total_params, active_params = count_parameters(model)
    summary.update(tok_s=run.tokens_per_s, params=total_params, active_params=active_params)
    if world.is_main:
        write_json(out_dir / "summary.json", summary)
    return summary
