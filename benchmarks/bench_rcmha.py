"""Training speed and memory of MHA and the RCMHA family (MDHA, RMHA, RCMHA): one training step
(forward + backward) per preset, timed round-robin so that load from other processes hits every
variant alike; memory as (a) the activations saved for backward in one step (unique tensor storages
other than parameters, measured with autograd's saved-tensor hooks: exact and repeatable) and
(b) the peak RSS growth of a fresh process over 3 training steps (what the OS saw; noisier).

    python benchmarks/bench_rcmha.py --threads 1 [--presets tiny,tiny-mdha,tiny-rmha,tiny-rcmha] [--batch 16] [--seq 128]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import stamp, table  # noqa: E402

from mixattn.models import MixtureLM, from_name  # noqa: E402


def _step(model, x):
    out = model(x)
    F.cross_entropy(out.logits.flatten(0, 1), x.flatten()).backward()


def saved_activation_bytes(model, x) -> int:
    """Bytes of the distinct non-parameter storages autograd keeps for backward in one step."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
        loss = F.cross_entropy(out.logits.flatten(0, 1), x.flatten())
    loss.backward()
    return sum(seen.values())


def child(name: str, batch: int, seq: int) -> None:
    """Run in a fresh process: peak RSS growth (KiB) over 3 training steps, printed as JSON."""
    torch.manual_seed(0)
    model = MixtureLM(from_name(name))
    x = torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(0))
    before = _status_kib("VmRSS")
    try:  # Linux: reset the peak (VmHWM) to the current RSS, so the peak below is this loop's own
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    for _ in range(3):
        _step(model, x)
        model.zero_grad(set_to_none=True)
    peak = _status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"rss_kib": peak - before}))


def _status_kib(key: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny,tiny-mdha,tiny-rmha,tiny-rcmha")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7, help="timed round-robin rounds (default 7)")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.child:
        return child(a.child, a.batch, a.seq)
    names = a.presets.split(",")
    x = torch.randint(0, 256, (a.batch, a.seq), generator=torch.Generator().manual_seed(0))
    models = {}
    for n in names:
        torch.manual_seed(0)
        models[n] = MixtureLM(from_name(n))
        _step(models[n], x)  # warm-up
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}  # process CPU time: less sensitive to other processes' load
    for _ in range(a.rounds):
        for n in names:
            t, c = time.perf_counter(), time.process_time()
            _step(models[n], x)
            times[n].append(time.perf_counter() - t)
            cpu[n].append(time.process_time() - c)
            models[n].zero_grad(set_to_none=True)
    rows, out = [], []
    base = statistics.median(cpu[names[0]])
    for n in names:
        med, best, cpu_med = statistics.median(times[n]), min(times[n]), statistics.median(cpu[n])
        act = saved_activation_bytes(models[n], x)
        cmd = [sys.executable, __file__, "--child", n, "--batch", str(a.batch), "--seq", str(a.seq)]
        cmd += ["--threads", str(a.threads)] if a.threads else []
        rss = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)["rss_kib"]
        tok = a.batch * a.seq
        out.append({"preset": n, "tok_s_median": tok / med, "tok_s_best": tok / best, "tok_per_cpu_s": tok / cpu_med,
                    "step_s": times[n], "cpu_s": cpu[n], "saved_mib": act / 2**20, "rss_growth_mib": rss / 1024})  # fmt: skip
        rows.append([n, f"{tok / med:,.0f}", f"{tok / best:,.0f}", f"{tok / cpu_med:,.0f}", f"{base / cpu_med:.2f}",
                     f"{act / 2**20:.1f}", f"{rss / 1024:.1f}"])  # fmt: skip
    print(stamp())
    print(f"batch {a.batch} x seq {a.seq}, training step (forward + backward), {a.rounds} round-robin rounds\n")
    print(table(rows, ["preset", "tokens/s (median wall)", "tokens/s (best wall)", "tokens per CPU-s (median)",
                       "CPU speed vs first", "saved activations MiB", "peak RSS growth MiB"]))  # fmt: skip
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
