// Applying a dropout mask (philox.cuh) inside a kernel: the mask's arguments, the elementwise
// pass's groups of four columns, and an element of a Dense layer's masked dz. The Dense kernels'
// dropout variants (dense_forward.cu, dense_forward_tf32.cu: the epilogue; dense_backward.cu,
// dense_backward_tf32.cu: the dz pass) and dropout.cu's own passes share it.
//
// Device code only: the same text compiles under nvcc and NVRTC.
#pragma once

#include "activations.cuh"
#include "philox.cuh"

namespace gpubp {

// A dropout mask, as gpubp.philox.Mask gives it to a kernel: the key (k0, k1), keep where the
// word >= `threshold`, kept elements times `scale`, the array's rows counted from `first_row`.
struct DropoutMask {
    unsigned int k0, k1;
    unsigned int threshold;
    float scale;
    long long first_row;

    // The key comes as two words in device memory, so that a replayed CUDA graph reads each step's
    // new key. A thread reads them once, here, at the kernel's start: read at every words() call,
    // they were a warp-uniform 4-byte load per group of four columns (one 32-byte sector each).
    __device__ static DropoutMask read(const unsigned int* __restrict__ key, unsigned int threshold, float scale,
                                       long long first_row) {
        return DropoutMask{key[0], key[1], threshold, scale, first_row};
    }

    // The mask words of the array's row `row` and columns col .. col + 3 (col a multiple of 4).
    __device__ __forceinline__ PhiloxWords words(long long row, long long col) const {
        return dropout_words(k0, k1, first_row + row, col);
    }
    // v * scale where `word` keeps the element, else 0.
    __device__ __forceinline__ float apply(float v, unsigned int word) const {
        return word >= threshold ? v * scale : 0.0f;
    }
};

// The elementwise passes: DROPOUT_THREADS threads per block, one thread per row and group of
// four columns (rows * ceil(cols / 4) work items), grid-stride, so one Philox call serves four
// elements. When cols is a multiple of 4 and every operand 16-byte aligned, a group is one
// float4 load or store per operand, so a warp's accesses are 512 contiguous bytes; otherwise
// (the row's last group stopping at its width, or an operand view that starts off a 16-byte
// boundary) each element is a guarded scalar access. Indices are 64-bit.
constexpr int DROPOUT_THREADS = 256;

__device__ __forceinline__ bool dropout_aligned16(const float* p) {
    return (reinterpret_cast<unsigned long long>(p) & 15u) == 0;
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

// The groups of four columns of a rows x cols array, counted row by row, and the first one
// this thread owns; it owns every grid-size-th group after it. for_each_group and owns_a_group
// both read the mapping from these two.
__device__ __forceinline__ long long group_count(long long rows, long long cols) {
    constexpr int G = PhiloxConst::COLUMNS_PER_CALL;
    return rows * ((cols + G - 1) / G);
}
__device__ __forceinline__ long long first_group() {
    return static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
}

// Whether this thread owns any group of for_each_group: one that owns none returns before it
// reads the mask's key (a grid may hold more threads than a small array has groups).
__device__ __forceinline__ bool owns_a_group(long long rows, long long cols) {
    return first_group() < group_count(rows, cols);
}

// Calls body(base, count, words) for every group this thread owns: its first element
// base = row * cols + col, how many of its four columns lie inside the row, and its mask words.
template <class Body>
__device__ __forceinline__ void for_each_group(long long rows, long long cols, const DropoutMask& mask, Body body) {
    constexpr int G = PhiloxConst::COLUMNS_PER_CALL;
    const long long groups = (cols + G - 1) / G;
    const long long total = group_count(rows, cols), stride = static_cast<long long>(gridDim.x) * blockDim.x;
    for (long long g = first_group(); g < total; g += stride) {
        const long long row = g / groups, col = (g % groups) * G;
        const long long left = cols - col;
        body(row * cols + col, left < G ? static_cast<int>(left) : G, mask.words(row, col));
    }
}

// An element of a Dense layer's dropout dz pass (dense_backward.cu, dense_backward_tf32.cu):
// dz = dy * scale * act'(y * keep_prob, or z) where `word` keeps, else 0; act_in is the masked
// y (y * keep_prob is the activation's own output where kept), or z where act_needs_z, and
// unread for identity.
template <int ACT>
__device__ __forceinline__ float masked_dz(float dy, float act_in, unsigned int word, const DropoutMask& mask,
                                           float keep_prob) {
    const float kept = mask.apply(dy, word);
    if constexpr (ACT == ACT_IDENTITY) {
        return kept;
    } else {
        return act_needs_z<ACT>() ? act_backward<ACT>(kept, 0.0f, act_in)
                                  : act_backward<ACT>(kept, act_in * keep_prob, 0.0f);
    }
}

}  // namespace gpubp
