"""Image-folder datasets (``name="folder"``): your own data as a tree of class folders.

Layout under ``root`` (``--data-root`` / ``$GLAG_DATA_ROOT``)::

    root/train/<class_name>/*.jpg|*.jpeg|*.png     required
    root/val/<class_name>/...                      optional
    root/test/<class_name>/...                     required

* Class names are the folder names under ``root/train``, sorted (Python string order) ->
  class ids 0..C-1; ``val``/``test`` may hold a subset of them (a folder there that is not a
  training class is an error). ``class_counts`` are computed from the training images found.
* Within a class, files are taken in sorted name order; only ``.jpg``, ``.jpeg`` and ``.png``
  (any case) directly inside the class folder count, hidden files are skipped.
* ``split.index`` is the image's position in its split's file list (classes in id order, files
  in name order), so a file list is reproducible from the tree.
* Without ``root/val``, ``val_per_class`` images of every class move from train to val, drawn
  with ``np.random.default_rng(seed)`` exactly as the list dataset does
  (:func:`glag.data.listfile.carve_val`); their ``index`` is their position in the train list.
* The tree is the LT protocol already: ``imbalance_factor`` and ``n_max`` are not used.
* Images and transforms are those of the list dataset (:class:`glag.data.base.FileSplit`):
  RGB, random-resized crop + flip for training, resize + centre crop for evaluation.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from ..errors import UsageError
from .base import (ENV_DATA_ROOT, DatasetNotFoundError, FileSplit, LTDataset, check_val_per_class,
                   resolve_root)
from .listfile import carve_val

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
SPLIT_DIRS = ("train", "val", "test")


def _layout_hint(root: Path) -> str:
    return (f"expected {root}/train/<class_name>/*.jpg (also .jpeg, .png), optionally "
            f"{root}/val/<class_name>/..., and {root}/test/<class_name>/...; point glag at the "
            f"tree with --data-root or {ENV_DATA_ROOT}")


def scan_split(folder: Path) -> dict[str, list[Path]]:
    """``{class_name: sorted image paths}`` for the class folders directly under ``folder``
    (sorted by class name); a class folder without images maps to ``[]``."""
    classes = {}
    for d in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        classes[d.name] = sorted(f for f in d.iterdir() if f.is_file() and not f.name.startswith(".")
                                 and f.suffix.lower() in IMAGE_EXTENSIONS)
    return classes


def _flatten(tree: dict[str, list[Path]], class_ids: dict[str, int], split_dir: Path):
    """(paths, labels int64 [N]) of a scanned split, classes in id order."""
    unknown = sorted(set(tree) - set(class_ids))
    if unknown:
        raise UsageError(f"{split_dir} has class folder(s) {', '.join(unknown[:5])} that are not "
                         f"training classes (folders of {split_dir.parent / 'train'}); add them to "
                         f"train or remove them")
    paths, labels = [], []
    for name in sorted(tree, key=class_ids.__getitem__):
        paths += [str(p) for p in tree[name]]
        labels += [class_ids[name]] * len(tree[name])
    return paths, np.asarray(labels, dtype=np.int64)


def build_folder_dataset(root=None, imbalance_factor: float = 100.0, n_max: int = 500,
                         val_per_class: int = 20, seed: int = 0, *,
                         image_size: int = 224) -> LTDataset:
    """Build an image-folder dataset; see the module docstring.

    Args:
        root: the tree (else ``$GLAG_DATA_ROOT``).
        imbalance_factor, n_max: unused (the tree defines the profile).
        val_per_class, seed: only used when ``root/val`` does not exist.
        image_size: side of the crops (224).

    Returns:
        :class:`LTDataset` named ``"folder"`` with ``class_names`` the sorted folder names.

    Raises:
        DatasetNotFoundError: no root, or ``train``/``test`` missing or without images.
        ValueError: a val/test class that is not a training class; a class too small to give
            ``val_per_class`` images to val.
    """
    if (root is None or str(root) == "") and not os.environ.get(ENV_DATA_ROOT):
        raise DatasetNotFoundError("the 'folder' dataset needs its root folder: pass --data-root "
                                   f"(root=...) or set {ENV_DATA_ROOT}; {_layout_hint(Path('ROOT'))}")
    root = resolve_root(root, ".")
    if not root.is_dir():
        raise DatasetNotFoundError(f"image-folder root {root} is not a folder; {_layout_hint(root)}")
    missing = [s for s in ("train", "test") if not (root / s).is_dir()]
    if missing:
        raise DatasetNotFoundError(f"image-folder root {root} has no {' or '.join(missing)} folder; "
                                   f"{_layout_hint(root)}")
    trees = {s: scan_split(root / s) for s in SPLIT_DIRS if (root / s).is_dir()}
    class_names = list(trees["train"])  # sorted by scan_split
    if not class_names:
        raise DatasetNotFoundError(f"{root / 'train'} has no class folders; {_layout_hint(root)}")
    class_ids = {name: i for i, name in enumerate(class_names)}
    flat = {s: _flatten(t, class_ids, root / s) for s, t in trees.items()}
    for s in ("train", "test"):
        if not flat[s][0]:
            raise DatasetNotFoundError(f"{root / s} holds no images ({', '.join(IMAGE_EXTENSIONS)}) "
                                       f"in its class folders; {_layout_hint(root)}")
    empty = [name for name in class_names if not trees["train"][name]]
    if empty:
        logger.warning("training class folder(s) without images (count 0): %s", ", ".join(empty[:10]))
    num_classes = len(class_names)

    def make(name, paths, labels, rows=None):
        index = np.arange(len(labels), dtype=np.int64)
        if rows is not None:
            paths, labels, index = [paths[r] for r in rows], labels[rows], index[rows]
        return FileSplit(name, paths, labels, index, image_size)

    ptr, ytr = flat["train"]
    if "val" in flat:
        train, val = make("train", ptr, ytr), make("val", *flat["val"])
    else:
        check_val_per_class(val_per_class)
        try:
            tr_rows, va_rows = carve_val(ytr, val_per_class, num_classes, np.random.default_rng(seed))
        except ValueError as e:  # name the class and this dataset's remedy
            raise UsageError(f"{e} ({root / 'train'}: classes are {', '.join(class_names[:10])}"
                             f"{', ...' if num_classes > 10 else ''}; or add a {root / 'val'} "
                             f"folder)") from e
        train, val = make("train", ptr, ytr, tr_rows), make("val", ptr, ytr, va_rows)
    test = make("test", *flat["test"])
    ds = LTDataset(
        name="folder", num_classes=num_classes, in_channels=3, image_size=int(image_size),
        train=train, val=val, test=test, class_names=class_names,
        config=dict(dataset="folder", root=str(root), image_size=int(image_size),
                    val_per_class=int(val_per_class), seed=int(seed), val_from_train="val" not in flat),
    )
    logger.info("%s", ds.describe())
    return ds
