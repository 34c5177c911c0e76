"""Long-tailed class-count profiles.

The exponential profile of Cui et al. (2019) as used by LDAM-DRW for CIFAR-LT, and by glag for
every LT subset it draws: class ``i`` keeps ``n_i = int(n_max * (1/IF) ** (i / (C - 1)))``
images, so class 0 is the head (``n_max``) and class ``C-1`` the tail (``n_max / IF``).
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import UsageError
from ..options import check_ranges


def lt_profile(num_classes: int, n_max: int, imbalance_factor: float) -> list[int]:
    """Per-class image counts of the exponential long-tailed profile.

    ``n_i = int(n_max * (1/IF) ** (i / (C - 1)))`` for ``i = 0 .. C-1``, computed in float64
    exactly as LDAM-DRW's ``get_img_num_per_cls`` does (``int`` truncates).

    Args:
        num_classes: C >= 1.
        n_max: images of the head class (class 0), >= 1.
        imbalance_factor: IF = n_max / n_min >= 1 (1 gives a balanced profile).

    Returns:
        list of C Python ints, non-increasing, each >= 1. Fashion-MNIST default
        (C=10, n_max=500, IF=100): ``[500, 299, 179, 107, 64, 38, 23, 13, 8, 5]``.

    Raises:
        UsageError: an argument out of range (:func:`glag.options.check_ranges`), or the
            profile leaves tail classes with 0 images (``n_max / IF < 1``).
    """
    check_ranges({"num_classes": num_classes, "n_max": n_max, "imbalance_factor": imbalance_factor},
                 int_min={"num_classes": 1, "n_max": 1},
                 float_range={"imbalance_factor": (1.0, True, math.inf, False)})
    if num_classes == 1:
        return [int(n_max)]
    ratio = 1.0 / float(imbalance_factor)
    counts = [int(n_max * ratio ** (i / (num_classes - 1.0))) for i in range(num_classes)]
    if counts[-1] < 1:  # non-increasing: the empty classes are the tail
        first = counts.index(0)
        need = max(int(np.ceil(imbalance_factor)), int(n_max))
        while int(need * ratio) < 1:  # the tail class gets int(n_max / IF)
            need += 1
        raise UsageError(f"the long-tailed profile with n_max={n_max} and imbalance factor "
                         f"{imbalance_factor:g} leaves classes {first}..{num_classes - 1} with 0 "
                         f"training images ({counts}); lower --imbalance-factor (below {n_max}) "
                         f"or raise --n-max (to {need} or more)")
    return counts


def profile_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Images per class: ``np.bincount`` of ``labels`` (int [N]) as np.int64 [num_classes]."""
    labels = np.asarray(labels, dtype=np.int64)
    return np.bincount(labels, minlength=num_classes).astype(np.int64)
