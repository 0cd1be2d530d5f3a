"""Weighted training as Keras does it: fit(class_weight=, sample_weight=), weighted validation
and evaluate, and bad weights refused before the first step with the weights unchanged."""

import numpy as np
import pytest

import gpubp as gb
from test_bad_input import assert_weights_equal


def classifier(seed=4, backend="numpy"):
    gb.seed(seed)
    return gb.Sequential([gb.Dense(5, 8, "tanh"), gb.Dense(8, 3)], backend=backend)


def data(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 5)).astype(np.float32), rng.integers(0, 3, n), rng.uniform(0, 2, n)


def test_one_batch_of_fit_is_the_sgd_step_of_the_weighted_mean_loss():
    x, y, w = data()
    model, manual = classifier(), classifier()
    history = model.fit(x, y, optimizer=gb.optim.SGD(model.parameters(), lr=0.5), sample_weight=w,
                        batch_size=len(x), shuffle=False, verbose=0)
    loss, dout = gb.losses.cross_entropy(manual.forward(x), y, sample_weight=w)  # tested against torch
    manual.backward(dout)
    gb.optim.SGD(manual.parameters(), lr=0.5).step()
    assert history["loss"] == [pytest.approx(loss, rel=1e-6)]
    for got, want in zip(model.get_weights(), manual.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


# The Numba backend (in the CUDA simulator) runs one small batch: its kernels are tested on their own.
@pytest.mark.parametrize("backend, n, epochs", [("numpy", 24, 2), ("numba", 6, 1)], indirect=["backend"])
def test_class_weight_is_the_sample_weight_of_each_samples_class(backend, n, epochs):
    x, y, w = data(n)
    runs = []
    for kwargs in ({"class_weight": {0: 0.5, 2: 3.0}, "sample_weight": w},
                   {"sample_weight": w * np.array([0.5, 1.0, 3.0])[y]}):
        model = classifier(backend=backend)
        gb.seed(9)
        history = model.fit(x, y, optimizer="adam", epochs=epochs, batch_size=8, verbose=0, **kwargs)
        runs.append((history["loss"], model.get_weights()))
    assert runs[0][0] == runs[1][0]
    for a, b in zip(runs[0][1], runs[1][1]):
        np.testing.assert_array_equal(a, b)


def test_class_weight_of_a_single_sigmoid_output_weighs_targets_0_and_1():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((30, 4)).astype(np.float32), (rng.random(30) > 0.6).astype(np.float32)
    runs = []
    for kwargs in ({"class_weight": {1: 4.0}}, {"sample_weight": np.where(y == 1, 4.0, 1.0)}):
        gb.seed(1)
        model = gb.Sequential([gb.Dense(4, 6, "relu"), gb.Dense(6, 1, "sigmoid")], device="cpu")
        runs.append(model.fit(x, y, loss="binary_crossentropy", epochs=2, batch_size=10, shuffle=False, verbose=0,
                              **kwargs)["loss"])
    assert runs[0] == runs[1]


def test_validation_data_weights_weigh_the_validation_loss_as_evaluate_does():
    x, y, w = data()
    model = classifier()
    history = model.fit(x[:30], y[:30], epochs=1, batch_size=10, verbose=0,
                        validation_data=(x[30:], y[30:], w[30:]), metrics=[])
    expected = model.evaluate(x[30:], y[30:], loss="cross_entropy", sample_weight=w[30:], metrics=[])["loss"]
    assert history["val_loss"] == [expected]
    assert expected != model.evaluate(x[30:], y[30:], loss="cross_entropy", metrics=[])["loss"]


def test_validation_split_holds_out_the_last_samples_weights_with_them():
    x, y, w = data()
    model = classifier()
    history = model.fit(x, y, epochs=1, batch_size=10, validation_split=0.25, sample_weight=w, verbose=0, metrics=[])
    expected = model.evaluate(x[30:], y[30:], loss="cross_entropy", sample_weight=w[30:], metrics=[])["loss"]
    assert history["val_loss"] == [expected]


def test_evaluate_weighs_each_samples_loss_and_divides_by_the_sample_count():
    x, y, w = data()
    model = classifier()
    logits = model.predict(x).astype(np.float64)
    per_sample = np.log(np.exp(logits).sum(axis=1)) - logits[np.arange(len(y)), y]
    result = model.evaluate(x, y, loss="cross_entropy", sample_weight=w, metrics=["accuracy"])
    assert result["loss"] == pytest.approx(np.sum(w * per_sample) / len(y), rel=1e-6)
    assert result["accuracy"] == model.evaluate(x, y, loss="cross_entropy", metrics=["accuracy"])["accuracy"]


def test_a_training_step_takes_sample_weights():
    x, y, w = data(16)
    stepped, fitted = classifier(), classifier()
    value = stepped.train_step("cross_entropy", gb.optim.SGD(stepped.parameters(), lr=0.1))(x, y, sample_weight=w)
    history = fitted.fit(x, y, optimizer=gb.optim.SGD(fitted.parameters(), lr=0.1), batch_size=16, shuffle=False,
                         sample_weight=w, verbose=0)
    assert value == history["loss"][0]
    assert_weights_equal(fitted.get_weights(), stepped)


BAD = [
    ({"sample_weight": np.ones(39)}, ValueError, r"sample_weight: expected 40 weights \(one per sample of x\)"),
    ({"sample_weight": np.r_[np.ones(39), -1.0]}, ValueError, "sample_weight: expected finite weights >= 0, got -1.0 "
                                                              "at sample 39"),
    ({"sample_weight": np.r_[np.nan, np.ones(39)]}, ValueError, "sample_weight: expected finite weights >= 0, got nan"),
    ({"class_weight": {3: 2.0}}, ValueError, r"class_weight: key 3 is not a class; the model's 3 output\(s\) give "
                                             "the classes 0 to 2"),
    ({"class_weight": {"cat": 2.0}}, ValueError, "class_weight: key 'cat' is not a class"),
    ({"class_weight": {1: -2.0}}, ValueError, r"class_weight\[1\]: expected a finite number >= 0, got -2.0"),
    ({"class_weight": [1.0, 2.0, 3.0]}, TypeError, r"class_weight: expected a dict \{class: weight\}, got list"),
    ({"validation_data": (np.zeros((4, 5), np.float32), np.zeros(4, np.int64), np.ones(3))}, ValueError,
     r"validation_data\[2\]: expected 4 weights \(one per sample of validation_data\)"),
]


@pytest.mark.parametrize("kwargs, error, message", BAD, ids=[m[:40] for _, _, m in BAD])
def test_bad_weights_are_refused_before_the_first_step_naming_the_argument(kwargs, error, message):
    x, y, _ = data()
    model = classifier()
    before = model.get_weights()
    with pytest.raises(error, match=message):
        model.fit(x, y, epochs=1, verbose=0, **kwargs)
    assert_weights_equal(before, model)


def test_class_weight_needs_targets_that_name_classes():
    x = np.zeros((3, 2), np.float32)
    model = gb.Sequential([gb.Dense(2, 1)], device="cpu")
    before = model.get_weights()
    with pytest.raises(ValueError, match=r"class_weight: the target of sample 1 \(\[7.2\]\) names no class in 0 to 1"):
        model.fit(x, np.array([0.0, 7.2, 1.0], np.float32), loss="mse", class_weight={1: 2.0}, verbose=0)
    assert_weights_equal(before, model)


def test_evaluate_with_weights_needs_a_loss():
    x, y, w = data()
    model = gb.Sequential([gb.Dense(5, 3)], device="cpu")
    with pytest.raises(ValueError, match="sample_weight: it weights the loss, and there is none"):
        model.evaluate(x, y, sample_weight=w)
