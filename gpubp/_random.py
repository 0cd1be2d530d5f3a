"""The library's random state: ``gb.seed(n)`` makes initialisation and shuffling reproducible."""

from __future__ import annotations

import contextlib
import contextvars

import numpy as np

_generator = np.random.default_rng()
# A generator that :func:`using` puts in place of the library's stream for the block it runs,
# in this thread (or asyncio task) only: two threads each fitting with a random_state of their
# own draw from their own, and neither can leave the other's in place of ``gb.seed``'s stream.
_in_use: contextvars.ContextVar[np.random.Generator | None] = contextvars.ContextVar("gpubp_generator",
                                                                                     default=None)


def seed(n: int) -> None:
    """Seed every random choice gpubp makes (weight init, shuffling, splits)."""
    global _generator
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"seed: expected an int, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"seed: expected an int >= 0, got {n}")
    _generator = np.random.default_rng(int(n))


def generator() -> np.random.Generator:
    """The generator gpubp draws from here: a :func:`using` block's, else ``gb.seed``'s stream."""
    in_use = _in_use.get()
    return _generator if in_use is None else in_use


def get_state() -> dict:
    """The generator's state as plain data (JSON-safe), for checkpoints."""
    return generator().bit_generator.state


def generator_from_state(state) -> np.random.Generator:
    """A generator resuming ``state`` (from :func:`get_state`); ValueError if it is not one."""
    bit_generator = np.random.PCG64()
    if not isinstance(state, dict) or state.get("bit_generator") != type(bit_generator).__name__:
        raise ValueError(f"random state: expected the state of a {type(bit_generator).__name__} generator")
    try:
        bit_generator.state = state
    except (TypeError, ValueError, KeyError, OverflowError) as exc:
        raise ValueError(f"random state: {exc}") from None
    return np.random.Generator(bit_generator)


def set_generator(generator: np.random.Generator) -> None:
    """Draw from ``generator`` from now on: inside a :func:`using` block, until the block ends (in
    place of the block's generator); elsewhere, as the library's stream (a resumed checkpoint's)."""
    global _generator
    if _in_use.get() is None:
        _generator = generator
    else:
        _in_use.set(generator)


@contextlib.contextmanager
def using(generator: np.random.Generator):
    """Draw every random choice inside the block (weight init, shuffling) from ``generator``,
    then give the library back its own stream, untouched: scikit-learn's ``random_state``. The
    block's generator is this thread's (a context variable): other threads draw from theirs."""
    token = _in_use.set(generator)
    try:
        yield generator
    finally:
        _in_use.reset(token)
