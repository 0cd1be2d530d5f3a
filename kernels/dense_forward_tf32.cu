// Fused dense-layer forward on TF32 tensor cores:  z = x @ W + b,  y = act(z).
//
// Same contract and layout as dense_forward.cu (x (M, K), W (K, N), b (N,), y and z (M, N),
// row-major; z written only for gelu and gelu_tanh), with the products on TF32 tensor cores and
// fp32 accumulation: gemm_tf32.cuh (tiles, pipeline, error bound), A = x k-contiguous (ldmatrix),
// B = W outer-contiguous. The epilogue adds the bias and applies the activation, fixed at compile
// time, to the accumulators in registers, outside the k loop; y and z are stored two columns per
// store where the rows allow.
// Launch: dense_fwd_tf32_<act>, grid (ceil(M / 128), ceil(N / 128)), block 256, dynamic shared
// memory Tf32Gemm<true, false>::smem_bytes (101 376 bytes). M is on grid.x, whose limit any batch
// fits. Occupancy on sm_90: 1 block (8 warps) per SM, by its 206 registers.
#include "gemm_tf32.cuh"

namespace gpubp {

template <int ACT>
__device__ __forceinline__ void dense_forward_tf32(const float* __restrict__ x, const float* __restrict__ w,
                                                   const float* __restrict__ b, float* __restrict__ y,
                                                   float* __restrict__ z, int M_, int N_, int K_) {
    extern __shared__ __align__(16) float smem[];
    const long long M = M_, N = N_, K = K_;
    const long long m0 = static_cast<long long>(blockIdx.x) * Tf32Tile::BM;
    const long long n0 = static_cast<long long>(blockIdx.y) * Tf32Tile::BN;
    Tf32Fragment frag;
    tf32_gemm(Operand<true>{x, K, M}, Operand<false>{w, N, N}, 0, K, m0, n0, smem, frag);
    // Pairs of columns go as 8-byte accesses where y, z (and b, read alike) allow.
    const bool vector = pairs_aligned(y, N) && (!act_needs_z<ACT>() || pairs_aligned(z, N)) && pairs_aligned(b, N);
    tf32_for_each_pair(frag, m0, n0, M, N, [&](long long row, long long col, float a0, float a1, bool pair) {
        const float2 bias = pair && vector ? *reinterpret_cast<const float2*>(b + col)
                                           : make_float2(b[col], pair ? b[col + 1] : 0.0f);
        const float z0 = a0 + bias.x, z1 = a1 + bias.y;
        store_pair(y, row * N + col, act_forward<ACT>(z0), act_forward<ACT>(z1), pair, vector);
        if constexpr (act_needs_z<ACT>()) store_pair(z, row * N + col, z0, z1, pair, vector);
    });
}

}  // namespace gpubp

#define GPUBP_DENSE_FWD_TF32_ENTRY(NAME, ID)                                                                \
    extern "C" __global__ void __launch_bounds__(gpubp::Tf32Tile::THREADS, gpubp::Tf32Tile::MIN_BLOCKS)   \
        dense_fwd_tf32_##NAME(const float* __restrict__ x, const float* __restrict__ w,                      \
                              const float* __restrict__ b, float* __restrict__ y, float* __restrict__ z,     \
                              int M, int N, int K) {                                                         \
        gpubp::dense_forward_tf32<ID>(x, w, b, y, z, M, N, K);                                              \
    }

GPUBP_FOR_EACH_ACTIVATION(GPUBP_DENSE_FWD_TF32_ENTRY)
