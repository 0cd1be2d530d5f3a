"""The library's random state: ``gb.seed(n)`` makes initialisation and shuffling reproducible."""

from __future__ import annotations

import numpy as np

_generator = np.random.default_rng()


def seed(n: int) -> None:
    """Seed every random choice gpubp makes (weight init, shuffling, splits)."""
    global _generator
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"seed: expected an int, got {type(n).__name__}")
    _generator = np.random.default_rng(int(n))


def generator() -> np.random.Generator:
    return _generator
