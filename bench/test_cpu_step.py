"""One CPU training step: gpubp's NumPy backend against a naive NumPy MLP, PyTorch's CPU build
and the step's own matrix products.

A step is forward, softmax cross-entropy, backward and an SGD update (lr 0.01, momentum 0.9)
on a fixed random batch, for every shape in ``SHAPES``: hidden layers use relu, the output
layer is linear (the loss applies softmax). Everything is float32.

``gemm_floor`` times only the matrix products such a step cannot avoid, through NumPy's BLAS
into preallocated outputs: ``x @ W`` for every layer, ``dW = x.T @ dz`` for every layer and
``dX = dz @ W.T`` for every layer but the first. No step built on the same BLAS can beat it;
a step's ratio to it is what bias, activations, loss, update and Python cost on top.
``gpubp`` runs with the compiled CPU kernels when Numba is installed (``extra_info["cpu_kernels"]``
says which ran); ``gpubp_numpy`` is the same model with them switched off, the path a plain
``pip install gpubp`` takes.

Each shape is one test that interleaves the backends: a round runs a block of about 10 ms of
steps of every backend, one after another, and a run's ratio is the median of its rounds' ratios
(``bench/report.py``), so a ratio compares blocks timed moments apart rather than cases timed
seconds apart, which on a shared VM differ by up to 2x for reasons that are not the code.
pytest-benchmark's own statistics are gpubp's blocks; every backend's per-round seconds per step
are in ``extra_info["interleaved"]``.

Two tables, each from three runs back to back:

- **every core, wall clock** (what a user sees): nothing is pinned, so on N cores NumPy's
  BLAS, gpubp's elementwise passes (``numpy_backend.cpu_threads()``) and PyTorch all use N
  threads, and the timer is the wall clock::

      for run in 1 2 3; do
          python -m pytest bench/test_cpu_step.py -q --benchmark-json bench/results/cpu_step_allcores-$run.json
      done
      python bench/report.py bench/results/cpu_step_allcores-{1,2,3}.json \
          --markdown bench/results/cpu_step_allcores.md --png bench/results/cpu_step_allcores.png

- **one thread, process time**: every library on one thread, timed by the process's CPU time,
  which other jobs on a shared machine move far less than the wall clock::

      for run in 1 2 3; do
          OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 python -m pytest bench/test_cpu_step.py -q \
              --benchmark-timer time.process_time --benchmark-json bench/results/cpu_step_1thread-$run.json
      done
      python bench/report.py bench/results/cpu_step_1thread-{1,2,3}.json \
          --markdown bench/results/cpu_step_1thread.md --png bench/results/cpu_step_1thread.png

The thread counts actually used are recorded in each result's ``extra_info``
(``gpubp_threads``, ``torch_threads``, ``blas_threads`` via threadpoolctl when it is
installed), with ``OPENBLAS_CORETYPE`` and the load average at the start of the case: a wall
clock run under load says more about the other jobs than about the step.

PyTorch is left out of the rounds when it is not installed (``pip install "gpubp[torch]"``).
"""

from __future__ import annotations

import os
import platform
import time

import numpy as np
import pytest

import gpubp as gb
from gpubp.backends import numpy_backend

pytest.importorskip("pytest_benchmark")

LR = 0.01
MOMENTUM = 0.9
WARMUP_STEPS = 3

# (layer sizes, batch): an MNIST-sized MLP at a training and a small batch, a wide
# matmul-bound MLP, and a narrow deep MLP at a large batch (elementwise-bound).
SHAPES = [
    ([784, 256, 256, 10], 256),
    ([784, 256, 256, 10], 64),
    ([1024] * 4, 512),
    ([64] * 5 + [10], 4096),
]
BACKENDS = ("gpubp", "gpubp_numpy", "numpy_naive", "torch", "gemm_floor")


def shape_id(sizes: list[int], batch: int) -> str:
    return f"{'-'.join(map(str, sizes))}@{batch}"


def make_batch(sizes: list[int], batch: int):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, sizes[0]), dtype=np.float32)
    labels = rng.integers(0, sizes[-1], batch, dtype=np.int64)
    return x, labels


def init_weights(sizes: list[int]) -> list[np.ndarray]:
    """He-normal weights and small random biases (never zeros), [W0, b0, W1, b1, ...]."""
    rng = np.random.default_rng(1)
    weights = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        weights.append(rng.normal(0.0, np.sqrt(2.0 / fan_in), (fan_in, fan_out)).astype(np.float32))
        weights.append(rng.normal(0.0, 0.01, fan_out).astype(np.float32))
    return weights


# ----------------------------------------------------------------------------- the three steps


def gpubp_step(sizes, x, labels):
    last = len(sizes) - 2
    model = gb.Sequential(
        [gb.Dense(i, o, activation=None if k == last else "relu") for k, (i, o) in enumerate(zip(sizes[:-1], sizes[1:]))],
        device="cpu",
    )
    model.set_weights(init_weights(sizes))
    opt = gb.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)

    def step():
        out = model.forward(x)
        loss, dout = gb.losses.cross_entropy(out, labels)
        model.backward(dout)
        opt.step()
        return loss

    return step


def gpubp_numpy_step(sizes, x, labels):
    step = gpubp_step(sizes, x, labels)

    def numpy_only_step():
        with numpy_backend.compiled_kernels(False):
            return step()

    return numpy_only_step


def naive_step(sizes, x, labels):
    """A textbook NumPy MLP: fresh temporaries everywhere, bias and relu as separate passes."""
    params = init_weights(sizes)
    velocities = [np.zeros_like(p) for p in params]
    n_layers = len(sizes) - 1

    def step():
        # forward: keep each layer's input and pre-activation
        inputs, preacts = [], []
        h = x
        for k in range(n_layers):
            w, b = params[2 * k], params[2 * k + 1]
            inputs.append(h)
            z = h @ w + b
            preacts.append(z)
            h = np.maximum(z, 0) if k < n_layers - 1 else z
        # softmax cross-entropy, mean over the batch
        batch = h.shape[0]
        shifted = h - h.max(axis=1, keepdims=True)
        exp = np.exp(shifted)
        probs = exp / exp.sum(axis=1, keepdims=True)
        loss = -np.mean(np.log(probs[np.arange(batch), labels]))
        dz = probs.copy()
        dz[np.arange(batch), labels] -= 1
        dz /= batch
        # backward
        grads = [None] * len(params)
        for k in range(n_layers - 1, -1, -1):
            w = params[2 * k]
            grads[2 * k] = inputs[k].T @ dz
            grads[2 * k + 1] = dz.sum(axis=0)
            if k > 0:
                dh = dz @ w.T
                dz = dh * (preacts[k - 1] > 0)
        # SGD with momentum (PyTorch's form): v = m v + g; p -= lr v
        for p, v, g in zip(params, velocities, grads):
            v *= MOMENTUM
            v += g
            p -= LR * v
        return float(loss)

    return step


def torch_mlp(torch, device: str, sizes):
    """nn.Linear + ReLU per hidden layer, a linear head: gpubp_step's network in PyTorch, on ``device``."""
    layers = []
    for k, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(torch.nn.Linear(fan_in, fan_out))
        if k < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers).to(device)


def torch_step(sizes, x, labels):
    torch = pytest.importorskip("torch")
    model = torch_mlp(torch, "cpu", sizes)
    weights = init_weights(sizes)
    with torch.no_grad():
        for k, linear in enumerate(model[::2]):
            linear.weight.copy_(torch.from_numpy(weights[2 * k].T.copy()))
            linear.bias.copy_(torch.from_numpy(weights[2 * k + 1]))
    return torch_sgd_step(model, x, labels)


def torch_sgd_step(module, x, labels):
    """One step of a torch module with ``F.cross_entropy`` and ``torch.optim.SGD`` (momentum), as a closure."""
    import torch
    import torch.nn.functional as F

    opt = torch.optim.SGD(module.parameters(), lr=LR, momentum=MOMENTUM)
    tx, tlabels = torch.from_numpy(x), torch.from_numpy(labels)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(module(tx), tlabels)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def gemm_floor_step(sizes, x, labels):
    """Only the step's matrix products, each into a preallocated output (random dz, never zeros)."""
    rng = np.random.default_rng(2)
    weights = init_weights(sizes)[::2]
    batch = x.shape[0]
    inputs = [x] + [np.empty((batch, w.shape[1]), np.float32) for w in weights[:-1]]
    logits = np.empty((batch, sizes[-1]), np.float32)
    grads_out = [rng.standard_normal((batch, w.shape[1]), dtype=np.float32) for w in weights]
    grads_w = [np.empty_like(w) for w in weights]
    grads_in = [None] + [np.empty((batch, w.shape[0]), np.float32) for w in weights[1:]]
    outputs = inputs[1:] + [logits]

    def step():
        for h, w, y in zip(inputs, weights, outputs):
            np.matmul(h, w, out=y)
        for k in range(len(weights) - 1, -1, -1):
            np.matmul(inputs[k].T, grads_out[k], out=grads_w[k])
            if k:
                np.matmul(grads_out[k], weights[k].T, out=grads_in[k])
        return 0.0

    return step


STEPS = {"gpubp": gpubp_step, "gpubp_numpy": gpubp_numpy_step, "numpy_naive": naive_step, "torch": torch_step,
         "gemm_floor": gemm_floor_step}


# ----------------------------------------------------------------------------- environment record


def thread_info() -> dict:
    info = {
        "cpu_count": os.cpu_count(),
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "gpubp_threads": numpy_backend.cpu_threads(),
        # other work on the machine: on a shared VM the one thing that makes a run unusable
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        info["blas_threads"] = None
    else:
        # NumPy's own BLAS: SciPy (which the steps may load) brings another OpenBLAS beside it.
        blas = sorted((p for p in threadpool_info() if p.get("user_api") == "blas"),
                      key=lambda p: "numpy" not in p.get("filepath", ""))
        info["blas_threads"] = blas[0]["num_threads"] if blas else None
        info["blas"] = f"{blas[0]['internal_api']} {blas[0].get('version')}" if blas else None
        info["blas_libraries"] = [f"{p['internal_api']} {p.get('version')} ({p.get('filepath')})" for p in blas]
    return info


# ----------------------------------------------------------------------------- the benchmark


def built_steps(sizes, batch: int, builders: dict | None = None) -> dict:
    """Every backend's step (``builders``, default ``STEPS``, by backend) on one random batch, each
    run ``WARMUP_STEPS`` times (its loss must be finite); the backends PyTorch needs are left out
    where it is not installed."""
    builders = STEPS if builders is None else builders
    x, labels = make_batch(sizes, batch)
    steps = {}
    for backend in builders:
        try:
            step = builders[backend](sizes, x, labels)
        except pytest.skip.Exception:
            continue
        for _ in range(WARMUP_STEPS):
            loss = step()
        assert np.isfinite(loss), backend
        steps[backend] = step
    return steps


def steps_per_block(step, timer) -> int:
    """How many steps make a block of about ``BLOCK_SECONDS``, at least ``MIN_BLOCK_STEPS``: from
    the median of ``CALIBRATION_STEPS`` steps, each timed alone. (From one step timed right after
    the build, a cold one, PyTorch's blocks came out 1 step long where gpubp's were 8: the step
    after each block's settling sleep weighed 8 times as much in PyTorch's time, 12% on it.)"""
    seconds = []
    for _ in range(CALIBRATION_STEPS):
        started = timer()
        step()
        seconds.append(timer() - started)
    return max(MIN_BLOCK_STEPS, int(BLOCK_SECONDS / max(float(np.median(seconds)), 1e-6)))


# A round times one block of steps of every backend, one after another (the order rotates from
# round to round), so each ratio is taken between blocks run within milliseconds of each other:
# on a shared VM the speed drifts by 2x over seconds, and back-to-back tests per backend
# compared different moments more than different code.
#
# Before each block the process sleeps ``SETTLE_SECONDS``, untimed. With every core in use, a
# library's idle worker threads keep spinning on the cores after its last call (OpenBLAS's for
# about 0.1 s): without the pause, the block after an OpenBLAS one shared its cores with them,
# and PyTorch's step on two threads timed 2.3x slower than on its own. After the pause one step
# runs untimed: the pause let every library's workers go to sleep, and the first step after it
# pays for waking them, which a training loop, whose steps follow each other, does not (timed,
# it made PyTorch's two-thread step look 2.5x slower than back-to-back steps of it).
BLOCK_SECONDS = 0.05
MIN_BLOCK_STEPS = 5
CALIBRATION_STEPS = 5
SETTLE_SECONDS = 0.15
ROUNDS = 40
MAX_SECONDS_PER_SHAPE = 15.0


@pytest.mark.parametrize("sizes,batch", SHAPES, ids=[shape_id(s, b) for s, b in SHAPES])
def test_cpu_step(benchmark, request, sizes, batch):
    """Every backend's step on one shape, interleaved round by round (``interleaved``)."""
    interleaved(benchmark, request, sizes, batch, built_steps(sizes, batch))


def interleaved(benchmark, request, sizes, batch: int, steps: dict) -> None:
    """Time ``steps`` (built, by backend, "gpubp" among them) round by round on one shape.

    pytest-benchmark times gpubp's blocks (its stats are gpubp's blocks of ``steps_per_round``
    steps, without the settling before them); the setup of each round runs and times the other
    backends' blocks with the same timer, and settles gpubp. ``extra_info["interleaved"]`` holds
    every backend's seconds per step in each round, which ``bench/report.py`` turns into
    per-round ratios. bench/test_torch_bridge.py times its steps the same way."""
    from pytest_benchmark.utils import load_timer

    timer = load_timer(request.config.getoption("benchmark_timer")).target
    blocks = {backend: steps_per_block(step, timer) for backend, step in steps.items()}
    others = [backend for backend in steps if backend != "gpubp"]
    one_round = sum(timer_block(steps[b], blocks[b], timer) + SETTLE_SECONDS for b in steps)
    rounds = max(10, min(ROUNDS, int(MAX_SECONDS_PER_SHAPE / one_round)))
    times: dict[str, list[float]] = {backend: [] for backend in steps}
    order = {"next": 0}

    def run_the_others():
        k = order["next"] % max(len(others), 1)
        order["next"] += 1
        for backend in others[k:] + others[:k]:
            times[backend].append(timer_block(steps[backend], blocks[backend], timer) / blocks[backend])
        settle(steps["gpubp"])  # gpubp's sleep and waking step too, outside pytest-benchmark's timing

    n = blocks["gpubp"]

    def timed_gpubp_block():
        started = timer()
        for _ in range(n):
            steps["gpubp"]()
        times["gpubp"].append((timer() - started) / n)

    name = shape_id(sizes, batch)
    benchmark.group = name
    benchmark.extra_info.update(shape=name, sizes=sizes, batch=batch, backend="gpubp", dtype="float32",
                                steps_per_round=n, cpu_kernels=numpy_backend.cpu_kernels(), **thread_info())
    if "torch" in steps:
        import torch

        benchmark.extra_info.update(torch_version=torch.__version__, torch_threads=torch.get_num_threads())
    benchmark.pedantic(timed_gpubp_block, setup=run_the_others, rounds=rounds)
    assert all(len(v) == rounds for v in times.values()), {b: len(v) for b, v in times.items()}
    benchmark.extra_info.update(interleaved=times, steps_per_block=blocks)


def settle(step) -> None:
    """``SETTLE_SECONDS`` of sleep, then one untimed ``step``, which wakes the library's threads."""
    time.sleep(SETTLE_SECONDS)
    step()


def timer_block(step, n: int, timer) -> float:
    """Seconds (by ``timer``) to run ``step`` ``n`` times, after ``settle``."""
    settle(step)
    started = timer()
    for _ in range(n):
        step()
    return timer() - started
