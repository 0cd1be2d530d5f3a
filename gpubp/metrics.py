"""Metrics for ``evaluate`` and ``fit``'s validation: each ``(scores, y) -> float`` on host arrays.

``scores`` (N, out) are what ``predict`` returns; ``y`` the targets as ``fit`` takes them.
A single output is a logit (class 1 when > 0) unless the model's last layer is a sigmoid,
whose probabilities ``evaluate`` passes with threshold 0.5.

>>> import numpy as np
>>> accuracy(np.array([[0.2, 0.8], [0.9, 0.1]]), np.array([1, 1]))
0.5
"""

from __future__ import annotations

import functools

import numpy as np


def _classes(scores: np.ndarray, threshold: float) -> np.ndarray:
    """Predicted class: argmax over classes, or score > threshold for a single output."""
    if scores.shape[1] == 1:
        return (scores[:, 0] > threshold).astype(np.int64)
    return scores.argmax(axis=1)


def _labels(y: np.ndarray) -> np.ndarray:
    return y.reshape(-1).astype(np.int64) if y.ndim == 1 or y.shape[1] == 1 else y.argmax(axis=1)


def _per_class(pred: np.ndarray, true: np.ndarray):
    classes = np.union1d(pred, true)
    tp = np.array([np.sum((pred == c) & (true == c)) for c in classes], dtype=np.float64)
    fp = np.array([np.sum((pred == c) & (true != c)) for c in classes], dtype=np.float64)
    fn = np.array([np.sum((pred != c) & (true == c)) for c in classes], dtype=np.float64)
    return classes, tp, fp, fn


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def _binary(scores: np.ndarray) -> bool:
    return scores.shape[1] == 1


def _precision_recall(scores, y, threshold):
    pred, true = _classes(scores, threshold), _labels(y)
    classes, tp, fp, fn = _per_class(pred, true)
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    if _binary(scores):
        positive = classes == 1
        return precision[positive].sum(), recall[positive].sum()
    return precision, recall


def accuracy(scores: np.ndarray, y: np.ndarray, threshold: float = 0.0) -> float:
    return float(np.mean(_classes(scores, threshold) == _labels(y)))


def precision(scores: np.ndarray, y: np.ndarray, threshold: float = 0.0) -> float:
    """Binary precision for one output; macro-averaged over classes otherwise."""
    return float(np.mean(_precision_recall(scores, y, threshold)[0]))


def recall(scores: np.ndarray, y: np.ndarray, threshold: float = 0.0) -> float:
    """Binary recall for one output; macro-averaged over classes otherwise."""
    return float(np.mean(_precision_recall(scores, y, threshold)[1]))


def f1(scores: np.ndarray, y: np.ndarray, threshold: float = 0.0) -> float:
    """Binary F1 for one output; macro-averaged F1 over classes otherwise (scikit-learn's 'macro')."""
    p, r = _precision_recall(scores, y, threshold)
    p, r = np.atleast_1d(p), np.atleast_1d(r)
    return float(np.mean(_ratio(2 * p * r, p + r)))


def mean_squared_error(scores: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean((scores - y.reshape(scores.shape)) ** 2))


def mean_absolute_error(scores: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.abs(scores - y.reshape(scores.shape))))


METRICS = {"accuracy": accuracy, "precision": precision, "recall": recall, "f1": f1,
           "mse": mean_squared_error, "mae": mean_absolute_error}
THRESHOLDED = (accuracy, precision, recall, f1)


def get(metric, threshold: float = 0.0):
    """``(name, fn)`` for a metric name or a callable ``(scores, y) -> float`` (named by its ``__name__``);
    ``threshold`` is where a single output's class 1 begins (0.5 for probabilities, 0 for logits)."""
    if callable(metric):
        return getattr(metric, "__name__", "metric"), metric
    if metric not in METRICS:
        raise ValueError(f"metrics: unknown metric {metric!r}; expected one of {sorted(METRICS)} or a callable")
    fn = METRICS[metric]
    return metric, functools.partial(fn, threshold=threshold) if fn in THRESHOLDED else fn
