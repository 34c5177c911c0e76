"""Top-1 accuracy, Many/Medium/Few accuracy by *training count*, per-class tables (METHOD.md, Evaluation).

Many = n_c > 100, Medium = 20 ≤ n_c ≤ 100, Few = n_c < 20, with n_c the class's training count
(never its index). A group with no class is reported as NaN, not 0.
"""
from __future__ import annotations

import numpy as np

MANY_ABOVE = 100
FEW_BELOW = 20
GROUPS = ("many", "medium", "few")


def class_groups(class_counts, many_above: int = MANY_ABOVE, few_below: int = FEW_BELOW) -> dict[str, np.ndarray]:
    """Class ids of each group: {"many": (·,) int64, "medium": ..., "few": ...}."""
    counts = np.asarray(class_counts)
    return {
        "many": np.flatnonzero(counts > many_above),
        "medium": np.flatnonzero((counts >= few_below) & (counts <= many_above)),
        "few": np.flatnonzero(counts < few_below),
    }


def per_class_accuracy(pred, labels, num_classes: int) -> np.ndarray:
    """Accuracy of each class: (C,) float64; NaN for a class absent from ``labels``.

    Args: pred, labels: (N,) integer arrays or tensors.
    """
    pred = np.asarray(pred).astype(np.int64).ravel()
    labels = np.asarray(labels).astype(np.int64).ravel()
    total = np.bincount(labels, minlength=num_classes).astype(np.float64)
    correct = np.bincount(labels[pred == labels], minlength=num_classes).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, correct / np.maximum(total, 1), np.nan)


def summarize(pred, labels, class_counts) -> dict[str, float]:
    """Top-1 and Many/Medium/Few accuracy in %, as {"top1", "many", "medium", "few"}.

    Group accuracy is the mean of its classes' accuracies (the test and val splits are balanced,
    so this equals the sample-weighted accuracy there, and stays fair on an unbalanced split).
    """
    pred = np.asarray(pred).ravel()
    labels = np.asarray(labels).ravel()
    num_classes = len(class_counts)
    acc = per_class_accuracy(pred, labels, num_classes)
    out = {"top1": float(100.0 * np.mean(pred == labels)) if len(labels) else float("nan")}
    for name, ids in class_groups(class_counts).items():
        vals = acc[ids]
        vals = vals[~np.isnan(vals)]
        out[name] = float(100.0 * vals.mean()) if len(vals) else float("nan")
    return out


def format_table(rows: dict[str, dict[str, float]], columns=("top1",) + GROUPS) -> str:
    """Fixed-width text table: one row per name, columns as %, e.g. for printing a run's results."""
    width = max([len(r) for r in rows] + [6])
    lines = [f"{'':<{width}}  " + "  ".join(f"{c:>7}" for c in columns)]
    for name, vals in rows.items():
        shown = [vals.get(c) for c in columns]  # None: an empty group, as metrics.json stores NaN
        lines.append(f"{name:<{width}}  " + "  ".join(f"{float('nan') if v is None else v:7.2f}" for v in shown))
    return "\n".join(lines)
