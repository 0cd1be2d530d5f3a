"""Check where the CuPy backend's kernels come from, and that they compute on this GPU.

    GPUBP_AOT_DIR=<installed fatbins> python bench/gpu_load_check.py fatbin
    GPUBP_AOT_DIR=<an empty folder>   python bench/gpu_load_check.py nvrtc

``bash bench/gpu_check.sh aot`` builds the fatbins with CMake and runs both. Each run checks:

- ``device="auto"`` resolves to the cupy backend;
- the manifest check agrees with the expected path (it accepts the fatbins for this GPU's
  architecture, or there are none);
- every kernel file loads from the expected path (``cupy_backend.origin``);
- a small model trains one step on the cupy backend as on the NumPy backend, fused and per
  layer, fp32 and (on tensor cores) tf32, so every kernel file's kernels run.

Prints one line per check and exits nonzero on the first failure.
"""

from __future__ import annotations

import sys

import numpy as np

import gpubp as gb
from gpubp import backends
from gpubp.backends import cupy_backend

PATHS = ("fatbin", "nvrtc")
TOLERANCE = {"fp32": 1e-4, "tf32": 5e-3}


def check(condition: bool, what: str) -> None:
    print(f"{'ok  ' if condition else 'FAIL'} {what}")
    if not condition:
        raise SystemExit(1)


def train_one_step(backend: str, fused: bool, precision: str) -> list[np.ndarray]:
    gb.seed(0)
    model = gb.Sequential([gb.Dense(37, 45, "relu"), gb.Dense(45, 29, "relu"), gb.Dense(29, 7, "softmax")],
                          backend=backend, fused=fused, precision=precision)
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((133, 37)).astype(np.float32), rng.integers(0, 7, 133)
    # SGD: a weight moves by lr times its gradient, so the weights differ as the gradients do.
    # Adam's first step moves every weight by about lr whatever the gradient's size, so a tiny
    # gradient whose sign TF32 rounding flips would differ by 2 lr and say nothing of the kernels.
    step = model.train_step("cross_entropy", gb.optim.SGD(model.parameters(), lr=0.1))
    step(x, y)
    return model.get_weights()


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in PATHS:
        raise SystemExit(f"usage: gpu_load_check.py {{{'|'.join(PATHS)}}}")
    expected = argv[0]
    check(backends.resolve("auto", "auto") == "cupy", 'device="auto" picks the cupy backend')
    arch = cupy_backend.cupy.cuda.Device().compute_capability
    why_not = cupy_backend._aot_mismatch(arch)
    check((why_not is None) == (expected == "fatbin"),
          f"the manifest check for sm_{arch}: {why_not or 'the fatbins serve it'}")
    cupy_backend.preload()  # every kernel, its NVRTC modules side by side (a fatbin loads whole)
    for filename in cupy_backend.KERNEL_FILES:
        check(cupy_backend.origin.get(filename) == expected, f"{filename} loads from {cupy_backend.origin.get(filename)}")
    for precision in ("fp32", "tf32") if "tf32" in cupy_backend.dense_precisions() else ("fp32",):
        for fused in (True, False):
            got, want = train_one_step("cupy", fused, precision), train_one_step("numpy", False, "fp32")
            # One scale for the whole model, its largest weight: a bias whose gradient sums
            # many cancelling terms is small, and TF32's error relative to it says little.
            scale = max(float(np.max(np.abs(w))) for w in want)
            error = max(float(np.max(np.abs(g - w))) for g, w in zip(got, want)) / scale
            check(error <= TOLERANCE[precision],
                  f"one training step, fused={fused}, {precision}: {error:.2e} from NumPy's weights")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
