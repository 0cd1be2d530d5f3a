// Fused dense-layer forward on TF32 tensor cores:  z = x @ W + b,  y = act(z).
//
// Same contract and layout as dense_forward.cu (x (M, K), W (K, N), b (N,), y and z (M, N),
// row-major and C-contiguous; z written only for gelu and gelu_tanh), with the products on
// TF32 tensor cores and fp32 accumulation: gemm_tf32.cuh (tiles, error bound). The epilogue
// adds the bias and applies the activation in registers, as the fp32 kernel does.
// Launch: dense_fwd_tf32_<act>, grid (ceil(M / 64), ceil(N / 64)), block 128, no dynamic
// shared memory. M is on grid.x, whose limit any batch fits.
#include "gemm_tf32.cuh"

namespace gpubp {

template <int ACT>
__device__ __forceinline__ void dense_forward_tf32(const float* __restrict__ x, const float* __restrict__ w,
                                                   const float* __restrict__ b, float* __restrict__ y,
                                                   float* __restrict__ z, int M_, int N_, int K_) {
    const long long M = M_, N = N_, K = K_;
    const long long m0 = static_cast<long long>(blockIdx.x) * Tf32Tile::BM;
    const long long n0 = static_cast<long long>(blockIdx.y) * Tf32Tile::BN;
    Tf32Fragment frag;
    float unused_colsum;
    tf32_mainloop<false>(KMajor{x, K}, OuterMajor{w, N}, M, N, 0, K, m0, n0, frag, unused_colsum);
    tf32_for_each_output(frag, m0, n0, M, N, [&](long long row, long long col, float acc) {
        const float zv = acc + b[col];
        y[row * N + col] = act_forward<ACT>(zv);
        if constexpr (act_needs_z<ACT>()) z[row * N + col] = zv;
    });
}

}  // namespace gpubp

#define GPUBP_DENSE_FWD_TF32_ENTRY(NAME, ID)                                                                \
    extern "C" __global__ void __launch_bounds__(gpubp::Tf32Tile::THREADS)                                \
        dense_fwd_tf32_##NAME(const float* __restrict__ x, const float* __restrict__ w,                      \
                              const float* __restrict__ b, float* __restrict__ y, float* __restrict__ z,     \
                              int M, int N, int K) {                                                         \
        gpubp::dense_forward_tf32<ID>(x, w, b, y, z, M, N, K);                                              \
    }

GPUBP_FOR_EACH_ACTIVATION(GPUBP_DENSE_FWD_TF32_ENTRY)
