"""CIFAR-100-LT, exactly the LDAM-DRW protocol (Cao et al., 2019, ``IMBALANCECIFAR100``).

Source: a local copy of the CIFAR-100 python pickles, ``<root>/cifar-100-python/{train,test,meta}``
(``root`` argument, else ``$GLAG_DATA_ROOT``, else ``./data``; ``root`` may also be the
``cifar-100-python`` folder itself). Nothing is downloaded unless ``download=True`` is passed
(off by default; :func:`download_cifar100` fetches and md5-checks the official archive on a
machine with internet).

Train subset, as LDAM-DRW: ``img_num_per_cls = lt_profile(100, n_max=500, IF)`` (class 0 is the
head), then with ``np.random.seed(0)`` and for each class in order
``idx = np.where(targets == c)[0]; np.random.shuffle(idx); keep idx[:n_c]``. glag draws the same
numbers from a local ``np.random.RandomState(0)`` (identical stream to the legacy global seeding)
so the global numpy state is untouched. Rows are kept in LDAM's order (class-major, shuffled
within a class). Totals: IF 10 -> 19,573; 50 -> 12,608; 100 -> 10,847; 200 -> 9,502. ``seed``
does NOT change this subset (``ldam_seed`` does, default 0 as LDAM's ``rand_number``).

Validation (not part of LDAM-DRW, which has none): ``val_per_class`` images per class drawn,
with ``np.random.default_rng(seed)``, from the training images the LT subset did NOT select.
Head classes may have fewer leftovers than that (at n_max = 500 class 0 keeps all 500 of its
images and has none left; at IF 10 class 1 has 12), so those classes get what is left and a
warning is logged: the val split is balanced except for such head classes. Test = the official
10k test set.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path

import numpy as np

from ..errors import UsageError
from . import transforms as T
from .base import (DatasetCorruptError, DatasetNotFoundError, LTDataset, TensorSplit,
                   check_val_per_class, resolve_root)
from .profile import lt_profile

logger = logging.getLogger(__name__)

DEFAULT_ROOT = "data"
FOLDER = "cifar-100-python"
URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
NUM_CLASSES = 100

# Globals a CIFAR pickle may reference: numpy's array reconstruction (old and new module
# names; ``_frombuffer`` rebuilds an array from its bytes in protocol-5 pickles) and
# ``_codecs.encode`` (protocol-2 pickles of bytes), nothing else.
_ALLOWED_GLOBALS = {
    ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
}


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global except numpy array reconstruction."""

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR pickle")


def _corrupt_fix() -> str:
    return f"the file is damaged: extract it again from the official archive ({URL})"


def _load_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, LookupError,
            MemoryError, OverflowError) as e:
        # damaged bytes: an unknown encoding name (LookupError), a memo or stack index
        # (KeyError, IndexError), a huge FRAME or object length (MemoryError, OverflowError)
        raise DatasetCorruptError(f"{path}: not a readable CIFAR-100 pickle "
                                  f"({type(e).__name__}: {e}); {_corrupt_fix()}") from e
    if not isinstance(obj, dict):
        raise DatasetCorruptError(f"{path}: expected a dict, got {type(obj).__name__}")
    return obj


def _missing_message(root: Path, missing: list[str]) -> str:
    return (f"CIFAR-100 not found (looked in {root / FOLDER} and {root}; missing: "
            f"{', '.join(missing)}). Expected layout: <root>/{FOLDER}/train, "
            f"<root>/{FOLDER}/test, <root>/{FOLDER}/meta (the python pickles from {URL}, "
            f"extracted). Set the root with --data-root or the GLAG_DATA_ROOT environment "
            f"variable. On a machine with internet, build_dataset('cifar100-lt', download=True) "
            f"(off by default) fetches and md5-checks the archive into <root>.")


def find_cifar100(root: Path) -> Path | None:
    """The folder holding ``train``, ``test``, ``meta``: ``root/cifar-100-python`` or ``root``."""
    for d in (root / FOLDER, root):
        if all((d / f).is_file() for f in ("train", "test", "meta")):
            return d
    return None


def download_cifar100(root: str | os.PathLike) -> Path:
    """Download ``cifar-100-python.tar.gz`` from the official URL, check its md5, extract it.

    Never called by tests or by default; requires internet. Writes ``root/cifar-100-python/``.
    Returns the extracted folder.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    archive = root / "cifar-100-python.tar.gz"
    if not archive.is_file() or _md5(archive) != MD5:
        logger.info("downloading %s -> %s", URL, archive)
        fd, tmp = tempfile.mkstemp(dir=root, suffix=".partial")
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(URL, timeout=60) as resp:
                shutil.copyfileobj(resp, out, length=1 << 20)
            got = _md5(Path(tmp))
            if got != MD5:
                raise DatasetCorruptError(f"{URL}: md5 {got}, expected {MD5}; download corrupt")
            os.replace(tmp, archive)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    logger.info("extracting %s", archive)
    with tarfile.open(archive, "r:gz") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(root, filter="data")
        else:  # pragma: no cover - Python without PEP 706 filters
            for m in tar.getmembers():
                if m.name.startswith(("/", "..")) or ".." in Path(m.name).parts or not (
                        m.isfile() or m.isdir()):
                    raise DatasetCorruptError(f"{archive}: unsafe member {m.name!r}")
            tar.extractall(root)
    return root / FOLDER


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_cifar100_arrays(folder: Path) -> dict:
    """The CIFAR-100 arrays from ``folder`` (holding ``train``, ``test``, ``meta``).

    Returns:
        ``{"train_images": uint8 [50000, 3, 32, 32], "train_labels": int64 [50000],
        "test_images": uint8 [10000, 3, 32, 32], "test_labels": int64 [10000],
        "class_names": list[str] or None}`` (any N in tests).
    """
    out: dict = {}
    for split in ("train", "test"):
        d = _load_pickle(folder / split)
        if b"data" not in d or b"fine_labels" not in d:
            raise DatasetCorruptError(f"{folder / split}: missing b'data' or b'fine_labels' "
                                      f"(keys: {sorted(d)})")
        x = np.asarray(d[b"data"])
        y = np.asarray(d[b"fine_labels"], dtype=np.int64)
        if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(x) != len(y):
            raise DatasetCorruptError(f"{folder / split}: b'data' is {x.dtype} {x.shape} for "
                                      f"{len(y)} labels, expected uint8 [N, 3072]")
        if y.size and (y.min() < 0 or y.max() >= NUM_CLASSES):
            raise DatasetCorruptError(f"{folder / split}: fine label out of range 0..99")
        out[f"{split}_images"] = x.reshape(-1, 3, 32, 32)
        out[f"{split}_labels"] = y
    meta = _load_pickle(folder / "meta")
    names = meta.get(b"fine_label_names")
    try:
        out["class_names"] = ([n.decode() if isinstance(n, bytes) else str(n) for n in names]
                              if names is not None else None)
    except (UnicodeDecodeError, TypeError) as e:
        raise DatasetCorruptError(f"{folder / 'meta'}: b'fine_label_names' is not a list of UTF-8 "
                                  f"names ({type(e).__name__}: {e}); {_corrupt_fix()}") from e
    return out


def ldam_select(targets: np.ndarray, img_num_per_cls: list[int],
                rand_number: int = 0) -> np.ndarray:
    """LDAM-DRW's ``IMBALANCECIFAR100.gen_imbalanced_data`` selection, as source indices.

    Same draws as ``np.random.seed(rand_number)`` followed by, per class of ``np.unique(targets)``
    in order, ``np.random.shuffle(idx)``, but from a local ``RandomState``.

    Args:
        targets: int64 [N] training labels.
        img_num_per_cls: images to keep per class (class order of ``np.unique(targets)``).
        rand_number: LDAM's seed (0).

    Returns:
        int64 [sum(img_num_per_cls)] source indices, class-major, in LDAM's row order.
    """
    targets = np.asarray(targets, dtype=np.int64)
    rs = np.random.RandomState(rand_number)
    keep = []
    for the_class, the_img_num in zip(np.unique(targets), img_num_per_cls):
        idx = np.where(targets == the_class)[0]
        rs.shuffle(idx)
        keep.append(idx[:the_img_num])
    return np.concatenate(keep).astype(np.int64)


def select_val_leftover(targets: np.ndarray, selected: np.ndarray, num_classes: int,
                        val_per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Balanced validation indices from the training images not in ``selected``.

    Per class in order: ``rng.permutation`` of the class's unselected indices, keep the first
    ``val_per_class`` (fewer, with a warning, when fewer are left). Returns int64 source indices.
    Raises UsageError when ``val_per_class < 1``.
    """
    check_val_per_class(val_per_class)
    targets = np.asarray(targets, dtype=np.int64)
    free = np.ones(len(targets), dtype=bool)
    free[selected] = False
    out, short = [], []
    for c in range(num_classes):
        idx = np.flatnonzero(free & (targets == c))
        if idx.size < val_per_class:
            short.append(f"{c}:{idx.size}")
        out.append(rng.permutation(idx)[:val_per_class])
    if short:
        logger.warning("cifar100-lt val: %d class(es) have fewer than %d unselected training "
                       "images and get fewer val images (class:available) %s", len(short),
                       val_per_class, " ".join(short))
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)


def build_cifar100_lt(root=None, imbalance_factor: float = 100.0, n_max: int = 500,
                      val_per_class: int = 20, seed: int = 0, download: bool = False,
                      ldam_seed: int = 0) -> LTDataset:
    """CIFAR-100-LT, LDAM-DRW protocol; see the module docstring. Images uint8 [N, 3, 32, 32]
    in memory; augmentation = zero-pad-4 random crop + horizontal flip."""
    root = resolve_root(root, DEFAULT_ROOT)
    folder = find_cifar100(root)
    if folder is None and download:
        folder = download_cifar100(root)
    if folder is None:
        missing = [f for f in ("train", "test", "meta") if not (root / FOLDER / f).is_file()]
        raise DatasetNotFoundError(_missing_message(root, missing))
    arrays = load_cifar100_arrays(folder)
    ytr, yte = arrays["train_labels"], arrays["test_labels"]
    counts = lt_profile(NUM_CLASSES, n_max, imbalance_factor)
    have = np.bincount(ytr, minlength=NUM_CLASSES)
    if (have < np.asarray(counts)).any():
        c = int(np.flatnonzero(have < np.asarray(counts))[0])
        raise UsageError(f"{folder}: class {c} has {have[c]} training images, the profile needs "
                         f"{counts[c]}; lower n_max")
    train_idx = ldam_select(ytr, counts, ldam_seed)
    val_idx = select_val_leftover(ytr, train_idx, NUM_CLASSES, val_per_class,
                                  np.random.default_rng(seed))
    xtr, xte = arrays["train_images"], arrays["test_images"]
    norm = dict(mean=T.CIFAR100_MEAN, std=T.CIFAR100_STD, pad=4)
    ds = LTDataset(
        name="cifar100-lt", num_classes=NUM_CLASSES, in_channels=3, image_size=32,
        train=TensorSplit("train", xtr[train_idx], ytr[train_idx], train_idx, **norm),
        val=TensorSplit("val", xtr[val_idx], ytr[val_idx], val_idx, **norm),
        test=TensorSplit("test", xte, yte, np.arange(len(yte)), **norm),
        class_names=arrays["class_names"],
        config=dict(dataset="cifar100-lt", root=str(folder),
                    imbalance_factor=float(imbalance_factor),
                    n_max=int(n_max), val_per_class=int(val_per_class), seed=int(seed),
                    ldam_seed=int(ldam_seed)),
    )
    logger.info("%s", ds.describe())
    return ds
