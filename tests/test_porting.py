"""Scripts written with Keras or PyTorch habits: softmax and sigmoid outputs with their fused
losses, compile() and Keras names, fit(learning_rate=...), the input gradient after a plain
forward, and evaluate's checks. The four workflows of a port come first."""

import numpy as np
import pytest

import gpubp as gb
from gpubp import losses, optim


def bce_of_probabilities(p, t):
    return float(-np.mean(t * np.log(p) + (1 - t) * np.log(1 - p)))


def ce_of_probabilities(p, onehot):
    return float(-np.mean(np.sum(onehot * np.log(p), axis=1)))


# ----------------------------------------------------------------------------- the four workflows


def test_xor_with_a_sigmoid_output_compiled_with_keras_names_reports_the_metrics_of_predict():
    gb.seed(0)
    x, y = gb.data.xor()
    model = gb.Sequential([gb.Dense(2, 4, "relu"), gb.Dense(4, 1, "sigmoid")], device="cpu")
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"], learning_rate=0.05)
    model.fit(x, y, epochs=300, batch_size=4, verbose=0)
    p = model.predict(x)
    result = model.evaluate(x, y)
    assert set(result) == {"loss", "accuracy"}
    assert result["accuracy"] == np.mean((p > 0.5) == (y > 0.5)) == 1.0
    assert result["loss"] == pytest.approx(bce_of_probabilities(p, y), abs=1e-4)


def test_digits_with_a_softmax_output_report_the_cross_entropy_of_the_probabilities():
    pytest.importorskip("sklearn", reason="load_digits needs scikit-learn: pip install 'gpubp[dev]'")
    x, y = gb.data.load_digits()
    x, y = x[:600], y[:600]
    gb.seed(0)
    model = gb.Sequential([gb.Dense(64, 32, "relu"), gb.Dense(32, 10, "softmax")], device="cpu")
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"], learning_rate=0.01)
    history = model.fit(x, y, epochs=10, batch_size=32, verbose=0)
    p = model.predict(x)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-5)
    result = model.evaluate(x, y)
    assert result["loss"] == pytest.approx(ce_of_probabilities(p, np.eye(10)[y]), abs=1e-4)
    assert result["accuracy"] == np.mean(p.argmax(axis=1) == y) > 0.9
    assert history["loss"][-1] < history["loss"][0]


def test_set_weights_then_fit_at_learning_rate_zero_leaves_the_weights_unchanged():
    x, y = gb.data.regression(n_samples=64, n_features=4, seed=0)
    gb.seed(0)
    model = gb.Sequential([gb.Dense(4, 8, "tanh"), gb.Dense(8, 1)], device="cpu")
    model.compile(optimizer="adam", loss="mse")
    pretrained = [w + 0.1 for w in model.get_weights()]
    model.set_weights(pretrained)
    model.fit(x, y, epochs=2, batch_size=16, verbose=0, learning_rate=0.0)
    for before, after in zip(pretrained, model.get_weights()):
        np.testing.assert_array_equal(after, before.astype(np.float32))
    model.fit(x, y, epochs=1, batch_size=16, verbose=0, learning_rate=1e-2)
    assert not np.array_equal(model.get_weights()[0], pretrained[0].astype(np.float32))


def test_two_sigmoid_hidden_layers_and_a_linear_head_fit_one_point_with_mse_and_sgd():
    x, y = np.array([[1.0, 2.0]], np.float32), np.array([[3.0, 4.0]], np.float32)
    gb.seed(0)
    model = gb.Sequential([gb.Dense(2, 3, "sigmoid"), gb.Dense(3, 3, "sigmoid"), gb.Dense(3, 2)], device="cpu")
    model.compile(optimizer="sgd", loss="mean_squared_error", learning_rate=0.1)
    history = model.fit(x, y, epochs=200, batch_size=1, verbose=0)
    assert history["loss"][-1] < 1e-4
    np.testing.assert_allclose(model.predict(x), y, atol=1e-2)


# ----------------------------------------------------------------------------- softmax


def test_softmax_below_the_last_layer_is_rejected():
    with pytest.raises(ValueError, match=r"layers\[0\]: activation 'softmax' is allowed on the last layer only"):
        gb.Sequential([gb.Dense(3, 4, "softmax"), gb.Dense(4, 2)], device="cpu")


def test_an_unknown_activation_is_rejected_with_the_list_that_includes_softmax():
    with pytest.raises(ValueError, match=r"activation: unknown activation 'mish'; expected one of .*'softmax'"):
        gb.Dense(3, 4, "mish")


@pytest.mark.parametrize("logits", [False, True])
def test_backward_plan_of_a_softmax_output_names_its_jacobian_kernel_unless_fused(rng, logits):
    model = head_model("softmax", 3, "numpy")
    model.forward(rng.normal(size=(5, 4)).astype(np.float32), logits=logits)
    plan = model.backward_plan(logits=logits)
    with gb.trace() as t:
        model.backward(rng.normal(size=(5, 3)).astype(np.float32))
    assert t.launches == [k for _, kernels in reversed(plan) for k in kernels]
    assert ("softmax_bwd" in t.launches) is not logits


def test_a_softmax_model_saves_and_loads_with_its_output_activation(tmp_path, rng):
    model = head_model("softmax", 3, "numpy")
    model.save(tmp_path / "m.npz")
    loaded = gb.load(tmp_path / "m.npz", device="cpu")
    x = rng.normal(size=(4, 4)).astype(np.float32)
    assert loaded[-1].activation == "softmax"
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))


# ----------------------------------------------------------------------------- fused output losses

HEADS = [  # (output activation, its loss, width)
    ("sigmoid", "binary_cross_entropy", 1),
    ("softmax", "cross_entropy", 3),
    ("softmax", "categorical_cross_entropy", 3),
]
HEAD_IDS = [loss for _, loss, _ in HEADS]


def random_targets(loss, n, width, rng):
    if loss == "binary_cross_entropy":
        return rng.integers(0, 2, (n, width)).astype(np.float32)
    labels = rng.integers(0, width, n)
    return np.eye(width, dtype=np.float32)[labels] if loss == "categorical_cross_entropy" else labels


def loss_of_probabilities(loss, p, t):
    if loss == "binary_cross_entropy":
        return bce_of_probabilities(p, t), (p - t) / (p * (1 - p)) / p.size
    onehot = t if t.ndim == 2 else np.eye(p.shape[1])[t]
    return ce_of_probabilities(p, onehot), -onehot / p / len(p)


def head_model(head, width, backend):
    gb.seed(3)
    return gb.Sequential([gb.Dense(4, 5, "tanh"), gb.Dense(5, width, head)], backend=backend)


@pytest.mark.parametrize("head, loss, width", HEADS, ids=HEAD_IDS)
def test_fused_loss_on_the_logits_has_the_value_and_gradient_of_the_loss_of_the_probabilities(
        backend, rng, head, loss, width):
    model = head_model(head, width, backend)
    x = rng.normal(size=(6, 4)).astype(np.float32)
    t = random_targets(loss, 6, width, rng)
    value, dlogits = losses.get(loss)(model.forward(x, logits=True), t, backend=model.backend)
    model.backward(dlogits)
    fused = [model.backend.to_host(p.grad).copy() for p in model.parameters()]
    # The same loss written on the probabilities, sent back through the activation's own backward.
    p = model.backend.to_host(model.forward(x)).astype(np.float64)
    expected, dprobs = loss_of_probabilities(loss, p, t)
    model.backward(dprobs.astype(np.float32))
    assert value == pytest.approx(expected, abs=1e-5)
    for got, want in zip(fused, (model.backend.to_host(p.grad) for p in model.parameters())):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("head, loss, width", HEADS, ids=HEAD_IDS)
def test_evaluate_reports_the_loss_and_accuracy_of_what_predict_returns(backend, rng, head, loss, width):
    model = head_model(head, width, backend)
    x = rng.normal(size=(12, 4)).astype(np.float32)
    t = random_targets(loss, 12, width, rng)
    model.fit(x, t, loss=loss, optimizer="adam", epochs=1, batch_size=12, verbose=0)
    p = model.predict(x)
    result = model.evaluate(x, t, metrics=["accuracy"])
    assert result["loss"] == pytest.approx(loss_of_probabilities(loss, p.astype(np.float64), t)[0], abs=1e-4)
    if head == "sigmoid":
        assert result["accuracy"] == pytest.approx(np.mean((p > 0.5) == (t > 0.5)))
    else:
        labels = t.argmax(axis=1) if t.ndim == 2 else t
        assert result["accuracy"] == pytest.approx(np.mean(p.argmax(axis=1) == labels))


@pytest.mark.parametrize("head, loss, width", HEADS, ids=HEAD_IDS)
def test_fit_with_a_fused_head_launches_no_activation_kernel_of_its_own(rng, head, loss, width):
    model = head_model(head, width, "numpy")
    x = rng.normal(size=(6, 4)).astype(np.float32)
    with gb.trace() as t:
        model.fit(x, random_targets(loss, 6, width, rng), loss=loss, epochs=1, batch_size=6, verbose=0)
    assert t.counts["softmax_fwd"] == t.counts["softmax_bwd"] == 0
    assert t.counts["ce_fwd_bwd" if head == "softmax" else "bce_fwd_bwd"] == 1


def test_a_sigmoid_output_with_mse_trains_through_the_sigmoid_backward(rng):
    model = head_model("sigmoid", 1, "numpy")
    x = rng.normal(size=(8, 4)).astype(np.float32)
    y = rng.uniform(size=(8, 1)).astype(np.float32)
    history = model.fit(x, y, loss="mse", optimizer=optim.SGD(model.parameters(), lr=0.5), epochs=20, batch_size=8,
                        verbose=0)
    assert history["loss"][-1] < history["loss"][0]
    assert model.evaluate(x, y, metrics=[])["loss"] == pytest.approx(float(np.mean((model.predict(x) - y) ** 2)),
                                                                      rel=1e-5)


# ----------------------------------------------------------------------------- compile and names


def test_compile_sets_the_optimizer_loss_and_metrics_of_fit_and_evaluate(rng):
    model = head_model(None, 1, "numpy")
    x, y = rng.normal(size=(8, 4)).astype(np.float32), rng.normal(size=(8, 1)).astype(np.float32)
    model.compile(optimizer="sgd", loss="mean_squared_error", metrics=["mae"])
    with gb.trace() as t:
        model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert t.counts["sgd_update"] == 4 and t.counts["mse_fwd_bwd"] == 1
    assert set(model.evaluate(x, y)) == {"loss", "mae"}


def test_compiled_learning_rate_is_the_rate_of_each_fit(rng):
    model = head_model(None, 1, "numpy")
    x, y = rng.normal(size=(8, 4)).astype(np.float32), rng.normal(size=(8, 1)).astype(np.float32)
    model.forward(x)
    model.backward(losses.mse(model.forward(x), y)[1])
    expected = [w - 0.25 * p.grad for w, p in zip(model.get_weights(), model.parameters())]
    model.compile(optimizer="sgd", loss="mse", learning_rate=0.25)
    model.fit(x, y, epochs=1, batch_size=8, shuffle=False, verbose=0)
    for got, want in zip(model.get_weights(), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_fit_with_rmsprop_by_name_lowers_the_loss(rng):
    model = head_model(None, 1, "numpy")
    x = rng.normal(size=(64, 4)).astype(np.float32)
    y = (x @ np.array([[1.0], [-2.0], [0.5], [0.0]], np.float32)).astype(np.float32)
    model.compile(optimizer="rmsprop", loss="mse", learning_rate=0.01)
    before = model.evaluate(x, y)["loss"]
    with gb.trace() as t:
        model.fit(x, y, epochs=20, batch_size=16, verbose=0)
    assert t.counts["rmsprop_update"] == 20 * 4 * 4  # epochs x batches x parameters
    assert model.evaluate(x, y)["loss"] < 0.2 * before


@pytest.mark.parametrize("name", sorted(optim.OPTIMIZERS))
def test_every_optimizer_name_compiles(name):
    model = head_model(None, 1, "numpy")
    model.compile(optimizer=name, loss="mse")


def test_optimizer_names_cover_every_optimizer_class():
    def subclasses(cls):
        return {cls} | {s for sub in cls.__subclasses__() for s in subclasses(sub)}

    # gpubp's own: a test elsewhere in this process may have subclassed one (a user's optimizer).
    ours = {cls for cls in subclasses(optim.Optimizer) if cls.__module__.startswith("gpubp.")}
    assert len(ours) > 1 and ours - {optim.Optimizer} <= set(optim.OPTIMIZERS.values())


def test_an_unknown_optimizer_name_is_rejected_with_the_known_names():
    model = head_model(None, 1, "numpy")
    before = model.get_weights()
    known = r"expected one of \['adam', 'adamw', 'rmsprop', 'sgd'\]"
    with pytest.raises(ValueError, match=r"optimizer: unknown optimizer 'adagrad'; " + known):
        model.compile(optimizer="adagrad", loss="mse")
    with pytest.raises(ValueError, match="optimizer: unknown optimizer 'adagrad'"):
        model.fit(np.ones((2, 4), np.float32), np.ones((2, 1), np.float32), loss="mse", optimizer="adagrad")
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_categorical_cross_entropy_of_one_hot_rows_is_cross_entropy_of_their_labels(rng):
    logits = rng.normal(size=(5, 3)).astype(np.float32)
    labels = np.array([0, 2, 1, 1, 0])
    value, grad = losses.get("categorical_crossentropy")(logits, np.eye(3)[labels])
    expected_value, expected_grad = losses.cross_entropy(logits, labels)
    assert value == pytest.approx(expected_value, rel=1e-6)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-6)


def test_categorical_cross_entropy_rejects_rows_that_are_not_one_hot():
    with pytest.raises(ValueError, match="target: expected one-hot rows"):
        losses.categorical_cross_entropy(np.zeros((2, 3), np.float32), np.array([[0.5, 0.5, 0.0], [1, 0, 0]]))


def test_fit_with_categorical_cross_entropy_rejects_labels_before_any_step():
    model = head_model("softmax", 3, "numpy")
    before = model.get_weights()
    with pytest.raises(ValueError, match="y: categorical_cross_entropy expects one-hot rows"):
        model.fit(np.ones((2, 4), np.float32), np.array([[0.5, 0.5, 0.0], [1, 0, 0]]), loss="categorical_crossentropy",
                  verbose=0)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- fit(learning_rate=...)


def test_fit_learning_rate_holds_for_that_call_only():
    model = head_model(None, 1, "numpy")
    opt = optim.SGD(model.parameters(), lr=0.1)
    model.fit(np.ones((4, 4), np.float32), np.ones((4, 1), np.float32), loss="mse", optimizer=opt, verbose=0,
              learning_rate=0.0)
    assert [group["lr"] for group in opt.param_groups] == [0.1]


def test_a_named_optimizer_keeps_its_state_across_fit_calls(rng):
    x, y = rng.normal(size=(16, 4)).astype(np.float32), rng.normal(size=(16, 1)).astype(np.float32)

    def two_fits(optimizer_for):
        model = head_model(None, 1, "numpy")
        for _ in range(2):
            model.fit(x, y, loss="mse", optimizer=optimizer_for(model), epochs=1, batch_size=8, shuffle=False,
                      verbose=0)
        return model.get_weights()

    named = two_fits(lambda model: "adam")
    shared = {}
    one_instance = two_fits(lambda model: shared.setdefault("opt", optim.Adam(model.parameters())))
    fresh_each_time = two_fits(lambda model: optim.Adam(model.parameters()))
    for a, b in zip(named, one_instance):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(named[0], fresh_each_time[0])


def test_compile_builds_its_named_optimizer_afresh_and_fit_keeps_it_whatever_other_names_ran(rng):
    x, y = rng.normal(size=(16, 4)).astype(np.float32), rng.normal(size=(16, 1)).astype(np.float32)
    model = head_model(None, 1, "numpy")
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    adam = model.optimizer
    model.fit(x, y, optimizer="sgd", epochs=1, batch_size=8, verbose=0)
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert model.optimizer is adam and {s["step"] for s in adam.state.values()} == {4}
    model.compile(optimizer="adam", loss="mse", learning_rate=1e-5)  # Keras: a new optimizer, step 0
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert model.optimizer is not adam and {s["step"] for s in model.optimizer.state.values()} == {2}


def test_compiles_rate_is_not_forced_on_an_optimizer_given_to_fit(rng):
    x, y = rng.normal(size=(16, 4)).astype(np.float32), rng.normal(size=(16, 1)).astype(np.float32)
    model = head_model(None, 1, "numpy")
    model.compile(optimizer="adam", loss="mse", learning_rate=0.05)
    mine = optim.SGD(model.parameters(), lr=0.1)
    seen = []
    model.fit(x, y, optimizer=mine, epochs=1, batch_size=8, verbose=0, callbacks=[gb.callbacks.LambdaCallback(
        on_train_batch_begin=lambda batch, logs: seen.append(mine.param_groups[0]["lr"]))])
    assert seen == [0.1, 0.1]
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[gb.callbacks.LambdaCallback(
        on_train_batch_begin=lambda batch, logs: seen.append(model.optimizer.param_groups[0]["lr"]))])
    assert seen[2:] == [0.05, 0.05]


# ----------------------------------------------------------------------------- input gradient


def test_input_gradient_after_a_plain_training_forward_equals_the_one_asked_for_up_front(rng):
    model = head_model("tanh", 3, "numpy")
    x = rng.normal(size=(5, 4)).astype(np.float32)
    dout = rng.normal(size=(5, 3)).astype(np.float32)
    model.forward(x, need_input_grad=True)
    expected = model.backward(dout, need_input_grad=True).copy()
    model.forward(x)
    np.testing.assert_allclose(model.backward(dout, need_input_grad=True), expected, rtol=1e-6)


def test_input_gradient_below_a_frozen_first_layer_says_to_ask_forward_for_it(rng):
    model = head_model("tanh", 3, "numpy")
    model[0].freeze()
    model.forward(rng.normal(size=(5, 4)).astype(np.float32))
    with pytest.raises(RuntimeError, match="pass need_input_grad=True to forward"):
        model.backward(np.ones((5, 3), np.float32), need_input_grad=True)
    assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------- evaluate's label check


@pytest.mark.parametrize("loss", [None, "cross_entropy"])
def test_evaluate_range_checks_class_labels_with_or_without_a_loss(loss):
    model = head_model("softmax", 3, "numpy")
    with pytest.raises(ValueError, match=r"y: expected class labels in \[0, 3\), got values from 0 to 5"):
        model.evaluate(np.ones((3, 4), np.float32), np.array([0, 1, 5]), loss=loss, metrics=["accuracy"])


def test_evaluate_without_a_loss_takes_integer_targets_of_a_single_output_as_values():
    model = head_model(None, 1, "numpy")
    x, y = np.ones((3, 4), np.float32), np.array([3, 5, 7])
    expected = np.mean(np.abs(model.predict(x)[:, 0] - y))
    assert model.evaluate(x, y, metrics=["mae"])["mae"] == pytest.approx(expected, rel=1e-5)
