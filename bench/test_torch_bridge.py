"""What the PyTorch bridge costs: one CPU training step of ``gpubp.torch.MLP`` against ``gb.Sequential``.

The same step as ``test_cpu_step.py`` (forward, softmax cross-entropy, backward, SGD with
momentum 0.9, float32, the same shapes and weights) in three ways, interleaved round by round
as ``test_cpu_step.py`` interleaves its backends:

- ``gpubp``: ``gb.Sequential`` with gpubp's loss and optimizer (the step of ``test_cpu_step.py``);
- ``bridge``: ``gpubp.torch.MLP`` (gpubp's kernels through one autograd Function) with
  ``F.cross_entropy`` and ``torch.optim.SGD``, as a PyTorch user would train it;
- ``torch``: PyTorch's own ``nn.Sequential`` (the step of ``test_cpu_step.py``).

``bridge / gpubp`` is the cost of running gpubp's kernels inside PyTorch's autograd and
optimizer; ``bridge / torch`` is what a PyTorch user gains or loses by swapping in the MLP.

    for run in 1 2 3; do
        OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 \\
            python -m pytest bench/test_torch_bridge.py --benchmark-json bench/results/torch_bridge-$run.json -q
    done
    python bench/report.py bench/results/torch_bridge-{1,2,3}.json --markdown bench/results/torch_bridge.md

One thread each gives steady figures on a shared machine. With the default threads
(``bench/results/torch_bridge_default_threads.json``), PyTorch's OpenMP workers busy-wait
between ops and starve NumPy's BLAS threads, which the bridge step pays for heavily; see
the README.
"""

from __future__ import annotations

import pytest

import gpubp as gb
from test_cpu_step import (SHAPES, built_steps, gpubp_step, init_weights, interleaved, shape_id, torch_sgd_step,
                           torch_step)

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


@pytest.mark.parametrize("sizes,batch", SHAPES, ids=[shape_id(s, b) for s, b in SHAPES])
def test_bridge_step(benchmark, request, sizes, batch):
    """The three steps on one shape, interleaved round by round as test_cpu_step.py's are."""
    benchmark.extra_info.update(gpubp_version=gb.__version__)
    interleaved(benchmark, request, sizes, batch, built_steps(sizes, batch, STEPS))
