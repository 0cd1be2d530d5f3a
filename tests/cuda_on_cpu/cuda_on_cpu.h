// CUDA C++ on the CPU: the subset of the CUDA programming model that kernels/*.cu use (and
// the fused and tensor-core kernels after them), mapped onto C++20 so g++ compiles the
// kernel sources unchanged and tests/cuda_on_cpu/harness.py runs them against the NumPy
// backend, plain, under AddressSanitizer + UBSan, and under ThreadSanitizer; a fourth build,
// profile, records every shared- and global-memory access for the memory-traffic figures of
// access_profile.py (access_profiler.cpp says what it counts and how).
//
// Execution model (CUDA C++ Programming Guide, "Thread Hierarchy"): a launch runs its
// blocks in an order the launcher chooses (natural or shuffled, so no kernel may depend on
// block order), in the plain and tsan builds on two OS threads at once for a kernel's first
// launch and every launch of a kernel seen to fence or use an atomic (runtime.cpp,
// gpubp_cpu_launch), otherwise one after another; the threads of one block are fibers of one OS thread,
// each running until it waits at a synchronization point (runtime.cpp), and the sanitizers see
// each as a thread of its own. Threads 32w .. 32w+31 (linear thread id, x fastest) form warp w.
//
// What is checked, beyond running the code:
//   - __syncthreads() is a real barrier that counts arrivals. Threads of one block that wait
//     at different barriers, or a thread that returns while others wait at one, fail the
//     launch with both source lines ("Synchronization Functions": a barrier in divergent
//     code is undefined behaviour; synccheck reports it on a GPU).
//   - Warp collectives (__syncwarp, __shfl*_sync, __ballot_sync, __any/__all_sync, mma.sync)
//     are rendezvous of the lanes named in the mask: every lane named must arrive at the same
//     call with the same mask, a lane must name itself, and reading an absent lane is an error
//     ("Warp Shuffle Functions", "Warp Vote Functions").
//   - A block whose threads all wait with none able to proceed is reported as a deadlock.
//   - A block larger than the kernel's __launch_bounds__ fails the launch, as a GPU refuses it.
//   - Shared memory, static and dynamic, holds 0xff bytes at the start of every block: what a
//     kernel reads before it writes is garbage, as on a GPU ("Shared Memory": its contents are
//     undefined at a block's start), not a zero or the previous block's values.
//
// Limits (what a GPU run still has to show): timing; coalescing and bank conflicts beyond the
// profile build's model of them (access_profiler.cpp); real warp scheduling (lanes here never
// run in lockstep, so warp-synchronous code without __syncwarp fails here, which is right); the
// memory model beyond barriers, __syncwarp and fences (as on hardware, no other warp collective
// orders memory among its lanes here, so ThreadSanitizer reports a race hidden behind a shuffle
// or an mma.sync); __activemask() returns the lanes that have not yet returned, since which
// lanes a GPU would have converged is unknowable here; independent collectives by disjoint lane
// subsets of one warp at the same time are reported as a mask mismatch; device math rounds as
// the host's libm (see the math section for each function's tolerance).
#pragma once

#include <math.h>

#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>

// ------------------------------------------------------------------ qualifiers (Programming
// Guide, "Function Execution Space Specifiers", "Variable Memory Space Specifiers")
// harness.py preprocesses once with GPUBP_CPU_SCAN to find the extern "C" kernels by this marker,
// and each one's __launch_bounds__ (its maximum block size, which a launch may not exceed: a GPU
// refuses a larger block, so the runtime does too; see GPUBP_CPU_REGISTER).
#ifdef GPUBP_CPU_SCAN
#define __global__ __gpubp_kernel_marker__
#define __launch_bounds__(...) __gpubp_launch_bounds__(__VA_ARGS__)
#else
#define __global__
#define __launch_bounds__(...)
#endif
#define __device__
#define __host__
#define __forceinline__ inline
#define __align__(n) __attribute__((aligned(n)))
#define __constant__ static
// Static shared memory: one object per declaration, shared by every thread of the block;
// blocks run one at a time, so that is one copy per block. The harness links these objects
// (the kernel unit's zero-initialized statics: shared memory has no initializer) into one
// section, static_shared.ld, and the runtime fills it with 0xff bytes before a launch and after
// every block, as it does the dynamic shared memory: a kernel that reads shared memory before
// it writes it reads NaN (-1 as an integer, true as a bool), never a zero or what the previous
// block left, both of which a GPU leaves undefined. `extern __shared__` (dynamic shared
// memory) is rewritten by the harness into a pointer to the launch's dynamic shared buffer,
// sized exactly to the launch's request.
#define __shared__ static
// restrict is a hint to nvcc; g++ understands __restrict__ itself.

// ------------------------------------------------------------------ built-in vector types
// ("Built-in Vector Types"): the same sizes and alignments as CUDA's, so reinterpret_cast
// loads of float4 from unaligned addresses fail under UBSan's alignment check as they would
// fault on a GPU.
struct __align__(8) float2 { float x, y; };
struct __align__(16) float4 { float x, y, z, w; };
struct __align__(8) int2 { int x, y; };
struct __align__(8) uint2 { unsigned int x, y; };
struct __align__(16) int4 { int x, y, z, w; };
struct __align__(16) uint4 { unsigned int x, y, z, w; };
struct uint3 { unsigned int x, y, z; };
struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
    constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }

// ------------------------------------------------------------------ built-in variables
// ("Built-in Variables"): threadIdx and blockIdx are the running fiber's, read through the
// pointer the scheduler sets before it resumes one (atomic: ThreadSanitizer sees the scheduler
// and each fiber as threads of their own).
namespace gpubp_cpu {
struct ThreadCoords {
    uint3 thread, block;
};
extern std::atomic<const ThreadCoords*> running_coords;
inline const ThreadCoords& coords() { return *running_coords.load(std::memory_order_relaxed); }
}  // namespace gpubp_cpu
#define threadIdx (::gpubp_cpu::coords().thread)
#define blockIdx (::gpubp_cpu::coords().block)
extern dim3 blockDim;
extern dim3 gridDim;
constexpr int warpSize = 32;

// ------------------------------------------------------------------ the runtime's entry points
namespace gpubp_cpu {
[[noreturn]] void fail(const char* what, const char* file, int line);
void sync_block(const char* file, int line);
// One warp rendezvous: the calling lane offers `payload` (words 32-bit words, at most
// MAX_PAYLOAD_WORDS) for the lanes of `mask`; returns the payloads of all 32 lanes, lane l's at
// [l] (only those in `mask` are meaningful), to be read before the lane's next collective.
constexpr int MAX_PAYLOAD_WORDS = 16;
using LanePayloads = const uint32_t (*)[MAX_PAYLOAD_WORDS];
LanePayloads warp_exchange(const char* op, const char* file, int line, unsigned mask, const uint32_t* payload,
                           int words);
unsigned lane_id();
unsigned active_mask();
void fence();
// The order of the calling thread's next atomic (release after a __threadfence in its block, else
// relaxed), and the note an atomic leaves for the block's next fences (runtime.cpp, fence()).
std::memory_order atomic_order();
void atomic_done(void* p);
void* dynamic_shared();
}  // namespace gpubp_cpu

// ------------------------------------------------------------------ synchronization
#define __syncthreads() ::gpubp_cpu::sync_block(__FILE__, __LINE__)
#define __threadfence() ::gpubp_cpu::fence()
#define __threadfence_block() ::gpubp_cpu::fence()
// A trap aborts the launch, as it does on a GPU (where the context is lost too): the launch fails
// naming the file and line.
#define __trap() ::gpubp_cpu::fail("__trap()", __FILE__, __LINE__)

namespace gpubp_cpu {

template <class T>
inline void to_words(const T& v, uint32_t (&w)[2]) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a type wider than 8 bytes");
    w[0] = w[1] = 0;
    std::memcpy(w, &v, sizeof(T));
}

template <class T>
inline T from_words(const uint32_t* w) {
    T v;
    std::memcpy(&v, w, sizeof(T));
    return v;
}

constexpr int SHUFFLE_WORDS = 2;

// Source lane of a shuffle, or -1 for "keep my own value" ("Warp Shuffle Functions": width
// splits the warp into segments; up/down never leave the caller's segment; xor, as PTX's bfly,
// reads lane ^ arg whenever it is not past the caller's segment, so an arg >= width reads from
// an earlier segment).
enum class Shfl { idx, up, down, bfly };

inline int shuffle_source(Shfl kind, int lane, int arg, int width, const char* file, int line) {
    if (width <= 0 || width > 32 || (width & (width - 1)) != 0) fail("shuffle width must be a power of 2 <= 32", file, line);
    const int base = lane & ~(width - 1);
    switch (kind) {
        case Shfl::idx: return base + (arg & (width - 1));
        case Shfl::up: return (lane - base) >= arg ? lane - arg : -1;
        case Shfl::down: return (lane - base) + arg < width ? lane + arg : -1;
        case Shfl::bfly: {  // PTX shfl.sync.bfly: j = lane ^ b, valid while j <= maxLane, which may
            const int src = lane ^ arg;  // be in an earlier segment when b >= width
            return src <= (base | (width - 1)) ? src : -1;
        }
    }
    return -1;
}

template <class T>
inline T shuffle(Shfl kind, const char* op, const char* file, int line, unsigned mask, T v, int arg, int width = 32) {
    uint32_t w[2];
    to_words(v, w);
    const LanePayloads all = warp_exchange(op, file, line, mask, w, SHUFFLE_WORDS);
    const int src = shuffle_source(kind, static_cast<int>(lane_id()), arg, width, file, line);
    if (src < 0) return v;
    if (!((mask >> src) & 1u)) fail("shuffle reads a lane that is not in the mask (undefined on a GPU)", file, line);
    return from_words<T>(all[src]);
}

inline unsigned ballot(const char* op, const char* file, int line, unsigned mask, int pred) {
    const uint32_t w[1] = {pred != 0};
    const LanePayloads all = warp_exchange(op, file, line, mask, w, 1);
    unsigned bits = 0;
    for (int l = 0; l < 32; ++l)
        if (((mask >> l) & 1u) && all[l][0]) bits |= 1u << l;
    return bits;
}

}  // namespace gpubp_cpu

#define __syncwarp(...) ((void)::gpubp_cpu::warp_exchange("__syncwarp", __FILE__, __LINE__, \
                                                          ::gpubp_cpu::syncwarp_mask(__VA_ARGS__), nullptr, 0))
namespace gpubp_cpu {
inline unsigned syncwarp_mask() { return 0xffffffffu; }
inline unsigned syncwarp_mask(unsigned mask) { return mask; }
}  // namespace gpubp_cpu
#define __shfl_sync(mask, v, ...) \
    ::gpubp_cpu::shuffle(::gpubp_cpu::Shfl::idx, "__shfl_sync", __FILE__, __LINE__, mask, v, __VA_ARGS__)
#define __shfl_up_sync(mask, v, ...) \
    ::gpubp_cpu::shuffle(::gpubp_cpu::Shfl::up, "__shfl_up_sync", __FILE__, __LINE__, mask, v, __VA_ARGS__)
#define __shfl_down_sync(mask, v, ...) \
    ::gpubp_cpu::shuffle(::gpubp_cpu::Shfl::down, "__shfl_down_sync", __FILE__, __LINE__, mask, v, __VA_ARGS__)
#define __shfl_xor_sync(mask, v, ...) \
    ::gpubp_cpu::shuffle(::gpubp_cpu::Shfl::bfly, "__shfl_xor_sync", __FILE__, __LINE__, mask, v, __VA_ARGS__)
#define __ballot_sync(mask, pred) ::gpubp_cpu::ballot("__ballot_sync", __FILE__, __LINE__, mask, pred)
#define __any_sync(mask, pred) (::gpubp_cpu::ballot("__any_sync", __FILE__, __LINE__, mask, pred) != 0u)
#define __all_sync(mask, pred) \
    (::gpubp_cpu::ballot("__all_sync", __FILE__, __LINE__, mask, pred) == static_cast<unsigned>(mask))
#define __activemask() ::gpubp_cpu::active_mask()

// ------------------------------------------------------------------ atomics ("Atomic
// Functions"): device-scope read-modify-writes, real atomics (blocks run on two OS threads at
// once), with no ordering of their own (CUDA atomics are relaxed; __threadfence orders around
// them): ThreadSanitizer sees them as relaxed, but for a fence before (a release) or after (an
// acquire) them, as runtime.cpp's fence() models.
namespace gpubp_cpu {
template <class T>
inline T atomic_add(T* p, T v) {
    const T old = std::atomic_ref<T>(*p).fetch_add(v, atomic_order());
    atomic_done(p);
    return old;
}
template <class T>
inline T atomic_max(T* p, T v) {
    std::atomic_ref<T> a(*p);
    const std::memory_order order = atomic_order();
    T old = a.load(std::memory_order_relaxed);
    while (old < v && !a.compare_exchange_weak(old, v, order, std::memory_order_relaxed)) {
    }
    atomic_done(p);
    return old;
}
template <class T>
inline T atomic_cas(T* p, T expected, T desired) {
    std::atomic_ref<T>(*p).compare_exchange_strong(expected, desired, atomic_order(), std::memory_order_relaxed);
    atomic_done(p);
    return expected;
}
template <class T>
inline T atomic_exch(T* p, T v) {
    const T old = std::atomic_ref<T>(*p).exchange(v, atomic_order());
    atomic_done(p);
    return old;
}
}  // namespace gpubp_cpu

inline int atomicAdd(int* p, int v) { return gpubp_cpu::atomic_add(p, v); }
inline unsigned int atomicAdd(unsigned int* p, unsigned int v) { return gpubp_cpu::atomic_add(p, v); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) { return gpubp_cpu::atomic_add(p, v); }
inline float atomicAdd(float* p, float v) { return gpubp_cpu::atomic_add(p, v); }
inline double atomicAdd(double* p, double v) { return gpubp_cpu::atomic_add(p, v); }
inline int atomicMax(int* p, int v) { return gpubp_cpu::atomic_max(p, v); }
inline unsigned int atomicMax(unsigned int* p, unsigned int v) { return gpubp_cpu::atomic_max(p, v); }
inline int atomicCAS(int* p, int expected, int desired) { return gpubp_cpu::atomic_cas(p, expected, desired); }
inline unsigned int atomicCAS(unsigned int* p, unsigned int expected, unsigned int desired) {
    return gpubp_cpu::atomic_cas(p, expected, desired);
}
inline unsigned long long atomicCAS(unsigned long long* p, unsigned long long expected, unsigned long long desired) {
    return gpubp_cpu::atomic_cas(p, expected, desired);
}
inline int atomicExch(int* p, int v) { return gpubp_cpu::atomic_exch(p, v); }
inline unsigned int atomicExch(unsigned int* p, unsigned int v) { return gpubp_cpu::atomic_exch(p, v); }
inline float atomicExch(float* p, float v) { return gpubp_cpu::atomic_exch(p, v); }

// ------------------------------------------------------------------ load functions ("Read-Only
// Data Cache Load Function", "Load Functions Using Cache Hints"): cache hints only.
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldcg(const T* p) { return *p; }
template <class T> inline T __ldca(const T* p) { return *p; }
template <class T> inline T __ldcs(const T* p) { return *p; }
template <class T> inline T __ldlu(const T* p) { return *p; }
template <class T> inline void __stcg(T* p, T v) { *p = v; }
template <class T> inline void __stcs(T* p, T v) { *p = v; }

// ------------------------------------------------------------------ math ("Mathematical
// Functions" appendix). The single-precision functions below are the host libm's (glibc's are
// correctly rounded or within 1 ulp); CUDA documents these maximum errors, which bound how far
// a GPU may differ from what the harness computes:
//   expf 2 ulp, logf 1 ulp, log1pf 1 ulp, tanhf 2 ulp, erff 2 ulp, erfcf 4 ulp, sqrtf and
//   fmaf correctly rounded (as here), normcdff 5 ulp, rsqrtf 2 ulp, __expf/__logf (fast
//   intrinsics) ~2 ulp plus 2^-21 absolute.
// Kernels are never built with fast math, so the plain names are what they call: the C
// functions come from <math.h> in the global namespace; the CUDA-only ones are defined here.
inline float normcdff(float x) { return static_cast<float>(0.5 * std::erfc(-static_cast<double>(x) * 0.70710678118654752440)); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
// Integer intrinsics ("Integer Intrinsics"): __umulhi is the high 32 bits of the 64-bit product.
inline unsigned int __umulhi(unsigned int a, unsigned int b) {
    return static_cast<unsigned int>((static_cast<unsigned long long>(a) * b) >> 32);
}
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }

// ------------------------------------------------------------------ half and bfloat16
// (CUDA Math API "Half Precision Intrinsics", "Bfloat16 Precision Intrinsics"): 16-bit storage
// types; conversions from float round to nearest even (the _rn forms, and the defaults), as
// cuda_fp16.h / cuda_bf16.h do. _Float16 (g++ 12 on x86-64) does the IEEE binary16 rounding.
struct __align__(2) __half {
    uint16_t bits;
};
struct __align__(2) __nv_bfloat16 {
    uint16_t bits;
};
struct __align__(4) __half2 {
    __half x, y;
};
struct __align__(4) __nv_bfloat162 {
    __nv_bfloat16 x, y;
};
inline __half __float2half_rn(float f) {
    const _Float16 h = static_cast<_Float16>(f);
    __half r;
    std::memcpy(&r.bits, &h, 2);
    return r;
}
inline __half __float2half(float f) { return __float2half_rn(f); }
inline float __half2float(__half h) {
    _Float16 v;
    std::memcpy(&v, &h.bits, 2);
    return static_cast<float>(v);
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    __nv_bfloat16 r;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        r.bits = static_cast<uint16_t>((u >> 16) | 0x40u);  // NaN stays a (quiet) NaN
    } else {
        r.bits = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
    return r;
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline float __bfloat162float(__nv_bfloat16 b) {
    const uint32_t u = static_cast<uint32_t>(b.bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline __half2 __floats2half2_rn(float a, float b) { return {__float2half_rn(a), __float2half_rn(b)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)}; }

// ------------------------------------------------------------------ kernel registration
// harness.py ends the unit that compiles a kernel source with one GPUBP_CPU_REGISTER(name,
// bounds...) per extern "C" kernel, `bounds` being its __launch_bounds__ arguments as the source
// spells them (none without). It hands runtime.cpp's table the kernel's address, a function that
// calls it with an array of pointers to its arguments, its signature (one type code per
// parameter, which harness.py checks each argument against) and its largest block. It runs as a
// constructor, so that the kernel unit has no zero-initialized statics but its shared memory.
// It lives here, not in the runtime, so that a unit holding kernels needs only this header
// (harness.py compiles the kernels and the runtime as separate units, see the top of runtime.cpp).
namespace gpubp_cpu {

using Invoker = void (*)(void* fn, void** args);
int add_kernel(const char* name, void* fn, Invoker invoke, const std::string& signature, unsigned max_threads);

// The block size a kernel may be launched with ("Launch Bounds": maxThreadsPerBlock, the first
// argument; a kernel without __launch_bounds__ may use the device's 1024).
constexpr unsigned max_block_threads() { return 1024; }
template <class... MinBlocks>
constexpr unsigned max_block_threads(unsigned max_threads, MinBlocks...) { return max_threads; }

template <class T>
constexpr const char* type_code() {
    using U = std::remove_cv_t<T>;
    if constexpr (std::is_same_v<U, float>) return "f";
    else if constexpr (std::is_same_v<U, double>) return "d";
    else if constexpr (std::is_same_v<U, bool>) return "b";
    else if constexpr (std::is_same_v<U, int>) return "i";
    else if constexpr (std::is_same_v<U, unsigned int>) return "u";
    else if constexpr (std::is_same_v<U, long long> || std::is_same_v<U, long>) return "l";
    else if constexpr (std::is_same_v<U, unsigned long long> || std::is_same_v<U, unsigned long>) return "L";
    else if constexpr (std::is_same_v<U, short>) return "s";
    else if constexpr (std::is_same_v<U, unsigned short>) return "S";
    else if constexpr (std::is_same_v<U, signed char> || std::is_same_v<U, char>) return "c";
    else if constexpr (std::is_same_v<U, unsigned char>) return "B";
    else if constexpr (std::is_same_v<U, __half>) return "h";
    else if constexpr (std::is_same_v<U, __nv_bfloat16>) return "H";
    else return "?";
}

template <class T>
std::string arg_code() {
    if constexpr (std::is_pointer_v<T>) return std::string(type_code<std::remove_pointer_t<T>>()) + "*";
    else return type_code<T>();
}

template <class... A, size_t... I>
void invoke_with(void* fn, void** args, std::index_sequence<I...>) {
    reinterpret_cast<void (*)(A...)>(fn)(*static_cast<std::remove_cv_t<A>*>(args[I])...);
}

template <class... A>
int register_kernel(const char* name, void (*fn)(A...), unsigned max_threads) {
    std::string sig;
    ((sig += (sig.empty() ? "" : ","), sig += arg_code<A>()), ...);
    return add_kernel(name, reinterpret_cast<void*>(fn),
                      [](void* f, void** args) { invoke_with<A...>(f, args, std::index_sequence_for<A...>{}); }, sig,
                      max_threads);
}

}  // namespace gpubp_cpu

#define GPUBP_CPU_REGISTER(name, ...)                                                                    \
    __attribute__((constructor)) static void gpubp_cpu_register_##name() {                              \
        static_assert(::gpubp_cpu::max_block_threads(__VA_ARGS__) >= 1 &&                                \
                      ::gpubp_cpu::max_block_threads(__VA_ARGS__) <= 1024, "__launch_bounds__: 1 to 1024 threads"); \
        ::gpubp_cpu::register_kernel(#name, &name, ::gpubp_cpu::max_block_threads(__VA_ARGS__));        \
    }

// ------------------------------------------------------------------ tensor cores (PTX ISA,
// "Warp Level Matrix Multiply-Accumulate Instructions": mma.sync.aligned). kernels/mma.cuh is
// the one place kernels reach inline PTX; with GPUBP_CUDA_ON_CPU defined it calls these
// instead. Each is a warp collective over all 32 lanes: every lane contributes its fragments,
// and the product is formed from the fragment layouts of the PTX ISA ("Matrix Fragments for
// mma.m16n8k8" and "mma.m16n8k16"), with g = lane >> 2 and t = lane % 4:
//   m16n8k8 .tf32:  A (16x8)  a0 (g, t)  a1 (g+8, t)  a2 (g, t+4)  a3 (g+8, t+4)
//                   B (8x8)   b0 (t, g)  b1 (t+4, g)
//   m16n8k16 .bf16/.f16 (two 16-bit elements per register, the lower column/row in the low half):
//                   A (16x16) element i of a0..a7: row g + 8 ((i >> 1) & 1), col 2t + (i & 1) + 8 (i >= 4)
//                   B (16x8)  element i of b0..b3: row 2t + (i & 1) + 8 (i >= 2), col g
//   C, D (16x8, f32): c0 (g, 2t)  c1 (g, 2t+1)  c2 (g+8, 2t)  c3 (g+8, 2t+1)
// Products of tf32, bf16 or fp16 inputs are exact in fp32; D = C + sum_k A B is accumulated in
// fp32 in k order. Hardware accumulates with its own internal order and precision, so a GPU
// may differ by a few fp32 ulp of the running sum per k step. tf32 operands use only their top
// 19 bits, as the hardware does: callers round with cvt_rna_tf32 first.
namespace gpubp_cpu {

// cvt.rna.tf32.f32: round to nearest, ties away from zero, to 10 mantissa bits (finite x).
inline uint32_t cvt_rna_tf32(float x) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    if ((u & 0x7f800000u) == 0x7f800000u) return u;  // inf and NaN pass through
    return (u + 0x1000u) & 0xffffe000u;
}

inline float tf32_value(uint32_t bits) { return __uint_as_float(bits & 0xffffe000u); }
inline float bf16_value(uint32_t bits16) { return __uint_as_float((bits16 & 0xffffu) << 16); }
inline float f16_value(uint32_t bits16) {
    __half h;
    h.bits = static_cast<uint16_t>(bits16);
    return __half2float(h);
}

enum class MmaKind { tf32_m16n8k8, bf16_m16n8k16, f16_m16n8k16 };

void mma_sync(MmaKind kind, const char* file, int line, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
              const float (&c)[4]);

}  // namespace gpubp_cpu

// ------------------------------------------------------------------ asynchronous copies and
// matrix loads (PTX ISA, "Data Movement and Conversion Instructions: cp.async, cp.async.commit_group,
// cp.async.wait_group / cp.async.wait_all" and "Warp-level matrix load instruction: ldmatrix").
// kernels/mma.cuh calls these with GPUBP_CUDA_ON_CPU defined.
//
// cp.async: the issuing thread reads the source at the issue (the source is global memory that
// no thread of the launch writes, as for every operand here) and the runtime keeps the bytes in
// the thread's open group; commit_group closes the group; wait_group N writes the copies of every
// committed group but the N newest into shared memory, in issue order, and only then. So a
// missing or short wait leaves the destination holding what it held before (stale data, which
// the parity tests see), as a GPU may. While a copy is in flight its destination bytes are
// marked, and a read of them through ldmatrix or shared_load, by any thread of the block, fails
// the launch; so does a second copy into bytes still in flight, and a thread that returns with
// copies it never waited for. wait_all is commit_group then wait_group 0. Both addresses must be
// aligned to the copy's size. With a src-size operand (zfill) only that many bytes are read and
// the rest of the copy (4, 8 or 16 bytes) are zeros; none is read when it is 0 (as with an
// ignore-src predicate that is true). The shared-memory writes are made
// here, in the kernel's unit, so the profile build records them (at the wait, with the pattern
// of the issue).
// State spaces: cp.async copies from .global into .shared, and ldmatrix reads .shared only
// (its behaviour is undefined for any other address). So a copy whose destination bytes are
// not all in the block's shared memory, or whose source bytes (those it reads: none with a
// src-size of 0) overlap it, fails the launch, as does an ldmatrix row that is not all in it,
// naming the operation and its line. The block's shared memory is the launch's dynamic shared
// buffer up to its request (runtime.cpp, dynamic_shared_bytes) and the static __shared__
// section (static_shared.ld); a source counts as shared anywhere in the dynamic buffer, past
// the request too. The check is a range compare in the runtime, before the access, so it adds
// no access to the profile build's figures.
// Limits: plain C++ reads of shared memory (not through shared_load) are not checked against
// copies in flight; a source that is not shared memory is taken for global memory (one on the
// thread's stack, local memory on a GPU, is not refused); the .ca/.cg cache hints have no
// effect here; a src-size must be a multiple of 4 here (PTX allows any byte count).
//
// ldmatrix.m8n8.xN[.trans].b16: a warp collective. Lane l (l < 8N) reads the 16-byte row
// l % 8 of matrix l / 8 at the address it gives (16-byte aligned; every lane of the warp
// takes part); the rows are exchanged and lane l receives, of each matrix i, the 32-bit word
// l % 4 of row l / 4, or with .trans the 16-bit elements (2 (l % 4), l / 4) and
// (2 (l % 4) + 1, l / 4), the first in the low half.
namespace gpubp_cpu {

struct AsyncCopy {
    unsigned char* dst;
    uint32_t bytes;
    alignas(16) unsigned char data[16];
};
void async_issue(const AsyncCopy& copy, const char* file, int line);
void async_commit();
// The copies of every committed group but the `keep` newest, oldest first, taken off the
// thread's queue; their bytes stay marked in flight until async_landed().
const AsyncCopy* async_take(int keep, int* count);
void async_landed();
void check_not_in_flight(const void* p, size_t bytes, const char* what, const char* file, int line);
// The state spaces of the operands (above): an ldmatrix row (16 bytes) and a cp.async's destination
// [dst, dst + bytes) must lie in the block's shared memory, its source [src, src + src_bytes) outside it.
void check_ldmatrix_row(const char* op, const void* row, const char* file, int line);
void check_copy_operands(const void* dst, size_t bytes, const void* src, size_t src_bytes, const char* file, int line);

typedef uint32_t word_alias __attribute__((may_alias));
typedef uint32_t words2_alias __attribute__((vector_size(8), may_alias));
typedef uint32_t words4_alias __attribute__((vector_size(16), may_alias));

// One access of `BYTES` bytes each way, as the GPU's 4-, 8- and 16-byte loads and stores.
template <int BYTES>
inline void copy_bytes(void* dst, const void* src) {
    if constexpr (BYTES == 4) {
        *static_cast<word_alias*>(dst) = *static_cast<const word_alias*>(src);
    } else if constexpr (BYTES == 8) {
        *static_cast<words2_alias*>(dst) = *static_cast<const words2_alias*>(src);
    } else {
        *static_cast<words4_alias*>(dst) = *static_cast<const words4_alias*>(src);
    }
}

template <int BYTES>
inline void cp_async(void* dst, const void* src, const char* file, int line) {
    if (reinterpret_cast<uintptr_t>(dst) % BYTES != 0 || reinterpret_cast<uintptr_t>(src) % BYTES != 0)
        fail("cp.async: the source and destination must be aligned to the copy size", file, line);
    check_copy_operands(dst, BYTES, src, BYTES, file, line);
    AsyncCopy copy;
    copy.dst = static_cast<unsigned char*>(dst);
    copy.bytes = BYTES;
    copy_bytes<BYTES>(copy.data, src);  // the global read
    async_issue(copy, file, line);
}

// A cp.async of BYTES (4, 8 or 16) with a src-size (an ignore-src predicate is src-size 0).
template <int BYTES = 16>
inline void cp_async_zfill(void* dst, const void* src, int src_bytes, const char* file, int line) {
    static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async copies 4, 8 or 16 bytes");
    if (reinterpret_cast<uintptr_t>(dst) % BYTES != 0 ||
        (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % BYTES != 0))
        fail("cp.async: the source and destination must be aligned to the copy size", file, line);
    if (src_bytes < 0 || src_bytes > BYTES || src_bytes % 4 != 0)
        fail("cp.async src-size: 0 to the copy size, a multiple of 4 in this emulation", file, line);
    check_copy_operands(dst, BYTES, src, static_cast<size_t>(src_bytes), file, line);
    AsyncCopy copy;
    copy.dst = static_cast<unsigned char*>(dst);
    copy.bytes = BYTES;
    std::memset(copy.data, 0, 16);
    if (src_bytes == BYTES) {
        copy_bytes<BYTES>(copy.data, src);  // one global read, as a whole copy's
    } else {
        for (int i = 0; i < src_bytes; i += 4) copy_bytes<4>(copy.data + i, static_cast<const unsigned char*>(src) + i);
    }
    async_issue(copy, file, line);
}

inline void cp_async_wait_group(int keep, const char* file, int line) {
    (void)file;
    (void)line;
    int count = 0;
    const AsyncCopy* copies = async_take(keep, &count);
    for (int i = 0; i < count; ++i) {  // the shared writes, one access per copy
        const AsyncCopy& c = copies[i];
        if (c.bytes == 16) copy_bytes<16>(c.dst, c.data);
        else if (c.bytes == 8) copy_bytes<8>(c.dst, c.data);
        else copy_bytes<4>(c.dst, c.data);
    }
    async_landed();
}

template <int N, bool TRANS>
inline void ldmatrix(uint32_t (&r)[N], const void* row, const char* file, int line) {
    static const char* const names[2][5] = {
        {"", "ldmatrix.x1", "ldmatrix.x2", "", "ldmatrix.x4"},
        {"", "ldmatrix.x1.trans", "ldmatrix.x2.trans", "", "ldmatrix.x4.trans"}};
    const unsigned lane = lane_id();
    alignas(16) uint32_t mine[4] = {0, 0, 0, 0};
    if (lane < 8u * N) {
        if (reinterpret_cast<uintptr_t>(row) % 16 != 0) fail("ldmatrix: a row address is not 16-byte aligned", file, line);
        check_ldmatrix_row(names[TRANS][N], row, file, line);
        check_not_in_flight(row, 16, "ldmatrix", file, line);
        copy_bytes<16>(mine, row);  // the shared read of this lane's row
    }
    const LanePayloads all = warp_exchange(names[TRANS][N], file, line, 0xffffffffu, mine, 4);
    for (int i = 0; i < N; ++i) {
        const LanePayloads matrix = all + 8 * i;  // its 8 rows, 4 words each, from lanes 8i .. 8i + 7
        if constexpr (!TRANS) {
            r[i] = matrix[lane / 4][lane % 4];
        } else {
            const unsigned col = lane / 4, word = col / 2, shift = 16 * (col % 2);
            const uint32_t lo = (matrix[2 * (lane % 4)][word] >> shift) & 0xffffu;
            const uint32_t hi = (matrix[2 * (lane % 4) + 1][word] >> shift) & 0xffffu;
            r[i] = lo | hi << 16;
        }
    }
}

}  // namespace gpubp_cpu
