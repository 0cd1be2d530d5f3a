// Whether a row-major matrix may be read or written two floats at a time: the GEMM epilogues
// (gemm_tf32.cuh) and the fused kernels (fused_mlp.cu) take float2 paths only where this holds.
#pragma once

namespace gpubp {

// Rows of ld floats starting at p allow float2 (8-byte) accesses at even columns: ld is even
// and p is 8-byte aligned, so every even column of every row is.
__device__ __forceinline__ bool pairs_aligned(const float* p, long long ld) {
    return ld % 2 == 0 && (reinterpret_cast<unsigned long long>(p) & 7ull) == 0;
}

}  // namespace gpubp
