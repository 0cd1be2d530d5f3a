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
//
// Dropout (dense_fwd_tf32_<act>_dropout): a Dropout above the layer, applied in the same epilogue
// after the activation: y = act(z) * scale where the Philox mask keeps the element, else 0
// (dropout.cuh; z stays unmasked). A pair's two columns (col even) are words col % 4 and the next
// of the call for the group col / 4; the variant is a template argument, so the kernels without
// it are unchanged. Extra arguments: key (two words in device memory), threshold, scale, first_row.
#include "dropout.cuh"
#include "gemm_tf32.cuh"

namespace gpubp {

template <int ACT, bool DROPOUT>
__device__ __forceinline__ void dense_forward_tf32(const float* __restrict__ x, const float* __restrict__ w,
                                                   const float* __restrict__ b, float* __restrict__ y,
                                                   float* __restrict__ z, int M_, int N_, int K_, DropoutMask mask) {
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
        float y0 = act_forward<ACT>(z0), y1 = act_forward<ACT>(z1);
        if constexpr (DROPOUT) {
            const PhiloxWords words = mask.words(row, col & ~3ll);
            const bool upper = (col & 2) != 0;  // columns 2, 3 of the group
            y0 = mask.apply(y0, upper ? words.w[2] : words.w[0]);
            y1 = mask.apply(y1, upper ? words.w[3] : words.w[1]);
        }
        store_pair(y, row * N + col, y0, y1, pair, vector);
        if constexpr (act_needs_z<ACT>()) store_pair(z, row * N + col, z0, z1, pair, vector);
    });
}

}  // namespace gpubp

#define GPUBP_DENSE_FWD_TF32_ENTRY(NAME, ID)                                                                \
    extern "C" __global__ void __launch_bounds__(gpubp::Tf32Tile::THREADS, gpubp::Tf32Tile::MIN_BLOCKS)   \
        dense_fwd_tf32_##NAME(const float* __restrict__ x, const float* __restrict__ w,                      \
                              const float* __restrict__ b, float* __restrict__ y, float* __restrict__ z,     \
                              int M, int N, int K) {                                                         \
        gpubp::dense_forward_tf32<ID, false>(x, w, b, y, z, M, N, K, gpubp::DropoutMask{});                 \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(gpubp::Tf32Tile::THREADS, gpubp::Tf32Tile::MIN_BLOCKS)   \
        dense_fwd_tf32_##NAME##_dropout(const float* __restrict__ x, const float* __restrict__ w,            \
                                        const float* __restrict__ b, float* __restrict__ y,                  \
                                        float* __restrict__ z, int M, int N, int K,                          \
                                        const unsigned int* __restrict__ key, unsigned int threshold,        \
                                        float scale, long long first_row) {                                  \
        gpubp::dense_forward_tf32<ID, true>(x, w, b, y, z, M, N, K,                                          \
                                            gpubp::DropoutMask{key, threshold, scale, first_row});           \
    }

GPUBP_FOR_EACH_ACTIVATION(GPUBP_DENSE_FWD_TF32_ENTRY)
