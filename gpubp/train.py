"""The training loop: compile and fit, with callbacks, a learning-rate scheduler and the
progress bar (``evaluate`` and ``predict`` live one floor down, in ``gpubp.batches``).

``fit`` checks the whole dataset (and its weights) once before the first step, then for each
batch: forward, fused loss, backward, optimizer step, and the scheduler if it steps per
batch. Non-finite inputs are rejected before the first step; a loss that turns non-finite
stops training with an error naming the epoch and batch, before that batch's update
touches the weights (or quietly, with ``callbacks.TerminateOnNaN``).

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
import numbers
import sys
import time

import numpy as np

from gpubp import _checks, _random, batches, losses
from gpubp.batches import evaluate, predict
from gpubp.callbacks import Callback, largest_rate
from gpubp.history import History
from gpubp.optim import lr_scheduler
from gpubp.step import TrainStep

__all__ = ["compile", "evaluate", "fit", "predict"]


# ----------------------------------------------------------------------------- compile / fit


def compile(model, optimizer="adam", loss="cross_entropy", metrics=None, learning_rate: float | None = None) -> None:
    """Keras's ``model.compile``: the optimizer, loss and metrics that ``fit`` and ``evaluate``
    use when they are not given. ``optimizer`` is a name (built here, afresh at each ``compile``
    as Keras builds it, and kept with its state across the ``fit`` calls that use it) or an
    Optimizer; ``learning_rate`` is then the rate of every ``fit`` call and ``train_step()`` step
    that trains with that optimizer and passes no rate of its own (an optimizer given to ``fit``
    or ``train_step`` keeps its rates). ``model.optimizer`` is that optimizer from here on, as in
    Keras (``fit`` sets it to the one it trains with). ``metrics`` are logged by ``fit`` for the
    training data too, which keeps each epoch's outputs on the host to score them (N times the
    output width floats: ``fit(..., metrics=[])`` logs the loss alone). With none (None), ``fit``
    logs the loss alone, as Keras's does, and ``evaluate`` takes its default (``accuracy`` beside
    a classification loss; :func:`gpubp.batches.evaluate`); ``[]`` is none for ``evaluate`` too.
    """
    loss_fn = losses.get(loss)
    if metrics is not None:
        metrics = batches.metric_list(metrics)
        batches.named_metrics(metrics)  # each known, and of a name of its own
    if learning_rate is not None:
        _checks.non_negative(learning_rate, "learning_rate")
    resolved = batches.optimizer_for(model, optimizer, fresh=True)
    model._compiled = {"optimizer": optimizer, "loss": loss_fn, "metrics": metrics,
                       "learning_rate": learning_rate}
    model.loss = loss_fn
    model.optimizer = resolved


def fit(model, x, y, loss=None, optimizer=None, epochs: int = 1, batch_size: int | None = 32,
        validation_split: float = 0.0, validation_data=None, shuffle: bool = True, callbacks=None,
        verbose: int = 1, metrics=None, clip_grad_norm: float | None = None,
        learning_rate: float | None = None, initial_epoch: int = 0, distributed: bool = False,
        cuda_graph=False, class_weight=None, sample_weight=None, scheduler=None, scheduler_interval: str = "auto",
        scheduler_monitor: str | None = None) -> History:
    """Train ``model`` on (x, y) and return a :class:`History` of per-epoch metrics.

    x: (N, in_features) floats, or a SciPy sparse matrix or array of them, kept sparse (a batch
    multiplies the first layer sparse where the model ``takes_sparse``, else is made dense; as
    evaluate and predict take it). y: (N,) int labels for ``cross_entropy``; (N, out) targets for
    ``mse`` / ``binary_cross_entropy``; one-hot rows for ``categorical_cross_entropy``.
    ``loss``, ``optimizer`` and ``metrics`` default to those given to :func:`compile`, else
    ``"cross_entropy"`` and ``"adam"``; an Optimizer must update this model's parameters (all or
    some of them: not those of another model, or of the model a checkpoint was saved from).
    A sigmoid or softmax last layer with its matching loss (``binary_cross_entropy``, the
    cross-entropies) trains on the logits, fused and stable.
    ``batch_size=None`` is 32, as in Keras.
    ``learning_rate`` sets the rate of every param group for this call only (with a
    learning-rate callback it is the starting rate, and the rates the callback sets stay).
    ``scheduler`` is a :mod:`gpubp.optim.lr_scheduler` scheduler of the optimizer, stepped as
    a PyTorch loop steps it, after the optimizer: ``scheduler_interval="epoch"`` once at the
    end of each epoch (after validation), ``"batch"`` after every batch, and ``"auto"`` (the
    default) per batch for OneCycleLR (its ``total_steps`` counts batches) and per epoch for
    the others. ReduceLROnPlateau steps per epoch with the logged value ``scheduler_monitor``
    ("val_loss" when there is validation data, else "loss"). The scheduler owns the rates, so
    ``learning_rate`` is refused with it (a compiled one is not applied); its state goes into
    checkpoints, and ``model.scheduler`` is the one in use. With a scheduler or a learning-rate
    callback, each epoch also logs ``learning_rate``: the largest group rate of its last batch.
    ``validation_split`` holds out the last fraction (before
    shuffling), as Keras does; ``validation_data=(x_val, y_val)`` or ``(x_val, y_val,
    val_sample_weight)`` takes precedence.
    ``sample_weight`` (N,) and ``class_weight`` ({class: weight}) weight the training loss as
    Keras does: each sample's loss times its weight, summed over the batch and divided by the
    batch size. Both at once weigh each sample by the product of the two, as tf.keras 2 did
    (Keras 3 refuses the pair with a ValueError). A sample's class is its label, the argmax of
    its target row, or its single target rounded; classes not named weigh 1. A weight past the
    range of the model's dtype (1e39 for float32), where it would be inf, is a ValueError before
    the first step.
    ``validation_split`` holds out the last samples' ``sample_weight`` with them, and the
    validation loss is weighted by those (class weights apply to training only).
    ``metrics`` (e.g. ``["accuracy"]``; by default the compiled ones) are logged each epoch under
    their names for the training data and, with ``val_`` before them, for the validation data
    (two of one name, or one named "loss", are refused). As Keras's, the training values score
    the outputs of the epoch's batches as they trained (Dropout applied, the weights changing
    from batch to batch), which fit keeps on the host until the epoch's end (N times the
    outputs' width values); the batch logs hold the running loss alone.
    ``verbose``: 0 silent, 1 (or Keras 3's "auto") a progress bar per epoch (one line per epoch
    when stdout is not a terminal), 2 one line per epoch; on stdout, as Keras prints them.
    ``shuffle`` (each epoch's batches drawn in a new random order) and ``distributed`` are True
    or False: a string such as "False" or Keras's "batch" is a TypeError, before the first step.
    ``initial_epoch`` resumes a run (Keras's meaning): training runs epochs ``initial_epoch``
    to ``epochs - 1`` (none when they are equal: a run resumed from its last checkpoint), and
    the History continues ``model.history`` (which :func:`gpubp.load_checkpoint` restores) up
    to that epoch. ``model.optimizer`` and
    ``model.history`` are the ones in use, for callbacks such as :class:`gpubp.ModelCheckpoint`.
    ``callbacks`` may hold one :class:`History`, as Keras code passes ``callbacks=[history]``: it is
    then the History this fit fills and returns (what it held before is replaced).
    ``distributed=True`` trains data-parallel over torch.distributed, one process per device
    launched by torchrun; ``batch_size`` is then the global batch (see :mod:`gpubp.distributed`).
    ``cuda_graph``: True captures each batch's step in a CUDA graph and replays it (the cupy
    backend; a ValueError says why not elsewhere), "auto" where it can, False (the default)
    never; see :class:`gpubp.step.TrainStep`. It changes no result: replayed steps compute
    what the eager ones do (OneCycleLR's momentum cycling, which changes what a captured
    update bakes in every batch, runs eagerly under "auto" and is refused under True).
    """
    model._end(-1)  # a model without layers says so before anything else
    compiled = getattr(model, "_compiled", {})
    loss_fn = losses.get(loss) if loss is not None else compiled.get("loss", losses.cross_entropy)
    metrics = compiled.get("metrics") if metrics is None else metrics
    if learning_rate is not None and scheduler is not None:
        raise ValueError("learning_rate: the scheduler sets the rates; pass learning_rate or scheduler, not both")
    if learning_rate is None and scheduler is None and optimizer is None:  # the compiled optimizer's rate
        learning_rate = compiled.get("learning_rate")
    epochs = _checks.positive_int(epochs, "epochs")
    if isinstance(initial_epoch, bool) or not isinstance(initial_epoch, (int, np.integer)):
        raise TypeError(f"initial_epoch: expected an int, got {type(initial_epoch).__name__}")
    if not 0 <= initial_epoch <= epochs:  # equal: nothing left to train, as in Keras
        raise ValueError(f"initial_epoch: expected an int in [0, epochs={epochs}], got {initial_epoch!r} "
                         "(epochs counts from the start of the run, as in Keras)")
    batch_size = 32 if batch_size is None else _checks.positive_int(batch_size, "batch_size")  # None: Keras's 32
    verbose = check_verbose(verbose)
    shuffle = _checks.boolean(shuffle, "shuffle")
    distributed = _checks.boolean(distributed, "distributed")
    cuda_graph = _checks.switch(cuda_graph, "cuda_graph")
    if isinstance(validation_split, bool) or not isinstance(validation_split, numbers.Real) \
            or not 0 <= validation_split < 1:
        raise ValueError(f"validation_split: expected a float in [0, 1), got {validation_split!r}")
    metrics = batches.metric_list(metrics)
    # each known, and of a name of its own (the History logs each under it)
    names = [name for name, _ in batches.named_metrics(metrics)]
    if learning_rate is not None:
        learning_rate = _checks.non_negative(learning_rate, "learning_rate")
    opt = batches.optimizer_for(model, optimizer if optimizer is not None else compiled.get("optimizer", "adam"))
    x, y = batches.check_dataset(model, x, y, loss_fn)
    if sample_weight is not None:
        sample_weight = batches.check_sample_weight(sample_weight, len(x), dtype=model.dtype)
    w_val = None
    if validation_data is not None:
        if not isinstance(validation_data, (tuple, list)) or len(validation_data) not in (2, 3):
            raise TypeError("validation_data: expected (x_val, y_val) or (x_val, y_val, val_sample_weight)")
        x_val, y_val = batches.check_dataset(model, *validation_data[:2], loss_fn, name="validation_data")
        if len(validation_data) == 3 and validation_data[2] is not None:
            w_val = batches.check_sample_weight(validation_data[2], len(x_val), "validation_data[2]",
                                                of="validation_data", dtype=model.dtype)
    elif validation_split:
        n_val = len(x) - math.floor(len(x) * (1 - validation_split))  # Keras's rounding
        if not 0 < n_val < len(x):
            raise ValueError(f"validation_split: {validation_split} of {len(x)} samples leaves no training or no validation data")
        training, held = slice(None, -n_val), slice(-n_val, None)
        x, x_val = batches.take(x, training), batches.take(x, held)
        y, y_val = y[training], y[held]
        if sample_weight is not None:
            sample_weight, w_val = sample_weight[:-n_val], sample_weight[-n_val:]
    else:
        x_val = y_val = None
    weights = batches.sample_weights(model, y, loss_fn, sample_weight, class_weight)
    callbacks, given_history = _check_callbacks(callbacks)
    if verbose == 1 and not _is_terminal(sys.stdout):
        verbose = 2
    if distributed and cuda_graph is True:
        raise ValueError("cuda_graph: a distributed step all-reduces its gradients through torch.distributed, "
                         "which a CUDA graph of gpubp's kernels does not capture; pass cuda_graph=False or 'auto'")
    if distributed:
        cuda_graph = False  # "auto": where it can, and a distributed step it cannot
    batches.check_metrics(model, metrics, y)
    logged = ["loss", *names]
    if x_val is not None:
        logged += ["val_loss"] + [f"val_{name}" for name in names]
        batches.check_metrics(model, metrics, y_val)
    schedule = _Schedule(scheduler, scheduler_interval, scheduler_monitor, opt, logged, epochs - initial_epoch,
                         math.ceil(len(x) / batch_size), any(cb.sets_learning_rate for cb in callbacks))
    _check_monitors(callbacks, logged + (["learning_rate"] if schedule.logs_rate else []))
    if cuda_graph is True and scheduler is not None and scheduler.varies_momentum:
        raise ValueError(f"cuda_graph=True: {type(scheduler).__name__} changes the momentum every step, which a "
                         "captured update bakes in; pass cycle_momentum=False, or cuda_graph='auto' to run eagerly")
    step = TrainStep(model, loss_fn, opt, cuda_graph=cuda_graph, clip_grad_norm=clip_grad_norm)
    parallel = None
    if distributed:
        from gpubp.distributed import DataParallel

        parallel = DataParallel(model, batch_size, (x, y, weights), None if x_val is None else (x_val, y_val, w_val),
                                epochs=(initial_epoch, epochs), shuffle=shuffle, loss=loss_fn, metrics=metrics,
                                optimizer=opt, learning_rate=learning_rate, clip_grad_norm=clip_grad_norm,
                                scheduler=scheduler,
                                scheduler_steps=("batch" if schedule.per_batch else "epoch", schedule.monitor),
                                batch_callbacks=any(_has_batch_hooks(cb) for cb in callbacks))
        if parallel.rank != 0:
            verbose = 0
            callbacks = [cb for cb in callbacks if not cb.main_process_only]
    # This call's rate only; where a schedule or a callback moves the rates, where they ended stays.
    with batches.at_rate(opt, learning_rate, restore=not schedule.logs_rate):
        return _train(model, (x, y, weights), None if x_val is None else (x_val, y_val, w_val), step, schedule,
                      epochs, batch_size, shuffle, callbacks, verbose, metrics, initial_epoch, parallel,
                      given_history)


def _check_callbacks(callbacks) -> tuple[list[Callback], History | None]:
    """fit's ``callbacks``: a list of Callbacks, and at most one History (Keras code passes
    ``callbacks=[history]`` to read it afterwards), which is the History that fit fills and returns;
    the Callbacks, and that History or None. Else a TypeError naming the item."""
    if isinstance(callbacks, (Callback, History)):
        raise TypeError(f"callbacks: expected a list of gpubp Callbacks, got one {type(callbacks).__name__}; "
                        "pass callbacks=[...]")
    callbacks = list(callbacks or [])
    for i, cb in enumerate(callbacks):
        if not isinstance(cb, (Callback, History)):
            raise TypeError(f"callbacks[{i}]: expected a gpubp Callback, got {type(cb).__name__}")
    histories = [i for i, cb in enumerate(callbacks) if isinstance(cb, History)]
    if len(histories) > 1:
        raise ValueError(f"callbacks: a fit fills one History, got {len(histories)} "
                         f"(callbacks{histories}); pass one, or none and use the one fit returns")
    given = callbacks.pop(histories[0]) if histories else None
    return callbacks, given


def _has_batch_hooks(callback: Callback) -> bool:
    """Whether ``callback`` runs code at each batch (and so may stop a fit mid-epoch): Keras's
    aliases ``on_batch_begin``/``on_batch_end`` included, which the batch hooks call."""
    return any(getattr(type(callback), hook) is not getattr(Callback, hook)
               for hook in ("on_train_batch_begin", "on_train_batch_end", "on_batch_begin", "on_batch_end"))


def check_verbose(verbose) -> int:
    """``verbose`` of ``fit``, ``Model.evaluate`` and ``Model.predict``: 0, 1 or 2 (True and False
    are 1 and 0), or Keras 3's default "auto", which is 1; else a ValueError naming it."""
    if isinstance(verbose, str) and verbose == "auto":
        return 1
    if verbose not in (0, 1, 2):  # no string is: "1" == 1 is False
        raise ValueError(f"verbose: expected 0, 1, 2 or 'auto', got {verbose!r}")
    return int(verbose)


def evaluate_verbosely(model, x, y, verbose, **kwargs) -> dict:
    """``Model.evaluate``: :func:`gpubp.batches.evaluate`, and with ``verbose`` 1 or 2 one line of
    its results on stdout once computed, as ``fit(verbose=2)`` prints an epoch's:
    ``evaluate - 0.01s - loss: 0.1398 - accuracy: 0.9700``; 0 prints nothing."""
    verbose = check_verbose(verbose)
    start = time.perf_counter()
    result = evaluate(model, x, y, **kwargs)
    if verbose:
        print(_line("evaluate", time.perf_counter() - start, result), file=sys.stdout, flush=True)
    return result


def _line(head: str, seconds: float, logs: dict) -> str:
    """One line of logged values, as ``fit(verbose=2)`` prints an epoch's and ``evaluate`` its results."""
    return " - ".join([head, f"{seconds:.2f}s", *(f"{k}: {_shown(v)}" for k, v in logs.items())])


def _check_monitors(callbacks: list, logged: list[str]) -> None:
    """Every value a callback reads at an epoch's end is one this fit logs."""
    for i, cb in enumerate(callbacks):
        for name in cb.monitors():
            if name not in logged:
                hint = (" (validation values need validation_data or validation_split)"
                        if name.startswith("val_") and "val_loss" not in logged else "")
                raise ValueError(f"callbacks[{i}]: {type(cb).__name__} reads {name!r}, which this fit does not log; "
                                 f"it logs {logged}{hint}")


class _Schedule:
    """How ``fit`` steps a PyTorch-style scheduler (per batch, or per epoch with the monitored
    value for ReduceLROnPlateau), checked before the first step; ``logs_rate``: whether epochs
    log ``learning_rate`` (a scheduler or a learning-rate callback changes it)."""

    def __init__(self, scheduler, interval: str, monitor: str | None, optimizer, logged: list[str], epochs_left: int,
                 batches_per_epoch: int, rate_callbacks: bool) -> None:
        self.scheduler, self.monitor = scheduler, None
        self.logs_rate = scheduler is not None or rate_callbacks
        if interval not in ("auto", "epoch", "batch"):
            raise ValueError(f"scheduler_interval: expected 'auto', 'epoch' or 'batch', got {interval!r}")
        plateau = isinstance(scheduler, lr_scheduler.ReduceLROnPlateau)
        if monitor is not None and not plateau:
            raise ValueError("scheduler_monitor: only a ReduceLROnPlateau scheduler steps with a monitored value")
        if scheduler is None:
            if interval != "auto":
                raise ValueError(f"scheduler_interval: {interval!r} steps a scheduler, and none was given")
            self.per_batch = False
            return
        if not isinstance(scheduler, lr_scheduler.LRScheduler):
            raise TypeError(f"scheduler: expected a gpubp.optim.lr_scheduler scheduler, got {type(scheduler).__name__}")
        if scheduler.optimizer is not optimizer:
            raise ValueError("scheduler: it schedules another optimizer than the one fit trains with; "
                             "build it on that optimizer (and pass it as optimizer=)")
        self.per_batch = interval == "batch" or (interval == "auto" and isinstance(scheduler, lr_scheduler.OneCycleLR))
        if plateau:
            if self.per_batch:
                raise ValueError("scheduler_interval: ReduceLROnPlateau steps once per epoch, with a monitored value")
            self.monitor = monitor or ("val_loss" if "val_loss" in logged else "loss")
            if self.monitor not in logged:
                raise ValueError(f"scheduler_monitor: {self.monitor!r} is not logged; logged: {logged}")
        # Stepped past its total_steps, OneCycleLR raises only after epochs of training, losing the
        # epoch that step ends: this fit's steps (batches or epochs) are counted before the first.
        steps_left, unit = (epochs_left * batches_per_epoch, "batches") if self.per_batch else (epochs_left, "epochs")
        if isinstance(scheduler, lr_scheduler.OneCycleLR) and scheduler.last_epoch + steps_left > scheduler.total_steps:
            raise ValueError(f"scheduler: OneCycleLR has {scheduler.total_steps - scheduler.last_epoch} of its "
                             f"total_steps={scheduler.total_steps} left, but this fit runs {steps_left} {unit}")

    def after_batch(self) -> None:
        if self.scheduler is not None and self.per_batch:
            self.scheduler.step()

    def after_epoch(self, logs: dict) -> None:
        if self.scheduler is None or self.per_batch:
            return
        if self.monitor is None:
            self.scheduler.step()
        else:
            self.scheduler.step(logs[self.monitor])


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _train(model, data, validation, step, schedule, epochs, batch_size, shuffle, callbacks, verbose, metrics,
           initial_epoch, parallel, given_history=None) -> History:
    """fit's loop, on checked data ``(x, y, sample weights or None)`` and validation data (the same,
    or None): one TrainStep per batch (or the data-parallel one), the scheduler per batch or per
    epoch; callbacks around batches and epochs. The History it fills is ``given_history``, emptied
    first, where the caller passed one."""
    x, y, weights = data
    loss_fn, opt = step.loss_fn, step.optimizer
    logits = losses.fuses(loss_fn, model.layers[-1].activation)
    scoring = batches.scoring_metrics(model, loss_fn, metrics)
    model.stop_training = False
    model.loss = loss_fn
    model.optimizer = opt
    model.scheduler = schedule.scheduler
    earlier = getattr(model, "history", None)
    history = earlier.until(initial_epoch) if initial_epoch and isinstance(earlier, History) else History()
    if given_history is not None:  # it may be ``earlier`` itself, copied from above before this empties it
        history = given_history._take(history)
    model.history = history
    n_batches = math.ceil(len(x) / batch_size)
    history.params = {"verbose": verbose, "epochs": epochs, "steps": n_batches}
    for cb in callbacks:
        cb.on_train_begin(model)
    # At an epoch's end: the callbacks, then the History, then the state savers (see Callback).
    savers = [cb for cb in callbacks if cb.saves_state]
    others = [cb for cb in callbacks if not cb.saves_state]
    for epoch in range(initial_epoch, epochs):
        for cb in callbacks:
            cb.on_epoch_begin(model, epoch)
        start = time.perf_counter()
        order = _random.generator().permutation(len(x)) if shuffle else None
        bar = _progress(n_batches, epoch, epochs, verbose)
        total_loss, seen = 0.0, 0
        scored = _Scored(model, logits, parallel) if scoring else None
        for batch, index in enumerate(_batches(len(x), batch_size, order)):
            for cb in callbacks:
                cb.on_train_batch_begin(model, batch)
            xb, yb = batches.rows(model, x, index), y[index]
            wb = None if weights is None else weights[index]
            rate = largest_rate(opt)
            if parallel is None:
                value = step.run(xb, yb, wb)
            else:
                value = parallel.forward_backward(loss_fn, xb, yb, logits, wb)
                step.update_if_finite(value)
            if math.isfinite(value):
                schedule.after_batch()
            if scored is not None:  # a batch whose loss is not finite too, as the loss counts it
                scored.add(step if parallel is None else parallel, yb)
            total_loss += value * len(xb)
            seen += len(xb)
            # Keras 3's batch logs: the epoch's running mean, non-finite from a non-finite batch on.
            running = {"loss": total_loss / seen}
            for cb in callbacks:
                cb.on_train_batch_end(model, batch, running)
            if not math.isfinite(value) and not model.stop_training:
                raise FloatingPointError(
                    f"fit: the loss became {value} in epoch {epoch + 1}, batch {batch + 1}; training stopped before "
                    "this batch's update, so the weights are those after the previous batch "
                    "(try a lower learning rate or clip_grad_norm, or stop quietly with callbacks.TerminateOnNaN)")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{running['loss']:.4f}", refresh=False)
            if parallel is not None and parallel.batch_callbacks:  # a stop one rank's callback asked for
                model.stop_training = parallel.any_rank(model.stop_training)  # stops every rank's loop
            if model.stop_training:
                break
        logs = {"loss": total_loss / seen}
        if scored is not None:
            logs.update(scored.metrics(scoring))
        if validation is not None:
            x_val, y_val, w_val = validation
            with batches.head_warned():  # the TrainStep has warned of a loss that does not match the head
                if parallel is None:
                    val = evaluate(model, x_val, y_val, loss=loss_fn, metrics=metrics, sample_weight=w_val)
                else:
                    val = parallel.evaluate(x_val, y_val, loss_fn, metrics, w_val)
            logs.update({f"val_{name}": value for name, value in val.items()})
        if schedule.logs_rate:
            logs["learning_rate"] = rate
        schedule.after_epoch(logs)
        model.backend.synchronize()
        seconds = time.perf_counter() - start
        if bar is not None:
            bar.set_postfix({k: _shown(v) for k, v in logs.items()})
            bar.close()
        elif verbose == 2:
            print(_line(f"epoch {epoch + 1}/{epochs}", seconds, logs), file=sys.stdout, flush=True)
        for cb in others:
            cb.on_epoch_end(model, epoch, logs)
        # The History takes the epoch after the other callbacks, as Keras's does (what they add to
        # logs is in it, as in a CSVLogger's file), and before those that save it with the state.
        history.append(epoch, logs, seconds)
        for cb in savers:
            cb.on_epoch_end(model, epoch, logs)
        if parallel is not None:  # also a barrier: no rank goes on while rank 0 writes a checkpoint
            model.stop_training = parallel.any_rank(model.stop_training)
        if model.stop_training:
            break
    for cb in callbacks:
        cb.on_train_end(model)
    if parallel is not None:  # fit returns on every rank once rank 0's callbacks have written their files
        parallel.any_rank(False)
    return history


class _Scored:
    """An epoch's training outputs and targets, batch by batch, on the host, for ``fit``'s training
    metrics: a data-parallel rank's own part of each batch, gathered from every rank at the end."""

    def __init__(self, model, logits: bool, parallel) -> None:
        self.model, self.logits, self.parallel = model, logits, parallel
        self.outputs: list[np.ndarray] = []
        self.targets: list[np.ndarray] = []

    def add(self, step, yb: np.ndarray) -> None:
        """The batch ``step`` (a TrainStep, or the DataParallel) just trained on, of targets ``yb``."""
        if step.output is None:  # a rank given no rows of this batch
            return
        # A copy: the device array, or the host one a CPU model's next step writes, is reused.
        self.outputs.append(np.array(self.model.backend.to_host(step.output), copy=True))
        self.targets.append(yb if self.parallel is None else yb[self.parallel.part])

    def metrics(self, scoring: list) -> dict:
        """Each of ``scoring``'s ``(name, fn)`` on the epoch's outputs (NaN for a metric of an
        epoch none of whose batches ran, which no fit logs)."""
        outputs, targets = self.outputs, self.targets
        if self.parallel is not None:
            parts = [None] * self.parallel.world_size
            self.parallel.dist.all_gather_object(parts, (outputs, targets))
            outputs = [o for rank_outputs, _ in parts for o in rank_outputs]
            targets = [t for _, rank_targets in parts for t in rank_targets]
        if not outputs:
            return {name: math.nan for name, _ in scoring}
        scores = batches.scores_of(self.model, np.concatenate(outputs), self.logits)
        y = np.concatenate(targets)
        return {name: fn(scores, y) for name, fn in scoring}


def _shown(value: float) -> str:
    """A logged value as Keras's progress bar prints it: 4 decimals, or 4 significant digits in
    e notation at or below 1e-3 (a learning rate of 1e-5 would read 0.0000)."""
    return f"{value:.4f}" if abs(value) > 1e-3 else f"{value:.4e}"


def _batches(n: int, batch_size: int, order: np.ndarray | None):
    for start in range(0, n, batch_size):
        yield slice(start, start + batch_size) if order is None else order[start:start + batch_size]


def _progress(total: int, epoch: int, epochs: int, verbose: int):
    if verbose != 1:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", leave=True, dynamic_ncols=True,
                file=sys.stdout)
