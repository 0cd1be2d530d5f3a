// Fused dense-layer forward on TF32 tensor cores:  z = x @ W + b,  y = act(z).
//
// Same contract and layout as dense_forward.cu (x (M, K), W (K, N), b (N,), y and z (M, N),
// row-major and C-contiguous; z written only for gelu and gelu_tanh), with the products on
// mma.sync.m16n8k8 TF32 (kernels/mma.cuh): x and W are rounded to TF32 (10 mantissa bits,
// cvt.rna) as they are staged in shared memory, and accumulate in fp32. Error: each product
// carries the two operands' rounding (relative 2^-11 each), so |y - y_fp64| is about
// 2^-10 sqrt(K) max|x| max|W| for random data; tests bound it at 2e-3 relative.
//
// Tiles: block BM x BN = 64 x 64, BK = 8 deep; 4 warps in 2 x 2, each owning a 32 x 32 warp
// tile = 2 (m16) x 4 (n8) mma tiles, so a k step issues 8 mma per warp from 2 A and 4 B
// fragments. Shared: As[BM][BK + 4] (k contiguous per row) and Bs[BK][BN + 4] (n contiguous),
// padded so the fragment reads of a warp spread over banks; 4.2 KB. Each thread stages four
// elements of each operand per k tile with guarded scalar loads (out-of-range as 0), so any
// M, N, K works and only the epilogue guards its stores.
// Launch: dense_fwd_tf32_<act>, grid (ceil(M / 64), ceil(N / 64)), block 128, no dynamic
// shared memory. M is on grid.x, whose limit any batch fits.
#include "activations.cuh"
#include "mma.cuh"

namespace gpubp {

struct Tf32Tile {
    static constexpr int BM = 64, BN = 64, BK = 8;
    static constexpr int WARP_M = 32, WARP_N = 32;  // warps laid out 2 x 2
    static constexpr int MMA_M = 16, MMA_N = 8;
    static constexpr int TILES_M = WARP_M / MMA_M, TILES_N = WARP_N / MMA_N;  // 2 x 4 per warp
    static constexpr int THREADS = 128;
    static constexpr int LDA = BK + 4, LDB = BN + 4;
    static constexpr int LOADS = BM * BK / THREADS;  // per thread per operand per k tile: 4
};

template <int ACT>
__device__ __forceinline__ void dense_forward_tf32(const float* __restrict__ x, const float* __restrict__ w,
                                                   const float* __restrict__ b, float* __restrict__ y,
                                                   float* __restrict__ z, int M_, int N_, int K_) {
    using T = Tf32Tile;
    __shared__ float As[T::BM * T::LDA];
    __shared__ float Bs[T::BK * T::LDB];
    const long long M = M_, N = N_, K = K_;
    const long long m0 = static_cast<long long>(blockIdx.x) * T::BM;
    const long long n0 = static_cast<long long>(blockIdx.y) * T::BN;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane >> 2, t = lane % 4;
    const int wm = (warp / 2) * T::WARP_M, wn = (warp % 2) * T::WARP_N;

    float acc[T::TILES_M][T::TILES_N][4];
#pragma unroll
    for (int i = 0; i < T::TILES_M; ++i)
#pragma unroll
        for (int j = 0; j < T::TILES_N; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.0f;

    for (long long k0 = 0; k0 < K; k0 += T::BK) {
#pragma unroll
        for (int l = 0; l < T::LOADS; ++l) {
            const int e = tid + l * T::THREADS;
            const int am = e / T::BK, ak = e % T::BK;  // x tile: 8 consecutive k per row
            const long long row = m0 + am, col = k0 + ak;
            const float xv = row < M && col < K ? x[row * K + col] : 0.0f;
            As[am * T::LDA + ak] = __uint_as_float(to_tf32(xv));
            const int bk = e / T::BN, bn = e % T::BN;  // W tile: 64 consecutive n per k
            const long long wrow = k0 + bk, wcol = n0 + bn;
            const float wv = wrow < K && wcol < N ? w[wrow * N + wcol] : 0.0f;
            Bs[bk * T::LDB + bn] = __uint_as_float(to_tf32(wv));
        }
        __syncthreads();
        unsigned int a[T::TILES_M][4], bf[T::TILES_N][2];
#pragma unroll
        for (int i = 0; i < T::TILES_M; ++i) {
            const float* base = As + (wm + i * T::MMA_M) * T::LDA;
            a[i][0] = __float_as_uint(base[g * T::LDA + t]);
            a[i][1] = __float_as_uint(base[(g + 8) * T::LDA + t]);
            a[i][2] = __float_as_uint(base[g * T::LDA + t + 4]);
            a[i][3] = __float_as_uint(base[(g + 8) * T::LDA + t + 4]);
        }
#pragma unroll
        for (int j = 0; j < T::TILES_N; ++j) {
            const int col = wn + j * T::MMA_N + g;
            bf[j][0] = __float_as_uint(Bs[t * T::LDB + col]);
            bf[j][1] = __float_as_uint(Bs[(t + 4) * T::LDB + col]);
        }
#pragma unroll
        for (int i = 0; i < T::TILES_M; ++i)
#pragma unroll
            for (int j = 0; j < T::TILES_N; ++j) mma_m16n8k8_tf32(acc[i][j], a[i], bf[j], acc[i][j]);
        __syncthreads();  // the next k tile overwrites As and Bs
    }

    // Epilogue: accumulator r of tile (i, j) sits at row g + 8 (r / 2), column 2t + r % 2.
#pragma unroll
    for (int i = 0; i < T::TILES_M; ++i)
#pragma unroll
        for (int j = 0; j < T::TILES_N; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const long long row = m0 + wm + i * T::MMA_M + g + 8 * (r / 2);
                const long long col = n0 + wn + j * T::MMA_N + 2 * t + r % 2;
                if (row >= M || col >= N) continue;
                const float zv = acc[i][j][r] + b[col];
                y[row * N + col] = act_forward<ACT>(zv);
                if constexpr (act_needs_z<ACT>()) z[row * N + col] = zv;
            }
}

}  // namespace gpubp

#define GPUBP_DENSE_FWD_TF32_ENTRY(NAME, ID)                                                                \
    extern "C" __global__ void __launch_bounds__(gpubp::Tf32Tile::THREADS)                                \
        dense_fwd_tf32_##NAME(const float* __restrict__ x, const float* __restrict__ w,                      \
                              const float* __restrict__ b, float* __restrict__ y, float* __restrict__ z,     \
                              int M, int N, int K) {                                                         \
        gpubp::dense_forward_tf32<ID>(x, w, b, y, z, M, N, K);                                              \
    }

GPUBP_FOR_EACH_ACTIVATION(GPUBP_DENSE_FWD_TF32_ENTRY)
