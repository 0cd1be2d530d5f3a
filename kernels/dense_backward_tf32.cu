// Dense-layer backward on TF32 tensor cores, for y = act(x @ W + b): the tensor-core twins of
// dense_backward.cu's kernels, each launched only when its gradient is needed.
//
//   dense_dx_tf32_<act>:  dx = dz @ W^T,  dz = dy * act'(y or z)
//   dense_dw_tf32_<act>:  dW = x^T @ dz,  db = dz.sum(0)
//
// dz is formed while loading, never stored (gemm_tile.cuh's GradKMajor / GradOuterMajor), and
// rounded to TF32 with the other operand on its way into shared memory (gemm_tf32.cuh: tiles
// and error bound). db is summed in fp32 from the unrounded dz, by the blocks of m-tile 0,
// each thread over the batch rows it staged; the two threads of each column add their halves
// in a fixed order, so db is exact fp32 and deterministic.
//
// Layout: dy, y, z (B, out); x (B, in); W (in, out); dx (B, in); dW (in, out); db (out,); all
// row-major and C-contiguous. Block 128 threads, no dynamic shared memory.
// dX launch: grid (ceil(B / 64), ceil(in / 64)); GEMM M = B, N = in, K = out.
// dW launch: grid (ceil(in / 64), ceil(out / 64), splits); GEMM M = in, N = out, K = B.
// Split-K over the batch exactly as in dense_backward.cu: when in x out gives too few tiles to
// fill the GPU the host picks splits > 1 and k_chunk (a multiple of Tf32Tile::BK, so every k
// tile of a split but its last is full); each split writes its partial dW tile to ws (splits x
// in x out floats) and its partial db, still summed in fp32, to ws_db (splits x out), and the
// last block of each tile sums them in split order (split_k.cuh), so dW and db are bitwise
// deterministic and db stays an fp32 sum of the unrounded dz. With splits == 1 the tile goes
// straight to dW and db and ws, ws_db, tickets are unused.
#include "gemm_tf32.cuh"
#include "split_k.cuh"

namespace gpubp {

template <int ACT>
__device__ __forceinline__ void dense_dx_tf32(const float* __restrict__ dy, const float* __restrict__ y_or_z,
                                              const float* __restrict__ w, float* __restrict__ dx, int B_,
                                              int in_, int out_) {
    const long long M = B_, N = in_, K = out_;
    const long long m0 = static_cast<long long>(blockIdx.x) * Tf32Tile::BM;
    const long long n0 = static_cast<long long>(blockIdx.y) * Tf32Tile::BN;
    Tf32Fragment frag;
    float unused_colsum;
    const GradKMajor<ACT> dz{GradPrologue<ACT>{dy, y_or_z}, K};
    tf32_mainloop<false>(dz, KMajor{w, K}, M, N, 0, K, m0, n0, frag, unused_colsum);
    tf32_for_each_output(frag, m0, n0, M, N, [&](long long row, long long col, float v) { dx[row * N + col] = v; });
}

template <int ACT>
__device__ __forceinline__ void dense_dw_tf32(const float* __restrict__ x, const float* __restrict__ dy,
                                              const float* __restrict__ y_or_z, float* __restrict__ dw,
                                              float* __restrict__ db, float* __restrict__ ws,
                                              float* __restrict__ ws_db, unsigned int* __restrict__ tickets,
                                              int B_, int in_, int out_, int k_chunk, int splits) {
    using T = Tf32Tile;
    const long long M = in_, N = out_, K = B_;
    const long long m0 = static_cast<long long>(blockIdx.x) * T::BM;
    const long long n0 = static_cast<long long>(blockIdx.y) * T::BN;
    const SplitRows batch_rows = SplitRows::of(K, k_chunk, blockIdx.z);
    Tf32Fragment frag;
    float colsum;
    const GradOuterMajor<ACT> dz{GradPrologue<ACT>{dy, y_or_z}, N};
    tf32_mainloop<true>(OuterMajor{x, M}, dz, M, N, batch_rows.begin, batch_rows.end, m0, n0, frag, colsum);
    float* dw_out = split_k_partial(dw, ws, M * N, splits, blockIdx.z);
    tf32_for_each_output(frag, m0, n0, M, N, [&](long long row, long long col, float v) { dw_out[row * N + col] = v; });
    if (blockIdx.x == 0) {  // uniform across the block
        __shared__ float upper_half[T::BN];
        const int tid = threadIdx.x;
        if (tid >= T::BN) upper_half[tid - T::BN] = colsum;
        __syncthreads();
        float* db_out = split_k_partial(db, ws_db, N, splits, blockIdx.z);
        if (tid < T::BN && n0 + tid < N) db_out[n0 + tid] = colsum + upper_half[tid];
    }
    if (splits > 1) dense_dw_split_k_finish(ws, ws_db, tickets, dw, db, M, N, m0, n0, T::BM, T::BN, splits);
}

}  // namespace gpubp

#define GPUBP_DENSE_BWD_TF32_ENTRY(NAME, ID)                                                                 \
    extern "C" __global__ void __launch_bounds__(gpubp::Tf32Tile::THREADS)                                 \
        dense_dx_tf32_##NAME(const float* __restrict__ dy, const float* __restrict__ y_or_z,                  \
                             const float* __restrict__ w, float* __restrict__ dx, int B, int in, int out) {   \
        gpubp::dense_dx_tf32<ID>(dy, y_or_z, w, dx, B, in, out);                                             \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(gpubp::Tf32Tile::THREADS)                                 \
        dense_dw_tf32_##NAME(const float* __restrict__ x, const float* __restrict__ dy,                       \
                             const float* __restrict__ y_or_z, float* __restrict__ dw, float* __restrict__ db, \
                             float* __restrict__ ws, float* __restrict__ ws_db,                                \
                             unsigned int* __restrict__ tickets, int B, int in, int out, int k_chunk,         \
                             int splits) {                                                                    \
        gpubp::dense_dw_tf32<ID>(x, dy, y_or_z, dw, db, ws, ws_db, tickets, B, in, out, k_chunk, splits);    \
    }

GPUBP_FOR_EACH_ACTIVATION(GPUBP_DENSE_BWD_TF32_ENTRY)
