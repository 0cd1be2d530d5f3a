"""The training loop: fit / evaluate / predict, callbacks, metrics and the progress bar.

``fit`` checks the whole dataset once before the first step, then for each batch:
forward, fused loss, backward, optimizer step. Non-finite inputs are rejected before
the first step; a loss that turns non-finite stops training with an error naming the
epoch and batch, before that batch's update touches the weights.

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

import functools
import math
import sys
import time

import numpy as np

from gpubp import _checks, _random, activations, losses, optim


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

    def until(self, epoch: int) -> History:
        """A copy holding the epochs before ``epoch``: where a run resumed at ``epoch`` continues."""
        kept = History()
        for i, number in enumerate(self.epoch):
            if number < epoch:
                kept.append(number, {key: values[i] for key, values in self.history.items()}, self.epoch_times[i])
        return kept

    def __repr__(self) -> str:
        last = {k: round(v[-1], 5) for k, v in self.history.items()}
        return f"History({len(self.epoch)} epochs, last={last})"


class Callback:
    """Hooks called by ``fit``; set ``model.stop_training = True`` to stop after this epoch.

    A callback that writes files sets ``main_process_only = True``: under ``fit(distributed=True)``
    it then runs on rank 0 only.
    """

    main_process_only = False

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
        self.monitor, self.patience, self.mode = monitor, patience, monitor_mode(monitor, mode)
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


def monitor_mode(monitor: str, mode: str) -> str:
    """"min" or "max"; "auto" minimises losses and errors and maximises anything else."""
    if mode not in ("auto", "min", "max"):
        raise ValueError(f"mode: expected 'auto', 'min' or 'max', got {mode!r}")
    if mode == "auto":
        return "min" if ("loss" in monitor or "error" in monitor or monitor.endswith(("mse", "mae"))) else "max"
    return mode


# ----------------------------------------------------------------------------- metrics


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


# A single output is a logit (class 1 when > 0) unless the model's last layer is a sigmoid,
# whose probabilities evaluate passes with threshold 0.5.


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


def _metric(name, threshold: float = 0.0):
    if callable(name):
        return getattr(name, "__name__", "metric"), name
    if name not in METRICS:
        raise ValueError(f"metrics: unknown metric {name!r}; expected one of {sorted(METRICS)} or a callable")
    fn = METRICS[name]
    return name, functools.partial(fn, threshold=threshold) if fn in THRESHOLDED else fn


# ----------------------------------------------------------------------------- data checks


def _check_dataset(model, x, y, loss_fn, name: str = "x"):
    """Host copies of (x, y), checked against the model and the loss before any step runs."""
    yname = "y" if name == "x" else f"{name}_y"
    x = _checks.to_numpy(x, name)
    y = _checks.to_numpy(y, yname)
    _checks.batch_shape(x.shape, model.in_features, name)
    _checks.float_dtype(x.dtype, name)
    _all_finite(x, name)
    if len(y) != len(x):
        raise ValueError(f"{yname}: expected {len(x)} targets to match {name}, got {len(y)}")
    width = model.out_features
    if loss_fn is losses.cross_entropy:
        if y.ndim != 1 or y.dtype.kind not in "iu":
            raise TypeError(f"{yname}: cross_entropy expects 1-D integer class labels, got dtype {y.dtype}, shape {y.shape}")
        _check_class_labels(y, width, yname)
    elif loss_fn in (losses.mse, losses.binary_cross_entropy, losses.categorical_cross_entropy):
        if y.ndim == 1 and width == 1:
            y = y.reshape(-1, 1)
        if y.shape[1:] != (width,):
            raise ValueError(f"{yname}: expected shape ({len(x)}, {width}), got {y.shape}")
        if y.dtype.kind not in "fiub":
            raise TypeError(f"{yname}: expected numeric targets, got dtype {y.dtype}")
        if loss_fn is losses.binary_cross_entropy and (y.min() < 0 or y.max() > 1):
            raise ValueError(f"{yname}: binary_cross_entropy expects targets in [0, 1], got {y.min()} to {y.max()}")
        if loss_fn is losses.categorical_cross_entropy and not losses.is_one_hot(y):
            raise ValueError(f"{yname}: categorical_cross_entropy expects one-hot rows (a single 1 in each row); "
                             "for class indices use sparse_categorical_crossentropy")
        y = y.astype(model.dtype, copy=False)
        _all_finite(y, yname)
    elif loss_fn is None and width > 1 and y.ndim == 1 and y.dtype.kind in "iu" and len(y):
        # No loss to say what y is, but 1-D integers for several outputs can only be class labels.
        # (For a single output they may as well be regression targets.)
        _check_class_labels(y, width, yname)
    return x, y


def _check_class_labels(y: np.ndarray, classes: int, yname: str) -> None:
    if y.min() < 0 or y.max() >= classes:
        raise ValueError(f"{yname}: expected class labels in [0, {classes}), got values from {y.min()} to {y.max()}")


def _all_finite(a: np.ndarray, name: str) -> None:
    # fit checks the whole dataset up front, so a bad row late in an epoch cannot leave half-trained weights.
    if not np.all(np.isfinite(a)):
        row = int(np.argwhere(~np.isfinite(a))[0][0])
        raise ValueError(f"{name}: non-finite values (NaN or inf), first in row {row}")


def _batches(n: int, batch_size: int, order: np.ndarray | None):
    for start in range(0, n, batch_size):
        yield slice(start, start + batch_size) if order is None else order[start:start + batch_size]


# ----------------------------------------------------------------------------- compile / fit / evaluate / predict


def compile(model, optimizer="adam", loss="cross_entropy", metrics=None, learning_rate: float | None = None) -> None:
    """Keras's ``model.compile``: the optimizer, loss and metrics that ``fit`` and ``evaluate``
    use when they are not given. ``optimizer`` is a name (built here, once, and kept with its
    state across ``fit`` calls) or an Optimizer; ``learning_rate`` is then the rate of every
    ``fit`` call that does not pass its own.
    """
    loss_fn = losses.get(loss)
    for m in metrics or []:
        _metric(m)
    if learning_rate is not None:
        _checks.non_negative(learning_rate, "learning_rate")
    _optimizer(model, optimizer)
    model._compiled = {"optimizer": optimizer, "loss": loss_fn, "metrics": list(metrics or []),
                       "learning_rate": learning_rate}
    model.loss = loss_fn


def _optimizer(model, optimizer):
    """The optimizer for ``fit``: an instance as given; a name built once per model and reused
    (state included) while the model keeps the same parameters on the same backend."""
    if not isinstance(optimizer, str):
        return optim.get(optimizer, model.parameters())
    params = model.parameters()
    key = (optimizer.lower(), model.backend_name, tuple(id(p) for p in params))
    cached = getattr(model, "_named_optimizer", None)
    if cached is None or cached[0] != key:
        cached = model._named_optimizer = (key, optim.get(optimizer, params))
    return cached[1]


def fit(model, x, y, loss=None, optimizer=None, epochs: int = 1, batch_size: int = 32,
        validation_split: float = 0.0, validation_data=None, shuffle: bool = True, callbacks=None,
        verbose: int = 1, metrics=None, clip_grad_norm: float | None = None,
        learning_rate: float | None = None, initial_epoch: int = 0, distributed: bool = False,
        cuda_graph=False) -> History:
    """Train ``model`` on (x, y) and return a :class:`History` of per-epoch metrics.

    x: (N, in_features) floats. y: (N,) int labels for ``cross_entropy``; (N, out) targets for
    ``mse`` / ``binary_cross_entropy``; one-hot rows for ``categorical_cross_entropy``.
    ``loss``, ``optimizer`` and ``metrics`` default to those given to :func:`compile`, else
    ``"cross_entropy"`` and ``"adam"``. A sigmoid or softmax last layer with its matching loss
    (``binary_cross_entropy``, the cross-entropies) trains on the logits, fused and stable.
    ``learning_rate`` sets the rate of every param group for this call only.
    ``validation_split`` holds out the last fraction (before
    shuffling), as Keras does; ``validation_data=(x_val, y_val)`` takes precedence.
    ``metrics`` (e.g. ``["accuracy"]``) are computed on the validation data each epoch.
    ``verbose``: 0 silent, 1 a progress bar per epoch (one line per epoch when stderr is not a
    terminal), 2 one line per epoch.
    ``initial_epoch`` resumes a run (Keras's meaning): training runs epochs ``initial_epoch``
    to ``epochs - 1``, and the History continues ``model.history`` (which
    :func:`gpubp.load_checkpoint` restores) up to that epoch. ``model.optimizer`` and
    ``model.history`` are the ones in use, for callbacks such as :class:`gpubp.ModelCheckpoint`.
    ``distributed=True`` trains data-parallel over torch.distributed, one process per device
    launched by torchrun; ``batch_size`` is then the global batch (see :mod:`gpubp.distributed`).
    ``cuda_graph``: True captures each batch's step in a CUDA graph and replays it (the cupy
    backend; a ValueError says why not elsewhere), "auto" where it can, False (the default)
    never; see :class:`gpubp.step.TrainStep`. It changes no result: replayed steps compute
    what the eager ones do.
    """
    compiled = getattr(model, "_compiled", {})
    loss_fn = losses.get(loss) if loss is not None else compiled.get("loss", losses.cross_entropy)
    metrics = compiled.get("metrics") if metrics is None else metrics
    if learning_rate is None:
        learning_rate = compiled.get("learning_rate")
    epochs = _checks.positive_int(epochs, "epochs")
    if isinstance(initial_epoch, bool) or not isinstance(initial_epoch, (int, np.integer)):
        raise TypeError(f"initial_epoch: expected an int, got {type(initial_epoch).__name__}")
    if not 0 <= initial_epoch < epochs:
        raise ValueError(f"initial_epoch: expected an int in [0, epochs={epochs}), got {initial_epoch!r} "
                         "(epochs counts from the start of the run, as in Keras)")
    batch_size = _checks.positive_int(batch_size, "batch_size")
    if verbose not in (0, 1, 2):
        raise ValueError(f"verbose: expected 0, 1 or 2, got {verbose!r}")
    if isinstance(validation_split, bool) or not 0 <= validation_split < 1:
        raise ValueError(f"validation_split: expected a float in [0, 1), got {validation_split!r}")
    for m in metrics or []:
        _metric(m)
    if learning_rate is not None:
        learning_rate = _checks.non_negative(learning_rate, "learning_rate")
    opt = _optimizer(model, optimizer if optimizer is not None else compiled.get("optimizer", "adam"))
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
    if verbose == 1 and not _is_terminal(sys.stderr):
        verbose = 2
    if distributed and cuda_graph is not False:
        raise ValueError("cuda_graph: a distributed step all-reduces its gradients through torch.distributed, "
                         "which a CUDA graph of gpubp's kernels does not capture; pass cuda_graph=False")
    from gpubp.step import TrainStep

    step = TrainStep(model, loss_fn, opt, cuda_graph=cuda_graph, clip_grad_norm=clip_grad_norm)
    parallel = None
    if distributed:
        from gpubp.distributed import DataParallel

        parallel = DataParallel(model, batch_size, len(x), None if x_val is None else len(x_val))
        if parallel.rank != 0:
            verbose = 0
            callbacks = [cb for cb in callbacks if not cb.main_process_only]
    rates = [group["lr"] for group in opt.param_groups]
    if learning_rate is not None:
        for group in opt.param_groups:
            group["lr"] = learning_rate
    try:
        return _train(model, x, y, x_val, y_val, step, epochs, batch_size, shuffle, callbacks, verbose,
                      metrics or [], initial_epoch, parallel)
    finally:
        for group, rate in zip(opt.param_groups, rates):
            group["lr"] = rate


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _train(model, x, y, x_val, y_val, step, epochs, batch_size, shuffle, callbacks, verbose, metrics,
           initial_epoch, parallel) -> History:
    """fit's loop, on checked data: one TrainStep per batch (or the data-parallel one); callbacks per epoch."""
    loss_fn, opt = step.loss_fn, step.optimizer
    logits = losses.fuses(loss_fn, model.layers[-1].activation)
    model.stop_training = False
    model.loss = loss_fn
    model.optimizer = opt
    earlier = getattr(model, "history", None)
    history = earlier.until(initial_epoch) if initial_epoch and isinstance(earlier, History) else History()
    model.history = history
    for cb in callbacks:
        cb.on_train_begin(model)
    n_batches = math.ceil(len(x) / batch_size)
    for epoch in range(initial_epoch, epochs):
        for cb in callbacks:
            cb.on_epoch_begin(model, epoch)
        start = time.perf_counter()
        order = _random.generator().permutation(len(x)) if shuffle else None
        bar = _progress(n_batches, epoch, epochs, verbose)
        total_loss = 0.0
        for batch, index in enumerate(_batches(len(x), batch_size, order)):
            xb, yb = x[index], y[index]
            if parallel is None:
                value = step.run(xb, yb)
            else:
                value = parallel.forward_backward(loss_fn, xb, yb, logits)
                step.update_if_finite(value)
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"fit: the loss became {value} in epoch {epoch + 1}, batch {batch + 1}; training stopped before "
                    "this batch's update, so the weights are those after the previous batch "
                    "(try a lower learning rate or clip_grad_norm)")
            total_loss += value * len(xb)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}", refresh=False)
        logs = {"loss": total_loss / len(x)}
        if x_val is not None:
            if parallel is None:
                val = evaluate(model, x_val, y_val, loss=loss_fn, metrics=metrics)
            else:
                val = parallel.evaluate(x_val, y_val, loss_fn, metrics)
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


def _forward_backward(model, loss_fn, xb, yb, logits: bool) -> float:
    """Forward and loss of one batch, then backward when the loss is finite; returns the loss.
    ``logits``: the last layer's activation is fused into the loss (``losses.fuses``)."""
    out = model.forward(xb, logits=logits)
    value, dout = loss_fn(out, yb, backend=model.backend)
    if math.isfinite(value):
        model.backward(dout)
    return value


def _progress(total: int, epoch: int, epochs: int, verbose: int):
    if verbose != 1:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", leave=True, dynamic_ncols=True)


def predict(model, x, batch_size: int = 1024, logits: bool = False) -> np.ndarray:
    """Model outputs for ``x`` as a NumPy array (N, out_features), computed in batches:
    probabilities for a sigmoid or softmax last layer, or with ``logits=True`` its logits."""
    batch_size = _checks.positive_int(batch_size, "batch_size")
    if _checks.array_kind(x) == "other":
        x = np.asarray(x)
    _checks.batch_shape(x.shape, model.in_features, "x")
    outputs = [model.backend.to_host(model.forward(x[i:i + batch_size], training=False, logits=logits))
               for i in range(0, x.shape[0], batch_size)]
    return outputs[0] if len(outputs) == 1 else np.concatenate(outputs)


def evaluate(model, x, y, loss=None, metrics=None, batch_size: int = 1024) -> dict:
    """``{"loss": ..., metric: ...}`` on (x, y): loss and metrics of what ``predict`` returns.

    The loss is the one given, else the compiled or last fit's one; ``metrics`` default to
    the compiled ones, else ``["accuracy"]`` (``[]`` for none). A loss that fuses the last
    layer's activation is computed on the logits, which is the same value, stably.
    Metrics: "accuracy", "f1", "precision", "recall" (macro over classes; binary for one
    output: class 1 above probability 0.5 for a sigmoid last layer, above logit 0 otherwise),
    "mse", "mae", or callables ``(scores, y) -> float``. Class labels are range-checked
    whether or not there is a loss.
    """
    loss_fn = losses.get(loss) if loss is not None else getattr(model, "loss", None)
    if metrics is None:
        metrics = getattr(model, "_compiled", {}).get("metrics", ["accuracy"])
    head = model.layers[-1].activation
    metric_fns = [_metric(m, threshold=0.5 if head == "sigmoid" else 0.0) for m in metrics]
    x, y = _check_dataset(model, x, y, loss_fn)
    fused = loss_fn is not None and losses.fuses(loss_fn, head)
    outputs = predict(model, x, batch_size=batch_size, logits=fused)
    scores = outputs
    if fused:
        scores = np.empty_like(outputs)
        activations.forward(head, outputs, scores)
    result = {}
    if loss_fn is not None:
        result["loss"] = loss_fn(outputs, y)[0]
    for name, fn in metric_fns:
        result[name] = fn(scores, y)
    return result
