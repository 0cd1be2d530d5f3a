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
// two words read by every thread (a broadcast). Shapes need not be multiples of 4: the last
// group of a row stops at its width. Indices are 64-bit (rows * cols may exceed 2^31).
#include "activations.cuh"
#include "philox.cuh"

namespace gpubp {

constexpr int DROPOUT_THREADS = 256;

__device__ __forceinline__ float kept(float value, unsigned int word, unsigned int threshold, float scale) {
    return word >= threshold ? value * scale : 0.0f;
}

// Calls body(i, word) for every element i = row * cols + col this thread owns, with its mask word;
// the rows' counters start at first_row.
template <class Body>
__device__ __forceinline__ void for_each_masked(long long rows, long long cols, const unsigned int* __restrict__ key,
                                                long long first_row, Body body) {
    constexpr int G = PhiloxConst::COLUMNS_PER_CALL;
    const long long groups = (cols + G - 1) / G;
    for (long long g = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; g < rows * groups;
         g += static_cast<long long>(gridDim.x) * blockDim.x) {
        const long long row = g / groups, col = (g % groups) * G;
        const PhiloxWords words = dropout_words(key, first_row + row, col);
#pragma unroll
        for (int e = 0; e < G; ++e) {
            if (col + e < cols) body(row * cols + col + e, words.w[e]);
        }
    }
}

template <int ACT>
__device__ __forceinline__ void dropout_dz(const float* __restrict__ dy, const float* __restrict__ act_in,
                                           float* __restrict__ dz, long long rows, long long cols,
                                           const unsigned int* __restrict__ key, unsigned int threshold, float scale,
                                           long long first_row, float keep_prob) {
    for_each_masked(rows, cols, key, first_row, [&](long long i, unsigned int word) {
        float grad = 1.0f;
        if constexpr (ACT != ACT_IDENTITY) {
            const float a = act_in[i];
            grad = act_needs_z<ACT>() ? act_grad<ACT>(0.0f, a) : act_grad<ACT>(a * keep_prob, 0.0f);
        }
        dz[i] = kept(dy[i], word, threshold, scale) * grad;
    });
}

}  // namespace gpubp

extern "C" __global__ void __launch_bounds__(gpubp::DROPOUT_THREADS)
    dropout_mask(const float* src, float* dst, long long rows, long long cols, const unsigned int* __restrict__ key,
                 unsigned int threshold, float scale, long long first_row) {
    // src and dst may alias (in place), so neither is __restrict__.
    gpubp::for_each_masked(rows, cols, key, first_row, [&](long long i, unsigned int word) {
        dst[i] = gpubp::kept(src[i], word, threshold, scale);
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
