"""Fine-tuning step times (pytest-benchmark): what freezing saves, on every backend present.

Model [256, 512, 512, 512, 10] (relu, identity head), batch 512, float32, Adam,
softmax cross-entropy, random inputs and labels. Each timed call is one of these
step kinds, and ends with a device synchronize:

- ``forward``: an inference forward pass of the whole model (``training=False``);
  the floor for any step that has to run the backbone.
- ``full``: one training step with every layer trainable: forward, fused loss,
  backward (dW/db everywhere, dX down to the second layer), optimizer update.
- ``frozen_backbone``: the same step with every layer but the head frozen
  (``model.freeze_to(-1)``): forward of the whole model, loss, the head's dW/db
  only (no dX anywhere), and the head's update. It can never cost less than
  ``forward``; the target is at most 1.10x ``forward``.
- ``head_only``: training only the head on backbone features computed once
  beforehand: the head's forward, loss, dW/db and update. The cost of a frozen
  backbone once its features are cached.
- ``bitfit``: every weight frozen and every bias training (BitFit): forward, loss,
  dz and db everywhere, dX down to the second layer, and no dW kernel at all.

PyTorch's CPU build runs ``forward`` (under ``no_grad``), ``full``, ``frozen_backbone``
(``requires_grad_(False)`` on the backbone) and ``bitfit`` (on every weight) in the same run
when torch is importable, so the ratios compare on one machine.

``extra_info`` holds backend, shape, batch, step, dtype, device, matmul FLOPs and
GFLOP/s; for training steps also ``activation_bytes`` (what forward kept for
backward) and ``paired_over_forward``: the median, over rounds that alternate the
step with a forward pass, of step time / forward time. Both share the machine's
load of the moment, so that ratio holds on a busy machine where separate
benchmarks drift apart.

Run, then print the ratios as a markdown table:

    python -m pytest bench/test_finetune.py --benchmark-json ft.json
    python bench/finetune_ratios.py ft.json

The Numba backend runs only on a real GPU: in the CUDA simulator it is far too slow.
"""

from __future__ import annotations

import platform
import time

import numpy as np
import pytest

import gpubp as gb
from gpubp import backends
from gpubp._driver import cuda_device_count

SHAPE = (256, 512, 512, 512, 10)
BATCH = 512
SEED = 0
STEPS = ("forward", "full", "frozen_backbone", "head_only", "bitfit")
WARMUP_CALLS = 3
# Enough rounds that the ratios hold on a busy 2-core machine; each step is tens of ms there.
TIMING = pytest.mark.benchmark(min_rounds=25, max_time=2.0)
PAIRED_ROUNDS = 25

GPU_COUNT, NO_GPU_REASON = cuda_device_count()


def _backend_or_skip(name: str) -> None:
    if name == "numba" and not GPU_COUNT:
        pytest.skip(f"numba: needs a real GPU for timing ({NO_GPU_REASON}); the CUDA simulator is far too slow")
    try:
        backends.get(name)
    except RuntimeError as exc:
        pytest.skip(str(exc))


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _device_name(backend: str) -> str:
    if backend in ("numpy", "torch-cpu"):
        return _cpu_name()
    if backend == "cupy":
        import cupy

        return cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()
    from numba import cuda

    name = cuda.get_current_device().name
    return name.decode() if isinstance(name, bytes) else name


def _data():
    rng = np.random.default_rng(SEED)
    return rng.standard_normal((BATCH, SHAPE[0])).astype(np.float32), rng.integers(0, SHAPE[-1], BATCH)


def _model(sizes, backend: str) -> gb.Sequential:
    gb.seed(SEED)
    acts = ["relu"] * (len(sizes) - 2) + [None]
    layers = [gb.Dense(fan_in, fan_out, act) for fan_in, fan_out, act in zip(sizes[:-1], sizes[1:], acts)]
    return gb.Sequential(layers, backend=backend)


def _layer_flops(sizes) -> list[int]:
    """Matmul FLOPs of each layer's forward at BATCH; dW and dX each cost the same again."""
    return [2 * BATCH * fan_in * fan_out for fan_in, fan_out in zip(sizes[:-1], sizes[1:])]


def _train_flops(model: gb.Sequential) -> int:
    """Matmul FLOPs of one training step: the forward plus each dW/dX kernel in the backward plan."""
    per_layer = _layer_flops([model.in_features] + [layer.out_features for layer in model])
    backward = sum(flops * sum(k in ("dense_dw", "dense_dx") for k in kernels)
                   for flops, (_, kernels) in zip(per_layer, model.backward_plan()))
    return sum(per_layer) + backward


def _record(benchmark, backend: str, step: str, flops: int, activation_bytes: int | None = None) -> None:
    benchmark.extra_info.update(
        backend=backend, shape=list(SHAPE), batch=BATCH, step=step, dtype="float32",
        device=_device_name(backend), flops=flops,
    )
    if activation_bytes is not None:
        benchmark.extra_info["activation_bytes"] = activation_bytes


def _finish(benchmark) -> None:
    if benchmark.stats is not None:
        seconds = benchmark.stats.stats.median
        benchmark.extra_info["gflops_per_s"] = benchmark.extra_info["flops"] / seconds / 1e9


def _paired_over_forward(step, forward) -> float:
    """Median over interleaved rounds of (step time / forward time). The two share whatever
    load the machine has at that moment, so the ratio holds where separate benchmarks drift."""
    ratios = []
    for _ in range(PAIRED_ROUNDS):
        start = time.perf_counter()
        step()
        middle = time.perf_counter()
        forward()
        ratios.append((middle - start) / (time.perf_counter() - middle))
    return float(np.median(ratios))


@TIMING
@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("backend", ["numpy", "cupy", "numba"])
def test_finetune_step(benchmark, backend, step):
    _backend_or_skip(backend)
    benchmark.group = f"finetune {'x'.join(map(str, SHAPE))} batch {BATCH}: {backend}"
    # The forward pass runs on a model of its own (same weights), so it never touches the buffers
    # that the trained model's forward keeps for backward.
    reference = _model(SHAPE, backend)
    xb = reference.backend
    x_host, labels_host = _data()
    x_full = xb.asarray(x_host, np.float32)
    labels = xb.asarray(labels_host, np.int64)

    def forward_pass():
        reference.forward(x_full, training=False)
        xb.synchronize()

    if step == "forward":
        run, flops, model = forward_pass, sum(_layer_flops(SHAPE)), None
    else:
        if step == "head_only":
            x = xb.asarray(xb.to_host(reference[:-1].forward(x_full, training=False)), np.float32)
            model = _model(SHAPE[-2:], backend)
        else:
            x, model = x_full, _model(SHAPE, backend)
        if step == "frozen_backbone":
            model.freeze_to(-1)
        if step == "bitfit":
            for layer in model:
                layer.weight.trainable = False
        train_step = model.train_step("cross_entropy", gb.optim.Adam(model.parameters(), lr=1e-4))

        def run():
            train_step.run(x, labels)
            xb.synchronize()

        flops = _train_flops(model)

    for _ in range(WARMUP_CALLS):
        run()
        forward_pass()
    _record(benchmark, backend, step, flops, model.activation_bytes() if model is not None else None)
    benchmark(run)
    _finish(benchmark)
    if model is not None:
        benchmark.extra_info["paired_over_forward"] = _paired_over_forward(run, forward_pass)


@TIMING
@pytest.mark.parametrize("step", ["forward", "full", "frozen_backbone", "bitfit"])
def test_torch_cpu_step(benchmark, step):
    torch = pytest.importorskip("torch", reason="PyTorch is the CPU comparison; pip install 'gpubp[torch]'")
    benchmark.group = f"finetune {'x'.join(map(str, SHAPE))} batch {BATCH}: torch-cpu"
    torch.manual_seed(SEED)
    layers = []
    for i, (fan_in, fan_out) in enumerate(zip(SHAPE[:-1], SHAPE[1:])):
        layers.append(torch.nn.Linear(fan_in, fan_out))
        if i < len(SHAPE) - 2:
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers)
    x_host, labels_host = _data()
    x, labels = torch.from_numpy(x_host), torch.from_numpy(labels_host)
    per_layer = _layer_flops(SHAPE)

    def forward_pass():
        with torch.no_grad():
            model(x)

    if step == "forward":
        run, flops = forward_pass, sum(per_layer)
    else:
        if step == "frozen_backbone":
            model[:-1].requires_grad_(False)
            backward = per_layer[-1]
        elif step == "bitfit":  # dX down to the second layer, no dW
            for layer in model[::2]:
                layer.weight.requires_grad_(False)
            backward = sum(per_layer) - per_layer[0]
        else:
            backward = 2 * sum(per_layer) - per_layer[0]
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        loss_fn = torch.nn.CrossEntropyLoss()

        def run():
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x), labels).backward()
            optimizer.step()

        flops = sum(per_layer) + backward

    for _ in range(WARMUP_CALLS):
        run()
        forward_pass()
    _record(benchmark, "torch-cpu", step, flops)
    benchmark.extra_info["torch_threads"] = torch.get_num_threads()
    benchmark(run)
    _finish(benchmark)
    if step != "forward":
        benchmark.extra_info["paired_over_forward"] = _paired_over_forward(run, forward_pass)
