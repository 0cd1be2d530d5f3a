// Deterministic sums for the loss kernels and sumsq: a block-wide tree sum, and a
// grid-wide finish in which the last block to arrive adds every block's partial.
//
// The order of every addition depends only on the launch shape (threads per block,
// blocks), never on timing, so a loss is bitwise reproducible run to run; atomicAdd
// on a float would not be. Launch contract: blockDim.x == REDUCE_THREADS; `partials`
// holds gridDim.x floats (the host caps the grid at its buffer, MAX_REDUCE_BLOCKS);
// `ticket` is one unsigned int that is 0 before the launch (the host zeroes it once,
// the last block resets it).
// Memory: each block writes one partial; the last block reads gridDim.x partials.
#pragma once

namespace gpubp {

constexpr int REDUCE_THREADS = 256;
constexpr unsigned int FULL_WARP = 0xffffffffu;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(FULL_WARP, v, offset);
    return v;
}

// Sum of v over the block (blockDim.x == REDUCE_THREADS); the result is valid in thread 0.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float warp_totals[REDUCE_THREADS / 32];
    v = warp_sum(v);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) warp_totals[warp] = v;
    __syncthreads();
    v = lane < REDUCE_THREADS / 32 ? warp_totals[lane] : 0.0f;
    if (warp == 0) v = warp_sum(v);
    __syncthreads();  // warp_totals may be reused by a following block_sum
    return v;
}

// Each thread passes its own running total; *out = scale * (sum over the whole grid).
__device__ __forceinline__ void grid_sum_to(float thread_total, float* __restrict__ partials,
                                            unsigned int* __restrict__ ticket, float* __restrict__ out,
                                            float scale) {
    __shared__ bool is_last;
    const float block_total = block_sum(thread_total);
    if (threadIdx.x == 0) {
        partials[blockIdx.x] = block_total;
        __threadfence();  // the partial is visible device-wide before the ticket is taken
        is_last = atomicAdd(ticket, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    float v = 0.0f;
    for (unsigned int i = threadIdx.x; i < gridDim.x; i += REDUCE_THREADS) v += __ldcg(partials + i);
    v = block_sum(v);
    if (threadIdx.x == 0) {
        *out = v * scale;
        *ticket = 0u;
    }
}

}  // namespace gpubp
