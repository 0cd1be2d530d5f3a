"""The seed workflows end to end on the CPU, plus the training loop's callbacks, history,
validation, progress bar and metrics."""

import re
import sys

import numpy as np
import pytest

import gpubp as gb
from gpubp import metrics


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


# ----------------------------------------------------------------------------- seed workflows


def test_an_mlp_fits_and_evaluate_and_predict_agree():
    gb.seed(0)
    x, y = gb.data.regression(n_samples=256, n_features=4, seed=0)
    model = gb.Sequential([gb.Dense(4, 32, "tanh"), gb.Dense(32, 1)], device="cpu")
    history = model.fit(x, y, loss="mse", optimizer=gb.optim.Adam(model.parameters(), lr=0.01), epochs=30,
                        batch_size=32, verbose=0)
    assert history["loss"][-1] < history["loss"][0] / 4
    pred = model.predict(x)
    assert pred.shape == (256, 1) and pred.dtype == np.float32
    result = model.evaluate(x, y, metrics=["mse", "mae"])
    assert result["loss"] == pytest.approx(np.mean((pred - y) ** 2), rel=1e-5)
    assert result["mse"] == pytest.approx(result["loss"], rel=1e-5)
    assert result["mae"] == pytest.approx(np.mean(np.abs(pred - y)), rel=1e-5)


def test_xor_2_4_1_relu_with_a_logit_output_is_solved_by_bce_and_adam():
    gb.seed(0)
    x, y = gb.data.xor()
    model = gb.Sequential([gb.Dense(2, 4, "relu"), gb.Dense(4, 1)], device="cpu")
    model.fit(x, y, loss="binary_cross_entropy", optimizer=gb.optim.Adam(model.parameters(), lr=0.05),
              epochs=300, batch_size=4, verbose=0)
    probabilities = sigmoid(model.predict(x))
    np.testing.assert_array_equal(probabilities > 0.5, y > 0.5)
    assert model.evaluate(x, y, metrics=["accuracy"])["accuracy"] == 1.0


def test_a_2_2_2_2_sigmoid_network_fits_one_sample_by_mse_and_sgd():
    gb.seed(0)
    x, y = np.array([[1.0, 2.0]], np.float32), np.array([[3.0, 4.0]], np.float32)
    model = gb.Sequential([gb.Dense(2, 2, "sigmoid"), gb.Dense(2, 2, "sigmoid"), gb.Dense(2, 2)], device="cpu")
    model.fit(x, y, loss="mse", optimizer=gb.optim.SGD(model.parameters(), lr=0.1), epochs=200, batch_size=1,
              verbose=0)
    assert model.evaluate(x, y)["loss"] < 1e-4


@pytest.mark.slow
def test_digits_reach_97_percent_test_accuracy():
    pytest.importorskip("sklearn", reason="load_digits needs scikit-learn: pip install 'gpubp[dev]'")
    x, y = gb.data.load_digits()
    x_train, x_test, y_train, y_test = gb.data.train_test_split(x, y, test_size=0.25, seed=0, stratify=True)
    gb.seed(0)
    model = gb.Sequential([gb.Dense(64, 128, "relu"), gb.Dense(128, 128, "relu"), gb.Dense(128, 10)], device="cpu")
    model.fit(x_train, y_train, optimizer=gb.optim.Adam(model.parameters(), lr=3e-3), epochs=30, batch_size=64,
              verbose=0)
    assert model.evaluate(x_test, y_test, metrics=["accuracy"])["accuracy"] >= 0.97


def test_weights_moved_into_another_model_train_on_from_where_they_were():
    x, y = gb.data.regression(n_samples=256, n_features=4, seed=1)

    def fresh():
        return gb.Sequential([gb.Dense(4, 32, "tanh"), gb.Dense(32, 1)], device="cpu")

    gb.seed(0)
    first = fresh()
    first.fit(x, y, loss="mse", optimizer=gb.optim.Adam(first.parameters(), lr=0.01), epochs=20, batch_size=32,
              verbose=0)
    reached = first.evaluate(x, y)["loss"]

    gb.seed(1)
    second = fresh()
    untrained = second.evaluate(x, y, loss="mse")["loss"]
    second.set_weights(first.get_weights())
    np.testing.assert_array_equal(second.predict(x), first.predict(x))
    history = second.fit(x, y, loss="mse", optimizer=gb.optim.Adam(second.parameters(), lr=1e-3), epochs=20,
                         batch_size=32, verbose=0)
    assert reached < untrained / 4
    assert history["loss"][0] < 1.2 * reached  # continues from where the first model stopped
    assert history["loss"][-1] < history["loss"][0]
    assert second.evaluate(x, y)["loss"] < reached


def test_the_same_seed_gives_the_same_history_and_weights():
    x, y = gb.data.regression(n_samples=64, n_features=3, seed=2)

    def run():
        gb.seed(7)
        model = gb.Sequential([gb.Dense(3, 8, "gelu"), gb.Dense(8, 1)], device="cpu")
        history = model.fit(x, y, loss="mse", epochs=3, batch_size=16, verbose=0, validation_split=0.25)
        return history.history, model.get_weights()

    (h1, w1), (h2, w2) = run(), run()
    assert h1 == h2
    for a, b in zip(w1, w2):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- EarlyStopping


def linear_problem():
    x = np.array([[1.0], [2.0], [-1.0], [0.5]], np.float32)
    return x, 2 * x + 1


def linear_model():
    gb.seed(0)
    return gb.Sequential([gb.Dense(1, 1)], device="cpu")


@pytest.mark.parametrize("patience", [1, 2, 4])
def test_early_stopping_stops_after_patience_epochs_without_improvement(patience):
    x, y = linear_problem()
    model = linear_model()
    stopper = gb.EarlyStopping(monitor="loss", patience=patience)
    history = model.fit(x, y, loss="mse", optimizer=gb.optim.SGD(model.parameters(), lr=0.0), epochs=20,
                        batch_size=4, shuffle=False, verbose=0, callbacks=[stopper])
    assert len(history.epoch) == 1 + patience  # the first epoch sets the best; then `patience` flat ones
    assert stopper.best_epoch == 0 and stopper.stopped_epoch == patience


def test_early_stopping_with_patience_0_stops_at_the_first_epoch_without_improvement():
    x, y = linear_problem()
    model = linear_model()
    history = model.fit(x, y, loss="mse", optimizer=gb.optim.SGD(model.parameters(), lr=0.0), epochs=20,
                        batch_size=4, shuffle=False, verbose=0, callbacks=[gb.EarlyStopping(monitor="loss")])
    assert len(history.epoch) == 2


@pytest.mark.parametrize("min_delta, epochs_run", [(0.0, 10), (100.0, 3)])
def test_early_stopping_counts_only_improvements_larger_than_min_delta(min_delta, epochs_run):
    x, y = linear_problem()
    model = linear_model()
    stopper = gb.EarlyStopping(monitor="loss", patience=2, min_delta=min_delta)
    history = model.fit(x, y, loss="mse", optimizer=gb.optim.SGD(model.parameters(), lr=0.05), epochs=10,
                        batch_size=4, shuffle=False, verbose=0, callbacks=[stopper])
    assert all(np.diff(history["loss"]) < 0)  # full-batch descent on a convex loss: every epoch improves
    assert len(history.epoch) == epochs_run


class RaiseLearningRate(gb.Callback):
    """From ``epoch`` on, train with a step size that diverges, so validation gets worse."""

    def __init__(self, optimizer, epoch, lr):
        self.optimizer, self.epoch, self.lr = optimizer, epoch, lr

    def on_epoch_begin(self, model, epoch):
        if epoch == self.epoch:
            self.optimizer.param_groups[0]["lr"] = self.lr


class RecordWeights(gb.Callback):
    def __init__(self):
        self.weights = []

    def on_epoch_end(self, model, epoch, logs):
        self.weights.append(model.get_weights())


def test_restore_best_weights_puts_back_the_best_epochs_weights():
    x, y = linear_problem()
    model = linear_model()
    opt = gb.optim.SGD(model.parameters(), lr=0.1)
    record = RecordWeights()
    stopper = gb.EarlyStopping(monitor="val_loss", patience=2, restore_best_weights=True)
    history = model.fit(x, y, loss="mse", optimizer=opt, epochs=20, batch_size=4, shuffle=False, verbose=0,
                        validation_data=(x, y), callbacks=[RaiseLearningRate(opt, 3, 0.6), record, stopper])
    best = int(np.argmin(history["val_loss"]))
    assert best == 2 and stopper.best_epoch == 2 and len(history.epoch) == 5
    for want, got, last in zip(record.weights[best], model.get_weights(), record.weights[-1]):
        np.testing.assert_array_equal(got, want)
        assert not np.array_equal(got, last)
    assert model.evaluate(x, y)["loss"] == pytest.approx(history["val_loss"][best])


def test_without_restore_best_weights_the_last_weights_stay():
    x, y = linear_problem()
    model = linear_model()
    opt = gb.optim.SGD(model.parameters(), lr=0.1)
    record = RecordWeights()
    model.fit(x, y, loss="mse", optimizer=opt, epochs=20, batch_size=4, shuffle=False, verbose=0,
              validation_data=(x, y), callbacks=[RaiseLearningRate(opt, 3, 0.6), record,
                                                 gb.EarlyStopping(patience=2)])
    for last, got in zip(record.weights[-1], model.get_weights()):
        np.testing.assert_array_equal(got, last)


def test_restore_best_weights_restores_when_training_runs_to_its_last_epoch_too():
    """Keras 3's meaning: the best epoch's weights come back when training ends, stopped or not."""
    x, y = linear_problem()
    model = linear_model()
    opt = gb.optim.SGD(model.parameters(), lr=0.1)
    record = RecordWeights()
    stopper = gb.EarlyStopping(monitor="val_loss", patience=100, restore_best_weights=True)
    history = model.fit(x, y, loss="mse", optimizer=opt, epochs=6, batch_size=4, shuffle=False, verbose=0,
                        validation_data=(x, y), callbacks=[RaiseLearningRate(opt, 3, 0.6), record, stopper])
    assert len(history.epoch) == 6 and stopper.stopped_epoch is None and stopper.best_epoch == 2
    for want, got in zip(record.weights[2], model.get_weights()):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("baseline, epochs_run", [(None, 4), (1e6, 4), (0.0, 3)])
def test_an_epoch_that_does_not_beat_the_baseline_does_not_reset_the_patience(baseline, epochs_run):
    """A flat loss: the first epoch sets the best. Below the baseline it resets the count, so
    patience 3 stops at the fourth epoch; above it, the count runs on from the first epoch."""
    x, y = linear_problem()
    model = linear_model()
    stopper = gb.EarlyStopping(monitor="loss", patience=3, baseline=baseline, restore_best_weights=True)
    history = model.fit(x, y, loss="mse", optimizer=gb.optim.SGD(model.parameters(), lr=0.0), epochs=20,
                        batch_size=4, shuffle=False, verbose=0, callbacks=[stopper])
    assert len(history.epoch) == epochs_run and stopper.best_epoch == 0


def test_start_from_epoch_does_not_monitor_the_warm_up_epochs():
    x, y = linear_problem()
    model = linear_model()
    stopper = gb.EarlyStopping(monitor="loss", patience=1, start_from_epoch=4)
    history = model.fit(x, y, loss="mse", optimizer=gb.optim.SGD(model.parameters(), lr=0.0), epochs=20,
                        batch_size=4, shuffle=False, verbose=0, callbacks=[stopper])
    assert len(history.epoch) == 6 and stopper.best_epoch == 4 and stopper.stopped_epoch == 5


def test_early_stopping_verbose_says_when_it_stops_and_restores(capsys):
    x, y = linear_problem()
    stopper = gb.EarlyStopping(monitor="loss", patience=1, restore_best_weights=True, verbose=1)
    linear_model().fit(x, y, loss="mse", optimizer="sgd", learning_rate=0.0, epochs=9, batch_size=4, verbose=0,
                       callbacks=[stopper])
    assert capsys.readouterr().out.splitlines() == [
        "Epoch 2: early stopping", "Restoring model weights from the end of the best epoch: 1."]


@pytest.mark.parametrize("kwargs, message", [
    ({"baseline": float("nan")}, "baseline: expected a finite number or None"),
    ({"start_from_epoch": -1}, "start_from_epoch"), ({"monitor": 3}, "monitor: expected the name of a logged value"),
])
def test_early_stopping_rejects_bad_arguments_by_name(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        gb.EarlyStopping(**kwargs)


@pytest.mark.parametrize("make, read", [
    (lambda: gb.EarlyStopping(), "EarlyStopping reads 'val_loss'"),
    (lambda: gb.callbacks.ReduceLROnPlateau("val_accuracy"), "ReduceLROnPlateau reads 'val_accuracy'"),
])
def test_a_callback_monitoring_an_unlogged_value_fails_before_the_first_step(make, read):
    x, y = linear_problem()
    model = linear_model()
    before = model.get_weights()
    with pytest.raises(ValueError, match=rf"callbacks\[1\]: {read}, which this fit does not log; it logs \['loss'"
                                         r".*\(validation values need validation_data or validation_split\)"):
        model.fit(x, y, loss="mse", epochs=2, verbose=0, callbacks=[gb.Callback(), make()])
    for want, got in zip(before, model.get_weights()):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("metric, message", [
    ("auc", r"'auc' cannot score this model's targets: auc: expected one target per output"),
    ("categorical_accuracy", r"'categorical_accuracy' cannot score .* expected one-hot targets"),
])
def test_a_metric_that_cannot_score_the_validation_targets_fails_before_the_first_step(metric, message):
    x, y = classification_data(n=40)
    model = classifier()
    before = model.get_weights()
    with pytest.raises(ValueError, match=rf"^metrics: {message}"):
        model.fit(x, y, epochs=2, verbose=0, validation_split=0.25, metrics=["accuracy", metric])
    for want, got in zip(before, model.get_weights()):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("validation", [False, True])
def test_a_metric_that_cannot_score_a_target_late_in_the_data_fails_before_the_first_step(validation):
    """Every target is probed, not the first few: one target past 1 in row 700 (AUC's targets are
    in [0, 1]) used to train a whole epoch before the metric refused it, at a shuffled row."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1000, 4)).astype(np.float32)
    y = rng.uniform(0, 1, (1000, 1)).astype(np.float32)
    y[700] = 1.0001
    gb.seed(0)
    model = gb.Sequential([gb.Dense(4, 8, "relu"), gb.Dense(8, 1, "sigmoid")], device="cpu")
    before = model.get_weights()
    fit_on = dict(validation_data=(x, y)) if validation else {}
    fit_with = (x, np.clip(y, 0, 1)) if validation else (x, y)
    with pytest.raises(ValueError, match=r"^metrics: 'auc' cannot score this model's targets: .*1\.0001"):
        model.fit(*fit_with, loss="mse", metrics=["auc"], epochs=1, verbose=0, **fit_on)
    for want, got in zip(before, model.get_weights()):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("monitor, mode", [("val_loss", "min"), ("val_mse", "min"), ("val_accuracy", "max"),
                                           ("val_f1", "max")])
def test_early_stopping_auto_mode_minimises_losses_and_maximises_scores(monitor, mode):
    assert gb.EarlyStopping(monitor=monitor).mode == mode


# ----------------------------------------------------------------------------- History and validation


def classification_data(n=120, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5)).astype(np.float32)
    return x, (x[:, 0] + x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 1)


def classifier():
    gb.seed(0)
    return gb.Sequential([gb.Dense(5, 16, "relu"), gb.Dense(16, 3)], device="cpu")


@pytest.mark.parametrize("batch_size", [16, 200])
def test_training_metrics_score_each_batchs_output_as_it_trained(batch_size):
    """As Keras's History: compile(metrics=...) then fit(x, y) logs the metrics of the training data
    too, not only with validation data; each batch scored by the output its step computed."""
    x, y = classification_data()
    model, twin = classifier(), classifier()
    model.compile(loss="cross_entropy", optimizer=gb.optim.SGD(model.parameters(), lr=0.5), metrics=["accuracy", "f1"])
    history = model.fit(x, y, epochs=2, batch_size=batch_size, shuffle=False, verbose=0)
    assert list(history.history) == ["loss", "accuracy", "f1"]
    step = twin.train_step("cross_entropy", gb.optim.SGD(twin.parameters(), lr=0.5))
    for epoch in range(2):
        outputs = []
        for start in range(0, len(x), batch_size):
            outputs.append(twin.predict(x[start:start + batch_size]))  # what its step's forward computes
            step(x[start:start + batch_size], y[start:start + batch_size])
        scores = np.concatenate(outputs)
        assert history["accuracy"][epoch] == gb.metrics.accuracy(scores, y)
        assert history["f1"][epoch] == gb.metrics.f1(scores, y)
    assert history["accuracy"][0] != twin.evaluate(x, y)["accuracy"]  # not the end-of-epoch weights' score


def test_a_callback_can_monitor_a_training_metric():
    x, y = classification_data()
    stopper = gb.callbacks.EarlyStopping("accuracy", mode="max", patience=0)
    history = classifier().fit(x, y, epochs=30, batch_size=16, metrics=["accuracy"], callbacks=[stopper], verbose=0)
    accuracy = history["accuracy"]
    assert len(accuracy) < 30 and accuracy[-1] <= max(accuracy[:-1])  # stopped at the first epoch without a gain


def test_training_metrics_count_the_batch_whose_loss_is_not_finite_as_the_loss_does():
    """TerminateOnNaN ends the epoch at such a batch: the epoch's loss counts it, and so do the metrics
    (as Keras updates them), not the batches before it alone."""
    x, _ = classification_data(n=32)
    y = np.ones((32, 3), np.float32)
    x[16:] = 1e30  # the second batch's outputs overflow
    history = classifier().fit(x, y, loss="mse", metrics=["mae"], epochs=1, batch_size=16, shuffle=False, verbose=0,
                               callbacks=[gb.callbacks.TerminateOnNaN()])
    assert not np.isfinite(history["loss"][0])  # the squared errors overflow float32
    assert history["mae"][0] > 1e20  # the second batch's outputs are in it (the first's alone: about 1)


def test_history_has_one_entry_per_epoch_for_every_logged_value():
    x, y = classification_data()
    history = classifier().fit(x, y, epochs=4, batch_size=16, validation_split=0.25, metrics=["accuracy", "f1"],
                               verbose=0)
    assert list(history.history) == ["loss", "accuracy", "f1", "val_loss", "val_accuracy", "val_f1"]  # Keras's order
    assert all(len(values) == 4 for values in history.history.values())
    assert history.epoch == [0, 1, 2, 3]
    assert len(history.epoch_times) == 4 and all(t > 0 for t in history.epoch_times)
    assert all(0 <= a <= 1 for a in history["val_accuracy"])


def test_validation_split_holds_out_the_last_rows():
    x, y = classification_data()
    split = classifier().fit(x, y, epochs=3, batch_size=16, validation_split=0.25, verbose=0, metrics=["accuracy"])
    explicit = classifier().fit(x[:90], y[:90], epochs=3, batch_size=16, validation_data=(x[90:], y[90:]),
                                verbose=0, metrics=["accuracy"])
    assert split.history == explicit.history


def test_validation_loss_is_the_evaluate_loss_after_the_epoch():
    x, y = classification_data()
    model = classifier()
    history = model.fit(x, y, epochs=2, batch_size=16, validation_data=(x[:30], y[:30]), verbose=0)
    assert history["val_loss"][-1] == pytest.approx(model.evaluate(x[:30], y[:30])["loss"], rel=1e-6)


@pytest.mark.parametrize("n, split, held_out", [(10, 0.05, 1), (10, 0.25, 3), (30, 0.15, 5), (120, 0.25, 30),
                                                (4, 0.01, 1)])
def test_validation_split_holds_out_as_many_rows_as_keras(n, split, held_out):
    """Keras trains on the first floor(n (1 - split)) rows and validates on the rest."""
    x, y = classification_data(n=n)
    split_run = classifier().fit(x, y, epochs=1, batch_size=16, validation_split=split, verbose=0)
    explicit = classifier().fit(x[:n - held_out], y[:n - held_out], epochs=1, batch_size=16,
                                validation_data=(x[n - held_out:], y[n - held_out:]), verbose=0)
    assert split_run.history == explicit.history


@pytest.mark.parametrize("split", [0.8, 1e-18])
def test_validation_split_that_leaves_a_part_empty_is_rejected(split):
    x, y = classification_data(n=4)
    with pytest.raises(ValueError, match=f"validation_split: {split} of 4 samples leaves no training or no validation"):
        classifier().fit(x, y, validation_split=split, verbose=0)


# ----------------------------------------------------------------------------- progress output


def test_verbose_1_draws_a_progress_bar_per_epoch_on_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    x, y = classification_data()
    classifier().fit(x, y, epochs=2, batch_size=40, verbose=1)
    captured = capsys.readouterr()
    assert "epoch 1/2" in captured.out and "epoch 2/2" in captured.out
    assert "3/3" in captured.out and "batch" in captured.out and "loss=" in captured.out
    assert captured.err == ""


def test_verbose_1_prints_one_keras_line_per_epoch_when_stdout_is_not_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # where the output goes decides, not stderr
    x, y = classification_data()
    classifier().fit(x, y, epochs=3, batch_size=40, validation_split=0.25, metrics=["accuracy"], verbose=1)
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert "\r" not in out and len(lines) == 3 and err == ""
    assert re.fullmatch(r"epoch 3/3 - \d+\.\d\ds - loss: \d\.\d{4} - accuracy: \d\.\d{4} - val_loss: \d\.\d{4} - "
                        r"val_accuracy: \d\.\d{4}",
                        lines[-1])


def test_verbose_2_prints_one_line_per_epoch(capsys):
    x, y = classification_data()
    classifier().fit(x, y, epochs=3, batch_size=40, verbose=2)
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert err == "" and len(lines) == 3 and lines[0].startswith("epoch 1/3") and "loss: " in lines[0]


def test_verbose_2_prints_values_at_or_below_1e_3_in_e_notation_as_keras_does(capsys):
    x, y = classification_data()
    classifier().fit(x, y, epochs=1, batch_size=40, verbose=2, learning_rate=1e-5,
                     callbacks=[gb.callbacks.LearningRateScheduler(lambda epoch, lr: 1e-5)])
    line = capsys.readouterr().out.strip()
    assert line.endswith(" - learning_rate: 1.0000e-05") and re.search(r" - loss: \d\.\d{4} ", line)


def test_a_learning_rate_schedule_of_the_epoch_alone_works_as_in_keras():
    x, y = classification_data()
    model = classifier()
    history = model.fit(x, y, epochs=3, batch_size=40, verbose=0, optimizer="sgd",
                        callbacks=[gb.callbacks.LearningRateScheduler(lambda epoch: 0.1 / (epoch + 1))])
    assert history["learning_rate"] == pytest.approx([0.1, 0.05, 0.1 / 3])


@pytest.mark.parametrize("kwargs, error, message", [
    ({"metrics": "accuracy"}, TypeError, r"metrics: expected a list of metric names or callables, got 'accuracy'"),
    ({"callbacks": gb.callbacks.TerminateOnNaN()}, TypeError,
     r"callbacks: expected a list of gpubp Callbacks, got one TerminateOnNaN; pass callbacks=\[...\]"),
    ({"validation_split": "0.1"}, ValueError, r"validation_split: expected a float in \[0, 1\), got '0.1'"),
])
def test_fit_names_an_argument_of_the_wrong_kind(kwargs, error, message):
    x, y = classification_data(n=20)
    model = classifier()
    before = model.get_weights()
    with pytest.raises(error, match=message):
        model.fit(x, y, epochs=1, verbose=0, **kwargs)
    for want, got in zip(before, model.get_weights()):
        np.testing.assert_array_equal(got, want)


def test_evaluate_names_a_metric_that_cannot_score_the_targets():
    x, y = classification_data(n=20)
    with pytest.raises(ValueError, match=r"^metrics: 'mse' cannot score this model's targets: "):
        classifier().evaluate(x, y, metrics=["mse"])
    with pytest.raises(TypeError, match=r"^metrics: expected a list"):
        classifier().evaluate(x, y, metrics="accuracy")


def test_verbose_0_is_silent(capsys):
    x, y = classification_data()
    classifier().fit(x, y, epochs=2, batch_size=40, verbose=0)
    assert capsys.readouterr() == ("", "")


# ----------------------------------------------------------------------------- metrics


@pytest.fixture
def sklearn_metrics():
    return pytest.importorskip("sklearn.metrics", reason="the metric oracle is scikit-learn: pip install 'gpubp[dev]'")


@pytest.mark.parametrize("seed", range(4))
def test_multiclass_metrics_match_scikit_learn_macro_averages(sklearn_metrics, seed):
    rng = np.random.default_rng(seed)
    gb.seed(seed)
    model = gb.Sequential([gb.Dense(6, 5)], device="cpu")
    x, y = rng.normal(size=(60, 6)).astype(np.float32), rng.integers(0, 5, 60)
    predicted = model.predict(x).argmax(axis=1)
    result = model.evaluate(x, y, metrics=["accuracy", "precision", "recall", "f1"])
    assert result["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(y, predicted))
    for name in ("precision", "recall", "f1"):
        expected = getattr(sklearn_metrics, f"{name}_score")(y, predicted, average="macro", zero_division=0)
        assert result[name] == pytest.approx(expected), name


# A sigmoid head (probabilities, threshold 0.5) and a linear one trained as logits (threshold 0);
# the targets multi-hot, with one label that never occurs.
@pytest.mark.parametrize("head, threshold", [("sigmoid", 0.5), (None, 0.0)])
@pytest.mark.parametrize("seed", range(3))
def test_multilabel_metrics_score_each_label_as_scikit_learns_multilabel_macro(sklearn_metrics, seed, head, threshold):
    rng = np.random.default_rng(seed)
    gb.seed(seed)
    model = gb.Sequential([gb.Dense(6, 4, head)], device="cpu")
    x = rng.normal(size=(60, 6)).astype(np.float32)
    y = (rng.random((60, 4)) < [0.5, 0.3, 0.6, 0.0]).astype(np.float32)
    predicted = (model.predict(x) > threshold).astype(int)
    result = model.evaluate(x, y, metrics=["precision", "recall", "f1", "binary_accuracy"])
    for name in ("precision", "recall", "f1"):
        expected = getattr(sklearn_metrics, f"{name}_score")(y, predicted, average="macro", zero_division=0)
        assert result[name] == pytest.approx(expected), name
    assert result["binary_accuracy"] == pytest.approx(np.mean(predicted == y))


@pytest.mark.parametrize("loss, threshold", [("mse", 0.5), ("mae", 0.5), ("binary_cross_entropy", 0.0), (None, 0.0)])
def test_a_linear_output_is_thresholded_at_half_under_a_regression_loss_and_at_zero_as_a_logit(loss, threshold):
    """0/1 targets fitted by mse are values (Keras's binary_accuracy threshold, 0.5); trained by
    binary cross-entropy, or with no loss to tell, the output is a logit (0)."""
    model = gb.Sequential([gb.Dense(1, 1)], device="cpu")
    model.set_weights([np.ones((1, 1), np.float32), np.zeros(1, np.float32)])
    x = np.array([[0.1], [0.2], [0.7], [0.9], [-0.2]], np.float32)  # the outputs themselves
    y = np.array([[0], [0], [1], [1], [0]], np.float32)
    result = model.evaluate(x, y, loss=loss, metrics=["accuracy", "binary_accuracy", "f1"])
    predicted = (x > threshold).astype(np.float32)
    assert result["accuracy"] == result["binary_accuracy"] == pytest.approx(np.mean(predicted == y))
    assert result["accuracy"] == (1.0 if threshold == 0.5 else 0.6)


@pytest.mark.parametrize("seed", range(4))
def test_single_output_metrics_match_scikit_learn_binary_scores(sklearn_metrics, seed):
    rng = np.random.default_rng(seed)
    gb.seed(seed)
    model = gb.Sequential([gb.Dense(6, 1)], device="cpu")
    x, y = rng.normal(size=(50, 6)).astype(np.float32), rng.integers(0, 2, 50)
    predicted = (model.predict(x)[:, 0] > 0).astype(int)
    result = model.evaluate(x, y.astype(np.float32), metrics=["accuracy", "precision", "recall", "f1"])
    assert result["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(y, predicted))
    for name in ("precision", "recall", "f1"):
        expected = getattr(sklearn_metrics, f"{name}_score")(y, predicted, zero_division=0)
        assert result[name] == pytest.approx(expected), name


def test_a_callable_metric_is_reported_under_its_name():
    x, y = classification_data()

    def top_score(scores, labels):
        return float(scores.max())

    result = classifier().evaluate(x, y, metrics=[top_score])
    assert set(result) == {"top_score"}


def test_perfect_predictions_score_one_on_every_metric():
    scores = np.eye(3)[[0, 1, 2, 1]]
    labels = np.array([0, 1, 2, 1])
    for fn in (metrics.accuracy, metrics.precision, metrics.recall, metrics.f1):
        assert fn(scores, labels) == 1.0
