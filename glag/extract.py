"""Extraction: run a stage-one checkpoint over train/val/test and stream features + logits to HDF5.

Writes DESIGN.md's schema through :class:`glag.features.FeatureWriter` into ``<out>.partial``,
batch by batch (memory bounded by one batch), and renames it to ``<out>`` when every split is
complete. Re-running the same command after an interruption resumes from the rows already written.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

import glag

from .features import FeatureWriter, sha256_file
from .inference import iterate_outputs
from .stage1 import Stage1Config, dataset_from_config, load_checkpoint, model_from_checkpoint

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def extract_features(checkpoint, out, *, batch_size: int = 512, dtype: str = "float32", data_root=None,
                     overwrite: bool = False, num_workers: int = 0, progress: bool = True,
                     splits=SPLITS) -> Path:
    """Write the feature file ``out`` for the run that produced ``checkpoint``; returns its path.

    The dataset (and its LT subset, by seed) is rebuilt from the config stored in the checkpoint,
    so the train split is exactly the one stage one saw. ``data_root`` overrides where the
    images are (the run may have been trained on another machine).
    """
    checkpoint, out = Path(checkpoint), Path(out)
    ckpt = load_checkpoint(checkpoint)
    cfg_dict = dict(ckpt["config"])
    if data_root is not None:
        cfg_dict["data_root"] = str(data_root)
    cfg = Stage1Config(**{k: v for k, v in cfg_dict.items() if k in Stage1Config.__dataclass_fields__})
    data = dataset_from_config(cfg)
    counts = np.asarray(data.class_counts)
    if counts.tolist() != list(ckpt["class_counts"]):
        raise ValueError(f"the dataset rebuilt from {checkpoint}'s config has class counts {counts.tolist()}, "
                         f"but the model was trained on {ckpt['class_counts']}; check --data-root")
    model = model_from_checkpoint(ckpt)
    if cfg.channels_last:
        import torch

        model = model.to(memory_format=torch.channels_last)
    attrs = {"class_counts": counts, "backbone": ckpt["arch"], "checkpoint_sha256": sha256_file(checkpoint), "dataset": data.name,
             "created_by": f"glag {glag.__version__}", "stage1_loss": cfg.loss, "seed": cfg.seed,
             "imbalance_factor": cfg.imbalance_factor}
    split_objs = {name: getattr(data, name) for name in splits}
    writer = FeatureWriter(out, split_sizes={k: len(v) for k, v in split_objs.items()},
                           feature_dim=model.feature_dim, num_classes=data.num_classes, attrs=attrs,
                           dtype=dtype, with_logits=True, overwrite=overwrite)
    with writer:
        for name, split in split_objs.items():
            done = writer.rows_done(name)
            if done % batch_size:
                raise ValueError(f"{out}.partial holds {done} rows of {name}, not a multiple of the batch size "
                                 f"{batch_size}: resume with the --batch-size of the interrupted run")
            if done == len(split):
                continue
            if done:
                log.info("resuming %s at row %d of %d", name, done, len(split))
            bar = tqdm(total=len(split), initial=done, desc=f"extract {name}", unit="img", disable=not progress)
            for f, z, y, idx in iterate_outputs(model, split, batch_size, start_batch=done // batch_size,
                                                num_workers=num_workers, channels_last=cfg.channels_last):
                writer.append(name, f.numpy(), y.numpy(), idx.numpy(), z.numpy())
                bar.update(len(y))
            bar.close()
        path = writer.finalize()
    log.info("wrote %s", path)
    return path
