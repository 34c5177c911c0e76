"""Datasets for glag: Fashion-MNIST-LT (default), CIFAR-100-LT (LDAM-DRW), list-file datasets.

Typical use::

    from glag.data import build_dataset, iterate_batches
    ds = build_dataset("fmnist-lt")                 # root: arg > $GLAG_DATA_ROOT > default
    print(ds.describe())
    for x, y, idx in iterate_batches(ds.train, 128, shuffle=True, augment=True, seed=0, epoch=3):
        ...                                        # x float32 [B,1,28,28], y/idx int64 [B]

See DESIGN.md ("Data") for the protocols; each module's docstring for the details.
"""
from __future__ import annotations

from ..errors import UsageError
from .base import (DatasetCorruptError, DatasetNotFoundError, FileSplit, LTDataset, Split,
                   TensorSplit, batch_order, batch_seed, iterate_batches, num_batches)
from .cifar import build_cifar100_lt, download_cifar100
from .fmnist import build_fmnist_lt
from .imagefolder import build_folder_dataset
from .listfile import ListFileError, build_list_dataset
from .profile import lt_profile

# Registry: name -> builder(root, imbalance_factor, n_max, val_per_class, seed, **kw).
# The first entry is the default dataset.
DATASETS = {
    "fmnist-lt": build_fmnist_lt,
    "cifar100-lt": build_cifar100_lt,
    "list": build_list_dataset,
    "folder": build_folder_dataset,
}
DEFAULT_DATASET = "fmnist-lt"


def build_dataset(name: str = DEFAULT_DATASET, root=None, imbalance_factor: float = 100.0,
                  n_max: int = 500, val_per_class: int = 20, seed: int = 0, **kw) -> LTDataset:
    """Build a dataset by registry name.

    Args:
        name: one of ``DATASETS``: ``"fmnist-lt"`` (default), ``"cifar100-lt"``, ``"list"``.
        root: data folder (else ``$GLAG_DATA_ROOT``, else the dataset's default).
        imbalance_factor: IF of the LT profile (fmnist-lt, cifar100-lt).
        n_max: head-class images (fmnist-lt, cifar100-lt).
        val_per_class: images per class in the balanced validation split.
        seed: seed of the subset / validation draw (cifar100-lt: validation only; its train
            subset is LDAM-DRW's, fixed by ``ldam_seed=0``).
        **kw: dataset-specific: cifar100-lt ``download=False``, ``ldam_seed=0``; list
            ``train_list``, ``val_list=None``, ``test_list``, ``image_root``,
            ``image_size=224``, ``check_files=True``.

    Returns:
        :class:`LTDataset` with ``train``/``val``/``test`` splits, ``class_counts`` (np.int64
        [C]), ``indices`` and ``describe()``.

    Raises:
        ValueError: unknown name. DatasetNotFoundError: data missing (says how to get it).
        UsageError (glag.errors; DatasetNotFoundError, DatasetCorruptError and ListFileError
        are ones): ``val_per_class < 1``, a profile that leaves a class empty, bad input files.
    """
    try:
        builder = DATASETS[name]
    except KeyError:
        raise UsageError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}") from None
    return builder(root=root, imbalance_factor=imbalance_factor, n_max=n_max,
                   val_per_class=val_per_class, seed=seed, **kw)


__all__ = [
    "DATASETS", "DEFAULT_DATASET", "build_dataset", "iterate_batches", "num_batches",
    "batch_order", "batch_seed", "lt_profile", "DatasetNotFoundError", "DatasetCorruptError",
    "ListFileError", "LTDataset", "Split", "TensorSplit", "FileSplit", "build_fmnist_lt",
    "build_cifar100_lt", "build_list_dataset", "download_cifar100",
]
