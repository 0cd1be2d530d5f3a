"""The same seed gives bit-identical weights on the CPU, in this process and in fresh ones."""

import hashlib
from pathlib import Path

import numpy as np

import gpubp as gb
from child_process import run_python

IN_A_CHILD = """
import sys
sys.path.insert(0, sys.argv[2])
from test_determinism import seeded_digest
print(seeded_digest(int(sys.argv[1])))
"""


def seeded_digest(seed: int) -> str:
    """sha256 of the weights after a seeded, shuffled training run."""
    gb.seed(seed)
    x, y = gb.data.xor()
    x = np.repeat(x, 16, axis=0) + np.random.default_rng(0).normal(0, 0.1, (64, 2)).astype(np.float32)
    y = np.repeat(y, 16, axis=0)
    model = gb.Sequential([gb.Dense(2, 16, "relu"), gb.Dense(16, 16, "gelu"), gb.Dense(16, 1)], device="cpu")
    model.fit(x, y, loss="bce", optimizer=gb.optim.AdamW(model.parameters(), lr=0.02), epochs=4, batch_size=6,
              validation_split=0.25, verbose=0)
    return hashlib.sha256(b"".join(w.tobytes() for w in model.get_weights())).hexdigest()


def test_two_processes_with_the_same_seed_end_with_bit_identical_weights():
    here = Path(__file__).parent
    first = run_python(IN_A_CHILD, 5, here, PYTHONHASHSEED="1").strip()
    second = run_python(IN_A_CHILD, 5, here, PYTHONHASHSEED="2").strip()
    assert first == second == seeded_digest(5)


def test_another_seed_gives_other_weights():
    assert seeded_digest(5) != seeded_digest(6)


def test_loading_a_model_does_not_draw_from_the_seeded_stream(tmp_path):
    gb.Sequential([gb.Dense(3, 4)], device="cpu").save(tmp_path / "m.npz")
    gb.seed(0)
    expected = gb._random.generator().random(2)
    gb.seed(0)
    gb.load(tmp_path / "m.npz", device="cpu")
    np.testing.assert_array_equal(gb._random.generator().random(2), expected)
