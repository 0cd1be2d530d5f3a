// Dropout masks (kernels/philox.cuh) applied on their own, never stored; fp32.
//
//   dropout_mask        dst = src * scale where the mask of `key` keeps the element, else 0
//                       (dst may be src): a Dropout standing first (on the model's input) or
//                       above another Dropout, its backward on the gradient, and the mask of a
//                       softmax output layer (applied after the softmax).
//   philox_words        out[4 i + j] = word j of Philox4x32-10 at counter[i] (4 words) and `key`:
//                       the known-answer and cross-implementation tests' window on philox.cuh.
//
// A Dropout right above a Dense runs inside the Dense kernels instead: the forward epilogue
// applies the mask (dense_fwd_*_dropout), and the pass forming dz regenerates it
// (dense_dz_dropout_*, dense_dz_db_dropout_*), so no pass here touches that layer's output.
//
// Launch and memory: dropout.cuh (one thread per row and group of four columns, grid-stride,
// float4 where the width and the operands allow); philox_words one thread per counter.
#include "dropout.cuh"

extern "C" __global__ void __launch_bounds__(gpubp::DROPOUT_THREADS)
    dropout_mask(const float* src, float* dst, long long rows, long long cols, const unsigned int* __restrict__ key,
                 unsigned int threshold, float scale, long long first_row) {
    // src and dst may alias (in place), so neither is __restrict__; each group is read before it is written.
    if (!gpubp::owns_a_group(rows, cols)) return;
    const gpubp::DropoutMask mask = gpubp::DropoutMask::read(key, threshold, scale, first_row);
    const bool vec = cols % 4 == 0 && gpubp::dropout_aligned16(src) && gpubp::dropout_aligned16(dst);
    gpubp::for_each_group(rows, cols, mask, [&](long long base, int count, const gpubp::PhiloxWords& words) {
        float v[4];
        gpubp::load_group(src, base, count, vec, v);
#pragma unroll
        for (int e = 0; e < 4; ++e) v[e] = mask.apply(v[e], words.w[e]);
        gpubp::store_group(dst, base, count, vec, v);
    });
}

extern "C" __global__ void __launch_bounds__(gpubp::DROPOUT_THREADS)
    philox_words(const unsigned int* __restrict__ counters, const unsigned int* __restrict__ key,
                 unsigned int* __restrict__ out, long long n) {
    const long long first = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (first >= n) return;
    const unsigned int k0 = key[0], k1 = key[1];  // once a thread, not once a counter
    for (long long i = first; i < n;
         i += static_cast<long long>(gridDim.x) * blockDim.x) {
        const unsigned int* c = counters + 4 * i;
        const gpubp::PhiloxWords words = gpubp::philox4x32_10(c[0], c[1], c[2], c[3], k0, k1);
#pragma unroll
        for (int j = 0; j < 4; ++j) out[4 * i + j] = words.w[j];
    }
}
