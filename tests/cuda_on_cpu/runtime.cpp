// The launcher and synchronization runtime behind cuda_on_cpu.h. harness.py builds one shared
// library per kernel source, which it loads with ctypes, from two translation units: the kernel
// unit (the header, the source, and one GPUBP_CPU_REGISTER line per extern "C" kernel) and this
// file after the header, a unit compiled once per build mode and linked to every kernel unit of
// that mode. So the kernel unit reaches the runtime only through what cuda_on_cpu.h declares;
// everything else here is internal. The plain, asan and tsan builds compile this unit with the
// kernel unit's flags (the sanitizers instrument both alike); the profile build compiles it with
// access_profiler.cpp and without the memory instrumentation of its kernel units.
//
// A launch (gpubp_cpu_launch_part) runs each CUDA thread of a block as a fiber (a context with a
// stack of its own, see "switching stacks") on the launching OS thread; fibers and their stacks
// live as long as the process. Each fiber runs the kernel for every block of its part in turn
// (natural order, or shuffled when a seed is given) and meets the others at an end-of-block
// barrier before the next block starts, so shared memory is one copy per block. In the plain and
// tsan builds harness.py loads the library twice, and gpubp_cpu_launch runs alternate blocks on
// the second copy's own OS thread, so that blocks overlap as on a GPU (see there for which
// launches). A fiber runs until it waits at a synchronization point (a barrier, a warp
// collective) or returns; the scheduler then resumes the next fiber, in thread order, whose wait
// is over. A switch is a few instructions and no system call, where a futex wake-up of an OS
// thread costs microseconds, and a barrier of 256 threads is 256 switches. Every error (a
// barrier mismatch, a mask mismatch, a deadlock, a bad launch shape) fails the launch with a
// message; the kernel's threads stop at their next synchronization point.
//
// The sanitizers see the fibers as threads: each has a ThreadSanitizer fiber, switched to
// without synchronization, so two CUDA threads' accesses are ordered only by what orders them
// on a GPU (the barriers' and __syncwarp's release/acquire pairs, atomics; the other warp
// collectives order nothing, see HiddenFromTsan), and every switch tells AddressSanitizer which
// stack is live.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>
#include <ucontext.h>

dim3 blockDim;
dim3 gridDim;

// AddressSanitizer's manual poisoning, present only when the runtime is loaded (asan mode).
extern "C" void __asan_poison_memory_region(void const volatile*, size_t) __attribute__((weak));
extern "C" void __asan_unpoison_memory_region(void const volatile*, size_t) __attribute__((weak));
// The sanitizers' fiber interfaces (sanitizer/common_interface_defs.h, sanitizer/tsan_interface.h),
// each present only in its own mode.
extern "C" void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size)
    __attribute__((weak));
extern "C" void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old, size_t* size_old)
    __attribute__((weak));
extern "C" void* __tsan_get_current_fiber() __attribute__((weak));
extern "C" void* __tsan_create_fiber(unsigned flags) __attribute__((weak));
extern "C" void __tsan_switch_to_fiber(void* fiber, unsigned flags) __attribute__((weak));
// ThreadSanitizer's switches for the running thread (fiber): stop and restart seeing its memory
// accesses (sanitizer/tsan_interface.h) and its synchronization (the dynamic annotations).
extern "C" void __tsan_ignore_thread_begin() __attribute__((weak));
extern "C" void __tsan_ignore_thread_end() __attribute__((weak));
extern "C" void AnnotateIgnoreSyncBegin(const char* file, int line) __attribute__((weak));
extern "C" void AnnotateIgnoreSyncEnd(const char* file, int line) __attribute__((weak));
// ThreadSanitizer's manual happens-before edges (sanitizer/tsan_interface.h), for __threadfence.
extern "C" void __tsan_acquire(void* addr) __attribute__((weak));

namespace gpubp_cpu {

// The running CUDA thread's threadIdx and blockIdx (cuda_on_cpu.h reads them through this).
std::atomic<const ThreadCoords*> running_coords{nullptr};

// The dynamic shared memory of the running block (`extern __shared__` arrays point here).
// Sized to an H100's opt-in maximum. The bytes past the launch's request are poisoned under
// AddressSanitizer, so any access past the requested size is caught like any other overflow.
// In every build they are also filled with 0xff before the launch and checked after it, so a
// kernel that wrote past its request fails the launch, and one that only reads there reads
// NaN (or -1 as an integer).
constexpr size_t MAX_DYNAMIC_SHARED = 227 * 1024;
alignas(128) static unsigned char dynamic_shared_storage[MAX_DYNAMIC_SHARED];
static size_t dynamic_shared_bytes = 0;

void* dynamic_shared() { return dynamic_shared_storage; }

// The static shared memory of the kernel unit (every `__shared__` object of its kernels), which
// static_shared.ld gathers between these two symbols. Filled with 0xff bytes, as the dynamic
// shared memory is, before a launch and after each block, so that what a block reads before it
// writes is no zero and nothing the previous block left. Written word by word through volatile
// stores, uninstrumented: the sanitizers' redzones between the objects hold no data, and a
// memset (intercepted) would report them.
extern "C" char gpubp_shared_begin[], gpubp_shared_end[];

__attribute__((no_sanitize("address", "thread", "undefined"))) void fill_static_shared() {
    auto* p = reinterpret_cast<volatile uint64_t*>(gpubp_shared_begin);  // the section is 128-byte aligned
    auto* const words_end = reinterpret_cast<volatile uint64_t*>(
        gpubp_shared_begin + (gpubp_shared_end - gpubp_shared_begin) / 8 * 8);
    for (; p < words_end; ++p) *p = ~uint64_t{0};
    for (auto* b = reinterpret_cast<volatile char*>(p); b < gpubp_shared_end; ++b) *b = static_cast<char>(0xff);
}

struct Abort {};  // unwinds a kernel thread after the launch has failed

namespace {

constexpr int END_OF_BLOCK = -1;  // the barrier "line" a thread waits at after returning
const char* const END_OF_BLOCK_FILE = "(the end of the kernel)";
struct Site {
    const char* file = nullptr;
    int line = 0;
    const char* op = nullptr;
    bool operator!=(const Site& o) const {
        return line != o.line || std::strcmp(file, o.file) != 0 || std::strcmp(op, o.op) != 0;
    }
};

// __syncwarp, unlike the shuffles and votes, may be reached from different places (Programming
// Guide, "Synchronization Functions"): only its mask has to agree.
bool is_syncwarp(const Site& a, const Site& b) {
    return std::strcmp(a.op, "__syncwarp") == 0 && std::strcmp(b.op, "__syncwarp") == 0;
}

// On a GPU a warp collective orders memory between its lanes only if it is __syncwarp
// (Programming Guide, "Synchronization Functions"); a shuffle, a vote, ldmatrix or mma.sync
// orders none. While one of these is made, the running fiber's accesses and synchronization are
// hidden from ThreadSanitizer, so the runtime's bookkeeping for it (the warp's lock, its
// generation counter, the payload copies) gives the lanes no happens-before: a race hidden behind
// a shuffle is reported, as on hardware it is one. It also spares ThreadSanitizer a vector-clock
// join per lane per collective, most of what a tensor-core kernel cost it. An RAII guard, so that
// a collective that fails (and throws) leaves the fiber seen again for its next launch.
class HiddenFromTsan {
  public:
    explicit HiddenFromTsan(bool hide) : hidden_(hide && __tsan_ignore_thread_begin && AnnotateIgnoreSyncBegin) {
        if (hidden_) {
            __tsan_ignore_thread_begin();
            AnnotateIgnoreSyncBegin(__FILE__, __LINE__);
        }
    }
    ~HiddenFromTsan() {
        if (hidden_) {
            AnnotateIgnoreSyncEnd(__FILE__, __LINE__);
            __tsan_ignore_thread_end();
        }
    }
    HiddenFromTsan(const HiddenFromTsan&) = delete;
    HiddenFromTsan& operator=(const HiddenFromTsan&) = delete;

  private:
    const bool hidden_;
};

std::string where(const Site& s) {
    if (s.line == END_OF_BLOCK) return "the end of the kernel (returned)";
    return std::string(s.op) + " at " + s.file + ":" + std::to_string(s.line);
}

struct Warp {
    std::mutex m;
    std::atomic<unsigned> generation{0};
    unsigned arrived = 0, mask = 0, exited = 0, lanes = 0;  // lanes: which of the 32 exist
    Site site;
    // By generation parity: a lane may enter the next collective while others still read this one.
    uint32_t payload[2][32][MAX_PAYLOAD_WORDS] = {};
};

struct Launch {
    std::atomic<bool> failed{false};
    std::mutex error_m;
    std::string error;

    unsigned threads = 0;
    void* fn = nullptr;                          // the kernel, and how to call it with args
    void (*invoke)(void* fn, void** args) = nullptr;
    void** args = nullptr;
    // Block barrier (__syncthreads and the end of each block).
    std::mutex bar_m;
    std::atomic<unsigned> bar_generation{0};
    unsigned bar_arrived = 0;
    Site bar_site;
    unsigned bar_first_thread = 0;
    std::vector<std::unique_ptr<Warp>> warps;
    std::vector<dim3> order;  // blocks, in the order they run

    std::atomic<unsigned> finished{0};            // threads done with every block
};

Launch* current = nullptr;

struct AsyncQueue {
    std::vector<AsyncCopy> open;                    // issued since the last commit_group
    std::deque<std::vector<AsyncCopy>> committed;   // oldest first
    std::vector<AsyncCopy> taken;                   // being written by the current wait
};

// ------------------------------------------------------------------ switching stacks
// A suspended fiber (or the suspended scheduler) is a saved stack pointer. On x86-64 a switch
// is a few instructions: push the callee-saved registers and the floating-point control words
// (MXCSR, the x87 control word) on the current stack, store its pointer, load the other's, pop
// them. glibc's swapcontext also saves and restores the signal mask, a system call on every
// switch, which was most of a tensor-core test's time. Elsewhere (and with
// GPUBP_CPU_UCONTEXT_FIBERS defined, as a test builds it) the fibers are ucontexts.
#if defined(__x86_64__) && !defined(GPUBP_CPU_UCONTEXT_FIBERS)
extern "C" void gpubp_cpu_switch_stack(void** save_sp, void* to_sp);
asm(R"(
    .text
    .p2align 4
    .globl gpubp_cpu_switch_stack
    .hidden gpubp_cpu_switch_stack
    .type gpubp_cpu_switch_stack, @function
gpubp_cpu_switch_stack:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size gpubp_cpu_switch_stack, .-gpubp_cpu_switch_stack
)");

struct StackContext {
    void* sp = nullptr;
};

// Makes `c` start `entry` on [stack, stack + bytes) at the first switch to it: the frame
// gpubp_cpu_switch_stack pops (the current control words, zeroed registers) under a return to
// `entry`, which finds the stack aligned as after a call (rsp + 8 a multiple of 16). Not seen
// by the sanitizers, like glibc's makecontext: the stack may still hold the poisoned redzones
// of frames a fiber left by switching away, and its next frames are the fiber's own.
__attribute__((no_sanitize_address, no_sanitize_thread)) void start_context(StackContext& c, unsigned char* stack,
                                                                             size_t bytes, void (*entry)()) {
    auto top = reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t{15};
    auto* slot = reinterpret_cast<uint64_t*>(top);
    *--slot = 0;                                  // entry's return address: it never returns
    *--slot = reinterpret_cast<uint64_t>(entry);  // where the switch's ret goes
    for (int i = 0; i < 6; ++i) *--slot = 0;      // rbp, rbx, r12 .. r15
    uint32_t mxcsr;
    uint16_t x87;
    asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(mxcsr), "=m"(x87));
    *--slot = mxcsr | uint64_t{x87} << 32;
    c.sp = slot;
}

inline void switch_context(StackContext& from, StackContext& to) { gpubp_cpu_switch_stack(&from.sp, to.sp); }

[[noreturn]] void jump_context(StackContext& to) {
    StackContext ignored;
    gpubp_cpu_switch_stack(&ignored.sp, to.sp);
    __builtin_unreachable();
}

// The switch returns into frames a CET shadow stack has never seen, which would fault. glibc
// turns a shadow stack on only when asked (and only from 2.39); rdsspq, a no-op that leaves 0
// where none is active, tells.
bool shadow_stack_active() {
    unsigned long long ssp = 0;
    asm volatile("rdsspq %0" : "+r"(ssp));
    return ssp != 0;
}
#else
struct StackContext {
    ucontext_t uc;
};

void start_context(StackContext& c, unsigned char* stack, size_t bytes, void (*entry)()) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = bytes;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, entry, 0);
    // AddressSanitizer's swapcontext clears the shadow of the stack the context names, on
    // every switch: 1 MiB each time for these stacks, and the redzones of the frames a
    // suspended fiber still has. The stack is set up now; the fiber switches tell
    // AddressSanitizer which stack is live.
    c.uc.uc_stack.ss_size = 0;
}

inline void switch_context(StackContext& from, StackContext& to) { swapcontext(&from.uc, &to.uc); }

[[noreturn]] void jump_context(StackContext& to) {
    setcontext(&to.uc);
    __builtin_unreachable();
}

bool shadow_stack_active() { return false; }  // glibc's ucontext keeps a shadow stack in step
#endif

// One CUDA thread: fiber i runs linear thread i of every launch. What the scheduler reads
// while the fiber is switched out is atomic (ThreadSanitizer sees the scheduler as a thread
// of its own).
struct Fiber {
    StackContext context;
    unsigned char* stack = nullptr;  // above a guard page
    size_t stack_bytes = 0;
    void* tsan_fiber = nullptr;
    void* asan_fake_stack = nullptr;  // AddressSanitizer's, while switched out
    unsigned tid = 0;                 // linear thread index in the block
    ThreadCoords coords{};
    AsyncQueue async;                 // its cp.async copies
    void* slot = nullptr;             // thread_slot(): the profile build's per-thread log
    bool fenced = false;              // has called __threadfence in its current block
    // What it waits for: resumable once *wait_word != wait_seen (or the launch failed).
    std::atomic<std::atomic<unsigned>*> wait_word{nullptr};
    std::atomic<unsigned> wait_seen{0};
    std::atomic<bool> done{false};
};

std::atomic<Fiber*> running{nullptr};
std::atomic<Fiber*> deadlock_reporter{nullptr};  // the waiting fiber that reports a deadlock

Fiber& self() { return *running.load(std::memory_order_relaxed); }
unsigned linear_tid() { return self().tid; }
void yield_to_scheduler();

void record_error(const std::string& msg) {
    std::lock_guard<std::mutex> lock(current->error_m);
    if (current->error.empty()) current->error = msg;
    current->failed.store(true);
}

// The scheduler resumes every waiting fiber of a failed launch, which then unwinds.
[[noreturn]] void abort_launch(const std::string& msg) {
    record_error(msg);
    throw Abort{};
}

std::string block_name() {
    return "block (" + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," +
           std::to_string(blockIdx.z) + ")";
}

// Waits until `word` moves past `seen`; throws Abort when the launch fails meanwhile. The
// scheduler resumes this fiber when the word has moved or the launch has failed, or, when no
// fiber of the block can proceed, to report the deadlock.
void wait_past(std::atomic<unsigned>& word, unsigned seen, const Site& site) {
    Fiber& me = self();
    while (word.load(std::memory_order_acquire) == seen) {
        if (current->failed.load()) throw Abort{};
        me.wait_seen.store(seen, std::memory_order_relaxed);
        me.wait_word.store(&word, std::memory_order_relaxed);
        yield_to_scheduler();
        me.wait_word.store(nullptr, std::memory_order_relaxed);
        if (deadlock_reporter.load() == &me) {
            deadlock_reporter.store(nullptr);
            abort_launch("deadlock in " + block_name() + ": every thread waits and none can proceed; thread " +
                         std::to_string(me.tid) + " waits at " + where(site));
        }
    }
    if (current->failed.load()) throw Abort{};
}

// between_blocks runs once, in the last thread to arrive, before any thread is released.
template <class F>
void block_barrier(const Site& site, F between_blocks) {
    Launch& L = *current;
    if (L.failed.load()) throw Abort{};
    unsigned seen;
    bool last;
    {
        std::lock_guard<std::mutex> lock(L.bar_m);
        if (L.bar_arrived == 0) {
            L.bar_site = site;
            L.bar_first_thread = linear_tid();
        } else if (L.bar_site != site) {
            abort_launch("threads of " + block_name() + " wait at different barriers: thread " +
                         std::to_string(L.bar_first_thread) + " at " + where(L.bar_site) + ", thread " +
                         std::to_string(linear_tid()) + " at " + where(site) +
                         " (a __syncthreads in divergent code, or a thread that returned early)");
        }
        seen = L.bar_generation.load(std::memory_order_relaxed);
        last = ++L.bar_arrived == L.threads;
        if (last) L.bar_arrived = 0;
    }
    if (last) {
        between_blocks();
        L.bar_generation.fetch_add(1, std::memory_order_release);
        return;
    }
    wait_past(L.bar_generation, seen, site);
}

void block_barrier(const Site& site) {
    block_barrier(site, [] {});
}

}  // namespace

[[noreturn]] void fail(const char* what, const char* file, int line) {
    abort_launch(std::string(what) + " (" + file + ":" + std::to_string(line) + ", " + block_name() + ", thread " +
                 std::to_string(linear_tid()) + ")");
}

void sync_block(const char* file, int line) { block_barrier(Site{file, line, "__syncthreads"}); }

// __threadfence and the atomics, as ThreadSanitizer sees them (it ignores
// std::atomic_thread_fence). A fence followed by an atomic write is a release: after its first
// fence in a block a thread's atomics are release operations (a release covers, a little more
// than a GPU's would, what the thread did between the fence and the atomic). An atomic read
// followed by a fence is an acquire: each atomic's address is noted for the running block, and a
// fence acquires from every address noted so far in the block, by any of its threads (thread 0
// takes a ticket, the barrier after it brings the others, then each fences: PTX's fences are
// cumulative, which C++'s are not). So the last block of a grid reduction sees the partials of
// every block that fenced before its ticket, and those of a block that did not, or of one that
// bumped the ticket without an atomic, race with its reads (blocks run concurrently, see
// gpubp_cpu_launch).
namespace {
constexpr int MAX_NOTED = 16;
std::atomic<void*> noted_atomics[MAX_NOTED];  // the running block's; fibers of one OS thread share it
std::atomic<int> noted_count{0};
void forget_noted_atomics() { noted_count.store(0, std::memory_order_relaxed); }
}  // namespace

// Whether the launch running on this copy of the runtime has fenced or used an atomic (gpubp_cpu_launch).
std::atomic<bool> launch_synchronized{false};

void fence() {
    std::atomic_thread_fence(std::memory_order_seq_cst);
    launch_synchronized.store(true, std::memory_order_relaxed);
    self().fenced = true;
    if (!__tsan_acquire) return;
    const int n = noted_count.load(std::memory_order_relaxed);
    for (int i = 0; i < n; ++i) __tsan_acquire(noted_atomics[i].load(std::memory_order_relaxed));
}

std::memory_order atomic_order() {
    return self().fenced ? std::memory_order_release : std::memory_order_relaxed;
}

void atomic_done(void* p) {
    launch_synchronized.store(true, std::memory_order_relaxed);
    if (!__tsan_acquire) return;
    const int n = noted_count.load(std::memory_order_relaxed);
    for (int i = 0; i < n; ++i)
        if (noted_atomics[i].load(std::memory_order_relaxed) == p) return;
    if (n == MAX_NOTED) return;
    noted_atomics[n].store(p, std::memory_order_relaxed);
    noted_count.store(n + 1, std::memory_order_relaxed);
}

unsigned lane_id() { return linear_tid() % 32; }

unsigned active_mask() {
    const HiddenFromTsan hidden(true);  // __activemask orders no memory either
    Warp& w = *current->warps[linear_tid() / 32];
    std::lock_guard<std::mutex> lock(w.m);
    return w.lanes & ~w.exited;
}

LanePayloads warp_exchange(const char* op, const char* file, int line, unsigned mask, const uint32_t* payload,
                           int words) {
    Launch& L = *current;
    if (L.failed.load()) throw Abort{};
    if (words > MAX_PAYLOAD_WORDS) fail((std::string(op) + ": a payload wider than MAX_PAYLOAD_WORDS").c_str(), file, line);
    const unsigned lane = linear_tid() % 32, bit = 1u << lane;
    Warp& w = *L.warps[linear_tid() / 32];
    const Site site{file, line, op};
    const HiddenFromTsan hidden(std::strcmp(op, "__syncwarp") != 0);
    unsigned seen, parity;
    bool last;
    {
        std::unique_lock<std::mutex> lock(w.m);
        if (!(mask & bit)) fail((std::string(op) + " called by a lane that is not in its mask").c_str(), file, line);
        if (mask & ~w.lanes) fail((std::string(op) + " names lanes that do not exist in this warp").c_str(), file, line);
        if (mask & w.exited)
            fail((std::string(op) + " names a lane that has already returned").c_str(), file, line);
        if (w.arrived == 0) {
            w.mask = mask;
            w.site = site;
        } else if (w.mask != mask || (w.site != site && !is_syncwarp(w.site, site))) {
            char theirs[32], mine[32];
            std::snprintf(theirs, sizeof theirs, "mask 0x%08x", w.mask);
            std::snprintf(mine, sizeof mine, "mask 0x%08x", mask);
            abort_launch("lanes of warp " + std::to_string(linear_tid() / 32) + " in " + block_name() +
                         " disagree on a warp collective: " + theirs + " at " + where(w.site) + ", lane " +
                         std::to_string(lane) + " with " + mine + " at " + where(site));
        }
        seen = w.generation.load(std::memory_order_relaxed);
        parity = seen & 1;
        if (words > 0) std::memcpy(w.payload[parity][lane], payload, sizeof(uint32_t) * words);
        w.arrived |= bit;
        last = w.arrived == w.mask;
        if (last) w.arrived = 0;
    }
    if (last) {
        w.generation.fetch_add(1, std::memory_order_release);
    } else {
        wait_past(w.generation, seen, site);
    }
    // Read in place, without the lock: no lane can write this parity again before every lane of
    // this collective has arrived at the next one, and this lane reads it before it arrives there.
    return w.payload[parity];
}

namespace {

// Element (r, k) of A and (k, c) of B, read from the lane whose fragment holds it: the layouts
// in cuda_on_cpu.h, inverted. A lane's payload is its a0..a3, then b0, b1.
float a_element(LanePayloads all, MmaKind kind, int r, int k) {
    if (kind == MmaKind::tf32_m16n8k8) return tf32_value(all[4 * (r % 8) + k % 4][(r >= 8) + 2 * (k >= 4)]);
    const int kk = k % 8, i = (kk & 1) + 2 * (r >= 8) + 4 * (k >= 8);
    const uint32_t half = (all[4 * (r % 8) + kk / 2][i / 2] >> (16 * (i & 1))) & 0xffffu;
    return kind == MmaKind::bf16_m16n8k16 ? bf16_value(half) : f16_value(half);
}

float b_element(LanePayloads all, MmaKind kind, int k, int c) {
    if (kind == MmaKind::tf32_m16n8k8) return tf32_value(all[4 * c + k % 4][4 + (k >= 4)]);
    const int kk = k % 8, i = (kk & 1) + 2 * (k >= 8);
    const uint32_t half = (all[4 * c + kk / 2][4 + i / 2] >> (16 * (i & 1))) & 0xffffu;
    return kind == MmaKind::bf16_m16n8k16 ? bf16_value(half) : f16_value(half);
}

}  // namespace

void mma_sync(MmaKind kind, const char* file, int line, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
              const float (&c)[4]) {
    uint32_t mine[6];
    std::memcpy(mine, a, 16);
    std::memcpy(mine + 4, b, 8);
    const char* op = kind == MmaKind::tf32_m16n8k8 ? "mma.sync.m16n8k8.tf32"
                     : kind == MmaKind::bf16_m16n8k16 ? "mma.sync.m16n8k16.bf16"
                                                      : "mma.sync.m16n8k16.f16";
    const LanePayloads all = warp_exchange(op, file, line, 0xffffffffu, mine, 6);
    // This lane's elements of D (and of C, which it holds itself) are rows g and g + 8, columns 2t
    // and 2t + 1: it needs those two rows of A and two columns of B.
    const int K = kind == MmaKind::tf32_m16n8k8 ? 8 : 16;
    const int g = static_cast<int>(lane_id()) >> 2, t = static_cast<int>(lane_id()) % 4;
    float A[2][16], B[16][2], C[4];
    for (int k = 0; k < K; ++k) {
        for (int h = 0; h < 2; ++h) {
            A[h][k] = a_element(all, kind, g + 8 * h, k);
            B[k][h] = b_element(all, kind, k, 2 * t + h);
        }
    }
    std::memcpy(C, c, sizeof C);  // d may be c
    for (int i = 0; i < 4; ++i) {  // element i: row g + 8 (i / 2), column 2t + i % 2
        float acc = C[i];
        for (int k = 0; k < K; ++k) acc += A[i / 2][k] * B[k][i % 2];
        d[i] = acc;
    }
}

// ------------------------------------------------------------------ cp.async (cuda_on_cpu.h says
// what is emulated). Each thread queues its own copies; the bytes of every copy in flight are
// counted per 32-bit word, block-wide (blocks run one at a time), so any thread's read of them
// is caught: in an array beside the dynamic shared buffer, and in a map for static __shared__.
namespace {

constexpr size_t SHARED_WORDS = MAX_DYNAMIC_SHARED / 4;
std::atomic<uint16_t> dynamic_in_flight[SHARED_WORDS];
std::mutex static_in_flight_m;
std::map<uintptr_t, int> static_in_flight;  // word address -> copies in flight
std::atomic<int> static_in_flight_words{0};

AsyncQueue& async_queue() { return self().async; }

bool in_dynamic_shared(uintptr_t word) {
    const auto base = reinterpret_cast<uintptr_t>(dynamic_shared_storage);
    return word >= base && word < base + MAX_DYNAMIC_SHARED;
}

// Adds delta to the in-flight count of every word of [p, p + bytes); true if any was in flight before.
bool mark_in_flight(const void* p, size_t bytes, int delta) {
    const uintptr_t first = reinterpret_cast<uintptr_t>(p) & ~uintptr_t{3};
    const uintptr_t end = reinterpret_cast<uintptr_t>(p) + bytes;
    bool was = false;
    for (uintptr_t word = first; word < end; word += 4) {
        if (in_dynamic_shared(word)) {
            auto& count = dynamic_in_flight[(word - reinterpret_cast<uintptr_t>(dynamic_shared_storage)) / 4];
            was |= count.fetch_add(static_cast<uint16_t>(delta), std::memory_order_relaxed) != 0;
        } else {
            std::lock_guard<std::mutex> lock(static_in_flight_m);
            int& count = static_in_flight[word];
            was |= count != 0;
            count += delta;
            if (count == 0) static_in_flight.erase(word);
            static_in_flight_words.store(static_cast<int>(static_in_flight.size()), std::memory_order_relaxed);
        }
    }
    return was;
}

bool any_in_flight(const void* p, size_t bytes) {
    const uintptr_t first = reinterpret_cast<uintptr_t>(p) & ~uintptr_t{3};
    const uintptr_t end = reinterpret_cast<uintptr_t>(p) + bytes;
    for (uintptr_t word = first; word < end; word += 4) {
        if (in_dynamic_shared(word)) {
            if (dynamic_in_flight[(word - reinterpret_cast<uintptr_t>(dynamic_shared_storage)) / 4].load(
                    std::memory_order_relaxed) != 0)
                return true;
        } else if (static_in_flight_words.load(std::memory_order_relaxed) != 0) {
            std::lock_guard<std::mutex> lock(static_in_flight_m);
            if (static_in_flight.count(word)) return true;
        }
    }
    return false;
}

// A new launch: nothing is in flight (a failed launch may have left marks behind).
void async_reset_launch() {
    for (auto& count : dynamic_in_flight) count.store(0, std::memory_order_relaxed);
    std::lock_guard<std::mutex> lock(static_in_flight_m);
    static_in_flight.clear();
    static_in_flight_words.store(0);
}

// Before a thread runs a block: its queue from a failed launch is dropped.
void async_reset_thread() {
    async_queue().open.clear();
    async_queue().committed.clear();
    async_queue().taken.clear();
}

// After a thread returns from a block: a copy it never waited for would land in shared memory
// that the next block owns.
void async_check_drained() {
    size_t pending = async_queue().open.size();
    for (const auto& group : async_queue().committed) pending += group.size();
    if (pending != 0)
        abort_launch("thread " + std::to_string(linear_tid()) + " of " + block_name() + " returned with " +
                     std::to_string(pending) + " cp.async copies it never waited for (cp.async.wait_group / wait_all)");
}

}  // namespace

void async_issue(const AsyncCopy& copy, const char* file, int line) {
    if (mark_in_flight(copy.dst, copy.bytes, +1))
        fail("cp.async into shared memory that another cp.async still has in flight", file, line);
    async_queue().open.push_back(copy);
}

void async_commit() {
    async_queue().committed.push_back(std::move(async_queue().open));
    async_queue().open.clear();
}

const AsyncCopy* async_take(int keep, int* count) {
    auto& q = async_queue();
    q.taken.clear();
    while (static_cast<int>(q.committed.size()) > keep) {
        q.taken.insert(q.taken.end(), q.committed.front().begin(), q.committed.front().end());
        q.committed.pop_front();
    }
    *count = static_cast<int>(q.taken.size());
    return q.taken.data();
}

void async_landed() {
    for (const AsyncCopy& c : async_queue().taken) mark_in_flight(c.dst, c.bytes, -1);
    async_queue().taken.clear();
}

void check_not_in_flight(const void* p, size_t bytes, const char* what, const char* file, int line) {
    if (any_in_flight(p, bytes))
        fail((std::string(what) + " reads shared memory that a cp.async still has in flight (a missing or "
                                  "short cp.async.wait_group, or no __syncthreads after it)").c_str(),
             file, line);
}

// ------------------------------------------------------------------ state spaces (cuda_on_cpu.h,
// "State spaces"): where the block's shared memory is. A range compare per call, on the addresses
// only: no byte is read here, so the profile build's figures do not change.
namespace {

bool within(uintptr_t begin, uintptr_t end, uintptr_t lo, uintptr_t hi) { return begin >= lo && end <= hi; }
bool overlaps(uintptr_t begin, uintptr_t end, uintptr_t lo, uintptr_t hi) { return begin < hi && end > lo; }

uintptr_t dynamic_begin() { return reinterpret_cast<uintptr_t>(dynamic_shared_storage); }
uintptr_t static_begin() { return reinterpret_cast<uintptr_t>(gpubp_shared_begin); }
uintptr_t static_end() { return reinterpret_cast<uintptr_t>(gpubp_shared_end); }

// [p, p + bytes) wholly in the launch's dynamic shared memory (its request) or in the static section.
bool in_block_shared(const void* p, size_t bytes) {
    const auto begin = reinterpret_cast<uintptr_t>(p), end = begin + bytes;
    return within(begin, end, dynamic_begin(), dynamic_begin() + dynamic_shared_bytes) ||
           within(begin, end, static_begin(), static_end());
}

[[noreturn]] void not_shared(const std::string& what, const void* p, size_t bytes, const char* rule, const char* file,
                             int line) {
    const auto begin = reinterpret_cast<uintptr_t>(p);
    const std::string where =
        overlaps(begin, begin + bytes, dynamic_begin(), dynamic_begin() + MAX_DYNAMIC_SHARED)
            ? "it lies past the launch's dynamic shared memory request of " + std::to_string(dynamic_shared_bytes) + " bytes"
            : "its dynamic shared memory or a __shared__ variable";
    fail((what + " is not in the block's shared memory (" + where + "): " + rule).c_str(), file, line);
}

}  // namespace

void check_ldmatrix_row(const char* op, const void* row, const char* file, int line) {
    if (!in_block_shared(row, 16))
        not_shared(std::string(op) + ": the row address", row, 16,
                   "ldmatrix reads the .shared state space only (undefined behaviour elsewhere)", file, line);
}

void check_copy_operands(const void* dst, size_t bytes, const void* src, size_t src_bytes, const char* file,
                         int line) {
    const char* const rule = "cp.async copies from global memory into shared memory";
    if (!in_block_shared(dst, bytes)) not_shared("cp.async: the destination", dst, bytes, rule, file, line);
    const auto begin = reinterpret_cast<uintptr_t>(src), end = begin + src_bytes;
    if (src_bytes != 0 && (overlaps(begin, end, dynamic_begin(), dynamic_begin() + MAX_DYNAMIC_SHARED) ||
                           overlaps(begin, end, static_begin(), static_end())))
        fail((std::string("cp.async: the source is in shared memory, not global memory: ") + rule).c_str(), file, line);
}

// ------------------------------------------------------------------ kernel registry
// Filled before the library is used, by the GPUBP_CPU_REGISTER lines (cuda_on_cpu.h).
struct KernelEntry {
    void* fn;
    Invoker invoke;
    std::string signature;
    unsigned max_threads;  // its __launch_bounds__, or 1024
};

std::map<std::string, KernelEntry>& registry() {
    static std::map<std::string, KernelEntry> kernels;
    return kernels;
}

int add_kernel(const char* name, void* fn, Invoker invoke, const std::string& signature, unsigned max_threads) {
    registry()[name] = KernelEntry{fn, invoke, signature, max_threads};
    return 0;
}

}  // namespace gpubp_cpu

// ------------------------------------------------------------------ the fibers
namespace gpubp_cpu {

void*& thread_slot() { return self().slot; }

namespace {

// Deep enough for every kernel at -O0 under AddressSanitizer; the pages are committed only as
// a stack grows into them, and one more page below each, never accessible, turns an overflow
// into a fault.
constexpr size_t FIBER_STACK_BYTES = 1 << 20;
const size_t PAGE = static_cast<size_t>(sysconf(_SC_PAGESIZE));
std::vector<std::unique_ptr<Fiber>> fibers;  // never freed: reused by every launch

StackContext scheduler_context;
void* scheduler_tsan_fiber = nullptr;
void* scheduler_asan_fake_stack = nullptr;
const void* scheduler_stack_bottom = nullptr;  // the launching thread's stack, as AddressSanitizer knows it
size_t scheduler_stack_bytes = 0;
std::atomic<unsigned> launch_gate{0};  // what the launcher wrote before a launch happens before its fibers run

// The two halves of every switch, for the sanitizers; to_stack is the stack being switched to.
void leaving(void** fake_stack_save, const void* to_stack, size_t to_bytes, void* to_tsan_fiber) {
    if (__sanitizer_start_switch_fiber) __sanitizer_start_switch_fiber(fake_stack_save, to_stack, to_bytes);
    if (__tsan_switch_to_fiber) __tsan_switch_to_fiber(to_tsan_fiber, 1 /* __tsan_switch_to_fiber_no_sync */);
}

void arrived_in_fiber(void* fake_stack) {
    if (__sanitizer_finish_switch_fiber)
        __sanitizer_finish_switch_fiber(fake_stack, &scheduler_stack_bottom, &scheduler_stack_bytes);
}

// One CUDA thread's whole launch: every block in order, meeting the block at its end.
void run_thread(Launch& L, Fiber& me) {
    const unsigned tid = me.tid;
    me.coords.thread = uint3{tid % blockDim.x, (tid / blockDim.x) % blockDim.y, tid / (blockDim.x * blockDim.y)};
    const unsigned bit = 1u << (tid % 32);
    try {
        for (size_t i = 0; i < L.order.size(); ++i) {
            me.coords.block = uint3{L.order[i].x, L.order[i].y, L.order[i].z};
            me.fenced = false;
            async_reset_thread();
            L.invoke(L.fn, L.args);
            async_check_drained();
            Warp& w = *L.warps[tid / 32];
            {
                std::lock_guard<std::mutex> lock(w.m);
                w.exited |= bit;
                if (w.arrived != 0 && (w.mask & bit))
                    abort_launch("lane " + std::to_string(tid % 32) + " of warp " + std::to_string(tid / 32) + " in " +
                                 block_name() + " returned while its warp waits for it at " + where(w.site));
            }
            block_barrier(Site{END_OF_BLOCK_FILE, END_OF_BLOCK, "return"}, [&L] {
                for (auto& warp : L.warps) {
                    std::lock_guard<std::mutex> lock(warp->m);
                    warp->exited = 0;
                }
                std::memset(dynamic_shared_storage, 0xff, dynamic_shared_bytes);
                fill_static_shared();
                forget_noted_atomics();
            });
        }
    } catch (const Abort&) {
    }
}

void fiber_main() {
    arrived_in_fiber(nullptr);
    Fiber& me = self();
    launch_gate.load(std::memory_order_acquire);
    run_thread(*current, me);
    // Nothing the launcher writes for the next launch is read after the release below.
    void* const scheduler_fiber = scheduler_tsan_fiber;
    const void* const bottom = scheduler_stack_bottom;
    const size_t bytes = scheduler_stack_bytes;
    me.done.store(true, std::memory_order_relaxed);
    current->finished.fetch_add(1, std::memory_order_release);
    leaving(nullptr, bottom, bytes, scheduler_fiber);  // this run is over
    jump_context(scheduler_context);
}

Fiber& new_fiber(unsigned tid) {
    auto f = std::make_unique<Fiber>();
    f->tid = tid;
    void* mapped = mmap(nullptr, FIBER_STACK_BYTES + PAGE, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
    if (mapped == MAP_FAILED) {
        std::fprintf(stderr, "cuda_on_cpu: cannot map a fiber stack\n");
        std::abort();
    }
    mprotect(mapped, PAGE, PROT_NONE);
    f->stack = static_cast<unsigned char*>(mapped) + PAGE;
    f->stack_bytes = FIBER_STACK_BYTES;
    if (__tsan_create_fiber) f->tsan_fiber = __tsan_create_fiber(0);
    fibers.push_back(std::move(f));
    return *fibers.back();
}

// Called by the running fiber: back to the scheduler, until it resumes this fiber.
void yield_to_scheduler() {
    Fiber& me = self();
    leaving(&me.asan_fake_stack, scheduler_stack_bottom, scheduler_stack_bytes, scheduler_tsan_fiber);
    switch_context(me.context, scheduler_context);
    arrived_in_fiber(me.asan_fake_stack);
}

void resume(Fiber& f) {
    running.store(&f, std::memory_order_relaxed);
    running_coords.store(&f.coords, std::memory_order_relaxed);
    leaving(&scheduler_asan_fake_stack, f.stack, f.stack_bytes, f.tsan_fiber);
    switch_context(scheduler_context, f.context);
    if (__sanitizer_finish_switch_fiber) __sanitizer_finish_switch_fiber(scheduler_asan_fake_stack, nullptr, nullptr);
    running.store(nullptr, std::memory_order_relaxed);
    running_coords.store(nullptr, std::memory_order_relaxed);
}

bool can_run(const Fiber& f, const Launch& L) {
    if (f.done.load(std::memory_order_relaxed)) return false;
    const std::atomic<unsigned>* word = f.wait_word.load(std::memory_order_relaxed);
    return word == nullptr || word->load(std::memory_order_relaxed) != f.wait_seen.load(std::memory_order_relaxed) ||
           L.failed.load(std::memory_order_relaxed);
}

// Runs the launch's threads to the end: passes over the fibers in thread order, resuming each
// that can run, until every one has returned from its last block.
void run_fibers(Launch& L) {
    current = &L;
    while (fibers.size() < L.threads) new_fiber(static_cast<unsigned>(fibers.size()));
    if (__tsan_get_current_fiber) scheduler_tsan_fiber = __tsan_get_current_fiber();
    for (unsigned t = 0; t < L.threads; ++t) {
        Fiber& f = *fibers[t];
        start_context(f.context, f.stack, f.stack_bytes, fiber_main);
        f.wait_word.store(nullptr, std::memory_order_relaxed);
        f.done.store(false, std::memory_order_relaxed);
    }
    launch_gate.fetch_add(1, std::memory_order_release);
    unsigned running_threads = L.threads;
    while (running_threads != 0) {
        bool resumed = false;
        for (unsigned t = 0; t < L.threads; ++t) {
            Fiber& f = *fibers[t];
            if (!can_run(f, L)) continue;
            resume(f);
            resumed = true;
            if (f.done.load(std::memory_order_relaxed)) --running_threads;
        }
        if (!resumed && running_threads != 0) {
            // Every thread left waits and none can proceed: the first of them reports it.
            for (unsigned t = 0; t < L.threads; ++t) {
                Fiber& f = *fibers[t];
                if (f.done.load(std::memory_order_relaxed)) continue;
                deadlock_reporter.store(&f);
                resume(f);
                if (f.done.load(std::memory_order_relaxed)) --running_threads;
                break;
            }
        }
    }
    L.finished.load(std::memory_order_acquire);
}

}  // namespace
}  // namespace gpubp_cpu

// ------------------------------------------------------------------ the C interface harness.py calls
// The OS thread that runs the peer's blocks of every launch: made once (per process: a forked
// child makes its own) and kept, so a launch costs a hand-off through a mutex, not the creation of
// a thread, which ThreadSanitizer makes costly; the hand-offs order one launch after the one
// before, as a stream does, and nothing within a launch.
namespace {
class PeerThread {
public:
    void start(std::function<void()> job) {
        std::lock_guard<std::mutex> lock(mutex_);
        job_ = std::move(job);
        pending_ = true;
        changed_.notify_all();
    }
    void wait() {
        std::unique_lock<std::mutex> lock(mutex_);
        changed_.wait(lock, [this] { return !pending_ && !running_; });
    }
    PeerThread() { std::thread([this] { serve(); }).detach(); }

private:
    void serve() {
        for (;;) {
            std::function<void()> job;
            {
                std::unique_lock<std::mutex> lock(mutex_);
                changed_.wait(lock, [this] { return pending_; });
                job = std::move(job_);
                pending_ = false;
                running_ = true;
            }
            job();
            std::lock_guard<std::mutex> lock(mutex_);
            running_ = false;
            changed_.notify_all();
        }
    }
    std::mutex mutex_;
    std::condition_variable changed_;
    std::function<void()> job_;
    bool pending_ = false, running_ = false;
};

PeerThread& peer_thread() {
    static PeerThread* peer = nullptr;  // never destroyed: its thread waits for work until the process ends
    static pid_t made_in = 0;
    if (peer == nullptr || made_in != getpid()) {
        peer = new PeerThread;
        made_in = getpid();
    }
    return *peer;
}
}  // namespace

extern "C" {

const char* gpubp_cpu_signature(const char* name) {
    auto it = gpubp_cpu::registry().find(name);
    return it == gpubp_cpu::registry().end() ? nullptr : it->second.signature.c_str();
}

int gpubp_cpu_kernel_count() { return static_cast<int>(gpubp_cpu::registry().size()); }

// The largest block kernel `name` may be launched with (its __launch_bounds__, or 1024); 0 if
// there is no such kernel.
unsigned gpubp_cpu_max_threads(const char* name) {
    auto it = gpubp_cpu::registry().find(name);
    return it == gpubp_cpu::registry().end() ? 0 : it->second.max_threads;
}

const char* gpubp_cpu_kernel_name(int i) {
    auto it = gpubp_cpu::registry().begin();
    std::advance(it, i);
    return it->first.c_str();
}

// Runs part `part` of `parts` of kernel `name` on grid x block with `shared_bytes` of dynamic
// shared memory: the blocks at positions part, part + parts, ... of the launch's order (natural
// when order_seed is 0, else shuffled with it); args[i] points at the value of parameter i.
// Returns 0, or 1 with the reason in err.
int gpubp_cpu_launch_part(const char* name, const unsigned* grid, const unsigned* block,
                          unsigned long long shared_bytes, void** args, unsigned long long order_seed, unsigned part,
                          unsigned parts, char* err, int err_len) {
    using namespace gpubp_cpu;
    auto report = [&](const std::string& msg) {
        std::snprintf(err, static_cast<size_t>(err_len), "%s", msg.c_str());
        return 1;
    };
    auto it = registry().find(name);
    if (it == registry().end()) return report(std::string("no kernel named ") + name);
    const unsigned long long threads = 1ull * block[0] * block[1] * block[2];
    if (threads == 0 || threads > 1024 || block[2] > 64)
        return report("invalid block shape: at most 1024 threads and blockDim.z <= 64 (CUDA limits)");
    if (threads > it->second.max_threads)
        return report(std::string(name) + ": a block of " + std::to_string(threads) + " threads exceeds the " +
                      std::to_string(it->second.max_threads) +
                      " of its __launch_bounds__ (a GPU refuses the launch: too many resources requested)");
    if (grid[0] == 0 || grid[1] == 0 || grid[2] == 0 || grid[0] > 2147483647u || grid[1] > 65535 || grid[2] > 65535)
        return report("invalid grid shape (" + std::to_string(grid[0]) + ", " + std::to_string(grid[1]) + ", " +
                      std::to_string(grid[2]) + "): gridDim.x <= 2^31 - 1, gridDim.y and gridDim.z <= 65535");
    if (shared_bytes > MAX_DYNAMIC_SHARED)
        return report("dynamic shared memory request of " + std::to_string(shared_bytes) + " bytes exceeds " +
                      std::to_string(MAX_DYNAMIC_SHARED));
    if (shadow_stack_active())
        return report("a CET shadow stack is active, which the fibers' stack switch does not keep; build the "
                      "harness with GPUBP_CPU_UCONTEXT_FIBERS defined (Harness(defines=...))");

    Launch L;
    L.threads = static_cast<unsigned>(threads);
    L.fn = it->second.fn;
    L.invoke = it->second.invoke;
    L.args = args;
    for (unsigned w = 0; w < (L.threads + 31) / 32; ++w) {
        L.warps.push_back(std::make_unique<Warp>());
        const unsigned n = std::min(32u, L.threads - 32 * w);
        L.warps.back()->lanes = n == 32 ? 0xffffffffu : (1u << n) - 1;
    }
    for (unsigned z = 0; z < grid[2]; ++z)
        for (unsigned y = 0; y < grid[1]; ++y)
            for (unsigned x = 0; x < grid[0]; ++x) L.order.push_back(dim3(x, y, z));
    if (order_seed != 0) std::shuffle(L.order.begin(), L.order.end(), std::mt19937_64(order_seed));
    if (parts > 1) {
        std::vector<dim3> mine;
        for (size_t i = part; i < L.order.size(); i += parts) mine.push_back(L.order[i]);
        L.order.swap(mine);
        if (L.order.empty()) return 0;
    }

    gridDim = dim3(grid[0], grid[1], grid[2]);
    blockDim = dim3(block[0], block[1], block[2]);
    dynamic_shared_bytes = shared_bytes;
    // The request is "uninitialized", as on a GPU; the rest is the canary checked below.
    std::memset(dynamic_shared_storage, 0xff, MAX_DYNAMIC_SHARED);
    fill_static_shared();
    async_reset_launch();
    if (__asan_poison_memory_region)
        __asan_poison_memory_region(dynamic_shared_storage + shared_bytes, MAX_DYNAMIC_SHARED - shared_bytes);

    run_fibers(L);

    if (__asan_unpoison_memory_region) __asan_unpoison_memory_region(dynamic_shared_storage, MAX_DYNAMIC_SHARED);
    if (L.failed.load()) return report(std::string(name) + ": " + L.error);
    const unsigned char* const past = dynamic_shared_storage + shared_bytes;
    const unsigned char* const end = dynamic_shared_storage + MAX_DYNAMIC_SHARED;
    const unsigned char* const written = std::find_if(past, end, [](unsigned char b) { return b != 0xff; });
    if (written != end)
        return report(std::string(name) + ": wrote dynamic shared memory at byte " +
                      std::to_string(written - dynamic_shared_storage) + ", past the launch's request of " +
                      std::to_string(shared_bytes) + " bytes (shared_mem)");
    return 0;
}

// The peer: gpubp_cpu_launch_part of a second copy of this library (harness.py loads the file
// twice: each copy has its own runtime, fibers, and static and dynamic shared memory), or null.
static void* peer_launch = nullptr;
void gpubp_cpu_set_peer(void* launch_part) { peer_launch = launch_part; }

// Which kernels have fenced or used an atomic in a launch: the ones whose blocks may communicate.
static std::mutex synchronizing_mutex;
static std::map<std::string, bool> synchronizing;  // kernel -> seen to fence or use an atomic

// Runs kernel `name` (see gpubp_cpu_launch_part). With a peer, and two blocks or more, the
// blocks run on two OS threads at once, alternate blocks of the order on each (this one runs
// the first, the peer, on a thread of its own, the second): blocks overlap, as on a GPU, so a
// plain read-modify-write shared by blocks can lose updates, and ThreadSanitizer sees that no
// block's accesses are ordered before another's but by the atomics and fences of the kernel.
// That is so for a kernel's first launch, and for every launch of a kernel that has fenced or
// used an atomic: blocks communicate through those (a ticket, a grid reduction), and a protocol
// broken by a plain increment still fences, one missing its fence still takes an atomic ticket.
// A kernel that never did runs its later launches one block after another, as a GPU would give
// the same result for them: two OS threads cost ThreadSanitizer over twice the time.
int gpubp_cpu_launch(const char* name, const unsigned* grid, const unsigned* block, unsigned long long shared_bytes,
                     void** args, unsigned long long order_seed, char* err, int err_len) {
    using namespace gpubp_cpu;
    const unsigned long long blocks = 1ull * grid[0] * grid[1] * grid[2];
    bool concurrent = peer_launch != nullptr && blocks >= 2;
    if (concurrent) {
        std::lock_guard<std::mutex> lock(synchronizing_mutex);
        const auto seen = synchronizing.find(name);
        concurrent = seen == synchronizing.end() || seen->second;
    }
    if (!concurrent) {
        launch_synchronized.store(false, std::memory_order_relaxed);
        const int status = gpubp_cpu_launch_part(name, grid, block, shared_bytes, args, order_seed, 0, 1, err, err_len);
        if (peer_launch != nullptr && launch_synchronized.load(std::memory_order_relaxed)) {
            std::lock_guard<std::mutex> lock(synchronizing_mutex);
            synchronizing[name] = true;
        }
        return status;
    }
    launch_synchronized.store(false, std::memory_order_relaxed);
    using Part = int (*)(const char*, const unsigned*, const unsigned*, unsigned long long, void**, unsigned long long,
                         unsigned, unsigned, char*, int);
    std::vector<char> peer_err(static_cast<size_t>(std::max(err_len, 1)), '\0');
    int peer_status = 0;
    PeerThread& peer = peer_thread();
    peer.start([&] {
        peer_status = reinterpret_cast<Part>(peer_launch)(name, grid, block, shared_bytes, args, order_seed, 1, 2,
                                                          peer_err.data(), err_len);
    });
    const int status = gpubp_cpu_launch_part(name, grid, block, shared_bytes, args, order_seed, 0, 2, err, err_len);
    peer.wait();
    {
        std::lock_guard<std::mutex> lock(synchronizing_mutex);
        bool& seen = synchronizing[name];
        seen = seen || launch_synchronized.load(std::memory_order_relaxed);
    }
    if (status == 0 && peer_status != 0) std::snprintf(err, static_cast<size_t>(err_len), "%s", peer_err.data());
    return status != 0 ? status : peer_status;
}

}  // extern "C"
