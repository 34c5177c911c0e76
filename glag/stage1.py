"""Stage one: train a backbone end to end with CE, LA, Balanced Softmax or GraLoss (METHOD.md, stage one).

One loop for every method; they differ only in the loss's τ(t) (:class:`glag.losses.StageOneLoss`).
SGD with momentum 0.9, weight decay 5e-4, cosine learning rate per step, random crop + flip.
The model is selected on the **validation** split; the test split is evaluated once, at the end,
with the selected checkpoint.

Checkpoints are plain dicts written atomically (``last.pt`` every epoch, ``best.pt`` on a new best
validation top-1); ``resume=True`` continues from ``last.pt`` with the same data order.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import build_dataset, iterate_batches
from .inference import evaluate
from .losses import SCHEDULES, StageOneLoss, log_prior
from .metrics import format_table
from .models import create_model
from .runs import RunDir, atomic_torch_save, seed_everything

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1


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
    image_size: int = 224
    arch: str | None = None  # default: resnet32 (fmnist-lt, cifar100-lt), resnet10 (list)
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
        if self.loss not in StageOneLoss.METHODS:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of {', '.join(StageOneLoss.METHODS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("--epochs and --batch-size must be at least 1")
        if self.arch is None:
            self.arch = "resnet10" if self.dataset == "list" else "resnet32"


def dataset_from_config(cfg) -> object:
    """Build the dataset a config names (the stage-one config or the extraction one)."""
    kw = {}
    if cfg.dataset == "list":
        kw = dict(train_list=cfg.train_list, val_list=cfg.val_list, test_list=cfg.test_list,
                  image_root=cfg.image_root, image_size=cfg.image_size)
    return build_dataset(cfg.dataset, root=cfg.data_root, imbalance_factor=cfg.imbalance_factor,
                         n_max=cfg.n_max, val_per_class=cfg.val_per_class, seed=cfg.seed, **kw)


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
        raise FileNotFoundError(f"checkpoint {path} does not exist; train one with tools/train_stage1.py "
                                f"(it writes best.pt and last.pt into its --out folder)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a corrupt file
        raise ValueError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {exc}); "
                         f"it may be truncated: use the run's other checkpoint or retrain") from exc
    missing = {"model", "arch", "num_classes", "in_channels", "version"} - set(ckpt if isinstance(ckpt, dict) else ())
    if missing:
        raise ValueError(f"{path} is not a glag stage-one checkpoint (missing {sorted(missing)})")
    return ckpt


def model_from_checkpoint(ckpt: dict):
    """Rebuild the model a checkpoint describes and load its weights (errors name a mismatch)."""
    model = create_model(ckpt["arch"], ckpt["num_classes"], ckpt["in_channels"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise ValueError(f"the checkpoint's weights do not fit a {ckpt['arch']} with {ckpt['num_classes']} "
                         f"classes and {ckpt['in_channels']} input channels: {str(exc).splitlines()[0]}") from exc
    return model


def train_stage1(cfg: Stage1Config, resume: bool = False) -> dict:
    """Train stage one as ``cfg`` says; returns the metrics written to ``metrics.json``.

    The run folder ``cfg.out`` receives config.json, env.json, indices.npz, summary.csv,
    last.pt, best.pt and metrics.json.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = RunDir(cfg.out, resume=resume)
    seed_everything(cfg.seed)
    data = dataset_from_config(cfg)
    log.info("data: %s", data.describe())
    counts = np.asarray(data.class_counts)

    model = create_model(cfg.arch, data.num_classes, data.in_channels)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=cfg.lr, momentum=cfg.momentum)
    loss_fn = StageOneLoss(cfg.loss, log_prior(counts), cfg.epochs, cfg.tau, cfg.schedule,
                           cfg.tau_alpha, cfg.tau_beta)

    steps_per_epoch = math.ceil(len(data.train) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    start_epoch, best_val, best_epoch = 0, -1.0, -1
    last_path, best_path = run / "last.pt", run / "best.pt"
    if resume and last_path.exists():
        ckpt = load_checkpoint(last_path)
        if ckpt.get("config", {}).get("arch") != cfg.arch or ckpt["num_classes"] != data.num_classes:
            raise ValueError(f"{last_path} was trained with another architecture or class count; "
                             f"resume with the same options or choose another --out")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, best_val, best_epoch = ckpt["epoch"], ckpt["best_val"], ckpt["best_epoch"]
        torch.set_rng_state(ckpt["torch_rng"])
        log.info("resuming %s after epoch %d (best val %.2f at epoch %d)", cfg.out, start_epoch, best_val, best_epoch)
        run.truncate_summary(start_epoch)
    else:
        run.write_config(dataclasses.asdict(cfg), cfg.seed)
        np.savez(run / "indices.npz", class_counts=counts, **data.indices)

    def checkpoint(epoch: int) -> dict:
        return {"version": CHECKPOINT_VERSION, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "epoch": epoch, "best_val": best_val, "best_epoch": best_epoch, "arch": cfg.arch,
                "num_classes": data.num_classes, "in_channels": data.in_channels,
                "feature_dim": model.feature_dim, "class_counts": counts.tolist(), "dataset": data.name,
                "config": dataclasses.asdict(cfg), "torch_rng": torch.get_rng_state()}

    step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        t0, loss_sum, correct, seen = time.time(), 0.0, 0, 0
        batches = iterate_batches(data.train, cfg.batch_size, shuffle=True, augment=True, seed=cfg.seed,
                                  epoch=epoch, num_workers=cfg.num_workers)
        bar = tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not cfg.progress, unit="batch")
        for i, (x, y, _) in enumerate(bar):
            lr = cosine_lr(cfg.lr, step, total_steps, cfg.warmup_epochs * steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            z = model(x)
            loss = loss_fn(z, y, epoch + i / steps_per_epoch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at epoch {epoch + 1}, step {i}; "
                                         f"lower --lr (now {cfg.lr}) or check the data")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            loss_sum += loss.item() * len(y)
            correct += (z.argmax(1) == y).sum().item()
            seen += len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", lr=f"{lr:.4f}")
        val, _ = evaluate(model, data.val, counts, cfg.eval_batch_size, cfg.num_workers)
        improved = val["top1"] > best_val
        if improved:
            best_val, best_epoch = val["top1"], epoch + 1
        ckpt = checkpoint(epoch + 1)
        if improved:
            atomic_torch_save(ckpt, best_path)
        atomic_torch_save(ckpt, last_path)
        row = {"epoch": epoch + 1, "lr": lr, "tau": loss_fn.tau_at(epoch + 1), "train_loss": loss_sum / seen,
               "train_acc": 100.0 * correct / seen, **{f"val_{k}": v for k, v in val.items()},
               "seconds": time.time() - t0}
        run.append_summary(row)
        log.info("epoch %d/%d loss %.3f train %.1f%% val %.2f%% (many %.1f med %.1f few %.1f) %.1fs%s",
                 epoch + 1, cfg.epochs, row["train_loss"], row["train_acc"], val["top1"], val["many"],
                 val["medium"], val["few"], row["seconds"], " *" if improved else "")

    best = load_checkpoint(best_path)
    model.load_state_dict(best["model"])
    val, _ = evaluate(model, data.val, counts, cfg.eval_batch_size, cfg.num_workers)
    test, _ = evaluate(model, data.test, counts, cfg.eval_batch_size, cfg.num_workers)
    metrics = {"best_epoch": best["best_epoch"], "selected_on": "val", "loss": cfg.loss,
               "val": val, "test": test, "class_counts": counts.tolist(), "checkpoint": str(best_path)}
    run.write_metrics(metrics)
    log.info("best epoch %d (chosen on val)\n%s", best["best_epoch"], format_table({"val": val, "test": test}))
    return metrics
