"""The kernels the speed issue is about, each launched once inside a profiler range, for Nsight Compute.

    ncu --profile-from-start off --clock-control none --section SpeedOfLight --section Occupancy \\
        --section LaunchStats --section MemoryWorkloadAnalysis --csv --page details \\
        python3 bench/ncu_driver.py > ncu.csv

``bash bench/gpu_check.sh ncu`` runs that. Each case runs once untimed first (kernel loading,
workspace growth, the optimizer's state), then once between ``cudaProfilerStart`` and
``cudaProfilerStop``, so ncu reads exactly one instance of every kernel the case launches:

- ``fwd_4096``: the fp32 and TF32 dense forward (relu) at 4096^3, and dX and dW/db at 4096^3;
- ``step_1024``: the whole 1024-1024-1024-1024 @ 8192 training step (forward, loss, backward, Adam);
- ``step_mlp64``: the 64-64-64-64-64-10 @ 65536 step on the fused MLP kernels;
- ``step_b64``: the 784-256-256-10 @ 64 step.

The sizes and the step (its weights, its data already on the device) are imported from
bench/test_gpu_dense.py, so ncu reads the kernels of the very workloads the benchmarks time;
that import needs pytest and pytest-benchmark, as the benchmarks do.

The counters say which limit a kernel hits (SM or memory throughput against peak, achieved
occupancy, shared-memory bank conflicts, load efficiency) before anything is changed.
"""

from __future__ import annotations

import contextlib
import sys

import numpy as np

from gpubp import backends
from gpu_summary import STEP_1024, STEP_MLP64
from test_gpu_dense import FWD_SIZE, SMALL_STEP, STEP_WORKLOADS, gpubp_train_step

CASES = ("fwd_4096", "step_1024", "step_mlp64", "step_b64")
SIZES = {"fwd_4096": FWD_SIZE, "step_1024": STEP_WORKLOADS[STEP_1024], "step_mlp64": STEP_WORKLOADS[STEP_MLP64],
         "step_b64": SMALL_STEP}


def dense_passes(be, size: int, precision: str):
    rng = np.random.default_rng(0)
    x, w, dy = (be.asarray(rng.standard_normal(shape, dtype=np.float32)) for shape in
                ((size, size), (size, size), (size, size)))
    b = be.asarray(rng.standard_normal(size, dtype=np.float32))

    def run():
        y, z = be.dense_forward(x, w, b, "relu", precision=precision)
        be.dense_backward(dy, x, w, y, z, "relu", True, True, precision=precision)

    return run


def case_runs(be, case: str) -> list:
    """The callables of one case: each profiled once after one warm-up call."""
    if case == "fwd_4096":
        return [dense_passes(be, SIZES[case], precision) for precision in be.dense_precisions()]
    widths, batch = SIZES[case]
    _, step = gpubp_train_step(be.NAME, widths, batch)
    return [step]


def profile(be, cases, profiled=contextlib.nullcontext) -> None:
    for case in cases:
        for run in case_runs(be, case):
            run()
            be.synchronize()
            with profiled():
                run()
                be.synchronize()


@contextlib.contextmanager
def cuda_profiler():
    import cupy

    cupy.cuda.profiler.start()
    try:
        yield
    finally:
        cupy.cuda.profiler.stop()


def main(argv: list[str]) -> int:
    unknown = sorted(set(argv) - set(CASES))
    if unknown:
        raise SystemExit(f"ncu_driver: unknown case(s) {unknown}; expected some of {list(CASES)}")
    profile(backends.get("cupy"), argv or CASES, cuda_profiler)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
