"""Philox4x32-10, the counter-based generator behind dropout masks, and the mask it defines.

Philox4x32-10 (Salmon, Moraes, Dror, Shaw: "Parallel random numbers: as easy as 1, 2, 3",
SC 2011) maps a 128-bit counter ``(c0, c1, c2, c3)`` and a 64-bit key ``(k0, k1)`` to four
32-bit words. Each of its 10 rounds multiplies two words by the constants ``M0``/``M1``, mixes
the high halves of the products with the other two words and the key, and then adds the Weyl
constants ``W0``/``W1`` to the key. No state is carried from one call to the next, so a mask
element is a pure function of its position and the key: a backward pass regenerates the mask
of its forward instead of storing it, and any thread computes any element.

The dropout mask. Element ``(row, col)`` of a (rows, cols) array reads word ``col % 4`` of
Philox4x32-10 at counter ``(col // 4, first_row + row, 0, 0)`` and is kept when that word is at least
``threshold = floor(rate * 2**32)``, so it is dropped with probability ``threshold / 2**32``
(within 2**-32 of ``rate``). Four neighbouring columns of a row share one call: a GPU thread
that owns a run of four outputs generates their mask with one Philox evaluation, whatever the
row width. ``first_row`` (0 but in a data-parallel step) is where the array's rows start in the
global batch, so the processes of ``fit(distributed=True)`` draw the masks one process would
draw for the whole batch, not one mask each for their own rows. Every training forward of a Dropout layer draws a fresh 64-bit key from the
library's random stream (``gb.seed``), so the key names the layer and the step, and the counter
names the element. A kept element is multiplied by ``scale = 1 / (1 - rate)`` in the array's
float type (inverted dropout: float32 on every backend, float64 for a float64 model on NumPy); a
dropped one is exactly 0.

Three implementations compute it, and the tests hold them to the published known answers and
to each other: this module (NumPy, vectorized over whole arrays in uint32 arithmetic, and the
scalar ``philox4x32_10`` below, compiled by Numba for the CPU kernels and as a Numba-CUDA
device function), and ``kernels/philox.cuh`` for the CUDA C++ kernels.

>>> [hex(w) for w in philox4x32_10_numpy(0, 0, 0, 0, 0, 0)]
['0x6627e8d5', '0xe169c58d', '0xbc57ac4c', '0x9b00dbd8']
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

ROUNDS = 10
M0, M1 = 0xD2511F53, 0xCD9E8D57  # round multipliers
W0, W1 = 0x9E3779B9, 0xBB67AE85  # key schedule (Weyl) increments
COLUMNS_PER_CALL = 4  # the four output words serve four neighbouring columns of a row

# The scalar version computes in uint64 holding 32-bit values, with every constant typed: a
# bare Python int would make Numba promote uint64 arithmetic to float64. The products of two
# 32-bit values fit in 64 bits, and the key additions are masked back to 32.
_M0, _M1, _W0, _W1 = np.uint64(M0), np.uint64(M1), np.uint64(W0), np.uint64(W1)
_LOW32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """One Philox4x32-10 block: counter words ``c0..c3`` and key words ``k0, k1`` (np.uint64
    holding 32-bit values) -> the four output words, np.uint64 holding 32-bit values.

    Plain Python over NumPy scalars, so Numba compiles this same text for the CPU kernels
    (``njit``) and as a CUDA device function (``cuda.jit(device=True)``)."""
    for _ in range(ROUNDS):
        p0 = _M0 * c0
        p1 = _M1 * c2
        c0, c1, c2, c3 = ((p1 >> _SHIFT32) ^ c1 ^ k0, p1 & _LOW32, (p0 >> _SHIFT32) ^ c3 ^ k1, p0 & _LOW32)
        k0 = (k0 + _W0) & _LOW32
        k1 = (k1 + _W1) & _LOW32
    return c0, c1, c2, c3


def philox4x32_10_numpy(c0, c1, c2, c3, k0: int, k1: int) -> tuple[np.ndarray, ...]:
    """Philox4x32-10 over arrays of counters (broadcast together; uint32 or anything that casts
    to it) and one key (two ints) -> four uint32 arrays of the broadcast shape."""
    words = [np.asarray(c, np.uint32) for c in (c0, c1, c2, c3)]
    c0, c1, c2, c3 = np.broadcast_arrays(*words)
    k0, k1 = int(k0) & 0xFFFFFFFF, int(k1) & 0xFFFFFFFF
    for _ in range(ROUNDS):
        p0 = c0.astype(np.uint64) * np.uint64(M0)
        p1 = c2.astype(np.uint64) * np.uint64(M1)
        hi0, lo0 = (p0 >> np.uint64(32)).astype(np.uint32), p0.astype(np.uint32)
        hi1, lo1 = (p1 >> np.uint64(32)).astype(np.uint32), p1.astype(np.uint32)
        c0, c1, c2, c3 = hi1 ^ c1 ^ np.uint32(k0), lo1, hi0 ^ c3 ^ np.uint32(k1), lo0
        k0, k1 = (k0 + W0) & 0xFFFFFFFF, (k1 + W1) & 0xFFFFFFFF
    return c0, c1, c2, c3


class Mask(NamedTuple):
    """What a kernel needs to generate (or regenerate) one dropout mask.

    ``key``: the backend array of the two key words (uint32, shape (2,)), which a replayed CUDA
    graph reads from device memory; ``threshold``: keep where the word >= it; ``scale``: the
    kept elements' factor, ``1 / (1 - rate)``; ``keep_prob``: ``1 - rate``, which turns a kept
    output back into the activation's own output for its derivative (both float32, or float64 as
    ``mask_constants`` gives them); ``first_row``: the row counter of the array's first row."""

    key: object
    threshold: int
    scale: np.floating
    keep_prob: np.floating
    first_row: int = 0


def threshold(rate: float) -> int:
    """The uint32 a word must reach to keep its element: ``floor(rate * 2**32)`` (rate in [0, 1))."""
    return min(int(rate * 2.0**32), 0xFFFFFFFF)


def mask_constants(rate: float, dtype=np.float32) -> tuple[int, np.floating, np.floating]:
    """(threshold, scale, keep_prob) for dropping a fraction ``rate``, the factors in ``dtype``.

    float32 by default, the kernels' contract: the CUDA and Numba kernels take float32 factors
    whatever they are given. float64 is for float64 arrays on the NumPy backend, which multiplies
    in the array's dtype (gpubp.torch asks for it for a float64 MLP)."""
    dtype = np.dtype(dtype).type
    return threshold(rate), dtype(1.0 / (1.0 - rate)), dtype(1.0 - rate)


def draw_key(generator: np.random.Generator) -> np.ndarray:
    """A fresh key: two uint32 words from ``generator`` (the library's random stream)."""
    return generator.integers(0, 2**32, size=2, dtype=np.uint64).astype(np.uint32)


def keep_mask(key, rows: int, cols: int, threshold: int, first_row: int = 0) -> np.ndarray:
    """The (rows, cols) boolean mask of kept elements for ``key`` (two ints or a (2,) array), its
    rows counted from ``first_row``."""
    k0, k1 = (int(k) for k in np.asarray(key).reshape(-1)[:2])
    groups = -(-cols // COLUMNS_PER_CALL)
    col_group = np.arange(groups, dtype=np.uint32)[None, :]
    row = (np.arange(rows, dtype=np.uint64) + np.uint64(first_row)).astype(np.uint32)[:, None]
    words = np.stack(philox4x32_10_numpy(col_group, row, 0, 0, k0, k1), axis=-1)  # (rows, groups, 4)
    return words.reshape(rows, groups * COLUMNS_PER_CALL)[:, :cols] >= np.uint32(threshold)
