"""Scale-out benchmark (issue 15): expert parallelism + FSDP2 on 1, 2 and 4 gloo processes (CPU).

    python benchmarks/bench_distributed.py [--quick] [--steps N] [--nprocs 1,2,4]

For each model and process count, one training step (forward, backward, global-norm clipping,
AdamW) on a fixed global batch: tokens/s over the whole job, the time per step spent in the
expert all-to-all and in FSDP2's all-gather / reduce-scatter (gloo events of one profiled step), and
each rank's parameter, gradient and optimizer-state memory (its shards). On a CPU with few cores
the processes share the cores, so tokens/s does not rise; the point is the per-rank memory falling
as experts and the rest are sharded.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model, stamp, table  # noqa: E402

from mixattn.models import PRESETS, MixtureLM  # noqa: E402
from mixattn.parallel import Distributed, make_mesh, parallelize, spawn  # noqa: E402

MiB = 2**20


def configs(quick: bool) -> dict:
    base = PRESETS["tiny-moe"] if quick else PRESETS["small-moe"]
    name = "tiny-moe" if quick else "small-moe"
    wide = base.evolve(moe=replace(base.moe, router=replace(base.moe.router, num_experts=4 * base.moe.num_experts)))
    return {name: base, f"{name}, {wide.moe.num_experts} experts": wide}


def _bytes(tensors) -> int:
    return sum((t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size() for t in tensors)


def _worker(session, cfg, batch: int, seq_len: int, steps: int) -> dict:
    torch.manual_seed(0)
    model = MixtureLM(cfg)
    mesh = make_mesh()
    parallelize(model, mesh)
    world = Distributed(mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=g)
    x, y = world.local_rows(x[:, :-1]), world.local_rows(x[:, 1:])

    def step():
        out = model(x)
        loss = F.cross_entropy(out.logits.flatten(0, 1), y.flatten()) + out.aux_loss
        loss.backward()
        world.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        grads = _bytes(p.grad for p in model.parameters() if p.grad is not None)
        opt.zero_grad(set_to_none=True)
        return grads

    grads = step()  # warm-up; creates the optimizer state
    times = []
    for _ in range(steps):
        world.sum(torch.zeros(1))  # start together: a rank's step time then includes waiting for the others
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    with torch.profiler.profile() as prof:
        step()
    comm = {"a2a": 0.0, "fsdp": 0.0}
    for e in prof.key_averages():
        if e.key == "gloo:all_to_all":
            comm["a2a"] += e.cpu_time_total / 1e6
        elif e.key.startswith("gloo:"):
            comm["fsdp"] += e.cpu_time_total / 1e6
    opt_bytes = _bytes(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    return {"step_s": min(times), "params": _bytes(model.parameters()), "grads": grads, "optim": opt_bytes,
            "total_params": sum(p.numel() for p in model.parameters()), **comm}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny-moe, for a smoke run")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (the minimum is reported)")
    ap.add_argument("--nprocs", default="1,2,4")
    ap.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    ap.add_argument("--seq-len", type=int, default=128)
    a = ap.parse_args()
    nprocs = [int(n) for n in a.nprocs.split(",")]
    rows = []
    for name, cfg in configs(a.quick).items():
        base = None
        for n in nprocs:
            ranks = spawn(_worker, n, cfg, a.batch, a.seq_len, a.steps, timeout_s=600)
            step = max(r["step_s"] for r in ranks)  # the job moves at its slowest rank
            r0 = ranks[0]
            mem = (r0["params"] + r0["grads"] + r0["optim"]) / MiB
            base = base or mem
            rows.append([name, f"{r0['total_params'] / 1e6:.1f}M", n, f"{a.batch * a.seq_len / step:,.0f}",
                         f"{step * 1e3:.0f}", f"{max(r['a2a'] for r in ranks) * 1e3:.0f}",
                         f"{max(r['fsdp'] for r in ranks) * 1e3:.0f}", f"{r0['params'] / MiB:.1f}",
                         f"{r0['grads'] / MiB:.1f}", f"{r0['optim'] / MiB:.1f}", f"{mem:.1f}", f"{mem / base:.2f}"])  # fmt: skip
            print(f"done: {name}, {n} process(es)", file=sys.stderr)
    print(f"{stamp()}; CPU: {cpu_model()}; gloo; ep = number of processes; global batch {a.batch} x {a.seq_len} tokens\n")
    print(table(rows, ["model", "params", "procs", "tokens/s", "step ms", "all-to-all ms", "FSDP comm ms",
                       "params MiB/rank", "grads MiB/rank", "AdamW MiB/rank", "total MiB/rank", "vs 1 proc"]))  # fmt: skip


if __name__ == "__main__":
    main()
