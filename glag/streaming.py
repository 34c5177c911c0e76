"""Stage two in bounded memory: the data path used when the features do not fit ``--max-memory``.

DESIGN.md, "Scale": iNaturalist 2018 at d = 2048 is 437,513 x 2048 x 4 B = 3.6 GB of train
features, plus 14 GB of N x C teacher logits, and one GLAG epoch tops 8,142 classes up to 1,000
samples each (8.1 M samples, 67 GB if materialised). Stage two then runs like this:

* **Choice** (:func:`choose_data_path`): the in-memory path's peak is estimated from the file's
  shapes (train features and their Tukey copy, teacher logits, one materialised epoch, the
  factor bank, val/test); over the budget, the streaming path is taken and the reason logged.
* **One statistics pass** over ``/train`` (:func:`glag.afg.streaming_class_statistics`): class
  means (float64 sums), the covariance factors of the *head* classes only (the sampler only
  reads support classes, which are head classes), the labels, and the real rows of the tail
  (generated) classes, kept in memory as the seeds of generation and the FAISS queries
  (in float16 when float32 does not fit the budget: exact for a float16 file, else a relative
  rounding of 2^-11 of a seed, far below the generation noise).
* **Each epoch** (:class:`StreamingEpochBuilder`): the same composition as the in-memory
  :class:`glag.stage2.EpochBuilder` (every real row; ``n_max - n_c`` resampled rows of each
  head class below ``n_max``, drawn with the same RNG calls; ``n_max - n_c`` generated samples
  of each tail class, allocated over its real rows with :func:`glag.afg.allocate_counts`), so
  the epoch still holds ``C n_max`` samples, in another order. The train split is read in
  blocks of a few thousand rows, each made of HDF5-chunk-aligned granules taken in a seeded
  random order from all over the file (so a class-sorted file still mixes); a block carries its
  own real rows, the resampled copies of those rows, and a share of the epoch's generated
  samples proportional to its rows (the generation tickets are shuffled over the whole epoch).
  The block's samples are shuffled (torch generator of the run) and materialised ``piece`` rows
  at a time, generation included, so memory stays bounded however much a block expands. The
  teacher logits for KD are read with the block, for its head-class real rows only.
* **Evaluation** streams val/test in chunks.

Memory is planned up front (:class:`StreamPlan`): what stays resident (bank, tail seeds,
classifier with its gradient and momentum, means, index arrays) plus the process as it stands
(``VmRSS``) is subtracted from the budget, and the block, piece and evaluation sizes are cut
from the rest, rounded down to a multiple of budget / 32 (so that the few MiB by which a
process's start-up memory varies between two runs of one command rarely change a size, and with
it the order of an epoch's samples). A budget below the resident minimum is reported (a warning,
with the minimum) and the run goes on with the smallest blocks.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import resource
import sys
import time
from dataclasses import asdict, dataclass, field

import h5py
import numpy as np
import torch

from . import afg
from .errors import UsageError
from .features import FeatureFileError
from .sampling import sample_calibrated

log = logging.getLogger(__name__)

__all__ = [
    "keep_torch_threads",
    "parse_bytes",
    "format_bytes",
    "rss_bytes",
    "peak_rss_bytes",
    "reset_peak_rss",
    "StreamPlan",
    "DataPathChoice",
    "choose_data_path",
    "in_memory_estimate",
    "plan_streaming",
    "H5Rows",
    "StreamingEpochBuilder",
    "StreamingData",
]

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
# Memory the process gains later from what stage two imports lazily, when not imported yet
# (measured on CPython 3.11 / torch 2.13: faiss +12 MiB; numba with the compiled sampler +135 MiB).
_LAZY_IMPORTS = {"faiss": 16 << 20, "numba": 144 << 20}
# Slack for the allocator, HDF5 chunk caches, tqdm, checkpoint writing and small arrays:
# budget / 64, between 16 and 64 MiB.
_SLACK = (16 << 20, 64 << 20)
PLAN_STEPS = 32  # the working memory of a streaming plan is a multiple of budget / PLAN_STEPS
_MAX_PIECE = 1 << 16
_FLOAT16_MAX = float(np.finfo(np.float16).max)


# --------------------------------------------------------------------------------------------
# Sizes and process memory
# --------------------------------------------------------------------------------------------
def parse_bytes(value) -> int:
    """``"4G"``, ``"512M"``, ``"1.5G"``, ``"300K"``, ``"1000000"`` or an int -> bytes.

    K, M, G, T are binary (2^10, 2^20, 2^30, 2^40); an optional trailing ``B``/``iB`` is
    accepted (``4GB`` = ``4GiB`` = ``4G``). Raises ValueError on anything else.
    """
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        n = int(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGTkmgt]?)(?:i?[Bb])?\s*", str(value))
        if not m:
            raise UsageError(f"cannot read {value!r} as a memory size; write e.g. 4G, 512M, 300K or a byte count")
        n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n <= 0:
        raise UsageError(f"a memory size must be positive, got {value!r}")
    return n


def format_bytes(n: float) -> str:
    """Bytes as a short human string (binary units): ``3.4 GiB``."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """Resident set size of this process now (``VmRSS``); the peak where /proc is absent."""
    kb = _status_kb("VmRSS")
    return kb * 1024 if kb is not None else peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (``VmHWM``, else ``getrusage`` ru_maxrss)."""
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb * 1024
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru if sys.platform == "darwin" else ru * 1024  # bytes on macOS, KiB on Linux


def _lazy_import_bytes(cfg) -> int:
    """What the lazily imported libraries will add to this process (see ``_LAZY_IMPORTS``)."""
    skip = set()
    if not cfg.generate or cfg.backend == "torch":
        skip = {"faiss", "numba"} if not cfg.generate else {"numba"}
    return sum(v for k, v in _LAZY_IMPORTS.items() if k not in sys.modules and k not in skip)


def bound_heap() -> bool:
    """Make glibc return freed buffers of 1 MiB or more to the OS (a fixed ``M_MMAP_THRESHOLD``).

    glibc's default raises the mmap threshold up to 32 MiB as large blocks are freed, after
    which chunk-sized buffers (a few MiB) come from the heap and stay resident when freed:
    streaming 100 MB in 4 MiB chunks then held ~100 MiB more than the chunks need. Process-wide,
    so only the streaming path (a memory budget) calls it. False where not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 4 << 20))
        libc.malloc_trim(0)
        return ok
    except (OSError, AttributeError):
        return False


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux: ``echo 5 > /proc/self/clear_refs``); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def keep_torch_threads():
    """Restore torch's intra-op thread count after the body.

    The numba sampler's OpenMP runtime is the one torch uses, and a parallel numba call leaves
    ``omp_get_max_threads`` (so ``torch.get_num_threads``) at numba's count. Stage two trains
    small heads on one thread on purpose; left at 2 threads on a busy 2-core machine their
    steps ran 30x slower (0.9 -> 28 ms a step at 64 x 100).
    """
    n = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


# --------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------
def _factor_rank(n: np.ndarray, d: int) -> np.ndarray:
    """Columns of each class's covariance factor: 0 (n = 1), n (n <= d) or d (Cholesky)."""
    return np.where(n <= 1, 0, np.minimum(n, d))


def in_memory_estimate(ff, cfg) -> dict[str, int]:
    """Bytes the in-memory path holds at its peak, by item (process baseline not included).

    ``cfg`` is a resolved :class:`glag.stage2.Stage2Config`; ``ff`` an open FeatureFile.
    """
    C, d = ff.num_classes, ff.feature_dim
    counts = np.asarray(ff.class_counts, dtype=np.int64)
    n = ff.num_rows("train")
    n_max = int(cfg.n_max or counts.max())
    m_epoch = int(np.maximum(counts, n_max).sum())
    est = {
        "train_features": 2 * ff.nbytes("train"),  # the loaded array and its Tukey transform
        "train_logits": n * C * 4 if ff.has_logits("train") else 0,
        "epoch": 2 * m_epoch * d * 4 + m_epoch * 17,  # the parts, their concatenation, y, mask
        "classifier": 5 * C * (d + 1) * 4,
    }
    if cfg.generate:  # class_statistics: a sorted copy of train, every class's factor
        est["factor_bank"] = ff.nbytes("train") + int(_factor_rank(counts, d).sum()) * d * 4
    for split in ff.splits:
        if split != "train":
            rows = ff.num_rows(split)
            est[f"{split}_split"] = 2 * rows * d * 4 + (rows * C * 4 if ff.has_logits(split) else 0)
    return est


@dataclass
class StreamPlan:
    """Sizes of the streaming path, cut from the budget (bytes and rows).

    Attributes:
        budget: the ``max_memory`` budget.
        baseline: the process's RSS when planned, plus what lazy imports will add.
        resident: bytes held for the whole run, by item (``parts``).
        tail_dtype: storage of the tail classes' real rows (the generation seeds).
        block_rows: real rows per block; granule_rows: rows per contiguous read within a block.
        piece_samples: samples materialised at a time; eval_rows: rows per evaluation chunk;
        pass_rows: rows per chunk of the statistics pass.
        fits: whether baseline + resident + the smallest working buffers fit the budget.
    """

    budget: int
    baseline: int
    tail_dtype: str
    block_rows: int
    granule_rows: int
    piece_samples: int
    eval_rows: int
    pass_rows: int
    fits: bool
    parts: dict = field(default_factory=dict)

    @property
    def resident(self) -> int:
        return int(sum(self.parts.values()))

    def as_dict(self) -> dict:
        out = asdict(self)
        out["resident"] = self.resident
        return out


@dataclass
class DataPathChoice:
    """Which data path stage two takes, and why (logged, saved in config.json)."""

    stream: bool
    reason: str
    in_memory_bytes: int | None = None
    plan: StreamPlan | None = None


def _roles(cfg, counts):
    n_max = int(cfg.n_max or counts.max())
    head, tail, resample = afg.class_roles(counts, cfg.head_threshold, n_max, cfg.generate)
    return n_max, head.numpy(), tail.numpy(), resample


def plan_streaming(ff, cfg, budget: int, baseline: int | None = None) -> StreamPlan:
    """Size the streaming path for ``budget`` bytes (see :class:`StreamPlan`)."""
    C, d = ff.num_classes, ff.feature_dim
    counts = np.asarray(ff.class_counts, dtype=np.int64)
    n = ff.num_rows("train")
    n_max, head, tail, resample = _roles(cfg, counts)
    if baseline is None:
        baseline = rss_bytes() + _lazy_import_bytes(cfg)
    B = cfg.batch_size
    tail_rows = int(counts[tail].sum()) if len(tail) else 0
    n_gen = int(np.maximum(n_max - counts[tail], 0).sum()) if len(tail) else 0
    m_epoch = int(np.maximum(counts, n_max).sum())
    parts = {
        "classifier": 5 * C * (d + 1) * 4,  # weights, gradient, momentum, the best copy at the end
        "labels_and_indices": n * (8 + 4) + n_gen * 8 + tail_rows * (cfg.k * 12 + 24),
        "slack": int(np.clip(budget // 64, *_SLACK)),
    }
    if len(tail):
        ranks = _factor_rank(counts[head], d)
        parts["factor_bank"] = int(ranks.sum()) * d * 4
        parts["class_means"] = C * d * (4 + 8)  # float32 means; float64 sums during the pass
        parts["scatter_matrices"] = int((counts[head] > d).sum()) * d * d * 8
    work_min = _work_bytes(C, d, B, m_epoch / max(n, 1), 64, B, 64, 64)

    def free_with(itemsize):
        p = dict(parts)
        if tail_rows:
            p["tail_rows"] = tail_rows * d * itemsize
        return p, budget - baseline - int(sum(p.values()))

    tail_dtype = "float32"
    p, free = free_with(4)
    if free < max(work_min, 64 << 20) and tail_rows:
        tail_dtype = "float16"
        p, free = free_with(2)
    fits = free >= work_min
    # rows of one HDF5 chunk of features (reads aligned to it); ~1 MiB of float32 if unknown
    chunk = _hdf5_chunk_rows(ff.path, "train") or max(1, (1 << 20) // (4 * d))
    expansion = m_epoch / max(n, 1)
    per_block_row = _block_row_bytes(C, d, expansion)
    if fits:
        # The working memory is cut from a grid of budget / PLAN_STEPS (>= 1 MiB), not from the
        # exact bytes left: two runs of one command, whose start-up memory differs by a few MiB,
        # get the same sizes and so the same sample order, unless the difference crosses a step.
        # The block and a piece coexist; the rest is for the step and the allocator's leftovers.
        step = max(1 << 20, budget // PLAN_STEPS)
        work = max(work_min, free // step * step)
        block_rows = int(0.25 * work // per_block_row)
        piece = int(0.35 * work // _piece_row_bytes(d))
        eval_rows = int(0.6 * work // (2 * d * 4 + 3 * C * 4))
        pass_rows = int(0.6 * work // _pass_row_bytes(d))
    else:
        block_rows, piece, eval_rows, pass_rows = 1024, 4 * B, 1024, 1024
    if getattr(cfg, "stream_block_rows", None):
        block_rows = int(cfg.stream_block_rows)
    block_rows = int(np.clip(block_rows, 1, max(1, min(n, 1 << 17))))
    # ~16 granules a block (mixing); a granule is one HDF5 chunk when that is not far off (aligned reads)
    granule = chunk if block_rows // 16 >= chunk // 2 else max(1, block_rows // 16)
    granule = min(granule, block_rows)
    block_rows = max(granule, block_rows // granule * granule)
    if getattr(cfg, "stream_block_rows", None) and block_rows != int(cfg.stream_block_rows):
        log.info("--stream-block-rows %d: %d rows a block (whole granules of %d rows, at most %d)",
                 cfg.stream_block_rows, block_rows, granule, min(n, 1 << 17))
    piece = int(np.clip(piece, B, _MAX_PIECE)) // B * B
    return StreamPlan(budget=int(budget), baseline=int(baseline), tail_dtype=tail_dtype,
                      block_rows=block_rows, granule_rows=granule, piece_samples=piece,
                      eval_rows=int(np.clip(eval_rows, 1, 1 << 15)),
                      pass_rows=int(np.clip(pass_rows, 1, 1 << 16)), fits=bool(fits), parts=p)


def _block_row_bytes(C, d, expansion) -> int:
    """Bytes per real row of a block: raw and Tukey features, a read buffer, head-row logits, the shuffle."""
    return 3 * d * 4 + C * 4 + int(24 * expansion) + 16


def _piece_row_bytes(d) -> int:
    """Bytes per sample of a piece: the piece, copies gathered into it, the sampler's output, the
    seeds (widened, Tukey) and the calibration's temporaries."""
    return 6 * d * 4 + 48


def _pass_row_bytes(d) -> int:
    """Bytes per row of a statistics-pass chunk: raw, Tukey, float64 copy for the sums, and for a
    scatter class its rows, their float64 copy and the centred copy."""
    return 40 * d + 16


def _work_bytes(C, d, B, expansion, block_rows, piece, eval_rows, pass_rows) -> int:
    """Working memory of the streaming loop at given sizes (beyond what is resident)."""
    block = block_rows * _block_row_bytes(C, d, expansion)
    batch = B * (d * 4 + 6 * C * 4)
    return max(block + piece * _piece_row_bytes(d) + batch,
               eval_rows * (2 * d * 4 + 3 * C * 4), pass_rows * _pass_row_bytes(d))


def _hdf5_chunk_rows(path, split: str) -> int | None:
    try:
        with h5py.File(path, "r", locking=False) as f:
            chunks = f[split]["features"].chunks
            return int(chunks[0]) if chunks else None
    except (OSError, KeyError):
        return None


def choose_data_path(ff, cfg, saved: dict | None = None) -> DataPathChoice:
    """In memory unless ``cfg.max_memory`` is set and the in-memory peak would exceed it.

    ``saved``: the config.json of a run being resumed. Its data path and streaming plan are kept
    whatever the budget now (the order of an epoch's samples depends on both, so the resumed
    run's result is the uninterrupted one's); a budget they exceed is warned about.
    """
    if saved and saved.get("data_path") == "memory":
        if cfg.max_memory is not None:
            need = rss_bytes() + _lazy_import_bytes(cfg) + sum(in_memory_estimate(ff, cfg).values())
            if need > parse_bytes(cfg.max_memory):
                log.warning("resuming a run trained in memory: it goes on in memory (peak ~%s, over --max-memory "
                            "%s), since streaming would change its samples", format_bytes(need),
                            format_bytes(parse_bytes(cfg.max_memory)))
        return DataPathChoice(False, "resumed run: in memory, as it was trained")
    if saved and saved.get("data_path") == "streaming" and saved.get("stream_plan"):
        plan = StreamPlan(**{k: v for k, v in saved["stream_plan"].items() if k != "resident"})
        if cfg.max_memory is None or parse_bytes(cfg.max_memory) < plan.budget:
            log.warning("resuming a streamed run: it keeps its plan, made for a budget of %s (now %s)",
                        format_bytes(plan.budget),
                        "none" if cfg.max_memory is None else format_bytes(parse_bytes(cfg.max_memory)))
        return DataPathChoice(True, f"resumed run: streaming /train as it was trained, in blocks of "
                                    f"{plan.block_rows} rows", plan=plan)
    if cfg.max_memory is None:
        return DataPathChoice(False, "no --max-memory budget: everything in memory")
    budget = parse_bytes(cfg.max_memory)
    baseline = rss_bytes() + _lazy_import_bytes(cfg)
    est = in_memory_estimate(ff, cfg)
    need = baseline + sum(est.values())
    top = ", ".join(f"{k} {format_bytes(v)}" for k, v in sorted(est.items(), key=lambda kv: -kv[1])[:4])
    if need <= budget:
        return DataPathChoice(False, f"in-memory peak ~{format_bytes(need)} fits the budget {format_bytes(budget)} "
                                     f"(process {format_bytes(baseline)}; {top})", in_memory_bytes=need)
    plan = plan_streaming(ff, cfg, budget, baseline)
    reason = (f"in-memory peak ~{format_bytes(need)} exceeds the budget {format_bytes(budget)} "
              f"(train features {format_bytes(ff.nbytes('train'))}; {top}; process {format_bytes(baseline)}): "
              f"streaming /train from {ff.path} in blocks of {plan.block_rows} rows; resident "
              f"~{format_bytes(plan.resident)} ({', '.join(f'{k} {format_bytes(v)}' for k, v in plan.parts.items())})")
    return DataPathChoice(True, reason, in_memory_bytes=need, plan=plan)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
class H5Rows:
    """Row ranges of a (validated) feature file, reading only the datasets asked for.

    ``FeatureFile.load`` always reads the N x C logits with the features; the statistics pass
    and most of an epoch do not need them (14 GB for iNaturalist). Features come back float32
    (float16 on disk is widened), checked for NaN/inf like ``FeatureFile.load`` does.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        self._f = h5py.File(self.path, "r", locking=False)

    def num_rows(self, split: str) -> int:
        return int(self._f[split]["labels"].shape[0])

    def has_logits(self, split: str) -> bool:
        return "logits" in self._f[split]

    def disk_dtype(self, split: str) -> np.dtype:
        return self._f[split]["features"].dtype

    def labels(self, split: str, a: int = 0, b: int | None = None) -> np.ndarray:
        return self._f[split]["labels"][a:b].astype(np.int64, copy=False)

    def features(self, split: str, a: int, b: int, raw: bool = False) -> np.ndarray:
        """(b - a, d) features: float32, or as stored on disk when ``raw``."""
        x = self._f[split]["features"][a:b]
        self._check(x, split, a, "feature")
        return x if raw else x.astype(np.float32, copy=False)

    def logits(self, split: str, a: int, b: int) -> np.ndarray:
        z = self._f[split]["logits"][a:b].astype(np.float32, copy=False)
        self._check(z, split, a, "logits")
        return z

    def _check(self, x: np.ndarray, split: str, a: int, what: str) -> None:
        bad = ~np.isfinite(x).all(axis=1)
        if bad.any():
            row = a + int(np.argmax(bad))
            raise FeatureFileError(f"{self.path}: split {split!r} row {row}: {what} is NaN or inf. The file is "
                                   f"damaged or was written from a diverged model; re-extract with tools/extract.py")

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _seed64(*parts: int) -> int:
    """A 64-bit seed from integers (splitmix64 over them): one sampler stream per block piece."""
    h = 0x243F6A8885A308D3
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) + 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h


# --------------------------------------------------------------------------------------------
# The epoch
# --------------------------------------------------------------------------------------------
class StreamingEpochBuilder:
    """The streaming counterpart of :class:`glag.stage2.EpochBuilder` (module docstring).

    Attributes (as EpochBuilder): ``n_max``, ``head_ids``, ``tail_ids``, ``resample_ids``,
    ``is_head`` (C,) bool, ``rng`` (allocation / resampling / block order), ``stats``
    (:class:`glag.afg.ClassStats`, bank of head classes only) when there is a tail to generate,
    ``support`` / ``weights`` (m, k) of the tail rows, ``setup_seconds``.
    """

    def __init__(self, cfg, reader: H5Rows, counts: np.ndarray, plan: StreamPlan):
        t0 = time.time()
        self.cfg, self.reader, self.plan = cfg, reader, plan
        self.counts = np.asarray(counts, dtype=np.int64)
        C = self.num_classes = len(self.counts)
        self.n = reader.num_rows("train")
        self.n_max, head, tail, self.resample_ids = _roles(cfg, self.counts)
        self.head_ids = torch.from_numpy(head)
        self.tail_ids = torch.from_numpy(tail)
        self.is_head_np = np.zeros(C, dtype=bool)
        self.is_head_np[head] = True
        self.is_head = torch.from_numpy(self.is_head_np)
        self.rng = np.random.default_rng([cfg.seed, 2])
        self.stats = None
        self.m = 0
        if len(tail):
            self._statistics_pass(head, tail)
        else:
            if cfg.generate:
                log.info("no tail class below n_max=%d: nothing to generate", self.n_max)
            self.labels = reader.labels("train")
        if not np.array_equal(np.bincount(self.labels, minlength=C), self.counts):
            raise FeatureFileError(f"{reader.path}: the train labels do not match class_counts")
        # rows of each class in file order (what np.flatnonzero(labels == c) gives), for resampling
        self._by_class = np.argsort(self.labels, kind="stable")
        self._class_start = np.concatenate([[0], np.cumsum(self.counts)])
        g = plan.granule_rows
        self._granules = np.arange(0, self.n, g)
        self._per_block = max(1, plan.block_rows // g)
        self.setup_seconds = time.time() - t0
        log.info("streaming set-up: %.1f s (statistics pass, support search); %d granules of %d rows, "
                 "%d granules a block", self.setup_seconds, len(self._granules), g, self._per_block)

    # -- set-up --------------------------------------------------------------------------------
    def _statistics_pass(self, head: np.ndarray, tail: np.ndarray) -> None:
        """One pass over /train: labels, class statistics (head factors only), tail rows."""
        cfg, reader, C = self.cfg, self.reader, self.num_classes
        n = self.n
        self.labels = np.empty(n, dtype=np.int64)
        is_tail = np.zeros(C, dtype=bool)
        is_tail[tail] = True
        m = self.m = int(self.counts[tail].sum())
        store = np.dtype(self.plan.tail_dtype)
        self.tail_x = None
        filled = [0]
        step = self.plan.pass_rows
        chunk = _hdf5_chunk_rows(reader.path, "train")
        if chunk and step > chunk:
            step = step // chunk * chunk

        def chunks():
            for a in range(0, n, step):
                b = min(n, a + step)
                raw = reader.features("train", a, b, raw=True)
                y = reader.labels("train", a, b)
                self.labels[a:b] = y
                if self.tail_x is None:
                    self.tail_x = np.empty((m, raw.shape[1]), dtype=store)
                sel = is_tail[y]
                k = int(sel.sum())
                if k:
                    rows = raw[sel]
                    if store == np.float16 and rows.dtype != np.float16 and float(np.abs(rows).max()) > _FLOAT16_MAX:
                        raise FeatureFileError(f"{reader.path}: train features exceed the float16 range, so the tail "
                                               f"rows cannot be kept in float16; raise --max-memory")
                    self.tail_x[filled[0]:filled[0] + k] = rows
                    filled[0] += k
                x = afg.tukey(torch.from_numpy(raw.astype(np.float32, copy=False)), cfg.tukey_lambda)
                yield x, torch.from_numpy(y)

        self.stats = afg.streaming_class_statistics(chunks(), C, self.counts, factor_classes=head)
        self.qlabels = self.labels[is_tail[self.labels]]  # file order, as EpochBuilder.seed_rows
        # step 4: support sets of every tail row, in batches of queries
        head_means = self.stats.means[torch.from_numpy(head)]
        sup, dist = [], []
        for a in range(0, m, step):
            q = self._seeds(np.arange(a, min(m, a + step)))
            s, d2 = afg.find_support(q, head_means, torch.from_numpy(head), cfg.k,
                                     torch.from_numpy(self.qlabels[a:a + step]))
            sup.append(s)
            dist.append(d2)
        self.support = torch.cat(sup)
        dist2 = torch.cat(dist)
        self.weights = afg.support_weights(dist2, self.support, self.counts, cfg.weights)
        log.info("statistics pass: %d rows, %d head factors (R = %d columns), %d tail rows kept as %s",
                 n, len(head), int(self.stats.bank.offsets[-1]), m, store)

    def _seeds(self, idx: np.ndarray) -> torch.Tensor:
        """Tukey-space float32 tail rows ``idx`` (indices into the tail store)."""
        raw = np.ascontiguousarray(self.tail_x[idx], dtype=np.float32)
        return afg.tukey(torch.from_numpy(raw), self.cfg.tukey_lambda)

    # -- one epoch -----------------------------------------------------------------------------
    def plan_epoch(self, epoch: int, omega) -> dict:
        """Draw the epoch's composition (METHOD.md step 6) and block order; O(N + G) integers."""
        cfg, rng = self.cfg, self.rng
        pick_count = np.zeros(self.n, dtype=np.int32)
        for c in self.resample_ids:  # the same draws as EpochBuilder.build
            short = self.n_max - int(self.counts[c])
            rows = self._by_class[self._class_start[c]:self._class_start[c + 1]]
            np.add.at(pick_count, rng.choice(rows, size=short, replace=True), 1)
        tickets = np.zeros(0, dtype=np.int64)
        omega_rows = None
        if self.m:
            alloc = afg.allocate_counts(self.qlabels, self.n_max, self.counts, rng)
            tickets = np.repeat(np.arange(self.m, dtype=np.int64), alloc)
            rng.shuffle(tickets)  # spread the generated samples over the whole epoch
            omega_rows = (omega.omega_for(self.qlabels) if omega is not None
                          else torch.full((self.m,), float(cfg.omega_init), dtype=torch.float32))
        order = rng.permutation(len(self._granules))
        blocks = [np.sort(order[i:i + self._per_block]) for i in range(0, len(order), self._per_block)]
        g = self.plan.granule_rows
        real = np.array([sum(min(self.n, self._granules[j] + g) - self._granules[j] for j in blk) for blk in blocks])
        bounds = np.concatenate([[0], (len(tickets) * np.cumsum(real)) // max(1, self.n)])
        return dict(epoch=epoch, pick_count=pick_count, tickets=tickets, omega=omega_rows, blocks=blocks,
                    gen_bounds=bounds, samples=int(self.n + pick_count.sum() + len(tickets)))

    def iter_blocks(self, ep: dict, gen: torch.Generator, use_kd: bool, timer: dict):
        """Yield one epoch as shuffled pieces (module docstring): ``x`` (n, d) float32, ``y`` (n,)
        int64, ``kd_mask`` (n,) bool (real head-class rows), and ``(teacher, rows)`` (the block's
        head-row logits and each sample's row in them, -1 for none) or None without KD."""
        g, d = self.plan.granule_rows, None
        for j, blk in enumerate(ep["blocks"]):
            t0 = time.time()
            ranges = [(int(self._granules[i]), min(self.n, int(self._granules[i]) + g)) for i in blk]
            rows = np.concatenate([np.arange(a, b) for a, b in ranges])
            xr = [self.reader.features("train", a, b) for a, b in ranges]
            x_real = afg.tukey(torch.from_numpy(np.concatenate(xr) if len(xr) > 1 else xr[0]), self.cfg.tukey_lambda)
            del xr
            d = x_real.shape[1]
            y_real = self.labels[rows]
            head_rows = self.is_head_np[y_real]
            teacher, tmap = None, None
            if use_kd:
                tmap = np.full(len(rows), -1, dtype=np.int64)
                tmap[head_rows] = np.arange(int(head_rows.sum()))
                parts, pos = [], 0
                for a, b in ranges:
                    h = head_rows[pos:pos + b - a]
                    if h.any():  # only the head rows' logits are used (KD); skip the rest
                        parts.append(self.reader.logits("train", a, b)[h])
                    pos += b - a
                teacher = torch.from_numpy(np.concatenate(parts)) if parts else torch.zeros(0, self.num_classes)
            picks = np.repeat(np.arange(len(rows)), ep["pick_count"][rows])
            tk = ep["tickets"][ep["gen_bounds"][j]:ep["gen_bounds"][j + 1]]
            r, p = len(rows), len(picks)
            perm = torch.randperm(r + p + len(tk), generator=gen).numpy()
            timer["data"] += time.time() - t0
            for k, a in enumerate(range(0, len(perm), self.plan.piece_samples)):
                t0 = time.time()
                idx = perm[a:a + self.plan.piece_samples]
                x = torch.empty(len(idx), d, dtype=torch.float32)
                y = torch.empty(len(idx), dtype=torch.int64)
                kd = torch.zeros(len(idx), dtype=torch.bool)
                real = idx < r
                src = np.full(len(idx), -1, dtype=np.int64)  # the block row a sample copies, or -1
                src[real] = idx[real]
                pk = np.flatnonzero(~real & (idx < r + p))
                src[pk] = picks[idx[pk] - r]
                copied = np.flatnonzero(src >= 0)  # real rows and resampled copies of them
                x[torch.from_numpy(copied)] = x_real[torch.from_numpy(src[copied])]
                y[torch.from_numpy(copied)] = torch.from_numpy(y_real[src[copied]])
                kd[torch.from_numpy(np.flatnonzero(real))] = torch.from_numpy(head_rows[idx[real]])
                t_rows = None
                if use_kd:
                    t_rows = np.full(len(idx), -1, dtype=np.int64)
                    t_rows[real] = tmap[idx[real]]
                gpos = np.flatnonzero(idx >= r + p)
                if gpos.size:
                    self._generate(ep, j, k, tk[idx[gpos] - r - p], gpos, x, y)
                timer["data"] += time.time() - t0
                yield x, y, kd, (None if t_rows is None else (teacher, t_rows))
                del x, y, kd, t_rows  # before the next piece is allocated: one piece at a time
            del x_real, teacher, perm

    def _generate(self, ep, block: int, piece: int, seeds: np.ndarray, positions: np.ndarray,
                  x: torch.Tensor, y: torch.Tensor) -> None:
        """Draw one calibrated sample per ticket (seed tail row) into ``x[positions]`` (METHOD.md 5-6)."""
        cfg = self.cfg
        u, inv, cnt = np.unique(seeds, return_inverse=True, return_counts=True)
        ui = torch.from_numpy(u)
        mu = afg.calibrate_means(self._seeds(u), self.support[ui], self.weights[ui], self.stats.means,
                                 ep["omega"][ui])
        with keep_torch_threads():
            gx, gy = sample_calibrated(self.stats.bank, mu, self.support[ui], self.weights[ui], torch.from_numpy(cnt),
                                       torch.from_numpy(self.qlabels[u]), alpha=cfg.alpha, mode=cfg.alpha_mode,
                                       seed=_seed64(cfg.seed, ep["epoch"], block, piece), backend=cfg.backend)
        # gx holds the samples of u[0], then u[1], ...; the tickets of seed u[i] are those with inv == i
        dest = torch.from_numpy(positions[np.argsort(inv, kind="stable")])
        x[dest] = gx.float()
        y[dest] = gy


class _Batcher:
    """Cuts a stream of shuffled pieces into batches of exactly ``B`` rows (the last may be short)."""

    def __init__(self, B: int):
        self.B = B
        self.parts: list = []
        self.n = 0

    def feed(self, x, y, kd, teacher):
        B, L, i = self.B, len(y), 0

        def take(a, b, copy=False):
            t = None
            if teacher is not None:
                tm, rows = teacher
                sel = rows[a:b][kd[a:b].numpy()]
                t = tm[torch.from_numpy(sel)]
            part = (x[a:b], y[a:b], kd[a:b], t)
            return tuple(v.clone() if copy and v is not None else v for v in part)

        if self.n:
            k = min(B - self.n, L)
            self.parts.append(take(0, k, copy=True))
            self.n += k
            i = k
            if self.n < B:
                return
            yield self._flush()
        while i + B <= L:
            yield take(i, i + B)
            i += B
        if i < L:
            self.parts.append(take(i, L, copy=True))
            self.n = L - i

    def _flush(self):
        xs, ys, ks, ts = zip(*self.parts)
        self.parts, self.n = [], 0
        t = None if ts[0] is None else torch.cat(ts)
        return torch.cat(xs), torch.cat(ys), torch.cat(ks), t

    def finish(self):
        if self.n:
            yield self._flush()


class StreamingData:
    """Stage two's data on the streaming path: same interface as ``glag.stage2.InMemoryData``."""

    kind = "streaming"

    def __init__(self, cfg, ff, plan: StreamPlan):
        self.cfg, self.plan = cfg, plan
        self.splits = list(ff.splits)
        self.num_classes, self.feature_dim = ff.num_classes, ff.feature_dim
        self.counts = np.asarray(ff.class_counts, dtype=np.int64)
        self.reader = H5Rows(ff.path)
        self.n_real = self.reader.num_rows("train")
        if bound_heap():
            log.debug("glibc: buffers >= 1 MiB are mmapped and returned to the OS when freed")
        if not plan.fits:
            log.warning("--max-memory %s is below what the streaming path needs (process %s + resident %s + "
                        "working buffers): running with the smallest blocks; peak memory will exceed the budget. "
                        "Resident: %s", format_bytes(plan.budget), format_bytes(plan.baseline),
                        format_bytes(plan.resident),
                        ", ".join(f"{k} {format_bytes(v)}" for k, v in plan.parts.items()))
        self.builder = StreamingEpochBuilder(cfg, self.reader, self.counts, plan)

    def has_teacher(self, split: str) -> bool:
        return split in self.splits and self.reader.has_logits(split)

    def epoch_batches(self, epoch: int, omega, gen: torch.Generator, batch_size: int, use_kd: bool):
        """``(iterator of (x, y, kd_mask, teacher rows of the masked samples), info)`` for one epoch."""
        info = {"data": 0.0}
        t0 = time.time()
        ep = self.builder.plan_epoch(epoch, omega)
        info["data"] += time.time() - t0

        def batches():
            batcher = _Batcher(batch_size)
            for piece in self.builder.iter_blocks(ep, gen, use_kd, info):
                yield from batcher.feed(*piece)
            yield from batcher.finish()

        return batches(), info

    def predict(self, head: torch.nn.Module, split: str, teacher: bool = False):
        """``(pred, labels, stage-one pred or None)`` int64 numpy arrays for ``split``, streamed."""
        n = self.reader.num_rows(split)
        pred = np.empty(n, dtype=np.int64)
        with_t = teacher and self.reader.has_logits(split)
        p1 = np.empty(n, dtype=np.int64) if with_t else None
        step = self.plan.eval_rows
        with torch.inference_mode():
            for a in range(0, n, step):
                b = min(n, a + step)
                x = afg.tukey(torch.from_numpy(self.reader.features(split, a, b)), self.cfg.tukey_lambda)
                pred[a:b] = head(x).argmax(1).numpy()
                if with_t:
                    p1[a:b] = self.reader.logits(split, a, b).argmax(1)
        return pred, self.reader.labels(split), p1

    def describe(self) -> dict:
        return {"data_path": self.kind, "stream_plan": self.plan.as_dict(),
                "setup_seconds": self.builder.setup_seconds}

    def close(self) -> None:
        self.reader.close()
