"""Calibrated Gaussian sampling, the AFG generator's front end: one API, three backends.

METHOD.md, "Sampling without a Cholesky per sample": each support class j carries a factor
``F_j`` (d x r_j) with ``F_j F_j^T = Sigma_j``, and a sample of seed row i is

    x = mu'_i + sum_slot sqrt(w_i,slot) F_{support[i,slot]} z_slot + e,   z_slot ~ N(0, I),
    e = sqrt(alpha) z0 1   (mode "all")   or   sqrt(alpha) z   (mode "diag"),

whose covariance is exactly ``Sigma' = sum_i w_i Sigma_i + alpha (1 1^T or I)`` (METHOD.md,
Calibration). No m x d x d tensor is built and nothing is factorised per sample.

Backends (``glag.kernels``), tried in the order cuda -> numba -> torch; ``GLAG_SAMPLER_BACKEND``
(or a tool's ``--backend``) forces one, and the choice and any fallback are logged once:

* ``cuda``  — CUDA C (``calibrated_sampler.cu``) through CuPy, fused RNG + multiply-accumulate;
* ``numba`` — CPU, Philox/Box–Muller vectorised in Numba, the products in BLAS sgemm;
* ``torch`` — the plain reference (:mod:`glag.kernels.reference`), the test oracle.

All three draw the same normals (Philox4x32-10 keyed by seed, counter (sample, slot,
component // 4)), so a seed gives the same samples on every backend, to float rounding.
"""
from __future__ import annotations

import importlib
import logging
import math
import numbers
import os
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

BACKENDS = ("cuda", "numba", "torch")  # the order of preference
ENV_BACKEND = "GLAG_SAMPLER_BACKEND"
MODES = ("all", "diag")

__all__ = [
    "FactorBank",
    "class_factor",
    "sample_calibrated",
    "available_backends",
    "resolve_backend",
    "BACKENDS",
    "ENV_BACKEND",
]

_logged: set[str] = set()
_availability: dict[str, tuple[bool, str]] = {}


def _log_once(level: int, msg: str, *args) -> None:
    key = msg % args if args else msg
    if key not in _logged:
        _logged.add(key)
        log.log(level, msg, *args)


# ---------------------------------------------------------------- factors
@dataclass
class FactorBank:
    """All support-class factors packed side by side; built once per stage-two run.

    Attributes:
        data: (d, R) float32, ``R = sum_j r_j``; ``F_j = data[:, offsets[j]:offsets[j+1]]``
            satisfies ``F_j F_j^T = Sigma_j`` (METHOD.md, low-rank sampling).
        offsets: (C+1,) int64, on the CPU. ``r_j`` may be 0 (a class of one sample).

    The kernels read copies of :attr:`data` made once per device (transposed, padded) and kept
    while torch sees ``data`` unchanged (same storage, same version counter, which every
    in-place torch op bumps). A write torch cannot see, through ``data.numpy()`` or another
    DLPack view, leaves those copies stale: call :meth:`clear_cache` after it.
    """

    data: torch.Tensor
    offsets: torch.Tensor
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if self.data.dim() != 2:
            raise ValueError(f"FactorBank.data must be (d, R), got shape {tuple(self.data.shape)}")
        self.offsets = torch.as_tensor(self.offsets, dtype=torch.int64).cpu()
        if self.offsets.dim() != 1 or self.offsets.numel() < 1 or int(self.offsets[0]) != 0:
            raise ValueError("FactorBank.offsets must be a 1-D (C+1,) int64 tensor starting at 0")
        if int(self.offsets[-1]) != self.data.shape[1] or bool((self.offsets.diff() < 0).any()):
            raise ValueError(
                f"FactorBank.offsets must be non-decreasing and end at R = {self.data.shape[1]}"
            )

    @classmethod
    def from_factors(cls, factors: list[torch.Tensor]) -> "FactorBank":
        """Pack ``factors[j]`` (d, r_j), e.g. from :func:`class_factor`, into one bank."""
        if len(factors) == 0:
            raise ValueError("FactorBank.from_factors needs at least one factor")
        d = factors[0].shape[0]
        for j, f in enumerate(factors):
            if f.dim() != 2 or f.shape[0] != d:
                raise ValueError(f"factor {j} has shape {tuple(f.shape)}; expected ({d}, r_j)")
        device = factors[0].device
        data = torch.cat([f.detach().to(device=device, dtype=torch.float32) for f in factors], dim=1)
        ranks = torch.tensor([f.shape[1] for f in factors], dtype=torch.int64)
        offsets = torch.zeros(len(factors) + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(ranks, 0)
        return cls(data.contiguous(), offsets)

    @property
    def dim(self) -> int:
        """Feature dimension d."""
        return self.data.shape[0]

    @property
    def num_classes(self) -> int:
        """Number of classes C in the bank."""
        return self.offsets.numel() - 1

    @property
    def ranks(self) -> torch.Tensor:
        """(C,) int64: r_j, the number of columns of each factor."""
        return self.offsets.diff()

    def factor(self, j: int) -> torch.Tensor:
        """``F_j`` (d, r_j), a view into :attr:`data`."""
        return self.data[:, int(self.offsets[j]):int(self.offsets[j + 1])]

    def clear_cache(self) -> None:
        """Drop the per-device copies of :attr:`data` (after writing it through numpy or DLPack)."""
        self._cache.clear()

    def _cached(self, kind: str, device: torch.device, make):
        """``make()``, kept per (kind, device) while :attr:`data` is unchanged (same storage and
        version); a stale entry of that kind and device is dropped when made again."""
        key = (kind, str(device), self.data.data_ptr(), self.data._version)
        hit = self._cache.get(key)
        if hit is None:
            for old in [k_ for k_ in self._cache if k_[:2] == key[:2]]:
                del self._cache[old]  # data changed: drop the stale copy
            hit = self._cache[key] = make()
        return hit

    def transposed_padded(self, device: torch.device | str, multiple: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
        """(R', d) float32 ``data^T`` with each block padded by zero rows to a multiple, and its
        (C+1,) int64 offsets (CPU); cached. The numba kernel draws whole Philox blocks of 4."""
        device = torch.device(device)

        def make():
            ranks = self.ranks
            padded = (ranks + multiple - 1) // multiple * multiple
            offsets = torch.zeros_like(self.offsets)
            offsets[1:] = torch.cumsum(padded, 0)
            dest = (torch.repeat_interleave(offsets[:-1] - self.offsets[:-1], ranks)
                    + torch.arange(int(self.offsets[-1])))
            out = torch.zeros((int(offsets[-1]), self.dim), dtype=torch.float32, device=device)
            out[dest.to(device)] = self.data.detach().to(device=device, dtype=torch.float32).t()
            return out, offsets

        return self._cached("T%d" % multiple, device, make)

    def offsets_on(self, device: torch.device | str) -> torch.Tensor:
        """(C+1,) int64 :attr:`offsets` on ``device``, cached (the GPU kernels read them there)."""
        device = torch.device(device)
        if device.type == "cpu":
            return self.offsets
        key = ("offsets", str(device))
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = self.offsets.to(device)
        return hit

    def transposed(self, device: torch.device | str) -> torch.Tensor:
        """(R, d) float32 contiguous ``data^T`` on ``device`` (rows of ``F_j^T``), cached.

        The kernels read ``F_j^T`` row by row; made once per bank and device (memory R d).
        """
        device = torch.device(device)
        return self._cached("T", device,
                            lambda: self.data.detach().to(device=device, dtype=torch.float32).t().contiguous())

    def class_scales_on(self, device: torch.device | str) -> torch.Tensor:
        """(C,) float32 :func:`glag.kernels.cuda.class_scales` of this bank on ``device``, cached:
        the power of two each factor is scaled by in the tensor-core CUDA kernels (one pass over
        the bank, made once per bank and device rather than once a call)."""
        from .kernels.cuda import class_scales

        device = torch.device(device)
        return self._cached("S", device, lambda: class_scales(self.transposed(device), self.offsets_on(device)))


def class_factor(x: torch.Tensor) -> torch.Tensor:
    """A factor F of one class's unbiased covariance: ``F F^T = cov(x)`` (METHOD.md).

    Args:
        x: (n_c, d) real features of one class, already Tukey-transformed.
    Returns:
        float32 on ``x.device``:
        * ``(X - mu)^T / sqrt(n - 1)``, (d, n), when 1 < n <= d (exact, no decomposition);
        * the (d, d) lower Cholesky factor of the covariance when n > d (smaller), computed in
          float64, with a diagonal jitter only if the covariance is singular (logged);
        * (d, 0) when n == 1: one sample has no covariance to lend.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"class_factor needs a torch.Tensor, got {type(x).__name__} (torch.as_tensor(x) "
                        f"converts it)")
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"class_factor needs (n_c >= 1, d) features, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("class_factor: the features hold NaN or inf; a covariance needs finite features")
    n, d = x.shape
    if n == 1:
        return x.new_zeros((d, 0), dtype=torch.float32)
    xc = x.detach().to(torch.float64)
    xc = xc - xc.mean(dim=0, keepdim=True)
    if n <= d:
        return (xc.t() / math.sqrt(n - 1)).to(torch.float32).contiguous()
    cov = xc.t() @ xc / (n - 1)
    chol, info = torch.linalg.cholesky_ex(cov)
    if int(info) == 0:
        return chol.to(torch.float32).contiguous()
    # Singular (e.g. a feature that is always 0 after ReLU): add the smallest jitter that works.
    scale = float(cov.diagonal().mean().clamp_min(1e-30))
    eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
    for p in range(-10, 1):
        jitter = scale * 10.0**p
        chol, info = torch.linalg.cholesky_ex(cov + jitter * eye)
        if int(info) == 0:
            log.warning(
                "class_factor: covariance (n=%d, d=%d) is singular; added jitter %.3g "
                "(%.0e of its mean variance) to the diagonal before the Cholesky", n, d, jitter, 10.0**p,
            )
            return chol.to(torch.float32).contiguous()
    raise RuntimeError(f"class_factor: Cholesky failed even with jitter {jitter:.3g} (n={n}, d={d})")


# ---------------------------------------------------------------- backends
def _check(name: str) -> tuple[bool, str]:
    """(usable, reason) of one backend, probed once (imports are lazy)."""
    if name not in _availability:
        if name == "torch":
            res = (True, "always available")
        elif name == "numba":
            try:
                importlib.import_module("glag.kernels.cpu")  # imports numba

                res = (True, "numba importable")
            except Exception as exc:  # ImportError, or a broken numba/llvmlite install
                res = (False, f"numba backend not importable ({type(exc).__name__}: {exc})")
        elif name == "cuda":
            try:
                res = importlib.import_module("glag.kernels.cuda").is_available()
            except Exception as exc:
                res = (False, f"cuda backend not importable ({type(exc).__name__}: {exc})")
        else:
            raise ValueError(name)
        _availability[name] = res
    return _availability[name]


def available_backends() -> list[str]:
    """The backends usable here, in order of preference (a subset of cuda, numba, torch)."""
    return [b for b in BACKENDS if _check(b)[0]]


def resolve_backend(name: str | None = None) -> str:
    """The backend to use: ``name``, else ``$GLAG_SAMPLER_BACKEND``, else the first available.

    A requested backend that is not usable here falls back to the next usable one in the
    order cuda -> numba -> torch, with a warning; the choice is logged once (INFO).
    """
    raw = name or os.environ.get(ENV_BACKEND) or "auto"
    requested = raw.strip().lower()
    if requested not in BACKENDS + ("auto",):
        raise ValueError(
            f"unknown sampler backend {raw!r} (from {'argument' if name else ENV_BACKEND}); "
            f"choose one of {', '.join(BACKENDS)} or auto"
        )
    avail = available_backends()
    if requested == "auto":
        chosen = avail[0]
        _log_once(logging.INFO, "calibrated sampler backend: %s (auto; available: %s)", chosen, ", ".join(avail))
        return chosen
    if requested in avail:
        _log_once(logging.INFO, "calibrated sampler backend: %s (requested)", requested)
        return requested
    chosen = next(b for b in BACKENDS[BACKENDS.index(requested) + 1:] if b in avail)
    _log_once(
        logging.WARNING, "calibrated sampler backend %r unavailable: %s; falling back to %r",
        requested, _check(requested)[1], chosen,
    )
    return chosen


# ---------------------------------------------------------------- the sampler
def _validate(bank, mu, support, weights, counts, labels, alpha, mode, seed) -> int:
    """Check the arguments of :func:`sample_calibrated` (clear errors); returns N = counts.sum()."""
    if not isinstance(bank, FactorBank):
        raise TypeError(f"bank must be a FactorBank (FactorBank.from_factors), got {type(bank).__name__}")
    for name, t in (("mu", mu), ("support", support), ("weights", weights), ("counts", counts), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__} (torch.as_tensor({name}) "
                            f"converts it)")
    for name, t in (("support", support), ("counts", counts), ("labels", labels)):
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{name} must hold integers (int64), got {t.dtype}: a float would be truncated")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not (alpha >= 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    if not 0 <= int(seed) < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    if mu.dim() != 2:
        raise ValueError(f"mu must be (m, d), got shape {tuple(mu.shape)}")
    m, d = mu.shape
    if bank.dim != d:
        raise ValueError(f"bank has d = {bank.dim} but mu has d = {d}")
    if support.dim() != 2 or support.shape[0] != m:
        raise ValueError(f"support must be (m={m}, k), got shape {tuple(support.shape)}")
    if tuple(weights.shape) != tuple(support.shape):
        raise ValueError(f"weights {tuple(weights.shape)} must match support {tuple(support.shape)}")
    if tuple(counts.shape) != (m,) or tuple(labels.shape) != (m,):
        raise ValueError(f"counts and labels must be (m={m},), got {tuple(counts.shape)}, {tuple(labels.shape)}")
    if not m:
        return 0
    # the checks on values, and N: a few reductions and two small device-to-host transfers (on a
    # GPU the first waits for the queue, the second finds it empty)
    counts = counts.to(torch.int64)
    ints = [counts.min(), counts.sum()]
    if support.numel():
        ints += [t.to(torch.int64) for t in torch.aminmax(support)]
    stats = torch.stack([t.to(counts.device) for t in ints]).tolist()
    if stats[0] < 0:
        raise ValueError("counts must be >= 0")
    if support.numel():
        lo, hi = stats[2:]
        if lo < 0 or hi >= bank.num_classes:
            raise ValueError(f"support ids must be in [0, {bank.num_classes}), got [{lo}, {hi}]")
        w_lo, w_hi = torch.stack(torch.aminmax(weights)).tolist()  # a NaN makes both NaN
        if not (w_lo >= 0 and math.isfinite(w_hi)):
            raise ValueError("weights must be finite and >= 0 (the sampler uses sqrt(w))")
    return stats[1]


def sample_calibrated(
    bank: FactorBank,
    mu: torch.Tensor,
    support: torch.Tensor,
    weights: torch.Tensor,
    counts: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = 0.0,
    mode: str = "all",
    seed: int = 0,
    backend: str | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw calibrated samples ``x ~ N(mu'_i, Sigma'_i)`` for every seed row i (METHOD.md 5-6).

    ``x_s = mu'_i + sum_slot sqrt(w_slot) F_{support[i,slot]} z_{s,slot} + e_s``, with
    ``e_s = sqrt(alpha) z0 1`` (mode "all": one scalar normal on every component, DC's
    ``Sigma + alpha``) or ``sqrt(alpha) z`` (mode "diag": ``Sigma + alpha I``).

    Args:
        bank: the per-class factors (:class:`FactorBank`).
        mu: (m, d) float32, calibrated means mu'.
        support: (m, k) int64, class ids into the bank.
        weights: (m, k) float32, w_i >= 0 (the sampler scales ``F_i z_i`` by ``sqrt(w_i)``).
        counts: (m,) int64, samples to draw for each seed row.
        labels: (m,) int64, label of each seed row.
        alpha: dispersion ``alpha >= 0``.   mode: "all" or "diag".
        seed: 64-bit RNG seed; with the sample index it keys every normal (Philox4x32-10), so
            the same call gives the same samples on every backend.
        backend: "cuda", "numba", "torch" or None (``$GLAG_SAMPLER_BACKEND``, else auto).
        out: optional (N, d) float32 C-contiguous tensor on ``mu``'s device to write x into
            (a slice of a bigger buffer is fine, if its rows are contiguous). Stage two samples
            straight into its epoch's feature matrix this way, and a caller that samples every
            epoch can reuse one buffer: no fresh N x d allocation whose pages the OS must map
            and zero on every call.
    Returns:
        x (N, d) float32 (``out`` itself when given) and y (N,) int64 on ``mu``'s device,
        N = counts.sum(); the rows of seed i are contiguous, in seed order. Peak extra memory
        O(N d + sum r_j d) (O(sum r_j d + N) with ``out``).
    """
    device = mu.device
    n_total = _validate(bank, mu, support, weights, counts, labels, alpha, mode, seed)
    m, d = mu.shape
    counts = counts.to(torch.int64)
    if n_total >= 2**32:
        raise ValueError(f"{n_total} samples in one call: the Philox sample counter is 32-bit; split the call")
    if out is not None:
        _check_out(out, n_total, d, device)
    name = resolve_backend(backend)
    y = torch.repeat_interleave(labels.to(device=device, dtype=torch.int64), counts.to(device), output_size=n_total)
    if n_total == 0:
        return (out if out is not None else torch.empty((0, d), dtype=torch.float32, device=device)), y
    args = dict(alpha=float(alpha), mode=mode, seed=int(seed))

    if name == "torch":
        x, _ = _run_reference(bank, mu, support, weights, counts, labels, **args)
        return (out.copy_(x) if out is not None else x), y

    if name == "numba":
        run_dev = torch.device("cpu")
    else:  # cuda: where the inputs are, or the current GPU for CPU inputs
        run_dev = device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    if run_dev != device:
        _log_once(logging.INFO, "sampler inputs on %s, backend %s runs on %s: copying in and out",
                  device, name, run_dev)

    def on(t, dtype):
        return t.detach().to(device=run_dev, dtype=dtype).contiguous()

    mu_r, sup_r = on(mu, torch.float32), on(support, torch.int64)
    w_r, cnt_r = on(weights, torch.float32), on(counts, torch.int64)
    # write straight into out where the backend runs on its device; else a buffer copied into it
    direct = out is not None and out.device == run_dev
    if name == "numba":
        from .kernels import cpu

        x = out if direct else torch.from_numpy(cpu.empty_output(n_total, d))

        bank4, offsets4 = bank.transposed_padded(run_dev, 4)
        cpu.sample_numba(
            bank4.numpy(), offsets4.numpy(), mu_r.numpy(), sup_r.numpy(), w_r.numpy(), cnt_r.numpy(),
            x.numpy(), **args,
        )
    else:
        from .kernels import cuda as cuda_backend

        x = out if direct else torch.empty((n_total, d), dtype=torch.float32, device=run_dev)

        cuda_backend.sample_cuda(bank.transposed(run_dev), bank.offsets_on(run_dev), mu_r, sup_r, w_r, cnt_r, x, **args,
                                 scales=lambda: bank.class_scales_on(run_dev))
    if out is not None:
        return (out if direct else out.copy_(x)), y
    return x.to(device), y


def _check_out(out: torch.Tensor, n_total: int, d: int, device: torch.device) -> None:
    """``out`` must be an (N, d) float32 tensor with contiguous rows on the inputs' device."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if tuple(out.shape) != (n_total, d):
        raise ValueError(f"out must be (N={n_total}, d={d}) (N = counts.sum()), got {tuple(out.shape)}")
    if out.dtype != torch.float32:
        raise ValueError(f"out must be float32, got {out.dtype}: allocate it with dtype=torch.float32")
    if out.device != device:
        raise ValueError(f"out is on {out.device} but mu is on {device}: allocate it on {device}")
    if not out.is_contiguous():
        raise ValueError(f"out must be C-contiguous (strides {out.stride()}): pass a row slice of a "
                         "contiguous buffer, not a column slice or a transpose")
    if out.requires_grad:
        raise ValueError("out must not require grad: the sampler writes it in place")


def _run_reference(bank, mu, support, weights, counts, labels, alpha, mode, seed):
    from .kernels import reference

    return reference.sample_reference(
        bank.data, bank.offsets, mu, support, weights, counts, labels, alpha=alpha, mode=mode, seed=seed,
    )
