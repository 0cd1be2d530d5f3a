// The TF32 tensor-core GEMM main loop shared by dense_forward_tf32.cu and dense_backward_tf32.cu.
//
// Computes one BM x BN = 64 x 64 tile of C = A @ B over k in [k_begin, k_end) (all of K, or
// one split of it in the dW kernel), A (M, K) and B (K, N) read through gemm_tile.cuh's operand
// sources, so one loop serves x @ W (forward), dz @ W^T (dX, with dz = dy * act'(.) formed as
// the operand loads) and x^T @ dz (dW), as the fp32 loop does.
// Operands are rounded to TF32 (cvt.rna, 10 mantissa bits) as they are staged in shared memory
// and multiplied on mma.sync.m16n8k8 with fp32 accumulation (kernels/mma.cuh).
//
// Error: each product carries both operands' rounding (relative 2^-11 each), so against
// float64 |C - C_ref| is about 2^-10 sqrt(K) max|A| max|B| for random data; the tests bound it
// at 2e-3 relative to the largest |C| on N(0, 1) data.
//
// Tiles: 4 warps in 2 x 2, each owning a 32 x 32 warp tile = 2 (m16) x 4 (n8) mma tiles, so a
// k step of BK = 8 issues 8 mma per warp from 2 A and 4 B fragments. Shared: As[BM][BK + 4]
// (k contiguous per row) and Bs[BK][BN + 4] (n contiguous), 4.2 KB, padded so a warp's fragment
// reads spread over banks. Each thread stages four elements of each operand per k tile with
// guarded scalar loads (out-of-range as 0), so any M, N, K works and only the epilogue guards
// its stores. Thread tid always stages column tid % 64 of B, which lets COLSUM give each thread
// the fp32 sum of its B column (db in the dW kernel) for free.
// Memory per block: a 64 x (k_end - k_begin) slab of A and a (k_end - k_begin) x 64 slab of B,
// each read once. A k_begin that is a multiple of BK keeps every k tile but the last full.
#pragma once

#include "gemm_tile.cuh"
#include "mma.cuh"

namespace gpubp {

struct Tf32Tile {
    static constexpr int BM = 64, BN = 64, BK = 8;
    static constexpr int WARP_M = 32, WARP_N = 32;  // warps laid out 2 x 2
    static constexpr int MMA_M = 16, MMA_N = 8;
    static constexpr int TILES_M = WARP_M / MMA_M, TILES_N = WARP_N / MMA_N;  // 2 x 4 per warp
    static constexpr int THREADS = 128;
    static constexpr int LDA = BK + 4, LDB = BN + 4;
    static constexpr int LOADS = BM * BK / THREADS;  // elements per thread per operand per k tile: 4
    static_assert(BM * BK == BK * BN, "both operands stage the same number of elements");
    static_assert(THREADS % BN == 0, "a thread stages one fixed column of B");
};

// One thread's accumulators: [m16 tile][n8 tile][fragment register], and where each sits.
struct Tf32Fragment {
    float acc[Tf32Tile::TILES_M][Tf32Tile::TILES_N][4];
    int warp_row, warp_col, g, t;
    // Accumulator r of tile (i, j): row g + 8 (r / 2), column 2t + r % 2 of that 16 x 8 tile.
    __device__ __forceinline__ int row(int i, int r) const { return warp_row + i * Tf32Tile::MMA_M + g + 8 * (r / 2); }
    __device__ __forceinline__ int col(int j, int r) const { return warp_col + j * Tf32Tile::MMA_N + 2 * t + r % 2; }
};

// Element (k, o) of an operand source, whichever way it is laid out.
template <class Src>
__device__ __forceinline__ float operand_at(const Src& src, long long k, long long o) {
    if constexpr (IsKMajor<Src>::value) {
        return src.at(o * src.ld + k);
    } else {
        return src.at(k * src.ld + o);
    }
}

// frag.acc = A[m0 : m0+64, k_begin : k_end] @ B[k_begin : k_end, n0 : n0+64] for this thread's
// share. With COLSUM, colsum = sum over those k of B[k, n0 + tid % 64] restricted to the rows
// this thread staged; the two threads staging a column together cover every row once.
template <bool COLSUM, class SrcA, class SrcB>
__device__ __forceinline__ void tf32_mainloop(const SrcA& a_src, const SrcB& b_src, long long M, long long N,
                                              long long k_begin, long long k_end, long long m0, long long n0,
                                              Tf32Fragment& frag, float& colsum) {
    using T = Tf32Tile;
    __shared__ float As[T::BM * T::LDA];
    __shared__ float Bs[T::BK * T::LDB];
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    frag.g = lane >> 2;
    frag.t = lane % 4;
    frag.warp_row = (warp / 2) * T::WARP_M;
    frag.warp_col = (warp % 2) * T::WARP_N;
    const int g = frag.g, t = frag.t;
#pragma unroll
    for (int i = 0; i < T::TILES_M; ++i)
#pragma unroll
        for (int j = 0; j < T::TILES_N; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) frag.acc[i][j][r] = 0.0f;
    colsum = 0.0f;

    for (long long k0 = k_begin; k0 < k_end; k0 += T::BK) {
#pragma unroll
        for (int l = 0; l < T::LOADS; ++l) {
            const int e = tid + l * T::THREADS;
            const int am = e / T::BK, ak = e % T::BK;  // A tile: 8 consecutive k per row
            const long long a_row = m0 + am, a_k = k0 + ak;
            const float av = a_row < M && a_k < k_end ? operand_at(a_src, a_k, a_row) : 0.0f;
            As[am * T::LDA + ak] = __uint_as_float(to_tf32(av));
            const int bk = e / T::BN, bn = e % T::BN;  // B tile: 64 consecutive n per k
            const long long b_k = k0 + bk, b_col = n0 + bn;
            const float bv = b_k < k_end && b_col < N ? operand_at(b_src, b_k, b_col) : 0.0f;
            Bs[bk * T::LDB + bn] = __uint_as_float(to_tf32(bv));
            if (COLSUM) colsum += bv;
        }
        __syncthreads();
        unsigned int a[T::TILES_M][4], b[T::TILES_N][2];
#pragma unroll
        for (int i = 0; i < T::TILES_M; ++i) {
            const float* tile = As + (frag.warp_row + i * T::MMA_M) * T::LDA;
            a[i][0] = __float_as_uint(tile[g * T::LDA + t]);
            a[i][1] = __float_as_uint(tile[(g + 8) * T::LDA + t]);
            a[i][2] = __float_as_uint(tile[g * T::LDA + t + 4]);
            a[i][3] = __float_as_uint(tile[(g + 8) * T::LDA + t + 4]);
        }
#pragma unroll
        for (int j = 0; j < T::TILES_N; ++j) {
            const int col = frag.warp_col + j * T::MMA_N + g;
            b[j][0] = __float_as_uint(Bs[t * T::LDB + col]);
            b[j][1] = __float_as_uint(Bs[(t + 4) * T::LDB + col]);
        }
#pragma unroll
        for (int i = 0; i < T::TILES_M; ++i)
#pragma unroll
            for (int j = 0; j < T::TILES_N; ++j) mma_m16n8k8_tf32(frag.acc[i][j], a[i], b[j], frag.acc[i][j]);
        __syncthreads();  // the next k tile overwrites As and Bs
    }
}

// Calls visit(row, col, value) for every accumulator that falls inside the (M, N) output.
template <class Visit>
__device__ __forceinline__ void tf32_for_each_output(const Tf32Fragment& frag, long long m0, long long n0,
                                                     long long M, long long N, Visit visit) {
#pragma unroll
    for (int i = 0; i < Tf32Tile::TILES_M; ++i)
#pragma unroll
        for (int j = 0; j < Tf32Tile::TILES_N; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const long long row = m0 + frag.row(i, r), col = n0 + frag.col(j, r);
                if (row < M && col < N) visit(row, col, frag.acc[i][j][r]);
            }
}

}  // namespace gpubp
