"""Fashion-MNIST-LT, glag's default dataset (real data, offline).

Debian's ``dataset-fashion-mnist`` package installs the four original gzip IDX files in
``/usr/share/datasets/fashion-mnist/``. The folder is the default only; ``root`` (the CLIs'
``--data-root``) and ``$GLAG_DATA_ROOT`` override it.

LT subset (DESIGN.md, "Data"): profile ``lt_profile(10, n_max, IF)``; one
``np.random.default_rng(seed)`` permutes each class's training indices, classes in order; the
first ``n_i`` go to train and the next ``val_per_class`` to a balanced validation split, so
train and val are disjoint and neither touches the official 10k test set.
"""
from __future__ import annotations

import gzip
import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from ..errors import UsageError
from . import transforms as T
from .base import (DatasetCorruptError, DatasetNotFoundError, LTDataset, TensorSplit,
                   check_val_per_class, resolve_root)
from .profile import lt_profile

logger = logging.getLogger(__name__)

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot"]
IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC = 2051, 2049  # 0x00000803 (3-D uint8), 0x00000801 (1-D uint8)


def _missing_message(root: Path, missing: list[str]) -> str:
    return (f"Fashion-MNIST not found in {root} (missing: {', '.join(missing)}). "
            f"Expected the folder {root} to hold the four gzip IDX files "
            f"{', '.join(FILES.values())}. On Debian/Ubuntu install them with "
            f"`apt-get update && apt-get install -y dataset-fashion-mnist` (they land in "
            f"{DEFAULT_ROOT}); or point glag at another folder with --data-root or the "
            f"GLAG_DATA_ROOT environment variable.")


def read_idx(path: str | os.PathLike, expected_magic: int) -> np.ndarray:
    """Read one IDX file (gzip-compressed if its name ends in ``.gz``) into a uint8 array.

    Validates the magic number (``0x0000 08 ndim``), the dimensions and the payload length.

    Args:
        path: the file.
        expected_magic: 2051 for images (uint8 [N, rows, cols]), 2049 for labels (uint8 [N]).

    Returns:
        np.uint8 array of the shape stored in the header.

    Raises:
        DatasetCorruptError: not gzip, truncated, wrong magic or wrong length.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        # gzip.BadGzipFile (bad header, CRC) is an OSError; truncated gzip: EOFError; a damaged
        # deflate stream: zlib.error
        raise DatasetCorruptError(f"{path}: cannot read as {'gzip ' if opener is gzip.open else ''}"
                                  f"IDX file ({e}); the file is corrupt, re-install or "
                                  f"re-download it") from e
    if len(raw) < 4:
        raise DatasetCorruptError(f"{path}: {len(raw)} bytes, too short for an IDX header")
    (magic,) = struct.unpack(">I", raw[:4])
    if magic != expected_magic:
        raise DatasetCorruptError(f"{path}: IDX magic number {magic:#010x}, expected "
                                  f"{expected_magic:#010x}; not the right Fashion-MNIST file")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetCorruptError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DatasetCorruptError(f"{path}: IDX payload of {len(raw) - header} bytes, expected "
                                  f"{expected} for shape {dims}; the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find(root: Path, name: str) -> Path | None:
    """The gzip file, or its uncompressed twin (``name`` without ``.gz``) if only that exists."""
    for p in (root / name, root / name[:-3]):
        if p.is_file():
            return p
    return None


def load_fmnist_arrays(root: Path) -> dict[str, np.ndarray]:
    """The four Fashion-MNIST arrays from ``root``.

    Returns:
        ``{"train_images": uint8 [60000, 28, 28], "train_labels": int64 [60000],
        "test_images": uint8 [10000, 28, 28], "test_labels": int64 [10000]}`` (any N in tests).

    Raises:
        DatasetNotFoundError: a file is missing (message says how to install it).
        DatasetCorruptError: a file is malformed.
    """
    found = {k: _find(root, v) for k, v in FILES.items()}
    missing = [FILES[k] for k, p in found.items() if p is None]
    if missing:
        raise DatasetNotFoundError(_missing_message(root, missing))
    out = {}
    for split in ("train", "test"):
        x = read_idx(found[f"{split}_images"], IDX_IMAGES_MAGIC)
        y = read_idx(found[f"{split}_labels"], IDX_LABELS_MAGIC).astype(np.int64)
        if x.shape[0] != y.shape[0]:
            raise DatasetCorruptError(f"{root}: {split} has {x.shape[0]} images but "
                                      f"{y.shape[0]} labels")
        if y.size and y.max() >= len(CLASS_NAMES):
            raise DatasetCorruptError(f"{found[f'{split}_labels']}: label {int(y.max())} out of "
                                      f"range 0..{len(CLASS_NAMES) - 1}")
        out[f"{split}_images"], out[f"{split}_labels"] = x, y
    return out


def select_lt(labels: np.ndarray, counts: list[int], val_per_class: int,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw the LT train subset and a balanced val split from leftovers.

    For each class ``c`` in order: ``perm = rng.permutation(np.flatnonzero(labels == c))``,
    train gets ``perm[:counts[c]]``, val gets ``perm[counts[c]:counts[c] + val_per_class]``.

    Args:
        labels: int64 [N], source labels.
        counts: train images per class (length C).
        val_per_class: val images per class.
        rng: the subset generator (``np.random.default_rng(seed)``).

    Returns:
        ``(train_idx, val_idx)``: int64 source indices, class-major in draw order.

    Raises:
        ValueError: a class has fewer than ``counts[c] + val_per_class`` images.
        UsageError: ``val_per_class < 1``.
    """
    check_val_per_class(val_per_class)
    train, val = [], []
    for c, n in enumerate(counts):
        idx = np.flatnonzero(labels == c)
        need = n + val_per_class
        if idx.size < need:
            raise UsageError(f"class {c} has {idx.size} images but the profile needs {n} train + "
                             f"{val_per_class} val = {need}; lower n_max or val_per_class")
        perm = rng.permutation(idx)
        train.append(perm[:n])
        val.append(perm[n:need])
    return (np.concatenate(train).astype(np.int64), np.concatenate(val).astype(np.int64))


def build_fmnist_lt(root=None, imbalance_factor: float = 100.0, n_max: int = 500,
                    val_per_class: int = 20, seed: int = 0) -> LTDataset:
    """Fashion-MNIST-LT: see the module docstring. Images uint8 [N, 1, 28, 28] in memory;
    augmentation = zero-pad-2 random crop + horizontal flip."""
    root = resolve_root(root, DEFAULT_ROOT)
    arrays = load_fmnist_arrays(root)
    num_classes = len(CLASS_NAMES)
    counts = lt_profile(num_classes, n_max, imbalance_factor)
    train_idx, val_idx = select_lt(arrays["train_labels"], counts, val_per_class,
                                   np.random.default_rng(seed))
    xtr, ytr = arrays["train_images"][:, None], arrays["train_labels"]
    xte, yte = arrays["test_images"][:, None], arrays["test_labels"]
    size = int(xtr.shape[-1])
    pad = 2 if size <= 28 else 4
    norm = dict(mean=T.FMNIST_MEAN, std=T.FMNIST_STD, pad=pad)
    ds = LTDataset(
        name="fmnist-lt", num_classes=num_classes, in_channels=1, image_size=size,
        train=TensorSplit("train", xtr[train_idx], ytr[train_idx], train_idx, **norm),
        val=TensorSplit("val", xtr[val_idx], ytr[val_idx], val_idx, **norm),
        test=TensorSplit("test", xte, yte, np.arange(len(yte)), **norm),
        class_names=list(CLASS_NAMES),
        config=dict(dataset="fmnist-lt", root=str(root), imbalance_factor=float(imbalance_factor),
                    n_max=int(n_max), val_per_class=int(val_per_class), seed=int(seed)),
    )
    logger.info("%s", ds.describe())
    return ds
