// Tensor-core variant of glag_slot_gemm (calibrated_sampler.cu), for sm_80 and newer.
//
// The same job and the same RNG contract as glag_slot_gemm: for one slot, x[s, :] += sqrt(w) F_j z
// for every sample s whose seed row has support class j in that slot, the normals z drawn by
// Philox4x32-10 + Box-Muller straight into shared memory (never to global memory). The product
// runs on tensor cores with "3xTF32": each float32 operand a is split into a_hi = tf32(a) and
// a_lo = tf32(a - a_hi), and a b ~ a_hi b_hi + a_hi b_lo + a_lo b_hi (the dropped a_lo b_lo is
// ~2^-22 of a b), accumulated in float32: float32 accuracy, at three TF32 MMAs per product.
//
// Loaded by glag/kernels/cuda.py after calibrated_sampler.cu (one module; the helpers
// glag_block_normals etc. come from there), only when the tensor-core GEMM is asked for
// (GLAG_CUDA_GEMM=tc). The WMMA operations are inline PTX (wmma.load / wmma.mma / wmma.store,
// m16n16k8 TF32, sm_80+), so NVRTC needs no header; tests/test_sampling_gpu.py compiles this
// file on the CPU with GLAG_WMMA_EMULATION and a shim that gives the same five functions whole
// 16 x 16 tiles. A fragment's element layout is opaque: the kernel only touches its elements one
// by one (the hi/lo split), never by position.
//
// Block: 256 threads = 8 warps over a tile of BM = 64 samples x BN = 128 output columns; warp
// (wm, wn) = (warp / 4, warp % 4) owns rows 32 wm .. +31 and columns 32 wn .. +31 as 2 x 2 WMMA
// accumulators of 16 x 16 (m16n16k8, TF32). Per K step of BK = 32 components: thread t draws the
// Philox blocks t % 4 and t % 4 + 4 of sample row t / 4 into A (row-major, 64 x 32) and loads 16
// values of F_j^T into B (row-major, 32 x 128, coalesced along d).

#ifndef GLAG_WMMA_EMULATION
struct glag_frag_ab {  // an A (16 x 8, row-major) or B (8 x 16, row-major) TF32 fragment: 4 registers a lane
    float x[4];
};
struct glag_frag_c {  // a 16 x 16 float32 accumulator: 8 registers a lane
    float x[8];
};

__device__ __forceinline__ float glag_to_tf32(float v) {
    unsigned int r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(v));
    return __uint_as_float(r);
}

__device__ __forceinline__ void glag_load_a(glag_frag_ab& f, const float* p, int ldm) {
    unsigned int r0, r1, r2, r3;
    asm volatile("wmma.load.a.sync.aligned.row.m16n16k8.tf32 {%0, %1, %2, %3}, [%4], %5;"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "l"(p), "r"(ldm) : "memory");
    f.x[0] = __uint_as_float(r0); f.x[1] = __uint_as_float(r1);
    f.x[2] = __uint_as_float(r2); f.x[3] = __uint_as_float(r3);
}

__device__ __forceinline__ void glag_load_b(glag_frag_ab& f, const float* p, int ldm) {
    unsigned int r0, r1, r2, r3;
    asm volatile("wmma.load.b.sync.aligned.row.m16n16k8.tf32 {%0, %1, %2, %3}, [%4], %5;"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "l"(p), "r"(ldm) : "memory");
    f.x[0] = __uint_as_float(r0); f.x[1] = __uint_as_float(r1);
    f.x[2] = __uint_as_float(r2); f.x[3] = __uint_as_float(r3);
}

// d += a b
__device__ __forceinline__ void glag_mma(glag_frag_c& d, const glag_frag_ab& a, const glag_frag_ab& b) {
    asm volatile(
        "wmma.mma.sync.aligned.row.row.m16n16k8.f32.tf32.tf32.f32 "
        "{%0, %1, %2, %3, %4, %5, %6, %7}, {%8, %9, %10, %11}, {%12, %13, %14, %15}, "
        "{%0, %1, %2, %3, %4, %5, %6, %7};"
        : "+f"(d.x[0]), "+f"(d.x[1]), "+f"(d.x[2]), "+f"(d.x[3]),
          "+f"(d.x[4]), "+f"(d.x[5]), "+f"(d.x[6]), "+f"(d.x[7])
        : "r"(__float_as_uint(a.x[0])), "r"(__float_as_uint(a.x[1])), "r"(__float_as_uint(a.x[2])),
          "r"(__float_as_uint(a.x[3])), "r"(__float_as_uint(b.x[0])), "r"(__float_as_uint(b.x[1])),
          "r"(__float_as_uint(b.x[2])), "r"(__float_as_uint(b.x[3])));
}

__device__ __forceinline__ void glag_store_c(float* p, const glag_frag_c& c, int ldm) {
    asm volatile("wmma.store.d.sync.aligned.row.m16n16k8.f32 [%0], {%1, %2, %3, %4, %5, %6, %7, %8}, %9;"
                 :: "l"(p), "f"(c.x[0]), "f"(c.x[1]), "f"(c.x[2]), "f"(c.x[3]), "f"(c.x[4]), "f"(c.x[5]),
                    "f"(c.x[6]), "f"(c.x[7]), "r"(ldm) : "memory");
}
#endif

#define GLAG_TC_BM 64
#define GLAG_TC_BN 128
#define GLAG_TC_BK 32
#define GLAG_TC_LDA (GLAG_TC_BK + 4)   // multiples of 4 floats (WMMA); tile offsets stay 32-byte aligned
#define GLAG_TC_LDB (GLAG_TC_BN + 8)
#define GLAG_TC_LDC (GLAG_TC_BN + 4)
#define GLAG_TC_A_FLOATS (GLAG_TC_BM * GLAG_TC_LDA)
#define GLAG_TC_B_FLOATS (GLAG_TC_BK * GLAG_TC_LDB)
#define GLAG_TC_C_FLOATS (GLAG_TC_BM * GLAG_TC_LDC)
#define GLAG_TC_SMEM_FLOATS \
    ((GLAG_TC_A_FLOATS + GLAG_TC_B_FLOATS) > GLAG_TC_C_FLOATS ? (GLAG_TC_A_FLOATS + GLAG_TC_B_FLOATS) : GLAG_TC_C_FLOATS)

// hi = tf32(v), lo = tf32(v - hi), element by element (the layout of a fragment does not matter).
__device__ __forceinline__ void glag_tf32_split(glag_frag_ab& hi, glag_frag_ab& lo) {
#pragma unroll
    for (int e = 0; e < (int)(sizeof(hi.x) / sizeof(hi.x[0])); ++e) {
        const float v = hi.x[e];
        const float h = glag_to_tf32(v);
        hi.x[e] = h;
        lo.x[e] = glag_to_tf32(v - h);
    }
}

//   ft:      (R, d) float32, the factors transposed: rows offsets[j]..offsets[j+1] hold F_j^T.
//   offsets: (C+1,) int64.     rows: (n,) int64 sample ids grouped by class for this slot.
//   tiles:   (n_tiles, 3) int64: class j, first and one-past-last position in rows (<= 64 apart).
//   seed_of: (n,) int64.       weights: (m, k) float32.
// Grid: (n_tiles, ceil(d / 128)).
extern "C" __global__ void __launch_bounds__(256) glag_slot_gemm_tc(
    const float* __restrict__ ft, const long long* __restrict__ offsets, const long long* __restrict__ rows,
    const long long* __restrict__ tiles, const long long* __restrict__ seed_of, const float* __restrict__ weights,
    int k, int slot, int d, unsigned int k0, unsigned int k1, float* __restrict__ x) {
    __shared__ __align__(32) float smem[GLAG_TC_SMEM_FLOATS];  // A and B in the K loop, then C
    __shared__ long long row_s[GLAG_TC_BM];
    __shared__ float scale_s[GLAG_TC_BM];
    float* a_s = smem;                     // a_s[row * LDA + kk]
    float* b_s = smem + GLAG_TC_A_FLOATS;  // b_s[kk * LDB + col]
    float* c_s = smem;                     // c_s[row * LDC + col], after the K loop

    const int tid = threadIdx.x;
    const int warp = tid >> 5;
    const int wm = warp >> 2, wn = warp & 3;
    const glag_tile tl = glag_tile_setup(offsets, rows, tiles, seed_of, weights, k, slot, GLAG_TC_BM, row_s, scale_s);
    const long long off = tl.off;
    const int r = tl.r, tlen = tl.tlen;
    const int n0 = blockIdx.y * GLAG_TC_BN;

    const int g_row = tid >> 2, g_blk = tid & 3;
    const long long g_s = row_s[g_row];
    const float g_scale = scale_s[g_row];

    glag_frag_c acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int e = 0; e < (int)(sizeof(acc[i][j].x) / sizeof(float)); ++e) acc[i][j].x[e] = 0.0f;

    for (int c0 = 0; c0 < r; c0 += GLAG_TC_BK) {
        // A: two Philox blocks of normals a thread, scaled by sqrt(w), zero past r and the tile
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int blk = g_blk + 4 * h;
            const int cb = c0 + 4 * blk;
            float z[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            if (g_s >= 0 && cb < r) {
                glag_block_normals((unsigned int)g_s, (unsigned int)slot, (unsigned int)(cb >> 2), k0, k1, z);
#pragma unroll
                for (int q = 0; q < 4; ++q) z[q] = (cb + q < r) ? g_scale * z[q] : 0.0f;
            }
#pragma unroll
            for (int q = 0; q < 4; ++q) a_s[g_row * GLAG_TC_LDA + 4 * blk + q] = z[q];
        }
        // B: F_j^T rows c0 .. c0 + 31, columns n0 .. n0 + 127
#pragma unroll
        for (int p = 0; p < GLAG_TC_BK * GLAG_TC_BN / 256; ++p) {
            const int idx = tid + 256 * p;
            const int kk = idx / GLAG_TC_BN, nn = idx % GLAG_TC_BN;
            const int c = c0 + kk, n = n0 + nn;
            b_s[kk * GLAG_TC_LDB + nn] = (c < r && n < d) ? ft[(off + c) * (long long)d + n] : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < GLAG_TC_BK; kk += 8) {
            glag_frag_ab a_hi[2], a_lo[2], b_hi[2], b_lo[2];
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                glag_load_a(a_hi[i], a_s + (32 * wm + 16 * i) * GLAG_TC_LDA + kk, GLAG_TC_LDA);
                glag_tf32_split(a_hi[i], a_lo[i]);
            }
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                glag_load_b(b_hi[j], b_s + kk * GLAG_TC_LDB + 32 * wn + 16 * j, GLAG_TC_LDB);
                glag_tf32_split(b_hi[j], b_lo[j]);
            }
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 2; ++j) {  // small terms first
                    glag_mma(acc[i][j], a_lo[i], b_hi[j]);
                    glag_mma(acc[i][j], a_hi[i], b_lo[j]);
                    glag_mma(acc[i][j], a_hi[i], b_hi[j]);
                }
        }
        __syncthreads();
    }

    // C through shared memory (it reuses A and B), then added into the rows of x, coalesced along d
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
            glag_store_c(c_s + (32 * wm + 16 * i) * GLAG_TC_LDC + 32 * wn + 16 * j, acc[i][j], GLAG_TC_LDC);
    __syncthreads();
    for (int idx = tid; idx < GLAG_TC_BM * GLAG_TC_BN; idx += 256) {
        const int row = idx / GLAG_TC_BN, col = idx % GLAG_TC_BN;
        const int n = n0 + col;
        if (row < tlen && n < d) x[row_s[row] * (long long)d + n] += c_s[row * GLAG_TC_LDC + col];
    }
}
