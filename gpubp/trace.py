"""Kernel-launch trace: which kernels ran, and how often.

Every backend calls :func:`record` once per kernel launch, under the contract's
stable names (``dense_fwd``, ``dense_dx``, ``dense_dw``, ``ce_fwd_bwd``, ...).
Recording costs one global read when no trace is open in any thread.

>>> import gpubp as gb
>>> with gb.trace() as t:
...     pass
>>> t.counts["dense_fwd"]
0
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections import Counter

# The traces open where the code runs: a context variable, so each thread and each asyncio task
# has its own (a task started inside a trace block counts in it, as it inherits the context).
_stack: contextvars.ContextVar[tuple] = contextvars.ContextVar("gpubp_trace_stack", default=())
# Traces open in any thread: record() returns at once while it is 0, which is every
# training step outside a ``with gb.trace()`` block.
_open_count = 0
_count_lock = threading.Lock()


class Trace:
    """Counts of kernel launches recorded while the context is open.

    ``counts`` is a :class:`collections.Counter`: a kernel that never ran reads 0.
    ``launches`` keeps the order in which they ran.
    """

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.launches: list[str] = []
        # How many contexts have it open: a task started inside the block keeps the context it
        # inherited after the block ends, and records nothing more here then.
        self._entered = 0

    def __enter__(self) -> Trace:
        global _open_count
        stack = _stack.get()
        if any(t is self for t in stack):  # nested in itself, it would count every launch twice
            raise RuntimeError("trace: this Trace is already open here (in this thread or task); open another with "
                               "gb.trace()")
        _stack.set((*stack, self))
        with _count_lock:
            self._entered += 1
            _open_count += 1
        return self

    def __exit__(self, *exc) -> None:
        global _open_count
        stack = _stack.get()
        if not any(t is self for t in stack):  # left twice, or from another thread: the count must not drop
            raise RuntimeError("trace: this Trace is not open here (in this thread or task)")
        _stack.set(tuple(t for t in stack if t is not self))
        with _count_lock:
            self._entered -= 1
            _open_count -= 1

    @property
    def total(self) -> int:
        return len(self.launches)

    def __repr__(self) -> str:
        return f"Trace({dict(self.counts)})"


def trace() -> Trace:
    """Open a kernel-launch trace: ``with gb.trace() as t: ...; t.counts``."""
    return Trace()


@contextlib.contextmanager
def isolated():
    """A trace that alone records the launches inside it, hidden from the traces already open:
    for launches recorded but not run, such as those of a CUDA-graph capture."""
    outer = _stack.get()
    _stack.set(())
    try:
        with Trace() as inner:
            yield inner
    finally:
        _stack.set(outer)


def replay(names: list[str]) -> None:
    """Record the launches ``names`` again, in order: a replayed graph runs them."""
    if _open_count:
        for name in names:
            record(name)


def record(name: str) -> None:
    """Record one launch of kernel ``name`` in every open trace (nested traces all count)."""
    if not _open_count:
        return
    for t in _stack.get():
        if t._entered:
            t.counts[name] += 1
            t.launches.append(name)
