// The tiled fp32 GEMM main loop shared by dense_forward.cu and dense_backward.cu.
//
// Computes one BM x BN tile of C = A @ B over k in [k_begin, k_end), A (M, K) and B (K, N)
// seen through operand loaders, so one main loop serves x @ W (forward), dz @ W^T (dX, with
// dz = dy * act'(.) formed as the operand is loaded) and x^T @ dz (dW).
//
// Tiling (the classic 2D block + warp tiling of fast SIMT SGEMMs):
//   block tile  BM x BN, BK = 8 deep; BM, BN in {64, 128} (template parameters)
//   warp tile   WARP_M x WARP_N = 32 x 64; warps laid out (BM/32) x (BN/64);
//               threads per block = 32 * (BM/32) * (BN/64): 256 for 128x128, 64 for 64x64
//   thread tile 8 x 8 = two 4-row groups 16 rows apart x two 4-column groups 32 columns apart;
//               lanes laid out 4 (rows) x 8 (columns) within the warp. Each k step reads
//               two float4 of A and two float4 of B from shared memory and issues 64 FMAs;
//               the eight lanes sharing a row group read one float4 (a broadcast), and the
//               eight column groups of a warp read 128 contiguous bytes: conflict-free.
//   shared      A and B tiles stored k-major, As[k][m] and Bs[k][n], each row padded by 4
//               floats so transposing stores from K-contiguous operands hit distinct banks
//               while rows stay 16-byte aligned; two buffers of each:
//               2 * BK * (BM + 4 + BN + 4) * 4 bytes = 17 KB (128x128), 9 KB (64x64),
//               static and under the 48 KB default, so no opt-in is needed.
//   pipeline    global -> registers for tile t+1 is issued before the FMAs on tile t and
//               stored to the other shared buffer after them: one __syncthreads per tile.
//
// Memory per block: reads a BM x (k_end - k_begin) slab of A and a (k_end - k_begin) x BN
// slab of B once each (float4 where the contiguous extent is a multiple of 4 and the base
// is 16-byte aligned, else guarded scalars); out-of-range elements load as 0, so any M, N,
// K works and the epilogue only has to guard its stores. Index products use long long.
#pragma once

#include "activations.cuh"

namespace gpubp {

constexpr int BK = 8;
constexpr int WARP_M = 32;
constexpr int WARP_N = 64;
constexpr int THREAD_M = 8;
constexpr int THREAD_N = 8;
constexpr int LANES_M = 4;  // lanes along M in a warp; 8 along N
constexpr int LANES_N = 8;
constexpr int SMEM_PAD = 4;

template <int BM, int BN>
struct TileShape {
    static_assert(BM % WARP_M == 0 && BN % WARP_N == 0, "block tile must be whole warp tiles");
    static constexpr int WARPS_M = BM / WARP_M;
    static constexpr int WARPS_N = BN / WARP_N;
    static constexpr int THREADS = 32 * WARPS_M * WARPS_N;
    static constexpr int LDA = BM + SMEM_PAD;  // row stride of As[k][.]
    static constexpr int LDB = BN + SMEM_PAD;
    // Resident blocks per SM that __launch_bounds__ asks the register allocator for
    // (64K registers per SM): 128x128 gets 2 (<= 128 registers, 16 warps); 64x64, which
    // stages two float4 per operand per thread, gets 6 (<= 168 registers, 12 warps).
    // Both fit without spills (the build fails on any spill).
    static constexpr int MIN_BLOCKS = THREADS >= 256 ? 2 : 6;
};

// Where one thread's 8x8 accumulator sits inside the block tile: rows row0 + {0..3} and
// row0 + 16 + {0..3}; columns col0 + {0..3} and col0 + 32 + {0..3}.
struct ThreadTile {
    int warp_m, warp_n, lane_m, lane_n, row0, col0;
    template <int BM, int BN>
    __device__ __forceinline__ static ThreadTile of(int tid) {
        ThreadTile t;
        const int warp = tid / 32, lane = tid % 32;
        t.warp_m = warp / TileShape<BM, BN>::WARPS_N;
        t.warp_n = warp % TileShape<BM, BN>::WARPS_N;
        t.lane_m = lane / LANES_N;
        t.lane_n = lane % LANES_N;
        t.row0 = t.warp_m * WARP_M + t.lane_m * 4;
        t.col0 = t.warp_n * WARP_N + t.lane_n * 4;
        return t;
    }
    // Row (0..7) and column (0..7) of the accumulator -> offset inside the block tile.
    __device__ __forceinline__ int row(int i) const { return row0 + (i / 4) * (LANES_M * 4) + i % 4; }
    __device__ __forceinline__ int col(int j) const { return col0 + (j / 4) * (LANES_N * 4) + j % 4; }
};

// ---------------------------------------------------------------------------- operand sources
//
// An operand is a K x O matrix (O = M for A, N for B) read from global memory, element
// (k, o). The sources below differ only in layout and in what they compute per element.

__device__ __forceinline__ bool aligned16(const float* p) {
    return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0;
}

// Element (k, o) at p[k * ld + o]: contiguous along O (x @ W's W, x^T in dW).
struct OuterMajor {
    const float* p;
    long long ld;  // = O extent
    __device__ __forceinline__ float at(long long idx) const { return p[idx]; }
    __device__ __forceinline__ float4 at4(long long idx) const {
        return *reinterpret_cast<const float4*>(p + idx);
    }
    __device__ __forceinline__ bool can_vectorize() const { return ld % 4 == 0 && aligned16(p); }
};

// Element (k, o) at p[o * ld + k]: contiguous along K (x in x @ W, W^T in dz @ W^T).
struct KMajor {
    const float* p;
    long long ld;  // = K extent
    __device__ __forceinline__ float at(long long idx) const { return p[idx]; }
    __device__ __forceinline__ float4 at4(long long idx) const {
        return *reinterpret_cast<const float4*>(p + idx);
    }
    __device__ __forceinline__ bool can_vectorize() const { return ld % 4 == 0 && aligned16(p); }
};

// dz = dy * act'(y or z), formed while loading: three same-shape row-major arrays read at
// one index. y_or_z is z for activations that need it, else y (unread for identity).
template <int ACT>
struct GradPrologue {
    const float* dy;
    const float* y_or_z;
    __device__ __forceinline__ float at(long long idx) const {
        if constexpr (ACT == ACT_IDENTITY) {
            return dy[idx];
        } else {
            const float v = y_or_z[idx];
            return dy[idx] * act_grad<ACT>(v, v);
        }
    }
    __device__ __forceinline__ float4 at4(long long idx) const {
        const float4 g = *reinterpret_cast<const float4*>(dy + idx);
        if constexpr (ACT == ACT_IDENTITY) {
            return g;
        } else {
            const float4 v = *reinterpret_cast<const float4*>(y_or_z + idx);
            return make_float4(g.x * act_grad<ACT>(v.x, v.x), g.y * act_grad<ACT>(v.y, v.y),
                               g.z * act_grad<ACT>(v.z, v.z), g.w * act_grad<ACT>(v.w, v.w));
        }
    }
    __device__ __forceinline__ bool vectorizable() const {
        return aligned16(dy) && (ACT == ACT_IDENTITY || aligned16(y_or_z));
    }
};

template <int ACT>
struct GradOuterMajor {  // dz as a K x O operand, contiguous along O (the B operand of dW)
    GradPrologue<ACT> g;
    long long ld;
    __device__ __forceinline__ float at(long long idx) const { return g.at(idx); }
    __device__ __forceinline__ float4 at4(long long idx) const { return g.at4(idx); }
    __device__ __forceinline__ bool can_vectorize() const { return ld % 4 == 0 && g.vectorizable(); }
};

template <int ACT>
struct GradKMajor {  // dz as a K x O operand, contiguous along K (the A operand of dX)
    GradPrologue<ACT> g;
    long long ld;
    __device__ __forceinline__ float at(long long idx) const { return g.at(idx); }
    __device__ __forceinline__ float4 at4(long long idx) const { return g.at4(idx); }
    __device__ __forceinline__ bool can_vectorize() const { return ld % 4 == 0 && g.vectorizable(); }
};

template <class Src> struct IsKMajor { static constexpr bool value = false; };
template <> struct IsKMajor<KMajor> { static constexpr bool value = true; };
template <int ACT> struct IsKMajor<GradKMajor<ACT>> { static constexpr bool value = true; };

// ---------------------------------------------------------------------------- tile loader
//
// Stages one BK x O tile of an operand: load() pulls it from global memory into registers
// (one float4 per pass; THREADS threads cover the tile in PASSES passes), store() writes
// the registers to a k-major shared buffer T[k][o] with row stride LD.
template <class Src, int O, int THREADS, int LD>
struct TileLoader {
    static constexpr bool K_MAJOR = IsKMajor<Src>::value;
    static constexpr int VECS = BK * O / 4;
    static constexpr int PASSES = VECS / THREADS;
    static_assert(VECS % THREADS == 0, "tile must split evenly into float4 per thread");
    static constexpr int VECS_PER_LINE = K_MAJOR ? BK / 4 : O / 4;  // float4s along the contiguous axis

    Src src;
    long long o_extent, k_end;  // elements beyond these load as 0
    bool vec;
    float4 reg[PASSES];

    __device__ __forceinline__ void coords(int tid, int pass, int& k, int& o) const {
        const int v = tid + pass * THREADS;
        if constexpr (K_MAJOR) {
            o = v / VECS_PER_LINE;
            k = (v % VECS_PER_LINE) * 4;
        } else {
            k = v / VECS_PER_LINE;
            o = (v % VECS_PER_LINE) * 4;
        }
    }

    __device__ __forceinline__ void load(int tid, long long k0, long long o0) {
#pragma unroll
        for (int pass = 0; pass < PASSES; ++pass) {
            int kk, oo;
            coords(tid, pass, kk, oo);
            const long long k = k0 + kk, o = o0 + oo;
            float e[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) e[j] = 0.0f;
            if constexpr (K_MAJOR) {
                // Four consecutive k of line o.
                const long long base = o * src.ld + k;
                if (o < o_extent) {
                    if (vec && k + 3 < k_end) {
                        const float4 t = src.at4(base);
                        e[0] = t.x; e[1] = t.y; e[2] = t.z; e[3] = t.w;
                    } else {
#pragma unroll
                        for (int j = 0; j < 4; ++j)
                            if (k + j < k_end) e[j] = src.at(base + j);
                    }
                }
            } else {
                const long long base = k * src.ld + o;
                if (k < k_end) {
                    if (vec && o + 3 < o_extent) {
                        const float4 t = src.at4(base);
                        e[0] = t.x; e[1] = t.y; e[2] = t.z; e[3] = t.w;
                    } else {
#pragma unroll
                        for (int j = 0; j < 4; ++j)
                            if (o + j < o_extent) e[j] = src.at(base + j);
                    }
                }
            }
            reg[pass] = make_float4(e[0], e[1], e[2], e[3]);
        }
    }

    __device__ __forceinline__ void store(int tid, float* tile) const {
#pragma unroll
        for (int pass = 0; pass < PASSES; ++pass) {
            int k, o;
            coords(tid, pass, k, o);
            if constexpr (K_MAJOR) {
                tile[(k + 0) * LD + o] = reg[pass].x;
                tile[(k + 1) * LD + o] = reg[pass].y;
                tile[(k + 2) * LD + o] = reg[pass].z;
                tile[(k + 3) * LD + o] = reg[pass].w;
            } else {
                *reinterpret_cast<float4*>(tile + k * LD + o) = reg[pass];
            }
        }
    }
};

// ---------------------------------------------------------------------------- main loop
//
// acc += A[m0 : m0+BM, k_begin : k_end] @ B[k_begin : k_end, n0 : n0+BN] for this thread's
// 8x8 share. With COLSUM, the threads whose fragments cover row group 0 (warp_m == 0,
// lane_m == 0: together every column of the tile exactly once) also add each B element
// they read into colsum[8], giving sum_k B[k, col] for free: that is db in the dW kernel.
template <int BM, int BN, bool COLSUM, class SrcA, class SrcB>
__device__ __forceinline__ void gemm_mainloop(const SrcA& a_src, const SrcB& b_src,
                                              long long M, long long N, long long k_begin,
                                              long long k_end, long long m0, long long n0,
                                              float (&acc)[THREAD_M][THREAD_N],
                                              float (&colsum)[THREAD_N], bool colsum_active) {
    using Shape = TileShape<BM, BN>;
    __shared__ __align__(16) float As[2][BK * Shape::LDA];
    __shared__ __align__(16) float Bs[2][BK * Shape::LDB];

    const int tid = threadIdx.x;
    const ThreadTile tt = ThreadTile::of<BM, BN>(tid);

    TileLoader<SrcA, BM, Shape::THREADS, Shape::LDA> a{a_src, M, k_end, a_src.can_vectorize()};
    TileLoader<SrcB, BN, Shape::THREADS, Shape::LDB> b{b_src, N, k_end, b_src.can_vectorize()};

#pragma unroll
    for (int i = 0; i < THREAD_M; ++i)
#pragma unroll
        for (int j = 0; j < THREAD_N; ++j) acc[i][j] = 0.0f;
#pragma unroll
    for (int j = 0; j < THREAD_N; ++j) colsum[j] = 0.0f;

    const long long tiles = (k_end - k_begin + BK - 1) / BK;
    if (tiles <= 0) return;

    a.load(tid, k_begin, m0);
    b.load(tid, k_begin, n0);
    a.store(tid, As[0]);
    b.store(tid, Bs[0]);
    __syncthreads();

    for (long long t = 0; t < tiles; ++t) {
        const int cur = static_cast<int>(t & 1);
        const bool more = t + 1 < tiles;
        if (more) {  // global loads for tile t+1 stay in flight during the FMAs on tile t
            a.load(tid, k_begin + (t + 1) * BK, m0);
            b.load(tid, k_begin + (t + 1) * BK, n0);
        }
        const float* as = As[cur];
        const float* bs = Bs[cur];
#pragma unroll
        for (int k = 0; k < BK; ++k) {
            float af[THREAD_M], bf[THREAD_N];
            const float4 a0 = *reinterpret_cast<const float4*>(as + k * Shape::LDA + tt.row0);
            const float4 a1 = *reinterpret_cast<const float4*>(as + k * Shape::LDA + tt.row0 + LANES_M * 4);
            const float4 b0 = *reinterpret_cast<const float4*>(bs + k * Shape::LDB + tt.col0);
            const float4 b1 = *reinterpret_cast<const float4*>(bs + k * Shape::LDB + tt.col0 + LANES_N * 4);
            af[0] = a0.x; af[1] = a0.y; af[2] = a0.z; af[3] = a0.w;
            af[4] = a1.x; af[5] = a1.y; af[6] = a1.z; af[7] = a1.w;
            bf[0] = b0.x; bf[1] = b0.y; bf[2] = b0.z; bf[3] = b0.w;
            bf[4] = b1.x; bf[5] = b1.y; bf[6] = b1.z; bf[7] = b1.w;
#pragma unroll
            for (int i = 0; i < THREAD_M; ++i)
#pragma unroll
                for (int j = 0; j < THREAD_N; ++j) acc[i][j] = fmaf(af[i], bf[j], acc[i][j]);
            if (COLSUM && colsum_active) {
#pragma unroll
                for (int j = 0; j < THREAD_N; ++j) colsum[j] += bf[j];
            }
        }
        if (more) {  // the other buffer was last read in iteration t-1, before its barrier
            a.store(tid, As[cur ^ 1]);
            b.store(tid, Bs[cur ^ 1]);
        }
        __syncthreads();
    }
}

// Writes up to four consecutive floats of one row: a float4 store when all four are in
// range and the row allows it, else one guarded store each.
__device__ __forceinline__ void store4(float* p, long long idx, const float (&v)[4], long long valid,
                                       bool vec) {
    if (vec && valid >= 4) {
        *reinterpret_cast<float4*>(p + idx) = make_float4(v[0], v[1], v[2], v[3]);
    } else {
#pragma unroll
        for (int j = 0; j < 4; ++j)
            if (j < valid) p[idx + j] = v[j];
    }
}

// Writes accumulator columns jg .. jg+3 of every row this thread owns to out (M, N), whose
// tile column for jg is col. jg must be a compile-time constant after unrolling, so acc
// stays in registers.
__device__ __forceinline__ void store_acc_columns(float* out, const float (&acc)[THREAD_M][THREAD_N], int jg,
                                                  const ThreadTile& tt, long long m0, long long M, long long N,
                                                  long long col, long long valid_cols, bool vec) {
#pragma unroll
    for (int i = 0; i < THREAD_M; ++i) {
        const long long row = m0 + tt.row(i);
        if (row >= M) continue;
        const float v[4] = {acc[i][jg], acc[i][jg + 1], acc[i][jg + 2], acc[i][jg + 3]};
        store4(out, row * N + col, v, valid_cols, vec);
    }
}

}  // namespace gpubp
