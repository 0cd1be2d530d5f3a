// Fused dense-layer forward on TF32 or bf16 tensor cores:  z = x @ W + b,  y = act(z).
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
// dense_fwd_bf16_<act>: the same launch and shared bytes, on x (M, padded K) and W (padded K,
// padded N) rounded by round_bf16 (below; padded: MmaTile::padded, zeros past K and N).
#include "gemm_tf32.cuh"

namespace gpubp {

// E: float (tf32 products) or bf16_bits (x (M, padded K) and W (padded K, padded N) from round_bf16).
template <class E, int ACT>
__device__ __forceinline__ void dense_forward_mma(const E* __restrict__ x, const E* __restrict__ w,
                                                  const float* __restrict__ b, float* __restrict__ y,
                                                  float* __restrict__ z, int M_, int N_, int K_) {
    using T = MmaTile<E>;
    extern __shared__ __align__(16) float smem[];
    const long long M = M_, N = N_, K = T::padded(K_), ldw = T::padded(N_);
    const long long m0 = static_cast<long long>(blockIdx.x) * T::BM;
    const long long n0 = static_cast<long long>(blockIdx.y) * T::BN;
    Tf32Fragment frag;
    mma_gemm(Operand<true, E>{x, K, M}, Operand<false, E>{w, ldw, ldw}, 0, K, m0, n0, smem, frag);
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
        gpubp::dense_forward_mma<float, ID>(x, w, b, y, z, M, N, K);                                        \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(gpubp::Bf16Tile::THREADS, gpubp::Bf16Tile::MIN_BLOCKS)   \
        dense_fwd_bf16_##NAME(const gpubp::bf16_bits* __restrict__ x, const gpubp::bf16_bits* __restrict__ w, \
                              const float* __restrict__ b, float* __restrict__ y, float* __restrict__ z,     \
                              int M, int N, int K) {                                                         \
        gpubp::dense_forward_mma<gpubp::bf16_bits, ID>(x, w, b, y, z, M, N, K);                              \
    }

GPUBP_FOR_EACH_ACTIVATION(GPUBP_DENSE_FWD_TF32_ENTRY)

// round_bf16: the bf16 operands of the _bf16 GEMMs, formed once per operand and launch:
// dst (dst_rows, ld) = src (rows, cols) rounded to bf16 (round to nearest even, cvt.rn), zero in
// the padding (columns cols..ld, rows rows..dst_rows); ld = Bf16Tile::padded(cols) (even), so every
// row of dst starts on a 32-byte sector and the GEMMs' cp.async copy whole chunks. Each thread
// reads two columns (one 8-byte load where src's rows allow it: src_ld even, src 8-byte aligned;
// else two 4-byte loads, for a view at any offset) and writes them as one 32-bit store.
// Launch: grid (ceil(ld / 2 / 256), min(dst_rows, 65535)), block 256; blocks step down the rows
// by gridDim.y. Reads the source once, writes the bf16 copy once.
extern "C" __global__ void __launch_bounds__(256)
    round_bf16(const float* __restrict__ src, long long src_ld, gpubp::bf16_bits* __restrict__ dst, long long rows,
               long long cols, long long dst_rows, long long ld) {
    const long long c = 2 * (static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x);
    if (c >= ld) return;
    unsigned int* out = reinterpret_cast<unsigned int*>(dst);
    const bool pairs = src_ld % 2 == 0 && (reinterpret_cast<unsigned long long>(src) & 7ull) == 0;  // uniform
    for (long long r = blockIdx.y; r < dst_rows; r += gridDim.y) {
        float lo = 0.0f, hi = 0.0f;
        if (pairs && r < rows && c + 1 < cols) {
            const float2 v = *reinterpret_cast<const float2*>(src + r * src_ld + c);
            lo = v.x;
            hi = v.y;
        } else {
            lo = r < rows && c < cols ? src[r * src_ld + c] : 0.0f;
            hi = r < rows && c + 1 < cols ? src[r * src_ld + c + 1] : 0.0f;
        }
        out[(r * ld + c) / 2] = gpubp::pack_bf16x2(lo, hi);
    }
}
