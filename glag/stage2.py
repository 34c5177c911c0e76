"""Stage two: a linear classifier on cached, Tukey-transformed features, with AFG and KD (METHOD.md).

One loop for every method; they differ by config (:data:`METHODS` holds the presets):

=========  ==========================  ==============  ==========  =====
method     how classes reach n_max     support weights  ω           KD
=========  ==========================  ==============  ==========  =====
``crt``    resample real features      -               -           no
``dc``     generate (DC, Yang 2021)    uniform          k/(k+1)     no
``afg``    generate                    n_i / d_i        adaptive    no
``glag``   generate                    n_i / d_i        adaptive    yes
=========  ==========================  ==============  ==========  =====

Each epoch (METHOD.md steps 6-8): every class is topped up to n_max: a tail class (n_c at most
the head threshold) with calibrated Gaussians generated around its real samples, a head class by
resampling its real features (``crt`` resamples every class); the classifier is
trained on real ∪ generated with ``CE + τ(t)·KD`` (KD on head-class real samples, teacher = the
stage-one logits stored in the feature file), then per-class **validation** accuracy moves each
tail class's ω (its initial value is itself chosen on validation by default: :func:`select_omega_init`).
The classifier is selected on validation top-1; the test split is used once, at
the end, and never for ω or selection.

Data paths: everything in memory (:class:`InMemoryData`, the default), or, when ``max_memory`` is
set and the in-memory peak would exceed it, ``/train`` streamed from the HDF5 file in bounded
memory (:class:`glag.streaming.StreamingData`: statistics in one pass, each epoch read in shuffled
blocks). The loop is the same for both: loss, KD, ω updates, selection, metrics and resume.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import afg, streaming
from .errors import UsageError
from .features import open_features
from .losses import SCHEDULES, ce_kd_logit_grad, kd_loss, tau_schedule
from .metrics import format_table, per_class_accuracy, summarize
from .optim import MomentumSGD
from .options import check_ranges
from .runs import (RunDir, atomic_torch_save, atomic_write_bytes, atomic_write_json, check_resume_options,
                   continue_epochs, seed_everything, torch_load_checked)
from .sampling import MODES, sample_calibrated

log = logging.getLogger(__name__)

METHODS = {
    "crt": dict(generate=False, kd=False, adaptive_omega=False, weights="uniform"),
    "dc": dict(generate=True, kd=False, adaptive_omega=False, weights="uniform", omega_init=None),
    "afg": dict(generate=True, kd=False, adaptive_omega=True, weights="size_over_distance"),
    "glag": dict(generate=True, kd=True, adaptive_omega=True, weights="size_over_distance"),
}


@dataclass
class Stage2Config:
    """Every knob of a stage-two run; saved as the run's ``config.json``. ``None`` = the method's preset."""

    features: str = "feats.h5"
    out: str = "runs/stage2"
    method: str = "glag"
    generate: bool | None = None
    kd: bool | None = None
    adaptive_omega: bool | None = None
    weights: str | None = None
    omega_init: float | str | None = "auto"  # "auto": chosen on val from omega_grid; None: DC's k/(k+1)
    omega_grid: tuple[float, ...] = (0.6, 0.4, 0.2, 0.0)  # "auto" candidates; ties go to the earlier one
    omega_workers: int | None = None  # ω_init candidates trained at once; None: one per core (small, in-memory head)
    omega_step: float = 0.05
    omega_reference: str = "best"
    omega_margin: float = 0.0
    tukey_lambda: float = 0.5
    k: int = 2
    alpha: float = 0.0
    alpha_mode: str = "diag"
    head_threshold: int = 100
    n_max: int | None = None  # top every class up to this; default: the largest class count
    epochs: int = 40
    batch_size: int = 256
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    kd_temperature: float = 2.0
    kd_schedule: str = "power"
    kd_alpha: float = 1.0
    kd_beta: float = 2.0
    closed_form_grad: bool = True  # False: autograd (the oracle of the closed-form gradient)
    seed: int = 0
    backend: str | None = None
    threads: int | None = None  # torch threads for the classifier; None: 1 for small heads (d·C ≤ 2^20)
    progress: bool = True
    max_memory: int | str | None = None  # bytes (or "4G"); over it, stream /train from HDF5 (glag.streaming)
    stream_block_rows: int | None = None  # streaming: real rows per block; None: cut from the budget
    max_steps_per_epoch: int | None = None  # stop each epoch after this many steps (benchmarks, smoke runs)

    def resolved(self) -> "Stage2Config":
        """A copy with the method's preset filled in where a field is None, every value checked.

        Raises:
            UsageError: naming the option (as its command-line flag), the value and what it must be.
        """
        if self.method not in METHODS:
            raise UsageError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        values = dataclasses.asdict(self)
        check_ranges(values, **_RANGES)
        preset = METHODS[self.method]
        for key, val in preset.items():
            if key == "omega_init":  # dc: its fixed k/(k+1), unless a number was asked for
                if values[key] == "auto":
                    values[key] = val
            elif values[key] is None:
                values[key] = val
        if values["omega_init"] is None:
            values["omega_init"] = afg.dc_omega(self.k)
        values["omega_grid"] = tuple(float(w) for w in values["omega_grid"])
        if not values["omega_grid"] or not all(0.0 <= w <= 1.0 for w in values["omega_grid"]):
            raise UsageError(f"--omega-grid needs one or more values in [0, 1], got {list(values['omega_grid'])}")
        if isinstance(values["omega_init"], str):
            if values["omega_init"] != "auto":
                try:
                    values["omega_init"] = float(values["omega_init"])
                except ValueError:
                    raise UsageError(f"--omega-init must be a number in [0, 1] or 'auto', got "
                                     f"{values['omega_init']!r}") from None
            elif not values["generate"]:
                # ω is unused (crt): nothing to choose
                values["omega_init"] = values["omega_grid"][0]
        if not isinstance(values["omega_init"], str) and not 0.0 <= values["omega_init"] <= 1.0:
            raise UsageError(f"--omega-init must lie in [0, 1], got {values['omega_init']}")
        check_ranges(values, choices={"weights": afg.WEIGHT_MODES})  # unset until the preset fills it in
        if values["max_memory"] is not None:
            values["max_memory"] = streaming.parse_bytes(values["max_memory"])
        return Stage2Config(**values)


# What each option must be (None, where a field allows it, means "unset"): checked by
# Stage2Config.resolved before anything is read or written (glag.options.check_ranges).
_RANGES = dict(
    int_min={"epochs": 1, "batch_size": 1, "k": 1, "n_max": 1, "head_threshold": 0, "omega_workers": 1,
             "stream_block_rows": 1, "max_steps_per_epoch": 1, "threads": 1, "seed": 0},
    float_range={  # (low, low inclusive, high, high inclusive)
        "lr": (0.0, False, math.inf, False), "momentum": (0.0, True, 1.0, False),
        "weight_decay": (0.0, True, math.inf, False), "kd_temperature": (0.0, False, math.inf, False),
        "kd_alpha": (0.0, True, math.inf, False), "kd_beta": (0.0, True, math.inf, False),
        "omega_step": (0.0, True, 1.0, True), "omega_margin": (0.0, True, math.inf, False),
        "tukey_lambda": (0.0, False, math.inf, False), "alpha": (0.0, True, math.inf, False)},
    choices={"omega_reference": afg.AdaptiveOmega.REFERENCES, "kd_schedule": SCHEDULES, "alpha_mode": MODES},
    unset_ok={"n_max", "omega_workers", "stream_block_rows", "max_steps_per_epoch", "threads"},
)


@dataclass
class CachedSplit:
    """A split in memory: Tukey-transformed features (N, d) float32, labels (N,) int64, teacher logits or None."""

    x: torch.Tensor
    y: torch.Tensor
    teacher: torch.Tensor | None


def load_splits(path, tukey_lambda: float) -> tuple[object, dict[str, CachedSplit]]:
    """Open a feature file, load every split and apply the Tukey transform (METHOD.md step 1)."""
    return _load_splits(open_features(path), tukey_lambda)


def _load_splits(ff, tukey_lambda: float) -> tuple[object, dict[str, CachedSplit]]:
    if "train" not in ff.splits:
        raise UsageError(f"{ff.path} has no /train split; stage two needs the training features")
    splits = {}
    for name in ff.splits:
        s = ff.load(name)
        x = afg.tukey(torch.from_numpy(np.ascontiguousarray(s.features)), tukey_lambda)
        teacher = torch.from_numpy(s.logits) if s.logits is not None else None
        splits[name] = CachedSplit(x.float(), torch.from_numpy(s.labels).long(), teacher)
    return ff, splits


class EpochBuilder:
    """Builds one epoch's training set: real features plus what tops every class up to n_max.

    Holds what is fixed across epochs (class statistics, support sets and weights, computed
    once) and regenerates the samples each epoch from the current ω (METHOD.md steps 2-7).
    """

    def __init__(self, cfg: Stage2Config, train: CachedSplit, counts: np.ndarray):
        self.cfg = cfg
        self.train = train
        self.counts = np.asarray(counts, dtype=np.int64)
        self.num_classes = len(self.counts)
        self.n_max = int(cfg.n_max or self.counts.max())
        # METHOD.md step 6 [paper]: tail classes are topped up with generated samples, head classes
        # below n_max by resampling their real features (cRT resamples every class)
        self.head_ids, self.tail_ids, self.resample_ids = afg.class_roles(
            self.counts, cfg.head_threshold, self.n_max, cfg.generate)
        self.is_head = torch.zeros(self.num_classes, dtype=torch.bool)
        self.is_head[self.head_ids] = True
        if cfg.generate and isinstance(cfg.omega_init, str):
            raise ValueError(f"omega_init={cfg.omega_init!r} is resolved by select_omega_init (train_stage2), "
                             "one run per candidate: an epoch builder needs a number")
        self.rng = np.random.default_rng([cfg.seed, 2])  # stream for allocation / resampling
        self.seed_rows = torch.zeros(0, dtype=torch.int64)
        if not len(self.tail_ids):
            if cfg.generate:
                log.info("no tail class below n_max=%d: nothing to generate", self.n_max)
            return
        self.stats = afg.class_statistics(train.x, train.y, self.num_classes)
        self.seed_rows = torch.nonzero(torch.isin(train.y, self.tail_ids)).flatten()
        queries = train.x[self.seed_rows]
        qlabels = train.y[self.seed_rows]
        head_means = self.stats.means[self.head_ids]
        self.support, dist2 = afg.find_support(queries, head_means, self.head_ids, cfg.k, qlabels)
        self.weights = afg.support_weights(dist2, self.support, self.counts, cfg.weights)

    def build(self, epoch: int, omega: "afg.AdaptiveOmega | None") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (x (M, d) float32, y (M,) int64, kd_mask (M,) bool) for one epoch; M = C·n_max.

        Rows: the real features, then each resampled class's picks, then the generated features,
        written in place into one (M, d) buffer (the sampler draws straight into its tail).
        """
        tr, cfg = self.train, self.cfg
        labels = tr.y.numpy()
        picks = []
        for c in self.resample_ids:
            # class-balanced resampling of real features up to n_max
            short = self.n_max - int(self.counts[c])
            picks.append(torch.as_tensor(self.rng.choice(np.flatnonzero(labels == c), size=short, replace=True)))
        pick = torch.cat(picks) if picks else torch.zeros(0, dtype=torch.int64)
        generate = len(self.seed_rows) > 0
        n_gen = 0
        if generate:
            qlabels = tr.y[self.seed_rows]
            n = afg.allocate_counts(qlabels.numpy(), self.n_max, self.counts, self.rng)
            keep = torch.as_tensor(n) > 0
            n_gen = int(n.sum())
        n_real, n_pick = len(tr.y), len(pick)
        x = torch.empty((n_real + n_pick + n_gen, tr.x.shape[1]), dtype=torch.float32)
        y = torch.empty(len(x), dtype=torch.int64)
        x[:n_real] = tr.x
        y[:n_real] = tr.y
        torch.index_select(tr.x, 0, pick, out=x[n_real:n_real + n_pick])
        torch.index_select(tr.y, 0, pick, out=y[n_real:n_real + n_pick])
        if generate:
            w = omega.omega_for(qlabels[keep].numpy()) if omega is not None else np.float32(cfg.omega_init)
            mu = afg.calibrate_means(tr.x[self.seed_rows[keep]], self.support[keep], self.weights[keep],
                                     self.stats.means, torch.as_tensor(w, dtype=torch.float32))
            with streaming.keep_torch_threads():  # numba's OpenMP would leave torch at its thread count
                _, gy = sample_calibrated(self.stats.bank, mu, self.support[keep], self.weights[keep],
                                          torch.as_tensor(n)[keep], qlabels[keep], alpha=cfg.alpha,
                                          mode=cfg.alpha_mode, seed=_mix(cfg.seed, epoch), backend=cfg.backend,
                                          out=x[n_real + n_pick:])
            y[n_real + n_pick:] = gy
        kd_mask = torch.zeros(len(x), dtype=torch.bool)
        kd_mask[:n_real] = self.is_head[tr.y]
        return x, y, kd_mask


def _mix(seed: int, epoch: int) -> int:
    """A 64-bit sampler seed per (run seed, epoch): a separate RNG stream for feature sampling."""
    return (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + 1) & 0xFFFFFFFFFFFFFFFF


def _predict(head: torch.nn.Linear, x: torch.Tensor, batch: int = 65536) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([head(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])


class InMemoryData:
    """Stage two's data with every split in memory (the default path); ``glag.streaming.StreamingData``
    is the bounded-memory one. Both give the loop an epoch as batches and predictions per split."""

    kind = "memory"

    def __init__(self, cfg: Stage2Config, ff):
        self.ff, self.splits_data = _load_splits(ff, cfg.tukey_lambda)
        self.splits = list(self.splits_data)
        self.train = self.splits_data["train"]
        self.num_classes, self.feature_dim = ff.num_classes, ff.feature_dim
        self.counts = np.asarray(ff.class_counts, dtype=np.int64)
        self.n_real = len(self.train.y)
        self.builder = EpochBuilder(cfg, self.train, self.counts)

    def has_teacher(self, split: str) -> bool:
        return split in self.splits_data and self.splits_data[split].teacher is not None

    def epoch_batches(self, epoch: int, omega, gen: torch.Generator, batch_size: int, use_kd: bool):
        """Build the epoch (EpochBuilder.build), shuffle it with ``gen``; ``(iterator, info)``.

        The iterator yields ``(x, y, kd_mask, teacher rows of the masked samples or None)``."""
        t0 = time.time()
        x, y, kd_mask = self.builder.build(epoch, omega)
        info = {"data": time.time() - t0}
        perm = torch.randperm(len(y), generator=gen)
        # shuffle once, then every batch is a slice (a view): no per-step gathers
        x, y, kd_mask = x[perm], y[perm], kd_mask[perm]
        teacher = None
        if use_kd and self.train.teacher is not None:
            kd_pos = torch.nonzero(kd_mask).flatten()
            # real rows come first in the built epoch, in file order: row i's teacher is teacher[i]
            teacher = self.train.teacher[perm[kd_pos]]
            kd_bounds = torch.searchsorted(kd_pos, torch.arange(0, len(y) + batch_size, batch_size)).tolist()

        def batches():
            for n, i in enumerate(range(0, len(y), batch_size)):
                mb = kd_mask[i:i + batch_size]
                tb = None
                if teacher is not None and kd_bounds[n + 1] > kd_bounds[n]:
                    tb = teacher[kd_bounds[n]:kd_bounds[n + 1]]
                yield x[i:i + batch_size], y[i:i + batch_size], mb, tb

        return batches(), info

    def predict(self, head: torch.nn.Module, split: str, teacher: bool = False):
        """``(pred, labels, stage-one pred or None)`` int64 numpy arrays for ``split``."""
        s = self.splits_data[split]
        p1 = s.teacher.argmax(1).numpy() if teacher and s.teacher is not None else None
        return _predict(head, s.x).numpy(), s.y.numpy(), p1

    def describe(self) -> dict:
        return {"data_path": self.kind}

    def close(self) -> None:
        self.ff.close()


# Options a resumed run may change: where the features are, how fast and in how much memory it
# runs (the backends draw the same samples to float rounding; a resumed run keeps its data path
# and streaming plan whatever the budget), not what it computes (not --threads: the order of the
# classifier's sums follows the thread count).
RESUME_FREE_OPTIONS = frozenset({"out", "features", "backend", "progress", "omega_workers", "max_memory"})


def check_inputs(ff, cfg: Stage2Config) -> None:
    """What stage two needs of the open feature file ``ff`` under ``cfg`` (checked before any run
    folder is made): non-empty /train and /val, every class in /train, and k head classes for
    the support sets when there is a tail to generate.

    Raises:
        UsageError: naming the file, the problem and the fix.
    """
    for name in ("train", "val"):
        if name not in ff.splits:
            why = ("the training features" if name == "train" else "it selects its classifier and moves ω on "
                   "validation accuracy, never on test")
            raise UsageError(f"{cfg.features} has no /{name} split: stage two needs {why}. Re-extract with "
                             f"tools/extract.py (it writes train, val and test)")
        if ff.num_rows(name) == 0:
            raise UsageError(f"{cfg.features}: the {name} split is empty; stage two needs {name} samples. "
                             f"Re-extract with a non-empty {name} split")
    counts = np.asarray(ff.class_counts, dtype=np.int64)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        raise UsageError(f"{cfg.features}: {len(empty)} class(es) have no training sample (ids "
                         f"{empty[:10].tolist()}{' ...' if len(empty) > 10 else ''}); stage two needs every class in "
                         f"/train (its mean, and the samples it is topped up from). Re-extract from data that has "
                         f"every class in its train split")
    head, tail, _ = afg.class_roles(counts, cfg.head_threshold, int(cfg.n_max or counts.max()), cfg.generate)
    if len(tail) and len(head) < cfg.k:
        raise UsageError(f"--k {cfg.k}: every tail sample takes its k nearest head classes as support, and "
                         f"{cfg.features} has {len(head)} head class(es) (more than --head-threshold "
                         f"{cfg.head_threshold} training samples): lower --k or --head-threshold")


def open_stage2_data(cfg: Stage2Config, saved: dict | None = None):
    """The data of a stage-two run: in memory, or streamed when it exceeds ``cfg.max_memory``
    (:func:`glag.streaming.choose_data_path`); the choice and its reason are logged. ``saved``:
    the config.json of the run being resumed, whose data path and streaming plan are kept. The
    file has passed :func:`check_inputs` (:func:`train_stage2` checks it before any folder exists)."""
    ff = open_features(cfg.features)
    try:
        choice = streaming.choose_data_path(ff, cfg, saved)
        log.info("stage two data path: %s: %s", "streaming" if choice.stream else "in memory", choice.reason)
        fingerprint = ff.fingerprint()  # what a resumed run checks it is given again
        empty = [name for name in ff.splits if ff.num_rows(name) == 0]  # train and val are not (check_inputs)
        for name in empty:
            log.warning("%s: the %s split is empty; it is not evaluated", cfg.features, name)
        if not choice.stream:
            data = InMemoryData(cfg, ff)
        else:
            data = streaming.StreamingData(cfg, ff, choice.plan)
            ff.close()
        data.splits = [name for name in data.splits if name not in empty]
        data.features_fingerprint = fingerprint
        return data
    except BaseException:
        ff.close()
        raise


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run the body with ``n`` torch threads (None: unchanged), then restore the previous count."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_stage2(cfg: Stage2Config, resume: bool = False) -> dict:
    """Run stage two as ``cfg`` says; returns the metrics written to ``metrics.json``.

    A linear head of a few thousand parameters is far too small for intra-op threading: its
    steps run several times faster on one thread (and much faster on a busy machine), so small
    heads train single-threaded unless ``cfg.threads`` says otherwise.

    With ``cfg.max_memory`` set and the in-memory path estimated above it, the training split is
    streamed from the HDF5 file in bounded memory (:mod:`glag.streaming`): same loss, KD, ω
    updates, selection, metrics and resume; the epoch's samples come in another order.

    The run folder ``cfg.out`` receives config.json, env.json, summary.csv, omega.json, last.pt,
    best.pt (the classifier chosen on val) and metrics.json (per-class accuracies included, for plots).
    """
    cfg = cfg.resolved()
    # stored absolute: a run resumed from another folder finds its features
    cfg = dataclasses.replace(cfg, features=os.path.abspath(cfg.features))
    with open_features(cfg.features) as ff:  # a missing, broken or unsuitable file fails before a run folder exists
        check_inputs(ff, cfg)
    if cfg.omega_init == "auto":
        return select_omega_init(cfg, resume)
    with torch_threads(cfg.threads or (1 if _small_head(cfg) else None)):
        return _train_stage2(cfg, resume)


def pick_omega_init(grid, val_top1) -> float:
    """The grid value with the highest validation top-1; a tie goes to the earlier value."""
    return grid[max(range(len(grid)), key=lambda i: (val_top1[i], -i))]


def select_omega_init(cfg: Stage2Config, resume: bool = False) -> dict:
    """``omega_init="auto"``: one full run per value of ``cfg.omega_grid``, the one with the best
    **validation** top-1 kept (ties: the earlier grid value, the paper's 0.6 first).

    METHOD.md step 7 leaves ω's initial value open (0.6 in the paper's implementation details,
    0.4 in its ablation), and it decides how far each tail class's mean is pulled towards head
    classes: on fmnist-lt, where no head class resembles the tail ones, 0 wins, while datasets with
    related head classes may want more. So it is chosen like any other hyper-parameter, on the
    validation split; the test split is read only by each candidate's final evaluation.

    The candidates are ordinary run folders, ``<out>/omega_init/<value>/`` (each resumable); the
    winner's ``best.pt``, ``omega.json`` and ``summary.csv`` are copied to ``<out>``, and
    ``<out>/metrics.json`` is the winner's with ``omega_init_selected`` and ``omega_selection``
    (every candidate's validation metrics) added.
    """
    run = RunDir(cfg.out, resume=resume, kind="stage2")
    try:
        return _select_omega_init(cfg, run, resume)
    except UsageError:
        # a new run refused before any candidate trained (bad features met when first loaded):
        # nothing of it is kept, as for a single run, so the same command runs once it is fixed
        if not any(run.path.rglob("last.pt")):
            run.discard_new()
        raise
    finally:
        run.release()


def _epochs_done(folder) -> int:
    """Epochs a stage-two run folder has trained: its ``last.pt``'s (0 without one). Its config's
    ``epochs`` is the length asked for, which a continuation writes before it trains."""
    last = folder / "last.pt"
    if not last.exists():
        return 0
    return int(torch_load_checked(last, f"delete {folder} and resume: that candidate is trained again")["epoch"])


def _select_omega_init(cfg: Stage2Config, run: RunDir, resume: bool) -> dict:
    with open_features(cfg.features) as ff:
        fingerprint = ff.fingerprint()
    folder = {w: run / "omega_init" / f"{w:g}" for w in cfg.omega_grid}
    if (run / "config.json").exists():  # resuming (RunDir refuses it otherwise): the same options
        saved = json.loads((run / "config.json").read_text())
        check_resume_options(saved, dataclasses.asdict(cfg), run.path, RESUME_FREE_OPTIONS)
        # every candidate, finished or not, must have trained on the features given now: a
        # selection across two files would compare unrelated validation scores
        prints = {"": saved.get("features_fingerprint")}
        for w in cfg.omega_grid:
            if (folder[w] / "config.json").exists():
                prints[f" (ω_init {w:g})"] = json.loads((folder[w] / "config.json").read_text()).get(
                    "features_fingerprint")
        other = {where: fp for where, fp in prints.items() if fp not in (None, fingerprint)}
        if other:
            where, fp = next(iter(other.items()))
            raise UsageError(f"{run.path}{where} was trained on other features (fingerprint {fp}) than "
                             f"{cfg.features} (fingerprint {fingerprint}); resume with the run's --features, "
                             f"or choose another --out")
    done = {w: _epochs_done(folder[w]) for w in cfg.omega_grid}  # what was trained, from the checkpoints
    if (run / "config.json").exists():
        # refused before anything is written if a candidate has trained more epochs than asked now
        continue_epochs(run, cfg.epochs, max(done.values(), default=0))
    else:
        run.write_config({**dataclasses.asdict(cfg), "features_fingerprint": fingerprint}, cfg.seed)
    log.info("ω_init auto: %d stage-two runs, ω_init in %s, the best on validation kept (a number for "
             "--omega-init runs one)", len(cfg.omega_grid), list(cfg.omega_grid))
    todo = []
    for w in dict.fromkeys(cfg.omega_grid):
        if (folder[w] / "metrics.json").exists() and done[w] == cfg.epochs:
            log.info("ω_init %g: finished earlier (%s)", w, folder[w])
        else:  # not finished, or finished (or being continued) with fewer --epochs than asked now
            todo.append((dataclasses.replace(cfg, omega_init=w, out=str(folder[w])),
                         resume and (folder[w] / "config.json").exists()))
    workers = min(len(todo), cfg.omega_workers or _candidate_workers(cfg))
    if workers > 1:
        _run_candidates_in_processes(todo, workers, cfg.progress)
    else:
        for child, child_resume in todo:
            log.info("ω_init %g: stage two in %s", child.omega_init, child.out)
            train_stage2(child, resume=child_resume)
    val = {w: json.loads((folder[w] / "metrics.json").read_text())["stage2"]["val"] for w in cfg.omega_grid}
    best = pick_omega_init(cfg.omega_grid, [val[w]["top1"] for w in cfg.omega_grid])
    src = folder[best]
    for name in ("best.pt", "omega.json", "summary.csv"):
        if (src / name).exists():
            atomic_write_bytes(run / name, (src / name).read_bytes())
    chosen = json.loads((src / "config.json").read_text())
    atomic_write_json(run / "config.json", {**chosen, "out": cfg.out, "omega_init": "auto", "features": cfg.features,
                                            "omega_grid": list(cfg.omega_grid), "omega_init_selected": best})
    metrics = json.loads((src / "metrics.json").read_text())
    metrics.update(omega_init_selected=best, omega_selection={f"{w:g}": val[w] for w in cfg.omega_grid})
    run.write_metrics(metrics)
    log.info("ω_init chosen on val: %g\n%s", best,
             format_table({f"ω_init {w:g}, val": val[w] for w in cfg.omega_grid}))
    return metrics


def _small_head(cfg: Stage2Config) -> bool:
    """A head of at most 2^20 weights (d·C): it trains single-threaded (see :func:`train_stage2`)."""
    with open_features(cfg.features) as ff:
        return ff.feature_dim * ff.num_classes <= 2 ** 20


def _cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _candidate_workers(cfg: Stage2Config) -> int:
    """How many ω_init candidates to train at once: one per core when each run is single-threaded
    (a small head, see :func:`train_stage2`) and in memory; otherwise one after another."""
    if cfg.max_memory is not None:
        return 1  # the memory budget is per process
    cores = _cores()
    per_run = cfg.threads or (1 if _small_head(cfg) else cores)
    return max(1, cores // per_run)


def _exit_with_parent(parent: int) -> None:
    """Have the kernel send this process SIGTERM when its parent dies (Linux), and exit now if it
    already has: a parent killed by SIGKILL runs no clean-up, and its workers would otherwise go
    on writing their run folders beside the resumed run's."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the parent's own exit handling only
        pass
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


def _candidate_init(numba_threads: int, log_level: int, parent: int) -> None:
    """Worker start-up: exit with the parent (:func:`_exit_with_parent`), share the cores (numba's
    pool is sized at import) and log warnings. Ctrl-C is the parent's to handle (it terminates
    the pool), and tqdm's lock is a thread lock: its default, a multiprocessing semaphore, would be
    left behind by a terminated worker (the "leaked semaphore" warning at exit)."""
    import signal
    import threading

    from tqdm.std import tqdm as std_tqdm

    _exit_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    std_tqdm.set_lock(threading.RLock())  # the base class: every tqdm flavour asks it
    os.environ["NUMBA_NUM_THREADS"] = str(numba_threads)
    logging.basicConfig(level=max(log_level, logging.WARNING),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _candidate_run(job: tuple) -> tuple[float, float]:
    cfg, resume = job
    return cfg.omega_init, train_stage2(cfg, resume=resume)["stage2"]["val"]["top1"]


def _run_candidates_in_processes(todo: list, workers: int, progress: bool) -> None:
    """Train the (config, resume) candidates in ``workers`` fresh processes (spawned: no state of
    this one is shared). Each run is deterministic and writes only its own folder, so the results
    equal a sequential run's. If this process is interrupted (Ctrl-C, SIGTERM) the workers are
    terminated at once, and if it is killed they exit with it; every candidate resumes from its
    own ``last.pt``."""
    import multiprocessing

    cores = _cores()
    log.info("ω_init auto: %d candidates in %d processes", len(todo), workers)
    ctx = multiprocessing.get_context("spawn")
    jobs = [(dataclasses.replace(child, progress=False), child_resume) for child, child_resume in todo]
    bar = tqdm(total=len(jobs), desc="stage two, ω_init candidates", unit="run", disable=not progress)
    # leaving the block terminates the pool: on success nothing is left, on an error or ^C nothing lingers
    with ctx.Pool(workers, initializer=_candidate_init,
                  initargs=(max(1, cores // workers), logging.getLogger().getEffectiveLevel(), os.getpid())) as pool:
        for w, top1 in pool.imap_unordered(_candidate_run, jobs):
            log.info("ω_init %g: val top-1 %.2f", w, top1)
            bar.update()
        pool.close()  # all done: let the workers exit on their own (terminate() is for errors)
        pool.join()
    bar.close()


def _train_stage2(cfg: Stage2Config, resume: bool) -> dict:
    run = RunDir(cfg.out, resume=resume, kind="stage2", create=False)
    try:
        seed_everything(cfg.seed)
        saved = None  # the config of the run being continued (one with a checkpoint to continue from)
        if resume and (run / "last.pt").exists() and (run / "config.json").exists():
            saved = json.loads((run / "config.json").read_text())
            # before the data are read: a refused resume costs nothing
            check_resume_options(saved, dataclasses.asdict(cfg), run.path, RESUME_FREE_OPTIONS)
        data = open_stage2_data(cfg, saved)
        try:
            run.create()  # once the data are read: a data error leaves no folder behind
            return _fit(cfg, run, data, resume)
        finally:
            data.close()
    finally:
        run.release()  # now, not when a traceback that holds this frame lets it go


def _fit(cfg: Stage2Config, run: RunDir, data, resume: bool) -> dict:
    counts = data.counts
    C, d = data.num_classes, data.feature_dim
    use_kd = cfg.kd and data.has_teacher("train")
    if cfg.kd and not use_kd:
        log.warning("%s has no teacher logits in /train: KD is off for this run (re-extract with "
                    "tools/extract.py to get them)", cfg.features)

    builder = data.builder
    omega = None
    if cfg.generate and cfg.adaptive_omega and len(builder.tail_ids):
        omega = afg.AdaptiveOmega(C, builder.tail_ids, init=cfg.omega_init, step=cfg.omega_step,
                                  reference=cfg.omega_reference, margin=cfg.omega_margin)

    gen = torch.Generator().manual_seed(cfg.seed)
    head = torch.nn.Linear(d, C)
    optimizer = MomentumSGD(head.parameters(), momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    m_epoch = C * builder.n_max
    steps_per_epoch = math.ceil(m_epoch / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    start_epoch, best_val, best_epoch = 0, -1.0, 0
    last_path, best_path = run / "last.pt", run / "best.pt"
    fingerprint = data.features_fingerprint
    if resume and last_path.exists():
        ck = torch_load_checked(last_path, "delete it and resume, and the run starts again from epoch 1, or "
                                           "choose another --out")
        other_file = ck.get("features_fingerprint", fingerprint) != fingerprint
        if (ck["num_classes"], ck["feature_dim"]) != (C, d) or other_file:
            raise UsageError(f"{last_path} was trained on other features (C = {ck['num_classes']}, d = "
                             f"{ck['feature_dim']}, fingerprint {ck.get('features_fingerprint', '-')}) than "
                             f"{cfg.features} (C = {C}, d = {d}, fingerprint {fingerprint}); resume with the "
                             f"run's --features, or choose another --out")
        continue_epochs(run, cfg.epochs, ck["epoch"])
        head.load_state_dict(ck["head"])
        optimizer.load_state_dict(ck["optimizer"])
        gen.set_state(ck["generator"])
        builder.rng.bit_generator.state = _restore_rng(ck["numpy_rng"])
        if omega is not None:
            omega.load_state_dict(ck["omega"])
        start_epoch, best_val, best_epoch = ck["epoch"], ck["best_val"], ck["best_epoch"]
        run.truncate_summary(start_epoch)
        log.info("resuming %s after epoch %d", cfg.out, start_epoch)
    else:  # a new run, or one stopped before its first last.pt: (re)start at epoch 1
        run.truncate_summary(0)  # a row the stopped run wrote for an epoch it did not checkpoint
        run.write_config({**dataclasses.asdict(cfg), "n_max_resolved": builder.n_max,
                          "features_fingerprint": fingerprint,
                          "head_classes": builder.head_ids.tolist(), "generated_classes": builder.tail_ids.tolist(),
                          "resampled_classes": builder.resample_ids, **data.describe()},
                         cfg.seed)

    n_real = data.n_real
    state = None
    label = f"{cfg.method}, ω_init {cfg.omega_init:g}" if omega is not None else cfg.method
    bar = tqdm(range(start_epoch, cfg.epochs), desc=f"stage two ({label})", unit="epoch",
               disable=not cfg.progress, initial=start_epoch, total=cfg.epochs)
    for epoch in bar:
        t0 = time.time()
        batches, info = data.epoch_batches(epoch, omega, gen, cfg.batch_size, use_kd)
        tau = tau_schedule(epoch, cfg.epochs, cfg.kd_schedule, cfg.kd_alpha, cfg.kd_beta) if use_kd else 0.0
        ce_sum = kd_sum = 0.0
        n_samples = n_kd = n_steps = 0
        for xb, yb, mb, tb in batches:
            if cfg.max_steps_per_epoch and n_steps >= cfg.max_steps_per_epoch:
                log.info("epoch %d stopped after %d steps (max_steps_per_epoch)", epoch + 1, n_steps)
                break
            step = epoch * steps_per_epoch + n_steps
            lr = 0.5 * cfg.lr * (1 + math.cos(math.pi * step / total))
            ce, kd = _gradients(head, xb, yb, mb if use_kd else None, tb, tau, cfg)
            optimizer.step(lr)
            if kd is not None:
                kd_sum += kd.item() * int(mb.sum())
            ce_sum += ce.item() * len(yb)
            n_samples += len(yb)
            n_kd += int(mb.sum())
            n_steps += 1
        t_val = time.time()
        pred_val, y_val, _ = data.predict(head, "val")
        val_m = summarize(pred_val, y_val, counts)
        improved = val_m["top1"] > best_val
        if improved:
            best_val, best_epoch = val_m["top1"], epoch + 1
        if omega is not None:
            omega.update(per_class_accuracy(pred_val, y_val, C))
        t_val = time.time() - t_val
        state = {"head": head.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                 "best_val": best_val, "best_epoch": best_epoch, "generator": gen.get_state(),
                 "numpy_rng": _save_rng(builder.rng), "omega": omega.state_dict() if omega is not None else {},
                 "tukey_lambda": cfg.tukey_lambda, "num_classes": C, "feature_dim": d,
                 "features_fingerprint": fingerprint}
        row = {"epoch": epoch + 1, "lr": lr, "kd_tau": tau, "ce": ce_sum / n_samples,
               "kd": kd_sum / max(1, n_kd), "samples": n_samples, "generated": n_samples - n_real,
               **{f"val_{k}": v for k, v in val_m.items()},
               "mean_omega": float(np.mean(omega.omega[builder.tail_ids])) if omega is not None else float("nan"),
               "gen_seconds": info["data"], "seconds": time.time() - t0, "steps": n_steps, "val_seconds": t_val}
        # summary row first, last.pt last (as in stage one): a stop in between redoes this epoch
        # on resume, which truncates the summary to the checkpointed epochs
        run.append_summary(row)
        if improved:
            atomic_torch_save(state, best_path)
        atomic_torch_save(state, last_path)
        bar.set_postfix(val=f"{val_m['top1']:.2f}", best=f"{best_val:.2f}")
    bar.close()
    del head, optimizer, state  # the selected classifier is reloaded from best.pt
    return finish_stage2(cfg, run, data, counts, best_path, omega, builder)


def _gradients(head: torch.nn.Linear, xb, yb, kd_rows, teacher, tau: float, cfg: Stage2Config):
    """Set ``head``'s gradients of ``CE + τ·KD`` on one batch (METHOD.md step 8); returns (ce, kd or None).

    ``cfg.closed_form_grad``: the gradient from :func:`glag.losses.ce_kd_logit_grad`, two small
    GEMMs and no autograd graph (the default, several times faster on these tiny heads);
    otherwise autograd through ``F.cross_entropy`` and :func:`glag.losses.kd_loss`, the oracle.
    """
    has_kd = kd_rows is not None and teacher is not None and bool(kd_rows.any())
    if cfg.closed_form_grad:
        with torch.no_grad():
            z = torch.addmm(head.bias, xb, head.weight.t())
            g, ce, kd = ce_kd_logit_grad(z, yb, kd_rows if has_kd else None, teacher, tau, cfg.kd_temperature)
            head.weight.grad = g.t() @ xb
            head.bias.grad = g.sum(0)
        return ce, kd
    z = head(xb)
    ce = F.cross_entropy(z, yb)
    loss, kd = ce, None
    if has_kd:
        kd = kd_loss(z[kd_rows], teacher, cfg.kd_temperature)
        loss = ce + tau * kd
    head.zero_grad(set_to_none=True)
    loss.backward()
    return ce.detach(), None if kd is None else kd.detach()


def _save_rng(rng: np.random.Generator) -> dict:
    st = rng.bit_generator.state
    return {"bit_generator": st["bit_generator"], "state": str(st["state"]["state"]),
            "inc": str(st["state"]["inc"]), "has_uint32": st["has_uint32"], "uinteger": st["uinteger"]}


def _restore_rng(saved: dict) -> dict:
    return {"bit_generator": saved["bit_generator"],
            "state": {"state": int(saved["state"]), "inc": int(saved["inc"])},
            "has_uint32": saved["has_uint32"], "uinteger": saved["uinteger"]}


def finish_stage2(cfg, run, data, counts, best_path, omega, builder) -> dict:
    """Evaluate the selected classifier once on val and test; write metrics.json and omega.json."""
    C = data.num_classes
    best = torch_load_checked(best_path, f"the run folder {run.path} is damaged; run again with another --out")
    head = torch.nn.Linear(data.feature_dim, C)
    head.load_state_dict(best["head"])
    best = {"best_epoch": best["best_epoch"]}  # drop the optimizer state it also holds
    metrics = {"method": cfg.method, "best_epoch": best["best_epoch"], "selected_on": "val",
               "class_counts": counts.tolist(), "stage1": {}, "stage2": {}, "per_class": {},
               **data.describe()}
    for name in ("val", "test"):
        if name not in data.splits:
            continue
        pred, labels, p1 = data.predict(head, name, teacher=True)
        metrics["stage2"][name] = summarize(pred, labels, counts)
        metrics["per_class"][f"stage2_{name}"] = per_class_accuracy(pred, labels, C).tolist()
        if p1 is not None:
            metrics["stage1"][name] = summarize(p1, labels, counts)
            metrics["per_class"][f"stage1_{name}"] = per_class_accuracy(p1, labels, C).tolist()
    if omega is not None:
        atomic_write_json(run / "omega.json", {"tail_classes": builder.tail_ids.tolist(),
                                               "history": [h.tolist() for h in omega.history]})
    run.write_metrics(metrics)
    rows = {f"stage1 {k}": v for k, v in metrics["stage1"].items()}
    rows.update({f"{cfg.method} {k}": v for k, v in metrics["stage2"].items()})
    log.info("best epoch %d (chosen on val)\n%s", best["best_epoch"], format_table(rows))
    return metrics
