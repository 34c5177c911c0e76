"""Synthetic feature files in glag's HDF5 schema, for tests and benchmarks (no images, no model).

Features are post-ReLU class clusters: ``relu(μ_c + spread·ε)``, ε ~ N(0, I), class means
μ_c ~ N(0, separation²·I); the "teacher" logits are the Bayes classifier of the clusters under the
long-tailed training prior (head-biased, as a CE-trained stage one is), so KD has something to
distil. Written in chunks through :class:`glag.features.FeatureWriter`, so
a file far larger than memory (iNaturalist's 437,513 × 2,048) can be made within a fixed budget.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .data import lt_profile
from .features import FeatureWriter


def synthetic_counts(num_classes: int, n_max: int, imbalance_factor: float) -> np.ndarray:
    """The exponential LT profile of the CIFAR-LT protocol: (C,) int64."""
    return np.asarray(lt_profile(num_classes, n_max, imbalance_factor), dtype=np.int64)


def write_synthetic_features(path, class_counts, feature_dim: int, *, val_per_class: int = 20,
                             test_per_class: int = 100, seed: int = 0, spread: float = 1.0,
                             separation: float = 0.5, dtype: str = "float32", with_logits: bool = True,
                             chunk_rows: int = 65536, overwrite: bool = False, progress=None) -> Path:
    """Write a feature file with ``class_counts`` training rows per class and balanced val/test.

    Args:
        class_counts: (C,) training images per class.
        feature_dim: d.
        spread, separation: within-class noise scale and the scale of the class means (larger
            separation = easier problem).
        chunk_rows: rows generated and written at a time (bounds memory: chunk_rows·(d + C)·4 bytes).
        progress: optional callable(rows_written) for a progress bar.
    Returns: the path of the complete file.
    """
    counts = np.asarray(class_counts, dtype=np.int64)
    C, d = len(counts), int(feature_dim)
    rng = np.random.default_rng(seed)
    means = (rng.standard_normal((C, d)) * separation).astype(np.float32)
    # the teacher: the Bayes classifier of the un-rectified clusters under the training prior,
    # i.e. a head-biased model, as a cross-entropy-trained stage one is
    w_teacher = (means.T / spread ** 2).astype(np.float32)
    b_teacher = (-0.5 * (means ** 2).sum(1) / spread ** 2 + np.log(counts / counts.sum())).astype(np.float32)
    sizes = {"train": int(counts.sum()), "val": val_per_class * C, "test": test_per_class * C}
    writer = FeatureWriter(path, split_sizes=sizes, feature_dim=d, num_classes=C, dtype=dtype,
                           with_logits=with_logits, overwrite=overwrite,
                           attrs={"backbone": "synthetic", "checkpoint_sha256": f"synthetic-seed{seed}",
                                  "dataset": f"synthetic-{C}x{d}", "class_counts": counts})
    with writer:
        for k, (split, per_class) in enumerate((("train", counts), ("val", np.full(C, val_per_class)),
                                                ("test", np.full(C, test_per_class)))):
            labels = np.repeat(np.arange(C), per_class)
            done = writer.rows_done(split)
            srng = np.random.default_rng([seed, k])
            for start in range(0, len(labels), chunk_rows):
                y = labels[start:start + chunk_rows]
                x = means[y] + spread * srng.standard_normal((len(y), d), dtype=np.float32)
                np.maximum(x, 0, out=x)
                if start + len(y) <= done:
                    continue  # resumed: these rows are already in the partial file
                z = x @ w_teacher + b_teacher if with_logits else None
                writer.append(split, x, y, np.arange(start, start + len(y)), z)
                if progress:
                    progress(len(y))
        return writer.finalize()
