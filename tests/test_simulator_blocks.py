"""tests/simulator_blocks.py: the CUDA simulator's blocks run as the simulator's own do.

Each kernel here runs on the simulator's polling scheduler and on the event-driven one the
suite installs, and both must give the NumPy answer; a scheduler whose barriers do not wait must
fail the same checks.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import SIMULATOR

if not SIMULATOR:
    pytest.skip("the CUDA simulator is off (a GPU is present)", allow_module_level=True)

from numba import cuda  # noqa: E402
from numba.cuda.simulator import kernel as sim  # noqa: E402

POLLING = sim.BlockManager.__mro__[1]  # the simulator's own, which the installed one extends
EVENTS = sim.BlockManager


class NoBarrier(POLLING):
    """A planted bug: each thread runs to its end alone, its barriers opening at once."""

    def run(self, grid_point, *args):
        for point in np.ndindex(*self._block_dim):
            t = sim.BlockThread(lambda: self._f(*args), self, grid_point, point, self._debug)
            t.syncthreads = lambda: None
            t.start()
            t.join()
            if t.exception:
                raise t.exception[0]


@cuda.jit
def rotate_through_shared(x, out):
    """Each thread stores its element, and after the barrier reads its neighbour's."""
    tile = cuda.shared.array(64, dtype=np.float32)
    t = cuda.threadIdx.x
    i = cuda.blockIdx.x * cuda.blockDim.x + t
    if i < x.size:
        tile[t] = x[i]
    cuda.syncthreads()
    j = (t + 1) % cuda.blockDim.x
    if i < x.size and cuda.blockIdx.x * cuda.blockDim.x + j < x.size:
        out[i] = tile[j]
    cuda.syncthreads()


@cuda.jit
def half_the_threads_leave(x, out):
    """The upper half of each block returns before the barriers the lower half meets at."""
    tile = cuda.shared.array(64, dtype=np.float32)
    t = cuda.threadIdx.x
    half = cuda.blockDim.x // 2
    if t >= half:
        return
    tile[t] = x[cuda.blockIdx.x * half + t]
    cuda.syncthreads()
    mirrored = tile[t] + tile[half - 1 - t]
    cuda.syncthreads()
    tile[t] = mirrored
    cuda.syncthreads()
    out[cuda.blockIdx.x * half + t] = tile[half - 1 - t]  # the mirror's sum, which is this one's


@cuda.jit
def count_positive(x, out):
    t = cuda.threadIdx.x
    out[cuda.blockIdx.x] = cuda.syncthreads_count(x[cuda.blockIdx.x * cuda.blockDim.x + t] > 0)


@cuda.jit
def fails_in_one_thread(x):
    cuda.syncthreads()
    if cuda.blockIdx.x == 1 and cuda.threadIdx.x == 5:
        x[10 ** 6] = 1.0  # out of bounds: an IndexError in the simulator
    cuda.syncthreads()


@pytest.fixture(params=["polling", "events"])
def scheduler(request, monkeypatch):
    monkeypatch.setattr(sim, "BlockManager", POLLING if request.param == "polling" else EVENTS)
    return request.param


def test_the_suite_runs_the_simulator_with_the_event_driven_scheduler():
    assert EVENTS.waits_on_events
    assert POLLING is not EVENTS and not getattr(POLLING, "waits_on_events", False)


def test_installing_on_import_waits_for_the_simulator_to_be_imported():
    script = textwrap.dedent("""
        import sys
        import simulator_blocks
        simulator_blocks.install_on_import()
        assert "numba" not in sys.modules
        from numba.cuda.simulator import kernel
        assert kernel.BlockManager.waits_on_events
        print("installed")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=Path(__file__).parent,
                          env={**os.environ, "NUMBA_ENABLE_CUDASIM": "1"})
    assert done.returncode == 0 and "installed" in done.stdout, done.stderr[-3000:]


def test_a_barrier_orders_shared_memory_across_every_thread_of_each_block(scheduler, rng):
    x = rng.standard_normal(3 * 64 - 5).astype(np.float32)
    out = np.zeros_like(x)
    rotate_through_shared[3, 64](x, out)
    want = np.zeros_like(x)
    for b in range(3):
        block = x[64 * b:64 * (b + 1)]
        n = block.size
        for t in range(n):
            j = (t + 1) % 64
            if j < n:
                want[64 * b + t] = block[j]
    np.testing.assert_array_equal(out, want)


def test_threads_that_return_before_a_barrier_do_not_hold_it(scheduler, rng):
    x = rng.standard_normal(2 * 16).astype(np.float32)
    out = np.zeros_like(x)
    half_the_threads_leave[2, 32](x, out)
    want = np.concatenate([block + block[::-1] for block in x.reshape(2, 16)])
    np.testing.assert_array_equal(out, want)


def test_a_block_vote_counts_every_thread(scheduler, rng):
    x = rng.standard_normal(4 * 32).astype(np.float32)
    out = np.zeros(4, dtype=np.int32)
    count_positive[4, 32](x, out)
    np.testing.assert_array_equal(out, (x.reshape(4, 32) > 0).sum(axis=1))


def test_a_thread_that_fails_is_raised_naming_its_thread_and_block(scheduler):
    with pytest.raises(IndexError, match=r"tid=\[5, 0, 0\] ctaid=\[1, 0, 0\]"):
        fails_in_one_thread[3, 16](np.zeros(4, dtype=np.float32))


def test_a_barrier_that_does_not_wait_fails_these_checks(monkeypatch):
    monkeypatch.setattr(sim, "BlockManager", NoBarrier)
    # Data no earlier test used: a shared array may reuse an earlier launch's memory, whose
    # values would otherwise stand in for the stores the missing barrier lets a thread miss.
    with pytest.raises(AssertionError):
        test_a_barrier_orders_shared_memory_across_every_thread_of_each_block("planted", np.random.default_rng(7))
