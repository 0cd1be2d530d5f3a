"""Numba-CUDA backend: the kernel contract of ``gpubp.backends`` as ``numba.cuda.jit`` kernels.

The same fused kernels as the CuPy backend, written in Python and compiled by Numba to PTX.
Function names, argument order and layout follow ``numpy_backend.py`` so the two read side
by side. float32 only (``DTYPES``); shapes are row-major and C-contiguous, validated by the
layer API before anything here runs.

Arrays. Any ``__cuda_array_interface__`` array is accepted and results come back as the kind
given: CuPy arrays stay CuPy (allocated by CuPy, so a model can switch between the cupy and
numba kernel families without copies), Numba device arrays stay Numba device arrays (what the
CUDA simulator gives on a machine with no GPU). The helpers ``empty``/``zeros``/``asarray``
make CuPy arrays when CuPy is installed and a GPU is present, Numba device arrays otherwise.
Foreign arrays are viewed with ``cuda.as_cuda_array(sync=False)`` and each kernel is launched
on the stream their interface names (CuPy's current stream), so a launch never blocks the host.
Each kernel variant (per activation, per argument types) is compiled by Numba on first use,
about 1-3 s each, so the first training step of a model is slow and later ones are not.

Dense kernels: one tiled, register-blocked matmul shape shared by forward, dX and dW
    block tile   BLOCK_M x BLOCK_N = 64 x 64 outputs, K consumed in BLOCK_K = 16 slices
    threads      (TILE_THREADS_X, TILE_THREADS_Y) = (8, 8) = 64 per block
    register     THREAD_M x THREAD_N = 8 x 8 accumulators per thread, at rows ty + i*8 and
                 columns tx + j*8 of the block tile: per k, 16 shared loads feed 64 FMAs, and
                 a warp's stores for one (i, j) are 4 runs of 8 consecutive floats
    shared       two (BLOCK_K, 64 + SMEM_PAD) float32 slices, 8.25 KiB per block
    grid         (ceil(M / 64), ceil(N / 64)) for an (M, N) result: rows on grid.x, whose
                 limit is 2^31 - 1 blocks, so any batch fits (forward and dX put the batch
                 on M, as the CuPy backend does); columns on grid.y, limit 65535 blocks
    boundaries   out-of-range slice elements are loaded as 0 and never stored; every thread
                 runs every K slice and reaches every syncthreads, whatever the shape.
    Two warps per block trade occupancy for the 4:1 FMA-to-load ratio; at small layers
    (few 64 x 64 tiles) that leaves SMs idle, which the benchmarks should weigh. The
    accumulators stay in registers through the K loop; for sigmoid, gelu and gelu_tanh the
    compiler does not unroll the 64-element epilogue, so they pass once through local
    memory (L1) per tile, which is small next to the K loop once K is in the hundreds.

    dense_fwd   z = x @ w + b; y = act(z).    x (B, in), w (in, out), b (out,) -> y, z (B, out)
                bias + activation in the epilogue, one write of y (and of z for gelu and
                gelu_tanh only). One compiled kernel per activation (closure constants).
    dense_dw    dw = x.T @ dz (in, out), with dz = dy * act'(y or z) formed as each dz slice is
                loaded into shared memory (once per element per row tile of dw, ceil(in/64) in
                all); db = dz.sum(0) summed in registers from those same loads by the blocks of
                the first row tile,
                which also writes dz out once when dX follows.
    dense_dx    dx = dz @ w.T (B, in). After dW it reads that dz, so act' is not evaluated
                again; alone (need_dw=False) it forms dz as it loads, as dW does.
                A separate dz pass would read dy and y (or z) once more and add a launch;
                this way the fusion costs one write of dz, and only when both kernels run.
                backward_kernels() lists what dense_backward launches: dense_dw, dense_dx.

Other kernels
    softmax_fwd, softmax_bwd
                 row softmax in place and its Jacobian-vector product, one thread per row (the
                 softmax layer is the output layer, C is the class count); softmax layers run
                 dense_fwd / dense_dw / dense_dx as identity around them.
    ce_fwd_bwd   softmax cross-entropy, loss and gradient fused; a row per CE_LANES = 32
                 threads, CE_ROWS = 8 rows per block; online max/sum-exp in one read, the
                 gradient in a second read of the (cached) row. Mean over the batch.
    mse_fwd_bwd, bce_fwd_bwd, sumsq
                 grid-stride elementwise pass plus a shared-memory tree reduction per block
                 (REDUCE_THREADS); the per-block partial sums are added on the host in float64.
    sgd_update, adam_update, scale_
                 fused in-place elementwise updates, grid-stride (ELEMENTWISE_THREADS).
Every launch is recorded with ``gpubp.trace.record`` under the names above.

What the CUDA simulator (the test suite on machines with no GPU) does and does not check.
It runs every thread of these kernels in Python, so indexing, tiling, boundary handling,
the fusion and the numbers are verified against the NumPy backend. It does not compile
them: Numba's typing and float32-ness are checked separately by compiling every kernel with
NVVM for sm_90 (no GPU needed; the test skips where libNVVM is missing). Neither tells:
speed; memory coalescing and shared-memory bank conflicts; register pressure, spills and
occupancy on the device; races that the simulator's one-block-at-a-time, GIL-serialised
threads hide (a missing syncthreads can pass there); FMA contraction and the device's
erf/exp/tanh rounding; the grid-stride wrap of launches capped at *_MAX_BLOCKS (test
shapes are far below it); stream ordering with CuPy. Those need a GPU run (the gpu
tests, compute-sanitizer racecheck and the benchmarks).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os

import numpy as np
from numba import cuda
from numba.cuda.cudadrv.devicearray import is_cuda_ndarray

from gpubp.activations import GELU_SATURATION, GELU_TANH_A, GELU_TANH_C, LEAKY_SLOPE, NEEDS_Z
from gpubp.backends import INSTALL_HINT
from gpubp.trace import record

NAME = "numba"
DEVICE = "cuda"
DTYPES = (np.float32,)

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"

# Dense tiles (see the module docstring for the launch shape).
BLOCK_M = 64
BLOCK_N = 64
BLOCK_K = 16
THREAD_M = 8
THREAD_N = 8
TILE_THREADS_X = BLOCK_N // THREAD_N  # 8
TILE_THREADS_Y = BLOCK_M // THREAD_M  # 8
TILE_THREADS = TILE_THREADS_X * TILE_THREADS_Y  # 64
# A warp stores a transposed slice as 16 k-rows x 2 columns; a row stride of 64 + 2 words
# puts those 32 stores in 32 distinct banks.
SMEM_PAD = 2
TILE_STRIDE = BLOCK_M + SMEM_PAD
# A (64, BLOCK_K) slice stored transposed is loaded with thread tid on k = tid % 16 and rows
# tid // 16 + r * LOAD_COL_GROUPS, so consecutive threads read consecutive addresses.
LOAD_COL_GROUPS = TILE_THREADS // BLOCK_K  # 4

# A row-major (BLOCK_K, 64) slice is loaded one whole column per thread; that is what lets
# the dW kernel keep db as one register sum per thread.
assert TILE_THREADS == BLOCK_N
assert BLOCK_M == BLOCK_N, "one transposed loader serves both tile operands"
assert TILE_THREADS % BLOCK_K == 0 and BLOCK_M % LOAD_COL_GROUPS == 0

# Softmax cross-entropy: a row per CE_LANES threads, CE_ROWS rows per block.
CE_LANES = 32
CE_ROWS = 8

# Elementwise and reduction kernels.
ELEMENTWISE_THREADS = 256
ELEMENTWISE_MAX_BLOCKS = 1024
REDUCE_THREADS = 256
REDUCE_MAX_BLOCKS = 256

# Constants typed float32: a bare Python float would make Numba compute in float64.
_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)
_HALF = np.float32(0.5)
_NEG_HALF = np.float32(-0.5)
# The running max of a softmax row starts here rather than at -inf, so a -inf logit (a
# masked class) or a lane with no element never forms exp(-inf - -inf) = NaN (as in loss.cu).
_LOWEST = np.float32(np.finfo(np.float32).min)
_LEAKY_SLOPE = np.float32(LEAKY_SLOPE)
_INV_SQRT2 = np.float32(1.0 / math.sqrt(2.0))
_INV_SQRT_2PI = np.float32(1.0 / math.sqrt(2.0 * math.pi))
_GELU_TANH_C = np.float32(GELU_TANH_C)
_GELU_TANH_AC = np.float32(GELU_TANH_A * GELU_TANH_C)
_GELU_TANH_3AC = np.float32(3 * GELU_TANH_A * GELU_TANH_C)
_GELU_SATURATION = np.float32(GELU_SATURATION)


def unavailable_reason() -> str | None:
    """None if these kernels can run here (a CUDA GPU, or the CUDA simulator), else why not."""
    try:
        if importlib.util.find_spec("numba_cuda") is None:
            return f"numba-cuda is not installed; {INSTALL_HINT}"
        if cuda.is_available():
            return None
        error = cuda.cuda_error()
    except Exception as exc:  # a broken CUDA install must read as "unavailable", not crash
        error = exc
    detail = f" ({error})" if error else ""
    return (
        f"numba-cuda finds no usable CUDA GPU{detail} and the CUDA simulator is off; "
        "set NUMBA_ENABLE_CUDASIM=1 before importing numba to run these kernels on the CPU (slowly)"
    )


# ----------------------------------------------------------------------------- array helpers


@functools.cache
def _cupy():
    """The cupy module when CuPy is installed and the kernels run on a GPU (not the simulator), else None."""
    if SIMULATOR:
        return None
    try:
        import cupy
    except ImportError:
        return None
    return cupy


def _is_cupy(a) -> bool:
    return type(a).__module__.partition(".")[0] == "cupy"


def _view(a):
    """A Numba device-array view of ``a`` (no copy). ``sync=False``: we launch on its stream instead."""
    return a if is_cuda_ndarray(a) else cuda.as_cuda_array(a, sync=False)


def _new(shape, like, dtype=np.float32):
    """An uninitialised device array of the kind of ``like`` (CuPy for CuPy, else Numba)."""
    if _is_cupy(like):
        return _cupy().empty(shape, dtype)
    return cuda.device_array(shape, dtype)


_scratch_buffers: dict[tuple, object] = {}


def _scratch(tag: str, shape: tuple, like):
    """A float32 buffer private to one backend call, reused by the next call with the same shape.

    Reuse is safe because every kernel that touches it runs in stream order on one stream.
    """
    key = (tag, shape, _is_cupy(like))
    buf = _scratch_buffers.get(key)
    if buf is None:
        if len(_scratch_buffers) > 64:
            _scratch_buffers.clear()
        buf = _scratch_buffers[key] = _new(shape, like)
    return buf


def empty(shape, dtype=np.float32):
    cp = _cupy()
    return cp.empty(shape, dtype) if cp else cuda.device_array(shape, dtype)


def zeros(shape, dtype=np.float32):
    cp = _cupy()
    return cp.zeros(shape, dtype) if cp else cuda.to_device(np.zeros(shape, dtype))


def asarray(a, dtype=None):
    if is_array(a):
        if dtype is None or a.dtype == np.dtype(dtype):
            return a
        if _is_cupy(a):
            return a.astype(dtype)
        a = to_host(a)
    host = np.ascontiguousarray(a, dtype=dtype)
    cp = _cupy()
    return cp.asarray(host) if cp else cuda.to_device(host)


def to_host(a) -> np.ndarray:
    view = _view(a)
    host = view.copy_to_host()
    if view.stream:  # a CuPy stream: copy_to_host only queued the copy on it
        view.stream.synchronize()
    return host


def synchronize() -> None:
    cuda.synchronize()


def is_array(a) -> bool:
    return is_cuda_ndarray(a) or hasattr(a, "__cuda_array_interface__")


def sumsq(a) -> float:
    record("sumsq")
    flat = _view(a).ravel()
    blocks = _reduce_blocks(flat.size)
    block_sums = _new((blocks,), a)
    _sumsq_kernel[blocks, REDUCE_THREADS, flat.stream](flat, _view(block_sums))
    return float(to_host(block_sums).sum(dtype=np.float64))


def scale_(a, s: float) -> None:
    record("scale")
    flat = _view(a).ravel()
    _scale_kernel[_elementwise_blocks(flat.size), ELEMENTWISE_THREADS, flat.stream](flat, np.float32(s))


def _elementwise_blocks(n: int) -> int:
    return max(1, min(-(-n // ELEMENTWISE_THREADS), ELEMENTWISE_MAX_BLOCKS))


def _reduce_blocks(n: int) -> int:
    return max(1, min(-(-n // REDUCE_THREADS), REDUCE_MAX_BLOCKS))


@cuda.jit(device=True, inline="always")
def _block_sum(value, partials, tid):
    """Sum ``value`` over the block's REDUCE_THREADS threads through shared ``partials``.

    A tree without warp shuffles, so the CUDA simulator runs it; every thread calls it.
    """
    partials[tid] = value
    cuda.syncthreads()
    stride = REDUCE_THREADS // 2
    while stride > 0:
        if tid < stride:
            partials[tid] += partials[tid + stride]
        cuda.syncthreads()
        stride //= 2
    return partials[0]


@cuda.jit
def _sumsq_kernel(a, block_sums):
    """block_sums[blockIdx] = sum of a[i]^2 over the block's grid-stride share of a (n,)."""
    partials = cuda.shared.array(REDUCE_THREADS, np.float32)
    total = _ZERO
    for i in range(cuda.grid(1), a.size, cuda.gridsize(1)):
        total += a[i] * a[i]
    total = _block_sum(total, partials, cuda.threadIdx.x)
    if cuda.threadIdx.x == 0:
        block_sums[cuda.blockIdx.x] = total


@cuda.jit
def _scale_kernel(a, s):
    """a *= s in place, a (n,)."""
    for i in range(cuda.grid(1), a.size, cuda.gridsize(1)):
        a[i] *= s


# ----------------------------------------------------------------------------- activations
# act(z) and act'(.) on one float32 element, as device functions. Each derivative takes what
# activations.py says it is computed from: y for relu..tanh, z for gelu and gelu_tanh.
# The operation order mirrors activations.py so results agree to float32 rounding.


@cuda.jit(device=True, inline="always")
def _sigmoid(z):
    # exp of a non-positive number only: no overflow at |z| = 1e4.
    if z >= _ZERO:
        return _ONE / (_ONE + math.exp(-z))
    e = math.exp(z)
    return e / (_ONE + e)


@cuda.jit(device=True, inline="always")
def _identity(z):
    return z


@cuda.jit(device=True, inline="always")
def _relu(z):
    return z if z > _ZERO else _ZERO


@cuda.jit(device=True, inline="always")
def _leaky_relu(z):
    return z if z > _ZERO else z * _LEAKY_SLOPE


@cuda.jit(device=True, inline="always")
def _tanh(z):
    return math.tanh(z)


@cuda.jit(device=True, inline="always")
def _saturate(z):
    """z clamped to [-GELU_SATURATION, GELU_SATURATION] (see activations.py); NaN stays NaN."""
    if z > _GELU_SATURATION:
        return _GELU_SATURATION
    if z < -_GELU_SATURATION:
        return -_GELU_SATURATION
    return z


@cuda.jit(device=True, inline="always")
def _gelu(z):
    return (math.erf(z * _INV_SQRT2) + _ONE) * _HALF * z


@cuda.jit(device=True, inline="always")
def _gelu_tanh(z):
    clamped = _saturate(z)
    u = (clamped * clamped * _GELU_TANH_AC + _GELU_TANH_C) * clamped
    return (math.tanh(u) + _ONE) * _HALF * z


@cuda.jit(device=True, inline="always")
def _relu_grad(y):
    return _ONE if y > _ZERO else _ZERO


@cuda.jit(device=True, inline="always")
def _leaky_relu_grad(y):
    return _ONE if y > _ZERO else _LEAKY_SLOPE


@cuda.jit(device=True, inline="always")
def _sigmoid_grad(y):
    return (_ONE - y) * y


@cuda.jit(device=True, inline="always")
def _tanh_grad(y):
    return _ONE - y * y


@cuda.jit(device=True, inline="always")
def _gelu_grad(z):
    # Phi(z) + z phi(z)
    z = _saturate(z)
    density = math.exp(z * z * _NEG_HALF) * z * _INV_SQRT_2PI
    return density + (math.erf(z * _INV_SQRT2) + _ONE) * _HALF


@cuda.jit(device=True, inline="always")
def _gelu_tanh_grad(z):
    # 0.5 (1 + t) + 0.5 z (1 - t^2) c (1 + 3 a z^2), t = tanh(c (z + a z^3))
    z = _saturate(z)
    z2 = z * z
    t = math.tanh((z2 * _GELU_TANH_AC + _GELU_TANH_C) * z)
    du = (z2 * _GELU_TANH_3AC + _GELU_TANH_C) * z * (_ONE - t * t) * _HALF
    return du + (t + _ONE) * _HALF


_FORWARD = {
    "identity": _identity, "relu": _relu, "leaky_relu": _leaky_relu, "sigmoid": _sigmoid,
    "tanh": _tanh, "gelu": _gelu, "gelu_tanh": _gelu_tanh,
}
# identity has no entry: its kernels read dy as dz and never call a derivative.
_GRAD = {
    "relu": _relu_grad, "leaky_relu": _leaky_relu_grad, "sigmoid": _sigmoid_grad,
    "tanh": _tanh_grad, "gelu": _gelu_grad, "gelu_tanh": _gelu_tanh_grad,
}


# ----------------------------------------------------------------------------- dense tiles


@cuda.jit(device=True, inline="always")
def _load_tile(tile, src, row0, col0, tid):
    """tile[k, c] = src[row0 + k, col0 + c] for a (BLOCK_K, BLOCK_N) slice, 0 outside src."""
    c = tid  # one column per thread: a warp reads 32 consecutive floats of a row
    for k in range(BLOCK_K):
        value = _ZERO
        if row0 + k < src.shape[0] and col0 + c < src.shape[1]:
            value = src[row0 + k, col0 + c]
        tile[k, c] = value


@cuda.jit(device=True, inline="always")
def _load_tile_transposed(tile, src, row0, col0, tid):
    """tile[k, m] = src[row0 + m, col0 + k] for a (BLOCK_M, BLOCK_K) slice, 0 outside src."""
    k = tid % BLOCK_K
    for r in range(BLOCK_M // LOAD_COL_GROUPS):
        m = tid // BLOCK_K + r * LOAD_COL_GROUPS
        value = _ZERO
        if row0 + m < src.shape[0] and col0 + k < src.shape[1]:
            value = src[row0 + m, col0 + k]
        tile[k, m] = value


@cuda.jit(device=True, inline="always")
def _multiply_tiles(a_tile, b_tile, acc, tx, ty):
    """acc[i, j] += sum_k a_tile[k, ty + i*8] * b_tile[k, tx + j*8]: the 8 x 8 register tile."""
    a_frag = cuda.local.array(THREAD_M, np.float32)
    b_frag = cuda.local.array(THREAD_N, np.float32)
    for k in range(BLOCK_K):
        for i in range(THREAD_M):
            a_frag[i] = a_tile[k, ty + i * TILE_THREADS_Y]
        for j in range(THREAD_N):
            b_frag[j] = b_tile[k, tx + j * TILE_THREADS_X]
        for i in range(THREAD_M):
            for j in range(THREAD_N):
                acc[i, j] += a_frag[i] * b_frag[j]


@cuda.jit(device=True, inline="always")
def _zero_accumulators(acc):
    for i in range(THREAD_M):
        for j in range(THREAD_N):
            acc[i, j] = _ZERO


@cuda.jit(device=True, inline="always")
def _store_tile(out, acc, row0, col0, tx, ty):
    """out[row0 + ty + i*8, col0 + tx + j*8] = acc[i, j] where inside out."""
    for j in range(THREAD_N):
        col = col0 + tx + j * TILE_THREADS_X
        if col < out.shape[1]:
            for i in range(THREAD_M):
                row = row0 + ty + i * TILE_THREADS_Y
                if row < out.shape[0]:
                    out[row, col] = acc[i, j]


def tile_grid(rows: int, cols: int) -> tuple[int, int]:
    """The dense kernels' grid for a (rows, cols) result: row tiles on x, column tiles on y."""
    return (-(-rows // BLOCK_M), -(-cols // BLOCK_N))


_TILE_BLOCK = (TILE_THREADS_X, TILE_THREADS_Y)


@functools.cache
def _dense_forward_kernel(act: str):
    """The fused forward kernel for ``act``: its act() and whether it stores z are compile-time."""
    activate = _FORWARD[act]
    store_z = act in NEEDS_Z

    @cuda.jit
    def dense_forward_kernel(x, w, b, y, z):
        """y = act(x @ w + b), and z = x @ w + b when store_z (else z is y and never written)."""
        a_tile = cuda.shared.array((BLOCK_K, TILE_STRIDE), np.float32)
        b_tile = cuda.shared.array((BLOCK_K, TILE_STRIDE), np.float32)
        acc = cuda.local.array((THREAD_M, THREAD_N), np.float32)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        tid = ty * TILE_THREADS_X + tx
        row0 = cuda.blockIdx.x * BLOCK_M
        col0 = cuda.blockIdx.y * BLOCK_N
        _zero_accumulators(acc)
        for k0 in range(0, x.shape[1], BLOCK_K):
            _load_tile_transposed(a_tile, x, row0, k0, tid)
            _load_tile(b_tile, w, k0, col0, tid)
            cuda.syncthreads()
            _multiply_tiles(a_tile, b_tile, acc, tx, ty)
            cuda.syncthreads()
        for j in range(THREAD_N):
            col = col0 + tx + j * TILE_THREADS_X
            if col < y.shape[1]:
                bias = b[col]
                for i in range(THREAD_M):
                    row = row0 + ty + i * TILE_THREADS_Y
                    if row < y.shape[0]:
                        pre = acc[i, j] + bias
                        y[row, col] = activate(pre)
                        if store_z:
                            z[row, col] = pre

    return dense_forward_kernel


@functools.cache
def _dense_dw_kernel(act: str, store_dz: bool):
    """dW/db kernel for ``act``; with ``store_dz`` it also writes dz for the dX kernel."""
    grad = _GRAD.get(act)
    scale_by_grad = grad is not None
    if not scale_by_grad:
        grad = _identity  # never called: keeps the closure typed for Numba

    @cuda.jit(device=True, inline="always")
    def load_dz_tile(tile, dy, act_in, row0, col0, tid, dz_out, store):
        """tile[k, c] = dz[row0 + k, col0 + c], dz = dy * act'(act_in); returns the sum of this
        thread's column c = tid of the slice, for db; writes dz to dz_out when ``store``."""
        c = tid
        column_sum = _ZERO
        for k in range(BLOCK_K):
            value = _ZERO
            if row0 + k < dy.shape[0] and col0 + c < dy.shape[1]:
                value = dy[row0 + k, col0 + c]
                if scale_by_grad:
                    value *= grad(act_in[row0 + k, col0 + c])
                if store:
                    dz_out[row0 + k, col0 + c] = value
            tile[k, c] = value
            column_sum += value
        return column_sum

    @cuda.jit
    def dense_dw_kernel(x, dy, act_in, dw, db, dz_out):
        """dw = x.T @ dz, db = dz.sum(0), dz = dy * act'(act_in); x (B, in), dy (B, out).

        Grid (ceil(in/64), ceil(out/64)); K runs over the batch. Every block forms the dz
        tiles it needs; the blocks with blockIdx.x == 0 see every dz element exactly once,
        so they alone write db (and dz when store_dz). Thread tid loads column col0 + tid of
        every dz slice, so its running sum over the K loop is db[col0 + tid].
        """
        a_tile = cuda.shared.array((BLOCK_K, TILE_STRIDE), np.float32)
        b_tile = cuda.shared.array((BLOCK_K, TILE_STRIDE), np.float32)
        acc = cuda.local.array((THREAD_M, THREAD_N), np.float32)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        tid = ty * TILE_THREADS_X + tx
        row0 = cuda.blockIdx.x * BLOCK_M
        col0 = cuda.blockIdx.y * BLOCK_N
        first_row_tile = cuda.blockIdx.x == 0
        column_sum = _ZERO
        _zero_accumulators(acc)
        for k0 in range(0, x.shape[0], BLOCK_K):
            _load_tile(a_tile, x, k0, row0, tid)
            column_sum += load_dz_tile(b_tile, dy, act_in, k0, col0, tid, dz_out, store_dz and first_row_tile)
            cuda.syncthreads()
            _multiply_tiles(a_tile, b_tile, acc, tx, ty)
            cuda.syncthreads()
        _store_tile(dw, acc, row0, col0, tx, ty)
        if first_row_tile and col0 + tid < db.shape[0]:
            db[col0 + tid] = column_sum

    return dense_dw_kernel


@functools.cache
def _dense_dx_kernel(act: str):
    """dX kernel; ``act="identity"`` reads its first argument as dz (dy, or dz the dW kernel wrote)."""
    grad = _GRAD.get(act)
    scale_by_grad = grad is not None
    if not scale_by_grad:
        grad = _identity  # never called: keeps the closure typed for Numba

    @cuda.jit(device=True, inline="always")
    def load_dz_tile_transposed(tile, dy, act_in, row0, col0, tid):
        """tile[k, m] = dz[row0 + m, col0 + k], dz = dy * act'(act_in), 0 outside dy."""
        k = tid % BLOCK_K
        for r in range(BLOCK_M // LOAD_COL_GROUPS):
            m = tid // BLOCK_K + r * LOAD_COL_GROUPS
            value = _ZERO
            if row0 + m < dy.shape[0] and col0 + k < dy.shape[1]:
                value = dy[row0 + m, col0 + k]
                if scale_by_grad:
                    value *= grad(act_in[row0 + m, col0 + k])
            tile[k, m] = value

    @cuda.jit
    def dense_dx_kernel(dy, act_in, w, dx):
        """dx = dz @ w.T, dz = dy * act'(act_in); dy (B, out), w (in, out) -> dx (B, in).

        Grid (ceil(B/64), ceil(in/64)); K runs over out. w is read along its rows (k), so
        both operands load with consecutive threads on consecutive addresses.
        """
        a_tile = cuda.shared.array((BLOCK_K, TILE_STRIDE), np.float32)
        b_tile = cuda.shared.array((BLOCK_K, TILE_STRIDE), np.float32)
        acc = cuda.local.array((THREAD_M, THREAD_N), np.float32)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        tid = ty * TILE_THREADS_X + tx
        row0 = cuda.blockIdx.x * BLOCK_M
        col0 = cuda.blockIdx.y * BLOCK_N
        _zero_accumulators(acc)
        for k0 in range(0, dy.shape[1], BLOCK_K):
            load_dz_tile_transposed(a_tile, dy, act_in, row0, k0, tid)
            _load_tile_transposed(b_tile, w, col0, k0, tid)
            cuda.syncthreads()
            _multiply_tiles(a_tile, b_tile, acc, tx, ty)
            cuda.syncthreads()
        _store_tile(dx, acc, row0, col0, tx, ty)

    return dense_dx_kernel


# ----------------------------------------------------------------------------- dense layer


def dense_precisions() -> tuple[str, ...]:
    """No tensor-core kernels: "tf32" computes fp32 here."""
    return ("fp32", "tf32")


def dense_forward(x, w, b, act, out=None, out_z=None, precision="fp32"):
    """``z = x @ w + b; y = act(z)``: x (B, in), w (in, out), b (out,) -> y (B, out), z or None.
    No tensor cores here: fp32 (or float64) for either ``precision``."""
    record("dense_fwd")
    batch, out_features = x.shape[0], w.shape[1]
    y = out if out is not None else _new((batch, out_features), x)
    z = None
    if act in NEEDS_Z:
        z = out_z if out_z is not None else _new((batch, out_features), x)
    xv, yv = _view(x), _view(y)
    kernel = _dense_forward_kernel("identity" if act == "softmax" else act)
    kernel[tile_grid(batch, out_features), _TILE_BLOCK, xv.stream](
        xv, _view(w), _view(b), yv, yv if z is None else _view(z)
    )
    if act == "softmax":
        softmax_(y)
    return y, z


def backward_kernels(act, need_dx, need_dw) -> list[str]:
    softmax = ["softmax_bwd"] if act == "softmax" and (need_dx or need_dw) else []
    return softmax + (["dense_dw"] if need_dw else []) + (["dense_dx"] if need_dx else [])


def dense_backward(dy, x, w, y, z, act, need_dx, need_dw, out_dx=None, out_dw=None, out_db=None,
                   precision="fp32"):
    """Gradients of ``y = act(x @ w + b)``; skips dW/db when ``need_dw`` is False, dX when ``need_dx`` is."""
    if not (need_dx or need_dw):
        return None, None, None
    if act == "softmax":
        dy = softmax_backward(dy, y, _scratch("softmax_dz", tuple(dy.shape), dy))
        act = "identity"
    dyv = _view(dy)
    act_in = dyv if act == "identity" else _view(z if act in NEEDS_Z else y)
    dx = dw = db = None
    dz_source, dz_act = dyv, act
    if need_dw:
        record("dense_dw")
        in_features, out_features = w.shape
        dw = out_dw if out_dw is not None else _new((in_features, out_features), dy)
        db = out_db if out_db is not None else _new((out_features,), dy)
        # When dX follows, this kernel writes dz once and dX reads it instead of recomputing act'.
        store_dz = need_dx and act != "identity"
        dz_out = _view(_scratch("dz", tuple(dy.shape), dy)) if store_dz else dyv
        kernel = _dense_dw_kernel(act, store_dz)
        kernel[tile_grid(in_features, out_features), _TILE_BLOCK, dyv.stream](
            _view(x), dyv, act_in, _view(dw), _view(db), dz_out
        )
        if store_dz:
            dz_source, dz_act = dz_out, "identity"
    if need_dx:
        record("dense_dx")
        batch, in_features = dy.shape[0], w.shape[0]
        dx = out_dx if out_dx is not None else _new((batch, in_features), dy)
        kernel = _dense_dx_kernel(dz_act)
        kernel[tile_grid(batch, in_features), _TILE_BLOCK, dyv.stream](
            dz_source, dz_source if dz_act == "identity" else act_in, _view(w), _view(dx)
        )
    return dx, dw, db


@cuda.jit
def _softmax_kernel(y):
    """In place, one thread per row of y (B, C): y[r] = exp(y[r] - max(y[r])) / sum."""
    row = cuda.grid(1)
    if row < y.shape[0]:
        classes = y.shape[1]
        row_max = y[row, 0]
        for c in range(1, classes):
            row_max = max(row_max, y[row, c])
        total = _ZERO
        for c in range(classes):
            e = math.exp(y[row, c] - row_max)
            y[row, c] = e
            total += e
        inv_total = _ONE / total
        for c in range(classes):
            y[row, c] *= inv_total


@cuda.jit
def _softmax_backward_kernel(dy, y, out):
    """One thread per row: out[r] = y[r] * (dy[r] - <dy[r], y[r]>); out may be dy (each row reads before it writes)."""
    row = cuda.grid(1)
    if row < y.shape[0]:
        classes = y.shape[1]
        dot = _ZERO
        for c in range(classes):
            dot += dy[row, c] * y[row, c]
        for c in range(classes):
            out[row, c] = y[row, c] * (dy[row, c] - dot)


def _row_blocks(rows: int) -> int:
    return -(-rows // ELEMENTWISE_THREADS)


def softmax_(y):
    """Row softmax of y (B, C) in place. A thread per row: softmax heads are narrow (C is the class count)."""
    record("softmax_fwd")
    yv = _view(y)
    _softmax_kernel[_row_blocks(yv.shape[0]), ELEMENTWISE_THREADS, yv.stream](yv)


def softmax_backward(dy, y, out):
    """``out = y * (dy - sum(dy * y, axis=1))``: the softmax Jacobian-vector product; ``out`` may be ``dy``."""
    record("softmax_bwd")
    yv = _view(y)
    _softmax_backward_kernel[_row_blocks(yv.shape[0]), ELEMENTWISE_THREADS, yv.stream](_view(dy), yv, _view(out))
    return out


# ----------------------------------------------------------------------------- losses


@cuda.jit(device=True, inline="always")
def _row_weight(weights, row):
    """Row ``row``'s weight: ``weights`` is (B,), or (1,) holding the 1 of an unweighted loss."""
    return weights[0] if weights.shape[0] == 1 else weights[row]

_UNIT_WEIGHT: list = []  # the (1,) device array holding 1.0, made on first use


def _weights(sample_weight):
    """The loss kernels' weights: ``sample_weight`` (B,) or, without weights, one shared 1."""
    if sample_weight is not None:
        return _view(sample_weight)
    if not _UNIT_WEIGHT:
        _UNIT_WEIGHT.append(cuda.to_device(np.ones(1, np.float32)))
    return _UNIT_WEIGHT[0]


@cuda.jit
def _softmax_cross_entropy_kernel(logits, labels, weights, grad, row_loss, inv_batch):
    """Per row r of logits (B, C) with weight w_r: row_loss[r] = w_r (logsumexp(x_r) - x_r[label_r]),
    grad[r] = (softmax(x_r) - onehot(label_r)) * w_r * inv_batch.

    Block (CE_LANES, CE_ROWS): lane tx of row ty keeps a running (max, sum of exp) over
    columns tx, tx + 32, ...; a shared-memory tree merges the lanes; then the row is read
    again to write the gradient. Rows past B join every barrier but load and store nothing.
    """
    row_max = cuda.shared.array((CE_ROWS, CE_LANES), np.float32)
    row_sum = cuda.shared.array((CE_ROWS, CE_LANES), np.float32)
    lane = cuda.threadIdx.x
    local_row = cuda.threadIdx.y
    row = cuda.blockIdx.x * CE_ROWS + local_row
    classes = logits.shape[1]
    in_batch = row < logits.shape[0]
    running_max = _LOWEST
    running_sum = _ZERO
    if in_batch:
        for c in range(lane, classes, CE_LANES):
            v = logits[row, c]
            if v > running_max:
                running_sum = running_sum * math.exp(running_max - v) + _ONE
                running_max = v
            else:
                running_sum += math.exp(v - running_max)
    row_max[local_row, lane] = running_max
    row_sum[local_row, lane] = running_sum
    cuda.syncthreads()
    stride = CE_LANES // 2
    while stride > 0:
        if lane < stride:
            m1 = row_max[local_row, lane]
            m2 = row_max[local_row, lane + stride]
            s2 = row_sum[local_row, lane + stride]
            # An empty lane has sum 0; skipping it keeps the merge exact.
            if m2 > m1:
                row_sum[local_row, lane] = row_sum[local_row, lane] * math.exp(m1 - m2) + s2
                row_max[local_row, lane] = m2
            elif s2 > _ZERO:
                row_sum[local_row, lane] += s2 * math.exp(m2 - m1)
        cuda.syncthreads()
        stride //= 2
    if in_batch:
        m = row_max[local_row, 0]
        total = row_sum[local_row, 0]
        label = labels[row]
        weight = _row_weight(weights, row)
        scale = inv_batch * weight
        for c in range(lane, classes, CE_LANES):
            p = math.exp(logits[row, c] - m) / total
            if c == label:
                p -= _ONE
            grad[row, c] = p * scale
        if lane == 0:
            row_loss[row] = (math.log(total) - (logits[row, label] - m)) * weight


@cuda.jit
def _mse_kernel(pred, target, weights, width, grad, block_sums, grad_scale):
    """With w the weight of element i's row (of ``width`` elements): grad = w (pred - target) * 2/n;
    block_sums[blockIdx] = the block's sum of w (pred - target)^2."""
    partials = cuda.shared.array(REDUCE_THREADS, np.float32)
    total = _ZERO
    for i in range(cuda.grid(1), pred.size, cuda.gridsize(1)):
        diff = pred[i] - target[i]
        weighted = diff * _row_weight(weights, i // width)
        total += weighted * diff
        grad[i] = weighted * grad_scale
    total = _block_sum(total, partials, cuda.threadIdx.x)
    if cuda.threadIdx.x == 0:
        block_sums[cuda.blockIdx.x] = total


@cuda.jit
def _bce_kernel(logits, target, weights, width, grad, block_sums, grad_scale):
    """Per element, with w its row's weight: loss = w (max(z, 0) - z t + log1p(exp(-|z|))),
    grad = w (sigmoid(z) - t) / n."""
    partials = cuda.shared.array(REDUCE_THREADS, np.float32)
    total = _ZERO
    for i in range(cuda.grid(1), logits.size, cuda.gridsize(1)):
        z = logits[i]
        t = target[i]
        weight = _row_weight(weights, i // width)
        total += (math.log1p(math.exp(-abs(z))) + max(z, _ZERO) - z * t) * weight
        grad[i] = (_sigmoid(z) - t) * grad_scale * weight
    total = _block_sum(total, partials, cuda.threadIdx.x)
    if cuda.threadIdx.x == 0:
        block_sums[cuda.blockIdx.x] = total


def softmax_cross_entropy(logits, labels, sample_weight=None):
    """Mean softmax cross-entropy over the batch; logits (B, C), labels (B,) ints in [0, C);
    ``sample_weight`` (B,) weights each row's loss (summed over B, Keras's rule)."""
    record("ce_fwd_bwd")
    batch = logits.shape[0]
    grad = _new(tuple(logits.shape), logits)
    row_loss = _new((batch,), logits)
    lv = _view(logits)
    blocks = -(-batch // CE_ROWS)
    _softmax_cross_entropy_kernel[blocks, (CE_LANES, CE_ROWS), lv.stream](
        lv, _view(labels), _weights(sample_weight), _view(grad), _view(row_loss), np.float32(1.0 / batch)
    )
    return float(to_host(row_loss).sum(dtype=np.float64)) / batch, grad


def _elementwise_loss(kernel, pred, target, sample_weight, grad_scale_times_n):
    """Launch a (pred, target, row weights) -> (block sums, grad) loss kernel; return (mean loss, grad)."""
    grad = _new(tuple(pred.shape), pred)
    flat = _view(pred).ravel()
    n = flat.size
    blocks = _reduce_blocks(n)
    block_sums = _new((blocks,), pred)
    kernel[blocks, REDUCE_THREADS, flat.stream](
        flat, _view(target).ravel(), _weights(sample_weight), np.int64(pred.shape[1]), _view(grad).ravel(),
        _view(block_sums), np.float32(grad_scale_times_n / n)
    )
    return float(to_host(block_sums).sum(dtype=np.float64)) / n, grad


def mse(pred, target, sample_weight=None):
    """Mean squared error over all elements; ``sample_weight`` (B,) weights each row's errors."""
    record("mse_fwd_bwd")
    return _elementwise_loss(_mse_kernel, pred, target, sample_weight, 2.0)


def bce(logits, target, sample_weight=None):
    """Binary cross-entropy on logits, mean over all elements: max(z,0) - z t + log1p(exp(-|z|));
    ``sample_weight`` (B,) weights each row's terms."""
    record("bce_fwd_bwd")
    return _elementwise_loss(_bce_kernel, logits, target, sample_weight, 1.0)


# ----------------------------------------------------------------------------- optimizers


@cuda.jit
def _sgd_kernel(param, grad, neg_lr, weight_decay):
    """param += neg_lr * (grad + weight_decay * param), all (n,)."""
    for i in range(cuda.grid(1), param.size, cuda.gridsize(1)):
        p = param[i]
        param[i] = p + (p * weight_decay + grad[i]) * neg_lr


@cuda.jit
def _sgd_momentum_kernel(param, grad, velocity, neg_lr, momentum, nesterov, weight_decay):
    """g = grad + wd p; v = momentum v + g; param += neg_lr * (g + momentum v if nesterov else v)."""
    for i in range(cuda.grid(1), param.size, cuda.gridsize(1)):
        p = param[i]
        g = p * weight_decay + grad[i]
        v = velocity[i] * momentum + g
        velocity[i] = v
        step = v * momentum + g if nesterov else v
        param[i] = p + step * neg_lr


def sgd_update(param, grad, velocity, lr, momentum, nesterov, weight_decay):
    """In-place SGD step with PyTorch's semantics (momentum buffer, Nesterov, L2 decay)."""
    record("sgd_update")
    p = _view(param).ravel()
    g = _view(grad).ravel()
    launch = (_elementwise_blocks(p.size), ELEMENTWISE_THREADS, p.stream)
    # weight_decay 0 leaves g = 0 * p + grad = grad exactly, so one kernel serves both cases.
    if momentum:
        _sgd_momentum_kernel[launch](
            p, g, _view(velocity).ravel(), np.float32(-lr), np.float32(momentum), bool(nesterov),
            np.float32(weight_decay),
        )
    else:
        _sgd_kernel[launch](p, g, np.float32(-lr), np.float32(weight_decay))


@cuda.jit
def _adam_kernel(param, grad, m, v, decay, l2, beta1, one_minus_beta1, beta2, one_minus_beta2,
                 inv_sqrt_bias2, eps, step_scale):
    """p *= decay; g = grad + l2 p; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
    p += step_scale * m / (sqrt(v) / sqrt(1 - b2^t) + eps), step_scale = -lr / (1 - b1^t)."""
    for i in range(cuda.grid(1), param.size, cuda.gridsize(1)):
        p = param[i] * decay
        g = p * l2 + grad[i]
        mi = m[i] * beta1 + g * one_minus_beta1
        vi = v[i] * beta2 + g * g * one_minus_beta2
        m[i] = mi
        v[i] = vi
        param[i] = p + mi / (math.sqrt(vi) * inv_sqrt_bias2 + eps) * step_scale


def adam_update(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step, decoupled):
    """In-place Adam (``decoupled=False``) or AdamW step with PyTorch's semantics."""
    record("adam_update")
    p = _view(param).ravel()
    # AdamW decays the weights (decay < 1, l2 = 0); Adam adds wd * p to the gradient
    # (decay = 1, l2 = wd). Multiplying by 1 and adding 0 * p are exact, so one kernel serves all.
    decay = 1.0 - lr * weight_decay if decoupled else 1.0
    l2 = 0.0 if decoupled else weight_decay
    f32 = np.float32
    _adam_kernel[_elementwise_blocks(p.size), ELEMENTWISE_THREADS, p.stream](
        p, _view(grad).ravel(), _view(m).ravel(), _view(v).ravel(), f32(decay), f32(l2),
        f32(beta1), f32(1.0 - beta1), f32(beta2), f32(1.0 - beta2),
        f32(1.0 / math.sqrt(1.0 - beta2**step)), f32(eps), f32(-lr / (1.0 - beta1**step)),
    )
