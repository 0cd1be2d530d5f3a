// Compiling one GEMM kernel of a file, not all of them.
//
// A kernel file holds several GEMM kernels (tiles, activation sets, precisions, dropout), and
// NVRTC spends seconds on each: dense_forward_tf32.cu's 32 took 34 s of one core, where a model
// launches one or two of them. So the CuPy backend's NVRTC path builds a file once per GEMM kernel
// it launches, with -DGPUBP_ONLY_KERNEL="<that kernel's name>", and once for the file's other
// (elementwise) kernels with -DGPUBP_ONLY_KERNEL="" (cupy_backend.kernel_part). Every GEMM entry
// point opens with GPUBP_ONLY_KERNEL_GUARD(<its own name>): where the macro names another kernel,
// the guard returns at once, a constant the compiler folds, so the entry is an empty kernel and
// its main loop is never generated. Without the macro (the CMake fatbins, the CPU harness, the
// sanitizers) the guard is `if (false)` and every kernel compiles to the code it always had.
//
// Device code only, no includes: the same text compiles under nvcc and NVRTC.
#pragma once

namespace gpubp {

__device__ constexpr bool same_name(const char* a, const char* b) {
    return *a == *b && (*a == '\0' || same_name(a + 1, b + 1));
}

#if defined(GPUBP_CUDA_ON_CPU)
// The CPU harness builds a file once, every kernel in it, and its CuPy stand-in serves each NVRTC
// part from that build: before a launch it names the part the launch's module was built for
// (gpubp_cpu_set_only_kernel; null for a module built whole), and the guard answers at run time
// what NVRTC's build of that part answers at compile time. A GEMM launched from another part's
// module then does nothing there, as it would on a GPU. Harness plumbing, not kernel memory
// traffic: kept out of the access profiler's and the sanitizers' instrumentation.
// Initialized data, not .bss: the harness gathers the kernel unit's zero-initialized statics as
// its shared memory and fills them with garbage before every block (static_shared.ld there).
inline const char* cpu_only_kernel __attribute__((section(".data.gpubp_cpu_only_kernel"))) = nullptr;
__attribute__((no_sanitize_address, no_sanitize_thread)) inline bool kernel_compiled(const char* name) {
    const char* only = __atomic_load_n(&cpu_only_kernel, __ATOMIC_RELAXED);
    return only == nullptr || same_name(name, only);
}
#elif defined(GPUBP_ONLY_KERNEL)
__device__ constexpr bool kernel_compiled(const char* name) { return same_name(name, GPUBP_ONLY_KERNEL); }
#else
__device__ constexpr bool kernel_compiled(const char*) { return true; }
#endif

}  // namespace gpubp

#if defined(GPUBP_CUDA_ON_CPU)
extern "C" __attribute__((no_sanitize_address, no_sanitize_thread)) void gpubp_cpu_set_only_kernel(const char* name) {
    __atomic_store_n(&gpubp::cpu_only_kernel, name, __ATOMIC_RELAXED);
}
#endif

#define GPUBP_ONLY_KERNEL_NAME_(NAME) #NAME
#define GPUBP_ONLY_KERNEL_NAME(NAME) GPUBP_ONLY_KERNEL_NAME_(NAME)
// The first statement of a GEMM entry point; NAME is the entry's own name (token-pasted names
// are pasted before they are spelled as a string).
#define GPUBP_ONLY_KERNEL_GUARD(NAME) \
    if (!::gpubp::kernel_compiled(GPUBP_ONLY_KERNEL_NAME(NAME))) return;
