"""Keras's callbacks in gpubp.callbacks: learning-rate callbacks, CSVLogger, TerminateOnNaN,
LambdaCallback, and the batch hooks fit calls."""

import csv
import math
import types

import numpy as np
import pytest

import gpubp as gb
from gpubp import callbacks, distributed
from test_bad_input import assert_weights_equal, rejected


def data(n=24, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 4)).astype(np.float32), rng.integers(0, 3, n)


def new_model(seed=1):
    gb.seed(seed)
    return gb.Sequential([gb.Dense(4, 6, "relu"), gb.Dense(6, 3)], device="cpu")


def test_the_top_level_names_are_the_callbacks_modules():
    assert (gb.Callback, gb.EarlyStopping, gb.ModelCheckpoint, gb.History) == \
        (callbacks.Callback, callbacks.EarlyStopping, callbacks.ModelCheckpoint, callbacks.History)


class Recorder(gb.Callback):
    def __init__(self):
        self.events = []

    def on_train_begin(self, model):
        self.events.append("train_begin")

    def on_epoch_begin(self, model, epoch):
        self.events.append(("epoch_begin", epoch))

    def on_train_batch_begin(self, model, batch):
        self.events.append(("batch_begin", batch))

    def on_train_batch_end(self, model, batch, logs):
        self.events.append(("batch_end", batch, sorted(logs)))

    def on_epoch_end(self, model, epoch, logs):
        self.events.append(("epoch_end", epoch))

    def on_train_end(self, model):
        self.events.append("train_end")


def test_fit_calls_the_hooks_around_every_batch_and_epoch():
    x, y = data(20)
    recorder = Recorder()
    new_model().fit(x, y, epochs=2, batch_size=8, callbacks=[recorder], verbose=0)
    epoch = [("batch_begin", 0), ("batch_end", 0, ["loss"]), ("batch_begin", 1), ("batch_end", 1, ["loss"]),
             ("batch_begin", 2), ("batch_end", 2, ["loss"])]
    assert recorder.events == ["train_begin", ("epoch_begin", 0), *epoch, ("epoch_end", 0),
                               ("epoch_begin", 1), *epoch, ("epoch_end", 1), "train_end"]


# ----------------------------------------------------------------------------- learning rates


class OlderBatchHooks(gb.Callback):
    """Written against Keras's older names for the batch hooks."""

    def __init__(self):
        self.events = []

    def on_batch_begin(self, model, batch):
        self.events.append(("batch_begin", batch))

    def on_batch_end(self, model, batch, logs):
        self.events.append(("batch_end", batch, sorted(logs)))


def test_a_callback_overriding_on_batch_begin_and_end_is_called_around_every_batch_as_in_keras():
    x, y = data(20)
    older = OlderBatchHooks()
    new_model().fit(x, y, epochs=1, batch_size=8, callbacks=[older], verbose=0)
    assert older.events == [("batch_begin", 0), ("batch_end", 0, ["loss"]), ("batch_begin", 1),
                            ("batch_end", 1, ["loss"]), ("batch_begin", 2), ("batch_end", 2, ["loss"])]


def test_batch_logs_hold_the_epochs_running_mean_loss_weighted_by_batch_size_as_in_keras():
    x, y = data(20)  # batches of 8, 8 and 4
    model, reference = new_model(), new_model()
    seen = []
    history = model.fit(x, y, epochs=1, batch_size=8, shuffle=False, verbose=0, callbacks=[
        callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: seen.append(logs["loss"]))])
    step = reference.train_step()  # the same loss and named optimizer as fit's
    batch_losses = [step(x[start:start + 8], y[start:start + 8]) for start in (0, 8, 16)]
    sizes = np.array([8, 8, 4])
    assert seen == pytest.approx((np.cumsum(np.multiply(batch_losses, sizes)) / np.cumsum(sizes)).tolist())
    assert seen[-1] == history["loss"][0]


def test_learning_rate_scheduler_calls_the_schedule_with_the_epoch_and_each_groups_rate():
    x, y = data()
    model = new_model()
    optimizer = gb.optim.SGD([{"params": model[0].parameters(), "lr": 0.01},
                              {"params": model[1].parameters(), "lr": 0.1}])
    calls = []

    def schedule(epoch, lr):
        calls.append((epoch, lr))
        return lr if epoch < 2 else lr * 0.5

    history = model.fit(x, y, optimizer=optimizer, epochs=4, batch_size=8, verbose=0,
                        callbacks=[callbacks.LearningRateScheduler(schedule)])
    assert calls == [(0, 0.01), (0, 0.1), (1, 0.01), (1, 0.1), (2, 0.01), (2, 0.1), (3, 0.005), (3, 0.05)]
    assert history["learning_rate"] == [0.1, 0.1, 0.05, 0.025]  # the largest group's, as trained
    assert [group["lr"] for group in optimizer.param_groups] == [0.0025, 0.025]  # the rates stay after fit


def test_a_schedule_that_returns_no_rate_is_named():
    x, y = data()
    model = new_model()
    with pytest.raises(ValueError, match=r"schedule \(epoch 0\): expected a finite learning rate >= 0, got None"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[callbacks.LearningRateScheduler(lambda epoch, lr: None)])


def run_plateau(callback, values, rates):
    """Feed ``values`` as the monitored value of successive epochs; the rates after each."""
    params = [gb.Parameter(np.zeros(1, np.float32), "p") for _ in rates]
    model = types.SimpleNamespace(optimizer=gb.optim.SGD([{"params": [p], "lr": r} for p, r in zip(params, rates)]),
                                  history=gb.History())
    callback.on_train_begin(model)
    seen = []
    for epoch, value in enumerate(values):
        callback.on_epoch_end(model, epoch, {"val_loss": value})
        seen.append([group["lr"] for group in model.optimizer.param_groups])
    return seen


def test_reduce_lr_on_plateau_follows_keras():
    # Keras's rule, by hand: an epoch improves when below best - min_delta; after `patience`
    # epochs without, the rate halves (down to min_lr) and `cooldown` epochs pass uncounted;
    # at min_lr the count goes on but nothing changes.
    values = [1.0, 0.98, 0.97, 0.99, 0.90, 0.91, 0.92, 0.93, 0.94, 0.95, 0.96, 0.97]
    callback = callbacks.ReduceLROnPlateau(factor=0.5, patience=2, cooldown=1, min_delta=0.05, min_lr=0.2)
    seen = run_plateau(callback, values, [1.0])
    assert [rates[0] for rates in seen] == [1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25, 0.2, 0.2, 0.2, 0.2]
    assert callback.wait == 3


def test_reduce_lr_on_plateau_reduces_every_group_above_min_lr():
    callback = callbacks.ReduceLROnPlateau(factor=0.5, patience=0, min_lr=0.08)
    assert run_plateau(callback, [1.0, 1.0, 1.0], [0.1, 1.0]) == [[0.1, 1.0], [0.08, 0.5], [0.08, 0.25]]


@pytest.mark.parametrize("kwargs, message", [
    (dict(factor=1.0), r"factor: expected a number < 1.0 \(a reduction\), got 1.0"),
    (dict(patience=-1), "patience: expected an int >= 0, got -1"),
    (dict(cooldown=1.5), "cooldown: expected an int >= 0, got 1.5"),
    (dict(mode="up"), "mode: expected 'auto', 'min' or 'max'"),
])
def test_bad_reduce_lr_on_plateau_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        callbacks.ReduceLROnPlateau(**kwargs)


# ----------------------------------------------------------------------------- CSVLogger


def read_rows(path):
    with open(path, newline="") as file:
        return list(csv.reader(file))


def test_reduce_lr_on_plateau_names_a_monitor_that_is_no_name():
    with pytest.raises(TypeError, match="monitor: expected the name of a logged value, got int"):
        callbacks.ReduceLROnPlateau(monitor=3)


class AddsToLogs(gb.Callback):
    def on_epoch_end(self, model, epoch, logs):
        logs["val_custom"] = 0.25 * epoch


def test_the_history_holds_what_a_callback_adds_to_the_logs_as_the_csv_logger_does(tmp_path):
    """Keras runs its History after the other callbacks; a checkpoint written at the epoch's end
    holds the History with that epoch."""
    x, y = data()
    model = new_model()
    saver = gb.ModelCheckpoint(tmp_path / "run.npz")
    history = model.fit(x, y, epochs=2, verbose=0, callbacks=[saver, AddsToLogs(),
                                                                callbacks.CSVLogger(tmp_path / "log.csv")])
    assert history.history["val_custom"] == [0.0, 0.25]
    header, *rows = read_rows(tmp_path / "log.csv")
    assert [float(row[header.index("val_custom")]) for row in rows] == [0.0, 0.25]
    assert gb.load_checkpoint(tmp_path / "run.npz").history.epoch == [0, 1]


def test_early_stopping_and_model_checkpoint_take_keywords_after_the_monitor():
    """Keras 3's EarlyStopping("loss", 0, 5) means min_delta=0, patience=5; gpubp's order was
    (monitor, patience, min_delta), so it silently meant patience 0 and min_delta 5."""
    with pytest.raises(TypeError):
        gb.EarlyStopping("loss", 0, 5)
    with pytest.raises(TypeError):
        gb.ModelCheckpoint("best.npz", "val_loss", 0, True)  # Keras's third: verbose
    stopper = gb.EarlyStopping("loss", min_delta=0, patience=5)
    assert (stopper.patience, stopper.min_delta) == (5, 0.0)


@pytest.mark.parametrize("monitor, mode", [
    ("val_loss", "min"), ("loss", "min"), ("val_mean_squared_error", "min"), ("mae", "min"), ("val_mape", "min"),
    ("val_msle", "min"), ("val_kl_divergence", "min"), ("val_categorical_crossentropy", "min"),
    ("val_accuracy", "max"), ("sparse_categorical_accuracy", "max"), ("val_auc", "max"), ("f1", "max"),
    ("val_recall", "max"),
])
def test_mode_auto_reads_the_direction_from_the_name(monitor, mode):
    assert callbacks.monitor_mode(monitor, "auto") == mode
    assert gb.EarlyStopping(monitor).mode == mode


@pytest.mark.parametrize("make", [
    lambda: gb.EarlyStopping("val_score"),
    lambda: gb.ModelCheckpoint("best.npz", monitor="my_metric", save_best_only=True),
    lambda: callbacks.ReduceLROnPlateau("val_score"),
], ids=["EarlyStopping", "ModelCheckpoint", "ReduceLROnPlateau"])
def test_mode_auto_refuses_a_name_it_cannot_place_as_keras_3_does(make):
    """Guessing "max" for a metric of the user's that falls as it improves (a mape) kept the worst
    epoch's weights; Keras 3 raises, asking for mode."""
    with pytest.raises(ValueError, match=r"mode: 'auto' cannot tell whether '(val_score|my_metric)' improves as it "
                                         r"rises or as it falls; pass mode='min' or mode='max'"):
        make()


class SeesParams(gb.Callback):
    def on_train_begin(self, model):
        self.params = dict(model.history.params)


def test_the_history_holds_the_runs_params_as_keras_does_from_the_first_callback_on():
    """Keras's ``History.params``: verbose, epochs and the steps of one epoch (24 samples in
    batches of 5: 5 steps, the last short), there before the first callback runs; a resumed fit
    holds its own run's."""
    x, y = data()
    model = new_model()
    seen = SeesParams()
    history = model.fit(x, y, epochs=3, batch_size=5, verbose=0, callbacks=[seen])
    assert seen.params == history.params == {"verbose": 0, "epochs": 3, "steps": 5}
    resumed = model.fit(x, y, epochs=4, batch_size=24, verbose=2, initial_epoch=3)
    assert resumed.params == {"verbose": 2, "epochs": 4, "steps": 1} and resumed.epoch == [0, 1, 2, 3]
    assert gb.History().params == {}


def test_a_history_in_the_callbacks_is_the_one_fit_fills_and_returns_as_in_keras():
    """Keras code passes ``callbacks=[history]`` and reads it after the fit: it is the fit's
    History (what it held is replaced), model.history too, and a resumed fit continues it even
    where it is the History being continued."""
    x, y = data()
    model = new_model()
    history = gb.History()
    history.append(7, {"loss": 9.0}, 0.0)  # left from elsewhere: replaced
    returned = model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[Recorder(), history])
    assert returned is history and model.history is history
    assert history.epoch == [0, 1] and len(history["loss"]) == 2 and history.params["epochs"] == 2
    first_losses = list(history["loss"])
    again = model.fit(x, y, epochs=3, batch_size=8, verbose=0, initial_epoch=2, callbacks=[model.history])
    assert again is history and history.epoch == [0, 1, 2] and history["loss"][:2] == first_losses
    # callbacks of a History each: which one would fit fill?
    with rejected(model, ValueError, r"callbacks: a fit fills one History, got 2 \(callbacks\[0, 2\]\)"):
        model.fit(x, y, verbose=0, callbacks=[gb.History(), Recorder(), gb.History()])
    # not a list: an empty History is an empty mapping, which would have passed as no callbacks
    with rejected(model, TypeError, r"callbacks: expected a list of gpubp Callbacks, got one History"):
        model.fit(x, y, verbose=0, callbacks=gb.History())


def test_model_checkpoint_keeps_its_best_across_fits(tmp_path):
    """As Keras's: a second fit with the same callback (after unfreezing, say) overwrites the best
    file only with a better value. (The callback driven by hand, with values a fit would log.)"""
    x, y = data()
    model = new_model()
    model.fit(x, y, epochs=1, verbose=0)  # an optimizer and a History to save
    best = gb.ModelCheckpoint(tmp_path / "best.npz", monitor="loss", save_best_only=True)
    best.on_train_begin(model)
    best.on_epoch_end(model, 0, {"loss": 0.05})
    saved = (tmp_path / "best.npz").read_bytes()
    best.on_train_begin(model)  # the next fit
    for epoch, value in enumerate([0.8, 0.07]):
        best.on_epoch_end(model, epoch, {"loss": value})
    assert best.best == 0.05 and (tmp_path / "best.npz").read_bytes() == saved


def test_csv_logger_writes_one_row_per_epoch_with_every_logged_value(tmp_path):
    x, y = data()
    path = tmp_path / "log.csv"
    history = new_model().fit(x, y, epochs=3, batch_size=8, validation_split=0.25, metrics=["accuracy"], verbose=0,
                              callbacks=[callbacks.CSVLogger(path)])
    header, *rows = read_rows(path)
    assert header == ["epoch", "accuracy", "loss", "val_accuracy", "val_loss"]  # Keras's: sorted
    assert [int(row[0]) for row in rows] == [0, 1, 2]
    for i, name in enumerate(header[1:], start=1):
        assert [float(row[i]) for row in rows] == history[name]


def test_csv_logger_appends_a_resumed_run_under_the_same_header(tmp_path):
    x, y = data()
    path = tmp_path / "log.csv"
    model = new_model()
    model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[callbacks.CSVLogger(path, separator=";")])
    model.fit(x, y, epochs=4, initial_epoch=2, batch_size=8, verbose=0,
              callbacks=[callbacks.CSVLogger(path, separator=";", append=True)])
    header, *rows = [line.split(";") for line in path.read_text().splitlines()]
    assert header == ["epoch", "loss"] and [row[0] for row in rows] == ["0", "1", "2", "3"]
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[callbacks.CSVLogger(path, separator=";")])
    assert len(path.read_text().splitlines()) == 2  # without append, the file starts again


@pytest.mark.parametrize("append", [False, True])
def test_csv_logger_whose_file_cannot_be_opened_fails_before_the_first_step(tmp_path, append):
    x, y = data()
    model = new_model()
    logger = callbacks.CSVLogger(tmp_path / "missing" / "log.csv", append=append)
    with rejected(model, FileNotFoundError, "log.csv"):
        model.fit(x, y, epochs=2, verbose=0, callbacks=[logger])


def test_csv_logger_appending_to_a_file_not_there_yet_creates_it_with_the_header(tmp_path):
    x, y = data()
    path = tmp_path / "log.csv"
    new_model().fit(x, y, epochs=2, verbose=0, callbacks=[callbacks.CSVLogger(path, append=True)])
    header, *rows = read_rows(path)
    assert header == ["epoch", "loss"] and [row[0] for row in rows] == ["0", "1"]


# ----------------------------------------------------------------------------- TerminateOnNaN


def overflowing():
    """Batches of 8: the second's targets are finite, but their squared error overflows float32."""
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((24, 4)).astype(np.float32), rng.standard_normal((24, 3)).astype(np.float32)
    y[8:16] = 3e38
    return x, y


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_terminate_on_nan_stops_quietly_with_the_weights_before_the_bad_batch(capsys):
    x, y = overflowing()
    model, reference = new_model(), new_model()
    history = model.fit(x, y, loss="mse", optimizer="sgd", epochs=3, batch_size=8, shuffle=False, verbose=0,
                        callbacks=[callbacks.TerminateOnNaN()])
    reference.fit(x[:8], y[:8], loss="mse", optimizer="sgd", epochs=1, batch_size=8, shuffle=False, verbose=0)
    assert_weights_equal(reference.get_weights(), model)
    assert len(history.epoch) == 1 and not math.isfinite(history["loss"][0])
    assert "Batch 1: Invalid loss, terminating training" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_without_terminate_on_nan_a_non_finite_loss_raises_naming_the_callback():
    x, y = overflowing()
    with pytest.raises(FloatingPointError, match="epoch 1, batch 2.*TerminateOnNaN"):
        new_model().fit(x, y, loss="mse", epochs=1, batch_size=8, shuffle=False, verbose=0)


# ----------------------------------------------------------------------------- EarlyStopping in a resumed run


def earlier_run(value, monitor="val_loss"):
    """The History of an earlier run whose one epoch (epoch 0) logged ``value``, as a checkpoint
    restores it: a resumed fit (initial_epoch=1) continues it."""
    history = gb.History()
    history.append(0, {"loss": 1.0, monitor: value}, 0.0)
    return history


class RecordWeights(gb.Callback):
    def __init__(self):
        self.weights = []

    def on_epoch_end(self, model, epoch, logs):
        self.weights.append(model.get_weights())


def test_restore_best_weights_in_a_resumed_run_restores_this_runs_best_epoch_when_the_best_came_before_it(capsys):
    """The earlier run's val_loss of 0, which no cross-entropy reaches, is the best so far all run
    long: its weights are not in the checkpoint, so the best of this run's epochs comes back (not
    its first), and verbose=1 names the epoch whose weights those are."""
    x = np.random.default_rng(0).standard_normal((40, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0)  # learnable: the validation loss falls, then rises
    model = new_model()
    model.history = earlier_run(0.0)
    record = RecordWeights()
    stopper = gb.EarlyStopping("val_loss", patience=10, restore_best_weights=True, verbose=1)
    with pytest.warns(UserWarning, match=r"best val_loss so far was at epoch 1, before this resumed run; .* "
                                         r"restores the best of this run's epochs"):
        history = model.fit(x, y, optimizer=gb.optim.SGD(model.parameters(), lr=0.5), epochs=6, initial_epoch=1,
                            batch_size=8, shuffle=False, validation_split=0.25, callbacks=[record, stopper],
                            verbose=0)
    assert history.epoch == [0, 1, 2, 3, 4, 5] and stopper.stopped_epoch is None
    this_run = history["val_loss"][1:]
    best = int(np.argmin(this_run))
    assert best > 0, f"this run's first epoch is its best ({this_run}): the test needs a later one"
    assert_weights_equal(record.weights[best], model)
    epoch = history.epoch[1 + best]
    assert capsys.readouterr().out.splitlines() == [
        f"Restoring model weights from the end of the best epoch of this run: {epoch + 1} "
        "(the best val_loss, at epoch 1, came before it)."]


@pytest.mark.parametrize("monitor, earlier, values, min_delta, restored", [
    ("val_loss", 0.1, [0.5, 0.3, 0.4], 0.0, 1),  # none beats the earlier best: this run's best
    ("val_loss", 0.1, [0.5, 0.4, 0.25], 0.2, 2),  # ... counted as the run counts, by more than min_delta
    ("val_accuracy", 0.9, [0.5, 0.7, 0.6], 0.0, 1),  # maximised
    ("val_loss", 0.4, [0.5, 0.3, 0.35], 0.0, 1),  # beats the earlier best: the best so far
    ("val_loss", 1.0, [0.8, 0.45, 0.6], 0.5, 1),  # beats it by min_delta, though not this run's first
], ids=["this_runs_best", "this_runs_best_min_delta", "this_runs_best_max", "beats_earlier", "beats_earlier_min_delta"])
def test_restore_best_weights_in_a_resumed_run_restores_the_best_it_can(monitor, earlier, values, min_delta, restored):
    """The callback driven by hand, each epoch's weights filled with the epoch's index in this run:
    the best so far when this run reached it, else the best of this run's epochs."""
    model = new_model()
    model.history = earlier_run(earlier, monitor)
    stopper = gb.EarlyStopping(monitor, patience=10, min_delta=min_delta, restore_best_weights=True)
    with pytest.warns(UserWarning, match="before this resumed run"):
        stopper.on_train_begin(model)
    for i, value in enumerate(values):
        model.set_weights([np.full_like(w, i) for w in model.get_weights()])
        stopper.on_epoch_end(model, 1 + i, {"loss": 1.0, monitor: value})
    stopper.on_train_end(model)
    assert_weights_equal([np.full_like(w, restored) for w in model.get_weights()], model)


# ----------------------------------------------------------------------------- messages


# Each fit makes its callback print: a constant loss (rate 0) stops EarlyStopping and, with a
# min_delta no epoch reaches, lowers ReduceLROnPlateau's rate; the second batch overflows.
PRINTING_FITS = {
    "EarlyStopping": (lambda: callbacks.EarlyStopping("loss", verbose=1, restore_best_weights=True),
                      data(), {"optimizer": "sgd", "learning_rate": 0.0}),
    "ReduceLROnPlateau": (lambda: callbacks.ReduceLROnPlateau("loss", patience=0, min_delta=10.0, verbose=1),
                          data(), {}),
    "LearningRateScheduler": (lambda: callbacks.LearningRateScheduler(lambda epoch, lr: lr, verbose=1), data(), {}),
    "TerminateOnNaN": (callbacks.TerminateOnNaN, overflowing(), {"loss": "mse", "optimizer": "sgd"}),
}


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("name", PRINTING_FITS)
def test_callback_messages_are_printed_by_the_main_process_only(monkeypatch, capsys, name, rank):
    """Under fit(distributed=True) every rank runs these callbacks; only rank 0 prints."""
    monkeypatch.setattr(distributed, "rank", lambda: rank)
    callback, (x, y), kwargs = PRINTING_FITS[name]
    new_model().fit(x, y, epochs=2, batch_size=8, shuffle=False, verbose=0, callbacks=[callback()], **kwargs)
    printed = capsys.readouterr().out
    assert bool(printed) == (rank == 0), printed


# ----------------------------------------------------------------------------- LambdaCallback


def test_lambda_callback_calls_functions_with_keras_signatures():
    x, y = data(16)
    calls = []
    lambdas = callbacks.LambdaCallback(
        on_train_begin=lambda logs: calls.append(("train_begin", logs)),
        on_epoch_end=lambda epoch, logs: calls.append(("epoch_end", epoch, sorted(logs))),
        on_batch_end=lambda batch, logs: calls.append(("batch_end", batch, sorted(logs))),
        on_train_end=lambda logs: calls.append(("train_end", logs)))
    new_model().fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[lambdas])
    assert calls == [("train_begin", {}), ("batch_end", 0, ["loss"]), ("batch_end", 1, ["loss"]),
                     ("epoch_end", 0, ["loss"]), ("train_end", {})]


def test_lambda_callback_refuses_what_it_cannot_call():
    with pytest.raises(TypeError, match="on_epoch_end: expected a function, got int"):
        callbacks.LambdaCallback(on_epoch_end=3)


# ----------------------------------------------------------------------------- flags


@pytest.mark.parametrize("make, flag", [
    (lambda value: gb.EarlyStopping("loss", restore_best_weights=value), "restore_best_weights"),
    (lambda value: gb.ModelCheckpoint("best.npz", monitor="loss", save_best_only=value), "save_best_only"),
    (lambda value: callbacks.CSVLogger("log.csv", append=value), "append"),
], ids=["restore_best_weights", "save_best_only", "append"])
@pytest.mark.parametrize("value", ["False", 1, None])
def test_a_callback_flag_that_is_not_a_bool_is_a_type_error_naming_it(make, flag, value):
    """"False" is true to Python, so a flag takes True or False only, as fit's shuffle does."""
    x, y = data()
    model = new_model()
    with rejected(model, TypeError, rf"^{flag}: expected True or False, got {value!r}$"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[make(value)])


@pytest.mark.parametrize("make", [
    lambda value: gb.EarlyStopping("loss", verbose=value),
    lambda value: callbacks.ReduceLROnPlateau("loss", verbose=value),
    lambda value: callbacks.LearningRateScheduler(lambda epoch, lr: lr, verbose=value),
], ids=["EarlyStopping", "ReduceLROnPlateau", "LearningRateScheduler"])
@pytest.mark.parametrize("value, error", [("0", TypeError), (None, TypeError), (0.5, TypeError), (-1, ValueError)])
def test_a_callbacks_verbose_that_is_no_count_is_refused_naming_it(make, value, error):
    x, y = data()
    model = new_model()
    with rejected(model, error, rf"^verbose: expected 0 or 1 \(or True or False\), got {value!r}$"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[make(value)])


def test_callback_flags_and_verbose_take_numpy_bools_and_keras_ints(tmp_path):
    assert gb.EarlyStopping(restore_best_weights=np.True_, verbose=np.False_).restore_best_weights is True
    assert gb.ModelCheckpoint(tmp_path / "best.npz", monitor="loss", save_best_only=np.True_).save_best_only is True
    assert callbacks.CSVLogger(tmp_path / "log.csv", append=np.False_).append is False
    assert [callbacks.ReduceLROnPlateau(verbose=value).verbose for value in (0, 1, 2, True)] == [0, 1, 2, 1]
