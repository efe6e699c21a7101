"""Training throughput of the model presets (forward + backward), as a ratio to the dense preset.

    python benchmarks/bench_presets.py [--presets small,small-moh,...] [--batch 8] [--seq 256]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import stamp, table, timeit  # noqa: E402

from mixattn.models import MixtureLM, count_parameters, from_name  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="small,small-moh,small-moh75,small-moa,small-moe")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    x = torch.randint(0, 256, (a.batch, a.seq), generator=torch.Generator().manual_seed(0))
    rows, base = [], None
    for name in a.presets.split(","):
        torch.manual_seed(0)
        model = MixtureLM(from_name(name))

        def step(model=model):
            out = model(x)
            (F.cross_entropy(out.logits.flatten(0, 1), x.flatten()) + out.aux_loss).backward()

        t = timeit(step, repeats=3)
        tps = a.batch * a.seq / t
        base = base or tps
        total, active = count_parameters(model)
        rows.append([name, f"{tps:,.0f}", f"{tps / base:.2f}x", f"{total / 1e6:.1f}M", f"{active / 1e6:.1f}M"])
    print(f"## Preset training throughput (batch {a.batch} x {a.seq} tokens, fwd+bwd)\n\n{stamp()}\n")
    print(table(rows, ["preset", "tokens/s", "vs first", "params", "active"]))


if __name__ == "__main__":
    main()
