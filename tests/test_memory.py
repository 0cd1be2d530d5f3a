"""Thousands of training steps with last batches of every size hold a constant number of live buffers."""

import weakref

import numpy as np
import pytest

import gpubp as gb
from gpubp.backends import numpy_backend

FITS, WARM_UP, BATCH = 260, 60, 16


@pytest.fixture
def live_buffers(monkeypatch):
    """A function counting the arrays the NumPy backend allocated that are still alive."""
    allocated = []

    def tracked(allocate):
        def allocate_and_track(*args, **kwargs):
            array = allocate(*args, **kwargs)
            allocated.append(weakref.ref(array))
            return array
        return allocate_and_track

    for name in ("empty", "zeros", "asarray"):
        monkeypatch.setattr(numpy_backend, name, tracked(getattr(numpy_backend, name)))
    # The backend's per-call scratch buffers, empty so earlier tests' shapes do not count here.
    monkeypatch.setattr(numpy_backend, "_scratch_buffers", {})

    def count():
        allocated[:] = [ref for ref in allocated if ref() is not None]
        return len(allocated) + len(numpy_backend._scratch_buffers)
    return count


@pytest.mark.slow
def test_live_buffers_stay_constant_over_thousands_of_steps_with_varying_last_batches(live_buffers):
    gb.seed(0)
    model = gb.Sequential([gb.Dense(8, 32, "relu"), gb.Dense(32, 16, "gelu"), gb.Dense(16, 3)], device="cpu")
    opt = gb.optim.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(136, 8)).astype(np.float32), rng.integers(0, 3, 136)
    x_val, y_val = rng.normal(size=(FITS, 8)).astype(np.float32), rng.integers(0, 3, FITS)
    counts, steps = [], 0
    for i in range(FITS):
        n = 100 + (i * 7) % 37  # last batches of every size from 1 to BATCH
        model.fit(x[:n], y[:n], optimizer=opt, epochs=1, batch_size=BATCH,
                  validation_data=(x_val[:i + 1], y_val[:i + 1]), verbose=0)  # a new predict shape each time
        steps += -(-n // BATCH)
        counts.append(live_buffers())
    assert steps >= 2000
    assert set(counts[WARM_UP:]) == {counts[WARM_UP]}, f"live buffers after each fit: {counts}"
