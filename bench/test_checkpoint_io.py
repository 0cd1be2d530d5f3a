"""Writing and reading a checkpoint on the CPU, against one training epoch of the same model.

A checkpoint of an MNIST-sized MLP (784-1024-1024-10, 1.9M parameters, float32) with Adam's
state (two more arrays per parameter) is written and read in both formats. The write includes
the fsync of the file and of its folder, so it measures the disk as much as the code; the
``extra_info`` records the file size. The epoch (10 000 random samples, batch 256) gives
the scale: a checkpoint per epoch should cost a small fraction of it.

    python -m pytest bench/test_checkpoint_io.py --benchmark-json bench/results/checkpoint_io.json -q
"""

from __future__ import annotations

import numpy as np
import pytest

import gpubp as gb
from gpubp.checkpoint import save_checkpoint

pytest.importorskip("pytest_benchmark")

SIZES = [784, 1024, 1024, 10]


def trained_model():
    gb.seed(0)
    model = gb.Sequential([gb.Dense(a, b, "relu") for a, b in zip(SIZES[:-2], SIZES[1:-1])]
                          + [gb.Dense(SIZES[-2], SIZES[-1])], device="cpu")
    opt = gb.optim.Adam(model.parameters(), lr=1e-3)
    x = np.random.default_rng(0).random((512, SIZES[0]), dtype=np.float32)
    history = model.fit(x, np.arange(512) % 10, optimizer=opt, epochs=1, batch_size=256, verbose=0)
    return model, opt, history


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_write_checkpoint(benchmark, tmp_path, suffix):
    model, opt, history = trained_model()
    path = tmp_path / f"run{suffix}"
    benchmark(save_checkpoint, path, model, opt, 1, history)
    benchmark.extra_info.update(file_bytes=path.stat().st_size, sizes=SIZES)


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_read_checkpoint(benchmark, tmp_path, suffix):
    model, opt, history = trained_model()
    path = tmp_path / f"run{suffix}"
    save_checkpoint(path, model, opt, 1, history)
    benchmark(gb.load_checkpoint, path, device="cpu")
    benchmark.extra_info.update(file_bytes=path.stat().st_size, sizes=SIZES)


def test_one_training_epoch(benchmark):
    model, opt, _ = trained_model()
    rng = np.random.default_rng(1)
    x, y = rng.random((10_000, SIZES[0]), dtype=np.float32), rng.integers(0, 10, 10_000)
    benchmark.pedantic(model.fit, args=(x, y), kwargs=dict(optimizer=opt, epochs=1, batch_size=256, verbose=0),
                       rounds=2, iterations=1)
