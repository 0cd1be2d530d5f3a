"""Run the CUDA C++ kernels of ``kernels/`` on the CPU: compile, load, allocate, launch.

``cuda_on_cpu.h`` maps the CUDA subset the kernels use onto C++20; ``runtime.cpp`` runs a
launch with one fiber per CUDA thread (see both files for what is checked and what is
not). This module compiles a kernel source with the machine's g++ into a shared library,
cached by a hash of everything that goes into it, and launches its ``extern "C"`` kernels
through ctypes with the argument lists the CuPy backend passes. Each library is two units
linked: the kernel source with the header, and the runtime, compiled once per mode (and cached
as an object file) since every kernel source of a mode links the same one.

Four modes, one per build:

- ``plain``: for parity against the NumPy backend;
- ``asan``: AddressSanitizer + UBSan. Every device buffer is its own allocation of exactly
  its size, so one element past the end (or before a deliberately offset view) is a
  heap-buffer-overflow, and a misaligned ``float4`` access is a UBSan error;
- ``tsan``: ThreadSanitizer, the race check: two threads of a block touching the same
  shared (or global) memory with no barrier between them is a data race;
- ``profile``: every shared- and global-memory access recorded (``access_profiler.cpp``);
  each launch leaves a ``LaunchProfile`` in ``Harness.profiles``, which ``access_profile.py``
  turns into Nsight Compute's memory figures. The kernel source is compiled alone, with
  gcc's memory-access instrumentation and no sanitizer runtime, and linked to the runtime and
  the recorder, compiled once, uninstrumented.

The sanitizer runtimes must be loaded before Python starts, so the ``asan`` and ``tsan``
modes run in a child process started with ``sanitizer_env(mode)``; the mode a process is in
is ``GPUBP_HARNESS_MODE`` (default ``plain``). ``plain`` and ``profile`` run in any process.

``cupy_shim(harness)`` is a stand-in for the parts of CuPy that ``gpubp/backends/cupy_backend.py``
uses, so the backend itself (its launch geometry, split-K workspace and argument lists) runs
on the CPU: monkeypatch it in as the backend's ``cupy``.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import functools
import hashlib
import itertools
import os
import re
import shutil
import subprocess
import tempfile
import threading
import types
import typing
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
HEADER = HERE / "cuda_on_cpu.h"
RUNTIME = HERE / "runtime.cpp"
PROFILER = HERE / "access_profiler.cpp"
STATIC_SHARED_SCRIPT = HERE / "static_shared.ld"  # names the kernel unit's object KERNEL_OBJECT
KERNEL_OBJECT = "kernel-unit.o"
MODES = ("plain", "asan", "tsan", "profile")
MODE_ENV = "GPUBP_HARNESS_MODE"
CXX = os.environ.get("CXX") or shutil.which("g++") or "g++"

COMMON_FLAGS = ["-std=c++20", "-fPIC", "-shared", "-pthread", "-DGPUBP_CUDA_ON_CPU=1",
                "-Wall", "-Wno-unknown-pragmas", "-Wno-unused-function", "-Wno-unused-variable",
                # Locals a kernel reads before it writes them hold one fixed pattern (0xfe bytes: a
                # huge float, a pointer that faults), so such a read fails the same way every run.
                "-ftrivial-auto-var-init=pattern",
                # A __shared__ array in an inline function or a template (reduce.cuh's warp totals)
                # is otherwise a GNU_UNIQUE symbol: one object per process, the first loaded
                # library's, which the later libraries' block starts never refill with 0xff, so a
                # read before a write there got the last launch's values instead of garbage.
                "-fno-gnu-unique"]
# Chosen for compile time, which dominates a fresh CI run: UBSan at -O1 takes twice as long
# to build as at -O0, and -g1 (line tables only) is all the sanitizers' reports need.
MODE_FLAGS = {
    "plain": ["-O1"],
    "asan": ["-O0", "-g1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
             "-fno-omit-frame-pointer"],
    "tsan": ["-O1", "-g1", "-fsanitize=thread"],
    # The kernel unit alone: a call before every memory reference (access_profiler.cpp says
    # why -O0), line tables to name each access's source line, frame pointers to name its callers.
    # (-fno-gnu-unique, in COMMON_FLAGS, matters here too: a shared object of another library
    # would lie outside this one's shared memory.)
    "profile": ["-O0", "-g1", "-fno-omit-frame-pointer", "-fsanitize=kernel-address",
                "--param", "asan-instrumentation-with-call-threshold=0", "--param", "asan-stack=0",
                "--param", "asan-globals=0"],
}
# The profile build's runtime and recorder: one uninstrumented object shared by every kernel unit.
PROFILE_RUNTIME_FLAGS = ["-O2", "-fno-omit-frame-pointer"]
_RUNTIME_LIB = {"asan": "libasan.so", "tsan": "libtsan.so"}
_PROBE_SYMBOL = {"asan": "__asan_init", "tsan": "__tsan_init"}

# A kernel in the GPUBP_CPU_SCAN preprocessing: its name, and the arguments of its __launch_bounds__
# (which hold no parentheses in kernels/; a bound that did would not be found, and the unit's
# compile would fail on the registration line below, naming it).
_KERNEL = re.compile(r'extern\s+"C"\s+__gpubp_kernel_marker__\s+void\s+'
                     r'(?:__gpubp_launch_bounds__\s*\(([^()]*)\)\s*)?(\w+)\s*\(')
_ONLY_KERNEL = re.compile(r'-DGPUBP_ONLY_KERNEL="(\w*)"')
_ONLY_ACTS = re.compile(r"-DGPUBP_ONLY_ACTS=(0x[0-9a-fA-F]+|[0-9]+)[uU]?")
ALL_ACTS = 0xFFFFFFFF  # kernels/activations.cuh's mask with no -DGPUBP_ONLY_ACTS
# `extern __shared__ T name[];` cannot be spelled on the CPU (`__shared__` is `static` there),
# so it is the one construct rewritten before compiling: into a pointer to the launch's
# dynamic shared buffer.
_EXTERN_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s*)?([A-Za-z_][\w:<>, ]*?)\s+(\w+)\s*\[\s*\]\s*;")


# The dynamic shared memory a kernel may ask for before it opts in to more ("Shared Memory" in
# the programming guide's compute capabilities: 48 KB).
DEFAULT_DYNAMIC_SHARED = 48 * 1024


class KernelError(RuntimeError):
    """A launch failed: a barrier or warp-collective mismatch, a deadlock, a bad launch shape."""


def current_mode() -> str:
    mode = os.environ.get(MODE_ENV, "plain")
    if mode not in MODES:
        raise ValueError(f"{MODE_ENV}={mode!r}: expected one of {MODES}")
    return mode


def sanitizer_env(mode: str) -> dict[str, str]:
    """Environment for a child Python process that runs the harness in ``mode``."""
    env = {**os.environ, MODE_ENV: mode}
    if mode not in _RUNTIME_LIB:
        return env
    lib = subprocess.run([CXX, f"-print-file-name={_RUNTIME_LIB[mode]}"], capture_output=True, text=True,
                         check=True).stdout.strip()
    env["LD_PRELOAD"] = lib
    if mode == "asan":
        # AddressSanitizer's __cxa_throw interceptor finds the real one only where libstdc++ is loaded
        # when it starts; Python loads it later, with the harness's library, and the first launch that
        # fails (a KernelError thrown) would stop the process with "CHECK failed: ... real___cxa_throw".
        libstdcxx = subprocess.run([CXX, "-print-file-name=libstdc++.so.6"], capture_output=True, text=True,
                                   check=True).stdout.strip()
        env["LD_PRELOAD"] = f"{lib} {libstdcxx}"
    # Halting on the first report turns every finding into a failing exit status.
    env["ASAN_OPTIONS"] = "detect_leaks=0:halt_on_error=1:abort_on_error=0:exitcode=66"
    env["UBSAN_OPTIONS"] = "halt_on_error=1:print_stacktrace=1:exitcode=66"
    env["TSAN_OPTIONS"] = "halt_on_error=1:exitcode=66:report_signal_unsafe=0"
    # numba and BLAS thread pools are not needed here and only add noise under the sanitizers.
    env["OPENBLAS_NUM_THREADS"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    return env


def cache_dir() -> Path:
    path = Path(tempfile.gettempdir()) / "gpubp-cuda-on-cpu"
    path.mkdir(exist_ok=True)
    return path


@contextlib.contextmanager
def build_lock(target: Path):
    """Held while ``target`` is built: a second builder of the same file (another pytest-xdist
    worker, a sanitizer run in a child process, another thread of ``prebuild``) waits, then finds
    it built, instead of compiling it again at the same time."""
    with open(target.with_name(target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def rewrite_dynamic_shared(source: str) -> str:
    return _EXTERN_SHARED.sub(
        lambda m: f"{m.group(1)}* const {m.group(2)} = static_cast<{m.group(1)}*>(::gpubp_cpu::dynamic_shared());",
        source)


# ----------------------------------------------------------------------------- device memory

_libc = ctypes.CDLL(None)  # posix_memalign/free as interposed by a preloaded AddressSanitizer
_libc.posix_memalign.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_size_t]
_libc.free.argtypes = [ctypes.c_void_p]
# cudaMalloc returns 256-byte aligned memory; so does the harness, so that 32-byte sectors and
# 128-byte lines fall where they would on a GPU (the profile build counts them).
DEVICE_ALIGNMENT = 256
_asan_poison = getattr(_libc, "__asan_poison_memory_region", None)
_asan_unpoison = getattr(_libc, "__asan_unpoison_memory_region", None)
for _fn in (_asan_poison, _asan_unpoison):
    if _fn is not None:
        _fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


# Every device allocation alive: the profile build counts an array a pointer table points to
# (see Kernel.__call__) as global memory of the launch.
_live_allocations: weakref.WeakSet = weakref.WeakSet()


class _Allocation:
    """One allocation of exactly ``nbytes`` (+ ``offset`` poisoned bytes in front), aligned as
    cudaMalloc's, freed with the last array that views it. Filled with 0xff bytes (NaN as
    float) like uninitialized memory."""

    def __init__(self, nbytes: int, offset: int = 0):
        self.offset = offset
        self.nbytes = nbytes
        ptr = ctypes.c_void_p()
        if _libc.posix_memalign(ctypes.byref(ptr), DEVICE_ALIGNMENT, max(nbytes + offset, 1)) != 0:
            raise MemoryError(f"posix_memalign({DEVICE_ALIGNMENT}, {nbytes + offset}) failed")
        self.ptr = ptr.value
        ctypes.memset(self.ptr, 0xFF, nbytes + offset)
        if offset and _asan_poison is not None:
            _asan_poison(self.ptr, offset)
        self.__array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (self.ptr + offset, False),
                                    "version": 3}
        _live_allocations.add(self)

    def __del__(self):
        if self.offset and _asan_unpoison is not None:
            _asan_unpoison(self.ptr, self.offset)
        _libc.free(self.ptr)


class CaptureError(RuntimeError):
    """An operation CUDA refuses on a stream that is capturing a graph (a host-device copy, a
    synchronization), or array math this stand-in cannot record into one."""


# The graph capture in progress, if any (see cupy_shim): a list of the operations recorded.
_capture: list | None = None


def _refuse_during_capture(what: str) -> None:
    if _capture is not None:
        raise CaptureError(f"{what} is not permitted while a stream is capturing a CUDA graph")


def _host_read(method: str, what: str | None = None):
    """``np.ndarray``'s ``method``, refused during a capture as a device-to-host copy (``what``)."""
    read = getattr(np.ndarray, method)

    def refused_while_capturing(self, *args):
        _refuse_during_capture(f"a device-to-host copy ({what or method})")
        return read(self, *args)

    refused_while_capturing.__name__ = method
    return refused_while_capturing


class DeviceArray(np.ndarray):
    """An array in "device memory": a NumPy array over its own exact-size allocation. Kernels
    get its data pointer; ``get()`` copies it back to an ordinary NumPy array and ``set()``
    copies a host array in, as CuPy's do. While a graph is being captured, neither is allowed,
    nor is NumPy math on it, which would run at capture time instead of at every replay."""

    @property
    def data(self) -> types.SimpleNamespace:
        """CuPy's MemoryPointer, as far as the backend's tests use one: ``ptr``, the address of the
        first element."""
        return types.SimpleNamespace(ptr=self.ctypes.data)

    def get(self) -> np.ndarray:
        _refuse_during_capture("a device-to-host copy (get)")
        return np.array(self, copy=True, subok=False)

    def set(self, host) -> None:
        _refuse_during_capture("a host-to-device copy (set)")
        host = np.asarray(host)
        if host.shape != self.shape:
            raise ValueError(f"set: shape {host.shape} does not match the array's {self.shape}")
        np.copyto(self.view(np.ndarray), host, casting="same_kind")

    def __setitem__(self, key, value) -> None:
        _refuse_during_capture("writing device memory from the host")
        super().__setitem__(key, value)

    def __getitem__(self, key):
        """A device array, as CuPy's indexing gives (a 0-d one for a single element), never a
        host scalar: reading its value is a device-to-host copy (float(), item(), ...)."""
        result = super().__getitem__(key)
        if isinstance(result, np.ndarray):
            return result
        keys = key if isinstance(key, tuple) else (key,)
        if not any(k is Ellipsis for k in keys):
            return super().__getitem__((*keys, Ellipsis))  # the same element, as a 0-d view
        return np.asarray(result).view(DeviceArray)

    # What reads device memory into the host: a device-to-host copy, which CuPy refuses while the
    # stream captures ("the current stream is capturing, so D2H transfers are disallowed").
    # (np.asarray(a), np.array(a), a.copy() are not caught: NumPy takes an ndarray subclass as it
    # is, without asking it.)
    item = _host_read("item")
    tolist = _host_read("tolist")
    __float__ = _host_read("__float__", "float")
    __int__ = _host_read("__int__", "int")
    __index__ = _host_read("__index__", "index")
    __bool__ = _host_read("__bool__", "bool")
    __complex__ = _host_read("__complex__", "complex")
    __iter__ = _host_read("__iter__", "iterating over an array")

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        _refuse_during_capture(f"array math ({ufunc.__name__})")
        if out is not None:
            kwargs["out"] = tuple(_plain(a) for a in out)
        result = getattr(ufunc, method)(*(_plain(a) for a in inputs), **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        if isinstance(result, tuple):
            return tuple(_device_view(r) for r in result)
        return _device_view(result)


class _Address:
    """A device array as a captured launch holds it: its address, dtype and shape, and a weak
    reference to the allocation, to tell a replay whether that memory is still the array's."""

    def __init__(self, a: DeviceArray):
        root = a
        while isinstance(root, np.ndarray) and root.base is not None:
            root = root.base
        self.owner = weakref.ref(root)
        self.address, self.dtype, self.shape = a.__array_interface__["data"][0], a.dtype, a.shape

    def array(self, kernel: str, index: int) -> DeviceArray:
        if self.owner() is None:
            raise CaptureError(f"{kernel} argument {index}: the array captured there was freed after the capture; "
                               "a replay would write memory that is no longer its own")
        count = int(np.prod(self.shape, dtype=np.int64))
        raw = (ctypes.c_char * max(count * self.dtype.itemsize, 1)).from_address(self.address)
        return np.frombuffer(raw, self.dtype, count=count).reshape(self.shape).view(DeviceArray)


def _plain(a):
    return a.view(np.ndarray) if isinstance(a, DeviceArray) else a


def _device_view(a):
    # Math on device arrays gives device arrays (in NumPy's own allocation), as on CuPy.
    return a.view(DeviceArray) if isinstance(a, np.ndarray) else a


def device_empty(shape, dtype=np.float32, offset_bytes: int = 0) -> DeviceArray:
    """An uninitialized device array; ``offset_bytes`` > 0 places it that far past an allocated
    (and, under AddressSanitizer, poisoned) start, e.g. 4 for a float array that is not
    16-byte aligned."""
    shape = (shape,) if np.isscalar(shape) else tuple(int(s) for s in shape)
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.asarray(_Allocation(nbytes, offset_bytes))
    return raw.view(dtype).reshape(shape).view(DeviceArray)


def to_device(a, dtype=None, offset_bytes: int = 0) -> DeviceArray:
    a = np.asarray(a, dtype=dtype)
    out = device_empty(a.shape, a.dtype, offset_bytes)
    out[...] = a
    return out


# ----------------------------------------------------------------------------- kernels

_SCALAR_CODES = {np.float32: "f", np.float64: "d", np.int32: "i", np.uint32: "u", np.int64: "l",
                 np.uint64: "L", np.int16: "s", np.uint16: "S", np.int8: "c", np.uint8: "B", np.bool_: "b"}
_POINTEE_CODES = {np.dtype(t).str: c for t, c in _SCALAR_CODES.items()}


# Dynamic shared memory a launch may request unless its kernel opted in to more
# (cudaFuncAttributeMaxDynamicSharedMemorySize, CuPy's ``max_dynamic_shared_size_bytes``).
DEFAULT_DYNAMIC_SHARED = 48 * 1024


class Kernel:
    """One ``extern "C"`` kernel; called as CuPy's RawKernel is: ``k(grid, block, args, shared_mem=0)``.
    A launch that asks for more than 48 KiB of dynamic shared memory fails, as on a GPU, unless
    ``max_dynamic_shared_size_bytes`` was raised to cover it first."""

    def __init__(self, module: Module, name: str, signature: str):
        self.module, self.name = module, name
        self.codes = signature.split(",") if signature else []
        self.max_dynamic_shared_size_bytes = DEFAULT_DYNAMIC_SHARED
        # CuPy's attribute of the same name: the largest block a launch may have, the kernel's
        # __launch_bounds__ (1024 without); a larger block fails the launch, as on a GPU.
        self.max_threads_per_block = int(module.lib.gpubp_cpu_max_threads(name.encode()))

    def __call__(self, grid, block, args, shared_mem: int = 0, order_seed: int | None = None,
                 only_kernel: bytes | None = None, only_acts: int = ALL_ACTS):
        """``only_kernel``: the GEMM kernel the launch's module was built for by NVRTC with
        -DGPUBP_ONLY_KERNEL (b"" for none, None for a whole build): every other GEMM of the file
        returns at once, as in that build (kernels/one_kernel.cuh). ``only_acts``: the activations
        it was built for (-DGPUBP_ONLY_ACTS, a bit mask): another traps (kernels/activations.cuh)."""
        grid, block = _dim3(grid, "grid"), _dim3(block, "block")
        if shared_mem > self.max_dynamic_shared_size_bytes:
            raise KernelError(f"{self.name}: {shared_mem} bytes of dynamic shared memory exceed the kernel's limit "
                              f"of {self.max_dynamic_shared_size_bytes} (raise max_dynamic_shared_size_bytes first, "
                              "as cudaFuncSetAttribute does)")
        if len(args) != len(self.codes):
            raise TypeError(f"{self.name} takes {len(self.codes)} arguments ({','.join(self.codes)}), got {len(args)}")
        keep, slots = [], (ctypes.c_void_p * max(len(args), 1))()
        for i, (arg, code) in enumerate(zip(args, self.codes)):
            keep.append(self._slot(i, arg, code))
            slots[i] = ctypes.addressof(keep[-1])
        err = ctypes.create_string_buffer(4096)
        seed = self.module.harness.order_seed if order_seed is None else order_seed
        profiling = self.module.harness.mode == "profile"
        if profiling:
            spans = [bound for arg in args if isinstance(arg, DeviceArray) for bound in _byte_span(arg)]
            spans += [bound for arg in args if isinstance(arg, DeviceArray) and arg.dtype == np.int64
                      for bound in _pointed_to(arg)]
            self.module.lib.gpubp_cpu_profile_begin((ctypes.c_ulonglong * max(len(spans), 1))(*spans),
                                                    len(spans) // 2, ctypes.c_ulonglong(shared_mem))
        self.module.set_only(only_kernel, only_acts)
        try:
            status = self.module.lib.gpubp_cpu_launch(
                self.name.encode(), (ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block),
                ctypes.c_ulonglong(shared_mem), slots, ctypes.c_ulonglong(seed), err, len(err))
        finally:
            self.module.set_only(None, ALL_ACTS)
        if profiling:
            report = self.module.lib.gpubp_cpu_profile_end().decode()
            if status == 0:
                self.module.harness.profiles.append(LaunchProfile(self, grid, block, shared_mem, report))
        if status != 0:
            raise KernelError(err.value.decode(errors="replace"))

    def _slot(self, i: int, arg, code: str):
        where = f"{self.name} argument {i} ({code})"
        if code.endswith("*"):
            # Array math on device arrays (the CuPy API's, run as NumPy here) gives device arrays
            # in NumPy's own allocations: also one malloc of exactly their size.
            if not isinstance(arg, DeviceArray):
                raise TypeError(f"{where}: expected a device array, got {type(arg).__name__}")
            got = _POINTEE_CODES.get(arg.dtype.str)
            if got != code[:-1]:
                raise TypeError(f"{where}: the array's dtype {arg.dtype} does not match the parameter type")
            return ctypes.c_void_p(arg.__array_interface__["data"][0])
        expected = next((t for t, c in _SCALAR_CODES.items() if c == code), None)
        if expected is None or type(arg) is not expected:
            want = expected.__name__ if expected is not None else code
            raise TypeError(f"{where}: expected a numpy.{want} scalar, got {type(arg).__name__}")
        return ctypes.create_string_buffer(arg.tobytes(), len(arg.tobytes()))


def _pointed_to(table: np.ndarray) -> list[int]:
    """The byte spans, flat, of the live allocations that ``table``'s values point into: a kernel
    that reads its arrays' addresses from a table (the optimizers' *_many kernels) reaches them
    through global memory as surely as through its arguments."""
    values = np.asarray(table).ravel()
    spans = []
    for allocation in list(_live_allocations):
        begin = allocation.ptr + allocation.offset
        if np.any((values >= begin) & (values < begin + max(allocation.nbytes, 1))):
            spans += [begin, begin + allocation.nbytes]
    return spans


def _byte_span(a: np.ndarray) -> tuple[int, int]:
    """[first, last + 1) byte addresses of a device array, whatever its strides."""
    start = a.__array_interface__["data"][0]
    if a.size == 0:
        return start, start
    low = sum((n - 1) * s for n, s in zip(a.shape, a.strides) if s < 0)
    high = sum((n - 1) * s for n, s in zip(a.shape, a.strides) if s > 0)
    return start + low, start + high + a.itemsize


class SiteCounts(typing.NamedTuple):
    """What one call site of a launch did in one memory space (access_profiler.cpp's report):
    ``units`` are shared-memory wavefronts or global-memory sectors, ``ideal`` the fewest that
    the same bytes could take; ``frames`` the return addresses naming the site, innermost
    first, as offsets into the library."""
    space: str  # "shared" | "global"
    access: str  # "load" | "store"
    width: int  # bytes per lane and access
    requests: int
    units: int
    ideal: int
    bytes_used: int  # global: distinct bytes the requests' lanes access
    lane_accesses: int
    partial: int  # requests with fewer than 32 lanes
    frames: tuple[int, ...]


class LaunchProfile:
    """One launch's memory accesses, in profile mode: the kernel, its geometry, the distinct
    global bytes it read and wrote, and its counts per call site."""

    def __init__(self, kernel: Kernel, grid, block, shared_mem: int, report: str):
        self.kernel, self.library = kernel.name, kernel.module.path
        self.grid, self.block, self.dynamic_shared_bytes = tuple(grid), tuple(block), int(shared_mem)
        self.sites: list[SiteCounts] = []
        for line in report.splitlines():
            kind, *fields = line.split()
            if kind == "unique":
                self.unique_bytes_read, self.unique_bytes_written = map(int, fields)
            else:
                space, access, *numbers = fields
                counts = [int(v) for v in numbers[:7]]
                self.sites.append(SiteCounts(space, access, *counts, tuple(int(f, 16) for f in numbers[7:])))


def _dim3(value, what: str) -> tuple[int, int, int]:
    dims = tuple(int(v) for v in (value if isinstance(value, (tuple, list)) else (value,)))
    if not 1 <= len(dims) <= 3:
        raise ValueError(f"{what} must have 1 to 3 dimensions, got {value!r}")
    return dims + (1,) * (3 - len(dims))


# The modes whose launches run their blocks on two OS threads at once (runtime.cpp,
# gpubp_cpu_launch): the library is loaded twice, from two files (a second dlopen of one file
# would return the first copy), so that each thread has a runtime and shared memory of its own.
# The profile build's per-thread logs assume one thread, and AddressSanitizer checks nothing
# across blocks that it would gain from it.
CONCURRENT_MODES = ("plain", "tsan")
_peer_dir: Path | None = None
_peer_lock = threading.Lock()  # threads load modules at once (prebuild, first_contact's facts)


def _peer_copy(path: Path) -> Path:
    """A copy of library ``path`` for this process, loaded as the peer of ``path``'s own load."""
    global _peer_dir
    with _peer_lock:
        if _peer_dir is None or not _peer_dir.is_dir():  # a test may have removed the cache it was made in
            _peer_dir = Path(tempfile.mkdtemp(prefix="peers-", dir=cache_dir()))
            atexit.register(shutil.rmtree, _peer_dir, True)
        copy = _peer_dir / path.name
        if not copy.exists():
            shutil.copyfile(path, copy.with_suffix(".part"))
            os.replace(copy.with_suffix(".part"), copy)
        return copy


class Module:
    """A compiled kernel source: ``get_function(name)`` as on ``cupy.RawModule``."""

    def __init__(self, harness: Harness, path: Path):
        self.harness, self.path = harness, path
        self.lib = ctypes.CDLL(str(path))
        self.libs = [self.lib]
        if harness.concurrent_blocks:
            peer = ctypes.CDLL(str(_peer_copy(path)))
            self.libs.append(peer)
            self.lib.gpubp_cpu_set_peer.argtypes = [ctypes.c_void_p]
            self.lib.gpubp_cpu_set_peer(ctypes.cast(peer.gpubp_cpu_launch_part, ctypes.c_void_p))
        self.lib.gpubp_cpu_signature.restype = ctypes.c_char_p
        self.lib.gpubp_cpu_kernel_name.restype = ctypes.c_char_p
        self.lib.gpubp_cpu_launch.restype = ctypes.c_int
        self.lib.gpubp_cpu_max_threads.restype = ctypes.c_uint
        if harness.mode == "profile":
            self.lib.gpubp_cpu_profile_end.restype = ctypes.c_char_p
        # kernels/one_kernel.cuh's, in a file whose GEMM kernels NVRTC builds one at a time
        self.set_only_kernel = getattr(self.lib, "gpubp_cpu_set_only_kernel", None)
        # kernels/activations.cuh's, in a file with kernels that take their activation at launch
        self.set_only_acts = getattr(self.lib, "gpubp_cpu_set_only_acts", None)
        for lib in self.libs:
            if self.set_only_kernel is not None:
                lib.gpubp_cpu_set_only_kernel.argtypes = [ctypes.c_char_p]
            if self.set_only_acts is not None:
                lib.gpubp_cpu_set_only_acts.argtypes = [ctypes.c_uint]

    def set_only(self, only_kernel: bytes | None, only_acts: int) -> None:
        """Sets kernels/one_kernel.cuh's and kernels/activations.cuh's guards in every copy."""
        for lib in self.libs:
            if self.set_only_kernel is not None:
                lib.gpubp_cpu_set_only_kernel(only_kernel)
            if self.set_only_acts is not None:
                lib.gpubp_cpu_set_only_acts(only_acts)

    def kernel_names(self) -> list[str]:
        return [self.lib.gpubp_cpu_kernel_name(i).decode() for i in range(self.lib.gpubp_cpu_kernel_count())]

    def get_function(self, name: str) -> Kernel:
        signature = self.lib.gpubp_cpu_signature(name.encode())
        if signature is None:
            raise KeyError(f"{self.path.name} has no kernel named {name!r}")
        return Kernel(self, name, signature.decode())


class Harness:
    """Compiles and loads kernel sources for one mode (the process's, by default)."""

    def __init__(self, mode: str | None = None, order_seed: int = 0, defines: tuple[str, ...] = (),
                 concurrent_blocks: bool | None = None):
        """``defines``: macros (``NAME`` or ``NAME=VALUE``) both units are compiled with, such as
        GPUBP_CPU_UCONTEXT_FIBERS, which a test sets to run the runtime's portable fiber switch.
        ``concurrent_blocks``: run a launch's blocks on two OS threads at once (the default in
        CONCURRENT_MODES; for a kernel's first launch and those of a kernel seen to fence or use an
        atomic, runtime.cpp's gpubp_cpu_launch), or all on the calling thread, one after another."""
        self.mode = mode or current_mode()
        self.concurrent_blocks = self.mode in CONCURRENT_MODES if concurrent_blocks is None else concurrent_blocks
        self.defines = tuple(f"-D{d}" for d in defines)
        if self.mode in _PROBE_SYMBOL and not hasattr(_libc, _PROBE_SYMBOL[self.mode]):
            raise RuntimeError(f"harness mode {self.mode!r} needs its sanitizer runtime loaded before Python starts: "
                               f"run the process with the environment sanitizer_env({self.mode!r})")
        self.order_seed = order_seed  # 0: blocks in natural order; else shuffled with this seed
        self._modules: dict[str, Module] = {}
        self.profiles: list[LaunchProfile] = []  # profile mode: one per launch, in launch order

    def library_path(self, source: str, label: str) -> Path:
        key = hashlib.sha256()
        recorder = PROFILER.read_text() if self.mode == "profile" else ""
        for part in (self.mode, " ".join(COMMON_FLAGS + MODE_FLAGS[self.mode]), " ".join(self.defines),
                     " ".join(_runtime_flags(self.mode)), _toolchain_identity(), recorder, source):
            key.update(part.encode())
            key.update(b"\0")
        stem = re.sub(r"\W", "_", label)
        return cache_dir() / f"{stem}-{self.mode}-{key.hexdigest()[:20]}.so"

    def build(self, source: str, label: str = "kernels") -> Path:
        """Compile ``source`` (include-expanded CUDA C++) unless its library is cached."""
        source = rewrite_dynamic_shared(source)
        path = self.library_path(source, label)
        if path.exists():
            return path
        with build_lock(path):
            if not path.exists():
                self._compile_library(source, label, path)
        return path

    def _compile_library(self, source: str, label: str, path: Path) -> None:
        work = Path(tempfile.mkdtemp(dir=cache_dir()))
        try:
            unit = work / f"{label}.cpp"
            unit.write_text(f'#include "{HEADER}"\n{source}\n')
            scan = subprocess.run([CXX, "-std=c++20", "-E", "-P", "-DGPUBP_CUDA_ON_CPU=1", "-DGPUBP_CPU_SCAN=1",
                                   str(unit)], capture_output=True, text=True)
            if scan.returncode != 0:
                raise RuntimeError(f"preprocessing {label} failed:\n{scan.stderr[-4000:]}")
            kernels = {name: " ".join(bounds.split()) for bounds, name in _KERNEL.findall(scan.stdout)}
            with unit.open("a") as f:
                f.writelines(f"GPUBP_CPU_REGISTER({name}{', ' + bounds if bounds else ''})\n"
                             for name, bounds in sorted(kernels.items()))
            # The kernel unit alone, linked to the mode's runtime object, compiled once (_runtime_object).
            kernel_object, built = work / KERNEL_OBJECT, work / path.name
            flags = [*COMMON_FLAGS, *MODE_FLAGS[self.mode], *self.defines]
            # a sanitizer's flags also link its runtime; the script gathers the kernel unit's shared memory
            link_flags, link_script, cwd = flags, [f"-Wl,-T,{STATIC_SHARED_SCRIPT}"], None
            if self.mode == "profile":
                # Compiled in `work`, mapped to ".": the kernel files' paths in the line tables are
                # relative ("./gemm_tile.cuh"), the harness's and the system's headers absolute.
                flags, cwd = [*flags, f"-fdebug-prefix-map={work}=."], work
                # Linked without the instrumentation flags (no sanitizer runtime).
                link_flags = COMMON_FLAGS
            # The runtime, when it is not built yet, compiles meanwhile, on another core.
            with ThreadPoolExecutor(max_workers=1) as pool:
                runtime = pool.submit(_runtime_object, self.mode, self.defines)
                _compile([CXX, *flags, "-c", "-o", str(kernel_object), str(unit)],
                         f"compiling {label} for the CPU ({self.mode})", cwd=cwd)
                runtime_object = runtime.result()
            # The kernel unit first: inline functions both units define keep its copy (the
            # profile build's instrumented one; in the other modes both are compiled alike).
            _compile([CXX, *link_flags, "-o", str(built), str(kernel_object), str(runtime_object), *link_script],
                     f"linking {label} for the CPU ({self.mode})")
            os.replace(built, path)  # atomic: a reader never sees a partial library
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def prebuild(self, sources: dict[str, str]) -> None:
        """Compile several sources at once, one g++ per core."""
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            list(pool.map(lambda item: self.build(item[1], item[0]), sources.items()))

    def module(self, source: str, label: str = "kernels") -> Module:
        """The loaded library of ``source``, built (or found in the cache) on its first request."""
        if source not in self._modules:
            self._modules[source] = Module(self, self.build(source, label))
        return self._modules[source]


@functools.cache
def _toolchain_identity() -> str:
    """Everything besides the kernel source that goes into a build: compiler, header, runtime, and
    the linker script every library is linked with."""
    version = subprocess.run([CXX, "--version"], capture_output=True, text=True).stdout
    return "\0".join((CXX, version, HEADER.read_text(), RUNTIME.read_text(), STATIC_SHARED_SCRIPT.read_text()))


def _compile(command: list[str], what: str, cwd: Path | None = None) -> None:
    done = subprocess.run(command, capture_output=True, text=True, cwd=cwd)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{done.stderr[-6000:]}")


def _runtime_flags(mode: str) -> list[str]:
    return [*COMMON_FLAGS, *(PROFILE_RUNTIME_FLAGS if mode == "profile" else MODE_FLAGS[mode])]


_runtime_lock = threading.Lock()


def _runtime_object(mode: str, defines: tuple[str, ...] = ()) -> Path:
    """The object file of runtime.cpp for ``mode``, which every kernel library of that mode links:
    built once (under a lock: the kernel units of a prebuild all link it) and cached by hash.
    ``plain``, ``asan`` and ``tsan`` compile it with the kernel unit's own flags, so each
    sanitizer sees the runtime's code instrumented as before; ``profile`` compiles it with
    access_profiler.cpp and PROFILE_RUNTIME_FLAGS, uninstrumented."""
    profile = mode == "profile"
    flags = [*_runtime_flags(mode), *defines]
    sources = [HEADER, RUNTIME, *([PROFILER] if profile else [])]
    # _toolchain_identity() holds the compiler, the header and runtime.cpp (and the linker script).
    recorder = PROFILER.read_text() if profile else ""
    key = hashlib.sha256("\0".join((mode, " ".join(flags), _toolchain_identity(), recorder)).encode())
    path = cache_dir() / f"runtime-{mode}-{key.hexdigest()[:20]}.o"
    with _runtime_lock, build_lock(path):
        if not path.exists():
            work = Path(tempfile.mkdtemp(dir=cache_dir()))
            try:
                unit = work / "runtime.cpp"
                unit.write_text("".join(f'#include "{source}"\n' for source in sources))
                _compile([CXX, *flags, "-c", "-o", str(work / path.name), str(unit)],
                         f"compiling the runtime for the CPU ({mode})")
                os.replace(work / path.name, path)
            finally:
                shutil.rmtree(work, ignore_errors=True)
    return path


# ----------------------------------------------------------------------------- CuPy stand-in

# The CuPy backend's caches of modules, kernels and per-device buffers: emptied whenever the
# backend is given another stand-in, so that nothing made with a previous one is used.
BACKEND_CACHES = ("_rawmodules", "_functions", "_device_state", "origin", "_shared_limits")


def record_launches(backend, monkeypatch) -> list[str]:
    """The names of the kernels ``backend`` (the CuPy backend on a ``cupy_shim``) launches from
    now on, in order, appended to the list returned; each launch still runs."""
    launched = []
    launch = backend._Launch.__call__

    def recording_launch(self, *args, **kwargs):
        launched.append(self.function.kernel.name)
        return launch(self, *args, **kwargs)

    monkeypatch.setattr(backend._Launch, "__call__", recording_launch)
    return launched


# The most shared memory a block may take after opting in, by compute capability (the CUDA C++
# Programming Guide's table; cudaDevAttrMaxSharedMemoryPerBlockOptin on the GPU).
SHARED_OPTIN = {"75": 65536, "80": 166912, "86": 101376, "89": 101376, "90": 232448, "120": 101376}


def cupy_shim(harness: Harness, sms: int = 132, compute_capability: str = "90", version: int = 14) -> types.ModuleType:
    """The subset of the ``cupy`` module that ``cupy_backend`` uses, backed by the harness.

    ``sms`` is the multiprocessor count the backend sees, which drives its tile and split-K
    choices (132: an H100 SXM). ``compute_capability`` sets the per-block shared memory limit
    its Device reports (``SHARED_OPTIN``). ``version`` (13 or 14) is the CuPy release whose
    stream API it has. It refuses what CuPy (and CUDA under it) refuses, where the backend has
    been caught out:

    - a kernel's ``max_dynamic_shared_size_bytes`` set above the device's per-block limit (the
      driver's CUDA_ERROR_INVALID_VALUE), as on an sm_86 GPU for a 102 KB pipeline;

    - ``Stream.from_external`` (CuPy 14 and newer) takes only an object whose ``__cuda_stream__()``
      returns ``(0, pointer)``; CuPy 13 has ``ExternalStream(pointer, device_id)`` instead (which
      CuPy 14 deprecates);
    - a module compiles or loads at its first ``get_function``, as CuPy's RawModule does, and the
      first lookup of each kernel loads it (CUDA's lazy loading): either during a capture fails;
    - capturing on the legacy default stream fails; so does work on the legacy default stream,
      from any thread, while a blocking stream (one made without ``non_blocking=True``) captures:
      it would synchronize with the capturing stream, which invalidates the capture;
    - the current stream is per thread, as CuPy's is.
    """
    cp = types.ModuleType("cupy_on_cpu")
    cp.__version__ = f"{version}.0.0"
    local = threading.local()  # the stack of streams entered with `with stream:`, per thread
    capture = types.SimpleNamespace(stream=None, invalidated=None)  # the stream capturing, if any
    pointers = itertools.count(0x1000)

    class CUDADriverError(RuntimeError):
        pass

    class CUDARuntimeError(RuntimeError):
        pass

    def device_attribute(number: int, device_id: int) -> int:  # cudaDeviceGetAttribute
        attributes = {16: sms, 97: SHARED_OPTIN[compute_capability]}  # cudaDevAttrMultiProcessorCount, ...Optin
        if device_id != 0 or number not in attributes:
            raise CUDARuntimeError(f"cudaErrorInvalidValue: attribute {number} of device {device_id}")
        return attributes[number]

    class Device:
        id = 0

        def __init__(self, device_id: int = 0):
            self.compute_capability = compute_capability
            # No `attributes`: CuPy's asks the driver for every attribute, which compute-sanitizer
            # can count as errors; the backend asks for each it reads (runtime.deviceGetAttribute).

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class Graph:
        """A captured graph: ``launch()`` runs the recorded operations again, in order, with the
        arguments they had at capture (scalars by value, arrays by address), as CUDA does."""

        def __init__(self, operations: list):
            self.operations = operations

        def launch(self, stream=None):
            _refuse_during_capture("launching a graph")
            for operation in self.operations:
                operation()

    class _BaseStream:
        def __init__(self, ptr: int, device_id: int, non_blocking: bool):
            self.ptr, self.device_id, self.is_non_blocking = ptr, device_id, non_blocking

        def __enter__(self):
            local.__dict__.setdefault("streams", []).append(self)
            return self

        def __exit__(self, *exc):
            local.streams.pop()
            return False

        def synchronize(self):
            _refuse_during_capture("synchronizing a stream")

        def begin_capture(self, mode=None):
            global _capture
            if self.ptr == 0:
                raise RuntimeError("cannot capture on the default (legacy) stream")
            if _capture is not None:
                raise CaptureError("a capture is already in progress")
            if current_stream() is not self:
                raise CaptureError("begin_capture: capture on the current stream (inside `with stream:`)")
            _capture, capture.stream, capture.invalidated = [], self, None

        def end_capture(self):
            global _capture
            if capture.stream is not self:
                raise CaptureError("end_capture: the stream is not capturing")
            operations, invalidated = _capture, capture.invalidated
            _capture, capture.stream, capture.invalidated = None, None, None
            if invalidated is not None:
                raise CaptureError(f"the capture was invalidated: {invalidated}")
            return Graph(operations)

        def is_capturing(self) -> bool:
            return capture.stream is self

    class Stream(_BaseStream):
        null = None

        def __init__(self, null=False, non_blocking=False, ptds=False, priority=None):
            super().__init__(0 if null else next(pointers), -1 if null else 0, bool(non_blocking) and not null)

        if version >= 14:
            @classmethod
            def from_external(cls, obj):
                try:
                    stream_version, pointer = obj.__cuda_stream__()
                except AttributeError as exc:
                    raise TypeError(f"Object of type {type(obj).__name__} does not implement the CUDA stream "
                                    "protocol (__cuda_stream__ method)") from exc
                if type(stream_version) is not int or type(pointer) is not int or stream_version != 0:
                    raise TypeError(f"__cuda_stream__() must return (0, int), got ({stream_version!r}, {pointer!r})")
                stream = cls.__new__(cls)
                _BaseStream.__init__(stream, pointer, -1, non_blocking=False)
                stream.foreign = obj  # kept alive with the stream, as CuPy does
                return stream

    class ExternalStream(_BaseStream):
        def __init__(self, ptr, device_id=-1):
            if version >= 14:
                warnings.warn("ExternalStream is deprecated. Use Stream.from_external() instead",
                              DeprecationWarning, stacklevel=2)
            if type(ptr) is not int:
                raise TypeError(f"ExternalStream: ptr must be an int, got {type(ptr).__name__}")
            super().__init__(ptr, device_id, non_blocking=False)

    Stream.null = Stream(null=True)

    def current_stream():
        streams = getattr(local, "streams", None)
        return streams[-1] if streams else Stream.null

    def recorded(what: str) -> bool:
        """Whether an operation on the current stream goes into the capture in progress (True) or
        runs now (False); raises where CUDA fails it: on the legacy default stream while a
        blocking stream captures (an implicit synchronization with it, from this thread or any)."""
        if capture.stream is None:
            return False
        stream = current_stream()
        if stream is capture.stream:
            return True
        if stream.ptr == 0 and not capture.stream.is_non_blocking:
            capture.invalidated = (f"{what} on the legacy default stream synchronizes with the capturing stream, "
                                   "which was made without non_blocking=True")
            raise CaptureError(capture.invalidated)
        return False

    class CapturingKernel:
        """A kernel that, while a capture is in progress on the current stream, is recorded instead
        of run. As in a CUDA graph, the record holds the arrays' addresses, not the arrays: a replay
        after an argument's memory was freed fails, naming the kernel and the argument."""

        def __init__(self, kernel: Kernel, only_kernel: bytes | None = None, only_acts: int = ALL_ACTS):
            self.kernel, self.only_kernel, self.only_acts = kernel, only_kernel, only_acts
            # CUDA's cudaFuncAttributeMaxDynamicSharedMemorySize, which CuPy's Function sets: a
            # launch asking for more dynamic shared memory than this fails.
            self.max_dynamic_shared_size_bytes = DEFAULT_DYNAMIC_SHARED

        @property
        def max_dynamic_shared_size_bytes(self) -> int:
            return self.kernel.max_dynamic_shared_size_bytes

        @max_dynamic_shared_size_bytes.setter
        def max_dynamic_shared_size_bytes(self, value: int) -> None:
            if int(value) > SHARED_OPTIN[compute_capability]:
                raise CUDADriverError(f"CUDA_ERROR_INVALID_VALUE: {self.kernel.name} opts in to {value} bytes of "
                                      f"dynamic shared memory; an sm_{compute_capability} block has at most "
                                      f"{SHARED_OPTIN[compute_capability]}")
            self.kernel.max_dynamic_shared_size_bytes = int(value)

        def __call__(self, grid, block, args, shared_mem: int = 0):
            if shared_mem > self.max_dynamic_shared_size_bytes:
                raise CUDADriverError(f"CUDA_ERROR_INVALID_VALUE: {self.kernel.name} asks for {shared_mem} bytes of "
                                      f"dynamic shared memory and has opted in to {self.max_dynamic_shared_size_bytes}")
            if not recorded(f"launching {self.kernel.name}"):
                self.kernel(grid, block, args, shared_mem, only_kernel=self.only_kernel, only_acts=self.only_acts)
                return
            addresses = [_Address(a) if isinstance(a, DeviceArray) else a for a in args]

            def launch():
                self.kernel(grid, block, [a.array(self.kernel.name, i) if isinstance(a, _Address) else a
                                          for i, a in enumerate(addresses)], shared_mem, only_kernel=self.only_kernel,
                            only_acts=self.only_acts)

            _capture.append(launch)

    class RawModule:
        """Compiles (``code``) or loads (``path``) at the first ``get_function``, as CuPy does. One
        harness build serves every set of ``options``; a -DGPUBP_ONLY_KERNEL="<name>" among them
        makes the file's other GEMM kernels return at once in this module's launches, as NVRTC's
        build with it would (kernels/one_kernel.cuh), and a -DGPUBP_ONLY_ACTS=<mask> makes an
        activation outside the mask trap (kernels/activations.cuh)."""

        def __init__(self, code: str | None = None, options=(), path: str | None = None):
            self.code, self.path, self.options = code, path, tuple(options)
            self._module, self._looked_up = None, set()
            only = [m.group(1) for m in map(_ONLY_KERNEL.fullmatch, self.options) if m]
            self.only_kernel = only[-1].encode() if only else None
            acts = [int(m.group(1), 0) for m in map(_ONLY_ACTS.fullmatch, self.options) if m]
            self.only_acts = acts[-1] if acts else ALL_ACTS

        def get_function(self, name: str) -> CapturingKernel:
            if name not in self._looked_up:
                _refuse_during_capture(f"loading the kernel {name} (its first lookup, under lazy loading)")
            if self._module is None:
                if self.code is None:
                    raise CUDADriverError(f"cannot load the GPU binary {self.path} on the CPU")
                self._module = harness.module(self.code, _label_of(self.code))
            kernel = CapturingKernel(self._module.get_function(name), self.only_kernel, self.only_acts)
            self._looked_up.add(name)
            return kernel

    def asarray(a, dtype=None):
        if isinstance(a, DeviceArray) and (dtype is None or np.dtype(dtype) == a.dtype):
            return a
        _refuse_during_capture("copying an array to the device")
        return to_device(np.asarray(a, dtype=dtype))

    def ascontiguousarray(a, dtype=None):
        if isinstance(a, DeviceArray) and a.flags.c_contiguous and (dtype is None or np.dtype(dtype) == a.dtype):
            return a
        _refuse_during_capture("copying an array to the device")
        return to_device(np.ascontiguousarray(a, dtype=dtype))

    def from_dlpack(obj):
        """A device array viewing another library's memory (a torch tensor's, say): this GPU's
        memory is host memory, so the producer's CPU tensors stand for its CUDA ones."""
        return np.from_dlpack(obj).view(DeviceArray)

    def zeros(shape, dtype=np.float32):
        out = device_empty(shape, dtype)
        if recorded("cupy.zeros"):  # CuPy fills it with a kernel, which the graph records
            _capture.append(lambda: out.view(np.ndarray).fill(0))
        else:
            out.view(np.ndarray)[...] = 0
        return out

    def copyto(dst, src, casting="same_kind"):
        # CuPy's rule (cupy.copyto): a NumPy source must be a scalar (one element), taken by value
        # now, at the call (baked into a captured graph); a larger one is refused.
        if isinstance(src, np.generic) or (isinstance(src, np.ndarray) and not isinstance(src, DeviceArray)):
            if src.size != 1:
                raise ValueError("non-scalar numpy.ndarray cannot be used for copyto")
            src = src.item()

        def copy():
            np.copyto(dst.view(np.ndarray), _plain(src), casting=casting)

        _capture.append(copy) if recorded("cupy.copyto") else copy()

    def numpy_function(name: str):
        # Array math the backend does with CuPy's NumPy-like API (the softmax around the identity
        # kernel, say) runs as NumPy here, at once: it cannot be recorded into a graph.
        function = getattr(np, name)
        if not callable(function):
            return function

        def call(*args, **kwargs):
            _refuse_during_capture(f"cupy.{name} (array math the CPU stand-in runs at once)")
            return function(*args, **kwargs)

        return call

    cp.__getattr__ = numpy_function
    cp.copyto = copyto
    cp.ndarray = DeviceArray
    cp.empty = lambda shape, dtype=np.float32: device_empty(shape, dtype)
    cp.zeros = zeros
    cp.empty_like = lambda a: device_empty(a.shape, a.dtype)
    cp.asarray = asarray
    cp.ascontiguousarray = ascontiguousarray
    cp.from_dlpack = from_dlpack
    cp.asnumpy = lambda a: DeviceArray.get(a) if isinstance(a, DeviceArray) else np.array(a, copy=True)
    cp.RawModule = RawModule
    cp.cuda = types.SimpleNamespace(
        Device=Device,
        Stream=Stream,
        ExternalStream=ExternalStream,
        get_current_stream=current_stream,
        runtime=types.SimpleNamespace(getDeviceCount=lambda: 1, deviceGetAttribute=device_attribute,
                                      CUDARuntimeError=CUDARuntimeError),
        driver=types.SimpleNamespace(CUDADriverError=CUDADriverError),
    )
    return cp


def _label_of(code: str) -> str:
    """A readable name for an include-expanded source: the file its first #line names."""
    first = re.search(r'^#line 1 "([^"]+)"', code, re.MULTILINE)
    return Path(first.group(1)).stem if first else "kernels"
