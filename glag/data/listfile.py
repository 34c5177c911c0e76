"""List-file datasets (ImageNet-LT, iNaturalist 2018, or your own), ``name="list"``.

Each split file holds one ``relative/path label`` a line (space-separated; the path may not
contain spaces; blank lines are ignored), read against ``image_root`` with PIL (converted to
RGB). The files are the LT protocol already: ``imbalance_factor`` and ``n_max`` are not used.

* ``split.index`` is the 0-based line index of the row in its list file (blank lines count);
  error messages quote 1-based line numbers, as editors do.
* ``num_classes`` = 1 + the largest train label, and every class ``0..num_classes-1`` needs a
  training image; a val/test label that is not a training class is an error (naming file and
  line), as is an empty train list. ``class_counts`` from train labels.
* Files are read as UTF-8 (a leading byte-order mark is skipped); JSON annotation files (e.g.
  iNaturalist's official ones) are not read: convert them to ``relative/path label`` lines.
* ``val_list=None``: ``val_per_class`` images of every class are moved from train to val, drawn
  with ``np.random.default_rng(seed)`` (per class in order, a permutation of that class's train
  rows); every class must keep at least one training image. Their ``index`` is their line index
  in the train list. iNaturalist 2018 has no separate test set: pass its official val file as
  ``test_list`` and leave ``val_list=None``, so model selection never sees the test rows.
* Image files are checked for existence up front (``check_files=False`` skips that, e.g. on a
  slow network file system).
* Transforms: train = random-resized crop (scale 0.08-1, ratio 3/4-4/3) to ``image_size`` +
  flip; eval = resize shorter side to ``image_size*256/224``, centre crop; ImageNet mean/std.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from ..errors import UsageError
from .base import DatasetNotFoundError, FileSplit, LTDataset, check_val_per_class, resolve_root

logger = logging.getLogger(__name__)


class ListFileError(UsageError):
    """A malformed line in a list file (the message names file and line)."""


def _quote(text: str, limit: int = 100) -> str:
    """``repr`` of ``text``, cut to its first ``limit`` characters (a JSON file is one line)."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def _bad_line(path, i: int, line: str, problem: str, first: bool) -> ListFileError:
    """The error for line ``i`` (0-based) of ``path``; when it is the ``first`` non-blank line and
    starts with ``{`` or ``[`` (a JSON file), a message that says to convert the file."""
    if first and line.lstrip().startswith(("{", "[")):
        return ListFileError(f"{path} looks like a JSON annotation file (it starts with "
                             f"{line.lstrip()[:1]!r}); glag does not read JSON annotations: "
                             f"convert it to a list file of 'relative/path label' lines, one image "
                             f"a line (README, \"Data\")")
    return ListFileError(f"{path}, line {i + 1}: {problem}")


def read_list_file(path: str | os.PathLike) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Parse a ``relative/path label`` list file.

    Returns:
        ``(paths, labels, line_index)``: list of N relative paths, np.int64 [N] labels,
        np.int64 [N] 0-based line indices.

    Raises:
        ListFileError: a non-blank line that is not exactly ``path label`` with an int label >= 0
            (a bad line is quoted up to 100 characters); a file that is not UTF-8 text; a JSON
            annotation file.
    """
    paths, labels, lines = [], [], []
    try:
        with open(path, "r", encoding="utf-8-sig") as f:
            for i, line in enumerate(f):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) != 2:
                    raise _bad_line(path, i, line, f"expected 'relative/path label' (two "
                                    f"space-separated fields, no spaces in the path), got "
                                    f"{_quote(line.rstrip())}", first=not paths)
                try:
                    label = int(parts[1])
                except ValueError:
                    label = -1
                if label < 0:
                    raise _bad_line(path, i, line, f"label {_quote(parts[1])} is not an integer "
                                    f">= 0", first=not paths)
                paths.append(parts[0])
                labels.append(label)
                lines.append(i)
    except UnicodeDecodeError:  # its position is within a read chunk: find it in the bytes
        raw = Path(path).read_bytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise ListFileError(f"{path}, line {line}: not UTF-8 text (byte "
                                f"{raw[e.start:e.start + 1]!r}); save the file as UTF-8") from None
        raise  # pragma: no cover - the text reader and bytes.decode disagree
    return paths, np.asarray(labels, dtype=np.int64), np.asarray(lines, dtype=np.int64)


def _resolve_list(path, image_root: Path) -> Path:
    """A list file as given, else relative to the image root."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if not p.is_absolute() and (image_root / p).is_file():
        return image_root / p
    raise DatasetNotFoundError(f"list file {path} not found (tried {p.resolve()} and "
                               f"{image_root / p}); pass the split files of the dataset "
                               f"(one 'relative/path label' a line)")


def check_images(root: Path, rel_paths: list[str], list_file: Path, show: int = 5) -> None:
    """Raise :class:`DatasetNotFoundError` listing the first ``show`` missing images and the
    count, if any path of ``rel_paths`` (relative to ``root``) is not a file."""
    missing = [p for p in rel_paths if not (root / p).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"{len(missing)} of {len(rel_paths)} images listed in {list_file} are missing under "
            f"image root {root}; first: {', '.join(missing[:show])}. Check image_root "
            f"(--data-root / GLAG_DATA_ROOT) or pass check_files=False to skip this check.")


def carve_val(labels: np.ndarray, val_per_class: int, num_classes: int,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split train rows into (train_rows, val_rows), int64 positions, ``val_per_class`` of every
    present class to val (per class in order, ``rng.permutation`` of its rows)."""
    check_val_per_class(val_per_class)
    tr, va = [], []
    for c in range(num_classes):
        rows = np.flatnonzero(labels == c)
        if rows.size == 0:
            continue
        if rows.size <= val_per_class:
            raise UsageError(f"class {c} has {rows.size} training images, cannot move "
                             f"{val_per_class} to val and keep one for training; pass val_list "
                             f"or lower val_per_class")
        perm = rng.permutation(rows)
        va.append(perm[:val_per_class])
        tr.append(perm[val_per_class:])
    train_rows = np.sort(np.concatenate(tr)) if tr else np.zeros(0, np.int64)
    val_rows = np.concatenate(va) if va else np.zeros(0, np.int64)
    return train_rows.astype(np.int64), val_rows.astype(np.int64)


def _absent(present: np.ndarray, limit: int = 10) -> list[int]:
    """The first ``limit`` ids in ``0..present[-1]`` missing from ``present`` (sorted unique
    labels), found from the gaps without allocating ``present[-1]`` of anything."""
    out, prev = [], -1
    for v in present.tolist():
        out.extend(range(prev + 1, min(v, prev + 1 + limit - len(out))))
        if len(out) >= limit:
            break
        prev = v
    return out


def check_labels(parsed: dict) -> int:
    """Check the labels of the parsed list files and return ``num_classes`` = 1 + the largest
    train label.

    Args:
        parsed: ``{"train"|"val"|"test": (list file, paths, labels int64 [N], lines int64 [N])}``
            (``val`` optional).

    Raises:
        ListFileError: the train list is empty; a class in ``0..num_classes-1`` has no training
            image (e.g. a mistyped label); a val/test label is not a training class.
    """
    train_file, _, ytr, ltr = parsed["train"]
    if ytr.size == 0:
        raise ListFileError(f"{train_file}: no training images (no 'relative/path label' line); "
                            f"pass the list file of the training split")
    num_classes = 1 + int(ytr.max())
    present = np.unique(ytr)
    n_absent = num_classes - present.size
    if n_absent:
        absent = _absent(present)
        ids = ", ".join(map(str, absent)) + (", ..." if n_absent > len(absent) else "")
        top = int(np.argmax(ytr))
        raise ListFileError(
            f"{train_file}: {n_absent} of the {num_classes} classes 0..{num_classes - 1} have no "
            f"training image (class ids {ids}); the largest label is {int(ytr[top])} (line "
            f"{int(ltr[top]) + 1}). Labels must be the class ids 0..C-1, each with training "
            f"images: fix the labels or add images")
    for name in ("val", "test"):
        if name not in parsed:
            continue
        path, _, y, lines = parsed[name]
        bad = np.flatnonzero(y >= num_classes)
        if bad.size:
            more = f" ({bad.size} lines like it)" if bad.size > 1 else ""
            raise ListFileError(f"{path}, line {int(lines[bad[0]]) + 1}: label {int(y[bad[0]])} is "
                                f"not a training class (the train list {train_file} has classes "
                                f"0..{num_classes - 1}){more}; fix the label or remove the line")
    return num_classes


def build_list_dataset(root=None, imbalance_factor: float = 100.0, n_max: int = 500,
                       val_per_class: int = 20, seed: int = 0, *, train_list=None,
                       val_list=None, test_list=None, image_root=None, image_size: int = 224,
                       check_files: bool = True) -> LTDataset:
    """Build a list-file dataset; see the module docstring.

    Args:
        root: image root if ``image_root`` is not given (then ``$GLAG_DATA_ROOT``).
        imbalance_factor, n_max: unused (the list files define the profile).
        val_per_class, seed: only used when ``val_list`` is None.
        train_list, test_list: required split files. val_list: optional.
        image_root: folder the listed paths are relative to.
        image_size: side of the crops (224).
        check_files: check every listed image exists before returning.

    Raises:
        ListFileError: a malformed list file, or labels that fail :func:`check_labels`.
        DatasetNotFoundError: a list file or (``check_files``) an image is missing.
    """
    if train_list is None or test_list is None:
        raise UsageError("the 'list' dataset needs --train-list and --test-list (--val-list optional): "
                         "files of 'relative/path label' lines (README, \"Data\")")
    if image_root is None:
        image_root = root
    if image_root is None and not os.environ.get("GLAG_DATA_ROOT"):
        raise UsageError("the 'list' dataset needs --image-root (or --data-root / GLAG_DATA_ROOT): the folder "
                         "the paths in the list files are relative to")
    img_root = resolve_root(image_root, ".")
    if not img_root.is_dir():
        raise DatasetNotFoundError(f"image root {img_root} is not a folder; pass image_root "
                                   f"(--data-root / GLAG_DATA_ROOT)")
    files = {"train": train_list, "val": val_list, "test": test_list}
    parsed = {}
    for name, f in files.items():
        if f is None:
            continue
        p = _resolve_list(f, img_root)
        parsed[name] = (p, *read_list_file(p))
        if check_files:
            check_images(img_root, parsed[name][1], p)
    num_classes = check_labels(parsed)

    def make(name, list_file, paths, labels, lines, rows=None):
        if rows is not None:
            paths = [paths[r] for r in rows]
            labels, lines = labels[rows], lines[rows]
        return FileSplit(name, [str(img_root / p) for p in paths], labels, lines, image_size,
                         list_file=list_file)

    train_file, ptr, ytr, ltr = parsed["train"]
    if "val" in parsed:
        train = make("train", *parsed["train"])
        val = make("val", *parsed["val"])
    else:
        tr_rows, va_rows = carve_val(ytr, val_per_class, num_classes, np.random.default_rng(seed))
        train = make("train", train_file, ptr, ytr, ltr, tr_rows)
        val = make("val", train_file, ptr, ytr, ltr, va_rows)
    test = make("test", *parsed["test"])
    ds = LTDataset(
        name="list", num_classes=num_classes, in_channels=3, image_size=int(image_size),
        train=train, val=val, test=test,
        config=dict(dataset="list", image_root=str(img_root),
                    **{f"{k}_list": (str(parsed[k][0]) if k in parsed else None) for k in files},
                    image_size=int(image_size), val_per_class=int(val_per_class),
                    seed=int(seed), val_from_train=val_list is None),
    )
    logger.info("%s", ds.describe())
    return ds
