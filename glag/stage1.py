"""Stage one: train a backbone end to end with CE, LA, Balanced Softmax or GraLoss (METHOD.md, stage one).

One loop for every method; they differ only in the loss's τ(t) (:class:`glag.losses.StageOneLoss`).
SGD with momentum 0.9, weight decay 5e-4, cosine learning rate per step, random crop + flip.
The model is selected on the **validation** split; the test split is evaluated once, at the end,
with the selected checkpoint.

Checkpoints are plain dicts written atomically (``last.pt`` every epoch, ``best.pt`` on a new best
validation top-1); ``resume=True`` continues from ``last.pt`` with the same data order.

Multi-process (``torchrun --nproc_per_node N``, :mod:`glag.distributed`): the same loop, with the
model wrapped in ``DistributedDataParallel`` (gloo on CPU, nccl on GPU).

* ``batch_size`` is the **global** batch (the effective batch of one optimizer step, logged and
  saved in ``metrics.json``); each of the N processes takes ``batch_size / N`` rows of it, so it
  must be a multiple of N. Every process draws the same shuffled order from ``seed`` and takes
  its contiguous part of each global batch (:func:`glag.data.base.rank_rows`); the last, short
  batch of an epoch is padded with the epoch's first rows so that every process gets as many
  rows and batches as the others. The learning-rate schedule and step count are those of one
  process with the same ``batch_size``.
* Per-process randomness (augmentation, torch's global RNG) is seeded with ``seed + rank``; the
  initial weights are rank 0's (DDP broadcasts them), i.e. those of a single-process run.
* Validation and test are sharded: each process evaluates a contiguous part of the split with
  rank 0's BatchNorm statistics, predictions are gathered, and all processes compute the same
  metrics (identical to a single-process evaluation of the same weights).
* Only rank 0 writes the run folder (config, summary, checkpoints, metrics). Checkpoints hold
  the unwrapped model's ``state_dict`` (no ``module.`` prefix), so they load anywhere.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import distributed
from .data import build_dataset, iterate_batches, num_batches
from .data.base import shard_split
from .errors import InputNotFoundError, UsageError
from .inference import iterate_outputs
from .losses import SCHEDULES, StageOneLoss, log_prior
from .metrics import format_table, summarize
from .models import create_model
from .options import check_ranges
from .runs import (RunDir, atomic_torch_save, check_resume_options, continue_epochs, seed_everything,
                   torch_load_checked)

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1


# What each option must be (glag.options.check_ranges; None where allowed means unset).
_RANGES = dict(
    int_min={"n_max": 1, "val_per_class": 1, "image_size": 1, "epochs": 1, "batch_size": 1, "warmup_epochs": 0,
             "seed": 0, "num_workers": 0, "eval_batch_size": 1, "threads": 1},
    float_range={  # (low, low inclusive, high, high inclusive)
        "imbalance_factor": (1.0, True, math.inf, False), "tau": (0.0, True, math.inf, False),
        "tau_alpha": (0.0, True, math.inf, False), "tau_beta": (0.0, True, math.inf, False),
        "lr": (0.0, False, math.inf, False), "momentum": (0.0, True, 1.0, False),
        "weight_decay": (0.0, True, math.inf, False)},
    choices={"loss": StageOneLoss.METHODS, "schedule": SCHEDULES},
    unset_ok={"threads"},
)


@dataclass
class Stage1Config:
    """Every knob of a stage-one run; saved as the run's ``config.json``."""

    out: str = "runs/stage1"
    dataset: str = "fmnist-lt"
    data_root: str | None = None
    imbalance_factor: float = 100.0
    n_max: int = 500
    val_per_class: int = 20
    train_list: str | None = None
    val_list: str | None = None
    test_list: str | None = None
    image_root: str | None = None
    image_size: int = 224  # list and folder datasets
    arch: str | None = None  # default: resnet32 (fmnist-lt, cifar100-lt), resnet10 (list, folder)
    loss: str = "graloss"
    tau: float = 1.0  # the fixed τ of "la"
    schedule: str = "power"
    tau_alpha: float = 1.0
    tau_beta: float = 2.0
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 0
    seed: int = 0
    num_workers: int = 0
    eval_batch_size: int = 512
    channels_last: bool = True
    threads: int | None = None
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        """Check every option (UsageError naming the flag) and fill in the default arch."""
        check_ranges(dataclasses.asdict(self), **_RANGES)
        if self.warmup_epochs >= self.epochs:
            raise UsageError(f"--warmup-epochs {self.warmup_epochs} must be below --epochs {self.epochs}: the "
                             f"learning rate warms up to --lr over those epochs, then decays over the rest; "
                             f"lower --warmup-epochs or raise --epochs")
        if self.arch is None:
            self.arch = "resnet10" if self.dataset in ("list", "folder") else "resnet32"


def _absolute_paths(cfg: Stage1Config) -> Stage1Config:
    """``cfg`` with its data paths made absolute, so that a run resumed (or extracted) from another
    folder finds its data. A list file is taken where the dataset would find it: relative to the
    working folder, else to the image root; one found in neither is left as given."""
    new = {k: os.path.abspath(getattr(cfg, k)) for k in ("data_root", "image_root") if getattr(cfg, k)}
    root = new.get("image_root") or new.get("data_root")
    for key in ("train_list", "val_list", "test_list"):
        name = getattr(cfg, key)
        if not name or os.path.isabs(name):
            continue
        if os.path.exists(name):
            new[key] = os.path.abspath(name)
        elif root and os.path.exists(os.path.join(root, name)):
            new[key] = os.path.join(root, name)
    return dataclasses.replace(cfg, **new)


# Options a resumed run may change: where things are and how fast they run, not what is computed
# (not --threads: the order of a CPU step's sums follows the thread count).
def _launch_hint(processes: int) -> str:
    """How to start ``processes`` processes of stage one (for messages)."""
    return "one process (no torchrun)" if processes == 1 else f"torchrun --nproc_per_node {processes} (or nodes x " \
        f"processes per node = {processes})"


RESUME_FREE_OPTIONS = frozenset({"out", "data_root", "image_root", "train_list", "val_list", "test_list",
                                 "num_workers", "eval_batch_size", "channels_last", "progress"})


def dataset_from_config(cfg) -> object:
    """Build the dataset a config names (the stage-one config or the extraction one)."""
    kw = {}
    if cfg.dataset == "list":
        kw = dict(train_list=cfg.train_list, val_list=cfg.val_list, test_list=cfg.test_list,
                  image_root=cfg.image_root, image_size=cfg.image_size)
    elif cfg.dataset == "folder":
        kw = dict(image_size=cfg.image_size)
    return build_dataset(cfg.dataset, root=cfg.data_root, imbalance_factor=cfg.imbalance_factor,
                         n_max=cfg.n_max, val_per_class=cfg.val_per_class, seed=cfg.seed, **kw)


def check_same_samples(checkpoint: Path, ckpt: dict, data) -> None:
    """Refuse data whose train/val/test samples are not the ones the stage-one run saw, as its
    run folder recorded them (``indices.npz`` beside the checkpoint): another copy of the data
    can give the same class counts. Without a readable record (a checkpoint moved out of its run
    folder, an older run) warn that this could not be checked."""
    record = checkpoint.parent / "indices.npz"
    here = data.config.get("image_root" if data.name == "list" else "root") or "the dataset's folder"
    unchecked = ("cannot check that the data at %s holds the samples the run was trained on; make sure it "
                 "is the data the run used")
    try:
        with np.load(record) as f:
            seen = {k: np.asarray(f[k]) for k in f.files}
    except FileNotFoundError:
        log.warning("%s has no indices.npz beside it (moved out of its run folder, or an older run): " + unchecked,
                    checkpoint, here)
        return
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        log.warning("%s is unreadable (%s): " + unchecked, record, e, here)
        return
    if "class_counts" in seen and seen["class_counts"].tolist() != list(ckpt["class_counts"]):
        log.warning("%s is another run's (class counts %s, the checkpoint's %s): " + unchecked, record,
                    seen["class_counts"].tolist(), list(ckpt["class_counts"]), here)
        return
    problems = []
    for split, now in data.indices.items():
        if split not in seen:
            continue
        then = seen[split]
        if len(now) != len(then):
            problems.append(f"the {split} split has {len(now)} images here, {len(then)} in the run")
        elif not np.array_equal(now, then):
            k = int(np.argmax(now != then))
            problems.append(f"the {split} split holds other samples (row {k}: sample {int(now[k])} here, "
                            f"{int(then[k])} in the run)")
    if problems:
        cfg = ckpt.get("config", {})
        there = cfg.get("image_root") if cfg.get("dataset") == "list" else None
        there = there or cfg.get("data_root")
        there = there or "the dataset's default folder (or $GLAG_DATA_ROOT) of the machine it ran on"
        raise UsageError(f"{checkpoint}: the data at {here} is not the data this run was trained on "
                         f"({'; '.join(problems)}; the run's samples are recorded in {record}). Pass the "
                         f"--data-root the run used ({there}), or a copy of that data")


def cosine_lr(base_lr: float, step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """Linear warm-up then half-cosine decay from ``base_lr`` to 0 over ``total_steps``."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    p = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(p, 1.0)))


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load a glag checkpoint safely (``weights_only=True``) and check that it is one of ours."""
    path = Path(path)
    if not path.exists():
        raise InputNotFoundError(f"checkpoint {path} does not exist; train one with tools/train_stage1.py "
                                 f"(it writes best.pt and last.pt into its --out folder)")
    ckpt = torch_load_checked(path, "give a stage-one run's best.pt or last.pt (the other one, if this one "
                                    "is damaged), or retrain", map_location)
    missing = {"model", "arch", "num_classes", "in_channels", "version"} - set(ckpt if isinstance(ckpt, dict) else ())
    if missing:
        raise UsageError(f"{path} is not a glag stage-one checkpoint (missing {sorted(missing)})")
    return ckpt


def model_from_checkpoint(ckpt: dict):
    """Rebuild the model a checkpoint describes and load its weights (errors name a mismatch)."""
    model = create_model(ckpt["arch"], ckpt["num_classes"], ckpt["in_channels"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise UsageError(f"the checkpoint's weights do not fit a {ckpt['arch']} with {ckpt['num_classes']} "
                         f"classes and {ckpt['in_channels']} input channels: {str(exc).splitlines()[0]}") from exc
    return model


def evaluate_split(model, split, class_counts, batch_size: int, *, num_workers: int = 0,
                   channels_last: bool = True, device=None) -> dict:
    """Top-1 and Many/Medium/Few (%) of ``model`` on ``split`` (see :func:`glag.metrics.summarize`).

    Under torchrun every process must call it: each predicts a contiguous, batch-aligned shard
    (:func:`glag.data.base.shard_split`), the predictions (int64 [N_r]) are gathered in rank
    order (= split order) and every process returns the same metrics, equal to a one-process
    evaluation. The caller makes the weights equal on all processes first.
    """
    part = shard_split(split, distributed.rank(), distributed.world_size(), batch_size)
    net = distributed.on_device(model, device or torch.device("cpu"))
    preds = [z.argmax(1).numpy() for _, z, _, _ in
             iterate_outputs(net, part, batch_size, num_workers=num_workers, channels_last=channels_last)]
    pred = np.concatenate(preds) if preds else np.zeros(0, np.int64)
    pred = np.concatenate(distributed.all_gather_object(pred))
    return summarize(pred, split.labels, class_counts)


def train_stage1(cfg: Stage1Config, resume: bool = False) -> dict:
    """Train stage one as ``cfg`` says; returns the metrics written to ``metrics.json``.

    The run folder ``cfg.out`` receives config.json, env.json, indices.npz, summary.csv,
    last.pt, best.pt and metrics.json. Under torchrun (see the module docstring) every process
    calls this; it joins the process group itself (:func:`glag.distributed.init_from_env`) and
    only rank 0 writes.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cfg = _absolute_paths(cfg)
    rank, world = distributed.init_from_env()
    dev = distributed.device()
    if cfg.batch_size % world:
        raise UsageError(f"--batch-size {cfg.batch_size} is the global batch and must be a multiple of the "
                         f"{world} processes; use e.g. {cfg.batch_size - cfg.batch_size % world or world}")
    run = RunDir(cfg.out, resume=resume, create=False, kind="stage1")  # each process checks before any writes
    try:
        return _train(cfg, resume, run, rank, world, dev)
    except UsageError:  # a new run refused before its first checkpoint (a damaged image): nothing of it kept
        if rank == 0 and not (run / "last.pt").exists():
            run.discard_new()
        raise
    finally:
        run.release()  # rank 0's lock on the folder: now, not when a traceback holding the frame goes


def _train(cfg: Stage1Config, resume: bool, run: RunDir, rank: int, world: int, dev: torch.device) -> dict:
    """The body of :func:`train_stage1`, in process ``rank`` of ``world``."""
    main = rank == 0
    distributed.barrier()
    seed_everything(cfg.seed + rank)
    data = dataset_from_config(cfg)
    if main:  # made once the data are known to be there: a data error leaves no folder behind
        run.create()
    log.info("data: %s", data.describe())
    counts = np.asarray(data.class_counts)

    model = create_model(cfg.arch, data.num_classes, data.in_channels).to(dev)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=cfg.lr, momentum=cfg.momentum)
    loss_fn = StageOneLoss(cfg.loss, log_prior(counts).to(dev), cfg.epochs, cfg.tau, cfg.schedule,
                           cfg.tau_alpha, cfg.tau_beta)

    # BatchNorm cannot train on one image a process: a last batch that small (N % batch <= processes)
    # is left out of each epoch (the shuffle leaves out other images each time); others are kept
    left = len(data.train) % cfg.batch_size
    drop_last = 0 < left <= world
    if drop_last:
        log.info("the last batch of each epoch would hold %d image(s) for %d process(es), too few for "
                 "BatchNorm: it is left out (another %d each epoch, by the shuffle)", left, world, left)
    steps_per_epoch = num_batches(data.train, cfg.batch_size, drop_last)
    total_steps = steps_per_epoch * cfg.epochs
    log.info("%d process(es) x %d images = effective batch %d (global), %d steps per epoch, device %s",
             world, cfg.batch_size // world, cfg.batch_size, steps_per_epoch, dev)
    start_epoch, best_val, best_epoch = 0, -1.0, -1
    last_path, best_path = run / "last.pt", run / "best.pt"
    if resume and last_path.exists():
        ckpt = load_checkpoint(last_path)
        check_resume_options(ckpt.get("config", {}), dataclasses.asdict(cfg), last_path, RESUME_FREE_OPTIONS)
        if ckpt["num_classes"] != data.num_classes or list(ckpt["class_counts"]) != counts.tolist():
            raise UsageError(f"{last_path} was trained on {ckpt['num_classes']} classes of "
                             f"{list(ckpt['class_counts'])} images, but the data now gives {data.num_classes} of "
                             f"{counts.tolist()}; point --data-root at the run's data or choose another --out")
        check_same_samples(last_path, ckpt, data)  # another copy of the data, with the same class counts
        if ckpt.get("world_size", world) != world:  # (checkpoints before it was saved: not known)
            raise UsageError(f"{last_path} was trained by {ckpt['world_size']} process(es), and this run has {world}: "
                             f"each process's augmentation stream (seed + rank) and share of the batch follow the "
                             f"process count, so the result would be neither run's. Resume with "
                             f"{_launch_hint(ckpt['world_size'])}, or choose another --out")
        continue_epochs(run, cfg.epochs, ckpt["epoch"], write=main)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, best_val, best_epoch = ckpt["epoch"], ckpt["best_val"], ckpt["best_epoch"]
        if main:  # the other ranks keep their seed + rank streams
            torch.set_rng_state(ckpt["torch_rng"])
        log.info("resuming %s after epoch %d (best val %.2f at epoch %d)", cfg.out, start_epoch, best_val, best_epoch)
        if main:
            run.truncate_summary(start_epoch)
    elif main:  # a new run, or one stopped before its first last.pt: (re)start at epoch 1
        run.write_config(dataclasses.asdict(cfg), cfg.seed)
        np.savez(run / "indices.npz", class_counts=counts, **data.indices)
        run.truncate_summary(0)  # a row the stopped run wrote for an epoch it did not checkpoint

    net = model  # what the loop calls; the DDP wrapper averages gradients over processes
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)

    def checkpoint(epoch: int) -> dict:
        return {"version": CHECKPOINT_VERSION, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "epoch": epoch, "best_val": best_val, "best_epoch": best_epoch, "arch": cfg.arch,
                "num_classes": data.num_classes, "in_channels": data.in_channels,
                "feature_dim": model.feature_dim, "class_counts": counts.tolist(), "dataset": data.name,
                "config": dataclasses.asdict(cfg), "torch_rng": torch.get_rng_state(), "world_size": world}

    def evaluate(split) -> dict:
        distributed.broadcast_buffers(model)  # rank 0's BatchNorm statistics, as in its checkpoint
        return evaluate_split(model, split, counts, cfg.eval_batch_size, num_workers=cfg.num_workers,
                              channels_last=cfg.channels_last, device=dev)

    step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, cfg.epochs):
        net.train()
        t0, loss_sum, correct, seen = time.time(), 0.0, 0, 0
        batches = iterate_batches(data.train, cfg.batch_size, shuffle=True, augment=True, seed=cfg.seed,
                                  epoch=epoch, num_workers=cfg.num_workers, rank=rank, world_size=world,
                                  drop_last=drop_last)
        bar = tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not (cfg.progress and main), unit="batch")
        for i, (x, y, _) in enumerate(bar):
            lr = cosine_lr(cfg.lr, step, total_steps, cfg.warmup_epochs * steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            z = net(x)
            loss = loss_fn(z, y, epoch + i / steps_per_epoch)
            if not torch.isfinite(loss):
                raise UsageError(f"loss became {loss.item()} at epoch {epoch + 1}, step {i}"
                                 f"{f' on rank {rank}' if world > 1 else ''}; lower --lr (now {cfg.lr}) or check "
                                 f"the data, and start again in another --out (or delete {cfg.out})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            loss_sum += loss.item() * len(y)
            correct += (z.argmax(1) == y).sum().item()
            seen += len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", lr=f"{lr:.4f}")
        # training loss / accuracy over all processes (padded rows included)
        loss_sum, correct, seen = distributed.all_reduce_sum(
            torch.tensor([loss_sum, correct, seen], dtype=torch.float64, device=dev)).tolist()
        val = evaluate(data.val)
        improved = val["top1"] > best_val
        if improved:
            best_val, best_epoch = val["top1"], epoch + 1
        row = {"epoch": epoch + 1, "lr": lr, "tau": loss_fn.tau_at(epoch + 1), "train_loss": loss_sum / seen,
               "train_acc": 100.0 * correct / seen, **{f"val_{k}": v for k, v in val.items()},
               "seconds": time.time() - t0}
        if main:  # summary row first, last.pt last: a kill in between redoes this epoch on resume
            run.append_summary(row)
            ckpt = checkpoint(epoch + 1)
            if improved:
                atomic_torch_save(ckpt, best_path)
            atomic_torch_save(ckpt, last_path)
        log.info("epoch %d/%d loss %.3f train %.1f%% val %.2f%% (many %.1f med %.1f few %.1f) %.1fs%s",
                 epoch + 1, cfg.epochs, row["train_loss"], row["train_acc"], val["top1"], val["many"],
                 val["medium"], val["few"], row["seconds"], " *" if improved else "")

    distributed.barrier()  # best.pt is on disk for every process
    best = load_checkpoint(best_path)
    model.load_state_dict(best["model"])
    val = evaluate(data.val)
    test = evaluate(data.test)
    metrics = {"best_epoch": best["best_epoch"], "selected_on": "val", "loss": cfg.loss,
               "val": val, "test": test, "class_counts": counts.tolist(), "checkpoint": str(best_path),
               "world_size": world, "batch_size": cfg.batch_size, "batch_size_per_process": cfg.batch_size // world}
    if main:
        run.write_metrics(metrics)
    log.info("best epoch %d (chosen on val)\n%s", best["best_epoch"], format_table({"val": val, "test": test}))
    return metrics
