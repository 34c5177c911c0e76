"""Running a trained backbone over a split: batched, no grad, in split order.

One generator, :func:`iterate_outputs`, serves evaluation (collect logits) and extraction
(stream features and logits to HDF5), so both see exactly the same forward pass.
"""
from __future__ import annotations

from typing import Iterator

import torch

from .data import iterate_batches


def iterate_outputs(model, split, batch_size: int = 256, *, start_batch: int = 0, num_workers: int = 0,
                    channels_last: bool = True
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(features (B, d) float32, logits (B, C) float32, labels (B,) int64, index (B,) int64)``.

    Rows come in split order (no shuffle, no augmentation), starting at batch ``start_batch``,
    so an interrupted extraction can pick up where it stopped.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for x, y, idx in iterate_batches(split, batch_size, shuffle=False, augment=False, seed=0,
                                             start_batch=start_batch, num_workers=num_workers):
                if channels_last and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                f, z = model.forward_both(x)
                yield f.float(), z.float(), y, idx
    finally:
        model.train(was_training)

