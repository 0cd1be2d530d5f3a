// A whole narrow MLP in three launches, fp32 or on tensor cores (tf32, bf16):
//
//   fused_mlp_fwd:  h_0 = x;  z_l = h_l @ W_l + b_l;  h_{l+1} = act_l(z_l)   for l = 0 .. L-1
//   fused_mlp_bwd:  g = dy;  for l = top .. lo:  dz_l = g * act_l'(h_{l+1} or z_l);  g = dz_l @ W_l^T
//   fused_mlp_dw:   dW_l = h_l^T @ dz_l,  db_l = dz_l.sum(0)                  for every trainable l
//
// Widths: every layer's output width (hidden and output) is at most MAX_WIDTH = 128, so a
// block holds the activations of its batch rows for a whole layer in shared memory; the input
// width is any size (layer 0 streams x in K chunks). 1 to MAX_LAYERS = 8 layers, each with its
// own activation (a runtime id, as activations.cuh numbers them), any batch size B.
// Layout: x (B, in); W_l (in_l, out_l); b_l (out_l,); every (B, width) array row-major and
// C-contiguous, as everywhere in gpubp. Per-layer arrays come as MAX_LAYERS pointer arguments
// each; slots the plan marks unused may be any valid pointer and are never touched.
//
// The plan (a small int array the host builds once per model shape, see PLAN_* below) says per
// layer its widths, activation and what to store:
// - forward writes h_{l+1} to hout[l] only where backward reads it (the dW input of a trainable
//   layer l+1, or act_l' for layers from the lowest trainable one up), z_l to zout[l] only for
//   gelu/gelu_tanh layers that backward differentiates, and always the output h_L. A frozen
//   prefix therefore stores nothing.
// - backward runs from the top layer down to the lowest layer that needs anything (lo): dz_l
//   stays in shared memory and goes to global memory (dz[l]) only for trainable layers, whose
//   dW needs it; g = dz_l @ W_l^T is computed only above lo, or for lo = 0 when the caller asks
//   for the input gradient (dx, any width: written straight to global memory in 128-column tiles).
// - dW/db: one launch for every trainable layer; grid.x enumerates (layer, 32-row tile of W_l),
//   grid.y splits the batch. With splits > 1 each block writes its partial to ws, takes a
//   ticket for its tile, and the last block of a tile sums the partials in split order 0, 1, ...
//   (split_k.cuh, as the dense dW kernels do): deterministic, no float atomics. db_l is summed
//   in the blocks of W_l's first row tile, one thread per column, over the same split.
//
// Launch: fused_mlp_fwd and fused_mlp_bwd grid (ceil(B / ROWS)), fused_mlp_dw grid (dW tiles of
// every trainable layer, splits); block THREADS = 128; no dynamic shared memory.
// Tiles and threads (all three kernels): THREADS = 128 threads compute a ROWS x MAX_WIDTH = 32 x
// 128 output tile, 32 fp32 accumulators per thread, from operands staged KC = 16 deep in shared
// memory. Who owns which element, and how a staged chunk is multiplied, is the precision's
// product policy; everything else is shared:
// - SimtFp32 (fused_mlp_*): fp32 FMA on the CUDA cores; 8 row groups x 16 column groups, thread
//   (rg, cg) owns rows rg + 8 v (v < 4) and columns cg + 16 j (j < 8), so a warp reads 16
//   consecutive columns of a staged weight row (no bank conflicts) and 2 broadcast activations.
// - MmaTf32 / MmaBf16 (fused_mlp_*_tf32, fused_mlp_*_bf16; sm_80 and newer, kernels/mma.cuh):
//   warp w owns rows 16 (w % 2) .. +16 and columns 64 (w / 2) .. +64 as 8 m16n8 accumulator
//   tiles; per KC chunk tf32 issues 2 mma.m16n8k8 per tile, bf16 one mma.m16n8k16. Operands are
//   rounded from the fp32 stages as fragments load (cvt.rna to tf32; round-to-nearest-even to
//   bf16); weights, stored activations and gradients stay fp32 in memory, and every sum
//   accumulates in fp32. Error: each product carries its operands' rounding (2^-11 relative for
//   tf32, 2^-9 for bf16), per layer about that times sqrt(K) max|a| max|b|, so relative to the
//   largest value of each result about 2e-3 (tf32) and 1e-2 (bf16) per layer on random data;
//   tests/test_kernels_on_cpu.py bounds whole models at FUSED_TOLERANCE.
// Shared memory per block: fwd and bwd two activation buffers 2 x ROWS x LDH floats (LDH = 144:
// rows 16 banks apart, so the epilogue's two rows per warp store without conflicts) plus a
// KC x MAX_WIDTH weight stage, and fwd a ROWS x KC x stage: 46 KB. dw: a KC x ROWS input stage
// and a KC x MAX_WIDTH dz stage, 10 KB.
// Barriers: each K step stages, waits, accumulates, waits. Those two are the only ones a layer
// needs: the first also orders the previous layer's epilogue writes (and backward's in-place
// dz) before any thread reads them, the second every read of the stages and of the buffer the
// next epilogue overwrites before those writes. A thread's epilogue and the next dz step touch
// only the elements that thread owns.
// Boundaries: rows past B are staged as 0 and never stored; columns past a layer's width are
// staged as 0 and never stored, so any B, in and out_l <= 128 work.
// Global memory per forward block: its x rows once, every W_l and b_l once (from L2 after the
// first blocks), its stored rows once. Backward block: its dy rows, the stored act' inputs of
// its rows, every W_l in the span, its dz rows out. dW block: its split's rows of h_l and dz_l.
#include "activations.cuh"
#include "mma.cuh"
#include "split_k.cuh"

namespace gpubp {

struct Fused {
    static constexpr int MAX_LAYERS = 8;
    static constexpr int MAX_WIDTH = 128;
    static constexpr int ROWS = 32;     // batch rows per fwd/bwd block; W_l rows per dw block
    static constexpr int THREADS = 128;
    static constexpr int KC = 16;
    static constexpr int LDH = MAX_WIDTH + 16;
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
};

struct LayerPlan {
    int in, out, act, flags, first_tile, ws;
    __device__ static LayerPlan of(const int* __restrict__ plan, int l) {
        const int* p = plan + PLAN_HEAD + l * PLAN_STRIDE;
        const int in = l == 0 ? plan[PLAN_IN] : plan[PLAN_HEAD + (l - 1) * PLAN_STRIDE + LAYER_OUT];
        return {in, p[LAYER_OUT], p[LAYER_ACT], p[LAYER_FLAGS], p[LAYER_FIRST_TILE], p[LAYER_WS]};
    }
};

// The activation a layer applies is data here, not a template argument: one kernel serves
// every mix of activations. The branch is uniform across the block.
__device__ __forceinline__ float act_forward_id(int act, float z) {
    switch (act) {
        case ACT_RELU: return act_forward<ACT_RELU>(z);
        case ACT_LEAKY_RELU: return act_forward<ACT_LEAKY_RELU>(z);
        case ACT_SIGMOID: return act_forward<ACT_SIGMOID>(z);
        case ACT_TANH: return act_forward<ACT_TANH>(z);
        case ACT_GELU: return act_forward<ACT_GELU>(z);
        case ACT_GELU_TANH: return act_forward<ACT_GELU_TANH>(z);
        default: return z;
    }
}

__device__ __forceinline__ float act_grad_id(int act, float y, float z) {
    switch (act) {
        case ACT_RELU: return act_grad<ACT_RELU>(y, z);
        case ACT_LEAKY_RELU: return act_grad<ACT_LEAKY_RELU>(y, z);
        case ACT_SIGMOID: return act_grad<ACT_SIGMOID>(y, z);
        case ACT_TANH: return act_grad<ACT_TANH>(y, z);
        case ACT_GELU: return act_grad<ACT_GELU>(y, z);
        case ACT_GELU_TANH: return act_grad<ACT_GELU_TANH>(y, z);
        default: return 1.0f;
    }
}

// a[l] for a runtime l, by compare-and-select over the unrolled slots: indexing the array
// directly would put every kernel's pointer arrays in local memory.
template <class T>
__device__ __forceinline__ T layer_slot(const T (&a)[Fused::MAX_LAYERS], int l) {
    T r = a[0];
#pragma unroll
    for (int i = 1; i < Fused::MAX_LAYERS; ++i) r = l == i ? a[i] : r;
    return r;
}

// Every product policy: 32 accumulators per thread, acc[j][v] at tile row row(j, v) and column
// col(j, v) (each element of the ROWS x MAX_WIDTH tile owned by exactly one thread), and
// accumulate(acc, a, row_stride, k_stride, ws): acc(r, c) += sum_{k < KC} A(r, k) Ws[k][c], with
// A(r, k) = a[r * row_stride + k * k_stride] and Ws a KC x MAX_WIDTH chunk, both in shared memory.
constexpr int ACC_J = 8, ACC_V = 4;
using Acc = float[ACC_J][ACC_V];

__device__ __forceinline__ void zero(Acc& acc) {
#pragma unroll
    for (int j = 0; j < ACC_J; ++j)
#pragma unroll
        for (int v = 0; v < ACC_V; ++v) acc[j][v] = 0.0f;
}

struct SimtFp32 {
    static constexpr int COL_GROUPS = 16, ROW_GROUPS = 8;
    int rg, cg;
    __device__ static SimtFp32 of(int tid) { return {tid / COL_GROUPS, tid % COL_GROUPS}; }
    __device__ int row(int, int v) const { return rg + ROW_GROUPS * v; }
    __device__ int col(int j, int) const { return cg + COL_GROUPS * j; }
    __device__ void accumulate(Acc& acc, const float* a, int row_stride, int k_stride, const float* ws) const {
#pragma unroll 4
        for (int k = 0; k < Fused::KC; ++k) {
            float av[ACC_V], bv[ACC_J];
#pragma unroll
            for (int v = 0; v < ACC_V; ++v) av[v] = a[row(0, v) * row_stride + k * k_stride];
#pragma unroll
            for (int j = 0; j < ACC_J; ++j) bv[j] = ws[k * Fused::MAX_WIDTH + col(j, 0)];
#pragma unroll
            for (int j = 0; j < ACC_J; ++j)
#pragma unroll
                for (int v = 0; v < ACC_V; ++v) acc[j][v] = fmaf(av[v], bv[j], acc[j][v]);
        }
    }
};

// Tensor-core tiles: acc[j] is the m16n8 accumulator of columns n_base + 8 j, its four values at
// (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1) of the tile (kernels/mma.cuh's C layout).
struct MmaTile {
    static constexpr int WARP_ROWS = 16, WARP_COLS = 64, MMA_N = 8;
    int m_base, n_base, g, t;
    __device__ static MmaTile of(int tid) {
        const int warp = tid / 32, lane = tid % 32;
        return {WARP_ROWS * (warp % 2), WARP_COLS * (warp / 2), lane >> 2, lane & 3};
    }
    __device__ int row(int, int v) const { return m_base + g + 8 * (v >> 1); }
    __device__ int col(int j, int v) const { return n_base + MMA_N * j + 2 * t + (v & 1); }
};

struct MmaTf32 : MmaTile {
    static constexpr int MMA_K = 8;
    __device__ static MmaTf32 of(int tid) { return {MmaTile::of(tid)}; }
    __device__ void accumulate(Acc& acc, const float* a, int row_stride, int k_stride, const float* ws) const {
#pragma unroll
        for (int k = 0; k < Fused::KC; k += MMA_K) {
            const float* a0 = a + (m_base + g) * row_stride + (k + t) * k_stride;
            const unsigned int fa[4] = {to_tf32(a0[0]), to_tf32(a0[8 * row_stride]), to_tf32(a0[4 * k_stride]),
                                        to_tf32(a0[8 * row_stride + 4 * k_stride])};
#pragma unroll
            for (int j = 0; j < ACC_J; ++j) {
                const float* b0 = ws + (k + t) * Fused::MAX_WIDTH + n_base + MMA_N * j + g;
                const unsigned int fb[2] = {to_tf32(b0[0]), to_tf32(b0[4 * Fused::MAX_WIDTH])};
                mma_m16n8k8_tf32(acc[j], fa, fb, acc[j]);
            }
        }
    }
};

struct MmaBf16 : MmaTile {
    static constexpr int MMA_K = 16;
    static_assert(Fused::KC == MMA_K, "one m16n8k16 step per staged chunk");
    __device__ static MmaBf16 of(int tid) { return {MmaTile::of(tid)}; }
    __device__ void accumulate(Acc& acc, const float* a, int row_stride, int k_stride, const float* ws) const {
        // A value (r, k) at a[r * row_stride + k * k_stride]; registers hold (k, k + 1) pairs.
        const float* a0 = a + (m_base + g) * row_stride + 2 * t * k_stride;
        const float* a8 = a0 + 8 * row_stride;
        const unsigned int fa[4] = {
            pack_bf16x2(a0[0], a0[k_stride]), pack_bf16x2(a8[0], a8[k_stride]),
            pack_bf16x2(a0[8 * k_stride], a0[9 * k_stride]), pack_bf16x2(a8[8 * k_stride], a8[9 * k_stride])};
#pragma unroll
        for (int j = 0; j < ACC_J; ++j) {
            const float* b0 = ws + 2 * t * Fused::MAX_WIDTH + n_base + MMA_N * j + g;
            const unsigned int fb[2] = {pack_bf16x2(b0[0], b0[Fused::MAX_WIDTH]),
                                        pack_bf16x2(b0[8 * Fused::MAX_WIDTH], b0[9 * Fused::MAX_WIDTH])};
            mma_m16n8k16_bf16(acc[j], fa, fb, acc[j]);
        }
    }
};

// Ws[k][c] = W[k0 + k][c] for a row-major (K, N) W (zero outside it): one KC-deep chunk of W_l,
// or of dz_l's batch rows for dW.
__device__ __forceinline__ void stage_weight_rows(float* ws, const float* __restrict__ w, int k0, int K, int N) {
    for (int e = threadIdx.x; e < Fused::KC * Fused::MAX_WIDTH; e += Fused::THREADS) {
        const int k = e / Fused::MAX_WIDTH, c = e % Fused::MAX_WIDTH;
        ws[e] = k0 + k < K && c < N ? w[static_cast<long long>(k0 + k) * N + c] : 0.0f;
    }
}

// Ws[k][c] = W[n0 + c][k0 + k] for a row-major (N, K) W: one KC-deep chunk of W_l^T, columns n0 ..
__device__ __forceinline__ void stage_weight_cols(float* ws, const float* __restrict__ w, int k0, int K, int n0,
                                                  int N) {
    for (int e = threadIdx.x; e < Fused::KC * Fused::MAX_WIDTH; e += Fused::THREADS) {
        const int c = e / Fused::KC, k = e % Fused::KC;  // k fastest: consecutive threads, consecutive W
        ws[k * Fused::MAX_WIDTH + c] =
            k0 + k < K && n0 + c < N ? w[static_cast<long long>(n0 + c) * K + k0 + k] : 0.0f;
    }
}

// dst[r][c] = src[(row0 + r) * N + c] for a ROWS x MAX_WIDTH block of a (B, N) array, zero
// past B and past N.
__device__ __forceinline__ void stage_rows(float* dst, int ld, const float* __restrict__ src, long long row0,
                                           int B, int N) {
    for (int e = threadIdx.x; e < Fused::ROWS * Fused::MAX_WIDTH; e += Fused::THREADS) {
        const int r = e / Fused::MAX_WIDTH, c = e % Fused::MAX_WIDTH;
        dst[r * ld + c] = row0 + r < B && c < N ? src[(row0 + r) * N + c] : 0.0f;
    }
}

template <class P>
__device__ __forceinline__ void mlp_forward(const float* __restrict__ x, const float* const (&w)[Fused::MAX_LAYERS],
                                            const float* const (&b)[Fused::MAX_LAYERS],
                                            float* const (&hout)[Fused::MAX_LAYERS],
                                            float* const (&zout)[Fused::MAX_LAYERS], const int* __restrict__ plan,
                                            int B) {
    using F = Fused;
    __shared__ float H[2][F::ROWS * F::LDH];
    __shared__ float Ws[F::KC * F::MAX_WIDTH];
    __shared__ float Xs[F::ROWS * F::KC];
    const long long row0 = static_cast<long long>(blockIdx.x) * F::ROWS;
    const P o = P::of(threadIdx.x);
    const int layers = plan[PLAN_LAYERS];
    int cur = 0;
    for (int l = 0; l < layers; ++l) {
        const LayerPlan p = LayerPlan::of(plan, l);
        const float* wl = layer_slot(w, l);
        const float* bl = layer_slot(b, l);
        float* hl = layer_slot(hout, l);
        float* zl = layer_slot(zout, l);
        Acc acc;
        zero(acc);
        for (int k0 = 0; k0 < p.in; k0 += F::KC) {
            stage_weight_rows(Ws, wl, k0, p.in, p.out);
            if (l == 0) {  // x streams through a ROWS x KC stage: the input width is unbounded
                for (int e = threadIdx.x; e < F::ROWS * F::KC; e += F::THREADS) {
                    const int r = e / F::KC, k = e % F::KC;
                    Xs[e] = row0 + r < B && k0 + k < p.in ? x[(row0 + r) * p.in + k0 + k] : 0.0f;
                }
            }
            __syncthreads();  // the stages, and the previous layer's epilogue, are complete
            if (l == 0) {
                o.accumulate(acc, Xs, F::KC, 1, Ws);
            } else {
                o.accumulate(acc, H[cur] + k0, F::LDH, 1, Ws);
            }
            __syncthreads();
        }
        const bool last = l == layers - 1;
        float* next = H[cur ^ 1];
#pragma unroll
        for (int j = 0; j < ACC_J; ++j) {
#pragma unroll
            for (int v = 0; v < ACC_V; ++v) {
                const int r = o.row(j, v), c = o.col(j, v);
                const bool valid = c < p.out;
                const float z = acc[j][v] + (valid ? bl[c] : 0.0f);
                const float h = act_forward_id(p.act, z);
                // Columns past the width are zeros: the next layer's last K chunk reads them.
                if (!last) next[r * F::LDH + c] = valid ? h : 0.0f;
                const long long row = row0 + r;
                if (!valid || row >= B) continue;
                if (p.flags & STORE_H) hl[row * p.out + c] = h;
                if (p.flags & STORE_Z) zl[row * p.out + c] = z;
            }
        }
        cur ^= 1;
    }
}

template <class P>
__device__ __forceinline__ void mlp_backward(const float* __restrict__ dy, float* __restrict__ dx,
                                             const float* const (&w)[Fused::MAX_LAYERS],
                                             const float* const (&act_in)[Fused::MAX_LAYERS],
                                             float* const (&dz)[Fused::MAX_LAYERS], const int* __restrict__ plan,
                                             int B) {
    using F = Fused;
    __shared__ float G[2][F::ROWS * F::LDH];
    __shared__ float Ws[F::KC * F::MAX_WIDTH];
    const long long row0 = static_cast<long long>(blockIdx.x) * F::ROWS;
    const P o = P::of(threadIdx.x);
    const int top = plan[PLAN_LAYERS] - 1, lowest = plan[PLAN_LOWEST];
    const bool input_grad = plan[PLAN_INPUT_GRAD] != 0;
    int cur = 0;
    stage_rows(G[cur], F::LDH, dy, row0, B, LayerPlan::of(plan, top).out);
    __syncthreads();
    for (int l = top; l >= lowest; --l) {
        const LayerPlan p = LayerPlan::of(plan, l);
        const float* saved_l = layer_slot(act_in, l);
        float* dz_l = layer_slot(dz, l);
        // dz = g * act'(.) in place, each thread on the elements it owns.
#pragma unroll
        for (int j = 0; j < ACC_J; ++j) {
#pragma unroll
            for (int v = 0; v < ACC_V; ++v) {
                const int c = o.col(j, v);
                const long long row = row0 + o.row(j, v);
                if (c >= p.out || row >= B) continue;
                float& g = G[cur][o.row(j, v) * F::LDH + c];
                if (p.act != ACT_IDENTITY) {
                    const float saved = saved_l[row * p.out + c];
                    g *= act_grad_id(p.act, saved, saved);  // reads y or z, whichever act' needs: saved is it
                }
                if (p.flags & TRAINABLE) dz_l[row * p.out + c] = g;
            }
        }
        if (l == lowest && !input_grad) break;
        // g = dz @ W_l^T, (ROWS, out) x (out, in), in MAX_WIDTH-column tiles (one unless l = 0).
        float* next = G[cur ^ 1];
        const float* wl = layer_slot(w, l);
        for (int n0 = 0; n0 < p.in; n0 += F::MAX_WIDTH) {
            Acc acc;
            zero(acc);
            for (int k0 = 0; k0 < p.out; k0 += F::KC) {
                stage_weight_cols(Ws, wl, k0, p.out, n0, p.in);
                __syncthreads();
                o.accumulate(acc, G[cur] + k0, F::LDH, 1, Ws);
                __syncthreads();
            }
#pragma unroll
            for (int j = 0; j < ACC_J; ++j) {
#pragma unroll
                for (int v = 0; v < ACC_V; ++v) {
                    const int r = o.row(j, v), c = n0 + o.col(j, v);
                    if (l > 0) {  // zeros past the width, as in forward
                        next[r * F::LDH + c] = c < p.in ? acc[j][v] : 0.0f;
                    } else if (c < p.in && row0 + r < B) {
                        dx[(row0 + r) * p.in + c] = acc[j][v];
                    }
                }
            }
        }
        cur ^= 1;
    }
}

template <class P>
__device__ __forceinline__ void mlp_weight_grads(const float* const (&h)[Fused::MAX_LAYERS],
                                                 const float* const (&dz)[Fused::MAX_LAYERS],
                                                 float* const (&dw)[Fused::MAX_LAYERS],
                                                 float* const (&db)[Fused::MAX_LAYERS], float* __restrict__ ws,
                                                 unsigned int* __restrict__ tickets, const int* __restrict__ plan,
                                                 int B, int k_chunk, int splits, int ws_split_stride) {
    using F = Fused;
    __shared__ float Hs[F::KC * F::ROWS];       // Hs[k][r] = h_l[b0 + k][m0 + r]
    __shared__ float Ds[F::KC * F::MAX_WIDTH];  // Ds[k][c] = dz_l[b0 + k][c]
    // This block's layer: the last trainable layer whose first tile is at or before blockIdx.x.
    int l = -1;
    for (int i = 0; i < plan[PLAN_LAYERS]; ++i) {
        const LayerPlan q = LayerPlan::of(plan, i);
        if ((q.flags & TRAINABLE) && q.first_tile <= static_cast<int>(blockIdx.x)) l = i;
    }
    const LayerPlan p = LayerPlan::of(plan, l);
    const float* h_l = layer_slot(h, l);
    const float* dz_l = layer_slot(dz, l);
    float* dw_l = layer_slot(dw, l);
    float* db_l = layer_slot(db, l);
    const int m0 = (static_cast<int>(blockIdx.x) - p.first_tile) * F::ROWS;
    const SplitRows batch_rows = SplitRows::of(B, k_chunk, blockIdx.y);
    const long long k_begin = batch_rows.begin, k_end = batch_rows.end;
    const P o = P::of(threadIdx.x);
    static_assert(Fused::THREADS == Fused::MAX_WIDTH, "db: one thread per column");
    const bool owns_db = m0 == 0 && static_cast<int>(threadIdx.x) < p.out;  // db[threadIdx.x], in fp32

    Acc acc;
    zero(acc);
    float colsum = 0.0f;
    for (long long b0 = k_begin; b0 < k_end; b0 += F::KC) {
        for (int e = threadIdx.x; e < F::KC * F::ROWS; e += F::THREADS) {
            const int k = e / F::ROWS, r = e % F::ROWS;
            Hs[e] = b0 + k < k_end && m0 + r < p.in ? h_l[(b0 + k) * p.in + m0 + r] : 0.0f;
        }
        stage_weight_rows(Ds, dz_l, static_cast<int>(b0), static_cast<int>(k_end), p.out);
        __syncthreads();
        o.accumulate(acc, Hs, 1, F::ROWS, Ds);
        if (owns_db) {
            for (int k = 0; k < F::KC; ++k) colsum += Ds[k * F::MAX_WIDTH + threadIdx.x];
        }
        __syncthreads();
    }

    const long long dw_size = static_cast<long long>(p.in) * p.out;
    float* dw_out = split_k_partial(dw_l, ws + p.ws, ws_split_stride, splits, blockIdx.y);
    float* db_out = split_k_partial(db_l, ws + p.ws + dw_size, ws_split_stride, splits, blockIdx.y);
#pragma unroll
    for (int j = 0; j < ACC_J; ++j) {
#pragma unroll
        for (int v = 0; v < ACC_V; ++v) {
            const int r = m0 + o.row(j, v), c = o.col(j, v);
            if (r < p.in && c < p.out) dw_out[static_cast<long long>(r) * p.out + c] = acc[j][v];
        }
    }
    if (owns_db) db_out[threadIdx.x] = colsum;
    if (splits == 1) return;

    if (!split_k_arrived_last(&tickets[blockIdx.x], splits)) return;
    const int rows = p.in - m0 < F::ROWS ? p.in - m0 : F::ROWS;
    split_k_sum(ws + p.ws, ws_split_stride, splits, dw_l, p.out, m0, rows, 0, p.out);
    if (m0 == 0) split_k_sum(ws + p.ws + dw_size, ws_split_stride, splits, db_l, p.out, 0, 1, 0, p.out);
    split_k_reset(&tickets[blockIdx.x]);
}

}  // namespace gpubp

// The entry points take MAX_LAYERS pointers per per-layer array (kernel arguments, so a step
// needs no host-to-device copy of a pointer table); one set per precision.
#define GPUBP_LAYER_PTRS(T, NAME) T NAME##0, T NAME##1, T NAME##2, T NAME##3, T NAME##4, T NAME##5, T NAME##6, T NAME##7
#define GPUBP_LAYER_ARRAY(T, NAME) \
    T const NAME[gpubp::Fused::MAX_LAYERS] = {NAME##0, NAME##1, NAME##2, NAME##3, NAME##4, NAME##5, NAME##6, NAME##7}

#define GPUBP_FUSED_MLP_ENTRIES(SUFFIX, POLICY)                                                                      \
    extern "C" __global__ void __launch_bounds__(gpubp::Fused::THREADS)                                              \
        fused_mlp_fwd##SUFFIX(const float* __restrict__ x, GPUBP_LAYER_PTRS(const float*, w),                        \
                              GPUBP_LAYER_PTRS(const float*, b), GPUBP_LAYER_PTRS(float*, hout),                     \
                              GPUBP_LAYER_PTRS(float*, zout), const int* __restrict__ plan, int B) {                 \
        GPUBP_LAYER_ARRAY(const float*, w);                                                                          \
        GPUBP_LAYER_ARRAY(const float*, b);                                                                          \
        GPUBP_LAYER_ARRAY(float*, hout);                                                                             \
        GPUBP_LAYER_ARRAY(float*, zout);                                                                             \
        gpubp::mlp_forward<POLICY>(x, w, b, hout, zout, plan, B);                                                    \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(gpubp::Fused::THREADS)                                              \
        fused_mlp_bwd##SUFFIX(const float* __restrict__ dy, float* __restrict__ dx, GPUBP_LAYER_PTRS(const float*, w), \
                              GPUBP_LAYER_PTRS(const float*, act_in), GPUBP_LAYER_PTRS(float*, dz),                  \
                              const int* __restrict__ plan, int B) {                                                 \
        GPUBP_LAYER_ARRAY(const float*, w);                                                                          \
        GPUBP_LAYER_ARRAY(const float*, act_in);                                                                     \
        GPUBP_LAYER_ARRAY(float*, dz);                                                                               \
        gpubp::mlp_backward<POLICY>(dy, dx, w, act_in, dz, plan, B);                                                 \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(gpubp::Fused::THREADS)                                              \
        fused_mlp_dw##SUFFIX(GPUBP_LAYER_PTRS(const float*, h), GPUBP_LAYER_PTRS(const float*, dz),                  \
                             GPUBP_LAYER_PTRS(float*, dw), GPUBP_LAYER_PTRS(float*, db), float* __restrict__ ws,     \
                             unsigned int* __restrict__ tickets, const int* __restrict__ plan, int B, int k_chunk,  \
                             int splits, int ws_split_stride) {                                                      \
        GPUBP_LAYER_ARRAY(const float*, h);                                                                          \
        GPUBP_LAYER_ARRAY(const float*, dz);                                                                         \
        GPUBP_LAYER_ARRAY(float*, dw);                                                                               \
        GPUBP_LAYER_ARRAY(float*, db);                                                                               \
        gpubp::mlp_weight_grads<POLICY>(h, dz, dw, db, ws, tickets, plan, B, k_chunk, splits, ws_split_stride);      \
    }

GPUBP_FUSED_MLP_ENTRIES(, gpubp::SimtFp32)
GPUBP_FUSED_MLP_ENTRIES(_tf32, gpubp::MmaTf32)
GPUBP_FUSED_MLP_ENTRIES(_bf16, gpubp::MmaBf16)
