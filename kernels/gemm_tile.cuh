// The tiled fp32 GEMM main loop shared by dense_forward.cu and dense_backward.cu.
//
// Computes one BM x BN tile of C = A @ B over k in [k_begin, k_end), A (M, K) and B (K, N)
// read through tile loaders, so one main loop serves x @ W (forward), dz @ W^T (dX) and
// x^T @ dz (dW). The activation derivative is not evaluated here: dX and dW read dz from
// dense_backward.cu's dense_dz pass, which forms dz = dy * act'(.) once per element.
//
// Tiling (the classic block / warp / thread register blocking of fast SIMT SGEMMs):
//   block tile  BM x BN = 128x128 (256 threads) or 128x64 (128 threads), BK = 16 deep
//   warp tile   WARP_M x WARP_N = 32 x 64; warps laid out (BM/32) x (BN/64)
//   thread tile 8 x 8 = two 4-row groups 16 rows apart x two 4-column groups 32 columns apart;
//               lanes laid out 4 (rows) x 8 (columns) within the warp. Each k step reads
//               two float4 of A and two float4 of B from shared memory (LDS.128) and issues
//               64 FMAs; the eight lanes sharing a row group read one float4 (a broadcast),
//               the eight column groups of a warp 128 contiguous bytes: conflict-free.
//   shared      A and B tiles stored k-major, As[k][m] and Bs[k][n], each row padded by
//               SMEM_PAD = 4 floats (row stride = 4 banks mod 32) so the transposing stores
//               of K-contiguous operands hit distinct banks while rows stay 16-byte aligned;
//               two buffers of each: 2 * BK * (BM + 4 + BN + 4) * 4 bytes = 33 KB (128x128),
//               25 KB (128x64), static and under the 48 KB default.
//   pipeline    global -> registers for slice t+1 is issued before the FMAs on slice t and
//               stored to the other shared buffer after them: one __syncthreads per slice.
//
// Boundaries, kept out of the loop: rows and columns past M or N are never stored, so a
// loader clamps them to the last valid row or column once, before the loop, and the loop's
// loads need no bounds checks (they read real data the epilogue discards). Only k must be
// exact: the loop runs over the whole BK slices, and a last partial slice (K % BK rows) is
// loaded with guards, out-of-range k as 0, after it. Each loader has a float4 form (the
// contiguous extent a multiple of 4 and the base 16-byte aligned: every access 16 bytes) and
// a scalar form for any other shape, in which 8 or 32 lanes read consecutive floats; both
// use every byte of the 32-byte sectors they move. The kernel picks one form for both
// operands at run time (gemm_mainloop<..., VEC>), so the loop holds no such branch.
#pragma once

#include "activations.cuh"

namespace gpubp {

constexpr int BK = 16;
constexpr int WARP_M = 32;
constexpr int WARP_N = 64;
constexpr int THREAD_M = 8;
constexpr int THREAD_N = 8;
constexpr int LANES_M = 4;  // lanes along M in a warp; 8 along N
constexpr int LANES_N = 8;
constexpr int SMEM_PAD = 4;

template <int BM, int BN>
struct TileShape {
    static_assert(BM % WARP_M == 0 && BN % WARP_N == 0, "block tile must be whole warp tiles");
    static constexpr int WARPS_M = BM / WARP_M;
    static constexpr int WARPS_N = BN / WARP_N;
    static constexpr int THREADS = 32 * WARPS_M * WARPS_N;
    static constexpr int LDA = BM + SMEM_PAD;  // row stride of As[k][.]
    static constexpr int LDB = BN + SMEM_PAD;
    // Resident blocks per SM that __launch_bounds__ asks the register allocator for (64K
    // registers per SM): 128x128 gets 2 (<= 128 registers, 16 warps per SM); 128x64, whose
    // threads stage 24 floats a slice instead of 16, gets 3 (<= 168 registers, 12 warps).
    // The build fails on any spill.
    static constexpr int MIN_BLOCKS = THREADS >= 256 ? 2 : 3;
};

// Where one thread's 8x8 accumulator sits inside the block tile: rows row0 + {0..3} and
// row0 + 16 + {0..3}; columns col0 + {0..3} and col0 + 32 + {0..3}.
struct ThreadTile {
    int warp_m, warp_n, lane_m, lane_n, row0, col0;
    template <int BM, int BN>
    __device__ __forceinline__ static ThreadTile of(int tid) {
        ThreadTile t;
        const int warp = tid / 32, lane = tid % 32;
        t.warp_m = warp / TileShape<BM, BN>::WARPS_N;
        t.warp_n = warp % TileShape<BM, BN>::WARPS_N;
        t.lane_m = lane / LANES_N;
        t.lane_n = lane % LANES_N;
        t.row0 = t.warp_m * WARP_M + t.lane_m * 4;
        t.col0 = t.warp_n * WARP_N + t.lane_n * 4;
        return t;
    }
    // Row (0..7) and column (0..7) of the accumulator -> offset inside the block tile.
    __device__ __forceinline__ int row(int i) const { return row0 + (i / 4) * (LANES_M * 4) + i % 4; }
    __device__ __forceinline__ int col(int j) const { return col0 + (j / 4) * (LANES_N * 4) + j % 4; }
};

__device__ __forceinline__ bool aligned16(const float* p) {
    return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0;
}

__device__ __forceinline__ float4 load4(const float* p) { return *reinterpret_cast<const float4*>(p); }

// std::conditional, which NVRTC's headers do not provide.
template <bool C, class T, class F> struct Pick { using type = T; };
template <class T, class F> struct Pick<false, T, F> { using type = F; };

// An operand is a K x O matrix (O = M for A, N for B) in global memory, element (k, o), with
// O extent `o_extent`; `ld` is the row stride of its storage. A tile loader stages the
// operand's BK x O slices: load(s) pulls whole slice s (counted from k_begin) into registers,
// load_tail(s, k_valid) a partial one (k_valid of BK rows, the rest as 0), store() writes the registers to a k-major shared buffer T[k][o] with row stride LD.

// ---------------------------------------------------------------------------- K-contiguous
//
// Element (k, o) at p[o * ld + k] (x in x @ W; dz and W in dz @ W^T). Transposed as stored.
//   float4 form: lanes in pairs on one row, 8 consecutive k each pair (a 32-byte sector);
//                a thread's float4 are k = 4 (tid % 2) + {0, 8} of rows tid / 2 + i GROUP.
//   scalar form: 8 lanes on one row, one k each; a thread's floats are k = tid % 8 + {0, 8}
//                of rows tid / 8 + i GROUP.
// Stores: the 32 lanes of a warp write 32 distinct banks (row stride = 4 banks mod 32).
template <int O, int THREADS, int LD, bool VEC>
struct KContiguousTile {
    static constexpr int LANES_K = VEC ? 2 : 8;   // lanes along k on one row
    static constexpr int GROUP = THREADS / LANES_K;  // rows one pass of the block covers
    static constexpr int ROWS = O / GROUP;        // rows per thread
    static constexpr int PER_ROW = 2;             // float4 (or floats) per row per thread
    static_assert(O % GROUP == 0, "tile rows must split evenly over the threads");
    static_assert(BK == 16, "the lane layout covers 16 k: 2 lanes x 2 float4, or 8 lanes x 2 floats");
    using Reg = typename Pick<VEC, float4, float>::type;

    const float* row[ROWS];  // (row r, k = the first slice's first + this thread's first k)
    Reg reg[ROWS][PER_ROW];
    int k_lane, r_lane;

    __device__ __forceinline__ void init(const float* p, long long ld, long long o0, long long o_extent,
                                         long long k_begin, int tid) {
        k_lane = VEC ? 4 * (tid % LANES_K) : tid % LANES_K;
        r_lane = tid / LANES_K;
#pragma unroll
        for (int i = 0; i < ROWS; ++i) {
            long long o = o0 + r_lane + i * GROUP;
            if (o >= o_extent) o = o_extent - 1;
            row[i] = p + o * ld + k_begin + k_lane;
        }
    }
    // Offset of this thread's h-th float4 (or float) from row[i]: 8 k further.
    __host__ __device__ static constexpr int step(int h) { return 8 * h; }

    __device__ __forceinline__ void load(int slice) {
#pragma unroll
        for (int i = 0; i < ROWS; ++i) {
            const float* q = row[i] + slice * BK;
#pragma unroll
            for (int h = 0; h < PER_ROW; ++h) {
                if constexpr (VEC) reg[i][h] = load4(q + step(h));
                else reg[i][h] = q[step(h)];
            }
        }
    }
    __device__ __forceinline__ void load_tail(int slice, int k_valid) {
#pragma unroll
        for (int i = 0; i < ROWS; ++i)
#pragma unroll
            for (int h = 0; h < PER_ROW; ++h) {
                const int k = k_lane + step(h);
                const float* q = row[i] + slice * BK + step(h);
                if constexpr (VEC) {  // K is a multiple of 4 here, so is k_valid: a float4 is all in or out
                    reg[i][h] = k < k_valid ? load4(q) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                } else {
                    reg[i][h] = k < k_valid ? q[0] : 0.0f;
                }
            }
    }
    __device__ __forceinline__ void store(float* tile) const {
#pragma unroll
        for (int i = 0; i < ROWS; ++i)
#pragma unroll
            for (int h = 0; h < PER_ROW; ++h) {
                float* t = tile + (k_lane + step(h)) * LD + r_lane + i * GROUP;
                if constexpr (VEC) {
                    t[0 * LD] = reg[i][h].x;
                    t[1 * LD] = reg[i][h].y;
                    t[2 * LD] = reg[i][h].z;
                    t[3 * LD] = reg[i][h].w;
                } else {
                    t[0] = reg[i][h];
                }
            }
    }
};

// ---------------------------------------------------------------------------- O-contiguous
//
// Element (k, o) at p[k * ld + o] (W in x @ W; x^T and dz in dW). Stored as it is read.
//   float4 form: O/4 lanes span a k row, 4 columns each; a thread's float4 are columns
//                4 (tid % (O/4)) + {0..3} of k rows tid / (O/4) + i KSTEP. A group past
//                o_extent (a multiple of 4 here) is clamped to the last one.
//   scalar form: a warp spans a k row, each lane O/32 columns 32 apart (one address, immediate
//                offsets); a thread's floats are columns tid % 32 + 32 c of k rows
//                tid / 32 + i KSTEP. Columns past o_extent are not loaded (their registers
//                keep whatever they held: those columns are never stored).
// A thread's columns are the same in every slice, so it also sums the column values it stages
// (add_column_sums): the threads with the same columns together see every k once.
template <int O, int THREADS, int LD, bool VEC>
struct OContiguousTile {
    static constexpr int WIDTH = VEC ? 4 : O / 32;   // columns per thread
    static constexpr int SPACING = VEC ? 1 : 32;     // between a thread's columns
    static constexpr int LANES_O = O / WIDTH;        // lanes across one k row
    static constexpr int KSTEP = THREADS / LANES_O;  // k rows one pass of the block covers
    static constexpr int PASSES = BK / KSTEP;
    static_assert(THREADS % LANES_O == 0 && BK % KSTEP == 0, "slice must split evenly over the threads");
    using Reg = typename Pick<VEC, float4, float>::type;

    const float* row[PASSES];  // (k = the first slice's first + k_lane + i KSTEP, this thread's first column)
    long long next;            // offset of the next slice load() reads from row[i]
    long long slice_stride;    // BK rows
    Reg reg[PASSES][VEC ? 1 : WIDTH];
    bool valid[VEC ? 1 : WIDTH];
    int k_lane, o_lane;

    __device__ __forceinline__ void init(const float* p, long long ld_, long long o0, long long o_extent,
                                         long long k_begin, int tid) {
        k_lane = tid / LANES_O;
        long long o;
        if constexpr (VEC) {
            o_lane = (tid % LANES_O) * 4;
            o = o0 + o_lane;
            if (o >= o_extent) o = o_extent - 4;
            valid[0] = true;
        } else {
            o_lane = tid % LANES_O;
            o = o0 + o_lane;
#pragma unroll
            for (int c = 0; c < WIDTH; ++c) valid[c] = o + c * SPACING < o_extent;
#pragma unroll
            for (int i = 0; i < PASSES; ++i)
#pragma unroll
                for (int c = 0; c < WIDTH; ++c) reg[i][c] = 0.0f;
        }
#pragma unroll
        for (int i = 0; i < PASSES; ++i) row[i] = p + (k_begin + k_lane + i * KSTEP) * ld_ + o;
        next = 0;
        slice_stride = BK * ld_;
    }
    __device__ __forceinline__ void load_row(int i, long long offset, bool in_k) {
        const float* q = row[i] + offset;
        if constexpr (VEC) {
            reg[i][0] = in_k ? load4(q) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        } else {
#pragma unroll
            for (int c = 0; c < WIDTH; ++c) {
                if (!in_k) reg[i][c] = 0.0f;
                else if (valid[c]) reg[i][c] = q[c * SPACING];
            }
        }
    }
    // Slices are read in order, so the offset is a running sum (no 64-bit multiply per slice).
    __device__ __forceinline__ void load(int) {
#pragma unroll
        for (int i = 0; i < PASSES; ++i) load_row(i, next, true);
        next += slice_stride;
    }
    __device__ __forceinline__ void load_tail(int, int k_valid) {
#pragma unroll
        for (int i = 0; i < PASSES; ++i) load_row(i, next, k_lane + i * KSTEP < k_valid);
    }
    __device__ __forceinline__ void store(float* tile) const {
#pragma unroll
        for (int i = 0; i < PASSES; ++i) {
            float* t = tile + (k_lane + i * KSTEP) * LD + o_lane;
            if constexpr (VEC) {
                *reinterpret_cast<float4*>(t) = reg[i][0];
            } else {
#pragma unroll
                for (int c = 0; c < WIDTH; ++c) t[c * SPACING] = reg[i][c];
            }
        }
    }
    // sums[c] += this thread's staged values of its column c (4 o_lane + c, or o_lane + 32 c).
    __device__ __forceinline__ void add_column_sums(float (&sums)[WIDTH]) const {
#pragma unroll
        for (int i = 0; i < PASSES; ++i) {
            if constexpr (VEC) {
                sums[0] += reg[i][0].x; sums[1] += reg[i][0].y; sums[2] += reg[i][0].z; sums[3] += reg[i][0].w;
            } else {
#pragma unroll
                for (int c = 0; c < WIDTH; ++c) sums[c] += reg[i][c];
            }
        }
    }
    // Tile column of this thread's column c.
    __device__ __forceinline__ int column(int c) const { return o_lane + c * SPACING; }
};

// ---------------------------------------------------------------------------- main loop

// Column sums per thread: the B loader's WIDTH when they are wanted, else a placeholder.
template <bool COLSUM, class LoadB> struct SumWidth { static constexpr int value = 1; };
template <class LoadB> struct SumWidth<true, LoadB> { static constexpr int value = LoadB::WIDTH; };

template <int BM, int BN>
struct GemmSmem {
    float a[2][BK * TileShape<BM, BN>::LDA];
    float b[2][BK * TileShape<BM, BN>::LDB];
};

// acc = this thread's 8x8 share of A[m0 : m0+BM, k_begin : k_end] @ B[k_begin : k_end, n0 : n0+BN],
// A and B staged by the loaders LoadA (O = BM) and LoadB (O = BN), already init()-ed at
// k_begin. With COLSUM (LoadB an OContiguousTile), also returns, in the threads tid < BN,
// sum over k of B[k, n0 + tid] (the dW kernel's db), summed in a fixed order.
template <int BM, int BN, bool COLSUM, class LoadA, class LoadB>
__device__ __forceinline__ float gemm_mainloop(LoadA& a, LoadB& b, long long k_begin, long long k_end,
                                               GemmSmem<BM, BN>& smem, float (&acc)[THREAD_M][THREAD_N]) {
    using Shape = TileShape<BM, BN>;
    const int tid = threadIdx.x;
    const ThreadTile tt = ThreadTile::of<BM, BN>(tid);

#pragma unroll
    for (int i = 0; i < THREAD_M; ++i)
#pragma unroll
        for (int j = 0; j < THREAD_N; ++j) acc[i][j] = 0.0f;
    float sums[SumWidth<COLSUM, LoadB>::value];
#pragma unroll
    for (int j = 0; j < SumWidth<COLSUM, LoadB>::value; ++j) sums[j] = 0.0f;

    const int whole = static_cast<int>((k_end - k_begin) / BK);  // whole slices; then a tail of
    const int tail = static_cast<int>((k_end - k_begin) % BK);   // this many k

    auto stage = [&](int buf) {
        a.store(smem.a[buf]);
        b.store(smem.b[buf]);
        if constexpr (COLSUM) b.add_column_sums(sums);
    };
    auto multiply = [&](int buf) {
        const float* as = smem.a[buf];
        const float* bs = smem.b[buf];
#pragma unroll
        for (int k = 0; k < BK; ++k) {
            const float4 a0 = load4(as + k * Shape::LDA + tt.row0);
            const float4 a1 = load4(as + k * Shape::LDA + tt.row0 + LANES_M * 4);
            const float4 b0 = load4(bs + k * Shape::LDB + tt.col0);
            const float4 b1 = load4(bs + k * Shape::LDB + tt.col0 + LANES_N * 4);
            const float af[THREAD_M] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
            const float bf[THREAD_N] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
            for (int i = 0; i < THREAD_M; ++i)
#pragma unroll
                for (int j = 0; j < THREAD_N; ++j) acc[i][j] = fmaf(af[i], bf[j], acc[i][j]);
        }
    };

    int cur = 0;
    if (whole > 0) {
        a.load(0);
        b.load(0);
        stage(0);
        __syncthreads();
        // Every slice but the last whole one: the next slice's loads are in flight during the
        // FMAs; its buffer was last read before the previous barrier.
        for (int t = 1; t < whole; ++t) {
            a.load(t);
            b.load(t);
            multiply(cur);
            stage(cur ^ 1);
            __syncthreads();
            cur ^= 1;
        }
        if (tail) {
            a.load_tail(whole, tail);
            b.load_tail(whole, tail);
        }
        multiply(cur);
        if (tail) {
            stage(cur ^ 1);
            __syncthreads();
            cur ^= 1;
            multiply(cur);
        }
    } else if (tail) {
        a.load_tail(0, tail);
        b.load_tail(0, tail);
        stage(0);
        __syncthreads();
        multiply(0);
    }

    float column_sum = 0.0f;
    if constexpr (COLSUM) {
        // KSTEP threads hold partial sums of each column (k rows k_lane + i KSTEP); add them
        // in k_lane order through an A buffer, no longer read.
        constexpr int W = LoadB::WIDTH, KSTEP = LoadB::KSTEP;
        static_assert(KSTEP * BN <= BK * Shape::LDA, "the column partials must fit in an A buffer");
        float* partial = smem.a[0];
        __syncthreads();
        if constexpr (W == 4 && LoadB::SPACING == 1) {  // four adjacent columns: one 16-byte store
            *reinterpret_cast<float4*>(partial + b.k_lane * BN + b.column(0)) =
                make_float4(sums[0], sums[1], sums[2], sums[3]);
        } else {
#pragma unroll
            for (int j = 0; j < W; ++j) partial[b.k_lane * BN + b.column(j)] = sums[j];
        }
        __syncthreads();
        if (tid < BN) {
#pragma unroll
            for (int s = 0; s < KSTEP; ++s) column_sum += partial[s * BN + tid];
        }
    }
    return column_sum;
}

// Writes up to four consecutive floats of one row: a float4 store when all four are in
// range and the row allows it, else one guarded store each.
__device__ __forceinline__ void store4(float* p, long long idx, const float (&v)[4], long long valid,
                                       bool vec) {
    if (vec && valid >= 4) {
        *reinterpret_cast<float4*>(p + idx) = make_float4(v[0], v[1], v[2], v[3]);
    } else {
#pragma unroll
        for (int j = 0; j < 4; ++j)
            if (j < valid) p[idx + j] = v[j];
    }
}

// Writes accumulator columns jg .. jg+3 of every row this thread owns to out (M, N), whose
// tile column for jg is col. jg must be a compile-time constant after unrolling, so acc
// stays in registers.
__device__ __forceinline__ void store_acc_columns(float* out, const float (&acc)[THREAD_M][THREAD_N], int jg,
                                                  const ThreadTile& tt, long long m0, long long M, long long N,
                                                  long long col, long long valid_cols, bool vec) {
#pragma unroll
    for (int i = 0; i < THREAD_M; ++i) {
        const long long row = m0 + tt.row(i);
        if (row >= M) continue;
        const float v[4] = {acc[i][jg], acc[i][jg + 1], acc[i][jg + 2], acc[i][jg + 3]};
        store4(out, row * N + col, v, valid_cols, vec);
    }
}

}  // namespace gpubp
