"""What the PyTorch bridge costs: one CPU training step of ``gpubp.torch.MLP`` against ``gb.Sequential``.

The same step as ``test_cpu_step.py`` (forward, softmax cross-entropy, backward, SGD with
momentum 0.9, float32, the same shapes and weights) in three ways:

- ``gpubp``: ``gb.Sequential`` with gpubp's loss and optimizer (the step of ``test_cpu_step.py``);
- ``bridge``: ``gpubp.torch.MLP`` (gpubp's kernels through one autograd Function) with
  ``F.cross_entropy`` and ``torch.optim.SGD``, as a PyTorch user would train it;
- ``torch``: PyTorch's own ``nn.Sequential`` (the step of ``test_cpu_step.py``).

``bridge / gpubp`` is the cost of running gpubp's kernels inside PyTorch's autograd and
optimizer; ``bridge / torch`` is what a PyTorch user gains or loses by swapping in the MLP.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 \\
        python -m pytest bench/test_torch_bridge.py --benchmark-json bench/results/torch_bridge.json -q
    python bench/report.py bench/results/torch_bridge.json --markdown bench/results/torch_bridge.md

One thread each gives steady figures on a shared machine. With the default threads
(``bench/results/torch_bridge_default_threads.json``), PyTorch's OpenMP workers busy-wait
between ops and starve NumPy's BLAS threads, which the bridge step pays for heavily; see
the README.
"""

from __future__ import annotations

import pytest

import gpubp as gb
from test_cpu_step import SHAPES, gpubp_step, init_weights, shape_id, torch_sgd_step, torch_step, warmed_up_step

pytest.importorskip("pytest_benchmark")
torch = pytest.importorskip("torch")


def bridge_step(sizes, x, labels):
    from gpubp.torch import MLP

    mlp = MLP(sizes, activation="relu")
    weights = init_weights(sizes)
    with torch.no_grad():
        for param, value in zip(mlp.parameters(), weights):
            param.copy_(torch.from_numpy(value))
    return torch_sgd_step(mlp, x, labels)


STEPS = {"gpubp": gpubp_step, "bridge": bridge_step, "torch": torch_step}


@pytest.mark.benchmark(min_rounds=10, max_time=2.0)
@pytest.mark.parametrize("backend", list(STEPS))
@pytest.mark.parametrize("sizes,batch", SHAPES, ids=[shape_id(s, b) for s, b in SHAPES])
def test_bridge_step(benchmark, sizes, batch, backend):
    step = warmed_up_step(benchmark, STEPS, sizes, batch, backend)
    benchmark.extra_info.update(torch_version=torch.__version__, torch_threads=torch.get_num_threads(),
                                gpubp_version=gb.__version__)
    benchmark(step)
