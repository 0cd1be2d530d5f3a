// Fused dense-layer forward on TF32 or bf16 tensor cores:  z = x @ W + b,  y = act(z).
//
// Same contract and layout as dense_forward.cu (x (M, K), W (K, N), b (N,), y and z (M, N),
// row-major; z written only for gelu, gelu_tanh and silu), with the products on TF32 tensor cores and
// fp32 accumulation: gemm_tf32.cuh (tiles, pipeline, error bound), A = x k-contiguous (ldmatrix),
// B = W outer-contiguous. The epilogue adds the bias and applies the activation, fixed at compile
// time, to the accumulators in registers, outside the k loop; y and z are stored two columns per
// store where the rows allow.
// Launch: dense_fwd_tf32_<act>, grid (ceil(M / 128), ceil(N / 128)), block 256, dynamic shared
// memory Tf32Gemm<true, false>::smem_bytes (101 376 bytes). M is on grid.x, whose limit any batch
// fits. Occupancy on sm_90: 1 block (8 warps) per SM, by its 206 registers (208 with dropout).
// dense_fwd_bf16_<act>: the same launch and shared bytes, on x (M, padded K) and W (padded K,
// padded N) rounded by round_bf16 (below; padded: MmaTile::padded, zeros past K and N).
//
// Dropout (dense_fwd_{tf32,bf16}_<act>_dropout): a Dropout above the layer, applied in the same
// epilogue after the activation: y = act(z) * scale where the Philox mask keeps the element, else 0
// (dropout.cuh; z stays unmasked). A pair's two columns (col even) are words col % 4 and the next
// of the call for the group col / 4; the variant is a template argument, so the kernels without
// it are unchanged. Extra arguments: key (two words in device memory), threshold, scale, first_row.
#include "dropout.cuh"
#include "gemm_tf32.cuh"
#include "one_kernel.cuh"

namespace gpubp {

// E: float (tf32 products) or bf16_bits (x (M, padded K) and W (padded K, padded N) from round_bf16).
template <class E, int ACT, bool DROPOUT>
__device__ __forceinline__ void dense_forward_mma(const E* __restrict__ x, const E* __restrict__ w,
                                                  const float* __restrict__ b, float* __restrict__ y,
                                                  float* __restrict__ z, int M_, int N_, int K_, DropoutMask mask) {
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

#define GPUBP_DENSE_FWD_MMA_ENTRY(PREC, E, TILE, NAME, ID)                                                 \
    extern "C" __global__ void __launch_bounds__(gpubp::TILE::THREADS, gpubp::TILE::MIN_BLOCKS)            \
        dense_fwd_##PREC##_##NAME(const E* __restrict__ x, const E* __restrict__ w,                          \
                                  const float* __restrict__ b, float* __restrict__ y, float* __restrict__ z, \
                                  int M, int N, int K) {                                                     \
        GPUBP_ONLY_KERNEL_GUARD(dense_fwd_##PREC##_##NAME)                                                   \
        gpubp::dense_forward_mma<E, ID, false>(x, w, b, y, z, M, N, K, gpubp::DropoutMask{});               \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(gpubp::TILE::THREADS, gpubp::TILE::MIN_BLOCKS)            \
        dense_fwd_##PREC##_##NAME##_dropout(const E* __restrict__ x, const E* __restrict__ w,                \
                                            const float* __restrict__ b, float* __restrict__ y,              \
                                            float* __restrict__ z, int M, int N, int K,                      \
                                            const unsigned int* __restrict__ key, unsigned int threshold,    \
                                            float scale, long long first_row) {                              \
        GPUBP_ONLY_KERNEL_GUARD(dense_fwd_##PREC##_##NAME##_dropout)                                         \
        const gpubp::DropoutMask mask = gpubp::DropoutMask::read(key, threshold, scale, first_row);          \
        gpubp::dense_forward_mma<E, ID, true>(x, w, b, y, z, M, N, K, mask);                                 \
    }

#define GPUBP_DENSE_FWD_TF32_ENTRY(NAME, ID)                   \
    GPUBP_DENSE_FWD_MMA_ENTRY(tf32, float, Tf32Tile, NAME, ID) \
    GPUBP_DENSE_FWD_MMA_ENTRY(bf16, gpubp::bf16_bits, Bf16Tile, NAME, ID)

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
