"""The few image transforms glag needs, written on torch tensors and PIL (no torchvision).

Two families:

* batched tensor ops for in-memory datasets (Fashion-MNIST, CIFAR): zero-padded random crop and
  horizontal flip applied to a whole ``[B, C, H, W]`` uint8 batch at once, then normalisation;
* per-image PIL ops for file datasets (ImageNet-LT / iNaturalist lists): random-resized crop,
  resize-shorter-side, center crop, to-tensor.

All randomness comes from an explicit ``torch.Generator`` / ``numpy.random.Generator`` argument,
never from global state, so a batch is a pure function of its seed.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# Per-dataset channel statistics of the [0, 1]-scaled training images.
FMNIST_MEAN, FMNIST_STD = (0.2860,), (0.3530,)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- batched tensor ops
def crop_flip(x: torch.Tensor, pad: int, oy: torch.Tensor, ox: torch.Tensor,
              flip: torch.Tensor) -> torch.Tensor:
    """Zero-pad by ``pad``, crop back to the input size at given offsets, optionally flip.

    Args:
        x: [B, C, H, W] tensor (any dtype; uint8 in glag).
        pad: padding on every side (0 = no crop).
        oy, ox: int64 [B], crop offsets in the padded image, each in ``[0, 2*pad]``.
        flip: bool [B], flip that row horizontally (after the crop).

    Returns:
        [B, C, H, W] tensor, same dtype as ``x``. ``oy = ox = pad`` and no flip is the identity.
    """
    B, C, H, W = x.shape
    if pad > 0:
        xp = F.pad(x, (pad, pad, pad, pad))  # zeros, as torchvision's RandomCrop(padding=p)
        rows = oy[:, None] + torch.arange(H)  # [B, H]
        cols = ox[:, None] + torch.arange(W)  # [B, W]
        b = torch.arange(B)[:, None, None]
        # Advanced indices around a slice put the indexed dims first: [B, H, W, C].
        x = xp.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x.contiguous()


def random_crop_flip(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding ``pad`` plus horizontal flip (p = 0.5), per row of a batch.

    Draws, in this order from ``generator``: ``oy`` [B], ``ox`` [B] uniform in ``[0, 2*pad]``,
    then ``flip`` [B] ~ Bernoulli(0.5); then calls :func:`crop_flip`.

    Args:
        x: [B, C, H, W] tensor (uint8 in glag).
        pad: padding (2 for 28x28, 4 for 32x32).
        generator: CPU ``torch.Generator``, the only source of randomness.

    Returns:
        [B, C, H, W] tensor, same dtype as ``x``.
    """
    B = x.shape[0]
    hi = 2 * pad + 1
    oy = torch.randint(0, hi, (B,), generator=generator)
    ox = torch.randint(0, hi, (B,), generator=generator)
    flip = torch.rand(B, generator=generator) < 0.5
    return crop_flip(x, pad, oy, ox, flip)


def normalize_uint8(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [B, C, H, W] in 0..255 -> float32 [B, C, H, W], ``(x/255 - mean[c]) / std[c]``."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x.to(torch.float32) / 255.0 - m) / s


# --------------------------------------------------------------------------- per-image PIL ops
def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3),
                            ) -> tuple[int, int, int, int]:
    """Pick the crop box of an Inception-style random-resized crop.

    Up to 10 tries: area fraction ~ U(scale), log aspect ratio ~ U(log ratio); the first box that
    fits wins. Otherwise the largest centred box whose aspect ratio lies in ``ratio``.

    Returns:
        ``(left, top, right, bottom)`` in pixels, as PIL's ``box``.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def random_resized_crop(img: Image.Image, size: int, rng: np.random.Generator,
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Image.Image:
    """Random-resized crop of a PIL image to ``size x size`` (bilinear); see
    :func:`random_resized_crop_box`."""
    box = random_resized_crop_box(img.width, img.height, rng, scale, ratio)
    return img.resize((size, size), Image.BILINEAR, box=box)


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    """Resize a PIL image (bilinear) so its shorter side is ``size``, keeping the aspect ratio."""
    w, h = img.size
    if min(w, h) == size:
        return img
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    return img.resize((nw, nh), Image.BILINEAR)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Central ``size x size`` crop of a PIL image (zero-padded first if it is smaller)."""
    w, h = img.size
    if w < size or h < size:
        canvas = Image.new(img.mode, (max(w, size), max(h, size)))
        canvas.paste(img, ((canvas.width - w) // 2, (canvas.height - h) // 2))
        img, (w, h) = canvas, canvas.size
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def pil_to_uint8(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor [3, H, W]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def train_transform_pil(img: Image.Image, size: int, rng: np.random.Generator) -> torch.Tensor:
    """Training view of one image: random-resized crop (scale 0.08-1, ratio 3/4-4/3) to
    ``size`` and horizontal flip (p = 0.5). Returns uint8 [3, size, size]."""
    img = random_resized_crop(img, size, rng)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return pil_to_uint8(img)


def eval_transform_pil(img: Image.Image, size: int) -> torch.Tensor:
    """Evaluation view: resize the shorter side to ``floor(size * 256 / 224)`` then centre-crop
    ``size``. Returns uint8 [3, size, size]."""
    img = resize_shorter(img, int(math.floor(size * 256 / 224)))
    return pil_to_uint8(center_crop(img, size))
