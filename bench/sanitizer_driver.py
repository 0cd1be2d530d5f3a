"""Calls every GPU kernel on awkward shapes and operand alignments, for compute-sanitizer.

    compute-sanitizer --tool racecheck --error-exitcode 1 python bench/sanitizer_driver.py cupy numba

The arguments name the backends to drive (default: cupy): ``cupy`` runs the CUDA C++ kernels
of kernels/*.cu, ``numba`` the Numba-CUDA kernels (on CuPy arrays, as a model that switches
between the two does). For each: every activation's forward and both backward kernels on
batch 1, shapes that are not multiples of 4 (the scalar load/store paths) and multiples of 4
(the float4 paths); for cupy also both tile sizes and the split-K dW reduction, and the same in
every other precision the GPU runs (TF32 on tensor cores). Then
misaligned operands: inputs and ``out=`` buffers that start one float past a 16-byte boundary
(C-contiguous views, which the kernels take as they are), with in and out features in
{1, 3, 4, 5, 127, 128, 129}, where the float4 paths must fall back to scalar access. Then every
loss with both label widths, SGD in each mode, Adam and AdamW, sumsq and scale_; and, for
cupy, the fused MLP kernels in every precision (batches 1, 37, 129, a frozen first layer too)
and training steps replayed from CUDA graphs (the update kernels that read their rates from
the device).
Checks nothing itself: the sanitizer does.
"""

from __future__ import annotations

import sys

import numpy as np

from gpubp import backends
from gpubp.activations import ACTIVATIONS

# (batch, in, out). 1500 x 1500 outputs pick the 128x128 tiles; (2048, 64, 48) splits dW.
DENSE_SHAPES = {
    "cupy": [(1, 1, 1), (1, 37, 29), (19, 13, 7), (37, 29, 23), (64, 32, 16), (1500, 77, 1500), (2048, 64, 48)],
    # The Numba kernels have one 64 x 64 tile: ragged shapes, and several blocks each way.
    "numba": [(1, 1, 1), (1, 37, 29), (19, 13, 7), (64, 32, 16), (70, 20, 9), (130, 129, 127)],
}
MISALIGNED_FEATURES = (1, 3, 4, 5, 127, 128, 129)
MISALIGNED_BATCH = 37
# Misaligned operands in the split-K dW path too (cupy picks it for this layer).
MISALIGNED_LARGE_SHAPES = {"cupy": [(2048, 64, 48)], "numba": []}
MISALIGNED_ACTIVATIONS = ("relu", "gelu")  # gelu also stores z
LOSS_SHAPES = [(1, 1), (1, 10), (37, 13), (300, 1001)]
PARAMETER_SIZES = (1, 1031)  # optimizer updates, sumsq and scale_


def misaligned(be, host: np.ndarray):
    """``host`` on the device one float past the start of an allocation (which CUDA aligns
    to 256 bytes): C-contiguous, so no backend copies it, but misaligned for float4."""
    padded = np.concatenate([np.zeros(1, host.dtype), host.ravel()])
    return be.asarray(padded)[1:].reshape(host.shape)


def drive_dense(be, rand, shapes, precision="fp32") -> None:
    for batch, n_in, n_out in shapes:
        x, w, b, dy = rand(batch, n_in), rand(n_in, n_out), rand(n_out), rand(batch, n_out)
        for act in ACTIVATIONS:
            y, z = be.dense_forward(x, w, b, act, precision=precision)
            be.dense_backward(dy, x, w, y, z, act, True, True, precision=precision)
            be.dense_backward(dy, x, w, y, z, act, False, True, precision=precision)
            be.dense_backward(dy, x, w, y, z, act, True, False, precision=precision)


def drive_misaligned_dense(be, rng, shapes) -> None:
    def operand(*shape):
        return misaligned(be, rng.standard_normal(shape).astype(np.float32))

    for batch, n_in, n_out in shapes:
        x, w, b, dy = operand(batch, n_in), operand(n_in, n_out), operand(n_out), operand(batch, n_out)
        for act in MISALIGNED_ACTIVATIONS:
            y, z = be.dense_forward(x, w, b, act, out=operand(batch, n_out), out_z=operand(batch, n_out))
            be.dense_backward(dy, x, w, y, z, act, True, True,
                              operand(batch, n_in), operand(n_in, n_out), operand(n_out))


def drive_losses_and_optimizers(be, rand, rng) -> None:
    for batch, classes in LOSS_SHAPES:
        logits = rand(batch, classes)
        for weights in (None, be.asarray(rng.random(batch).astype(np.float32))):  # the *_weighted kernels too
            for dtype in (np.int32, np.int64):
                be.softmax_cross_entropy(logits, be.asarray(rng.integers(0, classes, batch).astype(dtype)), weights)
            target = be.asarray(rng.random((batch, classes)).astype(np.float32))
            be.mse(logits, target, weights)
            be.bce(logits, target, weights)

    for n in PARAMETER_SIZES:
        p, g = rand(n), rand(n)
        be.sgd_update(p, g, None, 0.1, 0.0, False, 0.0)
        for nesterov in (False, True):
            be.sgd_update(p, g, be.zeros((n,)), 0.1, 0.9, nesterov, 1e-2)
        for decoupled in (False, True):
            be.adam_update(p, g, be.zeros((n,)), be.zeros((n,)), 1e-3, 0.9, 0.999, 1e-8, 1e-2, 1, decoupled)
        be.sumsq(p)
        be.scale_(p, 0.5)


def drive_fused_mlp(be, rng) -> None:
    """The fused MLP kernels in every precision the GPU runs, trained and with a frozen first layer."""
    import gpubp as gb

    for precision in be.fused_precisions():
        for frozen in (0, 1):
            model = gb.Sequential([gb.Dense(13, 33, "gelu"), gb.Dense(33, 16, "tanh"), gb.Dense(16, 7)],
                                  backend=be.NAME, fused=True, precision=precision).freeze_to(frozen)
            step = model.train_step("cross_entropy", "adam")
            for batch in (1, 37, 129):
                step(rng.standard_normal((batch, 13)).astype(np.float32), rng.integers(0, 7, batch))


def drive_replayed_steps(be, rng) -> None:
    """Training steps captured in a CUDA graph and replayed (where the backend has graphs):
    the *_hyper update kernels, and every kernel of a step launched from a graph."""
    import gpubp as gb

    for fused, optimizer in ((False, "adam"), (True, "sgd")):
        model = gb.Sequential([gb.Dense(13, 29, "gelu"), gb.Dense(29, 7)], backend=be.NAME, fused=fused)
        step = model.train_step("cross_entropy", optimizer, cuda_graph=True)
        for _ in range(4):  # eager, capture and replay, replays
            step(rng.standard_normal((37, 13)).astype(np.float32), rng.integers(0, 7, 37))


def drive(name: str) -> None:
    """Run every kernel of backend ``name`` on this driver's shapes and alignments."""
    be = backends.get(name)
    rng = np.random.default_rng(0)

    def rand(*shape):
        return be.asarray(rng.standard_normal(shape).astype(np.float32))

    drive_dense(be, rand, DENSE_SHAPES[name])
    # Only the CUDA C++ backend has tensor-core dense kernels (its TF32 tile says so); elsewhere
    # "tf32" computes fp32, and driving it would rerun the kernels just driven.
    if hasattr(be, "TF32_TILE"):
        for precision in be.dense_precisions():  # the GPU's tensor-core precisions, where it has them
            if precision != "fp32":
                drive_dense(be, rand, DENSE_SHAPES[name], precision)
    misaligned_shapes = [(MISALIGNED_BATCH, n_in, n_out)
                         for n_in in MISALIGNED_FEATURES for n_out in MISALIGNED_FEATURES]
    drive_misaligned_dense(be, rng, misaligned_shapes + MISALIGNED_LARGE_SHAPES[name])
    drive_losses_and_optimizers(be, rand, rng)
    if hasattr(be, "FUSED_MLP_MAX_WIDTH"):
        drive_fused_mlp(be, rng)
    if hasattr(be, "capture"):
        drive_replayed_steps(be, rng)
    be.synchronize()
    print(f"sanitizer driver: every {name} kernel ran")


def main(argv: list[str]) -> None:
    names = argv or ["cupy"]
    unknown = sorted(set(names) - set(DENSE_SHAPES))
    if unknown:
        raise SystemExit(f"sanitizer_driver: unknown backend(s) {unknown}; expected some of {sorted(DENSE_SHAPES)}")
    for name in names:
        drive(name)


if __name__ == "__main__":
    main(sys.argv[1:])
