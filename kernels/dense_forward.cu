// Fused dense-layer forward, fp32:  z = x @ W + b,  y = act(z).
//
// Layout: x (M = batch, K = in) row-major, W (K, N = out) row-major, b (N,), y and z
// (M, N) row-major; all C-contiguous. z is written only for activations whose derivative
// needs it (gelu, gelu_tanh); for the others the z pointer is never touched.
//
// Tiles (gemm_tile.cuh): block BM x BN x BK=8, warp 32x64, thread 8x8.
//   dense_fwd_<act>_128x128: 256 threads, for problems with at least one full wave of tiles
//   dense_fwd_<act>_64x64:    64 threads, for narrow layers / small batches
// Launch: grid (ceil(M / BM), ceil(N / BN)), block THREADS, no dynamic shared memory.
// M is on grid.x, whose limit (2^31 - 1) any batch fits. Each block reads a BM x K slab
// of x, a K x BN slab of W and BN biases, and writes its BM x BN tile of y (and z).
// The epilogue adds the bias and applies the activation in registers, so y costs one
// write instead of cuBLAS's write + read + write for a separate bias/activation pass.
#include "gemm_tile.cuh"

namespace gpubp {

template <int ACT, int BM, int BN>
__device__ __forceinline__ void dense_forward(const float* __restrict__ x, const float* __restrict__ w,
                                              const float* __restrict__ b, float* __restrict__ y,
                                              float* __restrict__ z, int M_, int N_, int K_) {
    const long long M = M_, N = N_, K = K_;
    const long long m0 = static_cast<long long>(blockIdx.x) * BM;
    const long long n0 = static_cast<long long>(blockIdx.y) * BN;

    float acc[THREAD_M][THREAD_N];
    float unused_colsum[THREAD_N];
    gemm_mainloop<BM, BN, false>(KMajor{x, K}, OuterMajor{w, N}, M, N, 0, K, m0, n0, acc,
                                 unused_colsum, false);

    const ThreadTile tt = ThreadTile::of<BM, BN>(threadIdx.x);
    const bool vec = N % 4 == 0 && aligned16(y) && (!act_needs_z<ACT>() || aligned16(z));
#pragma unroll
    for (int jg = 0; jg < THREAD_N; jg += 4) {
        const long long col = n0 + tt.col(jg);
        const long long valid_cols = N - col;  // columns col .. col+3 that exist
        if (valid_cols <= 0) continue;
        float bias[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) bias[j] = j < valid_cols ? b[col + j] : 0.0f;
#pragma unroll
        for (int i = 0; i < THREAD_M; ++i) {
            const long long row = m0 + tt.row(i);
            if (row >= M) continue;
            float zv[4], yv[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                zv[j] = acc[i][jg + j] + bias[j];
                yv[j] = act_forward<ACT>(zv[j]);
            }
            store4(y, row * N + col, yv, valid_cols, vec);
            if constexpr (act_needs_z<ACT>()) store4(z, row * N + col, zv, valid_cols, vec);
        }
    }
}

}  // namespace gpubp

#define GPUBP_DENSE_FWD_ENTRY(NAME, ID, BM, BN)                                                    \
    extern "C" __global__ void __launch_bounds__(gpubp::TileShape<BM, BN>::THREADS,              \
                                               gpubp::TileShape<BM, BN>::MIN_BLOCKS)\
        dense_fwd_##NAME##_##BM##x##BN(const float* __restrict__ x, const float* __restrict__ w,    \
                                       const float* __restrict__ b, float* __restrict__ y,          \
                                       float* __restrict__ z, int M, int N, int K) {               \
        gpubp::dense_forward<ID, BM, BN>(x, w, b, y, z, M, N, K);                                  \
    }
#define GPUBP_DENSE_FWD_ENTRIES(NAME, ID)        \
    GPUBP_DENSE_FWD_ENTRY(NAME, ID, 128, 128)    \
    GPUBP_DENSE_FWD_ENTRY(NAME, ID, 64, 64)

GPUBP_FOR_EACH_ACTIVATION(GPUBP_DENSE_FWD_ENTRIES)
