"""Splits, the dataset container and deterministic batch iteration.

A *split* (train / val / test) is a list of rows. Row ``r`` has a label ``split.labels[r]`` and a
source index ``split.index[r]`` (its index in the source dataset, or its line index in a list
file). ``split.load_batch(ids, augment, seed)`` turns rows into a normalised float batch.

RNG streams (STYLE.md habit 5): the LT subset / validation draw is made by the dataset builders
from ``seed``; the order and augmentation of batches come from :func:`batch_order` and
:func:`batch_seed`, pure functions of ``(seed, epoch[, batch])`` on their own ``SeedSequence``
stream, so a resumed run sees exactly the batches it would have seen.

Data parallelism (torchrun): :func:`iterate_batches` with ``rank``/``world_size`` gives each
process its part of every global batch (:func:`rank_rows`); :func:`shard_split` gives each
process a contiguous, batch-aligned shard of a split processed in order (extraction, evaluation).
"""
from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import UsageError
from ..options import check_ranges
from . import transforms as T

logger = logging.getLogger(__name__)

ENV_DATA_ROOT = "GLAG_DATA_ROOT"

# Tags that keep the data-order and augmentation streams apart from each other (and from any
# other use of the same seed). Arbitrary constants; changing them changes every batch.
_ORDER_STREAM = 0x0DA7A
_AUG_STREAM = 0xA0C


class DatasetNotFoundError(UsageError, FileNotFoundError):
    """A dataset's files are not where they were looked for; the message says how to get them."""


class DatasetCorruptError(UsageError):
    """A dataset file exists but is not what it should be (bad magic number, truncated, ...)."""


def check_val_per_class(val_per_class: int) -> None:
    """Raise :class:`UsageError` unless ``val_per_class`` (``--val-per-class``) is an integer >= 1
    (:func:`glag.options.check_ranges`, as the stages check their options): 0 would leave the
    validation split empty, a negative count would slice training images into it."""
    check_ranges({"val_per_class": val_per_class}, int_min={"val_per_class": 1})


def resolve_root(root: str | os.PathLike | None, default: str | os.PathLike) -> Path:
    """Data root: ``root`` argument, else ``$GLAG_DATA_ROOT``, else ``default``."""
    if root is not None and str(root) != "":
        return Path(root).expanduser()
    env = os.environ.get(ENV_DATA_ROOT)
    if env:
        return Path(env).expanduser()
    return Path(default).expanduser()


# --------------------------------------------------------------------------- splits
class Split:
    """Rows of one split. Subclasses implement :meth:`load_batch`.

    Attributes:
        name: ``"train"``, ``"val"`` or ``"test"``.
        labels: np.int64 [N], class of each row.
        index: np.int64 [N], the row's index in its source dataset / line index in its list file.
        in_memory: True when images are held as one uint8 tensor (batched augmentation).
    """

    in_memory = False

    def __init__(self, name: str, labels: np.ndarray, index: np.ndarray):
        self.name = name
        self.labels = np.ascontiguousarray(labels, dtype=np.int64)
        self.index = np.ascontiguousarray(index, dtype=np.int64)
        if self.labels.shape != self.index.shape or self.labels.ndim != 1:
            raise ValueError(f"labels {self.labels.shape} and index {self.index.shape} must be "
                             "1-D of equal length")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def load_batch(self, ids: np.ndarray, augment: bool, seed: int) -> torch.Tensor:
        """Rows ``ids`` (int64 [B], positions in this split) -> float32 [B, C, H, W], normalised
        with the dataset's mean/std. With ``augment`` the random views are a pure function of
        ``seed`` (a non-negative int); without it ``seed`` is ignored."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, n={len(self)})"


class TensorSplit(Split):
    """A split whose images live in memory as one uint8 tensor [N, C, H, W].

    Augmentation (zero-padded random crop by ``pad`` + horizontal flip) is done on the whole
    batch at once by :func:`glag.data.transforms.random_crop_flip`.
    """

    in_memory = True

    def __init__(self, name: str, images: np.ndarray | torch.Tensor, labels: np.ndarray,
                 index: np.ndarray, mean: Sequence[float], std: Sequence[float], pad: int):
        super().__init__(name, labels, index)
        if isinstance(images, np.ndarray):  # own, writable, contiguous copy for torch
            images = torch.from_numpy(np.require(images, requirements=["C", "W", "O"]))
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[0] != len(self):
            raise ValueError(f"images must be uint8 [N={len(self)}, C, H, W], got "
                             f"{images.dtype} {tuple(images.shape)}")
        if images.shape[1] != len(mean) or len(mean) != len(std):
            raise ValueError(f"{images.shape[1]} channels but mean/std of length "
                             f"{len(mean)}/{len(std)}")
        self.images = images
        self.mean, self.std, self.pad = tuple(mean), tuple(std), int(pad)

    def load_batch(self, ids: np.ndarray, augment: bool, seed: int) -> torch.Tensor:
        """Rows ``ids`` (int64 [B]) -> float32 [B, C, H, W]; see :meth:`Split.load_batch`."""
        ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        x = self.images[ids]
        if augment:
            g = torch.Generator().manual_seed(int(seed))
            x = T.random_crop_flip(x, self.pad, g)
        return T.normalize_uint8(x, self.mean, self.std)


class FileSplit(Split):
    """A split of image files read with PIL (list-file datasets).

    Training view: random-resized crop to ``image_size`` + flip; eval view: resize the shorter
    side to ``image_size*256/224`` then centre crop. Each batch draws from one
    ``np.random.default_rng(seed)``, rows in the order given.

    Images are decoded only when loaded; a damaged file raises :class:`DatasetCorruptError`
    naming it (and its line of ``list_file``, whose 0-based line index is ``index``, if given).
    """

    def __init__(self, name: str, paths: Sequence[str], labels: np.ndarray, index: np.ndarray,
                 image_size: int, mean: Sequence[float] = T.IMAGENET_MEAN,
                 std: Sequence[float] = T.IMAGENET_STD, list_file: str | None = None):
        super().__init__(name, labels, index)
        if len(paths) != len(self):
            raise ValueError(f"{len(paths)} paths for {len(self)} labels")
        self.paths = list(paths)
        self.image_size = int(image_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.list_file = None if list_file is None else str(list_file)

    def _where(self, r: int) -> str:
        """Row ``r``'s image path, with its list file and 1-based line when known."""
        if self.list_file is None:
            return self.paths[r]
        return f"{self.paths[r]} ({self.list_file}, line {int(self.index[r]) + 1})"

    def load_image(self, r: int):
        """Row ``r`` as an RGB PIL image.

        Raises:
            DatasetNotFoundError: the file is gone. DatasetCorruptError: it cannot be decoded
            (truncated, empty, not an image) or holds 32-bit values (see :func:`to_rgb`).
        """
        from PIL import Image

        where = self._where(r)
        remove = (f"remove its line from {self.list_file}" if self.list_file is not None
                  else "delete it")
        try:
            with Image.open(self.paths[r]) as im:
                return to_rgb(im, where)
        except FileNotFoundError as e:
            raise DatasetNotFoundError(f"image {where} not found ({e.strerror}); restore it or "
                                       f"{remove}") from e
        except DatasetCorruptError:
            raise
        except (OSError, SyntaxError, EOFError, ValueError, struct.error) as e:
            # PIL: truncated ("image file is truncated"), empty or unknown (UnidentifiedImageError),
            # broken chunks, bad headers
            raise DatasetCorruptError(f"image {where} cannot be read, it is damaged or not an "
                                      f"image ({type(e).__name__}: {e}); replace it with a good "
                                      f"copy or {remove}") from e

    def load_batch(self, ids: np.ndarray, augment: bool, seed: int) -> torch.Tensor:
        """Rows ``ids`` (int64 [B]) -> float32 [B, 3, S, S]; see :meth:`Split.load_batch`."""
        ids = np.asarray(ids, dtype=np.int64)
        rng = np.random.default_rng(int(seed)) if augment else None
        out = torch.empty((len(ids), 3, self.image_size, self.image_size), dtype=torch.uint8)
        for k, r in enumerate(ids):
            img = self.load_image(r)
            out[k] = (T.train_transform_pil(img, self.image_size, rng) if augment
                      else T.eval_transform_pil(img, self.image_size))
        return T.normalize_uint8(out, self.mean, self.std)


def to_rgb(im, name: str = "image"):
    """A PIL image -> RGB (a new image; ``im`` may be closed afterwards).

    16-bit grey (modes ``I;16*``, and ``I`` with every value in 0..65535, as 16-bit PNGs and
    TIFFs open) is scaled to 8 bits (divided by 257, rounded) first: ``convert("RGB")`` would
    clip every value above 255 to white. Float grey (mode ``F``, float TIFFs) with every value in
    [0, 1] is taken as intensities in [0, 1] (times 255, rounded; ``convert`` would make it black);
    with values up to 255, as 0..255.

    Raises:
        DatasetCorruptError: a mode ``I`` image with values outside 0..65535 (32-bit data), or a
            mode ``F`` one with values outside [0, 255] or not finite; the message starts with ``name``.
    """
    from PIL import Image

    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im)  # uint16 [H, W] (I;16*) or int32 [H, W] (I)
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise DatasetCorruptError(f"{name} has 32-bit integer pixel values (mode {im.mode}, "
                                      f"range {lo}..{hi}); glag reads 8- and 16-bit images: "
                                      f"convert it to 8 or 16 bits")
        im = Image.fromarray(np.rint(a / 257.0).astype(np.uint8), "L")
    elif im.mode == "F":
        a = np.asarray(im, dtype=np.float64)  # [H, W]
        finite = bool(np.isfinite(a).all())
        lo, hi = (float(a.min()), float(a.max())) if a.size and finite else (0.0, 0.0)
        if not finite or lo < 0 or hi > 255:
            what = "values that are not finite" if not finite else f"values in {lo:g}..{hi:g}"
            raise DatasetCorruptError(f"{name} is a float image (mode F) with {what}; glag reads float images "
                                      f"with values in [0, 1] or [0, 255]: rescale it to one of those, or save it "
                                      f"as an 8- or 16-bit image")
        im = Image.fromarray(np.rint(a * 255.0 if hi <= 1.0 else a).astype(np.uint8), "L")
    return im.convert("RGB")


# --------------------------------------------------------------------------- dataset container
@dataclass
class LTDataset:
    """A built dataset: three splits plus metadata.

    Attributes:
        name: registry name (``"fmnist-lt"``, ``"cifar100-lt"``, ``"list"``).
        num_classes: C.
        in_channels: 1 (Fashion-MNIST) or 3.
        image_size: side of the square images a batch holds.
        train, val, test: :class:`Split` objects.
        class_names: optional list of C names.
        config: the resolved build arguments (root, IF, n_max, seed, ...), to save with a run.
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    train: Split
    val: Split
    test: Split
    class_names: list[str] | None = None
    config: dict = field(default_factory=dict)

    @property
    def class_counts(self) -> np.ndarray:
        """Training images per class, np.int64 [C], computed from ``train.labels``."""
        return np.bincount(self.train.labels, minlength=self.num_classes).astype(np.int64)

    @property
    def indices(self) -> dict[str, np.ndarray]:
        """Source indices per split, ``{"train"|"val"|"test": np.int64 [N]}`` (for np.savez)."""
        return {s.name: s.index.copy() for s in (self.train, self.val, self.test)}

    def describe(self) -> str:
        """One line: name, classes, train counts (all of them up to 20 classes, else max /
        median / min), actual imbalance ratio, split sizes."""
        c = self.class_counts
        if self.num_classes <= 20:
            counts = "[" + ", ".join(str(int(v)) for v in c) + "]"
        else:
            counts = f"max {int(c.max())}, median {int(np.median(c))}, min {int(c.min())}"
        ratio = f"{c.max() / c.min():.1f}" if c.min() > 0 else "inf"
        return (f"{self.name}: {self.num_classes} classes, train {len(self.train)} "
                f"(counts {counts}; max/min {ratio}), val {len(self.val)}, test {len(self.test)}")


# --------------------------------------------------------------------------- batch iteration
def batch_order(n: int, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
    """Row order of one epoch, np.int64 [n]: ``arange(n)`` without shuffle, else a permutation
    that depends only on ``(seed, epoch)``."""
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(np.random.SeedSequence([_ORDER_STREAM, int(seed), int(epoch)]))
    return rng.permutation(n).astype(np.int64)


def batch_seed(seed: int, epoch: int, batch: int) -> int:
    """Augmentation seed of batch ``batch`` of ``epoch``: a 63-bit int from ``(seed, epoch,
    batch)`` on a stream separate from :func:`batch_order`."""
    ss = np.random.SeedSequence([_AUG_STREAM, int(seed), int(epoch), int(batch)])
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def num_batches(split: Split, batch_size: int, drop_last: bool = False) -> int:
    """Batches per epoch of :func:`iterate_batches` (for progress bars and resume); the same
    on every rank when sharded (``batch_size`` is then the global batch)."""
    n = len(split)
    return n // batch_size if drop_last else -(-n // batch_size)


def rank_rows(rows: np.ndarray, rank: int, world_size: int, pad_from: np.ndarray) -> np.ndarray:
    """This rank's part of one global batch, int64 [ceil(len(rows) / world_size)].

    The global batch ``rows`` (int64 [n]) is cut into ``world_size`` contiguous parts of equal
    size ``m = ceil(n / world_size)``; when ``n`` is not a multiple of ``world_size`` (the last,
    short batch of an epoch, or a batch size that does not divide), it is first padded to
    ``m * world_size`` rows with the first rows of ``pad_from`` (the epoch order), as
    ``torch.utils.data.DistributedSampler`` pads: at most ``world_size - 1`` rows per batch are
    seen twice, and no rank ever gets an empty batch.
    """
    n = len(rows)
    m = -(-n // world_size)
    if m * world_size != n:
        rows = np.concatenate([rows, np.resize(pad_from, m * world_size - n)])
    return rows[rank * m:(rank + 1) * m]


class SubsetSplit(Split):
    """A view of rows ``rows`` (int64 [n], positions in ``parent``) of another split, in that
    order: ``labels``/``index`` are the parent's at those rows, so ``index`` keeps naming the
    sample in its source dataset. Used to give each process its shard of a split."""

    def __init__(self, parent: Split, rows: np.ndarray):
        self.parent = parent
        self.rows = np.ascontiguousarray(rows, dtype=np.int64)
        super().__init__(parent.name, parent.labels[self.rows], parent.index[self.rows])
        self.in_memory = parent.in_memory

    def load_batch(self, ids: np.ndarray, augment: bool, seed: int) -> torch.Tensor:
        """Rows ``ids`` of this view -> the parent's batch of those rows (same transforms)."""
        return self.parent.load_batch(self.rows[np.asarray(ids, dtype=np.int64)], augment, seed)


def shard_bounds(n: int, rank: int, world_size: int, batch_size: int = 1) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of a split of ``n`` rows that ``rank`` of ``world_size`` handles when a
    split is processed in order (extraction, evaluation).

    Whole batches of ``batch_size`` rows are dealt out contiguously (rank r gets batches
    ``[nb*r // W, nb*(r+1) // W)`` of the ``nb = ceil(n / batch_size)``), so every batch a rank
    forms is exactly a batch of the single-process run: the same rows, the same shapes, hence
    the same numbers. Shards concatenated in rank order are the whole split, in order. A rank
    may get no rows when ``nb < world_size``.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
    nb = -(-n // batch_size)
    lo, hi = nb * rank // world_size, nb * (rank + 1) // world_size
    return min(lo * batch_size, n), min(hi * batch_size, n)


def shard_split(split: Split, rank: int, world_size: int, batch_size: int = 1) -> Split:
    """``rank``'s contiguous shard of ``split`` (:func:`shard_bounds`); the split itself for
    ``world_size == 1``."""
    if world_size == 1:
        return split
    lo, hi = shard_bounds(len(split), rank, world_size, batch_size)
    return SubsetSplit(split, np.arange(lo, hi, dtype=np.int64))


class _BatchItems(Dataset):
    """Map-style dataset whose item ``k`` is a whole batch (for DataLoader workers)."""

    def __init__(self, split: Split, batches: list[np.ndarray], seeds: list[int], augment: bool):
        self.split, self.batches, self.seeds, self.augment = split, batches, seeds, augment

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int):
        ids = self.batches[k]
        x = self.split.load_batch(ids, self.augment, self.seeds[k])
        return (x, torch.from_numpy(self.split.labels[ids]),
                torch.from_numpy(self.split.index[ids]))


def iterate_batches(split: Split, batch_size: int, *, shuffle: bool, augment: bool, seed: int,
                    epoch: int = 0, start_batch: int = 0, num_workers: int = 0,
                    drop_last: bool = False, rank: int = 0,
                    world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor,
                                                           torch.Tensor]]:
    """Deterministic batches of one epoch.

    Order (:func:`batch_order`) and augmentation (:func:`batch_seed`, one seed per batch) depend
    only on ``(seed, epoch)``, so batch ``b`` is the same whether the epoch is run from the start
    or resumed with ``start_batch=b`` (which skips without loading anything).

    Args:
        split: a :class:`Split`.
        batch_size: rows per batch (the last one may be smaller unless ``drop_last``).
        shuffle: False keeps rows in split order (feature extraction relies on this).
        augment: apply the training transform.
        seed, epoch: the run's seed and the epoch number.
        start_batch: first batch to yield (0-based).
        num_workers: DataLoader workers for file splits (items are whole batches, each loaded
            with its own seed, so the result does not depend on the worker count). In-memory
            splits are augmented batched on tensors in the calling process and ignore it.
        drop_last: drop a final partial batch.
        rank, world_size: data-parallel sharding (torchrun). ``batch_size`` is then the
            *global* batch: every process computes the same order and the same global batches
            and takes its part of each, see :func:`rank_rows`. Every rank yields the same
            number of batches (:func:`num_batches`), so collectives stay in step. The
            augmentation seeds are drawn with ``seed + rank`` (per-rank randomness); with
            ``world_size=1`` the batches are exactly the unsharded ones.

    Yields:
        ``(x, y, idx)``: float32 [B, C, H, W], int64 [B] labels, int64 [B] ``split.index`` rows
        (B = this rank's part of the batch).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
    order = batch_order(len(split), shuffle, seed, epoch)
    nb = num_batches(split, batch_size, drop_last)
    todo = range(max(int(start_batch), 0), nb)
    batches = [order[b * batch_size:(b + 1) * batch_size] for b in todo]
    if world_size > 1:
        batches = [rank_rows(rows, rank, world_size, order) for rows in batches]
    seeds = [batch_seed(seed + rank, epoch, b) for b in todo]
    items = _BatchItems(split, batches, seeds, augment)
    if split.in_memory or num_workers <= 0:
        for k in range(len(items)):
            yield items[k]
        return
    loader = DataLoader(items, batch_size=None, shuffle=False,
                                         num_workers=num_workers)
    yield from loader
