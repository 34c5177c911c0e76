"""CUDA backend of the calibrated sampler: ``calibrated_sampler.cu`` through CuPy ``RawModule``.

CuPy is an optional extra (``pip install glag[gpu]``), imported only when this backend is used.
The module is compiled with NVRTC at first use (CuPy caches the binary on disk; this module
keeps one loaded copy per device). Tensors cross between torch and CuPy through DLPack, with no
copy, and the kernels run on torch's current stream, so the result is ordered with the caller's
torch work as usual.

Work per call (METHOD.md, low-rank sampling), all on torch's stream, the host never waiting for
the device: three small plan kernels group every slot's samples by support class and cut the
groups into tiles of BM rows (``glag_plan_count``, ``glag_plan_tiles``, ``glag_plan_rows``), then
one ``glag_slot_gemm_*`` launch a slot, of the tile shape :func:`slot_gemm_shape` picks. Slot 0
writes ``x = mu' + e + its product``, the later slots add theirs. Each GEMM's grid is an upper
bound on its tile count (:func:`tile_bound`), and the blocks past the last tile return at once.
The tensor-core tiles also get the class scales (:func:`class_scales`). A call launches about ten
kernels (it was over a hundred torch ops when the grouping was done in torch, and the host time to
launch them was longer than the GPU's work at CIFAR-100-LT size).
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .reference import seed_key

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("calibrated_sampler.cu")
THREADS = 256  # threads a block of the plan kernels (the slot GEMMs: SlotGemm.threads)
ENV_TILE = "GLAG_CUDA_TILE"


class SlotGemm(NamedTuple):
    """A slot-GEMM kernel of calibrated_sampler.cu, its block tile (BM samples x BN columns), the
    threads of its block (exactly these), and whether it runs on tensor cores (then it takes one
    more argument, :func:`class_scales`, and needs compute capability 8.0)."""
    kernel: str
    bm: int
    bn: int
    threads: int
    tensor_cores: bool = False


# d >= 256: "64x256" (256 threads, 4 x 16 outputs a thread, two blocks an SM under a 128-register
# cap) is the shape timed on H100/H200 so far. The candidates, chosen with GLAG_CUDA_TILE until a
# GPU has timed them:
#   "128x256" (256 threads, one block an SM) and "64x256t128" (128 threads, two blocks an SM, the
#   64-row tiles of the default): 8 x 16 outputs a thread and no register cap, about 13 % fewer
#   instructions a K step in their SASS; the same samples bit for bit;
#   "64x256tc": the default's tiles on tensor cores (mma.sync, float16 pieces, three products a
#   product: float32 accuracy, not the same bits), 601 instructions a thread a K step in its SASS
#   against the default's 1,637, two blocks an SM; "64x256tc1": the same, one block an SM with
#   226 registers (573 instructions, more MMA chains in flight a warp).
WIDE_SHAPES = {"64x256": SlotGemm("glag_slot_gemm_bn256", 64, 256, 256),
               "128x256": SlotGemm("glag_slot_gemm_bm128_bn256", 128, 256, 256),
               "64x256t128": SlotGemm("glag_slot_gemm_bn256_t128", 64, 256, 128),
               "64x256tc": SlotGemm("glag_slot_gemm_tc_bn256", 64, 256, 256, tensor_cores=True),
               "64x256tc1": SlotGemm("glag_slot_gemm_tc_bn256_r1", 64, 256, 256, tensor_cores=True)}
NARROW_SHAPE = SlotGemm("glag_slot_gemm_bn64", 64, 64, 256)  # d < 256
DEFAULT_WIDE = "64x256"
FMA_WIDE = "64x256"  # the default where the default needs tensor cores and the GPU has none
KERNELS = ("glag_plan_count", "glag_plan_tiles", "glag_plan_rows", NARROW_SHAPE.kernel,
           *(s.kernel for s in WIDE_SHAPES.values()), "glag_block_normals_kernel", "glag_mma_probe_kernel",
           "glag_split4_kernel")

__all__ = ["is_available", "sample_cuda", "block_normals_cuda", "slot_gemm_shape", "class_scales", "tile_bound",
           "SOURCE"]


def slot_gemm_shape(d: int, tile: str | None = None, capability: tuple[int, int] | None = None) -> SlotGemm:
    """The slot GEMM for feature dimension d: 64 x 64 below d = 256, else ``tile`` (one of
    :data:`WIDE_SHAPES`), else ``$GLAG_CUDA_TILE``, else :data:`DEFAULT_WIDE`. ``capability``: the
    GPU's (major, minor); a tensor-core shape asked for below 8.0 is an error (a tensor-core
    default gives way to :data:`FMA_WIDE` there)."""
    if d < 256:
        return NARROW_SHAPE
    name = tile or os.environ.get(ENV_TILE)
    if not name:
        default = WIDE_SHAPES[DEFAULT_WIDE]
        too_old = default.tensor_cores and capability is not None and tuple(capability) < (8, 0)
        return WIDE_SHAPES[FMA_WIDE] if too_old else default
    source = "the tile argument" if tile else ENV_TILE
    if name not in WIDE_SHAPES:
        raise ValueError(f"unknown CUDA tile shape {name!r} (from {source}); use one of {sorted(WIDE_SHAPES)}")
    shape = WIDE_SHAPES[name]
    if shape.tensor_cores and capability is not None and tuple(capability) < (8, 0):
        raise ValueError(f"CUDA tile shape {name!r} (from {source}) runs on tensor cores (mma.sync m16n8k16), which "
                         f"need compute capability 8.0 or later; this GPU has {capability[0]}.{capability[1]}: "
                         f"use {FMA_WIDE!r}")
    return shape


# max |F_j| s_j lands in [2^(CLASS_SCALE_TOP - 1), 2^CLASS_SCALE_TOP): float16 holds the split
# operands at full precision (2^-14 .. 65504); with |log2 s_j| <= CLASS_SCALE_EXP the epilogue's
# 2^-10 / s_j stays a normal float32
CLASS_SCALE_TOP = 14
CLASS_SCALE_EXP = 100  # |log2 s_j| at most


def class_scales(bank_t: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """s_j for the tensor-core slot GEMM (calibrated_sampler.cu, ``glag_slot_gemm_tc``): the power of
    two that puts max |F_j| in [2^13, 2^14); 1 for a class of rank 0, all-zero or non-finite factors.
    Its exponent is clamped to +-100, so that 2^-10 / s_j is a normal float32.

    Args:
        bank_t: (R, d) float32, rows ``offsets[j]:offsets[j+1]`` = F_j^T; offsets: (C+1,) int64.
    Returns:
        (C,) float32 on ``bank_t``'s device. One pass over the bank, no copy of it.
    """
    device = bank_t.device
    offsets = offsets.to(device=device, dtype=torch.int64)
    n_classes, n_rows = offsets.numel() - 1, bank_t.shape[0]
    top = torch.zeros(n_classes + 1, dtype=torch.float32, device=device)  # [C]: rows past offsets[-1]
    if n_rows and bank_t.shape[1]:
        row_top = torch.linalg.vector_norm(bank_t, ord=float("inf"), dim=1)
        cls = torch.searchsorted(offsets[1:], torch.arange(n_rows, device=device), right=True)
        top = top.scatter_reduce(0, cls, row_top, "amax")
    top = top[:n_classes]
    _, e = torch.frexp(top)  # top in [2^(e-1), 2^e)
    e = (CLASS_SCALE_TOP - e).clamp(-CLASS_SCALE_EXP, CLASS_SCALE_EXP)
    scale = torch.ldexp(torch.ones_like(top), e)
    return torch.where(torch.isfinite(top) & (top > 0), scale, torch.ones_like(top))


def _cupy():
    import cupy  # noqa: PLC0415  (optional, lazy)

    return cupy


def is_available() -> tuple[bool, str]:
    """(usable, reason): CuPy importable, a CUDA device present, torch built with CUDA."""
    try:
        cp = _cupy()
    except Exception as exc:  # ImportError, or a CuPy built for another CUDA
        return False, f"CuPy not importable ({type(exc).__name__}: {exc})"
    try:
        n_dev = cp.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return False, f"no CUDA device ({type(exc).__name__}: {exc})"
    if n_dev == 0:
        return False, "no CUDA device"
    if not torch.cuda.is_available():
        return False, "torch has no CUDA support (a CPU build?)"
    return True, f"CuPy {cp.__version__}, {n_dev} device(s)"


@functools.lru_cache(maxsize=None)
def _kernels(device_index: int) -> dict:
    """Compile (or load from CuPy's cache) the module for one device: {name: RawKernel}."""
    cp = _cupy()
    with cp.cuda.Device(device_index):
        module = cp.RawModule(code=SOURCE.read_text(), options=("--std=c++17",))
        kernels = {name: module.get_function(name) for name in KERNELS}
    log.info("compiled %s for cuda:%d", SOURCE.name, device_index)
    return kernels


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _cp(t: torch.Tensor):
    """Zero-copy CuPy view of a CUDA tensor (DLPack)."""
    return _cupy().from_dlpack(t)


def _external_stream(cp, stream: torch.cuda.Stream):
    """A CuPy view of a torch stream (``Stream.from_external`` where CuPy has it, else ``ExternalStream``)."""
    from_external = getattr(cp.cuda.Stream, "from_external", None)
    if from_external is not None:
        try:
            return from_external(stream)
        except (TypeError, AttributeError, ValueError):  # a torch stream without the stream protocol
            pass
    return cp.cuda.ExternalStream(stream.cuda_stream)


class _on_torch_stream:
    """Context: CuPy device + torch's current stream, so launches are ordered with torch work."""

    def __init__(self, device: torch.device):
        cp = _cupy()
        self.dev = cp.cuda.Device(device.index)
        self.stream = _external_stream(cp, torch.cuda.current_stream(device))

    def __enter__(self):
        self.dev.__enter__()
        self.stream.__enter__()
        return self

    def __exit__(self, *exc):
        self.stream.__exit__(*exc)
        self.dev.__exit__(*exc)


def tile_bound(n_total: int, n_classes: int, m: int, bm: int) -> int:
    """Tiles a slot's GEMM grid is launched with: at least its number of tiles of ``bm`` rows,
    without asking the device (each class with samples adds at most one partial tile)."""
    return n_total // bm + min(n_classes, m)


def _grid(n_items: int) -> tuple[int]:
    """Blocks of 256 threads for a grid-stride loop over ``n_items``."""
    return (max(1, min((n_items + THREADS - 1) // THREADS, 4096)),)


def placeholder_slot(m: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(support, weights, offsets) for k = 0: one slot whose class has rank 0, so the slot-0
    GEMM writes x = mu' + e with an empty product. (m, 1) int64 zeros, (m, 1) float32 zeros, [0, 0]."""
    return (torch.zeros((m, 1), dtype=torch.int64, device=device),
            torch.zeros((m, 1), dtype=torch.float32, device=device),
            torch.zeros(2, dtype=torch.int64, device=device))


def plan_cuda(support: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor, n_total: int, bm: int):
    """Every slot's samples grouped by support class, and its tiles (the plan kernels).

    Args:
        support: (m, k) int64, counts: (m,) int64, offsets: (C+1,) int64, all contiguous on one
            GPU; n_total: N = counts.sum(); bm: rows a tile (the slot GEMM's BM).
    Returns:
        rows, row_seed (k, N) int64: per slot, the sample ids grouped by class (class ids in
        increasing order; within a class in no fixed order) and the seed row of each; tiles
        (k, T, 3) int64: per slot, (class, begin, end) over that slot's ``rows``, at most bm
        apart, for every class with samples (after slot 0 only those with r_j > 0), then empty
        tiles (0, 0, 0) up to T = :func:`tile_bound`.
    """
    device = support.device
    m, k = support.shape
    n_classes = offsets.numel() - 1
    bound = tile_bound(n_total, n_classes, m, bm)
    hist = torch.zeros((k, n_classes), dtype=torch.int64, device=device)  # uint64 in the kernels
    cursor = torch.empty_like(hist)
    tiles = torch.empty((k, bound, 3), dtype=torch.int64, device=device)
    rows = torch.empty((k, n_total), dtype=torch.int64, device=device)
    row_seed = torch.empty_like(rows)
    ends = torch.cumsum(counts, 0)
    kern = _kernels(_device_index(device))
    sup_c, cnt_c, cursor_c = _cp(support), _cp(counts), _cp(cursor)
    with _on_torch_stream(device):
        kern["glag_plan_count"](_grid(m * k), (THREADS,), (
            sup_c, cnt_c, np.int64(m), np.int32(k), np.int32(n_classes), _cp(hist)))
        kern["glag_plan_tiles"]((k,), (THREADS,), (
            _cp(hist), _cp(offsets), np.int32(n_classes), np.int32(bm), np.int64(bound), cursor_c, _cp(tiles)))
        kern["glag_plan_rows"](_grid(m * k), (THREADS,), (
            sup_c, cnt_c, _cp(ends), np.int64(m), np.int32(k), np.int32(n_classes),
            np.int64(n_total), cursor_c, _cp(rows), _cp(row_seed)))
    return rows, row_seed, tiles


def sample_cuda(
    bank_t: torch.Tensor,
    offsets: torch.Tensor,
    mu: torch.Tensor,
    support: torch.Tensor,
    weights: torch.Tensor,
    counts: torch.Tensor,
    out: torch.Tensor,
    alpha: float = 0.0,
    mode: str = "all",
    seed: int = 0,
    tile: str | None = None,
    scales=None,
) -> None:
    """Fill ``out`` (N, d) float32 on the GPU with calibrated samples (METHOD.md, low-rank sampling).

    Args:
        bank_t: (R, d) float32 contiguous CUDA tensor, rows ``offsets[j]:offsets[j+1]`` = F_j^T.
        offsets: (C+1,) int64 (any device; pass it on the GPU to save a copy).  mu: (m, d) float32.
        support: (m, k) int64.  weights: (m, k) float32.  counts: (m,) int64.  All CUDA,
        contiguous, on one device.
        out: (N, d) float32 contiguous CUDA tensor, N = counts.sum() < 2^32.
        alpha, mode, seed: as in :func:`glag.sampling.sample_calibrated`.
        tile: the block tile at d >= 256 (:func:`slot_gemm_shape`); the samples are the same
            for every shape, to float rounding (bit for bit between the float32 FMA shapes).
        scales: for the tensor-core tiles, :func:`class_scales` of the bank (a (C,) float32 CUDA
            tensor, or a function returning it, called only when needed; e.g. a cached
            :meth:`glag.sampling.FactorBank.class_scales_on`); None: computed here.
    """
    device = mu.device
    m, d = mu.shape
    n_total = out.shape[0]
    k0, k1 = seed_key(seed)
    offsets = offsets.to(device=device, dtype=torch.int64).contiguous()
    if support.shape[1] == 0:
        support, weights, offsets = placeholder_slot(m, device)
        scales = None  # the placeholder's one class, of rank 0
    k = support.shape[1]
    shape = slot_gemm_shape(d, tile, torch.cuda.get_device_capability(device))
    rows, row_seed, tiles = plan_cuda(support, counts, offsets, n_total, shape.bm)
    extra = ()
    if shape.tensor_cores:
        scales = scales() if callable(scales) else scales
        extra = (_cp(scales if scales is not None else class_scales(bank_t, offsets)),)
    bn = shape.bn
    gemm = _kernels(_device_index(device))[shape.kernel]
    vec = d % 4 == 0 and out.data_ptr() % 16 == 0 and mu.data_ptr() % 16 == 0  # float4 epilogue
    ft_c, off_c, rows_c, seed_c, tiles_c = map(_cp, (bank_t, offsets, rows, row_seed, tiles))
    head = (_cp(weights), _cp(mu), np.int32(k))
    tail = (np.int32(d), np.uint32(k0), np.uint32(k1), np.float32(np.sqrt(alpha) if alpha > 0 else 0.0),
            np.int32(mode == "diag"), np.int32(vec), _cp(out))
    with _on_torch_stream(device):
        for slot in range(k):  # one launch a slot: each output element has one writer a launch
            gemm((tiles.shape[1], (d + bn - 1) // bn), (shape.threads,),
                 (ft_c, off_c, rows_c[slot], seed_c[slot], tiles_c[slot], *head, np.int32(slot), *tail, *extra))


def block_normals_cuda(seed: int, samples: torch.Tensor, stream: int, blocks: torch.Tensor) -> torch.Tensor:
    """The CUDA normals of blocks ``(samples[i], stream, blocks[i], 0)``: (n, 4) float32 (for tests)."""
    device = samples.device
    samples = samples.to(torch.int64).contiguous()
    blocks = blocks.to(device=device, dtype=torch.int64).expand_as(samples).contiguous()
    out = torch.empty((samples.numel(), 4), dtype=torch.float32, device=device)
    k0, k1 = seed_key(seed)
    kern = _kernels(_device_index(device))
    n = samples.numel()
    with _on_torch_stream(device):
        kern["glag_block_normals_kernel"](
            ((n + THREADS - 1) // THREADS,), (THREADS,),
            (_cp(samples), _cp(blocks), np.int64(n), np.uint32(stream), np.uint32(k0), np.uint32(k1), _cp(out)),
        )
    return out

