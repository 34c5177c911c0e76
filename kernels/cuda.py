"""CUDA backend of the calibrated sampler: ``calibrated_sampler.cu`` through CuPy ``RawModule``.

CuPy is an optional extra (``pip install glag[gpu]``), imported only when this backend is used.
The module is compiled with NVRTC at first use (CuPy caches the binary on disk; this module
keeps one loaded copy per device). Tensors cross between torch and CuPy through DLPack, with no
copy, and the kernels run on torch's current stream, so the result is ordered with the caller's
torch work as usual.

Work per call (METHOD.md, low-rank sampling): one ``glag_init_out`` launch (``x = mu' + e``),
then for each slot one ``glag_slot_gemm_bn*`` launch over the tiles of samples grouped by their
support class in that slot. The grouping is a few torch ops on the device, and the host never
waits for them: each launch's grid is an upper bound on its tile count, and the blocks past the
last tile return at once.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
import torch

from .reference import seed_key

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("calibrated_sampler.cu")
TILE_ROWS = 64  # BM of the kernels: samples a thread block
THREADS = 256  # the kernels assume exactly 256 threads a block
KERNELS = ("glag_init_out", "glag_slot_gemm_bn256", "glag_slot_gemm_bn64", "glag_block_normals_kernel")

__all__ = ["is_available", "sample_cuda", "block_normals_cuda", "block_columns", "SOURCE"]


def block_columns(d: int) -> int:
    """Output columns a thread block of the slot GEMM covers (BN) at feature dimension d."""
    return 256 if d >= 256 else 64


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


def _slot_tiles(cls: torch.Tensor, counts: torch.Tensor, starts: torch.Tensor, ranks: torch.Tensor, n_total: int):
    """For every slot at once: group its samples by support class and cut each group into 64-row tiles.

    No device-to-host transfer, and the same few torch ops whatever k is: each slot's tile list
    has a fixed length, an upper bound on its number of tiles, and the entries past its last
    tile are empty (begin == end).

    Args:
        cls: (k, m) int64, support class of each seed row in each slot (``support.T``).
        counts, starts: (m,) int64.   ranks: (C,) int64 r_j (on the device).   n_total: N = counts.sum().
    Returns:
        rows (k, N) int64: per slot, the sample ids ordered by class; tiles (k, T, 3) int64: per
        slot, (class, begin, end) over that slot's ``rows``, only for classes with r_j > 0, then
        empty tiles up to T = N // 64 + min(C, m) (each class with samples adds at most one
        partial tile).
    """
    dev = cls.device
    k, m = cls.shape
    n_classes = ranks.numel()
    order = torch.argsort(cls, dim=1, stable=True)
    cnt_o = counts[order]  # (k, m)
    # sample ids: for each seed row in ``order``, starts[i] .. starts[i] + counts[i] - 1
    pos_o = torch.cumsum(cnt_o, 1) - cnt_o  # where each ordered seed row begins in its slot's ``rows``
    shift = torch.repeat_interleave((starts[order] - pos_o).flatten(), cnt_o.flatten(), output_size=k * n_total)
    rows = (torch.arange(n_total, device=dev).repeat(k) + shift).view(k, n_total)
    per_class = torch.zeros(k, n_classes, dtype=torch.int64, device=dev).scatter_add_(1, cls, counts.expand(k, m))
    ptr = torch.cumsum(per_class, 1) - per_class
    per_class = torch.where(ranks > 0, per_class, torch.zeros_like(per_class))
    n_tiles = (per_class + TILE_ROWS - 1) // TILE_ROWS
    last_tile = torch.cumsum(n_tiles, 1)  # one past each class's last tile
    bound = n_total // TILE_ROWS + min(n_classes, m)
    t = torch.arange(bound, device=dev).expand(k, bound).contiguous()
    tile_cls = torch.searchsorted(last_tile, t, right=True)  # n_classes past the last tile
    j = tile_cls.clamp(max=n_classes - 1)
    ptr_j, cnt_j = ptr.gather(1, j), per_class.gather(1, j)
    begin = ptr_j + (t - (last_tile.gather(1, j) - n_tiles.gather(1, j))) * TILE_ROWS
    end = torch.where(tile_cls < n_classes, torch.minimum(begin + TILE_ROWS, ptr_j + cnt_j), begin)
    return rows, torch.stack([j, begin, end], dim=2).contiguous()


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
) -> None:
    """Fill ``out`` (N, d) float32 on the GPU with calibrated samples (METHOD.md, low-rank sampling).

    Args:
        bank_t: (R, d) float32 contiguous CUDA tensor, rows ``offsets[j]:offsets[j+1]`` = F_j^T.
        offsets: (C+1,) int64 (any device).  mu: (m, d) float32.  support: (m, k) int64.
        weights: (m, k) float32.  counts: (m,) int64.  All CUDA, contiguous, on one device.
        out: (N, d) float32 contiguous CUDA tensor, N = counts.sum() < 2^32.
        alpha, mode, seed: as in :func:`glag.sampling.sample_calibrated`.
    """
    device = mu.device
    m, d = mu.shape
    k = support.shape[1]
    n_total = out.shape[0]
    k0, k1 = seed_key(seed)
    dev_index = device.index if device.index is not None else torch.cuda.current_device()
    kern = _kernels(dev_index)
    offsets_d = offsets.to(device=device, dtype=torch.int64).contiguous()
    ranks = offsets_d.diff()
    starts = torch.cumsum(counts, 0) - counts
    seed_of = torch.repeat_interleave(torch.arange(m, device=device), counts, output_size=n_total)
    sqrt_alpha = float(np.sqrt(alpha)) if alpha > 0 else 0.0

    with _on_torch_stream(device):
        total = n_total * ((d + 3) // 4)
        grid = int(min((total + THREADS - 1) // THREADS, 65535 * 8))
        kern["glag_init_out"](
            (max(grid, 1),), (THREADS,),
            (_cp(out), _cp(mu), _cp(seed_of), np.int64(n_total), np.int32(d),
             np.uint32(k0), np.uint32(k1), np.float32(sqrt_alpha), np.int32(mode == "diag")),
        )
        bn = block_columns(d)
        gemm = kern[f"glag_slot_gemm_bn{bn}"]
        if k == 0:
            return
        rows, tiles = _slot_tiles(support.t(), counts, starts, ranks, n_total)
        ft_c, offsets_c, seed_of_c, weights_c, out_c = map(_cp, (bank_t, offsets_d, seed_of, weights, out))
        for slot in range(k):  # one launch a slot: each output element has one writer a launch
            gemm(
                (tiles.shape[1], (d + bn - 1) // bn), (THREADS,),
                (ft_c, offsets_c, _cp(rows[slot]), _cp(tiles[slot]), seed_of_c, weights_c, np.int32(k),
                 np.int32(slot), np.int32(d), np.uint32(k0), np.uint32(k1), out_c),
            )


def block_normals_cuda(seed: int, samples: torch.Tensor, stream: int, blocks: torch.Tensor) -> torch.Tensor:
    """The CUDA normals of blocks ``(samples[i], stream, blocks[i], 0)``: (n, 4) float32 (for tests)."""
    device = samples.device
    samples = samples.to(torch.int64).contiguous()
    blocks = blocks.to(device=device, dtype=torch.int64).expand_as(samples).contiguous()
    out = torch.empty((samples.numel(), 4), dtype=torch.float32, device=device)
    k0, k1 = seed_key(seed)
    kern = _kernels(device.index)
    n = samples.numel()
    with _on_torch_stream(device):
        kern["glag_block_normals_kernel"](
            ((n + THREADS - 1) // THREADS,), (THREADS,),
            (_cp(samples), _cp(blocks), np.int64(n), np.uint32(stream), np.uint32(k0), np.uint32(k1), _cp(out)),
        )
    return out

