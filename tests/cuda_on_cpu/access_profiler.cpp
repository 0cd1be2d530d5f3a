// The memory-access recorder of the harness's profile build: every shared- and global-memory
// access a kernel makes, grouped into warp-level requests and counted as Nsight Compute's
// memory tables count them. harness.py compiles this file after runtime.cpp, in the runtime's
// unit; access_profile.py turns the per-call-site counts it reports into per-kernel and
// per-line figures.
//
// How accesses are seen. The kernel unit (the kernel source, and nothing of this unit) is
// compiled with g++ -O0 -fsanitize=kernel-address --param asan-instrumentation-with-call-threshold=0:
// gcc then calls __asan_{load,store}{1,2,4,8,16}_noabort(address), or __asan_{load,store}N_noabort
// (address, size), before every memory reference, with the reference's own width, and links
// no sanitizer runtime: the callbacks are defined below. -O0 is chosen, not -O1: at -O0 every
// reference of the source is made as written, once per evaluation and at its declared width
// (a float4 load is one 16-byte access, as nvcc's LDS.128 / LDG.128), while -O1 splits vector
// loads into scalar ones (scalar replacement of aggregates) and would report four 4-byte
// requests where a GPU makes one 16-byte request. -O0 keeps locals on the stack, where a GPU
// keeps them in registers; those accesses are dropped by address (below), so they invent no
// request. What -O0 can invent: a value the source reads twice and nvcc reads once (common
// subexpressions, loads nvcc hoists out of a loop) counts twice. Such a repeat has the pattern
// of the first, so per-request figures and efficiencies are unchanged; request counts err high.
//
// Address spaces, by the address each access touches:
//   shared   static __shared__ variables, and the launch's dynamic shared buffer (its
//            requested size). The header makes each __shared__ variable `static`, and shared
//            memory takes no initializer, so they are the kernel unit's zero-initialized
//            statics: static_shared.ld gathers those (.bss of the kernel unit's object)
//            between gpubp_shared_begin and gpubp_shared_end. (A __constant__ array without
//            an initializer would be counted as shared; no kernel has one.)
//   global   the launch's array arguments, [data, data + nbytes) each, and the arrays a
//            table of addresses among them points to (the *_many updates'), as harness.py
//            passes them to gpubp_cpu_profile_begin (merged where views of one buffer overlap);
//   ignored  everything else: the thread's stack (registers and local memory on a GPU), the
//            harness's own variables (threadIdx, blockDim: special registers on a GPU). A
//            kernel that reached device memory through a pointer it was not passed as an
//            argument would go unseen; none does.
// gcc does not instrument an access it can prove in bounds at compile time: a static variable
// at a constant offset, so a `__shared__ bool` flag or `tile[0]` goes unseen (in the kernels
// here: reduce.cuh's and split_k.cuh's last-block flag, one store and one broadcast load per
// block). Every access with a computed index or through a pointer is seen.
//
// Requests. A GPU issues one request per warp instruction, holding the active lanes'
// addresses; here each CUDA thread runs on its own, so requests are rebuilt. A call site is
// the access's return address with its three callers' (an inline function called from two
// places is two sites, as nvcc's inlining makes it two instructions); a lane's n-th execution
// of a site in a block is its occurrence n; the lanes of one warp with the same (site, n) form
// one request. That is the hardware's grouping whenever the lanes of a warp execute a site
// equally often, or differ only by skipping its last executions (guards at tile edges,
// grid-stride loops that end early), which covers the kernels here. Lanes that skipped an
// early execution but not a later one would be paired with the wrong instruction.
//
// Shared memory: wavefronts per request. Rules implemented:
//   - 32 banks of 4 bytes: 32-bit word w is in bank w % 32; lanes that access the same word
//     need it once (a read is broadcast, of several writes one lands) (CUDA C++ Programming
//     Guide, "Compute Capability 5.x: Shared Memory", which 6.x to 9.0 refer to).
//   - A wavefront moves at most 128 bytes, one 4-byte register per lane of 32, so an access
//     of 8 bytes per lane is processed in 2 phases (lanes 0-15, 16-31) and of 16 bytes in 4
//     (lanes 0-7, 8-15, 16-23, 24-31); an LDS.128 needs 4 wavefronts at best (NVIDIA developer
//     forum, "Unexpected shared memory bank conflict", an NVIDIA engineer's answer: shared
//     memory returns 128 bytes per cycle).
//   - In each phase the wavefronts are the most distinct words any one bank holds. Ideal: one
//     wavefront per phase with an active lane (more only when the phase's distinct words
//     exceed 32, for accesses wider than 16 bytes): 1, 2 and 4 for a full warp's 4-, 8- and
//     16-byte accesses.
//   Not modelled: the faster uniform paths of some architectures (sm_70/75 halve an LDS.128
//   whose lanes pair up on equal addresses, same thread), so a pattern that uses them is
//   reported at the general rule's count, an upper bound.
// Global memory: sectors per request, the distinct 32-byte aligned sectors the request's
// bytes fall in (NVIDIA developer forum, "What's the difference between wavefronts and
// sectors/req": a request touches N sectors of 32 bytes). Bytes used: the distinct
// bytes the lanes access (a word that several lanes read counts once); efficiency = bytes
// used / (32 x sectors). Unique bytes read / written: the distinct bytes of global memory the
// launch loads / stores over all its requests, the least DRAM traffic it can cause.
// Atomic read-modify-writes are counted as gcc instruments them, as a store of their width.
//
// What the counts cannot see: caching (L1 and L2 hits, so repeated reads of a weight tile by
// many blocks count in every block's requests but once in the unique bytes), the coalescer's
// real corner cases (the uniform paths above, misaligned vectors, which fault on a GPU and
// which the asan build catches), timing (latency, bandwidth, overlap), and accesses that
// runtime.cpp makes for a kernel (it makes none: mma.sync takes registers, and the header's
// emulations of cp.async and ldmatrix make their accesses in the kernel unit: a cp.async's
// global read at its issue, one access of its size, and its shared write at the wait that
// delivers it, in issue order, so the lanes' n-th deliveries pair up as their n-th issues did;
// ldmatrix's reads as one 16-byte access per lane that names a row, 8 lanes per matrix, which
// the 16-byte rule below counts as one wavefront per conflict-free matrix, as the hardware).
#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

// Bounds of static shared memory, set by static_shared.ld.
extern "C" char gpubp_shared_begin[], gpubp_shared_end[];

namespace gpubp_cpu {
namespace profile {

constexpr int FRAMES = 4;  // return addresses that name a call site: the access's and 3 callers'
constexpr unsigned WARP = 32, BANKS = 32, WORD = 4, SECTOR = 32, WAVEFRONT_WORDS = 32;

enum Space : uint8_t { SHARED, GLOBAL };
enum Access : uint8_t { LOAD, STORE };

struct Site {
    uintptr_t frames[FRAMES];
    bool operator==(const Site& o) const { return std::equal(frames, frames + FRAMES, o.frames); }
};

struct SiteHash {
    size_t operator()(const Site& s) const {
        size_t h = 0;
        for (uintptr_t f : s.frames) h = (h ^ f) * 0x9E3779B97F4A7C15ull;
        return h;
    }
};

struct Record {
    uintptr_t address;
    uint32_t size, site, occurrence, block;
    uint16_t thread;  // linear thread id in the block
    Space space;
    Access access;
};

// A global-memory range (one or more overlapping array arguments) and which bytes the launch
// read and wrote, one flag per byte.
struct Region {
    uintptr_t begin, end;
    std::vector<uint8_t> read, written;
};

// Set by gpubp_cpu_profile_begin before the launch's threads start, read-only while they run.
std::atomic<bool> armed{false};
std::atomic<unsigned> launch_epoch{0};
uintptr_t static_begin = 0, static_end = 0, dynamic_begin = 0, dynamic_end = 0;
std::vector<Region> regions;
uintptr_t global_begin = 0, global_end = 0;  // the hull of the regions: a quick test first

std::mutex sites_m;
std::vector<Site> sites;  // site id -> frames, for as long as the library is loaded
std::unordered_map<Site, uint32_t, SiteHash> site_ids;

// One per CUDA thread's fiber (they live as long as the process): its records of this launch.
struct ThreadLog {
    unsigned epoch = 0;
    uint32_t block = UINT32_MAX;          // the block its occurrence counts are for
    std::vector<Record> records;
    std::vector<uint32_t> occurrences;    // per site id, in the current block
    std::unordered_map<Site, uint32_t, SiteHash> site_ids;  // a cache of the shared table
};
std::mutex logs_m;
std::vector<ThreadLog*> logs;
thread_local bool recording = false;  // no recursion should a callback reach instrumented code

inline bool within(uintptr_t a, uintptr_t begin, uintptr_t end) { return a >= begin && a < end; }

Region* region_of(uintptr_t a) {
    if (!within(a, global_begin, global_end)) return nullptr;
    auto it = std::upper_bound(regions.begin(), regions.end(), a,
                               [](uintptr_t x, const Region& r) { return x < r.begin; });
    if (it == regions.begin()) return nullptr;
    --it;
    return a < it->end ? &*it : nullptr;
}

ThreadLog& this_thread_log() {
    // The runtime keeps one slot per fiber: one log per CUDA thread, as the requests need.
    ThreadLog*& thread_log = reinterpret_cast<ThreadLog*&>(::gpubp_cpu::thread_slot());
    if (thread_log == nullptr) {
        thread_log = new ThreadLog;
        std::lock_guard<std::mutex> lock(logs_m);
        logs.push_back(thread_log);
    }
    const unsigned epoch = launch_epoch.load(std::memory_order_relaxed);
    if (thread_log->epoch != epoch) {
        thread_log->epoch = epoch;
        thread_log->records.clear();
        thread_log->block = UINT32_MAX;
    }
    return *thread_log;
}

uint32_t site_id(ThreadLog& log, const Site& site) {
    auto cached = log.site_ids.find(site);
    if (cached != log.site_ids.end()) return cached->second;
    uint32_t id;
    {
        std::lock_guard<std::mutex> lock(sites_m);
        auto [it, added] = site_ids.emplace(site, static_cast<uint32_t>(sites.size()));
        if (added) sites.push_back(site);
        id = it->second;
    }
    log.site_ids.emplace(site, id);
    return id;
}

// The body of every callback, inlined so that `frame` is the callback's own frame: frame[1]
// is the return address into the instrumented code, frame[0] the frame of the function that
// made the access (the kernel unit is built at -O0, where every function keeps its frame
// pointer; this unit is built with -fno-omit-frame-pointer).
// Most calls are for the stack (locals live there at -O0), so the address is tested first,
// against plain globals, before any thread-local is touched.
__attribute__((always_inline)) inline void record(uintptr_t address, size_t size, Access access, void* const* frame) {
    if (!armed.load(std::memory_order_relaxed)) return;
    Space space;
    if (within(address, static_begin, static_end) || within(address, dynamic_begin, dynamic_end)) {
        space = SHARED;
    } else if (region_of(address) != nullptr) {
        space = GLOBAL;
    } else {
        return;
    }
    if (recording) return;
    recording = true;
    Site site;
    for (int i = 0; i < FRAMES; ++i) {
        site.frames[i] = reinterpret_cast<uintptr_t>(frame[1]);
        frame = static_cast<void* const*>(frame[0]);
    }
    ThreadLog& log = this_thread_log();
    const uint32_t block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    if (block != log.block) {
        log.block = block;
        std::fill(log.occurrences.begin(), log.occurrences.end(), 0u);
    }
    const uint32_t id = site_id(log, site);
    if (id >= log.occurrences.size()) log.occurrences.resize(id + 1, 0u);
    const unsigned thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    log.records.push_back(Record{address, static_cast<uint32_t>(size), id, log.occurrences[id]++, block,
                                 static_cast<uint16_t>(thread), space, access});
    recording = false;
}

// ------------------------------------------------------------------ one request's counts

struct Cost {
    unsigned units, ideal;  // wavefronts (shared) or sectors (global), and the least possible
    unsigned bytes_used;    // global: distinct bytes the lanes access
};

Cost shared_cost(const Record* r, size_t n) {
    uint32_t width = 0;
    for (size_t i = 0; i < n; ++i) width = std::max(width, r[i].size);
    const unsigned phases = width <= 4 ? 1 : width <= 8 ? 2 : 4;
    const unsigned lanes_per_phase = WARP / phases;
    Cost cost{0, 0, 0};
    std::vector<uintptr_t> words;
    for (unsigned phase = 0; phase < phases; ++phase) {
        words.clear();
        for (size_t i = 0; i < n; ++i) {
            if ((r[i].thread % WARP) / lanes_per_phase != phase) continue;
            for (uintptr_t w = r[i].address / WORD; w <= (r[i].address + r[i].size - 1) / WORD; ++w) words.push_back(w);
        }
        if (words.empty()) continue;
        std::sort(words.begin(), words.end());
        words.erase(std::unique(words.begin(), words.end()), words.end());
        unsigned per_bank[BANKS] = {};
        for (uintptr_t w : words) ++per_bank[w % BANKS];
        cost.units += *std::max_element(per_bank, per_bank + BANKS);
        cost.ideal += static_cast<unsigned>((words.size() + WAVEFRONT_WORDS - 1) / WAVEFRONT_WORDS);
    }
    return cost;
}

Cost global_cost(const Record* r, size_t n) {
    std::vector<uintptr_t> sectors;
    std::vector<std::pair<uintptr_t, uintptr_t>> spans;
    for (size_t i = 0; i < n; ++i) {
        const uintptr_t begin = r[i].address, end = r[i].address + r[i].size;
        for (uintptr_t s = begin / SECTOR; s <= (end - 1) / SECTOR; ++s) sectors.push_back(s);
        spans.emplace_back(begin, end);
    }
    std::sort(sectors.begin(), sectors.end());
    const auto distinct = std::unique(sectors.begin(), sectors.end()) - sectors.begin();
    std::sort(spans.begin(), spans.end());
    unsigned used = 0;
    uintptr_t covered = 0;  // bytes below this are counted
    for (auto [begin, end] : spans) {
        begin = std::max(begin, covered);
        if (end > begin) used += static_cast<unsigned>(end - begin);
        covered = std::max(covered, end);
    }
    return Cost{static_cast<unsigned>(distinct), (used + SECTOR - 1) / SECTOR, used};
}

struct SiteCounts {
    uint64_t requests = 0, units = 0, ideal = 0, bytes_used = 0, lanes = 0, partial = 0;
    uint32_t width = 0;
};

std::string report;  // what gpubp_cpu_profile_end returned last

}  // namespace profile
}  // namespace gpubp_cpu

// ------------------------------------------------------------------ the callbacks gcc emits
#define GPUBP_PROFILE_CALLBACKS(SIZE)                                                                         \
    extern "C" void __asan_load##SIZE##_noabort(uintptr_t address) {                                         \
        gpubp_cpu::profile::record(address, SIZE, gpubp_cpu::profile::LOAD,                                  \
                                   static_cast<void* const*>(__builtin_frame_address(0)));                   \
    }                                                                                                         \
    extern "C" void __asan_store##SIZE##_noabort(uintptr_t address) {                                        \
        gpubp_cpu::profile::record(address, SIZE, gpubp_cpu::profile::STORE,                                 \
                                   static_cast<void* const*>(__builtin_frame_address(0)));                   \
    }
GPUBP_PROFILE_CALLBACKS(1)
GPUBP_PROFILE_CALLBACKS(2)
GPUBP_PROFILE_CALLBACKS(4)
GPUBP_PROFILE_CALLBACKS(8)
GPUBP_PROFILE_CALLBACKS(16)
#undef GPUBP_PROFILE_CALLBACKS

extern "C" void __asan_loadN_noabort(uintptr_t address, size_t size) {
    gpubp_cpu::profile::record(address, size, gpubp_cpu::profile::LOAD,
                               static_cast<void* const*>(__builtin_frame_address(0)));
}

extern "C" void __asan_storeN_noabort(uintptr_t address, size_t size) {
    gpubp_cpu::profile::record(address, size, gpubp_cpu::profile::STORE,
                               static_cast<void* const*>(__builtin_frame_address(0)));
}

// The instrumentation's other hooks (before a noreturn call, around the initialization of
// globals with constructors) keep a sanitizer's shadow memory right; there is none here.
extern "C" void __asan_handle_no_return() {}
extern "C" void __asan_before_dynamic_init(const char*) {}
extern "C" void __asan_after_dynamic_init() {}

// ------------------------------------------------------------------ the C interface harness.py calls
extern "C" {

// Arms the recorder for the next launch: `ranges` holds `count` (begin, end) address pairs of
// its array arguments; `dynamic_shared_bytes` is its dynamic shared memory request.
void gpubp_cpu_profile_begin(const unsigned long long* ranges, int count, unsigned long long dynamic_shared_bytes) {
    using namespace gpubp_cpu::profile;
    std::vector<std::pair<uintptr_t, uintptr_t>> spans;
    for (int i = 0; i < count; ++i)
        if (ranges[2 * i + 1] > ranges[2 * i]) spans.emplace_back(ranges[2 * i], ranges[2 * i + 1]);
    std::sort(spans.begin(), spans.end());
    regions.clear();
    for (auto [begin, end] : spans) {
        if (!regions.empty() && begin <= regions.back().end) {
            regions.back().end = std::max(regions.back().end, static_cast<uintptr_t>(end));
        } else {
            regions.push_back(Region{begin, end, {}, {}});
        }
    }
    for (Region& r : regions) {
        r.read.assign(r.end - r.begin, 0);
        r.written.assign(r.end - r.begin, 0);
    }
    global_begin = regions.empty() ? 0 : regions.front().begin;
    global_end = regions.empty() ? 0 : regions.back().end;
    static_begin = reinterpret_cast<uintptr_t>(gpubp_shared_begin);
    static_end = reinterpret_cast<uintptr_t>(gpubp_shared_end);
    dynamic_begin = reinterpret_cast<uintptr_t>(gpubp_cpu::dynamic_shared());
    dynamic_end = dynamic_begin + dynamic_shared_bytes;
    launch_epoch.fetch_add(1, std::memory_order_relaxed);
    armed.store(true, std::memory_order_release);
}

// Disarms the recorder and returns what the launch since gpubp_cpu_profile_begin did, as
// lines of text (valid until the next call):
//   unique <bytes read> <bytes written>
//   site <shared|global> <load|store> <width> <requests> <units> <ideal units> <bytes used>
//        <lane accesses> <partial requests> <frame offset> x 4
// one site line per (call site, space, access); units are wavefronts (shared) or sectors
// (global); a partial request has fewer than 32 lanes; frame offsets are the call
// site's return addresses minus the library's load address, in hex, innermost first.
const char* gpubp_cpu_profile_end() {
    using namespace gpubp_cpu::profile;
    armed.store(false, std::memory_order_release);
    const unsigned epoch = launch_epoch.load(std::memory_order_relaxed);
    std::vector<Record> all;
    for (ThreadLog* log : logs) {
        if (log->epoch != epoch) continue;
        all.insert(all.end(), log->records.begin(), log->records.end());
        std::vector<Record>().swap(log->records);
    }
    auto key = [](const Record& r) {
        return std::make_tuple(r.block, r.thread / WARP, r.site, r.occurrence, r.space, r.access, r.thread);
    };
    std::sort(all.begin(), all.end(), [&](const Record& a, const Record& b) { return key(a) < key(b); });

    std::map<std::tuple<uint32_t, Space, Access>, SiteCounts> counts;
    for (size_t begin = 0, end; begin < all.size(); begin = end) {
        const Record& first = all[begin];
        for (end = begin + 1; end < all.size() && all[end].block == first.block &&
                              all[end].thread / WARP == first.thread / WARP && all[end].site == first.site &&
                              all[end].occurrence == first.occurrence && all[end].space == first.space &&
                              all[end].access == first.access;
             ++end) {
        }
        const size_t lanes = end - begin;
        const Cost cost = first.space == SHARED ? shared_cost(&all[begin], lanes) : global_cost(&all[begin], lanes);
        SiteCounts& c = counts[{first.site, first.space, first.access}];
        c.requests += 1;
        c.units += cost.units;
        c.ideal += cost.ideal;
        c.bytes_used += cost.bytes_used;
        c.lanes += lanes;
        c.partial += lanes < WARP;
        for (size_t i = begin; i < end; ++i) {
            c.width = std::max(c.width, all[i].size);
            if (first.space != GLOBAL) continue;
            Region* region = region_of(all[i].address);
            std::vector<uint8_t>& touched = first.access == LOAD ? region->read : region->written;
            const uintptr_t from = all[i].address - region->begin;
            std::fill(touched.begin() + from, touched.begin() + std::min<uintptr_t>(from + all[i].size, touched.size()), 1);
        }
    }

    uint64_t unique_read = 0, unique_written = 0;
    for (const Region& r : regions) {
        unique_read += std::count(r.read.begin(), r.read.end(), 1);
        unique_written += std::count(r.written.begin(), r.written.end(), 1);
    }
    Dl_info info{};
    dladdr(reinterpret_cast<void*>(&gpubp_cpu_profile_end), &info);
    const uintptr_t base = reinterpret_cast<uintptr_t>(info.dli_fbase);
    std::string out = "unique " + std::to_string(unique_read) + " " + std::to_string(unique_written) + "\n";
    char line[512];
    for (const auto& [where, c] : counts) {
        const auto& [site, space, access] = where;
        const uintptr_t* f = sites[site].frames;
        std::snprintf(line, sizeof line, "site %s %s %u %llu %llu %llu %llu %llu %llu %lx %lx %lx %lx\n",
                      space == SHARED ? "shared" : "global", access == LOAD ? "load" : "store", c.width,
                      static_cast<unsigned long long>(c.requests), static_cast<unsigned long long>(c.units),
                      static_cast<unsigned long long>(c.ideal), static_cast<unsigned long long>(c.bytes_used),
                      static_cast<unsigned long long>(c.lanes), static_cast<unsigned long long>(c.partial),
                      static_cast<unsigned long>(f[0] - base), static_cast<unsigned long>(f[1] - base),
                      static_cast<unsigned long>(f[2] - base), static_cast<unsigned long>(f[3] - base));
        out += line;
    }
    for (Region& r : regions) {
        std::vector<uint8_t>().swap(r.read);
        std::vector<uint8_t>().swap(r.written);
    }
    report = std::move(out);
    return report.c_str();
}

}  // extern "C"
