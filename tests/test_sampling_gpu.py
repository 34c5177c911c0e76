"""The CUDA backend (kernels/calibrated_sampler.cu through CuPy).

Tests marked ``gpu`` need CuPy and a CUDA GPU and skip without them (``pytest -m gpu``).
The first tests need neither: they compile the CUDA C source as C++ with a small shim (one
std::thread per CUDA thread, a std::barrier for ``__syncthreads``, blocks one at a time; the
tensor-core kernel's warp-wide ``mma.sync`` and shuffles through a per-warp exchange, its
float16 conversions through ``_Float16``) and check the kernels' indexing, tiling, fragment
layouts and RNG against the reference on the CPU, so CI without a GPU still exercises the kernel
code.
"""
import ctypes
import shutil
import subprocess

import numpy as np
import pytest
import torch

from glag import sampling
from glag.kernels import cuda as kcuda
from glag.kernels import reference
from glag.sampling import FactorBank, class_factor, sample_calibrated

_OK, _WHY = kcuda.is_available()
FMA_SHAPES = [t for t, shape in kcuda.WIDE_SHAPES.items() if not shape.tensor_cores]  # float32 FMA, same bits
TC_SHAPES = [t for t, shape in kcuda.WIDE_SHAPES.items() if shape.tensor_cores]
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not _OK, reason=f"cuda backend unavailable: {_WHY}")

SHIM = r"""
#include <barrier>
#include <cmath>
#include <cstring>
#include <deque>
#include <string>
#include <thread>
#include <vector>
struct glag_dim3 { unsigned int x, y, z; };
static glag_dim3 blockIdx, gridDim, blockDim;  // blocks run one at a time
static thread_local glag_dim3 threadIdx;
static std::barrier<>* glag_emu_barrier;
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
static inline void __syncthreads() { glag_emu_barrier->arrive_and_wait(); }
static inline unsigned int __umulhi(unsigned int a, unsigned int b) {
    return (unsigned int)(((unsigned long long)a * b) >> 32);
}
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
static inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) uint4 { unsigned int x, y, z, w; };
static inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
// The tensor-core kernel's sm_80 pieces. Warp-wide operations go through a per-warp exchange
// (every lane of the warp calls them together, as on the GPU).
#define GLAG_WARP_EMULATED
static std::barrier<>* glag_emu_warp[32];
static unsigned int glag_emu_xchg[1024][6];
static inline void glag_emu_warp_sync() { glag_emu_warp[threadIdx.x / 32]->arrive_and_wait(); }
static inline unsigned short glag_half(float v) {  // nearest even, as cvt.rn.f16.f32
    const _Float16 h = (_Float16)v;
    unsigned short u;
    std::memcpy(&u, &h, 2);
    return u;
}
static inline float glag_half_float(unsigned short u) {
    _Float16 h;
    std::memcpy(&h, &u, 2);
    return (float)h;
}
static inline float glag_shfl_xor(float v, int lane_mask) {
    const unsigned int tid = threadIdx.x;
    glag_emu_xchg[tid][0] = __float_as_uint(v);
    glag_emu_warp_sync();
    const float got = __uint_as_float(glag_emu_xchg[tid ^ (unsigned int)lane_mask][0]);
    glag_emu_warp_sync();
    return got;
}
// mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 (PTX ISA, fragments of mma.m16n8k16 for .f16):
// lane = 4 g + t; a_r holds A(g + 8 (r % 2), k = 2 (t + 4 (r / 2)) + {0, 1}); b_r holds
// B(k = 2 (t + 4 r) + {0, 1}, n = g); d_r is D(g + 8 (r / 2), 2 t + r % 2); the lower k in the low half.
static inline float glag_emu_half_at(unsigned int word, int k) {
    return glag_half_float((unsigned short)(word >> (16 * (k & 1))));
}
static inline void glag_mma_f16(float* d, const unsigned int* a, const unsigned int* b) {
    const unsigned int tid = threadIdx.x, base = tid & ~31u, lane = tid & 31u;
    for (int q = 0; q < 4; ++q) glag_emu_xchg[tid][q] = a[q];
    for (int q = 0; q < 2; ++q) glag_emu_xchg[tid][4 + q] = b[q];
    glag_emu_warp_sync();
    const unsigned int g = lane / 4, t = lane % 4;
    for (int q = 0; q < 4; ++q) {
        const unsigned int row = g + 8 * (q / 2), col = 2 * t + q % 2;
        float acc = d[q];
        for (int kk = 0; kk < 16; ++kk) {
            const unsigned int pair = kk / 2, a_lane = (row % 8) * 4 + pair % 4, b_lane = col * 4 + pair % 4;
            const float av = glag_emu_half_at(glag_emu_xchg[base + a_lane][row / 8 + 2 * (pair / 4)], kk);
            const float bv = glag_emu_half_at(glag_emu_xchg[base + b_lane][4 + pair / 4], kk);
            acc += av * bv;
        }
        d[q] = acc;
    }
    glag_emu_warp_sync();
}
#include "calibrated_sampler.cu"
template <class F> static void emu_launch(unsigned int gx, unsigned int gy, F body, unsigned int nt = 256) {
    gridDim = {gx, gy, 1};
    blockDim = {nt, 1, 1};
    for (unsigned int by = 0; by < gy; ++by)
        for (unsigned int bx = 0; bx < gx; ++bx) {
            blockIdx = {bx, by, 0};
            std::barrier<> bar(nt);
            glag_emu_barrier = &bar;
            std::deque<std::barrier<>> warps;
            for (unsigned int w = 0; w < (nt + 31) / 32; ++w)
                glag_emu_warp[w] = &warps.emplace_back(nt - 32 * w < 32 ? nt - 32 * w : 32);
            std::vector<std::thread> threads;
            for (unsigned int t = 0; t < nt; ++t)
                threads.emplace_back([&, t] { threadIdx = {t, 0, 0}; body(); });
            for (auto& th : threads) th.join();
        }
}
extern "C" void emu_mma_probe(const unsigned int* a, const unsigned int* b, float* d) {
    emu_launch(1, 1, [&] { glag_mma_probe_kernel(a, b, d); }, 32);
}
extern "C" void emu_split4(const float* v, long long n, uint4* split) {
    emu_launch((unsigned int)((n + 63) / 64), 1, [&] { glag_split4_kernel(v, n, split); }, 64);
}
extern "C" void emu_plan(const long long* support, const long long* counts, const long long* ends, long long m,
                         int k, const long long* offsets, int n_classes, long long n, long long bound,
                         int bm, unsigned long long* hist, unsigned long long* cursor, long long* tiles,
                         long long* rows, long long* row_seed, unsigned int grid) {
    emu_launch(grid, 1, [&] { glag_plan_count(support, counts, m, k, n_classes, hist); });
    emu_launch((unsigned int)k, 1, [&] { glag_plan_tiles(hist, offsets, n_classes, bm, bound, cursor, tiles); });
    emu_launch(grid, 1, [&] {
        glag_plan_rows(support, counts, ends, m, k, n_classes, n, cursor, rows, row_seed); });
}
extern "C" int emu_slot_gemm(const char* kernel_name, unsigned int nt, long long n_tiles, const float* ft,
                             const long long* offsets,
                              const long long* rows, const long long* row_seed, const long long* tiles,
                              const float* weights, const float* mu, int k, int slot, int d, unsigned int k0,
                              unsigned int k1, float sqrt_alpha, int diag, int vec, float* x, const float* bscale) {
    const std::string name(kernel_name);
    auto kernel = name == "glag_slot_gemm_bn64"          ? glag_slot_gemm_bn64
                  : name == "glag_slot_gemm_bn256"       ? glag_slot_gemm_bn256
                  : name == "glag_slot_gemm_bm128_bn256" ? glag_slot_gemm_bm128_bn256
                  : name == "glag_slot_gemm_bn256_t128"  ? glag_slot_gemm_bn256_t128
                                                         : nullptr;
    auto tc_kernel = name == "glag_slot_gemm_tc_bn256"      ? glag_slot_gemm_tc_bn256
                     : name == "glag_slot_gemm_tc_bn256_r1" ? glag_slot_gemm_tc_bn256_r1
                                                            : nullptr;
    const bool tc = tc_kernel != nullptr;
    if (kernel == nullptr && !tc) return -1;
    const unsigned int bn = name == "glag_slot_gemm_bn64" ? 64 : 256;
    emu_launch((unsigned int)n_tiles, (unsigned int)((d + bn - 1) / bn), [&] {
        if (tc)
            tc_kernel(ft, offsets, rows, row_seed, tiles, weights, mu, k, slot, d, k0, k1, sqrt_alpha, diag, vec, x,
                      bscale);
        else
            kernel(ft, offsets, rows, row_seed, tiles, weights, mu, k, slot, d, k0, k1, sqrt_alpha, diag, vec, x);
    }, nt);
    return 0;
}
"""


def _problem(d, ns, m, k, counts, seed=0):
    g = torch.Generator().manual_seed(seed)
    bank = FactorBank.from_factors([class_factor(torch.randn(n, d, generator=g) * (1 + j % 3))
                                    for j, n in enumerate(ns)])
    mu = torch.randn(m, d, generator=g) * 2
    support = torch.stack([torch.randperm(len(ns), generator=g)[:k] for _ in range(m)])
    w = torch.rand(m, k, generator=g) + 0.05
    return bank, mu, support, w / w.sum(1, keepdim=True), torch.tensor(counts), torch.arange(m)


# ------------------------------------------------------------------ the CUDA source on the CPU
@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ not found: cannot emulate the CUDA source on the CPU")
    out = tmp_path_factory.mktemp("cuda_emu")
    (out / "shim.cpp").write_text(SHIM)
    lib = out / "emu.so"
    cmd = [cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-Wno-unknown-pragmas",
           f"-I{kcuda.SOURCE.parent}", str(out / "shim.cpp"), "-o", str(lib)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0 and "barrier" in res.stderr:
        pytest.skip("this g++ has no C++20 <barrier>")
    assert res.returncode == 0, res.stderr
    return ctypes.CDLL(str(lib))


def _ptr(a):
    return a.ctypes.data_as(ctypes.c_void_p)


def _emulated_plan(lib, support, counts, offsets, bm=64, grid=2):
    """kernels/cuda.py ``plan_cuda`` with the plan kernels run on the CPU: rows, row_seed, tiles."""
    support, counts, offsets = (np.ascontiguousarray(t.numpy(), np.int64) for t in (support, counts, offsets))
    (m, k), n_classes, n = support.shape, len(offsets) - 1, int(counts.sum())
    bound = kcuda.tile_bound(n, n_classes, m, bm)
    hist, cursor = np.zeros((k, n_classes), np.uint64), np.empty((k, n_classes), np.uint64)
    tiles = np.empty((k, bound, 3), np.int64)
    rows, row_seed = np.empty((k, n), np.int64), np.empty((k, n), np.int64)
    lib.emu_plan(_ptr(support), _ptr(counts), _ptr(np.cumsum(counts)), ctypes.c_longlong(m), ctypes.c_int(k),
                 _ptr(offsets), ctypes.c_int(n_classes), ctypes.c_longlong(n), ctypes.c_longlong(bound),
                 ctypes.c_int(bm), _ptr(hist), _ptr(cursor), _ptr(tiles), _ptr(rows), _ptr(row_seed),
                 ctypes.c_uint(grid))
    return rows, row_seed, tiles


def _emulated_sample(lib, bank, mu, support, w, counts, alpha, mode, seed, misalign=False, tile=None):
    """The host side of kernels/cuda.py ``sample_cuda``, with the kernels run on the CPU.
    ``misalign``: x starts 4 bytes past a 16-byte boundary (the scalar epilogue at d % 4 == 0).
    ``tile``: the block tile at d >= 256, as in ``sample_cuda``."""
    m, d = mu.shape
    n = int(counts.sum())
    offsets = bank.offsets
    if support.shape[1] == 0:
        support, w, offsets = kcuda.placeholder_slot(m, "cpu")
    k = support.shape[1]
    ft = bank.transposed("cpu").numpy()
    mu_n, w_n, off_n = mu.numpy(), np.ascontiguousarray(w.numpy()), offsets.numpy()
    storage = np.empty(n * d + 8, np.float32)
    first = (-storage.ctypes.data // 4) % 4 + (1 if misalign else 0)
    x = storage[first:first + n * d].reshape(n, d)
    vec = d % 4 == 0 and x.ctypes.data % 16 == 0 and mu_n.ctypes.data % 16 == 0
    assert vec != misalign or d % 4 != 0
    k0, k1 = reference.seed_key(seed)
    shape = kcuda.slot_gemm_shape(d, tile)
    rows, row_seed, tiles = _emulated_plan(lib, support, counts, offsets, shape.bm)
    bscale = kcuda.class_scales(torch.from_numpy(ft), offsets).numpy()
    for slot in range(k):
        rc = lib.emu_slot_gemm(shape.kernel.encode(), ctypes.c_uint(shape.threads), ctypes.c_longlong(tiles.shape[1]),
                               _ptr(ft), _ptr(off_n), _ptr(rows[slot]), _ptr(row_seed[slot]), _ptr(tiles[slot]),
                               _ptr(w_n), _ptr(mu_n), ctypes.c_int(k), ctypes.c_int(slot), ctypes.c_int(d),
                               ctypes.c_uint(k0), ctypes.c_uint(k1), ctypes.c_float(alpha**0.5),
                               ctypes.c_int(mode == "diag"), ctypes.c_int(vec), _ptr(x), _ptr(bscale))
        assert rc == 0, f"the emulator shim has no {shape.kernel}: add it to SHIM's emu_slot_gemm"
    return torch.from_numpy(x.copy())


def _emulated_problem(d, k):
    """Factors of rank 0 / < 16 / not a multiple of 8 or 16 / = d (n > d), a seed row with no
    samples, 213 samples: tiles of 64 and of 128 rows, full and partial."""
    return _problem(d, ns=(1, 5, 20, 37, 70, 400), m=6, k=k, counts=[0, 3, 70, 1, 130, 9])


@pytest.mark.parametrize("d,k,mode,alpha,misalign,tile", [(37, 3, "all", 0.1, False, None)] + [
    (300, *case, tile) for tile in kcuda.WIDE_SHAPES
    for case in [(3, "diag", 0.2, False), (2, "all", 0.2, True), (0, "diag", 0.3, False)]])
def test_cuda_source_emulated_on_cpu_matches_reference(emulator, d, k, mode, alpha, misalign, tile):
    """64 x 64 (d = 37, scalar epilogue) and every shape for d >= 256 (d = 300, two column blocks,
    float4 epilogue; scalar with x misaligned); partial tiles, empty tiles padding the grid, k = 0
    (x = mu' + e from the placeholder slot)."""
    bank, mu, support, w, counts, labels = _emulated_problem(d, k)
    x = _emulated_sample(emulator, bank, mu, support, w, counts, alpha, mode, seed=2**33 + 5, misalign=misalign,
                         tile=tile)
    xr, _ = sample_calibrated(bank, mu, support, w, counts, labels, alpha, mode, 2**33 + 5, backend="torch")
    assert (x - xr).abs().max() / xr.abs().max() <= 1e-5


def test_cuda_tile_shapes_emulated_give_identical_samples(emulator):
    """Every float32 FMA shape for d >= 256 (K steps of 16 or 8, 64- or 128-row tiles, 256 or 128
    threads) computes each output as the same products added in the same order: the samples are
    equal bit for bit."""
    bank, mu, support, w, counts, _ = _emulated_problem(300, 3)
    xs = [_emulated_sample(emulator, bank, mu, support, w, counts, 0.2, "diag", seed=11, tile=t) for t in FMA_SHAPES]
    assert len(xs) >= 3 and all(torch.equal(xs[0], x) for x in xs[1:])


@pytest.mark.parametrize("tile", TC_SHAPES)
@pytest.mark.parametrize("factor_scale,weight", [(1e-6, 1.0), (1e6, 1.0), (1.0, 40.0), (3e-3, 1e-4)])
def test_cuda_tensor_core_shape_emulated_keeps_float32_accuracy_at_any_scale(emulator, tile, factor_scale, weight):
    """The tensor-core kernel splits its operands into float16 pieces: scaling the factors far out
    of float16's range (1e-6, 1e6; the class scales s_j bring them back) or the weights by 40 or
    1e-4 (sqrt(w) is applied after the product) keeps it within 1e-5 of the float64 reference, as
    unscaled."""
    bank, mu, support, w, counts, labels = _emulated_problem(300, 2)
    bank = FactorBank(bank.data * factor_scale, bank.offsets)
    mu, w = mu * factor_scale, w * weight
    x = _emulated_sample(emulator, bank, mu, support, w, counts, 0.0, "all", seed=3, tile=tile)
    xr, _ = sample_calibrated(bank, mu, support, w, counts, labels, 0.0, "all", 3, backend="torch")
    assert (x - xr).abs().max() / xr.abs().max() <= 1e-5


def _mma_fragments(A, B):
    """A (16, 16), B (16, 8) -> the lanes' registers of mma.m16n8k16 with .f16 inputs (PTX ISA,
    "Matrix fragments for mma.m16n8k16"): lane = 4 g + t; a_r = A[g + 8 (r % 2), k..k+1] with
    k = 2 (t + 4 (r // 2)), b_r = B[k..k+1, g] with k = 2 (t + 4 r); the lower k in the low half.
    Returns a (32, 4) and b (32, 2) uint32."""
    def pair(x0, x1):
        return int(np.float16(x0).view(np.uint16)) | (int(np.float16(x1).view(np.uint16)) << 16)

    a, b = np.zeros((32, 4), np.uint32), np.zeros((32, 2), np.uint32)
    for lane in range(32):
        g, t = divmod(lane, 4)
        for r in range(4):
            row, k = g + 8 * (r % 2), 2 * (t + 4 * (r // 2))
            a[lane, r] = pair(A[row, k], A[row, k + 1])
        for r in range(2):
            k = 2 * (t + 4 * r)
            b[lane, r] = pair(B[k, g], B[k + 1, g])
    return a, b


def _mma_product(d):
    """(32, 4) accumulator registers -> D (16, 8): d_r of lane 4 g + t is D[g + 8 (r // 2), 2 t + r % 2]."""
    out = np.zeros((16, 8), np.float32)
    for lane in range(32):
        g, t = divmod(lane, 4)
        for r in range(4):
            out[g + 8 * (r // 2), 2 * t + r % 2] = d[lane, r]
    return out


def _mma_case(seed=0):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((16, 16)).astype(np.float16)
    B = (rng.standard_normal((16, 8)) * 100).astype(np.float16)
    return A, B, A.astype(np.float64) @ B.astype(np.float64)


def _split_case(seed=0):
    """Floats over float16's whole normal range and both signs, and their float16 split."""
    rng = np.random.default_rng(seed)
    v = (rng.choice([-1.0, 1.0], 4096) * 2.0 ** rng.uniform(-10, 14, 4096)).astype(np.float32)
    v[:4] = [0.0, 1.0, -0.5, 2.0**14 - 1.0]
    hi = v.astype(np.float16)
    lo = (v - hi.astype(np.float32)).astype(np.float16)
    bits = lambda h: h.view(np.uint16).astype(np.uint32).reshape(-1, 2)  # noqa: E731  (pairs, c0 low)
    expect = np.stack([bits(hi)[:, 0] | bits(hi)[:, 1] << 16, bits(lo)[:, 0] | bits(lo)[:, 1] << 16], 1)
    # per group of 4: (hi c0 c1, hi c2 c3, lo c0 c1, lo c2 c3)
    expect = expect.reshape(-1, 2, 2).transpose(0, 2, 1).reshape(-1, 4)
    return v, expect


def test_mma_probe_emulated_matches_the_fragment_layout(emulator):
    """One mma.sync m16n8k16 (emulated), fragments packed by the PTX layout above: D = A B. On a
    GPU the same test (test_mma_probe_on_gpu) checks that layout against the hardware."""
    A, B, ref = _mma_case()
    a, b = _mma_fragments(A, B)
    d = np.zeros((32, 4), np.float32)
    emulator.emu_mma_probe(_ptr(a), _ptr(b), _ptr(d))
    np.testing.assert_allclose(_mma_product(d), ref, rtol=1e-5, atol=1e-3)  # the layout; any mix-up is O(100)


def test_split4_emulated_is_float16_nearest_even(emulator):
    v, expect = _split_case()
    out = np.zeros((len(v) // 4, 4), np.uint32)
    emulator.emu_split4(_ptr(v), ctypes.c_longlong(len(v) // 4), _ptr(out))
    np.testing.assert_array_equal(out, expect)


def test_class_scales_put_each_factor_top_in_float16_range():
    """s_j is a power of two with max |F_j| s_j in [2^13, 2^14); 1 for a class of rank 0, zero or
    non-finite factors; clamped to 2^+-100; rows past offsets[-1] (the k = 0 placeholder) ignored."""
    rows = torch.tensor([[0.5, -3.0], [1.0, 2.0], [0.0, 0.0], [1e-33, 0.0], [float("inf"), 1.0], [7e30, 0.0],
                         [-2.0**-20, 1e-9], [5.0, 5.0]])
    s = kcuda.class_scales(rows, torch.tensor([0, 2, 2, 3, 4, 5, 6, 7]))
    assert s.dtype == torch.float32 and s.tolist() == [2.0**12, 1.0, 1.0, 2.0**100, 1.0, 2.0**-89, 2.0**33]
    tops = torch.tensor([3.0, 7e30, 2.0**-20])
    assert (((tops * s[[0, 5, 6]]) >= 2**13) & ((tops * s[[0, 5, 6]]) < 2**14)).all()
    assert kcuda.class_scales(rows, torch.tensor([0, 0])).tolist() == [1.0]
    assert kcuda.class_scales(rows[:0], torch.tensor([0, 0, 0])).tolist() == [1.0, 1.0]


def test_slot_gemm_shape_choice(monkeypatch):
    """64 x 64 below d = 256 whatever is asked; above, the argument, then $GLAG_CUDA_TILE, then the
    default; an unknown shape is an error that names the valid ones."""
    monkeypatch.delenv(kcuda.ENV_TILE, raising=False)
    assert kcuda.slot_gemm_shape(255, "128x256") == kcuda.NARROW_SHAPE
    assert kcuda.slot_gemm_shape(256) == kcuda.WIDE_SHAPES[kcuda.DEFAULT_WIDE]
    monkeypatch.setenv(kcuda.ENV_TILE, "128x256")
    assert kcuda.slot_gemm_shape(2048).bm == 128
    assert kcuda.slot_gemm_shape(2048, "64x256").bm == 64
    monkeypatch.setenv(kcuda.ENV_TILE, "96x256")
    valid = r"'128x256', '64x256', '64x256t128', '64x256tc', '64x256tc1'"
    with pytest.raises(ValueError, match=r"'96x256' \(from GLAG_CUDA_TILE\).*" + valid):
        kcuda.slot_gemm_shape(512)
    assert kcuda.slot_gemm_shape(512, "64x256tc", capability=(9, 0)).tensor_cores
    assert kcuda.slot_gemm_shape(100, "64x256tc", capability=(7, 5)) == kcuda.NARROW_SHAPE
    too_old = r"'64x256tc' \(from the tile argument\).*tensor cores.*8\.0.*7\.5: use '64x256'"
    with pytest.raises(ValueError, match=too_old):
        kcuda.slot_gemm_shape(512, "64x256tc", capability=(7, 5))
    monkeypatch.delenv(kcuda.ENV_TILE)
    monkeypatch.setattr(kcuda, "DEFAULT_WIDE", "64x256tc")  # a tensor-core default gives way below 8.0
    assert kcuda.slot_gemm_shape(512, capability=(9, 0)).tensor_cores
    assert kcuda.slot_gemm_shape(512, capability=(7, 0)) == kcuda.WIDE_SHAPES[kcuda.FMA_WIDE]
    assert not kcuda.WIDE_SHAPES[kcuda.FMA_WIDE].tensor_cores


@pytest.mark.parametrize("seed,bm", [(s, 64) for s in range(5)] + [(s, 128) for s in range(2)])
def test_plan_groups_each_sample_once_and_pads_with_empty_tiles(emulator, seed, bm):
    """The plan kernels (emulated; two blocks, so the grid-stride loops turn): in each slot, rows
    is every sample once, grouped by class in increasing order, row_seed its seed row; every
    sample in exactly one tile of its class (after slot 0 only classes with r_j > 0), tiles of
    <= bm rows, all full but a class's last, then only empty tiles up to the bound."""
    g = torch.Generator().manual_seed(seed)
    n_classes, m, k = 9, 40, 3
    ranks = torch.randint(0, 3, (n_classes,), generator=g) * torch.randint(1, 50, (n_classes,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(ranks, 0)])
    support = torch.randint(0, n_classes, (m, k), generator=g)
    counts = torch.randint(0, 200, (m,), generator=g) * (torch.rand(m, generator=g) < 0.8)
    n = int(counts.sum())
    rows, row_seed, tiles = _emulated_plan(emulator, support, counts, offsets, bm)
    assert tiles.shape == (k, kcuda.tile_bound(n, n_classes, m, bm), 3)
    seed_of = np.repeat(np.arange(m), counts.numpy())
    for slot in range(k):
        rows_s, tiles_s, cls = rows[slot], tiles[slot], support[:, slot].numpy()
        assert sorted(rows_s.tolist()) == list(range(n))
        assert np.array_equal(row_seed[slot], seed_of[rows_s])
        assert np.all(np.diff(cls[row_seed[slot]]) >= 0)  # grouped by class, in class order
        lengths = tiles_s[:, 2] - tiles_s[:, 1]
        assert ((lengths >= 0) & (lengths <= bm)).all()
        n_real = int((lengths > 0).sum())
        assert (lengths[:n_real] > 0).all() and (lengths[n_real:] == 0).all() and (tiles_s[n_real:] == 0).all()
        covered = []
        for t, (j, b, e) in enumerate(tiles_s[:n_real].tolist()):
            assert (cls[row_seed[slot][b:e]] == j).all() and (slot == 0 or ranks[j] > 0)
            assert e - b == bm or t == n_real - 1 or tiles_s[t + 1, 0] != j  # only a class's last is short
            covered += rows_s[b:e].tolist()
        expected = np.flatnonzero((ranks.numpy()[cls[seed_of]] > 0) | (slot == 0))
        assert sorted(covered) == expected.tolist()


# ------------------------------------------------------------------ on a GPU
@gpu
@needs_gpu
def test_cuda_normals_match_reference():
    rs = np.random.RandomState(0)
    s = rs.randint(0, 2**32, 50_000, dtype=np.uint64)
    b = rs.randint(0, 2**32, 50_000, dtype=np.uint64)
    got = kcuda.block_normals_cuda(99, torch.as_tensor(s.astype(np.int64), device="cuda"), 2,
                                   torch.as_tensor(b.astype(np.int64), device="cuda"))
    np.testing.assert_allclose(got.cpu().numpy(), reference.block_normals(99, s, 2, b), rtol=0, atol=2e-6)


@gpu
@needs_gpu
@pytest.mark.parametrize("d,tile", [(13, None), (64, None)] + [(d, t) for t in kcuda.WIDE_SHAPES for d in (300, 2048)])
@pytest.mark.parametrize("k,mode,alpha", [(0, "diag", 0.3), (1, "all", 0.0), (2, "all", 0.1), (3, "diag", 0.2)])
def test_cuda_matches_reference(monkeypatch, d, tile, k, mode, alpha):
    if tile:
        monkeypatch.setenv(kcuda.ENV_TILE, tile)
    bank, mu, support, w, counts, labels = _problem(d, ns=(1, 6, 17, d, d + 40, 80), m=7, k=k,
                                                    counts=[0, 3, 70, 1, 130, 9, 64])
    dev = torch.device("cuda")
    args = [t.to(dev) for t in (mu, support, w, counts, labels)]
    bank_gpu = FactorBank(bank.data.to(dev), bank.offsets)
    x, y = sample_calibrated(bank_gpu, *args, alpha=alpha, mode=mode, seed=7, backend="cuda")
    xr, yr = sample_calibrated(bank, mu, support, w, counts, labels, alpha, mode, 7, backend="torch")
    assert x.is_cuda and y.is_cuda and torch.equal(y.cpu(), yr)
    assert (x.cpu() - xr).abs().max() / xr.abs().max() <= 1e-5


def _run_probe(name, grid, block, *args):
    kern = kcuda._kernels(torch.cuda.current_device())[name]
    kern(grid, block, tuple(kcuda._cp(a) if isinstance(a, torch.Tensor) else a for a in args))
    torch.cuda.synchronize()


@gpu
@needs_gpu
@pytest.mark.skipif(_OK and torch.cuda.get_device_capability() < (8, 0), reason="mma.sync m16n8k16 needs sm_80")
def test_mma_probe_on_gpu():
    """The tensor cores agree with the fragment layout the kernel and the emulator assume: one
    mma.sync with fragments packed by _mma_fragments gives A B (a failure here, with the kernel
    tests failing too, points at the layout, not the kernel)."""
    A, B, ref = _mma_case()
    a, b = (torch.from_numpy(x.view(np.int32)).cuda() for x in _mma_fragments(A, B))
    d = torch.zeros((32, 4), dtype=torch.float32, device="cuda")
    _run_probe("glag_mma_probe_kernel", (1,), (32,), a, b, d)
    np.testing.assert_allclose(_mma_product(d.cpu().numpy()), ref, rtol=1e-5, atol=1e-3)


@gpu
@needs_gpu
@pytest.mark.skipif(_OK and torch.cuda.get_device_capability() < (8, 0), reason="cvt.rn.f16.f32 needs sm_80 here")
def test_split4_on_gpu_is_float16_nearest_even():
    v, expect = _split_case()
    n = len(v) // 4
    out = torch.zeros((n, 4), dtype=torch.int32, device="cuda")
    _run_probe("glag_split4_kernel", ((n + 255) // 256,), (256,), torch.from_numpy(v).cuda(), np.int64(n), out)
    np.testing.assert_array_equal(out.cpu().numpy().view(np.uint32), expect)


@gpu
@needs_gpu
@pytest.mark.parametrize("tile", TC_SHAPES)
@pytest.mark.parametrize("factor_scale,weight", [(1e-6, 1.0), (1e6, 1.0), (1.0, 40.0), (3e-3, 1e-4)])
def test_cuda_tensor_core_shape_keeps_float32_accuracy_at_any_scale(monkeypatch, tile, factor_scale, weight):
    """As the emulated test, on the GPU's tensor cores, at d = 2048 with a factor of rank 2048."""
    monkeypatch.setenv(kcuda.ENV_TILE, tile)
    d = 2048
    bank, mu, support, w, counts, labels = _problem(d, ns=(1, 6, 17, d, d + 40, 80), m=7, k=2,
                                                    counts=[0, 3, 70, 1, 130, 9, 64])
    bank = FactorBank(bank.data * factor_scale, bank.offsets)
    mu, w = mu * factor_scale, w * weight
    dev = torch.device("cuda")
    args = [t.to(dev) for t in (mu, support, w, counts, labels)]
    x, _ = sample_calibrated(FactorBank(bank.data.to(dev), bank.offsets), *args, alpha=0.0, mode="all", seed=3,
                             backend="cuda")
    xr, _ = sample_calibrated(bank, mu, support, w, counts, labels, 0.0, "all", 3, backend="torch")
    assert (x.cpu() - xr).abs().max() / xr.abs().max() <= 1e-5


@gpu
@needs_gpu
@pytest.mark.parametrize("d", [300, 2048])
def test_cuda_tile_shapes_give_identical_samples(monkeypatch, d):
    """On the GPU as in the emulator: every float32 FMA shape for d >= 256 adds the same products
    in the same order, so the samples are equal bit for bit."""
    bank, mu, support, w, counts, labels = _problem(d, ns=(1, 6, 17, d, d + 40, 80), m=7, k=3,
                                                    counts=[0, 3, 70, 1, 130, 9, 300])
    dev = torch.device("cuda")
    args = [t.to(dev) for t in (mu, support, w, counts, labels)]
    bank_gpu = FactorBank(bank.data.to(dev), bank.offsets)
    xs = []
    for tile in FMA_SHAPES:
        monkeypatch.setenv(kcuda.ENV_TILE, tile)
        xs.append(sample_calibrated(bank_gpu, *args, alpha=0.2, mode="diag", seed=5, backend="cuda")[0])
    assert len(xs) >= 3 and all(torch.equal(xs[0], x) for x in xs[1:])


@gpu
@needs_gpu
@pytest.mark.parametrize("sampler", ["cuda", "bench-lowrank-graph"])
@pytest.mark.parametrize("mode,alpha", [("all", 0.1), ("diag", 0.1)])
def test_cuda_moments(sampler, mode, alpha):
    """Mean and covariance of 1e5 samples, as in the CPU test; ``bench-lowrank-graph``: the
    benchmark's CUDA-graph baseline draws the same distribution, fresh normals each replay."""
    d, n = 6, 100_000
    bank, mu, _, _, _, _ = _problem(d, ns=(40, 4), m=1, k=2, counts=[n])
    support, w = torch.tensor([[0, 1]]), torch.tensor([[0.7, 0.3]])
    args = (mu.cuda(), support.cuda(), w.cuda(), torch.tensor([n]).cuda(), torch.tensor([0]).cuda(), alpha, mode)
    if sampler == "cuda":
        x, _ = sample_calibrated(bank, *args, seed=1, backend="cuda")
    else:
        from test_sampling import bench_lowrank

        x, run = bench_lowrank(FactorBank(bank.data.cuda(), bank.offsets), *args, graph=True)
        first = x.clone()
        assert run() == n and not torch.equal(first, x)  # a replay draws new normals
    cov = torch.zeros(d, d, dtype=torch.float64)
    for j, wj in zip([0, 1], [0.7, 0.3]):
        f = bank.factor(j).double()
        cov += wj * f @ f.T
    cov += alpha * (torch.ones(d, d) if mode == "all" else torch.eye(d)).double()
    xs = x.double().cpu().numpy()
    cov = cov.numpy()
    assert np.all(np.abs(xs.mean(0) - mu[0].double().numpy()) < 5 * np.sqrt(np.diag(cov) / n))
    sd = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / n)
    assert np.all(np.abs(np.cov(xs, rowvar=False) - cov) < 5 * sd)


@gpu
@needs_gpu
def test_cuda_with_cpu_inputs_returns_cpu_and_auto_prefers_cuda(monkeypatch):
    monkeypatch.setattr(sampling, "_availability", {})
    monkeypatch.delenv(sampling.ENV_BACKEND, raising=False)
    assert sampling.resolve_backend() == "cuda"
    bank, mu, support, w, counts, labels = _problem(20, ns=(5, 30, 3), m=4, k=2, counts=[10, 0, 5, 7])
    x, y = sample_calibrated(bank, mu, support, w, counts, labels, 0.1, "all", 3, backend="cuda")
    xn, _ = sample_calibrated(bank, mu, support, w, counts, labels, 0.1, "all", 3, backend="numba")
    assert x.device.type == "cpu" and y.device.type == "cpu"
    assert (x - xn).abs().max() / xn.abs().max() <= 1e-5


@gpu
@needs_gpu
def test_cuda_out_buffer_in_place_and_across_devices():
    """``out=`` on the GPU: written in place (a row slice of a bigger buffer, the rest untouched;
    a slice that is not 16-byte aligned); CPU inputs with the cuda backend: computed on the GPU and
    copied into the CPU ``out``."""
    bank, mu, support, w, counts, labels = _problem(40, ns=(5, 30, 60), m=5, k=2, counts=[10, 0, 5, 7, 300])
    n = int(counts.sum())
    dev = torch.device("cuda")
    bank_gpu = FactorBank(bank.data.to(dev), bank.offsets)
    args = [t.to(dev) for t in (mu, support, w, counts, labels)]
    x, _ = sample_calibrated(bank_gpu, *args, alpha=0.1, mode="diag", seed=4, backend="cuda")
    buf = torch.full((n + 6, 40), -7.0, device=dev)
    xo, _ = sample_calibrated(bank_gpu, *args, alpha=0.1, mode="diag", seed=4, backend="cuda", out=buf[2:2 + n])
    assert xo.data_ptr() == buf[2:2 + n].data_ptr() and torch.equal(xo, x)
    assert (buf[:2] == -7.0).all() and (buf[2 + n:] == -7.0).all()
    odd = buf.view(-1)[1:1 + n * 40].view(n, 40)  # 4 bytes past a 16-byte boundary: scalar epilogue
    xs, _ = sample_calibrated(bank_gpu, *args, alpha=0.1, mode="diag", seed=4, backend="cuda", out=odd)
    assert xs.data_ptr() % 16 == 4 and torch.equal(xs, x)
    cpu_out = torch.empty(n, 40)
    xc, _ = sample_calibrated(bank, mu, support, w, counts, labels, 0.1, "diag", 4, backend="cuda", out=cpu_out)
    assert xc.data_ptr() == cpu_out.data_ptr() and torch.equal(xc, x.cpu())


def test_bank_class_scales_are_cached_until_the_factors_change():
    """FactorBank.class_scales_on (what sample_calibrated hands the tensor-core kernels): the
    scales of kernels/cuda.py class_scales, made once per bank and device, made again (not served
    stale) after the factors change in place."""
    bank, *_ = _problem(40, ns=(1, 6, 17, 50), m=2, k=2, counts=[1, 1])
    s = bank.class_scales_on("cpu")
    assert torch.equal(s, kcuda.class_scales(bank.transposed("cpu"), bank.offsets))
    assert bank.class_scales_on("cpu") is s
    bank.data.mul_(1024.0)
    s2 = bank.class_scales_on("cpu")
    assert s2 is not s and torch.equal(s2, kcuda.class_scales(bank.transposed("cpu"), bank.offsets))
    assert torch.equal(torch.where(bank.ranks > 0, s2 * 1024, s2), s)  # factors 2^10 larger: scales 2^-10
