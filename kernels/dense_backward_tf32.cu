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
// dW launch: grid (ceil(in / 64), ceil(out / 64)); GEMM M = in, N = out, K = B. No split-K:
// a layer with few tiles and a large batch leaves SMs idle here (the fp32 kernel splits).
#include "gemm_tf32.cuh"

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
    tf32_mainloop<false>(dz, KMajor{w, K}, M, N, K, m0, n0, frag, unused_colsum);
    tf32_for_each_output(frag, m0, n0, M, N, [&](long long row, long long col, float v) { dx[row * N + col] = v; });
}

template <int ACT>
__device__ __forceinline__ void dense_dw_tf32(const float* __restrict__ x, const float* __restrict__ dy,
                                              const float* __restrict__ y_or_z, float* __restrict__ dw,
                                              float* __restrict__ db, int B_, int in_, int out_) {
    const long long M = in_, N = out_, K = B_;
    const long long m0 = static_cast<long long>(blockIdx.x) * Tf32Tile::BM;
    const long long n0 = static_cast<long long>(blockIdx.y) * Tf32Tile::BN;
    Tf32Fragment frag;
    float colsum;
    const GradOuterMajor<ACT> dz{GradPrologue<ACT>{dy, y_or_z}, N};
    tf32_mainloop<true>(OuterMajor{x, M}, dz, M, N, K, m0, n0, frag, colsum);
    tf32_for_each_output(frag, m0, n0, M, N, [&](long long row, long long col, float v) { dw[row * N + col] = v; });
    if (blockIdx.x != 0) return;  // uniform across the block
    __shared__ float upper_half[Tf32Tile::BN];
    const int tid = threadIdx.x;
    if (tid >= Tf32Tile::BN) upper_half[tid - Tf32Tile::BN] = colsum;
    __syncthreads();
    if (tid < Tf32Tile::BN && n0 + tid < N) db[n0 + tid] = colsum + upper_half[tid];
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
                             int B, int in, int out) {                                                        \
        gpubp::dense_dw_tf32<ID>(x, dy, y_or_z, dw, db, B, in, out);                                         \
    }

GPUBP_FOR_EACH_ACTIVATION(GPUBP_DENSE_BWD_TF32_ENTRY)
