"""``F.linear`` against ``PackedLinear`` (oneDNN-prepacked weights), the matmuls of a SmolLM2-135M step.

    python benchmarks/bench_packed.py [--threads 1] [--rows 1,4,1024]

Per dtype and number of rows (1: batch-1 decode, 4: batch-4 decode, 1024: a prefill chunk): the 60
MLP matrices of 1536 x 576 (gate and up of 30 layers) and the 49152 x 576 LM head (twice), timed in
the same process with process CPU time, median of ``--repeats`` timed passes after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model, stamp, table  # noqa: E402

from mixattn.layers.packed import pack  # noqa: E402


def _ms(layers, x, repeats: int) -> float:
    """Median ms of one pass of x through every layer (each on x: the matrices are independent)."""
    times = []
    for _ in range(repeats + 1):  # the first pass is the warm-up
        t = time.process_time()
        for m in layers:
            m(x)
        times.append(time.process_time() - t)
    return statistics.median(times[1:]) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,4,1024")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for name, shape, count in (("MLP 1536 x 576", (1536, 576), 60), ("LM head 49152 x 576", (49152, 576), 2)):
            plain = nn.Sequential(*(nn.Linear(shape[1], shape[0], bias=False) for _ in range(count))).to(dtype)
            packed = nn.Sequential(*(nn.Linear(shape[1], shape[0], bias=False) for _ in range(count))).to(dtype)
            packed.load_state_dict(plain.state_dict())
            if not pack(packed):
                raise SystemExit("this torch build has no oneDNN linear ops")
            for M in map(int, a.rows.split(",")):
                x = torch.randn(M, shape[1], dtype=dtype)
                with torch.no_grad():
                    t_plain, t_packed = _ms(plain, x, a.repeats), _ms(packed, x, a.repeats)
                rows.append([str(dtype).removeprefix("torch."), f"{name} x {count}", M, f"{t_plain:.1f}",
                             f"{t_packed:.1f}", f"**{t_plain / t_packed:.2f}x**"])  # fmt: skip
    print(f"## F.linear vs oneDNN-prepacked weights\n\nCPU: {cpu_model()}; {stamp(torch.float32)}\n")
    print(table(rows, ["dtype", "matrices", "rows", "F.linear ms", "packed ms", "packed speed-up"]))


if __name__ == "__main__":
    main()
