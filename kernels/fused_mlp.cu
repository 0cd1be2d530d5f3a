// A whole narrow MLP in three launches, fp32 or on tensor cores (tf32, bf16):
//
//   fused_mlp_fwd:  h_0 = x;  z_l = h_l @ W_l + b_l;  h_{l+1} = act_l(z_l)   for l = 0 .. L-1
//   fused_mlp_bwd:  g = dy;  for l = top .. lo:  dz_l = g * act_l'(h_{l+1} or z_l);  g = dz_l @ W_l^T
//   fused_mlp_dw:   dW_l = h_l^T @ dz_l,  db_l = dz_l.sum(0)                  for every trainable l
//
// Widths: every layer's output width (hidden and output) is at most MAX_WIDTH = 128, so a
// block holds the activations of its batch rows for a whole layer in shared memory; the input
// width is any size (layer 0 streams x in K chunks). 1 to MAX_LAYERS = 8 layers, any batch size
// B. One fwd and one bwd kernel per precision serve every activation: a layer's is its plan's
// (LAYER_ACT), picked at run time once per layer by with_activation (activations.cuh) around the
// layer's whole forward epilogue or backward dz pass, each compiled with its activation fixed;
// the products are compiled once per kernel (the 7 epilogues of each pass, unrolled over a
// thread's tile, are now most of nvcc's time on this file). An id outside ActSet::ALL traps.
// The kernels take any mix of activations, one per layer, and so does the host.
// Layout: x (B, in); W_l (in_l, out_l); b_l (out_l,); every (B, width) array row-major and
// C-contiguous, as everywhere in gpubp. Per-layer arrays come as MAX_LAYERS pointer arguments
// each; slots the plan marks unused may be any valid pointer and are never touched.
//
// The plan (a small int array the host builds once per model shape, see PLAN_* below) says per
// layer its widths, its activation (an ActId) and what to store:
// - forward writes h_{l+1} to hout[l] only where backward reads it (the dW input of a trainable
//   layer l+1, or act_l' for layers from the lowest trainable one up), z_l to zout[l] only for
//   gelu, gelu_tanh and silu layers that backward differentiates, and always the output h_L. A frozen
//   prefix therefore stores nothing.
// - backward runs from the top layer down to the lowest layer that needs anything (lo): dz_l
//   stays in shared memory and goes to global memory (dz[l]) only for trainable layers, whose
//   dW needs it; g = dz_l @ W_l^T is computed only above lo, or for lo = 0 when the caller asks
//   for the input gradient (dx, any width: written straight to global memory in 128-column tiles).
// - dW/db: one launch for every trainable layer; grid.x enumerates (layer, row tile of W_l: 64
//   rows), grid.y splits the batch. With splits > 1 each block writes its
//   partial to ws, takes a ticket for its tile, and the last block of a tile sums the partials in
//   split order 0, 1, ... (split_k.cuh, as the dense dW kernels do): deterministic, no float
//   atomics. db_l is summed in fp32 in the blocks of W_l's first row tile, over the same split.
//
// Two implementations share the plan, the entry points and the host's launch code:
// - fp32 (fused_mlp_fwd, fused_mlp_bwd, fused_mlp_dw; the "fp32, CUDA cores" section):
//   FMA on the CUDA cores. THREADS = 128 threads compute a ROWS x MAX_WIDTH = 64 x 128 tile of each
//   product in 8 x 8 thread tiles of 2 x 2 quads, warp w owning the 32-column strip 32 w ..; a warp
//   computes only its quads that hold a column below the product's width and a row below the batch
//   (16 x 8 per warp: at most one mma tile of padding). The layer's input stays in shared memory
//   (k-major); W_l (W_l^T; dz_l and h_l^T in dW; x's 128-deep chunks) is staged whole into shared
//   memory before each product, whose hot loop then reads only shared memory. Launch: fwd and bwd
//   grid ceil(B / 64), dw (dW tiles of 64 rows, splits); dynamic shared memory 100 KB (a 128 x LDA
//   activation buffer, LDA = 68, and a 128 x LDB stage, LDB = 132). Occupancy (shared memory, and
//   registers allow as much):
//   sm_90 2 blocks = 8 warps per SM, sm_80 1 block = 4 warps. Hot loop on sm_90 (ptxas 13.0):
//   1024 FFMA and 128 LDS.64 in 1159 instructions (88.4%) forward and backward, 1163 (88.0%) dW.
// - tensor cores (the _tf32 and _bf16 kernels; sm_80 and newer, kernels/mma.cuh): a warp owns
//   16 batch rows (or 16 rows of dW) and every column; the "tensor cores" section below gives the
//   data flow, the layouts, the shared memory (dynamic, 66 to 132 KB) and the occupancy. Operands
//   are rounded once, as they are staged (cvt.rna to tf32; round-to-nearest-even to bf16);
//   weights, stored activations and gradients stay fp32 in memory, and every sum accumulates in
//   fp32. Error: each product carries its operands' rounding (2^-11 relative for tf32, 2^-9 for
//   bf16), per layer about that times sqrt(K) max|a| max|b|, so relative to the largest value of
//   each result about 2e-3 (tf32) and 1e-2 (bf16) per layer on random data;
//   tests/test_kernels_on_cpu.py bounds whole models at FUSED_TOLERANCE.
// Boundaries: columns past a layer's width and k past its fan-in are staged as 0, rows past B are
// zeros or copies of row B - 1; none is stored, so any B, in and out_l <= 128 work.
// Global memory per forward block: its x rows once, every W_l and b_l once (from L2 after the
// first blocks), its stored rows once. Backward block: its dy rows, the stored act' inputs of
// its rows, every W_l in the span, its dz rows out. dW block: its split's rows of h_l and dz_l.
#include "activations.cuh"
#include "gemm_tile.cuh"
#include "mma.cuh"
#include "one_kernel.cuh"
#include "split_k.cuh"
#include "vector_access.cuh"

namespace gpubp {

struct Fused {
    static constexpr int MAX_LAYERS = 8;
    static constexpr int MAX_WIDTH = 128;
    static constexpr int ROWS = 64;     // batch rows per fwd/bwd block; W_l rows per dw block
    static constexpr int THREADS = 128;
    // fp32: shared row strides (floats) of the k-major operands. Activations A[k][r] (ROWS rows)
    // and the B stage B[k][c] (MAX_WIDTH columns), each padded by 4: rows 16-byte aligned for the
    // hot loop's float4 reads, 4 banks apart so the transposing stores of the K-contiguous loaders
    // (8 lanes along k) hit 32 distinct banks.
    static constexpr int LDA = ROWS + 4;
    static constexpr int LDB = MAX_WIDTH + 4;
    static constexpr int STRIP = MAX_WIDTH / (THREADS / 32);  // fp32: columns per warp
    // fp32: resident blocks per SM on sm_90, as shared memory allows (100 KB a block): registers to
    // match (ptxas: 163 to 183 a thread, no spills; 2 blocks allow up to 255).
    static constexpr int FP32_BLOCKS = 2;
};

// The plan: plan[PLAN_LAYERS] layers, plan[PLAN_IN] the input width, plan[PLAN_LOWEST] the
// lowest layer backward runs, plan[PLAN_INPUT_GRAD] 1 when backward writes dx; then PLAN_STRIDE
// ints per layer from PLAN_HEAD: output width, activation id, flags, first dw tile, ws offset.
enum PlanSlot : int {
    PLAN_LAYERS = 0,
    PLAN_IN = 1,
    PLAN_LOWEST = 2,
    PLAN_INPUT_GRAD = 3,
    PLAN_HEAD = 4,
    PLAN_STRIDE = 5,
    LAYER_OUT = 0,
    LAYER_ACT = 1,
    LAYER_FLAGS = 2,
    LAYER_FIRST_TILE = 3,  // fused_mlp_dw: this layer's first grid.x tile
    LAYER_WS = 4,          // fused_mlp_dw: this layer's offset in one split's partials
};
enum LayerFlag : int {
    STORE_H = 1,    // fwd writes h_{l+1} to hout[l]
    STORE_Z = 2,    // fwd writes z_l to zout[l]
    TRAINABLE = 4,  // bwd writes dz_l; dw computes dW_l, db_l
    STORE_DZ = 8,   // bwd writes dz_l, and nothing reads it here: a bias that trains under a frozen
                    // weight, summed into db_l by another kernel (dense_dz_db); no dW tile
};

struct LayerPlan {
    int in, out, act, flags, first_tile, ws;
    __device__ static LayerPlan of(const int* __restrict__ plan, int l) {
        const int* p = plan + PLAN_HEAD + l * PLAN_STRIDE;
        const int in = l == 0 ? plan[PLAN_IN] : plan[PLAN_HEAD + (l - 1) * PLAN_STRIDE + LAYER_OUT];
        return {in, p[LAYER_OUT], p[LAYER_ACT], p[LAYER_FLAGS], p[LAYER_FIRST_TILE], p[LAYER_WS]};
    }
    // fused_mlp_dw: the layer of this block's dW tile, the last trainable layer whose first tile is at
    // or before blockIdx.x.
    __device__ static int of_dw_tile(const int* __restrict__ plan) {
        int l = -1;
        for (int i = 0; i < plan[PLAN_LAYERS]; ++i) {
            const int* q = plan + PLAN_HEAD + i * PLAN_STRIDE;
            if ((q[LAYER_FLAGS] & TRAINABLE) && q[LAYER_FIRST_TILE] <= static_cast<int>(blockIdx.x)) l = i;
        }
        return l;
    }
};

// a[l] for a runtime l, by compare-and-select over the unrolled slots: indexing the array
// directly would put every kernel's pointer arrays in local memory.
template <class T>
__device__ __forceinline__ T layer_slot(const T (&a)[Fused::MAX_LAYERS], int l) {
    T r = a[0];
#pragma unroll
    for (int i = 1; i < Fused::MAX_LAYERS; ++i) r = l == i ? a[i] : r;
    return r;
}

// After a dW block has written its partial (splits > 1): the last block of its tile sums the
// splits' partials of dW_l rows m0 .. m0 + rows (and db_l, from W_l's first row tile) in split
// order, and resets the tile's ticket (split_k.cuh).
__device__ __forceinline__ void finish_split_weight_grads(float* __restrict__ ws, unsigned int* __restrict__ tickets,
                                                          const LayerPlan& p, float* dw_l, float* db_l, int m0,
                                                          int tile_rows, int splits, int ws_split_stride) {
    if (!split_k_arrived_last(&tickets[blockIdx.x], splits)) return;
    const int rows = p.in - m0 < tile_rows ? p.in - m0 : tile_rows;
    const long long dw_size = static_cast<long long>(p.in) * p.out;
    split_k_sum(ws + p.ws, ws_split_stride, splits, dw_l, p.out, m0, rows, 0, p.out);
    if (m0 == 0) split_k_sum(ws + p.ws + dw_size, ws_split_stride, splits, db_l, p.out, 0, 1, 0, p.out);
    split_k_reset(&tickets[blockIdx.x]);
}

// ----------------------------------------------------------------------------- fp32, CUDA cores
//
// A block computes a ROWS x MAX_WIDTH = 64 x 128 tile of a layer's product, A (64 x K) @ B (K x 128):
// forward h_l @ W_l, backward dz_l @ W_l^T, dw h_l^T @ dz_l. Warp w owns the 32-column strip
// 32 w .. 32 w + 31 and all 64 rows. A lane's 8 x 8 thread tile is QUADS x QUADS = 4 x 4 quads of
// 2 x 2: with lm = lane % 8 along rows and ln (lane / 8, its two bits swapped) along columns, row
// quad i holds rows 16 i + 2 lm + {0, 1} and column quad j columns 32 w + 8 j + 2 ln + {0, 1}. The
// warp's row quad i thus covers 16 rows and its column quad j 8 columns, the shape of one mma tile
// (16 x 8), and the product skips whole quads, warp-uniformly: it computes the first RQ row quads
// (those holding any of the block's rows below the batch, or below the fan-in in dW) and the first
// CQ column quads of the strip (those holding any column below the width), so at most 15 rows and
// 7 columns past the edge are computed, whatever the widths and the batch. The skipping must save
// issue slots, not predicate FFMAs off (they would still issue): RQ and CQ are fixed for a whole
// product and select, outside the k loop, one of the product's 16 instantiations (quads_product<RQ,
// CQ>); the full one (4, 4) is unrolled over a BK-deep slice, the 15 edge ones run one k per pass
// (the loop's few instructions a k, on tile edges only) to keep the code, and the compile time of
// the fp32 kernels, small (nvcc took about 40% longer on this file than with 4 x 4 quads and one
// product, when each activation had its own kernels); the epilogues, shared by all, guard per quad.
// Why 2 x 2 quads: the warp-uniform unit of work is (8 lanes x quad rows) x (4 lanes x quad
// columns), so only 2 x 2 quads (or 4 x 1 ones) make it one mma tile; 4 x 4 quads read with float4
// make it 32 x 16 or 16 x 32. The price is loads: each k, RQ LDS.64 of A (8 distinct 8-byte words,
// each read by 4 lanes) and CQ LDS.64 of B (4 distinct, each read by 8 lanes), 8 loads per 64 FFMA
// where float4 quads take 4: 88% FFMA in the full hot loop where 4 x 4 quads reach 94%. The
// swapped ln bits make a half-warp's two column pairs (ln 0 and 2, then 1 and 3) 4 columns apart,
// 4 LDA = 272 = 16 (mod 32) words in the k-major A[c][r], so the epilogues' 8-byte column stores
// into it hit 32 distinct banks per half-warp, as the hot loop's loads do.
// K runs to the fan-in rounded up to BK = 16 (to the fan-in in the edge instantiations); the padding
// must be zeros, so an epilogue that writes the next product's A writes the column quads up to the
// width rounded up to BK, zeros past the width.
// Both operands of a product are resident in shared memory for up to MAX_WIDTH = 128 k, k-major:
// A[k][r] (row stride LDA) and B[k][c] (LDB), so the hot loop is pure math. The block stages them
// from global memory with gemm_tile.cuh's tile loaders, then runs the product: forward, a layer's
// input stays in the A buffer (x's 128-deep chunks for layer 0) and W_l is staged whole (per chunk);
// backward, g and dz stay in the A buffer and W_l^T is staged whole (per 128-column chunk of dx);
// dW, 128 batch rows of h_l^T and dz_l at a time. A layer's epilogue overwrites its input in place,
// after the barrier that ends its product, each thread writing the quads it owns as float2 columns;
// global stores are float2 per row of a quad (4 lanes: one whole 32-byte sector). Shared memory
// (dynamic, opted in by the host): MAX_WIDTH x (LDA + LDB) floats = 100 KB.
struct SimtTile {
    static constexpr int QUADS = 4;       // quads per thread along rows and along columns
    static constexpr int QUAD_ROWS = 16;  // rows of a warp's row quad: 8 lanes x 2
    static constexpr int QUAD_COLS = 8;   // columns of a warp's column quad: 4 lanes x 2
    int warp, row0, col0;
    __device__ static SimtTile of(int tid) {
        const int warp = tid / 32, lane = tid % 32;
        const int ln = 2 * ((lane / 8) % 2) + lane / 16;
        return {warp, 2 * (lane % 8), Fused::STRIP * warp + 2 * ln};
    }
    // Row i and column j of the thread's 8 x 8 tile: quad i / 2, its row (column) i % 2.
    __device__ int row(int i) const { return row0 + (i / 2) * QUAD_ROWS + i % 2; }
    __device__ int col(int j) const { return col0 + (j / 2) * QUAD_COLS + j % 2; }
    // Row quads holding any of the block's first `rows` rows: block-uniform.
    __device__ static int row_quads(long long rows) {
        const long long q = (rows + QUAD_ROWS - 1) / QUAD_ROWS;
        return q < 0 ? 0 : q > QUADS ? QUADS : static_cast<int>(q);
    }
    // Column quads of this warp's strip holding any of the first n columns: warp-uniform.
    __device__ int col_quads(int n) const {
        const int q = (n - Fused::STRIP * warp + QUAD_COLS - 1) / QUAD_COLS;
        return q < 0 ? 0 : q > QUADS ? QUADS : q;
    }
    // body(i, j, r, c) for the quads (i, j) with i < rq and j < cq, unrolled (acc stays in
    // registers): rows r + {0, 1}, columns c + {0, 1}.
    template <class Body>
    __device__ __forceinline__ void for_each_quad(int rq, int cq, Body body) const {
#pragma unroll
        for (int i = 0; i < QUADS; ++i)
#pragma unroll
            for (int j = 0; j < QUADS; ++j)
                if (i < rq && j < cq) body(i, j, row(2 * i), col(2 * j));
    }
};

using Acc = float[2 * SimtTile::QUADS][2 * SimtTile::QUADS];  // acc[row][column] of the thread tile

__device__ __forceinline__ float2 load2(const float* p) { return *reinterpret_cast<const float2*>(p); }

// acc += A[k][rows] B[k][cols] for one k over the first RQ x CQ quads.
template <int RQ, int CQ>
__device__ __forceinline__ void multiply_k(Acc& acc, const float* a, const float* b, const SimtTile& t) {
    float2 af[RQ], bf[CQ];
#pragma unroll
    for (int i = 0; i < RQ; ++i) af[i] = load2(a + t.row0 + SimtTile::QUAD_ROWS * i);
#pragma unroll
    for (int j = 0; j < CQ; ++j) bf[j] = load2(b + t.col0 + SimtTile::QUAD_COLS * j);
#pragma unroll
    for (int i = 0; i < RQ; ++i)
#pragma unroll
        for (int j = 0; j < CQ; ++j) {
            acc[2 * i][2 * j] = fmaf(af[i].x, bf[j].x, acc[2 * i][2 * j]);
            acc[2 * i][2 * j + 1] = fmaf(af[i].x, bf[j].y, acc[2 * i][2 * j + 1]);
            acc[2 * i + 1][2 * j] = fmaf(af[i].y, bf[j].x, acc[2 * i + 1][2 * j]);
            acc[2 * i + 1][2 * j + 1] = fmaf(af[i].y, bf[j].y, acc[2 * i + 1][2 * j + 1]);
        }
}

// acc += A[k][rows] B[k][cols] for k < K over the first RQ x CQ quads, both operands resident in
// shared memory (k-major, zero from K up to the next multiple of BK).
template <int RQ, int CQ>
__device__ __forceinline__ void quads_product(Acc& acc, const float* a, const float* b, int K, const SimtTile& t) {
    if constexpr (RQ == SimtTile::QUADS && CQ == SimtTile::QUADS) {
        for (int k0 = 0; k0 < K; k0 += BK) {
#pragma unroll
            for (int k = 0; k < BK; ++k)
                multiply_k<RQ, CQ>(acc, a + (k0 + k) * Fused::LDA, b + (k0 + k) * Fused::LDB, t);
        }
    } else {
#pragma unroll 1
        for (int k = 0; k < K; ++k) multiply_k<RQ, CQ>(acc, a + k * Fused::LDA, b + k * Fused::LDB, t);
    }
}

template <int RQ>
__device__ __forceinline__ void quads_product(Acc& acc, const float* a, const float* b, int K, const SimtTile& t,
                                              int cq) {
    switch (cq) {
        case 1: quads_product<RQ, 1>(acc, a, b, K, t); break;
        case 2: quads_product<RQ, 2>(acc, a, b, K, t); break;
        case 3: quads_product<RQ, 3>(acc, a, b, K, t); break;
        case 4: quads_product<RQ, 4>(acc, a, b, K, t); break;
        default: break;
    }
}

// acc += A[k][rows] B[k][cols] for k < K over the first rq row quads and cq column quads: the
// instantiation for (rq, cq) is picked once, outside the k loop.
__device__ __forceinline__ void resident_product(Acc& acc, const float* a, const float* b, int K, const SimtTile& t,
                                                 int rq, int cq) {
    static_assert(SimtTile::QUADS == 4, "one case per quad count");
    switch (rq) {
        case 1: quads_product<1>(acc, a, b, K, t, cq); break;
        case 2: quads_product<2>(acc, a, b, K, t, cq); break;
        case 3: quads_product<3>(acc, a, b, K, t, cq); break;
        case 4: quads_product<4>(acc, a, b, K, t, cq); break;
        default: break;
    }
}

__device__ __forceinline__ void zero(Acc& acc) {
#pragma unroll
    for (int i = 0; i < 2 * SimtTile::QUADS; ++i)
#pragma unroll
        for (int j = 0; j < 2 * SimtTile::QUADS; ++j) acc[i][j] = 0.0f;
}

// Staging a K x O operand (K <= MAX_WIDTH) into a k-major shared buffer dst[k][o] of row stride LD,
// through one of gemm_tile.cuh's tile loaders (LoadT: OContiguousTile or KContiguousTile, scalar
// form, init()-ed at the first k), BK rows a time; rows from K up to the next multiple of BK are 0.
// With COLSUM, also adds the loader's staged values to sums (OContiguousTile::add_column_sums).
template <bool COLSUM = false, class LoadT, class Sums = float[1]>
__device__ __forceinline__ void stage_operand(float* dst, int ld, LoadT& tile, int K, Sums* sums = nullptr) {
    const int whole = K / BK, tail = K % BK;
    for (int s = 0; s < whole; ++s) {
        tile.load(s);
        tile.store(dst + s * BK * ld);
        if constexpr (COLSUM) tile.add_column_sums(*sums);
    }
    if (tail) {
        tile.load_tail(whole, tail);
        tile.store(dst + whole * BK * ld);
        if constexpr (COLSUM) tile.add_column_sums(*sums);
    }
}

// dst[k][r] = src[(row0 + r) * ld + k0 + k] for the block's ROWS rows (rows past `rows` repeat the
// last one: never stored): K columns of a row-major (rows, ld) array, transposed.
__device__ __forceinline__ void stage_rows_k_major(float* dst, const float* __restrict__ src, long long ld,
                                                   long long row0, long long rows, long long k0, int K) {
    KContiguousTile<Fused::ROWS, Fused::THREADS, Fused::LDA, false> tile;
    tile.init(src, ld, row0, rows, k0, threadIdx.x);
    stage_operand(dst, Fused::LDA, tile, K);
}

// dst[k][c] = w[(k0 + k) * N + c], 0 past N: K rows of a row-major (., N) array, N <= MAX_WIDTH.
template <bool COLSUM = false, class Sums = float[1]>
__device__ __forceinline__ void stage_rows_of(float* dst, const float* __restrict__ w, int N, long long k0, int K,
                                              Sums* sums = nullptr) {
    OContiguousTile<Fused::MAX_WIDTH, Fused::THREADS, Fused::LDB, false> tile;
    tile.init(w, N, 0, N, k0, threadIdx.x);
    stage_operand<COLSUM>(dst, Fused::LDB, tile, K, sums);
}

// The quad (i, j) of a thread's tile, rows t.row(2 i) + {0, 1}, columns t.col(2 j) + {0, 1}, and how
// it moves.
struct Quad {
    float v[2][2];  // v[row][column]
    __device__ static Quad of(const Acc& acc, int i, int j) {
        return {{{acc[2 * i][2 * j], acc[2 * i][2 * j + 1]}, {acc[2 * i + 1][2 * j], acc[2 * i + 1][2 * j + 1]}}};
    }
    // Columns into an activation buffer A[c][r], as float2 over the 2 rows.
    __device__ void store_columns(float* buf, int r, int c) const {
#pragma unroll
        for (int jj = 0; jj < 2; ++jj)
            *reinterpret_cast<float2*>(buf + (c + jj) * Fused::LDA + r) = make_float2(v[0][jj], v[1][jj]);
    }
    __device__ void load_columns(const float* buf, int r, int c) {
#pragma unroll
        for (int jj = 0; jj < 2; ++jj) {
            const float2 f = load2(buf + (c + jj) * Fused::LDA + r);
            v[0][jj] = f.x, v[1][jj] = f.y;
        }
    }
    // Rows into a row-major array of row stride ld: columns c, c + 1 (those below n) of rows row,
    // row + 1 (those below B); a float2 store where the row allows it (vec) and both columns are in.
    __device__ void store_rows(float* out, int ld, long long row, int c, long long B, int n, bool vec) const {
#pragma unroll
        for (int ii = 0; ii < 2; ++ii) {
            if (row + ii >= B) continue;
            float* p = out + (row + ii) * ld + c;
            if (vec && c + 2 <= n) {
                *reinterpret_cast<float2*>(p) = make_float2(v[ii][0], v[ii][1]);
            } else {
#pragma unroll
                for (int jj = 0; jj < 2; ++jj)
                    if (c + jj < n) p[jj] = v[ii][jj];
            }
        }
    }
};

// v[0], v[1] = p[c], p[c + 1], those below n (0 past it): one float2 load where vec allows.
__device__ __forceinline__ void load_pair(float (&v)[2], const float* p, int c, int n, bool vec) {
    if (vec && c + 2 <= n) {
        const float2 f = load2(p + c);
        v[0] = f.x, v[1] = f.y;
    } else {
#pragma unroll
        for (int jj = 0; jj < 2; ++jj) v[jj] = c + jj < n ? p[c + jj] : 0.0f;
    }
}

// Column quads an epilogue writes into the next product's A: the width rounded up to BK, the
// next product's K padding, which must hold zeros.
__device__ __forceinline__ int written_quads(const SimtTile& t, int n) { return t.col_quads((n + BK - 1) / BK * BK); }

__device__ __forceinline__ void mlp_forward(const float* __restrict__ x, const float* const (&w)[Fused::MAX_LAYERS],
                                            const float* const (&b)[Fused::MAX_LAYERS],
                                            float* const (&hout)[Fused::MAX_LAYERS],
                                            float* const (&zout)[Fused::MAX_LAYERS], const int* __restrict__ plan,
                                            int B) {
    using F = Fused;
    // H[k][r]: the layer's input h_l^T (for layer 0, x's K chunk); Ws[k][c]: W_l (its K chunk).
    extern __shared__ __align__(16) unsigned int fused_smem[];
    float* H = reinterpret_cast<float*>(fused_smem);
    float* Ws = H + F::MAX_WIDTH * F::LDA;
    const long long row0 = static_cast<long long>(blockIdx.x) * F::ROWS;
    const SimtTile t = SimtTile::of(threadIdx.x);
    const int rq = SimtTile::row_quads(B - row0);
    const int layers = plan[PLAN_LAYERS];
    for (int l = 0; l < layers; ++l) {
        const LayerPlan p = LayerPlan::of(plan, l);
        Acc acc;
        zero(acc);
        for (int k0 = 0; k0 < p.in; k0 += F::MAX_WIDTH) {  // one chunk but for a wide x
            const int K = p.in - k0 < F::MAX_WIDTH ? p.in - k0 : F::MAX_WIDTH;
            __syncthreads();  // every warp is done with the previous chunk
            if (l == 0) stage_rows_k_major(H, x, p.in, row0, B, k0, K);
            stage_rows_of(Ws, layer_slot(w, l), p.out, k0, K);
            __syncthreads();  // the stages, and the previous layer's epilogue, are complete
            resident_product(acc, H, Ws, K, t, rq, t.col_quads(p.out));
        }
        __syncthreads();  // every warp has read H: the epilogue overwrites it
        const bool last = l == layers - 1;
        const float* bl = layer_slot(b, l);
        float* hl = layer_slot(hout, l);
        float* zl = layer_slot(zout, l);
        const bool vec = pairs_aligned(hl, p.out) && pairs_aligned(zl, p.out), vec_bias = pairs_aligned(bl, p.out);
        const int cq = written_quads(t, p.out);
        with_activation<ActSet::ALL>(p.act, [&](auto tag) {  // the layer's activation, fixed for its epilogue
            constexpr int ACT = decltype(tag)::ID;
#pragma unroll
            for (int j = 0; j < SimtTile::QUADS; ++j) {
                if (j >= cq) continue;
                const int c = t.col(2 * j);
                float bias[2];
                load_pair(bias, bl, c, p.out, vec_bias);
#pragma unroll
                for (int i = 0; i < SimtTile::QUADS; ++i) {
                    if (i >= rq) continue;
                    Quad z = Quad::of(acc, i, j), h;
#pragma unroll
                    for (int ii = 0; ii < 2; ++ii)
#pragma unroll
                        for (int jj = 0; jj < 2; ++jj) {
                            z.v[ii][jj] += bias[jj];
                            // Columns past the width are zeros: the next layer's last K slice reads them.
                            h.v[ii][jj] = c + jj >= p.out ? 0.0f : act_forward<ACT>(z.v[ii][jj]);
                        }
                    const int r = t.row(2 * i);
                    if (!last) h.store_columns(H, r, c);
                    if (p.flags & STORE_H) h.store_rows(hl, p.out, row0 + r, c, B, p.out, vec);
                    if (p.flags & STORE_Z) z.store_rows(zl, p.out, row0 + r, c, B, p.out, vec);
                }
            }
        });
    }
}

__device__ __forceinline__ void mlp_backward(const float* __restrict__ dy, float* __restrict__ dx,
                                             const float* const (&w)[Fused::MAX_LAYERS],
                                             const float* const (&act_in)[Fused::MAX_LAYERS],
                                             float* const (&dz)[Fused::MAX_LAYERS], const int* __restrict__ plan,
                                             int B) {
    using F = Fused;
    // G[c][r]: g, then dz, of the block's rows; Ws[k][c]: W_l^T (its column chunk).
    extern __shared__ __align__(16) unsigned int fused_smem[];
    float* G = reinterpret_cast<float*>(fused_smem);
    float* Ws = G + F::MAX_WIDTH * F::LDA;
    const long long row0 = static_cast<long long>(blockIdx.x) * F::ROWS;
    const SimtTile t = SimtTile::of(threadIdx.x);
    const int rq = SimtTile::row_quads(B - row0);
    const int top = plan[PLAN_LAYERS] - 1, lowest = plan[PLAN_LOWEST];
    const bool input_grad = plan[PLAN_INPUT_GRAD] != 0;
    const int out_top = LayerPlan::of(plan, top).out;
    stage_rows_k_major(G, dy, out_top, row0, B, 0, out_top);
    __syncthreads();
    for (int l = top; l >= lowest; --l) {
        const LayerPlan p = LayerPlan::of(plan, l);
        // dz = g * act'(.) in place, each thread on the quads it owns (and wrote, for l < top), zeros
        // past the width and the batch up to the product's K padding.
        {
            const float* saved_l = layer_slot(act_in, l);
            float* dz_l = layer_slot(dz, l);
            const bool vec = pairs_aligned(saved_l, p.out) && pairs_aligned(dz_l, p.out);
            with_activation<ActSet::ALL>(p.act, [&](auto tag) {  // the layer's activation, fixed for its dz pass
                constexpr int ACT = decltype(tag)::ID;
                t.for_each_quad(rq, written_quads(t, p.out), [&](int, int, int r, int c) {
                    Quad g;
                    g.load_columns(G, r, c);
#pragma unroll
                    for (int ii = 0; ii < 2; ++ii) {
                        const long long row = row0 + r + ii;
                        float saved[2] = {0.0f, 0.0f};
                        if (ACT != ACT_IDENTITY && row < B) load_pair(saved, saved_l + row * p.out, c, p.out, vec);
#pragma unroll
                        for (int jj = 0; jj < 2; ++jj) {
                            float& v = g.v[ii][jj];
                            if (row >= B || c + jj >= p.out) {
                                v = 0.0f;
                            } else if constexpr (ACT != ACT_IDENTITY) {
                                v = act_backward<ACT>(v, saved[jj], saved[jj]);  // reads y or z, whichever act' needs
                            }
                        }
                    }
                    g.store_columns(G, r, c);
                    if (p.flags & (TRAINABLE | STORE_DZ)) g.store_rows(dz_l, p.out, row0 + r, c, B, p.out, vec);
                });
            });
        }
        if (l == lowest && !input_grad) break;
        // g = dz @ W_l^T, (ROWS, out) x (out, in), in MAX_WIDTH-column chunks (one unless l = 0).
        const float* wl = layer_slot(w, l);
        const bool vec = l > 0 || pairs_aligned(dx, p.in);
        for (int n0 = 0; n0 < p.in; n0 += F::MAX_WIDTH) {
            const int cols = p.in - n0;
            __syncthreads();  // every warp is done with the previous stage; dz is complete
            KContiguousTile<F::MAX_WIDTH, F::THREADS, F::LDB, false> wt;  // B(k, n) = W_l[n0 + n][k]
            wt.init(wl, p.out, n0, p.in, 0, threadIdx.x);
            stage_operand(Ws, F::LDB, wt, p.out);
            __syncthreads();
            Acc acc;
            zero(acc);
            resident_product(acc, G, Ws, p.out, t, rq, t.col_quads(cols));
            __syncthreads();  // every warp has read G: the epilogue overwrites it (l > 0)
            // g for layer l - 1 into G, zeros past the width as in forward; or dx out.
            t.for_each_quad(rq, l > 0 ? written_quads(t, cols) : t.col_quads(cols), [&](int i, int j, int r, int c) {
                Quad g = Quad::of(acc, i, j);
#pragma unroll
                for (int ii = 0; ii < 2; ++ii)
#pragma unroll
                    for (int jj = 0; jj < 2; ++jj)
                        if (c + jj >= cols) g.v[ii][jj] = 0.0f;
                if (l > 0) {
                    g.store_columns(G, r, c);
                } else {
                    g.store_rows(dx + n0, p.in, row0 + r, c, B, cols, vec);
                }
            });
        }
    }
}


// ----------------------------------------------------------------------------- tensor cores
//
// fused_mlp_{fwd,bwd}_{tf32,bf16}: a warp owns 16 batch rows (MmaRows::ROWS = 64 per
// block) and every column of them, so a layer's input and output stay in the warp's own part of
// shared memory between layers and only the weight stage is shared by the block (fused_mlp_dw_*
// works the same way on 16 rows of dW per warp; see mlp_weight_grads_mma). Per layer (and per
// 128-deep K chunk of a wider x, or 128-column chunk of a wider dx):
//   1. the block stages B (W_l, or W_l^T in backward) into shared memory, rounded once (tf32 /
//      bf16) and laid out in mma fragment order: one uint4 per lane holds the B fragments of
//      two adjacent n8 tiles, so the hot loop reads B with one conflict-free 16-byte load per
//      two mma; only the k-steps and tile pairs the layer's widths need are staged;
//   2. the warp loads its 16 x K A fragments (the layer's input, already rounded in its buffer)
//      into registers once;
//   3. the warp runs ceil(out / 8) n8 tiles over ceil(in / MMA_K) k-steps in groups of 4 tiles
//      (a tail group of 1-3), writing the fp32 products to its Z buffer: no mma on columns
//      past the width, K past the fan-in, or a 16-row slab past the batch, beyond the padding of
//      one mma tile;
//   4. a row pass (32 lanes across a row: coalesced global stores) adds the bias, applies the
//      layer's activation (one with_activation branch around the whole pass),
//      stores what the plan asks for, and writes the next layer's A, rounded, over the Z buffer.
// Layouts, in 32-bit words (tf32: one operand per word; bf16: two, k and k + 1):
// - A buffer (per warp): rows g and g + 8 interleaved, row pair g at g * A_LD (A_LD = 272 = 16
//   mod 32), element (g + 8 h, column c) at word 2 c + h. tf32: c is a column. bf16: c is a
//   column pair, pair p of each 16-column group j at 8 j + 2 (p % 4) + p / 4. Either way a lane's
//   A fragment of k-step s, (a0, a1, a2, a3), is the 16 bytes at 16 s + 4 t of its row pair:
//   one conflict-free load. tf32 reads columns 8 s + 2 t, + 1 as mma k positions t and t + 4:
//   the k order inside a k-step is free as long as A and B agree (Op::k_of says which k each
//   register holds).
// - Z buffer: fp32 products in the same interleaved layout with c a column, so an accumulator's
//   (g, 2t), (g + 8, 2t), (g, 2t + 1), (g + 8, 2t + 1) are one 16-byte store, and a row pass reads
//   rows g and g + 8 of a column as 8 bytes. It is the A buffer itself (A is in registers by then)
//   except for a forward whose input is wider than 128, whose partial sums over K chunks need
//   their own buffer while x's next chunk is staged.
// - B stage: uint4 index (s * PAIRS + pair) * 32 + slot(g, t), components (b0, b1) of tile
//   2 pair and (b0, b1) of tile 2 pair + 1; slot(g, t) = 4 g + (t ^ (g >> 1)) swizzles the lanes
//   so that the staging stores (32 lanes: 16 columns x 2 k, or 8 k x 4 columns transposed)
//   also fall in 32 distinct banks; reads are 8 consecutive slots per quarter-warp either way.
// Launch: fwd and bwd grid ceil(B / 64), dw (dW tiles of 64 rows, splits); block 128 threads.
// Shared memory (dynamic, opted in above 48 KB by the host once per kernel): B stage 64 KB
// (tf32) or 32 KB (bf16), plus 4 x 8 x 272 words of A/Z buffers (34 KB), plus as much again for
// a forward with an input wider than 128: tf32 98 KB (132 KB), bf16 66 KB (100 KB). Registers
// (ptxas, sm_90): about 140 tf32, 110 bf16, so occupancy is set by shared memory: on sm_90
// (228 KB per SM) tf32 2 blocks = 8 warps per SM (1 block with a wide input), bf16 3 blocks = 12
// warps (2); on sm_80 (164 KB) tf32 1 block = 4 warps, bf16 2 blocks = 8 warps (1).
// Barriers: a stage is written between two __syncthreads (every warp done reading the last one,
// then every warp sees the new one); a warp's own buffers need only __syncwarp between the lanes
// that write and read them (its A fragments are in registers before Z overwrites them; a row
// pass reads a row pair's Z before it writes that row pair's A over it).
struct MmaRows {
    static constexpr int WARPS = Fused::THREADS / 32;
    static constexpr int ROWS = 16 * WARPS;                // batch rows per block
    static constexpr int A_LD = 2 * Fused::MAX_WIDTH + 16;  // words per row pair (g, g + 8) of A/Z
    static constexpr int A_WORDS = 8 * A_LD;                // one warp's A/Z buffer
    static constexpr int PAIRS = Fused::MAX_WIDTH / 16;    // n8 tile pairs across the widest layer
    static constexpr int GROUP = 4;                        // n8 tiles per pass over the k-steps
    __device__ static int slot(int g, int t) { return 4 * g + (t ^ (g >> 1)); }
};

struct Tf32Op {
    static constexpr int MMA_K = 8;
    static constexpr int BLOCKS = 2;  // per SM on sm_90, as shared memory allows: registers to match
    static constexpr bool PAIRED = false;  // one operand per word
    // The k a register holds in k-step s: r = 0 for a0/a1/b0 (mma k position t), 1 for a2/a3/b1
    // (position t + 4); columns 2t and 2t + 1, adjacent in the A buffer.
    __device__ static int k_of(int s, int t, int r) { return MMA_K * s + 2 * t + r; }
    __device__ static int word_of(int c) { return c; }
    __device__ static void mma(float (&acc)[4], const unsigned int (&a)[4], unsigned int b0, unsigned int b1) {
        const unsigned int b[2] = {b0, b1};
        mma_m16n8k8_tf32(acc, a, b, acc);
    }
};

struct Bf16Op {
    static constexpr int MMA_K = 16;
    static constexpr int BLOCKS = 3;  // per SM on sm_90, as shared memory allows: registers to match
    static constexpr bool PAIRED = true;  // k and k + 1 in one word, k in the low half
    __device__ static int k_of(int s, int t, int r) { return MMA_K * s + 2 * t + 8 * r; }
    __device__ static int word_of(int c) {
        const int p = (c % 16) / 2;
        return 8 * (c / 16) + 2 * (p % 4) + p / 4;
    }
    __device__ static void mma(float (&acc)[4], const unsigned int (&a)[4], unsigned int b0, unsigned int b1) {
        const unsigned int b[2] = {b0, b1};
        mma_m16n8k16_bf16(acc, a, b, acc);
    }
};

// The B stage for one chunk: B(k, n) = w[(k0 + k) * N + n0 + n], or w[(n0 + n) * K + k0 + k] when
// TRANSPOSED, zero past K and N; k-steps and tile pairs past them are not staged. The lane bits of
// e are n (16 columns) and the k pair when not transposed, k (8) and 4 columns when transposed, so
// each warp reads whole 32-byte runs of the row-major source.
template <class Op, bool TRANSPOSED>
__device__ __forceinline__ void stage_b(unsigned int* __restrict__ bst, const float* __restrict__ w, int k0, int K,
                                        int n0, int N) {
    const int kvalid = K - k0 < Fused::MAX_WIDTH ? K - k0 : Fused::MAX_WIDTH;
    const int nvalid = N - n0 < Fused::MAX_WIDTH ? N - n0 : Fused::MAX_WIDTH;
    const int ksteps = (kvalid + Op::MMA_K - 1) / Op::MMA_K, pairs = (nvalid + 15) / 16;
    const auto value = [&](int k, int n) {
        if (k >= kvalid || n >= nvalid) return 0.0f;
        return TRANSPOSED ? w[static_cast<long long>(n0 + n) * K + k0 + k]
                          : w[static_cast<long long>(k0 + k) * N + n0 + n];
    };
    // bf16 from W^T: with K and k0 even, k < K - k0 implies k + 1 < K - k0 (k is even).
    [[maybe_unused]] const bool k_pairs_aligned =
        K % 2 == 0 && k0 % 2 == 0 && reinterpret_cast<unsigned long long>(w) % 8 == 0;
    for (int e = threadIdx.x; e < ksteps * pairs * 128; e += Fused::THREADS) {
        int g, q, r, t;
        if (TRANSPOSED) {
            r = e & 1, t = (e >> 1) & 3, q = (e >> 4) & 1, g = ((e >> 3) & 1) | ((e >> 4) & 6);
        } else {
            g = e & 7, q = (e >> 3) & 1, r = (e >> 4) & 1, t = (e >> 5) & 3;
        }
        const int pair = (e >> 7) % pairs, s = (e >> 7) / pairs;
        const int n = 16 * pair + 8 * q + g, k = Op::k_of(s, t, r);
        unsigned int word;
        if constexpr (Op::PAIRED) {
            if (TRANSPOSED && k_pairs_aligned) {  // k and k + 1 adjacent in the source: one 8-byte load
                float2 v = make_float2(0.0f, 0.0f);
                if (k < kvalid && n < nvalid) {
                    v = *reinterpret_cast<const float2*>(w + static_cast<long long>(n0 + n) * K + k0 + k);
                }
                word = pack_bf16x2(v.x, v.y);
            } else {
                word = pack_bf16x2(value(k, n), value(k + 1, n));
            }
        } else {
            word = to_tf32(value(k, n));
        }
        bst[4 * ((s * MmaRows::PAIRS + pair) * 32 + MmaRows::slot(g, t)) + 2 * q + r] = word;
    }
}

// Column c = lane + 32 i of the row pair (g, g + 8) at apair gets v (row g) and v8 (row g + 8),
// rounded: every lane of the warp calls it with its own column (bf16 pairs a column with its right
// neighbour's, by shuffle).
template <class Op>
__device__ __forceinline__ void store_a(unsigned int* __restrict__ apair, int c, float v, float v8) {
    if constexpr (Op::PAIRED) {
        const float right = __shfl_down_sync(0xffffffffu, v, 1), right8 = __shfl_down_sync(0xffffffffu, v8, 1);
        const uint2 words = {pack_bf16x2(v, right), pack_bf16x2(v8, right8)};
        if (c % 2 == 0) *reinterpret_cast<uint2*>(apair + 2 * Op::word_of(c)) = words;
    } else {
        const uint2 words = {to_tf32(v), to_tf32(v8)};
        *reinterpret_cast<uint2*>(apair + 2 * c) = words;
    }
}

// Z (r, c) and Z (r + 8, c) of the row pair at zpair, fp32.
__device__ __forceinline__ float2 load_z(const unsigned int* __restrict__ zpair, int c) {
    const uint2 u = *reinterpret_cast<const uint2*>(zpair + 2 * c);
    return make_float2(__uint_as_float(u.x), __uint_as_float(u.y));
}

// One warp's 16 rows: A fragments in registers, products into the Z buffer.
template <class Op>
struct WarpMma {
    static constexpr int KSTEPS = Fused::MAX_WIDTH / Op::MMA_K;
    unsigned int a[KSTEPS][4];
    int g, t;

    __device__ static WarpMma of(int lane) {
        WarpMma m;
        m.g = lane >> 2;
        m.t = lane & 3;
        return m;
    }

    __device__ void load_a(const unsigned int* __restrict__ abuf, int ksteps) {
#pragma unroll
        for (int s = 0; s < KSTEPS; ++s) {
            uint4 f = {0u, 0u, 0u, 0u};
            if (s < ksteps) f = *reinterpret_cast<const uint4*>(abuf + g * MmaRows::A_LD + 16 * s + 4 * t);
            a[s][0] = f.x, a[s][1] = f.y, a[s][2] = f.z, a[s][3] = f.w;
        }
    }

    // A(r, k) = value(r, k) for r < 16, k < 128, rounded: for an A each of whose elements only this
    // warp reads (dW's h_l^T), straight from global memory.
    template <class Value>
    __device__ void load_a_from(const Value& value, int ksteps) {
#pragma unroll
        for (int s = 0; s < KSTEPS; ++s) {
            if (s >= ksteps) break;
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int k = Op::k_of(s, t, r);
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    if constexpr (Op::PAIRED) {
                        a[s][2 * r + h] = pack_bf16x2(value(g + 8 * h, k), value(g + 8 * h, k + 1));
                    } else {
                        a[s][2 * r + h] = to_tf32(value(g + 8 * h, k));
                    }
                }
            }
        }
    }

    // Z[r][c] = (Z[r][c] if ACCUMULATE) + sum_k A(r, k) B(k, c) for the first 8 nt columns, over
    // ksteps k-steps.
    template <bool ACCUMULATE>
    __device__ void product(const unsigned int* __restrict__ bst, int nt, int ksteps,
                            unsigned int* __restrict__ z) const {
        int j0 = 0;
        for (; j0 + MmaRows::GROUP <= nt; j0 += MmaRows::GROUP) tiles<MmaRows::GROUP, ACCUMULATE>(bst, j0, ksteps, z);
        switch (nt - j0) {
            case 3: tiles<3, ACCUMULATE>(bst, j0, ksteps, z); break;
            case 2: tiles<2, ACCUMULATE>(bst, j0, ksteps, z); break;
            case 1: tiles<1, ACCUMULATE>(bst, j0, ksteps, z); break;
            default: break;
        }
    }

    template <int NT, bool ACCUMULATE>
    __device__ __forceinline__ void tiles(const unsigned int* __restrict__ bst, int j0, int ksteps,
                                          unsigned int* __restrict__ z) const {
        const uint4* b = reinterpret_cast<const uint4*>(bst) + (j0 / 2) * 32 + MmaRows::slot(g, t);
        // The accumulator's (g, 2t), (g, 2t + 1), (g + 8, 2t), (g + 8, 2t + 1) are Z words
        // 2 c, 2 c + 2, 2 c + 1, 2 c + 3 of row pair g, c = 8 j + 2 t: one 16-byte access.
        uint4* zt = reinterpret_cast<uint4*>(z + g * MmaRows::A_LD + 16 * j0 + 4 * t);
        // The k loop starts from zeros either way, and ACCUMULATE adds Z's partial sums after it. Fed
        // to the mma as its C, they would have to sit in the mma's register order (c0 c1 c2 c3) at
        // every early exit below, while the 16-byte Z access holds them as c0 c2 c1 c3: ptxas then
        // moved all 4 NT accumulators back after every k-step, 16 MOVs per 4 HMMA.
        float acc[NT][4];
#pragma unroll
        for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
#pragma unroll
        for (int s = 0; s < KSTEPS; ++s) {
            if (s >= ksteps) break;  // warp-uniform
#pragma unroll
            for (int p = 0; p < (NT + 1) / 2; ++p) {
                const uint4 bp = b[(s * MmaRows::PAIRS + p) * 32];
                Op::mma(acc[2 * p], a[s], bp.x, bp.y);
                if (2 * p + 1 < NT) Op::mma(acc[2 * p + 1], a[s], bp.z, bp.w);
            }
        }
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            if (ACCUMULATE) {
                const uint4 f = zt[4 * j];
                acc[j][0] += __uint_as_float(f.x), acc[j][1] += __uint_as_float(f.z);
                acc[j][2] += __uint_as_float(f.y), acc[j][3] += __uint_as_float(f.w);
            }
            const uint4 f = {__float_as_uint(acc[j][0]), __float_as_uint(acc[j][2]), __float_as_uint(acc[j][1]),
                             __float_as_uint(acc[j][3])};
            zt[4 * j] = f;
        }
    }
};

template <class Op>
__device__ __forceinline__ void mlp_forward_mma(const float* __restrict__ x, const float* const (&w)[Fused::MAX_LAYERS],
                                                const float* const (&b)[Fused::MAX_LAYERS],
                                                float* const (&hout)[Fused::MAX_LAYERS],
                                                float* const (&zout)[Fused::MAX_LAYERS], const int* __restrict__ plan,
                                                int B) {
    using F = Fused;
    using R = MmaRows;
    extern __shared__ __align__(16) unsigned int fused_smem[];
    constexpr int B_WORDS = WarpMma<Op>::KSTEPS * R::PAIRS * 128;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    unsigned int* bst = fused_smem;
    unsigned int* abuf = fused_smem + B_WORDS + warp * R::A_WORDS;
    // An input wider than one chunk keeps its partial sums apart from the staged x.
    unsigned int* zbuf = plan[PLAN_IN] > F::MAX_WIDTH ? abuf + R::WARPS * R::A_WORDS : abuf;
    const long long row0 = static_cast<long long>(blockIdx.x) * R::ROWS + 16 * warp;  // this warp's rows
    const bool active = row0 < B;  // warp-uniform: a slab wholly past the batch does no math
    WarpMma<Op> m = WarpMma<Op>::of(lane);
    const int layers = plan[PLAN_LAYERS];
    for (int l = 0; l < layers; ++l) {
        const LayerPlan p = LayerPlan::of(plan, l);
        const float* wl = layer_slot(w, l);
        const int nt = (p.out + 7) / 8;
        for (int k0 = 0; k0 < p.in; k0 += F::MAX_WIDTH) {
            __syncthreads();  // every warp is done with the previous stage
            stage_b<Op, false>(bst, wl, k0, p.in, 0, p.out);
            if (l == 0 && active) {  // x's chunk into this warp's A buffer, zero past B and in
                for (int r = 0; r < 8; ++r) {
                    const long long row = row0 + r, row8 = row + 8;
#pragma unroll
                    for (int i = 0; i < F::MAX_WIDTH / 32; ++i) {
                        const int c = lane + 32 * i;
                        const bool in_x = k0 + c < p.in;
                        store_a<Op>(abuf + r * R::A_LD, c, in_x && row < B ? x[row * p.in + k0 + c] : 0.0f,
                                    in_x && row8 < B ? x[row8 * p.in + k0 + c] : 0.0f);
                    }
                }
            }
            __syncthreads();
            if (active) {
                const int kvalid = p.in - k0 < F::MAX_WIDTH ? p.in - k0 : F::MAX_WIDTH;
                const int ksteps = (kvalid + Op::MMA_K - 1) / Op::MMA_K;
                m.load_a(abuf, ksteps);
                __syncwarp();  // every lane has its A before Z (which may be the A buffer) is written
                if (k0 == 0) {
                    m.template product<false>(bst, nt, ksteps, zbuf);
                } else {
                    m.template product<true>(bst, nt, ksteps, zbuf);
                }
            }
        }
        if (!active) continue;
        __syncwarp();  // the row pass reads Z written by other lanes
        const bool last = l == layers - 1;
        const float* bl = layer_slot(b, l);
        float* hl = layer_slot(hout, l);
        float* zl = layer_slot(zout, l);
        float bias[F::MAX_WIDTH / 32];
#pragma unroll
        for (int i = 0; i < F::MAX_WIDTH / 32; ++i) bias[i] = lane + 32 * i < p.out ? bl[lane + 32 * i] : 0.0f;
        with_activation<ActSet::ALL>(p.act, [&](auto tag) {  // the layer's activation, fixed for its row pass
            constexpr int ACT = decltype(tag)::ID;
            for (int r = 0; r < 8; ++r) {  // rows r and r + 8
                float2 z[F::MAX_WIDTH / 32];
#pragma unroll
                for (int i = 0; i < F::MAX_WIDTH / 32; ++i) {
                    const int c = lane + 32 * i;
                    z[i] = c < p.out ? load_z(zbuf + r * R::A_LD, c) : make_float2(0.0f, 0.0f);
                    z[i].x += bias[i], z[i].y += bias[i];
                }
                __syncwarp();  // bf16: the row pair's A words overlap its Z words
#pragma unroll
                for (int i = 0; i < F::MAX_WIDTH / 32; ++i) {
                    const int c = lane + 32 * i;
                    const bool valid = c < p.out;
                    float h[2] = {z[i].x, z[i].y};
                    const float zi[2] = {z[i].x, z[i].y};
#pragma unroll
                    for (int half = 0; half < 2; ++half) {
                        const long long row = row0 + r + 8 * half;
                        if (valid) h[half] = act_forward<ACT>(zi[half]);
                        if (valid && row < B) {
                            if (p.flags & STORE_H) hl[row * p.out + c] = h[half];
                            if (p.flags & STORE_Z) zl[row * p.out + c] = zi[half];
                        }
                    }
                    if (!last) store_a<Op>(abuf + r * R::A_LD, c, h[0], h[1]);  // zero past the width: K's padding
                }
            }
        });
        __syncwarp();
    }
}

template <class Op>
__device__ __forceinline__ void mlp_backward_mma(const float* __restrict__ dy, float* __restrict__ dx,
                                                 const float* const (&w)[Fused::MAX_LAYERS],
                                                 const float* const (&act_in)[Fused::MAX_LAYERS],
                                                 float* const (&dz)[Fused::MAX_LAYERS], const int* __restrict__ plan,
                                                 int B) {
    using F = Fused;
    using R = MmaRows;
    extern __shared__ __align__(16) unsigned int fused_smem[];
    constexpr int B_WORDS = WarpMma<Op>::KSTEPS * R::PAIRS * 128;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    unsigned int* bst = fused_smem;
    unsigned int* abuf = fused_smem + B_WORDS + warp * R::A_WORDS;  // also Z: g, fp32
    const long long row0 = static_cast<long long>(blockIdx.x) * R::ROWS + 16 * warp;
    const bool active = row0 < B;
    WarpMma<Op> m = WarpMma<Op>::of(lane);
    const int top = plan[PLAN_LAYERS] - 1, lowest = plan[PLAN_LOWEST];
    const bool input_grad = plan[PLAN_INPUT_GRAD] != 0;
    if (active) {  // g = dy, in Z's layout
        const int out = LayerPlan::of(plan, top).out;
        for (int r = 0; r < 8; ++r) {
            const long long row = row0 + r, row8 = row + 8;
#pragma unroll
            for (int i = 0; i < F::MAX_WIDTH / 32; ++i) {
                const int c = lane + 32 * i;
                if (c < out) {
                    const uint2 g = {__float_as_uint(row < B ? dy[row * out + c] : 0.0f),
                                     __float_as_uint(row8 < B ? dy[row8 * out + c] : 0.0f)};
                    *reinterpret_cast<uint2*>(abuf + r * R::A_LD + 2 * c) = g;
                }
            }
        }
        __syncwarp();
    }
    for (int l = top; l >= lowest; --l) {
        const LayerPlan p = LayerPlan::of(plan, l);
        if (active) {  // dz = g * act'(.): out to dz_l for a trainable layer, rounded into A
            const float* saved_l = layer_slot(act_in, l);
            float* dz_l = layer_slot(dz, l);
            with_activation<ActSet::ALL>(p.act, [&](auto tag) {  // the layer's activation, fixed for its dz pass
                constexpr int ACT = decltype(tag)::ID;
                for (int r = 0; r < 8; ++r) {  // rows r and r + 8
                    float2 g[F::MAX_WIDTH / 32];
#pragma unroll
                    for (int i = 0; i < F::MAX_WIDTH / 32; ++i) {
                        const int c = lane + 32 * i;
                        g[i] = c < p.out ? load_z(abuf + r * R::A_LD, c) : make_float2(0.0f, 0.0f);
                    }
                    __syncwarp();  // bf16: the row pair's A words overlap its g words
#pragma unroll
                    for (int i = 0; i < F::MAX_WIDTH / 32; ++i) {
                        const int c = lane + 32 * i;
                        float dzv[2] = {g[i].x, g[i].y};
#pragma unroll
                        for (int half = 0; half < 2; ++half) {
                            const long long row = row0 + r + 8 * half;
                            if (c < p.out && row < B) {
                                if constexpr (ACT != ACT_IDENTITY) {
                                    const float saved = saved_l[row * p.out + c];
                                    dzv[half] = act_backward<ACT>(dzv[half], saved, saved);  // y or z, as act' needs
                                }
                                if (p.flags & (TRAINABLE | STORE_DZ)) dz_l[row * p.out + c] = dzv[half];
                            } else {
                                dzv[half] = 0.0f;
                            }
                        }
                        store_a<Op>(abuf + r * R::A_LD, c, dzv[0], dzv[1]);
                    }
                }
            });
            __syncwarp();
        }
        if (l == lowest && !input_grad) break;
        // g = dz @ W_l^T, (16, out) x (out, in) per warp, in 128-column chunks (one unless l = 0).
        const float* wl = layer_slot(w, l);
        const int ksteps = (p.out + Op::MMA_K - 1) / Op::MMA_K;
        if (active) {
            m.load_a(abuf, ksteps);
            __syncwarp();  // Z overwrites the A buffer
        }
        for (int n0 = 0; n0 < p.in; n0 += F::MAX_WIDTH) {
            __syncthreads();
            stage_b<Op, true>(bst, wl, 0, p.out, n0, p.in);
            __syncthreads();
            if (!active) continue;
            const int cols = p.in - n0 < F::MAX_WIDTH ? p.in - n0 : F::MAX_WIDTH;
            m.template product<false>(bst, (cols + 7) / 8, ksteps, abuf);
            __syncwarp();
            if (l > 0) continue;  // g stays in Z for layer l - 1
            for (int r = 0; r < 8; ++r) {
                const long long row = row0 + r, row8 = row + 8;
#pragma unroll
                for (int i = 0; i < F::MAX_WIDTH / 32; ++i) {
                    const int c = lane + 32 * i;
                    if (c >= cols) continue;
                    const float2 v = load_z(abuf + r * R::A_LD, c);
                    if (row < B) dx[row * p.in + n0 + c] = v.x;
                    if (row8 < B) dx[row8 * p.in + n0 + c] = v.y;
                }
            }
            __syncwarp();  // the next chunk's products overwrite Z
        }
    }
}

// dW/db on tensor cores: a block owns MmaRows::ROWS = 64 rows of dW_l (16 per warp) and all its
// columns; over its split's batch rows in 128-row chunks, the block stages dz_l's chunk as B (as
// the forward stages W_l), each warp loads its A = h_l^T fragments straight from global memory,
// rounded (every element is read by one warp only), and accumulates into its Z buffer, which it
// then writes out row by row. db sums dz_l from global memory in fp32, in the blocks of W_l's first
// row tile, one thread per column. Shared memory: the B stage and 4 Z buffers, as the forward.
template <class Op>
__device__ __forceinline__ void mlp_weight_grads_mma(const float* const (&h)[Fused::MAX_LAYERS],
                                                     const float* const (&dz)[Fused::MAX_LAYERS],
                                                     float* const (&dw)[Fused::MAX_LAYERS],
                                                     float* const (&db)[Fused::MAX_LAYERS], float* __restrict__ ws,
                                                     unsigned int* __restrict__ tickets, const int* __restrict__ plan,
                                                     int B, int k_chunk, int splits, int ws_split_stride) {
    using F = Fused;
    using R = MmaRows;
    extern __shared__ __align__(16) unsigned int fused_smem[];
    constexpr int B_WORDS = WarpMma<Op>::KSTEPS * R::PAIRS * 128;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    unsigned int* bst = fused_smem;
    unsigned int* zbuf = fused_smem + B_WORDS + warp * R::A_WORDS;
    const int l = LayerPlan::of_dw_tile(plan);
    const LayerPlan p = LayerPlan::of(plan, l);
    const float* h_l = layer_slot(h, l);
    const float* dz_l = layer_slot(dz, l);
    float* dw_l = layer_slot(dw, l);
    float* db_l = layer_slot(db, l);
    const int m0 = (static_cast<int>(blockIdx.x) - p.first_tile) * R::ROWS;
    const int mw = m0 + 16 * warp;  // this warp's first row of dW_l
    const bool active = mw < p.in;
    const SplitRows batch_rows = SplitRows::of(B, k_chunk, blockIdx.y);
    const long long k_begin = batch_rows.begin, k_end = batch_rows.end;
    static_assert(Fused::THREADS == Fused::MAX_WIDTH, "db: one thread per column");
    const bool owns_db = m0 == 0 && static_cast<int>(threadIdx.x) < p.out;
    const int nt = (p.out + 7) / 8;
    WarpMma<Op> m = WarpMma<Op>::of(lane);
    float colsum = 0.0f;
    for (long long b0 = k_begin; b0 < k_end; b0 += F::MAX_WIDTH) {
        const int rows = k_end - b0 < F::MAX_WIDTH ? static_cast<int>(k_end - b0) : F::MAX_WIDTH;
        __syncthreads();  // every warp is done with the previous stage
        stage_b<Op, false>(bst, dz_l, static_cast<int>(b0), static_cast<int>(k_end), 0, p.out);
        if (owns_db) {
            for (int k = 0; k < rows; ++k) colsum += dz_l[(b0 + k) * p.out + threadIdx.x];
        }
        __syncthreads();
        if (!active) continue;
        const int ksteps = (rows + Op::MMA_K - 1) / Op::MMA_K;
        m.load_a_from([&](int r, int k) { return mw + r < p.in && k < rows ? h_l[(b0 + k) * p.in + mw + r] : 0.0f; },
                      ksteps);
        if (b0 == k_begin) {
            m.template product<false>(bst, nt, ksteps, zbuf);
        } else {
            m.template product<true>(bst, nt, ksteps, zbuf);
        }
    }

    const long long dw_size = static_cast<long long>(p.in) * p.out;
    float* dw_out = split_k_partial(dw_l, ws + p.ws, ws_split_stride, splits, blockIdx.y);
    float* db_out = split_k_partial(db_l, ws + p.ws + dw_size, ws_split_stride, splits, blockIdx.y);
    if (active) {
        __syncwarp();  // the row pass reads Z written by other lanes
        const bool any_rows = k_begin < k_end;
        for (int r = 0; r < 8; ++r) {
#pragma unroll
            for (int i = 0; i < F::MAX_WIDTH / 32; ++i) {
                const int c = lane + 32 * i;
                if (c >= p.out) continue;
                const float2 v = any_rows ? load_z(zbuf + r * R::A_LD, c) : make_float2(0.0f, 0.0f);
                if (mw + r < p.in) dw_out[static_cast<long long>(mw + r) * p.out + c] = v.x;
                if (mw + r + 8 < p.in) dw_out[static_cast<long long>(mw + r + 8) * p.out + c] = v.y;
            }
        }
    }
    if (owns_db) db_out[threadIdx.x] = colsum;
    if (splits > 1) finish_split_weight_grads(ws, tickets, p, dw_l, db_l, m0, R::ROWS, splits, ws_split_stride);
}

// dW_l rows m0 .. m0 + 63 (all columns) and, in W_l's first row tile, db_l, over this split's batch
// rows: A = h_l^T and B = dz_l, both staged from row-major global arrays; db from the B loader's
// column sums, added over its k lanes in a fixed order (as gemm_tile.cuh's dW does).
__device__ __forceinline__ void mlp_weight_grads(const float* const (&h)[Fused::MAX_LAYERS],
                                                 const float* const (&dz)[Fused::MAX_LAYERS],
                                                 float* const (&dw)[Fused::MAX_LAYERS],
                                                 float* const (&db)[Fused::MAX_LAYERS], float* __restrict__ ws,
                                                 unsigned int* __restrict__ tickets, const int* __restrict__ plan,
                                                 int B, int k_chunk, int splits, int ws_split_stride) {
    using F = Fused;
    using LoadB = OContiguousTile<F::MAX_WIDTH, F::THREADS, F::LDB, false>;
    extern __shared__ __align__(16) unsigned int fused_smem[];
    float* As = reinterpret_cast<float*>(fused_smem);  // As[k][r] = h_l[b0 + k][m0 + r]
    float* Bs = As + F::MAX_WIDTH * F::LDA;            // Bs[k][c] = dz_l[b0 + k][c]
    const int l = LayerPlan::of_dw_tile(plan);
    const LayerPlan p = LayerPlan::of(plan, l);
    const float* h_l = layer_slot(h, l);
    const float* dz_l = layer_slot(dz, l);
    float* dw_l = layer_slot(dw, l);
    float* db_l = layer_slot(db, l);
    const int m0 = (static_cast<int>(blockIdx.x) - p.first_tile) * F::ROWS;
    const SplitRows batch_rows = SplitRows::of(B, k_chunk, blockIdx.y);
    const SimtTile t = SimtTile::of(threadIdx.x);
    const int rq = SimtTile::row_quads(p.in - m0), cq = t.col_quads(p.out);
    float sums[LoadB::WIDTH] = {};
    Acc acc;
    zero(acc);
    for (long long b0 = batch_rows.begin; b0 < batch_rows.end; b0 += F::MAX_WIDTH) {
        const int K = batch_rows.end - b0 < F::MAX_WIDTH ? static_cast<int>(batch_rows.end - b0) : F::MAX_WIDTH;
        __syncthreads();  // every warp is done with the previous chunk
        OContiguousTile<F::ROWS, F::THREADS, F::LDA, false> ht;  // A(k, r) = h_l[b0 + k][m0 + r]
        ht.init(h_l, p.in, m0, p.in, b0, threadIdx.x);
        stage_operand(As, F::LDA, ht, K);
        stage_rows_of<true>(Bs, dz_l, p.out, b0, K, &sums);
        __syncthreads();
        resident_product(acc, As, Bs, K, t, rq, cq);
    }
    const long long dw_size = static_cast<long long>(p.in) * p.out;
    float* dw_out = split_k_partial(dw_l, ws + p.ws, ws_split_stride, splits, blockIdx.y);
    float* db_out = split_k_partial(db_l, ws + p.ws + dw_size, ws_split_stride, splits, blockIdx.y);
    static_assert(LoadB::KSTEP * F::MAX_WIDTH <= F::MAX_WIDTH * F::LDA, "the column partials must fit in As");
    __syncthreads();  // every warp has read As
    if (m0 == 0) {  // db: KSTEP threads hold partial sums of each column
#pragma unroll
        for (int j = 0; j < LoadB::WIDTH; ++j) {  // the scalar loader's k lane and column j
            const int k_lane = threadIdx.x / LoadB::LANES_O, column = threadIdx.x % LoadB::LANES_O + j * LoadB::SPACING;
            As[k_lane * F::MAX_WIDTH + column] = sums[j];
        }
    }
    __syncthreads();
    if (m0 == 0 && static_cast<int>(threadIdx.x) < p.out) {
        float column_sum = 0.0f;
#pragma unroll
        for (int s = 0; s < LoadB::KSTEP; ++s) column_sum += As[s * F::MAX_WIDTH + threadIdx.x];
        db_out[threadIdx.x] = column_sum;
    }
    const bool vec = pairs_aligned(dw_out, p.out);
    t.for_each_quad(rq, cq, [&](int i, int j, int r, int c) {
        Quad::of(acc, i, j).store_rows(dw_out, p.out, m0 + r, c, p.in, p.out, vec);
    });
    if (splits > 1) finish_split_weight_grads(ws, tickets, p, dw_l, db_l, m0, F::ROWS, splits, ws_split_stride);
}

}  // namespace gpubp

// The entry points take MAX_LAYERS pointers per per-layer array (kernel arguments, so a step
// needs no host-to-device copy of a pointer table): fused_mlp_fwd<precision>,
// fused_mlp_bwd<precision> and fused_mlp_dw<precision> for each precision (<precision> empty for
// fp32, _tf32, _bf16). Each fwd and bwd kernel serves every activation: a layer's activation is
// its plan's (LAYER_ACT), dispatched once per layer around its epilogue or dz pass
// (with_activation), and an id outside ActSet::ALL traps.
#define GPUBP_LAYER_PTRS(T, NAME) T NAME##0, T NAME##1, T NAME##2, T NAME##3, T NAME##4, T NAME##5, T NAME##6, T NAME##7
#define GPUBP_LAYER_ARRAY(T, NAME) \
    T const NAME[gpubp::Fused::MAX_LAYERS] = {NAME##0, NAME##1, NAME##2, NAME##3, NAME##4, NAME##5, NAME##6, NAME##7}

#define GPUBP_FUSED_MLP_ENTRIES(SUFFIX, BLOCKS, FORWARD, BACKWARD, WEIGHT_GRADS)                                 \
    extern "C" __global__ void __launch_bounds__(gpubp::Fused::THREADS, BLOCKS)                                  \
        fused_mlp_fwd##SUFFIX(const float* __restrict__ x, GPUBP_LAYER_PTRS(const float*, w),                    \
                              GPUBP_LAYER_PTRS(const float*, b), GPUBP_LAYER_PTRS(float*, hout),                 \
                              GPUBP_LAYER_PTRS(float*, zout), const int* __restrict__ plan, int B) {             \
        GPUBP_ONLY_KERNEL_GUARD(fused_mlp_fwd##SUFFIX)                                                           \
        GPUBP_LAYER_ARRAY(const float*, w);                                                                      \
        GPUBP_LAYER_ARRAY(const float*, b);                                                                      \
        GPUBP_LAYER_ARRAY(float*, hout);                                                                         \
        GPUBP_LAYER_ARRAY(float*, zout);                                                                         \
        FORWARD(x, w, b, hout, zout, plan, B);                                                                   \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(gpubp::Fused::THREADS, BLOCKS)                                  \
        fused_mlp_bwd##SUFFIX(const float* __restrict__ dy, float* __restrict__ dx,                              \
                              GPUBP_LAYER_PTRS(const float*, w), GPUBP_LAYER_PTRS(const float*, act_in),         \
                              GPUBP_LAYER_PTRS(float*, dz), const int* __restrict__ plan, int B) {               \
        GPUBP_ONLY_KERNEL_GUARD(fused_mlp_bwd##SUFFIX)                                                           \
        GPUBP_LAYER_ARRAY(const float*, w);                                                                      \
        GPUBP_LAYER_ARRAY(const float*, act_in);                                                                 \
        GPUBP_LAYER_ARRAY(float*, dz);                                                                           \
        BACKWARD(dy, dx, w, act_in, dz, plan, B);                                                                \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(gpubp::Fused::THREADS, BLOCKS)                                  \
        fused_mlp_dw##SUFFIX(GPUBP_LAYER_PTRS(const float*, h), GPUBP_LAYER_PTRS(const float*, dz),              \
                             GPUBP_LAYER_PTRS(float*, dw), GPUBP_LAYER_PTRS(float*, db), float* __restrict__ ws, \
                             unsigned int* __restrict__ tickets, const int* __restrict__ plan, int B, int k_chunk, \
                             int splits, int ws_split_stride) {                                                  \
        GPUBP_ONLY_KERNEL_GUARD(fused_mlp_dw##SUFFIX)                                                            \
        GPUBP_LAYER_ARRAY(const float*, h);                                                                      \
        GPUBP_LAYER_ARRAY(const float*, dz);                                                                     \
        GPUBP_LAYER_ARRAY(float*, dw);                                                                           \
        GPUBP_LAYER_ARRAY(float*, db);                                                                           \
        WEIGHT_GRADS(h, dz, dw, db, ws, tickets, plan, B, k_chunk, splits, ws_split_stride);                     \
    }

GPUBP_FUSED_MLP_ENTRIES(, gpubp::Fused::FP32_BLOCKS, gpubp::mlp_forward, gpubp::mlp_backward, gpubp::mlp_weight_grads)
GPUBP_FUSED_MLP_ENTRIES(_tf32, gpubp::Tf32Op::BLOCKS, gpubp::mlp_forward_mma<gpubp::Tf32Op>,
                        gpubp::mlp_backward_mma<gpubp::Tf32Op>, gpubp::mlp_weight_grads_mma<gpubp::Tf32Op>)
GPUBP_FUSED_MLP_ENTRIES(_bf16, gpubp::Bf16Op::BLOCKS, gpubp::mlp_forward_mma<gpubp::Bf16Op>,
                        gpubp::mlp_backward_mma<gpubp::Bf16Op>, gpubp::mlp_weight_grads_mma<gpubp::Bf16Op>)
