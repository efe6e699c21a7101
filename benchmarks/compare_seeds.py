"""Mean ± std over seeds of several ``mixattn compare`` runs of the same variants (one ``--out``
folder per ``--seed``): validation loss, its difference to the first variant (paired by seed), and
tokens/s.

    python benchmarks/compare_seeds.py runs/rcmha/seed0 runs/rcmha/seed1 runs/rcmha/seed2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table  # noqa: E402


def _ms(values: list[float], fmt: str = "{:.4f}") -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{fmt.format(statistics.fmean(values))} ± {fmt.format(sd)}"


def summarize(folders: list[Path]) -> str:
    runs = [{r["label"]: r for r in json.loads((f / "results.json").read_text())} for f in folders]
    labels = list(runs[0])
    if any(list(r) != labels for r in runs):
        raise SystemExit("the runs do not hold the same variants")
    base = labels[0]
    rows = []
    for lab in labels:
        loss = [r[lab]["val_loss"] for r in runs]
        delta = [r[lab]["val_loss"] - r[base]["val_loss"] for r in runs]
        wins = sum(d < 0 for d in delta)
        tok = [r[lab]["tok_s"] for r in runs]
        rows.append([lab, _ms(loss), _ms(delta) if lab != base else "–", f"{wins}/{len(runs)}" if lab != base else "–",
                     _ms(tok, "{:,.0f}"), f"{runs[0][lab]['params']:,}"])  # fmt: skip
    head = ["variant", "val loss", f"Δ vs {base} (paired)", f"seeds below {base}", "tokens/s (in-run)", "params"]
    return table(rows, head) + f"\n\nmean ± sample std over n = {len(runs)} seeds"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path)
    print(summarize(ap.parse_args().folders))
