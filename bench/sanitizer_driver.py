"""Calls every GPU kernel on awkward shapes and operand alignments, for compute-sanitizer.

    compute-sanitizer --tool racecheck --error-exitcode 1 python bench/sanitizer_driver.py cupy numba
    compute-sanitizer --tool memcheck --error-exitcode 1 python bench/sanitizer_driver.py --reduced cupy
    compute-sanitizer --tool racecheck --error-exitcode 1 python bench/sanitizer_driver.py --reduced-racecheck cupy

The arguments name the backends to drive (default: cupy): ``cupy`` runs the CUDA C++ kernels
of kernels/*.cu, ``numba`` the Numba-CUDA kernels (on CuPy arrays, as a model that switches
between the two does). For each (its ``COVERAGE``): every activation's forward and both
backward kernels on batch 1, shapes that are not multiples of 4 (the scalar load/store paths)
and multiples of 4 (the float4 paths); for cupy also both tile sizes and the split-K dW
reduction, and the same in every other precision the GPU runs (TF32 on tensor cores). Then
misaligned operands: inputs and ``out=`` buffers that start one float past a 16-byte boundary
(C-contiguous views, which the kernels take as they are), with in and out features in
{1, 3, 4, 5, 127, 128, 129}, where the float4 paths must fall back to scalar access. Then every
loss with both label widths, SGD in each mode, Adam and AdamW, RMSprop plain and centered with
momentum, sumsq and scale_; and, for cupy, the fused MLP kernels in every precision (batches 1,
37, 129, a frozen first layer too) and training steps replayed from CUDA graphs (the update
kernels that read their rates from the device).

``--reduced`` (cupy only; ``gpu_check.sh first-contact`` runs it) keeps one odd shape per
kernel family and two activations (``REDUCED``): the 128x64 and 128x128 tiles, the split-K dW
finish, one misaligned shape, every loss, update and fused kernel, and the replayed CUDA
graphs. Every kernel family the full run launches still runs, in a fraction of the launches.
``--reduced-racecheck`` (``REDUCED_RACECHECK``) is that, less the largest shape in the
tensor-core precisions, to fit racecheck's minute: see there.

For cupy the driver turns CuPy's memory pool off (``exact_allocations``) but for the replayed
CUDA graphs, so that memcheck sees each array's own bounds. It prints a line as it starts each
section and shape, with the seconds since it started, so a run cut off says where it was.

Checks nothing itself: the sanitizer does.
"""

from __future__ import annotations

import sys
import time
from typing import NamedTuple

import numpy as np

from gpubp import backends
from gpubp.activations import ACTIVATIONS


class Coverage(NamedTuple):
    """What the driver runs: shapes are (batch, in, out) for the dense kernels, (batch, classes)
    for the losses, and element counts for the updates, sumsq and scale_."""

    dense: list
    misaligned: list
    activations: tuple = ACTIVATIONS
    misaligned_activations: tuple = ("relu", "gelu")  # gelu also stores z
    losses: tuple = ((1, 1), (1, 10), (37, 13), (300, 1001))
    parameters: tuple = (1, 1031)
    fused_batches: tuple = (1, 37, 129)
    graph_cases: tuple = ((False, "adam"), (True, "sgd"), (False, "rmsprop"))  # (fused, optimizer) replayed
    tensor_core_dense: list | None = None  # the dense shapes in the tensor-core precisions; None: dense


MISALIGNED_FEATURES = (1, 3, 4, 5, 127, 128, 129)
MISALIGNED_BATCH = 37
# 1500 x 1500 outputs pick the 128x128 tiles; (2048, 64, 48) splits dW over the batch (also with
# misaligned operands). The Numba kernels have one 128 x 128 tile: ragged shapes, several tiles each
# way, and on a GPU of many SMs every dW here splits the batch (from 64 rows on).
COVERAGE = {
    "cupy": Coverage(
        dense=[(1, 1, 1), (1, 37, 29), (19, 13, 7), (37, 29, 23), (64, 32, 16), (1500, 77, 1500), (2048, 64, 48)],
        misaligned=[(MISALIGNED_BATCH, n_in, n_out) for n_in in MISALIGNED_FEATURES for n_out in MISALIGNED_FEATURES]
        + [(2048, 64, 48)]),
    "numba": Coverage(
        dense=[(1, 1, 1), (1, 37, 29), (19, 13, 7), (64, 32, 16), (70, 20, 9), (130, 129, 127), (300, 257, 260)],
        misaligned=[(MISALIGNED_BATCH, n_in, n_out) for n_in in MISALIGNED_FEATURES for n_out in MISALIGNED_FEATURES]),
}
REDUCED = Coverage(dense=[(37, 29, 23), (1500, 77, 1500), (2048, 64, 48)], misaligned=[(37, 5, 129)],
                   activations=("relu", "gelu"), losses=((37, 13),), parameters=(1031,), fused_batches=(37,))
# Racecheck follows every shared-memory access, and (1500, 77, 1500) makes most of the reduced
# run's: 346 MFLOP per GEMM against 13 for the next. It stays in fp32, the one shape that picks
# the 128x128 tiles (at least one wave of them), and goes from TF32 and bf16, whose kernels have
# one 128x128 tile at every shape: (37, 29, 23) launches each on ragged edges, and (2048, 64,
# 48)'s dW splits the batch into 8 chunks of 256 rows, 8 k tiles in TF32 and 4 in bf16: past
# the 3-stage cp.async ring, whose reuse of a stage is where a missing barrier would race.
# Dropping the precisions instead (fp32 only) would leave those pipelined kernels, the likeliest
# to race, unchecked.
REDUCED_RACECHECK = REDUCED._replace(tensor_core_dense=[(37, 29, 23), (2048, 64, 48)])
REDUCTIONS = {"--reduced": REDUCED, "--reduced-racecheck": REDUCED_RACECHECK}
_START = time.perf_counter()


def progress(what: str) -> None:
    """A line as each piece of work starts: a run the sanitizer's time limit cuts off says where."""
    print(f"sanitizer driver: {what} at {time.perf_counter() - _START:.1f} s", flush=True)


def misaligned(be, host: np.ndarray):
    """``host`` on the device one float past the start of an allocation (which CUDA aligns
    to 256 bytes): C-contiguous, so no backend copies it, but misaligned for float4."""
    padded = np.concatenate([np.zeros(1, host.dtype), host.ravel()])
    return be.asarray(padded)[1:].reshape(host.shape)


def drive_dense(be, rand, shapes, activations, precision="fp32") -> None:
    for batch, n_in, n_out in shapes:
        progress(f"{be.NAME} dense {precision} {(batch, n_in, n_out)}")
        x, w, b, dy = rand(batch, n_in), rand(n_in, n_out), rand(n_out), rand(batch, n_out)
        for act in activations:
            y, z = be.dense_forward(x, w, b, act, precision=precision)
            be.dense_backward(dy, x, w, y, z, act, True, True, precision=precision)
            be.dense_backward(dy, x, w, y, z, act, False, True, precision=precision)
            be.dense_backward(dy, x, w, y, z, act, True, False, precision=precision)


def drive_misaligned_dense(be, rng, shapes, activations) -> None:
    def operand(*shape):
        return misaligned(be, rng.standard_normal(shape).astype(np.float32))

    for batch, n_in, n_out in shapes:
        x, w, b, dy = operand(batch, n_in), operand(n_in, n_out), operand(n_out), operand(batch, n_out)
        for act in activations:
            y, z = be.dense_forward(x, w, b, act, out=operand(batch, n_out), out_z=operand(batch, n_out))
            be.dense_backward(dy, x, w, y, z, act, True, True,
                              operand(batch, n_in), operand(n_in, n_out), operand(n_out))


def drive_losses_and_optimizers(be, rand, rng, coverage: Coverage) -> None:
    for batch, classes in coverage.losses:
        logits = rand(batch, classes)
        for weights in (None, be.asarray(rng.random(batch).astype(np.float32))):  # the *_weighted kernels too
            for dtype in (np.int32, np.int64):
                labels = be.asarray(rng.integers(0, classes, batch).astype(dtype))
                for label_smoothing in (0.0, 0.1):  # the one-hot and the smoothed code of each kernel
                    be.softmax_cross_entropy(logits, labels, weights, label_smoothing)
            target = be.asarray(rng.random((batch, classes)).astype(np.float32))
            be.mse(logits, target, weights)
            be.mae(logits, target, weights)
            be.huber(logits, target, weights, 0.5)
            be.bce(logits, target, weights)
            be.poisson(logits, target, weights)

    for n in coverage.parameters:
        p, g = rand(n), rand(n)
        be.sgd_update(p, g, None, 0.1, 0.0, False, 0.0)
        for nesterov in (False, True):
            be.sgd_update(p, g, be.zeros((n,)), 0.1, 0.9, nesterov, 1e-2)
        for decoupled in (False, True):
            be.adam_update(p, g, be.zeros((n,)), be.zeros((n,)), 1e-3, 0.9, 0.999, 1e-8, 1e-2, 1, decoupled)
        for momentum, centered in ((0.0, False), (0.9, True)):
            be.rmsprop_update(p, g, be.zeros((n,)), be.zeros((n,)) if centered else None,
                              be.zeros((n,)) if momentum else None, 1e-2, 0.99, 1e-8, 1e-2, momentum, centered)
        be.sumsq(p)
        be.scale_(p, 0.5)
    if getattr(be, "MULTI_TENSOR_UPDATES", False):  # every parameter size in one launch of each
        def tensors(state: int) -> list[tuple]:
            return [(rand(n), rand(n), *(be.zeros((n,)) for _ in range(state))) for n in coverage.parameters]

        be.sgd_update_many(tensors(1), 0.1, 0.9, True, 1e-2)
        be.adam_update_many(tensors(2), 1e-3, 0.9, 0.999, 1e-8, 1e-2, 1, True)
        be.rmsprop_update_many(tensors(3), 1e-2, 0.99, 1e-8, 1e-2, 0.9, True)
        be.scale_many([p for p, *_ in tensors(0)], 0.5)
    be.sumsq(*(rand(n) for n in coverage.parameters for _ in range(2)))  # several arrays: one launch on cupy


def drive_fused_mlp(be, rng, batches) -> None:
    """The fused MLP kernels in every precision the GPU runs, trained and with a frozen first layer."""
    import gpubp as gb

    for precision in be.fused_precisions():
        for frozen in (0, 1):
            model = gb.Sequential([gb.Dense(13, 33, "gelu"), gb.Dense(33, 16, "gelu"), gb.Dense(16, 7)],
                                  backend=be.NAME, fused=True, precision=precision).freeze_to(frozen)
            step = model.train_step("cross_entropy", "adam")
            for batch in batches:
                step(rng.standard_normal((batch, 13)).astype(np.float32), rng.integers(0, 7, batch))


def drive_replayed_steps(be, rng, cases) -> None:
    """Training steps captured in a CUDA graph and replayed (where the backend has graphs):
    the *_hyper and *_many update kernels, and every kernel of a step launched from a graph;
    the first case clips its gradients on the device."""
    import gpubp as gb

    for i, (fused, optimizer) in enumerate(cases):
        model = gb.Sequential([gb.Dense(13, 29, "gelu"), gb.Dense(29, 7)], backend=be.NAME, fused=fused)
        step = model.train_step("cross_entropy", optimizer, cuda_graph=True, clip_grad_norm=0.1 if i == 0 else None)
        for _ in range(4):  # eager, capture and replay, replays
            step(rng.standard_normal((37, 13)).astype(np.float32), rng.integers(0, 7, 37))


def drive_every_precision(be, rand, coverage: Coverage) -> None:
    """The dense kernels on ``coverage.dense`` in fp32, then on ``coverage.tensor_core_dense`` in
    the GPU's tensor-core precisions, where the backend has them."""
    drive_dense(be, rand, coverage.dense, coverage.activations)
    # Only the CUDA C++ backend has tensor-core dense kernels (its TF32 tile says so); elsewhere
    # "tf32" computes fp32, and driving it would rerun the kernels just driven.
    if hasattr(be, "TF32_TILE"):
        for precision in be.dense_precisions():
            if precision != "fp32":
                drive_dense(be, rand, coverage.tensor_core_dense or coverage.dense, coverage.activations, precision)


def exact_allocations(be):
    """Turn CuPy's memory pool off for ``be`` (a backend on CuPy) and return a function that puts
    it back; None for a backend without CuPy. The pool rounds each array up (to 512 bytes) and
    carves many from one cudaMalloc, so a read a few floats past an array's end lands in memory
    the pool owns, which memcheck takes for valid; without it each array is its own allocation."""
    cuda = getattr(getattr(be, "cupy", None), "cuda", None)
    if cuda is None:
        return None
    pooled = cuda.get_allocator()
    cuda.set_allocator(None)
    return lambda: cuda.set_allocator(pooled)


def drive(name: str, coverage: Coverage | None = None) -> None:
    """Run every kernel of backend ``name`` on ``coverage``'s shapes (its full ``COVERAGE`` by default)."""
    coverage = coverage or COVERAGE[name]
    be = backends.get(name)
    rng = np.random.default_rng(0)
    pool_back = exact_allocations(be)

    def rand(*shape):
        return be.asarray(rng.standard_normal(shape).astype(np.float32))

    drive_every_precision(be, rand, coverage)
    progress(f"{name} misaligned operands")
    drive_misaligned_dense(be, rng, coverage.misaligned, coverage.misaligned_activations)
    progress(f"{name} losses and optimizers")
    drive_losses_and_optimizers(be, rand, rng, coverage)
    if hasattr(be, "FUSED_MLP_MAX_WIDTH"):
        progress(f"{name} fused MLP")
        drive_fused_mlp(be, rng, coverage.fused_batches)
    if hasattr(be, "capture"):
        # Captured over the pool: without it every array the step frees is a cudaFree, which
        # synchronizes, and a synchronization invalidates a capture in progress.
        if pool_back is not None:
            pool_back()
        progress(f"{name} replayed CUDA graphs")
        drive_replayed_steps(be, rng, coverage.graph_cases)
    be.synchronize()
    print(f"sanitizer driver: every {name} kernel ran", flush=True)


def main(argv: list[str]) -> None:
    reductions = [a for a in argv if a in REDUCTIONS]
    names = [a for a in argv if a not in REDUCTIONS] or ["cupy"]
    unknown = sorted(set(names) - set(COVERAGE))
    if unknown:
        raise SystemExit(f"sanitizer_driver: unknown backend(s) {unknown}; expected some of {sorted(COVERAGE)}")
    if reductions and (names != ["cupy"] or len(reductions) > 1):
        raise SystemExit(f"sanitizer_driver: {' or '.join(REDUCTIONS)} (one) drives the cupy backend alone, "
                         f"got {argv}")
    for name in names:
        drive(name, REDUCTIONS[reductions[0]] if reductions else None)


if __name__ == "__main__":
    main(sys.argv[1:])
