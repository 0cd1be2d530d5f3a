"""Argument checks used at the API boundary. Each error names the argument and says
what was expected and what was given; inner code trusts what passed through here."""

from __future__ import annotations

import numbers
import os
import sys
from collections.abc import Iterator

import numpy as np

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected a positive int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value}")
    return int(value)


def non_negative_int(value, name: str) -> int:
    """A count that may be zero: patience, cooldown."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name}: expected an int >= 0, got {value!r}")
    return int(value)


def non_negative(value, name: str) -> float:
    """A finite number >= 0."""
    return _finite_from(value, name, 0.0, ">=")


def positive(value, name: str) -> float:
    """A finite number > 0: a step, a divisor, an epsilon."""
    value = _finite_from(value, name, 0.0, ">")
    if value == 0:
        raise ValueError(f"{name}: expected a finite number > 0, got {value}")
    return value


def _finite_from(value, name: str, low: float, relation: str) -> float:
    """A finite real number ``relation`` (">=" or ">") ``low``, the ">" bound checked by the caller;
    the errors say which the argument needs."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a number {relation} {low:g}, got {type(value).__name__} {value!r}")
    if not value >= low or not np.isfinite(value):
        raise ValueError(f"{name}: expected a finite number {relation} {low:g}, got {value}")
    return float(value)


def in_unit_interval(value, name: str, closed: bool = False) -> float:
    """A number in [0, 1): Adam's betas, RMSprop's momentum; [0, 1] when ``closed``: SGD's momentum,
    where 1 (no decay of the velocity) is a valid choice, as PyTorch and scikit-learn take it."""
    value = non_negative(value, name)
    if value > 1 or (value == 1 and not closed):
        raise ValueError(f"{name}: expected a number in [0, 1{']' if closed else ')'}, got {value}")
    return value


def boolean(value, name: str) -> bool:
    """True or False (NumPy's too): a flag, where a truthy string or number would be a mistake."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected True or False, got {value!r}")
    return bool(value)


def in_range(a: np.ndarray, name: str, dtype, at: str = "in row", whose: str = "the model's dtype") -> None:
    """Refuse finite values of the float array ``a`` past ``dtype``'s range, which are inf once
    cast to it, naming the first ``at`` its index ("in row 9", "at sample 9", "for class 2") and
    ``whose`` dtype that is. Nothing the size of ``a`` is made unless a value is out of range."""
    if a.dtype.kind == "f" and np.dtype(dtype).itemsize < a.dtype.itemsize and a.size and not within(a, dtype):
        largest = np.finfo(dtype).max
        fits = np.abs(a) <= largest
        if not np.all(fits):
            where = tuple(int(i) for i in np.argwhere(~fits)[0])
            raise beyond_range(name, a[where], f"{at} {where[0]}", dtype, whose)


def beyond_range(name: str, value, where: str, dtype, whose: str = "the model's dtype") -> ValueError:
    """The error for ``value`` (``where``: "in row 9", ...) past ``dtype``'s range, ``whose`` dtype."""
    return ValueError(f"{name}: {value} {where} is beyond {np.dtype(dtype)}'s range (±{np.finfo(dtype).max:.4g}), "
                      f"{whose}, where it would be inf")


def within(a: np.ndarray, dtype=None) -> bool:
    """Whether the non-empty float array ``a`` is finite, and within ``dtype``'s range where that
    is narrower than its own: from its extremes, in two passes that make no temporary array."""
    lo, hi = a.min(), a.max()
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return False
    if dtype is not None and np.dtype(dtype).itemsize < a.dtype.itemsize:
        return max(-float(lo), float(hi)) <= float(np.finfo(dtype).max)
    return True


def switch(value, name: str):
    """True, False (NumPy's too) or "auto": a flag such as ``fused`` or ``cuda_graph``, where
    "auto" leaves the choice to gpubp and True asks for the thing or an error saying why not."""
    if isinstance(value, np.bool_):
        value = bool(value)
    if not (value is True or value is False or (isinstance(value, str) and value == "auto")):
        raise ValueError(f"{name}: expected True, False or 'auto', got {value!r}")
    return value


def built(value, name: str):
    """``value``, or where it is a class, the instance its defaults build, as Keras 3 takes
    ``loss=Huber`` for ``loss=Huber()``; a class that needs arguments is a TypeError naming ``name``."""
    if not isinstance(value, type):
        return value
    try:
        return value()
    except TypeError as error:
        raise TypeError(f"{name}: got the class {value.__name__}, which cannot be built without arguments "
                        f"({error}); pass an instance, {value.__name__}(...)") from None


def array_kind(a) -> str:
    """'numpy', 'cupy', 'device' (another CUDA array) or 'other' (lists and the like)."""
    if isinstance(a, np.ndarray):
        return "numpy"
    root = type(a).__module__.split(".")[0]
    if root == "cupy":
        return "cupy"
    if hasattr(a, "__cuda_array_interface__") or root == "numba":
        return "device"
    return "other"


def to_numpy(a, name: str, expected: str = "an array") -> np.ndarray:
    """A NumPy view or copy of ``a``: host arrays and lists as they are, GPU arrays copied to the host.
    ``expected`` is what ``name`` should be, for the errors on what NumPy cannot make one array of."""
    kind = array_kind(a)
    if kind == "cupy":
        return a.get()
    if type(a).__module__.split(".")[0] == "torch":
        if not hasattr(a, "detach"):  # a Dataset or a DataLoader, which NumPy would iterate or wrap whole
            raise _no_array(a, name, expected)
        a = a.detach().cpu()  # a tensor that requires grad too
        return (a.float() if str(a.dtype) == "torch.bfloat16" else a).numpy()  # NumPy has no bfloat16
    if kind == "device":
        if not hasattr(a, "copy_to_host"):
            raise TypeError(f"{name}: cannot read a {type(a).__name__}")
        return a.copy_to_host()
    if is_sparse(a):  # NumPy would wrap it whole, in an array of shape ()
        dense = f"{name}.toarray()" + (".ravel()" if len(a.shape) == 2 and a.shape[1] == 1 else "")
        raise TypeError(f"{name}: expected {expected}, got a SciPy sparse {type(a).__name__}; only the samples x "
                        "of fit, evaluate, predict, forward, a train step and train_test_split may be sparse: "
                        f"pass {dense}")
    if isinstance(a, Iterator):  # NumPy would wrap it whole, in an array of shape ()
        raise TypeError(f"{name}: expected {expected}, got an iterator ({type(a).__name__}); generators and "
                        "other iterators are not supported: pass arrays, or call model.train_step() on each "
                        "batch they yield")
    try:
        array = np.asarray(a)
    except ValueError as error:  # nested lists of uneven lengths
        raise ValueError(f"{name}: expected {expected}, got something NumPy cannot make one array of "
                         f"({error})") from None
    if array.ndim == 0 and array.dtype == object:  # a dict, say: wrapped whole
        raise _no_array(a, name, expected)
    return array.astype(np.float32) if is_bfloat16(array.dtype) else array


def is_sparse(a) -> bool:
    """Whether ``a`` is a SciPy sparse matrix or array (known without importing SciPy)."""
    return type(a).__module__.startswith("scipy.sparse") and hasattr(a, "tocsr")


def is_bfloat16(dtype) -> bool:
    """Whether ``dtype`` is ml_dtypes' bfloat16 (JAX's arrays' on the host): NumPy has no bfloat16 of
    its own and sees that one as kind 'V', not floating point, so it is known by its name (without
    importing ml_dtypes). Read as the float32 it holds (exactly), as a torch bfloat16 tensor is."""
    return dtype.name == "bfloat16"


def _no_array(a, name: str, expected: str) -> TypeError:
    return TypeError(f"{name}: expected {expected}, got a {type(a).__name__}, which is no array; pass arrays "
                     "(the batches a DataLoader yields go to model.train_step() one at a time)")


def float_dtype(dtype, name: str) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise TypeError(f"{name}: expected a floating-point array, got dtype {dtype}")
    return dtype


def weight_values(array, shape: tuple, dtype, name: str, what: str, holder: str) -> np.ndarray:
    """``array``, the values of ``what`` (shape ``shape``), as a new NumPy array of ``dtype``, the
    ``holder``'s: real numbers (a cast would drop a complex part, or misread bools and strings),
    finite before and after the cast. A copy, since optimizers update weights in place."""
    array = to_numpy(array, name, f"an array of shape {shape} for {what}")
    if array.shape != shape:
        raise ValueError(f"{name}: expected shape {shape} for {what}, got {array.shape}")
    if array.dtype.kind not in "fiu":
        raise TypeError(f"{name}: expected a real numeric array (floats or integers), got dtype {array.dtype}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name}: contains NaN or inf")
    with np.errstate(over="ignore"):
        cast = np.array(array, dtype=dtype)
    if not np.all(np.isfinite(cast)):  # finite float64 past the float32 range
        raise ValueError(f"{name}: values of magnitude up to {np.abs(array).max():.3g} overflow to inf in "
                         f"{holder}'s {cast.dtype} (largest {np.finfo(cast.dtype).max:.3g})")
    return cast


PARAMETER_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def parameter_dtype(dtype, name: str) -> np.dtype:
    """float32 or float64: the types gpubp's kernels and files hold weights in."""
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{name}: expected float32 or float64, got {dtype!r}") from None
    if dtype not in PARAMETER_DTYPES:
        raise TypeError(f"{name}: expected float32 or float64, got {dtype}")
    return dtype


def batch_shape(shape, features: int, name: str) -> None:
    shape = tuple(shape)
    if len(shape) != 2:
        raise ValueError(f"{name}: expected a 2-D array of shape (batch, {features}), got shape {shape}")
    if shape[1] != features:
        raise ValueError(f"{name}: expected shape (batch, {features}), got {shape}")
    if shape[0] == 0:
        raise ValueError(f"{name}: expected at least one row, got shape {shape}")


def user_stacklevel() -> int:
    """The ``stacklevel`` for a warning raised in the function calling this one that points at the
    first frame outside gpubp: the user's line (``fit``, ``train_step``), however deep the call."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return level
