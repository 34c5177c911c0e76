"""Extraction: run a stage-one checkpoint over train/val/test and stream features + logits to HDF5.

Writes DESIGN.md's schema through :class:`glag.features.FeatureWriter` into ``<out>.partial``,
batch by batch (memory bounded by one batch), and renames it to ``<out>`` when every split is
complete. Re-running the same command after an interruption resumes from the rows already written.

Sharded (``torchrun --nproc_per_node N tools/extract.py ...``): each process extracts a
contiguous, batch-aligned shard of every split (:func:`glag.data.base.shard_bounds`) into its
own feature file ``<out>.rank<r>of<N>`` (written through ``<out>.rank<r>of<N>.partial`` like any
feature file: atomic and resumable). After a barrier rank 0 merges the shards, in rank order,
which is split order, into ``<out>`` (again through ``<out>.partial``: atomic, resumable), checks
that every split's ``index`` is the dataset's, and deletes the shards. Every forward pass sees
exactly the batches a single process would, so the merged file holds the same arrays and
attributes as a one-process extraction with the same ``--batch-size``. A re-run after a kill
reuses finished shards and resumes unfinished ones (with the same N).
"""
from __future__ import annotations

import glob
import logging
import os
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

import glag

from . import distributed
from .data.base import shard_split
from .errors import UsageError
from .features import FeatureFileError, FeatureWriter, open_features, sha256_file
from .inference import iterate_outputs
from .options import check_ranges, flag
from .stage1 import (Stage1Config, check_same_samples, dataset_from_config, load_checkpoint,
                     model_from_checkpoint)

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# Rows per read/append while merging shards (bounded memory: ~this × (d + C) × 4 bytes).
MERGE_CHUNK_ROWS = 8192


def shard_path(out: Path, rank: int, world_size: int) -> Path:
    """The feature file of ``rank``'s shard of ``out``: ``<out>.rank<r>of<N>``."""
    out = Path(out)
    return out.with_name(f"{out.name}.rank{rank}of{world_size}")


def _write_splits(writer: FeatureWriter, splits: dict, model, batch_size: int, *, num_workers: int,
                  channels_last: bool, progress: bool, label: str = "") -> None:
    """Extract every split of ``splits`` ({name: Split}) into ``writer``, resuming each at
    ``writer.rows_done``: a finished split is skipped (its last batch may be short), an
    unfinished one must hold a whole number of batches."""
    for name, split in splits.items():
        done = writer.rows_done(name)
        if done == len(split):
            continue
        if done % batch_size:
            raise UsageError(f"{writer.partial_path} holds {done} rows of {name}, not a multiple of the batch "
                             f"size {batch_size}: resume with the --batch-size of the interrupted run")
        if done:
            log.info("resuming %s%s at row %d of %d", name, label, done, len(split))
        bar = tqdm(total=len(split), initial=done, desc=f"extract {name}{label}", unit="img", disable=not progress)
        for f, z, y, idx in iterate_outputs(model, split, batch_size, start_batch=done // batch_size,
                                            num_workers=num_workers, channels_last=channels_last):
            writer.append(name, f.numpy(), y.numpy(), idx.numpy(), z.numpy())
            bar.update(len(y))
        bar.close()


def extract_features(checkpoint, out, *, batch_size: int = 512, dtype: str = "float32", data_root=None,
                     overwrite: bool = False, num_workers: int = 0, progress: bool = True,
                     splits=SPLITS) -> Path:
    """Write the feature file ``out`` for the run that produced ``checkpoint``; returns its path.

    The dataset (and its LT subset, by seed) is rebuilt from the config stored in the checkpoint,
    so the train split is exactly the one stage one saw. ``data_root`` overrides where the
    images are (the run may have been trained on another machine): the run's ``data_root``, or
    for a list dataset its ``image_root``. The samples are checked against the ones the run
    recorded (``indices.npz`` in the checkpoint's run folder; without one, a warning). Under
    torchrun every process calls this and gets the merged file's path once it is complete
    (module docstring).

    Raises:
        FileNotFoundError / ValueError: a missing, corrupt or mismatched checkpoint (e.g. weights
            of another architecture).
        UsageError: ``batch_size`` < 1, ``num_workers`` < 0, data that is not the run's.
        FeatureFileError: ``out`` exists (without ``overwrite``) or is a folder, cannot be
            written, a stale ``.partial`` or shard, non-finite features. A complete ``out`` is
            never touched by a failed run.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    # refused before anything is read or created, on every process alike
    check_ranges({"batch_size": batch_size, "num_workers": num_workers}, int_min={"batch_size": 1, "num_workers": 0})
    if out.is_dir():  # even with overwrite: the finished file could never be renamed onto it
        raise FeatureFileError(f"{out}: is a folder; --out is the feature file to write. Give a file name, "
                               f"e.g. --out {out / 'feats.h5'}")
    rank, world = distributed.init_from_env()
    main = rank == 0
    if out.exists() and not overwrite:  # fail before hours of work, on every process alike
        shards = sorted(p.name for p in out.parent.glob(f"{glob.escape(out.name)}.rank*of*"))
        left = (f" Shard files of a sharded extraction are beside it ({', '.join(shards)}): a run stopped "
                f"between writing {out.name} and removing them leaves them, and then they can be deleted."
                if shards else "")
        raise FeatureFileError(f"{out}: already exists (a complete feature file is never replaced silently). "
                               f"Pass --overwrite, delete it, or choose another --out.{left}")
    ckpt = load_checkpoint(checkpoint)
    cfg_dict = dict(ckpt["config"])
    if data_root is not None:
        cfg_dict["data_root"] = str(data_root)
        if cfg_dict.get("dataset") == "list":  # the images' folder, which wins over data_root there
            _move_list_files(cfg_dict, data_root)
            cfg_dict["image_root"] = str(data_root)
    cfg = Stage1Config(**{k: v for k, v in cfg_dict.items() if k in Stage1Config.__dataclass_fields__})
    data = dataset_from_config(cfg)
    counts = np.asarray(data.class_counts)
    if counts.tolist() != list(ckpt["class_counts"]):
        raise UsageError(f"the dataset rebuilt from {checkpoint}'s config has class counts {counts.tolist()}, "
                         f"but the model was trained on {ckpt['class_counts']}; check --data-root")
    check_same_samples(checkpoint, ckpt, data)
    dev = distributed.device()
    model = model_from_checkpoint(ckpt).to(dev)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = distributed.on_device(model, dev)
    # num_classes and feature_dim are the writer's own attributes (FeatureWriter rejects them here)
    attrs = {"class_counts": counts, "backbone": ckpt["arch"], "checkpoint_sha256": sha256_file(checkpoint),
             "dataset": data.name, "created_by": f"glag {glag.__version__}", "stage1_loss": cfg.loss,
             "seed": cfg.seed, "imbalance_factor": cfg.imbalance_factor}
    split_objs = {name: getattr(data, name) for name in splits}
    run = dict(num_workers=num_workers, channels_last=cfg.channels_last, progress=progress and main)
    fmt = dict(feature_dim=model.feature_dim, num_classes=data.num_classes, dtype=dtype, with_logits=True)

    if world == 1:
        with FeatureWriter(out, split_sizes={k: len(v) for k, v in split_objs.items()}, attrs=attrs,
                           overwrite=overwrite, **fmt) as writer:
            _write_splits(writer, split_objs, net, batch_size, **run)
            path = writer.finalize()
        log.info("wrote %s", path)
        return path

    # ---- sharded: one file per process, then rank 0 merges
    if "train" not in split_objs:
        raise UsageError(f"--splits {' '.join(splits)}: a feature file needs the train split (class_counts)")
    n_train = len(split_objs["train"])
    if -(-n_train // batch_size) < world:
        raise UsageError(f"the train split has {n_train} images, fewer than {world} batches of --batch-size "
                         f"{batch_size}: every process needs at least one batch; lower --batch-size or run "
                         f"fewer processes")
    shards = {name: shard_split(s, rank, world, batch_size) for name, s in split_objs.items()}
    mine = shard_path(out, rank, world)
    shard_attrs = {**{k: v for k, v in attrs.items() if k != "class_counts"},
                   "shard_rank": rank, "shard_world_size": world}
    sizes = {k: len(v) for k, v in shards.items()}
    if mine.exists():
        _check_shard(mine, sizes, attrs["checkpoint_sha256"], dtype)
        log.info("rank %d: reusing the finished shard %s", rank, mine)
    else:
        with FeatureWriter(mine, split_sizes=sizes, attrs=shard_attrs, **fmt) as writer:
            _write_splits(writer, shards, net, batch_size, label=f" (rank {rank}/{world})", **run)
            writer.finalize()
    distributed.barrier()
    if main:
        paths = [shard_path(out, r, world) for r in range(world)]
        merge_shards(out, paths, {k: v.index for k, v in split_objs.items()}, attrs=attrs,
                     overwrite=overwrite, **fmt)
        for p in paths:
            p.unlink()
        log.info("wrote %s (merged from %d shards)", out, world)
    distributed.barrier()  # every process returns once the merged file exists
    return out


def _move_list_files(cfg_dict: dict, image_root) -> None:
    """A list run's split files that moved with its images: a list file that is neither where the
    run named it nor relative to the new ``image_root`` is looked for where it lay relative to
    the run's image root (``L/train.txt`` beside ``L/imgs`` -> ``L_moved/train.txt`` beside
    ``L_moved/imgs``). Files not found there are left as they are (the dataset names them)."""
    old_root = cfg_dict.get("image_root") or cfg_dict.get("data_root")
    new_root = Path(image_root).expanduser()
    if not old_root:
        return
    for key in ("train_list", "val_list", "test_list"):
        name = cfg_dict.get(key)
        if not name or Path(name).expanduser().is_file() or (new_root / name).is_file():
            continue
        try:
            moved = new_root / os.path.relpath(Path(name).expanduser(), Path(old_root).expanduser())
        except ValueError:  # another drive
            continue
        if moved.is_file():
            log.info("%s %s is gone; reading %s, at the same place relative to --data-root", flag(key), name, moved)
            cfg_dict[key] = str(moved)


def _check_shard(path: Path, sizes: dict, checkpoint_sha256: str, dtype: str) -> None:
    """A finished shard left by an interrupted run may be reused only if it is this run's."""
    with open_features(path) as ff:
        have = {s: ff.num_rows(s) for s in ff.splits}
        problems = []
        if have != sizes:
            problems.append(f"rows {have}, this run's shard has {sizes}")
        if ff.attrs.get("checkpoint_sha256") != checkpoint_sha256:
            problems.append("made from another checkpoint")
    with h5py.File(path, "r") as f:
        disk = {str(f[s]["features"].dtype) for s in sizes if s in f}
    if disk != {dtype}:
        problems.append(f"features stored as {sorted(disk)}, not {dtype}")
    if problems:
        raise FeatureFileError(f"{path}: a finished shard of an earlier extraction that does not match this "
                               f"one ({'; '.join(problems)}). Delete it (and the other "
                               f"{path.name.rsplit('.rank', 1)[0]}.rank* files) or rerun the earlier command")


def merge_shards(out, shard_paths, expected_index: dict, *, attrs: dict, feature_dim: int, num_classes: int,
                 dtype: str = "float32", with_logits: bool = True, overwrite: bool = False,
                 chunk_rows: int = MERGE_CHUNK_ROWS) -> Path:
    """Concatenate shard feature files, in the given order, into one feature file ``out``.

    Args:
        out: the merged file (written to ``<out>.partial``, renamed when complete; a merge that
            is interrupted resumes from the rows already merged).
        shard_paths: complete feature files, each holding a contiguous part of every split.
        expected_index: ``{split: int64 [N]}``, the dataset's ``index`` of every split; the merged
            rows must carry exactly these (catches a missing, doubled or stale shard).
        attrs, feature_dim, num_classes, dtype, with_logits, overwrite: as for
            :class:`glag.features.FeatureWriter` (``class_counts`` in ``attrs`` is checked).
        chunk_rows: rows copied at a time (memory: chunk_rows × (d + C) × 4 bytes).

    Features are copied in their stored dtype (float16 stays float16, bit for bit).
    """
    out = Path(out)
    sizes = {k: len(v) for k, v in expected_index.items()}
    with FeatureWriter(out, split_sizes=sizes, feature_dim=feature_dim, num_classes=num_classes, attrs=attrs,
                       dtype=dtype, with_logits=with_logits, overwrite=overwrite) as writer:
        for split in writer.splits:
            done, pos = writer.rows_done(split), 0  # rows merged so far; first row of this shard
            for sp in shard_paths:
                with open_features(sp) as ff:
                    n = ff.num_rows(split) if split in ff.splits else 0
                    for a in range(max(done - pos, 0), n, chunk_rows):
                        part = ff.load(split, rows=slice(a, min(n, a + chunk_rows)), dtype=np.dtype(dtype))
                        at = pos + a
                        want = expected_index[split][at:at + len(part)]
                        if not np.array_equal(part.index, want):
                            raise FeatureFileError(
                                f"{sp}: split {split!r} rows {a}..{a + len(part)} hold samples "
                                f"{part.index[:5].tolist()}..., expected {want[:5].tolist()}... at merged row "
                                f"{at}. The shards do not fit together (left from another run?); delete "
                                f"the {out.name}.rank* files and {writer.partial_path.name}, and extract again")
                        writer.append(split, part.features, part.labels, part.index, part.logits)
                pos += n
            if pos != sizes[split]:
                raise FeatureFileError(f"{out}: the shards hold {pos} rows of {split!r}, the dataset {sizes[split]}; "
                                       f"delete the {out.name}.rank* files and extract again")
        return writer.finalize()


__all__ = ["extract_features", "merge_shards", "shard_path"]
