"""Losses: each returns ``(loss, grad)``, a Python float and the gradient of the mean loss.

All are means, as in PyTorch and Keras: ``cross_entropy`` (class indices) and
``categorical_cross_entropy`` (one-hot rows) over the batch, ``mse``, ``mae``, ``huber``,
``binary_cross_entropy`` and ``poisson`` over all elements. Each takes ``sample_weight`` (B,), non-negative:
each sample's loss times its weight, summed and divided by the batch size (Keras's rule; for
the elementwise losses, divided by the element count, so a weight of 1
for every sample gives the unweighted mean). The cross-entropies take ``label_smoothing``.
``Huber(delta)`` is the Huber loss with another delta, and ``CrossEntropy(label_smoothing)`` /
``CategoricalCrossEntropy(label_smoothing)`` the cross-entropies with label smoothing, for
``fit``, ``compile`` and ``train_step``. The cross-entropies and
``binary_cross_entropy`` take logits, and ``poisson`` log rates; ``fuses`` says when a model's output activation
(softmax, sigmoid) is the one such a loss applies, so fit/evaluate give it the logits.
The backend is chosen by the array's type (or passed by the training loop). Inputs are checked here, once; the kernels trust them.

>>> import numpy as np
>>> loss, grad = cross_entropy(np.array([[2.0, 0.0]], np.float32), np.array([0]))
>>> round(loss, 4), grad.shape
(0.1269, (1, 2))
"""

from __future__ import annotations

import warnings
from types import ModuleType

import numpy as np

from gpubp import _checks, backends


def _host(a, backend: ModuleType) -> np.ndarray:
    return backend.to_host(a) if backend.is_array(a) else np.asarray(a)


def _prediction(pred, name: str, backend: ModuleType | None):
    if _checks.array_kind(pred) == "other":
        pred = np.asarray(pred)
    backend = backend or backends.for_array(pred)
    _checks.float_dtype(pred.dtype, name)
    if len(pred.shape) != 2 or pred.shape[0] == 0:
        raise ValueError(f"{name}: expected a 2-D array (batch, outputs) with at least one row, got shape {tuple(pred.shape)}")
    return pred, backend


def _on(backend: ModuleType, a, dtype):
    return a if backend.is_array(a) and a.dtype == dtype else backend.asarray(_host(a, backend), dtype)


def _weights(sample_weight, batch: int, backend: ModuleType, dtype):
    """``sample_weight`` checked (B,) finite and >= 0, as a backend array in ``dtype``; None stays None."""
    if sample_weight is None:
        return None
    host = _host(sample_weight, backend)
    if host.shape != (batch,):
        raise ValueError(f"sample_weight: expected shape ({batch},), one weight per sample, got {host.shape}")
    if host.dtype.kind not in "fiub":
        raise TypeError(f"sample_weight: expected numeric weights, got dtype {host.dtype}")
    check_weights(host, "sample_weight")
    _checks.in_range(host, "sample_weight", dtype, "at sample", "the predictions' dtype")
    return _on(backend, sample_weight, dtype)


def check_weights(weights: np.ndarray, name: str) -> None:
    """Raise unless every weight is finite and >= 0, naming the first that is not."""
    bad = ~np.isfinite(weights) | (weights < 0)
    if np.any(bad):
        i = int(np.argmax(bad))
        raise ValueError(f"{name}: expected finite weights >= 0, got {weights[i]} at sample {i}")


def _number(value, name: str) -> None:
    """A loss option must be a real number (a bool is not one); the caller checks its range."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")


def _label_smoothing(label_smoothing) -> float:
    _number(label_smoothing, "label_smoothing")
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"label_smoothing: expected a number in [0, 1), got {label_smoothing!r}")
    return float(label_smoothing)


def cross_entropy(logits, labels, sample_weight=None, backend: ModuleType | None = None,
                  label_smoothing: float = 0.0):
    """Softmax cross-entropy, mean over the batch: logits (B, C) float, labels (B,) ints in [0, C).

    Softmax, loss and gradient run fused; stable for finite logits of any magnitude. A -inf
    logit (a masked class) gets probability 0 and gradient 0. A +inf logit is not supported:
    its row's loss and gradient come out inf or NaN (PyTorch gives NaN).

    ``label_smoothing`` eps in [0, 1): each row's target is ``(1 - eps) onehot(label) + eps / C``
    (PyTorch's ``CrossEntropyLoss(label_smoothing=eps)``, Keras's smoothed targets), so the row's
    loss is ``logsumexp(z) - (1 - eps) z[label] - eps / C sum(z)`` and its gradient
    ``softmax(z) - target``. With eps > 0 a -inf logit makes the loss inf, as in PyTorch: the
    smoothed target puts eps / C on the masked class. For label smoothing in ``fit``, pass
    ``CrossEntropy(label_smoothing)``.
    """
    label_smoothing = _label_smoothing(label_smoothing)
    logits, backend = _prediction(logits, "logits", backend)
    batch, classes = logits.shape
    host_labels = _host(labels, backend)
    if host_labels.shape != (batch,):
        raise ValueError(f"labels: expected shape ({batch},) to match logits {tuple(logits.shape)}, got {host_labels.shape}")
    if host_labels.dtype.kind not in "iu":
        raise TypeError(f"labels: expected integer class indices, got dtype {host_labels.dtype}")
    low, high = int(host_labels.min()), int(host_labels.max())
    if low < 0 or high >= classes:
        raise ValueError(f"labels: expected class indices in [0, {classes}), got values from {low} to {high}")
    return backend.softmax_cross_entropy(logits, _on(backend, labels, np.int64),
                                         _weights(sample_weight, batch, backend, logits.dtype), label_smoothing)


def is_one_hot(rows: np.ndarray) -> bool:
    """True when every row of ``rows`` (B, C) is zeros with a single 1."""
    return rows.dtype.kind in "fiub" and bool(np.all((rows == 0) | (rows == 1)) and np.all(rows.sum(axis=1) == 1))


def categorical_cross_entropy(logits, target, sample_weight=None, backend: ModuleType | None = None,
                              label_smoothing: float = 0.0):
    """Softmax cross-entropy with one-hot targets (B, C), mean over the batch (Keras's
    ``categorical_crossentropy``, ``label_smoothing`` included); the same fused kernel as
    :func:`cross_entropy`, whose documentation says what ``label_smoothing`` does."""
    label_smoothing = _label_smoothing(label_smoothing)
    logits, backend = _prediction(logits, "logits", backend)
    host = _host(target, backend)
    if host.shape != tuple(logits.shape):
        raise ValueError(f"target: expected one-hot rows of shape {tuple(logits.shape)} to match the logits, "
                         f"got {host.shape}")
    if not is_one_hot(host):
        raise ValueError("target: expected one-hot rows (a single 1 in each row, zeros elsewhere); "
                         "for class indices use cross_entropy (sparse_categorical_crossentropy)")
    return backend.softmax_cross_entropy(logits, _on(backend, host.argmax(axis=1), np.int64),
                                         _weights(sample_weight, logits.shape[0], backend, logits.dtype),
                                         label_smoothing)


def _target(pred, target, backend: ModuleType, name: str = "target"):
    if _checks.array_kind(target) == "other":
        target = np.asarray(target)
    if tuple(target.shape) == (pred.shape[0],) and pred.shape[1] == 1:
        target = target.reshape(pred.shape)
    if tuple(target.shape) != tuple(pred.shape):
        raise ValueError(f"{name}: expected shape {tuple(pred.shape)} to match the predictions, got {tuple(target.shape)}")
    if np.dtype(target.dtype).kind not in "fiub":
        raise TypeError(f"{name}: expected a numeric array, got dtype {target.dtype}")
    return _on(backend, target, pred.dtype)


def mse(pred, target, sample_weight=None, backend: ModuleType | None = None):
    """Mean squared error over all elements; ``target`` has the shape of ``pred``."""
    pred, backend = _prediction(pred, "pred", backend)
    weights = _weights(sample_weight, pred.shape[0], backend, pred.dtype)
    return backend.mse(pred, _target(pred, target, backend), weights)


def mae(pred, target, sample_weight=None, backend: ModuleType | None = None):
    """Mean absolute error over all elements (Keras's ``mae``, PyTorch's ``L1Loss``); ``target`` has
    the shape of ``pred``. Its gradient is ``sign(pred - target) / n``, 0 where they are equal, as
    in PyTorch."""
    pred, backend = _prediction(pred, "pred", backend)
    weights = _weights(sample_weight, pred.shape[0], backend, pred.dtype)
    return backend.mae(pred, _target(pred, target, backend), weights)


def _delta(delta) -> float:
    _number(delta, "delta")
    if not (np.isfinite(delta) and delta > 0):
        raise ValueError(f"delta: expected a finite number > 0, got {delta!r}")
    return float(delta)


def huber(pred, target, sample_weight=None, backend: ModuleType | None = None, delta: float = 1.0):
    """Huber loss, mean over all elements; ``target`` has the shape of ``pred``.

    With ``d = pred - target``: ``d^2 / 2`` where ``|d| <= delta``, ``delta (|d| - delta / 2)``
    past it, so errors past ``delta`` pull with a constant force (``delta``) rather than one that
    grows with them. Keras's ``huber`` and PyTorch's ``HuberLoss(delta=delta)``; with the
    default ``delta`` of 1 also PyTorch's ``SmoothL1Loss``. For another delta in ``fit``, pass
    ``Huber(delta)``.
    """
    delta = _delta(delta)
    pred, backend = _prediction(pred, "pred", backend)
    weights = _weights(sample_weight, pred.shape[0], backend, pred.dtype)
    return backend.huber(pred, _target(pred, target, backend), weights, delta)


class _WithOptions:
    """A loss function of this module with its keyword options fixed, to pass as a ``loss``
    (Keras's loss classes): called as the function is, equal to another of its class with the
    same options. A subclass names the function (``function``, also its ``__name__``) and its
    options, each the keyword's name and its check (``_options``); ``__init__`` stores them.
    ``options()`` checks them again, so an option set to a bad value after construction is
    refused before any step uses it (the training step passes them to the backend directly)."""

    function = staticmethod(lambda *args, **kwargs: None)
    _options: dict = {}

    def __init__(self, **options) -> None:
        for name, check in self._options.items():
            setattr(self, name, check(options[name]))

    @property
    def __name__(self) -> str:
        return self.function.__name__

    def options(self) -> dict:
        return {name: check(getattr(self, name)) for name, check in self._options.items()}

    def __call__(self, pred, target, sample_weight=None, backend: ModuleType | None = None):
        return self.function(pred, target, sample_weight, backend, **self.options())

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other.options() == self.options()

    def __hash__(self) -> int:
        return hash((type(self), *self.options().items()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.options().items())})"


class Huber(_WithOptions):
    """The Huber loss with its ``delta`` fixed (Keras's ``losses.Huber(delta)``), to pass as a
    ``loss``: ``model.fit(x, y, loss=gb.losses.Huber(0.5))``. Called as :func:`huber` is."""

    function = staticmethod(huber)
    _options = {"delta": _delta}

    def __init__(self, delta: float = 1.0) -> None:
        super().__init__(delta=delta)


class CrossEntropy(_WithOptions):
    """:func:`cross_entropy` (class indices) with its ``label_smoothing`` fixed (PyTorch's
    ``CrossEntropyLoss(label_smoothing=eps)``), to pass as a ``loss``:
    ``model.fit(x, y, loss=gb.losses.CrossEntropy(label_smoothing=0.1))``."""

    function = staticmethod(cross_entropy)
    _options = {"label_smoothing": _label_smoothing}

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__(label_smoothing=label_smoothing)


class CategoricalCrossEntropy(_WithOptions):
    """:func:`categorical_cross_entropy` (one-hot targets) with its ``label_smoothing`` fixed
    (Keras's ``CategoricalCrossentropy(label_smoothing=eps)``), to pass as a ``loss``."""

    function = staticmethod(categorical_cross_entropy)
    _options = {"label_smoothing": _label_smoothing}

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__(label_smoothing=label_smoothing)


def base(loss_fn):
    """The loss ``loss_fn`` computes, as a function of this module: :func:`huber` for a
    ``Huber``, :func:`cross_entropy` for a ``CrossEntropy`` (and so on), ``loss_fn`` itself
    otherwise."""
    return loss_fn.function if isinstance(loss_fn, _WithOptions) else loss_fn


def options(loss_fn) -> dict:
    """The keyword arguments that ``loss_fn`` passes to its backend function (a ``Huber``'s
    delta, a ``CrossEntropy``'s label smoothing); none for a plain function."""
    return loss_fn.options() if isinstance(loss_fn, _WithOptions) else {}


def binary_cross_entropy(logits, target, sample_weight=None, backend: ModuleType | None = None):
    """Binary cross-entropy on logits (sigmoid fused), mean over all elements; targets in [0, 1]."""
    logits, backend = _prediction(logits, "logits", backend)
    target = _target(logits, target, backend)
    host = _host(target, backend)
    if not (host.min() >= 0 and host.max() <= 1):  # a NaN fails both, and must not hide a 7.0 beside it
        raise ValueError(f"target: expected values in [0, 1], got values from {np.nanmin(host)} to {np.nanmax(host)}"
                         f"{' and NaN' if np.isnan(host).any() else ''}")
    return backend.bce(logits, target, _weights(sample_weight, logits.shape[0], backend, logits.dtype))


def poisson(log_rate, target, sample_weight=None, backend: ModuleType | None = None):
    """Poisson negative log-likelihood on log rates, mean over all elements: with ``z`` the
    log rate and ``t`` the count, ``exp(z) - t z`` (the constant ``log t!`` left out), gradient
    ``(exp(z) - t) / n``. PyTorch's ``poisson_nll_loss(z, t, log_input=True, full=False)``.
    Targets are counts or rates: finite and >= 0. A model trained on it outputs log rates
    (an identity output layer), so ``predict`` gives log rates; ``exp`` of them is the
    predicted mean. (Keras's ``poisson`` takes the rate itself, not its log.)"""
    log_rate, backend = _prediction(log_rate, "log_rate", backend)
    target = _target(log_rate, target, backend)
    host = _host(target, backend)
    bad = ~np.isfinite(host) | (host < 0)
    if np.any(bad):
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"target: expected finite counts >= 0 for the poisson loss, got {host[index]} at {index}")
    return backend.poisson(log_rate, target, _weights(sample_weight, log_rate.shape[0], backend, log_rate.dtype))


LOSSES = {
    "cross_entropy": cross_entropy,
    "categorical_cross_entropy": categorical_cross_entropy,
    "mse": mse,
    "mae": mae,
    "huber": huber,
    "binary_cross_entropy": binary_cross_entropy,
    "poisson": poisson,
}
ALIASES = {
    "poisson_nll": "poisson",
    "huber_loss": "huber",
    "mean_absolute_error": "mae",
    "l1": "mae",
    "sparse_categorical_crossentropy": "cross_entropy",
    "categorical_crossentropy": "categorical_cross_entropy",
    "mean_squared_error": "mse",
    "bce": "binary_cross_entropy",
    "binary_crossentropy": "binary_cross_entropy",
}
# Losses that apply an output activation themselves: with that activation on the model's
# last layer, training feeds them the logits (one fused, stable pass), as Keras does for a
# sigmoid or softmax output and PyTorch's *WithLogits losses do.
FUSED_ACTIVATION = {
    cross_entropy: "softmax",
    categorical_cross_entropy: "softmax",
    binary_cross_entropy: "sigmoid",
}


# Losses that fit the output itself to the targets: with 0/1 targets, class 1 begins at an
# output of 0.5 (Keras's binary_accuracy threshold), not at a logit of 0.
FITS_VALUES = (mse, mae, huber)


# Losses of class targets: ``evaluate`` scores their accuracy unless told which metrics to score.
CLASSIFICATION = (cross_entropy, categorical_cross_entropy, binary_cross_entropy)


def classifies(loss_fn) -> bool:
    """True when ``loss_fn`` is one of this module's losses of class targets (the cross-entropies,
    ``binary_cross_entropy``); False for the regression losses (mse, mae, huber, poisson) and
    for a loss of your own, whose targets gpubp cannot tell."""
    return base(loss_fn) in CLASSIFICATION


_BUILTIN = tuple(LOSSES.values())  # a tuple: a loss of your own need not be hashable


def is_builtin(loss_fn) -> bool:
    """True for this module's loss functions and loss classes, which take ``backend=``."""
    return base(loss_fn) in _BUILTIN


def fits_values(loss_fn) -> bool:
    """True when ``loss_fn`` fits the model's output itself to the targets (mse, mae, huber), so
    that output is a value, not a logit."""
    return base(loss_fn) in FITS_VALUES


def fuses(loss_fn, activation: str) -> bool:
    """True when ``loss_fn`` applies ``activation`` itself, so it should be given the logits."""
    return FUSED_ACTIVATION.get(base(loss_fn)) == activation


def warn_if_another_head(loss_fn, activation: str, where: str) -> None:
    """Warn when ``loss_fn`` applies one of softmax and sigmoid to what a last layer of the other
    gives: those outputs are probabilities, and the loss would take them as logits."""
    applies = FUSED_ACTIVATION.get(base(loss_fn))
    if applies is None or activation not in FUSED_ACTIVATION.values() or activation == applies:
        return
    other = next(name for name, fn in LOSSES.items() if FUSED_ACTIVATION.get(fn) == activation)
    warnings.warn(f"{where}: the loss {getattr(base(loss_fn), '__name__', loss_fn)} applies {applies} to "
                  f"the outputs, but the last layer's {activation} has made them probabilities already; "
                  f"use {other!r} for a {activation} last layer, or make the last layer linear",
                  UserWarning, stacklevel=_checks.user_stacklevel())


def get(loss):
    """A loss function from its name (Keras spellings accepted) or a callable.

    A loss of your own is called ``loss(pred, target)`` with ``pred`` (B, out) the model's output,
    and returns ``(loss, grad)``: the loss as a float and its gradient w.r.t. ``pred``. It is
    passed ``sample_weight=`` (B,) too only when the samples are weighted; only this module's
    losses are passed ``backend=`` as well. A class (``Huber``, ``CrossEntropy``) is built with
    its defaults, as Keras 3 builds one: ``loss=Huber`` is ``loss=Huber()``."""
    loss = _checks.built(loss, "loss")
    if callable(loss):
        return loss
    if not isinstance(loss, str):
        raise TypeError(f"loss: expected a name or a callable, got {type(loss).__name__}")
    name = ALIASES.get(loss, loss)
    if name not in LOSSES:
        raise ValueError(f"loss: unknown loss {loss!r}; expected one of {sorted(LOSSES) + sorted(ALIASES)}")
    return LOSSES[name]
