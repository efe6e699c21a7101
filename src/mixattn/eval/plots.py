"""Plots of an ``eval.suite.evaluate`` result (matplotlib, written atomically with ``save_figure``).

- ``plot_accuracy``: retrieval accuracy against length, one line per method, 95% Wilson interval
  bars; one panel per task plus "all tasks"; methods are offset a little along x so bars stay visible.
- ``plot_heatmap``: depth x length accuracy per method (tasks pooled), each cell annotated k/n.
- ``plot_speed``: KV MiB and decode tokens/s bars.
"""

from __future__ import annotations

from ..metrics.stats import proportion
from ..paths import save_figure
from .report import _order, cells, length_label


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(results, path) -> None:
    plt = _plt()
    methods, lengths, task_names = _order(results)
    c = cells(results)
    panels = [*task_names, "all"] if len(task_names) > 1 else task_names
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows + 0.9), squeeze=False, sharey=True)
    colors = plt.get_cmap("tab10")
    width = 0.06 * (len(methods) - 1)
    for ax, t in zip(axes.flat, panels):
        for mi, m in enumerate(methods):
            pts = [(N, c[(m, t, N)]) for N in lengths if (m, t, N) in c]
            if not pts:
                continue
            shift = 2 ** ((mi / max(1, len(methods) - 1) - 0.5) * width)  # multiplicative: x axis is log2
            xs = [N * shift for N, _ in pts]
            ys = [p["acc"] for _, p in pts]
            err = [[p["acc"] - p["lo"] for _, p in pts], [p["hi"] - p["acc"] for _, p in pts]]
            ax.errorbar(xs, ys, yerr=err, marker="o", markersize=4, capsize=3, linewidth=1.4,
                        color=colors(mi % 10), label=m)  # fmt: skip
        n = sorted({c[(m, t, N)]["n"] for m in methods for N in lengths if (m, t, N) in c})
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [length_label(N) for N in lengths])
        ax.minorticks_off()
        ax.set(ylim=(-0.04, 1.04), title=f"{t} (n = {'/'.join(map(str, n))} per point)", xlabel="context length")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy (greedy, contains key)")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=9, frameon=False)
    fig.suptitle("retrieval accuracy vs length, 95% Wilson intervals", fontsize=11)
    fig.tight_layout(rect=(0, 0.07 + 0.02 * (len(labels) > 5), 1, 1))
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def plot_heatmap(results, path) -> None:
    import numpy as np

    plt = _plt()
    _, lengths, _ = _order(results)
    recs = results["retrieval"]
    methods = list(dict.fromkeys(r["method"] for r in recs))  # a panel per method with prompts scored
    depths = sorted({r["depth"] for r in recs})
    cols = min(4, len(methods))
    rows = -(-len(methods) // cols)
    width = max(1.5, 0.9 * len(lengths))  # one length still leaves room for a two-line title
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols + 1.6, 0.45 * len(depths) * rows + 1.5 * rows),
                             squeeze=False)  # fmt: skip
    im = None
    for ax, m in zip(axes.flat, methods):
        grid = np.full((len(depths), len(lengths)), np.nan)
        for di, d in enumerate(depths):
            for li, N in enumerate(lengths):
                p = proportion([r["hit"] for r in recs if (r["method"], r["depth"], r["length"]) == (m, d, N)])
                if p["n"]:
                    grid[di, li] = p["acc"]
                    ax.text(li, di, f"{p['k']}/{p['n']}", ha="center", va="center", fontsize=7)
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_title(m if len(m) <= 12 else "\n".join(m.rsplit(" ", 1)), fontsize=9)  # "label\ndensity"
        ax.set_xticks(range(len(lengths)), [length_label(N) for N in lengths], fontsize=8)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=8)
        ax.set_xlabel("length", fontsize=8)
    for ax in axes.flat[len(methods) :]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("needle depth", fontsize=8)
    fig.suptitle("accuracy by needle depth and length (all tasks; cells: hits/n)", fontsize=10)
    fig.tight_layout()
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="accuracy")
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def plot_speed(results, path) -> None:
    plt = _plt()
    names = list(results["speed"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    axes[0].bar(names, [results["speed"][n]["kv_bytes"] / 2**20 for n in names], color="tab:blue")
    axes[0].set(ylabel="KV cache MiB allocated", title="memory")
    dec = [results["speed"][n]["decode_all"] for n in names]
    axes[1].bar(names, [results["speed"][n]["decode_tok_s"] for n in names], color="tab:green")
    for i, runs in enumerate(dec):
        axes[1].plot([i] * len(runs), runs, "k.", markersize=4)
    axes[1].set(ylabel="decode tokens/s (median; dots: runs)", title="speed")
    for ax in axes:
        ax.tick_params(axis="x", rotation=45, labelsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
