"""Keras-style callbacks: hooks ``fit`` calls around epochs and batches.

``Callback`` is the base; ``EarlyStopping`` and ``ModelCheckpoint`` stop and save. ``History``
(what ``fit`` returns) is re-exported here, as in ``keras.callbacks``.

>>> import gpubp as gb
>>> from gpubp.callbacks import EarlyStopping
>>> EarlyStopping(monitor="val_loss", patience=3).mode
'min'
"""

from __future__ import annotations

import math

from gpubp import _checks, io
from gpubp.checkpoint import save_checkpoint
from gpubp.history import History

__all__ = ["Callback", "EarlyStopping", "History", "ModelCheckpoint", "monitor_mode"]


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


class ModelCheckpoint(Callback):
    """Write a checkpoint at the end of every ``every``-th epoch of ``fit``.

    ``path`` ends in .safetensors or .npz and may hold ``{epoch}`` or a logged value
    (``"run-{epoch:03d}-{val_loss:.3f}.safetensors"``) to keep one file per save.
    ``monitor`` names a logged value ("val_loss", "val_accuracy", ...) whose best is kept
    in ``self.best``; ``save_best_only`` writes only when it improves. ``mode`` "auto"
    minimises losses and errors and maximises anything else. A resumed ``fit`` starts from
    the best value in the History it continues. Under ``fit(distributed=True)`` only rank 0 writes.
    """

    main_process_only = True

    def __init__(self, path, monitor: str | None = None, mode: str = "auto", save_best_only: bool = False,
                 every: int = 1) -> None:
        io._suffix(path)
        self.path = path
        self.every = _checks.positive_int(every, "every")
        if monitor is not None and not isinstance(monitor, str):
            raise TypeError(f"monitor: expected the name of a logged value or None, got {type(monitor).__name__}")
        if save_best_only and monitor is None:
            raise ValueError("save_best_only: needs a monitor, e.g. ModelCheckpoint(path, monitor='val_loss', "
                             "save_best_only=True)")
        self.mode = monitor_mode(monitor or "loss", mode)
        self.monitor, self.save_best_only = monitor, bool(save_best_only)
        self.best = None
        self.last_path = None

    def on_train_begin(self, model) -> None:
        self.best = math.inf if self.mode == "min" else -math.inf
        earlier = getattr(model, "history", None)
        if self.monitor is not None and isinstance(earlier, History) and self.monitor in earlier.history:
            for value in earlier.history[self.monitor]:
                self._improves(value)

    def _improves(self, value: float) -> bool:
        better = value < self.best if self.mode == "min" else value > self.best
        if better:
            self.best = value
        return better

    def on_epoch_end(self, model, epoch: int, logs: dict) -> None:
        finished = epoch + 1
        if finished % self.every:
            return
        if self.monitor is not None:
            if self.monitor not in logs:
                raise KeyError(f"ModelCheckpoint: monitor {self.monitor!r} is not logged; logged: {sorted(logs)}")
            if not self._improves(logs[self.monitor]) and self.save_best_only:
                return
        path = str(self.path)
        if "{" in path:
            path = path.format(epoch=finished, **logs)
        save_checkpoint(path, model, model.optimizer, finished, model.history)
        self.last_path = path
