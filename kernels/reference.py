"""The reference calibrated sampler: numpy Philox4x32-10 + a plain torch sampler (the test oracle).

Everything here is written for clarity, not speed: the fast backends (:mod:`glag.kernels.cpu`,
``calibrated_sampler.cu``) are tested against it, exactly where they share the RNG.

The RNG contract (the same on every backend)
--------------------------------------------
* Philox4x32-10 (Salmon et al., SC'11), key ``(seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF)``.
* Counter ``(s, stream, j // 4, 0)``: ``s`` is the global index of the sample in the output
  (0..N-1), ``stream`` is the support slot (0..k-1) for the factor normals ``z_slot`` (component
  ``j = 0..r-1``) and ``0xFFFFFFFF`` for the dispersion noise (``j = 0`` for mode "all",
  ``0..d-1`` for mode "diag").
* The four output words ``u0..u3`` become uniforms in (0, 1) as ``(u + 0.5) * 2**-32``; Box–Muller
  turns ``(u0, u1)`` into normals 0, 1 and ``(u2, u3)`` into normals 2, 3:
  ``n0 = sqrt(-2 ln a) cos(2 pi b)``, ``n1 = sqrt(-2 ln a) sin(2 pi b)``.
  Component ``j`` takes normal ``j % 4`` of its block.

This module computes all of it in float64 straight from the definition; the fast backends
compute the same numbers in float32 (see ``_box_muller`` in :mod:`glag.kernels.cpu`).
"""
from __future__ import annotations

import math

import numpy as np
import torch

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
DISPERSION_STREAM = 0xFFFFFFFF
MASK32 = 0xFFFFFFFF

__all__ = [
    "philox4x32_10",
    "seed_key",
    "block_normals",
    "normals",
    "sample_reference",
]


def seed_key(seed: int) -> tuple[int, int]:
    """The Philox key ``(k0, k1)`` of a 64-bit seed: its low and high 32-bit words."""
    seed = int(seed)
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return seed & MASK32, (seed >> 32) & MASK32


def philox4x32_10(counter, key):
    """Philox4x32-10 block function, vectorised over numpy arrays.

    Args:
        counter: four integer arrays (or scalars) ``c0..c3``, each value in [0, 2**32),
            broadcast together.
        key: two integers (or arrays) ``k0, k1`` in [0, 2**32).
    Returns:
        four uint64 arrays ``u0..u3``, each value in [0, 2**32) (the 32-bit output words).

    One round maps ``(c0, c1, c2, c3)`` to
    ``(hi(M1*c2) ^ c1 ^ k0, lo(M1*c2), hi(M0*c0) ^ c3 ^ k1, lo(M0*c0))``, where hi/lo are the
    upper/lower 32 bits of the 64-bit product; the key is bumped by ``(W0, W1)`` (mod 2**32)
    between rounds. uint64 holds every 32x32-bit product exactly.
    """
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) & np.uint64(MASK32) for c in counter)
    c0, c1, c2, c3 = np.broadcast_arrays(c0, c1, c2, c3)
    k0 = np.asarray(key[0], dtype=np.uint64) & np.uint64(MASK32)
    k1 = np.asarray(key[1], dtype=np.uint64) & np.uint64(MASK32)
    m0, m1, mask, s32 = np.uint64(PHILOX_M0), np.uint64(PHILOX_M1), np.uint64(MASK32), np.uint64(32)
    for rnd in range(PHILOX_ROUNDS):
        if rnd > 0:
            k0 = (k0 + np.uint64(PHILOX_W0)) & mask
            k1 = (k1 + np.uint64(PHILOX_W1)) & mask
        p0 = c0 * m0  # < 2**64: exact
        p1 = c2 * m1
        c0, c1, c2, c3 = (p1 >> s32) ^ c1 ^ k0, p1 & mask, (p0 >> s32) ^ c3 ^ k1, p0 & mask
    return c0, c1, c2, c3


def block_normals(seed: int, samples, stream: int, blocks) -> np.ndarray:
    """The four standard normals of Philox blocks ``(s, stream, block, 0)``.

    Args:
        seed: 64-bit seed (the Philox key).
        samples: integer array, global sample indices ``s`` (broadcast against ``blocks``).
        stream: the stream word (slot index, or ``DISPERSION_STREAM``).
        blocks: integer array, block indices ``j // 4``.
    Returns:
        float64 array of shape ``broadcast(samples, blocks).shape + (4,)``: normals 0..3.
    """
    u0, u1, u2, u3 = philox4x32_10((samples, stream, blocks, 0), seed_key(seed))
    scale = 2.0**-32

    def uniform(u):
        return (u.astype(np.float64) + 0.5) * scale  # exact in float64, in (0, 1)

    ra = np.sqrt(-2.0 * np.log(uniform(u0)))
    rb = np.sqrt(-2.0 * np.log(uniform(u2)))
    ta = 2.0 * math.pi * uniform(u1)
    tb = 2.0 * math.pi * uniform(u3)
    return np.stack([ra * np.cos(ta), ra * np.sin(ta), rb * np.cos(tb), rb * np.sin(tb)], axis=-1)


def normals(seed: int, samples, stream: int, n: int) -> np.ndarray:
    """Normals ``z[s, j]`` for components ``j = 0..n-1`` of each sample in ``samples``.

    Args:
        samples: 1-D integer array of global sample indices (length S).
        n: number of components.
    Returns:
        float64 array (S, n); component j is normal ``j % 4`` of block ``j // 4``.
    """
    samples = np.asarray(samples, dtype=np.int64).reshape(-1)
    nblocks = (n + 3) // 4
    z = block_normals(seed, samples[:, None], stream, np.arange(nblocks, dtype=np.int64)[None, :])
    return z.reshape(samples.shape[0], nblocks * 4)[:, :n]


def sample_reference(
    bank_data: torch.Tensor,
    offsets: torch.Tensor,
    mu: torch.Tensor,
    support: torch.Tensor,
    weights: torch.Tensor,
    counts: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = 0.0,
    mode: str = "all",
    seed: int = 0,
    chunk: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibrated Gaussian samples, the obviously correct way (float64 throughout).

    METHOD.md, "Sampling without a Cholesky per sample":
    ``x_s = mu'_i + sum_slot sqrt(w_i,slot) F_{support[i,slot]} z_{s,slot} + e_s``, with
    ``e_s = sqrt(alpha) z0 * 1`` (mode "all") or ``sqrt(alpha) z`` (mode "diag").
    Its covariance is ``Sigma' = sum_slot w_slot Sigma_slot + alpha (1 1^T | I)`` (METHOD.md,
    Calibration).

    Args:
        bank_data: (d, R) float32, all factors side by side (``FactorBank.data``).
        offsets: (C+1,) int64, ``F_j = bank_data[:, offsets[j]:offsets[j+1]]``.
        mu: (m, d) calibrated means.   support: (m, k) int64 class ids.
        weights: (m, k) w_i >= 0.      counts: (m,) int64 samples per seed row.
        labels: (m,) int64.            alpha, mode, seed: see :func:`glag.sampling.sample_calibrated`.
        chunk: samples per matmul (bounds the memory of the normals).
    Returns:
        x (N, d) float32 and y (N,) int64 on ``mu.device``; the rows of seed i are contiguous.
    """
    device = mu.device
    m, d = mu.shape
    k = support.shape[1] if support.dim() == 2 else 0
    counts_np = counts.detach().cpu().numpy().astype(np.int64)
    seed_of = np.repeat(np.arange(m, dtype=np.int64), counts_np)  # seed row of each sample
    n_total = seed_of.shape[0]
    off = offsets.detach().cpu().numpy()
    supp = support.detach().cpu().numpy().reshape(m, k)
    w = weights.detach().cpu().to(torch.float64).numpy().reshape(m, k)
    data = bank_data.detach().to(device=device, dtype=torch.float64)

    x = mu.detach().to(torch.float64)[torch.as_tensor(seed_of, device=device)]
    samples = np.arange(n_total, dtype=np.int64)
    for slot in range(k):
        cls_of = supp[seed_of, slot]
        for j in np.unique(cls_of):
            f = data[:, off[j]:off[j + 1]]  # (d, r_j)
            if f.shape[1] == 0:  # a class of one sample: no covariance to borrow
                continue
            ids = samples[cls_of == j]
            for a in range(0, ids.shape[0], chunk):
                s = ids[a:a + chunk]
                z = normals(seed, s, slot, f.shape[1]) * np.sqrt(w[seed_of[s], slot])[:, None]
                s_t = torch.as_tensor(s, device=device)
                x[s_t] += torch.as_tensor(z, device=device) @ f.T
    if alpha > 0:
        n_comp = 1 if mode == "all" else d  # "all": one scalar normal per sample, on every component
        for a in range(0, n_total, chunk):
            s = samples[a:a + chunk]
            e = torch.as_tensor(normals(seed, s, DISPERSION_STREAM, n_comp), device=device)
            x[a:a + chunk] += math.sqrt(alpha) * e  # (S, 1) broadcasts over d in mode "all"
    y = labels.detach().to(device=device, dtype=torch.int64)[torch.as_tensor(seed_of, device=device)]
    return x.to(torch.float32), y
