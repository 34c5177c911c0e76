// Calibrated Gaussian sampler, CUDA C (loaded by glag/kernels/cuda.py through CuPy RawModule).
//
// METHOD.md, "Sampling without a Cholesky per sample":
//     x_s = mu'_i + sum_slot sqrt(w_i,slot) F_{support[i,slot]} z_{s,slot} + e_s
// with e_s = sqrt(alpha) z0 1 (mode "all") or sqrt(alpha) z (mode "diag").
//
// Launched on one stream, the host never waiting for the device:
//   glag_plan_count, glag_plan_tiles, glag_plan_rows
//                       for every slot: the samples grouped by their support class j in that
//                       slot, cut into tiles of <= BM samples (the plan, below)
//   glag_slot_gemm_*    for one slot: x[s, :] (+)= sqrt(w) F_j z_{s,slot} for every sample s whose
//                       seed row has support class j in that slot. One thread block per
//                       (tile of <= BM samples sharing class j) x (BN output columns): a tiled
//                       SGEMM whose A operand (the normals) is generated in registers by
//                       Philox4x32-10 + Box-Muller and staged in shared memory, never in global
//                       memory. Slot 0 writes x = mu' + e_s + its product (its epilogue draws the
//                       dispersion noise), the later slots add theirs. Slots run one launch
//                       after another, so each output element has one writer per launch: no
//                       atomics on x. The product runs on float32 FMAs (glag_slot_gemm) or, in
//                       glag_slot_gemm_tc_bn256, on tensor cores to float32 accuracy (below).
//
// The RNG contract (the same in glag/kernels/reference.py and cpu.py):
//   Philox4x32-10, key (seed lo, seed hi), counter (s, stream, j / 4, 0); stream = slot for the
//   factor normals, 0xFFFFFFFF for the dispersion noise; uniforms (u + 0.5) 2^-32; Box-Muller
//   (u0, u1) -> normals 0, 1 and (u2, u3) -> normals 2, 3; component j takes normal j % 4.
// Box-Muller is evaluated in float32 with integer range reduction and polynomials, exactly as
// in cpu.py, so that a ~ 1 and b near a quadrant lose nothing (see glag_radius, glag_cos_sin).
//
// No headers: NVRTC compiles this as is. Sample indices are < 2^32 (checked by the caller).

#define GLAG_PHILOX_M0 0xD2511F53u
#define GLAG_PHILOX_M1 0xCD9E8D57u
#define GLAG_PHILOX_W0 0x9E3779B9u
#define GLAG_PHILOX_W1 0xBB67AE85u
#define GLAG_DISPERSION_STREAM 0xFFFFFFFFu

struct glag_u4 {
    unsigned int x, y, z, w;
};

// Philox4x32-10 block function.
__device__ __forceinline__ glag_u4 glag_philox(unsigned int c0, unsigned int c1, unsigned int c2,
                                               unsigned int c3, unsigned int k0, unsigned int k1) {
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k0 += GLAG_PHILOX_W0;
            k1 += GLAG_PHILOX_W1;
        }
        const unsigned int hi0 = __umulhi(GLAG_PHILOX_M0, c0);
        const unsigned int lo0 = GLAG_PHILOX_M0 * c0;
        const unsigned int hi1 = __umulhi(GLAG_PHILOX_M1, c2);
        const unsigned int lo1 = GLAG_PHILOX_M1 * c2;
        const unsigned int n0 = hi1 ^ c1 ^ k0;
        const unsigned int n2 = hi0 ^ c3 ^ k1;
        c0 = n0;
        c1 = lo1;
        c2 = n2;
        c3 = lo0;
    }
    glag_u4 out;
    out.x = c0;
    out.y = c1;
    out.z = c2;
    out.w = c3;
    return out;
}

// sqrt(-2 ln a), a = (u + 0.5) 2^-32. t = min(a, 1 - a) is formed exactly from u or ~u, so
// a close to 1 keeps its precision; ln a = E ln2 + ln M, M in [1/sqrt2, sqrt2], ln M =
// 2 atanh((M - 1)/(M + 1)) by its odd series (5 terms, truncation < 1e-9).
__device__ __forceinline__ float glag_radius(unsigned int u) {
    const bool hi = u >= 0x80000000u;
    const unsigned int v = hi ? ~u : u;  // < 2^31
    const float t = ((float)(int)v + 0.5f) * 2.3283064365386963e-10f;  // (0, 0.5]
    // case u < 2^31: ln t, t = M 2^E from the float bits
    const unsigned int bits = __float_as_uint(t);
    int e_a = (int)(bits >> 23) - 127;
    float m_a = __uint_as_float((bits & 0x7FFFFFu) | 0x3F800000u);  // [1, 2)
    if (m_a > 1.4142135f) {
        m_a *= 0.5f;
        e_a += 1;
    }
    // case u >= 2^31: ln(1 - t), M = 1 - t (E = 0) or 2 (1 - t) (E = -1)
    const bool small = t < 0.29289322f;
    const float num_b = small ? -t : 1.0f - 2.0f * t;
    const float den_b = small ? 2.0f - t : 3.0f - 2.0f * t;
    const int e_b = small ? 0 : -1;
    const float num = hi ? num_b : m_a - 1.0f;
    const float den = hi ? den_b : m_a + 1.0f;
    const int e = hi ? e_b : e_a;
    const float s = num / den;
    const float s2 = s * s;
    const float ln_m =
        s * (2.0f + s2 * (0.6666666666666666f + s2 * (0.4f + s2 * (0.2857142857142857f + s2 * 0.2222222222222222f))));
    const float ln_a = (float)e * 0.6931471805599453f + ln_m;
    return sqrtf(-2.0f * ln_a);
}

// (cos, sin)(2 pi (u + 0.5) 2^-32) by exact integer quadrant reduction:
// w = u + 2^29 (mod 2^32), q = w >> 30, psi = 2 pi (w mod 2^30 - 2^29 + 0.5) 2^-32 in [-pi/4, pi/4],
// angle = q pi/2 + psi; Taylor series of sin/cos psi to psi^9 / psi^10.
__device__ __forceinline__ void glag_cos_sin(unsigned int u, float* cos_out, float* sin_out) {
    const unsigned int w = u + 0x20000000u;
    const unsigned int q = w >> 30;
    const int delta = (int)(w & 0x3FFFFFFFu) - 0x20000000;
    const float psi = ((float)delta + 0.5f) * 1.4629180792671596e-09f;
    const float p2 = psi * psi;
    const float s = psi * (1.0f + p2 * (-0.16666666666666666f + p2 * (0.008333333333333333f +
                                        p2 * (-0.0001984126984126984f + p2 * 2.7557319223985893e-06f))));
    const float c = 1.0f + p2 * (-0.5f + p2 * (0.041666666666666664f + p2 * (-0.001388888888888889f +
                                 p2 * (2.48015873015873e-05f + p2 * -2.755731922398589e-07f))));
    float cv = (q & 1u) ? -s : c;
    float sv = (q & 1u) ? c : s;
    if (q >= 2u) {
        cv = -cv;
        sv = -sv;
    }
    *cos_out = cv;
    *sin_out = sv;
}

// The four normals of Philox block (s, stream, blk, 0).
__device__ __forceinline__ void glag_block_normals(unsigned int s, unsigned int stream, unsigned int blk,
                                                   unsigned int k0, unsigned int k1, float* z) {
    const glag_u4 u = glag_philox(s, stream, blk, 0u, k0, k1);
    const float ra = glag_radius(u.x);
    const float rb = glag_radius(u.z);
    float ca, sa, cb, sb;
    glag_cos_sin(u.y, &ca, &sa);
    glag_cos_sin(u.w, &cb, &sb);
    z[0] = ra * ca;
    z[1] = ra * sa;
    z[2] = rb * cb;
    z[3] = rb * sb;
}

// ---------------------------------------------------------------- the plan: samples grouped by class
// Three small kernels turn (support, counts) into, for every slot, the sample ids grouped by
// their support class in that slot and the list of tiles (<= BM rows of one class) the slot GEMM
// runs over. Everything stays on the device: the host launches them and the GEMMs without
// waiting. Within a class the order of the samples depends on the order of the atomics, which
// changes nothing in x: every row of a tile is computed on its own (same products, same order).

__device__ __forceinline__ long long glag_min_ll(long long a, long long b) { return a < b ? a : b; }

// hist[slot, j] += counts[i] for every seed row i and slot (support[i, slot] = j).
//   support: (m, k) int64; counts: (m,) int64; hist: (k, C) uint64, zero on entry.
extern "C" __global__ void glag_plan_count(const long long* __restrict__ support, const long long* __restrict__ counts,
                                           long long m, int k, int n_classes, unsigned long long* __restrict__ hist) {
    const long long total = m * k;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += stride) {
        const long long i = idx / k;
        const long long c = counts[i];
        if (c > 0) atomicAdd(&hist[(idx - i * k) * n_classes + support[idx]], (unsigned long long)c);
    }
}

// Tiles of one class in one slot: none for a class without samples, none for r_j = 0 after slot 0
// (slot 0 writes every row: x = mu' + e + its product, an empty product for r_j = 0).
__device__ __forceinline__ long long glag_class_tiles(unsigned long long h, long long r, int slot, int bm) {
    return (h > 0 && (slot == 0 || r > 0)) ? (long long)((h + bm - 1) / bm) : 0;
}

// One block of 256 threads per slot: cursor[slot, j] = first position of class j in that slot's
// row list (classes in id order), and tiles[slot, :] = (j, begin, end) for every tile of every
// class, then empty tiles (0, 0, 0) up to bound (>= the number of tiles: N / bm + min(C, m)).
//   hist: (k, C) uint64; offsets: (C+1,) int64; bm: rows a tile (the GEMM's BM); cursor: (k, C)
//   uint64; tiles: (k, bound, 3) int64.
extern "C" __global__ void __launch_bounds__(256) glag_plan_tiles(const unsigned long long* __restrict__ hist,
                                                                  const long long* __restrict__ offsets,
                                                                  int n_classes, int bm, long long bound,
                                                                  unsigned long long* __restrict__ cursor,
                                                                  long long* __restrict__ tiles) {
    __shared__ long long part_rows[256], part_tiles[256];
    __shared__ long long n_real;
    const int slot = blockIdx.x, tid = threadIdx.x;
    const unsigned long long* h = hist + (long long)slot * n_classes;
    unsigned long long* cur = cursor + (long long)slot * n_classes;
    long long* tl = tiles + (long long)slot * bound * 3;
    const int seg = (n_classes + 255) / 256;  // classes j0 .. j1-1 are this thread's
    const int j0 = tid * seg < n_classes ? tid * seg : n_classes;
    const int j1 = j0 + seg < n_classes ? j0 + seg : n_classes;
    long long rows_sum = 0, tiles_sum = 0;
    for (int j = j0; j < j1; ++j) {
        rows_sum += (long long)h[j];
        tiles_sum += glag_class_tiles(h[j], offsets[j + 1] - offsets[j], slot, bm);
    }
    part_rows[tid] = rows_sum;
    part_tiles[tid] = tiles_sum;
    __syncthreads();
    if (tid == 0) {  // exclusive scan of the 256 partial sums
        long long pr = 0, pt = 0;
        for (int t = 0; t < 256; ++t) {
            const long long r0 = part_rows[t], t0 = part_tiles[t];
            part_rows[t] = pr;
            part_tiles[t] = pt;
            pr += r0;
            pt += t0;
        }
        n_real = pt;
    }
    __syncthreads();
    long long p = part_rows[tid], t = part_tiles[tid];
    for (int j = j0; j < j1; ++j) {
        const long long hj = (long long)h[j];
        const long long nt = glag_class_tiles(h[j], offsets[j + 1] - offsets[j], slot, bm);
        cur[j] = (unsigned long long)p;
        for (long long q = 0; q < nt; ++q, ++t) {
            tl[3 * t] = j;
            tl[3 * t + 1] = p + (long long)bm * q;
            tl[3 * t + 2] = glag_min_ll(p + (long long)bm * (q + 1), p + hj);
        }
        p += hj;
    }
    for (long long q = n_real + tid; q < bound; q += blockDim.x) {
        tl[3 * q] = 0;
        tl[3 * q + 1] = 0;
        tl[3 * q + 2] = 0;
    }
}

// rows[slot, cursor[slot, j]++ ...] = the sample ids of seed row i (ends[i] - counts[i] ..
// ends[i] - 1), row_seed[...] = i, for every seed row i and slot (j = support[i, slot]).
//   ends: (m,) int64, inclusive prefix sums of counts; rows, row_seed: (k, n) int64.
extern "C" __global__ void glag_plan_rows(const long long* __restrict__ support, const long long* __restrict__ counts,
                                          const long long* __restrict__ ends, long long m, int k, int n_classes,
                                          long long n, unsigned long long* __restrict__ cursor,
                                          long long* __restrict__ rows, long long* __restrict__ row_seed) {
    const long long total = m * k;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += stride) {
        const long long i = idx / k;
        const long long c = counts[i];
        if (c <= 0) continue;
        const long long slot = idx - i * k;
        const long long p = (long long)atomicAdd(&cursor[slot * n_classes + support[idx]], (unsigned long long)c);
        const long long s0 = ends[i] - c;
        long long* rs = rows + slot * n + p;
        long long* ss = row_seed + slot * n + p;
        for (long long q = 0; q < c; ++q) {
            rs[q] = s0 + q;
            ss[q] = i;
        }
    }
}

// ---------------------------------------------------------------- the slot GEMM
// A slot GEMM block's tile (tiles[blockIdx.x] = class j, begin, end over rows): j, the offset and
// rank of F_j, the tile's length, and in shared memory each row's sample id, seed row and sqrt(w) (-1,
// 0 and 0 past the tile). The grid has more blocks than tiles (its size is a bound, so the host
// never waits for the device): a block whose tile is empty gets tlen = 0 at once, before any
// barrier, and returns; otherwise the set-up ends with __syncthreads().
struct glag_tile {
    long long cls, off;
    int r, tlen;
};

__device__ __forceinline__ glag_tile glag_tile_setup(const long long* __restrict__ offsets,
                                                     const long long* __restrict__ rows,
                                                     const long long* __restrict__ row_seed,
                                                     const long long* __restrict__ tiles,
                                                     const float* __restrict__ weights, int k, int slot,
                                                     int bm, long long* row_s, long long* seed_s, float* scale_s) {
    const int tid = threadIdx.x;
    const long long* tile = tiles + 3 * (long long)blockIdx.x;
    const long long cls = tile[0];
    const long long t0 = tile[1];
    glag_tile t;
    t.tlen = (int)(tile[2] - t0);
    t.cls = cls;
    t.off = 0;
    t.r = 0;
    if (t.tlen <= 0) return t;  // the same for every thread of the block
    t.off = offsets[cls];
    t.r = (int)(offsets[cls + 1] - t.off);
    if (tid < bm) {
        if (tid < t.tlen) {
            const long long i = row_seed[t0 + tid];
            row_s[tid] = rows[t0 + tid];
            seed_s[tid] = i;
            scale_s[tid] = sqrtf(weights[i * k + slot]);
        } else {
            row_s[tid] = -1;
            seed_s[tid] = 0;
            scale_s[tid] = 0.0f;
        }
    }
    __syncthreads();
    return t;
}

// The slot GEMMs' arguments (glag_slot_gemm below has them in words).
#define GLAG_SLOT_GEMM_ARGS                                                                               \
    const float *__restrict__ ft, const long long *__restrict__ offsets, const long long *__restrict__ rows, \
        const long long *__restrict__ row_seed, const long long *__restrict__ tiles,                      \
        const float *__restrict__ weights, const float *__restrict__ mu, int k, int slot, int d,          \
        unsigned int k0, unsigned int k1, float sqrt_alpha, int diag, int vec, float *__restrict__ x
#define GLAG_SLOT_GEMM_CALL ft, offsets, rows, row_seed, tiles, weights, mu, k, slot, d, k0, k1, sqrt_alpha, diag, vec, x

// ---------------------------------------------------------------- pieces both slot GEMMs share
// The 4 normals of Philox block cb / 4 of factor `slot` for sample s, times `scale`, zero past r
// and zero for a padding row (s < 0). Always drawn, then masked: with no branch a K step is one
// basic block and the compiler interleaves the RNG's work with the multiply (3 % faster on an
// H200 than drawing under a branch; the same bits).
__device__ __forceinline__ void glag_draw4(long long s, int slot, int cb, int r, float scale, unsigned int k0,
                                           unsigned int k1, float* z) {
    glag_block_normals((unsigned int)s, (unsigned int)slot, (unsigned int)(cb >> 2), k0, k1, z);
#pragma unroll
    for (int q = 0; q < 4; ++q) z[q] = (s >= 0 && cb + q < r) ? scale * z[q] : 0.0f;
}

// The K loop of a slot GEMM over r components, BK a step, two shared-memory stages and one
// barrier a step: step t multiplies stage t % 2 while this thread's loads of F_j^T for step t + 1
// are in flight (into registers); then it draws step t + 1's normals and stores both into the
// other stage (after the last step, the other stage gets zeros). load_b(c0), draw_a(c0) fill the
// thread's registers for the step at c0; stage(buf) stores them; multiply(buf) consumes a stage.
template <int BK, class LoadB, class DrawA, class Stage, class Multiply>
__device__ __forceinline__ void glag_k_steps(int r, LoadB load_b, DrawA draw_a, Stage stage, Multiply multiply) {
    load_b(0);
    draw_a(0);
    stage(0);
    __syncthreads();
    int buf = 0;
    for (int c0 = 0; c0 < r; c0 += BK) {
        load_b(c0 + BK);  // in flight during the multiply
        multiply(buf);
        draw_a(c0 + BK);
        stage(buf ^ 1);
        __syncthreads();
        buf ^= 1;
    }
}

// sqrt(alpha) z0 of sample s: the dispersion noise of mode "all" (one normal for the whole row).
__device__ __forceinline__ float glag_noise_all(long long s, unsigned int k0, unsigned int k1, float sqrt_alpha) {
    float z[4];
    glag_block_normals((unsigned int)s, GLAG_DISPERSION_STREAM, 0u, k0, k1, z);
    return __fmul_rn(sqrt_alpha, z[0]);  // _rn: never fused into the add of the epilogue
}

// The epilogue of 4 columns n..n+3 of sample s (one Philox block of the dispersion noise):
// slot 0 (first) writes x = (mu' + e) + p, the later slots x += p. e = e_all in every column, or
// (noise_diag) sqrt(alpha) times normals of block (s, dispersion, n / 4). vec: float4 moves
// (16-byte aligned rows, n + 4 <= d); else one column at a time, up to d.
//   xr, mr: the rows of x and mu'; p: 4 floats, the product.
__device__ __forceinline__ void glag_store4(float* __restrict__ xr, const float* __restrict__ mr, long long s, int n,
                                            int d, bool first, int vec, bool noise_diag, float e_all,
                                            float sqrt_alpha, unsigned int k0, unsigned int k1, const float* p) {
    float base[4];
    if (first) {
        float e[4] = {e_all, e_all, e_all, e_all};
        if (noise_diag) {
            glag_block_normals((unsigned int)s, GLAG_DISPERSION_STREAM, (unsigned int)(n >> 2), k0, k1, e);
#pragma unroll
            for (int q = 0; q < 4; ++q) e[q] = __fmul_rn(sqrt_alpha, e[q]);
        }
        if (vec) {
            const float4 m4 = *reinterpret_cast<const float4*>(mr + n);
            base[0] = m4.x + e[0];
            base[1] = m4.y + e[1];
            base[2] = m4.z + e[2];
            base[3] = m4.w + e[3];
        } else {
#pragma unroll
            for (int q = 0; q < 4; ++q) base[q] = n + q < d ? mr[n + q] + e[q] : 0.0f;
        }
    } else if (vec) {
        const float4 x4 = *reinterpret_cast<const float4*>(xr + n);
        base[0] = x4.x;
        base[1] = x4.y;
        base[2] = x4.z;
        base[3] = x4.w;
    } else {
#pragma unroll
        for (int q = 0; q < 4; ++q) base[q] = n + q < d ? xr[n + q] : 0.0f;
    }
    if (vec) {
        float4 o;
        o.x = base[0] + p[0];
        o.y = base[1] + p[1];
        o.z = base[2] + p[2];
        o.w = base[3] + p[3];
        *reinterpret_cast<float4*>(xr + n) = o;
    } else {
#pragma unroll
        for (int q = 0; q < 4; ++q)
            if (n + q < d) xr[n + q] = base[q] + p[q];
    }
}

// ---------------------------------------------------------------- the float32 (FMA) slot GEMM
// One slot: x[rows[t], :] (+)= sqrt(w[row_seed[t], slot]) * F_j z for the tiles of this slot.
// Slot 0 writes x = (mu'[row_seed[t]] + e) + product, so x needs no other pass; the later slots
// add their product to x.
//   ft:       (R, d) float32, the factors transposed: rows offsets[j]..offsets[j+1] hold F_j^T.
//   offsets:  (C+1,) int64.   rows, row_seed: (n,) int64, this slot's sample ids and their seed
//             rows, grouped by class.   tiles: (T, 3) int64: class j, first and one-past-last
//             position in rows (<= BM apart; empty tiles pad the grid).
//   weights:  (m, k) float32.  mu: (m, d) float32.  vec: x and mu rows are 16-byte aligned
//             (d % 4 == 0), so the epilogue moves float4s.
// Block tile BM rows x BN columns, K steps of BK components, NT threads, BM * BK = 4 NT. Threads
// (NT / 16) x 16: thread (ty, tx) owns rows ty*TM .. ty*TM+TM-1 of the tile (TM = 16 BM / NT) and
// columns n0 + 64 v + 4 tx + {0..3}, v < BN / 64 (conflict-free float4 reads of shared memory;
// each thread's 4 columns are one Philox block of the dispersion noise).
// Per K step, thread (g_row = tid / (BK / 4), g_blk = tid % (BK / 4)) draws the 4 normals of Philox
// block (c0 / 4 + g_blk) of its row, times sqrt(w): one Philox call per thread per step, stored
// in A^T (shared); B holds F_j^T's rows of the step (glag_k_steps).
template <int BM, int BN, int BK, int NT>
__device__ __forceinline__ void glag_slot_gemm(GLAG_SLOT_GEMM_ARGS) {
    static_assert(BM * BK == 4 * NT && (BK == 16 || BK == 8), "one Philox block a thread a step");
    static_assert(NT >= BM && NT % 16 == 0 && (16 * BM) % NT == 0 && BN % 64 == 0, "a thread a row in the set-up");
    constexpr int TM = 16 * BM / NT, NV = BN / 64, TN = 4 * NV, APAD = BM + 4;
    static_assert(TM % 4 == 0, "float4 reads of A");
    constexpr int NB = BK * BN / NT;  // values of F_j^T a thread loads a step
    __shared__ __align__(16) float a_s[2][BK * APAD];  // A^T tile: a_s[.][kk * APAD + row]
    __shared__ __align__(16) float b_s[2][BK * BN];    // B tile:   b_s[.][kk * BN + col]
    __shared__ long long row_s[BM], seed_s[BM];
    __shared__ float scale_s[BM];

    const int tid = threadIdx.x;
    const int tx = tid & 15, ty = tid >> 4;
    const glag_tile tl = glag_tile_setup(offsets, rows, row_seed, tiles, weights, k, slot, BM, row_s, seed_s, scale_s);
    if (tl.tlen <= 0) return;
    const int r = tl.r, tlen = tl.tlen;
    const int n0 = blockIdx.y * BN;

    float acc[TM][TN];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = 0.0f;

    if (r > 0) {  // the same for the whole block
        constexpr int GB_LOG2 = BK == 16 ? 2 : 1;  // Philox blocks of a row a step: BK / 4 = 4 or 2
        const int g_row = tid >> GB_LOG2, g_blk = tid & ((1 << GB_LOG2) - 1);
        const long long g_s = row_s[g_row];
        const float g_scale = scale_s[g_row];
        float z[4];     // this thread's normals of the step being staged
        float bq[NB];   // this thread's values of F_j^T of that step
        // B: F_j^T rows c0..c0+BK-1, columns n0..n0+BN-1 (coalesced along d), row-major in b_s:
        // element p of this thread is b_s[.][tid + NT p], row c0 + b_kk + RP (p / CP), column
        // n0 + b_nn + NT (p % CP).
        constexpr int RP = NT >= BN ? NT / BN : 1;  // rows of B a pass of the block covers
        constexpr int CP = BN >= NT ? BN / NT : 1;  // passes a row of B takes
        const int b_kk = tid / BN, b_nn = tid % BN;
        bool b_col_in[CP];
#pragma unroll
        for (int q = 0; q < CP; ++q) b_col_in[q] = n0 + b_nn + NT * q < d;
        const float* b_base = ft + (tl.off + b_kk) * (long long)d + n0 + b_nn;
        auto load_b = [&](int c0) {
#pragma unroll
            for (int p = 0; p < NB; ++p)
                bq[p] = b_col_in[p % CP] && c0 + b_kk + RP * (p / CP) < r
                            ? *(b_base + (long long)(c0 + RP * (p / CP)) * d + NT * (p % CP))
                            : 0.0f;
        };
        auto stage = [&](int buf) {
#pragma unroll
            for (int q = 0; q < 4; ++q) a_s[buf][(4 * g_blk + q) * APAD + g_row] = z[q];
#pragma unroll
            for (int p = 0; p < NB; ++p) b_s[buf][tid + NT * p] = bq[p];
        };
        auto multiply = [&](int buf) {
#pragma unroll
            for (int kk = 0; kk < BK; ++kk) {
                float av[TM];
#pragma unroll
                for (int u = 0; u < TM / 4; ++u) {
                    const float4 a = *reinterpret_cast<const float4*>(&a_s[buf][kk * APAD + ty * TM + 4 * u]);
                    av[4 * u] = a.x;
                    av[4 * u + 1] = a.y;
                    av[4 * u + 2] = a.z;
                    av[4 * u + 3] = a.w;
                }
                float bv[TN];
#pragma unroll
                for (int v = 0; v < NV; ++v) {
                    const float4 b = *reinterpret_cast<const float4*>(&b_s[buf][kk * BN + 64 * v + 4 * tx]);
                    bv[4 * v] = b.x;
                    bv[4 * v + 1] = b.y;
                    bv[4 * v + 2] = b.z;
                    bv[4 * v + 3] = b.w;
                }
#pragma unroll
                for (int i = 0; i < TM; ++i)
#pragma unroll
                    for (int j = 0; j < TN; ++j) acc[i][j] += av[i] * bv[j];
            }
        };
        glag_k_steps<BK>(
            r, load_b, [&](int c0) { glag_draw4(g_s, slot, c0 + 4 * g_blk, r, g_scale, k0, k1, z); }, stage, multiply);
    }

    // x = (mu' + e) + product in slot 0, x += product after; 4 columns (one Philox block) at a time
    const bool first = slot == 0;
    const bool noise_diag = first && sqrt_alpha > 0.0f && diag;
#pragma unroll
    for (int i = 0; i < TM; ++i) {
        const int row = ty * TM + i;
        if (row >= tlen) continue;
        const long long s = row_s[row];
        float* xr = x + s * (long long)d;
        const float* mr = mu + seed_s[row] * (long long)d;
        const float e_all = first && sqrt_alpha > 0.0f && !diag ? glag_noise_all(s, k0, k1, sqrt_alpha) : 0.0f;
#pragma unroll
        for (int v = 0; v < NV; ++v) {
            const int n = n0 + 64 * v + 4 * tx;
            if (n >= d) continue;
            glag_store4(xr, mr, s, n, d, first, vec, noise_diag, e_all, sqrt_alpha, k0, k1, &acc[i][4 * v]);
        }
    }
}

// ---------------------------------------------------------------- the tensor-core slot GEMM (sm_80 and later)
// The same product on tensor cores, mma.sync m16n8k16 with float16 inputs and float32
// accumulation, to float32 accuracy: every operand v is split as v = hi + lo + O(2^-22 |v|),
// hi = fp16(v), lo = fp16(v - hi) (v - hi is exact in float32), and a b is computed as
// a_lo b_hi + a_hi b_lo + a_hi b_hi (the dropped a_lo b_lo is 2^-22 of a b). Three MMAs a
// 16-component step go into a fresh fragment that is then added to the float32 accumulators,
// so the tensor cores' own sums never run over more than 48 products.
// Range: float16 has full precision from 2^-14 to 65504, so the kernel multiplies
//   A = 2^10 z                (|z| < 6.8 from Box-Muller: |A| < 7000), and
//   B = s_j F_j^T             (bscale[j] = s_j, a power of two putting max |F_j| in [2^13, 2^14),
//                              from glag/kernels/cuda.py class_scales),
// and the epilogue multiplies the product by sqrt(w) 2^-10 / s_j. Powers of two scale exactly.
// The operands are split once, when staged: shared memory holds, for every row of A and column
// of B and every group q of 4 components (one Philox block of the normals), 16 bytes
// (hi c0 c1, hi c2 c3, lo c0 c1, lo c2 c3) as float16 pairs. The MMA's k index is a permutation
// of the step's 16 components, the same for A and B: lane (g, t) holds group t, components
// 4t .. 4t+3, as k = 2t, 2t+1 (a0/a1, b0) and 2t+8, 2t+9 (a2/a3, b1) of the PTX fragment layout,
// so each fragment is one 16-byte shared load a row or column. B's groups are stored XOR-swizzled
// (group q of column c at q ^ ((c >> 1) & 3)): both the stores (a thread a column) and the
// fragment loads are then free of bank conflicts.
// Block: 64 x 256 tile (the 64 x 256 FMA kernel's plan and tiles), K steps of 16, 8 warps as
// 2 x 4, a warp 32 rows x 64 columns (2 x 8 MMA tiles of 16 x 8). Same RNG calls, staging threads
// and K loop as the FMA kernel (glag_draw4, glag_k_steps). The epilogue exchanges half of each
// MMA tile with the neighbouring lane (t ^ 1) so that every lane holds 4 consecutive columns of
// one row, then stores them as the FMA kernel does (glag_store4).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define GLAG_HAS_MMA 1
#endif
// The CPU tests' shim defines GLAG_WARP_EMULATED and these four functions itself.
#ifndef GLAG_WARP_EMULATED
// float32 -> float16 bits, nearest even (0 below sm_80, where this kernel is never launched).
__device__ __forceinline__ unsigned short glag_half(float v) {
    unsigned short h = 0;
#ifdef GLAG_HAS_MMA
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
#endif
    return h;
}

__device__ __forceinline__ float glag_half_float(unsigned short h) {
    float v = 0.0f;
#ifdef GLAG_HAS_MMA
    asm("cvt.f32.f16 %0, %1;" : "=f"(v) : "h"(h));
#endif
    return v;
}

// d (16 x 8 fragment, float32) += a (16 x 16, row, float16 pairs) b (16 x 8, col, float16 pairs).
__device__ __forceinline__ void glag_mma_f16(float* d, const unsigned int* a, const unsigned int* b) {
#ifdef GLAG_HAS_MMA
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

__device__ __forceinline__ float glag_shfl_xor(float v, int lane_mask) {
    return __shfl_xor_sync(0xFFFFFFFFu, v, lane_mask);
}
#endif

// (v0, v1) -> hi = (fp16(v0), fp16(v1)), lo = (fp16(v0 - hi0), fp16(v1 - hi1)), v0 in the low half.
__device__ __forceinline__ void glag_split2(float v0, float v1, unsigned int* hi, unsigned int* lo) {
    const unsigned short h0 = glag_half(v0), h1 = glag_half(v1);
    const unsigned short l0 = glag_half(v0 - glag_half_float(h0)), l1 = glag_half(v1 - glag_half_float(h1));
    *hi = (unsigned int)h0 | ((unsigned int)h1 << 16);
    *lo = (unsigned int)l0 | ((unsigned int)l1 << 16);
}

// 4 components (one group) of a row of A or a column of B, split: (hi c0 c1, hi c2 c3, lo c0 c1, lo c2 c3).
__device__ __forceinline__ uint4 glag_split4(float v0, float v1, float v2, float v3) {
    uint4 o;
    glag_split2(v0, v1, &o.x, &o.z);
    glag_split2(v2, v3, &o.y, &o.w);
    return o;
}

//   bscale: (C,) float32, s_j (see above); the other arguments as in glag_slot_gemm.
__device__ __forceinline__ void glag_slot_gemm_tc(GLAG_SLOT_GEMM_ARGS, const float* __restrict__ bscale) {
    constexpr int BM = 64, BN = 256, BK = 16, MT = 2, NTL = 8;  // 256 threads; MT x NTL MMA tiles a warp
    constexpr float A_SCALE = 1024.0f, A_UNSCALE = 1.0f / 1024.0f;
    // A: 16-byte fragments, hi and lo planes: row r = 16 i + 8 h + gg, group q -> fragment (8 i + gg) * 4 + q,
    // word 2 (c0 c1 or c2 c3) + h, so that the load of a lane is its a0..a3 in register order.
    __shared__ __align__(16) uint4 a_s[2][2][BM * 4 / 2];  // [stage][hi, lo][fragment]
    __shared__ __align__(16) unsigned int b_s[2][BN * 16];  // column c, group q: 16 c + 4 (q ^ ((c >> 1) & 3)) ..
    __shared__ long long row_s[BM], seed_s[BM];
    __shared__ float scale_s[BM];

    const int tid = threadIdx.x;
    const int lane = tid & 31, g = lane >> 2, t = lane & 3;  // fragment row group and column pair
    const int wm = (tid >> 5) & 1, wn = tid >> 6;            // warp: rows 32 wm.., columns 64 wn..
    const glag_tile tl = glag_tile_setup(offsets, rows, row_seed, tiles, weights, k, slot, BM, row_s, seed_s, scale_s);
    if (tl.tlen <= 0) return;
    const int r = tl.r;
    const int n0 = blockIdx.y * BN;
    const float bs = bscale[tl.cls];

    float acc[MT][NTL][4];
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NTL; ++j)
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.0f;

    if (r > 0) {  // the same for the whole block
        const int g_row = tid >> 2, g_blk = tid & 3;  // as the FMA kernel: one Philox block a step
        const long long g_s = row_s[g_row];
        float z[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // this thread's normals of the step being staged, times 2^10
        float bq[BK];  // F_j^T rows c0..c0+15 of column n0 + tid, this thread's column of B
        const bool b_col_in = n0 + tid < d;
        const float* b_base = ft + tl.off * (long long)d + n0 + tid;
        auto load_b = [&](int c0) {
            const float* bp = b_base + (long long)c0 * d;
#pragma unroll
            for (int p = 0; p < BK; ++p, bp += d) bq[p] = b_col_in && c0 + p < r ? *bp : 0.0f;
        };
        // this thread's group g_blk of row g_row: fragment (8 (g_row / 16) + g_row % 8) * 4 + g_blk, half g_row / 8 % 2
        unsigned int* const a_frag = &a_s[0][0][(8 * (g_row >> 4) + (g_row & 7)) * 4 + g_blk].x + ((g_row >> 3) & 1);
        constexpr int A_PLANE = BM * 4 / 2 * 4, A_STAGE = 2 * A_PLANE;  // words
        auto stage = [&](int buf) {
            const uint4 a = glag_split4(z[0], z[1], z[2], z[3]);
            unsigned int* af = a_frag + buf * A_STAGE;
            af[0] = a.x;  // hi c0 c1 -> a0 (row g) or a1 (row g + 8)
            af[2] = a.y;  // hi c2 c3 -> a2 or a3
            af[A_PLANE] = a.z;  // the same in the lo plane
            af[A_PLANE + 2] = a.w;
#pragma unroll
            for (int q = 0; q < 4; ++q)
                *reinterpret_cast<uint4*>(&b_s[buf][16 * tid + 4 * (q ^ ((tid >> 1) & 3))]) =
                    glag_split4(bs * bq[4 * q], bs * bq[4 * q + 1], bs * bq[4 * q + 2], bs * bq[4 * q + 3]);
        };
        auto multiply = [&](int buf) {
            uint4 ah[MT], al[MT];  // fragment a0..a3: (g, k 2t..), (g + 8, 2t..), (g, 2t + 8..), (g + 8, 2t + 8..)
#pragma unroll
            for (int i = 0; i < MT; ++i) {
                const int f = (8 * (2 * wm + i) + g) * 4 + t;
                ah[i] = a_s[buf][0][f];
                al[i] = a_s[buf][1][f];
            }
#pragma unroll
            for (int j = 0; j < NTL; ++j) {
                const int col = 64 * wn + 8 * j + g;  // fragment b0, b1: (k 2t.., col g), (k 2t + 8.., col g)
                const uint4 q = *reinterpret_cast<const uint4*>(&b_s[buf][16 * col + 4 * (t ^ ((col >> 1) & 3))]);
                const unsigned int bh[2] = {q.x, q.y}, bl[2] = {q.z, q.w};
#pragma unroll
                for (int i = 0; i < MT; ++i) {
                    float part[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                    glag_mma_f16(part, &al[i].x, bh);
                    glag_mma_f16(part, &ah[i].x, bl);
                    glag_mma_f16(part, &ah[i].x, bh);
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc[i][j][e] += part[e];
                }
            }
        };
        glag_k_steps<BK>(
            r, load_b, [&](int c0) { glag_draw4(g_s, slot, c0 + 4 * g_blk, r, A_SCALE, k0, k1, z); }, stage, multiply);
    }

    // MMA tile (i, j) of this lane: rows 32 wm + 16 i + g (acc 0, 1) and + 8 (acc 2, 3), columns
    // 2t, 2t + 1 of the tile's 8. Lanes t and t ^ 1 swap halves: the even lane keeps row g, columns
    // 2t .. 2t + 3, the odd lane row g + 8, columns 2t - 2 .. 2t + 1: one Philox block each.
    const bool first = slot == 0;
    const bool noise_diag = first && sqrt_alpha > 0.0f && diag;
    const bool odd = t & 1;
    const float unscale = A_UNSCALE / bs;
#pragma unroll
    for (int i = 0; i < MT; ++i) {
        const int row = 32 * wm + 16 * i + g + (odd ? 8 : 0);
        const bool live = row < tl.tlen;
        const long long s = row_s[row];
        const float f = scale_s[row] * unscale;  // sqrt(w) 2^-10 / s_j
        const float e_all = live && first && sqrt_alpha > 0.0f && !diag ? glag_noise_all(s, k0, k1, sqrt_alpha) : 0.0f;
#pragma unroll
        for (int j = 0; j < NTL; ++j) {
            const float* a = acc[i][j];
            const float got0 = glag_shfl_xor(odd ? a[0] : a[2], 1);  // every lane, before any skip
            const float got1 = glag_shfl_xor(odd ? a[1] : a[3], 1);
            const float p[4] = {f * (odd ? got0 : a[0]), f * (odd ? got1 : a[1]), f * (odd ? a[2] : got0),
                                f * (odd ? a[3] : got1)};
            const int n = n0 + 64 * wn + 8 * j + 4 * (t >> 1);
            if (!live || n >= d) continue;
            glag_store4(x + s * (long long)d, mu + seed_s[row] * (long long)d, s, n, d, first, vec, noise_diag, e_all,
                        sqrt_alpha, k0, k1, p);
        }
    }
}


// The slot GEMM's shapes, BM x BN a block (glag/kernels/cuda.py ``slot_gemm_shape`` picks one):
//   bn64:        64 x 64, BK 16, 256 threads, d < 256; a 64-register cap keeps four blocks an SM.
//   bn256:       64 x 256, BK 16, 256 threads, d >= 256 (each normal serves 256 FMAs); 4 x 16
//                outputs a thread, a 128-register cap keeps two blocks an SM.
//   bm128_bn256: 128 x 256, BK 8, 256 threads, d >= 256; 8 x 16 outputs a thread, one block an
//                SM with up to 255 registers: the same FMAs and normals a thread a step as bn256
//                with half its loads of F_j^T, and no register cap (bn256's cap costs parameter
//                reloads and moves in its K loop).
//   bn256_t128:  64 x 256, BK 8, 128 threads, d >= 256; 8 x 16 outputs a thread as bm128_bn256,
//                in two blocks an SM, over bn256's 64-row tiles.
//   tc_bn256:    64 x 256 on tensor cores (float16 pieces, float32 accuracy; sm_80 and later),
//                the tiles and plan of bn256; one more argument, bscale. Two blocks an SM under a
//                128-register cap: its MMAs run two chains at a time a warp.
//   tc_bn256_r1: the same code, one block an SM and no cap (226 registers): four to six chains a
//                warp, eight warps an SM. Which hides the MMAs' latency better is for a GPU to tell.
// No spills with NVRTC for sm_80 and sm_90.
extern "C" __global__ void __launch_bounds__(256, 2) glag_slot_gemm_bn256(GLAG_SLOT_GEMM_ARGS) {
    glag_slot_gemm<64, 256, 16, 256>(GLAG_SLOT_GEMM_CALL);
}

extern "C" __global__ void __launch_bounds__(256, 4) glag_slot_gemm_bn64(GLAG_SLOT_GEMM_ARGS) {
    glag_slot_gemm<64, 64, 16, 256>(GLAG_SLOT_GEMM_CALL);
}

extern "C" __global__ void __launch_bounds__(256, 1) glag_slot_gemm_bm128_bn256(GLAG_SLOT_GEMM_ARGS) {
    glag_slot_gemm<128, 256, 8, 256>(GLAG_SLOT_GEMM_CALL);
}

extern "C" __global__ void __launch_bounds__(128, 2) glag_slot_gemm_bn256_t128(GLAG_SLOT_GEMM_ARGS) {
    glag_slot_gemm<64, 256, 8, 128>(GLAG_SLOT_GEMM_CALL);
}

extern "C" __global__ void __launch_bounds__(256, 2) glag_slot_gemm_tc_bn256(GLAG_SLOT_GEMM_ARGS,
                                                                            const float* __restrict__ bscale) {
    glag_slot_gemm_tc(GLAG_SLOT_GEMM_CALL, bscale);
}

extern "C" __global__ void __launch_bounds__(256, 1) glag_slot_gemm_tc_bn256_r1(GLAG_SLOT_GEMM_ARGS,
                                                                               const float* __restrict__ bscale) {
    glag_slot_gemm_tc(GLAG_SLOT_GEMM_CALL, bscale);
}

// Test hooks of the tensor-core pieces (one warp): d[lane] = the fragment of A B (A 16 x 16 and
// B 16 x 8 as float16 pairs in the PTX fragment layout, a[lane][4], b[lane][2]); and
// split[i] = glag_split4(v[4 i .. 4 i + 3]) for i < n.
extern "C" __global__ void glag_mma_probe_kernel(const unsigned int* __restrict__ a, const unsigned int* __restrict__ b,
                                                 float* __restrict__ d) {
    const int lane = threadIdx.x & 31;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    glag_mma_f16(acc, a + 4 * lane, b + 2 * lane);
#pragma unroll
    for (int q = 0; q < 4; ++q) d[4 * lane + q] = acc[q];
}

extern "C" __global__ void glag_split4_kernel(const float* __restrict__ v, long long n, uint4* __restrict__ split) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) split[i] = glag_split4(v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]);
}

// Test hook: the normals of blocks (samples[i], stream, blocks[i], 0) -> out[i, 0..3].
extern "C" __global__ void glag_block_normals_kernel(const long long* __restrict__ samples,
                                                     const long long* __restrict__ blocks, long long n,
                                                     unsigned int stream, unsigned int k0, unsigned int k1,
                                                     float* __restrict__ out) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) glag_block_normals((unsigned int)samples[i], stream, (unsigned int)blocks[i], k0, k1, out + 4 * i);
}
