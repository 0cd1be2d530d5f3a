"""Metrics for ``evaluate`` and ``fit``'s validation: each ``(scores, y) -> float`` on host arrays.

``scores`` (N, out) are what ``predict`` returns; ``y`` the targets as ``fit`` takes them.
A single output is a logit (class 1 when > 0) unless the model's last layer is a sigmoid
or softmax, whose probabilities ``evaluate`` passes with threshold 0.5, as it does an output
that its loss fits to the targets (mse, mae, huber: Keras's ``binary_accuracy`` threshold).
A binary target in [0, 1] (one per output: a single output's, ``binary_accuracy``'s and
``auc``'s, a multi-hot column's) is class 1 from 0.5 on, so smoothed or soft targets
(0.05 and 0.95, as ``binary_cross_entropy`` takes) score as the hard labels they round to, in
every metric alike. Rows of targets, one per output, are one-hot rows or probability rows
(their argmax is the class) or multi-hot 0/1 rows (some row with other than exactly one 1);
other rows are refused. ``precision``, ``recall`` and ``f1`` on multi-hot targets score each
output as a binary problem at that threshold and average over
the labels, as scikit-learn's multilabel ``average="macro"``; ``accuracy`` there compares the
highest score with the first label, as Keras 3's ``"accuracy"`` does for such targets
(``categorical_accuracy``; ``binary_accuracy`` scores every label).

Keras's names mean what they mean in Keras: ``mean_absolute_error`` and
``mean_squared_error`` (the same as ``mae`` and ``mse``), ``binary_accuracy`` (every output
thresholded and compared with its target), ``categorical_accuracy`` (one-hot targets),
``sparse_categorical_accuracy`` (class labels), ``top_k_categorical_accuracy`` (the target's
score among the k highest, ties included; ``TopKCategoricalAccuracy(k)`` for another k than
5) and ``auc`` (binary ROC AUC over 200 thresholds, interpolated, as ``keras.metrics.AUC()``).

>>> import numpy as np
>>> accuracy(np.array([[0.2, 0.8], [0.9, 0.1]]), np.array([1, 1]))
0.5
"""

from __future__ import annotations

import functools
import numbers

import numpy as np

from gpubp import _checks, _special


def _classes(scores: np.ndarray, threshold: float) -> np.ndarray:
    """Predicted class: argmax over classes, or score > threshold for a single output."""
    if scores.shape[1] == 1:
        return (scores[:, 0] > threshold).astype(np.int64)
    return scores.argmax(axis=1)


def _class_labels(scores: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``y`` as class labels, one per row of ``scores``: (N,) or (N, 1), whole numbers (a float
    such as 2.7 names no class, and truncating it would score it as class 2). For a single
    output, targets in [0, 1] (soft or smoothed labels, as binary_cross_entropy takes) are class
    1 from 0.5 on, where the scores' class 1 begins too."""
    if y.ndim not in (1, 2) or y.shape[1:] not in ((), (1,)) or len(y) != len(scores):
        raise ValueError(f"y: expected class labels of shape ({len(scores)},) or ({len(scores)}, 1), got {y.shape}")
    labels = y.reshape(-1)
    if labels.dtype.kind == "f" and _binary(scores) and np.all((labels >= 0) & (labels <= 1)):
        return (labels >= 0.5).astype(np.int64)
    if labels.dtype.kind not in "iub":
        whole = np.isfinite(labels) & (labels == np.round(labels))
        if not np.all(whole):
            row = int(np.argmin(whole))
            raise ValueError(f"y: expected class labels (whole numbers), got {labels[row]} in row {row}")
    return labels.astype(np.int64)


# How far a row of probabilities may sum from 1: float32 or float16 rounding leaves a softmax's
# (a teacher's) rows a little off 1, and a row a tenth of a percent off is still no other kind.
_PROBABILITY_SUM_TOLERANCE = 1e-3


def _rows(y: np.ndarray) -> str:
    """What rows of targets (N, C), one per output, are: "one-hot" (0/1, a single 1 in every row),
    "probabilities" (values in [0, 1] summing to 1 within ``_PROBABILITY_SUM_TOLERANCE``: soft or
    smoothed labels, whose argmax is the class) or "multi-hot" (any other rows of values in [0, 1]:
    0/1 labels with other than exactly one 1, or soft ones such as binary cross-entropy's smoothed
    or distilled targets, each label on from 0.5). A float row that sums to 0.9999999 is a
    probability row, not labels. Values outside [0, 1] name no class: ValueError."""
    if np.all((y == 0) | (y == 1)):
        return "one-hot" if np.all(y.sum(axis=1) == 1) else "multi-hot"
    inside = np.all((y >= 0) & (y <= 1), axis=1)
    if not np.all(inside):
        row = int(np.argmin(inside))
        raise ValueError(f"y: expected targets in [0, 1] (one-hot, multi-hot or probability rows), got row {row} "
                         f"with values from {y[row].min()} to {y[row].max()}")
    sums = y.sum(axis=1, dtype=np.float64)
    return "probabilities" if np.all(np.abs(sums - 1) <= _PROBABILITY_SUM_TOLERANCE) else "multi-hot"


def _labels(scores: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Class labels from ``y``: labels (N,) or (N, 1), or rows of targets, one per output (their
    argmax: one-hot, probability rows, or the first label of a multi-hot row; see :func:`_rows`)."""
    if y.ndim == 2 and y.shape[1] > 1:
        if y.shape != scores.shape:
            raise ValueError(f"y: expected class labels, or one target per output of shape {scores.shape}, "
                             f"got {y.shape}")
        _rows(y)
        return y.argmax(axis=1)
    return _class_labels(scores, y)


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


def _multilabel(scores: np.ndarray, y: np.ndarray) -> bool:
    """Multi-hot targets: a column per output, rows neither one-hot nor probabilities (``_rows``)."""
    return y.ndim == 2 and y.shape[1] > 1 and y.shape == scores.shape and _rows(y) == "multi-hot"


def _precision_recall(scores, y, threshold):
    if _multilabel(scores, y):  # per label: output above the threshold against a target from 0.5 on
        pred, true = scores > threshold, y >= 0.5
        tp = np.sum(pred & true, axis=0, dtype=np.float64)
        fp = np.sum(pred & ~true, axis=0, dtype=np.float64)
        fn = np.sum(~pred & true, axis=0, dtype=np.float64)
        return _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    pred, true = _classes(scores, threshold), _labels(scores, y)
    classes, tp, fp, fn = _per_class(pred, true)
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    if _binary(scores):
        positive = classes == 1
        return precision[positive].sum(), recall[positive].sum()
    return precision, recall


def accuracy(scores: np.ndarray, y: np.ndarray, threshold: float = 0.0) -> float:
    return float(np.mean(_classes(scores, threshold) == _labels(scores, y)))


def precision(scores: np.ndarray, y: np.ndarray, threshold: float = 0.0) -> float:
    """Binary precision for one output; macro-averaged over classes (or multi-hot labels) otherwise."""
    return float(np.mean(_precision_recall(scores, y, threshold)[0]))


def recall(scores: np.ndarray, y: np.ndarray, threshold: float = 0.0) -> float:
    """Binary recall for one output; macro-averaged over classes (or multi-hot labels) otherwise."""
    return float(np.mean(_precision_recall(scores, y, threshold)[1]))


def f1(scores: np.ndarray, y: np.ndarray, threshold: float = 0.0) -> float:
    """Binary F1 for one output; macro-averaged F1 over classes (or multi-hot labels) otherwise
    (scikit-learn's 'macro')."""
    p, r = _precision_recall(scores, y, threshold)
    p, r = np.atleast_1d(p), np.atleast_1d(r)
    return float(np.mean(_ratio(2 * p * r, p + r)))


def _targets_like(scores: np.ndarray, y: np.ndarray, name: str) -> np.ndarray:
    """``y`` of the scores' shape, or (N,) for a single output; of as many elements in another
    shape, a reshape would pair outputs with other rows' targets."""
    if y.shape != scores.shape and not (scores.shape[1] == 1 and y.shape == scores.shape[:1]):
        raise ValueError(f"{name}: expected one target per output, y of shape {scores.shape}, got {y.shape}")
    return y.reshape(scores.shape)


def mean_squared_error(scores: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean((scores - _targets_like(scores, y, "mean_squared_error")) ** 2))


def mean_absolute_error(scores: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.abs(scores - _targets_like(scores, y, "mean_absolute_error"))))


def _one_hot_labels(scores: np.ndarray, y: np.ndarray, name: str) -> np.ndarray:
    if y.ndim != 2 or y.shape != scores.shape:
        raise ValueError(f"{name}: expected one-hot targets of shape {scores.shape}, got {y.shape} "
                         "(for class labels use sparse_categorical_accuracy)")
    return y.argmax(axis=1)


def _binary_targets(scores: np.ndarray, y: np.ndarray, name: str) -> np.ndarray:
    """``y`` as :func:`_targets_like` gives it, each target read as ``_class_labels`` reads a
    single output's: class 1 (True) from 0.5 on, so smoothed targets (0.05, 0.95) are the labels
    they round to. A target outside [0, 1] (or NaN) is no binary class: ValueError naming it."""
    targets = _targets_like(scores, y, name)
    outside = ~((targets >= 0) & (targets <= 1))
    if np.any(outside):
        row, column = (int(i) for i in np.argwhere(outside)[0])
        raise ValueError(f"{name}: expected binary targets y in [0, 1] (class 1 from 0.5 on), "
                         f"got {targets[row, column]} in row {row}")
    return targets >= 0.5


def binary_accuracy(scores: np.ndarray, y: np.ndarray, threshold: float = 0.5) -> float:
    """The fraction of outputs above ``threshold`` exactly when their target is 1 (Keras's), a
    target in [0, 1] being 1 from 0.5 on (Keras compares it exactly, so that a smoothed 0.95
    never matches; here it scores as the 1 it stands for, as in ``accuracy``)."""
    return float(np.mean(_binary_targets(scores, y, "binary_accuracy") == (scores > threshold)))


def categorical_accuracy(scores: np.ndarray, y: np.ndarray) -> float:
    """The fraction of rows whose highest score is the one-hot target's class (Keras's)."""
    return float(np.mean(scores.argmax(axis=1) == _one_hot_labels(scores, y, "categorical_accuracy")))


def sparse_categorical_accuracy(scores: np.ndarray, y: np.ndarray) -> float:
    """The fraction of rows whose highest score is the class label (Keras's)."""
    return float(np.mean(scores.argmax(axis=1) == _class_labels(scores, y)))


def _positive_k(k) -> int:
    """``k`` checked: a positive integer (NumPy's included; a bool is no count), as an int."""
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k: expected a positive int, got {k!r}")
    return int(k)


def top_k_categorical_accuracy(scores: np.ndarray, y: np.ndarray, k: int = 5) -> float:
    """The fraction of rows whose one-hot target's score is among the ``k`` highest, a score tied
    with the k-th counting as in (Keras's, through ``in_top_k``). ``k``: a positive int."""
    k = _positive_k(k)
    labels = _one_hot_labels(scores, y, "top_k_categorical_accuracy")
    if k >= scores.shape[1]:
        return 1.0
    kth = np.partition(scores, -k, axis=1)[:, -k]
    return float(np.mean(scores[np.arange(len(labels)), labels] >= kth))


class TopKCategoricalAccuracy:
    """``top_k_categorical_accuracy`` with another ``k``, as ``keras.metrics.TopKCategoricalAccuracy(k)``;
    logged under ``name``."""

    def __init__(self, k: int = 5, name: str = "top_k_categorical_accuracy") -> None:
        self.k, self.name = _positive_k(k), name

    def __call__(self, scores: np.ndarray, y: np.ndarray) -> float:
        return top_k_categorical_accuracy(scores, y, self.k)


AUC_THRESHOLDS = 200
_AUC_EPSILON = 1e-7  # Keras's backend.epsilon(): the end thresholds sit just outside [0, 1]


def auc(scores: np.ndarray, y: np.ndarray, from_logits: bool = False, num_thresholds: int = AUC_THRESHOLDS) -> float:
    """Binary ROC AUC as ``keras.metrics.AUC()`` computes it: every output against its 0/1 target,
    true and false positive rates at ``num_thresholds`` evenly spaced thresholds (a score counts
    as positive above a threshold), and the curve's area by the trapezoid rule. ``from_logits``
    applies the sigmoid first. ``num_thresholds``: an int > 1, as Keras requires (the two end
    thresholds are always there).

    Targets are in [0, 1], a soft one positive from 0.5 on, as every metric here reads it: the
    AUC of smoothed targets (0.05, 0.95) is that of the labels they round to. (Keras counts a
    soft target t as t of a positive and 1 - t of a negative instead, which gives another
    value for such targets and the same for 0/1 ones.)"""
    if isinstance(num_thresholds, bool) or not isinstance(num_thresholds, numbers.Integral) or num_thresholds <= 1:
        raise ValueError(f"num_thresholds: expected an int > 1, got {num_thresholds!r}")
    from_logits = _checks.boolean(from_logits, "from_logits")
    targets = _binary_targets(scores, y, "auc").reshape(-1)
    probabilities = np.clip(_special.expit(scores) if from_logits else scores, 0.0, 1.0).reshape(-1)
    inner = [(i + 1) / (num_thresholds - 1) for i in range(num_thresholds - 2)]
    thresholds = np.array([-_AUC_EPSILON, *inner, 1.0 + _AUC_EPSILON])
    positives, negatives = np.sort(probabilities[targets]), np.sort(probabilities[~targets])
    # How many of each lie above each threshold, from the sorted scores.
    tp = len(positives) - np.searchsorted(positives, thresholds, side="right")
    fp = len(negatives) - np.searchsorted(negatives, thresholds, side="right")
    recall = _ratio(tp.astype(np.float64), np.full(len(thresholds), float(len(positives))))
    fp_rate = _ratio(fp.astype(np.float64), np.full(len(thresholds), float(len(negatives))))
    heights = (recall[:-1] + recall[1:]) / 2
    return float(np.sum((fp_rate[:-1] - fp_rate[1:]) * heights))


METRICS = {"accuracy": accuracy, "precision": precision, "recall": recall, "f1": f1,
           "mse": mean_squared_error, "mae": mean_absolute_error,
           "mean_squared_error": mean_squared_error, "mean_absolute_error": mean_absolute_error,
           "binary_accuracy": binary_accuracy, "categorical_accuracy": categorical_accuracy,
           "sparse_categorical_accuracy": sparse_categorical_accuracy,
           "top_k_categorical_accuracy": top_k_categorical_accuracy, "auc": auc}
THRESHOLDED = (accuracy, precision, recall, f1, binary_accuracy)


def get(metric, probabilities: bool = False):
    """``(name, fn)`` for a metric name or a callable ``(scores, y) -> float`` (named by its
    ``name`` or ``__name__``). ``probabilities``: the scores are a sigmoid's or softmax's (a
    single output's class 1 begins at 0.5), not logits (at 0; ``auc`` applies the sigmoid).
    One of this module's metric functions is taken as its name (as Keras takes
    ``keras.metrics.binary_accuracy``), so it scores with the same threshold. A class
    (``TopKCategoricalAccuracy``) is built with its defaults, as Keras 3 builds one."""
    metric = _checks.built(metric, "metrics")
    if callable(metric):
        name = getattr(metric, "__name__", None)
        if METRICS.get(name) is not metric:
            return getattr(metric, "name", None) or name or "metric", metric
        metric = name
    if not isinstance(metric, str):
        raise TypeError(f"metrics: expected a metric name or a callable, got {type(metric).__name__} {metric!r}")
    if metric not in METRICS:
        raise ValueError(f"metrics: unknown metric {metric!r}; expected one of {sorted(METRICS)} or a callable")
    fn = METRICS[metric]
    if fn in THRESHOLDED:
        return metric, functools.partial(fn, threshold=0.5 if probabilities else 0.0)
    if fn is auc:
        return metric, functools.partial(fn, from_logits=not probabilities)
    return metric, fn
