"""MILP plan-search benchmark: solve time on synthetic instances, SmolLM2-sized and 7B-sized.

    python benchmarks/bench_optimize.py

Random influence losses (the hardest case for the solver: no structure) with the real rule grid's
densities at 2k/4k/8k; the requirement is that the 7B-sized instance (32 layers x 32 KV heads,
about 50 rules) solves within 5 minutes on 2 cores.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import stamp, table  # noqa: E402

from mixattn.compress.optimize import candidate_rules, solve  # noqa: E402


def main():
    lengths = (2048, 4096, 8192)
    rules = candidate_rules(lengths, alphas=(0, 64, 128, 256, 512, 1024, 2048, 4096), betas=(0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75))
    dens = np.array([[r.density(N) for N in lengths] for r in rules])
    rng = np.random.default_rng(0)
    rows = []
    for name, L, H in (("SmolLM2-135M", 30, 3), ("7B (Llama-2 MHA)", 32, 32)):
        loss = rng.random((L * H, len(rules))) * (1 - dens.mean(1))  # denser rules drop less
        for m in (None, 2):
            t0 = time.perf_counter()
            choice = solve(loss, dens, 0.5, np.repeat(np.arange(L), H), m, time_limit=120)
            dt = time.perf_counter() - t0
            got = dens[choice].mean(0)
            rows.append([name, L * H, len(rules), "-" if m is None else m, f"{dt:.2f}",
                         " / ".join(f"{g:.3f}" for g in got)])  # fmt: skip
    print(f"## Plan-search MILP (scipy HiGHS), budget 0.5\n\n{stamp()}\n")
    print(table(rows, ["instance", "heads", "rules", "max rules/layer", "solve s", "density @2k / 4k / 8k"]))


if __name__ == "__main__":
    main()
