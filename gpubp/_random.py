"""The library's random state: ``gb.seed(n)`` makes initialisation and shuffling reproducible."""

from __future__ import annotations

import contextlib

import numpy as np

_generator = np.random.default_rng()


def seed(n: int) -> None:
    """Seed every random choice gpubp makes (weight init, shuffling, splits)."""
    global _generator
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"seed: expected an int, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"seed: expected an int >= 0, got {n}")
    _generator = np.random.default_rng(int(n))


def generator() -> np.random.Generator:
    return _generator


def get_state() -> dict:
    """The generator's state as plain data (JSON-safe), for checkpoints."""
    return _generator.bit_generator.state


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
    global _generator
    _generator = generator


@contextlib.contextmanager
def using(generator: np.random.Generator):
    """Draw every random choice inside the block (weight init, shuffling) from ``generator``,
    then give the library back its own stream, untouched: scikit-learn's ``random_state``."""
    previous = _generator
    set_generator(generator)
    try:
        yield generator
    finally:
        set_generator(previous)
