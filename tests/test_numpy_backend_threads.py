"""The NumPy backend's threads: its settings are per thread, and its worker pool works in a forked child.

``use_cpu_threads`` and ``compiled_kernels`` set what the thread that enters them runs with, so
two threads training at once, each in a block of its own, neither see nor leave behind the
other's setting. The pool that runs the row blocks of large passes is made again in a child
process forked from one that used it: the parent's pool there counts workers that do not exist
in the child and would start none for the child's blocks.
"""

import os
import threading

import pytest

from gpubp.backends import numpy_backend
from child_process import run_python

WAIT = 60  # seconds a thread waits for the other before the test fails (never reached when it passes)


def test_blocks_of_the_settings_in_two_threads_at_once_each_set_their_own_thread_alone(monkeypatch):
    """Thread A enters its blocks, then B enters its own; A leaves first, B last. Each sees its
    own setting inside, the main thread the defaults throughout, and both defaults are as they
    were after. (The blocks once swapped module globals: A saw B's setting, and B's exit put back
    what A had set, process-wide.)"""
    monkeypatch.setattr(numpy_backend, "_CORES", 4)  # counts 2 and 3 on any machine
    default_threads, default_kernels = numpy_backend.cpu_threads(), numpy_backend.cpu_kernels()
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen, failures = {}, []

    def run(name, body):
        try:
            body()
        except BaseException as exc:  # reported by the main thread, which asserts
            failures.append(f"{name}: {exc!r}")
        finally:
            for event in (a_in, b_in, a_out):  # never leave the other thread waiting
                event.set()

    def thread_a():
        with numpy_backend.use_cpu_threads(2), numpy_backend.compiled_kernels(False):
            a_in.set()
            assert b_in.wait(WAIT)
            seen["A inside"] = numpy_backend.cpu_threads(), numpy_backend.cpu_kernels()
            with numpy_backend.use_cpu_threads(1), numpy_backend.compiled_kernels(True):
                seen["A nested"] = numpy_backend.cpu_threads(), numpy_backend.cpu_kernels()
            seen["A after nested"] = numpy_backend.cpu_threads(), numpy_backend.cpu_kernels()
        a_out.set()

    def thread_b():
        assert a_in.wait(WAIT)
        with numpy_backend.use_cpu_threads(3), numpy_backend.compiled_kernels(True):
            b_in.set()
            assert a_out.wait(WAIT)
            seen["B inside, A out"] = numpy_backend.cpu_threads(), numpy_backend.cpu_kernels()
        seen["B out"] = numpy_backend.cpu_threads(), numpy_backend.cpu_kernels()

    threads = [threading.Thread(target=run, args=(name, body)) for name, body in (("A", thread_a), ("B", thread_b))]
    for thread in threads:
        thread.start()
    assert b_in.wait(WAIT)
    seen["main, both inside"] = numpy_backend.cpu_threads(), numpy_backend.cpu_kernels()
    for thread in threads:
        thread.join(WAIT)
    assert not failures, failures
    assert seen["A inside"][0] == 2 and seen["A inside"][1].startswith("numpy (switched off")
    assert seen["A nested"][0] == 1 and "switched off" not in seen["A nested"][1]
    assert seen["A after nested"] == seen["A inside"]
    assert seen["B inside, A out"][0] == 3 and "switched off" not in seen["B inside, A out"][1]
    assert seen["main, both inside"] == (default_threads, default_kernels)
    assert seen["B out"] == (default_threads, default_kernels)
    assert (numpy_backend.cpu_threads(), numpy_backend.cpu_kernels()) == (default_threads, default_kernels)


# The parent splits a pass over two threads (the pool starts a worker), lets the worker go idle,
# and forks; the child splits the same pass. faulthandler ends a child that waits for its block
# (printing where), well inside run_python's own timeout.
FORKED_PASS = """
import faulthandler, os, sys, time
import numpy as np
from gpubp.backends import numpy_backend as nb

nb._CORES = max(nb._CORES, 2)
nb._PARALLEL_MIN_ELEMENTS = 0  # split this small pass too

def split_pass():
    p, g = np.ones((64, 9), np.float32), np.full((64, 9), 2, np.float32)
    with nb.use_cpu_threads(2), nb.compiled_kernels(False):
        nb.sgd_update(p, g, None, 0.5, 0.0, False, 0.0)
    assert (p == 0).all(), p

split_pass()
assert len(nb._workers._threads) >= 1, "the pass ran no worker"
time.sleep(0.5)  # the worker finishes and waits for more: the state in which a fork hung
pid = os.fork()
if pid == 0:
    faulthandler.dump_traceback_later(float(sys.argv[1]), exit=True)
    try:
        split_pass()
    except BaseException:
        faulthandler.cancel_dump_traceback_later()
        import traceback; traceback.print_exc()
        os._exit(3)
    os._exit(0)
_, status = os.waitpid(pid, 0)
code = os.waitstatus_to_exitcode(status)
assert code == 0, f"the forked child exited with {code} (1: it waited {sys.argv[1]} s for its block)"
split_pass()  # the parent's pool still works
print("done")
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no os.fork here")
def test_a_forked_child_splits_a_pass_over_threads_after_the_parent_did():
    assert run_python(FORKED_PASS, 30, timeout=120).strip() == "done"
