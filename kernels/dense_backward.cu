// Dense-layer backward, fp32, for y = act(x @ W + b). Two kernels, each launched only
// when its gradient is needed:
//
//   dense_dx_<act>_<BM>x<BN>:  dx = dz @ W^T,  dz = dy * act'(y or z)
//   dense_dw_<act>_<BM>x<BN>:  dW = x^T @ dz,  db = dz.sum(0)
//
// dz is never materialized: each kernel forms it while loading its dz operand tile
// (GradKMajor / GradOuterMajor in gemm_tile.cuh), reading dy and y (or z for gelu and
// gelu_tanh) at the same index. That rereads dy and y once per kernel instead of writing
// and reading back a (B, out) dz buffer.
//
// Layout: dy, y, z (B, out); x (B, in); W (in, out); dx (B, in); dW (in, out); db (out,);
// all row-major and C-contiguous. Tiles: gemm_tile.cuh (BK = 8, warp 32x64, thread 8x8),
// BM x BN = 128x128 (256 threads) or 64x64 (64 threads), chosen by the host.
//
// dX launch: grid (ceil(B / BM), ceil(in / BN)); GEMM M = B, N = in, K = out. Each block
// reads a BM x out slab of dy and y|z, an in-tile x out slab of W, writes BM x BN of dx.
//
// dW launch: grid (ceil(in / BM), ceil(out / BN), splits); GEMM M = in, N = out, K = B.
// db comes from the same kernel, like cuBLASLt's BGRADB epilogue: the blocks of m-tile 0
// sum the dz columns they already hold in registers (gemm_mainloop's COLSUM).
// Split-K over the batch: when in x out gives too few tiles to fill the GPU (small layers,
// large batches) the host picks splits > 1 (grid.z) and k_chunk (a multiple of BK); each split
// writes its partials to ws (splits x in x out floats) and ws_db (splits x out), and the last
// block of each tile sums them in split order (split_k.cuh: contract, tickets, determinism).
// With splits == 1 the tile goes straight to dW and db and ws, ws_db, tickets are unused.
#include "gemm_tile.cuh"
#include "split_k.cuh"

namespace gpubp {

template <int ACT, int BM, int BN>
__device__ __forceinline__ void dense_dx(const float* __restrict__ dy, const float* __restrict__ y_or_z,
                                         const float* __restrict__ w, float* __restrict__ dx, int B_,
                                         int in_, int out_) {
    const long long M = B_, N = in_, K = out_;
    const long long m0 = static_cast<long long>(blockIdx.x) * BM;
    const long long n0 = static_cast<long long>(blockIdx.y) * BN;

    float acc[THREAD_M][THREAD_N];
    float unused_colsum[THREAD_N];
    const GradKMajor<ACT> dz{GradPrologue<ACT>{dy, y_or_z}, K};
    gemm_mainloop<BM, BN, false>(dz, KMajor{w, K}, M, N, 0, K, m0, n0, acc, unused_colsum, false);

    const ThreadTile tt = ThreadTile::of<BM, BN>(threadIdx.x);
    const bool vec = N % 4 == 0 && aligned16(dx);
#pragma unroll
    for (int jg = 0; jg < THREAD_N; jg += 4) {
        const long long col = n0 + tt.col(jg);
        const long long valid_cols = N - col;
        if (valid_cols <= 0) continue;
        store_acc_columns(dx, acc, jg, tt, m0, M, N, col, valid_cols, vec);
    }
}

template <int ACT, int BM, int BN>
__device__ __forceinline__ void dense_dw(const float* __restrict__ x, const float* __restrict__ dy,
                                         const float* __restrict__ y_or_z, float* __restrict__ dw,
                                         float* __restrict__ db, float* __restrict__ ws,
                                         float* __restrict__ ws_db, unsigned int* __restrict__ tickets,
                                         int B_, int in_, int out_, int k_chunk, int splits) {
    const long long M = in_, N = out_, K = B_;
    const long long m0 = static_cast<long long>(blockIdx.x) * BM;
    const long long n0 = static_cast<long long>(blockIdx.y) * BN;
    const SplitRows batch_rows = SplitRows::of(K, k_chunk, blockIdx.z);
    const ThreadTile tt = ThreadTile::of<BM, BN>(threadIdx.x);
    // The threads whose B fragments span every column of the tile exactly once.
    const bool owns_db = blockIdx.x == 0 && tt.warp_m == 0 && tt.lane_m == 0;

    float acc[THREAD_M][THREAD_N];
    float colsum[THREAD_N];
    const GradOuterMajor<ACT> dz{GradPrologue<ACT>{dy, y_or_z}, N};
    gemm_mainloop<BM, BN, true>(OuterMajor{x, M}, dz, M, N, batch_rows.begin, batch_rows.end, m0, n0, acc, colsum,
                                owns_db);

    float* dw_out = split_k_partial(dw, ws, M * N, splits, blockIdx.z);
    float* db_out = split_k_partial(db, ws_db, N, splits, blockIdx.z);
    const bool vec = N % 4 == 0 && aligned16(dw_out);
#pragma unroll
    for (int jg = 0; jg < THREAD_N; jg += 4) {
        const long long col = n0 + tt.col(jg);
        const long long valid_cols = N - col;
        if (valid_cols <= 0) continue;
        store_acc_columns(dw_out, acc, jg, tt, m0, M, N, col, valid_cols, vec);
        if (owns_db) {
#pragma unroll
            for (int j = 0; j < 4; ++j)
                if (j < valid_cols) db_out[col + j] = colsum[jg + j];
        }
    }
    if (splits > 1) dense_dw_split_k_finish(ws, ws_db, tickets, dw, db, M, N, m0, n0, BM, BN, splits);
}

}  // namespace gpubp

#define GPUBP_DENSE_BWD_ENTRY(NAME, ID, BM, BN)                                                         \
    extern "C" __global__ void __launch_bounds__(gpubp::TileShape<BM, BN>::THREADS,                     \
                                                 gpubp::TileShape<BM, BN>::MIN_BLOCKS)                  \
        dense_dx_##NAME##_##BM##x##BN(const float* __restrict__ dy, const float* __restrict__ y_or_z,    \
                                      const float* __restrict__ w, float* __restrict__ dx, int B, int in, \
                                      int out) {                                                          \
        gpubp::dense_dx<ID, BM, BN>(dy, y_or_z, w, dx, B, in, out);                                     \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(gpubp::TileShape<BM, BN>::THREADS,                     \
                                                 gpubp::TileShape<BM, BN>::MIN_BLOCKS)                  \
        dense_dw_##NAME##_##BM##x##BN(const float* __restrict__ x, const float* __restrict__ dy,         \
                                      const float* __restrict__ y_or_z, float* __restrict__ dw,          \
                                      float* __restrict__ db, float* __restrict__ ws,                    \
                                      float* __restrict__ ws_db, unsigned int* __restrict__ tickets,     \
                                      int B, int in, int out, int k_chunk, int splits) {                 \
        gpubp::dense_dw<ID, BM, BN>(x, dy, y_or_z, dw, db, ws, ws_db, tickets, B, in, out, k_chunk,     \
                                    splits);                                                              \
    }
#define GPUBP_DENSE_BWD_ENTRIES(NAME, ID)        \
    GPUBP_DENSE_BWD_ENTRY(NAME, ID, 128, 128)    \
    GPUBP_DENSE_BWD_ENTRY(NAME, ID, 64, 64)

GPUBP_FOR_EACH_ACTIVATION(GPUBP_DENSE_BWD_ENTRIES)
