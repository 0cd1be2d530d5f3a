"""A save killed with SIGKILL at any moment leaves a file that loads, holding the old weights
or the new ones, and the next save clears what the killed writer left behind."""

import os
import signal
import time

import numpy as np
import pytest

import gpubp as gb
from child_process import start_python

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="SIGKILL is a POSIX signal")

SUFFIXES = [".npz", ".safetensors"]


def model_with_seed(seed):
    gb.seed(seed)
    return gb.Sequential([gb.Dense(64, 256, "relu"), gb.Dense(256, 10)], device="cpu")


def weights_of(path):
    return gb.load(path, device="cpu").get_weights()


def same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a, b))


def leftovers(folder, name):
    return [p.name for p in folder.iterdir() if p.name != name]


def kill_when_told(child, word, delay=0.0):
    """Wait for ``word`` on the child's stdout, then ``delay`` seconds more, then SIGKILL it."""
    line = child.stdout.readline().strip()
    assert line == word, f"the child said {line!r}: {child.stderr.read()[-2000:]}"
    time.sleep(delay)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    child.stdout.close()
    child.stderr.close()


KILLED_BEFORE_THE_RENAME = """
import os, sys, time
import gpubp as gb

gb.seed(2)
model = gb.Sequential([gb.Dense(64, 256, "relu"), gb.Dense(256, 10)], device="cpu")

def stall(fd):
    print("DATA WRITTEN", flush=True)
    time.sleep(60)

os.fsync = stall
model.save(sys.argv[1])
"""


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_killed_after_writing_before_the_rename_the_old_file_loads(tmp_path, suffix):
    path = tmp_path / f"m{suffix}"
    old = model_with_seed(1)
    old.save(path)
    kill_when_told(start_python(KILLED_BEFORE_THE_RENAME, path), "DATA WRITTEN")
    assert same(weights_of(path), old.get_weights())
    assert leftovers(tmp_path, path.name), "the killed writer should have left its temporary file"
    newer = model_with_seed(3)
    newer.save(path)
    assert leftovers(tmp_path, path.name) == []
    assert same(weights_of(path), newer.get_weights())


SAVING_IN_A_LOOP = """
import sys
import gpubp as gb

models = []
for seed in (1, 2):
    gb.seed(seed)
    models.append(gb.Sequential([gb.Dense(64, 256, "relu"), gb.Dense(256, 10)], device="cpu"))
print("SAVING", flush=True)
while True:
    for model in models:
        gb.checkpoint.save_checkpoint(sys.argv[1], model, gb.optim.SGD(model.parameters()), epoch=1)
"""


def test_killed_at_random_moments_the_file_always_loads_old_or_new_weights(tmp_path):
    path = tmp_path / "run.safetensors"
    candidates = [model_with_seed(1).get_weights(), model_with_seed(2).get_weights()]
    model_with_seed(1).save(path)
    rng = np.random.default_rng(0)
    for _ in range(3):
        kill_when_told(start_python(SAVING_IN_A_LOOP, path), "SAVING", delay=rng.uniform(0.0, 0.05))
        loaded = weights_of(path)
        assert any(same(loaded, weights) for weights in candidates)
    model_with_seed(3).save(path)
    assert leftovers(tmp_path, path.name) == []
