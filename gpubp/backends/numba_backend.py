"""Numba-CUDA backend: the kernel contract of ``gpubp.backends`` as ``numba.cuda.jit`` kernels.

The same contract as the CuPy backend, written in Python and compiled by Numba to PTX.
Function names, argument order and layout follow ``numpy_backend.py`` so the two read side
by side. float32 only (``DTYPES``); shapes are row-major, validated by the layer API before
anything here runs. The kernels take C-contiguous arrays: a read-only input of other strides (a
user's ``a[:, ::2]``, which the layer API and the losses pass on as given) is copied to a
C-contiguous array of its kind first (``_contiguous``; no copy when it is one), as the CuPy
backend's ``_f32`` does; an in-place operand (a parameter, optimizer state, an ``out`` buffer:
the backend's own arrays) that is not a C-contiguous float32 device array is refused with a
ValueError naming it, as the CuPy backend refuses one.

Arrays. Any ``__cuda_array_interface__`` array is accepted and results come back as the kind
given: CuPy arrays stay CuPy (allocated by CuPy on the array's device, so a model can switch
between the cupy and numba kernel families without copies), Numba device arrays stay Numba
device arrays (what the CUDA simulator gives on a machine with no GPU). The helpers
``empty``/``zeros``/``asarray`` make CuPy arrays when CuPy is installed and a GPU is present,
Numba device arrays otherwise. Foreign arrays are viewed with ``cuda.as_cuda_array(sync=False)``
and each kernel is launched on the stream their interface names (CuPy's current stream), so a
launch never blocks the host. Scratch buffers (dz, dW partials, split tickets, block sums) are
kept per device and per stream, so two devices or two streams never share one. Each kernel
variant is compiled by Numba on first use, so the first training step of a model waits and
later ones do not: to PTX, a dense GEMM kernel takes 1 to 3 s of one core of a 2-core VM, the
others well under 1 s (the seven kernels of a relu MLP's Adam step with cross-entropy, 6 s;
``_inlined`` says why not four times that). ``kernel_variants()`` lists every variant.

Dense kernels: one tiled, register-blocked fp32 GEMM main loop shared by forward, dX and dW
    block tile   BLOCK_M x BLOCK_N = 128 x 128 outputs, K consumed in BLOCK_K = 8 slices,
                 TILE_THREADS = 256 threads, launch bounds for 2 blocks per SM (<= 128 registers)
    warp tile    32 x 64 outputs; 4 x 2 warps per block, 4 x 8 lanes per warp
    thread tile  8 x 8 accumulators in registers: rows r, r+1, r+2, r+3 and r+16..r+19, columns
                 c..c+3 and c+32..c+35. Per k the thread reads two runs of 4 floats of A and two
                 of B from shared memory (four 16-byte loads) and issues 64 FMAs; the 8 lanes of
                 a warp along N read 128 contiguous bytes, the 4 along M a broadcast each.
    shared       A and B slices stored k-major, tile[k][o], rows padded to TILE_STRIDE = 132
                 floats (16-byte aligned rows; transposing stores hit distinct banks); two stages
                 of both, 16.5 KiB per block. One flat array, read at per-thread offsets computed
                 once plus constants, indexed unsigned so Numba adds no negative-index wraparound.
    pipeline     the next K slice is loaded from global memory into registers before the FMAs on
                 the current one and stored to the other stage after them: one barrier per slice.
    operands     an operand is read "k-major" (its rows run along k: x in forward, dz in dX and
                 w in dX, each thread loading 4 consecutive k of one row) or "outer-major" (its
                 rows are k: w in forward, x and dz in dW, each thread loading 4 floats 32 apart
                 of one row, a warp 128 contiguous bytes). Elements past k_end load as 0; rows
                 or columns past the result's edge load as 0 and their outputs are never stored.
    grid         tile_grid(): the larger of (row tiles, column tiles) on grid.x (limit 2^31 - 1),
                 the smaller on grid.y (limit 65535); the kernels take which one is on x.

    dense_fwd   z = x @ w + b; y = act(z).    x (B, in), w (in, out), b (out,) -> y, z (B, out)
                bias + activation in the epilogue (_forward_epilogue), one write of y (and of z
                for gelu, gelu_tanh and silu only); sigmoid, gelu, gelu_tanh and silu store z (or
                y) first and apply act() to what they read back, as 64 inlined copies of them
                would push the accumulators out of registers. One compiled kernel for every
                activation: it takes the activation's ACT_ID and branches once, uniformly, after
                the main loop to the epilogue compiled for it (_by_act_id), so the
                main loop is compiled once, not once per activation.
    dense_dz    dz = dy * act'(y or z), elementwise (_dz_prologue), once per dz element, before
                the gradient GEMMs; they then read dz as a plain operand whatever the activation,
                so act' (erf and exp for gelu) never sits in a GEMM loop nor runs once per tile.
                Identity layers skip it (dz is dy); softmax layers run softmax_bwd instead.
    dense_dw    dw = x.T @ dz (in, out), db = dz.sum(0), the batch split over grid.z when the
                tiles alone leave SMs idle (dw_splits: SPLIT_WAVES blocks per SM). Split s covers
                batch rows [s rows_per_split, (s+1) rows_per_split), writes its partial dW tile
                and, in the first row of tiles, its partial db. The splits come in groups of
                consecutive ones (dw_split_group: at most MAX_GROUP_SPLITS each); the last split
                of a group to finish (a ticket per tile and group) sums its group's partials in
                split order, and the last group of a tile to finish (a ticket per tile) sums the
                group sums in group order; with one group the first sum is the result. Either
                way the result depends on the split count and group size only, both fixed by the
                shapes and the SM count, and is the same from run to run.
    dense_db    db = dz.sum(0) alone, for a bias that trains under a frozen weight (dense_dw
                sums db otherwise): a block per 32 columns of a split of the batch (db_splits
                splits it until the blocks fill the GPU), 8 row groups of a warp each, their
                sums added in group order; with several splits the same kernel then adds the
                splits' sums in split order.
    dense_dx    dx = dz @ w.T (B, in); or, given the activation of the dense layer below (the
                FOLDS_DX_ACT capability: every activation), dx * act'(that layer's y, or z) in
                the epilogue (_dx_epilogue), which is that layer's dz: its own dense_dz pass is
                then not launched. An act' of y (identity, relu, leaky_relu, sigmoid, tanh) is
                applied in registers; an act' of z (gelu, gelu_tanh, silu) in a second pass over
                the thread's own stores. Two compiled kernels, one per kind, each taking the
                activation at launch as the forward does.
                backward_kernels() lists what dense_backward launches.

Dropout (``gpubp.philox``: Philox4x32-10, the mask never stored)
    dense_fwd   with a mask (``dropout=``): a second epilogue pass over the thread's own stores
                (no barrier: each thread reads what it wrote) keeps y * scale or writes 0, one
                Philox call per row and run of 4 columns (a run starts at a multiple of 4, so
                its 4 mask words come from one counter); one compiled kernel, the activation
                passed at launch as without a mask.
    dropout_dz  dz = dy * scale * act'(y * keep_prob, or z) where the mask kept, else 0: the
                dense_dz kernel regenerating the mask, a thread per row and group of 4 columns,
                grid-stride; also for identity layers, whose dz is then no longer dy. Where a
                dense layer above computes dX, its dense_dx kernel's masked variant regenerates
                the mask instead (a second epilogue pass over its own stores, as dense_fwd's).
    dropout_fwd, dropout_bwd
                the mask alone (a Dropout standing first, or above another Dropout), the same
                thread layout.

Other kernels
    softmax_fwd, softmax_bwd, ce_fwd_bwd
                 a row per ROW_LANES = 32 threads (a warp), ROWS_PER_BLOCK = 8 rows per block:
                 lane l reads columns l, l + 32, ..., and a shared-memory tree merges the lanes;
                 softmax and cross-entropy share the online (max, sum of exp) pass. Loss is a
                 mean over the batch.
    mse_fwd_bwd, mae_fwd_bwd, huber_fwd_bwd, bce_fwd_bwd, poisson_fwd_bwd, sumsq
                 grid-stride elementwise pass plus a shared-memory tree reduction per block,
                 BLOCKS_PER_SM blocks of REDUCE_THREADS per SM at most; the per-block
                 sums are added on the host in float64. sumsq reduces any number of arrays into
                 one buffer read back with one copy (gradient clipping).
    sgd_update, adam_update, rmsprop_update, scale_
                 fused in-place elementwise updates, grid-stride, sized from the SM count.
Every launch is recorded with ``gpubp.trace.record`` under the names above.

What the CUDA simulator (the test suite on machines with no GPU) does and does not check.
It runs every thread of these kernels in Python, so indexing, tiling, boundary handling,
the split-K finish and the numbers are verified against the NumPy backend. It does not
compile them: Numba's typing, float32-ness and register use (no spills) are checked
separately by compiling every variant in ``kernel_variants()`` with NVVM and ptxas for sm_90
(no GPU needed; the test skips where libNVVM is missing). Neither tells: speed; memory
coalescing and shared-memory bank conflicts; occupancy on the device; races that the
simulator's one-block-at-a-time, GIL-serialised threads hide (a missing syncthreads can pass
there); FMA contraction and the device's erf/exp/tanh rounding; the grid-stride wrap of
launches capped by the SM count (test shapes are far below it); stream ordering with CuPy.
Those need a GPU run (the gpu tests, compute-sanitizer racecheck and the benchmarks).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import os
import threading
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
from numba import cuda
from numba.cuda.cudadrv.devicearray import is_cuda_ndarray

from gpubp import philox
from gpubp.activations import (ACT_ID, ACTIVATIONS, GELU_SATURATION, GELU_TANH_A, GELU_TANH_C, LEAKY_SLOPE,
                               NEEDS_Z)
from gpubp.backends import INSTALL_HINT, _contract
from gpubp.trace import record

NAME = "numba"
DEVICE = "cuda"
DTYPES = (np.float32,)

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
# numba-cuda checks every launch for a grid under 128 blocks and warns (NumbaPerformanceWarning).
# The backend launches small grids by design (a bias's update, a small batch's rows), where the
# check and its warning are time on a launch-bound path and a warning per call site in the log.
# Off, unless NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS says otherwise (the simulator never checks).
LOW_OCCUPANCY_ENV = "NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS"
if not SIMULATOR and LOW_OCCUPANCY_ENV not in os.environ:
    try:
        from numba.cuda.core import config as _numba_cuda_config
    except ImportError:  # numba-cuda before the config moved into it
        from numba.core import config as _numba_cuda_config
    _numba_cuda_config.CUDA_LOW_OCCUPANCY_WARNINGS = 0
# Every device function is inlined by NVVM (LLVM's alwaysinline attribute), not by Numba's IR
# inliner (inline="always"), which deep-copies the callee's IR at every call site: that copying
# was four fifths of a kernel's compile. Each device function is now typed and lowered once per
# argument types and shared by every kernel that calls it; the SASS is the same to within a few
# registers (bench/results/kernel_model.md). The simulator's jit takes no forceinline, and runs
# device functions as Python anyway.
_inlined = cuda.jit(device=True) if SIMULATOR else cuda.jit(device=True, forceinline=True)
# The simulator has no SM count; this one makes small test batches split dW over the grid.
SIMULATED_SMS = 2

# Dense tiles (see the module docstring for the launch shape).
BLOCK_M = 128
BLOCK_N = 128
BLOCK_K = 8
TILE_THREADS = 256
TILE_BLOCKS_PER_SM = 2  # launch bounds: the register allocator keeps to 65536 / (2 x 256) = 128
WARP_SIZE = 32
WARP_M, WARP_N = 32, 64
WARPS_N = BLOCK_N // WARP_N  # 2
LANES_N = 8  # lanes along N in a warp; WARP_SIZE // LANES_N = 4 along M
RUN = 4  # a thread's rows (and columns) come in runs of 4 consecutive floats: one 16-byte load
THREAD_M = THREAD_N = 2 * RUN
ROW_RUN_GAP = (WARP_SIZE // LANES_N) * RUN  # 16: the second run of rows starts 16 rows down
COL_RUN_GAP = LANES_N * RUN  # 32
SMEM_PAD = 4
TILE_STRIDE = BLOCK_M + SMEM_PAD  # 132 floats: rows stay 16-byte aligned, transposed stores spread over banks
# The tiles' shared array is declared 16-byte aligned: Numba gives it 4 bytes otherwise, and the
# linker that builds a kernel's cubin at launch compiles its PTX relocatable, trusting that
# alignment, so every 16-byte load of a run would become four (ptxas alone, laying out shared
# memory itself, aligns it anyway). The simulator refuses an alignment, and needs none.
TILE_SMEM_ALIGN = None if SIMULATOR else 16
SLICE_FLOATS = BLOCK_K * TILE_STRIDE  # one operand's K slice
STAGE_FLOATS = 2 * SLICE_FLOATS  # A then B
TILE_SMEM_FLOATS = 2 * STAGE_FLOATS  # two stages: 4224 floats, 16.5 KiB
LOADS_PER_THREAD = BLOCK_K * BLOCK_M // TILE_THREADS  # 4 floats of each operand per slice
K_MAJOR_THREADS_PER_ROW = BLOCK_K // LOADS_PER_THREAD  # 2

assert BLOCK_M == BLOCK_N, "one stride and one loader geometry serve both operands"
assert (BLOCK_M // WARP_M) * WARPS_N * WARP_SIZE == TILE_THREADS
assert WARP_M == 2 * ROW_RUN_GAP and WARP_N == 2 * COL_RUN_GAP
assert TILE_THREADS // K_MAJOR_THREADS_PER_ROW == BLOCK_M, "k-major loads: 2 threads per row"
assert TILE_THREADS // WARP_SIZE == BLOCK_K and WARP_SIZE * LOADS_PER_THREAD == BLOCK_N, "outer-major loads"
assert TILE_THREADS & (TILE_THREADS - 1) == 0, "_tile_thread masks threadIdx.x"
assert BLOCK_K == 8, "_multiply_slice writes out eight k steps"
assert TILE_STRIDE % RUN == 0 and SLICE_FLOATS % RUN == 0

# dW split-K: split the batch only when the tiles make fewer than SPLIT_WAVES blocks per SM;
# each split keeps at least MIN_ROWS_PER_SPLIT batch rows (its partial tile costs a write and
# a read of 8 bytes per output, against MIN_ROWS_PER_SPLIT FMAs per output). A finishing block
# reads at most MAX_GROUP_SPLITS partials of its tile alone (the splits of its group, or the
# groups' sums), so up to MAX_SPLITS = MAX_GROUP_SPLITS^2 splits finish in two levels.
SPLIT_WAVES = 2
MIN_ROWS_PER_SPLIT = 32
MAX_GROUP_SPLITS = 32
MAX_SPLITS = MAX_GROUP_SPLITS * MAX_GROUP_SPLITS

# Row kernels (softmax, cross-entropy): a row per warp, ROWS_PER_BLOCK rows per block.
ROW_LANES = WARP_SIZE
ROWS_PER_BLOCK = 8

# Elementwise and reduction kernels: at most BLOCKS_PER_SM blocks per SM (8 x 256 threads
# fill an SM's 2048), grid-stride beyond that.
ELEMENTWISE_THREADS = 256
REDUCE_THREADS = 256
BLOCKS_PER_SM = 8

# Constants typed float32: a bare Python float would make Numba compute in float64.
_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)
_NAN = np.float32(np.nan)  # a loss that says its input was not one the kernel can score
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
# Indices here are never negative; casting one to this unsigned type says so to Numba, which
# then emits no negative-index wraparound (a compare and a select per index) for it.
_u64 = np.uint64


def unavailable_reason() -> str | None:
    """None if these kernels can run here (a CUDA GPU, or the CUDA simulator), else why not."""
    try:
        if importlib.util.find_spec("numba_cuda") is None:
            return f"numba-cuda is not installed; {INSTALL_HINT}"
        if cuda.is_available():
            return None if SIMULATOR else _nvvm_missing()
        error = cuda.cuda_error()
    except Exception as exc:  # a broken CUDA install must read as "unavailable", not crash
        error = exc
    # numba-cuda's message spans lines (blank ones around it): joined into one, as every reason is one
    detail = " ".join(line.strip() for line in str(error).splitlines() if line.strip()) if error else ""
    detail = f" ({detail})" if detail else ""
    return (
        f"numba-cuda finds no usable CUDA GPU{detail} and the CUDA simulator is off; "
        "set NUMBA_ENABLE_CUDASIM=1 before importing numba to run these kernels on the CPU (slowly)"
    )


def _nvvm_missing() -> str | None:
    """Why numba-cuda cannot compile a kernel for the GPU it found, or None: it needs libNVVM from
    a CUDA toolkit (a driver alone runs kernels, but compiles none), and would otherwise fail at the
    first launch, deep inside its compiler."""
    from numba.cuda.cudadrv import nvvm

    if nvvm.is_available():
        return None
    return ("numba-cuda finds a CUDA GPU but not libNVVM, which it compiles kernels with: install the CUDA "
            "toolkit's NVVM (the nvidia-cuda-nvcc wheel of your CUDA version, or a CUDA toolkit with "
            "CUDA_HOME set)")


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


def _is_c_contiguous(a) -> bool:
    """Whether ``a`` is C-contiguous (numba-cuda's rule, NumPy's, for anything but CuPy's own)."""
    return a.flags.c_contiguous if _is_cupy(a) else _view(a).is_c_contiguous()


def _contiguous(a):
    """A read-only input as the kernels take it: ``a`` itself when C-contiguous (or None), else a
    C-contiguous device copy of the same kind (CuPy for CuPy, else Numba; on its device and
    stream). The flat kernels ``ravel()`` their inputs, which numba-cuda's device array refuses
    for a strided one on a GPU (NotImplementedError; the simulator's copies silently), and the
    others are compiled for C-contiguous arrays (``kernel_variants``). The copy (CuPy's, or
    numba-cuda's assignment kernel) is not a kernel of this backend: ``record`` does not list it.
    A host array (NumPy's) is copied to the device as ``asarray`` copies it, as CuPy's backend does."""
    if a is None:
        return a
    if not is_array(a):
        return asarray(a)
    if _is_c_contiguous(a):
        return a
    if _is_cupy(a):
        cp = _cupy()
        with cp.cuda.Device(a.device.id):
            return cp.ascontiguousarray(a)
    view = _view(a)
    copy = cuda.device_array(tuple(view.shape), view.dtype, stream=view.stream)
    copy[:] = view  # numba-cuda's strided device-to-device copy, on the array's stream
    return copy


def _is_f32_contiguous(a) -> bool:
    """Whether ``a`` is a C-contiguous float32 device array (its own dtype, or its interface's)."""
    if _is_cupy(a):
        return a.dtype == np.float32 and a.flags.c_contiguous
    if not is_array(a):
        return False
    view = _view(a)
    return view.dtype == np.float32 and view.is_c_contiguous()


def _require_contiguous(**operands) -> None:
    """Refuse an in-place operand (a parameter, optimizer state, an ``out`` buffer; None passes)
    that is not a C-contiguous float32 device array, with the CuPy backend's wording: those are
    the backend's own arrays, and a kernel writing a copy (of a strided view, of a host array)
    would leave the caller's array unwritten; the kernels are compiled for float32 (``DTYPES``).
    A type check, a dtype compare and a flags check per array."""
    for name, a in operands.items():
        if a is not None and not _is_f32_contiguous(a):
            why = "expected a C-contiguous float32 device array (it is written in place)"
            if not is_array(a):
                raise ValueError(f"{name}: {why}, got {type(a).__name__}")
            view = _view(a)
            raise ValueError(f"{name}: {why}, got dtype {view.dtype}, shape {tuple(view.shape)} "
                             f"with strides {tuple(view.strides)}")


def _device_id(a) -> int:
    """The device ``a`` lives on: a CuPy array says; a Numba array is in Numba's current context."""
    if _is_cupy(a):
        return a.device.id
    return 0 if SIMULATOR else cuda.get_current_device().id


def _new(shape, like, dtype=np.float32):
    """An uninitialised device array of the kind of ``like`` (CuPy for CuPy, else Numba), on its device."""
    if _is_cupy(like):
        cp = _cupy()
        with cp.cuda.Device(like.device.id):
            return cp.empty(shape, dtype)
    return cuda.device_array(shape, dtype)


def _stream_key(stream) -> int:
    """Which stream a view's launches go to: its handle (0: the default stream). The simulator's
    streams have no handle; each is told apart by its id."""
    if not stream:
        return 0
    return int(stream) if hasattr(stream, "handle") else id(stream)


_scratch_buffers: dict[tuple, object] = {}
_MAX_SCRATCH_BUFFERS = 64


def _scratch(tag: str, size: int, like, dtype=np.float32):
    """A flat buffer of at least ``size`` elements for one purpose (``tag``), private to the device
    and stream of ``like``, its kind and the calling thread, reused by that thread's next call
    there; allocated zeroed (the split tickets rely on it, and the kernels leave them at 0).
    Reuse is safe because every kernel that touches it runs in order on that one stream, and
    one thread's calls come one after another: two threads launching on one stream (the default
    one) would otherwise queue a kernel of the other's between a launch and the read-back or the
    kernel after it that reads the buffer."""
    key = (tag, np.dtype(dtype), _is_cupy(like), _device_id(like), _stream_key(_view(like).stream),
           threading.get_ident())
    buf = _scratch_buffers.get(key)
    if buf is None or buf.size < size:
        if buf is None and len(_scratch_buffers) >= _MAX_SCRATCH_BUFFERS:
            _scratch_buffers.clear()  # streams come and go; CuPy's pool reuses freed memory in stream order
        if _is_cupy(like):
            cp = _cupy()
            with cp.cuda.Device(like.device.id):
                buf = cp.zeros(size, dtype)
        else:
            buf = cuda.to_device(np.zeros(size, dtype))
        _scratch_buffers[key] = buf
    return buf[:size]


@functools.cache
def _sms_of_device(device_id: int, is_cupy: bool) -> int:
    if SIMULATOR:
        return SIMULATED_SMS
    if is_cupy:
        # One attribute (cudaDevAttrMultiProcessorCount), not Device.attributes: that asks for
        # every one, and compute-sanitizer counts those the driver refuses as errors.
        return int(_cupy().cuda.runtime.deviceGetAttribute(16, device_id))
    return cuda.get_current_device().MULTIPROCESSOR_COUNT


def _sm_count(like) -> int:
    """How many SMs the device of ``like`` has (SIMULATED_SMS in the simulator)."""
    return _sms_of_device(_device_id(like), _is_cupy(like))


def empty(shape, dtype=np.float32):
    cp = _cupy()
    return cp.empty(shape, dtype) if cp else cuda.device_array(shape, dtype)


def zeros(shape, dtype=np.float32):
    cp = _cupy()
    return cp.zeros(shape, dtype) if cp else cuda.to_device(np.zeros(shape, dtype))


def asarray(a, dtype=None):
    """``a`` as a C-contiguous device array (of ``dtype`` where given), as the NumPy and CuPy
    backends' ``asarray`` give one: ``a`` itself when it already is one, else a copy."""
    if is_array(a):
        if dtype is None or a.dtype == np.dtype(dtype):
            return _contiguous(a)
        if _is_cupy(a):
            return _contiguous(a.astype(dtype))
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


def elementwise_blocks(n: int, sms: int) -> int:
    """Blocks of ELEMENTWISE_THREADS for an n-element grid-stride pass on ``sms`` SMs."""
    return max(1, min(-(-n // ELEMENTWISE_THREADS), BLOCKS_PER_SM * sms))


def reduce_blocks(n: int, sms: int) -> int:
    """Blocks of REDUCE_THREADS for an n-element reduction on ``sms`` SMs: a thread per element
    up to BLOCKS_PER_SM blocks per SM (two waves of 132 SMs from 67,584 elements on), then
    grid-stride. A smaller array takes fewer blocks, since one more would hold no element (a
    64 x 64 gradient: 16); one load per thread, its time is the launch's, not bandwidth's."""
    return max(1, min(-(-n // REDUCE_THREADS), BLOCKS_PER_SM * sms))


def sumsq(*arrays) -> float:
    """The sum of squares of every element of ``arrays``: a launch per array into one buffer of
    block sums, read back with one copy and added in float64."""
    if not arrays:
        return 0.0
    sms = _sm_count(arrays[0])
    views = [_view(_contiguous(a)).ravel() for a in arrays]
    blocks = [reduce_blocks(v.size, sms) for v in views]
    block_sums = _view(_scratch("block_sums", sum(blocks), arrays[0]))
    start = 0
    for flat, count in zip(views, blocks):
        record("sumsq")
        _sumsq_kernel[count, REDUCE_THREADS, flat.stream](flat, block_sums[start:start + count])
        start += count
    return float(to_host(block_sums).sum(dtype=np.float64))


def scale_(a, s: float) -> None:
    _require_contiguous(a=a)
    record("scale")
    flat = _view(a).ravel()
    _scale_kernel[elementwise_blocks(flat.size, _sm_count(a)), ELEMENTWISE_THREADS, flat.stream](flat, np.float32(s))


@_inlined
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
# activations.py says it is computed from: y for relu..tanh, z for gelu, gelu_tanh and silu.
# The operation order mirrors activations.py so results agree to float32 rounding.


@_inlined
def _sigmoid(z):
    # exp of a non-positive number only: no overflow at |z| = 1e4.
    if z >= _ZERO:
        return _ONE / (_ONE + math.exp(-z))
    e = math.exp(z)
    return e / (_ONE + e)


@_inlined
def _identity(z):
    return z


@_inlined
def _relu(z):
    return _ZERO if z < _ZERO else z  # a NaN z stays NaN, as in NumPy and PyTorch


@_inlined
def _leaky_relu(z):
    return z if z > _ZERO else z * _LEAKY_SLOPE


@_inlined
def _tanh(z):
    return math.tanh(z)


@_inlined
def _saturate(z):
    """z clamped to [-GELU_SATURATION, GELU_SATURATION] (see activations.py); NaN stays NaN."""
    if z > _GELU_SATURATION:
        return _GELU_SATURATION
    if z < -_GELU_SATURATION:
        return -_GELU_SATURATION
    return z


@_inlined
def _gelu(z):
    return (math.erf(z * _INV_SQRT2) + _ONE) * _HALF * z


@_inlined
def _gelu_tanh(z):
    clamped = _saturate(z)
    u = (clamped * clamped * _GELU_TANH_AC + _GELU_TANH_C) * clamped
    return (math.tanh(u) + _ONE) * _HALF * z


@_inlined
def _silu(z):
    return _sigmoid(z) * z


@_inlined
def _relu_grad(y):
    return _ONE if y > _ZERO else _ZERO


@_inlined
def _leaky_relu_grad(y):
    return _ONE if y > _ZERO else _LEAKY_SLOPE


@_inlined
def _sigmoid_grad(y):
    return (_ONE - y) * y


@_inlined
def _tanh_grad(y):
    return _ONE - y * y


@_inlined
def _gelu_grad(z):
    # Phi(z) + z phi(z)
    z = _saturate(z)
    density = math.exp(z * z * _NEG_HALF) * z * _INV_SQRT_2PI
    return density + (math.erf(z * _INV_SQRT2) + _ONE) * _HALF


@_inlined
def _gelu_tanh_grad(z):
    # 0.5 (1 + t) + 0.5 z (1 - t^2) c (1 + 3 a z^2), t = tanh(c (z + a z^3))
    z = _saturate(z)
    z2 = z * z
    t = math.tanh((z2 * _GELU_TANH_AC + _GELU_TANH_C) * z)
    du = (z2 * _GELU_TANH_3AC + _GELU_TANH_C) * z * (_ONE - t * t) * _HALF
    return du + (t + _ONE) * _HALF


@_inlined
def _silu_grad(z):
    # s (1 + z (1 - s)), s = sigmoid(z): 0 where s is 0 (a large negative z), not 0 * inf
    s = _sigmoid(z)
    return ((_ONE - s) * z + _ONE) * s


_FORWARD = {
    "identity": _identity, "relu": _relu, "leaky_relu": _leaky_relu, "sigmoid": _sigmoid,
    "tanh": _tanh, "gelu": _gelu, "gelu_tanh": _gelu_tanh, "silu": _silu,
}
# identity has no entry: its layers launch no dz kernel (dz is dy).
_GRAD = {
    "relu": _relu_grad, "leaky_relu": _leaky_relu_grad, "sigmoid": _sigmoid_grad,
    "tanh": _tanh_grad, "gelu": _gelu_grad, "gelu_tanh": _gelu_tanh_grad, "silu": _silu_grad,
}


@functools.cache
def _through(act: str):
    """``through(g, a)``: g * act'(a), the gradient through the activation (identity: g). For relu
    a select: where the unit is off, an inf or NaN g gives 0, as PyTorch's threshold_backward and
    the NumPy backend give (the product with act' = 0 would be NaN)."""
    if act == "relu":
        @_inlined
        def through_relu(g, a):
            return g if a > _ZERO else _ZERO
        return through_relu
    grad = _GRAD.get(act)
    if grad is None:
        @_inlined
        def through_identity(g, a):
            return g
        return through_identity

    @_inlined
    def through(g, a):
        return g * grad(a)
    return through


# ----------------------------------------------------------------------------- dropout masks

_philox = _inlined(philox.philox4x32_10)
_GROUP = philox.COLUMNS_PER_CALL
_NO_COUNTER = np.uint64(0)


@_inlined
def _mask_words(key, row, col):
    """The four mask words of ``row`` and the group of 4 columns holding ``col`` (a multiple of 4)."""
    return _philox(_u64(col // _GROUP), _u64(row), _NO_COUNTER, _NO_COUNTER, _u64(key[0]), _u64(key[1]))


@_inlined
def _kept(value, word, threshold, scale):
    """``value * scale`` where the mask word keeps its element, else 0."""
    return value * scale if word >= threshold else _ZERO


@_inlined
def _mask_group(g, cols, key, first_row):
    """Group ``g`` of the mask passes over a (rows, cols) array, in groups of 4 columns per row (a
    thread per group, grid-stride: ``g`` runs over rows * ceil(cols / 4)): its row, its first
    column and its mask words (rows counted from ``first_row``)."""
    groups = (cols + _GROUP - 1) // _GROUP
    row = g // groups
    col = (g % groups) * _GROUP
    return row, col, _mask_words(key, first_row + row, col)


@cuda.jit
def _mask_kernel(src, dst, cols, key, threshold, scale, first_row):
    """dst = src * scale where the mask of ``key`` keeps, else 0; src, dst (rows * cols,) flat, its
    rows counted from ``first_row``; a thread per row and group of 4 columns, grid-stride. ``dst``
    may be ``src``."""
    for g in range(cuda.grid(1), (src.size // cols) * ((cols + _GROUP - 1) // _GROUP), cuda.gridsize(1)):
        row, col, words = _mask_group(g, cols, key, first_row)
        for e in range(_GROUP):
            if col + e < cols:
                i = _u64(row * cols + col + e)
                dst[i] = _kept(src[i], words[e], threshold, scale)


# ----------------------------------------------------------------------------- dense tiles


def _tile_kernel(fn):
    """``cuda.jit`` for the dense tile kernels: TILE_THREADS per block, TILE_BLOCKS_PER_SM
    resident (the simulator takes no launch bounds)."""
    if SIMULATOR:
        return cuda.jit(fn)
    return cuda.jit(launch_bounds=(TILE_THREADS, TILE_BLOCKS_PER_SM))(fn)


def tile_grid(rows: int, cols: int) -> tuple[tuple[int, int], bool]:
    """The grid of a dense kernel's (rows, cols) result in BLOCK_M x BLOCK_N tiles, and whether the
    row tiles are on grid.x: the larger count goes on x (limit 2^31 - 1), the smaller on y
    (limit 65535), so any batch and any width up to 65535 x 128 of the other launches."""
    row_tiles, col_tiles = -(-rows // BLOCK_M), -(-cols // BLOCK_N)
    if row_tiles >= col_tiles:
        return (row_tiles, col_tiles), True
    return (col_tiles, row_tiles), False


def dw_splits(batch: int, tiles: int, sms: int) -> tuple[int, int]:
    """(splits, rows_per_split) of a dW launch over ``tiles`` output tiles on ``sms`` SMs: the
    batch is split only when the tiles make fewer than SPLIT_WAVES blocks per SM, into as many
    chunks as make SPLIT_WAVES blocks per SM (at most one per MIN_ROWS_PER_SPLIT rows and
    MAX_SPLITS), each a whole number of BLOCK_K slices. Chunks are rounded up to whole slices
    where that still leaves that many splits, else down (one more, shorter, split at the end)."""
    wanted = 1
    target = SPLIT_WAVES * sms
    if tiles < target:
        wanted = max(1, min(-(-target // tiles), batch // MIN_ROWS_PER_SPLIT, MAX_SPLITS))
    rows = -(-batch // wanted)
    rows = -(-rows // BLOCK_K) * BLOCK_K
    if -(-batch // rows) < wanted:
        rows = batch // wanted // BLOCK_K * BLOCK_K  # >= MIN_ROWS_PER_SPLIT, a multiple of BLOCK_K
    return -(-batch // rows), rows


def dw_split_group(splits: int) -> int:
    """How many consecutive splits share a first-level finish: all of them up to
    MAX_GROUP_SPLITS (one level), else as few groups of at most MAX_GROUP_SPLITS as cover them,
    of equal size but the last."""
    groups = -(-splits // MAX_GROUP_SPLITS)
    return -(-splits // groups)


@_inlined
def _tile_origin(rows_on_x):
    """(m0, n0): the first row and column of this block's tile of the result."""
    if rows_on_x:
        return cuda.blockIdx.x * BLOCK_M, cuda.blockIdx.y * BLOCK_N
    return cuda.blockIdx.y * BLOCK_M, cuda.blockIdx.x * BLOCK_N


@_inlined
def _tile_thread():
    """threadIdx.x of a tile kernel's TILE_THREADS (a power of two) threads. The mask changes
    no value, but shows the compiler the index is non-negative and small: its divisions by
    powers of two become shifts, and shared offsets built from it are visibly multiples of 4
    floats (16-byte loads)."""
    return cuda.threadIdx.x & (TILE_THREADS - 1)


@_inlined
def _thread_tile(tid):
    """(row, col): where this thread's 8 x 8 accumulators start inside the block tile; its rows
    are row + {0..3} and row + 16 + {0..3}, its columns col + {0..3} and col + 32 + {0..3}."""
    warp = tid // WARP_SIZE
    lane = tid % WARP_SIZE
    row = (warp // WARPS_N) * WARP_M + (lane // LANES_N) * RUN
    col = (warp % WARPS_N) * WARP_N + (lane % LANES_N) * RUN
    return row, col


# Operand layouts. An operand is a (K, 128) slice per step, stored k-major in shared memory at
# tile[k * TILE_STRIDE + o]. Each layout has: coords(tid, o0) -> (o, k, at), this thread's row
# or column o of the source, its first k inside the slice and its first shared offset; load()
# into LOADS_PER_THREAD registers; store() from them.


@_inlined
def _k_major_coords(tid, o0):
    """Source rows run along k (x in forward, dz and w in dX): 2 threads per row, 4 k each."""
    o_local = tid // K_MAJOR_THREADS_PER_ROW
    k = (tid % K_MAJOR_THREADS_PER_ROW) * LOADS_PER_THREAD
    return o0 + o_local, k, k * TILE_STRIDE + o_local


@_inlined
def _load_k_major(src, o, k, k_end, regs):
    """regs[p] = src[o, k + p], 0 past k_end or past the last row."""
    in_rows = o < src.shape[0]
    k_left = k_end - k
    for p in range(LOADS_PER_THREAD):
        value = _ZERO
        if in_rows & (p < k_left):  # & rather than and: one predicate, no branch
            value = src[_u64(o), _u64(k + p)]
        regs[p] = value


@_inlined
def _store_k_major(smem, at, regs):
    for p in range(LOADS_PER_THREAD):
        smem[_u64(at + p * TILE_STRIDE)] = regs[p]


@_inlined
def _outer_major_coords(tid, o0):
    """Source rows are k (w in forward, x and dz in dW): a warp per k row, 4 columns 32 apart each."""
    k = tid // WARP_SIZE
    o_local = tid % WARP_SIZE
    return o0 + o_local, k, k * TILE_STRIDE + o_local


@_inlined
def _load_outer_major(src, o, k, k_end, regs):
    """regs[p] = src[k, o + 32 p], 0 past k_end or past the last column."""
    in_k = k < k_end
    for p in range(LOADS_PER_THREAD):
        value = _ZERO
        if in_k & (o + p * WARP_SIZE < src.shape[1]):
            value = src[_u64(k), _u64(o + p * WARP_SIZE)]
        regs[p] = value


@_inlined
def _store_outer_major(smem, at, regs):
    for p in range(LOADS_PER_THREAD):
        smem[_u64(at + p * WARP_SIZE)] = regs[p]


_OPERAND_LAYOUTS = {
    "k_major": (_k_major_coords, _load_k_major, _store_k_major),
    "outer_major": (_outer_major_coords, _load_outer_major, _store_outer_major),
}


@_inlined
def _multiply_k(smem, a_at, b_at, acc):
    """acc[i, j] += A[k, row i] * B[k, col j] for one k: 16 floats from shared memory, 64 FMAs."""
    a = cuda.local.array(THREAD_M, np.float32)
    b = cuda.local.array(THREAD_N, np.float32)
    for r in range(RUN):
        a[r] = smem[_u64(a_at + r)]
        a[RUN + r] = smem[_u64(a_at + ROW_RUN_GAP + r)]
        b[r] = smem[_u64(b_at + r)]
        b[RUN + r] = smem[_u64(b_at + COL_RUN_GAP + r)]
    # One loop of 64 rather than 8 x 8: the same unrolled FMAs, in fewer IR blocks to compile.
    for e in range(THREAD_M * THREAD_N):
        acc[e // THREAD_N, e % THREAD_N] += a[e // THREAD_N] * b[e % THREAD_N]


@_inlined
def _multiply_slice(smem, a_at, b_at, acc):
    """The BLOCK_K = 8 steps of one slice, written out: Numba has no unroll pragma and LLVM keeps
    an 8-trip loop of this size rolled; written out, every shared offset is a constant added
    to a_at or b_at, and each run of 4 floats is one 16-byte load."""
    _multiply_k(smem, a_at, b_at, acc)
    _multiply_k(smem, a_at + TILE_STRIDE, b_at + TILE_STRIDE, acc)
    _multiply_k(smem, a_at + 2 * TILE_STRIDE, b_at + 2 * TILE_STRIDE, acc)
    _multiply_k(smem, a_at + 3 * TILE_STRIDE, b_at + 3 * TILE_STRIDE, acc)
    _multiply_k(smem, a_at + 4 * TILE_STRIDE, b_at + 4 * TILE_STRIDE, acc)
    _multiply_k(smem, a_at + 5 * TILE_STRIDE, b_at + 5 * TILE_STRIDE, acc)
    _multiply_k(smem, a_at + 6 * TILE_STRIDE, b_at + 6 * TILE_STRIDE, acc)
    _multiply_k(smem, a_at + 7 * TILE_STRIDE, b_at + 7 * TILE_STRIDE, acc)


@functools.cache
def _gemm_main_loop(a_layout: str, b_layout: str, sum_b_columns: bool):
    """The K loop of a tile, C[m0:, n0:] += A @ B over k in [k_begin, k_end), for operands read
    in the given layouts; with ``sum_b_columns`` it also adds every B element it loads to
    ``b_column_sums`` (the thread's LOADS_PER_THREAD columns of an outer-major B: db in dW)."""
    a_coords, load_a, store_a = _OPERAND_LAYOUTS[a_layout]
    b_coords, load_b, store_b = _OPERAND_LAYOUTS[b_layout]

    @_inlined
    def main_loop(a, b, m0, n0, k_begin, k_end, smem, acc, b_column_sums):
        tid = _tile_thread()
        a_o, a_k, a_at = a_coords(tid, m0)
        b_o, b_k, b_at = b_coords(tid, n0)
        b_at += SLICE_FLOATS
        a_frag, b_frag = _thread_tile(tid)
        b_frag += SLICE_FLOATS
        a_regs = cuda.local.array(LOADS_PER_THREAD, np.float32)
        b_regs = cuda.local.array(LOADS_PER_THREAD, np.float32)
        load_a(a, a_o, k_begin + a_k, k_end, a_regs)
        load_b(b, b_o, k_begin + b_k, k_end, b_regs)
        store_a(smem, a_at, a_regs)
        store_b(smem, b_at, b_regs)
        if sum_b_columns:
            for p in range(LOADS_PER_THREAD):
                b_column_sums[p] += b_regs[p]
        cuda.syncthreads()
        # Pass s multiplies slice s (in stage s % 2) between loading slice s + 1 (zeros past
        # k_end) and storing it to the other stage. Stage offsets are (s & 1) x STAGE_FLOATS,
        # recomputed from s rather than carried, so the compiler still sees multiples of 4.
        for s in range((k_end - k_begin + BLOCK_K - 1) // BLOCK_K):
            k0 = k_begin + (s + 1) * BLOCK_K
            load_a(a, a_o, k0 + a_k, k_end, a_regs)
            load_b(b, b_o, k0 + b_k, k_end, b_regs)
            stage = (s & 1) * STAGE_FLOATS
            _multiply_slice(smem, stage + a_frag, stage + b_frag, acc)
            stage = ((s + 1) & 1) * STAGE_FLOATS
            store_a(smem, stage + a_at, a_regs)
            store_b(smem, stage + b_at, b_regs)
            if sum_b_columns:
                for p in range(LOADS_PER_THREAD):
                    b_column_sums[p] += b_regs[p]
            cuda.syncthreads()

    return main_loop


@_inlined
def _zero_accumulators(acc):
    for i in range(THREAD_M):
        for j in range(THREAD_N):
            acc[i, j] = _ZERO


@_inlined
def _store_tile(out, acc, m0, n0):
    """out[m0 + row i, n0 + col j] = acc[i, j] where inside out."""
    row, col = _thread_tile(_tile_thread())
    for i in range(THREAD_M):
        r = m0 + row + (i // RUN) * ROW_RUN_GAP + i % RUN
        if r < out.shape[0]:
            for j in range(THREAD_N):
                c = n0 + col + (j // RUN) * COL_RUN_GAP + j % RUN
                if c < out.shape[1]:
                    out[_u64(r), _u64(c)] = acc[i, j]


# Activations whose code, repeated for 64 accumulators, is more than the compiler unrolls: applied
# in registers they would push the accumulators to local memory (and spill at 128 registers).
# Their epilogue stores the pre-activations first and applies act() reading them back.
_ACTIVATE_AFTER_STORE = frozenset({"sigmoid", "gelu", "gelu_tanh", "silu"})


@functools.cache
def _forward_epilogue(act: str):
    """The forward kernel's epilogue for ``act``: y = act(acc + b), and z = acc + b for the
    activations whose derivative needs it, stored where inside y."""
    activate = _FORWARD[act]
    store_z = act in NEEDS_Z
    in_registers = act not in _ACTIVATE_AFTER_STORE

    @_inlined
    def forward_epilogue(acc, b, y, z, m0, n0):
        row, col = _thread_tile(_tile_thread())
        pre_out = z if store_z else y  # where pre-activations go when act() reads them back
        for j in range(THREAD_N):
            c = n0 + col + (j // RUN) * COL_RUN_GAP + j % RUN
            if c < y.shape[1]:
                bias = b[_u64(c)]
                for i in range(THREAD_M):
                    r = m0 + row + (i // RUN) * ROW_RUN_GAP + i % RUN
                    if r < y.shape[0]:
                        pre = acc[i, j] + bias
                        if in_registers:
                            y[_u64(r), _u64(c)] = activate(pre)
                            if store_z:
                                z[_u64(r), _u64(c)] = pre
                        else:
                            pre_out[_u64(r), _u64(c)] = pre
        if not in_registers:
            # The thread's own stores, read back in program order: no barrier needed.
            for e in range(THREAD_M * THREAD_N):
                i = e // THREAD_N
                j = e % THREAD_N
                r = m0 + row + (i // RUN) * ROW_RUN_GAP + i % RUN
                c = n0 + col + (j // RUN) * COL_RUN_GAP + j % RUN
                if r < y.shape[0] and c < y.shape[1]:
                    y[_u64(r), _u64(c)] = activate(pre_out[_u64(r), _u64(c)])

    return forward_epilogue


@_inlined
def _mask_tile(y, m0, n0, key, threshold, scale, first_row):
    """The dropout pass of the forward epilogue: y * scale where the mask keeps, else 0, over this
    thread's outputs of the tile at (m0, n0), read back from its own stores (no barrier needed)."""
    row, col = _thread_tile(_tile_thread())
    for i in range(THREAD_M):
        r = m0 + row + (i // RUN) * ROW_RUN_GAP + i % RUN
        if r < y.shape[0]:
            for run in range(THREAD_N // RUN):
                c0 = n0 + col + run * COL_RUN_GAP  # a multiple of 4: one Philox call for the run
                if c0 < y.shape[1]:
                    words = _mask_words(key, first_row + r, c0)
                    for e in range(RUN):
                        if c0 + e < y.shape[1]:
                            y[_u64(r), _u64(c0 + e)] = _kept(y[_u64(r), _u64(c0 + e)], words[e], threshold, scale)


@_inlined
def _no_epilogue(a0, a1, a2, a3, a4, a5):
    """An unused slot of _by_act_id."""


def _by_act_id(epilogues: dict):
    """One device function ``(act, a0, ..., a5)`` that calls the epilogue of ``epilogues``
    ({ACT_ID: epilogue taking six arguments}) whose ACT_ID ``act`` is: one branch, uniform across
    the grid, taken once after a kernel's main loop, so each epilogue keeps its activation fixed
    at compile time and the main loop is compiled once for all of them. An id not in
    ``epilogues`` runs nothing. A flat chain of a slot per activation, the unused ones never
    taken, each call with the six arguments spelled out (when Numba's IR inliner did the
    inlining it took no star-args, and a nested chain, a closure per activation, compiled
    seconds slower)."""
    slots = list(epilogues.items()) + [(-1, _no_epilogue)] * (len(ACTIVATIONS) - len(epilogues))
    (id0, e0), (id1, e1), (id2, e2), (id3, e3), (id4, e4), (id5, e5), (id6, e6), (id7, e7) = slots

    @_inlined
    def by_act_id(act, a0, a1, a2, a3, a4, a5):
        if act == id0:
            e0(a0, a1, a2, a3, a4, a5)
        elif act == id1:
            e1(a0, a1, a2, a3, a4, a5)
        elif act == id2:
            e2(a0, a1, a2, a3, a4, a5)
        elif act == id3:
            e3(a0, a1, a2, a3, a4, a5)
        elif act == id4:
            e4(a0, a1, a2, a3, a4, a5)
        elif act == id5:
            e5(a0, a1, a2, a3, a4, a5)
        elif act == id6:
            e6(a0, a1, a2, a3, a4, a5)
        elif act == id7:
            e7(a0, a1, a2, a3, a4, a5)

    return by_act_id


# The forward epilogue chosen at run time by the activation's ACT_ID (_forward_epilogue: its act()
# and whether it stores z stay fixed at compile time), arguments (acc, b, y, z, m0, n0).
_forward_epilogue_any = _by_act_id({ACT_ID[act]: _forward_epilogue(act) for act in ACTIVATIONS})
_fwd_main_loop = _gemm_main_loop("k_major", "outer_major", False)


@_inlined
def _forward_tile(x, w, b, y, z, rows_on_x, act):
    """This block's tile of y = act(x @ w + b) (and of z for the activations that store it; else z
    is y and never written), ``act`` the activation's ``ACT_ID``; returns the tile's origin."""
    smem = cuda.shared.array(TILE_SMEM_FLOATS, np.float32, alignment=TILE_SMEM_ALIGN)
    acc = cuda.local.array((THREAD_M, THREAD_N), np.float32)
    unused_sums = cuda.local.array(LOADS_PER_THREAD, np.float32)  # forward keeps no column sums
    m0, n0 = _tile_origin(rows_on_x)
    _zero_accumulators(acc)
    _fwd_main_loop(x, w, m0, n0, 0, x.shape[1], smem, acc, unused_sums)
    _forward_epilogue_any(act, acc, b, y, z, m0, n0)
    return m0, n0


@_tile_kernel
def _dense_forward_kernel(x, w, b, y, z, rows_on_x, act):
    """y = act(x @ w + b), and z = x @ w + b for the activations that store it (else z is y and
    never written); ``act`` is the activation's ``ACT_ID``."""
    _forward_tile(x, w, b, y, z, rows_on_x, act)


@_tile_kernel
def _dense_forward_masked_kernel(x, w, b, y, z, rows_on_x, act, key, threshold, scale, first_row):
    """y = act(x @ w + b) * scale where the mask of ``key`` keeps, else 0; z unmasked; ``act`` is
    the activation's ``ACT_ID``."""
    m0, n0 = _forward_tile(x, w, b, y, z, rows_on_x, act)
    _mask_tile(y, m0, n0, key, threshold, scale, first_row)


@functools.cache
def _dz_prologue(act: str):
    """dz = dy * act'(act_in) at flat index i: the step before the gradient products."""
    through = _through(act)

    @_inlined
    def dz_prologue(dy, act_in, i):
        return through(dy[i], act_in[i])

    return dz_prologue


@functools.cache
def _dense_dz_kernel(act: str):
    """The dz kernel for ``act`` (every activation with a derivative)."""
    prologue = _dz_prologue(act)

    @cuda.jit
    def dense_dz_kernel(dy, act_in, dz):
        """dz = dy * act'(act_in), all (n,) flat, grid-stride."""
        for i in range(cuda.grid(1), dy.size, cuda.gridsize(1)):
            dz[i] = prologue(dy, act_in, i)

    return dense_dz_kernel


@functools.cache
def _dropout_dz_kernel(act: str):
    """The dz kernel of a layer whose output the forward masked, for ``act`` (identity included)."""
    through = _through(act)
    reads_z = act in NEEDS_Z

    @cuda.jit
    def dropout_dz_kernel(dy, act_in, dz, cols, key, threshold, scale, first_row, keep_prob):
        """dz = dy * scale * act'(act_in * keep_prob, or act_in = z) where the mask of ``key`` kept,
        else 0; all (rows * cols,) flat; a thread per row and group of 4 columns, grid-stride."""
        for g in range(cuda.grid(1), (dy.size // cols) * ((cols + _GROUP - 1) // _GROUP), cuda.gridsize(1)):
            row, col, words = _mask_group(g, cols, key, first_row)
            for e in range(_GROUP):
                if col + e < cols:
                    i = _u64(row * cols + col + e)
                    own = act_in[i] if reads_z else act_in[i] * keep_prob
                    dz[i] = through(_kept(dy[i], words[e], threshold, scale), own)

    return dropout_dz_kernel


_dx_main_loop = _gemm_main_loop("k_major", "k_major", False)
_dw_main_loop = _gemm_main_loop("outer_major", "outer_major", True)


# The activations of a layer below whose act' the dX kernel applies in its epilogue (the
# FOLDS_DX_ACT capability): every one. Those whose derivative reads y, a select or two products an
# element, are applied in registers; gelu's, gelu_tanh's and silu's read z through erf, tanh or a
# division and are applied after the store, as the forward's _ACTIVATE_AFTER_STORE.
# Two compiled kernels (each with a masked twin), so a model whose layers read y never compiles
# the epilogues of those that read z.
_DX_FROM_Y = ("identity", "relu", "leaky_relu", "sigmoid", "tanh")
_DX_FROM_Z = tuple(sorted(NEEDS_Z))
assert sorted(_DX_FROM_Y + _DX_FROM_Z) == sorted(ACTIVATIONS)
FOLDS_DX_ACT = frozenset(_DX_FROM_Y + _DX_FROM_Z)


@functools.cache
def _dx_epilogue(act: str, masked: bool):
    """The dX kernel's epilogue for a layer below with activation ``act``: dx = acc * act'(act_in)
    where inside dx, which is then that layer's dz; act_in is that layer's y, or z for the
    activations whose derivative reads it (NEEDS_Z). ``masked``: that layer's forward applied a
    Dropout's mask, here regenerated (``mask`` is (key, threshold, scale, first_row, keep_prob)):
    acc * scale * act'(y * keep_prob, or z) where kept, else 0, one Philox call per row and run
    of 4 columns. Unmasked, ``mask`` is () and unread.
    A masked epilogue, and one for a NEEDS_Z activation, stores acc as it is and applies the rest
    in a second pass over the thread's own stores (no barrier: each thread reads what it wrote),
    as the forward's _mask_tile: 16 inlined Philox calls, or 64 copies of erf, beside the
    accumulators would push those to local memory. The products are those of the layer's own
    dense_dz (_dz_prologue) or dropout_dz pass, in the same order: the same bits."""
    through = _through(act)
    after_store = masked or act in NEEDS_Z
    scale_own = act not in NEEDS_Z  # y * keep_prob is the activation's own output; z is unmasked

    @_inlined
    def dx_epilogue(acc, dx, act_in, m0, n0, mask):
        row, col = _thread_tile(_tile_thread())
        if not after_store:
            for i in range(THREAD_M):
                r = m0 + row + (i // RUN) * ROW_RUN_GAP + i % RUN
                if r < dx.shape[0]:
                    for j in range(THREAD_N):
                        c = n0 + col + (j // RUN) * COL_RUN_GAP + j % RUN
                        if c < dx.shape[1]:
                            dx[_u64(r), _u64(c)] = through(acc[i, j], act_in[_u64(r), _u64(c)])
            return
        if masked:
            key, threshold, scale, first_row, keep_prob = mask
        _store_tile(dx, acc, m0, n0)
        for i in range(THREAD_M):
            r = m0 + row + (i // RUN) * ROW_RUN_GAP + i % RUN
            if r < dx.shape[0]:
                for run in range(THREAD_N // RUN):
                    c0 = n0 + col + run * COL_RUN_GAP  # a multiple of 4: one Philox call for the run
                    if c0 < dx.shape[1]:
                        if masked:
                            words = _mask_words(key, first_row + r, c0)
                        for e in range(RUN):
                            at = (_u64(r), _u64(c0 + e))
                            if c0 + e < dx.shape[1]:
                                g = dx[at]
                                own = act_in[at]
                                if masked:
                                    g = _kept(g, words[e], threshold, scale)
                                    if scale_own:
                                        own = own * keep_prob
                                dx[at] = through(g, own)

    return dx_epilogue


def _dx_epilogues(acts, masked: bool):
    """The dX epilogue chosen at run time by the layer below's ``ACT_ID``, one of ``acts``, with the
    arguments (acc, dx, act_in, m0, n0, mask); an id outside ``acts`` stores nothing (the host
    refuses it first)."""
    return _by_act_id({ACT_ID[act]: _dx_epilogue(act, masked) for act in acts})


@_inlined
def _dx_product(dz, w, rows_on_x, smem, acc):
    """acc = this thread's share of the block's tile of dz @ w.T; returns the tile's origin."""
    unused_sums = cuda.local.array(LOADS_PER_THREAD, np.float32)
    m0, n0 = _tile_origin(rows_on_x)
    _zero_accumulators(acc)
    _dx_main_loop(dz, w, m0, n0, 0, dz.shape[1], smem, acc, unused_sums)
    return m0, n0


def _dx_kernel(epilogue, masked: bool):
    """A dX kernel ending in ``epilogue`` (a _dx_chain of masked epilogues when ``masked``):
    dx = (dz @ w.T) * act'(act_in) of the layer below, ``act`` its ACT_ID (identity's: plain dx,
    act_in unread) and act_in (B, in) its y or z; dx is then that layer's dz. dz (B, out), w
    (in, out) -> dx (B, in); K runs over out, both operands k-major. The masked kernel takes that
    layer's mask (key, threshold, scale, first_row) and keep probability as well."""
    if masked:
        @_tile_kernel
        def dense_dx_masked_kernel(dz, w, dx, act_in, rows_on_x, act, key, threshold, scale, first_row, keep_prob):
            smem = cuda.shared.array(TILE_SMEM_FLOATS, np.float32, alignment=TILE_SMEM_ALIGN)
            acc = cuda.local.array((THREAD_M, THREAD_N), np.float32)
            m0, n0 = _dx_product(dz, w, rows_on_x, smem, acc)
            epilogue(act, acc, dx, act_in, m0, n0, (key, threshold, scale, first_row, keep_prob))

        return dense_dx_masked_kernel

    @_tile_kernel
    def dense_dx_kernel(dz, w, dx, act_in, rows_on_x, act):
        smem = cuda.shared.array(TILE_SMEM_FLOATS, np.float32, alignment=TILE_SMEM_ALIGN)
        acc = cuda.local.array((THREAD_M, THREAD_N), np.float32)
        m0, n0 = _dx_product(dz, w, rows_on_x, smem, acc)
        epilogue(act, acc, dx, act_in, m0, n0, ())

    return dense_dx_kernel


_dense_dx_kernel = _dx_kernel(_dx_epilogues(_DX_FROM_Y, False), False)
_dense_dx_masked_kernel = _dx_kernel(_dx_epilogues(_DX_FROM_Y, True), True)
_dense_dx_z_kernel = _dx_kernel(_dx_epilogues(_DX_FROM_Z, False), False)
_dense_dx_z_masked_kernel = _dx_kernel(_dx_epilogues(_DX_FROM_Z, True), True)


@_inlined
def _store_column_sums(db_part, column_sums, smem, n0):
    """db_part[n0 + c] = the block's sum of dz column n0 + c: the BLOCK_K thread groups (one per
    k row of a slice) meet in shared memory and are added in group order."""
    tid = cuda.threadIdx.x
    group = tid // WARP_SIZE
    lane = tid % WARP_SIZE
    for p in range(LOADS_PER_THREAD):
        smem[_u64(group * BLOCK_N + lane + p * WARP_SIZE)] = column_sums[p]
    cuda.syncthreads()
    if tid < BLOCK_N and n0 + tid < db_part.shape[0]:
        total = _ZERO
        for g in range(BLOCK_K):
            total += smem[_u64(g * BLOCK_N + tid)]
        db_part[_u64(n0 + tid)] = total


@_inlined
def _arrived_last(tickets, ticket, arrivals, is_last):
    """Publishes this block's stores and takes ``tickets[ticket]``; True, in every thread, for the
    last of the ``arrivals`` blocks taking it, which finds every other's stores visible and
    leaves the ticket at 0 for the next launch. The fences on both sides of the ticket order
    the other blocks' stores before this block's loads."""
    cuda.threadfence()
    cuda.syncthreads()
    if cuda.threadIdx.x == 0:
        last = cuda.atomic.add(tickets, ticket, np.uint32(1)) == arrivals - 1
        if last:
            tickets[ticket] = 0
        is_last[0] = last
    cuda.syncthreads()
    last = is_last[0] != 0
    if last:
        cuda.threadfence()
    return last


@_inlined
def _sum_partials(dw_parts, db_parts, first, step, count, dw, db, m0, n0):
    """The tile at (m0, n0) of dw = dw_parts[first] + dw_parts[first + step] + ... (``count``
    terms, added in that order), and in the first row of tiles its columns of db likewise."""
    rows = min(BLOCK_M, dw.shape[0] - m0)
    cols = min(BLOCK_N, dw.shape[1] - n0)
    for e in range(cuda.threadIdx.x, rows * cols, TILE_THREADS):
        r = _u64(m0 + e // cols)
        c = _u64(n0 + e % cols)
        total = _ZERO
        for s in range(count):
            total += dw_parts[_u64(first + s * step), r, c]
        dw[r, c] = total
    if m0 == 0:
        for e in range(cuda.threadIdx.x, cols, TILE_THREADS):
            c = _u64(n0 + e)
            total = _ZERO
            for s in range(count):
                total += db_parts[_u64(first + s * step), c]
            db[c] = total


@_inlined
def _split_k_finish(dw_parts, db_parts, tickets, dw, db, m0, n0, group_splits, is_last):
    """The split-K finish of the tile at (m0, n0) for this block's split (see the module
    docstring). dw_parts[s] (db_parts[s]) holds split s's partial for s < splits and, with more
    than one group, group g's sum at splits + g. tickets: a ticket per tile and group, then one
    per tile, all 0."""
    splits = cuda.gridDim.z
    groups = (splits + group_splits - 1) // group_splits
    group = cuda.blockIdx.z // group_splits
    first = group * group_splits
    tiles_n = (dw.shape[1] + BLOCK_N - 1) // BLOCK_N
    tiles = (dw.shape[0] + BLOCK_M - 1) // BLOCK_M * tiles_n
    tile = (m0 // BLOCK_M) * tiles_n + n0 // BLOCK_N
    if not _arrived_last(tickets, tile * groups + group, min(group_splits, splits - first), is_last):
        return
    if groups == 1:
        _sum_partials(dw_parts, db_parts, 0, 1, splits, dw, db, m0, n0)
        return
    _sum_partials(dw_parts, db_parts, first, 1, min(group_splits, splits - first),
                  dw_parts[_u64(splits + group)], db_parts[_u64(splits + group)], m0, n0)
    if _arrived_last(tickets, tiles * groups + tile, groups, is_last):
        _sum_partials(dw_parts, db_parts, splits, 1, groups, dw, db, m0, n0)


@_tile_kernel
def _dense_dw_kernel(x, dz, dw_parts, db_parts, tickets, dw, db, rows_per_split, group_splits, rows_on_x):
    """dw = x.T @ dz, db = dz.sum(0): x (B, in), dz (B, out) -> dw (in, out), db (out,).

    Grid (tile grid, splits): split s = blockIdx.z covers batch rows [s rows_per_split,
    (s+1) rows_per_split) and writes its partial dW tile to dw_parts[s] and, in the first row of
    tiles, its partial db to db_parts[s]. With one split those are dw and db themselves; with
    more, _split_k_finish sums them in groups of ``group_splits``.
    """
    smem = cuda.shared.array(TILE_SMEM_FLOATS, np.float32, alignment=TILE_SMEM_ALIGN)
    is_last = cuda.shared.array(1, np.int32)
    acc = cuda.local.array((THREAD_M, THREAD_N), np.float32)
    column_sums = cuda.local.array(LOADS_PER_THREAD, np.float32)
    for p in range(LOADS_PER_THREAD):
        column_sums[p] = _ZERO
    m0, n0 = _tile_origin(rows_on_x)
    split = cuda.blockIdx.z
    k_begin = split * rows_per_split
    k_end = min(k_begin + rows_per_split, x.shape[0])
    _zero_accumulators(acc)
    _dw_main_loop(x, dz, m0, n0, k_begin, k_end, smem, acc, column_sums)
    _store_tile(dw_parts[split], acc, m0, n0)
    if m0 == 0:
        _store_column_sums(db_parts[split], column_sums, smem, n0)
    if cuda.gridDim.z > 1:
        _split_k_finish(dw_parts, db_parts, tickets, dw, db, m0, n0, group_splits, is_last)


# ----------------------------------------------------------------------------- dense layer


def dense_precisions() -> tuple[str, ...]:
    """No tensor-core kernels: "tf32" and "bf16" compute fp32 here (bf16's operand rounding is
    emulated by the NumPy backend, the reference, not by these SIMT kernels)."""
    return ("fp32", "tf32", "bf16")


def dense_forward(x, w, b, act, out=None, out_z=None, precision="fp32", dropout=None):
    """``z = x @ w + b; y = act(z)``: x (B, in), w (in, out), b (out,) -> y (B, out), z or None.
    No tensor cores here: fp32 (float32 arrays only, ``DTYPES``) for every ``precision``. ``dropout``
    (a ``philox.Mask``): y is masked and scaled in the kernel's epilogue; z is not. (A softmax
    layer is the last layer, where no mask follows it.)"""
    _contract.dense_forward(x, w, b, out, out_z, act, dropout)
    _require_contiguous(out=out, out_z=out_z)
    x, w, b = _contiguous(x), _contiguous(w), _contiguous(b)
    record("dense_fwd")
    batch, out_features = x.shape[0], w.shape[1]
    y = out if out is not None else _new((batch, out_features), x)
    z = None
    if act in NEEDS_Z:
        z = out_z if out_z is not None else _new((batch, out_features), x)
    xv, yv = _view(x), _view(y)
    grid, rows_on_x = tile_grid(batch, out_features)
    args = (xv, _view(w), _view(b), yv, yv if z is None else _view(z), rows_on_x)
    if dropout is None:
        act_id = np.int32(ACT_ID["identity" if act == "softmax" else act])
        _dense_forward_kernel[grid, TILE_THREADS, xv.stream](*args, act_id)
    else:
        act_id = np.int32(ACT_ID[act])
        _dense_forward_masked_kernel[grid, TILE_THREADS, xv.stream](*args, act_id, *_mask_args(dropout))
    if act == "softmax":
        softmax_(y)
    return y, z


def _mask_args(dropout) -> tuple:
    """(key, threshold, scale, first_row) as the mask kernels take them."""
    return _view(dropout.key), np.uint64(dropout.threshold), np.float32(dropout.scale), np.int64(dropout.first_row)


def _apply_mask(src, dst, dropout) -> None:
    flat = _view(src).ravel()
    groups = src.shape[0] * -(-src.shape[1] // _GROUP)
    _mask_kernel[elementwise_blocks(groups, _sm_count(src)), ELEMENTWISE_THREADS, flat.stream](
        flat, _view(dst).ravel(), src.shape[1], *_mask_args(dropout))


def _masked_copy(src, dropout, out, trace_name: str):
    """``out = src * scale`` where ``dropout``'s mask keeps, else 0 (a new array when ``out`` is
    None), recorded as ``trace_name``."""
    _require_contiguous(out=out)
    src = _contiguous(src)
    record(trace_name)
    out = out if out is not None else _new(src.shape, src)
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
    if not (need_dx or need_dw or need_db):
        return []
    if dropout:
        dz = ["dropout_dz"]
    else:
        dz = ["softmax_bwd"] if act == "softmax" else ["dense_dz"] if act in _GRAD else []
    sums = ["dense_dw"] if need_dw else ["dense_db"] if need_db else []
    return dz + sums + (["dense_dx"] if need_dx else [])


def _dropout_dz(dy, act_in, act, dropout):
    """dz of a masked layer into this stream's dz scratch buffer, the mask regenerated."""
    record("dropout_dz")
    dz = _scratch("dz", dy.size, dy).reshape(dy.shape)
    flat = _view(dy).ravel()
    groups = dy.shape[0] * -(-dy.shape[1] // _GROUP)
    _dropout_dz_kernel(act)[elementwise_blocks(groups, _sm_count(dy)), ELEMENTWISE_THREADS, flat.stream](
        flat, flat if act_in is None else _view(act_in).ravel(), _view(dz).ravel(), dy.shape[1],
        *_mask_args(dropout), np.float32(dropout.keep_prob))
    return dz


def _dense_dz(dy, act_in, act):
    """dz = dy * act'(act_in) into this stream's dz scratch buffer, which the gradient kernels read."""
    record("dense_dz")
    dz = _scratch("dz", dy.size, dy).reshape(dy.shape)
    flat = _view(dy).ravel()
    _dense_dz_kernel(act)[elementwise_blocks(flat.size, _sm_count(dy)), ELEMENTWISE_THREADS, flat.stream](
        flat, _view(act_in).ravel(), _view(dz).ravel()
    )
    return dz


def _dense_dw(x, dz, dw, db, splits, rows_per_split, group_splits):
    """dw = x.T @ dz and db = dz.sum(0), the batch in ``splits`` chunks of ``rows_per_split`` rows
    whose partials are summed in groups of ``group_splits`` (see the module docstring)."""
    record("dense_dw")
    in_features, out_features = dw.shape
    grid, rows_on_x = tile_grid(in_features, out_features)
    groups = -(-splits // group_splits)
    tiles = grid[0] * grid[1]
    tickets = _scratch("split_tickets", tiles * (groups + 1), dz, np.uint32)
    if splits == 1:  # the kernel writes dw and db directly and reads none of the rest
        dw_parts, db_parts = dw.reshape(1, in_features, out_features), db.reshape(1, out_features)
    else:
        slots = splits + (groups if groups > 1 else 0)  # the splits' partials, then the groups' sums
        dw_parts = _scratch("dw_partials", slots * dw.size, dz).reshape(slots, in_features, out_features)
        db_parts = _scratch("db_partials", slots * db.size, dz).reshape(slots, out_features)
    dzv = _view(dz)
    _dense_dw_kernel[(*grid, splits), TILE_THREADS, dzv.stream](
        _view(x), dzv, _view(dw_parts), _view(db_parts), _view(tickets), _view(dw), _view(db),
        rows_per_split, group_splits, rows_on_x,
    )


@cuda.jit
def _dense_db_kernel(dz, sums, rows_per_split):
    """sums[s] = dz[rows of split s].sum(0), split s = blockIdx.y covering rows [s rows_per_split,
    (s + 1) rows_per_split): a block per ROW_LANES columns (blockIdx.x) of a split, lane l
    (threadIdx.x) its column, row group g (threadIdx.y) every ROWS_PER_BLOCK-th row of the split
    from its g-th, so a warp reads 32 consecutive floats of a row; the groups' sums are then added
    in group order (deterministic)."""
    partials = cuda.shared.array((ROWS_PER_BLOCK, ROW_LANES), np.float32)
    lane, group = cuda.threadIdx.x, cuda.threadIdx.y
    col = cuda.blockIdx.x * ROW_LANES + lane
    split = cuda.blockIdx.y
    begin = split * rows_per_split
    end = min(begin + rows_per_split, dz.shape[0])
    total = _ZERO
    if col < dz.shape[1]:
        for row in range(begin + group, end, ROWS_PER_BLOCK):
            total += dz[row, col]
    partials[group, lane] = total
    cuda.syncthreads()
    if group == 0 and col < dz.shape[1]:
        for g in range(1, ROWS_PER_BLOCK):
            total += partials[g, lane]
        sums[split, col] = total


# db alone splits the batch until its blocks fill the GPU (DB_BLOCKS_PER_SM of them per SM), in
# splits of at least DB_MIN_ROWS rows and at most DB_MAX_SPLITS, whose sums a second launch of
# the same kernel adds in split order: one block per 32 columns alone gave a 64-wide layer 2.
DB_BLOCKS_PER_SM, DB_MIN_ROWS, DB_MAX_SPLITS = 8, 64, 128


def db_splits(batch: int, n_out: int, sms: int) -> tuple[int, int]:
    """(splits, rows_per_split) of ``dense_db`` over a (batch, n_out) dz on ``sms`` SMs."""
    strips = -(-n_out // ROW_LANES)
    wanted = max(1, min(-(-DB_BLOCKS_PER_SM * sms // strips), -(-batch // DB_MIN_ROWS), DB_MAX_SPLITS))
    rows = -(-batch // wanted)
    return -(-batch // rows), rows


def _dense_db(dz, db):
    """db = dz.sum(0) for a layer whose bias trains under a frozen weight (no dW kernel): each
    split's column sums, then (more than one split) their sum in split order, deterministic."""
    record("dense_db")
    dzv, dbv = _view(dz), _view(db)
    batch, n_out = dz.shape
    strips = -(-n_out // ROW_LANES)
    splits, rows = db_splits(batch, n_out, _sm_count(dz))
    if splits == 1:
        _dense_db_kernel[(strips, 1), _ROW_BLOCK, dzv.stream](dzv, dbv.reshape(1, n_out), rows)
        return
    sums = _view(_scratch("db_splits", splits * n_out, dz)).reshape(splits, n_out)
    _dense_db_kernel[(strips, splits), _ROW_BLOCK, dzv.stream](dzv, sums, rows)
    _dense_db_kernel[(strips, 1), _ROW_BLOCK, dzv.stream](sums, dbv.reshape(1, n_out), splits)


def dense_backward(dy, x, w, y, z, act, need_dx, need_dw, out_dx=None, out_dw=None, out_db=None,
                   precision="fp32", dropout=None, dx_act="identity", dx_act_in=None, dx_dropout=None, need_db=None):
    """Gradients of ``y = act(x @ w + b)``; skips dW/db when ``need_dw`` is False, dX when ``need_dx`` is.
    ``need_db=True`` with ``need_dw=False``: db alone, in ``dense_db`` (a bias that trains under a
    frozen weight). ``dropout``: the ``philox.Mask`` the forward applied, so ``y`` holds the masked output.

    ``dx_act`` (the ``FOLDS_DX_ACT`` capability, one of its activations): the activation of the
    layer below, whose input gradient dx is; the dX kernel's epilogue multiplies dx by its
    derivative at ``dx_act_in`` (that layer's output, or its z for ``NEEDS_Z``'s activations), so
    dx comes back as that layer's dz, the bits its own ``dense_dz`` would form, and its backward
    then runs as identity's.
    ``dx_dropout``: the ``philox.Mask`` that layer's forward applied to its output (``dx_act_in``
    is then the masked output); the epilogue regenerates it as that layer's ``dropout_dz`` would,
    for identity too, and that layer's backward runs as an unmasked identity's."""
    _contract.dense_backward(dy, x, w, y, z, out_dx, out_dw, out_db, dx_act_in, act, need_dw, dropout, dx_act)
    if not (need_dx or need_dw or need_db):
        return None, None, None
    _require_contiguous(out_dx=out_dx, out_dw=out_dw, out_db=out_db)
    dy, x, w, y, z, dx_act_in = (_contiguous(a) for a in (dy, x, w, y, z, dx_act_in))
    if dropout is not None:
        dz = _dropout_dz(dy, z if act in NEEDS_Z else y, act, dropout)
    elif act == "softmax":
        dz = softmax_backward(dy, y, _scratch("dz", dy.size, dy).reshape(dy.shape))
    elif act in _GRAD:
        dz = _dense_dz(dy, z if act in NEEDS_Z else y, act)
    else:
        dz = dy
    dx = dw = db = None
    if need_dw:
        in_features, out_features = w.shape
        dw = out_dw if out_dw is not None else _new((in_features, out_features), dy)
        db = out_db if out_db is not None else _new((out_features,), dy)
        grid, _ = tile_grid(in_features, out_features)
        splits, rows_per_split = dw_splits(dy.shape[0], grid[0] * grid[1], _sm_count(dy))
        _dense_dw(x, dz, dw, db, splits, rows_per_split, dw_split_group(splits))
    elif need_db:
        db = out_db if out_db is not None else _new((w.shape[1],), dy)
        _dense_db(dz, db)
    if need_dx:
        record("dense_dx")
        batch, in_features = dy.shape[0], w.shape[0]
        dx = out_dx if out_dx is not None else _new((batch, in_features), dy)
        dzv, dxv = _view(dz), _view(dx)
        grid, rows_on_x = tile_grid(batch, in_features)
        # identity's epilogue never reads act_in: dx stands in for it
        args = (dzv, _view(w), dxv, dxv if dx_act == "identity" else _view(dx_act_in), rows_on_x,
                np.int32(ACT_ID[dx_act]))
        reads_z = dx_act in NEEDS_Z
        if dx_dropout is None:
            kernel = _dense_dx_z_kernel if reads_z else _dense_dx_kernel
            kernel[grid, TILE_THREADS, dzv.stream](*args)
        else:
            kernel = _dense_dx_z_masked_kernel if reads_z else _dense_dx_masked_kernel
            kernel[grid, TILE_THREADS, dzv.stream](*args, *_mask_args(dx_dropout), np.float32(dx_dropout.keep_prob))
    return dx, dw, db


# ----------------------------------------------------------------------------- row kernels


@_inlined
def _row_max_and_sum(x, row, in_rows, row_max, row_sum):
    """(m, s) of row ``row`` of x (B, C): its max and the sum of exp(x - m), over the ROW_LANES
    lanes (threadIdx.x) of the row's warp (threadIdx.y). Lane l keeps a running (max, sum) over
    columns l, l + 32, ...; a shared-memory tree (row_max, row_sum: (ROWS_PER_BLOCK, ROW_LANES))
    merges the lanes. Every thread of the block calls it; rows past B (not ``in_rows``) load nothing."""
    lane = cuda.threadIdx.x
    local_row = cuda.threadIdx.y
    running_max = _LOWEST
    running_sum = _ZERO
    if in_rows:
        for c in range(lane, x.shape[1], ROW_LANES):
            v = x[row, c]
            if v > running_max:
                # exp(v - v): 1, or NaN for v = inf, as the other backends' sums have it
                running_sum = running_sum * math.exp(running_max - v) + (v - v + _ONE)
                running_max = v
            else:
                running_sum += math.exp(v - running_max)
    row_max[local_row, lane] = running_max
    row_sum[local_row, lane] = running_sum
    cuda.syncthreads()
    stride = ROW_LANES // 2
    while stride > 0:
        if lane < stride:
            m1 = row_max[local_row, lane]
            m2 = row_max[local_row, lane + stride]
            s2 = row_sum[local_row, lane + stride]
            # An empty lane has sum 0; skipping it keeps the merge exact. A NaN sum (a NaN logit,
            # which never raises the max) is merged, so the row's sum is NaN as in loss.cu.
            if m2 > m1:
                row_sum[local_row, lane] = row_sum[local_row, lane] * math.exp(m1 - m2) + s2
                row_max[local_row, lane] = m2
            elif s2 != _ZERO:
                row_sum[local_row, lane] += s2 * math.exp(m2 - m1)
        cuda.syncthreads()
        stride //= 2
    return row_max[local_row, 0], row_sum[local_row, 0]


@_inlined
def _row_lane_sum(value, partials):
    """The sum of ``value`` over the ROW_LANES lanes of this thread's row, through shared
    ``partials`` (ROWS_PER_BLOCK, ROW_LANES); every thread of the block calls it."""
    lane = cuda.threadIdx.x
    local_row = cuda.threadIdx.y
    partials[local_row, lane] = value
    cuda.syncthreads()
    stride = ROW_LANES // 2
    while stride > 0:
        if lane < stride:
            partials[local_row, lane] += partials[local_row, lane + stride]
        cuda.syncthreads()
        stride //= 2
    return partials[local_row, 0]


_ROW_BLOCK = (ROW_LANES, ROWS_PER_BLOCK)


def row_blocks(rows: int) -> int:
    """Blocks of the row kernels (softmax, cross-entropy) for ``rows`` rows."""
    return -(-rows // ROWS_PER_BLOCK)


@cuda.jit
def _softmax_kernel(y):
    """In place, a warp per row of y (B, C): y[r] = exp(y[r] - max(y[r])) / sum."""
    row_max = cuda.shared.array((ROWS_PER_BLOCK, ROW_LANES), np.float32)
    row_sum = cuda.shared.array((ROWS_PER_BLOCK, ROW_LANES), np.float32)
    row = cuda.blockIdx.x * ROWS_PER_BLOCK + cuda.threadIdx.y
    in_rows = row < y.shape[0]
    m, total = _row_max_and_sum(y, row, in_rows, row_max, row_sum)
    if in_rows:
        inv_total = _ONE / total
        for c in range(cuda.threadIdx.x, y.shape[1], ROW_LANES):
            y[row, c] = math.exp(y[row, c] - m) * inv_total


@cuda.jit
def _softmax_backward_kernel(dy, y, out):
    """A warp per row: out[r] = y[r] * (dy[r] - <dy[r], y[r]>); out may be dy (the barrier in the
    row sum sits between every read of dy[r] for the dot product and the first write)."""
    partials = cuda.shared.array((ROWS_PER_BLOCK, ROW_LANES), np.float32)
    row = cuda.blockIdx.x * ROWS_PER_BLOCK + cuda.threadIdx.y
    in_rows = row < y.shape[0]
    dot = _ZERO
    if in_rows:
        for c in range(cuda.threadIdx.x, y.shape[1], ROW_LANES):
            dot += dy[row, c] * y[row, c]
    dot = _row_lane_sum(dot, partials)
    if in_rows:
        for c in range(cuda.threadIdx.x, y.shape[1], ROW_LANES):
            out[row, c] = y[row, c] * (dy[row, c] - dot)


def softmax_(y):
    """Row softmax of y (B, C) in place, a warp per row."""
    _require_contiguous(y=y)
    record("softmax_fwd")
    yv = _view(y)
    _softmax_kernel[row_blocks(yv.shape[0]), _ROW_BLOCK, yv.stream](yv)


def softmax_backward(dy, y, out):
    """``out = y * (dy - sum(dy * y, axis=1))``: the softmax Jacobian-vector product; ``out`` may be ``dy``."""
    _require_contiguous(out=out)
    _contract.same("dy", dy, y=y, out=out)
    dy, y = _contiguous(dy), _contiguous(y)  # out may be dy: contiguous then (checked), so not copied
    record("softmax_bwd")
    yv = _view(y)
    _softmax_backward_kernel[row_blocks(yv.shape[0]), _ROW_BLOCK, yv.stream](_view(dy), yv, _view(out))
    return out


# ----------------------------------------------------------------------------- losses


@_inlined
def _row_weight(weights, row):
    """Row ``row``'s weight: ``weights`` is (B,), or (1,) holding the 1 of an unweighted loss."""
    return weights[0] if weights.shape[0] == 1 else weights[row]


_unit_weights: dict[tuple, object] = {}  # per kind and device: the (1,) array holding 1.0


def _weights(sample_weight, like):
    """The loss kernels' weights: ``sample_weight`` (B,) or, without weights, one shared 1 on the
    device of ``like``."""
    if sample_weight is not None:
        return _view(_contiguous(sample_weight))
    key = (_is_cupy(like), _device_id(like))
    if key not in _unit_weights:
        if _is_cupy(like):
            cp = _cupy()
            with cp.cuda.Device(like.device.id):
                ones = cp.ones(1, np.float32)
                # Filled on the stream current now; later launches may be on another stream, so the
                # fill is waited for once here rather than ordered by each of them.
                cp.cuda.get_current_stream().synchronize()
                _unit_weights[key] = ones
        else:
            _unit_weights[key] = cuda.to_device(np.ones(1, np.float32))
    return _view(_unit_weights[key])


@_inlined
def _label_and_weight(labels, weights, row, classes):
    """Row ``row``'s label and weight; a label outside [0, classes) is read as 0 with a NaN weight, so
    the row's loss and gradient are NaN and no logit outside the row is read (loss.cu's rule: a
    check on the host would wait for the device)."""
    label = labels[row]
    if 0 <= label < classes:
        return label, _row_weight(weights, row)
    return 0, _NAN


@cuda.jit
def _softmax_cross_entropy_kernel(logits, labels, weights, grad, row_loss, inv_batch, label_smoothing):
    """Per row r of logits (B, C) with weight w_r and target t_r = (1 - eps) onehot(label_r) + eps / C
    (eps = ``label_smoothing``): row_loss[r] = w_r (logsumexp(x_r) - (1 - eps) x_r[label_r] - eps / C
    sum(x_r)), grad[r] = (softmax(x_r) - t_r) * w_r * inv_batch.

    A warp per row: _row_max_and_sum in one read of the row, then a second read (cached) writes
    the gradient. Rows past B join every barrier but load and store nothing. eps = 0 runs the
    one-hot code alone; eps > 0 also sums x - max over the row in the second read (a -inf logit
    then makes the row's loss +inf, as in PyTorch). A label outside [0, C) makes its row's loss and
    gradient NaN (``_label_and_weight``).
    """
    row_max = cuda.shared.array((ROWS_PER_BLOCK, ROW_LANES), np.float32)
    row_sum = cuda.shared.array((ROWS_PER_BLOCK, ROW_LANES), np.float32)
    partials = cuda.shared.array((ROWS_PER_BLOCK, ROW_LANES), np.float32)  # eps > 0: the row's sum
    C = logits.shape[1]
    row = cuda.blockIdx.x * ROWS_PER_BLOCK + cuda.threadIdx.y
    in_rows = row < logits.shape[0]
    m, total = _row_max_and_sum(logits, row, in_rows, row_max, row_sum)
    if label_smoothing == _ZERO:
        if in_rows:
            label, weight = _label_and_weight(labels, weights, row, C)
            scale = inv_batch * weight
            for c in range(cuda.threadIdx.x, logits.shape[1], ROW_LANES):
                p = math.exp(logits[row, c] - m) / total
                if c == label:
                    p -= _ONE
                grad[row, c] = p * scale
            if cuda.threadIdx.x == 0:
                row_loss[row] = (math.log(total) - (logits[row, label] - m)) * weight
    else:  # the same for every thread of the launch, so every thread meets _row_lane_sum's barriers
        off = label_smoothing / np.float32(logits.shape[1])
        on = _ONE - label_smoothing + off
        shifted_sum = _ZERO
        label = 0
        weight = _ZERO
        if in_rows:
            label, weight = _label_and_weight(labels, weights, row, C)
            scale = inv_batch * weight
            for c in range(cuda.threadIdx.x, logits.shape[1], ROW_LANES):
                shifted = logits[row, c] - m
                shifted_sum += shifted
                p = math.exp(shifted) / total
                grad[row, c] = (p - (on if c == label else off)) * scale
        shifted_sum = _row_lane_sum(shifted_sum, partials)
        if in_rows and cuda.threadIdx.x == 0:
            row_loss[row] = (math.log(total) - (_ONE - label_smoothing) * (logits[row, label] - m)
                             - off * shifted_sum) * weight


def _elementwise_loss_kernel(term):
    """The one pass of every elementwise loss, for ``term``: grid-stride over pred and target (n,),
    element i in row i // width of weight w (``_row_weight``);
    ``term(p, t, w, grad_scale, option) -> (loss, grad)`` gives the element's weighted loss, added
    to the thread's total, and its gradient, stored in grad[i]; block_sums[blockIdx] = the
    block's total. ``option`` is the loss's one parameter (Huber's delta), which the other terms
    ignore, so every loss launches with the same arguments. loss.cu's ``elementwise_loss`` with
    its term functors, as a factory."""

    @cuda.jit
    def elementwise_loss_kernel(pred, target, weights, width, grad, block_sums, grad_scale, option):
        partials = cuda.shared.array(REDUCE_THREADS, np.float32)
        total = _ZERO
        for i in range(cuda.grid(1), pred.size, cuda.gridsize(1)):
            loss, grad_i = term(pred[i], target[i], _row_weight(weights, i // width), grad_scale, option)
            total += loss
            grad[i] = grad_i
        total = _block_sum(total, partials, cuda.threadIdx.x)
        if cuda.threadIdx.x == 0:
            block_sums[cuda.blockIdx.x] = total

    return elementwise_loss_kernel


# The elementwise losses' terms: (w loss, w dloss/dp * grad_scale) of one element, grad_scale being
# 1/n times the constant the gradient carries (2 for the squared error).


@_inlined
def _squared_error(pred, target, weight, grad_scale, unused):
    """w (p - t)^2; gradient w (p - t) * 2/n."""
    diff = pred - target
    weighted = diff * weight
    return weighted * diff, weighted * grad_scale


@_inlined
def _absolute_error(pred, target, weight, grad_scale, unused):
    """w |d| with d = p - t; gradient w sign(d) / n, 0 where d is 0."""
    diff = pred - target
    sign = _ONE if diff > _ZERO else (-_ONE if diff < _ZERO else _ZERO)
    return abs(diff) * weight, sign * weight * grad_scale


@_inlined
def _huber_error(pred, target, weight, grad_scale, delta):
    """With d = p - t and c = clip(d, -delta, delta): w c (d - c / 2); gradient w c / n."""
    diff = pred - target
    # Not min(max(...)): on a GPU those are fminf/fmaxf, which return the operand that is not NaN
    # and would give a NaN prediction a finite gradient (the simulator's Python max would not).
    clipped = -delta if diff < -delta else (delta if diff > delta else diff)
    weighted = clipped * weight
    return weighted * (diff - _HALF * clipped), weighted * grad_scale


@_inlined
def _binary_cross_entropy(z, target, weight, grad_scale, unused):
    """On the logit z: w (max(z, 0) - z t + log1p(exp(-|z|))); gradient w (sigmoid(z) - t) / n."""
    loss = (math.log1p(math.exp(-abs(z))) + max(z, _ZERO) - z * target) * weight
    return loss, (_sigmoid(z) - target) * grad_scale * weight


@_inlined
def _poisson_nll(z, target, weight, grad_scale, unused):
    """On the log rate z: w (exp(z) - t z); gradient w (exp(z) - t) / n."""
    rate = math.exp(z)
    return (rate - z * target) * weight, (rate - target) * grad_scale * weight


_mse_kernel = _elementwise_loss_kernel(_squared_error)
_mae_kernel = _elementwise_loss_kernel(_absolute_error)
_huber_kernel = _elementwise_loss_kernel(_huber_error)
_bce_kernel = _elementwise_loss_kernel(_binary_cross_entropy)
_poisson_kernel = _elementwise_loss_kernel(_poisson_nll)


def softmax_cross_entropy(logits, labels, sample_weight=None, label_smoothing=0.0):
    """Mean softmax cross-entropy over the batch; logits (B, C), labels (B,) ints in [0, C), where
    another label makes the loss NaN (a check on the host would wait for the device);
    ``sample_weight`` (B,) weights each row's loss (summed over B, Keras's rule);
    ``label_smoothing`` eps: the target is (1 - eps) onehot + eps / C."""
    _contract.labelled_loss(logits, labels, sample_weight)
    record("ce_fwd_bwd")
    logits, labels = _contiguous(logits), _contiguous(labels)
    batch = logits.shape[0]
    grad = _new(tuple(logits.shape), logits)
    row_loss = _scratch("row_loss", batch, logits)
    lv = _view(logits)
    _softmax_cross_entropy_kernel[row_blocks(batch), _ROW_BLOCK, lv.stream](
        lv, _view(labels), _weights(sample_weight, logits), _view(grad), _view(row_loss), np.float32(1.0 / batch),
        np.float32(label_smoothing)
    )
    return float(to_host(row_loss).sum(dtype=np.float64)) / batch, grad


def _elementwise_loss(kernel, pred, target, sample_weight, grad_scale_times_n, option=0.0):
    """Launch a kernel of ``_elementwise_loss_kernel``; return (mean loss, grad)."""
    pred, target = _contiguous(pred), _contiguous(target)
    grad = _new(tuple(pred.shape), pred)
    flat = _view(pred).ravel()
    n = flat.size
    blocks = reduce_blocks(n, _sm_count(pred))
    block_sums = _scratch("block_sums", blocks, pred)
    # The row width maps an element to its row's weight; unweighted, the kernel reads the one
    # shared weight whatever it is, and pred may have any shape (1-D too: no shape[1]).
    width = pred.shape[1] if sample_weight is not None else 1
    kernel[blocks, REDUCE_THREADS, flat.stream](
        flat, _view(target).ravel(), _weights(sample_weight, pred), np.int64(width), _view(grad).ravel(),
        _view(block_sums), np.float32(grad_scale_times_n / n), np.float32(option)
    )
    return float(to_host(block_sums).sum(dtype=np.float64)) / n, grad


def mse(pred, target, sample_weight=None):
    """Mean squared error over all elements; ``sample_weight`` (B,) weights each row's errors."""
    _contract.loss("pred", pred, target, sample_weight)
    record("mse_fwd_bwd")
    return _elementwise_loss(_mse_kernel, pred, target, sample_weight, 2.0)


def mae(pred, target, sample_weight=None):
    """Mean absolute error over all elements, gradient sign(d) / n; ``sample_weight`` (B,)
    weights each row's errors."""
    _contract.loss("pred", pred, target, sample_weight)
    record("mae_fwd_bwd")
    return _elementwise_loss(_mae_kernel, pred, target, sample_weight, 1.0)


def huber(pred, target, sample_weight=None, delta=1.0):
    """Huber loss over all elements: c (d - c/2) with d = pred - target, c = clip(d, -delta,
    delta), gradient c / n; ``sample_weight`` (B,) weights each row's terms."""
    _contract.loss("pred", pred, target, sample_weight)
    record("huber_fwd_bwd")
    return _elementwise_loss(_huber_kernel, pred, target, sample_weight, 1.0, delta)


def bce(logits, target, sample_weight=None):
    """Binary cross-entropy on logits, mean over all elements: max(z,0) - z t + log1p(exp(-|z|));
    ``sample_weight`` (B,) weights each row's terms."""
    _contract.loss("logits", logits, target, sample_weight)
    record("bce_fwd_bwd")
    return _elementwise_loss(_bce_kernel, logits, target, sample_weight, 1.0)


def poisson(log_rate, target, sample_weight=None):
    """Poisson negative log-likelihood on log rates z, mean over all elements: exp(z) - t z,
    gradient (exp(z) - t) / n; ``sample_weight`` (B,) weights each row's terms."""
    _contract.loss("log_rate", log_rate, target, sample_weight)
    record("poisson_fwd_bwd")
    return _elementwise_loss(_poisson_kernel, log_rate, target, sample_weight, 1.0)


# ----------------------------------------------------------------------------- optimizers


@cuda.jit
def _sgd_kernel(param, grad, neg_lr, weight_decay):
    """param += neg_lr * (grad + weight_decay * param), all (n,)."""
    for i in range(cuda.grid(1), param.size, cuda.gridsize(1)):
        p = param[i]
        g = p * weight_decay + grad[i] if weight_decay != _ZERO else grad[i]
        param[i] = p + g * neg_lr


@cuda.jit
def _sgd_momentum_kernel(param, grad, velocity, neg_lr, momentum, nesterov, weight_decay):
    """g = grad + wd p; v = momentum v + g; param += neg_lr * (g + momentum v if nesterov else v)."""
    for i in range(cuda.grid(1), param.size, cuda.gridsize(1)):
        p = param[i]
        g = p * weight_decay + grad[i] if weight_decay != _ZERO else grad[i]
        v = velocity[i] * momentum + g
        velocity[i] = v
        step = v * momentum + g if nesterov else v
        param[i] = p + step * neg_lr


def sgd_update(param, grad, velocity, lr, momentum, nesterov, weight_decay):
    """In-place SGD step with PyTorch's semantics (momentum buffer, Nesterov, L2 decay)."""
    _require_contiguous(param=param, velocity=velocity)
    _contract.update(param, grad, _contract.sgd_state(momentum), velocity=velocity)
    record("sgd_update")
    p = _view(param).ravel()
    g = _view(_contiguous(grad)).ravel()
    launch = (elementwise_blocks(p.size, _sm_count(param)), ELEMENTWISE_THREADS, p.stream)
    # The kernels skip 0 * p for weight_decay 0: it is NaN where p is infinite.
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
        g = p * l2 + grad[i] if l2 != _ZERO else grad[i]
        mi = m[i] * beta1 + g * one_minus_beta1
        vi = v[i] * beta2 + g * one_minus_beta2 * g  # (1-b2) g first, as PyTorch: g * g overflows sooner
        m[i] = mi
        v[i] = vi
        param[i] = p + mi / (math.sqrt(vi) * inv_sqrt_bias2 + eps) * step_scale


def adam_update(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step, decoupled):
    """In-place Adam (``decoupled=False``) or AdamW step with PyTorch's semantics."""
    _require_contiguous(param=param, m=m, v=v)
    _contract.update(param, grad, _contract.ADAM_STATE, m=m, v=v)
    record("adam_update")
    p = _view(param).ravel()
    # AdamW decays the weights (decay < 1, l2 = 0); Adam adds wd * p to the gradient
    # (decay = 1, l2 = wd). Multiplying by 1 and adding 0 * p are exact, so one kernel serves all.
    decay = 1.0 - lr * weight_decay if decoupled else 1.0
    l2 = 0.0 if decoupled else weight_decay
    f32 = np.float32
    _adam_kernel[elementwise_blocks(p.size, _sm_count(param)), ELEMENTWISE_THREADS, p.stream](
        p, _view(_contiguous(grad)).ravel(), _view(m).ravel(), _view(v).ravel(), f32(decay), f32(l2),
        f32(beta1), f32(1.0 - beta1), f32(beta2), f32(1.0 - beta2),
        f32(1.0 / math.sqrt(1.0 - beta2**step)), f32(eps), f32(-lr / (1.0 - beta1**step)),
    )


@cuda.jit
def _rmsprop_kernel(param, grad, square_avg, grad_avg, momentum_buffer, neg_lr, alpha, one_minus_alpha, eps,
                    weight_decay, momentum, centered):
    """g = grad + wd p; v = alpha v + (1-alpha) g^2; centered: gm = alpha gm + (1-alpha) g,
    avg = sqrt(v - gm^2) + eps, else avg = sqrt(v) + eps; momentum: b = momentum b + g / avg,
    param += neg_lr * b, else param += neg_lr * g / avg."""
    for i in range(cuda.grid(1), param.size, cuda.gridsize(1)):
        p = param[i]
        g = p * weight_decay + grad[i] if weight_decay != _ZERO else grad[i]
        v = square_avg[i] * alpha + g * one_minus_alpha * g
        square_avg[i] = v
        variance = v
        if centered:
            gm = grad_avg[i] * alpha + g * one_minus_alpha
            grad_avg[i] = gm
            variance = v - gm * gm
        step = g / (math.sqrt(variance) + eps)
        if momentum != 0:
            step = momentum_buffer[i] * momentum + step
            momentum_buffer[i] = step
        param[i] = p + step * neg_lr


def rmsprop_update(param, grad, square_avg, grad_avg, momentum_buffer, lr, alpha, eps, weight_decay, momentum,
                   centered):
    """In-place RMSprop step with PyTorch's semantics (L2 decay, centered, momentum buffer)."""
    _require_contiguous(param=param, square_avg=square_avg, grad_avg=grad_avg,
                        momentum_buffer=momentum_buffer)
    _contract.update(param, grad, _contract.rmsprop_state(momentum, centered), square_avg=square_avg,
                     grad_avg=grad_avg, momentum_buffer=momentum_buffer)
    record("rmsprop_update")
    p = _view(param).ravel()
    v = _view(square_avg).ravel()
    # The kernel never reads grad_avg when not centered, nor momentum_buffer without momentum
    # (None then): the square average stands in, so one kernel serves every combination.
    grad_avg, momentum_buffer = (v if a is None else _view(a).ravel() for a in (grad_avg, momentum_buffer))
    g = _view(_contiguous(grad)).ravel()
    f32 = np.float32
    _rmsprop_kernel[elementwise_blocks(p.size, _sm_count(param)), ELEMENTWISE_THREADS, p.stream](
        p, g, v, grad_avg, momentum_buffer, f32(-lr), f32(alpha), f32(1.0 - alpha), f32(eps),
        f32(weight_decay), f32(momentum), bool(centered),
    )


# ----------------------------------------------------------------------------- kernel variants


class KernelVariant(NamedTuple):
    """One compiled kernel of this backend: ``name`` is what its launches are recorded as,
    ``variant`` the activation and flags it was specialised for ("" for a kernel with one),
    ``kernel`` the Numba dispatcher, ``signature`` the argument types the backend launches it
    with, ``threads`` its threads per block."""

    name: str
    variant: str
    kernel: object
    signature: tuple
    threads: int


def kernel_variants() -> list[KernelVariant]:
    """Every kernel variant this backend can launch: each kernel x flag, and x activation for the
    kernels compiled per activation (dense_dz, dropout_dz; the forward takes it at launch), with the
    argument types it is compiled for (float32 C-contiguous arrays; labels int32 or int64).
    Needs the real compiler's types (the simulator off): the compile test and the performance
    model compile each one with ``kernel_ptx``."""
    from numba.cuda import types

    f32, flag = types.float32, types.boolean
    v, m, p3 = (types.Array(f32, ndim, "C") for ndim in (1, 2, 3))
    tickets = types.Array(types.uint32, 1, "C")
    row_threads = ROW_LANES * ROWS_PER_BLOCK
    i32 = types.int32
    variants = [KernelVariant("dense_fwd", "", _dense_forward_kernel, (m, m, v, m, m, flag, i32), TILE_THREADS)]
    variants += [KernelVariant("dense_dz", act, _dense_dz_kernel(act), (v, v, v), ELEMENTWISE_THREADS)
                 for act in _GRAD]
    key, word, i64 = types.Array(types.uint32, 1, "C"), types.uint64, types.int64
    dx_masked = (m, m, m, m, flag, i32, key, word, f32, i64, f32)
    variants.append(KernelVariant("dense_fwd", "dropout", _dense_forward_masked_kernel,
                                  (m, m, v, m, m, flag, i32, key, word, f32, i64), TILE_THREADS))
    variants += [KernelVariant("dropout_dz", act, _dropout_dz_kernel(act), (v, v, v, i64, key, word, f32, i64, f32),
                               ELEMENTWISE_THREADS) for act in _FORWARD]
    variants.append(KernelVariant("dropout_fwd", "", _mask_kernel, (v, v, i64, key, word, f32, i64),
                                  ELEMENTWISE_THREADS))
    variants += [
        KernelVariant("dense_dw", "", _dense_dw_kernel, (m, m, p3, m, tickets, m, v, types.int64, types.int64, flag),
                      TILE_THREADS),
        KernelVariant("dense_db", "", _dense_db_kernel, (m, m, types.int64), row_threads),
        KernelVariant("dense_dx", "", _dense_dx_kernel, (m, m, m, m, flag, i32), TILE_THREADS),
        KernelVariant("dense_dx", "dropout", _dense_dx_masked_kernel, dx_masked, TILE_THREADS),
        KernelVariant("dense_dx", "reads_z", _dense_dx_z_kernel, (m, m, m, m, flag, i32), TILE_THREADS),
        KernelVariant("dense_dx", "reads_z,dropout", _dense_dx_z_masked_kernel, dx_masked, TILE_THREADS),
        KernelVariant("softmax_fwd", "", _softmax_kernel, (m,), row_threads),
        KernelVariant("softmax_bwd", "", _softmax_backward_kernel, (m, m, m), row_threads),
    ]
    variants += [KernelVariant("ce_fwd_bwd", f"labels_{label.name}", _softmax_cross_entropy_kernel,
                               (m, types.Array(label, 1, "C"), v, m, v, f32, f32), row_threads)
                 for label in (types.int32, types.int64)]
    loss_args = (v, v, v, types.int64, v, v, f32, f32)
    variants += [
        KernelVariant("mse_fwd_bwd", "", _mse_kernel, loss_args, REDUCE_THREADS),
        KernelVariant("mae_fwd_bwd", "", _mae_kernel, loss_args, REDUCE_THREADS),
        KernelVariant("huber_fwd_bwd", "", _huber_kernel, loss_args, REDUCE_THREADS),
        KernelVariant("bce_fwd_bwd", "", _bce_kernel, loss_args, REDUCE_THREADS),
        KernelVariant("poisson_fwd_bwd", "", _poisson_kernel, loss_args, REDUCE_THREADS),
        KernelVariant("sumsq", "", _sumsq_kernel, (v, v), REDUCE_THREADS),
        KernelVariant("scale", "", _scale_kernel, (v, f32), ELEMENTWISE_THREADS),
        KernelVariant("sgd_update", "", _sgd_kernel, (v, v, f32, f32), ELEMENTWISE_THREADS),
        KernelVariant("sgd_update", "momentum", _sgd_momentum_kernel, (v, v, v, f32, f32, flag, f32),
                      ELEMENTWISE_THREADS),
        KernelVariant("adam_update", "", _adam_kernel, (v, v, v, v) + (f32,) * 9, ELEMENTWISE_THREADS),
        KernelVariant("rmsprop_update", "", _rmsprop_kernel, (v,) * 5 + (f32,) * 6 + (flag,), ELEMENTWISE_THREADS),
    ]
    return variants


_NO_GPU_COMPILE = threading.Lock()


@contextlib.contextmanager
def _device_functions_compiled_for(cc: tuple[int, int]):
    """numba-cuda compiles a device function that a kernel calls (one Numba does not inline:
    ``_inlined``) for the current device's compute capability, which ``compile_ptx`` without a
    GPU cannot ask for. Without one, the device functions are compiled for ``cc`` meanwhile. (In
    these kernels cc picks nothing: numba-cuda reads it for fastmath's tanh, which they do not
    use, and for float64 atomics below sm_60.) With a GPU they are compiled for it, as a launch
    compiles them, and shared with the launches."""
    from numba.cuda import dispatcher

    if cuda.is_available():
        yield
        return
    with _NO_GPU_COMPILE:
        current = dispatcher.get_current_device
        dispatcher.get_current_device = lambda: SimpleNamespace(compute_capability=cc)
        try:
            yield
        finally:
            dispatcher.get_current_device = current


def kernel_ptx(kernel, signature: tuple, cc: tuple[int, int] = (9, 0)) -> str:
    """The PTX Numba compiles the dispatcher ``kernel`` to for the argument types ``signature``
    and compute capability ``cc``, with the launch bounds the dispatcher compiles with (they cap
    the registers); no GPU needed (libNVVM is). A ``KernelVariant`` is
    ``kernel_ptx(v.kernel, v.signature)``."""
    with _device_functions_compiled_for(cc):
        ptx, _ = cuda.compile_ptx(kernel.py_func, signature, cc=cc,
                                  launch_bounds=kernel.targetoptions.get("launch_bounds"))
    return ptx
