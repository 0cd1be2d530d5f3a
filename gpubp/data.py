"""Small datasets that need no network, and a seeded train/test split.

>>> x, y = load_digits()
>>> x.shape, x.dtype, float(x.max()), y.shape
((1797, 64), dtype('float32'), 1.0, (1797,))
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from gpubp import _checks, _random


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes), offline.

    Returns x (1797, 64) float32 scaled to [0, 1] and y (1797,) int64 labels 0-9.
    """
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as exc:
        raise ImportError(
            "load_digits needs scikit-learn, which ships the digits dataset: "
            'pip install "gpubp[demo]"  (or pip install scikit-learn)'
        ) from exc
    digits = sklearn_digits()
    x = (digits.data / 16.0).astype(np.float32)
    return x, digits.target.astype(np.int64)


def xor() -> tuple[np.ndarray, np.ndarray]:
    """The four XOR points: x (4, 2) float32, y (4, 1) float32 in {0, 1}."""
    x = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float32)
    y = np.array([[0], [1], [1], [0]], dtype=np.float32)
    return x, y


def regression(n_samples: int = 1000, n_features: int = 8, noise: float = 0.05,
               seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A smooth nonlinear regression task: y = sin(2 x @ a) + 0.5 (x @ b)^2 + noise.

    ``a`` and ``b`` are drawn with entries N(0, 1 / n_features), so x @ a and x @ b stay of order 1,
    and the noise is N(0, noise^2). Returns x (n, n_features) float32 in [-1, 1] and y (n, 1) float32.
    """
    n_samples = _checks.positive_int(n_samples, "n_samples")
    n_features = _checks.positive_int(n_features, "n_features")
    noise = _checks.non_negative(noise, "noise")
    rng = _rng(seed)
    x = rng.uniform(-1, 1, (n_samples, n_features))
    a = rng.normal(0, 1, n_features) / np.sqrt(n_features)
    b = rng.normal(0, 1, n_features) / np.sqrt(n_features)
    with np.errstate(invalid="ignore"):  # finite values; a BLAS can set the flag anyway (numpy_backend._matmul)
        xa, xb = x @ a, x @ b
    y = np.sin(2 * xa) + 0.5 * xb**2 + noise * rng.normal(0, 1, n_samples)
    return x.astype(np.float32), y.reshape(-1, 1).astype(np.float32)


def train_test_split(x, y, test_size: float = 0.25, seed: int | None = None, stratify: bool = False):
    """Shuffle and split into ``x_train, x_test, y_train, y_test`` (scikit-learn's order).

    The test part takes ``ceil(test_size * N)`` of the N samples and the train part the rest, as
    scikit-learn's ``train_test_split`` counts them. ``stratify=True`` keeps each class's share in
    both parts (``y`` must be class labels, shape (N,)): each class gives ``round(test_size * its
    count)`` samples to the test part. A split that would leave either part empty raises a
    ValueError naming ``test_size``. A SciPy sparse ``x`` is split by rows into CSR matrices, as
    ``fit`` takes it.
    """
    if not isinstance(stratify, (bool, np.bool_)):
        hint = "; pass the labels as y, with stratify=True" if np.ndim(stratify) else ""
        raise TypeError(f"stratify: expected True or False, got {type(stratify).__name__}{hint}")
    if _checks.is_sparse(x):  # split by rows, and kept sparse, as fit takes it
        if x.ndim != 2:
            raise ValueError(f"x: expected a 2-D sparse matrix, one row per sample, got shape {x.shape}")
        x = x.tocsr()
    else:
        x = _checks.to_numpy(x, "x", "an array of samples")
    y = _checks.to_numpy(y, "y", "an array of targets")
    for name, a in (("x", x), ("y", y)):
        if a.ndim == 0:
            raise TypeError(f"{name}: expected an array with one row per sample, got {type(a.item()).__name__}")
    n = x.shape[0]  # a sparse matrix has no len()
    if n != len(y):
        raise ValueError(f"y: expected {n} rows to match x, got {len(y)}")
    if not isinstance(test_size, numbers.Real):
        raise TypeError(f"test_size: expected a float in (0, 1), got {type(test_size).__name__} {test_size!r}")
    if isinstance(test_size, bool) or not 0 < test_size < 1:
        raise ValueError(f"test_size: expected a float in (0, 1), got {test_size!r}")
    if stratify and y.ndim != 1:
        # argmax of a single column is all zeros: one class, so that shape is asked to ravel
        hint = ("" if y.ndim != 2 else "; for a single column of labels pass y.ravel()" if y.shape[1] == 1
                else "; for one-hot rows pass y.argmax(axis=1)")
        raise ValueError(f"y: stratify=True needs class labels of shape ({len(y)},), got shape {y.shape}{hint}")
    # The sizes are checked before anything is drawn: a refused split leaves gb.seed's stream as it was.
    if stratify:
        classes = [np.flatnonzero(y == c) for c in np.unique(y)]
        n_test = sum(int(round(len(members) * test_size)) for members in classes)
        if not 0 < n_test < n:
            raise ValueError(f"test_size: {test_size} of each class (rounded) leaves an empty split of these "
                             f"{n} samples; use a larger test_size, more samples, or stratify=False")
    else:
        n_test = math.ceil(n * test_size)
        if not 0 < n_test < n:
            raise ValueError(f"test_size: {test_size} of {n} samples leaves an empty split")
    rng = _rng(seed)
    if stratify:
        test = np.concatenate([
            members[: int(round(len(members) * test_size))]
            for members in (rng.permutation(members) for members in classes)
        ])
        is_test = np.zeros(n, bool)
        is_test[test] = True
        train_idx, test_idx = rng.permutation(np.flatnonzero(~is_test)), rng.permutation(test)
    else:
        order = rng.permutation(n)
        test_idx, train_idx = order[:n_test], order[n_test:]
    return x[train_idx], x[test_idx], y[train_idx], y[test_idx]


def _rng(seed) -> np.random.Generator:
    """A generator of its own for an int ``seed``; the library's stream (``gb.seed``) for None."""
    if seed is None:
        return _random.generator()
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed: expected None or an int >= 0, got {seed!r}")
    return np.random.default_rng(seed)
