"""Numba CPU backend of the calibrated sampler.

METHOD.md, "Sampling without a Cholesky per sample":
``x_s = mu'_i + sum_slot sqrt(w_i,slot) F_{support[i,slot]} z_{s,slot} + e_s``.

How it is fast. The sum over slots batches into GEMMs grouped by support class: for slot ``t``
and class ``j``, every sample whose seed row has ``support[i, t] == j`` needs ``F_j z``. Each
slot's samples are grouped by class and cut into tasks of ``tile_rows`` samples, and numba
threads over the tasks (``prange``, dynamic chunks). A thread, on its own tile, in its own cache:

1. draws ``Z`` (T x r4_j, r_j rounded up to whole Philox blocks) straight from Philox4x32-10
   + Box–Muller, each row scaled by ``sqrt(w)``, in one flat loop over the tile's blocks
   (``_gen_blocks``: float32, integer range reduction and polynomials only, so LLVM vectorises
   it 8 blocks wide: ~2 ns a normal and core, against 5-10 ns for ``torch.randn``);
2. multiplies ``Z @ F_j^T`` with one single-threaded BLAS sgemm (numba's ``np.dot``, scipy's
   BLAS pinned to one thread while we run) into its own buffer: the inner product at GEMM
   speed. The bank is stored transposed with each block padded by zero rows to r4_j, so the
   extra normals meet exact zeros;
3. adds the tile into the output rows of its samples. On the first slot a row is still empty:
   it becomes ``mu'_i + e_s + tile row`` there and then (``e_s`` the dispersion normals), so
   each output row is first written while in cache and no separate pass re-reads it.

One thread pool only (numba's): mixing it with a multi-threaded BLAS makes the two pools fight
for the cores, and on a shared 2-core machine small GEMMs then run 10x slower. Slots run one
after another, so within a slot each output row belongs to one task: no races, no atomics.
Extra memory: the padded transposed bank (~R x d, made once per bank and cached on it), per
thread one tile ``T x (r4_max + d)`` and one row of ``e_s``, and O(N) indices:
``O(sum r_j d + N)``, no m x d x d tensor.

The RNG contract is in :mod:`glag.kernels.reference`; same seed, same numbers to float rounding.
"""
from __future__ import annotations

import ctypes
import glob
import logging
import math
import mmap
import os
import threading

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .reference import seed_key

# numba's OpenMP threading layer leaves its threads spinning after a parallel region, and they
# starve torch's own threads: measured here, a 0.1 ms log_softmax took 12-16 ms right after a
# sampler call. The workqueue layer does not spin. An explicit NUMBA_THREADING_LAYER still wins.
if not os.environ.get("NUMBA_THREADING_LAYER") and numba.config.THREADING_LAYER == "default":
    numba.config.THREADING_LAYER = "workqueue"

_U32 = np.uint32
_U64 = np.uint64
_F32 = np.float32
_M0 = _U64(0xD2511F53)
_M1 = _U64(0xCD9E8D57)
_W0 = _U32(0x9E3779B9)
_W1 = _U32(0xBB67AE85)

log = logging.getLogger(__name__)

__all__ = ["philox_words", "block_normals_f32", "box_muller_words", "sample_numba", "empty_output", "tile_rows",
           "gemm_tiles"]


# ---------------------------------------------------------------- bit casts (vectorisable)
@intrinsic
def _f32_bits(typingctx, x):
    """Reinterpret a float32 as its uint32 bit pattern."""
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@intrinsic
def _bits_f32(typingctx, x):
    """Reinterpret a uint32 bit pattern as a float32."""
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


# ---------------------------------------------------------------- Philox + Box–Muller
@njit(inline="always", cache=True)
def _philox(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 words; returns the four output words (uint32).

    Each round maps (c0, c1, c2, c3) to ``(hi(M1 c2) ^ c1 ^ k0, lo(M1 c2), hi(M0 c0) ^ c3 ^ k1,
    lo(M0 c0))`` and bumps the key by (W0, W1); the 32x32->64 products compile to vpmuludq.
    """
    for _ in range(10):
        p0 = _M0 * _U64(c0)
        p1 = _M1 * _U64(c2)
        n0 = _U32(p1 >> _U64(32)) ^ c1 ^ k0
        n2 = _U32(p0 >> _U64(32)) ^ c3 ^ k1
        c1 = _U32(p1)
        c3 = _U32(p0)
        c0 = n0
        c2 = n2
        k0 = _U32(k0 + _W0)
        k1 = _U32(k1 + _W1)
    return c0, c1, c2, c3


@njit(inline="always", fastmath=True, cache=True, error_model="numpy")
def _box_muller(u, ub, scale):
    """Two normals ``scale sqrt(-2 ln a) (cos, sin)(2 pi b)`` of the words u (-> a), ub (-> b).

    float32, accurate to a few ulp of the float64 reference, vectorisable (no libm calls):
    * radius ``sqrt(-2 ln a)``, ``a = (u + 0.5) 2^-32``: ``t = min(a, 1 - a)`` is formed exactly
      from ``u`` or ``~u`` (so a ~ 1 loses nothing), ``ln a = ln t`` or ``ln(1 - t)``, written
      ``E ln2 + ln M`` with M in [1/sqrt2, sqrt2] and ``ln M = 2 atanh((M-1)/(M+1))`` by its odd
      series (|s| <= 0.172, truncation < 1e-9);
    * angle ``2 pi (u + 0.5) 2^-32`` by exact integer quadrant reduction: ``w = u + 2^29``,
      ``q = w >> 30``, ``psi = 2 pi (w mod 2^30 - 2^29 + 0.5) 2^-32`` in [-pi/4, pi/4]; sin/cos
      of psi by Taylor series to psi^9 / psi^10 (< 2e-9), rotated by q quarter turns.
    """
    # ---- radius
    hi = u >= _U32(0x80000000)
    v = _U32(~u) if hi else u  # < 2^31
    t = (_F32(np.int32(v)) + _F32(0.5)) * _F32(2.3283064365386963e-10)  # (0, 0.5]
    bits = _f32_bits(t)
    e_a = np.int32(bits >> _U32(23)) - np.int32(127)
    m_a = _bits_f32((bits & _U32(0x7FFFFF)) | _U32(0x3F800000))  # [1, 2)
    big = m_a > _F32(1.4142135)
    m_a = m_a * _F32(0.5) if big else m_a
    e_a = e_a + np.int32(1) if big else e_a
    small = t < _F32(0.29289322)
    num_b = -t if small else _F32(1.0) - _F32(2.0) * t
    den_b = _F32(2.0) - t if small else _F32(3.0) - _F32(2.0) * t
    e_b = np.int32(0) if small else np.int32(-1)
    num = num_b if hi else m_a - _F32(1.0)
    den = den_b if hi else m_a + _F32(1.0)
    e = e_b if hi else e_a
    sr = num / den
    s2 = sr * sr
    ln_m = sr * (_F32(2.0) + s2 * (_F32(2.0 / 3.0) + s2 * (_F32(2.0 / 5.0)
                                                       + s2 * (_F32(2.0 / 7.0) + s2 * _F32(2.0 / 9.0)))))
    radius = np.sqrt(_F32(-2.0) * (_F32(e) * _F32(0.6931471805599453) + ln_m)) * scale
    # ---- angle
    w = _U32(ub + _U32(0x20000000))
    q = w >> _U32(30)
    delta = np.int32(w & _U32(0x3FFFFFFF)) - np.int32(0x20000000)
    psi = (_F32(delta) + _F32(0.5)) * _F32(1.4629180792671596e-09)  # 2 pi / 2^32
    p2 = psi * psi
    sn = psi * (_F32(1.0) + p2 * (_F32(-1.0 / 6) + p2 * (_F32(1.0 / 120)
                                                    + p2 * (_F32(-1.0 / 5040) + p2 * _F32(1.0 / 362880)))))
    cs = _F32(1.0) + p2 * (_F32(-0.5) + p2 * (_F32(1.0 / 24) + p2 * (
        _F32(-1.0 / 720) + p2 * (_F32(1.0 / 40320) + p2 * _F32(-1.0 / 3628800)))))
    odd = (q & _U32(1)) != _U32(0)  # q = 1: (-sin, cos); q = 3: (sin, -cos)
    cos_v = -sn if odd else cs
    sin_v = cs if odd else sn
    neg = q >= _U32(2)
    return radius * (-cos_v if neg else cos_v), radius * (-sin_v if neg else sin_v)


@njit(inline="always", fastmath=True, cache=True, error_model="numpy")
def _put_block(out, q, s, stream, block, k0, k1, scale):
    """``out[4q:4q+4] = scale *`` the four normals of Philox block ``(s, stream, block, 0)``.

    Words (u0, u1) -> normals 0, 1 and (u2, u3) -> 2, 3 (:func:`_box_muller`). Inlined into
    the loops below in numba's IR, where LLVM vectorises it 8 blocks per AVX2 iteration.
    """
    c0, c1, c2, c3 = _philox(s, stream, block, _U32(0), k0, k1)
    for half in range(2):
        u = c0 if half == 0 else c2  # radius word
        ub = c1 if half == 0 else c3  # angle word
        n0, n1 = _box_muller(u, ub, scale)
        out[4 * q + 2 * half] = n0
        out[4 * q + 2 * half + 1] = n1


@njit(fastmath=True, cache=True, error_model="numpy")
def _gen_row(out, s, stream, k0, k1, scale, first_block=0):
    """``out[j] = scale * z_{4 first_block + j}``, normals of sample ``s`` in ``stream``; len(out) % 4 == 0.

    Block b: Philox4x32-10 of counter ``(s, stream, first_block + b, 0)`` (:func:`_philox`),
    words (u0, u1) -> normals 4b, 4b+1 and (u2, u3) -> 4b+2, 4b+3 (:func:`_box_muller`).
    This loop is the one LLVM vectorises, 8 blocks per AVX2 iteration (the helpers are
    inlined in numba's IR: one copy each, so it also compiles quickly).
    """
    s = _U32(s)
    stream = _U32(stream)
    for b in range(out.shape[0] // 4):
        _put_block(out, b, s, stream, _U32(first_block + b), _U32(k0), _U32(k1), scale)


@njit(fastmath=True, cache=True, error_model="numpy")
def _gen_blocks(out, smp, blk, scl, stream, k0, k1):
    """``out[4q:4q+4] = scl[q] *`` the normals of block ``(smp[q], stream, blk[q], 0)``, all q.

    A whole tile's normals as one flat loop over its blocks: rows of any length then vectorise
    together. Row by row (:func:`_gen_row`), each short row's last few blocks run in scalar code:
    measured here at d = 512, 3.5 ns a normal against 2.1-2.8 flat.
    smp, blk: (n,) uint32; scl: (n,) float32; out: (4 n,) float32.
    """
    for q in range(smp.shape[0]):
        _put_block(out, q, smp[q], stream, blk[q], k0, k1, scl[q])


# ---------------------------------------------------------------- parallel kernels
_DISPERSION = _U32(0xFFFFFFFF)  # the stream of e_s (reference.DISPERSION_STREAM)


@njit(fastmath=True, cache=True, error_model="numpy")
def _init_row(xr, mr, s, e, k0, k1, sqrt_alpha, diag):
    """``xr = mu' + e_s``: the mean and the ``+ alpha`` of Sigma' (METHOD.md, Calibration).

    e_s = sqrt(alpha) z0 1 (``diag`` False, mode "all": normal 0 of block 0) or sqrt(alpha) z
    (mode "diag": normals 0..d-1), from the dispersion stream. xr, mr: (d,) float32;
    e: (d4,) float32 scratch, d4 = 4 ceil(d / 4).
    """
    d = xr.shape[0]
    if sqrt_alpha > 0:
        if diag:
            _gen_row(e, s, _DISPERSION, k0, k1, sqrt_alpha)
            for c in range(d):
                xr[c] = mr[c] + e[c]
        else:
            _gen_row(e[:4], s, _DISPERSION, k0, k1, sqrt_alpha)
            e0 = e[0]
            for c in range(d):
                xr[c] = mr[c] + e0
    else:
        for c in range(d):
            xr[c] = mr[c]


@njit(fastmath=True, cache=True, error_model="numpy")
def _add_rows(x, rows, a, y, first, mu, seed_of, e, k0, k1, sqrt_alpha, diag):
    """``x[rows[a + i], :] += y[i, :]`` for the rows of one task.

    On the first slot a row is still unwritten: it becomes ``mu' + e_s + y[i]`` right here,
    while it is in cache (:func:`_init_row`), so the output is written once and never re-read
    by a separate pass. e: (d4,) float32 scratch of this thread.
    """
    d = x.shape[1]
    for i in range(y.shape[0]):
        s = rows[a + i]
        xr = x[s]
        if first:
            _init_row(xr, mu[seed_of[s]], s, e, k0, k1, sqrt_alpha, diag)
        yr = y[i]
        for c in range(d):
            xr[c] += yr[c]


@njit(cache=True, error_model="numpy")
def _task_z(pools, rows, a, b, r4, seed_of, w_col, stream, k0, k1):
    """This thread's Z tile, (b - a, r4): ``z[i, j] = sqrt(w) normal(rows[a + i], stream, j)``.

    r4 = r_j rounded up to whole Philox blocks; the padded bank has zero rows there. The
    tile's blocks are listed (sample, block, scale) first, then drawn in one flat loop
    (:func:`_gen_blocks`).
    """
    tid = numba.get_thread_id()
    nb = r4 // 4
    n = (b - a) * nb
    smp, blk, scl = pools[3][tid, 0, :n], pools[3][tid, 1, :n], pools[4][tid, :n]
    for i in range(b - a):
        s = rows[a + i]
        sc = _F32(np.sqrt(w_col[seed_of[s]]))
        for q in range(nb):
            smp[i * nb + q] = _U32(s)
            blk[i * nb + q] = _U32(q)
            scl[i * nb + q] = sc
    z = pools[0][tid, : (b - a) * r4]
    _gen_blocks(z, smp, blk, scl, _U32(stream), _U32(k0), _U32(k1))
    return z.reshape(b - a, r4)


@njit(cache=True, error_model="numpy")
def _task_tiles(task, rows, bank4, offsets4, seed_of, w_col, stream, k0, k1, pools, d):
    """One task's operands in this thread's scratch: its Z tile (normals drawn, :func:`_task_z`),
    ``F_j^T`` (r4 x d), the Y tile to fill (b - a, d) and the e_s row buffer."""
    j, a, b = task[0], task[1], task[2]
    o0, o1 = offsets4[j], offsets4[j + 1]
    tid = numba.get_thread_id()
    z = _task_z(pools, rows, a, b, o1 - o0, seed_of, w_col, stream, k0, k1)
    return z, bank4[o0:o1], pools[1][tid, : (b - a) * d].reshape(b - a, d), pools[2][tid]


@njit(parallel=True, cache=True, error_model="numpy")
def _slot_tasks_blas(x, rows, tasks, bank4, offsets4, seed_of, w_col, stream, k0, k1, pools, first, mu, sqrt_alpha,
                     diag):
    """One slot: for each task (class j, rows[a:b]), ``x[rows] += Z F_j^T`` (METHOD.md).

    Threads over tasks (tiles of samples); each thread draws its tile's normals into its own
    buffer, multiplies with one single-threaded BLAS sgemm (``np.dot``: scipy's BLAS; the
    driver pins it to one thread) into its own output buffer and adds that into its rows, all
    in its own cache (on the first slot, writing ``mu' + e_s`` there too: :func:`_add_rows`).
    Within a slot every sample is in one task: no two threads share a row.
    bank4/offsets4: the factors transposed, each block padded with zero rows to r4 (% 4 == 0).
    pools: per-thread scratch (:func:`_pools`): Z and Y tiles, e_s rows, Z's block list.
    """
    for t in prange(tasks.shape[0]):
        z, f_t, y, e = _task_tiles(tasks[t], rows, bank4, offsets4, seed_of, w_col, stream, k0, k1, pools, x.shape[1])
        np.dot(z, f_t, y)
        _add_rows(x, rows, tasks[t, 1], y, first, mu, seed_of, e, k0, k1, sqrt_alpha, diag)


@njit(fastmath=True, cache=True, error_model="numpy")
def _gemm_loops(z, f_t, y):
    """``y = z @ f_t`` without BLAS: the inner loop over d vectorises (when scipy is absent)."""
    n, r = z.shape
    d = f_t.shape[1]
    for i in range(n):
        yr = y[i]
        yr[:] = 0.0
        for c in range(r):
            zc = z[i, c]
            fr = f_t[c]
            for q in range(d):
                yr[q] += zc * fr[q]


@njit(parallel=True, cache=True, error_model="numpy")
def _slot_tasks_loops(x, rows, tasks, bank4, offsets4, seed_of, w_col, stream, k0, k1, pools, first, mu, sqrt_alpha,
                      diag):
    """:func:`_slot_tasks_blas` with the product in plain loops (no scipy BLAS here)."""
    for t in prange(tasks.shape[0]):
        z, f_t, y, e = _task_tiles(tasks[t], rows, bank4, offsets4, seed_of, w_col, stream, k0, k1, pools, x.shape[1])
        _gemm_loops(z, f_t, y)
        _add_rows(x, rows, tasks[t, 1], y, first, mu, seed_of, e, k0, k1, sqrt_alpha, diag)


@njit(parallel=True, cache=True, error_model="numpy")
def _init_rows(x, rows, mu, seed_of, e_pool, k0, k1, sqrt_alpha, diag):
    """``x[s] = mu'[seed_of[s]] + e_s`` for the samples ``rows`` that no first-slot task writes."""
    for i in prange(rows.shape[0]):
        s = rows[i]
        _init_row(x[s], mu[seed_of[s]], s, e_pool[numba.get_thread_id()], k0, k1, sqrt_alpha, diag)


@njit(cache=True)
def _slot_rows(order, starts, counts, rows):
    """Sample ids of the seed rows in ``order``, concatenated: ``rows`` (N,) int64."""
    p = 0
    for i in order:
        c = counts[i]
        s0 = starts[i]
        for q in range(c):
            rows[p + q] = s0 + q
        p += c
    return p


# ---------------------------------------------------------------- small helpers for tests
@njit(parallel=True, cache=True)
def _block_normals_kernel(out, samples, blocks, stream, k0, k1):
    for i in prange(samples.shape[0]):
        _gen_row(out[i], samples[i], stream, k0, k1, _F32(1.0), blocks[i])


@njit(cache=True)
def _philox_kernel(out, c, k0, k1):
    for i in range(c.shape[0]):
        u0, u1, u2, u3 = _philox(_U32(c[i, 0]), _U32(c[i, 1]), _U32(c[i, 2]), _U32(c[i, 3]), k0, k1)
        out[i, 0] = u0
        out[i, 1] = u1
        out[i, 2] = u2
        out[i, 3] = u3


@njit(cache=True)
def _box_muller_kernel(out, ua, ub):
    for i in range(ua.shape[0]):
        n0, n1 = _box_muller(ua[i], ub[i], _F32(1.0))
        out[i, 0] = n0
        out[i, 1] = n1


def box_muller_words(ua: np.ndarray, ub: np.ndarray) -> np.ndarray:
    """The float32 Box–Muller of word pairs: (n, 2) = sqrt(-2 ln a) (cos, sin)(2 pi b) (for tests)."""
    ua = np.ascontiguousarray(ua, dtype=np.uint32).reshape(-1)
    ub = np.ascontiguousarray(ub, dtype=np.uint32).reshape(-1)
    out = np.empty((ua.shape[0], 2), np.float32)
    _box_muller_kernel(out, ua, ub)
    return out


def philox_words(counters: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """The njit Philox4x32-10 on counters (n, 4) -> words (n, 4) uint32 (for tests)."""
    counters = np.ascontiguousarray(counters, dtype=np.uint32).reshape(-1, 4)
    out = np.empty(counters.shape, np.uint32)
    _philox_kernel(out, counters.astype(np.int64), _U32(key[0]), _U32(key[1]))
    return out


def block_normals_f32(seed: int, samples: np.ndarray, stream: int, blocks: np.ndarray) -> np.ndarray:
    """The njit float32 Box–Muller normals of blocks ``(samples[i], stream, blocks[i], 0)``: (n, 4)."""
    samples = np.ascontiguousarray(samples, dtype=np.int64).reshape(-1)
    blocks = np.ascontiguousarray(np.broadcast_to(blocks, samples.shape), dtype=np.int64)
    k0, k1 = seed_key(seed)
    out = np.empty((samples.shape[0], 4), np.float32)
    _block_normals_kernel(out, samples, blocks, _U32(stream), _U32(k0), _U32(k1))
    return out


# ---------------------------------------------------------------- BLAS threads
def _find_blas_threads():
    """(get, set) of the thread count of the BLAS that numba's ``np.dot`` calls, or None.

    numba's ``np.dot`` calls scipy's BLAS (``scipy.linalg.cython_blas``); wheels bundle
    OpenBLAS in ``scipy.libs``. Our threads each call it on their own tile, so it must run
    single-threaded: a multi-threaded BLAS inside every thread oversubscribes the cores (on a
    busy 2-core machine small GEMMs then run 10x slower).
    """
    try:
        import scipy
        import scipy.linalg.cython_blas  # noqa: F401  (loads the library)
    except ImportError:
        return None
    root = os.path.dirname(scipy.__file__)
    libs = sorted(glob.glob(os.path.join(root, os.pardir, "scipy.libs", "*openblas*.so*")))
    libs += sorted(glob.glob(os.path.join(root, ".dylibs", "*openblas*")))
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("scipy_openblas", "openblas"):
            get = getattr(lib, f"{prefix}_get_num_threads", None)
            put = getattr(lib, f"{prefix}_set_num_threads", None)
            if get is not None and put is not None:
                put.argtypes = [ctypes.c_int]
                return get, put
    return None


_BLAS = {"probed": False, "have_dot": False, "threads": None}
_LOCK = threading.Lock()


def _blas():
    if not _BLAS["probed"]:
        try:
            import scipy.linalg.cython_blas  # noqa: F401  (numba's np.dot needs it)

            _BLAS["have_dot"] = True
        except ImportError:
            log.warning("scipy not found: the numba sampler multiplies in plain loops (slower); "
                        "pip install scipy for BLAS speed")
        _BLAS["threads"] = _find_blas_threads() if _BLAS["have_dot"] else None
        if _BLAS["have_dot"] and _BLAS["threads"] is None:
            log.warning("could not find scipy's OpenBLAS to pin it to one thread per numba thread; "
                        "the numba sampler may oversubscribe the cores")
        _BLAS["probed"] = True
    return _BLAS


class _single_threaded_blas:
    """Context: scipy's BLAS at one thread (restored after); numba threads over the tiles."""

    def __enter__(self):
        threads = _blas()["threads"]
        self.old = None
        if threads is not None:
            get, put = threads
            self.old = get()
            put(1)
        return self

    def __exit__(self, *exc):
        if self.old is not None:
            _blas()["threads"][1](self.old)


# ---------------------------------------------------------------- the driver
def tile_rows(d: int) -> int:
    """Samples per task: enough rows for an efficient single-threaded sgemm.

    Measured here (2-core AMD EPYC, OpenBLAS), d = 512 with r_j up to 512: 128-row tiles ran
    the sgemms at 70-80 % of the whole-group rate, 512-row tiles at 90-100 %. At d = 2048,
    256 and 512 rows ran alike; 256 keeps each thread's Z and Y tiles at a few MB.
    """
    return 512 if d <= 1024 else 256


def empty_output(n: int, d: int) -> np.ndarray:
    """A fresh (n, d) float32 C-contiguous array for :func:`sample_numba`, in plain 4 KiB pages.

    numpy asks the kernel for transparent huge pages on arrays of 4 MiB and more
    (``madvise(MADV_HUGEPAGE)``), and where the kernel's THP ``defrag`` setting is ``madvise``
    (a common default) that request makes it compact memory right there, whenever free huge pages
    have run short. Measured here on a 80 MB output (CIFAR-100-LT, d = 512): mapping it took
    10-13 ms in a quiet process and 90-180 ms after other large arrays had come and gone, and over
    calls interleaved with other work the sampler's median was 6.8-7.6 us a sample with these
    pages and 8.8-10.0 with huge pages. Large outputs are therefore an anonymous private mapping
    of their own, without that request: the kernel gives it huge pages only where its THP setting
    allows them without a stall (none here), and the threads fault its pages in as they write
    (mapping them all first, with ``MADV_POPULATE_WRITE``, was no faster).
    ``sample_calibrated(..., out=)`` avoids the fresh pages altogether.
    """
    nbytes = n * d * 4
    if nbytes < 1 << 22 or not hasattr(mmap, "MAP_ANONYMOUS"):
        return np.empty((n, d), dtype=np.float32)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(buf, dtype=np.float32, count=n * d).reshape(n, d)


def _slot_tasks(cls, counts, starts, ranks, tm):
    """Tasks of one slot: samples grouped by support class, cut into tiles of <= tm rows.

    Returns rows (N,) int64 sample ids ordered by class, and tasks (T, 3) int64 (class, a, b)
    over ``rows`` for classes with r_j > 0, in a fixed shuffled order (balances the threads).
    """
    order = np.argsort(cls, kind="stable")
    rows = np.empty(int(counts.sum()), np.int64)
    _slot_rows(order, starts, counts, rows)
    per_class = np.bincount(cls, weights=counts, minlength=len(ranks)).astype(np.int64)
    ptr = np.concatenate([[0], np.cumsum(per_class)])
    tasks = [(j, a, min(a + tm, ptr[j + 1]))
             for j in np.flatnonzero((per_class > 0) & (ranks > 0)) for a in range(ptr[j], ptr[j + 1], tm)]
    tasks = np.array(tasks, dtype=np.int64).reshape(-1, 3)
    # interleave big and small classes: numba hands each thread a contiguous share of tasks
    return rows, tasks[np.random.default_rng(len(tasks)).permutation(len(tasks))]


def _pools(tm, r4_max, d):
    """Per-thread scratch (indexed by ``numba.get_thread_id()``): Z tiles (float32), Y tiles
    (float32), e_s rows (float32), the Z tile's block list: (sample, block) uint32 and scale
    float32 (:func:`_task_z`)."""
    n = numba.config.NUMBA_NUM_THREADS  # every id a thread can have
    d4 = 4 * ((d + 3) // 4)
    z_len = tm * max(r4_max, 1)
    return (np.empty((n, z_len), np.float32), np.empty((n, tm * d), np.float32), np.empty((n, d4), np.float32),
            np.empty((n, 2, z_len // 4 + 1), np.uint32), np.empty((n, z_len // 4 + 1), np.float32))


def sample_numba(
    bank4: np.ndarray,
    offsets4: np.ndarray,
    mu: np.ndarray,
    support: np.ndarray,
    weights: np.ndarray,
    counts: np.ndarray,
    out: np.ndarray,
    alpha: float = 0.0,
    mode: str = "all",
    seed: int = 0,
    tile: int | None = None,
) -> None:
    """Fill ``out`` (N, d) float32 with calibrated samples (METHOD.md, low-rank sampling).

    Args:
        bank4: (R4, d) float32 C-contiguous, the factors transposed with each block padded by
            zero rows to a multiple of 4: rows ``offsets4[j]:offsets4[j+1]`` hold ``F_j^T``
            (r_j x d) then zeros (``FactorBank.transposed_padded(device, 4)``). The Z tile then
            takes whole Philox blocks and the padding adds exact zeros.
        offsets4: (C+1,) int64, multiples of 4.  mu: (m, d) float32.  support: (m, k) int64.
        weights: (m, k) float32, w >= 0.  counts: (m,) int64.
        out: (N, d) float32 C-contiguous, N = counts.sum(), written in place.
        alpha, mode, seed: dispersion and RNG key, as in :func:`glag.sampling.sample_calibrated`.
        tile: samples per task (default :func:`tile_rows`).
    """
    m, d = mu.shape
    k = support.shape[1]
    n_total = out.shape[0]
    k0, k1 = (_U32(v) for v in seed_key(seed))
    counts = np.ascontiguousarray(counts, dtype=np.int64)
    offsets4 = np.ascontiguousarray(offsets4, dtype=np.int64)
    if np.any(offsets4 % 4):
        raise ValueError("sample_numba needs the bank padded to multiples of 4 rows a class")
    starts = np.zeros(m, np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    seed_of = np.repeat(np.arange(m, dtype=np.int64), counts)
    ranks4 = np.diff(offsets4)
    r_used = ranks4[np.unique(support)] if support.size else ranks4[:0]
    r4_max = int(r_used.max()) if r_used.size else 0
    tm = tile or tile_rows(d)
    kernel = _slot_tasks_blas if _blas()["have_dot"] else _slot_tasks_loops

    sqrt_alpha = _F32(math.sqrt(alpha)) if alpha > 0 else _F32(0.0)
    diag = mode == "diag"
    pools = _pools(tm if k and r4_max else 0, r4_max, d)
    # mu' + e_s is written by the first slot's tasks (_add_rows); the rows they do not cover
    # (first support of rank 0, or k = 0) get it here
    if k and r4_max:
        uncovered = np.flatnonzero(np.repeat(ranks4[support[:, 0]] == 0, counts))
    else:
        uncovered = np.arange(n_total, dtype=np.int64)
    with _LOCK, _single_threaded_blas():
        if len(uncovered):
            with numba.parallel_chunksize(64):
                _init_rows(out, uncovered, mu, seed_of, pools[2], k0, k1, sqrt_alpha, diag)
        if k == 0 or n_total == 0 or r4_max == 0:
            return
        for slot in range(k):
            rows, tasks = _slot_tasks(np.ascontiguousarray(support[:, slot]), counts, starts, ranks4, tm)
            if len(tasks):
                w_col = np.ascontiguousarray(weights[:, slot], dtype=np.float32)
                with numba.parallel_chunksize(1):  # tasks handed out one at a time: load balance
                    kernel(out, rows, tasks, bank4, offsets4, seed_of, w_col, _U32(slot), k0, k1, pools,
                           slot == 0, mu, sqrt_alpha, diag)


# ---------------------------------------------------------------- for the benchmark
@njit(parallel=True, cache=True, error_model="numpy")
def _tasks_gemm_only(tasks, bank4, offsets4, z_pool, y_pool):
    """The tasks' sgemms alone: same tiles, buffers and threading, no RNG, no scatter."""
    d = bank4.shape[1]
    for t in prange(tasks.shape[0]):
        j, a, b = tasks[t, 0], tasks[t, 1], tasks[t, 2]
        o0, o1 = offsets4[j], offsets4[j + 1]
        tid = numba.get_thread_id()
        z = z_pool[tid, : (b - a) * (o1 - o0)].reshape(b - a, o1 - o0)
        np.dot(z, bank4[o0:o1], y_pool[tid, : (b - a) * d].reshape(b - a, d))


def gemm_tiles(bank4, offsets4, support, counts, tile=None):
    """A callable running the numba backend's GEMMs alone on a job: its per-thread BLAS ceiling.

    Same tasks (slot, class, tile), buffers and threading as :func:`sample_numba`; Z is a fixed
    random buffer. Returns ``run()`` (no arguments). Needs scipy (numba's ``np.dot``).
    """
    counts = np.ascontiguousarray(counts, dtype=np.int64)
    offsets4 = np.ascontiguousarray(offsets4, dtype=np.int64)
    starts = np.zeros(len(counts), np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    ranks4 = np.diff(offsets4)
    r4_max = int(ranks4[np.unique(support)].max())
    tm = tile or tile_rows(bank4.shape[1])
    all_tasks = [_slot_tasks(np.ascontiguousarray(support[:, s]), counts, starts, ranks4, tm)[1]
                 for s in range(support.shape[1])]
    z_pool, y_pool = _pools(tm, r4_max, bank4.shape[1])[:2]
    z_pool[:] = np.random.default_rng(0).standard_normal(z_pool.shape)

    def run():
        with _LOCK, _single_threaded_blas(), numba.parallel_chunksize(1):
            for tasks in all_tasks:
                if len(tasks):
                    _tasks_gemm_only(tasks, bank4, offsets4, z_pool, y_pool)
    return run
