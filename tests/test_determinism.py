"""The same seed gives bit-identical weights on the CPU, in this process and in fresh ones."""

import hashlib
import threading
from pathlib import Path

import numpy as np

import gpubp as gb
from gpubp import _random
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


def test_importing_keras_or_torch_weights_does_not_draw_from_the_seeded_stream():
    """As loading: an import that drew its throwaway initial weights moved every later draw."""
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((3, 4)).astype(np.float32), np.zeros(4, np.float32),
               rng.standard_normal((4, 2)).astype(np.float32), np.zeros(2, np.float32)]
    state_dict = {"0.weight": weights[0].T, "0.bias": weights[1], "2.weight": weights[2].T, "2.bias": weights[3]}
    for imported in (lambda: gb.io.from_keras_weights(weights, device="cpu"),
                     lambda: gb.io.from_torch_state_dict(state_dict, device="cpu")):
        gb.seed(0)
        expected = _random.generator().random(2)
        gb.seed(0)
        model = imported()
        np.testing.assert_array_equal(model.get_weights()[0], weights[0])
        np.testing.assert_array_equal(_random.generator().random(2), expected)


def test_two_threads_in_random_state_blocks_draw_from_their_own_and_leave_the_library_stream():
    """scikit-learn's random_state in two threads: A enters, B enters, A draws and leaves, B draws
    and leaves. With one process-wide generator A drew from B's, B from the library's, and B's
    exit left A's in place of gb.seed's stream."""
    gb.seed(7)
    library = _random.generator()
    expected = np.random.default_rng(7).random()
    b_entered, a_left = threading.Event(), threading.Event()
    drew = {}

    def thread_a():
        with _random.using(np.random.default_rng(1)):
            b_entered.wait(10)
            drew["a"] = _random.generator().random()
        a_left.set()

    def thread_b():
        with _random.using(np.random.default_rng(2)):
            b_entered.set()
            a_left.wait(10)
            drew["b"] = _random.generator().random()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    threads[0].start()
    threads[1].start()
    for t in threads:
        t.join(20)
    assert drew == {"a": np.random.default_rng(1).random(), "b": np.random.default_rng(2).random()}
    assert _random.generator() is library and library.random() == expected
