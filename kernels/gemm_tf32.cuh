// The tensor-core GEMM shared by dense_forward_tf32.cu and dense_backward_tf32.cu, templated on
// the operand element type E (MmaTile<E>): TF32 (E = float) and bf16 (E = bf16_bits):
// C[m0 : m0+128, n0 : n0+128] = A[., k_begin : k_end] @ B[k_begin : k_end, .] with fp32 accumulation,
// on mma.sync.m16n8k8.tf32 or mma.sync.m16n8k16.bf16 (kernels/mma.cuh). One loop serves x @ W
// (forward), dz @ W^T (dX) and x^T @ dz (dW): each operand is a plain array of E read in one of
// two layouts (Layout), and nothing is computed on an operand on its way in (the backward's
// dz = dy * act'(.) is formed once, beforehand, by dense_backward_tf32.cu's dz kernel; bf16
// operands are rounded once, beforehand, by dense_forward_tf32.cu's round_bf16).
// In bytes and in 16-byte chunks the two types are the same design: a k tile row is 128 bytes
// (32 fp32 or 64 bf16), a k tile holds 4 mma k steps, the shared tiles take the same bytes.
//
// Design, the standard one for sm_80 and newer:
//   - block tile BM x BN = 128 x 128, K step BK = 32, 8 warps as 2 (M) x 4 (N), warp tile
//     64 x 32 = 4 (m16) x 4 (n8) mma tiles: 16 mma per 8-deep k step from 4 A and 4 B fragments;
//   - a STAGES = 3 deep cp.async pipeline (global -> shared, no registers): while the warps
//     multiply k tile t, the copies of tiles t + 1 and t + 2 are in flight;
//   - shared layouts (below) in which every fragment load and every cp.async store is
//     conflict-free: a k-contiguous tile is swizzled and read with ldmatrix.x4, an
//     outer-contiguous tile is padded and read with 32-bit loads (fp32) or ldmatrix.x4.trans
//     (bf16, whose fragments pair consecutive k).
// Operands are not rounded: the tensor core reads a tf32 operand's top 19 bits, so the fp32
// bits staged by cp.async are truncated to tf32 (round toward zero) by the mma itself, and
// rounding them first (cvt.rna) would cost an instruction per fragment register in the hot loop.
//
// Error: each product carries both operands' truncation (relative < 2^-10 each), so against
// float64 |C - C_ref| is about 2^-10 sqrt(K) max|A| max|B| for random data; the tests bound it
// at 2e-3 relative to the largest |C| on N(0, 1) data. bf16 operands are rounded to nearest
// even (relative < 2^-9 each): about 2^-8 sqrt(K) max|A| max|B|, bounded at 1e-2 in the tests.
//
// Edges: when both operands' rows are 16-byte aligned (pointer and leading dimension), every
// tile, interior or edge, is staged by 16-byte cp.async whose source size stops at the
// operand's edge in M, N or K (zeros past it): no branch in the loop. An operand whose rows are
// not aligned (a view one float into an allocation, a width not a multiple of 4) sends the
// whole launch to a second instantiation of the loop that stages by 4-byte cp.async
// (ScalarCopier), in the same groups and pipeline: the partial k tile goes first, before the
// loop, so the loop's copies need no guard along k, and an edge in M or N costs a loop-invariant
// zero-fill predicate or nothing (a row of a k-contiguous operand past its extent re-reads its
// last row, which only reaches outputs the epilogue drops). The epilogue guards its stores.
// The k loop runs STAGES tiles per pass, so that each tile's slot is a compile-time constant
// and every shared address in the loop is a register plus an immediate; the k_tiles % STAGES
// tiles left over run once after it, outside any loop.
//
// Shared memory: STAGES x (A tile + B tile) = 96 to 102 KB of dynamic shared memory (Tf32Gemm's
// smem_bytes), above the 48 KB default: the host opts in once per kernel. Occupancy on sm_90:
// 1 block (8 warps) per SM, bound by registers (154 to 175 a thread: 64 accumulators, a k step's
// fragments and the loop-invariant shared addresses; capping them at 128 for 2 blocks spills).
// Memory per block: a 128 x (k_end - k_begin) slab of A and a (k_end - k_begin) x 128 slab of B,
// each read once from global memory.
#pragma once

#include "activations.cuh"
#include "mma.cuh"
#include "vector_access.cuh"

namespace gpubp {

// bf16 operands are held as their bit patterns (round-to-nearest-even from fp32, done once by
// dense_forward_tf32.cu's round_bf16 kernel), so no CUDA header type is needed.
using bf16_bits = unsigned short;

// The mma of an element type: m16n8k8.tf32 for fp32 operands (the mma reads their top 19 bits),
// m16n8k16.bf16 for bf16. The A and B fragments are 4 and 2 registers and the accumulators the
// same 16 x 8 fp32 tile in both, so one loop serves either.
template <class E>
struct MmaOf;
template <>
struct MmaOf<float> {
    static constexpr int K = 8;
    __device__ __forceinline__ static void mma(float (&d)[4], const unsigned int (&a)[4], const unsigned int (&b)[2]) {
        mma_m16n8k8_tf32(d, a, b, d);
    }
};
template <>
struct MmaOf<bf16_bits> {
    static constexpr int K = 16;
    __device__ __forceinline__ static void mma(float (&d)[4], const unsigned int (&a)[4], const unsigned int (&b)[2]) {
        mma_m16n8k16_bf16(d, a, b, d);
    }
};

// Tile constants per element type. A k tile row is 128 bytes (BK = 32 fp32 or 64 bf16 elements,
// eight 16-byte chunks) and holds BK / MMA_K = 4 mma k steps in either type, so the shared
// layouts, the chunk maps and the fragment loops are the same in bytes and in chunks.
template <class E>
struct MmaTile {
    static constexpr int BM = 128, BN = 128, STAGES = 3;
    static constexpr int WARPS_M = 2, WARPS_N = 4, THREADS = 32 * WARPS_M * WARPS_N;
    static constexpr int WARP_M = BM / WARPS_M, WARP_N = BN / WARPS_N;  // 64 x 32
    static constexpr int MMA_M = 16, MMA_N = 8, MMA_K = MmaOf<E>::K;
    static constexpr int TILES_M = WARP_M / MMA_M, TILES_N = WARP_N / MMA_N;  // 4 x 4 per warp
    static constexpr int MIN_BLOCKS = 1;                                      // per SM, for __launch_bounds__
    static constexpr int CHUNK = 16 / static_cast<int>(sizeof(E));            // elements per 16-byte cp.async
    static constexpr int BK = 8 * CHUNK;
    static constexpr int ROW_ALIGN = 32 / static_cast<int>(sizeof(E));  // elements per 32-byte sector
    // The leading dimension (and staged extent) of an operand n elements wide: fp32 operands are
    // the caller's arrays as they are; bf16 operands come from round_bf16, each row padded with
    // zeros to whole 32-byte sectors, so every cp.async of theirs copies 0 or 16 bytes and every
    // row starts on a sector (no sector is fetched for a neighbouring row's chunk).
    __device__ __forceinline__ static long long padded(long long n) {
        return sizeof(E) == 4 ? n : (n + ROW_ALIGN - 1) / ROW_ALIGN * ROW_ALIGN;
    }
};
using Tf32Tile = MmaTile<float>;
using Bf16Tile = MmaTile<bf16_bits>;

// ---------------------------------------------------------------------------- shared layouts
//
// A tile holds TILE_O x BK elements (o = m for A, n for B) of an operand; offset(o, k) is where
// element (o, k) lives, in elements from the tile's start.

// K-contiguous (x and dz as A, W^T as B): TILE_O rows of BK elements (128 bytes), eight 16-byte
// chunks per row, chunk c of row o stored at chunk c ^ (o % 8). ldmatrix's eight rows of one 8x8
// matrix (same chunk, 8 consecutive o) then fall in eight different 4-bank groups, and a warp's
// cp.async stores (4 rows x 8 chunks) fill each bank group exactly 4 times: conflict-free both ways.
template <class E>
struct KContiguous {
    using T = MmaTile<E>;
    static constexpr int TILE_ELEMS = T::BM * T::BK;
    __device__ __forceinline__ static int offset(int o, int k) {
        return o * T::BK + (((k / T::CHUNK) ^ (o % 8)) * T::CHUNK) + k % T::CHUNK;
    }
};

// Outer-contiguous (W as B, x^T as A, dz as B): BK rows (k) of 128 elements along o, padded to
// 136. fp32 (544-byte rows): a fragment's 32-bit loads read 4 k rows x 8 consecutive o, whose
// banks 8 k + o are all different; a warp's cp.async stores fill one 512-byte row. bf16 (272-byte
// rows): ldmatrix.trans reads 8 k rows x 16 bytes, rows 68 words apart, so in eight different
// 4-bank groups; a warp's cp.async stores fill two 256-byte rows, 4 wavefronts. The rows keep
// chunks 16-byte aligned.
template <class E>
struct OuterContiguous {
    using T = MmaTile<E>;
    static constexpr int LD = T::BN + 8;
    static constexpr int TILE_ELEMS = T::BK * LD;
    __device__ __forceinline__ static int offset(int o, int k) { return k * LD + o; }
};

template <bool C, class IfTrue, class IfFalse>
struct Choose {
    using type = IfTrue;
};
template <class IfTrue, class IfFalse>
struct Choose<false, IfTrue, IfFalse> {
    using type = IfFalse;
};

// An operand in global memory: element (k, o) at p[o * ld + k] (K_CONTIGUOUS) or p[k * ld + o];
// o in [0, o_extent), k in [0, k_end).
template <bool K_CONTIGUOUS, class E = float>
struct Operand {
    using Layout = typename Choose<K_CONTIGUOUS, KContiguous<E>, OuterContiguous<E>>::type;
    const E* p;
    long long ld, o_extent;
    __device__ __forceinline__ bool rows_aligned() const {
        return ld % MmaTile<E>::CHUNK == 0 && (reinterpret_cast<unsigned long long>(p) & 15ull) == 0;
    }
};

// Where this thread's chunks of a tile come from and go to. Thread tid copies chunks tid,
// tid + 256, ... of the tile: for K_CONTIGUOUS chunk e is (o = e / 8, k = CHUNK (e % 8)), else
// (k = e / (128 / CHUNK), o = CHUNK (e % (128 / CHUNK))), so a warp reads 4 rows of 128
// contiguous bytes, or 512 bytes of one or two k rows. Chunk i of the thread is its chunk 0 plus
// i x ROWS_PER_PASS rows (o or k) in global memory and a constant offset in shared memory, so
// the whole-tile path keeps one pointer per operand.
template <bool K_CONTIGUOUS, class E>
struct ChunkMap {
    using T = MmaTile<E>;
    using L = typename Choose<K_CONTIGUOUS, KContiguous<E>, OuterContiguous<E>>::type;
    static constexpr int PER_THREAD = T::BM * T::BK / T::CHUNK / T::THREADS;  // 4
    static constexpr int ROWS_PER_PASS = T::THREADS / (K_CONTIGUOUS ? T::BK / T::CHUNK : T::BM / T::CHUNK);
    __device__ __forceinline__ static int o_of(int tid) { return K_CONTIGUOUS ? tid / (T::BK / T::CHUNK) : (tid % (T::BM / T::CHUNK)) * T::CHUNK; }
    __device__ __forceinline__ static int k_of(int tid) { return K_CONTIGUOUS ? (tid % (T::BK / T::CHUNK)) * T::CHUNK : tid / (T::BM / T::CHUNK); }
    // Chunk i is ROWS_PER_PASS rows (o for K_CONTIGUOUS, else k) below chunk 0.
    __device__ __forceinline__ static int o_of(int tid, int i) { return o_of(tid) + (K_CONTIGUOUS ? i * ROWS_PER_PASS : 0); }
    __device__ __forceinline__ static int k_of(int tid, int i) { return k_of(tid) + (K_CONTIGUOUS ? 0 : i * ROWS_PER_PASS); }
};

// The cp.async path, for operands whose rows are 16-byte aligned: this thread's chunks of each
// k tile, each a 16-byte cp.async whose source size cuts it at the operand's edge (zeros past
// it), so edge tiles take the same branch-free code as interior ones. copy() stages the k tiles
// in order, 0, 1, ..., advancing one pointer and one count.
template <bool K_CONTIGUOUS, class E>
struct TileCopier {
    using C = ChunkMap<K_CONTIGUOUS, E>;
    using T = MmaTile<E>;
    static constexpr int ELEM_BYTES = static_cast<int>(sizeof(E));
    const E* next;                       // this thread's chunk 0 of the next k tile
    long long pass_stride, tile_stride;  // elements between chunks i and i + 1, and between k tiles
    int to;                              // shared offset of chunk 0 within a tile
    // k left before k_end at the next tile: for K_CONTIGUOUS along the chunk's row, else in k
    // rows below chunk 0's.
    int left;
    // K_CONTIGUOUS: per chunk, -1 if its row lies inside the operand, else 0. Else: the bytes of
    // the chunk inside the operand's width (the same for every chunk of the thread).
    int row_mask[K_CONTIGUOUS ? C::PER_THREAD : 1];
    int width_bytes;

    __device__ __forceinline__ static TileCopier of(const Operand<K_CONTIGUOUS, E>& src, long long o0,
                                                    long long k_begin, long long k_end) {
        const int tid = threadIdx.x, o = C::o_of(tid), k = C::k_of(tid);
        const long long ld = src.ld;
        TileCopier c;
        c.next = K_CONTIGUOUS ? src.p + (o0 + o) * ld + k_begin + k : src.p + (k_begin + k) * ld + o0 + o;
        c.pass_stride = C::ROWS_PER_PASS * ld;
        c.tile_stride = K_CONTIGUOUS ? T::BK : T::BK * ld;
        c.to = C::L::offset(o, k);
        const long long k_left = k_end - k_begin - k;
        c.left = static_cast<int>(k_left < (1 << 30) ? k_left : (1 << 30));
        const long long o_left = src.o_extent - o0 - o;
        c.width_bytes = ELEM_BYTES * static_cast<int>(o_left < 0 ? 0 : (o_left > T::CHUNK ? T::CHUNK : o_left));
        if constexpr (K_CONTIGUOUS) {
#pragma unroll
            for (int i = 0; i < C::PER_THREAD; ++i) c.row_mask[i] = o0 + C::o_of(tid, i) < src.o_extent ? -1 : 0;
        }
        return c;
    }

    // The first k tile is staged as any other (k_end cuts the last one).
    __device__ __forceinline__ void first(E* tile) { copy(tile); }

    __device__ __forceinline__ void copy(E* tile) {
        const int k_bytes = ELEM_BYTES * (left < 0 ? 0 : (left > T::CHUNK ? T::CHUNK : left));
#pragma unroll
        for (int i = 0; i < C::PER_THREAD; ++i) {
            const int bytes = K_CONTIGUOUS ? k_bytes & row_mask[K_CONTIGUOUS ? i : 0]
                                           : (i * C::ROWS_PER_PASS < left ? width_bytes : 0);
            // Rows ROWS_PER_PASS apart keep o % 8 (K_CONTIGUOUS) and the padding, so the offset of
            // chunk i is chunk 0's plus that of the rows in between.
            cp_async_cg_zfill(tile + to + C::L::offset(K_CONTIGUOUS ? i * C::ROWS_PER_PASS : 0,
                                                       K_CONTIGUOUS ? 0 : i * C::ROWS_PER_PASS),
                              next + i * pass_stride, bytes);
        }
        next += tile_stride;
        left -= T::BK;
    }
};

// The path for fp32 operands whose rows are not 16-byte aligned (bf16 operands always are:
// round_bf16 pads them): this thread's 16 elements of each k tile, each a 4-byte cp.async, in
// the cp.async groups of the aligned path, so the same pipeline covers them. The k tiles are cut
// from k_begin with the partial one first: tile 0 holds the first r = k_len - BK (k_tiles - 1)
// k (1 to BK, zeros after them), tile t > 0 the BK from k_begin + r + BK (t - 1). So only tile 0,
// staged before the k loop (first()), has a guard along k, and a tile in the loop (copy()) is 16
// LDGSTS from loop-invariant pointers and immediates, with at most a loop-invariant predicate
// each. Both operands cut k the same way, so the products pair up as in the aligned path.
template <bool K_CONTIGUOUS>
struct ScalarCopier;

// The k of ScalarCopier's tile 0, the partial one: 1 to BK.
__device__ __forceinline__ int first_tile_k(long long k_begin, long long k_end) {
    const long long k_len = k_end - k_begin;
    return static_cast<int>(k_len - (k_len - 1) / Tf32Tile::BK * Tf32Tile::BK);
}

// K-contiguous: ChunkMap's elements (row o + 32 i, k + j: chunk i of the thread, element j), one
// pointer per row. A row past the operand's extent reads its last row instead: such a row of A
// (of B) only reaches rows (columns) of C past M (N), which the epilogue drops, so it needs no
// zeros, and the rows need no guard. (A warp's 4-byte stores into the swizzled tile take 4
// wavefronts: its 8 lanes of a row write one word of each chunk.)
template <>
struct ScalarCopier<true> {
    using C = ChunkMap<true, float>;
    using T = Tf32Tile;
    const float* row[C::PER_THREAD];  // element (row of chunk i, k) of the next k tile
    int to;                           // shared offset of chunk 0 within a tile
    int k;                            // this thread's first k within a tile
    int r;                            // the k of tile 0

    __device__ __forceinline__ static ScalarCopier of(const Operand<true>& src, long long o0, long long k_begin,
                                                      long long k_end) {
        const int tid = threadIdx.x;
        ScalarCopier c;
        c.k = C::k_of(tid);
#pragma unroll
        for (int i = 0; i < C::PER_THREAD; ++i) {
            long long o = o0 + C::o_of(tid, i);
            o = o < src.o_extent ? o : src.o_extent - 1;
            c.row[i] = src.p + (o < 0 ? 0 : o) * src.ld + k_begin + c.k;
        }
        c.to = C::L::offset(C::o_of(tid), c.k);
        c.r = first_tile_k(k_begin, k_end);
        return c;
    }

    template <bool FIRST>
    __device__ __forceinline__ void stage(float* tile) {
#pragma unroll
        for (int i = 0; i < C::PER_THREAD; ++i)
#pragma unroll
            for (int j = 0; j < T::CHUNK; ++j) {
                float* dst = tile + to + C::L::offset(i * C::ROWS_PER_PASS, 0) + j;
                if constexpr (FIRST) cp_async_ca4_zfill(dst, row[i] + j, k + j >= r);
                else cp_async_ca<4>(dst, row[i] + j);
            }
#pragma unroll
        for (int i = 0; i < C::PER_THREAD; ++i) row[i] += FIRST ? r : T::BK;
    }
    __device__ __forceinline__ void first(float* tile) { stage<true>(tile); }
    __device__ __forceinline__ void copy(float* tile) { stage<false>(tile); }
};

// Outer-contiguous: lane l of warp w copies (k row w + 8 i, o = l + 32 jj), so each LDGSTS of a
// warp reads 32 consecutive floats of one row and writes them to 32 banks. One pointer, the
// rows at a stride, the columns at immediates; a column past the operand's extent is zero-filled
// (its predicate is loop-invariant).
template <>
struct ScalarCopier<false> {
    using T = Tf32Tile;
    using L = OuterContiguous<float>;
    static constexpr int ROWS = T::THREADS / 32, PASSES = T::BK / ROWS, SPAN = T::BN / 32;  // 8, 4, 4
    const float* next;                       // element (k row w, o = l) of the next k tile
    long long ld, pass_stride, tile_stride;  // elements between rows, rows w + 8 i, k tiles
    int to;                                  // shared offset of (w, l) within a tile
    int width;                               // columns o0 + l + 32 jj with 32 jj < width lie inside
    int k;                                   // w
    int r;                                   // the k of tile 0

    __device__ __forceinline__ static ScalarCopier of(const Operand<false>& src, long long o0, long long k_begin,
                                                      long long k_end) {
        const int lane = threadIdx.x % 32, w = threadIdx.x / 32;
        ScalarCopier c;
        c.ld = src.ld;
        c.next = src.p + (k_begin + w) * src.ld + o0 + lane;
        c.pass_stride = ROWS * src.ld;
        c.tile_stride = T::BK * src.ld;
        c.to = L::offset(lane, w);
        const long long width = src.o_extent - o0 - lane;
        c.width = static_cast<int>(width < 0 ? 0 : (width > T::BN ? T::BN : width));
        c.k = w;
        c.r = first_tile_k(k_begin, k_end);
        return c;
    }

    template <bool FIRST>
    __device__ __forceinline__ void stage(float* tile) {
#pragma unroll
        for (int i = 0; i < PASSES; ++i)
#pragma unroll
            for (int jj = 0; jj < SPAN; ++jj)
                cp_async_ca4_zfill(tile + to + L::offset(32 * jj, ROWS * i), next + i * pass_stride + 32 * jj,
                                   32 * jj >= width || (FIRST && k + ROWS * i >= r));
        next += FIRST ? r * ld : tile_stride;
    }
    __device__ __forceinline__ void first(float* tile) { stage<true>(tile); }
    __device__ __forceinline__ void copy(float* tile) { stage<false>(tile); }
};

// One thread's accumulators: [m16 tile][n8 tile][fragment register], and where each sits in the
// block tile: register r of tile (i, j) is row g + 8 (r / 2), column 2t + r % 2 of that 16 x 8
// tile. The same for tf32 and bf16 (both mma shapes have the m16n8 fp32 accumulator fragment).
struct Tf32Fragment {
    float acc[Tf32Tile::TILES_M][Tf32Tile::TILES_N][4];
    int warp_row, warp_col, g, t;
    __device__ __forceinline__ int row(int i, int half) const { return warp_row + i * Tf32Tile::MMA_M + g + 8 * half; }
    __device__ __forceinline__ int col(int j) const { return warp_col + j * Tf32Tile::MMA_N + 2 * t; }
};

// A fragments of mma k step kk (k = kk * MMA_K in the tile) for this warp's four m16 tiles.
// K-contiguous: one ldmatrix.x4 per tile; lane l names row (l % 16) of the tile at chunk
// 2 kk + l / 16, so the four 8x8 matrices (of 16-bit pairs: 4 fp32 or 8 bf16 per row) are
// a0..a3 of the m16n8k8 tf32 or m16n8k16 bf16 A fragment.
// Outer-contiguous (rows are k), fp32: 32-bit loads; bf16: one ldmatrix.x4.trans per tile,
// lane l naming k row kk * 16 + 8 (q / 2) + l % 8 at m 8 (q % 2), q = l / 8, so matrix q holds
// a_q's pairs of consecutive k.
template <bool K_CONTIGUOUS, class E>
__device__ __forceinline__ void load_a(unsigned int (&a)[Tf32Tile::TILES_M][4], const E* tile, const Tf32Fragment& f,
                                       int kk, int lane) {
    using T = MmaTile<E>;
#pragma unroll
    for (int i = 0; i < T::TILES_M; ++i) {
        if constexpr (K_CONTIGUOUS) {
            ldmatrix<4>(a[i], tile + KContiguous<E>::offset(f.warp_row + i * T::MMA_M + lane % 16,
                                                            kk * T::MMA_K + (lane / 16) * T::CHUNK));
        } else if constexpr (sizeof(E) == 2) {
            const int q = lane / 8;
            ldmatrix<4, true>(a[i], tile + OuterContiguous<E>::offset(f.warp_row + i * T::MMA_M + 8 * (q % 2),
                                                                      kk * T::MMA_K + 8 * (q / 2) + lane % 8));
        } else {
            using L = OuterContiguous<E>;
            const E* base = tile + L::offset(f.warp_row + i * T::MMA_M + f.g, kk * 8 + f.t);
            a[i][0] = __float_as_uint(shared_load(base));
            a[i][1] = __float_as_uint(shared_load(base + 8));
            a[i][2] = __float_as_uint(shared_load(base + 4 * L::LD));
            a[i][3] = __float_as_uint(shared_load(base + 4 * L::LD + 8));
        }
    }
}

// B fragments (tf32: b0 at (k = t, n = g), b1 at (t + 4, g); bf16: the pairs (2t, 2t + 1) and
// (2t + 8, 2t + 9) at n = g) for this warp's four n8 tiles.
// K-contiguous (rows are n): one ldmatrix.x4 per pair of tiles; lane l names row
// (l % 8) + 8 (l / 16) at chunk 2 kk + (l / 8) % 2, giving b0, b1 of tile j and of tile j + 1.
// Outer-contiguous (rows are k), fp32: 32-bit loads; bf16: one ldmatrix.x4.trans per pair of
// tiles, lane l naming k row kk * 16 + 8 (q % 2) + l % 8 at n 8 (q / 2), q = l / 8.
template <bool K_CONTIGUOUS, class E>
__device__ __forceinline__ void load_b(unsigned int (&b)[Tf32Tile::TILES_N][2], const E* tile, const Tf32Fragment& f,
                                       int kk, int lane) {
    using T = MmaTile<E>;
    if constexpr (K_CONTIGUOUS || sizeof(E) == 2) {
#pragma unroll
        for (int j = 0; j < T::TILES_N; j += 2) {
            unsigned int r[4];
            if constexpr (K_CONTIGUOUS) {
                ldmatrix<4>(r, tile + KContiguous<E>::offset(f.warp_col + j * T::MMA_N + lane % 8 + 8 * (lane / 16),
                                                             kk * T::MMA_K + ((lane / 8) % 2) * T::CHUNK));
            } else {
                const int q = lane / 8;
                ldmatrix<4, true>(r, tile + OuterContiguous<E>::offset(f.warp_col + j * T::MMA_N + 8 * (q / 2),
                                                                       kk * T::MMA_K + 8 * (q % 2) + lane % 8));
            }
            b[j][0] = r[0];
            b[j][1] = r[1];
            b[j + 1][0] = r[2];
            b[j + 1][1] = r[3];
        }
    } else {
        using L = OuterContiguous<E>;
#pragma unroll
        for (int j = 0; j < T::TILES_N; ++j) {
            const E* base = tile + L::offset(f.warp_col + j * T::MMA_N + f.g, kk * 8 + f.t);
            b[j][0] = __float_as_uint(shared_load(base));
            b[j][1] = __float_as_uint(shared_load(base + 4 * L::LD));
        }
    }
}

template <bool A_K_CONTIGUOUS, bool B_K_CONTIGUOUS, class E = float>
struct Tf32Gemm {
    using ALayout = typename Operand<A_K_CONTIGUOUS, E>::Layout;
    using BLayout = typename Operand<B_K_CONTIGUOUS, E>::Layout;
    static constexpr int STAGE_ELEMS = ALayout::TILE_ELEMS + BLayout::TILE_ELEMS;
    static constexpr int smem_bytes = MmaTile<E>::STAGES * STAGE_ELEMS * static_cast<int>(sizeof(E));
};

// frag.acc = A[m0 : m0+128, k_begin : k_end] @ B[k_begin : k_end, n0 : n0+128] for this thread's
// share; `smem` is the block's dynamic shared memory (Tf32Gemm::smem_bytes).
template <bool ALIGNED, bool A_K_CONTIGUOUS, bool B_K_CONTIGUOUS, class E>
__device__ __forceinline__ void mma_gemm_loop(const Operand<A_K_CONTIGUOUS, E>& a_src,
                                              const Operand<B_K_CONTIGUOUS, E>& b_src, long long k_begin,
                                              long long k_end, long long m0, long long n0, E* smem,
                                              Tf32Fragment& frag) {
    using T = MmaTile<E>;
    using G = Tf32Gemm<A_K_CONTIGUOUS, B_K_CONTIGUOUS, E>;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    frag.g = lane / 4;
    frag.t = lane % 4;
    frag.warp_row = (warp / T::WARPS_N) * T::WARP_M;
    frag.warp_col = (warp % T::WARPS_N) * T::WARP_N;
#pragma unroll
    for (int i = 0; i < T::TILES_M; ++i)
#pragma unroll
        for (int j = 0; j < T::TILES_N; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) frag.acc[i][j][r] = 0.0f;

    const int k_tiles = static_cast<int>((k_end - k_begin + T::BK - 1) / T::BK);
    using ACopier = typename Choose<ALIGNED, TileCopier<A_K_CONTIGUOUS, E>, ScalarCopier<A_K_CONTIGUOUS>>::type;
    using BCopier = typename Choose<ALIGNED, TileCopier<B_K_CONTIGUOUS, E>, ScalarCopier<B_K_CONTIGUOUS>>::type;
    auto a_copier = ACopier::of(a_src, m0, k_begin, k_end);
    auto b_copier = BCopier::of(b_src, n0, k_begin, k_end);
    // Stages the next k tile (the tiles go in order, tile 0 by first()) into slot `slot`.
    auto stage = [&](int slot, bool first) {
        E* as = smem + slot * G::STAGE_ELEMS;
        E* bs = as + G::ALayout::TILE_ELEMS;
        if (first) {
            a_copier.first(as);
            b_copier.first(bs);
        } else {
            a_copier.copy(as);
            b_copier.copy(bs);
        }
    };
    // One k tile: wait for it, refill the slot the previous tile used, multiply. One cp.async
    // group per tile, empty past the last, so "all but the newest STAGES - 2 groups" is tile kt.
    auto step = [&](int kt, int slot) {
        cp_async_wait<T::STAGES - 2>();
        __syncthreads();  // tile kt is in every thread's view; the previous tile's slot is free
        if (kt + T::STAGES - 1 < k_tiles) stage((slot + T::STAGES - 1) % T::STAGES, false);
        cp_async_commit();
        const E* as = smem + slot * G::STAGE_ELEMS;
        const E* bs = as + G::ALayout::TILE_ELEMS;
#pragma unroll
        for (int kk = 0; kk < T::BK / T::MMA_K; ++kk) {
            unsigned int a[T::TILES_M][4], b[T::TILES_N][2];
            load_a<A_K_CONTIGUOUS>(a, as, frag, kk, lane);
            load_b<B_K_CONTIGUOUS>(b, bs, frag, kk, lane);
#pragma unroll
            for (int i = 0; i < T::TILES_M; ++i)
#pragma unroll
                for (int j = 0; j < T::TILES_N; ++j) MmaOf<E>::mma(frag.acc[i][j], a[i], b[j]);
        }
    };
#pragma unroll
    for (int s = 0; s < T::STAGES - 1; ++s) {
        if (s < k_tiles) stage(s, s == 0);
        cp_async_commit();
    }
    // STAGES tiles per pass, so that every slot is a constant and shared addresses are immediates;
    // the last k_tiles % STAGES tiles after it.
    int kt = 0;
    for (; kt + T::STAGES <= k_tiles; kt += T::STAGES) {
#pragma unroll
        for (int s = 0; s < T::STAGES; ++s) step(kt + s, s);
    }
#pragma unroll
    for (int s = 0; s < T::STAGES - 1; ++s)
        if (kt + s < k_tiles) step(kt + s, s);
    cp_async_wait<0>();  // only empty groups remain; nothing may be in flight at return
}

// frag.acc = A[m0 : m0+128, k_begin : k_end] @ B[k_begin : k_end, n0 : n0+128]. fp32 operands:
// by 16-byte cp.async when both operands' rows are 16-byte aligned (any M, N, K), else by 4-byte
// cp.async (ScalarCopier; a view that starts off a 16-byte boundary, or a leading dimension that
// is not a multiple of 4). bf16 operands (round_bf16's, padded) always take cp.async. `smem` is the block's dynamic
// shared memory, of at least Tf32Gemm<A_K_CONTIGUOUS, B_K_CONTIGUOUS, E>::smem_bytes.
template <bool A_K_CONTIGUOUS, bool B_K_CONTIGUOUS, class E>
__device__ __forceinline__ void mma_gemm(const Operand<A_K_CONTIGUOUS, E>& a_src, const Operand<B_K_CONTIGUOUS, E>& b_src,
                                         long long k_begin, long long k_end, long long m0, long long n0, void* smem,
                                         Tf32Fragment& frag) {
    E* tiles = static_cast<E*>(smem);
    if constexpr (sizeof(E) == 2) {
        mma_gemm_loop<true>(a_src, b_src, k_begin, k_end, m0, n0, tiles, frag);
    } else if (a_src.rows_aligned() && b_src.rows_aligned()) {  // uniform across the launch
        mma_gemm_loop<true>(a_src, b_src, k_begin, k_end, m0, n0, tiles, frag);
    } else {
        mma_gemm_loop<false>(a_src, b_src, k_begin, k_end, m0, n0, tiles, frag);
    }
}

// Calls visit(row, col, v0, v1, pair) for each pair of horizontally adjacent accumulators
// (columns col, col + 1) whose first element lies inside the (M, N) output; pair says whether
// the second one does too.
template <class Visit>
__device__ __forceinline__ void tf32_for_each_pair(const Tf32Fragment& frag, long long m0, long long n0, long long M,
                                                   long long N, Visit visit) {
#pragma unroll
    for (int i = 0; i < Tf32Tile::TILES_M; ++i)
#pragma unroll
        for (int j = 0; j < Tf32Tile::TILES_N; ++j)
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const long long row = m0 + frag.row(i, half), col = n0 + frag.col(j);
                if (row < M && col < N)
                    visit(row, col, frag.acc[i][j][2 * half], frag.acc[i][j][2 * half + 1], col + 1 < N);
            }
}

// Stores v0, v1 at out[idx], out[idx + 1] (the second only when `pair`), as one 8-byte store
// when `vector` (the host's row width is even and out is 8-byte aligned, so idx even is).
__device__ __forceinline__ void store_pair(float* out, long long idx, float v0, float v1, bool pair, bool vector) {
    if (pair && vector) {
        *reinterpret_cast<float2*>(out + idx) = make_float2(v0, v1);
    } else {
        out[idx] = v0;
        if (pair) out[idx + 1] = v1;
    }
}

// Reads in[idx] into v0 and, when `pair`, in[idx + 1] into v1 (else leaves v1): store_pair's mirror.
__device__ __forceinline__ void read_pair(const float* in, long long idx, float& v0, float& v1, bool pair, bool vector) {
    if (pair && vector) {
        const float2 v = *reinterpret_cast<const float2*>(in + idx);
        v0 = v.x;
        v1 = v.y;
    } else {
        v0 = in[idx];
        if (pair) v1 = in[idx + 1];
    }
}

}  // namespace gpubp
