"""Calls every CuPy-backend kernel once on awkward shapes, for compute-sanitizer.

    compute-sanitizer --tool memcheck --error-exitcode 1 python bench/sanitizer_driver.py

Covers each activation's forward and both backward kernels in both tile sizes, batch 1,
shapes that are not multiples of 4 (the scalar load/store paths) and multiples of 4 (the
float4 paths), the split-K dW reduction, every loss with both label widths, SGD in each
mode, Adam and AdamW, sumsq and scale_. Checks nothing itself: the sanitizer does.
"""

from __future__ import annotations

import numpy as np

from gpubp import backends
from gpubp.activations import ACTIVATIONS

# (batch, in, out). 1500 x 1500 outputs pick the 128x128 tiles; (2048, 64, 48) splits dW.
DENSE_SHAPES = [(1, 1, 1), (1, 37, 29), (19, 13, 7), (37, 29, 23), (64, 32, 16), (1500, 77, 1500), (2048, 64, 48)]
LOSS_SHAPES = [(1, 1), (1, 10), (37, 13), (300, 1001)]


def main() -> None:
    cb = backends.get("cupy")
    rng = np.random.default_rng(0)

    def rand(*shape):
        return cb.asarray(rng.standard_normal(shape).astype(np.float32))

    for batch, n_in, n_out in DENSE_SHAPES:
        x, w, b, dy = rand(batch, n_in), rand(n_in, n_out), rand(n_out), rand(batch, n_out)
        for act in ACTIVATIONS:
            y, z = cb.dense_forward(x, w, b, act)
            cb.dense_backward(dy, x, w, y, z, act, True, True)
            cb.dense_backward(dy, x, w, y, z, act, False, True)
            cb.dense_backward(dy, x, w, y, z, act, True, False)

    for batch, classes in LOSS_SHAPES:
        logits = rand(batch, classes)
        for dtype in (np.int32, np.int64):
            cb.softmax_cross_entropy(logits, cb.asarray(rng.integers(0, classes, batch).astype(dtype)))
        target = cb.asarray(rng.random((batch, classes)).astype(np.float32))
        cb.mse(logits, target)
        cb.bce(logits, target)

    for n in (1, 1031):
        p, g = rand(n), rand(n)
        cb.sgd_update(p, g, None, 0.1, 0.0, False, 0.0)
        for nesterov in (False, True):
            cb.sgd_update(p, g, cb.zeros((n,)), 0.1, 0.9, nesterov, 1e-2)
        for decoupled in (False, True):
            cb.adam_update(p, g, cb.zeros((n,)), cb.zeros((n,)), 1e-3, 0.9, 0.999, 1e-8, 1e-2, 1, decoupled)
        cb.sumsq(p)
        cb.scale_(p, 0.5)
    cb.synchronize()
    print("sanitizer driver: every kernel ran")


if __name__ == "__main__":
    main()
