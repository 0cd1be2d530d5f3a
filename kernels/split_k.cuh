// The deterministic split-K finish of the dW kernels (dense_backward.cu, dense_backward_tf32.cu,
// and fused_mlp.cu's, which splits over blockIdx.y, has its own workspace layout and does not
// use dense_dw_split_k_finish):
// dW = x^T @ dz over a batch split into `splits` chunks, summed without float atomics.
//
// Contract: gridDim.z = splits blocks share each output tile; split s (blockIdx.z) covers batch
// rows [s k_chunk, min(B, (s+1) k_chunk)) and writes its partial dW tile to ws + s M N (same
// offsets as in dW) and, in m-tile 0, its partial db to ws_db + s N. Each block then takes a
// ticket for its tile; the last block to arrive sums the partials in split order 0, 1, ... and
// writes dW (and db), so the order of every addition depends on `splits` only and the result
// is bitwise the same from run to run, unlike split-K by atomicAdd. tickets holds one unsigned
// int per tile (gridDim.x x gridDim.y), 0 before the launch: the host zeroes it once and the
// last block resets its tile's ticket.
// Memory: the last block of a tile reads splits x its tile of ws (and of ws_db in m-tile 0).
#pragma once

namespace gpubp {

// Publishes the partial this block has written and takes the tile's ticket. True, in every
// thread of the block, for the block that arrives last: every split's partial is then visible.
// The release is a grid barrier's (cooperative groups' grid sync, reduce.cuh's grid_sum_to): the
// block's barrier first, so thread 0 has seen every thread's stores at CTA scope, then thread 0's
// fence, cumulative over them, before its ticket: one fence a block. (A fence in each thread
// before the barrier left each writer's release unordered, in the PTX memory model, before
// another thread's ticket.) The last block's threads fence after the barrier, as grid_sum_to's
// do, before they read the other blocks' partials (__ldcg).
__device__ __forceinline__ bool split_k_arrived_last(unsigned int* __restrict__ ticket, int splits) {
    __shared__ bool is_last;
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        is_last = atomicAdd(ticket, 1u) == static_cast<unsigned int>(splits - 1);
    }
    __syncthreads();
    if (is_last) __threadfence();
    return is_last;
}

// out[r ld + c] = sum over s = 0, 1, ..., splits - 1 of ws[s split_stride + r ld + c], for r in
// [row0, row0 + rows) and c in [col0, col0 + cols); the block's threads share the elements.
__device__ __forceinline__ void split_k_sum(const float* __restrict__ ws, long long split_stride, int splits,
                                            float* __restrict__ out, long long ld, long long row0, int rows,
                                            long long col0, int cols) {
    for (int e = threadIdx.x; e < rows * cols; e += static_cast<int>(blockDim.x)) {
        const long long idx = (row0 + e / cols) * ld + col0 + e % cols;
        float sum = 0.0f;
        for (int s = 0; s < splits; ++s) sum += __ldcg(ws + s * split_stride + idx);
        out[idx] = sum;
    }
}

// The last block, once it has written its sums: the tile's ticket is 0 again for the next launch.
__device__ __forceinline__ void split_k_reset(unsigned int* ticket) {
    if (threadIdx.x == 0) *ticket = 0u;
}

// The batch rows [begin, end) that split `split` of a dW launch covers.
struct SplitRows {
    long long begin, end;
    __device__ __forceinline__ static SplitRows of(long long K, int k_chunk, unsigned int split) {
        const long long begin = static_cast<long long>(split) * k_chunk;
        return {begin, begin + k_chunk < K ? begin + k_chunk : K};
    }
};

// Where split `split` writes its part of `out` (dW, or db): `out` itself when there is one
// split, else its partial in ws, which holds `splits` partials `size` floats apart.
__device__ __forceinline__ float* split_k_partial(float* out, float* ws, long long size, int splits,
                                                  unsigned int split) {
    return splits == 1 ? out : ws + static_cast<long long>(split) * size;
}

// The split-K finish of a BM x BN tile at (m0, n0) of the (M, N) dW, after its partials are in
// ws and ws_db; with splits == 1 the kernel wrote dW and db directly and does not call it.
__device__ __forceinline__ void dense_dw_split_k_finish(const float* __restrict__ ws, const float* __restrict__ ws_db,
                                                        unsigned int* __restrict__ tickets, float* __restrict__ dw,
                                                        float* __restrict__ db, long long M, long long N,
                                                        long long m0, long long n0, int BM, int BN, int splits) {
    unsigned int* ticket = tickets + blockIdx.y * gridDim.x + blockIdx.x;
    if (!split_k_arrived_last(ticket, splits)) return;
    const int rows = static_cast<int>(M - m0 < BM ? M - m0 : BM);
    const int cols = static_cast<int>(N - n0 < BN ? N - n0 : BN);
    split_k_sum(ws, M * N, splits, dw, N, m0, rows, n0, cols);
    if (blockIdx.x == 0) split_k_sum(ws_db, N, splits, db, N, 0, 1, n0, cols);
    split_k_reset(ticket);
}

}  // namespace gpubp
