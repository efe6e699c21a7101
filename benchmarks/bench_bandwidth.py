"""How close a batch-1 decode step's two memory-bound parts come to this CPU's read bandwidth.

    python benchmarks/bench_bandwidth.py [--threads 1] [--keys 4096] [--heads 45]

A batch-1 decode step streams every weight once and, per layer, the cached keys and values of its
heads. Nothing it reads is reused within the step, so the step cannot be faster than (bytes read) /
(read bandwidth). This prints, in bf16, on data too large for the caches (each pass reads each byte
once, as a step does):

- read-only streaming (``Tensor.sum``): the bandwidth bound;
- SmolLM2-135M's linears (30 x [q/k/v, o, gate/up, down] + the LM head), ``F.linear`` and
  oneDNN-prepacked (``layers.packed.pack``);
- decode attention over ``--heads`` KV heads of ``--keys`` cached keys (3 query heads each, head
  dim 64): the scores GEMM (q k^T), the weights GEMM (p v) and the fused SDPA kernel.

GB/s = bytes read / seconds (median of ``--repeats`` passes, process CPU time); "of stream" = that
over the streaming rate. A low share says the kernel, not the memory, limits the step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model, stamp, table  # noqa: E402

from mixattn.layers.packed import pack  # noqa: E402


def _median_s(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--keys", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=45, help="KV heads read per step (45 = half of SmolLM2's 90)")
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    bf = torch.bfloat16
    rows = []

    def row(what, nbytes, fn):
        s = _median_s(fn, a.repeats)
        rows.append([what, f"{nbytes / 2**20:.0f}", f"{s * 1e3:.2f}", f"{nbytes / s / 1e9:.1f}"])
        return nbytes / s

    big = torch.randn(128 * 2**20 // 2, dtype=bf)  # 128 MiB, far past the caches
    stream = row("read-only stream (sum)", big.numel() * 2, lambda: big.sum())
    shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]  # SmolLM2-135M, q/k/v fused
    linears = nn.ModuleList(nn.Linear(i, o, bias=False) for o, i in shapes).to(bf)
    xs = {i: torch.randn(1, i, dtype=bf) for _, i in shapes}
    wbytes = sum(m.weight.numel() * 2 for m in linears)
    with torch.no_grad():
        row("linears, F.linear", wbytes, lambda: [m(xs[m.in_features]) for m in linears])
        pack(linears)
        row("linears, prepacked", wbytes, lambda: [m(xs[m.in_features]) for m in linears])
    n, H, D = a.keys, a.heads, 64
    k, v = torch.randn(H, n, D, dtype=bf), torch.randn(H, n, D, dtype=bf)
    q, p = torch.randn(H, 3, D, dtype=bf), torch.softmax(torch.randn(H, 3, n), -1).to(bf)
    kv = k.numel() * 2
    row(f"scores q k^T ({H} heads x {n} keys)", kv, lambda: [q[h] @ k[h].T for h in range(H)])
    row(f"weights p v ({H} heads x {n} keys)", kv, lambda: [p[h] @ v[h] for h in range(H)])
    q4, k4, v4 = q[:, None, None], k[:, None, None], v[:, None, None]  # (H, 1, 1, ., D): one (batch, head) per call
    sdpa = F.scaled_dot_product_attention
    row(f"SDPA, one call per head ({H} x {n})", 2 * kv, lambda: [sdpa(q4[h], k4[h], v4[h]) for h in range(H)])
    for r in rows:
        r.append(f"{float(r[3]) * 1e9 / stream:.0%}")
    print(f"## Decode-step reads against the read bandwidth (bf16)\n\nCPU: {cpu_model()}; {stamp(bf)}\n")
    print(table(rows, ["what", "MiB read", "ms (median)", "GB/s", "of stream"]))


if __name__ == "__main__":
    main()
