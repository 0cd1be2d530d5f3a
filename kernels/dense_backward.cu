// Dense-layer backward, fp32, for y = act(x @ W + b). Three kernels, each launched only
// when its result is needed:
//
//   dense_dz_<act>:       dz = dy * act'(y or z), elementwise (not for identity: dz = dy)
//   dense_dw_<BM>x<BN>:   dW = x^T @ dz,  db = dz.sum(0)
//   dense_dx_<BM>x<BN>:   dx = dz @ W^T, or with the activation of the layer below (act, at launch)
//                         that layer's dz: (dz @ W^T) * act'(act_in)
//
// act' is evaluated once per element, and the two products read dz as a plain operand whatever
// the activation, so their main loops hold only loads, stores and FMAs (gemm_tile.cuh). Where
// the layer below is a dense layer too, its act' is applied in this layer's dX epilogue, in
// registers, on the way out: the layer below then skips its dense_dz pass (which would read dy
// and y and write dz, (B, out) each) and reads its dz as identity's. The epilogue multiplies the
// same two floats dense_dz would, so dz is bitwise the same either way. It serves every
// activation: those whose derivative reads y in registers; gelu, gelu_tanh and silu, whose
// derivatives read z through erf, tanh or a division, after the plain store, in a pass over the
// thread's own stores whose loops are not unrolled (dx_act_after_store: 64 unrolled copies of
// erf in every dX kernel doubled this file's compile time). The bottom layer of a chain, whose
// dy comes from elsewhere, runs dense_dz.
// Layout: dy, y, z, dz (B, out); x (B, in); W (in, out); dx (B, in); dW (in, out); db (out,);
// all row-major and C-contiguous. Tiles: gemm_tile.cuh (BK = 16, warp 32x64, thread 8x8),
// BM x BN = 128x128 (256 threads) or 128x64 (128 threads), chosen by the host.
// Occupancy (sm_90): dX and dW 8 warps per SM (128x128), 12 (128x64) (GradShape); dense_dz 64
// (256 threads, 32 registers).
//
// dz launch: any grid, block REDUCE_THREADS; a grid-stride loop over the B * out elements.
//
// Dropout (dense_dz_dropout_<act>, every activation, identity included): the layer's forward
// applied a Dropout's mask in its epilogue (dense_fwd_*_dropout), so y is the masked output.
// This pass regenerates the mask from its key and forms
//   dz = dy * scale * act'(y * keep_prob, or z) where the mask kept, else 0
// (y * keep_prob is the activation's own output where the element was kept; gelu, gelu_tanh and
// silu read z, stored unmasked). dX and dW then read dz as for any layer: no pass of its own for the
// mask. Launch: any grid, block DROPOUT_THREADS, one thread per row and group of four columns
// (dropout.cuh), so one Philox call serves four elements.
//
// dX launch: grid (ceil(B / BM), ceil(in / BN)); GEMM M = B, N = in, K = out. Each block
// reads a BM x out slab of dz, an in-tile x out slab of W, writes BM x BN of dx; with an act
// other than identity it also reads BM x BN of act_in (B, in: the layer below's output, or its z
// for gelu, gelu_tanh and silu; identity never touches it), and those three read back the tile
// they stored. The act' epilogues are chosen after the main loop, as in dense_forward.cu
// (activations.cuh: with_activation), for every activation.
//
// dW launch: grid (ceil(in / BM), ceil(out / BN), splits); GEMM M = in, N = out, K = B.
// db comes from the same kernel, like cuBLASLt's BGRADB epilogue: each thread sums the dz
// values it stages (its columns are the same in every slice) and the blocks of m-tile 0
// write the column sums.
// Split-K over the batch: when in x out gives too few tiles to fill the GPU (small layers,
// large batches) the host picks splits > 1 (grid.z) and k_chunk; each split writes its
// partials to ws (splits x in x out floats) and ws_db (splits x out), and the last block of
// each tile sums them in split order (split_k.cuh: contract, tickets, determinism).
// With splits == 1 the tile goes straight to dW and db and ws, ws_db, tickets are unused.
#include "activations.cuh"
#include "dropout.cuh"
#include "gemm_tile.cuh"
#include "one_kernel.cuh"
#include "reduce.cuh"
#include "split_k.cuh"

namespace gpubp {

// Blocks per SM for dX and dW: at 128 registers a thread (2 blocks of 128x128), dX's two
// transposed operands (four row pointers each) spill and dW's column sums push its loop into
// rematerializing addresses, so 128x128 takes 1 block (8 warps per SM: each warp still has 64
// independent FMAs per k step and a whole slice to hide its loads behind). 128x64 keeps
// TileShape's 3 (12 warps).
template <int BM, int BN>
struct GradShape {
    static constexpr int MIN_BLOCKS = TileShape<BM, BN>::THREADS >= 256 ? 1 : TileShape<BM, BN>::MIN_BLOCKS;
};

template <int ACT>
__device__ __forceinline__ void dense_dz(const float* __restrict__ dy, const float* __restrict__ y_or_z,
                                         float* __restrict__ dz, long long n) {
    for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += static_cast<long long>(gridDim.x) * blockDim.x) {
        const float v = y_or_z[i];
        dz[i] = act_backward<ACT>(dy[i], v, v);
    }
}

template <int ACT>
__device__ __forceinline__ void dense_dz_dropout(const float* __restrict__ dy, const float* __restrict__ act_in,
                                                 float* __restrict__ dz, long long rows, long long cols,
                                                 const DropoutMask& mask, float keep_prob) {
    const bool vec = cols % 4 == 0 && dropout_aligned16(dy) && dropout_aligned16(act_in) && dropout_aligned16(dz);
    for_each_group(rows, cols, mask, [&](long long base, int count, const PhiloxWords& words) {
        float g[4], a[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        load_group(dy, base, count, vec, g);
        if constexpr (ACT != ACT_IDENTITY) load_group(act_in, base, count, vec, a);
#pragma unroll
        for (int e = 0; e < 4; ++e) g[e] = masked_dz<ACT>(g[e], a[e], words.w[e], mask, keep_prob);
        store_group(dz, base, count, vec, g);
    });
}

// acc = this thread's share of dz[m0 : m0+BM, :] @ w[n0 : n0+BN, :]^T; VEC: float4 loads.
template <int BM, int BN, bool VEC>
__device__ __forceinline__ void dx_product(const float* dz, const float* w, long long M, long long N,
                                           long long K, long long m0, long long n0, GemmSmem<BM, BN>& smem,
                                           float (&acc)[THREAD_M][THREAD_N]) {
    using Shape = TileShape<BM, BN>;
    KContiguousTile<BM, Shape::THREADS, Shape::LDA, VEC> a;
    KContiguousTile<BN, Shape::THREADS, Shape::LDB, VEC> b;
    a.init(dz, K, m0, M, 0, threadIdx.x);
    b.init(w, K, n0, N, 0, threadIdx.x);
    gemm_mainloop<BM, BN, false>(a, b, 0, K, smem, acc);
}

// v (dx at columns col .. col+3 of row, col a multiple of 4) becomes the dz of the layer below:
// v * act'(a), a its y or z there; DROPOUT: masked_dz (dropout.cuh) with the words of (row, col).
// The products of that layer's dz pass, in its order: the same bits.
template <int ACT, bool DROPOUT>
__device__ __forceinline__ void dz_of_group(float (&v)[4], const float (&a)[4], long long row, long long col,
                                            const DropoutMask& mask, float keep_prob) {
    if constexpr (DROPOUT) {
        const PhiloxWords words = mask.words(row, col);
#pragma unroll
        for (int j = 0; j < 4; ++j) v[j] = masked_dz<ACT>(v[j], a[j], words.w[j], mask, keep_prob);
    } else if constexpr (ACT != ACT_IDENTITY) {
#pragma unroll
        for (int j = 0; j < 4; ++j) v[j] = act_backward<ACT>(v[j], a[j], a[j]);
    }
}

// dx = acc * act'(act_in) at this thread's columns jg .. jg+3 (col; valid_cols of them exist) of
// every row it owns: act' of the layer below, whose dz this dX is. act_in is that layer's output
// (M, N), unread for identity; vec: float4 loads and stores. DROPOUT: that layer's output carried
// a Dropout's mask (act_in is the masked output), regenerated here as the dz pass would: masked_dz
// (dropout.cuh) with the words of (row, col), col a multiple of 4.
template <int ACT, bool DROPOUT>
__device__ __forceinline__ void store_dx_columns(float* dx, const float* act_in, const float (&acc)[THREAD_M][THREAD_N],
                                                 int jg, const ThreadTile& tt, long long m0, long long M, long long N,
                                                 long long col, long long valid_cols, bool vec,
                                                 const DropoutMask& mask, float keep_prob) {
#pragma unroll
    for (int i = 0; i < THREAD_M; ++i) {
        const long long row = m0 + tt.row(i);
        if (row >= M) continue;
        float a[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        if constexpr (ACT != ACT_IDENTITY) {
            // vec holds N % 4 == 0, so a vector group is whole (dropout.cuh's load_group asks that)
            const int count = static_cast<int>(valid_cols < 4 ? valid_cols : 4);
            load_group(act_in, row * N + col, count, vec, a);
        }
        float v[4] = {acc[i][jg], acc[i][jg + 1], acc[i][jg + 2], acc[i][jg + 3]};
        dz_of_group<ACT, DROPOUT>(v, a, row, col, mask, keep_prob);
        store4(dx, row * N + col, v, valid_cols, vec);
    }
}

// For an act' that reads z (gelu, gelu_tanh, silu; act_in is z): dx as the identity epilogue
// stored it, times act'(z) (and the mask), a group of four columns at a time in loops that are
// not unrolled. Unrolled over 64 accumulators, erf or tanh doubled the file's compile time; here
// each thread re-reads only what it stored itself (no barrier) after acc is dead.
template <int ACT, bool DROPOUT>
__device__ __forceinline__ void dx_act_after_store(float* dx, const float* z, const ThreadTile& tt, long long m0,
                                                   long long n0, long long M, long long N, bool vec,
                                                   const DropoutMask& mask, float keep_prob) {
#pragma unroll 1
    for (int i = 0; i < THREAD_M; ++i) {
        const long long row = m0 + tt.row(i);
        if (row >= M) continue;
#pragma unroll 1
        for (int jg = 0; jg < THREAD_N; jg += 4) {
            const long long col = n0 + tt.col(jg);
            const long long valid_cols = N - col;
            if (valid_cols <= 0) continue;
            const int count = valid_cols < 4 ? static_cast<int>(valid_cols) : 4;
            float v[4], a[4];
            load_group(dx, row * N + col, count, vec, v);
            load_group(z, row * N + col, count, vec, a);
            dz_of_group<ACT, DROPOUT>(v, a, row, col, mask, keep_prob);
            store4(dx, row * N + col, v, valid_cols, vec);
        }
    }
}

template <int BM, int BN, bool DROPOUT>
__device__ __forceinline__ void dense_dx(const float* __restrict__ dz, const float* __restrict__ w,
                                         float* __restrict__ dx, const float* __restrict__ act_in, int B_, int in_,
                                         int out_, int act, DropoutMask mask, float keep_prob) {
    const long long M = B_, N = in_, K = out_;
    const long long m0 = static_cast<long long>(blockIdx.x) * BM;
    const long long n0 = static_cast<long long>(blockIdx.y) * BN;

    __shared__ __align__(16) GemmSmem<BM, BN> smem;
    float acc[THREAD_M][THREAD_N];
    if (K % 4 == 0 && aligned16(dz) && aligned16(w)) {
        dx_product<BM, BN, true>(dz, w, M, N, K, m0, n0, smem, acc);
    } else {
        dx_product<BM, BN, false>(dz, w, M, N, K, m0, n0, smem, acc);
    }

    with_activation<ActSet::ALL>(act, [&](auto activation) {
        constexpr int ACT = decltype(activation)::ID;
        // Those that read z: the identity epilogue's plain store, then the after-store pass.
        constexpr bool AFTER_STORE = act_needs_z<ACT>();
        const ThreadTile tt = ThreadTile::of<BM, BN>(threadIdx.x);
        const bool vec = N % 4 == 0 && aligned16(dx) && (ACT == ACT_IDENTITY || aligned16(act_in));
#pragma unroll
        for (int jg = 0; jg < THREAD_N; jg += 4) {
            const long long col = n0 + tt.col(jg);
            const long long valid_cols = N - col;
            if (valid_cols <= 0) continue;
            if constexpr ((ACT == ACT_IDENTITY && !DROPOUT) || AFTER_STORE) {
                store_acc_columns(dx, acc, jg, tt, m0, M, N, col, valid_cols, vec);
            } else {
                store_dx_columns<ACT, DROPOUT>(dx, act_in, acc, jg, tt, m0, M, N, col, valid_cols, vec, mask,
                                               keep_prob);
            }
        }
        if constexpr (AFTER_STORE) dx_act_after_store<ACT, DROPOUT>(dx, act_in, tt, m0, n0, M, N, vec, mask, keep_prob);
    });
}

// acc = this thread's share of x[k_begin : k_end, m0 : m0+BM]^T @ dz[k_begin : k_end, n0 : n0+BN];
// returns, in threads tid < BN, the sum of dz column n0 + tid over those rows.
template <int BM, int BN, bool VEC>
__device__ __forceinline__ float dw_product(const float* x, const float* dz, long long M, long long N,
                                            long long k_begin, long long k_end, long long m0, long long n0,
                                            GemmSmem<BM, BN>& smem, float (&acc)[THREAD_M][THREAD_N]) {
    using Shape = TileShape<BM, BN>;
    OContiguousTile<BM, Shape::THREADS, Shape::LDA, VEC> a;
    OContiguousTile<BN, Shape::THREADS, Shape::LDB, VEC> b;
    a.init(x, M, m0, M, k_begin, threadIdx.x);
    b.init(dz, N, n0, N, k_begin, threadIdx.x);
    return gemm_mainloop<BM, BN, true>(a, b, k_begin, k_end, smem, acc);
}

template <int BM, int BN>
__device__ __forceinline__ void dense_dw(const float* __restrict__ x, const float* __restrict__ dz,
                                         float* __restrict__ dw, float* __restrict__ db, float* __restrict__ ws,
                                         float* __restrict__ ws_db, unsigned int* __restrict__ tickets, int B_,
                                         int in_, int out_, int k_chunk, int splits) {
    const long long M = in_, N = out_, K = B_;
    const long long m0 = static_cast<long long>(blockIdx.x) * BM;
    const long long n0 = static_cast<long long>(blockIdx.y) * BN;
    const SplitRows batch_rows = SplitRows::of(K, k_chunk, blockIdx.z);

    __shared__ __align__(16) GemmSmem<BM, BN> smem;
    float acc[THREAD_M][THREAD_N];
    const float column_sum =
        M % 4 == 0 && N % 4 == 0 && aligned16(x) && aligned16(dz)
            ? dw_product<BM, BN, true>(x, dz, M, N, batch_rows.begin, batch_rows.end, m0, n0, smem, acc)
            : dw_product<BM, BN, false>(x, dz, M, N, batch_rows.begin, batch_rows.end, m0, n0, smem, acc);

    float* dw_out = split_k_partial(dw, ws, M * N, splits, blockIdx.z);
    float* db_out = split_k_partial(db, ws_db, N, splits, blockIdx.z);
    const ThreadTile tt = ThreadTile::of<BM, BN>(threadIdx.x);
    const bool vec = N % 4 == 0 && aligned16(dw_out);
#pragma unroll
    for (int jg = 0; jg < THREAD_N; jg += 4) {
        const long long col = n0 + tt.col(jg);
        const long long valid_cols = N - col;
        if (valid_cols <= 0) continue;
        store_acc_columns(dw_out, acc, jg, tt, m0, M, N, col, valid_cols, vec);
    }
    if (blockIdx.x == 0 && threadIdx.x < BN && n0 + threadIdx.x < N) db_out[n0 + threadIdx.x] = column_sum;
    if (splits > 1) dense_dw_split_k_finish(ws, ws_db, tickets, dw, db, M, N, m0, n0, BM, BN, splits);
}

}  // namespace gpubp

#define GPUBP_DENSE_DZ_ENTRY(NAME, ID)                                                                   \
    extern "C" __global__ void __launch_bounds__(gpubp::REDUCE_THREADS)                                  \
        dense_dz_##NAME(const float* __restrict__ dy, const float* __restrict__ y_or_z,                  \
                        float* __restrict__ dz, long long n) {                                           \
        gpubp::dense_dz<ID>(dy, y_or_z, dz, n);                                                          \
    }
#define GPUBP_DENSE_DZ_DROPOUT_ENTRY(NAME, ID)                                                           \
    extern "C" __global__ void __launch_bounds__(gpubp::DROPOUT_THREADS)                                 \
        dense_dz_dropout_##NAME(const float* __restrict__ dy, const float* __restrict__ act_in,          \
                                float* __restrict__ dz, long long rows, long long cols,                  \
                                const unsigned int* __restrict__ key, unsigned int threshold, float scale, \
                                long long first_row, float keep_prob) {                                  \
        if (!gpubp::owns_a_group(rows, cols)) return;                                                    \
        const gpubp::DropoutMask mask = gpubp::DropoutMask::read(key, threshold, scale, first_row);      \
        gpubp::dense_dz_dropout<ID>(dy, act_in, dz, rows, cols, mask, keep_prob);                        \
    }
#define GPUBP_DENSE_GRAD_ENTRY(BM, BN)                                                                   \
    extern "C" __global__ void __launch_bounds__(gpubp::TileShape<BM, BN>::THREADS,                     \
                                                 gpubp::GradShape<BM, BN>::MIN_BLOCKS)                  \
        dense_dx_##BM##x##BN(const float* __restrict__ dz, const float* __restrict__ w,                  \
                             float* __restrict__ dx, const float* __restrict__ act_in, int B, int in,   \
                             int out, int act) {                                                         \
        GPUBP_ONLY_KERNEL_GUARD(dense_dx_##BM##x##BN)                                                    \
        gpubp::dense_dx<BM, BN, false>(dz, w, dx, act_in, B, in, out, act, gpubp::DropoutMask{}, 1.0f);  \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(gpubp::TileShape<BM, BN>::THREADS,                     \
                                                 gpubp::GradShape<BM, BN>::MIN_BLOCKS)                  \
        dense_dx_dropout_##BM##x##BN(const float* __restrict__ dz, const float* __restrict__ w,          \
                                     float* __restrict__ dx, const float* __restrict__ act_in, int B,     \
                                     int in, int out, int act, const unsigned int* __restrict__ key,    \
                                     unsigned int threshold, float scale, long long first_row,          \
                                     float keep_prob) {                                                  \
        GPUBP_ONLY_KERNEL_GUARD(dense_dx_dropout_##BM##x##BN)                                            \
        const gpubp::DropoutMask mask = gpubp::DropoutMask::read(key, threshold, scale, first_row);      \
        gpubp::dense_dx<BM, BN, true>(dz, w, dx, act_in, B, in, out, act, mask, keep_prob);              \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(gpubp::TileShape<BM, BN>::THREADS,                     \
                                                 gpubp::GradShape<BM, BN>::MIN_BLOCKS)                  \
        dense_dw_##BM##x##BN(const float* __restrict__ x, const float* __restrict__ dz,                  \
                             float* __restrict__ dw, float* __restrict__ db, float* __restrict__ ws,     \
                             float* __restrict__ ws_db, unsigned int* __restrict__ tickets, int B,       \
                             int in, int out, int k_chunk, int splits) {                                 \
        GPUBP_ONLY_KERNEL_GUARD(dense_dw_##BM##x##BN)                                                    \
        gpubp::dense_dw<BM, BN>(x, dz, dw, db, ws, ws_db, tickets, B, in, out, k_chunk, splits);       \
    }

// Every activation of activations.cuh but identity, whose dz is dy.
GPUBP_DENSE_DZ_ENTRY(relu, gpubp::ACT_RELU)
GPUBP_DENSE_DZ_ENTRY(leaky_relu, gpubp::ACT_LEAKY_RELU)
GPUBP_DENSE_DZ_ENTRY(sigmoid, gpubp::ACT_SIGMOID)
GPUBP_DENSE_DZ_ENTRY(tanh, gpubp::ACT_TANH)
GPUBP_DENSE_DZ_ENTRY(gelu, gpubp::ACT_GELU)
GPUBP_DENSE_DZ_ENTRY(gelu_tanh, gpubp::ACT_GELU_TANH)
GPUBP_DENSE_DZ_ENTRY(silu, gpubp::ACT_SILU)
GPUBP_FOR_EACH_ACTIVATION(GPUBP_DENSE_DZ_DROPOUT_ENTRY)
GPUBP_DENSE_GRAD_ENTRY(128, 128)
GPUBP_DENSE_GRAD_ENTRY(128, 64)
