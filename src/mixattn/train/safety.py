"""What keeps a training run safe: signals stop it at a step boundary, metric rows past the resumed
checkpoint are dropped, and a corpus too small for the run is refused before training starts."""

from __future__ import annotations

import json
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

from ..paths import write_text
from .data import TokenData


class Terminated(Exception):
    """SIGTERM arrived during training (``timeout``, ``docker stop``, Slurm): handled like Ctrl-C."""


class NonFiniteLoss(ValueError):
    """The loss or the gradient norm became NaN or infinite."""


class _Stop:
    """The first SIGINT/SIGTERM received while training (None until one arrives)."""

    signum: int | None = None


def raise_for(signum: int):
    raise KeyboardInterrupt if signum == signal.SIGINT else Terminated(f"signal {signum}")


@contextmanager
def stop_at_step_end():
    """While training, the first SIGINT or SIGTERM is noted and training stops at the end of the
    current step, after a checkpoint, so a resumed run repeats no half-applied step and is exact. A
    second signal stops at once (the last checkpoint is kept). Handlers are restored afterwards, and
    only the main thread can set them."""
    stop = _Stop()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop.signum is not None:
            raise_for(signum)
        stop.signum = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def keep_metrics_until(path: Path, step: int) -> None:
    """Drop metric rows after ``step`` (written after the checkpoint a resume starts from), so a
    resumed run's log has no duplicate rows."""
    if path.is_file():
        rows = [line for line in path.read_text().splitlines() if line.strip()]
        keep = [line for line in rows if json.loads(line).get("step", 0) <= step]
        if len(keep) != len(rows):
            write_text(path, "".join(line + "\n" for line in keep))


def check_data(data: TokenData, cfg) -> None:
    """Both splits must hold at least one sequence: found before training, not at the first evaluation."""
    for split in ("train", "val"):
        n = len(getattr(data, split))
        if n < cfg.seq_len + 2:
            raise ValueError(f"corpus {data.name}: the {split} split has {n} tokens, too few for seq_len={cfg.seq_len} "
                             f"(needs {cfg.seq_len + 2}); use more text or a smaller --seq-len")
