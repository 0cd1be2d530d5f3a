"""GPU benchmarks of the dense-layer kernels (pytest-benchmark; skipped without CuPy and a GPU).

Compared on one device in one run, fp32 with TF32 off everywhere:

- ``gpubp-cupy``    the CUDA C++ kernels (fused bias + activation epilogue, fused dz prologue)
- ``gpubp-numba``   the Numba-CUDA kernels, on the same CuPy arrays
- ``cupy-unfused``  cuBLAS SGEMM via ``cupy.matmul`` plus elementwise bias / activation kernels
- ``torch``         PyTorch eager, when importable

Workloads: MLP forward and a full training step (forward, then dX and dW/db for every
layer) at the widths and batches below; single-layer forwards at 1024 and 64 wide; one
4096^3 GEMM against cuBLAS. Every timed call ends in a device synchronize, runs after
warm-up rounds (kernel compilation stays out), on random normal data. ``extra_info``
records shape, dtype, backend, device name and achieved TFLOP/s (2 B in out per GEMM).

    pytest bench/test_gpu_dense.py --benchmark-json bench/results/<device>.json
"""

from __future__ import annotations

import numpy as np
import pytest

from gpubp import backends

try:
    cb = backends.get("cupy")
except RuntimeError as exc:
    pytest.skip(f"GPU benchmarks need the CuPy backend: {exc}", allow_module_level=True)

import cupy  # noqa: E402

try:
    import torch  # noqa: E402

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
except ImportError:
    torch = None

DEVICE_NAME = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()
ROUNDS = 20
WARMUP = 3

# name -> (layer widths, batch)
MLPS = {
    "1024x4@8192": ([1024] * 4, 8192),
    "256x4@16384": ([256] * 4, 16384),
    "64x5+16@65536": ([64] * 5 + [16], 65536),
    "4096x3@256": ([4096] * 3, 256),
}
SINGLE_LAYERS = {"1024wide@8192": ([1024, 1024], 8192), "64wide@65536": ([64, 64], 65536)}
IMPLS = ["gpubp-cupy", "gpubp-numba", "cupy-unfused", "torch"]


def make_mlp(widths, batch, seed=0):
    rng = np.random.default_rng(seed)
    x = cupy.asarray(rng.standard_normal((batch, widths[0]), dtype=np.float32))
    layers = []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        w = cupy.asarray((rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32))
        b = cupy.asarray(rng.standard_normal(n_out, dtype=np.float32))
        act = "relu" if i < len(widths) - 2 else "identity"
        layers.append((w, b, act))
    dy = cupy.asarray(rng.standard_normal((batch, widths[-1]), dtype=np.float32))
    return x, layers, dy


def gemm_flops(widths, batch):
    return sum(2.0 * batch * a * b for a, b in zip(widths[:-1], widths[1:]))


# ----------------------------------------------------------------------------- implementations


def gpubp_step(backend, x, layers, dy, train):
    """Forward through every layer; with ``train``, backward with dX and dW/db everywhere."""
    acts = [(x, None, None)]
    h = x
    for w, b, act in layers:
        y, z = backend.dense_forward(h, w, b, act)
        acts.append((y, z, act))
        h = y
    if train:
        g = dy
        for (inp, _, _), (y, z, act), (w, _, _) in zip(reversed(acts[:-1]), reversed(acts[1:]), reversed(layers)):
            g, _, _ = backend.dense_backward(g, inp, w, y, z, act, True, True)
    cupy.cuda.get_current_stream().synchronize()


def unfused_step(x, layers, dy, train):
    """cuBLAS GEMMs with separate elementwise bias / ReLU passes: what gpubp fuses away."""
    acts = [x]
    for w, b, act in layers:
        y = cupy.matmul(acts[-1], w)
        y += b
        if act == "relu":
            cupy.maximum(y, 0, out=y)
        acts.append(y)
    if train:
        g = dy
        for i in range(len(layers) - 1, -1, -1):
            w, _, act = layers[i]
            dz = g * (acts[i + 1] > 0) if act == "relu" else g
            cupy.matmul(acts[i].T, dz)
            dz.sum(axis=0)
            g = cupy.matmul(dz, w.T)
    cupy.cuda.get_current_stream().synchronize()


def torch_step(x, layers, dy, train):
    h = x
    for w, b, act in layers:
        h = torch.addmm(b, h, w)
        if act == "relu":
            h = torch.relu(h)
    if train:
        h.backward(dy)
    torch.cuda.synchronize()


def runner(impl, x, layers, dy, train):
    if impl == "gpubp-cupy":
        return lambda: gpubp_step(cb, x, layers, dy, train)
    if impl == "gpubp-numba":
        try:
            nb = backends.get("numba")
        except RuntimeError as exc:
            pytest.skip(str(exc))
        return lambda: gpubp_step(nb, x, layers, dy, train)
    if impl == "cupy-unfused":
        return lambda: unfused_step(x, layers, dy, train)
    if torch is None:
        pytest.skip("PyTorch is not installed")
    tx = torch.as_tensor(x, device="cuda")
    tdy = torch.as_tensor(dy, device="cuda")
    tlayers = [
        (torch.as_tensor(w, device="cuda").requires_grad_(train), torch.as_tensor(b, device="cuda").requires_grad_(train),
         act)
        for w, b, act in layers
    ]
    tx.requires_grad_(train)

    def run():
        for w, b, _ in tlayers:
            w.grad = b.grad = None
        tx.grad = None
        torch_step(tx, tlayers, tdy, train)

    return run


def measure(benchmark, fn, *, shape, backend, flops):
    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    benchmark.extra_info.update(
        shape=shape, dtype="float32", backend=backend, device=DEVICE_NAME,
        tflops=flops / benchmark.stats.stats.mean / 1e12,
    )


# ----------------------------------------------------------------------------- benchmarks


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mlp", list(MLPS))
def test_mlp_forward(benchmark, mlp, impl):
    widths, batch = MLPS[mlp]
    x, layers, dy = make_mlp(widths, batch)
    benchmark.group = f"forward {mlp}"
    measure(benchmark, runner(impl, x, layers, dy, False), shape=mlp, backend=impl,
            flops=gemm_flops(widths, batch))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mlp", list(MLPS))
def test_mlp_train_step(benchmark, mlp, impl):
    widths, batch = MLPS[mlp]
    x, layers, dy = make_mlp(widths, batch)
    benchmark.group = f"fwd+bwd {mlp}"
    measure(benchmark, runner(impl, x, layers, dy, True), shape=mlp, backend=impl,
            flops=3 * gemm_flops(widths, batch))


@pytest.mark.parametrize("impl", ["gpubp-cupy", "gpubp-numba", "cupy-unfused"])
@pytest.mark.parametrize("layer", list(SINGLE_LAYERS))
def test_single_layer_forward(benchmark, layer, impl):
    widths, batch = SINGLE_LAYERS[layer]
    x, layers, dy = make_mlp(widths, batch)
    benchmark.group = f"forward layer {layer}"
    measure(benchmark, runner(impl, x, layers, dy, False), shape=layer, backend=impl,
            flops=gemm_flops(widths, batch))


@pytest.mark.parametrize("impl", ["gpubp-cupy", "cublas"])
def test_sgemm_4096_vs_cublas(benchmark, impl):
    """A bare 4096^3 GEMM: gpubp's forward (identity, zero bias) against cuBLAS SGEMM."""
    rng = np.random.default_rng(0)
    a = cupy.asarray(rng.standard_normal((4096, 4096), dtype=np.float32))
    w = cupy.asarray(rng.standard_normal((4096, 4096), dtype=np.float32))
    b = cupy.zeros(4096, np.float32)
    out = cupy.empty((4096, 4096), np.float32)
    sync = cupy.cuda.get_current_stream().synchronize
    if impl == "gpubp-cupy":
        def fn():
            cb.dense_forward(a, w, b, "identity", out=out)
            sync()
    else:
        def fn():
            cupy.matmul(a, w, out=out)
            sync()
    benchmark.group = "sgemm 4096^3"
    measure(benchmark, fn, shape="4096x4096x4096", backend=impl, flops=2.0 * 4096**3)
