"""A block scheduler for Numba's CUDA simulator that waits instead of polling.

The simulator runs each thread of a block as a Python thread and releases a
``syncthreads`` barrier when every live thread waits at one. Its ``BlockManager``
finds that moment by polling: it loops over the threads' flags and ``is_alive()``
without blocking, so it holds the GIL the threads it waits for need, and most of a
simulated launch goes to the polling (in this suite, two thirds of a Numba training
step's time).

``install()`` swaps in ``EventBlockManager``: each thread tells the block, under one
condition variable, when it starts waiting at a barrier, when it finishes and when it
fails, and the block sleeps on that condition between those moments. What a kernel
sees is unchanged: the same barrier rule, the first failure aborts the block's other
threads (``abort``, as the simulator does, so they raise at their next barrier) and
is raised with the thread and block that failed.

conftest.py calls ``install_on_import()`` whenever the simulator is on, which installs it
when (if ever) the simulator is imported: a test process that never runs Numba (the CPU kernel
harness's child processes) does not pay the second it takes to import numba.cuda.
tests/test_simulator_blocks.py checks the rules above on both schedulers.
"""

import importlib.abc
import importlib.util
import sys
import threading

import numpy as np

SIMULATOR_KERNEL = "numba.cuda.simulator.kernel"  # the module whose BlockManager is replaced


def _event_block_manager():
    """EventBlockManager and the thread class it runs, made once the simulator is imported."""
    from numba.cuda.simulator import kernel as sim

    class EventBlockThread(sim.BlockThread):
        def run(self):
            try:
                super().run()  # stores an exception in self.exception instead of raising it
            finally:
                block = self._manager
                with block.changed:
                    block.live -= 1
                    block.failed = block.failed or self.exception is not None
                    block.changed.notify()

        def syncthreads(self):
            if self.abort:
                raise RuntimeError("abort flag set on syncthreads call")
            block = self._manager
            with block.changed:
                self.syncthreads_blocked = True
                block.waiting += 1
                block.changed.notify()
            self.syncthreads_event.wait()
            self.syncthreads_event.clear()
            if self.abort:
                raise RuntimeError("abort flag set on syncthreads clear")

    class EventBlockManager(sim.BlockManager):
        """Runs one block: a barrier opens when every live thread waits at it."""

        def run(self, grid_point, *args):
            self.changed = threading.Condition()
            self.live = self.waiting = 0
            self.failed = False

            def target():
                self._f(*args)

            threads = [EventBlockThread(target, self, grid_point, point, self._debug)
                       for point in np.ndindex(*self._block_dim)]
            self.live = len(threads)
            for t in threads:
                t.start()
            with self.changed:
                while True:
                    self.changed.wait_for(lambda: self.failed or self.live == 0 or self.waiting == self.live)
                    if self.failed or self.live == 0:
                        break
                    self.waiting = 0
                    for t in threads:
                        if t.syncthreads_blocked:
                            t.syncthreads_blocked = False
                            t.syncthreads_event.set()
            failed = [t for t in threads if t.exception]
            if failed:
                for t in threads:  # the others raise at their next barrier
                    t.abort = True
                    t.syncthreads_blocked = False
                    t.syncthreads_event.set()
                error, traceback = failed[0].exception
                raise error.with_traceback(traceback)

    return EventBlockManager


def install() -> None:
    """Make the CUDA simulator run blocks with ``EventBlockManager`` (the simulator must be on)."""
    from numba.cuda.simulator import kernel as sim

    if getattr(sim.BlockManager, "waits_on_events", False):
        return
    manager = _event_block_manager()
    manager.waits_on_events = True
    sim.BlockManager = manager


def install_on_import() -> None:
    """``install()`` as soon as the simulator's kernel module is imported (at once if it is)."""
    if SIMULATOR_KERNEL in sys.modules:
        install()
    elif not any(isinstance(finder, _InstallAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _InstallAfterImport())


class _InstallAfterImport(importlib.abc.MetaPathFinder):
    """Finds the simulator's kernel module as the other finders do, then installs once it ran."""

    def find_spec(self, fullname, path, target=None):
        if fullname != SIMULATOR_KERNEL:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenInstall(spec.loader)
        return spec


class _ThenInstall(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        install()
