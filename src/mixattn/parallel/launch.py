"""Starting the processes of a distributed run, and ending all of them when one fails.

- ``init_distributed`` joins the process group with a timeout on every collective, the backend
  chosen by the device (gloo on CPU, nccl on CUDA), and returns a ``Session``.
- ``Session.guard()`` turns a failure anywhere into a clear error on rank 0: a rank that raises
  records "rank r: <error>" in the rendezvous store before it exits; rank 0, whose next collective
  then fails (the peer is gone) or times out, raises ``RankFailed`` naming that rank and its error
  rather than a bare transport error.
- ``torchrun_argv`` is what ``mixattn train --nproc N`` runs (``python -m torch.distributed.run``);
  ``spawn`` runs a Python function on N local processes (tests and benchmarks).
"""

from __future__ import annotations

import datetime
import io
import multiprocessing
import os
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .mesh import backend_for

DEFAULT_TIMEOUT_S = 300.0  # a healthy step's collectives take far less; a silent peer is reported after this
_FAILURE_KEY = "mixattn/first_failure"


class RankFailed(RuntimeError):
    """Another rank of the job failed; the message names it and its error."""


@dataclass
class Session:
    """This process's place in the job: rank, world size and the rendezvous store."""

    store: dist.Store
    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def report(self, e: BaseException) -> None:
        """Record this rank's failure (the first one recorded wins)."""
        message = f"rank {self.rank}: {type(e).__name__}: {' '.join(str(e).split())[:2000]}"
        try:
            self.store.compare_set(_FAILURE_KEY, "", message)
        except Exception:  # the store itself may be gone (its host died); the original error still propagates
            pass

    def first_failure(self) -> str | None:
        try:
            if self.store.check([_FAILURE_KEY]):
                return self.store.get(_FAILURE_KEY).decode()
        except Exception:
            return None
        return None

    @contextmanager
    def guard(self):
        """Run a rank's work: record its failure; on rank 0, explain a failure that began elsewhere."""
        try:
            yield self
        except BaseException as e:
            self.report(e)
            first = self.first_failure()
            if self.is_main and first is not None and not first.startswith(f"rank {self.rank}:"):
                raise RankFailed(f"{first} (rank 0 stopped: {type(e).__name__})") from e
            raise


def init_distributed(
    device: str = "cpu",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    rank: int | None = None,
    world_size: int | None = None,
    store_file: str | None = None,
) -> Session:
    """Join the process group: from the launcher's environment (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT, as torchrun sets them), or from ``rank``/``world_size``/``store_file`` (a FileStore,
    for processes on one machine)."""
    if timeout_s <= 0:
        raise ValueError(f"collective timeout must be > 0 seconds, got {timeout_s}")
    if dist.is_initialized():
        raise RuntimeError("init_distributed: this process already joined a process group")
    timeout = datetime.timedelta(seconds=timeout_s)
    if store_file is not None:
        if rank is None or world_size is None:
            raise ValueError("init_distributed with store_file needs rank and world_size")
        store = dist.FileStore(store_file, world_size)
    else:
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ValueError(f"no distributed environment ({', '.join(missing)} unset): launch with "
                             "`mixattn train --nproc N` or `torchrun -m mixattn train ...`")  # fmt: skip
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        # under torchrun the agent hosts the store; otherwise rank 0 does
        hosted = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                              is_master=rank == 0 and not hosted, timeout=timeout)  # fmt: skip
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group(backend_for(device), store=store, rank=rank, world_size=world_size, timeout=timeout)
    return Session(store, rank, world_size)


def shutdown() -> None:
    """Leave the process group cleanly (a barrier first: a rank that leaves early breaks the others' last collective)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def torchrun_argv(nproc: int, argv: list[str]) -> list[str]:
    """The command that runs ``mixattn <argv>`` on ``nproc`` local processes (torchrun, single node)."""
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "mixattn", *argv]  # fmt: skip


def _spawned(rank: int, nproc: int, store_file: str, timeout_s: float, fn, args: tuple, results) -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    session = init_distributed("cpu", timeout_s, rank, nproc, store_file)
    try:
        with session.guard():
            out = fn(session, *args)
            shutdown()
        buf = io.BytesIO()  # tensors as bytes: the queue would share their storage with a process that is about to exit
        torch.save(out, buf)
        results.put((rank, True, buf.getvalue()))
    except BaseException as e:
        results.put((rank, False, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        raise SystemExit(1) from None


class WorkerFailed(RuntimeError):
    """A rank of a ``spawn`` job failed; ``errors`` maps rank -> its error text (rank 0's says why)."""

    def __init__(self, errors: dict[int, str]):
        self.errors = errors
        first = errors.get(0) or next(iter(errors.values()))
        super().__init__(f"{len(errors)} rank(s) failed; rank {0 if 0 in errors else next(iter(errors))}: {first}")


def spawn(fn, nproc: int, *args, timeout_s: float = 120.0) -> list:
    """Run ``fn(session, *args)`` on ``nproc`` fresh local processes (gloo, CPU); returns each rank's result.

    ``fn`` must be importable (a module-level function) and its result picklable. Raises
    ``WorkerFailed`` when a rank fails; every process has ended by then (collectives time out after
    ``timeout_s``, and stragglers are terminated).
    """
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    ctx = multiprocessing.get_context("spawn")
    results = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory(prefix="mixattn-spawn-") as tmp:
        store = str(Path(tmp) / "store")
        procs = [ctx.Process(target=_spawned, args=(r, nproc, store, timeout_s, fn, args, results)) for r in range(nproc)]
        for p in procs:
            p.start()
        got: dict[int, tuple[bool, object]] = {}
        deadline = time.monotonic() + 3 * timeout_s  # every rank ends within a few collective timeouts
        while len(got) < nproc and time.monotonic() < deadline:
            if not results.empty():
                rank, ok, out = results.get()
                got[rank] = (ok, out)
            elif all(not p.is_alive() for p in procs):
                break
            else:
                time.sleep(0.05)
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.terminate()
                p.join()
    errors = {r: out for r, (ok, out) in sorted(got.items()) if not ok}
    errors.update({r: f"exited with code {p.exitcode} without a result" for r, p in enumerate(procs) if r not in got})
    if errors:
        raise WorkerFailed(errors)
    return [torch.load(io.BytesIO(got[r][1]), weights_only=False) for r in range(nproc)]
