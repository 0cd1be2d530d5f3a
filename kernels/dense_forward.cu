// Fused dense-layer forward, fp32:  z = x @ W + b,  y = act(z)  (dropout variant: y = mask(act(z))).
//
// Layout: x (M = batch, K = in) row-major, W (K, N = out) row-major, b (N,), y and z
// (M, N) row-major; all C-contiguous. z is written only for activations whose derivative
// needs it (gelu, gelu_tanh, silu); for the others the z pointer is never touched.
//
// Tiles (gemm_tile.cuh): block BM x BN x BK=16, warp 32x64, thread 8x8.
//   dense_fwd_128x128:  256 threads, for problems with at least one full wave of tiles
//   dense_fwd_128x64:   128 threads, for narrow layers / small batches
// The activation is the last argument, act (an ActId), and the kernels serve activation sets
// (activations.cuh): the main loop is compiled once per kernel, and the epilogue, fixed per
// activation at compile time, is chosen by one uniform branch after it. dense_fwd_128x128 serves
// ActSet::LIGHT (identity, relu, leaky_relu, tanh) and dense_fwd_heavy_128x128 ActSet::HEAVY
// (sigmoid, gelu, gelu_tanh, silu), whose epilogues need more registers; every other kernel serves all.
// Occupancy (sm_90): 16 warps per SM (dense_fwd_128x128), 8 (dense_fwd_heavy_128x128 and
// dense_fwd_dropout_128x128, by 155 and 159 registers), 12 (128x64); ForwardShape.
// Launch: grid (ceil(M / BM), ceil(N / BN)), block THREADS, no dynamic shared memory.
// M is on grid.x, whose limit (2^31 - 1) any batch fits. Each block reads a BM x K slab
// of x, a K x BN slab of W and BN biases, and writes its BM x BN tile of y (and z).
// The epilogue adds the bias and applies the activation in registers, so y costs one
// write instead of cuBLAS's write + read + write for a separate bias/activation pass.
//
// Dropout (dense_fwd_dropout_<BM>x<BN>, every activation): a Dropout above the layer, applied in the same
// epilogue after the activation: y = act(z) * scale where the Philox mask of (key, row, col)
// keeps the element, else 0 (dropout.cuh; z stays unmasked). A thread's four neighbouring
// columns start at a multiple of 4, so one Philox call serves them. The variant is a template
// argument: the main loop is the same code, and the kernels without it are unchanged. Extra
// arguments: key (two words in device memory), threshold, scale, first_row.
#include "activations.cuh"
#include "dropout.cuh"
#include "gemm_tile.cuh"
#include "one_kernel.cuh"

namespace gpubp {

// Blocks per SM: TileShape's, except on 128x128 tiles for the sets whose epilogue spills at 128
// registers a thread next to the 64 live accumulators: any set holding sigmoid or silu (an IEEE
// division) on every architecture, gelu or gelu_tanh (erf, tanh) on sm_86 and sm_89, and every dropout
// variant (its Philox rounds spilled 24 bytes at 128 registers): 1 block there.
template <unsigned SET, int BM, int BN, bool DROPOUT = false>
struct ForwardShape {
    static constexpr bool HEAVY_EPILOGUE = DROPOUT || (SET & ActSet::HEAVY) != 0;
    static constexpr int MIN_BLOCKS =
        HEAVY_EPILOGUE && TileShape<BM, BN>::THREADS >= 256 ? 1 : TileShape<BM, BN>::MIN_BLOCKS;
};

// acc = this thread's share of x[m0 : m0+BM, :] @ w[:, n0 : n0+BN]; VEC: float4 loads.
template <int BM, int BN, bool VEC>
__device__ __forceinline__ void forward_product(const float* x, const float* w, long long M, long long N,
                                                long long K, long long m0, long long n0, GemmSmem<BM, BN>& smem,
                                                float (&acc)[THREAD_M][THREAD_N]) {
    using Shape = TileShape<BM, BN>;
    KContiguousTile<BM, Shape::THREADS, Shape::LDA, VEC> a;
    OContiguousTile<BN, Shape::THREADS, Shape::LDB, VEC> b;
    a.init(x, K, m0, M, 0, threadIdx.x);
    b.init(w, N, n0, N, 0, threadIdx.x);
    gemm_mainloop<BM, BN, false>(a, b, 0, K, smem, acc);
}

template <unsigned SET, int BM, int BN, bool DROPOUT>
__device__ __forceinline__ void dense_forward(const float* __restrict__ x, const float* __restrict__ w,
                                              const float* __restrict__ b, float* __restrict__ y,
                                              float* __restrict__ z, int M_, int N_, int K_, int act,
                                              DropoutMask mask) {
    const long long M = M_, N = N_, K = K_;
    const long long m0 = static_cast<long long>(blockIdx.x) * BM;
    const long long n0 = static_cast<long long>(blockIdx.y) * BN;

    __shared__ __align__(16) GemmSmem<BM, BN> smem;
    float acc[THREAD_M][THREAD_N];
    if (K % 4 == 0 && N % 4 == 0 && aligned16(x) && aligned16(w)) {
        forward_product<BM, BN, true>(x, w, M, N, K, m0, n0, smem, acc);
    } else {
        forward_product<BM, BN, false>(x, w, M, N, K, m0, n0, smem, acc);
    }

    with_activation<SET>(act, [&](auto activation) {
        constexpr int ACT = decltype(activation)::ID;
        const ThreadTile tt = ThreadTile::of<BM, BN>(threadIdx.x);
        const bool vec = N % 4 == 0 && aligned16(y) && aligned16(b) && (!act_needs_z<ACT>() || aligned16(z));
#pragma unroll
        for (int jg = 0; jg < THREAD_N; jg += 4) {
            const long long col = n0 + tt.col(jg);
            const long long valid_cols = N - col;  // columns col .. col+3 that exist
            if (valid_cols <= 0) continue;
            float bias[4];
            if (vec && valid_cols >= 4) {
                const float4 b4 = load4(b + col);
                bias[0] = b4.x; bias[1] = b4.y; bias[2] = b4.z; bias[3] = b4.w;
            } else {
#pragma unroll
                for (int j = 0; j < 4; ++j) bias[j] = j < valid_cols ? b[col + j] : 0.0f;
            }
#pragma unroll
            for (int i = 0; i < THREAD_M; ++i) {
                const long long row = m0 + tt.row(i);
                if (row >= M) continue;
                float zv[4], yv[4];
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    zv[j] = acc[i][jg + j] + bias[j];
                    yv[j] = act_forward<ACT>(zv[j]);
                }
                if constexpr (DROPOUT) {  // col is a multiple of 4 (ThreadTile::col)
                    const PhiloxWords words = mask.words(row, col);
#pragma unroll
                    for (int j = 0; j < 4; ++j) yv[j] = mask.apply(yv[j], words.w[j]);
                }
                store4(y, row * N + col, yv, valid_cols, vec);
                if constexpr (act_needs_z<ACT>()) store4(z, row * N + col, zv, valid_cols, vec);
            }
        }
    });
}

}  // namespace gpubp

// One kernel per tile, activation set and dropout (NAME: dense_fwd_<NAME>_<BM>x<BN>).
#define GPUBP_DENSE_FWD_ENTRY(NAME, SET, BM, BN)                                                           \
    extern "C" __global__ void __launch_bounds__(gpubp::TileShape<BM, BN>::THREADS,                     \
                                               gpubp::ForwardShape<SET, BM, BN>::MIN_BLOCKS)            \
        NAME##_##BM##x##BN(const float* __restrict__ x, const float* __restrict__ w,                      \
                           const float* __restrict__ b, float* __restrict__ y, float* __restrict__ z,     \
                           int M, int N, int K, int act) {                                                \
        GPUBP_ONLY_KERNEL_GUARD(NAME##_##BM##x##BN)                                                       \
        gpubp::dense_forward<SET, BM, BN, false>(x, w, b, y, z, M, N, K, act, gpubp::DropoutMask{});      \
    }
#define GPUBP_DENSE_FWD_DROPOUT_ENTRY(BM, BN)                                                              \
    extern "C" __global__ void __launch_bounds__(gpubp::TileShape<BM, BN>::THREADS,                     \
                                               gpubp::ForwardShape<gpubp::ActSet::ALL, BM, BN, true>::MIN_BLOCKS) \
        dense_fwd_dropout_##BM##x##BN(const float* __restrict__ x, const float* __restrict__ w,           \
                                      const float* __restrict__ b, float* __restrict__ y,                 \
                                      float* __restrict__ z, int M, int N, int K, int act,                \
                                      const unsigned int* __restrict__ key, unsigned int threshold,       \
                                      float scale, long long first_row) {                                 \
        GPUBP_ONLY_KERNEL_GUARD(dense_fwd_dropout_##BM##x##BN)                                            \
        const gpubp::DropoutMask mask = gpubp::DropoutMask::read(key, threshold, scale, first_row);       \
        gpubp::dense_forward<gpubp::ActSet::ALL, BM, BN, true>(x, w, b, y, z, M, N, K, act, mask);        \
    }

GPUBP_DENSE_FWD_ENTRY(dense_fwd, gpubp::ActSet::LIGHT, 128, 128)
GPUBP_DENSE_FWD_ENTRY(dense_fwd_heavy, gpubp::ActSet::HEAVY, 128, 128)
GPUBP_DENSE_FWD_ENTRY(dense_fwd, gpubp::ActSet::ALL, 128, 64)
GPUBP_DENSE_FWD_DROPOUT_ENTRY(128, 128)
GPUBP_DENSE_FWD_DROPOUT_ENTRY(128, 64)
