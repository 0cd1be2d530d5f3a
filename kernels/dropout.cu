// Dropout masks (kernels/philox.cuh), applied and regenerated, never stored; fp32.
//
//   dropout_mask        dst = src * scale where the mask of `key` keeps the element, else 0
//                       (dst may be src): a Dropout's forward on the Dense output in place,
//                       a Dropout standing first, and, on the gradient, its backward.
//   philox_words        out[4 i + j] = word j of Philox4x32-10 at counter[i] (4 words) and `key`:
//                       the known-answer and cross-implementation tests' window on philox.cuh.
//   dropout_dz_<act>    dz = dy * scale * act'(y * keep_prob, or z) where the mask kept, else 0:
//                       the gradient of a Dense output that the forward masked, the mask
//                       regenerated from `key`. y is the masked output, so y * keep_prob is the
//                       activation's own output where the element was kept (keep_prob = 1 - rate);
//                       gelu and gelu_tanh read z, which the forward stores unmasked.
//
// This round they run as their own elementwise passes around the Dense GEMM kernels (forward:
// after dense_fwd; backward: before dense_dw/dense_dx, which then run as identity layers on dz).
// Applying the mask in the GEMM kernels' epilogue and prologue is pending their rewrite.
//
// Launch: DROPOUT_THREADS threads per block, one thread per row and group of four columns
// (rows * ceil(cols / 4) work items), grid-stride, so one Philox call serves four elements.
// Memory: each element of the inputs is read once and of the output written once; the key is
// two words read by every thread (a broadcast). When cols is a multiple of 4 and every operand
// 16-byte aligned, a group is one float4 load or store per operand, so a warp's accesses are 512
// contiguous bytes; otherwise (the row's last group stopping at its width, or an operand view
// that starts off a 16-byte boundary) each element is a guarded scalar access. Indices are
// 64-bit (rows * cols may exceed 2^31).
#include "activations.cuh"
#include "philox.cuh"

namespace gpubp {

constexpr int DROPOUT_THREADS = 256;

__device__ __forceinline__ bool dropout_aligned16(const float* p) {
    return (reinterpret_cast<unsigned long long>(p) & 15u) == 0;
}

__device__ __forceinline__ float kept(float value, unsigned int word, unsigned int threshold, float scale) {
    return word >= threshold ? value * scale : 0.0f;
}

// The `count` (1..4) elements of a group from p + base: one float4 when `vec`, else scalars.
__device__ __forceinline__ void load_group(const float* p, long long base, int count, bool vec, float (&v)[4]) {
    if (vec) {
        const float4 a = *reinterpret_cast<const float4*>(p + base);
        v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
    } else {
#pragma unroll
        for (int e = 0; e < 4; ++e) v[e] = e < count ? p[base + e] : 0.0f;
    }
}

__device__ __forceinline__ void store_group(float* p, long long base, int count, bool vec, const float (&v)[4]) {
    if (vec) {
        *reinterpret_cast<float4*>(p + base) = make_float4(v[0], v[1], v[2], v[3]);
    } else {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            if (e < count) p[base + e] = v[e];
        }
    }
}

// Calls body(base, count, words) for every group this thread owns: its first element
// base = row * cols + col, how many of its four columns lie inside the row, and its mask words
// (the rows' counters start at first_row).
template <class Body>
__device__ __forceinline__ void for_each_group(long long rows, long long cols, const unsigned int* __restrict__ key,
                                               long long first_row, Body body) {
    constexpr int G = PhiloxConst::COLUMNS_PER_CALL;
    const long long groups = (cols + G - 1) / G;
    for (long long g = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; g < rows * groups;
         g += static_cast<long long>(gridDim.x) * blockDim.x) {
        const long long row = g / groups, col = (g % groups) * G;
        const long long left = cols - col;
        body(row * cols + col, left < G ? static_cast<int>(left) : G, dropout_words(key, first_row + row, col));
    }
}

template <int ACT>
__device__ __forceinline__ void dropout_dz(const float* __restrict__ dy, const float* __restrict__ act_in,
                                           float* __restrict__ dz, long long rows, long long cols,
                                           const unsigned int* __restrict__ key, unsigned int threshold, float scale,
                                           long long first_row, float keep_prob) {
    const bool vec = cols % 4 == 0 && dropout_aligned16(dy) && dropout_aligned16(act_in) && dropout_aligned16(dz);
    for_each_group(rows, cols, key, first_row, [&](long long base, int count, const PhiloxWords& words) {
        float g[4], a[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        load_group(dy, base, count, vec, g);
        if constexpr (ACT != ACT_IDENTITY) load_group(act_in, base, count, vec, a);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            float grad = 1.0f;
            if constexpr (ACT != ACT_IDENTITY) {
                grad = act_needs_z<ACT>() ? act_grad<ACT>(0.0f, a[e]) : act_grad<ACT>(a[e] * keep_prob, 0.0f);
            }
            g[e] = kept(g[e], words.w[e], threshold, scale) * grad;
        }
        store_group(dz, base, count, vec, g);
    });
}

}  // namespace gpubp

extern "C" __global__ void __launch_bounds__(gpubp::DROPOUT_THREADS)
    dropout_mask(const float* src, float* dst, long long rows, long long cols, const unsigned int* __restrict__ key,
                 unsigned int threshold, float scale, long long first_row) {
    // src and dst may alias (in place), so neither is __restrict__; each group is read before it is written.
    const bool vec = cols % 4 == 0 && gpubp::dropout_aligned16(src) && gpubp::dropout_aligned16(dst);
    gpubp::for_each_group(rows, cols, key, first_row, [&](long long base, int count, const gpubp::PhiloxWords& words) {
        float v[4];
        gpubp::load_group(src, base, count, vec, v);
#pragma unroll
        for (int e = 0; e < 4; ++e) v[e] = gpubp::kept(v[e], words.w[e], threshold, scale);
        gpubp::store_group(dst, base, count, vec, v);
    });
}

extern "C" __global__ void __launch_bounds__(gpubp::DROPOUT_THREADS)
    philox_words(const unsigned int* __restrict__ counters, const unsigned int* __restrict__ key,
                 unsigned int* __restrict__ out, long long n) {
    for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += static_cast<long long>(gridDim.x) * blockDim.x) {
        const unsigned int* c = counters + 4 * i;
        const gpubp::PhiloxWords words = gpubp::philox4x32_10(c[0], c[1], c[2], c[3], key[0], key[1]);
#pragma unroll
        for (int j = 0; j < 4; ++j) out[4 * i + j] = words.w[j];
    }
}

#define GPUBP_DROPOUT_DZ(name, id)                                                                              \
    extern "C" __global__ void __launch_bounds__(gpubp::DROPOUT_THREADS)                                        \
        dropout_dz_##name(const float* __restrict__ dy, const float* __restrict__ act_in, float* __restrict__ dz, \
                          long long rows, long long cols, const unsigned int* __restrict__ key,                 \
                          unsigned int threshold, float scale, long long first_row, float keep_prob) {          \
        gpubp::dropout_dz<id>(dy, act_in, dz, rows, cols, key, threshold, scale, first_row, keep_prob);         \
    }
GPUBP_FOR_EACH_ACTIVATION(GPUBP_DROPOUT_DZ)
#undef GPUBP_DROPOUT_DZ
