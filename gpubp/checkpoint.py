"""Checkpoints: everything a training run needs to go on exactly where it stopped.

One file (``.safetensors`` or ``.npz``, never pickle) holds the model, the optimizer's
state, the learning-rate scheduler's state (if ``fit`` was given one), the number of epochs
finished, the library's random state (which decides the next epoch's shuffling) and the
History so far. Arrays are tensors of the file; the rest
is JSON in its header. It is written like :func:`gpubp.io.save`, atomically.

:class:`gpubp.callbacks.ModelCheckpoint` writes one after every ``every``-th epoch of ``fit``
(or only the best); :func:`load_checkpoint` reads it back, with the restored optimizer as the
model's compiled one (as Keras's ``load_model`` restores it), and
``ckpt.model.fit(..., initial_epoch=ckpt.epoch)`` resumes with it. On the CPU the resumed run
ends bit-identical to one that was never interrupted: the same batches in the same order meet
the same weights and optimizer state.

>>> import os, tempfile, gpubp as gb
>>> gb.seed(0)
>>> x, y = gb.data.xor()
>>> model = gb.Sequential([gb.Dense(2, 8, "tanh"), gb.Dense(8, 1)], device="cpu")
>>> path = os.path.join(tempfile.mkdtemp(), "run.safetensors")
>>> _ = model.fit(x, y, loss="bce", epochs=3, batch_size=2, callbacks=[gb.ModelCheckpoint(path)], verbose=0)
>>> ckpt = gb.load_checkpoint(path, device="cpu")
>>> ckpt.epoch, len(ckpt.history.epoch)
(3, 3)
>>> ckpt.model.optimizer is ckpt.optimizer
True
>>> _ = ckpt.model.fit(x, y, loss="bce", epochs=5, initial_epoch=ckpt.epoch, batch_size=2, verbose=0)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from gpubp import _random, batches, io, optim
from gpubp.optim import lr_scheduler
from gpubp.layers import Sequential
from gpubp.history import History

OPTIMIZER_CLASSES = {cls.__name__: cls for cls in optim.OPTIMIZERS.values()}


class Checkpoint:
    """What :func:`load_checkpoint` returns: ``model``, ``optimizer``, ``epoch`` (finished),
    ``history``, and ``scheduler_state``: the state of the run's learning-rate scheduler, or None.

    As in PyTorch, build the scheduler again on ``optimizer`` and load the state, then resume::

        scheduler = StepLR(ckpt.optimizer, step_size=10)
        scheduler.load_state_dict(ckpt.scheduler_state)
        ckpt.model.fit(x, y, optimizer=ckpt.optimizer, scheduler=scheduler, initial_epoch=ckpt.epoch, ...)
    """

    def __init__(self, model: Sequential, optimizer: optim.Optimizer, epoch: int, history: History,
                 scheduler_state: dict | None = None) -> None:
        self.model, self.optimizer, self.epoch, self.history = model, optimizer, epoch, history
        self.scheduler_state = scheduler_state

    def __repr__(self) -> str:
        return f"Checkpoint(epoch={self.epoch}, {len(self.model)} layers, {type(self.optimizer).__name__})"


# ----------------------------------------------------------------------------- writing


def check_savable(model: Sequential, optimizer: optim.Optimizer,
                  scheduler: lr_scheduler.LRScheduler | None = None) -> None:
    """That a checkpoint can hold ``model``, ``optimizer`` and ``scheduler`` and load them again;
    what :func:`save_checkpoint` checks before writing, and ModelCheckpoint as ``fit`` begins, so
    a run it could not checkpoint stops before its first step.

    :func:`load_checkpoint` builds the optimizer again itself, so it must be one of the built-in
    classes (an instance of a subclass of one would come back as the built-in class, without what
    the subclass changed). The scheduler the user builds again, as in PyTorch, and loads the state
    into: it may be of any class, a subclass of a built-in one or of ``LRScheduler``, whose
    ``state_dict()`` a header can hold (numbers, strings, lists, dicts and None).
    """
    io.check_savable(model)
    if not isinstance(optimizer, optim.Optimizer):
        raise TypeError(f"optimizer: expected a gpubp optimizer, got {type(optimizer).__name__}")
    cls = type(optimizer)
    if OPTIMIZER_CLASSES.get(cls.__name__) is not cls:
        raise TypeError(f"optimizer: checkpoints hold the built-in optimizers {sorted(OPTIMIZER_CLASSES)}, which "
                        f"load_checkpoint builds again; got {cls.__module__}.{cls.__qualname__}: train with the "
                        "built-in class it extends, or save its state_dict() yourself")
    batches.check_optimizer_params(model, optimizer)
    if scheduler is None:
        return
    if not isinstance(scheduler, lr_scheduler.LRScheduler):
        raise TypeError(f"scheduler: expected a gpubp.optim.lr_scheduler scheduler, got {type(scheduler).__name__}")
    if scheduler.optimizer is not optimizer:
        raise ValueError("scheduler: it schedules another optimizer than the one saved")
    try:
        json.dumps(_json_ready(_scheduler_state(scheduler)), allow_nan=False)
    except TypeError as exc:
        raise TypeError(f"scheduler: the state_dict() of the {type(scheduler).__name__} holds what a checkpoint's "
                        f"header cannot ({exc}); leave it out of state_dict(), as LambdaLR leaves out its "
                        "functions") from None


def save_checkpoint(path, model: Sequential, optimizer: optim.Optimizer, epoch: int,
                    history: History | None = None, scheduler: lr_scheduler.LRScheduler | None = None) -> None:
    """Write a checkpoint of ``model``, ``optimizer`` (and ``scheduler``, which must schedule it)
    after ``epoch`` finished epochs, atomically (:func:`check_savable` says what it can hold).

    Everything is checked before the file is written, so a refused checkpoint leaves the one at
    ``path`` as it was: the weights and the optimizer's state must be finite (as loading requires),
    and the History must hold numbers only (:func:`_history_entries`).
    """
    check_savable(model, optimizer, scheduler)
    if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
        raise ValueError(f"epoch: expected an int >= 0, got {epoch!r}")
    history = _history_entries(history if history is not None else History())
    header, tensors = io.model_contents(model)
    state_dict = optimizer.state_dict()
    state = {}
    for i, entries in state_dict["state"].items():
        state[str(i)] = {}
        for name, value in entries.items():
            if isinstance(value, np.ndarray):
                key = f"optimizer.state.{i}.{name}"
                tensors[key] = value
                value = {"tensor": key}
            state[str(i)][name] = value
    state_names = sorted(name for name in tensors if name.startswith("optimizer."))
    io.check_finite({name: tensors[name] for name in state_names}, "optimizer")
    section = {
        "epoch": int(epoch),
        "optimizer": {"class": type(optimizer).__name__,
                      "params": batches.param_positions(model, optimizer),
                      "param_groups": state_dict["param_groups"], "state": state},
        "scheduler": None if scheduler is None else {"class": type(scheduler).__name__,
                                                     "state": _json_ready(_scheduler_state(scheduler))},
        "random_state": _random.get_state(),
        # A value an epoch did not log is NaN (History pads with it): written as the scheduler's inf is.
        "history": _json_ready(history),
        "tensors": state_names,
    }
    io.write_file(path, {**header, io.CHECKPOINT_KEY: section}, tensors, allow_nan=False)


def _history_entries(history: History) -> dict:
    """``history``'s epochs, times and logged values as a checkpoint holds them, each a number that
    :func:`_history_from` reads back as it was, checked before anything is written.

    A callback may log what fit does not: a NumPy scalar or 0-d array of a metric computed with
    NumPy is the Python int or float it holds (a float32's value exactly; a longdouble rounded to a
    float). Anything else (a bool, a string, None, a complex number) is a TypeError naming the
    logged key and the epoch: a bool is not written as 1 or 0, since it would load back as a number
    rather than as the bool it was, and a resumed run's History would differ from the one saved.
    """
    if not isinstance(history, History):
        raise TypeError(f"history: expected a gpubp History or None, got {type(history).__name__}")
    epochs = len(history.epoch)
    if len(history.epoch_times) != epochs or any(len(v) != epochs for v in history.history.values()):
        raise ValueError("history: expected one time and one value per logged name for each of its "
                         f"{epochs} epochs, as History.append keeps them")
    numbers = [_number(e, f"history.epoch[{i}]") for i, e in enumerate(history.epoch)]
    # Named as fit's messages count epochs, from 1 (the History counts from 0, as Keras's).
    values = {key: [_number(v, f"history: {key!r} logged in epoch {e + 1}") for e, v in zip(numbers, column)]
              for key, column in history.history.items()}
    return {"epoch": numbers, "history": values,
            "epoch_times": [_number(t, f"history.epoch_times[{i}]") for i, t in enumerate(history.epoch_times)]}


def _number(value, what: str) -> int | float:
    """``value`` as the Python int or float a checkpoint's header holds; NumPy's integers and floats,
    scalars or 0-d arrays, converted. Anything else is a TypeError naming ``what``."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    shown = f"a {type(value).__name__} ({io.echo(value)})" if not isinstance(value, np.ndarray) else \
        f"an array of shape {value.shape} and dtype {value.dtype}"
    raise TypeError(f"{what} is {shown}; a checkpoint holds numbers only (ints and floats, NumPy's and 0-d "
                    "arrays of them included), which its History loads back as they were: log a number "
                    "(float(value), or int(flag) for a bool)")


def _scheduler_state(scheduler: lr_scheduler.LRScheduler) -> dict:
    """``scheduler``'s state, with the rates its optimizer holds now as the ones ``load_state_dict``
    puts back. At an epoch's end ``fit`` steps the scheduler first and the callbacks then run, so
    a rate ReduceLROnPlateau lowered after the step is the optimizer's, not the scheduler's last."""
    state = scheduler.state_dict()
    state["_last_lr"] = [group["lr"] for group in scheduler.optimizer.param_groups]
    return state


def _json_ready(value):
    """``value`` with every non-finite float (ReduceLROnPlateau's best starts at inf, the History
    pads an epoch that did not log a value with NaN) written as ``{"float": "inf"}``, so that the
    header stays plain JSON; ``_from_json`` reads it back. NumPy scalars become the Python numbers
    they hold first, as the header's writer would write them."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, dict):
        return {key: _json_ready(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return {"float": repr(value)}
    return value


def _from_json(value):
    if isinstance(value, dict):
        if set(value) == {"float"} and value["float"] in ("inf", "-inf", "nan"):
            return float(value["float"])
        return {key: _from_json(v) for key, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


# ----------------------------------------------------------------------------- reading


def load_checkpoint(path, device: str = "auto", backend: str = "auto") -> Checkpoint:
    """Read a checkpoint written by :class:`ModelCheckpoint` or :func:`save_checkpoint`.

    Returns a :class:`Checkpoint`; its model's ``history`` is the saved History, which a
    ``fit(..., initial_epoch=ckpt.epoch)`` continues. The restored optimizer, ``ckpt.optimizer``,
    is the model's ``optimizer`` and its compiled one, as after ``compile(optimizer=ckpt.optimizer)``:
    a ``fit`` or ``train_step`` without ``optimizer=`` resumes it, state and rates included
    (a ``compile`` replaces it). The loss and metrics are not in the file: pass ``loss=`` again
    unless it was the default ``"cross_entropy"``. The library's random state is set to
    the saved one, so that fit shuffles as the interrupted run would have. The whole file
    is checked first (as :func:`gpubp.load` does, plus the optimizer's state, the random
    state and the History): a bad file is a ValueError naming it and the problem, and then
    nothing, not even the random state, has changed.
    """
    header, tensors = io.read_file(path)  # first: it refuses a path of the wrong type, naming the argument
    path = Path(path)
    section = header.get(io.CHECKPOINT_KEY)
    if not isinstance(section, dict):
        raise ValueError(f"{path}: a model file, not a checkpoint (it holds no optimizer state); load it with gb.load")
    declared = io.extra_tensor_names(path, header)
    missing = sorted(set(declared) - set(tensors))
    if missing:
        raise ValueError(f"{path}: missing key {io.echo(missing[0])}")
    model = io.model_from(path, header, tensors, device=device, backend=backend)
    state_tensors = {name: tensors[name] for name in declared}
    io.check_weights(path, state_tensors, model.dtype)
    try:
        for key in ("optimizer", "history"):
            if not isinstance(section[key], dict):
                raise ValueError(f"the checkpoint's {key!r} entry is not an object")
        epoch = section["epoch"]
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"the epoch must be an int >= 0, got {io.echo(epoch)}")
        optimizer = _optimizer_from(section["optimizer"], model, state_tensors)
        generator = _random.generator_from_state(section["random_state"])
        history = _history_from(section["history"])
        scheduler_state = _scheduler_state_from(section.get("scheduler"), len(optimizer.param_groups))
    except KeyError as exc:
        raise ValueError(f"{path}: the checkpoint has no {exc} entry") from None
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from None
    _random.set_generator(generator)
    model.history = history
    model.optimizer = optimizer
    model._compiled = {"optimizer": optimizer}
    return Checkpoint(model, optimizer, epoch, history, scheduler_state)


def _scheduler_state_from(saved, groups: int) -> dict | None:
    """The saved scheduler state (None in a checkpoint of a run without one, or older than schedulers),
    its rates checked for the restored optimizer's ``groups`` param groups: loading the state puts
    them into the optimizer. The class it names may be any (a user's subclass too): the scheduler
    built again, whose ``load_state_dict`` checks the state is its own, decides."""
    if saved is None:
        return None
    # After _from_json: it reads a state of {"float": "nan"} as a number.
    state = _from_json(saved.get("state")) if isinstance(saved, dict) else None
    if not isinstance(state, dict) or not isinstance(saved.get("class"), str):
        raise ValueError("the scheduler entry must name the scheduler's class and hold its state")
    lr_scheduler.check_rates(state, groups, "the scheduler's state")
    return state


def _optimizer_from(saved: dict, model: Sequential, tensors: dict[str, np.ndarray]) -> optim.Optimizer:
    """The optimizer ``saved`` describes, over ``model``'s parameters, its state arrays from ``tensors``."""
    name = saved["class"]
    cls = OPTIMIZER_CLASSES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown optimizer {io.echo(name)}; expected one of {sorted(OPTIMIZER_CLASSES)}")
    params = model.parameters()
    positions = saved["params"]
    if not isinstance(positions, list) or not all(_is_index(i) and i < len(params) for i in positions) \
            or len(set(positions)) != len(positions):
        raise ValueError(f"the optimizer's parameters {io.echo(positions)} are not distinct positions in the "
                         f"model's {len(params)} parameters")
    groups = saved["param_groups"]
    if not isinstance(groups, list) or not groups:
        raise ValueError("the optimizer's param_groups must be a non-empty list")
    for g, group in enumerate(groups):
        listed = group.get("params") if isinstance(group, dict) else None
        if not isinstance(listed, list) or not all(_is_index(i) for i in listed):
            found = f"'params' {io.echo(listed)}" if isinstance(group, dict) else io.echo(group)
            raise ValueError(f"the optimizer's param_groups[{g}] must be an object whose 'params' lists parameter "
                             f"indices (ints >= 0), got {found}")
    listed = [i for group in groups for i in group["params"]]
    if sorted(listed) != list(range(len(positions))):
        raise ValueError(f"the optimizer's param groups list the parameters {io.echo(listed)}, expected each of "
                         f"0..{len(positions) - 1} once")
    optimizer = cls([{"params": [params[positions[i]] for i in group["params"]]} for group in groups])
    if not isinstance(saved["state"], dict):
        raise ValueError("the optimizer's state is not an object")
    indices = {str(i): i for i in range(len(positions))}  # as the writer spells them, so no two keys name one
    state = {}
    for key, entries in saved["state"].items():
        if key not in indices:
            raise ValueError(f"the optimizer's state key {io.echo(key)} is not a parameter index; expected an int "
                             f"from '0' to '{len(positions) - 1}', written without sign, spaces or leading zeros")
        if not isinstance(entries, dict):
            raise ValueError(f"the optimizer's state {io.echo(key)} is not an object")
        state[indices[key]] = {name: _state_entry(value, tensors) for name, value in entries.items()}
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"optimizer state: {exc}") from None
    return optimizer


def _is_index(value) -> bool:
    """A position as JSON writes one: an int >= 0 (not a bool, nor a float such as 1.0)."""
    return type(value) is int and value >= 0


def _state_entry(value, tensors: dict[str, np.ndarray]):
    """An array entry is a reference ``{"tensor": name}`` to one of the checkpoint's declared
    ``tensors``; counters and None are inline."""
    if isinstance(value, dict):
        name = value.get("tensor")
        if not isinstance(name, str) or name not in tensors:
            raise ValueError(f"the optimizer's state refers to {io.echo(value)}; expected {{'tensor': name}} naming "
                             "one of the checkpoint's tensors")
        return tensors[name]
    if isinstance(value, list):
        raise ValueError("the optimizer's state holds an array inline; arrays must be tensors of the file")
    return value


def _history_from(saved: dict) -> History:
    saved = _from_json(saved)  # NaN and inf as _json_ready wrote them
    history = History()
    epochs, times, values = saved["epoch"], saved["epoch_times"], saved["history"]
    if not (isinstance(epochs, list) and isinstance(times, list) and isinstance(values, dict)) \
            or len(times) != len(epochs) or any(not isinstance(v, list) or len(v) != len(epochs)
                                                for v in values.values()):
        raise ValueError("the History must list one epoch, one time and one value per logged name for each epoch")
    numbers = [*epochs, *times, *(v for column in values.values() for v in column)]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers):
        raise ValueError("the History must hold numbers only")
    for i, (epoch, seconds) in enumerate(zip(epochs, times)):
        history.append(epoch, {key: column[i] for key, column in values.items()}, seconds)
    return history
