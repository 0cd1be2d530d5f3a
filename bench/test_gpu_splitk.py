"""The dW kernel's batch split, swept: the data the split-K heuristic is fitted to (pytest-benchmark;
every test skips, with the reason, without CuPy and a GPU).

The dW GEMM of a layer (in, out) at batch B has in x out outputs and a K of B. With fewer
output tiles than SMs the cupy backend splits K over ``gridDim.z`` (``cupy_backend._dw_split``,
a deterministic split-ordered finish). Here every shape runs at each forced split count in
``SPLITS`` (backend "splits=<s>") and at the heuristic's own choice (backend "heuristic"), dW
and db only (``need_dx=False``), relu, in fp32 (TF32 off) and on TF32 tensor cores, whose dW
kernel splits the same way. Each round times ``LAUNCHES`` passes back to back and one
synchronize at the end (``launches_per_round`` in ``extra_info``), so a pass's time is the
GPU's, not that of a host round trip per launch. bench/splitk_table.py reads the JSON and
tells, per shape, the heuristic's time against the same split forced and against the fastest
other split.

    pytest bench/test_gpu_splitk.py --benchmark-json splitk.json && python bench/splitk_table.py splitk.json
"""

from __future__ import annotations

import numpy as np
import pytest

from test_gpu_dense import cupy, measure  # noqa: F401  (cupy: the fixture that skips without a GPU)

BATCHES = [4096, 32768]
LAYERS = [(64, 48), (77, 13), (256, 256), (1024, 256), (1024, 1024)]
SPLITS = [1, 2, 4, 8, 16, 32]
CHOICES = [f"splits={s}" for s in SPLITS] + ["heuristic"]
PRECISIONS = ["fp32", "tf32"]
# dW passes per timed round: the smallest shapes take microseconds, less than a launch and a
# synchronize's round trip from the host, which one pass per round would time instead.
LAUNCHES = 20


def workload(batch: int, n_in: int, n_out: int, precision: str) -> str:
    return f"dw split-K {batch}x{n_in}x{n_out} {precision}"


def dw_pass(cb, batch: int, n_in: int, n_out: int, precision: str = "fp32", seed: int = 0):
    """``LAUNCHES`` dW/db passes of a relu layer on random data, into reused output buffers, back
    to back, then a synchronize."""
    rng = np.random.default_rng(seed)
    x, dy, y = (cb.asarray(rng.standard_normal(shape, dtype=np.float32))
                for shape in ((batch, n_in), (batch, n_out), (batch, n_out)))
    w = cb.asarray(rng.standard_normal((n_in, n_out), dtype=np.float32))
    dw, db = cb.empty((n_in, n_out)), cb.empty((n_out,))

    def run():
        for _ in range(LAUNCHES):
            cb.dense_backward(dy, x, w, y, None, "relu", False, True, out_dw=dw, out_db=db, precision=precision)
        cb.synchronize()

    return run


@pytest.mark.parametrize("choice", CHOICES)
@pytest.mark.parametrize("layer", LAYERS, ids=lambda layer: f"{layer[0]}x{layer[1]}")
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_dw_split(benchmark, cupy, monkeypatch, precision, batch, layer, choice):
    from gpubp.backends import cupy_backend as cb

    if precision not in cb.dense_precisions():
        pytest.skip(f"this GPU runs the dense kernels in {cb.dense_precisions()} only")

    choose = cb._dw_split
    if choice != "heuristic":
        forced = int(choice.removeprefix("splits="))

        def choose(b, tiles, k_step=cb.BK):
            return cb.batch_chunks(b, forced, k_step)

    chosen = []  # what each launch used, as the backend computed it
    monkeypatch.setattr(cb, "_dw_split", lambda b, tiles, k_step=cb.BK: chosen.append(choose(b, tiles, k_step))
                        or chosen[-1])
    n_in, n_out = layer
    measure(benchmark, cupy, dw_pass(cb, batch, n_in, n_out, precision), workload=workload(batch, n_in, n_out, precision),
            backend=choice, shape=[batch, n_in, n_out], flops=LAUNCHES * 2.0 * batch * n_in * n_out,
            dtype="float32" if precision == "fp32" else precision)
    benchmark.extra_info.update(splits=chosen[-1][0], launches_per_round=LAUNCHES)
