// Dense-layer backward on TF32 or bf16 tensor cores, for y = act(x @ W + b), in up to three
// launches (bf16: dense_{dx,dw}_bf16, the same GEMMs on dz, W and x rounded by
// dense_forward_tf32.cu's round_bf16, after the fp32 dz kernel; db stays an fp32 sum):
//
//   dense_dz_db_<act>:    dz = dy * act'(y or z) (stored unless act is identity, where dz = dy),
//                         db = dz.sum(0) (when dW is needed): elementwise, fp32
//   dense_dx_tf32:        dx = dz @ W^T     (gemm_tf32.cuh, A = dz k-contiguous, B = W^T k-contiguous),
//                         or the dz of the layer below: (dz @ W^T) * act'(act_in) (act at launch)
//   dense_dw_tf32:        dW = x^T @ dz     (A = x^T outer-contiguous, B = dz outer-contiguous)
//
// The activation's derivative is applied once per element, outside the products' main loops (by
// the dz kernel, or in the epilogue of the dX above), and the two products are plain pipelined
// GEMMs whose hot loops hold nothing but data movement and mma (the derivative of gelu alone
// costs more instructions per element than a k step has per mma). So the dW kernel serves
// every activation and is compiled once. The dX kernel applies the act' of the layer below (its
// act argument, any activation) in its epilogue, as dense_backward.cu's does (in registers, or
// for gelu, gelu_tanh and silu in a pass over its own stores): that layer's dz kernel then only
// sums db (dense_dz_db_identity, which stores nothing), or is not launched when it is frozen.
//
// Layout: dy, y, z, dz (B, out); x (B, in); W (in, out); dx (B, in); dW (in, out); db (out,);
// all row-major. dz is exact fp32 (dy * act'), and db is summed from it in fp32, in a fixed
// order: each of the 8 row groups of a dz block sums every 8th row of the block's rows, the
// groups are added in order, and where the batch is split (below) the splits' sums are added in
// split order, so db is deterministic (its bits depend on the split, which the host picks from
// the shape and the GPU's SM count, as for dW).
//
// dz launch: grid (ceil(out / 32), splits), block 256 = 32 columns x 8 row groups; reads dy and
// y|z once, writes dz once; occupancy on sm_90: 8 blocks (64 warps) per SM. A column strip alone
// would give a narrow layer a handful of blocks, each walking the whole batch, so the host splits
// the batch into `splits` chunks of `row_chunk` rows (a multiple of 32) until the launch fills
// the GPU: block (x, s) covers rows [s row_chunk, (s + 1) row_chunk). With splits > 1 each block
// writes its db partial to ws_db + s out, and the last block of each strip (its ticket in
// tickets + x, split_k.cuh) adds them up in split order; with splits == 1 ws_db and tickets are
// unused and the block writes db directly. The last block reads splits x 32 floats of ws_db.
// dX launch: grid (ceil(B / 128), ceil(in / 128)), block 256, dynamic shared memory
// Tf32Gemm<true, true>::smem_bytes (98 304 bytes); GEMM M = B, N = in, K = out.
// dW launch: grid (ceil(in / 128), ceil(out / 128), splits), block 256, dynamic shared memory
// Tf32Gemm<false, false>::smem_bytes (104 448 bytes); GEMM M = in, N = out, K = B. Both GEMMs:
// 1 block (8 warps) per SM on sm_90, by registers (gemm_tf32.cuh).
// Split-K over the batch as in dense_backward.cu: when in x out gives too few tiles to fill the
// GPU the host picks splits > 1 and k_chunk (a multiple of MmaTile::BK, so every k tile of a
// split but its last is whole); each split writes its partial dW tile to ws (splits x in x out
// floats), and the last block of each tile sums them in split order (split_k.cuh), so dW is
// bitwise deterministic. With splits == 1 the tile goes straight to dW; ws and tickets are unused.
//
// Dropout (dense_dz_db_dropout_<act>, every activation): the layer's forward applied a Dropout's
// mask in its epilogue (dense_fwd_tf32_*_dropout), so y is the masked output. The dz kernel
// regenerates the mask from its key and forms dz = dy * scale * act'(y * keep_prob, or z) where
// the mask kept, else 0 (always stored), and db from it; dX and dW read dz as for any layer, so
// the mask costs no pass of its own. Its block is 8 groups of four columns (the same 32 columns
// as DzShape) x 32 row groups: one Philox call serves a thread's four columns of a row, read
// and written as one float4 where the width and the operands allow. db: each row group sums
// every 32nd row, then the groups are added in order (deterministic).
#include "dropout.cuh"
#include "gemm_tf32.cuh"
#include "one_kernel.cuh"
#include "split_k.cuh"

namespace gpubp {

struct DzShape {
    static constexpr int COLS = 32, ROW_GROUPS = 8, THREADS = COLS * ROW_GROUPS;
};

// db of a dz block's 32 columns from partial[r][c], the sum of row group r over its rows: the
// groups added in order, into db (one split) or the block's partial in ws_db. Then the last block
// of the strip adds the splits' partials: each of its 8 warps sums every 8th split (the loads of
// a warp independent, so in flight together), and the 8 sums are added in order. Every thread of
// the block calls it; partial has at least 8 rows.
template <int ROW_GROUPS>
__device__ __forceinline__ void dz_db_finish(float (*partial)[DzShape::COLS], float* __restrict__ db,
                                             float* __restrict__ ws_db, unsigned int* __restrict__ tickets, int N_,
                                             int splits) {
    constexpr int WARPS = DzShape::THREADS / DzShape::COLS;
    const long long N = N_;
    const int lane = threadIdx.x % DzShape::COLS, warp = threadIdx.x / DzShape::COLS;
    const long long col = static_cast<long long>(blockIdx.x) * DzShape::COLS + lane;
    __syncthreads();
    if (warp == 0 && col < N) {
        float total = partial[0][lane];
#pragma unroll
        for (int r = 1; r < ROW_GROUPS; ++r) total += partial[r][lane];
        split_k_partial(db, ws_db, N, splits, blockIdx.y)[col] = total;
    }
    if (splits == 1) return;  // uniform across the launch
    // Its barrier also keeps warp 0's reads of partial above ahead of the writes below.
    if (!split_k_arrived_last(tickets + blockIdx.x, splits)) return;
    float sum = 0.0f;
    if (col < N) {
        for (int s = warp; s < splits; s += WARPS) sum += __ldcg(ws_db + static_cast<long long>(s) * N + col);
    }
    partial[warp][lane] = sum;
    __syncthreads();
    if (warp == 0 && col < N) {
        float total = partial[0][lane];
#pragma unroll
        for (int r = 1; r < WARPS; ++r) total += partial[r][lane];
        db[col] = total;
    }
    split_k_reset(tickets + blockIdx.x);
}

template <int ACT>
__device__ __forceinline__ void dense_dz(const float* __restrict__ dy, const float* __restrict__ y_or_z,
                                         float* __restrict__ dz, float* __restrict__ db, float* __restrict__ ws_db,
                                         unsigned int* __restrict__ tickets, int B, int N_, int store_dz, int sum_db,
                                         int row_chunk, int splits) {
    using S = DzShape;
    __shared__ float partial[S::ROW_GROUPS][S::COLS];
    const long long N = N_;
    const int lane = threadIdx.x % S::COLS, group = threadIdx.x / S::COLS;
    const long long col = static_cast<long long>(blockIdx.x) * S::COLS + lane;
    const SplitRows rows = SplitRows::of(B, row_chunk, blockIdx.y);  // the block's batch chunk
    float sum = 0.0f;
    if (col < N) {
        for (long long row = rows.begin + group; row < rows.end; row += S::ROW_GROUPS) {
            float g = dy[row * N + col];
            if constexpr (ACT != ACT_IDENTITY) {  // identity reads neither y nor z
                const float v = y_or_z[row * N + col];
                g = act_backward<ACT>(g, v, v);
            }
            if (store_dz) dz[row * N + col] = g;
            sum += g;
        }
    }
    if (!sum_db) return;  // uniform across the launch
    partial[group][lane] = sum;
    dz_db_finish<S::ROW_GROUPS>(partial, db, ws_db, tickets, N_, splits);
}

struct DzDropoutShape {
    static constexpr int GROUPS = DzShape::COLS / 4, ROW_GROUPS = DzShape::THREADS / GROUPS;
};

template <int ACT>
__device__ __forceinline__ void dense_dz_dropout(const float* __restrict__ dy, const float* __restrict__ act_in,
                                                 float* __restrict__ dz, float* __restrict__ db,
                                                 float* __restrict__ ws_db, unsigned int* __restrict__ tickets, int B,
                                                 int N_, int sum_db, int row_chunk, int splits,
                                                 const DropoutMask& mask, float keep_prob) {
    using S = DzDropoutShape;
    // A thread's four column sums go in as one 16-byte store: eight lanes of a row group fill a
    // 128-byte row, one wavefront per quarter warp (four scalar stores would hit 8 banks 4 ways).
    __shared__ __align__(16) float partial[S::ROW_GROUPS][DzShape::COLS];
    const long long N = N_;
    const int group = threadIdx.x % S::GROUPS, row_group = threadIdx.x / S::GROUPS;
    const long long col = static_cast<long long>(blockIdx.x) * DzShape::COLS + 4 * group;
    const int count = N - col < 4 ? static_cast<int>(N - col) : 4;  // <= 0: no column of this group exists
    const bool vec = N % 4 == 0 && dropout_aligned16(dy) && dropout_aligned16(act_in) && dropout_aligned16(dz);
    const SplitRows rows = SplitRows::of(B, row_chunk, blockIdx.y);  // the block's batch chunk
    float sum[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (count > 0) {
        for (long long row = rows.begin + row_group; row < rows.end; row += S::ROW_GROUPS) {
            const PhiloxWords words = mask.words(row, col);
            float g[4], a[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            load_group(dy, row * N + col, count, vec, g);
            if constexpr (ACT != ACT_IDENTITY) load_group(act_in, row * N + col, count, vec, a);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                g[e] = masked_dz<ACT>(g[e], a[e], words.w[e], mask, keep_prob);
                sum[e] += g[e];
            }
            store_group(dz, row * N + col, count, vec, g);
        }
    }
    if (!sum_db) return;  // uniform across the launch
    *reinterpret_cast<float4*>(&partial[row_group][4 * group]) = make_float4(sum[0], sum[1], sum[2], sum[3]);
    dz_db_finish<S::ROW_GROUPS>(partial, db, ws_db, tickets, N_, splits);
}

// v0, v1 (dx at columns col, col + 1 of row, col even) become the dz of the layer below:
// v * act'(a), a its y or z there; DROPOUT: masked_dz with words col % 4 and the next of the
// group's. The products of that layer's dz pass, in its order: the same bits.
template <int ACT, bool DROPOUT>
__device__ __forceinline__ void dz_of_pair(float& v0, float& v1, float a0, float a1, long long row, long long col,
                                           const DropoutMask& mask, float keep_prob) {
    if constexpr (DROPOUT) {
        const PhiloxWords words = mask.words(row, col & ~3ll);
        const bool upper = (col & 2) != 0;
        v0 = masked_dz<ACT>(v0, a0, upper ? words.w[2] : words.w[0], mask, keep_prob);
        v1 = masked_dz<ACT>(v1, a1, upper ? words.w[3] : words.w[1], mask, keep_prob);
    } else if constexpr (ACT != ACT_IDENTITY) {
        v0 = act_backward<ACT>(v0, a0, a0);
        v1 = act_backward<ACT>(v1, a1, a1);
    }
}

// For an act' that reads z (gelu, gelu_tanh, silu; z is the layer below's): dx as the identity
// epilogue stored it, times act'(z) (and the mask), a pair at a time in a loop that is not
// unrolled (unrolled over the 32 pairs, erf or tanh would multiply the file's compile time); each
// thread re-reads only what it stored itself (no barrier).
template <int ACT, bool DROPOUT>
__device__ __forceinline__ void dx_act_after_store(float* dx, const float* z, const Tf32Fragment& frag, long long m0,
                                                   long long n0, long long M, long long N, bool vector,
                                                   const DropoutMask& mask, float keep_prob) {
    using T = Tf32Tile;
#pragma unroll 1
    for (int p = 0; p < T::TILES_M * T::TILES_N * 2; ++p) {
        const int i = p / (2 * T::TILES_N), j = (p / 2) % T::TILES_N, half = p % 2;
        const long long row = m0 + frag.row(i, half), col = n0 + frag.col(j);
        if (row >= M || col >= N) continue;
        const bool pair = col + 1 < N;
        float v0 = 0.0f, v1 = 0.0f, a0 = 0.0f, a1 = 0.0f;
        read_pair(dx, row * N + col, v0, v1, pair, vector);
        read_pair(z, row * N + col, a0, a1, pair, vector);
        dz_of_pair<ACT, DROPOUT>(v0, v1, a0, a1, row, col, mask, keep_prob);
        store_pair(dx, row * N + col, v0, v1, pair, vector);
    }
}

// E: float (tf32 products) or bf16_bits (dz (B, padded out), W (padded in, padded out) and x
// (B, padded in) from round_bf16).
// act_in: what act' of the layer below reads (its output, or z for gelu, gelu_tanh and silu),
// which the epilogue applies (act); identity reads nothing. DROPOUT: that output carried a
// Dropout's mask (act_in is the masked output), regenerated as its dz pass would (dz_of_pair).
template <class E, bool DROPOUT>
__device__ __forceinline__ void dense_dx_mma(const E* __restrict__ dz, const E* __restrict__ w,
                                             float* __restrict__ dx, const float* __restrict__ act_in, int B_, int in_,
                                             int out_, int act, DropoutMask mask, float keep_prob) {
    using T = MmaTile<E>;
    extern __shared__ __align__(16) float smem[];
    const long long M = B_, N = in_, K = T::padded(out_);
    const long long m0 = static_cast<long long>(blockIdx.x) * T::BM;
    const long long n0 = static_cast<long long>(blockIdx.y) * T::BN;
    Tf32Fragment frag;
    mma_gemm(Operand<true, E>{dz, K, M}, Operand<true, E>{w, K, N}, 0, K, m0, n0, smem, frag);
    with_activation<ActSet::ALL>(act, [&](auto activation) {
        constexpr int ACT = decltype(activation)::ID;
        // Those that read z: the identity epilogue's plain store, then the after-store pass.
        constexpr bool AFTER_STORE = act_needs_z<ACT>();
        const bool vector = pairs_aligned(dx, N) && (ACT == ACT_IDENTITY || pairs_aligned(act_in, N));
        tf32_for_each_pair(frag, m0, n0, M, N, [&](long long row, long long col, float v0, float v1, bool pair) {
            if constexpr (!AFTER_STORE) {
                float a0 = 0.0f, a1 = 0.0f;
                if constexpr (ACT != ACT_IDENTITY) read_pair(act_in, row * N + col, a0, a1, pair, vector);
                dz_of_pair<ACT, DROPOUT>(v0, v1, a0, a1, row, col, mask, keep_prob);
            }
            store_pair(dx, row * N + col, v0, v1, pair, vector);
        });
        if constexpr (AFTER_STORE) dx_act_after_store<ACT, DROPOUT>(dx, act_in, frag, m0, n0, M, N, vector, mask, keep_prob);
    });
}

template <class E>
__device__ __forceinline__ void dense_dw_mma(const E* __restrict__ x, const E* __restrict__ dz,
                                             float* __restrict__ dw, float* __restrict__ ws,
                                             unsigned int* __restrict__ tickets, int B_, int in_, int out_,
                                             int k_chunk, int splits) {
    using T = MmaTile<E>;
    extern __shared__ __align__(16) float smem[];
    const long long M = in_, N = out_, K = B_, ldx = T::padded(in_), lddz = T::padded(out_);
    const long long m0 = static_cast<long long>(blockIdx.x) * T::BM;
    const long long n0 = static_cast<long long>(blockIdx.y) * T::BN;
    const SplitRows batch_rows = SplitRows::of(K, k_chunk, blockIdx.z);
    Tf32Fragment frag;
    mma_gemm(Operand<false, E>{x, ldx, ldx}, Operand<false, E>{dz, lddz, lddz}, batch_rows.begin, batch_rows.end, m0,
             n0, smem, frag);
    float* out = split_k_partial(dw, ws, M * N, splits, blockIdx.z);
    const bool vector = pairs_aligned(out, N);
    tf32_for_each_pair(frag, m0, n0, M, N, [&](long long row, long long col, float v0, float v1, bool pair) {
        store_pair(out, row * N + col, v0, v1, pair, vector);
    });
    if (splits == 1) return;  // uniform across the launch
    unsigned int* ticket = tickets + blockIdx.y * gridDim.x + blockIdx.x;
    if (!split_k_arrived_last(ticket, splits)) return;
    const int rows = static_cast<int>(M - m0 < T::BM ? M - m0 : T::BM);
    const int cols = static_cast<int>(N - n0 < T::BN ? N - n0 : T::BN);
    split_k_sum(ws, M * N, splits, dw, N, m0, rows, n0, cols);
    split_k_reset(ticket);
}

}  // namespace gpubp

#define GPUBP_DENSE_DZ_DB_ENTRY(NAME, ID)                                                                    \
    extern "C" __global__ void __launch_bounds__(gpubp::DzShape::THREADS)                                   \
        dense_dz_db_##NAME(const float* __restrict__ dy, const float* __restrict__ y_or_z, float* __restrict__ dz, \
                           float* __restrict__ db, float* __restrict__ ws_db, unsigned int* __restrict__ tickets, \
                           int B, int out, int store_dz, int sum_db, int row_chunk, int splits) {             \
        gpubp::dense_dz<ID>(dy, y_or_z, dz, db, ws_db, tickets, B, out, store_dz, sum_db, row_chunk, splits);  \
    }

#define GPUBP_DENSE_GRAD_MMA_ENTRIES(PREC, E, TILE)                                                          \
    extern "C" __global__ void __launch_bounds__(gpubp::TILE::THREADS, gpubp::TILE::MIN_BLOCKS)            \
        dense_dx_##PREC(const E* __restrict__ dz, const E* __restrict__ w, float* __restrict__ dx,            \
                        const float* __restrict__ act_in, int B, int in, int out, int act) {                  \
        GPUBP_ONLY_KERNEL_GUARD(dense_dx_##PREC)                                                              \
        gpubp::dense_dx_mma<E, false>(dz, w, dx, act_in, B, in, out, act, gpubp::DropoutMask{}, 1.0f);       \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(gpubp::TILE::THREADS, gpubp::TILE::MIN_BLOCKS)            \
        dense_dx_##PREC##_dropout(const E* __restrict__ dz, const E* __restrict__ w, float* __restrict__ dx,  \
                                  const float* __restrict__ act_in, int B, int in, int out, int act,          \
                                  const unsigned int* __restrict__ key, unsigned int threshold, float scale,  \
                                  long long first_row, float keep_prob) {                                     \
        GPUBP_ONLY_KERNEL_GUARD(dense_dx_##PREC##_dropout)                                                    \
        const gpubp::DropoutMask mask = gpubp::DropoutMask::read(key, threshold, scale, first_row);          \
        gpubp::dense_dx_mma<E, true>(dz, w, dx, act_in, B, in, out, act, mask, keep_prob);                   \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(gpubp::TILE::THREADS, gpubp::TILE::MIN_BLOCKS)            \
        dense_dw_##PREC(const E* __restrict__ x, const E* __restrict__ dz, float* __restrict__ dw,            \
                        float* __restrict__ ws, unsigned int* __restrict__ tickets, int B, int in, int out,   \
                        int k_chunk, int splits) {                                                            \
        GPUBP_ONLY_KERNEL_GUARD(dense_dw_##PREC)                                                              \
        gpubp::dense_dw_mma<E>(x, dz, dw, ws, tickets, B, in, out, k_chunk, splits);                         \
    }

#define GPUBP_DENSE_DZ_DROPOUT_TF32_ENTRY(NAME, ID)                                                          \
    extern "C" __global__ void __launch_bounds__(gpubp::DzShape::THREADS)                                   \
        dense_dz_db_dropout_##NAME(const float* __restrict__ dy, const float* __restrict__ act_in,          \
                                   float* __restrict__ dz, float* __restrict__ db, float* __restrict__ ws_db, \
                                   unsigned int* __restrict__ tickets, int B, int out, int sum_db, int row_chunk, \
                                   int splits, const unsigned int* __restrict__ key, unsigned int threshold,  \
                                   float scale, long long first_row, float keep_prob) {                      \
        const gpubp::DropoutMask mask = gpubp::DropoutMask::read(key, threshold, scale, first_row);          \
        gpubp::dense_dz_dropout<ID>(dy, act_in, dz, db, ws_db, tickets, B, out, sum_db, row_chunk, splits, mask, \
                                    keep_prob);                                                               \
    }

GPUBP_FOR_EACH_ACTIVATION(GPUBP_DENSE_DZ_DB_ENTRY)
GPUBP_FOR_EACH_ACTIVATION(GPUBP_DENSE_DZ_DROPOUT_TF32_ENTRY)
GPUBP_DENSE_GRAD_MMA_ENTRIES(tf32, float, Tf32Tile)
GPUBP_DENSE_GRAD_MMA_ENTRIES(bf16, gpubp::bf16_bits, Bf16Tile)
