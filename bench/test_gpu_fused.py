"""GPU benchmarks of the fused MLP kernels (pytest-benchmark; every test skips, with the
reason, without CuPy and a GPU).

Narrow MLPs, ``LAYERS`` relu layers of width ``WIDTHS`` and a linear 16-class head, at batch
2^14, 2^17 and 2^20, fp32 with TF32 off everywhere, in three modes:

- ``forward``: an inference forward pass;
- ``step``: forward, fused softmax cross-entropy, backward, Adam (bench/test_gpu_dense.py's step);
- ``frozen step``: the same step with every layer but the head frozen.

Implementations:

- ``gpubp-fused``      the cupy backend with ``fused=True`` (kernels/fused_mlp.cu)
- ``gpubp-fused-tf32``, ``gpubp-fused-bf16``  the same with ``precision="tf32"`` / ``"bf16"``
- ``gpubp-per-layer``  the cupy backend with ``fused=False`` (one launch per layer and kernel)
- ``torch``            PyTorch eager
- ``torch-compile``    the same module under ``torch.compile``, width 64 only: each shape
  compiles anew, for its own shapes (bench/test_gpu_dense.py's ``compile_static``), which at
  every width would dominate the run's time

Each benchmark names its ``workload`` ("fused <mode> <width>x<layers>@2^<k>") and ``backend``
in ``extra_info``; bench/fused_table.py turns the JSON into the README's table. The summary ratio
``mlp64_step_vs_torch_eager`` comes from bench/test_gpu_dense.py, whose gpubp-cupy step takes
the fused kernels automatically.

    CUPY_TF32=0 pytest bench/test_gpu_fused.py --benchmark-json fused.json
"""

from __future__ import annotations

import pytest

from test_cpu_step import torch_mlp
from test_gpu_dense import cupy  # noqa: F401  (the fixture: skips without CuPy and a GPU)
from test_gpu_dense import (classification_batch, compile_static, cuda_torch, gemm_flops, gpubp_forward_pass,
                            gpubp_train_step, measure, step_flops, torch_train_step)

WIDTHS = [32, 64, 128]
LAYERS = [4, 8]
BATCH_POWERS = [14, 17, 20]
MODES = ["forward", "step", "frozen step"]
IMPLS = ["gpubp-fused", "gpubp-fused-tf32", "gpubp-fused-bf16", "gpubp-per-layer", "torch", "torch-compile"]
CLASSES = 16


def torch_forward_pass(torch, device: str, widths, batch, compiled):
    model = torch_mlp(torch, device, widths)
    forward = compile_static(torch, model) if compiled else model
    x = torch.as_tensor(classification_batch(widths, batch)[0], device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        with torch.no_grad():
            forward(x)
        sync()

    return run


def runner(impl, mode, widths, batch):
    if impl.startswith("gpubp-"):
        fused = impl.startswith("gpubp-fused")
        precision = impl.split("-")[-1] if impl.endswith(("tf32", "bf16")) else "fp32"
        if mode == "forward":
            return gpubp_forward_pass("cupy", widths, batch, fused=fused, precision=precision)
        return gpubp_train_step("cupy", widths, batch, frozen_backbone=mode == "frozen step", fused=fused,
                                precision=precision)[1]
    compiled = impl == "torch-compile"
    torch = cuda_torch()
    if mode == "forward":
        return torch_forward_pass(torch, "cuda", widths, batch, compiled)
    return torch_train_step(torch, "cuda", widths, batch, compiled=compiled, frozen_backbone=mode == "frozen step")[1]


def mode_flops(mode, widths, batch) -> float:
    """The GEMM FLOPs of a mode's call: the forward's, or the step's (``step_flops``)."""
    if mode == "forward":
        return gemm_flops(widths, batch)
    return step_flops(widths, batch, frozen_backbone=mode == "frozen step")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("power", BATCH_POWERS)
@pytest.mark.parametrize("layers", LAYERS)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("mode", MODES)
def test_fused_mlp(benchmark, cupy, mode, width, layers, power, impl):
    if impl == "torch-compile" and width != 64:
        pytest.skip("torch.compile is measured at width 64 only")
    widths, batch = [width] * layers + [CLASSES], 2**power
    measure(benchmark, cupy, runner(impl, mode, widths, batch),
            workload=f"fused {mode} {width}x{layers}@2^{power}", backend=impl, shape=widths + [batch],
            flops=mode_flops(mode, widths, batch))
