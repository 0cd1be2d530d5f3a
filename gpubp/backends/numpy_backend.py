"""NumPy backend: the CPU reference for every GPU backend, and the CPU fallback.

Implements the kernel contract of ``gpubp.backends`` with NumPy (OpenBLAS/MKL matmul).
It is written for speed, not only clarity:

- bias and activation run in place on the matmul output (``y`` is written once by the
  matmul and then updated in place);
- the caller passes persistent ``out=`` buffers (the layers keep one per batch shape), so
  a training step at a fixed batch size allocates nothing on the large paths;
- ``dz = dy * act'(.)`` is formed once, in a scratch buffer reused across calls (each thread has its own), and feeds
  both ``dx = dz @ w.T`` and ``dw = x.T @ dz``; ``db`` is reduced from the same ``dz``;
- reductions that NumPy would run one short row at a time (``db``, softmax row sums) are
  BLAS matrix-vector products with a cached vector of ones (``activations.constant``);
- the elementwise passes (bias+activation, act'*dy with the db sums, the optimizer updates)
  of very large arrays (``_PARALLEL_MIN_ELEMENTS``: below it the BLAS's spinning threads make
  a handoff cost more than it saves) run in row blocks on ``cpu_threads()`` threads (``_in_row_blocks``;
  ``use_cpu_threads(n)`` sets the count for one thread's block of code), with results that
  do not depend on the count: blocks are independent rows, and db sums fixed chunks of rows
  that are then added in order;
- where Numba is installed, the elementwise work around each matrix product runs as one
  compiled pass (``_cpu_kernels``: bias+activation, act'*dy with the db sums, the optimizer
  updates) instead of several NumPy passes. They load on first use, so ``import gpubp``
  never imports Numba; ``GPUBP_CPU_KERNELS=numpy`` (or, for one thread's block of code,
  ``compiled_kernels(False)``) keeps the pure-NumPy path, which is what runs without Numba. It
  computes the same values up to rounding: the bias gradient is a BLAS product there and
  chunked sums here, and the row sums of softmax cross-entropy (hence its loss and gradient)
  add in another order; the other results are the same operations in the same order.
- a dropout mask above a Dense (``dropout=``, a ``philox.Mask``) is generated inside those
  compiled passes, never stored: the forward's bias+activation pass masks its output and the
  backward's dz pass regenerates the mask; without Numba, ``philox.keep_mask`` computes the same
  mask vectorized.

Each "kernel" below records the name a GPU backend records for the same work, so
``gb.trace()`` counts read the same on every backend.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from gpubp import _checks, _special, activations, philox
from gpubp.activations import LEAKY_SLOPE, NEEDS_Z
from gpubp.backends import _contract
from gpubp.trace import record

NAME = "numpy"
DEVICE = "cpu"
DTYPES = (np.float32, np.float64)


class _ThreadBuffers(threading.local):
    """``_scratch``'s buffers, one dict per thread: two models trained at once in two threads
    never write into the same dz, and a thread's buffers go when it ends. It reads as that dict
    (``get``, item assignment, ``len``, ``clear``); ``get`` is the dict's own, bound per thread,
    since ``_scratch`` runs per layer and per parameter each step and a method of this class
    would cost every call twice what the thread-local lookup does."""

    def __init__(self) -> None:  # runs in each thread, on its first use
        self._arrays: dict[tuple, np.ndarray] = {}
        self.get = self._arrays.get

    def __setitem__(self, key: tuple, array: np.ndarray) -> None:
        self._arrays[key] = array

    def __len__(self) -> int:
        return len(self._arrays)

    def clear(self) -> None:
        self._arrays.clear()


_scratch_buffers = _ThreadBuffers()

# NumPy releases the GIL inside ufunc loops, and the compiled kernels are built nogil, so
# threads running either on disjoint row blocks can use every core. But the BLAS gets there
# first: after each matrix product OpenBLAS's (and MKL's) worker threads spin on the other
# cores waiting for the next one, so a worker of ours woken right after a product waits for
# a spinning thread's time slice. Measured on a quiet 2-core EPYC VM with a two-thread
# OpenBLAS: handing a block to a worker costs ~50 us even with nothing else running, and one
# threaded SGD update of 200k weights per step made the 784-256-256-10 @ 256 step 1.7x slower
# than running it on the calling thread; no benchmark shape gained from threading its passes.
# So only passes over arrays of this many elements (16 MiB of float32, a millisecond or more on
# one core) are split, where a time slice is small beside the pass.
_PARALLEL_MIN_ELEMENTS = 1 << 22
_COMPILED_PARALLEL_MIN_ELEMENTS = 1 << 22
# The bias gradient is summed per chunk of this many rows and the chunks added in order, so
# it does not depend on how many threads split the rows (row blocks are whole chunks).
_SUM_CHUNK_ROWS = 64
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
# NUMBA_NUM_THREADS first: it limits compiled CPU code's threads, and the compiled kernels are
# such code (run on this module's threads, not Numba's pool); then the BLAS's variables, in its
# own precedence: OpenBLAS and MKL read theirs before OMP_NUM_THREADS.
_THREAD_VARIABLES = ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS")


# The backend's matrix and dot products run with NumPy's floating-point-flag check off. CI once
# failed on "RuntimeWarning: invalid value encountered in matmul" from a (3, 5) @ (5, 1) float32
# product of finite values, which NumPy hands to OpenBLAS's gemv, and 3,000 reruns did not repeat
# it: the BLAS had set FE_INVALID from data that never reached the result, as OpenBLAS kernels
# have done before. A real inf * 0 or overflow still reaches the result as NaN or inf, as on the
# GPU backends, which never warn; the loss and ``TerminateOnNaN`` see it there.
# ``np.errstate`` costs about 1 us a call and made the SGD step of a 32-64-64-10 MLP at batch 32
# (nine products, 100 us) 14% slower; on NumPy 2 the products set the error state's context
# variable to a state built once instead, which costs that step 4% (under 1% at 784-256-256-10).
try:
    from numpy._core._ufunc_config import _extobj_contextvar as _error_state
except ImportError:  # NumPy 1.x keeps its error state elsewhere
    _error_state = None
_QUIET_ERRORS = dict(divide="warn", over="ignore", under="ignore", invalid="ignore")
if _error_state is not None:
    with np.errstate(**_QUIET_ERRORS):
        _quiet_state = _error_state.get()


# Two functions written out rather than one taking the product as an argument, whose extra call
# cost that small step another 3%.
def _matmul(a, b, out=None):
    """``np.matmul(a, b, out=out)`` with invalid and overflow flags unreported."""
    if _error_state is None:
        with np.errstate(**_QUIET_ERRORS):
            return np.matmul(a, b, out=out)
    token = _error_state.set(_quiet_state)
    try:
        return np.matmul(a, b, out=out)
    finally:
        _error_state.reset(token)


def _dot(a, b) -> float:
    """``float(np.dot(a, b))`` with invalid and overflow flags unreported."""
    if _error_state is None:
        with np.errstate(**_QUIET_ERRORS):
            return float(np.dot(a, b))
    token = _error_state.set(_quiet_state)
    try:
        return float(np.dot(a, b))
    finally:
        _error_state.reset(token)


def _default_threads() -> int:
    """The process's default for ``cpu_threads()``, as the environment sets it: the first of
    ``_THREAD_VARIABLES`` (Numba's thread count, then the BLAS's) that holds a positive integer,
    else one per core; never more than the cores. Read once, at import: a limit set later
    (threadpoolctl's, say) leaves it as it is; ``use_cpu_threads`` overrides it in a block."""
    for variable in _THREAD_VARIABLES:
        value = os.environ.get(variable, "").strip()
        if value.isdigit() and int(value) > 0:
            return min(int(value), _CORES)
    return _CORES


_threads = _default_threads()
# ``use_cpu_threads``'s count while a block of it runs, else None (the default above). A context
# variable, not a module global swapped in and out: two threads inside blocks of their own that
# overlap in time would restore each other's count at exit, leaving the last one out for every
# thread. Each thread (and asyncio task) has its own.
_threads_here: contextvars.ContextVar[int | None] = contextvars.ContextVar("gpubp_cpu_threads", default=None)


def _new_workers() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max(_CORES - 1, 1), thread_name_prefix="gpubp-numpy")


_workers = _new_workers()


def _workers_after_fork() -> None:
    """A new pool in a forked child: the parent's worker threads do not exist there, but its pool
    still counts them, and the slot an idle one left, as ready, so it starts no thread for a block
    handed to it, and the caller waits for that block for ever."""
    global _workers
    _workers = _new_workers()


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_workers_after_fork)


def cpu_threads() -> int:
    """How many threads the backend's elementwise passes and compiled kernels use here: the
    innermost ``use_cpu_threads`` block of this thread's, else the process's default (the
    environment's thread count, ``_default_threads``)."""
    threads = _threads_here.get()
    return _threads if threads is None else threads


@contextlib.contextmanager
def use_cpu_threads(threads: int):
    """Run the backend's elementwise passes on ``threads`` threads (at most the cores) inside the
    block; results are the same for every count. It sets the count for the thread that enters it
    alone (a context variable: for its asyncio task alone); other threads keep theirs. The BLAS
    keeps its own setting."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads: expected a positive int, got {threads!r}")
    token = _threads_here.set(min(threads, _CORES))
    try:
        yield
    finally:
        _threads_here.reset(token)


# The compiled kernels: the module once loaded, or why they are not used.
_kernels = None
_kernels_reason: str | None = None
def _kernels_from_environment() -> bool:
    value = os.environ.get("GPUBP_CPU_KERNELS", "numba")
    choice = value.strip().lower()
    if choice not in ("numba", "numpy", ""):
        warnings.warn(f"GPUBP_CPU_KERNELS={value!r} ignored: expected 'numba' (the default) or 'numpy'", RuntimeWarning,
                      stacklevel=2)
    return choice != "numpy"


# The process's default, from the environment; ``compiled_kernels``'s setting while a block of it
# runs, per thread as ``_threads_here`` is, else None.
_kernels_enabled = _kernels_from_environment()
_kernels_here: contextvars.ContextVar[bool | None] = contextvars.ContextVar("gpubp_compiled_kernels", default=None)
_scalars: dict = {}


def _kernels_switched_on() -> bool:
    enabled = _kernels_here.get()
    return _kernels_enabled if enabled is None else enabled


def unavailable_reason() -> str | None:
    return None


_KERNEL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))  # what the compiled kernels are built for


def _compiled(dtype=None):
    """The ``_cpu_kernels`` module, or None where Numba is missing, the kernels are switched off,
    or the arrays are of a ``dtype`` they are not built for (float16, say: NumPy computes those)."""
    global _kernels, _kernels_reason
    if not _kernels_switched_on() or (dtype is not None and np.dtype(dtype) not in _KERNEL_DTYPES):
        return None
    if _kernels is None and _kernels_reason is None:
        try:
            import numba

            if numba.config.DISABLE_JIT:  # its "kernels" would run as Python loops, 100x slower than NumPy
                raise RuntimeError("NUMBA_DISABLE_JIT is set, which would run them as Python loops")
            from gpubp.backends import _cpu_kernels
        except ImportError as exc:
            _kernels_reason = f"Numba is not installed ({exc}); pip install numba for the compiled CPU kernels"
        except Exception as exc:  # noqa: BLE001  (a Numba that cannot compile here: the NumPy path computes)
            _kernels_reason = f"Numba's kernels cannot be loaded here: {type(exc).__name__}: {exc}"
        else:
            _kernels = _cpu_kernels
    return _kernels


def cpu_kernels() -> str:
    """Which elementwise kernels run here (in this thread, as ``compiled_kernels`` may set it):
    ``"numba"``, or ``"numpy (why)"``."""
    if _compiled() is not None:
        return "numba"
    if not _kernels_switched_on():
        return "numpy (switched off: GPUBP_CPU_KERNELS=numpy or compiled_kernels(False))"
    return f"numpy ({_kernels_reason})"


@contextlib.contextmanager
def compiled_kernels(enabled: bool):
    """Use (or, with ``enabled=False``, bypass) the compiled CPU kernels inside the block, for the
    thread that enters it alone, as ``use_cpu_threads`` sets its count; other threads keep
    theirs (``GPUBP_CPU_KERNELS``'s, outside blocks of their own)."""
    token = _kernels_here.set(bool(enabled))
    try:
        yield
    finally:
        _kernels_here.reset(token)


def _as_dtype(dtype, values: tuple) -> tuple:
    """``values`` as scalars of ``dtype``, so compiled kernels compute at the arrays' precision.

    Cached: a layer or an optimizer passes the same few values at every step.
    """
    key = (dtype, values)
    scalars = _scalars.get(key)
    if scalars is None:
        if len(_scalars) > 64:
            _scalars.clear()
        scalars = _scalars[key] = tuple(dtype.type(v) for v in values)
    return scalars


def _scratch(tag: str, shape: tuple, dtype) -> np.ndarray:
    """A buffer private to one backend call, reused by the next call with the same shape in the
    same thread."""
    key = (tag, shape, dtype)
    buf = _scratch_buffers.get(key)
    if buf is None:
        if len(_scratch_buffers) > 64:
            _scratch_buffers.clear()
        buf = _scratch_buffers[key] = np.empty(shape, dtype)
    return buf


def _in_row_blocks(body, rows: int, elements: int, min_elements: int, chunk_rows: int = 1) -> None:
    """Call ``body(first, stop)`` over row blocks covering ``range(rows)``, one block per thread.

    Blocks are whole multiples of ``chunk_rows``. Work of fewer than ``min_elements``
    elements (per array) runs in the calling thread in one piece."""
    threads = min(cpu_threads(), -(-rows // chunk_rows))
    if threads <= 1 or elements < min_elements:
        body(0, rows)
        return
    chunks = -(-rows // chunk_rows)
    bounds = [min(rows, chunk_rows * (chunks * i // threads)) for i in range(threads + 1)]
    pending = [_workers.submit(body, first, stop) for first, stop in zip(bounds[1:-1], bounds[2:])]
    try:
        body(bounds[0], bounds[1])
    finally:
        for future in pending:
            future.result()


def _on_all_cores(kernel, *args, min_elements: int | None = None) -> None:
    """Run ``kernel(*blocks)`` on matching leading-axis blocks of the array ``args``, one block per thread.

    ``kernel`` must be elementwise along axis 0 (each block is independent). ``None`` and
    scalar entries are passed through unsplit."""
    first = args[0]
    if cpu_threads() == 1 or first.size < (_PARALLEL_MIN_ELEMENTS if min_elements is None else min_elements):
        kernel(*args)  # the common case at small sizes, without building the blocks
        return

    def body(lo, hi):
        kernel(*(a[lo:hi] if isinstance(a, np.ndarray) else a for a in args))

    _in_row_blocks(body, first.shape[0], first.size, 0)


# ----------------------------------------------------------------------------- array helpers


def empty(shape, dtype=np.float32) -> np.ndarray:
    return np.empty(shape, dtype)


def zeros(shape, dtype=np.float32) -> np.ndarray:
    return np.zeros(shape, dtype)


def asarray(a, dtype=None) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=dtype)


def to_host(a) -> np.ndarray:
    return np.asarray(a)


def synchronize() -> None:
    pass


def is_array(a) -> bool:
    return isinstance(a, np.ndarray)


def sumsq(*arrays: np.ndarray) -> float:
    total = 0.0
    for a in arrays:
        record("sumsq")
        flat = a.reshape(-1)
        total += _dot(flat, flat)
    return total


def scale_(a: np.ndarray, s: float) -> None:
    record("scale")
    a *= s


# ----------------------------------------------------------------------------- dense layer


def dense_precisions() -> tuple[str, ...]:
    """No tensor cores: "tf32" computes fp32 here, as PyTorch's TF32 switch does on a CPU; "bf16"
    rounds the products' operands to bf16 as the GPU kernels do (``round_bf16``) and multiplies
    them in the array's precision, so it matches them up to the order of the fp32 sums."""
    return ("fp32", "tf32", "bf16")


_BF16_HALF_ULP = np.uint32(0x7FFF)
_BF16_KEEP = np.uint32(0xFFFF0000)


def round_bf16(a: np.ndarray) -> np.ndarray:
    """``a`` rounded to bfloat16 (8 significant bits, round to nearest, ties to even, as the GPU's
    ``cvt.rn.bf16x2.f32``; NaN stays NaN, overflow goes to inf), in a new array of a's dtype.
    float64 goes through float32 first, as it does on its way to a GPU.

    >>> round_bf16(np.array([1 + 2**-8, 1 + 3 * 2**-8], np.float32)).tolist()  # ties to even
    [1.0, 1.015625]
    """
    record("round_bf16")
    if not isinstance(a, np.ndarray) and _checks.is_sparse(a):  # a CSR batch of input: its stored values
        rounded = a.copy()
        rounded.data = _round_bf16_values(a.data)
        return rounded
    return _round_bf16_values(a)


def _round_bf16_values(a: np.ndarray) -> np.ndarray:
    bits = np.array(a, np.float32).view(np.uint32)
    odd = (bits >> np.uint32(16)) & np.uint32(1)
    rounded = ((bits + _BF16_HALF_ULP + odd) & _BF16_KEEP).view(np.float32)
    rounded = np.where(np.isnan(bits.view(np.float32)), np.float32(np.nan), rounded)
    return rounded.astype(a.dtype, copy=False)


# ----------------------------------------------------------------------------- sparse input

# The model's input may reach the first layer as a SciPy CSR batch (``SPARSE_INPUT``): a TF-IDF or
# hashed feature matrix stores a few entries a row, and its products then cost what those entries
# cost. Measured on the 2-core development machine, one epoch of a 20000-100-5 MLP at batch 200
# (bench/test_sparse_input.py's model, with this constant set to 1 to make every batch sparse and
# to -1 to make every batch dense): the sparse batches ran 2.8x faster than the same batches made
# dense at 0.5% stored, 1.9-2.2x at 2%, 1.3x at 5% and 0.8x at 10%; with a 512-wide layer, 2.1x at 2%
# and 1.0x at 5%; a 2000-256-5 MLP at batch 256, 1.8x at 2% and 0.8x at 10%. So a batch that
# stores more than ``SPARSE_MAX_DENSITY`` of its entries is made dense first, and so is one whose
# dense product is smaller than ``SPARSE_MIN_WORK`` multiply-adds, where SciPy's costs per call
# (tens of microseconds) outweigh what the zeros save: a 200-32-5 MLP at batch 32 ran 40 us a
# step (15%) slower sparse.
SPARSE_INPUT = True
SPARSE_MAX_DENSITY = 0.02
SPARSE_MIN_WORK = 1 << 20
# A sparse product of at least this many multiply-adds (nonzeros times output width, a
# millisecond or so) is split into row blocks, one per thread: SciPy releases the GIL in it.
_SPARSE_PARALLEL_MIN_WORK = 1 << 20


def multiplies_sparse(x, width: int) -> bool:
    """Whether ``dense_forward`` and ``dense_backward`` should take the SciPy CSR batch ``x`` as it
    is, into a layer of ``width`` outputs, rather than made dense: it stores at most
    ``SPARSE_MAX_DENSITY`` of its entries, and its dense product would be at least
    ``SPARSE_MIN_WORK`` multiply-adds."""
    rows, cols = x.shape
    return x.nnz <= SPARSE_MAX_DENSITY * rows * cols and rows * cols * width >= SPARSE_MIN_WORK


def _sparse_product(x, w, out=None) -> np.ndarray:
    """``x @ w`` of a SciPy CSR batch ``x`` (B, in) and ``w`` (in, out), into ``out`` or a new array.
    Each row of the result adds its row's stored entries times w's rows, in column order."""
    rows = x.shape[0]
    y = out if out is not None else np.empty((rows, w.shape[1]), w.dtype)

    def body(lo, hi):
        y[lo:hi] = (x if hi - lo == rows else x[lo:hi]) @ w  # (a slice of CSR rows is a copy)

    _in_row_blocks(body, rows, x.nnz * w.shape[1], _SPARSE_PARALLEL_MIN_WORK)
    return y


def _sparse_transposed_product(x, dz, out=None) -> np.ndarray:
    """``x.T @ dz`` of a SciPy CSR batch ``x`` (B, in) and ``dz`` (B, out): dW. x.T goes to CSR
    first (x's CSC form, one pass over its entries), whose product writes each row of dW once and
    in order, 4x faster than SciPy's product of x.T as it comes (CSC), which scatters into dW."""
    xt = x.T.tocsr()
    return _sparse_product(xt, dz, out)


def dense_forward(x, w, b, act, out=None, out_z=None, precision="fp32", dropout=None):
    """``z = x @ w + b; y = act(z)``: x (B, in), w (in, out), b (out,) -> y (B, out), z or None.
    No tensor cores here: fp32 (or float64) for either ``precision``. ``x`` may be a SciPy CSR
    batch of w's dtype (``SPARSE_INPUT``; see ``multiplies_sparse``): the product skips its zeros.

    ``dropout`` (a ``philox.Mask``): the output is ``y * scale`` where the mask keeps it and 0
    elsewhere, formed in the bias+activation pass (a second pass for the activations that pass
    does not fuse); ``z`` stays unmasked. The mask is generated, never stored.
    ``precision="bf16"``: x and w rounded to bf16 first (``round_bf16``); "tf32" computes as "fp32"."""
    _contract.dense_forward(x, w, b, out, out_z, act, dropout)
    if precision == "bf16":
        x, w = round_bf16(x), round_bf16(w)
    record("dense_fwd")
    product = _sparse_product if _checks.is_sparse(x) else _matmul
    if act in NEEDS_Z:
        z = product(x, w, out=out_z)
        z += b
        y = out if out is not None else np.empty_like(z)
        _on_all_cores(lambda z, y: activations.forward(act, z, y), z, y)
        if dropout is not None:
            _apply_mask(y, y, dropout)
        return y, z
    y = product(x, w, out=out)
    kernels = _compiled(y.dtype)
    if kernels is not None and act in kernels.ACTS:
        code, slope = kernels.ACTS[act], *_as_dtype(y.dtype, (LEAKY_SLOPE,))
        if dropout is None:
            def body(lo, hi):
                kernels.bias_act(y[lo:hi], b, code, slope)
        else:
            scale = y.dtype.type(dropout.scale)

            def body(lo, hi):
                kernels.bias_act_dropout(y[lo:hi], b, code, slope, dropout.key, dropout.threshold,
                                         dropout.first_row + lo, scale)
        _in_row_blocks(body, y.shape[0], y.size, _COMPILED_PARALLEL_MIN_ELEMENTS)
        return y, None
    y += b
    if act == "softmax":
        softmax_(y)
    else:
        _on_all_cores(lambda z, y: activations.forward(act, z, y), y, y)
    if dropout is not None:
        _apply_mask(y, y, dropout)
    return y, None


def _apply_mask(src, dst, dropout) -> None:
    """``dst = src * scale`` where ``dropout``'s mask keeps the element, else 0 (``dst`` may be ``src``)."""
    kernels = _compiled(src.dtype)
    scale = src.dtype.type(dropout.scale)
    if kernels is not None:
        def body(lo, hi):
            kernels.apply_mask(src[lo:hi], dst[lo:hi], dropout.key, dropout.threshold, dropout.first_row + lo, scale)

        _in_row_blocks(body, src.shape[0], src.size, _COMPILED_PARALLEL_MIN_ELEMENTS)
        return
    keep = philox.keep_mask(dropout.key, *src.shape, dropout.threshold, dropout.first_row)
    np.multiply(src, scale, out=dst)
    dst[~keep] = 0


def _masked_copy(src, dropout, out, trace_name: str):
    """``out = src * scale`` where ``dropout``'s mask keeps, else 0 (a new array when ``out`` is
    None), recorded as ``trace_name``."""
    record(trace_name)
    out = out if out is not None else np.empty_like(src)
    _apply_mask(src, out, dropout)
    return out


def dropout_forward(x, dropout, out=None):
    """A dropout on its own (on the model's input): ``x * scale`` where the mask keeps, else 0."""
    _contract.same("x", x, out=out)
    return _masked_copy(x, dropout, out, "dropout_fwd")


def dropout_backward(dy, dropout, out=None):
    """The gradient through ``dropout_forward``: the same mask, regenerated, applied to ``dy``."""
    _contract.same("dy", dy, out=out)
    return _masked_copy(dy, dropout, out, "dropout_bwd")


def backward_kernels(act, need_dx, need_dw, precision="fp32", dropout=False, need_db=None) -> list[str]:
    """What ``dense_backward`` records; ``dropout``: the forward masked its output, and the pass
    forming dz (``dropout_dz``) regenerates the mask. db comes with dW, or alone as ``dense_db``."""
    if not (need_dx or need_dw or need_db):
        return []
    dz = ["dropout_dz"] if dropout else ["softmax_bwd"] if act == "softmax" else []
    if need_db and not need_dw:
        dz.append("dense_db")
    if precision == "bf16" and (need_dx or need_dw):  # dz, then x for dW and W for dX, rounded before their products
        return (dz + ["round_bf16"] + (["round_bf16", "dense_dw"] if need_dw else [])
                + (["round_bf16", "dense_dx"] if need_dx else []))
    return dz + (["dense_dw"] if need_dw else []) + (["dense_dx"] if need_dx else [])


def _masked_dz(dy, y, z, act, dropout, db):
    """``dz = dy * scale * act'(.)`` where the forward's mask kept, else 0, into a scratch buffer;
    ``y`` is the masked output, so the activation's own output is ``y * keep_prob`` where kept.
    Returns dz and whether it filled ``db`` (its column sums; the compiled pass does)."""
    record("dropout_dz")
    dz = _scratch("dz", dy.shape, dy.dtype)
    kernels = _compiled(dy.dtype)
    if kernels is not None and act in kernels.ACTS:
        code, (slope, scale, keep_prob) = kernels.ACTS[act], _as_dtype(dy.dtype, (LEAKY_SLOPE, dropout.scale,
                                                                                  dropout.keep_prob))
        y = dy if y is None else y
        rows = dy.shape[0]
        partials = None if db is None else _scratch("db_chunks", (-(-rows // _SUM_CHUNK_ROWS), dy.shape[1]), dy.dtype)

        def body(lo, hi):
            kernels.act_grad_sum(dy[lo:hi], y[lo:hi], code, slope, dz[lo:hi],
                                 None if partials is None else partials[lo // _SUM_CHUNK_ROWS:], _SUM_CHUNK_ROWS,
                                 (dropout.key, dropout.threshold, dropout.first_row + lo, scale, keep_prob))

        _in_row_blocks(body, rows, dy.size, _COMPILED_PARALLEL_MIN_ELEMENTS, _SUM_CHUNK_ROWS)
        if db is not None:
            kernels.add_rows_in_order(partials, db)
        return dz, db is not None
    _apply_mask(dy, dz, dropout)
    if act != "identity":
        own = None if y is None else np.multiply(y, dy.dtype.type(dropout.keep_prob))
        activations.backward(act, dz, own, z, dz)
    return dz, False


def dense_backward(dy, x, w, y, z, act, need_dx, need_dw, out_dx=None, out_dw=None, out_db=None,
                   precision="fp32", dropout=None, need_db=None):
    """Gradients of ``y = act(x @ w + b)``; skips dW/db when ``need_dw`` is False, dX when ``need_dx`` is.
    ``need_db=True`` with ``need_dw=False``: db alone (a bias that trains under a frozen weight);
    ``need_db=False`` with ``need_dw``: dW alone (a frozen bias), ``db`` None and ``out_db`` unwritten.
    ``dropout``: the ``philox.Mask`` the forward applied, so ``y`` holds the masked output.
    ``x`` may be the SciPy CSR batch the forward took (``SPARSE_INPUT``)."""
    _contract.dense_backward(dy, x, w, y, z, out_dx, out_dw, out_db, None, act, need_dw, dropout)
    sums = need_dw if need_db is None else bool(need_db)  # db comes with dW unless told otherwise
    if not (need_dx or need_dw or sums):
        return None, None, None
    kernels = _compiled(dy.dtype)
    db = None
    if dropout is not None:
        db = (out_db if out_db is not None else np.empty(dy.shape[1], dy.dtype)) if sums else None
        dz, summed = _masked_dz(dy, y, z, act, dropout, db)
        if not summed:
            db = None
    elif act == "identity":
        dz = dy
    elif kernels is not None and act in kernels.ACTS:
        # one pass: dz and, for a layer that trains, its column sums per chunk of rows (db), so db
        # costs no second read of dz
        dz = _scratch("dz", dy.shape, dy.dtype)
        rows = dy.shape[0]
        partials = _scratch("db_chunks", (-(-rows // _SUM_CHUNK_ROWS), dy.shape[1]), dy.dtype) if sums else None
        code, slope = kernels.ACTS[act], *_as_dtype(dy.dtype, (LEAKY_SLOPE,))

        def act_grad(lo, hi):
            kernels.act_grad_sum(dy[lo:hi], y[lo:hi], code, slope, dz[lo:hi],
                                 None if partials is None else partials[lo // _SUM_CHUNK_ROWS:], _SUM_CHUNK_ROWS,
                                 None)

        _in_row_blocks(act_grad, rows, dy.size, _COMPILED_PARALLEL_MIN_ELEMENTS, _SUM_CHUNK_ROWS)
        if sums:
            db = out_db if out_db is not None else np.empty(dy.shape[1], dy.dtype)
            kernels.add_rows_in_order(partials, db)
    else:
        dz = _scratch("dz", dy.shape, dy.dtype)
        if act == "softmax":
            softmax_backward(dy, y, dz)
        else:
            _on_all_cores(lambda dy, y, z, dz: activations.backward(act, dy, y, z, dz), dy, y, z, dz)
    if not need_dw and sums:
        record("dense_db")  # after the pass forming dz (which may sum db too), as backward_kernels lists it
    dx = dw = None
    if sums and db is None:
        # db = ones(B) @ dz: BLAS gemv reads dz once at full vector width; np.sum(dz, axis=0)
        # walks it row by row and costs about four times as much for narrow layers.
        db = _matmul(activations.constant(1, dz.shape[:1], dz.dtype), dz, out=out_db)
    if precision == "bf16" and (need_dx or need_dw):  # db above from the unrounded dz, as on the GPU
        dz = round_bf16(dz)
    if need_dw:
        if precision == "bf16":
            x = round_bf16(x)
        record("dense_dw")
        dw = _sparse_transposed_product(x, dz, out_dw) if _checks.is_sparse(x) else _matmul(x.T, dz, out=out_dw)
    if need_dx:
        if precision == "bf16":
            w = round_bf16(w)
        record("dense_dx")
        dx = _matmul(dz, w.T, out=out_dx)
    return dx, dw, db


def softmax_(y):
    """Row softmax of y (B, C) in place."""
    record("softmax_fwd")
    activations.forward("softmax", y, y)


def softmax_backward(dy, y, out):
    """``out = y * (dy - sum(dy * y, axis=1))``: the softmax Jacobian-vector product; ``out`` may be ``dy``."""
    _contract.same("dy", dy, y=y, out=out)
    record("softmax_bwd")
    activations.backward("softmax", dy, y, None, out)
    return out


# ----------------------------------------------------------------------------- losses


# Below this many classes the row max is taken over a transposed copy: NumPy reduces a
# short row at a time with a per-row loop call, which costs ~6x more at (4096, 10).
_NARROW_CLASSES = 32


# A signed label dtype -> the unsigned one of its size and byte order, for ``_class_indices``.
_UNSIGNED: dict = {}


def _class_indices(labels, classes: int) -> np.ndarray:
    """``labels`` as an array of integers in [0, classes), else a TypeError or ValueError naming
    them, in ``losses.cross_entropy``'s words. The compiled pass indexes each row with its label
    unchecked, so a label outside would read and write the next row's gradient, and the NumPy path
    would take -1 for the last class. Checked here, on the host, before either path runs: a GPU
    backend would have to wait for the device to read the labels, so it takes them as given."""
    if not isinstance(labels, np.ndarray):
        labels = np.asarray(labels)
    kind = labels.dtype.kind
    if kind == "i":
        # One pass over the labels, not a min and a max: a negative label read as unsigned is
        # above any class count.
        unsigned = _UNSIGNED.get(labels.dtype)
        if unsigned is None:
            unsigned = _UNSIGNED[labels.dtype] = np.dtype(labels.dtype.str.replace("i", "u"))
        top = np.maximum.reduce(labels.view(unsigned))
    elif kind == "u":
        top = np.maximum.reduce(labels)
    else:
        raise TypeError(f"labels: expected integer class indices, got dtype {labels.dtype}")
    if top >= classes:
        low, high = int(np.minimum.reduce(labels)), int(np.maximum.reduce(labels))
        raise ValueError(f"labels: expected class indices in [0, {classes}), got values from {low} to {high}")
    return labels


def softmax_cross_entropy(logits, labels, sample_weight=None, label_smoothing=0.0):
    """Mean softmax cross-entropy over the batch; logits (B, C), labels (B,) ints in [0, C).
    ``sample_weight`` (B,): each row's loss times its weight, summed, over B (Keras's rule).
    ``label_smoothing`` eps: each row's target is (1 - eps) onehot + eps / C, its loss
    log sum exp(z - m) - (1 - eps)(z_label - m) - eps / C sum(z - m) with m the row max (logsumexp(z)
    - (1 - eps) z_label - eps / C sum(z)), its gradient softmax(z) - target; eps = 0 runs the
    one-hot code alone, as it was before label smoothing."""
    _contract.labelled_loss(logits, labels, sample_weight)
    batch, classes = logits.shape
    labels = _class_indices(labels, classes)
    record("ce_fwd_bwd")
    smoothing = label_smoothing != 0
    kernels = _compiled(logits.dtype)
    if kernels is not None and classes < _NARROW_CLASSES and sample_weight is None:
        # Short rows: two compiled passes around NumPy's vectorized exp replace a dozen NumPy
        # calls (12 -> 3 us at (64, 10), 330 -> 200 us at (4096, 10)). Wide rows stay on NumPy,
        # whose reductions vectorize where the kernels' max and sum chains do not.
        dtype = logits.dtype.type
        grad = np.empty((batch, classes), logits.dtype)
        picked = np.empty(batch, logits.dtype)
        if smoothing:
            keep, off = dtype(1.0 - label_smoothing), dtype(label_smoothing / classes)
            kernels.shift_by_row_max_smoothed(logits, labels, grad, picked, keep, off)
        else:
            kernels.shift_by_row_max(logits, labels, grad, picked)
        np.exp(grad, out=grad)
        loss = kernels.softmax_cross_entropy_grad(grad, labels, picked, dtype(1.0 / batch),
                                                  dtype(label_smoothing / (classes * batch)),
                                                  dtype((1.0 - label_smoothing) / batch))
        return float(loss), grad
    rows = np.arange(batch)
    if classes < _NARROW_CLASSES:
        row_max = np.maximum.reduce(np.ascontiguousarray(logits.T), axis=0)
    else:
        row_max = np.maximum.reduce(logits, axis=1)
    grad = logits - row_max[:, None]
    picked = grad[rows, labels]
    if smoothing:
        # the smoothed target's part of the loss, -(1 - eps)(z_label - m) - eps / C sum(z - m),
        # taken before the exp overwrites z - m
        ones = activations.constant(1, (classes,), grad.dtype)
        picked = (1.0 - label_smoothing) * picked + (label_smoothing / classes) * _matmul(grad, ones)
    np.exp(grad, out=grad)
    # row sums as grad @ ones(C): one BLAS gemv instead of a per-row reduction
    total = _matmul(grad, activations.constant(1, (classes,), grad.dtype))
    row_loss = np.log(total) - picked
    # The mean over the rows accumulates in float64, as the compiled pass's does: a float32 sum of
    # large row losses overflows to inf where the mean is finite.
    if sample_weight is None:
        loss = float(np.add.reduce(row_loss, dtype=np.float64)) / batch
    else:
        sample_weight = sample_weight.astype(logits.dtype, copy=False)
        loss = _dot(row_loss.astype(np.float64), sample_weight.astype(np.float64)) / batch
    # softmax / B in one pass over (B, C), scaling by the (B,) column 1 / (B * total) (times the weights)
    np.divide(1.0 / batch, total, out=total)
    # minus target / B (times the weights): with smoothing eps / (C B) everywhere, and at the
    # label (1 - eps) / B more; one-hot, 1 / B at the label alone
    off = label_smoothing / (classes * batch)
    on = (1.0 - label_smoothing) / batch
    if sample_weight is None:
        grad *= total[:, None]
        if smoothing:
            grad -= off
        grad[rows, labels] -= on
    else:
        total *= sample_weight
        grad *= total[:, None]
        if smoothing:
            grad -= (sample_weight * off)[:, None]
        grad[rows, labels] -= sample_weight * on if smoothing else sample_weight / batch
    return loss, grad


def _row_weights(sample_weight, like):
    """``sample_weight`` (B,) as a (B, 1) column in ``like``'s dtype, to scale each row."""
    return sample_weight.astype(like.dtype, copy=False).reshape(-1, 1)


def _weighted_mean(per_elem, grad, sample_weight):
    """(the mean of ``per_elem``, ``grad``), each row of both first scaled in place by its
    ``sample_weight`` when one is given: an elementwise loss's value and gradient."""
    if sample_weight is not None:
        weights = _row_weights(sample_weight, per_elem)
        per_elem *= weights
        grad *= weights
    return float(per_elem.mean(dtype=np.float64)), grad


def _mean_of_products(a, b) -> float:
    """The mean of ``a * b``, an elementwise loss's value: each term in the arrays' dtype, as
    every backend computes it (a term past the dtype's range is inf there too), summed in float64
    as ``_weighted_mean`` sums bce's and poisson's. A float32 sum (the BLAS's dot) overflowed to
    inf where the mean of finite terms is finite, and lost digits over millions of terms. The
    flags are unreported, as in ``_dot`` (once a step: ``np.errstate`` costs nothing that counts
    here); the gradient stays in the arrays' dtype."""
    with np.errstate(**_QUIET_ERRORS):
        return float(np.multiply(a, b).sum(dtype=np.float64)) / a.size


def mse(pred, target, sample_weight=None):
    """Mean squared error over all elements; with ``sample_weight`` (B,) each row's squared
    errors count times its weight (Keras's rule: the weighted sum over the element count)."""
    _contract.loss("pred", pred, target, sample_weight)
    record("mse_fwd_bwd")
    diff = np.subtract(pred, target, dtype=pred.dtype)
    if sample_weight is None:
        loss = _mean_of_products(diff, diff)
        diff *= 2.0 / diff.size
        return loss, diff
    weighted = diff * _row_weights(sample_weight, diff)
    loss = _mean_of_products(weighted, diff)
    weighted *= 2.0 / diff.size
    return loss, weighted


def mae(pred, target, sample_weight=None):
    """Mean absolute error over all elements: each element's loss |d| (d = pred - target) and
    its gradient sign(d) / n, 0 where d is 0 or NaN (a NaN makes the loss NaN), as PyTorch's
    L1Loss and the GPU kernels have it; ``sample_weight`` (B,) weights each row as for ``mse``."""
    _contract.loss("pred", pred, target, sample_weight)
    record("mae_fwd_bwd")
    diff = np.subtract(pred, target, dtype=pred.dtype)
    grad = np.subtract(diff > 0, diff < 0, dtype=diff.dtype)  # np.sign(NaN) is NaN
    if sample_weight is not None:
        grad *= _row_weights(sample_weight, grad)
    loss = _mean_of_products(grad, diff)  # sign(d) d = |d|
    grad *= 1.0 / diff.size
    return loss, grad


def huber(pred, target, sample_weight=None, delta=1.0):
    """Huber loss over all elements: with d = pred - target and c = clip(d, -delta, delta), each
    element's loss is c (d - c / 2) (d^2 / 2 inside delta, delta (|d| - delta / 2) outside) and
    its gradient c / n; ``sample_weight`` (B,) weights each row as for ``mse``."""
    _contract.loss("pred", pred, target, sample_weight)
    record("huber_fwd_bwd")
    diff = np.subtract(pred, target, dtype=pred.dtype)
    # delta in diff's dtype: a NumPy float64 delta would make a float32 gradient float64 (a Python
    # float adapts to the array's dtype, a NumPy scalar keeps its own)
    delta = diff.dtype.type(delta)
    clipped = np.clip(diff, -delta, delta)
    diff -= 0.5 * clipped
    if sample_weight is not None:
        clipped *= _row_weights(sample_weight, clipped)
    loss = _mean_of_products(clipped, diff)
    clipped *= 1.0 / diff.size
    return loss, clipped


def bce(logits, target, sample_weight=None):
    """Binary cross-entropy on logits, mean over all elements: max(z,0) - z t + log1p(exp(-|z|));
    ``sample_weight`` (B,) weights each row as for ``mse``."""
    _contract.loss("logits", logits, target, sample_weight)
    record("bce_fwd_bwd")
    target = target.astype(logits.dtype, copy=False)
    per_elem = np.abs(logits)
    np.negative(per_elem, out=per_elem)
    np.exp(per_elem, out=per_elem)
    np.log1p(per_elem, out=per_elem)
    per_elem += np.maximum(logits, 0)
    per_elem -= logits * target
    grad = _special.expit(logits, out=np.empty_like(logits))  # scipy has no float16 loop
    grad -= target
    grad *= 1.0 / grad.size
    return _weighted_mean(per_elem, grad, sample_weight)


def poisson(log_rate, target, sample_weight=None):
    """Poisson negative log-likelihood on log rates z, mean over all elements: exp(z) - t z, its
    gradient (exp(z) - t) / n; ``sample_weight`` (B,) weights each row as for ``mse``."""
    _contract.loss("log_rate", log_rate, target, sample_weight)
    record("poisson_fwd_bwd")
    target = target.astype(log_rate.dtype, copy=False)
    rate = np.exp(log_rate)
    per_elem = rate - log_rate * target
    grad = np.subtract(rate, target, out=rate)
    grad *= 1.0 / grad.size
    return _weighted_mean(per_elem, grad, sample_weight)


# ----------------------------------------------------------------------------- optimizers


def _all_c_contiguous(*arrays) -> bool:
    """Every array given (None: a state the update does not keep) is C-contiguous. The compiled
    updates read each array they take flat (``reshape(-1)``), which Numba does for C-contiguous
    arrays alone: another layout of any of them, a velocity or a moment as much as the parameter,
    stops the call inside Numba, so such an update takes the NumPy path."""
    for a in arrays:
        if a is not None and not a.flags.c_contiguous:
            return False
    return True


def sgd_update(param, grad, velocity, lr, momentum, nesterov, weight_decay):
    """In-place SGD step with PyTorch's semantics (momentum buffer, Nesterov, L2 decay)."""
    _contract.update(param, grad, _contract.sgd_state(momentum), velocity=velocity)
    record("sgd_update")
    kernels = _compiled(param.dtype)
    if kernels is not None and _all_c_contiguous(param, grad, velocity):
        lr, momentum, weight_decay = _as_dtype(param.dtype, (lr, momentum, weight_decay))
        # without momentum the kernel never reads the velocity; grad stands in for it
        _on_all_cores(kernels.sgd_update, param, grad, grad if velocity is None else velocity,
                      lr, momentum, bool(nesterov), weight_decay, min_elements=_COMPILED_PARALLEL_MIN_ELEMENTS)
        return

    def update(param, grad, velocity, decayed, work):
        step = grad
        if weight_decay:
            np.multiply(param, weight_decay, out=decayed)
            decayed += grad
            step = decayed
        if momentum:
            velocity *= momentum
            velocity += step
            if nesterov:
                np.multiply(velocity, momentum, out=work)
                work += step
                step = work
            else:
                step = velocity
        np.multiply(step, -lr, out=work)
        param += work

    decayed = _scratch("sgd_g", grad.shape, grad.dtype) if weight_decay else None
    _on_all_cores(update, param, grad, velocity, decayed, _scratch("sgd_s", grad.shape, grad.dtype))


def adam_update(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step, decoupled):
    """In-place Adam (``decoupled=False``) or AdamW step with PyTorch's semantics."""
    _contract.update(param, grad, _contract.ADAM_STATE, m=m, v=v)
    record("adam_update")
    bias1 = 1.0 - beta1**step
    bias2 = 1.0 - beta2**step
    kernels = _compiled(param.dtype)
    if kernels is not None and _all_c_contiguous(param, grad, m, v):
        l2, keep = (0.0, 1.0 - lr * weight_decay) if decoupled else (weight_decay, 1.0)
        constants = _as_dtype(param.dtype, (beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, l2, keep))
        cast = param.dtype.type
        _on_all_cores(kernels.adam_update, param, grad, m, v, *constants, cast(1.0 / math.sqrt(bias2)),
                      cast(-lr / bias1), min_elements=_COMPILED_PARALLEL_MIN_ELEMENTS)
        return

    def update(param, grad, m, v, decayed, tmp):
        g = grad
        if weight_decay and decoupled:
            param *= 1.0 - lr * weight_decay
        elif weight_decay:
            np.multiply(param, weight_decay, out=decayed)
            decayed += grad
            g = decayed
        m *= beta1
        np.multiply(g, 1.0 - beta1, out=tmp)
        m += tmp
        v *= beta2
        np.multiply(g, 1.0 - beta2, out=tmp)  # (1-b2) g first, as PyTorch: g * g overflows sooner
        tmp *= g
        v += tmp
        np.sqrt(v, out=tmp)
        tmp *= 1.0 / math.sqrt(bias2)
        tmp += eps
        np.divide(m, tmp, out=tmp)
        tmp *= -lr / bias1
        param += tmp

    decayed = _scratch("adam_g", grad.shape, grad.dtype) if weight_decay and not decoupled else None
    _on_all_cores(update, param, grad, m, v, decayed, _scratch("adam_t", grad.shape, grad.dtype))


def rmsprop_update(param, grad, square_avg, grad_avg, momentum_buffer, lr, alpha, eps, weight_decay, momentum,
                   centered):
    """In-place RMSprop step with PyTorch's semantics (L2 decay, centered, momentum buffer)."""
    _contract.update(param, grad, _contract.rmsprop_state(momentum, centered), square_avg=square_avg,
                     grad_avg=grad_avg, momentum_buffer=momentum_buffer)
    record("rmsprop_update")
    kernels = _compiled(param.dtype)
    if kernels is not None and _all_c_contiguous(param, grad, square_avg, grad_avg, momentum_buffer):
        constants = _as_dtype(param.dtype, (-lr, alpha, 1.0 - alpha, eps, weight_decay, momentum))
        # the kernel never reads the buffers an option leaves unused; the square average stands in
        _on_all_cores(kernels.rmsprop_update, param, grad, square_avg,
                      square_avg if grad_avg is None else grad_avg,
                      square_avg if momentum_buffer is None else momentum_buffer, *constants, bool(centered),
                      min_elements=_COMPILED_PARALLEL_MIN_ELEMENTS)
        return

    def update(param, grad, square_avg, grad_avg, momentum_buffer, decayed, tmp):
        g = grad
        if weight_decay:
            np.multiply(param, weight_decay, out=decayed)
            decayed += grad
            g = decayed
        square_avg *= alpha
        np.multiply(g, 1.0 - alpha, out=tmp)
        tmp *= g
        square_avg += tmp
        if centered:
            grad_avg *= alpha
            np.multiply(g, 1.0 - alpha, out=tmp)
            grad_avg += tmp
            np.multiply(grad_avg, grad_avg, out=tmp)
            np.subtract(square_avg, tmp, out=tmp)
            np.sqrt(tmp, out=tmp)
        else:
            np.sqrt(square_avg, out=tmp)
        tmp += eps
        np.divide(g, tmp, out=tmp)
        if momentum:
            momentum_buffer *= momentum
            momentum_buffer += tmp
            np.multiply(momentum_buffer, -lr, out=tmp)
        else:
            tmp *= -lr
        param += tmp

    decayed = _scratch("rmsprop_g", grad.shape, grad.dtype) if weight_decay else None
    _on_all_cores(update, param, grad, square_avg, grad_avg, momentum_buffer, decayed,
                  _scratch("rmsprop_t", grad.shape, grad.dtype))
