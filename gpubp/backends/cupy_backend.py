"""CuPy backend: the hand-written CUDA C++ kernels in ``kernels/*.cu``, launched through CuPy.

Implements the kernel contract of ``gpubp.backends`` on ``cupy.ndarray`` (float32,
C-contiguous); it is the default backend when a GPU is present. The kernels:

- ``dense_forward.cu``: one tiled SGEMM with the bias and activation in its epilogue;
- ``dense_forward_tf32.cu``, ``dense_backward_tf32.cu``: the same kernels on TF32 tensor cores
  (``precision="tf32"``) and on bf16 ones (``precision="bf16"``, their operands rounded to bf16 by
  ``round_bf16`` first), one pipelined GEMM (``gemm_tf32.cuh``) for both;
- ``dense_backward.cu``: ``dz = dy * act'(.)`` once per element (``dense_dz``, skipped for
  identity), then ``dx = dz @ W.T`` and ``dW = x.T @ dz`` with ``db`` reduced inside the dW
  kernel (split over the batch, reduced deterministically, when the layer is too small to
  fill the GPU);
- ``loss.cu``: softmax cross-entropy, MSE and BCE, value and gradient in one pass;
- softmax output layers: the identity kernels around ``softmax_``/``softmax_backward``,
  which are CuPy array operations (no hand-written kernel);
- ``optim.cu``: SGD and Adam/AdamW updates, plus ``sumsq`` and ``scale_`` for clipping;
- ``dropout.cu``: dropout masks (Philox4x32-10, ``philox.cuh``) applied after the Dense forward
  and regenerated before its gradient kernels, never stored (see the dropout section below);
- ``fused_mlp.cu``: a whole MLP whose layers are at most ``FUSED_MLP_MAX_WIDTH`` wide, forward
  in one launch and backward in two (``fused_mlp_forward``/``fused_mlp_backward``, the optional
  fused capability of the backend contract).

Where the kernels come from, per source file, on first use on each device:

1. the ahead-of-time fatbin that ``cmake --build build && cmake --install build`` puts in
   ``gpubp/_aot/`` (or the folder named by ``GPUBP_AOT_DIR``), when its manifest lists
   this GPU's architecture and its source hashes match the shipped sources (a stale
   fatbin is never used) and the driver loads it;
2. otherwise NVRTC compiles the shipped source (cached on disk by CuPy) with ``NVRTC_OPTIONS``,
   the flags the fatbins are built with. The local ``#include`` lines are expanded here first,
   so the text CuPy hashes for its cache is the whole program.

The kernels have ``extern "C"`` names (``dense_fwd_relu_128x128``, ...), identical on
both paths, listed per file in ``KERNELS``; all of a file's kernels are looked up when it
loads. Each launch records its contract name with ``gpubp.trace``. Kernels go to
CuPy's current stream; the deterministic reductions share one ticket buffer per device,
so calls must not run concurrently on two streams of one device.

>>> import numpy as np
>>> from gpubp.backends import cupy_backend as cb
>>> x = cb.asarray(np.ones((3, 2), np.float32)); w = cb.asarray(np.ones((2, 4), np.float32))
>>> y, z = cb.dense_forward(x, w, cb.zeros((4,)), "relu")   # doctest: +SKIP
>>> cb.to_host(y).tolist()[0]                                # doctest: +SKIP
[2.0, 2.0, 2.0, 2.0]
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import math
import os
import re
from pathlib import Path

import numpy as np

from gpubp.activations import ACT_ID, NEEDS_Z
from gpubp.trace import record

try:
    import cupy
except ImportError as _exc:  # the CPU install has no CuPy: report it, never raise on import
    cupy = None
    _IMPORT_ERROR = f"CuPy is not installed ({_exc})"
else:
    _IMPORT_ERROR = None

NAME = "cupy"
DEVICE = "cuda"
DTYPES = (np.float32,)

log = logging.getLogger("gpubp")

AOT_ENV = "GPUBP_AOT_DIR"  # where the CMake-built fatbins are, when not gpubp/_aot
KERNEL_DIR_ENV = "GPUBP_KERNEL_DIR"  # where the kernel sources are, when not the shipped ones
AOT_MANIFEST = "manifest.txt"

# Mirrors of the constants in kernels/gemm_tile.cuh and kernels/reduce.cuh.
GEMM_TILES = {(128, 128): 256, (128, 64): 128}  # fp32 block tile (BM, BN) -> threads per block
TF32_TILE, TF32_THREADS, TF32_BK, TF32_STAGES = 128, 256, 32, 3  # kernels/gemm_tf32.cuh (Tf32Tile)
# Dynamic shared memory of the TF32 GEMMs: STAGES x (A tile + B tile) floats, a k-contiguous tile
# being 128 x 32 and an outer-contiguous one 32 x (128 + 8) (gemm_tf32.cuh's layouts). Forward
# reads x k-contiguous and W outer-contiguous, dX dz and W^T k-contiguous, dW x^T and dz outer.
_TF32_K_TILE, _TF32_OUTER_TILE = TF32_TILE * TF32_BK, TF32_BK * (TF32_TILE + 8)
TF32_SHARED_BYTES = {kind: TF32_STAGES * 4 * (a + b) for kind, (a, b) in {
    "fwd": (_TF32_K_TILE, _TF32_OUTER_TILE), "dx": (_TF32_K_TILE, _TF32_K_TILE),
    "dw": (_TF32_OUTER_TILE, _TF32_OUTER_TILE)}.items()}
# The bf16 GEMMs (MmaTile<bf16>): the same tile, its k step 64 elements (128 bytes, as TF32's 32
# floats), so their shared tiles take the same bytes; operands padded to BF16_ROW columns (32 bytes).
BF16_BK, BF16_ROW = 64, 16
ROUND_THREADS, MAX_GRID_Y = 256, 65535  # round_bf16's block; CUDA's grid.y limit
DZ_COLUMNS, DZ_THREADS = 32, 256  # kernels/dense_backward_tf32.cu's dense_dz_db (DzShape)
BK = 16  # the k step of the fp32 GEMM main loop (gemm_tile.cuh's BK): dW batch chunks are multiples of it
REDUCE_THREADS = 256
MAX_REDUCE_BLOCKS = 1024
# dW split-K: split only when the layer has fewer tiles than the GPU has SMs; aim at
# SPLIT_WAVES blocks per SM, keep at least MIN_ROWS_PER_SPLIT batch rows per split (the
# partial tiles cost splits x in x out floats of traffic), and never more than MAX_SPLITS.
SPLIT_WAVES = 2
MIN_ROWS_PER_SPLIT = 256
MAX_SPLITS = 32
ELEMENTWISE_BLOCKS_PER_SM = 16
# Mirrors of kernels/fused_mlp.cu's Fused constants and plan layout.
FUSED_MLP_MAX_WIDTH = 128
FUSED_MLP_MAX_LAYERS = 8
# Batch rows per fwd/bwd block and dW rows per dw block, in every precision (fp32: a 64 x 128
# block tile; tensor cores, MmaRows: 16 rows per warp).
FUSED_ROWS, FUSED_THREADS = 64, 128
# The tensor-core fwd/bwd: a dynamic shared B stage of (128 / mma k) k-steps x 8 tile pairs x 128
# words, and per warp an A/Z buffer of 16 x 136 words (two for a forward whose input is wider than 128).
_FUSED_MMA_K = {"tf32": 8, "bf16": 16}
_FUSED_A_WORDS = (FUSED_THREADS // 32) * 16 * (FUSED_MLP_MAX_WIDTH + 8)
_PLAN_HEAD = 4
# precision -> kernel name suffix; tf32 and bf16 run on tensor cores (sm_80 and newer)
FUSED_PRECISIONS = {"fp32": "", "tf32": "_tf32", "bf16": "_bf16"}
_STORE_H, _STORE_Z, _TRAINABLE = 1, 2, 4
_TICKETS = 4096  # slot 0: reductions (loss, sumsq); slots 1..: dW split-K tiles

_LOCAL_INCLUDE = re.compile(r'\s*#\s*include\s+"([^"]+)"\s*')

# What NVRTC compiles with, besides the -arch CuPy picks for the GPU. CMakeLists.txt builds the
# fatbins with the same (GPUBP_CODEGEN_FLAGS), so a kernel computes the same from either path:
# -ftz=true because CuPy adds it to every NVRTC compile (fp32 subnormals flush to zero).
NVRTC_OPTIONS = ("-std=c++17", "-ftz=true")


def _dense_name(kind: str, act: str, precision: str, tile: tuple[int, int] = (TF32_TILE, TF32_TILE)) -> str:
    """The extern "C" name of a dense kernel: ``kind`` "fwd", "dx" or "dw". The fp32 dX and dW
    kernels read dz (``dense_dz``), so they are the same for every activation."""
    if precision in ("tf32", "bf16"):
        return f"dense_{kind}_{precision}_{act}"
    return f"dense_{kind}_{act}_{tile_name(tile)}" if kind == "fwd" else f"dense_{kind}_{tile_name(tile)}"


def tile_name(tile: tuple[int, int]) -> str:
    """"128x64" for an fp32 block tile (BM, BN)."""
    return f"{tile[0]}x{tile[1]}"


def _fused_name(kind: str, precision: str, act: str | None = None) -> str:
    """The extern "C" name of a fused MLP kernel: ``kind`` "fwd" or "bwd" (one per activation ``act``,
    the one activation its layers apply besides identity) or "dw" (no activation)."""
    return f"fused_mlp_{kind}{FUSED_PRECISIONS[precision]}" + ("" if act is None else f"_{act}")


# Every extern "C" kernel of each source file (tests/test_kernels_on_cpu.py checks this against the
# sources). All of a file's kernels are looked up when the file loads: with lazy loading (the CUDA
# default since 12.2) the first lookup of a kernel is what loads it, and drivers before 12.3 refuse
# that inside a CUDA-graph capture, where a kernel used only by captured steps would first be asked for.
KERNELS = {
    "dense_forward.cu": tuple(_dense_name("fwd", act, "fp32", tile) for act in ACT_ID for tile in GEMM_TILES),
    "dense_backward.cu": tuple(f"dense_dz_{act}" for act in ACT_ID if act != "identity")
                         + tuple(_dense_name(kind, "identity", "fp32", tile) for kind in ("dx", "dw") for tile in GEMM_TILES),
    "dense_forward_tf32.cu": tuple(_dense_name("fwd", act, p) for act in ACT_ID for p in ("tf32", "bf16"))
    + ("round_bf16",),
    "dense_backward_tf32.cu": tuple(f"dense_dz_db_{act}" for act in ACT_ID)
    + tuple(_dense_name(kind, act, p) for act in ACT_ID for kind in ("dx", "dw") for p in ("tf32", "bf16")),
    "fused_mlp.cu": tuple(_fused_name(kind, precision, act) for precision in FUSED_PRECISIONS
                          for kind in ("fwd", "bwd") for act in ACT_ID)
    + tuple(_fused_name("dw", precision) for precision in FUSED_PRECISIONS),
    "loss.cu": tuple(f"{loss}{weighting}{labels}" for weighting in ("", "_weighted")
                     for loss, labels in (("ce_fwd_bwd", "_i32"), ("ce_fwd_bwd", "_i64"), ("mse_fwd_bwd", ""),
                                          ("bce_fwd_bwd", ""))),
    "optim.cu": ("sgd_update", "sgd_update_hyper", "adam_update", "adam_update_hyper", "sumsq", "scale_inplace"),
    "dropout.cu": ("dropout_mask", "philox_words") + tuple(f"dropout_dz_{act}" for act in ACT_ID),
}
KERNEL_FILES = tuple(KERNELS)


def unavailable_reason() -> str | None:
    """None when CuPy imports and sees a CUDA GPU, else why not (never raises)."""
    from gpubp.backends import INSTALL_HINT

    if cupy is None:
        return f"{_IMPORT_ERROR}; {INSTALL_HINT}"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError, a missing driver library, ...
        return f"CuPy cannot reach a CUDA GPU: {exc}"
    if count == 0:
        return "CuPy sees no CUDA GPU"
    return None


# ----------------------------------------------------------------------------- kernel sources


def kernel_dir() -> Path:
    """The folder holding the CUDA sources: ``GPUBP_KERNEL_DIR`` when set (a working copy to
    test, as the CPU kernel harness does), else the installed ``gpubp.kernels`` package, else
    the top-level ``kernels/`` of a source checkout."""
    override = os.environ.get(KERNEL_DIR_ENV)
    if override:
        return Path(override)
    try:
        installed = importlib.resources.files("gpubp.kernels")
    except ModuleNotFoundError:
        installed = None
    if installed is not None:
        # gpubp.kernels has no __init__.py, so this may be a namespace package's
        # MultiplexedPath; joinpath gives a concrete file path in either case.
        probe = installed.joinpath(KERNEL_FILES[0])
        if probe.is_file():
            return Path(str(probe)).parent
    return Path(__file__).resolve().parents[2] / "kernels"


def kernel_source(filename: str, root: Path | None = None) -> str:
    """The source of ``kernels/<filename>`` (in ``root``, default ``kernel_dir()``) with its local
    ``#include "..."`` lines expanded (each header once, as its ``#pragma once`` asks), ready for
    NVRTC. ``#line`` directives keep every file's own name and line numbers in compiler messages."""
    root = root or kernel_dir()
    seen: set[str] = set()

    def expand(name: str) -> str:
        seen.add(name)
        lines = [f'#line 1 "{name}"']
        for number, line in enumerate((root / name).read_text().splitlines(), start=1):
            match = _LOCAL_INCLUDE.fullmatch(line)
            if match is None:
                lines.append(line)
            elif match.group(1) in seen:
                lines.append("")  # keeps the numbering without a #line
            else:
                lines.append(expand(match.group(1)))
                lines.append(f'#line {number + 1} "{name}"')
        return "\n".join(lines) + "\n"

    return expand(filename)


def source_hashes() -> dict[str, str]:
    """sha256 of every shipped kernel source, by file name (what the AOT manifest records)."""
    root = kernel_dir()
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.iterdir())
        if p.suffix in (".cu", ".cuh")
    }


def aot_dir() -> Path:
    return Path(os.environ.get(AOT_ENV) or Path(__file__).resolve().parents[1] / "_aot")


def _aot_mismatch(arch: str) -> str | None:
    """None when the AOT fatbins can serve compute capability ``arch`` (e.g. "90"), else why not."""
    manifest = aot_dir() / AOT_MANIFEST
    if not manifest.is_file():
        return f"no {manifest}"
    archs: list[str] = []
    built: dict[str, str] = {}
    for line in manifest.read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "archs":
            archs = value.split()
        elif key == "source":
            digest, _, name = value.partition(" ")
            built[name] = digest
    if arch not in archs:
        return f"built for sm_{', sm_'.join(archs)}, not sm_{arch}"
    if built != source_hashes():
        return "built from other kernel sources than the shipped ones (rebuild it)"
    return None


# ----------------------------------------------------------------------------- loading

_rawmodules: dict[tuple[int, str], object] = {}
_functions: dict[tuple[int, str], object] = {}
_device_state: dict[int, dict] = {}
_captured_arrays: list | None = None  # while a graph is captured: every launch's arguments
origin: dict[str, str] = {}  # kernel file -> "fatbin" or "nvrtc", as loaded


def _rawmodule(filename: str):
    """The loaded module of ``kernels/<filename>`` on the current device, with every kernel of it
    looked up (in ``_functions``): from the AOT fatbin when it serves this GPU, else from NVRTC."""
    device = cupy.cuda.Device()
    key = (device.id, filename)
    module = _rawmodules.get(key)
    if module is not None:
        return module
    arch = device.compute_capability
    why_not = _aot_mismatch(arch)
    if why_not is None:
        fatbin = aot_dir() / (Path(filename).stem + ".fatbin")
        try:
            module = cupy.RawModule(path=str(fatbin))
            functions = _look_up_kernels(module, filename)
            origin[filename] = "fatbin"
        except cupy.cuda.driver.CUDADriverError as exc:  # e.g. a driver older than the toolkit
            why_not = f"the driver refused {fatbin}: {exc}"
            module = None
    if module is None:
        log.debug("gpubp: compiling %s with NVRTC (AOT fatbin unused: %s)", filename, why_not)
        module = cupy.RawModule(code=kernel_source(filename), options=NVRTC_OPTIONS)
        functions = _look_up_kernels(module, filename)
        origin[filename] = "nvrtc"
    for name, function in functions.items():
        shared = _dynamic_shared_bytes(name)
        if shared > DEFAULT_SHARED_LIMIT:  # opt in once, when the kernel is loaded
            function.max_dynamic_shared_size_bytes = shared
        _functions[(device.id, name)] = _Launch(function)
    _rawmodules[key] = module
    return module


DEFAULT_SHARED_LIMIT = 48 * 1024  # dynamic shared memory a kernel may take without opting in


def _dynamic_shared_bytes(name: str) -> int:
    """The dynamic shared memory kernel ``name`` is launched with (0 for all but the tensor-core
    GEMMs, where a bf16 tile takes the bytes of a TF32 one, and the fused kernels, these at an
    input of at most 128 features)."""
    match = re.fullmatch(r"dense_(fwd|dx|dw)_(tf32|bf16)_\w+", name)
    if match:
        return TF32_SHARED_BYTES[match.group(1)]
    fused = re.fullmatch(r"fused_mlp_(fwd|bwd|dw)(_tf32|_bf16)?(_[a-z_]+)?", name)
    if fused:
        precision = (fused.group(2) or "_fp32")[1:]
        return _fused_shared_bytes(fused.group(1), precision, FUSED_MLP_MAX_WIDTH)
    return 0


def _look_up_kernels(module, filename: str) -> dict:
    """Every kernel of ``filename`` from its module; the first lookup compiles (NVRTC) or loads it."""
    return {name: module.get_function(name) for name in KERNELS[filename]}


class _Launch:
    """A kernel, called as CuPy's RawKernel is. While a graph is being captured, each launch's
    arguments stay referenced by that graph: replays write through the captured pointers, so
    no array a captured kernel touches may go back to the memory pool while the graph lives."""

    __slots__ = ("function",)

    def __init__(self, function) -> None:
        self.function = function

    def __call__(self, grid, block, args, **kwargs) -> None:
        if _captured_arrays is not None:
            _captured_arrays.append(args)
        self.function(grid, block, args, **kwargs)


def _kernel(filename: str, name: str) -> _Launch:
    key = (cupy.cuda.Device().id, name)
    if key not in _functions:
        _rawmodule(filename)
    return _functions[key]


def _state() -> dict:
    """Per-device persistent buffers: SM count, reduction tickets/partials, dW workspace."""
    device = cupy.cuda.Device()
    state = _device_state.get(device.id)
    if state is None:
        state = _device_state[device.id] = {
            "sms": device.attributes["MultiProcessorCount"],
            "tickets": cupy.zeros(_TICKETS, np.uint32),
            "partials": cupy.empty(MAX_REDUCE_BLOCKS, np.float32),
            "scalar": cupy.empty(1, np.float32),
            "workspace": cupy.empty(0, np.float32),
        }
    return state


def _workspace(size: int):
    state = _state()
    if state["workspace"].size < size:
        state["workspace"] = cupy.empty(size, np.float32)
    return state["workspace"]


def _f32(a):
    """``a`` as a C-contiguous float32 CuPy array, without a copy when it already is one.

    The raw kernels index flat float32 memory from the array's data pointer, so a strided
    view (a transpose, a column slice, a step) or a float64 array would be read as garbage.
    The layer API and the losses hand user CuPy arrays over unchanged (any strides; the
    losses any float dtype), so read-only inputs are normalized here. In-place operands
    (parameters, optimizer state, ``out`` buffers) are the backend's own contiguous arrays."""
    return asarray(a, dtype=np.float32)


def _blocks(work: int, threads: int, cap: int) -> int:
    return max(1, min(-(-work // threads), cap))


def _gemm_tile(m: int, n: int) -> tuple[int, int]:
    """128x128 tiles when they make at least one full wave on this GPU, else 128x64."""
    big = max(GEMM_TILES)
    tiles = -(-m // big[0]) * (-(-n // big[1]))
    return big if tiles >= _state()["sms"] else min(GEMM_TILES)


# ----------------------------------------------------------------------------- array helpers


def empty(shape, dtype=np.float32):
    return cupy.empty(shape, dtype)


def zeros(shape, dtype=np.float32):
    return cupy.zeros(shape, dtype)


def asarray(a, dtype=None):
    return cupy.ascontiguousarray(cupy.asarray(a, dtype=dtype))


def to_host(a) -> np.ndarray:
    return cupy.asnumpy(a)


def synchronize() -> None:
    cupy.cuda.get_current_stream().synchronize()


def is_array(a) -> bool:
    return cupy is not None and isinstance(a, cupy.ndarray)


def _reduce_to_float(filename: str, name: str, trace_name: str, grid: int, arrays: tuple, sizes: tuple,
                     out_loss=None):
    """Launch a kernel that ends in reduce.cuh's grid_sum_to, ``name(*arrays, partials,
    ticket, out, *sizes)``, and return the scalar it reduced: a float, or ``out_loss``, a
    (1,) float32 array it was written to, when given (then nothing is read back)."""
    state = _state()
    out = state["scalar"] if out_loss is None else _device_floats(out_loss, "out_loss")
    record(trace_name)
    _kernel(filename, name)((grid,), (REDUCE_THREADS,), arrays + (state["partials"], state["tickets"], out) + sizes)
    return float(out.get()[0]) if out_loss is None else out_loss


def _device_floats(a, name: str, size: int = 1):
    """``a``, checked to be what a kernel reads or writes through one pointer (a loss, a rate):
    a contiguous float32 CuPy array of shape ``(size,)``."""
    if not (is_array(a) and a.dtype == np.float32 and a.shape == (size,) and a.flags.c_contiguous):
        raise ValueError(f"{name}: expected a contiguous float32 CuPy array of shape ({size},), got "
                         f"{getattr(a, 'dtype', type(a))} {getattr(a, 'shape', '')}")
    return a


def sumsq(*arrays) -> float:
    total = 0.0
    for a in arrays:
        a = _f32(a)
        n = a.size
        grid = _blocks(n, REDUCE_THREADS, MAX_REDUCE_BLOCKS)
        total += _reduce_to_float("optim.cu", "sumsq", "sumsq", grid, (a,), (np.int64(n),))
    return total


def scale_(a, s: float) -> None:
    n = a.size
    record("scale")
    _kernel("optim.cu", "scale_inplace")(
        (_elementwise_blocks(n),), (REDUCE_THREADS,), (a, np.float32(s), np.int64(n))
    )


def _elementwise_blocks(n: int) -> int:
    return _blocks(n, REDUCE_THREADS, ELEMENTWISE_BLOCKS_PER_SM * _state()["sms"])


# ----------------------------------------------------------------------------- dense layer


def dense_forward(x, w, b, act, out=None, out_z=None, precision="fp32"):
    """``z = x @ w + b; y = act(z)``: x (B, in), w (in, out), b (out,) -> y (B, out), z or None.

    ``precision="tf32"`` runs the products on TF32 tensor cores (sm_80 and newer;
    ``kernels/dense_forward_tf32.cu``): x and w rounded to 10 mantissa bits, fp32 accumulation,
    about 1e-3 relative error (``Sequential(precision="tf32")`` selects it). ``precision="bf16"``:
    x and w rounded to bf16 (8 mantissa bits, round to nearest even) by ``round_bf16``, then the
    products on bf16 tensor cores with fp32 accumulation, about 1e-2 relative error."""
    x, w, b = _f32(x), _f32(w), _f32(b)
    batch, n_in = x.shape
    n_out = w.shape[1]
    y = out if out is not None else cupy.empty((batch, n_out), np.float32)
    z = None
    if act in NEEDS_Z:
        z = out_z if out_z is not None else cupy.empty((batch, n_out), np.float32)
    kernel, grid, block, shared = _gemm_launch("fwd", "identity" if act == "softmax" else act, batch, n_out,
                                               precision)
    if precision == "bf16":
        x, w = _round_bf16(x), _round_bf16(w, _bf16_ld(n_in))
    record("dense_fwd")
    kernel(
        grid,
        block,
        # z is never touched for activations that do not store it; y stands in for it.
        (x, w, b, y, y if z is None else z, np.int32(batch), np.int32(n_out), np.int32(n_in)),
        shared_mem=shared,
    )
    if act == "softmax":
        softmax_(y)
    return y, z


def _bf16_ld(n: int) -> int:
    """The row length of a bf16 operand n elements wide: whole 32-byte sectors (MmaTile::padded)."""
    return -(-n // BF16_ROW) * BF16_ROW


def _round_bf16(a, rows: int | None = None):
    """``a`` (r, c) fp32 rounded to bf16 (uint16 bit patterns) in a fresh (rows or r, _bf16_ld(c))
    array, zero in the padding: an operand of the bf16 GEMMs (kernels/dense_forward_tf32.cu)."""
    src_rows, cols = a.shape
    rows = src_rows if rows is None else rows
    ld = _bf16_ld(cols)
    out = cupy.empty((rows, ld), np.uint16)
    record("round_bf16")
    _kernel("dense_forward_tf32.cu", "round_bf16")(
        (-(-ld // (2 * ROUND_THREADS)), max(1, min(rows, MAX_GRID_Y))), (ROUND_THREADS,),
        (a, np.int64(a.strides[0] // a.itemsize), out, np.int64(src_rows), np.int64(cols), np.int64(rows),
         np.int64(ld)),
    )
    return out


def _gemm_launch(kind: str, act: str, m: int, n: int, precision: str):
    """(kernel, grid, block, dynamic shared bytes) of the forward ("fwd"), dX ("dx") or dW ("dw",
    grid before its split) kernel for an (m, n) output: the tensor-core kernel for
    ``precision="tf32"`` or ``"bf16"``, else the fp32 tile that suits the shape."""
    if precision in ("tf32", "bf16"):
        tile, threads = (TF32_TILE, TF32_TILE), TF32_THREADS
        filename = "dense_forward_tf32.cu" if kind == "fwd" else "dense_backward_tf32.cu"
    else:
        tile = _gemm_tile(m, n)
        threads = GEMM_TILES[tile]
        filename = "dense_forward.cu" if kind == "fwd" else "dense_backward.cu"
    grid = (-(-m // tile[0]), -(-n // tile[1]))
    name = _dense_name(kind, act, precision, tile)
    return _kernel(filename, name), grid, (threads,), _dynamic_shared_bytes(name)


def _dense_dz(dy, act_in, act):
    """dz = dy * act'(act_in), (B, out): what the fp32 gradient products read."""
    record("dense_dz")
    dz = cupy.empty_like(dy)
    n = dy.size
    _kernel("dense_backward.cu", f"dense_dz_{act}")((_elementwise_blocks(n),), (REDUCE_THREADS,),
                                                    (dy, act_in, dz, np.int64(n)))
    return dz


def _launches_dz(act: str, need_dw: bool, precision: str) -> bool:
    """Whether backward forms dz = dy * act'(.) in a kernel of its own: fp32 for every activation
    but identity (dz is then dy; the dW kernel sums db); TF32 also for identity when dW is needed,
    since its dz kernel (``dense_dz_db``) sums db."""
    if precision in ("tf32", "bf16"):
        return act != "identity" or need_dw
    return act != "identity"


def backward_kernels(act, need_dx, need_dw, precision="fp32") -> list[str]:
    if not (need_dx or need_dw):
        return []
    softmax = ["softmax_bwd"] if act == "softmax" else []
    act = "identity" if act == "softmax" else act
    dz = ["dense_dz"] if _launches_dz(act, need_dw, precision) else []
    if precision == "bf16":  # dz, then x for dW and W for dX, rounded before their products
        return (softmax + dz + ["round_bf16"] + (["round_bf16", "dense_dw"] if need_dw else [])
                + (["round_bf16", "dense_dx"] if need_dx else []))
    return softmax + dz + (["dense_dw"] if need_dw else []) + (["dense_dx"] if need_dx else [])


def _dw_split(batch: int, tiles: int, k_step: int = BK) -> tuple[int, int]:
    """(splits, k_chunk) for the dW kernel: split the batch only when tiles alone leave SMs idle."""
    sms = _state()["sms"]
    splits = 1
    if tiles < sms:
        splits = max(1, min(-(-SPLIT_WAVES * sms // tiles), batch // MIN_ROWS_PER_SPLIT, MAX_SPLITS))
    return batch_chunks(batch, splits, k_step)


def batch_chunks(batch: int, splits: int, k_step: int = BK) -> tuple[int, int]:
    """(splits, k_chunk): the batch cut into ``splits`` chunks of whole k steps (``k_step``, the
    kernel's: BK or TF32_BK); fewer splits when rounding the chunk up leaves the last ones empty."""
    k_chunk = -(-batch // splits)
    k_chunk = -(-k_chunk // k_step) * k_step
    return -(-batch // k_chunk), k_chunk


def _dw_split_buffers(batch: int, tiles: int, dw, db, k_step: int = BK) -> tuple:
    """(splits, k_chunk, ws, ws_db, tickets): the batch split of a dense dW launch over ``tiles``
    output tiles and the partials' workspace and per-tile tickets it needs (kernels/split_k.cuh)."""
    splits, k_chunk = _dw_split(batch, tiles, k_step)
    tickets = _state()["tickets"]
    if splits == 1:  # the kernel writes dw and db directly and reads none of the rest
        return splits, k_chunk, dw, db, tickets
    ws = _workspace(splits * (dw.size + db.size))
    return splits, k_chunk, ws[: splits * dw.size], ws[splits * dw.size :], tickets[1:]


def dense_backward(dy, x, w, y, z, act, need_dx, need_dw, out_dx=None, out_dw=None, out_db=None,
                   precision="fp32"):
    """Gradients of ``y = act(x @ w + b)``; skips dW/db when ``need_dw`` is False, dX when ``need_dx`` is.

    ``precision="tf32"``: dX and dW on TF32 tensor cores (``kernels/dense_backward_tf32.cu``),
    db summed in fp32. ``precision="bf16"``: the same, with dz, x and w rounded to bf16 first. In either precision dW splits the batch when the layer has too few tiles
    to fill the GPU, and sums the splits in a fixed order: the result is bitwise repeatable."""
    if not (need_dx or need_dw):
        return None, None, None
    batch, n_out = dy.shape
    n_in = w.shape[0]
    dy, w = _f32(dy), _f32(w)
    if act == "softmax":
        dy = softmax_backward(dy, _f32(y), cupy.empty_like(dy))
        act = "identity"
    x = None if x is None else _f32(x)
    # The one array act' reads: z for gelu/gelu_tanh, else y; identity reads neither.
    y_or_z = dy if act == "identity" else _f32(z if act in NEEDS_Z else y)
    dx = dw = db = None
    if need_dw:
        dw = out_dw if out_dw is not None else cupy.empty((n_in, n_out), np.float32)
        db = out_db if out_db is not None else cupy.empty((n_out,), np.float32)
    if precision in ("tf32", "bf16"):
        return _dense_backward_mma(dy, x, w, y_or_z, act, need_dx, need_dw, out_dx, dw, db, precision)
    # dz formed once, here; the products are the same for every activation
    dz = dy if act == "identity" else _dense_dz(dy, y_or_z, act)
    if need_dw:
        kernel, (tiles_m, tiles_n), block, _ = _gemm_launch("dw", "identity", n_in, n_out, precision)
        splits, k_chunk, ws_dw, ws_db, tickets = _dw_split_buffers(batch, tiles_m * tiles_n, dw, db)
        record("dense_dw")
        kernel(
            (tiles_m, tiles_n, splits),
            block,
            (x, dz, dw, db, ws_dw, ws_db, tickets,
             np.int32(batch), np.int32(n_in), np.int32(n_out), np.int32(k_chunk), np.int32(splits)),
        )
    if need_dx:
        dx = out_dx if out_dx is not None else cupy.empty((batch, n_in), np.float32)
        kernel, grid, block, _ = _gemm_launch("dx", "identity", batch, n_in, precision)
        record("dense_dx")
        kernel(
            grid,
            block,
            (dz, w, dx, np.int32(batch), np.int32(n_in), np.int32(n_out)),
        )
    return dx, dw, db


def _dense_backward_mma(dy, x, w, y_or_z, act, need_dx, need_dw, out_dx, dw, db, precision):
    """dense_backward on TF32 or bf16 tensor cores (kernels/dense_backward_tf32.cu): dz = dy * act'(.)
    and db (fp32) in one elementwise kernel, then dW = x^T dz and dX = dz W^T as plain GEMMs
    (bf16: on dz, x and w rounded by round_bf16)."""
    batch, n_out = dy.shape
    n_in = w.shape[0]
    dz = dy
    if _launches_dz(act, need_dw, precision):
        store_dz = act != "identity"
        if store_dz:
            dz = cupy.empty((batch, n_out), np.float32)
        record("dense_dz")
        _kernel("dense_backward_tf32.cu", f"dense_dz_db_{act}")(
            (-(-n_out // DZ_COLUMNS),),
            (DZ_THREADS,),
            # Arrays the launch does not write or read stand in for dz (identity) and db (no dW).
            (dy, y_or_z, dz, db if need_dw else dz, np.int32(batch), np.int32(n_out), np.int32(store_dz),
             np.int32(need_dw)),
        )
    dx = None
    if precision == "bf16":
        dz = _round_bf16(dz)
    if need_dw:
        if precision == "bf16":
            x = _round_bf16(x)
        kernel, (tiles_m, tiles_n), block, shared = _gemm_launch("dw", act, n_in, n_out, precision)
        k_step = BF16_BK if precision == "bf16" else TF32_BK
        splits, k_chunk, ws_dw, _, tickets = _dw_split_buffers(batch, tiles_m * tiles_n, dw, db, k_step)
        record("dense_dw")
        kernel(
            (tiles_m, tiles_n, splits),
            block,
            (x, dz, dw, ws_dw, tickets, np.int32(batch), np.int32(n_in), np.int32(n_out), np.int32(k_chunk),
             np.int32(splits)),
            shared_mem=shared,
        )
    if need_dx:
        dx = out_dx if out_dx is not None else cupy.empty((batch, n_in), np.float32)
        if precision == "bf16":
            w = _round_bf16(w, _bf16_ld(n_in))
        kernel, grid, block, shared = _gemm_launch("dx", act, batch, n_in, precision)
        record("dense_dx")
        kernel(grid, block, (dz, w, dx, np.int32(batch), np.int32(n_in), np.int32(n_out)), shared_mem=shared)
    return dx, dw, db


def softmax_(y):
    """Row softmax of y (B, C) in place, as CuPy array operations (a reduction and elementwise
    passes per call); the softmax layer is the narrow output layer, small next to its matmul."""
    record("softmax_fwd")
    y -= y.max(axis=1, keepdims=True)
    cupy.exp(y, out=y)
    y /= y.sum(axis=1, keepdims=True)


def softmax_backward(dy, y, out):
    """``out = y * (dy - sum(dy * y, axis=1))``: the softmax Jacobian-vector product; ``out`` may be ``dy``."""
    record("softmax_bwd")
    dot = cupy.einsum("ij,ij->i", dy, y)[:, None]
    cupy.subtract(dy, dot, out=out)
    out *= y
    return out


# ----------------------------------------------------------------------------- losses


def softmax_cross_entropy(logits, labels, sample_weight=None, out_loss=None):
    """Mean softmax cross-entropy over the batch; logits (B, C), labels (B,) ints in [0, C);
    ``sample_weight`` (B,) weights each row's loss (summed over B, Keras's rule).
    ``out_loss``: see the CUDA-graph capability in ``gpubp.backends``."""
    logits = _f32(logits)
    batch, classes = logits.shape
    # The kernel reads labels[row] from the data pointer: contiguous int64 or int32 only.
    labels = asarray(labels, dtype=np.int64 if labels.dtype == np.int64 else np.int32)
    grad = cupy.empty_like(logits)
    rows_per_block = REDUCE_THREADS // 32
    name = "ce_fwd_bwd_i64" if labels.dtype == np.int64 else "ce_fwd_bwd_i32"
    weights = ()
    if sample_weight is not None:
        name, weights = name.replace("ce_fwd_bwd", "ce_fwd_bwd_weighted"), (asarray(sample_weight, np.float32),)
    grid = _blocks(batch, rows_per_block, MAX_REDUCE_BLOCKS)
    loss = _reduce_to_float(
        "loss.cu", name, "ce_fwd_bwd", grid, (logits, labels, *weights, grad), (np.int32(batch), np.int32(classes)),
        out_loss
    )
    return loss, grad


def _elementwise_loss(name: str, pred, target, sample_weight, out_loss):
    pred = _f32(pred)
    target = asarray(target, dtype=np.float32)
    grad = cupy.empty_like(pred)
    n = pred.size
    grid = _blocks(n, REDUCE_THREADS, MAX_REDUCE_BLOCKS)
    if sample_weight is None:
        arrays, sizes, kernel = (pred, target, grad), (np.int64(n),), name
    else:
        arrays = (pred, target, asarray(sample_weight, np.float32), grad)
        sizes, kernel = (np.int64(n), np.int64(pred.shape[1])), f"{name}_weighted"
    return _reduce_to_float("loss.cu", kernel, name, grid, arrays, sizes, out_loss), grad


def mse(pred, target, sample_weight=None, out_loss=None):
    """Mean squared error over all elements; ``sample_weight`` (B,) weights each row's errors."""
    return _elementwise_loss("mse_fwd_bwd", pred, target, sample_weight, out_loss)


def bce(logits, target, sample_weight=None, out_loss=None):
    """Binary cross-entropy on logits, mean over all elements: max(z,0) - z t + log1p(exp(-|z|));
    ``sample_weight`` (B,) weights each row's terms."""
    return _elementwise_loss("bce_fwd_bwd", logits, target, sample_weight, out_loss)


# ----------------------------------------------------------------------------- optimizers


def sgd_update(param, grad, velocity, lr, momentum, nesterov, weight_decay, hyper=None, guard=None):
    """In-place SGD step with PyTorch's semantics (momentum buffer, Nesterov, L2 decay).
    ``hyper``/``guard``: see the CUDA-graph capability in ``gpubp.backends``."""
    n = param.size
    # The rate: an argument, or read on the device (checked before anything is recorded).
    if hyper is None:
        name, rate = "sgd_update", (np.float32(lr),)
    else:
        name, rate = "sgd_update_hyper", _hyper_args(hyper, guard, 1)
    record("sgd_update")
    # Without momentum the kernel never touches velocity (None then); param stands in.
    velocity = param if velocity is None else velocity
    _kernel("optim.cu", name)(
        (_elementwise_blocks(n),), (REDUCE_THREADS,),
        (param, grad, velocity) + rate + (np.float32(momentum), np.int32(bool(nesterov)), np.float32(weight_decay),
                                          np.int64(n)))


def adam_update(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step, decoupled, hyper=None, guard=None):
    """In-place Adam (``decoupled=False``) or AdamW step with PyTorch's semantics.
    ``hyper``/``guard``: see the CUDA-graph capability in ``gpubp.backends``."""
    n = param.size
    # lr and the bias corrections: arguments (lr first, the corrections after the options), or
    # read on the device (checked before anything is recorded).
    if hyper is None:
        lr, step_size, inv_sqrt_bias2 = (np.float32(h) for h in adam_hyper(lr, beta1, beta2, step))
        name, head, tail = "adam_update", (lr,), (step_size, inv_sqrt_bias2)
    else:
        name, head, tail = "adam_update_hyper", _hyper_args(hyper, guard, 3), ()
    record("adam_update")
    options = (np.float32(beta1), np.float32(beta2), np.float32(eps), np.float32(weight_decay))
    _kernel("optim.cu", name)(
        (_elementwise_blocks(n),), (REDUCE_THREADS,),
        (param, grad, m, v) + head + options + tail + (np.int32(bool(decoupled)), np.int64(n)))


def sgd_hyper(lr: float) -> tuple[float]:
    """What ``sgd_update_hyper`` reads from ``hyper``: (lr,)."""
    return (lr,)


def adam_hyper(lr: float, beta1: float, beta2: float, step: int) -> tuple[float, float, float]:
    """What ``adam_update_hyper`` reads from ``hyper`` for Adam step ``step`` (from 1):
    (lr, step_size, inv_sqrt_bias2), the bias corrections in double on the host. The eager
    kernel gets the same values as arguments, so eager and replayed steps agree bitwise."""
    return lr, lr / (1.0 - beta1**step), 1.0 / math.sqrt(1.0 - beta2**step)


def _hyper_args(hyper, guard, size: int) -> tuple:
    return _device_floats(hyper, "hyper", size), _device_floats(guard, "guard")


# ----------------------------------------------------------------------------- CUDA graphs
#
# The optional CUDA-graph capability (see gpubp.backends): a training step recorded once and
# replayed, one launch for the whole step instead of one per kernel.


class Graph:
    """A captured sequence of launches: ``launch()`` replays it on the current stream, in order
    with the copies before and after it. It holds every array its kernels read or write, so
    their memory stays theirs for as long as the graph lives."""

    def __init__(self, graph, arrays: list) -> None:
        self._graph, self._arrays = graph, arrays

    def launch(self) -> None:
        self._graph.launch(stream=cupy.cuda.get_current_stream())


def capture(fn) -> Graph:
    """Run ``fn()`` with every kernel it launches recorded into a CUDA graph instead of run.

    ``fn`` must launch kernels only: no host-device copy or synchronization (CUDA refuses
    them during a capture), and every kernel file it uses should have loaded before (loading
    one looks up all its kernels), so that no module loads and no workspace grows mid-capture.
    A capture needs a stream of its own (CUDA refuses the legacy default stream), and a
    non-blocking one: work that another thread puts on the legacy default stream would
    otherwise synchronize with the capturing stream, which invalidates the capture. Replays
    run on whichever stream is current.
    """
    global _captured_arrays
    if _captured_arrays is not None:
        raise RuntimeError("capture: a capture is already in progress")
    state = _state()
    stream = state.get("capture_stream")
    if stream is None:
        stream = state["capture_stream"] = cupy.cuda.Stream(non_blocking=True)
    arrays = _captured_arrays = []
    try:
        with stream:
            stream.begin_capture()
            try:
                fn()
            except BaseException:
                try:  # a failed capture must still end, or the stream stays unusable
                    stream.end_capture()
                except Exception:  # the capture was invalidated: fn's error is the one to report
                    pass
                raise
            graph = stream.end_capture()
    finally:
        _captured_arrays = None
    return Graph(graph, arrays)


def copy_into(dst, src) -> None:
    """``dst[...] = src`` from a host (NumPy) or device array of dst's shape, on the current stream."""
    if is_array(src):
        cupy.copyto(dst, src, casting="same_kind")
    else:
        dst.set(np.ascontiguousarray(src, dtype=dst.dtype))


# ----------------------------------------------------------------------------- fused MLP
#
# The optional fused capability (see gpubp.backends): a backend that has FUSED_MLP_MAX_WIDTH
# runs a whole MLP whose output widths are all at most that through these two functions.


def _fused_plan(n_in: int, widths, acts, flags, lowest: int, input_grad: bool, dw_rows: int = FUSED_ROWS) -> tuple:
    """(plan array, dW tiles, floats per split of the dW workspace) for kernels/fused_mlp.cu,
    built once per model shape and freezing pattern and kept on the device; a dW tile is
    ``dw_rows`` rows of a layer's dW."""
    key = (n_in, tuple(widths), tuple(acts), tuple(flags), lowest, input_grad, dw_rows)
    plans = _state().setdefault("fused_plans", {})
    if key not in plans:
        plan, tiles, ws = [len(widths), n_in, lowest, int(input_grad)], 0, 0
        for i, (width, act, flag) in enumerate(zip(widths, acts, flags)):
            fan_in = n_in if i == 0 else widths[i - 1]
            plan += [width, ACT_ID[act], flag, tiles, ws]
            if flag & _TRAINABLE:
                tiles += -(-fan_in // dw_rows)
                ws += fan_in * width + width
        plans[key] = (cupy.asarray(np.array(plan, np.int32)), tiles, ws)
    return plans[key]


def _has_tensor_cores() -> bool:
    """Whether this GPU has the TF32/bf16 mma.sync of kernels/mma.cuh (sm_80 and newer)."""
    return int(cupy.cuda.Device().compute_capability) >= 80


def dense_precisions() -> tuple[str, ...]:
    """The precisions the per-layer dense kernels run in on this GPU."""
    return ("fp32", "tf32", "bf16") if _has_tensor_cores() else ("fp32",)


def fused_precisions() -> tuple[str, ...]:
    """The precisions the fused MLP kernels run in on this GPU."""
    return tuple(FUSED_PRECISIONS) if _has_tensor_cores() else ("fp32",)


def fused_activation(acts) -> str | None:
    """The activation a fused kernel is compiled for that runs a model whose layers apply ``acts``
    (kernel activations: softmax already replaced by identity): the one activation besides
    identity that they apply, "identity" when they apply none, None when they apply two or more
    (such a model runs layer by layer)."""
    applied = set(acts) - {"identity"}
    if len(applied) > 1:
        return None
    return applied.pop() if applied else "identity"


def _fused_shared_bytes(kind: str, precision: str, n_in: int) -> int:
    """The dynamic shared memory of a fused kernel: fp32 a 128-deep k-major activation buffer and
    weight stage; tensor cores the B stage and the warps' A/Z buffers (two for a forward whose input
    is wider than 128)."""
    if precision == "fp32":
        return 4 * FUSED_MLP_MAX_WIDTH * ((FUSED_ROWS + 4) + (FUSED_MLP_MAX_WIDTH + 4))
    b_words = FUSED_MLP_MAX_WIDTH // _FUSED_MMA_K[precision] * (FUSED_MLP_MAX_WIDTH // 16) * 128
    buffers = 2 if kind == "fwd" and n_in > FUSED_MLP_MAX_WIDTH else 1
    return 4 * (b_words + buffers * _FUSED_A_WORDS)


def _fused_launch(kind: str, precision: str, act: str | None, n_in: int):
    """(kernel, dynamic shared bytes) of a fused kernel. The fused kernels take their shared memory
    dynamically, past the 48 KB a kernel gets unasked, so each opts in to the most it can ask for
    once, at its first use on a device."""
    name = _fused_name(kind, precision, act)
    kernel = _kernel("fused_mlp.cu", name)
    opted = _state().setdefault("fused_shared_opt_in", set())
    if name not in opted:
        kernel.function.max_dynamic_shared_size_bytes = _fused_shared_bytes(kind, precision, FUSED_MLP_MAX_WIDTH + 1)
        opted.add(name)
    return kernel, _fused_shared_bytes(kind, precision, n_in)


def _layer_slots(arrays, stand_in) -> list:
    """The MAX_LAYERS pointer arguments of one per-layer array; the kernel never reads the
    slots of absent layers or arrays, which get ``stand_in``."""
    arrays = list(arrays) + [None] * (FUSED_MLP_MAX_LAYERS - len(arrays))
    return [stand_in if a is None else a for a in arrays]


def fused_mlp_forward(x, weights, biases, acts, keep_input, keep_output, precision="fp32"):
    """The whole forward of a narrow MLP in one launch (``fused_mlp_fwd``).

    ``x`` (B, in); per layer ``weights[l]`` (in_l, out_l) with out_l <= FUSED_MLP_MAX_WIDTH,
    ``biases[l]`` (out_l,), ``acts[l]`` an activation name (``softmax`` on the last layer only,
    applied after the kernel). ``keep_input[l]``: keep h_l (the layer's input, for its dW);
    ``keep_output[l]``: keep what act_l' reads (h_{l+1}, or z_l for gelu and gelu_tanh).
    Returns ``(y, inputs, act_inputs)``: the output (B, out) and, per layer, the kept arrays
    (None where not kept); nothing else is written to memory. ``precision``: "fp32", or "tf32" /
    "bf16" for the products on tensor cores (fp32 accumulation, fp32 weights and activations in
    memory; kernels/fused_mlp.cu gives their error). The layers apply at most one activation
    besides identity (``fused_activation``): the kernels are compiled once per activation."""
    x = _f32(x)
    weights, biases = [_f32(w) for w in weights], [_f32(b) for b in biases]
    batch, layers = x.shape[0], len(weights)
    widths = [w.shape[1] for w in weights]
    kernel_acts = [*acts[:-1], "identity" if acts[-1] == "softmax" else acts[-1]]
    if fused_activation(kernel_acts) is None:
        raise ValueError(f"acts: the fused kernels apply one activation besides identity, got {list(acts)}")
    y = cupy.empty((batch, widths[-1]), np.float32)
    hout, zout, flags = [None] * layers, [None] * layers, []
    for i, act in enumerate(kernel_acts):
        flag = _TRAINABLE if keep_input[i] else 0
        wants_z = keep_output[i] and act in NEEDS_Z
        if i == layers - 1:
            hout[i] = y
        elif keep_input[i + 1] or (keep_output[i] and not wants_z):
            hout[i] = cupy.empty((batch, widths[i]), np.float32)
        if wants_z:
            zout[i] = cupy.empty((batch, widths[i]), np.float32)
        flags.append(flag | (_STORE_H if hout[i] is not None else 0) | (_STORE_Z if wants_z else 0))
    plan, _, _ = _fused_plan(x.shape[1], widths, kernel_acts, flags, 0, False)
    kernel, shared = _fused_launch("fwd", precision, fused_activation(kernel_acts), x.shape[1])
    record("fused_mlp_fwd")
    kernel((-(-batch // FUSED_ROWS),), (FUSED_THREADS,),
           (x, *_layer_slots(weights, x), *_layer_slots(biases, x), *_layer_slots(hout, y), *_layer_slots(zout, y),
            plan, np.int32(batch)), shared_mem=shared)
    if acts[-1] == "softmax":
        softmax_(y)
    inputs = [x if keep_input[0] else None] + [hout[i] if keep_input[i + 1] else None for i in range(layers - 1)]
    act_inputs = [(zout[i] if kernel_acts[i] in NEEDS_Z else hout[i]) if keep_output[i] else None
                  for i in range(layers)]
    return y, inputs, act_inputs


def fused_backward_kernels(last_act, need_dw) -> list[str]:
    """The kernels ``fused_mlp_backward`` launches: ``need_dw`` per layer (and anything to do)."""
    softmax = ["softmax_bwd"] if last_act == "softmax" else []
    return softmax + ["fused_mlp_bwd"] + (["fused_mlp_dw"] if any(need_dw) else [])


def fused_mlp_backward(dy, weights, acts, inputs, act_inputs, need_dx, need_dw, out_dw, out_db, precision="fp32"):
    """Backward of ``fused_mlp_forward`` in two launches (``fused_mlp_bwd``, ``fused_mlp_dw``).

    ``need_dx``/``need_dw`` per layer as for ``dense_backward`` (at least one layer needs
    something); ``inputs``/``act_inputs`` what the forward kept; ``out_dw[l]``/``out_db[l]``
    receive the gradients of layers with ``need_dw[l]`` (None elsewhere). The chain runs from the
    top down to the lowest layer that needs anything, keeping dz on chip and writing it only for
    trainable layers; it computes g = dz @ W^T only where a lower layer (or ``need_dx[0]``, the
    input gradient) reads it. Returns ``dx`` (B, in) when ``need_dx[0]``, else None."""
    dy = _f32(dy)
    batch, layers = dy.shape[0], len(weights)
    widths = [w.shape[1] for w in weights]
    kernel_acts = list(acts)
    if acts[-1] == "softmax":
        dy = softmax_backward(dy, _f32(act_inputs[-1]), cupy.empty_like(dy))
        kernel_acts[-1] = "identity"
    if fused_activation(kernel_acts) is None:
        raise ValueError(f"acts: the fused kernels apply one activation besides identity, got {list(acts)}")
    lowest = min(i for i in range(layers) if need_dx[i] or need_dw[i])
    flags = [_TRAINABLE if need_dw[i] else 0 for i in range(layers)]
    n_in = weights[0].shape[0]
    plan, tiles, ws_stride = _fused_plan(n_in, widths, kernel_acts, flags, lowest, need_dx[0], FUSED_ROWS)
    dx = cupy.empty((batch, n_in), np.float32) if need_dx[0] else None
    dz = [cupy.empty((batch, widths[i]), np.float32) if need_dw[i] else None for i in range(layers)]
    act_in = [a if kernel_acts[i] != "identity" and i >= lowest else None for i, a in enumerate(act_inputs)]
    kernel, shared = _fused_launch("bwd", precision, fused_activation(kernel_acts), n_in)
    record("fused_mlp_bwd")
    kernel((-(-batch // FUSED_ROWS),), (FUSED_THREADS,),
           (dy, dy if dx is None else dx, *_layer_slots(weights, dy), *_layer_slots(act_in, dy),
            *_layer_slots(dz, dy), plan, np.int32(batch)), shared_mem=shared)
    if tiles:
        splits, k_chunk = _dw_split(batch, tiles)
        tickets = _state()["tickets"][1:]
        ws = _workspace(splits * ws_stride) if splits > 1 else dy
        kernel, shared = _fused_launch("dw", precision, None, n_in)
        record("fused_mlp_dw")
        kernel((tiles, splits), (FUSED_THREADS,),
               (*_layer_slots(inputs, dy), *_layer_slots(dz, dy), *_layer_slots(out_dw, dy), *_layer_slots(out_db, dy),
                ws, tickets, plan, np.int32(batch), np.int32(k_chunk), np.int32(splits), np.int32(ws_stride)),
               shared_mem=shared)
    return dx


# ----------------------------------------------------------------------------- dropout
#
# This round the mask runs in kernels/dropout.cu's elementwise passes around the GEMM kernels,
# whose epilogue (forward) and operand loads (backward) will apply it once their rewrite lands:
# dense_forward and dense_backward below take ``dropout=`` and call the GEMM versions above,
# adding one pass over the output (forward) and one forming dz (backward), which the gradient
# kernels then read as an identity layer's.

DROPOUT_THREADS = 256  # kernels/dropout.cu
_gemm_dense_forward, _gemm_dense_backward, _gemm_backward_kernels = dense_forward, dense_backward, backward_kernels


def _dropout_grid(rows: int, cols: int) -> int:
    """Blocks for a pass of one thread per row and group of four columns, grid-stride beyond the cap."""
    return _blocks(rows * -(-cols // 4), DROPOUT_THREADS, ELEMENTWISE_BLOCKS_PER_SM * _state()["sms"])


def _apply_mask(src, dst, dropout) -> None:
    """``dst = src * scale`` where ``dropout``'s mask keeps the element, else 0 (``dst`` may be ``src``)."""
    rows, cols = src.shape
    _kernel("dropout.cu", "dropout_mask")(
        (_dropout_grid(rows, cols),), (DROPOUT_THREADS,),
        (src, dst, np.int64(rows), np.int64(cols), dropout.key, np.uint32(dropout.threshold),
         np.float32(dropout.scale), np.int64(dropout.first_row)),
    )


def dense_forward(x, w, b, act, out=None, out_z=None, precision="fp32", dropout=None):  # noqa: F811
    """The GEMM kernels' ``act(x @ w + b)`` (see ``_gemm_dense_forward``); with ``dropout`` (a
    ``philox.Mask``) the output is then masked and scaled in place by one ``dropout_fwd`` pass
    (z, for gelu, stays unmasked)."""
    y, z = _gemm_dense_forward(x, w, b, act, out, out_z, precision)
    if dropout is not None:
        record("dropout_fwd")
        _apply_mask(y, y, dropout)
    return y, z


def dropout_forward(x, dropout, out=None):
    """A dropout on its own (on the model's input): ``x * scale`` where the mask keeps, else 0."""
    x = _f32(x)
    out = out if out is not None else cupy.empty_like(x)
    record("dropout_fwd")
    _apply_mask(x, out, dropout)
    return out


def dropout_backward(dy, dropout, out=None):
    """The gradient through ``dropout_forward``: the same mask, regenerated, applied to ``dy``."""
    dy = _f32(dy)
    out = out if out is not None else cupy.empty_like(dy)
    record("dropout_bwd")
    _apply_mask(dy, out, dropout)
    return out


def backward_kernels(act, need_dx, need_dw, precision="fp32", dropout=False) -> list[str]:  # noqa: F811
    if dropout and (need_dx or need_dw):
        return ["dropout_dz"] + _gemm_backward_kernels("identity", need_dx, need_dw, precision)
    return _gemm_backward_kernels(act, need_dx, need_dw, precision)


def dense_backward(dy, x, w, y, z, act, need_dx, need_dw, out_dx=None, out_dw=None, out_db=None,  # noqa: F811
                   precision="fp32", dropout=None):
    """The GEMM kernels' gradients (see ``_gemm_dense_backward``). With ``dropout`` (the mask the
    forward applied, so ``y`` is the masked output) one ``dropout_dz`` pass forms
    ``dz = dy * scale * act'(.)`` where the mask kept, else 0, and the gradient kernels read it as
    an identity layer's dy."""
    if dropout is None or not (need_dx or need_dw):
        return _gemm_dense_backward(dy, x, w, y, z, act, need_dx, need_dw, out_dx, out_dw, out_db, precision)
    dy = _f32(dy)
    rows, cols = dy.shape
    act_in = z if act in NEEDS_Z else y
    act_in = dy if act_in is None else _f32(act_in)
    dz = cupy.empty_like(dy)
    record("dropout_dz")
    _kernel("dropout.cu", f"dropout_dz_{act}")(
        (_dropout_grid(rows, cols),), (DROPOUT_THREADS,),
        (dy, act_in, dz, np.int64(rows), np.int64(cols), dropout.key, np.uint32(dropout.threshold),
         np.float32(dropout.scale), np.int64(dropout.first_row), np.float32(dropout.keep_prob)),
    )
    return _gemm_dense_backward(dz, x, w, None, None, "identity", need_dx, need_dw, out_dx, out_dw, out_db, precision)


def philox_words(counters, key):
    """Philox4x32-10 of each row of ``counters`` (n, 4) uint32 under ``key`` (2,) uint32 -> (n, 4)
    uint32, by kernels/philox.cuh: how the tests hold it to the known answers and to gpubp.philox."""
    counters = cupy.ascontiguousarray(cupy.asarray(counters, dtype=np.uint32))
    key = cupy.ascontiguousarray(cupy.asarray(key, dtype=np.uint32))
    out = cupy.empty(counters.shape, np.uint32)
    n = counters.shape[0]
    _kernel("dropout.cu", "philox_words")(
        (_blocks(n, DROPOUT_THREADS, ELEMENTWISE_BLOCKS_PER_SM * _state()["sms"]),), (DROPOUT_THREADS,),
        (counters, key, out, np.int64(n)),
    )
    return out
