"""Edges of the model API: outputs that must not alias a reused buffer, layers a model may not
share, losses of your own, evaluate's default metrics, metric names and label check, models
trained in two threads at once, and the errors of arguments of the wrong kind."""

import copy
import functools
import pickle
import re
import sys
import threading
import warnings
from collections.abc import Mapping

import numpy as np
import pytest

import gpubp as gb
from gpubp import batches, train
from gpubp.backends import numpy_backend


def dense_model(dtype="float32", activation="relu"):
    gb.seed(0)
    return gb.Sequential([gb.Dense(4, 8, activation), gb.Dense(8, 3)], backend="numpy", dtype=dtype)


def regression_data(rng, n=16):
    return rng.normal(size=(n, 4)).astype(np.float32), rng.normal(size=(n, 1)).astype(np.float32)


# ----------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("top", [["dropout", "dropout"], ["dense", "dropout", "dropout"]])
def test_predict_of_a_model_with_dropouts_on_top_does_not_depend_on_the_batch_size(top, rng):
    gb.seed(0)
    layers = [gb.Dense(4, 3)] + [gb.Dense(3, 3) if kind == "dense" else gb.Dropout(0.5) for kind in top]
    model = gb.Sequential(layers, backend="numpy")
    x = rng.normal(size=(10, 4)).astype(np.float32)
    np.testing.assert_array_equal(model.predict(x, batch_size=4), model.predict(x))


def test_an_inference_forward_through_dropouts_on_top_returns_a_fresh_array(rng):
    gb.seed(0)
    model = gb.Sequential([gb.Dense(4, 3), gb.Dropout(0.5), gb.Dropout(0.5)], backend="numpy")
    x = rng.normal(size=(10, 4)).astype(np.float32)
    first = model.forward(x[:5], training=False)
    kept = first.copy()
    model.forward(x[5:], training=False)
    np.testing.assert_array_equal(first, kept)
    np.testing.assert_allclose(first, x[:5] @ model[0].weight.data + model[0].bias.data, rtol=1e-6)


# ----------------------------------------------------------------------------- layers a model may not share


@pytest.fixture
def frequent_thread_switches():
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(interval)


def test_two_threads_predicting_with_one_model_at_once_each_get_their_own_outputs(rng, frequent_thread_switches):
    # The layers between the input and the output write into reused buffers: each thread's own.
    gb.seed(0)
    model = gb.Sequential([gb.Dense(32, 64, "relu"), gb.Dense(64, 64, "tanh"), gb.Dense(64, 64, "relu"),
                           gb.Dense(64, 10)], device="cpu")
    inputs = [rng.standard_normal((256, 32)).astype(np.float32) for _ in range(2)]
    expected = [model.predict(x) for x in inputs]
    start, wrong = threading.Barrier(2), []

    def predict(k):
        start.wait()
        for _ in range(200):
            if not np.array_equal(model.predict(inputs[k]), expected[k]):
                wrong.append(k)
                return

    threads = [threading.Thread(target=predict, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []


@pytest.mark.parametrize("make", [lambda: gb.Dense(4, 4, "tanh"), lambda: gb.Dropout(0.5)], ids=["dense", "dropout"])
def test_the_same_layer_twice_in_one_model_is_refused_naming_both_positions(make):
    layer = make()
    with pytest.raises(ValueError, match=r"layers: layers\[0\] and layers\[2\] are the same"):
        gb.Sequential([layer, gb.Dense(4, 4), layer], backend="numpy")


def test_a_layer_of_another_model_is_not_converted_to_a_new_models_dtype(rng):
    model = dense_model()
    with pytest.raises(ValueError, match=r"layers\[0\]: 'dense_0' belongs to another model \(numpy, float32\)"):
        gb.Sequential(model.layers, backend="numpy", dtype="float64")
    assert {param.data.dtype for param in model.parameters()} == {np.dtype(np.float32)}
    assert model.predict(rng.normal(size=(2, 4)).astype(np.float32)).dtype == np.float32


def test_a_layer_of_another_model_may_be_shared_on_the_same_backend_in_the_same_dtype():
    model = dense_model(dtype="float64")
    rebuilt = gb.Sequential(model.layers, backend="numpy")  # dtype=None: the layers' own
    assert rebuilt.dtype == np.float64 and rebuilt[0] is model[0]
    assert model[1:][0] is model[1]


def test_new_layers_take_the_models_dtype_and_a_refused_model_holds_none():
    layers = [gb.Dense(4, 8), gb.Dense(8, 3)]
    with pytest.raises(ValueError, match="fused=True"):
        gb.Sequential(layers, backend="numpy", fused=True)
    model = gb.Sequential(layers, backend="numpy", dtype="float64")
    assert {param.data.dtype for param in model.parameters()} == {np.dtype(np.float64)}


REFUSED = {
    "fused=True": ([gb.Dense, 4, 8], [gb.Dense, 8, 3]),
    "precision": ([gb.Dense, 4, 8], [gb.Dense, 8, 3]),
    "widths": ([gb.Dense, 4, 4], [gb.Dense, 4, 2], [gb.Dense, 4, 4]),
    "a dropout first": ([gb.Dropout, 0.5], [gb.Dense, 4, 4], [gb.Dense, 5, 2]),
}


@pytest.mark.parametrize("refusal", REFUSED)
def test_a_refused_model_leaves_its_layers_as_they_were(refusal):
    """A refused model once converted its layers to its dtype, named them and sized its Dropouts
    before it checked the precision, the path or the widths: a model built from them later changed."""
    layers = [make(*args) for make, *args in REFUSED[refusal]]
    kwargs = {"fused=True": {"fused": True}, "precision": {"precision": "fp8"}}.get(refusal, {})
    before = [(layer.name, layer.in_features, layer.out_features, layer.dtype, [p.data for p in layer.parameters()])
              for layer in layers]
    with pytest.raises(ValueError):
        gb.Sequential(layers, backend="numpy", dtype="float64", **kwargs)
    after = [(layer.name, layer.in_features, layer.out_features, layer.dtype, [p.data for p in layer.parameters()])
             for layer in layers]
    assert [entry[:4] for entry in after] == [entry[:4] for entry in before]
    assert all(a is b for entry, was in zip(after, before) for a, b in zip(entry[4], was[4]))
    if refusal == "widths":
        model = gb.Sequential([gb.Dense(3, 4), layers[0], layers[1]], backend="numpy")
        assert [layer.name for layer in model] == ["dense_0", "dense_1", "dense_2"]
    else:
        assert gb.Sequential(layers[:2], backend="numpy").dtype == np.float32


# ----------------------------------------------------------------------------- weights


def test_set_weights_that_overflow_the_models_dtype_are_refused_and_change_nothing():
    model = dense_model()
    before = model.get_weights()
    weights = [w.astype(np.float64) for w in before]
    weights[2] = np.full((8, 3), 1e300)
    with pytest.raises(ValueError, match=r"weights\[2\]: .*1e\+300 overflow to inf in the model's float32"):
        model.set_weights(weights)
    for old, new in zip(before, model.get_weights()):
        np.testing.assert_array_equal(old, new)


def test_set_weights_with_a_ragged_nested_list_names_its_index():
    model = dense_model()
    weights = model.get_weights()
    weights[1] = [[0.0] * 8, [0.0]]
    with pytest.raises(ValueError, match=r"weights\[1\]: expected an array of shape \(8,\) for bias"):
        model.set_weights(weights)


@pytest.mark.parametrize("layers", [
    lambda: [gb.Dense(4, 9, "relu"), gb.Dense(9, 9, "relu"), gb.Dropout(0.5), gb.Dense(9, 3)],
    lambda: [gb.Dense(4, 9, "tanh"), gb.Dropout(0.2), gb.Dense(9, 9, "relu"), gb.Dropout(0.5), gb.Dense(9, 9),
             gb.Dense(9, 3)],
], ids=["dropout between equal widths", "two dropouts"])
def test_no_layer_writes_its_input_gradient_into_the_gradient_it_reads(monkeypatch, rng, layers):
    """Backward hands each layer a dX buffer apart from its dy. Where a Dropout between two Dense
    layers is skipped (the lower Dense applies its mask), buffers chosen by position gave the lower
    Dense the one it read dy from; on a backend whose dX kernel reads dz while writing dX (Numba,
    CuPy, for layers over one tile wide), the gradients came out wrong."""
    seen = []
    backward = gb.Dense.backward

    def checked(self, dy, need_dx, out_dx=None, *args, **kwargs):
        seen.append(out_dx is not None and np.shares_memory(dy, out_dx))
        return backward(self, dy, need_dx, out_dx, *args, **kwargs)

    monkeypatch.setattr(gb.Dense, "backward", checked)
    gb.seed(0)
    model = gb.Sequential(layers(), device="cpu")
    model.forward(rng.normal(size=(5, 4)).astype(np.float32))
    model.backward(rng.normal(size=(5, 3)).astype(np.float32))
    assert len(seen) == sum(isinstance(layer, gb.Dense) for layer in model) and not any(seen)


# ----------------------------------------------------------------------------- losses of your own


def mean_squared_error(pred, target):
    """A loss of your own, as ``gpubp.losses.get`` documents it: (pred, target) -> (loss, grad)."""
    diff = pred - target
    return float((diff * diff).mean()), 2 * diff / diff.size


@pytest.mark.parametrize("train", [
    lambda model, x, y: model.fit(x, y, loss=mean_squared_error, batch_size=8, verbose=0),
    lambda model, x, y: (model.compile(loss=mean_squared_error), model.fit(x, y, batch_size=8, verbose=0)),
    lambda model, x, y: model.train_step(mean_squared_error, "sgd")(x, y),
], ids=["fit", "compile", "train_step"])
def test_a_loss_of_your_own_trains_called_with_pred_and_target_only(train, rng):
    gb.seed(0)
    model = gb.Sequential([gb.Dense(4, 1)], backend="numpy")
    x, y = regression_data(rng)
    before = model.evaluate(x, y, loss=mean_squared_error)["loss"]
    train(model, x, y)
    assert model.evaluate(x, y, loss=mean_squared_error)["loss"] < before


def test_a_loss_of_your_own_is_given_sample_weight_when_the_samples_are_weighted(rng):
    seen = []

    def weighted_mse(pred, target, sample_weight=None):
        seen.append(sample_weight)
        return mean_squared_error(pred, target)

    gb.seed(0)
    model = gb.Sequential([gb.Dense(4, 1)], backend="numpy")
    x, y = regression_data(rng, n=8)
    model.fit(x, y, loss=weighted_mse, batch_size=8, sample_weight=np.full(8, 2.0), verbose=0)
    np.testing.assert_array_equal(seen[0], np.full(8, 2.0))


def loss_per_sample(pred, target):
    diff = pred - target
    return (diff * diff).mean(axis=1), 2 * diff / diff.size


@pytest.mark.parametrize("loss, message", [
    (loss_per_sample, r"^loss: a loss of your own returns the batch's loss as one number \(a mean\), got ndarray "
                      r"of shape \(8,\)"),
    (lambda pred, target: 2 * (pred - target), r"^loss: a loss of your own returns \(loss, gradient\), got ndarray"),
    (lambda pred, target: ("low", pred - target), r"^loss: a loss of your own returns the batch's loss as one "
                                                  r"number, got str 'low'"),
], ids=["per sample", "gradient only", "a word"])
@pytest.mark.parametrize("call", ["fit", "evaluate"])
def test_a_loss_of_your_own_that_returns_no_single_number_is_a_type_error_naming_loss(rng, loss, message, call):
    gb.seed(0)
    model = gb.Sequential([gb.Dense(4, 1)], backend="numpy")
    x, y = regression_data(rng, n=8)
    before = model.get_weights()
    with pytest.raises(TypeError, match=message):
        if call == "fit":
            model.fit(x, y, loss=loss, batch_size=8, verbose=0)
        else:
            model.evaluate(x, y, loss=loss)
    for got, want in zip(model.get_weights(), before):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("head, loss, advice", [("sigmoid", "cross_entropy", "binary_cross_entropy"),
                                                ("softmax", "binary_cross_entropy", "cross_entropy")])
def test_a_loss_that_applies_the_other_probability_heads_activation_warns(head, loss, advice):
    model = gb.Sequential([gb.Dense(4, 3, head)], device="cpu")
    with pytest.warns(UserWarning, match=rf"loss: the loss \w+ applies \w+ to the outputs, but the last layer's {head} "
                                         rf"has made them probabilities already; use '{advice}'") as caught:
        model.train_step(loss, "sgd")
    x, y = np.zeros((4, 4), np.float32), np.array([0, 1, 2, 0])
    with pytest.warns(UserWarning, match="loss: the loss") as from_fit:
        model.fit(x, y if loss == "cross_entropy" else np.eye(3)[y], loss=loss, epochs=1, verbose=0)
    assert [w.filename for w in (*caught, *from_fit)] == [__file__, __file__]  # the caller's line, not gpubp's


@pytest.mark.parametrize("head, loss, advice", [("sigmoid", "cross_entropy", "binary_cross_entropy"),
                                                ("softmax", "binary_cross_entropy", "cross_entropy")])
def test_evaluate_warns_of_the_other_heads_loss_as_fit_does_and_fit_warns_once(head, loss, advice):
    """evaluate computed softmax of sigmoid probabilities (or the reverse) without a word; fit's
    validation, which evaluates every epoch, warns no more than the fit's step did."""
    model = gb.Sequential([gb.Dense(4, 3, head)], device="cpu")
    x, labels = np.zeros((4, 4), np.float32), np.array([0, 1, 2, 0])
    y = labels if loss == "cross_entropy" else np.eye(3, dtype=np.float32)[labels]
    with pytest.warns(UserWarning, match=rf"^loss: the loss \w+ applies \w+ to the outputs, but the last layer's "
                                         rf"{head} has made them probabilities already; use '{advice}'") as caught:
        model.evaluate(x, y, loss=loss)
    assert [w.filename for w in caught] == [__file__]  # the caller's line, not gpubp's
    with warnings.catch_warnings(record=True) as from_fit:
        warnings.simplefilter("always")
        model.fit(x, y, loss=loss, epochs=3, verbose=0, validation_data=(x, y))
    assert len([w for w in from_fit if "loss: the loss" in str(w.message)]) == 1


@pytest.mark.parametrize("head, loss", [("softmax", "cross_entropy"), ("sigmoid", "binary_cross_entropy"),
                                        (None, "cross_entropy"), ("sigmoid", "mse"), ("softmax", "mse")])
def test_a_loss_that_fits_the_last_layer_does_not_warn(head, loss):
    model = gb.Sequential([gb.Dense(4, 3, head)], device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.train_step(loss, "sgd")


# ----------------------------------------------------------------------------- evaluate's default metrics


@pytest.mark.parametrize("loss", ["mse", "mae", "huber", "poisson", gb.losses.Huber(0.5), mean_squared_error])
def test_evaluate_scores_no_accuracy_by_default_for_a_regression_loss(loss, rng):
    gb.seed(0)
    model = gb.Sequential([gb.Dense(4, 1)], backend="numpy")
    x, y = regression_data(rng)
    assert set(model.evaluate(x, np.abs(y), loss=loss)) == {"loss"}


@pytest.mark.parametrize("loss", ["cross_entropy", gb.losses.CrossEntropy(0.1), None])
def test_evaluate_scores_accuracy_by_default_for_class_labels(loss, rng):
    x = rng.normal(size=(8, 4)).astype(np.float32)
    result = dense_model().evaluate(x, np.arange(8) % 3, loss=loss)
    assert set(result) == ({"accuracy"} if loss is None else {"loss", "accuracy"})


def test_evaluate_and_predict_take_kerass_verbose_and_print_nothing_at_0_the_default(rng, capsys):
    """Keras scripts pass verbose=0; predict prints nothing at any level (Keras's bar only times it)."""
    model = dense_model()
    x, y = rng.normal(size=(8, 4)).astype(np.float32), np.arange(8) % 3
    assert model.evaluate(x, y, verbose=0) == model.evaluate(x, y)
    for verbose in (0, 1, 2):
        np.testing.assert_array_equal(model.predict(x, verbose=verbose), model.predict(x))
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("verbose", [1, 2])
def test_evaluate_with_verbose_prints_one_line_of_its_results_as_fit_prints_an_epochs(rng, capsys, verbose):
    model = dense_model()
    x, y = rng.normal(size=(8, 4)).astype(np.float32), np.arange(8) % 3
    result = model.evaluate(x, y, loss="cross_entropy", metrics=["accuracy", "f1"], verbose=verbose)
    out = capsys.readouterr().out
    assert out.endswith("\n") and out.count("\n") == 1, out
    head, seconds, *fields = out[:-1].split(" - ")
    assert head == "evaluate" and re.fullmatch(r"\d+\.\d\ds", seconds), out
    shown = dict(field.split(": ") for field in fields)
    assert list(shown) == list(result) == ["loss", "accuracy", "f1"]
    for name, value in result.items():
        assert float(shown[name]) == pytest.approx(value, rel=1e-3, abs=1e-4), name


@pytest.mark.parametrize("loss, expected", [("cross_entropy", {"loss", "accuracy"}), ("mse", {"loss"})])
def test_a_model_compiled_without_metrics_evaluates_with_the_default_ones_and_fit_logs_the_loss_alone(rng, loss,
                                                                                                      expected):
    """As a model fit without compile: compile(metrics=None) leaves evaluate its default, while fit
    logs no metric of its own choosing (Keras's History holds the loss alone then); ``[]`` is none."""
    x = rng.normal(size=(16, 4)).astype(np.float32)
    model, y = (dense_model(), np.arange(16) % 3) if loss == "cross_entropy" else (
        gb.Sequential([gb.Dense(4, 1)], backend="numpy"), rng.normal(size=(16, 1)).astype(np.float32))
    model.compile(loss=loss)
    history = model.fit(x, y, epochs=1, batch_size=8, validation_split=0.25, verbose=0)
    assert list(history.history) == ["loss", "val_loss"]
    assert set(model.evaluate(x, y)) == expected
    model.compile(loss=loss, metrics=[])
    assert set(model.evaluate(x, y)) == {"loss"}


def test_evaluate_takes_the_compiled_metrics_over_the_default(rng):
    model = gb.Sequential([gb.Dense(4, 1)], backend="numpy")
    model.compile(loss="mse", metrics=["mae"])
    x, y = regression_data(rng)
    assert set(model.evaluate(x, y)) == {"loss", "mae"}


def test_a_history_reads_as_a_mapping_of_the_logged_names_to_their_values(rng):
    """``"val_loss" in history`` and ``list(history)`` fell back to history[0] (a KeyError)."""
    x, y = rng.normal(size=(16, 4)).astype(np.float32), np.arange(16) % 3
    history = dense_model().fit(x, y, epochs=2, validation_split=0.25, metrics=["accuracy"], verbose=0)
    assert "val_loss" in history and "f1" not in history and 0 not in history
    assert list(history) == list(history.keys()) == ["loss", "accuracy", "val_loss", "val_accuracy"]
    assert len(history) == 4 and dict(history) == dict(history.items()) == history.history
    assert history.get("f1") is None and isinstance(history, Mapping)
    # As before it was a mapping: equal to itself only, and hashable.
    twin = history.until(2)
    assert twin.history == history.history and twin != history and len({history, twin}) == 2


def test_class_and_sample_weight_together_weigh_by_their_product_which_the_docs_credit_to_tf_keras_2(rng):
    """Keras 3 refuses the pair (ValueError); the docs once said gpubp multiplied them "as Keras does"."""
    for doc in (train.fit.__doc__, batches.sample_weights.__doc__):
        doc = " ".join(doc.split())
        assert "as tf.keras 2 did" in doc and "Keras 3 refuses" in doc, doc
    x, y = rng.normal(size=(12, 4)).astype(np.float32), np.arange(12) % 3
    w = rng.uniform(0.5, 2.0, 12)
    both, product = dense_model(), dense_model()
    both.fit(x, y, sample_weight=w, class_weight={0: 3.0, 2: 0.5}, shuffle=False, verbose=0)
    product.fit(x, y, sample_weight=w * np.array([3.0, 1.0, 0.5])[y], shuffle=False, verbose=0)
    for ours, theirs in zip(both.get_weights(), product.get_weights()):
        np.testing.assert_array_equal(ours, theirs)


# ----------------------------------------------------------------------------- metric names


def f1_at(threshold):
    return functools.partial(gb.metrics.f1, threshold=threshold)


def always_one(scores, y):
    return 1.0


def named_loss(scores, y):
    return 0.0


named_loss.__name__ = "loss"

SAME_NAMES = {  # metrics that were logged under one name, the last one's value kept
    "two partials of f1": ([f1_at(0.3), f1_at(0.7)], "metric"),
    "two lambdas": ([lambda s, t: 1.0, lambda s, t: 2.0], "<lambda>"),
    "a name and its function": (["accuracy", gb.metrics.accuracy], "accuracy"),
    "a function twice": ([always_one, always_one], "always_one"),
}


@pytest.mark.parametrize("call", ["evaluate", "fit", "compile"])
@pytest.mark.parametrize("metrics, name", SAME_NAMES.values(), ids=SAME_NAMES.keys())
def test_two_metrics_of_one_name_are_refused_naming_it_before_any_work(rng, call, metrics, name):
    from test_bad_input import rejected

    gb.seed(0)
    model = gb.Sequential([gb.Dense(3, 1, "sigmoid")], device="cpu")
    x, y = rng.normal(size=(16, 3)).astype(np.float32), rng.integers(0, 2, (16, 1)).astype(np.float32)
    with rejected(model, ValueError, rf"^metrics: two metrics are named '{re.escape(name)}', and each is logged "
                                     r"under its name; give each a name of its own"):
        if call == "evaluate":
            model.evaluate(x, y, loss="bce", metrics=metrics)
        elif call == "fit":
            model.fit(x, y, loss="bce", metrics=metrics, validation_data=(x, y), verbose=0)
        else:
            model.compile(loss="bce", metrics=metrics)


@pytest.mark.parametrize("call", ["evaluate", "fit"])
def test_a_metric_named_loss_is_refused_before_any_work(rng, call):
    """Its value took the loss's place in evaluate's result (and val_loss's in fit's History)."""
    from test_bad_input import rejected

    gb.seed(0)
    model = gb.Sequential([gb.Dense(3, 1, "sigmoid")], device="cpu")
    x, y = rng.normal(size=(16, 3)).astype(np.float32), rng.integers(0, 2, (16, 1)).astype(np.float32)
    with rejected(model, ValueError, r"^metrics: a metric is named 'loss', the name the loss is logged under"):
        if call == "evaluate":
            model.evaluate(x, y, loss="bce", metrics=[named_loss])
        else:
            model.fit(x, y, loss="bce", metrics=[named_loss], validation_data=(x, y), verbose=0)


def test_metrics_of_one_function_are_all_reported_once_each_has_a_name_of_its_own(rng):
    """The remedy the refusal names: a callable's name attribute (a partial has no __name__)."""
    gb.seed(0)
    model = gb.Sequential([gb.Dense(3, 1, "sigmoid")], device="cpu")
    x, y = rng.normal(size=(16, 3)).astype(np.float32), rng.integers(0, 2, (16, 1)).astype(np.float32)
    low, high = f1_at(0.3), f1_at(0.7)
    with pytest.raises(ValueError, match="^metrics: two metrics are named 'metric'"):
        model.evaluate(x, y, loss="bce", metrics=[low, high, "f1"])
    low.name, high.name = "f1_at_0.3", "f1_at_0.7"
    result = model.evaluate(x, y, loss="bce", metrics=[low, high, "f1"])
    assert set(result) == {"loss", "f1_at_0.3", "f1_at_0.7", "f1"}


# ----------------------------------------------------------------------------- evaluate's label check


def test_evaluate_without_a_loss_range_checks_float_class_labels_as_integer_ones():
    """Whole-number float labels out of range passed (an accuracy of 5.0 against classes 0-2)
    where integer ones were refused; a float that is no whole number is refused before any
    prediction, whatever the metrics."""
    gb.seed(0)
    model = gb.Sequential([gb.Dense(3, 3)], device="cpu")
    x = np.zeros((6, 3), np.float32)
    for labels in (np.array([0, 5, 1, 2, 0, 1]), np.array([0.0, 5, 1, 2, 0, 1]),
                   np.array([[0.0], [5], [1], [2], [0], [1]], np.float32)):
        with pytest.raises(ValueError, match=r"^y: expected class labels in \[0, 3\), got values from 0\.?0? to 5"):
            model.evaluate(x, labels)
    with pytest.raises(ValueError, match=r"^y: expected class labels \(whole numbers\), got 1\.5 in row 2$"):
        model.evaluate(x, np.array([0.0, 2, 1.5, 2, 0, 1]), metrics=[])
    with gb.trace() as t, pytest.raises(ValueError, match=r"^y: expected class labels \(whole numbers\), got -1\.5"):
        model.evaluate(x, np.array([0.0, 2, 1, 2, 0, -1.5]), metrics=[always_one])
    assert t.total == 0
    labels = np.array([0, 2, 1, 2, 0, 1])
    assert model.evaluate(x, labels.astype(np.float64)) == model.evaluate(x, labels)


# ----------------------------------------------------------------------------- threads


def test_a_numpy_scratch_buffer_is_private_to_its_thread():
    shape, dtype = (3, 5), np.dtype(np.float32)
    here = numpy_backend._scratch("dz", shape, dtype)
    there = []
    thread = threading.Thread(target=lambda: there.append(numpy_backend._scratch("dz", shape, dtype)))
    thread.start()
    thread.join()
    assert there[0] is not here
    assert numpy_backend._scratch("dz", shape, dtype) is here  # reused within a thread


@pytest.mark.slow
def test_two_models_trained_in_two_threads_end_as_when_trained_one_after_the_other(rng):
    data = [(rng.normal(size=(256, 64)).astype(np.float32), rng.integers(0, 10, 256)) for _ in range(2)]

    def build(i):  # on the calling thread: the initial weights come from the one global random stream
        gb.seed(i)
        model = gb.Sequential([gb.Dense(64, 256, "tanh"), gb.Dense(256, 256, "gelu"), gb.Dense(256, 10)],
                              backend="numpy")
        return model.train_step("cross_entropy", gb.optim.SGD(model.parameters(), lr=0.05))

    def train(i, step, results):
        for _ in range(15):
            step(*data[i])
        results[i] = step.model.get_weights()

    one_by_one, together = {}, {}
    for i in range(2):
        train(i, build(i), one_by_one)
    threads = [threading.Thread(target=train, args=(i, build(i), together)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i in range(2):
        for alone, threaded in zip(one_by_one[i], together[i]):
            np.testing.assert_array_equal(alone, threaded)


# ----------------------------------------------------------------------------- arguments of the wrong kind


def test_fit_with_a_number_for_y_names_y(rng):
    x = rng.normal(size=(4, 4)).astype(np.float32)
    with pytest.raises(TypeError, match="y: expected an array of targets, one per row of x, got int 3"):
        dense_model().fit(x, 3, verbose=0)


def test_an_activation_that_is_not_a_name_is_a_type_error_naming_activation():
    with pytest.raises(TypeError, match=r"activation must be a str or None, got list \['relu'\]"):
        gb.Dense(4, 3, ["relu"])


@pytest.mark.parametrize("make", [lambda: gb.Dense(4, 3), lambda: gb.Dropout(0.5)], ids=["dense", "dropout"])
@pytest.mark.parametrize("value", ["no", 0, None])
def test_a_layers_trainable_takes_true_or_false_only(make, value):
    layer = make()
    with pytest.raises(TypeError, match="trainable: expected True or False"):
        layer.trainable = value
    assert layer.trainable == bool(layer.parameters())


@pytest.mark.parametrize("call", [lambda m: m.backward(np.ones((2, 2), np.float32)), lambda m: m.compile(),
                                  lambda m: m.train_step()], ids=["backward", "compile", "train_step"])
def test_a_model_without_layers_says_so_in_backward_compile_and_train_step(call):
    with pytest.raises(ValueError, match="the model has no layers"):
        call(gb.Sequential([], backend="numpy"))


def test_gradcheck_calls_a_loss_of_your_own_as_fit_does():
    """gpubp.gradcheck takes a loss callable as fit does: (pred, target) -> (loss, grad), no backend=."""
    from gpubp import gradcheck

    def half_squares(pred, target):
        err = pred - target
        return float(0.5 * np.sum(err * err) / len(pred)), err / len(pred)

    gb.seed(0)
    model = gb.Sequential([gb.Dense(3, 4, "tanh"), gb.Dense(4, 2)], dtype="float64")
    x, target = np.random.default_rng(0).standard_normal((5, 3)), np.random.default_rng(1).standard_normal((5, 2))
    _, analytic = gradcheck.analytic_gradients(model, x, target, loss=half_squares)
    numeric = gradcheck.numerical_gradients(model, x, target, loss=half_squares)
    for name, grad in analytic.items():
        np.testing.assert_allclose(grad, numeric[name], rtol=1e-6, atol=1e-8, err_msg=name)


def test_a_batch_size_of_none_is_the_default_as_in_keras(rng):
    x = rng.standard_normal((70, 4)).astype(np.float32)
    y = rng.integers(0, 3, 70)
    histories, outputs = [], []
    for batch_size in (None, 32):
        gb.seed(3)
        model = gb.Sequential([gb.Dense(4, 8, "relu"), gb.Dense(8, 3)], device="cpu")
        histories.append(model.fit(x, y, epochs=2, batch_size=batch_size, verbose=0).history["loss"])
        outputs.append(model.predict(x, batch_size=None if batch_size is None else 1024))
        assert set(model.evaluate(x, y, batch_size=batch_size)) >= {"loss"}
    assert histories[0] == histories[1]
    np.testing.assert_array_equal(outputs[0], outputs[1])


# ----------------------------------------------------------------------------- copies


def pickled(obj):
    return pickle.loads(pickle.dumps(obj))


@pytest.mark.parametrize("copier", [copy.deepcopy, pickled], ids=["deepcopy", "pickle"])
def test_a_copy_of_a_fitted_model_keeps_compile_and_history_and_trains_as_the_original(copier, rng):
    x, y = rng.standard_normal((24, 4)).astype(np.float32), rng.integers(0, 3, 24)
    model = dense_model()
    model.compile("sgd", loss="cross_entropy", metrics=["accuracy"], learning_rate=0.2)
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    twin = copier(model)
    assert twin._compiled == model._compiled and twin.loss is model.loss
    assert twin.history.history == model.history.history and twin.history is not model.history
    assert not hasattr(twin, "optimizer")  # fit sets it again: its state is keyed by the original's parameters
    for net in (twin, model):  # the copy first: training it leaves the original as it was
        gb.seed(9)
        net.fit(x, y, epochs=2, batch_size=8, verbose=0)
    for mine, theirs in zip(twin.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(mine, theirs)


@pytest.mark.parametrize("copier", [copy.deepcopy, pickled], ids=["deepcopy", "pickle"])
def test_an_optimizer_compiled_as_an_instance_is_rebuilt_over_the_copys_parameters(copier, rng):
    model = dense_model()
    model.compile(gb.optim.SGD([{"params": model[0].parameters(), "lr": 0.05}, {"params": model[1].parameters()}],
                               lr=0.1, momentum=0.9))
    x, y = rng.standard_normal((16, 4)).astype(np.float32), rng.integers(0, 3, 16)
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    twin = copier(model)
    optimizer = twin._compiled["optimizer"]
    assert type(optimizer) is gb.optim.SGD and optimizer.state == {}
    assert [group["params"] for group in optimizer.param_groups] == [twin[0].parameters(), twin[1].parameters()]
    assert [(group["lr"], group["momentum"]) for group in optimizer.param_groups] == [(0.05, 0.9), (0.1, 0.9)]
    before = model.get_weights()
    twin.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert twin.optimizer is optimizer
    for now, then in zip(model.get_weights(), before):
        np.testing.assert_array_equal(now, then)
