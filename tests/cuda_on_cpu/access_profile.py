"""Memory traffic of every CUDA C++ kernel, measured on the CPU: what Nsight Compute's memory
tables would show for one representative launch of each, from the harness's profile build.

``profile_kernels(kernel_dir)`` compiles every ``kernels/*.cu`` in the profile mode of
``harness.py``, finds each file's ``extern "C"`` kernels, and runs the CuPy backend on the
harness (as ``tests/test_kernels_on_cpu.py`` does, so the launch geometry, tile choice and
argument lists are the ones a GPU gets) through the workloads in ``WORKLOADS``: every dense
layer in each activation, tile size and precision, the fused MLP in each precision, the losses,
the optimizers and the dropout masks. The first launch of each kernel is its representative launch. A kernel
that no workload launches is an error that names it: add a workload for it.

Per kernel it returns, for that launch:

- ``shared_wavefronts_per_request``: shared-memory wavefronts over shared-memory requests
  (loads and stores); ``shared_ideal_wavefronts_per_request`` the same bytes without bank
  conflicts (1, 2 or 4 per full-warp request of 4-, 8- or 16-byte accesses), so the ratio of
  the two is the conflict factor;
- ``global_load_efficiency`` / ``global_store_efficiency``: bytes used over bytes moved in
  32-byte sectors (1.0: every sector a request touches is used in full), and the sectors per
  request of each;
- ``unique_bytes_read`` / ``unique_bytes_written``: the distinct bytes of global memory the
  launch reads and writes, the least DRAM traffic it can cause (the roofline's memory term);
- ``launch``: the workload, grid, block and dynamic shared memory of the profiled launch;
- ``lines``: per source line (the innermost frame in a kernel file, so an access inside an
  inline function counts at that function's line, as Nsight's source view counts it; ``called_from``
  lists the kernel lines that called it), memory space (``kind``: shared or global) and ``access``
  (load or store): requests, wavefronts or sectors, their number per request, the efficiency
  (shared: ideal over actual wavefronts; global: as above), the access width and the requests
  with fewer than 32 lanes (``partial_requests``: tile edges, guards, partial warps).
  Figures are ``None`` where a kernel makes no access of that kind.

How, in short (``access_profiler.cpp`` gives the rules implemented and their sources): gcc
instruments the kernel unit at -O0 to call the recorder before every memory reference with
its address and width; the recorder keeps the accesses to shared memory and to the launch's
array arguments (and to the arrays a table of addresses among them points to), groups the 32 lanes of each warp by call site and occurrence into requests,
and counts 4-byte banks per half- or quarter-warp phase for shared memory and 32-byte sectors
for global memory.

What it cannot see: caches (a weight tile that every block reads counts in each block's
requests and sectors but once in the unique bytes; L1 and L2 hit rates are a GPU's to
measure), timing (latency hiding, bandwidth, overlap of copies and math), the coalescer's
corner cases beyond the documented rules, and accesses made outside the kernel unit (none;
access_profiler.cpp says how cp.async and ldmatrix are seen). Requests are counted as
the source makes them at -O0: where nvcc merges two reads of one value into one load, the
request count errs high while per-request figures and efficiencies do not change.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import numpy as np

from gpubp.activations import ACTIVATIONS
from gpubp.backends import cupy_backend

from . import harness

H100_SMS = 132  # a simulated H100: small layers get 128x64 fp32 tiles
ONE_SM = 1  # a simulated GPU with one SM: every layer gets 128x128 fp32 tiles
# The dense kernels' GEMMs (forward x @ W, dX = dz @ W^T, dW = x^T @ dz) each run on a layer
# shaped for it: an output of one full tile plus an 8-wide edge tile on both axes, and K =
# GEMM_K, five 8-deep k steps (the k loop repeats one pattern; a short K keeps the launch
# cheap). Every width a multiple of 8 keeps the vectorized paths and 32-byte aligned rows, as
# in the layers the speed goals are about; a width that is not (a 10-class head) costs
# sectors that these figures leave out.
GEMM_K = 40
# The fused MLP, once per activation (one fwd and one bwd kernel per precision run every
# activation's epilogue; gelu's store z): one 64-row block of 40 rows (fp32: 8 x 8 thread tiles of
# whole and of clamped rows; tensor cores two full 16-row warps, an 8-row edge and a warp past the
# batch); an input of two and a half 16-deep slices, a full 128-wide layer, a 64-wide one and a
# 16-wide identity head (fp32: 4, 2 and 1 warps with work).
FUSED_BATCH, FUSED_IN, FUSED_WIDTHS = 40, 40, (128, 64, 16)
LOSS_SHAPE = (40, 10)
VECTOR_SIZE = 1031  # four full 256-thread blocks and a partial fifth
DROPOUT_SHAPE = (40, 64)

SECTOR = 32


# ----------------------------------------------------------------------------- workloads


def _gemm_layers(tile: tuple[int, int]) -> dict[str, tuple[int, int, int]]:
    """(batch, in, out) of the layer each dense kernel runs on, for an output tile (rows, columns):
    one whole tile and an edge tile along each."""
    rows, cols = tile[0] + 8, tile[1] + 8
    return {"forward": (rows, GEMM_K, cols), "dX": (rows, cols, GEMM_K), "dW": (GEMM_K, rows, cols)}


# The activation of the layer below whose act' the profiled dX kernels apply (every dX launch reads
# the layer's output for it; which activation makes no difference to the accesses).
BELOW_ACT = "sigmoid"


def _mask(cb):
    from gpubp import philox

    return philox.Mask(cb.asarray(np.array([1, 2], np.uint32), np.uint32), *philox.mask_constants(0.5))


def _dense_layers(precision: str, tile: tuple[int, int]):
    def run(cb, rng):
        def arrays(*shapes):
            return [cb.asarray(rng.standard_normal(s).astype(np.float32)) for s in shapes]

        layers = _gemm_layers(tile)
        batch, n_in, n_out = layers["forward"]
        x, w, b = arrays((batch, n_in), (n_in, n_out), (n_out,))
        backward = []
        for kernel, need_dx, need_dw in (("dX", True, False), ("dW", False, True)):
            batch, n_in, n_out = layers[kernel]  # dy, x, w, y, z: y and z any values act' can take
            backward.append((arrays((batch, n_out), (batch, n_in), (n_in, n_out), (batch, n_out), (batch, n_out)),
                             need_dx, need_dw))
        mask = _mask(cb)
        for act in ACTIVATIONS:
            cb.dense_forward(x, w, b, act, precision=precision)
            cb.dense_forward(x, w, b, act, precision=precision, dropout=mask)  # the epilogue with a mask
            for (dy, x_in, w_in, y, z), need_dx, need_dw in backward:
                # dX as a hidden layer's: its epilogue reads and applies the act' of the layer below
                below = {"dx_act": BELOW_ACT, "dx_act_in": x_in} if need_dx else {}
                cb.dense_backward(dy, x_in, w_in, y, z, act, need_dx, need_dw, precision=precision, **below)
            if precision == "tf32":  # the dz + db pass that regenerates the mask (fp32's: _dropout)
                (dy, x_in, w_in, y, z), _, _ = backward[1]
                cb.dense_backward(dy, x_in, w_in, y, z, act, False, True, precision=precision, dropout=mask)
        # dX whose epilogue also regenerates the mask on the layer below's output (its _dropout variant)
        (dy, x_in, w_in, y, z), _, _ = backward[0]
        cb.dense_backward(dy, x_in, w_in, y, z, "identity", True, False, precision=precision, dx_act=BELOW_ACT,
                          dx_act_in=x_in, dx_dropout=mask)

    return run


def _fused_mlp(precision: str):
    def run(cb, rng):
        x = cb.asarray(rng.standard_normal((FUSED_BATCH, FUSED_IN)).astype(np.float32))
        fan_ins = (FUSED_IN, *FUSED_WIDTHS[:-1])
        ws = [cb.asarray(rng.standard_normal((i, o)).astype(np.float32)) for i, o in zip(fan_ins, FUSED_WIDTHS)]
        bs = [cb.asarray(rng.standard_normal(o).astype(np.float32)) for o in FUSED_WIDTHS]
        every_layer = [True] * len(FUSED_WIDTHS)
        dy = cb.asarray(rng.standard_normal((FUSED_BATCH, FUSED_WIDTHS[-1])).astype(np.float32))
        for act in ACTIVATIONS:
            acts = [act] * (len(FUSED_WIDTHS) - 1) + ["identity"]
            keep_output = [a != "identity" for a in acts]
            _, inputs, act_inputs = cb.fused_mlp_forward(x, ws, bs, acts, every_layer, keep_output, precision)
            out_dw = [cb.empty(w.shape) for w in ws]
            out_db = [cb.empty(b.shape) for b in bs]
            cb.fused_mlp_backward(dy, ws, acts, inputs, act_inputs, every_layer, every_layer, out_dw, out_db,
                                  precision)

    return run


def _losses(cb, rng):
    logits = cb.asarray(rng.standard_normal(LOSS_SHAPE).astype(np.float32))
    labels = rng.integers(0, LOSS_SHAPE[1], LOSS_SHAPE[0])
    target = rng.standard_normal(LOSS_SHAPE).astype(np.float32)
    weights = cb.asarray(rng.random(LOSS_SHAPE[0]).astype(np.float32))
    for sample_weight in (None, weights):  # the plain kernels, then the *_weighted ones
        for dtype in (np.int32, np.int64):
            cb.softmax_cross_entropy(logits, labels.astype(dtype), sample_weight=sample_weight)
        # the smoothed target's code path: the same reads and writes, plus a warp sum per row
        cb.softmax_cross_entropy(logits, labels, sample_weight=sample_weight, label_smoothing=0.1)
        cb.mse(logits, target, sample_weight=sample_weight)
        cb.mae(logits, target, sample_weight=sample_weight)
        cb.huber(logits, target, sample_weight=sample_weight, delta=0.5)
        cb.bce(logits, (target > 0).astype(np.float32), sample_weight=sample_weight)
        cb.poisson(logits, np.abs(target), sample_weight=sample_weight)


def _optimizers(cb, rng):
    param, grad, m = (cb.asarray(rng.standard_normal(VECTOR_SIZE).astype(np.float32)) for _ in range(3))
    v = cb.asarray(np.abs(rng.standard_normal(VECTOR_SIZE)).astype(np.float32))
    finite_loss = cb.asarray(np.array([0.5], np.float32))
    sgd_hyper = cb.asarray(np.array(cb.sgd_hyper(0.1), np.float32))
    adam_hyper = cb.asarray(np.array(cb.adam_hyper(1e-3, 0.9, 0.999, 2), np.float32))
    cb.sgd_update(param, grad, m, 0.1, 0.9, True, 1e-2)
    cb.sgd_update(param, grad, m, None, 0.9, True, 1e-2, hyper=sgd_hyper, guard=finite_loss)
    cb.adam_update(param, grad, m, v, 1e-3, 0.9, 0.999, 1e-8, 1e-2, 1, True)
    cb.adam_update(param, grad, m, v, None, 0.9, 0.999, 1e-8, 1e-2, None, True, hyper=adam_hyper, guard=finite_loss)
    # centered with momentum: the variant that touches every buffer; grad_avg from zero keeps v - gm^2 >= 0
    grad_avg = cb.zeros((VECTOR_SIZE,))
    cb.rmsprop_update(param, grad, v, grad_avg, m, 1e-2, 0.99, 1e-8, 1e-2, 0.9, True)
    cb.rmsprop_update(param, grad, v, grad_avg, m, None, 0.99, 1e-8, 1e-2, 0.9, True, hyper=sgd_hyper,
                      guard=finite_loss)
    # The multi-tensor updates over two tensors: the vector and a second one of another length.
    other = [cb.asarray(np.abs(rng.standard_normal(VECTOR_SIZE // 3)).astype(np.float32)) for _ in range(5)]
    cb.sgd_update_many([(param, grad, m), tuple(other[:3])], 0.1, 0.9, True, 1e-2)
    cb.adam_update_many([(param, grad, m, v), tuple(other[:4])], 1e-3, 0.9, 0.999, 1e-8, 1e-2, 1, True)
    cb.rmsprop_update_many([(param, grad, v, grad_avg, m), (other[0], other[1], other[2], cb.zeros((VECTOR_SIZE // 3,)),
                                                            other[4])], 1e-2, 0.99, 1e-8, 1e-2, 0.9, True)
    cb.sumsq(grad)
    cb.scale_(grad, 0.5)
    cb.sumsq(grad, other[0])  # several arrays: one launch (sumsq_many)
    cb.scale_many([grad, other[0]], 0.5)
    cb.clip_([grad, other[0]], 1e-3, cb.empty((1,)), finite_loss)  # a captured step's clipping


def _dropout(cb, rng):
    """The mask pass and every activation's fp32 regeneration pass on a DROPOUT_SHAPE Dense output
    (a width that is a multiple of 4: the float4 path), and the generator's own test window."""
    y, dy = (cb.asarray(rng.standard_normal(DROPOUT_SHAPE).astype(np.float32)) for _ in range(2))
    mask = _mask(cb)
    cb.dropout_forward(y, mask, out=y)
    w = cb.empty((3, DROPOUT_SHAPE[1]))
    for act in ACTIVATIONS:  # dense_dz_dropout_<act>, then the (small) identity dX kernel
        cb.dense_backward(dy, None, w, y, y, act, True, False, dropout=mask)
    cb.philox_words(np.zeros((VECTOR_SIZE, 4), np.uint32), np.array([1, 2], np.uint32))


def _workloads() -> dict[str, tuple[str, int, object]]:
    """name -> (description, simulated SMs, run(cb, rng)): together they launch every kernel."""
    def dense(precision, tile, sms):
        layers = ", ".join(f"{kernel} (batch, in, out) = {shape}" for kernel, shape in _gemm_layers(tile).items())
        return (f"dense layers in every activation, {precision}, {tile[0]}x{tile[1]} tiles, on {sms} SM(s): {layers}, "
                f"dX applying the act' of a {BELOW_ACT} layer below (and its Dropout's mask)", sms,
                _dense_layers(precision, tile))

    # One SM makes the backend pick the large fp32 tile for any shape, an H100 the small one here.
    big, small = max(cupy_backend.GEMM_TILES), min(cupy_backend.GEMM_TILES)
    work = {f"dense fp32 {cupy_backend.tile_name(big)}": dense("fp32", big, ONE_SM),
            f"dense fp32 {cupy_backend.tile_name(small)}": dense("fp32", small, H100_SMS),
            "dense tf32": dense("tf32", (cupy_backend.TF32_TILE,) * 2, H100_SMS),
            "dense bf16": dense("bf16", (cupy_backend.TF32_TILE,) * 2, H100_SMS)}
    for precision in cupy_backend.FUSED_PRECISIONS:
        work[f"fused {precision}"] = (f"fused_mlp_forward + fused_mlp_backward: batch {FUSED_BATCH}, in {FUSED_IN}, "
                                      f"widths {list(FUSED_WIDTHS)}, each activation (identity head), {precision}",
                                      H100_SMS,
                                      _fused_mlp(precision))
    work["losses"] = (f"losses: logits {LOSS_SHAPE}", H100_SMS, _losses)
    work["optimizers"] = (f"optimizers and gradient norm: {VECTOR_SIZE} parameters", ONE_SM, _optimizers)
    work["dropout"] = (f"dropout masks and their regeneration: {DROPOUT_SHAPE}, every activation; Philox on "
                       f"{VECTOR_SIZE} counters", H100_SMS, _dropout)
    return work


WORKLOADS = _workloads()


# ----------------------------------------------------------------------------- running them


@contextlib.contextmanager
def _kernel_dir(kernel_dir: Path | None):
    """The CuPy backend reads its sources from ``kernel_dir`` (the shipped ones when None)."""
    saved = os.environ.get(cupy_backend.KERNEL_DIR_ENV)
    if kernel_dir is not None:
        os.environ[cupy_backend.KERNEL_DIR_ENV] = str(kernel_dir)
    try:
        yield cupy_backend.kernel_dir()
    finally:
        if saved is None:
            os.environ.pop(cupy_backend.KERNEL_DIR_ENV, None)
        else:
            os.environ[cupy_backend.KERNEL_DIR_ENV] = saved


@contextlib.contextmanager
def _backend_on_cpu(cpu_harness: harness.Harness, sms: int):
    """The CuPy backend on ``cpu_harness``, seeing a GPU with ``sms`` SMs, fresh caches."""
    saved = {name: getattr(cupy_backend, name) for name in ("cupy", *harness.BACKEND_CACHES)}
    cupy_backend.cupy = harness.cupy_shim(cpu_harness, sms=sms)
    for name in harness.BACKEND_CACHES:
        setattr(cupy_backend, name, {})
    try:
        yield cupy_backend
    finally:
        for name, value in saved.items():
            setattr(cupy_backend, name, value)


def _first_launches(cpu_harness: harness.Harness, workloads) -> dict[str, tuple[harness.LaunchProfile, str]]:
    """kernel name -> (its first launch in ``workloads``, that workload's description)."""
    chosen: dict[str, tuple[harness.LaunchProfile, str]] = {}
    rng = np.random.default_rng(0)
    for description, sms, run in workloads:
        with _backend_on_cpu(cpu_harness, sms) as cb:
            run(cb, rng)
        for launch in cpu_harness.profiles:
            chosen.setdefault(launch.kernel, (launch, description))
        cpu_harness.profiles.clear()
    return chosen


# ----------------------------------------------------------------------------- source lines

_ADDR2LINE = re.compile(r"^(?P<path>.*?):(?P<line>\d+)")  # "path:line", maybe " (discriminator n)" after


def _source_lines(library: Path, offsets: set[int]) -> dict[int, tuple[str, int] | None]:
    """Return address (offset into ``library``) -> (file, line) of the call before it, for
    frames in the kernel sources, whose paths are relative (the build maps its directory to
    '.'); None for the harness's header and the system's (absolute paths) and for the runtime
    (no line table: "??:0")."""
    order = sorted(offsets)
    tool = shutil.which("addr2line") or "addr2line"
    done = subprocess.run([tool, "-e", str(library)], input="\n".join(f"{o - 1:x}" for o in order),
                          capture_output=True, text=True, check=True)
    lines: dict[int, tuple[str, int] | None] = {}
    for offset, text in zip(order, done.stdout.splitlines()):
        match = _ADDR2LINE.match(text)
        in_kernel = match is not None and match["path"] != "??" and not Path(match["path"]).is_absolute()
        lines[offset] = (Path(match["path"]).name, int(match["line"])) if in_kernel else None
    return lines


def _ratio(numerator: int, denominator: int) -> float | None:
    return round(numerator / denominator, 4) if denominator else None


def _summary(launch: harness.LaunchProfile, workload: str, lines_of: dict[int, tuple[str, int] | None]) -> dict:
    per_line: dict[tuple, dict] = defaultdict(lambda: defaultdict(int))
    callers: dict[tuple, set] = defaultdict(set)
    totals: dict[tuple, dict] = defaultdict(lambda: defaultdict(int))
    for site in launch.sites:
        frames = [lines_of[f] for f in site.frames if lines_of[f] is not None]
        where = frames[0] if frames else ("??", 0)
        key = (*where, site.space, site.access)
        for counts in (per_line[key], totals[(site.space, site.access)]):
            for field in ("requests", "units", "ideal", "bytes_used", "partial"):
                counts[field] += getattr(site, field)
        per_line[key]["width"] = max(per_line[key]["width"], site.width)
        callers[key].update(f"{file}:{line}" for file, line in frames[1:2])
    shared = {field: sum(totals[("shared", access)][field] for access in ("load", "store"))
              for field in ("requests", "units", "ideal")}
    loads, stores = totals[("global", "load")], totals[("global", "store")]
    lines = []
    for (file, line, space, access), c in sorted(per_line.items()):
        unit = "wavefronts" if space == "shared" else "sectors"
        efficiency = (_ratio(c["ideal"], c["units"]) if space == "shared"
                      else _ratio(c["bytes_used"], SECTOR * c["units"]))
        lines.append({"file": file, "line": line, "kind": space, "access": access, "width": c["width"],
                      "requests": c["requests"], unit: c["units"], "per_request": _ratio(c["units"], c["requests"]),
                      "efficiency": efficiency, "partial_requests": c["partial"],
                      "called_from": sorted(callers[(file, line, space, access)])})
    return {
        "shared_wavefronts_per_request": _ratio(shared["units"], shared["requests"]),
        "shared_ideal_wavefronts_per_request": _ratio(shared["ideal"], shared["requests"]),
        "global_load_efficiency": _ratio(loads["bytes_used"], SECTOR * loads["units"]),
        "global_store_efficiency": _ratio(stores["bytes_used"], SECTOR * stores["units"]),
        "global_load_sectors_per_request": _ratio(loads["units"], loads["requests"]),
        "global_store_sectors_per_request": _ratio(stores["units"], stores["requests"]),
        "unique_bytes_read": launch.unique_bytes_read,
        "unique_bytes_written": launch.unique_bytes_written,
        "launch": {"workload": workload, "grid": list(launch.grid), "block": list(launch.block),
                   "dynamic_shared_bytes": launch.dynamic_shared_bytes},
        "lines": lines,
    }


def summarize(launches: dict[str, tuple[harness.LaunchProfile, str]]) -> dict[str, dict]:
    """Per kernel, the figures of its launch (see the module docstring)."""
    frames_by_library: dict[Path, set[int]] = defaultdict(set)
    for launch, _ in launches.values():
        for site in launch.sites:
            frames_by_library[launch.library].update(site.frames)
    lines_of = {library: _source_lines(library, frames) for library, frames in frames_by_library.items()}
    return {name: _summary(launch, workload, lines_of.get(launch.library, {}))
            for name, (launch, workload) in launches.items()}


def profile_workloads(workloads, kernel_dir: Path | None = None) -> dict[str, dict]:
    """The figures of the first launch of each kernel that ``workloads`` (values as in
    WORKLOADS) launch, from ``kernel_dir``'s sources (the shipped ones when None)."""
    with _kernel_dir(kernel_dir):
        return summarize(_first_launches(harness.Harness("profile"), workloads))


def profile_kernels(kernel_dir: Path | None = None) -> dict[str, dict]:
    """The memory figures of every ``extern "C"`` kernel in ``kernel_dir``'s ``*.cu`` (the
    shipped kernels when None), keyed by kernel name; see the module docstring."""
    with _kernel_dir(kernel_dir) as root:
        cpu_harness = harness.Harness("profile")
        sources = {path.stem: cupy_backend.kernel_source(path.name) for path in sorted(root.glob("*.cu"))}
        cpu_harness.prebuild(sources)  # one compiler per core, before the workloads load them one by one
        shipped = {name: stem for stem, source in sources.items()
                   for name in cpu_harness.module(source, stem).kernel_names()}
        launches = _first_launches(cpu_harness, WORKLOADS.values())
    missing = sorted(set(shipped) - set(launches))
    if missing:
        raise RuntimeError("no workload in access_profile.WORKLOADS launches "
                           + ", ".join(f"{name} ({shipped[name]}.cu)" for name in missing)
                           + ": add a backend call that does")
    return summarize({name: launches[name] for name in sorted(shipped)})
