"""Figures of a stage-two run, drawn from its metrics.json / omega.json (matplotlib, PNG, no display).

Called by the command-line tools, never by the training loops.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_per_class(metrics: dict, path, split: str = "test") -> Path:
    """Per-class accuracy against training count (log x), stage one vs stage two, on ``split``."""
    plt = _pyplot()
    counts = np.asarray(metrics["class_counts"])
    order = np.argsort(-counts, kind="stable")
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label, style in ((f"stage1_{split}", "stage one", "o--"),
                              (f"stage2_{split}", f"stage two ({metrics.get('method', '')})", "s-")):
        acc = metrics["per_class"].get(key)
        if acc is not None:
            ax.plot(counts[order], 100 * np.asarray(acc, dtype=float)[order], style, label=label, alpha=0.8)
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("training images of the class (log scale, head → tail)")
    ax.set_ylabel(f"{split} accuracy (%)")
    ax.axvline(100.5, color="grey", lw=0.6, ls=":")
    ax.axvline(19.5, color="grey", lw=0.6, ls=":")
    ax.set_title("per-class accuracy; dotted: Many | Medium | Few")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_omega(history, tail_classes, class_counts, path) -> Path:
    """ω_c per tail class over the stage-two epochs (METHOD.md step 7), coloured by training count."""
    plt = _pyplot()
    hist = np.asarray(history, dtype=float)
    counts = np.asarray(class_counts)
    fig, ax = plt.subplots(figsize=(7, 4))
    cmap = plt.get_cmap("viridis")
    tail = list(tail_classes)
    logn = np.log(np.maximum(counts[tail], 1)) if tail else np.zeros(0)
    span = (logn.max() - logn.min()) or 1.0
    for j, c in enumerate(tail):
        ax.plot(np.arange(len(hist)), hist[:, c], color=cmap((logn[j] - logn.min()) / span),
                label=f"class {c} (n={counts[c]})" if len(tail) <= 12 else None)
    ax.set_xlabel("epoch")
    ax.set_ylabel("ω (weight of the head-class statistics)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("adaptive confidence per tail class (moved by validation accuracy)")
    if len(tail) <= 12:
        ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_omega_selection(metrics: dict, path) -> Path:
    """Validation top-1 and Many / Medium / Few of each ω_init candidate (``--omega-init auto``),
    the chosen one marked: how the initial ω was picked, on the validation split only."""
    plt = _pyplot()
    sel = metrics["omega_selection"]
    names = list(sel)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (key, style) in enumerate((("top1", "o-"), ("many", "^--"), ("medium", "s--"), ("few", "v--"))):
        ys = np.array([sel[n].get(key) for n in names], dtype=float)  # None (an empty group) -> NaN
        ax.plot(x, ys, style, label=key, lw=2 if key == "top1" else 1)
    chosen = names.index(f"{metrics['omega_init_selected']:g}")
    ax.axvline(chosen, color="grey", lw=6, alpha=0.25, label="chosen (best val top-1)")
    ax.set_xticks(x, [f"ω_init {n}" for n in names])
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("stage two, one run per initial ω: chosen on validation")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
