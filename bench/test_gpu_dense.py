"""GPU benchmarks (pytest-benchmark; every test skips, with the reason, without CuPy and a GPU).

Compared on one device in one run, fp32 with TF32 off everywhere but where a backend's name ends
in ``-tf32`` or ``-bf16`` (``CUPY_TF32=0`` for cuBLAS through CuPy, ``allow_tf32 = False`` for
PyTorch):

- ``gpubp-cupy``      the CUDA C++ kernels (fused bias + activation epilogue, fused dz prologue)
- ``gpubp-numba``     the Numba-CUDA kernels, on the same CuPy arrays
- ``cublas-gemm``     cuBLAS SGEMM via ``cupy.matmul`` alone: the bare product, no bias or activation
- ``cublas-unfused``  the same SGEMM plus elementwise bias / activation kernels
- ``gpubp-cupy-per-layer``  ``gpubp-cupy`` with ``fused=False``: one launch per layer even where the
  fused MLP kernels fit (``gpubp-cupy`` takes them there)
- ``torch``           PyTorch eager, when importable with CUDA
- ``torch-compile``   the same module under ``torch.compile`` (the 1024 and mlp64 steps), each
  compiled for its own shapes (``compile_static``), as a user's model with one batch size is
- ``gpubp-cupy-bf16`` / ``torch-bf16``  the mlp64 step with the fused kernels' products in bf16,
  and PyTorch eager under ``torch.autocast(dtype=torch.bfloat16)``

Workloads, each named in ``extra_info["workload"]`` (bench/gpu_summary.py reads its ratios
from these names):

- ``FWD_4096``: one 4096^3 relu layer forward, gpubp's fused kernel against the bare cuBLAS
  SGEMM (the goal's baseline: gpubp does the bias and relu on top) and against cuBLAS + bias +
  relu as separate passes (what a user without fused kernels runs);
- ``STEP_1024``, ``STEP_MLP64``: a full training step through the public API (forward, fused
  softmax cross-entropy, backward, Adam update), hidden layers relu, linear head;
- ``STEP_B64``: the same step at 784-256-256-10 with a batch of 64, where launches cost more
  than the math: gpubp eager, gpubp replaying the step as a CUDA graph (``gpubp-cupy-graph``,
  ``cuda_graph=True``), and PyTorch eager;
- ``FROZEN_STEP`` / ``FROZEN_FORWARD``: the same step with every layer but the head frozen,
  and an inference forward pass of the same model, for the frozen-step cost ratio;
- ``tf32 4096^3 ...``: one 4096^3 layer on TF32 tensor cores, each of its three GEMMs alone:
  gpubp's ``precision="tf32"`` kernels (``gpubp-cupy-tf32``: forward with bias and relu, dX,
  dW; the backward's dz kernel included, as it runs) against ``torch.matmul`` with TF32 allowed
  (``cublas-tf32``: the bare product, cuBLAS's TF32 GEMM); issue 28's goal is 0.7 of cuBLAS;
- ``bf16 4096^3 ...``: the same three GEMMs in bf16: gpubp's ``precision="bf16"`` kernels
  (``gpubp-cupy-bf16``: their ``round_bf16`` passes included, as they run) against
  ``torch.matmul`` of the fp32 tensors under bf16 autocast (``cublas-bf16``: autocast's casts
  and cuBLAS's bf16 GEMM); issue 28's goal is 0.6 of cuBLAS;
- ``STEP_1024`` also in bf16: ``gpubp-cupy-bf16`` (per-layer bf16 kernels: the layers are wider
  than the fused ones) against ``torch-bf16`` (eager under bf16 autocast); issue 28's goal is
  1.2x PyTorch;
- ``kernels ...``: the dense kernels' calls alone, without a model, loss or optimizer (forward,
  or forward then dX and dW/db of every layer) at the widths and batches of ``MLPS`` and
  ``SINGLE_LAYERS``; timed per call from the host like everything here, so Python's dispatch
  and the launches are in their times, most of them at the small shapes: not device time.

Every timed call ends in a device synchronize. Before its rounds each benchmark is warmed up
by time (``warm_up``): its first call (Numba's compilation, CuPy's kernel loading, cuBLAS's
and torch.compile's first-call work) and then ``WARMUP_SECONDS`` of calls, at most ``WARMUP``,
so clocks and caches have settled whichever benchmark a process runs first. Data is random
normal; ``ROUNDS`` rounds, of which bench/gpu_summary.py takes the median and records the
spread. ``extra_info`` also records the device name, shape, dtype (``dtype_of``: the precision
the backend computes in) and achieved TFLOP/s (2 B in out per GEMM; a step's GEMMs are those it
computes, ``step_flops``: the forward, dW of each layer that trains, and dX of each layer above
the lowest that trains, so none for the input).

    CUPY_TF32=0 pytest bench/test_gpu_dense.py --benchmark-json bench.json

The step builders take the backend (or array module, or torch device) as an argument, so
the test suite runs each once on the CPU with tiny shapes (tests/test_gpu_check_scripts.py).
"""

from __future__ import annotations

import contextlib
import os
import time

import numpy as np
import pytest

import gpubp as gb
from gpubp import backends
from gpu_summary import (FROZEN_FORWARD, FROZEN_STEP, FWD_4096, GEMM_4096, HEAD_ACT, HIDDEN_ACT, STEP_1024, STEP_B64,
                         STEP_MLP64)
from test_cpu_step import init_weights, torch_mlp  # the CPU step benchmark's initialisation and network

# CuPy reads this when it loads cuBLAS: set before anything here imports CuPy (model_bounds,
# below, imports the CuPy backend, and that imports CuPy).
os.environ["CUPY_TF32"] = "0"

from model_bounds import products  # noqa: E402  (step_flops's count)

ROUNDS = int(os.environ.get("GPUBP_BENCH_ROUNDS", "20"))  # fewer for a quick look (first-contact runs 5)
# Warm-up after the first call: long enough for the GPU's clocks to rise from idle, whichever
# benchmark runs first in its process; and a cap in calls, about that long for the fastest
# benchmark here (the batch-64 step replayed from a CUDA graph, tens of microseconds).
WARMUP_SECONDS = 0.5
WARMUP = 10000
LR = 1e-3

FWD_SIZE = 4096  # FWD_4096: batch, in and out features
STEP_WORKLOADS = {STEP_1024: ([1024] * 4, 8192), STEP_MLP64: ([64] * 5 + [10], 65536)}
FROZEN_MODEL = ([256, 512, 512, 512, 10], 8192)
FWD_4096_IMPLS = ["gpubp-cupy", "cublas-gemm", "cublas-unfused"]
STEP_IMPLS = ["gpubp-cupy", "gpubp-numba", "torch"]
MLP64_EXTRA_IMPLS = ["gpubp-cupy-per-layer", "torch-compile", "gpubp-cupy-bf16", "torch-bf16"]
FROZEN_IMPLS = ["gpubp-cupy", "gpubp-numba"]
# Small batches, where launches cost more than math: eager against a replayed CUDA graph.
SMALL_STEP = ([784, 256, 256, 10], 64)
SMALL_STEP_IMPLS = ["gpubp-cupy", "gpubp-cupy-graph", "torch"]

# Kernel-level workloads: name -> (layer widths, batch)
MLPS = {
    "1024x4@8192": ([1024] * 4, 8192),
    "256x4@16384": ([256] * 4, 16384),
    "64x5+16@65536": ([64] * 5 + [16], 65536),
    "4096x3@256": ([4096] * 3, 256),
}
SINGLE_LAYERS = {"1024wide@8192": ([1024, 1024], 8192), "64wide@65536": ([64, 64], 65536)}
TF32_GEMMS = ("forward", "dX", "dW")
TF32_IMPLS = ["gpubp-cupy-tf32", "cublas-tf32"]
BF16_IMPLS = ["gpubp-cupy-bf16", "cublas-bf16"]
STEP_1024_BF16_IMPLS = ["gpubp-cupy-bf16", "torch-bf16"]
KERNEL_IMPLS = ["gpubp-cupy", "gpubp-numba", "cublas-unfused", "torch"]


def summary_benchmarks() -> set[tuple[str, str]]:
    """Every (workload, backend) pair the tests below time for the summary's ratios."""
    return ({(FWD_4096, impl) for impl in FWD_4096_IMPLS}
            | {(GEMM_4096.format(precision="tf32", gemm="forward"), impl) for impl in TF32_IMPLS}
            | {(GEMM_4096.format(precision="bf16", gemm="forward"), impl) for impl in BF16_IMPLS}
            | {(workload, impl) for workload in STEP_WORKLOADS for impl in STEP_IMPLS}
            | {(STEP_MLP64, impl) for impl in MLP64_EXTRA_IMPLS} | {(STEP_1024, "torch-compile")}
            | {(STEP_1024, impl) for impl in STEP_1024_BF16_IMPLS}
            | {(workload, impl) for workload in (FROZEN_STEP, FROZEN_FORWARD) for impl in FROZEN_IMPLS}
            | {(STEP_B64, impl) for impl in SMALL_STEP_IMPLS})


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cupy():
    """The cupy module the CuPy backend runs on (the CPU harness's stand-in under rehearsal)."""
    try:
        return backends.get("cupy").cupy
    except RuntimeError as exc:
        pytest.skip(f"GPU benchmarks need the CuPy backend: {exc}")


def gpu_backend(impl: str):
    """The backend module of ``impl`` ("gpubp-<backend>[-<variant>]"), or skip saying why not."""
    try:
        return backends.get(impl.split("-")[1])
    except RuntimeError as exc:
        pytest.skip(str(exc))


def cuda_torch():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch was built without CUDA or sees no GPU")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return torch


def device_name(cupy) -> str:
    return cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()


def dtype_of(backend: str) -> str:
    """The precision a benchmark's products run in, by its backend's name: "-tf32" and "-bf16"
    ones (gpubp's kernels, cuBLAS through PyTorch, PyTorch under autocast) in theirs, the rest
    in float32 with TF32 off."""
    return backend.rsplit("-", 1)[-1] if backend.endswith(("-tf32", "-bf16")) else "float32"


def warm_up(fn) -> int:
    """Call ``fn`` untimed: once (whatever a first call does: compile, load, allocate), then until
    ``WARMUP_SECONDS`` more have passed, ``WARMUP`` calls in all at most. Returns the calls made."""
    calls, since = 0, None
    while calls < WARMUP and (since is None or time.perf_counter() - since < WARMUP_SECONDS):
        fn()
        calls += 1
        since = since or time.perf_counter()
    return calls


def measure(benchmark, cupy, fn, *, workload, backend, shape, flops, dtype=None):
    """Time ``fn``, warmed up (``warm_up``), over ``ROUNDS`` rounds of one call; ``dtype`` if the
    backend's name does not say it (``dtype_of``)."""
    benchmark.group = workload
    warm_up(fn)
    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=0, iterations=1)
    benchmark.extra_info.update(
        workload=workload, backend=backend, shape=shape, dtype=dtype or dtype_of(backend), device=device_name(cupy),
        tflops=flops / benchmark.stats.stats.median / 1e12,
    )


def gemm_flops(widths, batch) -> float:
    return sum(2.0 * batch * a * b for a, b in zip(widths[:-1], widths[1:]))


def step_flops(widths, batch, frozen_backbone=False) -> float:
    """The GEMM FLOPs of one training step as it computes them: bench/model_bounds.py's products
    of the step, by gpubp's backward plan: the forward of every layer, dW of each layer that
    trains, dX of each layer above the lowest that trains (none at the input: a step needs no
    gradient of its data; nor does PyTorch's, whose input does not require one). With
    ``frozen_backbone``, the forward and the head's dW. The same count for every backend."""
    workload = "frozen-backbone step" if frozen_backbone else "train step"  # as products reads them
    return sum(product.flops for product in products(workload, "gpubp-cupy", [*widths, batch], sms=1))


# ----------------------------------------------------------------------------- step builders
# Each returns a function that runs one step and waits for the device.


def classification_batch(widths, batch, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, widths[0]), dtype=np.float32), rng.integers(0, widths[-1], batch)


def gpubp_model(backend: str, widths, fused="auto", precision="fp32") -> gb.Sequential:
    last = len(widths) - 2
    model = gb.Sequential(
        [gb.Dense(i, o, activation=HEAD_ACT if k == last else HIDDEN_ACT)
         for k, (i, o) in enumerate(zip(widths[:-1], widths[1:]))],
        backend=backend, fused=fused, precision=precision,
    )
    model.set_weights(init_weights(widths))
    return model


def gpubp_train_step(backend: str, widths, batch, frozen_backbone=False, fused="auto", precision="fp32",
                     cuda_graph=False):
    """forward, fused softmax cross-entropy, backward, Adam: one batch of fit (its TrainStep),
    on data already on the device. ``step.train_step`` is the TrainStep, which says whether
    its last call replayed a CUDA graph."""
    model = gpubp_model(backend, widths, fused, precision)
    if frozen_backbone:
        model.freeze_to(-1)
    be = model.backend
    x, labels = classification_batch(widths, batch)
    x, labels = be.asarray(x), be.asarray(labels)
    train_step = model.train_step("cross_entropy", gb.optim.Adam(model.parameters(), lr=LR), cuda_graph=cuda_graph)

    def step():
        train_step.run(x, labels)
        be.synchronize()

    step.train_step = train_step
    return model, step


def gpubp_forward_pass(backend: str, widths, batch, fused="auto", precision="fp32"):
    model = gpubp_model(backend, widths, fused, precision)
    x = model.backend.asarray(classification_batch(widths, batch)[0])

    def forward():
        model.forward(x, training=False)
        model.backend.synchronize()

    return forward


def compile_static(torch, model):
    """``model`` under ``torch.compile`` for the shapes it is first called with, as a user's model
    with one batch size is compiled. Dynamo's cache and its automatic-dynamic state are per code
    object (nn.Sequential.forward) and last the process: a benchmark after one of another shape
    would get a graph for a symbolic batch (dynamic=False forbids it), and past the recompile
    limit none at all, running eagerly (the reset before each starts them afresh)."""
    torch._dynamo.reset()
    return torch.compile(model, dynamic=False)


def torch_train_step(torch, device: str, widths, batch, compiled=False, frozen_backbone=False, bf16=False):
    """The same step in PyTorch eager (or under ``torch.compile``: ``compile_static``):
    nn.Linear + ReLU, F.cross_entropy, torch.optim.Adam; ``frozen_backbone`` trains the head
    only; ``bf16`` runs forward and loss under bf16 autocast (fp32 weights, as gpubp's bf16)."""
    model = torch_mlp(torch, device, widths)
    if frozen_backbone:
        for param in model[:-1].parameters():
            param.requires_grad_(False)
    forward = compile_static(torch, model) if compiled else model
    x, labels = classification_batch(widths, batch)
    x, labels = torch.as_tensor(x, device=device), torch.as_tensor(labels, device=device)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LR)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    # Entered only for bf16: a disabled autocast still costs the fp32 step microseconds a call.
    autocast = (lambda: torch.autocast(device_type=device, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = torch.nn.functional.cross_entropy(forward(x), labels)
        loss.backward()
        opt.step()
        sync()

    return model, step


def unfused_relu_forward(xp, a, w, b, out, sync):
    """What gpubp fuses away: a bare SGEMM, then bias and relu as separate elementwise passes."""
    def forward():
        xp.matmul(a, w, out=out)
        xp.add(out, b, out=out)
        xp.maximum(out, 0, out=out)
        sync()

    return forward


def kernel_pass(be, x, layers, dy, train, sync):
    """The dense kernels alone: forward through every layer; with ``train``, dX and dW/db everywhere."""
    def run():
        acts = [(x, None, None)]
        h = x
        for w, b, act in layers:
            y, z = be.dense_forward(h, w, b, act)
            acts.append((y, z, act))
            h = y
        if train:
            g = dy
            for (inp, _, _), (y, z, act), (w, _, _) in zip(reversed(acts[:-1]), reversed(acts[1:]), reversed(layers)):
                g, _, _ = be.dense_backward(g, inp, w, y, z, act, True, True)
        sync()

    return run


def unfused_kernel_pass(xp, x, layers, dy, train, sync):
    """cuBLAS GEMMs with separate elementwise bias / relu passes, forward and optionally backward."""
    def run():
        acts = [x]
        for w, b, act in layers:
            y = xp.matmul(acts[-1], w)
            y += b
            if act == "relu":
                xp.maximum(y, 0, out=y)
            acts.append(y)
        if train:
            g = dy
            for i in range(len(layers) - 1, -1, -1):
                w, _, act = layers[i]
                dz = g * (acts[i + 1] > 0) if act == "relu" else g
                xp.matmul(acts[i].T, dz)
                dz.sum(axis=0)
                g = xp.matmul(dz, w.T)
        sync()

    return run


# ----------------------------------------------------------------------------- the summary's workloads


@pytest.mark.parametrize("impl", FWD_4096_IMPLS)
def test_forward_4096_relu(benchmark, cupy, impl):
    n = FWD_SIZE
    rng = np.random.default_rng(0)
    a = cupy.asarray(rng.standard_normal((n, n), dtype=np.float32))
    w = cupy.asarray(rng.standard_normal((n, n), dtype=np.float32) / np.float32(np.sqrt(n)))
    b = cupy.asarray(rng.standard_normal(n, dtype=np.float32))
    out = cupy.empty((n, n), np.float32)
    sync = cupy.cuda.get_current_stream().synchronize
    if impl == "gpubp-cupy":
        cb = gpu_backend(impl)

        def fn():
            cb.dense_forward(a, w, b, "relu", out=out)
            sync()
    elif impl == "cublas-gemm":
        def fn():
            cupy.matmul(a, w, out=out)
            sync()
    else:
        fn = unfused_relu_forward(cupy, a, w, b, out, sync)
    measure(benchmark, cupy, fn, workload=FWD_4096, backend=impl, shape=f"{n}x{n}x{n}", flops=2.0 * n**3)


@pytest.mark.parametrize("impl", TF32_IMPLS)
@pytest.mark.parametrize("gemm", TF32_GEMMS)
def test_tf32_gemm_4096_against_cublas(benchmark, cupy, gemm, impl):
    n = FWD_SIZE
    rng = np.random.default_rng(0)
    x, w, dy = (cupy.asarray(rng.standard_normal((n, n), dtype=np.float32)) for _ in range(3))
    b = cupy.asarray(rng.standard_normal(n, dtype=np.float32))
    sync = cupy.cuda.get_current_stream().synchronize
    if impl == "gpubp-cupy-tf32":
        cb = gpu_backend(impl)
        y, _ = cb.dense_forward(x, w, b, "relu", precision="tf32")
        out = cupy.empty((n, n), np.float32)
        calls = {"forward": lambda: cb.dense_forward(x, w, b, "relu", out=out, precision="tf32"),
                 "dX": lambda: cb.dense_backward(dy, x, w, y, None, "relu", True, False, out_dx=out, precision="tf32"),
                 "dW": lambda: cb.dense_backward(dy, x, w, y, None, "relu", False, True, out_dw=out,
                                                 out_db=b, precision="tf32")}
    else:
        torch = cuda_torch()
        torch.backends.cuda.matmul.allow_tf32 = True
        tx, tw, tdy = (torch.as_tensor(a, device="cuda") for a in (x, w, dy))
        tout = torch.empty((n, n), device="cuda")
        calls = {"forward": lambda: torch.matmul(tx, tw, out=tout), "dX": lambda: torch.matmul(tdy, tw.T, out=tout),
                 "dW": lambda: torch.matmul(tx.T, tdy, out=tout)}

    def fn():
        calls[gemm]()
        sync()

    try:
        measure(benchmark, cupy, fn, workload=GEMM_4096.format(precision="tf32", gemm=gemm), backend=impl,
                shape=f"{n}x{n}x{n}", flops=2.0 * n**3)
    finally:
        if impl == "cublas-tf32":
            torch.backends.cuda.matmul.allow_tf32 = False


@pytest.mark.parametrize("impl", BF16_IMPLS)
@pytest.mark.parametrize("gemm", TF32_GEMMS)
def test_bf16_gemm_4096_against_cublas(benchmark, cupy, gemm, impl):
    n = FWD_SIZE
    rng = np.random.default_rng(0)
    x, w, dy = (cupy.asarray(rng.standard_normal((n, n), dtype=np.float32)) for _ in range(3))
    b = cupy.asarray(rng.standard_normal(n, dtype=np.float32))
    sync = cupy.cuda.get_current_stream().synchronize
    if impl == "gpubp-cupy-bf16":
        cb = gpu_backend(impl)
        if "bf16" not in cb.dense_precisions():
            pytest.skip(f"this GPU runs the dense kernels in {cb.dense_precisions()} only")
        y, _ = cb.dense_forward(x, w, b, "relu", precision="bf16")
        out = cupy.empty((n, n), np.float32)
        calls = {"forward": lambda: cb.dense_forward(x, w, b, "relu", out=out, precision="bf16"),
                 "dX": lambda: cb.dense_backward(dy, x, w, y, None, "relu", True, False, out_dx=out, precision="bf16"),
                 "dW": lambda: cb.dense_backward(dy, x, w, y, None, "relu", False, True, out_dw=out,
                                                 out_db=b, precision="bf16")}
    else:
        torch = cuda_torch()
        tx, tw, tdy = (torch.as_tensor(a, device="cuda") for a in (x, w, dy))
        products = {"forward": lambda: torch.matmul(tx, tw), "dX": lambda: torch.matmul(tdy, tw.T),
                    "dW": lambda: torch.matmul(tx.T, tdy)}

        def autocast(product):
            def call():
                with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
                    return product()
            return call

        calls = {name: autocast(product) for name, product in products.items()}

    def fn():
        calls[gemm]()
        sync()

    measure(benchmark, cupy, fn, workload=GEMM_4096.format(precision="bf16", gemm=gemm), backend=impl,
            shape=f"{n}x{n}x{n}", flops=2.0 * n**3)


@pytest.mark.parametrize("impl", STEP_1024_BF16_IMPLS)
def test_1024_train_step_in_bf16_against_torch_autocast(benchmark, cupy, impl):
    widths, batch = STEP_WORKLOADS[STEP_1024]
    if impl == "torch-bf16":
        _, step = torch_train_step(cuda_torch(), "cuda", widths, batch, bf16=True)
    else:
        if "bf16" not in gpu_backend(impl).dense_precisions():
            pytest.skip(f"this GPU runs the dense kernels in {gpu_backend(impl).dense_precisions()} only")
        _, step = gpubp_train_step(gpu_backend(impl).NAME, widths, batch, precision="bf16")
    measure(benchmark, cupy, step, workload=STEP_1024, backend=impl, shape=widths + [batch],
            flops=step_flops(widths, batch))
    record_launches(benchmark, impl, step)


@pytest.mark.parametrize("impl", STEP_IMPLS)
@pytest.mark.parametrize("workload", list(STEP_WORKLOADS))
def test_train_step(benchmark, cupy, workload, impl):
    widths, batch = STEP_WORKLOADS[workload]
    if impl == "torch":
        _, step = torch_train_step(cuda_torch(), "cuda", widths, batch)
    else:
        _, step = gpubp_train_step(gpu_backend(impl).NAME, widths, batch)
    measure(benchmark, cupy, step, workload=workload, backend=impl, shape=widths + [batch],
            flops=step_flops(widths, batch))
    record_launches(benchmark, impl, step)


def gpubp_kernels_per_step(step) -> int:
    """Kernels one gpubp step launches, by gpubp's own trace."""
    with gb.trace() as launched:
        step()
    return launched.total


def torch_kernels_per_step(torch, step) -> int:
    """GPU kernels one PyTorch step runs, by the PyTorch profiler (copies and fills not counted)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
    return sum(1 for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA
               and not event.name.startswith(("Memcpy", "Memset")))


def record_launches(benchmark, impl: str, step) -> None:
    """``kernels_per_step`` (kernels run) and ``host_launches_per_step`` (launches Python made:
    1 for a replayed CUDA graph) in extra_info, for bench/gpu_summary.py."""
    if impl.startswith("torch"):
        kernels = torch_kernels_per_step(cuda_torch(), step)
    else:
        kernels = gpubp_kernels_per_step(step)
    graphed = getattr(getattr(step, "train_step", None), "graphed", False)
    benchmark.extra_info.update(kernels_per_step=kernels, host_launches_per_step=1 if graphed else kernels)


def test_1024_train_step_under_torch_compile(benchmark, cupy):
    widths, batch = STEP_WORKLOADS[STEP_1024]
    _, step = torch_train_step(cuda_torch(), "cuda", widths, batch, compiled=True)
    measure(benchmark, cupy, step, workload=STEP_1024, backend="torch-compile", shape=widths + [batch],
            flops=step_flops(widths, batch))
    record_launches(benchmark, "torch-compile", step)


@pytest.mark.parametrize("impl", MLP64_EXTRA_IMPLS)
def test_mlp64_train_step_baselines_of_the_fused_kernels(benchmark, cupy, impl):
    widths, batch = STEP_WORKLOADS[STEP_MLP64]
    if impl.startswith("torch"):
        _, step = torch_train_step(cuda_torch(), "cuda", widths, batch, compiled=impl == "torch-compile",
                                   bf16=impl == "torch-bf16")
    elif impl == "gpubp-cupy-bf16":
        _, step = gpubp_train_step(gpu_backend(impl).NAME, widths, batch, precision="bf16")
    else:
        _, step = gpubp_train_step(gpu_backend(impl).NAME, widths, batch, fused=False)
    measure(benchmark, cupy, step, workload=STEP_MLP64, backend=impl, shape=widths + [batch],
            flops=step_flops(widths, batch))
    record_launches(benchmark, impl, step)


@pytest.mark.parametrize("impl", SMALL_STEP_IMPLS)
def test_small_batch_train_step(benchmark, cupy, impl):
    widths, batch = SMALL_STEP
    graph = impl.endswith("-graph")
    if impl == "torch":
        _, step = torch_train_step(cuda_torch(), "cuda", widths, batch)
    else:
        _, step = gpubp_train_step(gpu_backend(impl).NAME, widths, batch, cuda_graph=graph)
    if graph:
        # A batch's first step runs eagerly and its second captures the graph: both before the
        # timed rounds, whatever the warm-up (the rehearsal has none), so that the rounds replay.
        step()
        step()
        assert step.train_step.graphed, f"no graph captured before the rounds: {step.train_step.why_not_graphed()}"
    measure(benchmark, cupy, step, workload=STEP_B64, backend=impl, shape=widths + [batch],
            flops=step_flops(widths, batch))
    if graph:
        # The timed rounds' last step, read before record_launches runs one more. Every round ran on
        # the batch and settings of the captured graph, which a step replays while they hold.
        assert step.train_step.graphed, f"the timed rounds ran eagerly: {step.train_step.why_not_graphed()}"
    record_launches(benchmark, impl, step)


@pytest.mark.parametrize("impl", FROZEN_IMPLS)
@pytest.mark.parametrize("workload", [FROZEN_STEP, FROZEN_FORWARD])
def test_frozen_backbone_step_and_forward(benchmark, cupy, workload, impl):
    widths, batch = FROZEN_MODEL
    backend = gpu_backend(impl).NAME
    if workload == FROZEN_STEP:
        _, fn = gpubp_train_step(backend, widths, batch, frozen_backbone=True)
        flops = step_flops(widths, batch, frozen_backbone=True)
    else:
        fn = gpubp_forward_pass(backend, widths, batch)
        flops = gemm_flops(widths, batch)
    measure(benchmark, cupy, fn, workload=workload, backend=impl, shape=widths + [batch], flops=flops)


# ----------------------------------------------------------------------------- the kernels alone


def kernel_runner(cupy, impl, widths, batch, train):
    rng = np.random.default_rng(0)
    x = cupy.asarray(rng.standard_normal((batch, widths[0]), dtype=np.float32))
    layers = []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        w = cupy.asarray((rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32))
        b = cupy.asarray(rng.standard_normal(n_out, dtype=np.float32))
        layers.append((w, b, "relu" if i < len(widths) - 2 else "identity"))
    dy = cupy.asarray(rng.standard_normal((batch, widths[-1]), dtype=np.float32))
    sync = cupy.cuda.get_current_stream().synchronize
    if impl.startswith("gpubp-"):
        return kernel_pass(gpu_backend(impl), x, layers, dy, train, sync)
    if impl == "cublas-unfused":
        return unfused_kernel_pass(cupy, x, layers, dy, train, sync)
    torch = cuda_torch()
    tx = torch.as_tensor(x, device="cuda").requires_grad_(train)
    tdy = torch.as_tensor(dy, device="cuda")
    tlayers = [(torch.as_tensor(w, device="cuda").requires_grad_(train),
                torch.as_tensor(b, device="cuda").requires_grad_(train), act) for w, b, act in layers]

    def run():
        h = tx
        for w, b, act in tlayers:
            w.grad = b.grad = None
            h = torch.addmm(b, h, w)
            if act == "relu":
                h = torch.relu(h)
        if train:
            tx.grad = None
            h.backward(tdy)
        torch.cuda.synchronize()

    return run


# The kernels' calls alone: per call from the host, Python's dispatch and the launches included
# (the CPU stand-in of CuPy has no CUDA events to time the device by).
@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("mlp", list(MLPS))
@pytest.mark.parametrize("train", [False, True], ids=["forward", "fwd+bwd"])
def test_kernels_on_mlp(benchmark, cupy, mlp, impl, train):
    widths, batch = MLPS[mlp]
    measure(benchmark, cupy, kernel_runner(cupy, impl, widths, batch, train),
            workload=f"kernels {'fwd+bwd' if train else 'forward'} {mlp}", backend=impl, shape=mlp,
            flops=(3 if train else 1) * gemm_flops(widths, batch))


@pytest.mark.parametrize("impl", ["gpubp-cupy", "gpubp-numba", "cublas-unfused"])
@pytest.mark.parametrize("layer", list(SINGLE_LAYERS))
def test_kernels_on_single_layer(benchmark, cupy, layer, impl):
    widths, batch = SINGLE_LAYERS[layer]
    measure(benchmark, cupy, kernel_runner(cupy, impl, widths, batch, False),
            workload=f"kernels forward layer {layer}", backend=impl, shape=layer, flops=gemm_flops(widths, batch))
