"""Range checks of a config's options, named as their command-line flags (``k_max`` -> ``--k-max``).

Each stage's config declares what its numeric and named options must be; :func:`check_ranges`
refuses a value that cannot work before anything is read or written. :func:`first_nonfinite_row`
finds the NaN/inf row of an input array, for the messages that name it.
"""
from __future__ import annotations

import math

import numpy as np

from .errors import UsageError


def flag(key: str) -> str:
    """The command-line flag of a config field: ``batch_size`` -> ``--batch-size``."""
    return "--" + key.replace("_", "-")


def check_ranges(values: dict, int_min: dict = None, float_range: dict = None, choices: dict = None,
                 unset_ok=()) -> None:
    """Refuse option values that cannot work.

    Args:
        values: the config as a dict (field -> value).
        int_min: field -> the smallest integer it may be (``seed`` is also kept below 2**63).
        float_range: field -> (low, low inclusive, high, high inclusive); the value must be finite.
        choices: field -> the values it may take.
        unset_ok: fields that may be None (unset: the default applies).
    Raises:
        UsageError: naming the flag, the value and what it must be.
    """
    for key, low in (int_min or {}).items():
        v = values.get(key)
        if v is None and key in unset_ok:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low or (key == "seed" and v >= 2**63):
            upper = " and < 2**63" if key == "seed" else ""
            raise UsageError(f"{flag(key)} must be an integer >= {low}{upper}, got {v!r}")
    for key, (lo, lo_in, hi, hi_in) in (float_range or {}).items():
        v = values.get(key)
        if v is None and key in unset_ok:
            continue
        ok = isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and math.isfinite(v)
        if ok:
            ok = (v >= lo if lo_in else v > lo) and (v <= hi if hi_in else v < hi)
        if not ok:
            bounds = f"{'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"
            raise UsageError(f"{flag(key)} must be a number in {bounds}, got {v!r}")
    for key, allowed in (choices or {}).items():
        if values.get(key) not in allowed:
            raise UsageError(f"{flag(key)} must be one of {', '.join(map(str, allowed))}, got {values.get(key)!r}")


def first_nonfinite_row(a) -> int | None:
    """Index of the first row of ``a`` (n, d; a numpy array or a torch tensor on any device)
    holding a NaN or inf, or None.

    Row sums flag the candidates at memory speed with O(n) extra memory (no (n, d) mask); each
    flagged row is then checked exactly (the sum of a finite row can overflow).
    """
    import torch  # (numpy arrays are viewed, not copied)

    if isinstance(a, np.ndarray) and any(st < 0 for st in a.strides):  # (torch views no negative strides)
        a = np.ascontiguousarray(a)
    t = torch.as_tensor(a)
    if t.numel() == 0:
        return None
    flagged = torch.nonzero(~torch.isfinite(t.sum(dim=1))).flatten().tolist()
    return next((r for r in flagged if not bool(torch.isfinite(t[r]).all())), None)
