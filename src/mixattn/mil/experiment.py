"""The MIL experiment: ABMIL, MBA and MBA+STKIM trained on digit bags over several seeds (each
seed draws its own bags and initialisation); mean and std of bag AUC, accuracy and attention
concentration; an attention heatmap of one test bag. Writes ``results.json``, ``results.md`` and
``heatmap.png`` (atomically) under ``out``.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ..paths import save_figure, write_json, write_text
from .data import Bags, BagsConfig, make_bags
from .model import METHODS, MILClassifier, MILTrainConfig, evaluate, train_mil

METRICS = [("auc", "bag AUC"), ("accuracy", "accuracy"), ("concentration", "top-{k} attention share"),
           ("branch_concentration", "top-{k} share per branch"), ("target_attention", "attention on target digits")]  # fmt: skip
LABELS = {"abmil": "ABMIL", "mba": "MBA", "mba_stkim": "MBA+STKIM"}


def _mean_std(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {sd:.3f}"


def summary_table(rows: list[dict], methods, k: int) -> str:
    """Markdown: one row per method, mean ± std over seeds of each metric."""
    n = len({r["seed"] for r in rows})
    head = ["method", *[title.format(k=k) for _, title in METRICS]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        lines.append("| " + " | ".join([LABELS[m], *[_mean_std([r[key] for r in mine]) for key, _ in METRICS]]) + " |")
    return "\n".join(lines) + f"\n\nmean ± std over n = {n} seeds (sample std); each seed draws its own bags and initialisation."


def plot_heatmap(models: dict[str, MILClassifier], bags: Bags, index: int, path: Path, target: int) -> Path:
    """Digits of one bag on top; below, one row of attention per method (multi-branch pools: the
    branches' mean, then each branch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = int(bags.mask[index].sum())
    x, mask = bags.x[index : index + 1, :n], bags.mask[index : index + 1, :n]
    rows, names = [], []
    with torch.no_grad():
        for m, model in models.items():
            model.eval()
            attn = model(x, mask)[2].attn[0]  # (M, n)
            rows.append(attn.mean(0))
            names.append(LABELS[m] + (" (mean)" if attn.shape[0] > 1 else ""))
            if attn.shape[0] > 1:
                rows += list(attn)
                names += [f"  branch {b + 1}" for b in range(attn.shape[0])]
    heat = torch.stack(rows).numpy()
    fig, axes = plt.subplots(2, 1, figsize=(0.75 * n + 3, 0.42 * len(rows) + 2.0),
                             gridspec_kw={"height_ratios": [1.1, 0.42 * len(rows)]})  # fmt: skip
    digits = bags.digits[index, :n].tolist()
    strip = torch.cat([torch.cat([bags.x[index, i].view(8, 8), torch.ones(8, 1)], 1) for i in range(n)], 1)
    axes[0].imshow(strip.numpy(), cmap="gray_r", aspect="equal")
    axes[0].set_xticks([9 * i + 3.5 for i in range(n)], [f"{d}{'*' if d == target else ''}" for d in digits])
    axes[0].set_yticks([])
    axes[0].set_title(f"test bag {index} (label {int(bags.y[index])}; * = target digit {target})")
    im = axes[1].imshow(heat, cmap="viridis", aspect="auto", vmin=0, vmax=max(float(heat.max()), 1e-6))
    for r in range(heat.shape[0]):
        for c in range(n):
            axes[1].text(c, r, f"{heat[r, c]:.2f}", ha="center", va="center", fontsize=7,
                         color="black" if heat[r, c] > 0.6 * heat.max() else "white")  # fmt: skip
    for r, name in enumerate(names):
        if r and not name.startswith(" "):  # a line between methods
            axes[1].axhline(r - 0.5, color="white", linewidth=2)
    axes[1].set_yticks(range(len(names)), names)
    axes[1].set_xticks(range(n), [f"#{i}" for i in range(n)])
    axes[1].set_xlabel("instance")
    fig.colorbar(im, ax=axes[1], label="attention", fraction=0.03)
    fig.tight_layout()
    save_figure(fig, path, dpi=130)
    plt.close(fig)
    return Path(path)


def run_mil_experiment(out: str | Path, seeds=(0, 1, 2, 3, 4), methods=METHODS, bags: BagsConfig | None = None,
                       train: MILTrainConfig | None = None, progress: bool = True) -> str:  # fmt: skip
    """Train every method on every seed; return the markdown table (also written to ``out``)."""
    bags = bags or BagsConfig()
    train = train or MILTrainConfig()
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"MIL methods must be a non-empty subset of {METHODS}, got {list(methods)}")
    if not seeds:
        raise ValueError("MIL experiment needs at least one seed")
    out = Path(out)
    rows, first_models = [], {}
    for seed in seeds:
        train_bags, test_bags = make_bags(bags, seed)
        for m in methods:
            cfg = replace(train, method=m)
            torch.manual_seed(seed)
            model = MILClassifier(train_bags.x.shape[-1], cfg)
            history = train_mil(model, train_bags, seed)
            row = {"seed": seed, "method": m, **evaluate(model, test_bags), "final_train_loss": history[-1]}
            rows.append(row)
            if progress:
                print(f"seed {seed} {LABELS[m]:>9}: AUC {row['auc']:.3f} acc {row['accuracy']:.3f} "
                      f"top-{cfg.concentration_k} share {row['concentration']:.3f}", flush=True)  # fmt: skip
            if seed == seeds[0]:
                first_models[m] = model
    table = summary_table(rows, methods, train.concentration_k)
    write_json(out / "results.json", {"bags": asdict(bags), "train": asdict(train), "rows": rows})
    write_text(out / "results.md", table + "\n")
    _, test_bags = make_bags(bags, seeds[0])
    pos = torch.nonzero(test_bags.y == 1).flatten()
    plot_heatmap(first_models, test_bags, int(pos[0]), out / "heatmap.png", bags.target)
    return table
