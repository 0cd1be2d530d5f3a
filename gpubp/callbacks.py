"""Keras-style callbacks: hooks ``fit`` calls around epochs and batches.

``Callback`` is the base. ``EarlyStopping`` stops, ``ModelCheckpoint`` saves checkpoints,
``LearningRateScheduler`` and ``ReduceLROnPlateau`` set the learning rates, ``CSVLogger``
writes one row per epoch, ``TerminateOnNaN`` stops at a non-finite loss and
``LambdaCallback`` runs functions. ``History`` (what ``fit`` returns) is re-exported here,
as in ``keras.callbacks``. Keras's names, arguments and meanings; each hook also gets the
model (``on_epoch_end(model, epoch, logs)``), where Keras sets ``self.model``. Flags
(``restore_best_weights``, ``save_best_only``, ``append``) are True or False, and ``verbose`` 0
or 1 (True, False, or an int >= 0 as Keras reads it): a string such as "False", which Python
reads as true, is a TypeError naming the argument.

>>> import gpubp as gb
>>> from gpubp.callbacks import EarlyStopping
>>> EarlyStopping(monitor="val_loss", patience=3).mode
'min'
"""

from __future__ import annotations

import csv
import inspect
import math
import numbers
import os
import string
import warnings

import numpy as np

from gpubp import _checks, distributed, io
from gpubp.checkpoint import check_savable, save_checkpoint
from gpubp.history import History

__all__ = ["CSVLogger", "Callback", "EarlyStopping", "History", "LambdaCallback", "LearningRateScheduler",
           "ModelCheckpoint", "ReduceLROnPlateau", "TerminateOnNaN", "monitor_mode"]


class Callback:
    """Hooks called by ``fit``; set ``model.stop_training = True`` to stop (after this batch, or
    after this epoch when set at its end).

    A callback that writes files sets ``main_process_only = True``: under ``fit(distributed=True)``
    it then runs on rank 0 only. One that changes the optimizer's learning rates sets
    ``sets_learning_rate = True``: ``fit`` then logs ``learning_rate`` each epoch (the largest
    of the param groups' rates in the epoch's last batch) and leaves the rates it set. One that
    saves the training state sets ``saves_state = True``: its ``on_epoch_end`` runs after every
    other callback's, wherever it stands in the list, so what it saves holds what those changed
    at the epoch's end (a rate ``ReduceLROnPlateau`` lowered, say). ``monitors()`` names the
    logged values the callback reads at each epoch's end; ``fit`` checks before its first step
    that it logs them.

    ``on_train_batch_end``'s ``logs["loss"]`` is the mean loss of the epoch's batches so far,
    weighted by their sizes as the epoch's loss is (Keras 3's running mean): after the last
    batch it is the epoch's ``loss``, and it is NaN or infinite from a batch whose loss is.
    ``on_batch_begin``/``on_batch_end`` are Keras's aliases of the batch hooks.
    """

    main_process_only = False
    sets_learning_rate = False
    saves_state = False

    def monitors(self) -> list[str]:
        """The logged values ``on_epoch_end`` reads (``fit`` checks them before training)."""
        return []

    def on_train_begin(self, model) -> None: ...

    def on_epoch_begin(self, model, epoch: int) -> None: ...

    def on_train_batch_begin(self, model, batch: int) -> None:
        self.on_batch_begin(model, batch)

    def on_train_batch_end(self, model, batch: int, logs: dict) -> None:
        self.on_batch_end(model, batch, logs)

    # Keras's older names for the two hooks above, whose defaults call them as Keras's do: a
    # callback written against them runs, and one that overrides the new names does not call them.
    def on_batch_begin(self, model, batch: int) -> None: ...

    def on_batch_end(self, model, batch: int, logs: dict) -> None: ...

    def on_epoch_end(self, model, epoch: int, logs: dict) -> None: ...

    def on_train_end(self, model) -> None: ...


def _verbosity(verbose) -> int:
    """A callback's ``verbose``: 0 (or False) quiet, 1 (or True) its messages; a larger int as 1, as
    Keras reads it. A string or None would be a mistake ("0" is true), so it is a TypeError."""
    if isinstance(verbose, (bool, np.bool_)):
        return int(verbose)
    if not isinstance(verbose, numbers.Integral):
        raise TypeError(f"verbose: expected 0 or 1 (or True or False), got {verbose!r}")
    if verbose < 0:
        raise ValueError(f"verbose: expected 0 or 1 (or True or False), got {verbose!r}")
    return int(verbose)


def _say(message: str) -> None:
    """Print ``message`` on the main process only: under ``fit(distributed=True)`` every rank runs
    the callbacks that do not write files, and each would print it."""
    if distributed.is_main_process():
        print(message)


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved by more than ``min_delta`` for ``patience`` epochs
    (Keras 3's callback and meanings).

    ``mode`` "auto" minimises losses and errors and maximises accuracies and scores (f1, auc);
    a name it cannot place (a metric of your own) needs "min" or "max" (:func:`monitor_mode`).
    ``baseline``: an epoch resets the count of epochs without improvement only if it improves
    on the best value so far and on ``baseline`` too; training stops at an epoch that does not
    improve on the best once that count reaches ``patience``. ``start_from_epoch``: epochs
    before this one (counted from the run's first) are not monitored, a warm-up that cannot stop
    training. ``restore_best_weights`` puts back, when training ends (stopped or not), the
    weights of the best monitored epoch (of the first monitored one where none improved).
    ``verbose=1`` prints when it stops and restores.

    A resumed ``fit`` (``initial_epoch``) rebuilds the best value and the count from the History
    it continues, so it stops where the uninterrupted run would. The weights of an earlier run's
    best epoch are not in a checkpoint, though: ``restore_best_weights`` can then restore only
    this run's epochs, and warns when the best so far came before it (save the best weights with
    ``ModelCheckpoint(save_best_only=True)``). Until an epoch of this run beats that best, it
    keeps the best of this run's own epochs as above (the first monitored one, or a later one
    that improves on it by more than ``min_delta``) and restores that; ``verbose=1`` names it.
    """

    def __init__(self, monitor: str = "val_loss", *, patience: int = 0, min_delta: float = 0.0, mode: str = "auto",
                 restore_best_weights: bool = False, baseline: float | None = None, start_from_epoch: int = 0,
                 verbose: int = 0) -> None:
        if not isinstance(monitor, str):
            raise TypeError(f"monitor: expected the name of a logged value, got {type(monitor).__name__}")
        patience = _checks.non_negative_int(patience, "patience")
        self.min_delta = _checks.non_negative(min_delta, "min_delta")
        self.monitor, self.patience, self.mode = monitor, patience, monitor_mode(monitor, mode)
        self.restore_best_weights = _checks.boolean(restore_best_weights, "restore_best_weights")
        if baseline is not None and (isinstance(baseline, bool) or not isinstance(baseline, numbers.Real)
                                     or not math.isfinite(baseline)):
            raise ValueError(f"baseline: expected a finite number or None, got {baseline!r}")
        self.baseline = None if baseline is None else float(baseline)
        self.start_from_epoch = _checks.non_negative_int(start_from_epoch, "start_from_epoch")
        self.verbose = _verbosity(verbose)

    def monitors(self) -> list[str]:
        return [self.monitor]

    def on_train_begin(self, model) -> None:
        self.best = math.inf if self.mode == "min" else -math.inf
        self.best_epoch = -1
        self.best_weights = None
        self.wait = 0
        self.stopped_epoch = None
        earlier = getattr(model, "history", None)
        if isinstance(earlier, History):
            for epoch, value in zip(earlier.epoch, earlier.history.get(self.monitor, [])):
                if epoch >= self.start_from_epoch and not math.isnan(value):  # NaN: not logged then
                    self._count(epoch, value)
        # The best of this run's epochs, restored while the best so far is an earlier run's (whose
        # weights are not here): the first monitored one, then any that improves on it.
        self._earlier_best = self.restore_best_weights and self.best_epoch >= 0
        self._run_best = math.inf if self.mode == "min" else -math.inf
        self._run_best_epoch, self._run_best_weights = -1, None
        if self._earlier_best:
            warnings.warn(f"EarlyStopping: the best {self.monitor} so far was at epoch {self.best_epoch + 1}, "
                          "before this resumed run; its weights are not in the checkpoint, so "
                          "restore_best_weights restores the best of this run's epochs",
                          stacklevel=_checks.user_stacklevel())

    def _count(self, epoch: int, value: float) -> bool:
        """Count a monitored epoch; True when it improves on the best so far."""
        self.wait += 1
        if not self._improves_on(value, self.best):
            return False
        self.best, self.best_epoch = value, epoch
        if self.baseline is None or self._improves_on(value, self.baseline):
            self.wait = 0
        return True

    def _improves_on(self, value: float, reference: float) -> bool:
        if self.mode == "min":
            return value < reference - self.min_delta
        return value > reference + self.min_delta

    def on_epoch_end(self, model, epoch: int, logs: dict) -> None:
        if self.monitor not in logs:
            raise KeyError(f"EarlyStopping: monitor {self.monitor!r} is not logged; logged: {sorted(logs)}")
        if epoch < self.start_from_epoch:
            return
        value = logs[self.monitor]
        if self.restore_best_weights and self.best_weights is None and not self._earlier_best:
            self.best_weights, self.best_epoch = model.get_weights(), epoch
        if self._count(epoch, value):
            if self.restore_best_weights:
                self.best_weights = model.get_weights()
                self._earlier_best, self._run_best_weights = False, None  # the best so far is this run's now
            return
        if self._earlier_best:
            improves = self._improves_on(value, self._run_best)
            if improves or self._run_best_weights is None:
                self._run_best_weights, self._run_best_epoch = model.get_weights(), epoch
            if improves:
                self._run_best = value
        if self.wait >= self.patience and epoch > 0:
            self.stopped_epoch = epoch
            model.stop_training = True

    def on_train_end(self, model) -> None:
        if self.stopped_epoch is not None and self.verbose:
            _say(f"Epoch {self.stopped_epoch + 1}: early stopping")
        if self._earlier_best and self._run_best_weights is not None:
            if self.verbose:
                _say(f"Restoring model weights from the end of the best epoch of this run: "
                     f"{self._run_best_epoch + 1} (the best {self.monitor}, at epoch {self.best_epoch + 1}, "
                     "came before it).")
            model.set_weights(self._run_best_weights)
        elif self.best_weights is not None:
            if self.verbose:
                _say(f"Restoring model weights from the end of the best epoch: {self.best_epoch + 1}.")
            model.set_weights(self.best_weights)


# What mode="auto" reads in a monitored name (without its "val_" prefix): a loss or an error
# falls, a score rises; a name it cannot place (a user's metric, "mape") is a ValueError, as in
# Keras 3, where guessing "max" would keep the worst epoch.
FALLING = ("loss", "error", "crossentropy", "deviance", "divergence", "hinge", "log_cosh")
FALLING_NAMES = {"mse", "mae", "rmse", "mape", "msle"}
RISING = ("accuracy",)
RISING_NAMES = {"precision", "recall", "f1", "auc", "r2"}


def monitor_mode(monitor: str, mode: str) -> str:
    """"min" or "max"; "auto" minimises losses and errors (``FALLING``, ``FALLING_NAMES``) and
    maximises accuracies and scores (``RISING``, ``RISING_NAMES``), and refuses another name."""
    if mode not in ("auto", "min", "max"):
        raise ValueError(f"mode: expected 'auto', 'min' or 'max', got {mode!r}")
    if mode != "auto":
        return mode
    name = monitor.removeprefix("val_")
    if name in FALLING_NAMES or any(part in name for part in FALLING):
        return "min"
    if name in RISING_NAMES or any(part in name for part in RISING):
        return "max"
    raise ValueError(f"mode: 'auto' cannot tell whether {monitor!r} improves as it rises or as it falls; "
                     "pass mode='min' or mode='max'")


def _format_fields(path: str) -> list[str]:
    """The names a ``str.format`` pattern fills in (``"run-{epoch:03d}-{val_loss:.3f}"``:
    epoch, val_loss), each checked to be a name, and the pattern checked to format an int
    epoch and float logged values (so a bad format spec fails here, not after an epoch)."""
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(path) if field is not None]
    except ValueError as error:
        raise ValueError(f"path: {error} in {path!r} (write a literal brace as {{{{ or }}}})") from None
    for field in fields:
        if not field.isidentifier():
            raise ValueError(f"path: {{{field}}} in {path!r} names no logged value; name one, as in "
                             "{epoch:03d} or {val_loss:.3f}")
    try:
        path.format(**{field: 1 if field == "epoch" else 0.5 for field in fields})
    except (ValueError, TypeError, KeyError, IndexError) as error:
        raise ValueError(f"path: {error} in {path!r}; the epoch is an int and logged values are floats, as in "
                         "{epoch:03d} or {val_loss:.3f}") from None
    return fields


class ModelCheckpoint(Callback):
    """Write a checkpoint at the end of every ``every``-th epoch of ``fit``.

    ``path`` ends in .safetensors or .npz and may hold ``{epoch}`` or a logged value
    (``"run-{epoch:03d}-{val_loss:.3f}.safetensors"``) to keep one file per save.
    ``monitor`` names a logged value ("val_loss", "val_accuracy", ...) whose best is kept
    in ``self.best``, across ``fit`` calls as in Keras; ``save_best_only`` writes only when it
    improves. ``mode`` "auto" minimises losses and errors and maximises anything else. A resumed
    ``fit`` (a new callback too) starts from
    the best value of the History's epochs this callback checks (every ``every``-th), so it
    saves where the uninterrupted run would. Under ``fit(distributed=True)`` only rank 0 writes.
    The file holds the state of the scheduler ``fit`` was given too (see :class:`gpubp.Checkpoint`).
    It is written after every other callback's ``on_epoch_end``, wherever this callback stands
    in the list, so a resumed run continues from the rates and state those set at that epoch's
    end. ``path`` is checked here to format an int epoch and float logged values, and ``fit``
    checks before its first step that it logs ``monitor`` and every value ``path`` names, and
    that a checkpoint can hold its model, optimizer and scheduler (:func:`gpubp.checkpoint.check_savable`:
    a subclass of a built-in optimizer, say, is refused before any weight changes).
    """

    main_process_only = True
    saves_state = True

    def __init__(self, path, monitor: str | None = None, *, mode: str = "auto", save_best_only: bool = False,
                 every: int = 1) -> None:
        io._suffix(path)
        self.path = path
        self.fields = _format_fields(os.fspath(path))
        self.every = _checks.positive_int(every, "every")
        if monitor is not None and not isinstance(monitor, str):
            raise TypeError(f"monitor: expected the name of a logged value or None, got {type(monitor).__name__}")
        save_best_only = _checks.boolean(save_best_only, "save_best_only")
        if save_best_only and monitor is None:
            raise ValueError("save_best_only: needs a monitor, e.g. ModelCheckpoint(path, monitor='val_loss', "
                             "save_best_only=True)")
        self.mode = monitor_mode(monitor or "loss", mode)
        self.monitor, self.save_best_only = monitor, save_best_only
        self.best = None
        self.last_path = None

    def monitors(self) -> list[str]:
        return ([self.monitor] if self.monitor is not None else []) + [name for name in self.fields if name != "epoch"]

    def on_train_begin(self, model) -> None:
        try:
            check_savable(model, model.optimizer, getattr(model, "scheduler", None))
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"ModelCheckpoint: {exc}") from None
        # Kept across fit calls, as Keras keeps it: a second fit with this callback (the backbone
        # unfrozen after the head trained, say) overwrites the best file only with a better one.
        if self.best is None:
            self.best = math.inf if self.mode == "min" else -math.inf
        earlier = getattr(model, "history", None)
        if self.monitor is not None and isinstance(earlier, History) and self.monitor in earlier.history:
            # Only the epochs a running callback checks (every ``every``-th), so a resumed run saves
            # where the uninterrupted one would.
            for epoch, value in zip(earlier.epoch, earlier.history[self.monitor]):
                if (epoch + 1) % self.every == 0:
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
        save_checkpoint(path, model, model.optimizer, finished, model.history, getattr(model, "scheduler", None))
        self.last_path = path


# ----------------------------------------------------------------------------- learning rates


def _rate(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: expected a finite learning rate >= 0, got {value!r}")
    return float(value)


def largest_rate(optimizer) -> float:
    """The largest of the param groups' rates: the rate of a Keras script (one group), or the head's
    under discriminative rates. ``fit`` logs it as ``learning_rate``."""
    return max(group["lr"] for group in optimizer.param_groups)


def _takes_two_arguments(fn) -> bool:
    """Whether ``fn`` can be called with two positional arguments (else it takes the epoch alone)."""
    try:
        inspect.signature(fn).bind(0, 0.0)
    except TypeError:
        return False
    except ValueError:  # no signature to read (some builtins): call it as documented
        return True
    return True


class LearningRateScheduler(Callback):
    """At the start of each epoch, set the rate to ``schedule(epoch, lr)`` (Keras's callback;
    a ``schedule(epoch)`` of one argument works too, as Keras still accepts it).

    ``schedule`` is called once per param group with that group's current rate, so a relative
    schedule (``lr * 0.9``) keeps discriminative rates' ratios and an absolute one sets every
    group. ``verbose=1`` prints each new rate.
    """

    sets_learning_rate = True

    def __init__(self, schedule, verbose: int = 0) -> None:
        if not callable(schedule):
            raise TypeError(f"schedule: expected a function (epoch, lr) -> lr, got {type(schedule).__name__}")
        self.schedule, self.verbose = schedule, _verbosity(verbose)
        self._takes_rate = _takes_two_arguments(schedule)

    def on_epoch_begin(self, model, epoch: int) -> None:
        groups = model.optimizer.param_groups
        rates = [_rate(self.schedule(epoch, group["lr"]) if self._takes_rate else self.schedule(epoch),
                       f"schedule (epoch {epoch})") for group in groups]
        for group, rate in zip(groups, rates):
            group["lr"] = rate
        if self.verbose:
            _say(f"Epoch {epoch + 1}: LearningRateScheduler setting learning rate to {max(rates)}.")


class ReduceLROnPlateau(Callback):
    """Multiply the rates by ``factor`` when ``monitor`` has not improved by more than
    ``min_delta`` for ``patience`` epochs (Keras's callback); then wait ``cooldown`` epochs
    before counting again; never below ``min_lr``. Every param group whose rate is above
    ``min_lr`` is reduced. ``mode`` "auto" minimises losses and errors and maximises anything
    else. A resumed ``fit`` rebuilds the counts from the History it continues (its
    ``learning_rate`` column), so the resumed run reduces when the uninterrupted one would.
    """

    sets_learning_rate = True

    def monitors(self) -> list[str]:
        return [self.monitor]

    def __init__(self, monitor: str = "val_loss", factor: float = 0.1, patience: int = 10, verbose: int = 0,
                 mode: str = "auto", min_delta: float = 1e-4, cooldown: int = 0, min_lr: float = 0.0) -> None:
        if not isinstance(monitor, str):
            raise TypeError(f"monitor: expected the name of a logged value, got {type(monitor).__name__}")
        if not _checks.non_negative(factor, "factor") < 1.0:
            raise ValueError(f"factor: expected a number < 1.0 (a reduction), got {factor}")
        self.monitor, self.factor, self.verbose = monitor, float(factor), _verbosity(verbose)
        self.patience = _checks.non_negative_int(patience, "patience")
        self.cooldown = _checks.non_negative_int(cooldown, "cooldown")
        self.min_delta = _checks.non_negative(min_delta, "min_delta")
        self.min_lr = _checks.non_negative(min_lr, "min_lr")
        self.mode = monitor_mode(monitor, mode)

    def on_train_begin(self, model) -> None:
        self.best = math.inf if self.mode == "min" else -math.inf
        self.wait = 0
        self.cooldown_counter = 0
        earlier = getattr(model, "history", None)
        if isinstance(earlier, History):
            values, rates = earlier.history.get(self.monitor, []), earlier.history.get("learning_rate", [])
            for value, rate in zip(values, rates):
                if not (math.isnan(value) or math.isnan(rate)):  # NaN: an epoch that did not log it
                    self._reduces(value, rate)

    def _reduces(self, value: float, rate: float) -> bool:
        """Count an epoch that logged ``value`` at rate ``rate``; True when it ends in a reduction."""
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.wait = 0
        improved = value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta
        if improved:
            self.best, self.wait = value, 0
            return False
        if self.cooldown_counter > 0:
            return False
        self.wait += 1
        if self.wait >= self.patience and rate > self.min_lr:
            self.cooldown_counter, self.wait = self.cooldown, 0
            return True
        return False

    def on_epoch_end(self, model, epoch: int, logs: dict) -> None:
        if self.monitor not in logs:
            raise KeyError(f"ReduceLROnPlateau: monitor {self.monitor!r} is not logged; logged: {sorted(logs)}")
        if not self._reduces(logs[self.monitor], largest_rate(model.optimizer)):
            return
        for group in model.optimizer.param_groups:
            if group["lr"] > self.min_lr:
                group["lr"] = max(group["lr"] * self.factor, self.min_lr)
        if self.verbose:
            _say(f"Epoch {epoch + 1}: ReduceLROnPlateau reducing learning rate to {largest_rate(model.optimizer)}.")


# ----------------------------------------------------------------------------- logging and stopping


class CSVLogger(Callback):
    """One row per epoch in the CSV file ``filename``: the epoch (from 0) and every logged value.

    The header is ``epoch`` and the logged names in sorted order (as Keras writes it). With
    ``append=True`` the rows go after those already in the file (a resumed run continues its
    log) under the file's header; otherwise the file starts empty. A value not logged in an
    epoch is written as ``NA``. The file is opened when training begins (created, or emptied
    without ``append``), as Keras 3 opens it, so a path that cannot be written fails before the
    first step; each row is written and closed at the end of its epoch.
    """

    main_process_only = True

    def __init__(self, filename, separator: str = ",", append: bool = False) -> None:
        if not isinstance(separator, str) or len(separator) != 1:
            raise ValueError(f"separator: expected one character, got {separator!r}")
        self.filename, self.separator = os.fspath(filename), separator
        self.append = _checks.boolean(append, "append")
        self.keys = None

    def on_train_begin(self, model) -> None:
        self.keys = None
        open(self.filename, "a" if self.append else "w").close()

    def on_epoch_end(self, model, epoch: int, logs: dict) -> None:
        with open(self.filename, "a+", newline="") as file:
            if self.keys is None:
                file.seek(0)
                header = next(csv.reader(file, delimiter=self.separator), None)
                self.keys = header[1:] if header else sorted(logs)
                if not header:
                    csv.writer(file, delimiter=self.separator).writerow(["epoch", *self.keys])
            csv.writer(file, delimiter=self.separator).writerow([epoch, *(logs.get(key, "NA") for key in self.keys)])


class TerminateOnNaN(Callback):
    """Stop training at the first batch whose loss is NaN or infinite (Keras's callback).

    That batch's update is skipped, so the weights are those after the batch before; the
    epoch then ends as usual (its logs show the non-finite loss) and ``fit`` returns, where it
    would otherwise raise FloatingPointError.
    """

    def on_train_batch_end(self, model, batch: int, logs: dict) -> None:
        if not math.isfinite(logs["loss"]):
            _say(f"Batch {batch}: Invalid loss, terminating training")
            model.stop_training = True


class LambdaCallback(Callback):
    """Call functions at the hooks, with Keras's signatures: ``on_epoch_begin(epoch, logs)``,
    ``on_epoch_end(epoch, logs)``, ``on_train_batch_begin(batch, logs)``,
    ``on_train_batch_end(batch, logs)`` (also as ``on_batch_begin``/``on_batch_end``),
    ``on_train_begin(logs)`` and ``on_train_end(logs)``. Hooks without a log get ``{}``."""

    def __init__(self, on_epoch_begin=None, on_epoch_end=None, on_train_begin=None, on_train_end=None,
                 on_train_batch_begin=None, on_train_batch_end=None, on_batch_begin=None, on_batch_end=None) -> None:
        self.functions = {"on_epoch_begin": on_epoch_begin, "on_epoch_end": on_epoch_end,
                          "on_train_begin": on_train_begin, "on_train_end": on_train_end,
                          "on_train_batch_begin": on_train_batch_begin or on_batch_begin,
                          "on_train_batch_end": on_train_batch_end or on_batch_end}
        for name, fn in self.functions.items():
            if fn is not None and not callable(fn):
                raise TypeError(f"{name}: expected a function, got {type(fn).__name__}")

    def _call(self, hook: str, *args) -> None:
        fn = self.functions[hook]
        if fn is not None:
            fn(*args)

    def on_train_begin(self, model) -> None:
        self._call("on_train_begin", {})

    def on_epoch_begin(self, model, epoch: int) -> None:
        self._call("on_epoch_begin", epoch, {})

    def on_train_batch_begin(self, model, batch: int) -> None:
        self._call("on_train_batch_begin", batch, {})

    def on_train_batch_end(self, model, batch: int, logs: dict) -> None:
        self._call("on_train_batch_end", batch, logs)

    def on_epoch_end(self, model, epoch: int, logs: dict) -> None:
        self._call("on_epoch_end", epoch, logs)

    def on_train_end(self, model) -> None:
        self._call("on_train_end", {})
