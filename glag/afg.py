"""Adaptive Feature Generator (AFG): the math of GLAG's stage two, as pure functions.

Everything here maps arrays to arrays: no file I/O, no training loop. The stage-two loop
(:mod:`glag.stage2`) strings it together once per run / epoch::

    x = tukey(feats, lam)                                   # step 1, train/val/test alike
    stats = class_statistics(x, y, C)                       # step 2: means, counts, factor bank
    head, tail = split_head_tail(stats.counts)              # step 3
    q = tail-class real samples (x[m], y[m])
    sup, d2 = find_support(x[m], stats.means[head], head, k, y[m])           # step 4 (FAISS)
    w = support_weights(d2, sup, stats.counts)                               # step 5, w_i
    omega = AdaptiveOmega(C, tail)                                           # step 7
    every epoch:
        mu = calibrate_means(x[m], sup, w, stats.means, omega.omega_for(y[m]))   # step 5, mu'
        cnt = allocate_counts(y[m], n_max, stats.counts, rng)                    # step 6
        xg, yg = glag.sampling.sample_calibrated(stats.bank, mu, sup, w, cnt, y[m], alpha)
        ... train the classifier ...; omega.update(val_acc_per_class)

The generated covariance ``Sigma' = sum_i w_i Sigma_i + alpha`` is never formed: the sampler
draws from it through the per-class factors ``F_i`` (``Sigma_i = F_i F_i^T``, METHOD.md,
"Sampling without a Cholesky per sample"). :func:`calibrated_covariance` builds it densely,
for tests and small ``d`` only.

Equations: ``shared/METHOD.md``, stage two; [paper] marks what the paper says, [ours] what
glag chose where the paper is silent. Free-Lunch Distribution Calibration (Yang et al. 2021)
is the special case ``support_weights(..., mode="uniform")`` with ``omega = dc_omega(k)``.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Union

import numpy as np
import torch

from .errors import UsageError
from .options import first_nonfinite_row

log = logging.getLogger(__name__)

ArrayLike = Union[np.ndarray, torch.Tensor]

__all__ = [
    "tukey",
    "ClassStats",
    "class_statistics",
    "streaming_class_statistics",
    "split_head_tail",
    "class_roles",
    "find_support",
    "find_support_bruteforce",
    "support_weights",
    "calibrate_means",
    "calibrated_covariance",
    "allocate_counts",
    "AdaptiveOmega",
    "dc_omega",
]


# --------------------------------------------------------------------------------------------
# Step 1: Tukey's ladder of powers
# --------------------------------------------------------------------------------------------
def tukey(x: ArrayLike, lam: float, eps: float = 0.0) -> ArrayLike:
    """Tukey's ladder of powers, METHOD.md stage two step 1 [paper]; default lambda 0.5 is [ours].

    ``x~ = (x + eps) ** lam`` for ``lam != 0`` and ``log(x + eps)`` for ``lam == 0``.

    Args:
        x: features, any shape, numpy array or torch tensor (float32 typically). They should be
            post-ReLU, hence non-negative.
        lam: the power. ``lam = 1`` (with ``eps = 0``) is the identity, i.e. disables the
            transform.
        eps: added to ``x`` before the transform (default 0). Needed for ``lam <= 0``, because
            post-ReLU features contain exact zeros. Note it shifts the result for every lambda.

    Returns:
        Same type, shape and (floating) dtype as ``x``.

    Raises:
        UsageError (a ValueError): a non-integer ``lam`` with negative entries (the result would be NaN), or
            ``lam <= 0`` with entries ``x + eps == 0`` (the result would be infinite).
    """
    lam = float(lam)
    is_torch = isinstance(x, torch.Tensor)
    if not is_torch:
        x = np.asarray(x)
    xs = x + eps if eps else x
    n_neg = int((xs < 0).sum())
    if n_neg and not (lam != 0.0 and lam.is_integer()):
        raise UsageError(
            f"tukey(lam={lam}, eps={eps}): {n_neg} of {xs.numel() if is_torch else xs.size} "
            f"entries of x + eps are negative (min {float(xs.min()):.4g}); a non-integer power "
            f"or log of a negative number is NaN. The features must be post-ReLU (take them "
            f"after the last ReLU / global average pooling), or use an integer lambda "
            f"(lam=1, --tukey-lambda 1, disables the transform)."
        )
    if lam <= 0.0:
        n_zero = int((xs == 0).sum())
        if n_zero:
            what = "log(0) = -inf" if lam == 0.0 else f"0 ** {lam} = inf"
            raise UsageError(
                f"tukey(lam={lam}, eps={eps}): {n_zero} entries of x + eps are 0 and {what}. "
                f"Post-ReLU features have exact zeros: use lam > 0 (default 0.5), or pass a "
                f"small eps > 0 (e.g. eps=1e-6)."
            )
    if is_torch:
        return torch.log(xs) if lam == 0.0 else torch.pow(xs, lam)
    out = np.log(xs) if lam == 0.0 else np.power(xs, lam)
    if np.issubdtype(x.dtype, np.floating):
        out = out.astype(x.dtype, copy=False)
    return out


# --------------------------------------------------------------------------------------------
# Step 2: class statistics
# --------------------------------------------------------------------------------------------
@dataclass
class ClassStats:
    """Per-class statistics of the (Tukey-transformed) training features, METHOD.md step 2.

    Attributes:
        means: (C, d) float32, class means (accumulated in float64).
        counts: (C,) int64, n_c.
        bank: ``glag.sampling.FactorBank`` with ``Sigma_c = F_c F_c^T`` (unbiased covariance;
            ``F_c`` is d x 0 when n_c == 1), or None when built with ``build_bank=False``.
    """

    means: torch.Tensor
    counts: torch.Tensor
    bank: Any = None

    @property
    def num_classes(self) -> int:
        return int(self.means.shape[0])

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def covariance(self, c: int) -> torch.Tensor:
        """Dense (d, d) float64 covariance of class ``c`` from the bank (tests / small d)."""
        if self.bank is None:
            raise ValueError("ClassStats.bank is None: build it with class_statistics(..., build_bank=True)")
        return _dense_cov_from_bank(self.bank, c)


def _import_sampling():
    try:
        from glag import sampling  # lazy: another module, may import optional GPU code
    except ImportError as e:  # pragma: no cover - depends on the tree state
        raise ImportError(
            f"glag.sampling (FactorBank, class_factor) could not be imported ({e}); it is "
            f"needed to build the covariance factor bank. Pass build_bank=False to get "
            f"means and counts only."
        ) from e
    return sampling


def class_statistics(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    build_bank: bool = True,
) -> ClassStats:
    """Class means, counts and covariance factors, METHOD.md stage two step 2 [paper].

    Args:
        features: (N, d) float32 tensor, already Tukey-transformed.
        labels: (N,) int64 tensor of class ids in ``[0, num_classes)``.
        num_classes: C.
        build_bank: build ``bank`` with ``glag.sampling.class_factor`` per class and
            ``FactorBank.from_factors`` (the unbiased covariance, ddof = 1).

    Returns:
        :class:`ClassStats` (means (C, d) float32, counts (C,) int64, bank).

    Raises:
        ValueError: labels out of range, or a class with no training sample (its mean and
            covariance are undefined, so it can be neither generated nor a support class).
    """
    features = torch.as_tensor(features)
    labels = torch.as_tensor(labels, device=features.device).long()
    if features.ndim != 2 or labels.ndim != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"class_statistics: expected features (N, d) and labels (N,), got "
            f"{tuple(features.shape)} and {tuple(labels.shape)}"
        )
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"class_statistics: labels must lie in [0, {num_classes}), got "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    row = first_nonfinite_row(features)
    if row is not None:
        raise ValueError(f"class_statistics: feature row {row} (class {int(labels[row])}) is NaN or inf; class "
                         f"means and covariances need finite features (check the feature file)")
    counts = torch.bincount(labels, minlength=num_classes).to(torch.int64)
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if empty:
        raise ValueError(
            f"class_statistics: {len(empty)} class(es) have no training sample "
            f"(ids {empty[:10]}{' ...' if len(empty) > 10 else ''}); every class needs at "
            f"least one to have a mean. Check num_classes and the label list."
        )
    d = features.shape[1]
    sums = torch.zeros(num_classes, d, dtype=torch.float64, device=features.device)
    sums.index_add_(0, labels, features.to(torch.float64))
    means = (sums / counts.unsqueeze(1).to(torch.float64)).to(torch.float32)

    bank = None
    if build_bank:
        sampling = _import_sampling()
        order = torch.argsort(labels, stable=True)
        xs = features[order]
        bounds = torch.cumsum(counts, 0).tolist()
        starts = [0] + bounds[:-1]
        factors = [sampling.class_factor(xs[s:e]) for s, e in zip(starts, bounds)]
        bank = sampling.FactorBank.from_factors(factors)
    log.debug("class statistics: C=%d d=%d n_min=%d n_max=%d", num_classes, d,
              int(counts.min()), int(counts.max()))
    return ClassStats(means=means, counts=counts, bank=bank)


def streaming_class_statistics(
    chunks: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    counts: ArrayLike,
    factor_classes: Optional[ArrayLike] = None,
) -> ClassStats:
    """:func:`class_statistics` in one pass over row chunks, in bounded memory (METHOD.md step 2).

    For features that do not fit in memory (DESIGN.md, "Scale"): the chunks are read once, in
    any order and of any size, and the result equals :func:`class_statistics` on their
    concatenation to float rounding.

    * Means: per-class sums in float64 (``C x d x 8`` bytes), divided at the end.
    * Factor of a class with ``1 < n_c <= d``: its centred rows ``(X - mu)^T / sqrt(n_c - 1)``,
      exactly what :func:`glag.sampling.class_factor` returns. The raw rows are copied into the
      bank's own buffer at the class's offset as they stream by, and centred in float64 with the
      final mean at the end: memory is the factor itself, ``n_c d`` floats.
    * Factor of a class with ``n_c > d``: the ``d x d`` scatter ``M2 = sum (x - mu)(x - mu)^T``
      in float64, merged chunk by chunk with the pairwise update of Chan, Golub & LeVeque
      (``delta = mu_b - mu_a``; ``M2 = M2_a + M2_b + delta delta^T n_a n_b / n``;
      ``mu = mu_a + delta n_b / n``), which never forms ``sum x x^T - n mu mu^T`` and so has no
      catastrophic cancellation; then the lower Cholesky factor of ``M2 / (n_c - 1)``, with
      ``class_factor``'s jitter fallback for a singular covariance.
    * Classes outside ``factor_classes`` get rank 0. The sampler only reads the factors of
      support classes, which are head classes, so stage two passes the head set: a ``d x d``
      scatter for every class (iNaturalist: 8,142 x 32 MB) is never needed.

    Args:
        chunks: iterable of ``(x, y)``: x (n, d) float32 Tukey-transformed features, y (n,)
            int64 labels. Each chunk is used once, then dropped.
        num_classes: C.
        counts: (C,) int64 training counts n_c, known up front (the feature file stores them):
            they size the bank. The labels seen must match them exactly.
        factor_classes: class ids whose covariance factor is built; None = every class.

    Returns:
        :class:`ClassStats` (means (C, d) float32, counts (C,) int64, bank). The bank's
        ``data`` is the transpose of a contiguous (R, d) buffer (rows ``F_c^T``), so the
        sampler's transposed copy (``FactorBank.transposed``) costs no memory.

    Raises:
        ValueError: labels out of range, no chunk, a class with no sample, or label counts
            that differ from ``counts``.
    """
    counts = _to_numpy_i64(counts)
    if counts.shape != (num_classes,):
        raise ValueError(f"streaming_class_statistics: counts must be ({num_classes},), got {counts.shape}")
    empty = np.flatnonzero(counts == 0).tolist()
    if empty:
        raise ValueError(
            f"streaming_class_statistics: {len(empty)} class(es) have no training sample "
            f"(ids {empty[:10]}{' ...' if len(empty) > 10 else ''}); every class needs at "
            f"least one to have a mean. Check num_classes and the label list."
        )
    want = np.ones(num_classes, dtype=bool)
    if factor_classes is not None:
        want[:] = False
        want[_to_numpy_i64(factor_classes)] = True
    seen = np.zeros(num_classes, dtype=np.int64)
    sums = chan = buf = None
    d = None
    for x, y in chunks:
        x = torch.as_tensor(x)
        y = torch.as_tensor(y).long()
        if x.ndim != 2 or y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"streaming_class_statistics: expected chunks x (n, d) and y (n,), got "
                             f"{tuple(x.shape)} and {tuple(y.shape)}")
        if d is None:  # first chunk: the dimension is known, size everything
            d = int(x.shape[1])
            sums = torch.zeros(num_classes, d, dtype=torch.float64)
            gather = want & (counts > 1) & (counts <= d)
            scatter = want & (counts > d)
            ranks = np.where(gather, counts, np.where(scatter, d, 0))
            offsets = np.zeros(num_classes + 1, dtype=np.int64)
            offsets[1:] = np.cumsum(ranks)
            buf = torch.empty(int(offsets[-1]), d, dtype=torch.float32)  # rows of F_c^T
            chan = {int(c): None for c in np.flatnonzero(scatter)}
            gather_t = torch.from_numpy(gather)
        elif x.shape[1] != d:
            raise ValueError(f"streaming_class_statistics: chunk has d = {x.shape[1]}, earlier chunks {d}")
        if y.numel() == 0:
            continue
        if int(y.min()) < 0 or int(y.max()) >= num_classes:
            raise ValueError(f"streaming_class_statistics: labels must lie in [0, {num_classes}), got "
                             f"[{int(y.min())}, {int(y.max())}]")
        row = first_nonfinite_row(x)
        if row is not None:
            raise ValueError(f"streaming_class_statistics: a chunk's row {row} (class {int(y[row])}) is NaN or "
                             f"inf; class means and covariances need finite features (check the feature file)")
        x = x.float()
        sums.index_add_(0, y, x.to(torch.float64))
        yn = y.numpy()
        before = seen.copy()
        seen += np.bincount(yn, minlength=num_classes)
        over = np.flatnonzero(seen > counts)
        if over.size:
            c = int(over[0])
            raise ValueError(f"streaming_class_statistics: class {c} has more rows than counts[{c}] = "
                             f"{int(counts[c])}; the counts do not match the labels")
        # gathered classes: each row goes to offsets[c] + (its rank among the rows of c so far)
        sel = torch.nonzero(gather_t[y]).flatten().numpy()
        if sel.size:
            ys = yn[sel]
            order = np.argsort(ys, kind="stable")
            first = np.searchsorted(ys[order], ys[order], side="left")
            rank = np.empty_like(order)
            rank[order] = np.arange(order.size) - first
            dest = offsets[ys] + before[ys] + rank
            buf[torch.from_numpy(dest)] = x[torch.from_numpy(sel)]
        # scattered classes: merge this chunk's (n, mean, M2) into the running one (Chan et al.)
        for c in (np.unique(yn[np.isin(yn, list(chan))]) if chan else ()):
            xb = x[y == int(c)].to(torch.float64)
            nb = xb.shape[0]
            mb = xb.mean(0)
            xc = xb - mb
            m2b = xc.T @ xc
            run = chan[int(c)]
            if run is None:
                chan[int(c)] = [nb, mb, m2b]
                continue
            na, ma, m2a = run
            n = na + nb
            delta = mb - ma
            m2a += m2b
            m2a.add_(torch.outer(delta, delta), alpha=na * nb / n)
            run[0], run[1] = n, ma + delta * (nb / n)
    if d is None:
        raise ValueError("streaming_class_statistics: no chunk to read")
    if not np.array_equal(seen, counts):
        c = int(np.flatnonzero(seen != counts)[0])
        raise ValueError(f"streaming_class_statistics: class {c} has {int(seen[c])} rows but counts[{c}] = "
                         f"{int(counts[c])}; the counts do not match the labels")
    means64 = sums / torch.from_numpy(counts).to(torch.float64).unsqueeze(1)
    del sums
    for c in np.flatnonzero(gather):
        a, b = int(offsets[c]), int(offsets[c + 1])
        n = b - a
        buf[a:b] = ((buf[a:b].to(torch.float64) - means64[c]) / math.sqrt(n - 1)).to(torch.float32)
    for c, (n, _, m2) in chan.items():
        a = int(offsets[c])
        buf[a:a + d] = _cholesky_factor(m2 / (n - 1), n).T.to(torch.float32)
    sampling = _import_sampling()
    bank = sampling.FactorBank(buf.T, torch.from_numpy(offsets))
    log.debug("streaming class statistics: C=%d d=%d, %d gathered and %d scatter factors, R=%d",
              num_classes, d, int(gather.sum()), len(chan), int(offsets[-1]))
    return ClassStats(means=means64.to(torch.float32), counts=torch.from_numpy(counts.copy()), bank=bank)


def _cholesky_factor(cov: torch.Tensor, n: int) -> torch.Tensor:
    """Lower Cholesky factor (float64) of a (d, d) covariance; the jitter fallback of
    :func:`glag.sampling.class_factor` (smallest ``10^p`` of the mean variance that works)."""
    d = cov.shape[0]
    chol, info = torch.linalg.cholesky_ex(cov)
    if int(info) == 0:
        return chol
    scale = float(cov.diagonal().mean().clamp_min(1e-30))
    eye = torch.eye(d, dtype=cov.dtype)
    for p in range(-10, 1):
        jitter = scale * 10.0**p
        chol, info = torch.linalg.cholesky_ex(cov + jitter * eye)
        if int(info) == 0:
            log.warning("streaming_class_statistics: covariance (n=%d, d=%d) is singular; added jitter %.3g "
                        "(%.0e of its mean variance) to the diagonal before the Cholesky", n, d, jitter, 10.0**p)
            return chol
    raise RuntimeError(f"streaming_class_statistics: Cholesky failed even with jitter {jitter:.3g} (n={n}, d={d})")


def _dense_cov_from_bank(bank: Any, c: int) -> torch.Tensor:
    """(d, d) float64 ``F_c F_c^T`` from a FactorBank (data (d, R), offsets (C+1,))."""
    data = torch.as_tensor(bank.data)
    off = torch.as_tensor(bank.offsets)
    f = data[:, int(off[c]):int(off[c + 1])].to(torch.float64)
    return f @ f.T


# --------------------------------------------------------------------------------------------
# Step 3: head and tail
# --------------------------------------------------------------------------------------------
def split_head_tail(
    counts: ArrayLike,
    head_threshold: int = 100,
    augment_below: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Support ("head") and augmented ("tail") classes, METHOD.md step 3 [ours].

    Args:
        counts: (C,) training counts n_c.
        head_threshold: head = classes with ``n_c > head_threshold`` (the "many" split).
        augment_below: augmented = classes with ``n_c < augment_below``; default ``n_max``.

    Returns:
        ``(head_ids, tail_ids)``: int64 tensors of class ids, sorted. The two sets may overlap
        (e.g. n_c = 299 with n_max = 500 is both a support class and augmented);
        :func:`find_support` keeps a class out of its own support set.

    Raises:
        UsageError (a ValueError): no class has more than ``head_threshold`` (``--head-threshold``)
            samples.
    """
    counts = torch.as_tensor(counts).to(torch.int64).cpu()
    n_max = int(counts.max())
    below = n_max if augment_below is None else int(augment_below)
    head = torch.nonzero(counts > head_threshold).flatten()
    tail = torch.nonzero(counts < below).flatten()
    if head.numel() == 0:
        raise UsageError(
            f"split_head_tail: no head class: --head-threshold {head_threshold} asks for more training samples "
            f"than the largest class has ({n_max}). Lower head_threshold (--head-threshold), e.g. to "
            f"{max(n_max // 2, 0)}."
        )
    log.info("head/tail split: %d head (n_c > %d) and %d augmented (n_c < %d) of %d classes",
             head.numel(), head_threshold, tail.numel(), below, counts.numel())
    return head, tail


def class_roles(
    counts: ArrayLike,
    head_threshold: int,
    n_max: int,
    generate: bool,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """How each class reaches ``n_max`` in a stage-two epoch, METHOD.md step 6 [paper].

    Returns ``(head_ids, tail_ids, resample_ids)``: the support (head) classes
    (:func:`split_head_tail`); the classes topped up with generated samples (below ``n_max``
    and not head; none when ``generate`` is False, as in cRT); the classes topped up by
    resampling their real features (the rest of those below ``n_max``). int64 tensors and a
    list of ints, sorted.
    """
    head_ids, below = split_head_tail(counts, head_threshold, n_max)
    head_set = set(head_ids.tolist())
    if generate:
        tail_ids = torch.as_tensor([c for c in below.tolist() if c not in head_set], dtype=torch.int64)
    else:
        tail_ids = torch.zeros(0, dtype=torch.int64)
    tail_set = set(tail_ids.tolist())
    return head_ids, tail_ids, [c for c in below.tolist() if c not in tail_set]


# --------------------------------------------------------------------------------------------
# Step 4: support set (k nearest head-class means)
# --------------------------------------------------------------------------------------------
_LOGGED_BACKENDS: set = set()
_GPU_RESOURCES = None
FAISS_GPU_ENV = "GLAG_FAISS_GPU"


def _log_backend_once(name: str) -> None:
    if name not in _LOGGED_BACKENDS:
        _LOGGED_BACKENDS.add(name)
        log.info("find_support: FAISS backend %s", name)


def _to_numpy_f32(a: ArrayLike) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    return np.ascontiguousarray(a, dtype=np.float32)


def _to_numpy_i64(a: ArrayLike) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.int64)


def _check_support_args(queries, head_means, head_ids, k, query_labels):
    if queries.ndim != 2 or head_means.ndim != 2 or head_means.shape[1] != queries.shape[1] \
            or head_ids.shape != (head_means.shape[0],):
        raise ValueError(
            f"find_support: expected queries (m, d), head_means (h, d), head_ids (h,); got "
            f"{tuple(queries.shape)}, {tuple(head_means.shape)}, {tuple(head_ids.shape)}"
        )
    m, _ = queries.shape
    h = head_means.shape[0]
    if len(np.unique(head_ids)) != h:
        raise ValueError("find_support: head_ids has repeated class ids; give one mean per head class "
                         "(a class's own hits could not all be excluded, nor k distinct classes found)")
    for name, a in (("queries", queries), ("head_means", head_means)):
        row = first_nonfinite_row(a)
        if row is not None:
            raise ValueError(f"find_support: {name} row {row} is NaN or inf; the features must be finite "
                             f"(check the feature file and the input of the Tukey transform)")
    if query_labels is not None and query_labels.shape != (m,):
        raise ValueError(f"find_support: query_labels must be ({m},), got {query_labels.shape}")
    own_possible = query_labels is not None and bool(np.isin(query_labels, head_ids).any())
    avail = h - 1 if own_possible else h
    if not 1 <= k <= avail:
        raise ValueError(
            f"find_support: k={k} support classes requested but only {avail} are available "
            f"({h} head classes{', minus the query' + chr(39) + 's own class' if own_possible else ''}). "
            f"Lower k or the head threshold."
        )
    return own_possible


def _drop_own(ids: np.ndarray, dist: np.ndarray, query_labels, k: int):
    """Keep, per row, the first k results whose class is not the query's own class."""
    if query_labels is None:
        return ids[:, :k], dist[:, :k]
    own = ids == query_labels[:, None]
    # stable sort on the boolean keeps the distance order among the non-own entries
    order = np.argsort(own, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(ids, order, 1), np.take_along_axis(dist, order, 1)


def find_support(
    queries: ArrayLike,
    head_means: ArrayLike,
    head_ids: ArrayLike,
    k: int,
    query_labels: Optional[ArrayLike],
    use_gpu: Optional[bool] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """k nearest head-class means of each tail sample, METHOD.md step 4 [paper], with FAISS.

    Exact search (``IndexFlatL2``) by squared L2 distance from the query to each head mean.
    A query's own class is never in its support set (k + 1 are searched and it is dropped).

    Backend: a FAISS GPU index when ``use_gpu`` is True, or when it is None and faiss was
    built with GPU support and sees a GPU; otherwise CPU. The environment variable
    ``GLAG_FAISS_GPU=0/1`` overrides the automatic choice (``use_gpu`` overrides both).
    The choice is logged once.

    Args:
        queries: (m, d) float32, Tukey-space tail samples x~.
        head_means: (h, d) float32, means of the head (support-candidate) classes.
        head_ids: (h,) int64, the class id of each row of ``head_means``.
        k: support-set size (paper: 2 or 3).
        query_labels: (m,) int64 class of each query, or None to exclude nothing.
        use_gpu: force the backend (see above).

    Returns:
        ``(support, dist2)``: (m, k) int64 class ids and (m, k) float32 squared L2 distances,
        nearest first, on the device of ``queries`` (CPU for numpy input). FAISS float32 rounding can give tiny negative
        distances; they are clamped to 0.
    """
    try:
        import faiss  # lazy: heavy and optional in the GPU flavour
    except ImportError as e:
        raise ImportError(
            f"find_support needs FAISS ({e}). Install it with `pip install faiss-cpu` "
            f"(or `pip install -e .[gpu]` for faiss-gpu); find_support_bruteforce works without."
        ) from e
    q = _to_numpy_f32(queries)
    hm = _to_numpy_f32(head_means)
    hid = _to_numpy_i64(head_ids)
    ql = None if query_labels is None else _to_numpy_i64(query_labels)
    own_possible = _check_support_args(q, hm, hid, k, ql)
    k_search = min(k + 1, hm.shape[0]) if own_possible else k

    gpu_ok = faiss.get_num_gpus() > 0 and hasattr(faiss, "StandardGpuResources")
    if use_gpu is None:
        env = os.environ.get(FAISS_GPU_ENV, "").strip()
        use_gpu = gpu_ok if env == "" else env not in ("0", "false", "False", "no")
    if use_gpu and not gpu_ok:
        raise RuntimeError(
            f"find_support: a GPU FAISS index was requested (use_gpu=True or {FAISS_GPU_ENV}=1) "
            f"but this faiss build sees no GPU (get_num_gpus()={faiss.get_num_gpus()}). "
            f"Install faiss-gpu or use the CPU index ({FAISS_GPU_ENV}=0)."
        )
    d = q.shape[1]
    if use_gpu:
        global _GPU_RESOURCES
        if _GPU_RESOURCES is None:
            _GPU_RESOURCES = faiss.StandardGpuResources()
        index = faiss.GpuIndexFlatL2(_GPU_RESOURCES, d)
        _log_backend_once("GpuIndexFlatL2")
    else:
        index = faiss.IndexFlatL2(d)
        _log_backend_once("IndexFlatL2 (CPU)")
    index.add(hm)
    dist, pos = index.search(q, k_search)
    if (pos < 0).any():  # cannot happen for a flat index with k_search <= h; guard anyway
        raise RuntimeError("find_support: FAISS returned missing neighbours (-1)")
    ids, dist = _drop_own(hid[pos], dist, ql, k)
    device = queries.device if isinstance(queries, torch.Tensor) else "cpu"
    return (torch.from_numpy(np.ascontiguousarray(ids)).to(device),
            torch.from_numpy(np.ascontiguousarray(np.maximum(dist, 0.0), dtype=np.float32)).to(device))


def find_support_bruteforce(
    queries: ArrayLike,
    head_means: ArrayLike,
    head_ids: ArrayLike,
    k: int,
    query_labels: Optional[ArrayLike],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference (test oracle) for :func:`find_support`: explicit float64 distances, no FAISS.

    Same arguments and returns; memory is O(m * h), so use it on small problems.
    """
    q = torch.as_tensor(_to_numpy_f32(queries), dtype=torch.float64)
    hm = torch.as_tensor(_to_numpy_f32(head_means), dtype=torch.float64)
    hid = _to_numpy_i64(head_ids)
    ql = None if query_labels is None else _to_numpy_i64(query_labels)
    _check_support_args(q.numpy(), hm.numpy(), hid, k, ql)
    d2 = ((q[:, None, :] - hm[None, :, :]) ** 2).sum(-1)  # (m, h), explicit on purpose
    hid_t = torch.from_numpy(hid)
    if ql is not None:
        d2 = d2.masked_fill(hid_t[None, :] == torch.from_numpy(ql)[:, None], float("inf"))
    dist, pos = torch.topk(d2, k, dim=1, largest=False, sorted=True)
    device = queries.device if isinstance(queries, torch.Tensor) else "cpu"
    return hid_t[pos].to(device), dist.to(torch.float32).to(device)


# --------------------------------------------------------------------------------------------
# Step 5: weights, calibrated mean, (dense oracle) calibrated covariance
# --------------------------------------------------------------------------------------------
WEIGHT_MODES = ("size_over_distance", "uniform")  # support_weights' modes (--weights)


def support_weights(
    dist2: ArrayLike,
    support: ArrayLike,
    counts: ArrayLike,
    mode: str = "size_over_distance",
    eps: float = 1e-6,
) -> torch.Tensor:
    """Weights w_i of the support classes, METHOD.md step 5; rows sum to 1.

    * ``"size_over_distance"`` [ours, default]: ``w_i ∝ n_i / d_i``, d_i the squared L2
      distance from the query to mu_i (the paper [paper] only says closer and larger classes
      weigh more).
    * ``"uniform"``: ``w_i = 1/k`` (with ``omega = dc_omega(k)`` this is DC).

    Zero distance guard: d_i is clamped from below at ``eps * max_j d_j`` of its row (a
    relative floor, so the weights stay invariant to the feature scale, as the unguarded
    formula is); a query sitting on a head mean then gives that class almost all the weight,
    the limit of the formula. A row whose distances are all 0 gets ``w_i ∝ n_i``.

    Args:
        dist2: (m, k) float32 squared distances (from :func:`find_support`).
        support: (m, k) int64 class ids.
        counts: (C,) int64 training counts.
        mode: see above.
        eps: relative floor of the distances.

    Returns:
        (m, k) float32 tensor.
    """
    support = torch.as_tensor(support).long()
    if support.ndim != 2 or support.shape[1] == 0:
        raise ValueError(f"support_weights: support must be (m, k) with k >= 1 head classes a row, got "
                         f"{tuple(support.shape)}")
    m, k = support.shape
    if mode == "uniform":
        if tuple(torch.as_tensor(dist2).shape) != (m, k):
            raise ValueError(f"support_weights: dist2 {tuple(torch.as_tensor(dist2).shape)} and support "
                             f"{(m, k)} differ")
        return torch.full((m, k), 1.0 / k, dtype=torch.float32, device=support.device)
    if mode not in WEIGHT_MODES:
        raise ValueError(f"support_weights: mode must be one of {WEIGHT_MODES}, got {mode!r}")
    d = torch.as_tensor(dist2, device=support.device).to(torch.float64)
    if d.shape != support.shape:
        raise ValueError(f"support_weights: dist2 {tuple(d.shape)} and support {tuple(support.shape)} differ")
    if (d < 0).any() or not torch.isfinite(d).all():
        raise ValueError("support_weights: distances must be finite and >= 0")
    n = torch.as_tensor(counts, device=support.device).to(torch.float64)[support]
    if not bool((n >= 1).all()):
        raise ValueError("support_weights: every support class needs a training count >= 1 (its weight is "
                         f"n_i / d_i), got counts from {n.min().item():g} for the classes in support")
    floor = eps * d.max(dim=1, keepdim=True).values
    d = torch.where(floor > 0, torch.maximum(d, floor), torch.ones_like(d))
    w = n / d
    return (w / w.sum(dim=1, keepdim=True)).to(torch.float32)


def calibrate_means(
    x_tail: torch.Tensor,
    support: torch.Tensor,
    weights: torch.Tensor,
    means: torch.Tensor,
    omega: Union[float, torch.Tensor],
) -> torch.Tensor:
    """Calibrated means, METHOD.md step 5: ``mu' = (1 - omega) x~ + omega * sum_i w_i mu_i``.

    Args:
        x_tail: (m, d) float32, the real tail samples x~.
        support: (m, k) int64 support class ids.
        weights: (m, k) float32 w_i (rows sum to 1).
        means: (C, d) float32 class means, indexed by class id.
        omega: scalar or (m,) per-row omega (``AdaptiveOmega.omega_for(labels)``).

    Returns:
        (m, d) tensor, dtype of ``x_tail`` (float32 for an integer ``x_tail``). Memory is O(m d): the weighted mean is
        accumulated one support slot at a time, never as an (m, k, d) gather.
    """
    x_tail = torch.as_tensor(x_tail)
    if not x_tail.is_floating_point():  # weights and omega would be truncated to integers
        x_tail = x_tail.to(torch.float32)
    support = torch.as_tensor(support, device=x_tail.device).long()
    weights = torch.as_tensor(weights, device=x_tail.device).to(x_tail.dtype)
    means = torch.as_tensor(means, device=x_tail.device).to(x_tail.dtype)
    if support.ndim != 2 or x_tail.ndim != 2 or means.ndim != 2:
        raise ValueError(f"calibrate_means: x {tuple(x_tail.shape)}, support {tuple(support.shape)} and means "
                         f"{tuple(means.shape)} must be 2-D: (m, d), (m, k), (C, d)")
    m, k = support.shape
    if x_tail.shape[0] != m or weights.shape != (m, k) or means.shape[1] != x_tail.shape[1]:
        raise ValueError(
            f"calibrate_means: shapes x {tuple(x_tail.shape)}, support {tuple(support.shape)}, "
            f"weights {tuple(weights.shape)}, means {tuple(means.shape)} do not match"
        )
    if k == 0 and m:
        raise ValueError("calibrate_means: support has k = 0 columns; each row needs k >= 1 head classes "
                         "to borrow from (--k)")
    omega = torch.as_tensor(omega, device=x_tail.device).to(x_tail.dtype)
    if omega.ndim > 1 or (omega.ndim == 1 and omega.shape[0] != m):
        raise ValueError(f"calibrate_means: omega must be a scalar or ({m},), got {tuple(omega.shape)}")
    if omega.numel() and not ((omega >= 0) & (omega <= 1)).all():
        raise ValueError("calibrate_means: omega must lie in [0, 1] (it mixes x~ with the borrowed mean), got "
                         f"values from {omega.min().item():g} to {omega.max().item():g}")
    if omega.ndim == 1:
        omega = omega[:, None]
    borrowed = torch.zeros_like(x_tail)
    for j in range(k):
        borrowed.addcmul_(weights[:, j:j + 1], means[support[:, j]])
    return (1.0 - omega) * x_tail + omega * borrowed


def calibrated_covariance(
    support_row: ArrayLike,
    weights_row: ArrayLike,
    bank: Any,
    alpha: float,
    mode: str,
    d: int,
) -> torch.Tensor:
    """Dense ``Sigma' = sum_i w_i Sigma_i + alpha_disp`` for ONE row; METHOD.md step 5.

    Test oracle only (O(d^2) memory per row); the sampler never forms it.

    Args:
        support_row: (k,) int64 support class ids.
        weights_row: (k,) weights w_i.
        bank: a ``glag.sampling.FactorBank`` (``Sigma_i = F_i F_i^T``), or a dense (C, d, d)
            array / tensor of class covariances.
        alpha: the dispersion alpha_disp (paper: 0.0 or 0.1).
        mode: ``"all"`` adds alpha to every entry (DC's ``cov + alpha``; this function's
            default); ``"diag"`` adds ``alpha * I`` (stage two's default, ``--alpha-mode``).
        d: feature dimension.

    Returns:
        (d, d) float64 tensor.
    """
    if mode not in ("all", "diag"):
        raise ValueError(f"calibrated_covariance: mode must be 'all' or 'diag', got {mode!r}")
    support_row = [int(s) for s in torch.as_tensor(support_row).flatten()]
    weights_row = torch.as_tensor(weights_row, dtype=torch.float64).flatten()
    dense = None if hasattr(bank, "offsets") else torch.as_tensor(bank, dtype=torch.float64)
    cov = torch.zeros(d, d, dtype=torch.float64)
    for c, w in zip(support_row, weights_row):
        cov += w * (_dense_cov_from_bank(bank, c) if dense is None else dense[c])
    cov += alpha * (torch.ones(d, d, dtype=torch.float64) if mode == "all"
                    else torch.eye(d, dtype=torch.float64))
    return cov


# --------------------------------------------------------------------------------------------
# Step 6: how many samples to generate from each real tail sample
# --------------------------------------------------------------------------------------------
def allocate_counts(
    labels: ArrayLike,
    target_per_class: Union[int, ArrayLike],
    class_counts: ArrayLike,
    rng: np.random.Generator,
) -> np.ndarray:
    """Samples to generate from each real tail sample, METHOD.md step 6 [ours].

    Class c needs ``q_c = max(target_c - n_c, 0)`` generated samples. Its quota is spread
    over its real samples present in ``labels`` (say r_c of them, normally r_c = n_c):
    ``q_c // r_c`` each, plus one more for ``q_c % r_c`` distinct samples drawn from ``rng``.

    Args:
        labels: (m,) int64 class of each real tail sample (the rows of the calibrated means).
        target_per_class: int (n_max, [ours] default) or (C,) per-class targets.
        class_counts: (C,) int64 training counts n_c.
        rng: numpy Generator; call it with the feature-sampling stream so an epoch's
            allocation is reproducible.

    Returns:
        (m,) int64 numpy array; per class it sums to exactly ``q_c``.
    """
    labels = _to_numpy_i64(labels)
    n = _to_numpy_i64(class_counts)
    if labels.ndim != 1 or (labels.size and (labels.min() < 0 or labels.max() >= n.shape[0])):
        raise ValueError(f"allocate_counts: labels must be (m,) class ids in [0, {n.shape[0]}), got shape "
                         f"{labels.shape}" + (f", range [{labels.min()}, {labels.max()}]" if labels.size else ""))
    target = np.broadcast_to(_to_numpy_i64(target_per_class), n.shape)
    quota = np.maximum(target - n, 0)
    r = np.bincount(labels, minlength=n.shape[0])  # real samples of each class in `labels`
    per = np.zeros_like(r)
    rem = np.zeros_like(r)
    has = r > 0
    per[has] = quota[has] // r[has]
    rem[has] = quota[has] % r[has]
    missing = np.nonzero((quota > 0) & ~has)[0]
    if missing.size:
        log.debug("allocate_counts: %d classes with a quota have no sample in labels", missing.size)
    # Rank the samples of each class by a random key; the rem_c lowest ranks get one more.
    # One vectorised draw for all classes, deterministic given rng.
    key = rng.random(labels.shape[0])
    order = np.lexsort((key, labels))
    first = np.searchsorted(labels[order], labels[order], side="left")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.shape[0]) - first
    return (per[labels] + (rank < rem[labels])).astype(np.int64)


# --------------------------------------------------------------------------------------------
# Step 7: adaptive omega
# --------------------------------------------------------------------------------------------
def dc_omega(k: int) -> float:
    """The omega that makes step 5 Free-Lunch DC's mean (with uniform weights): k / (k + 1)."""
    return k / (k + 1)


class AdaptiveOmega:
    """Per-class confidence omega_c in the calibration, METHOD.md step 7.

    [paper]: init 0.6 (the ablation text says 0.4: ``init``); after each stage-two epoch,
    omega_c goes up when class c's validation accuracy rose, down when it fell.
    [ours]: ``step`` 0.05, clipped to ``[lo, hi] = [0, 1]`` (0 is reachable exactly). "Rose"
    is measured against a configurable reference, since with ~20 validation images a class one
    image moves the accuracy by 5 %:

    * ``"best"`` (default): the best accuracy so far;
    * ``"ema"``: exponential moving average, ``ref <- momentum * ref + (1 - momentum) * acc``;
    * ``"last"``: the previous epoch's accuracy (the paper's literal reading).

    ``acc > ref + margin`` -> omega += step; ``acc < ref - margin`` -> omega -= step; else
    unchanged. The first :meth:`update` only sets the reference. A NaN accuracy (class with no
    validation image) leaves that class's omega and reference untouched. Only the augmented
    (tail) classes are updated; the others keep ``init``.

    Attributes:
        omega: (C,) float64 numpy array, current omega.
        history: list of (C,) arrays; ``history[0]`` is the initial omega and ``history[t]``
            the omega after the t-th update (i.e. used in epoch t).
    """

    REFERENCES = ("best", "ema", "last")

    def __init__(
        self,
        num_classes: int,
        tail_ids: ArrayLike,
        init: float = 0.6,
        step: float = 0.05,
        lo: float = 0.0,
        hi: float = 1.0,
        reference: str = "best",
        momentum: float = 0.5,
        margin: float = 0.0,
    ):
        if reference not in self.REFERENCES:
            raise ValueError(f"AdaptiveOmega: reference must be one of {self.REFERENCES}, got {reference!r}")
        if not lo <= init <= hi:
            raise ValueError(f"AdaptiveOmega: init={init} outside [{lo}, {hi}]")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"AdaptiveOmega: momentum must be in [0, 1), got {momentum}")
        self.num_classes = int(num_classes)
        self.tail_ids = np.unique(_to_numpy_i64(tail_ids))
        if self.tail_ids.size and (self.tail_ids.min() < 0 or self.tail_ids.max() >= num_classes):
            raise ValueError("AdaptiveOmega: tail_ids out of range")
        self.tail_mask = np.zeros(self.num_classes, dtype=bool)
        self.tail_mask[self.tail_ids] = True
        self.init, self.step, self.lo, self.hi = float(init), float(step), float(lo), float(hi)
        self.reference, self.momentum, self.margin = reference, float(momentum), float(margin)
        self.omega = np.full(self.num_classes, self.init, dtype=np.float64)
        self.ref = np.full(self.num_classes, np.nan, dtype=np.float64)
        self.history: list[np.ndarray] = [self.omega.copy()]

    def update(self, val_acc_per_class: ArrayLike) -> dict:
        """Update omega from this epoch's per-class validation accuracy ((C,), e.g. in [0, 1]).

        Returns ``{"up": n, "down": n, "mean_omega": mean over tail classes}`` for logging.
        """
        acc = np.asarray(val_acc_per_class, dtype=np.float64).reshape(-1)
        if acc.shape[0] != self.num_classes:
            raise ValueError(f"AdaptiveOmega.update: expected ({self.num_classes},) accuracies, got {acc.shape}")
        valid = self.tail_mask & np.isfinite(acc)
        has_ref = valid & np.isfinite(self.ref)
        up = has_ref & (acc > self.ref + self.margin)
        down = has_ref & (acc < self.ref - self.margin)
        self.omega[up] += self.step
        self.omega[down] -= self.step
        # round away float drift so that e.g. 0.6 - 12 * 0.05 is exactly 0, then clip
        self.omega = np.clip(np.round(self.omega, 10), self.lo, self.hi)

        first = valid & ~has_ref
        self.ref[first] = acc[first]
        if self.reference == "best":
            self.ref[has_ref] = np.maximum(self.ref[has_ref], acc[has_ref])
        elif self.reference == "ema":
            self.ref[has_ref] = self.momentum * self.ref[has_ref] + (1 - self.momentum) * acc[has_ref]
        else:  # "last"
            self.ref[has_ref] = acc[has_ref]
        self.history.append(self.omega.copy())
        mean = float(self.omega[self.tail_mask].mean()) if self.tail_mask.any() else float("nan")
        log.debug("adaptive omega: %d up, %d down, mean %.3f", int(up.sum()), int(down.sum()), mean)
        return {"up": int(up.sum()), "down": int(down.sum()), "mean_omega": mean}

    def omega_for(self, labels: ArrayLike) -> torch.Tensor:
        """(m,) float32 tensor of omega_c for each label (on the labels' device if a tensor)."""
        device = labels.device if isinstance(labels, torch.Tensor) else None
        out = torch.from_numpy(self.omega[_to_numpy_i64(labels)].astype(np.float32))
        return out if device is None else out.to(device)

    def state_dict(self) -> dict:
        """Plain dict of tensors and Python values (loads with ``torch.load(weights_only=True)``)."""
        return {
            "omega": torch.from_numpy(self.omega.copy()),
            "ref": torch.from_numpy(self.ref.copy()),
            "history": torch.from_numpy(np.stack(self.history)),
            "tail_ids": torch.from_numpy(self.tail_ids.copy()),
            "config": {"num_classes": self.num_classes, "init": self.init, "step": self.step,
                       "lo": self.lo, "hi": self.hi, "reference": self.reference,
                       "momentum": self.momentum, "margin": self.margin},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`; the class count and tail set must match."""
        cfg = state["config"]
        tail = np.asarray(torch.as_tensor(state["tail_ids"]).numpy(), dtype=np.int64)
        if cfg["num_classes"] != self.num_classes or not np.array_equal(tail, self.tail_ids):
            raise ValueError("AdaptiveOmega.load_state_dict: num_classes or tail_ids differ from this run")
        for key in ("init", "step", "lo", "hi", "reference", "momentum", "margin"):
            if cfg[key] != getattr(self, key):
                log.warning("AdaptiveOmega: resuming with %s=%r (state has %r)", key, getattr(self, key), cfg[key])
        self.omega = torch.as_tensor(state["omega"]).numpy().astype(np.float64).copy()
        self.ref = torch.as_tensor(state["ref"]).numpy().astype(np.float64).copy()
        self.history = [h.copy() for h in torch.as_tensor(state["history"]).numpy().astype(np.float64)]
