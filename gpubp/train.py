"""The training loop: fit / evaluate / predict, callbacks, metrics and the progress bar.

``fit`` checks the whole dataset once before the first step, then for each batch:
forward, fused loss, backward, optimizer step. A non-finite input batch or loss
stops training with an error naming the epoch and batch, before that batch's update
touches the weights.

>>> import gpubp as gb
>>> gb.seed(0)
>>> x, y = gb.data.xor()
>>> model = gb.Sequential([gb.Dense(2, 8, "tanh"), gb.Dense(8, 1)], device="cpu")
>>> hist = model.fit(x, y, loss="binary_cross_entropy", optimizer=gb.optim.Adam(model.parameters(), lr=0.05),
...                  epochs=200, batch_size=4, verbose=0)
>>> model.evaluate(x, y, metrics=["accuracy"])["accuracy"]
1.0
"""

from __future__ import annotations

import math
import sys
import time

import numpy as np

from gpubp import _checks, _random, losses, optim


class History:
    """Per-epoch metrics, as Keras's ``History``: ``history["loss"]``, ``history["val_loss"]``, ..."""

    def __init__(self) -> None:
        self.history: dict[str, list[float]] = {}
        self.epoch: list[int] = []
        self.epoch_times: list[float] = []

    def append(self, epoch: int, logs: dict, seconds: float) -> None:
        self.epoch.append(epoch)
        self.epoch_times.append(seconds)
        for key, value in logs.items():
            self.history.setdefault(key, []).append(value)

    def __getitem__(self, key: str) -> list[float]:
        return self.history[key]

    def __repr__(self) -> str:
        last = {k: round(v[-1], 5) for k, v in self.history.items()}
        return f"History({len(self.epoch)} epochs, last={last})"


class Callback:
    """Hooks called by ``fit``; set ``model.stop_training = True`` to stop after this epoch."""

    def on_train_begin(self, model) -> None: ...

    def on_epoch_begin(self, model, epoch: int) -> None: ...

    def on_epoch_end(self, model, epoch: int, logs: dict) -> None: ...

    def on_train_end(self, model) -> None: ...


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved by more than ``min_delta`` for ``patience`` epochs.

    ``mode`` "auto" minimises losses and errors and maximises anything else (accuracy, f1).
    ``restore_best_weights`` puts back the weights of the best epoch when training stops.
    """

    def __init__(self, monitor: str = "val_loss", patience: int = 0, min_delta: float = 0.0, mode: str = "auto",
                 restore_best_weights: bool = False) -> None:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ValueError(f"patience: expected an int >= 0, got {patience!r}")
        self.min_delta = _checks.non_negative(min_delta, "min_delta")
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"mode: expected 'auto', 'min' or 'max', got {mode!r}")
        if mode == "auto":
            mode = "min" if ("loss" in monitor or "error" in monitor or monitor.endswith(("mse", "mae"))) else "max"
        self.monitor, self.patience, self.mode = monitor, patience, mode
        self.restore_best_weights = restore_best_weights

    def on_train_begin(self, model) -> None:
        self.best = math.inf if self.mode == "min" else -math.inf
        self.best_epoch = -1
        self.best_weights = None
        self.wait = 0
        self.stopped_epoch = None

    def _improved(self, value: float) -> bool:
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def on_epoch_end(self, model, epoch: int, logs: dict) -> None:
        if self.monitor not in logs:
            raise KeyError(f"EarlyStopping: monitor {self.monitor!r} is not logged; logged: {sorted(logs)}")
        value = logs[self.monitor]
        if self._improved(value):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.restore_best_weights:
                self.best_weights = model.get_weights()
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = epoch
            model.stop_training = True

    def on_train_end(self, model) -> None:
        if self.stopped_epoch is not None and self.best_weights is not None:
            model.set_weights(self.best_weights)


# ----------------------------------------------------------------------------- metrics


def _classes(scores: np.ndarray) -> np.ndarray:
    """Predicted class: argmax over classes, or logit > 0 for a single output."""
    if scores.shape[1] == 1:
        return (scores[:, 0] > 0).astype(np.int64)
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


def _precision_recall(scores, y):
    pred, true = _classes(scores), _labels(y)
    classes, tp, fp, fn = _per_class(pred, true)
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    if _binary(scores):
        positive = classes == 1
        return precision[positive].sum(), recall[positive].sum()
    return precision, recall


def accuracy(scores: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(_classes(scores) == _labels(y)))


def precision(scores: np.ndarray, y: np.ndarray) -> float:
    """Binary precision for one output; macro-averaged over classes otherwise."""
    return float(np.mean(_precision_recall(scores, y)[0]))


def recall(scores: np.ndarray, y: np.ndarray) -> float:
    """Binary recall for one output; macro-averaged over classes otherwise."""
    return float(np.mean(_precision_recall(scores, y)[1]))


def f1(scores: np.ndarray, y: np.ndarray) -> float:
    """Binary F1 for one output; macro-averaged F1 over classes otherwise (scikit-learn's 'macro')."""
    p, r = _precision_recall(scores, y)
    p, r = np.atleast_1d(p), np.atleast_1d(r)
    return float(np.mean(_ratio(2 * p * r, p + r)))


def mean_squared_error(scores: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean((scores - y.reshape(scores.shape)) ** 2))


def mean_absolute_error(scores: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.abs(scores - y.reshape(scores.shape))))


METRICS = {"accuracy": accuracy, "precision": precision, "recall": recall, "f1": f1,
           "mse": mean_squared_error, "mae": mean_absolute_error}


def _metric(name):
    if callable(name):
        return getattr(name, "__name__", "metric"), name
    if name not in METRICS:
        raise ValueError(f"metrics: unknown metric {name!r}; expected one of {sorted(METRICS)} or a callable")
    return name, METRICS[name]


# ----------------------------------------------------------------------------- data checks


def _check_dataset(model, x, y, loss_fn, name: str = "x"):
    """Host copies of (x, y), checked against the model and the loss before any step runs."""
    yname = "y" if name == "x" else f"{name}_y"
    x = _checks.to_numpy(x, name)
    y = _checks.to_numpy(y, yname)
    _checks.batch_shape(x.shape, model.in_features, name)
    _checks.float_dtype(x.dtype, name)
    if len(y) != len(x):
        raise ValueError(f"{yname}: expected {len(x)} targets to match {name}, got {len(y)}")
    width = model.out_features
    if loss_fn is losses.cross_entropy:
        if y.ndim != 1 or y.dtype.kind not in "iu":
            raise TypeError(f"{yname}: cross_entropy expects 1-D integer class labels, got dtype {y.dtype}, shape {y.shape}")
        if y.min() < 0 or y.max() >= width:
            raise ValueError(f"{yname}: expected class labels in [0, {width}), got values from {y.min()} to {y.max()}")
    elif loss_fn in (losses.mse, losses.binary_cross_entropy):
        if y.ndim == 1 and width == 1:
            y = y.reshape(-1, 1)
        if y.shape[1:] != (width,):
            raise ValueError(f"{yname}: expected shape ({len(x)}, {width}), got {y.shape}")
        if y.dtype.kind not in "fiub":
            raise TypeError(f"{yname}: expected numeric targets, got dtype {y.dtype}")
        if loss_fn is losses.binary_cross_entropy and (y.min() < 0 or y.max() > 1):
            raise ValueError(f"{yname}: binary_cross_entropy expects targets in [0, 1], got {y.min()} to {y.max()}")
        y = y.astype(model.dtype, copy=False)
    return x, y


def _batches(n: int, batch_size: int, order: np.ndarray | None):
    for start in range(0, n, batch_size):
        yield slice(start, start + batch_size) if order is None else order[start:start + batch_size]


# ----------------------------------------------------------------------------- fit / evaluate / predict


def fit(model, x, y, loss="cross_entropy", optimizer="adam", epochs: int = 1, batch_size: int = 32,
        validation_split: float = 0.0, validation_data=None, shuffle: bool = True, callbacks=None,
        verbose: int = 1, metrics=None, clip_grad_norm: float | None = None) -> History:
    """Train ``model`` on (x, y) and return a :class:`History` of per-epoch metrics.

    x: (N, in_features) floats. y: (N,) int labels for ``cross_entropy``; (N, out) targets for
    ``mse`` / ``binary_cross_entropy``. ``validation_split`` holds out the last fraction (before
    shuffling), as Keras does; ``validation_data=(x_val, y_val)`` takes precedence.
    ``metrics`` (e.g. ``["accuracy"]``) are computed on the validation data each epoch.
    ``verbose``: 0 silent, 1 a progress bar per epoch, 2 one line per epoch.
    """
    loss_fn = losses.get(loss)
    epochs = _checks.positive_int(epochs, "epochs")
    batch_size = _checks.positive_int(batch_size, "batch_size")
    if verbose not in (0, 1, 2):
        raise ValueError(f"verbose: expected 0, 1 or 2, got {verbose!r}")
    if isinstance(validation_split, bool) or not 0 <= validation_split < 1:
        raise ValueError(f"validation_split: expected a float in [0, 1), got {validation_split!r}")
    for m in metrics or []:
        _metric(m)
    opt = optim.get(optimizer, model.parameters())
    x, y = _check_dataset(model, x, y, loss_fn)
    if validation_data is not None:
        if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
            raise TypeError("validation_data: expected a pair (x_val, y_val)")
        x_val, y_val = _check_dataset(model, *validation_data, loss_fn, name="validation_data")
    elif validation_split:
        n_val = int(round(len(x) * validation_split))
        if not 0 < n_val < len(x):
            raise ValueError(f"validation_split: {validation_split} of {len(x)} samples leaves no training or no validation data")
        x, x_val, y, y_val = x[:-n_val], x[-n_val:], y[:-n_val], y[-n_val:]
    else:
        x_val = y_val = None
    callbacks = list(callbacks or [])
    for i, cb in enumerate(callbacks):
        if not isinstance(cb, Callback):
            raise TypeError(f"callbacks[{i}]: expected a gpubp Callback, got {type(cb).__name__}")

    # One pass over x per fit; only data with a NaN or inf pays the per-batch check that names the batch.
    x_all_finite = bool(np.isfinite(x).all())
    model.stop_training = False
    model.loss = loss_fn
    history = History()
    for cb in callbacks:
        cb.on_train_begin(model)
    n_batches = math.ceil(len(x) / batch_size)
    for epoch in range(epochs):
        for cb in callbacks:
            cb.on_epoch_begin(model, epoch)
        start = time.perf_counter()
        order = _random.generator().permutation(len(x)) if shuffle else None
        bar = _progress(n_batches, epoch, epochs, verbose)
        total_loss = 0.0
        for batch, index in enumerate(_batches(len(x), batch_size, order)):
            xb, yb = x[index], y[index]
            if not x_all_finite and not np.all(np.isfinite(xb)):
                raise ValueError(f"x: non-finite values (NaN or inf) in epoch {epoch + 1}, batch {batch + 1}; "
                                 "the weights were not updated by this batch")
            out = model.forward(xb)
            value, dout = loss_fn(out, yb, backend=model.backend)
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"fit: the loss became {value} in epoch {epoch + 1}, batch {batch + 1}; training stopped before "
                    "this batch's update, so the weights are those after the previous batch "
                    "(try a lower learning rate or clip_grad_norm)")
            model.backward(dout)
            if clip_grad_norm is not None:
                optim.clip_grad_norm(model.parameters(), clip_grad_norm)
            opt.step()
            total_loss += value * len(xb)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}", refresh=False)
        logs = {"loss": total_loss / len(x)}
        if x_val is not None:
            val = evaluate(model, x_val, y_val, loss=loss_fn, metrics=metrics)
            logs.update({f"val_{name}": value for name, value in val.items()})
        model.backend.synchronize()
        seconds = time.perf_counter() - start
        history.append(epoch, logs, seconds)
        if bar is not None:
            bar.set_postfix({k: f"{v:.4f}" for k, v in logs.items()})
            bar.close()
        elif verbose == 2:
            print(f"epoch {epoch + 1}/{epochs} - {seconds:.2f}s - "
                  + " - ".join(f"{k}: {v:.4f}" for k, v in logs.items()), file=sys.stderr)
        for cb in callbacks:
            cb.on_epoch_end(model, epoch, logs)
        if model.stop_training:
            break
    for cb in callbacks:
        cb.on_train_end(model)
    return history


def _progress(total: int, epoch: int, epochs: int, verbose: int):
    if verbose != 1:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", leave=True, dynamic_ncols=True)


def predict(model, x, batch_size: int = 1024) -> np.ndarray:
    """Model outputs for ``x`` as a NumPy array (N, out_features), computed in batches."""
    batch_size = _checks.positive_int(batch_size, "batch_size")
    if _checks.array_kind(x) == "other":
        x = np.asarray(x)
    _checks.batch_shape(x.shape, model.in_features, "x")
    outputs = [model.backend.to_host(model.forward(x[i:i + batch_size], training=False))
               for i in range(0, x.shape[0], batch_size)]
    return outputs[0] if len(outputs) == 1 else np.concatenate(outputs)


def evaluate(model, x, y, loss=None, metrics=("accuracy",), batch_size: int = 1024) -> dict:
    """``{"loss": ..., metric: ...}`` on (x, y). The loss is the one given, else the last fit's.

    Metrics: "accuracy", "f1", "precision", "recall" (macro over classes; binary for one
    output), "mse", "mae", or callables ``(scores, y) -> float``.
    """
    loss_fn = losses.get(loss) if loss is not None else getattr(model, "loss", None)
    metric_fns = [_metric(m) for m in (metrics or [])]
    x, y = _check_dataset(model, x, y, loss_fn)
    scores = predict(model, x, batch_size=batch_size)
    result = {}
    if loss_fn is not None:
        result["loss"] = loss_fn(scores, y)[0]
    for name, fn in metric_fns:
        result[name] = fn(scores, y)
    return result
