// The one place kernels reach inline PTX: tensor-core mma.sync, the tf32 / bf16 conversions, and
// the data movement that feeds them: cp.async (global to shared without registers) and ldmatrix
// (shared to mma fragments), with the shared load the fragment loops use where ldmatrix does not fit.
//
// Each wrapper is a warp-wide operation (all 32 lanes, converged) on register fragments laid
// out as the PTX ISA's "Matrix Fragments for mma.m16n8k8" / "mma.m16n8k16" say, with
// g = lane >> 2 and t = lane % 4:
//   m16n8k8 .tf32   A (16x8, row):  a0 (g, t)  a1 (g+8, t)  a2 (g, t+4)  a3 (g+8, t+4)
//                   B (8x8, col):   b0 (t, g)  b1 (t+4, g)
//   m16n8k16 .bf16/.f16, two 16-bit values per register, lower index in the low half:
//                   A (16x16): value i of a0..a7 at row g + 8 ((i >> 1) & 1), col 2t + (i & 1) + 8 (i >= 4)
//                   B (16x8):  value i of b0..b3 at row 2t + (i & 1) + 8 (i >= 2), col g
//   C, D (16x8, f32):  c0 (g, 2t)  c1 (g, 2t+1)  c2 (g+8, 2t)  c3 (g+8, 2t+1)
// D = A B + C with fp32 accumulation. tf32 operands should be rounded with to_tf32 first
// (the hardware reads only their top 19 bits).
//
// Data movement (PTX ISA "Data Movement and Conversion Instructions"):
//   cp_async_ca<BYTES>(dst, src) / cp_async_cg(dst, src): cp.async.ca (4, 8 or 16 bytes, cached in
//     L1) / .cg (16 bytes, L2 only) from global src to shared dst, both aligned to the size;
//     cp_async_cg_zfill(dst, src, n): the same 16 bytes, of which only the first n come from src
//     and the rest are zeros (the src-size operand); cp_async_ca4_zfill(dst, src, zero): 4 bytes by
//     cp.async.ca, or 4 zeros and no read where `zero` (the ignore-src operand). The copy
//     belongs to the thread's open group; cp_async_commit() closes it; cp_async_wait<N>() returns once
//     at most the N newest committed groups of this thread are still in flight; cp_async_wait_all()
//     commits and waits for everything. Only the issuing thread's wait makes its copies visible to it;
//     other threads see them after that wait and a __syncthreads.
//   ldmatrix<N, TRANS>(r, row): ldmatrix.sync.aligned.m8n8.xN[.trans].shared.b16, a warp collective:
//     lane l names row l % 8 of matrix l / 8 (16 bytes, 16-byte aligned; lanes past 8N name nothing)
//     and receives in r[i] the 32-bit word l % 4 of row l / 4 of matrix i (with TRANS: the two 16-bit
//     elements (2 (l % 4), l / 4) and (2 (l % 4) + 1, l / 4), the first in the low half). For 32-bit
//     data (tf32) a row of 8 b16 is 4 floats, so x4 without TRANS gives the m16n8k8 A fragment of a
//     k-contiguous tile, and the B fragment of an n-major (k-contiguous) one.
//   shared_load(p): a plain shared-memory read (LDS); on the CPU harness it also checks that no
//     cp.async to those bytes is still in flight.
// These instructions need sm_80 or newer; for older targets the wrappers trap, and the
// build compiles files that include this header for compute_80 as well (CMakeLists.txt).
// With GPUBP_CUDA_ON_CPU (tests/cuda_on_cpu) the CPU emulation replaces the PTX, and the wrappers
// whose checks name a line take their caller's file and line as trailing default arguments
// (GPUBP_CALLER_SITE, empty on a GPU): failures name the kernel's line, and lanes of a warp that reach
// ldmatrix or mma from different lines fail the launch (.aligned: all lanes run the same instruction).
#pragma once

#if defined(GPUBP_CUDA_ON_CPU)
#define GPUBP_CALLER_SITE , const char* file = __builtin_FILE(), int line = __builtin_LINE()
#else
#define GPUBP_CALLER_SITE
#endif

namespace gpubp {

// cvt.rna.tf32.f32: to 10 mantissa bits, round to nearest, ties away from zero.
__device__ __forceinline__ unsigned int to_tf32(float x) {
    unsigned int r = 0u;
#if defined(GPUBP_CUDA_ON_CPU)
    r = gpubp_cpu::cvt_rna_tf32(x);
#elif __CUDA_ARCH__ >= 800
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
#else
    __trap();
#endif
    return r;
}

// cvt.rn.bf16x2.f32: two floats to bf16 (round to nearest even), lo in the low half, as the
// m16n8k16 fragments pair consecutive k (A) or rows (B).
__device__ __forceinline__ unsigned int pack_bf16x2(float lo, float hi) {
    unsigned int r = 0u;
#if defined(GPUBP_CUDA_ON_CPU)
    r = static_cast<unsigned int>(__float2bfloat16_rn(lo).bits) |
        static_cast<unsigned int>(__float2bfloat16_rn(hi).bits) << 16;
#elif __CUDA_ARCH__ >= 800
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));  // the first source goes high
#else
    __trap();
#endif
    return r;
}

__device__ __forceinline__ void mma_m16n8k8_tf32(float (&d)[4], const unsigned int (&a)[4], const unsigned int (&b)[2],
                                                 const float (&c)[4] GPUBP_CALLER_SITE) {
#if defined(GPUBP_CUDA_ON_CPU)
    gpubp_cpu::mma_sync(gpubp_cpu::MmaKind::tf32_m16n8k8, file, line, d, a, b, c);
#elif __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
#else
    __trap();
#endif
}

// The two m16n8k16 flavours differ only in the operand type's name in the instruction.
#define GPUBP_MMA_M16N8K16(NAME, TYPE, KIND)                                                                   \
    __device__ __forceinline__ void mma_m16n8k16_##NAME(float (&d)[4], const unsigned int (&a)[4],           \
                                                       const unsigned int (&b)[2],                           \
                                                       const float (&c)[4] GPUBP_CALLER_SITE) {              \
        GPUBP_MMA_M16N8K16_BODY(TYPE, KIND)                                                                  \
    }
#if defined(GPUBP_CUDA_ON_CPU)
#define GPUBP_MMA_M16N8K16_BODY(TYPE, KIND) gpubp_cpu::mma_sync(gpubp_cpu::MmaKind::KIND, file, line, d, a, b, c);
#elif __CUDA_ARCH__ >= 800
#define GPUBP_MMA_M16N8K16_BODY(TYPE, KIND)                                                                  \
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TYPE "." TYPE ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "   \
                 "{%8,%9}, {%10,%11,%12,%13};"                                                                \
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])                                              \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),      \
                   "f"(c[2]), "f"(c[3]));
#else
#define GPUBP_MMA_M16N8K16_BODY(TYPE, KIND) __trap();
#endif
GPUBP_MMA_M16N8K16(bf16, "bf16", bf16_m16n8k16)
GPUBP_MMA_M16N8K16(f16, "f16", f16_m16n8k16)
#undef GPUBP_MMA_M16N8K16_BODY
#undef GPUBP_MMA_M16N8K16

#if !defined(GPUBP_CUDA_ON_CPU) && __CUDA_ARCH__ >= 800
__device__ __forceinline__ unsigned int shared_address(const void* p) {
    return static_cast<unsigned int>(__cvta_generic_to_shared(p));
}
#endif

template <int BYTES>
__device__ __forceinline__ void cp_async_ca(void* dst, const void* src GPUBP_CALLER_SITE) {
    static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async copies 4, 8 or 16 bytes");
#if defined(GPUBP_CUDA_ON_CPU)
    gpubp_cpu::cp_async<BYTES>(dst, src, file, line);
#elif __CUDA_ARCH__ >= 800
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;" ::"r"(shared_address(dst)), "l"(src), "n"(BYTES)
                 : "memory");
#else
    __trap();
#endif
}

__device__ __forceinline__ void cp_async_cg(void* dst, const void* src GPUBP_CALLER_SITE) {
#if defined(GPUBP_CUDA_ON_CPU)
    gpubp_cpu::cp_async<16>(dst, src, file, line);
#elif __CUDA_ARCH__ >= 800
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(shared_address(dst)), "l"(src) : "memory");
#else
    __trap();
#endif
}

// cp.async.cg with a source size: copies the first src_bytes (0 to 16, a multiple of 4) of the
// 16-byte chunk and writes zeros to the rest; with 0 nothing is read, so src may then point
// anywhere (the edge tiles' rows and columns past the operand).
__device__ __forceinline__ void cp_async_cg_zfill(void* dst, const void* src, int src_bytes GPUBP_CALLER_SITE) {
#if defined(GPUBP_CUDA_ON_CPU)
    gpubp_cpu::cp_async_zfill(dst, src, src_bytes, file, line);
#elif __CUDA_ARCH__ >= 800
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(shared_address(dst)), "l"(src), "r"(src_bytes)
                 : "memory");
#else
    __trap();
#endif
}

// cp.async.ca of 4 bytes, or with `zero` 4 zero bytes and no read at all (the ignore-src
// operand: src may then point anywhere). One LDGSTS with a zero-fill predicate, where a src-size
// register would cost ptxas's conversion of the size into a predicate and an address shift.
__device__ __forceinline__ void cp_async_ca4_zfill(void* dst, const void* src, bool zero GPUBP_CALLER_SITE) {
#if defined(GPUBP_CUDA_ON_CPU)
    gpubp_cpu::cp_async_zfill<4>(dst, src, zero ? 0 : 4, file, line);
#elif __CUDA_ARCH__ >= 800
    asm volatile(
        "{\n\t.reg .pred z;\n\tsetp.ne.b32 z, %2, 0;\n\tcp.async.ca.shared.global [%0], [%1], 4, z;\n\t}" ::"r"(
            shared_address(dst)),
        "l"(src), "r"(static_cast<int>(zero))
        : "memory");
#else
    __trap();
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(GPUBP_CUDA_ON_CPU)
    gpubp_cpu::async_commit();
#elif __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;" ::: "memory");
#else
    __trap();
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(GPUBP_CUDA_ON_CPU)
    gpubp_cpu::cp_async_wait_group(N, __FILE__, __LINE__);
#elif __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#else
    __trap();
#endif
}

__device__ __forceinline__ void cp_async_wait_all() {
#if defined(GPUBP_CUDA_ON_CPU)
    gpubp_cpu::async_commit();
    gpubp_cpu::cp_async_wait_group(0, __FILE__, __LINE__);
#elif __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_all;" ::: "memory");
#else
    __trap();
#endif
}

template <int N, bool TRANS = false>
__device__ __forceinline__ void ldmatrix(unsigned int (&r)[N], const void* row GPUBP_CALLER_SITE) {
    static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
#if defined(GPUBP_CUDA_ON_CPU)
    gpubp_cpu::ldmatrix<N, TRANS>(r, row, file, line);
#elif __CUDA_ARCH__ >= 800
    const unsigned int a = shared_address(row);
    if constexpr (N == 1 && !TRANS) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];" : "=r"(r[0]) : "r"(a) : "memory");
    } else if constexpr (N == 1) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];" : "=r"(r[0]) : "r"(a) : "memory");
    } else if constexpr (N == 2 && !TRANS) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];" : "=r"(r[0]), "=r"(r[1]) : "r"(a)
                     : "memory");
    } else if constexpr (N == 2) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];" : "=r"(r[0]), "=r"(r[1])
                     : "r"(a) : "memory");
    } else if constexpr (!TRANS) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a) : "memory");
    } else {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a) : "memory");
    }
#else
    __trap();
#endif
}

template <class T>
__device__ __forceinline__ T shared_load(const T* p GPUBP_CALLER_SITE) {
#if defined(GPUBP_CUDA_ON_CPU)
    gpubp_cpu::check_not_in_flight(p, sizeof(T), "a shared-memory load", file, line);
#endif
    return *p;
}

}  // namespace gpubp

#undef GPUBP_CALLER_SITE
