"""Dropout: the Philox4x32-10 generator, the mask it defines, and the layer on every backend.

The generator is held to the published known answers; the mask to its definition in
``gpubp.philox``; the layer to a hand computation (forward masked and scaled, backward through
the same mask), to central differences, to PyTorch given the same mask, and to the rules the
rest of the library keeps (seeded reproducibility, identity outside training, frozen layers
that skip work, nothing stored for the mask).
"""

from __future__ import annotations

import gc
import math

import numpy as np
import pytest

import gpubp as gb
from gpubp import _random, philox
from gpubp.activations import ACTIVATIONS
from gpubp.backends import numpy_backend
from gpubp.gradcheck import check_gradients
from gpubp.trace import trace
from test_layers import assert_trains_as

# Random123's tests/kat_vectors, the three "philox4x32 10" lines: counter (4 words), key (2 words) -> output.
KNOWN_ANSWERS = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def _u64(values):
    return [np.uint64(v) for v in values]


# ----------------------------------------------------------------------------- the generator


@pytest.mark.parametrize("counter, key, expected", KNOWN_ANSWERS)
def test_numpy_philox_gives_the_published_known_answers(counter, key, expected):
    words = philox.philox4x32_10_numpy(*counter, *key)
    assert [int(w) for w in words] == list(expected)
    assert all(w.dtype == np.uint32 for w in words)


@pytest.mark.parametrize("counter, key, expected", KNOWN_ANSWERS)
def test_scalar_philox_gives_the_published_known_answers_in_python_and_compiled(counter, key, expected):
    from gpubp.backends import _cpu_kernels

    assert [int(w) for w in philox.philox4x32_10(*_u64(counter), *_u64(key))] == list(expected)
    assert [int(w) for w in _cpu_kernels._philox(*_u64(counter), *_u64(key))] == list(expected)


def test_vectorized_philox_equals_the_scalar_one_element_by_element(rng):
    counters = rng.integers(0, 2**32, size=(4, 50), dtype=np.uint64).astype(np.uint32)
    key = rng.integers(0, 2**32, size=2)
    words = philox.philox4x32_10_numpy(*counters, *key)
    for i in range(50):
        expected = philox.philox4x32_10(*_u64(counters[:, i]), *_u64(key))
        assert [int(w[i]) for w in words] == [int(e) for e in expected]


def test_the_mask_reads_word_col_mod_4_at_counter_col_div_4_and_row():
    key, threshold = (0x12345678, 0x9ABCDEF0), philox.threshold(0.4)
    mask = philox.keep_mask(key, 7, 11, threshold)
    assert mask.shape == (7, 11)
    for row in range(7):
        for col in range(11):
            words = philox.philox4x32_10(*_u64((col // 4, row, 0, 0)), *_u64(key))
            assert mask[row, col] == (int(words[col % 4]) >= threshold)


def test_rate_zero_keeps_everything_and_the_threshold_follows_the_rate():
    assert philox.keep_mask((1, 2), 9, 9, philox.threshold(0.0)).all()
    assert philox.threshold(0.25) == 2**30
    assert philox.threshold(0.999999999999) <= 0xFFFFFFFF


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.4])
def test_the_mask_factors_are_float32_for_the_kernels_and_float64_when_asked(rate):
    """float32 by default, what the CUDA and Numba kernels take; float64 for float64 arrays, rounded
    once from 1 / (1 - rate), not from float32's rounding of it."""
    threshold, scale, keep_prob = philox.mask_constants(rate)
    assert (type(scale), type(keep_prob)) == (np.float32, np.float32)
    assert (threshold, scale, keep_prob) == (philox.threshold(rate), np.float32(1 / (1 - rate)), np.float32(1 - rate))
    assert philox.mask_constants(rate, np.float64) == (threshold, 1 / (1 - rate), 1 - rate)
    assert type(philox.mask_constants(rate, np.float64)[1]) is np.float64


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_the_fraction_dropped_is_within_binomial_bounds(rate):
    rows, cols = 300, 257
    dropped = 0
    for key in range(4):
        dropped += int((~philox.keep_mask((key, 99), rows, cols, philox.threshold(rate))).sum())
    n = 4 * rows * cols
    sigma = math.sqrt(n * rate * (1 - rate))
    assert abs(dropped - n * rate) < 5 * sigma  # a 5-sigma band: fails by chance about once in 1.7 million runs


def test_masks_of_different_keys_and_positions_are_independent():
    a = philox.keep_mask((1, 0), 200, 200, philox.threshold(0.5))
    b = philox.keep_mask((2, 0), 200, 200, philox.threshold(0.5))
    # Two independent fair masks agree on about half the elements; 5 sigma of 40000 trials is 1.25%.
    assert abs(float((a == b).mean()) - 0.5) < 0.0125
    assert abs(float((a[:, :100] == a[:, 100:]).mean()) - 0.5) < 0.0177  # the same key, other counters


# ----------------------------------------------------------------------------- the layer on NumPy


def dropout_model(act="relu", rate=0.5, dtype="float32", first=0.0, backend="numpy"):
    gb.seed(3)
    layers = [gb.Dense(7, 13, act, dtype=dtype), gb.Dropout(rate), gb.Dense(13, 5, dtype=dtype)]
    if first:
        layers.insert(0, gb.Dropout(first))
    return gb.Sequential(layers, backend=backend, dtype=dtype)


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, float("nan"), float("inf")])
def test_a_rate_outside_zero_to_one_is_refused_naming_rate(rate):
    with pytest.raises(ValueError, match=r"rate: expected a number in \[0, 1\)"):
        gb.Dropout(rate)


@pytest.mark.parametrize("above", [[gb.Dropout(0.2)], [gb.Dropout(0.2), gb.Dropout(0.1)]], ids=["one", "two"])
def test_nothing_stands_above_a_sigmoid_output_layer(above):
    """In training a Dropout there would scale probabilities past 1, and binary cross-entropy takes
    the sigmoid's logits: fit trained on the probabilities as if they were logits."""
    with pytest.raises(ValueError, match=r"layers\[2\]: a Dropout cannot stand above the sigmoid output layer "
                                         r"layers\[1\].*put it below the output layer"):
        gb.Sequential([gb.Dense(3, 4, "relu"), gb.Dense(4, 1, "sigmoid"), *above], device="cpu")


@pytest.mark.parametrize("layers", [
    lambda: [gb.Dense(3, 4, "sigmoid"), gb.Dropout(0.2), gb.Dense(4, 1, "sigmoid")],
    lambda: [gb.Dense(3, 4, "relu"), gb.Dense(4, 1, "tanh"), gb.Dropout(0.2)],
    lambda: [gb.Dense(3, 1), gb.Dropout(0.2)],
], ids=["sigmoid hidden", "tanh output", "identity output"])
def test_a_dropout_above_a_hidden_sigmoid_or_another_output_stays_allowed(layers):
    model = gb.Sequential(layers(), device="cpu")
    assert model.predict(np.ones((2, 3), np.float32)).shape == (2, 1)


@pytest.mark.parametrize("rate", ["0.5", None, True, [0.5]])
def test_a_rate_that_is_not_a_number_is_refused_naming_rate(rate):
    with pytest.raises(TypeError, match="rate: expected a number"):
        gb.Dropout(rate)


@pytest.mark.parametrize("rate, error", [(1.5, ValueError), (-0.1, ValueError), ("0.5", TypeError)])
def test_a_rate_set_after_construction_is_checked_as_the_constructors_and_the_old_one_stays(rate, error):
    """Set out of range, the rate trained on outputs scaled by a negative factor, and save wrote
    a file that load refuses."""
    model = gb.Sequential([gb.Dense(3, 4, "relu"), gb.Dropout(0.25), gb.Dense(4, 2)], device="cpu")
    with pytest.raises(error, match="rate: expected a number in \\[0, 1\\)"):
        model[1].rate = rate
    assert model[1].rate == 0.25
    model[1].rate = np.float32(0.5)
    assert model[1].rate == 0.5 and type(model[1].rate) is float


def test_a_dropout_pickled_with_a_plain_rate_attribute_loads():
    """Dropouts pickled before ``rate`` became a checked property hold it as ``rate``."""
    layer = gb.Dropout(0.3)
    state = layer.__getstate__()
    state["rate"] = state.pop("_rate")
    old = gb.Dropout.__new__(gb.Dropout)
    old.__setstate__(state)
    assert old.rate == 0.3 and repr(old) == "Dropout(0.3)"


def test_a_dropout_standing_first_takes_a_new_models_width_once_no_other_model_holds_it():
    dropout = gb.Dropout(0.2)
    first = gb.Sequential([dropout, gb.Dense(4, 3)], device="cpu")
    with pytest.raises(ValueError, match=r"layers\[0\]: this Dropout stands in another model at width 4.*"
                                         r"give this model a Dropout\(0.2\) of its own"):
        gb.Sequential([dropout, gb.Dense(6, 3)], device="cpu")
    assert (first[0].in_features, first.in_features) == (4, 4)  # the refused model took nothing
    same_width = gb.Sequential([dropout, gb.Dense(4, 2)], device="cpu")  # shared at its width
    assert same_width.predict(np.ones((2, 4), np.float32)).shape == (2, 2)
    del first, same_width
    gc.collect()
    second = gb.Sequential([dropout, gb.Dense(6, 3)], device="cpu")
    assert (second[0].in_features, second.in_features) == (6, 6)


def test_a_dropout_shared_between_models_keeps_the_width_of_the_model_that_holds_it():
    """Placed at width 5 in a second model, a Dropout of the first at width 8 showed 5 there."""
    dropout = gb.Dropout(0.1)
    first = gb.Sequential([gb.Dense(3, 8, "relu"), dropout, gb.Dense(8, 2)], device="cpu")
    with pytest.raises(ValueError, match=r"layers\[1\]: this Dropout stands in another model at width 8, "
                                         r"and layers\[0\] gives it 5"):
        gb.Sequential([gb.Dense(3, 5, "relu"), dropout, gb.Dense(5, 2)], device="cpu")
    assert (first[1].in_features, first[1].out_features) == (8, 8)


def test_a_dropout_takes_its_width_from_the_layer_below_or_standing_first_from_the_one_above():
    model = gb.Sequential([gb.Dropout(0.2), gb.Dense(4, 6), gb.Dropout(0.3), gb.Dense(6, 2)], device="cpu")
    assert [(layer.in_features, layer.out_features) for layer in model] == [(4, 4), (4, 6), (6, 6), (6, 2)]
    assert model.in_features == 4
    assert [layer.name for layer in model] == ["dropout_0", "dense_1", "dropout_2", "dense_3"]
    with pytest.raises(ValueError, match="no layer fixes the input width"):
        gb.Sequential([gb.Dropout(0.5)], device="cpu")


def hand_forward(model, x, keys):
    """The model's training forward computed by hand from the keys each Dropout drew."""
    h = x.astype(np.float64)
    for layer in model:
        if isinstance(layer, gb.Dropout):
            mask = philox.keep_mask(keys[layer.name], *h.shape, philox.threshold(layer.rate))
            h = np.where(mask, h * np.float32(1 / (1 - layer.rate)), 0.0)
        else:
            z = h @ layer.weight.data + layer.bias.data
            y = np.empty_like(z)
            gb.activations.forward(layer.activation, z, y)
            h = y
    return h


def drawn_keys(model, seed):
    """The keys a training forward after ``gb.seed(seed)`` draws, layer by layer."""
    generator = np.random.default_rng(seed)
    return {layer.name: philox.draw_key(generator) for layer in model if isinstance(layer, gb.Dropout)}


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "numpy"])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_the_training_forward_is_the_masked_and_scaled_output_and_predict_is_the_plain_one(rng, act, compiled):
    model = dropout_model(act, first=0.25)
    x = rng.standard_normal((9, 7)).astype(np.float32)
    with numpy_backend.compiled_kernels(compiled):
        gb.seed(42)
        out = model.forward(x)
        expected = hand_forward(model, x, drawn_keys(model, 42))
        np.testing.assert_allclose(out, expected, rtol=2e-5, atol=2e-6)
        plain = gb.Sequential([layer for layer in model if isinstance(layer, gb.Dense)], device="cpu")
        np.testing.assert_array_equal(model.predict(x), plain.predict(x))
        labels = rng.integers(0, 5, 9)
        assert model.evaluate(x, labels) == plain.evaluate(x, labels)


def test_the_compiled_and_the_numpy_kernels_give_the_same_masked_outputs_and_gradients(rng):
    x = rng.standard_normal((33, 7)).astype(np.float32)
    labels = rng.integers(0, 5, 33)
    results = []
    for compiled in (True, False):
        model = dropout_model("relu", first=0.3)
        with numpy_backend.compiled_kernels(compiled):
            gb.seed(8)
            out = model.forward(x, need_input_grad=True)
            _, dout = gb.losses.cross_entropy(out, labels)
            dx = model.backward(dout, need_input_grad=True)
        results.append([out, dx] + [p.grad for p in model.parameters()])
    np.testing.assert_array_equal(results[0][0], results[1][0])  # the same masks, the same float32 products
    for a, b in zip(results[0][1:], results[1][1:]):  # the losses' compiled and NumPy passes round differently
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(a == 0, b == 0)


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "numpy"])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_backward_regenerates_the_mask_dz_is_dy_times_mask_over_keep_times_act_grad(rng, act, compiled):
    gb.seed(5)
    dense, dropout = gb.Dense(6, 11, act, dtype="float64"), gb.Dropout(0.4)
    # an identity map on top, so dy reaches the Dropout unchanged (nothing may stand above a sigmoid output)
    top = gb.Dense(11, 11, init=lambda rng, shape: np.eye(*shape))
    model = gb.Sequential([dense, dropout, top], device="cpu", dtype="float64")
    x = rng.standard_normal((10, 6))
    dy = rng.standard_normal((10, 11))
    with numpy_backend.compiled_kernels(compiled):
        gb.seed(77)
        model.forward(x, need_input_grad=True)
        dx = model.backward(dy, need_input_grad=True)
    mask = philox.keep_mask(drawn_keys(model, 77)["dropout_1"], 10, 11, philox.threshold(0.4))
    z = x @ dense.weight.data + dense.bias.data
    y = np.empty_like(z)
    gb.activations.forward(act, z, y)
    dz = np.empty_like(z)
    gb.activations.backward(act, dy * mask / 0.6, y, z, dz)
    np.testing.assert_allclose(dense.weight.grad, x.T @ dz, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(dense.bias.grad, dz.sum(0), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(dx, dz @ dense.weight.data.T, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("act", ["relu", "tanh", "gelu", "identity"])
def test_gradients_through_dropout_match_central_differences_with_the_keys_fixed(rng, act):
    model = dropout_model(act, rate=0.3, dtype="float64", first=0.2)
    x = rng.standard_normal((6, 7))
    errors = check_gradients(model, x, rng.integers(0, 5, 6), loss="cross_entropy", rtol=1e-5, atol=1e-7)
    assert set(errors) == {"input", "layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias"}


def test_gradients_match_pytorch_given_the_same_masks(rng):
    torch = pytest.importorskip("torch")
    model = dropout_model("gelu", rate=0.35, dtype="float64", first=0.15)
    x = rng.standard_normal((8, 7))
    labels = rng.integers(0, 5, 8)
    gb.seed(21)
    out = model.forward(x, need_input_grad=True)
    loss, dout = gb.losses.cross_entropy(out, labels)
    dx = model.backward(dout, need_input_grad=True)

    keys = drawn_keys(model, 21)
    h = torch.tensor(x, requires_grad=True)
    params = []
    t = h
    for layer in model:
        if isinstance(layer, gb.Dropout):
            mask = philox.keep_mask(keys[layer.name], *t.shape, philox.threshold(layer.rate))
            t = t * torch.tensor(mask, dtype=torch.float64) * (1 / (1 - layer.rate))  # float64's factor
        else:
            w = torch.tensor(layer.weight.data, requires_grad=True)
            b = torch.tensor(layer.bias.data, requires_grad=True)
            params += [w, b]
            t = t @ w + b
            t = torch.nn.functional.gelu(t) if layer.activation == "gelu" else t
    torch_loss = torch.nn.functional.cross_entropy(t, torch.tensor(labels))
    torch_loss.backward()
    np.testing.assert_allclose(out, t.detach().numpy(), rtol=1e-10, atol=1e-12)
    assert loss == pytest.approx(torch_loss.item(), rel=1e-10)
    np.testing.assert_allclose(dx, h.grad.numpy(), rtol=1e-9, atol=1e-12)
    for ours, theirs in zip(model.parameters(), params):
        np.testing.assert_allclose(ours.grad, theirs.grad.numpy(), rtol=1e-9, atol=1e-12)


def test_the_same_seed_gives_the_same_masks_and_training_and_another_seed_other_masks(rng):
    x = rng.standard_normal((40, 7)).astype(np.float32)
    labels = rng.integers(0, 5, 40)
    runs = []
    for seed in (1, 1, 2):
        model = dropout_model("relu", first=0.2)
        model.set_weights(dropout_model("relu", first=0.2).get_weights())
        gb.seed(seed)
        outs = [model.forward(x).copy() for _ in range(2)]
        history = model.fit(x, labels, epochs=2, batch_size=16, verbose=0)
        runs.append((outs, history.history["loss"], model.get_weights()))
    np.testing.assert_array_equal(runs[0][0][0], runs[1][0][0])
    assert not np.array_equal(runs[0][0][0], runs[0][0][1])  # each training forward draws a new key
    assert runs[0][1] == runs[1][1]
    for a, b in zip(runs[0][2], runs[1][2]):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(runs[0][0][0], runs[2][0][0])


def test_each_training_forward_draws_one_key_per_dropout_from_the_library_stream(rng):
    model = dropout_model("relu", first=0.2)
    x = rng.standard_normal((3, 7)).astype(np.float32)
    gb.seed(9)
    model.forward(x)
    after_training = _random.get_state()
    model.predict(x)
    model.forward(x, training=False)
    assert _random.get_state() == after_training  # inference draws nothing
    expected = np.random.default_rng(9)
    for _ in range(2):
        philox.draw_key(expected)
    assert after_training == expected.bit_generator.state


def test_a_dropout_of_rate_zero_changes_nothing(rng):
    x = rng.standard_normal((12, 7)).astype(np.float32)
    with_dropout = dropout_model("tanh", rate=0.0, first=0.0)
    plain = gb.Sequential([layer for layer in with_dropout if isinstance(layer, gb.Dense)], device="cpu")
    np.testing.assert_array_equal(with_dropout.forward(x), plain.forward(x))


def test_the_mask_is_never_stored(rng):
    x = rng.standard_normal((64, 7)).astype(np.float32)
    model = dropout_model("relu", first=0.5)
    plain = gb.Sequential([layer for layer in model if isinstance(layer, gb.Dense)], device="cpu")
    model.forward(x)
    with_dropout = model.activation_bytes()
    plain.forward(x)
    # The first Dense keeps the dropped input where it kept the input, and the Dense below the
    # second Dropout keeps its masked output where it kept its output: no array more.
    assert with_dropout == plain.activation_bytes() > 0


def test_backward_plan_says_a_mask_is_regenerated_only_by_a_layer_that_runs(rng):
    """Below the lowest trainable layer nothing runs, so no kernel regenerates a Dropout's mask there."""
    model = dropout_model("relu", first=0.2)
    model.freeze_to(len(model) - 1)
    plan = model.backward_plan()
    assert plan.notes == {} and [kernels for _, kernels in plan][:-1] == [[], [], []]
    assert "regenerated" not in str(plan)


def test_backward_plan_and_trace_show_the_dropout_and_frozen_layers_skip_work(rng):
    model = dropout_model("relu", first=0.2)
    x = rng.standard_normal((5, 7)).astype(np.float32)
    plan = model.backward_plan()
    assert list(plan) == [("dropout_0", []), ("dense_1", ["dropout_dz", "dense_dw"]), ("dropout_2", []),
                          ("dense_3", ["dense_dw", "dense_dx"])]
    assert "its mask is regenerated by dense_1's kernels" in str(plan)
    model.forward(x)
    with trace() as t:
        model.backward(np.ones((5, 5), np.float32))
    assert t.launches == ["dense_dw", "dense_dx", "dropout_dz", "dense_dw"]

    model[1].freeze()  # everything below the top Dense is frozen: no dz pass, no dX for it
    assert list(model.backward_plan()) == [("dropout_0", []), ("dense_1", []), ("dropout_2", []),
                                           ("dense_3", ["dense_dw"])]
    model.forward(x)
    with trace() as t:
        model.backward(np.ones((5, 5), np.float32))
    assert t.launches == ["dense_dw"] and model[1].weight.grad is None

    model.unfreeze()
    model.forward(x, need_input_grad=True)
    with trace() as t:
        model.backward(np.ones((5, 5), np.float32), need_input_grad=True)
    assert t.launches[-1] == "dropout_bwd"


def test_fit_trains_with_dropout_and_validation_sees_no_mask(rng):
    x = rng.standard_normal((120, 7)).astype(np.float32)
    labels = (x[:, 0] > 0).astype(np.int64)
    model = dropout_model("relu", rate=0.3, first=0.1)
    history = model.fit(x, labels, epochs=15, batch_size=20, validation_data=(x, labels), verbose=0,
                        optimizer=gb.optim.Adam(model.parameters(), lr=0.01))
    assert history.history["loss"][-1] < history.history["loss"][0]
    # validation runs the model as evaluate does: without masks
    assert history.history["val_loss"][-1] == pytest.approx(model.evaluate(x, labels)["loss"], rel=1e-6)


def test_a_dropout_on_top_of_the_model_and_after_another_dropout_runs_on_its_own(rng):
    gb.seed(0)
    model = gb.Sequential([gb.Dense(7, 9, "relu"), gb.Dropout(0.3), gb.Dropout(0.2), gb.Dense(9, 4),
                           gb.Dropout(0.1)], device="cpu")
    x = rng.standard_normal((6, 7)).astype(np.float32)
    gb.seed(4)
    with trace() as t:
        out = model.forward(x)
    assert t.launches == ["dense_fwd", "dropout_fwd", "dense_fwd"]  # the other two are in the Dense kernels
    np.testing.assert_allclose(out, hand_forward(model, x, drawn_keys(model, 4)), rtol=1e-5, atol=1e-6)
    model.backward(np.ones_like(out), need_input_grad=True)
    assert str(model.backward_plan()).count("regenerated") == 2


# Dropouts stacked around Dense layers whose input and output widths match (8 -> 8), where a pass
# through one could hand a Dense its own input buffer as its output: the rates standing at the
# input, above each of the three Dense layers (4 -> 8, 8 -> 8, 8 -> 3), the last on top.
DROPOUT_STACKS = {
    "two in a row": [[], [0.5, 0.5], [], []],
    "two of rate zero": [[], [0.0, 0.0], [], []],
    "three in a row": [[], [0.5, 0.3, 0.2], [], []],
    "at the input and on top": [[0.2, 0.2], [0.5], [0.4], [0.3, 0.3]],
    "everywhere": [[0.2], [0.5, 0.5], [0.4, 0.4], [0.1]],
}


def dropout_stack(rates, backend="numpy"):
    """(the three Dense layers with Dropouts of ``rates`` around them, the same Dense layers alone)."""
    gb.seed(5)
    plain = gb.Sequential([gb.Dense(4, 8, "relu"), gb.Dense(8, 8, "relu"), gb.Dense(8, 3)], backend=backend)
    layers = [gb.Dropout(rate) for rate in rates[0]]
    for i, between in enumerate(rates[1:]):
        layers += [gb.Dense(plain[i].in_features, plain[i].out_features, plain[i].activation)]
        layers += [gb.Dropout(rate) for rate in between]
    model = gb.Sequential(layers, backend=backend)
    model.set_weights(plain.get_weights())
    return model, plain


@pytest.mark.parametrize("rates", DROPOUT_STACKS.values(), ids=DROPOUT_STACKS.keys())
def test_dropouts_in_a_row_pass_through_predict_evaluate_and_forward(backend, rng, rates):
    """Outside training a Dropout returns its input: the Dense above it is handed a buffer that is
    not that input as its output, whatever stands in between."""
    model, plain = dropout_stack(rates, backend)
    x, labels = rng.standard_normal((11, 4)).astype(np.float32), rng.integers(0, 3, 11)
    expected = plain.predict(x)
    np.testing.assert_array_equal(model.predict(x), expected)
    np.testing.assert_array_equal(model.predict(x, batch_size=4), expected)
    np.testing.assert_array_equal(model.backend.to_host(model.forward(x, training=False)), expected)
    assert model.evaluate(x, labels, loss="cross_entropy") == plain.evaluate(x, labels, loss="cross_entropy")


@pytest.mark.parametrize("rates", DROPOUT_STACKS.values(), ids=DROPOUT_STACKS.keys())
def test_fit_validates_a_model_with_dropouts_in_a_row_as_evaluate_does(rng, rates):
    model, _ = dropout_stack(rates)
    x, labels = rng.standard_normal((40, 4)).astype(np.float32), rng.integers(0, 3, 40)
    history = model.fit(x, labels, epochs=2, batch_size=8, validation_split=0.25, verbose=0)
    assert history["val_loss"][-1] == model.evaluate(x[30:], labels[30:])["loss"]


@pytest.mark.parametrize("frozen", [(), (0,), (0, 1)], ids=["none", "bottom", "bottom_two"])
def test_dropouts_of_rate_zero_in_a_row_train_as_the_dense_layers_alone(rng, frozen):
    """Rate 0 keeps everything: the training forward, dX and the gradients are those without the
    Dropouts, with frozen layers below that keep nothing (their outputs in the model's scratch buffers)."""
    model, plain = dropout_stack(DROPOUT_STACKS["everywhere"])
    for layer in model:
        if isinstance(layer, gb.Dropout):
            layer.rate = 0.0
    for i in frozen:
        [layer for layer in model if isinstance(layer, gb.Dense)][i].freeze()
        plain[i].freeze()
    x, dout = rng.standard_normal((6, 4)).astype(np.float32), rng.standard_normal((6, 3)).astype(np.float32)
    assert_trains_as(model, plain, x, dout)


@pytest.mark.parametrize("on_top", [1, 2])
def test_logits_are_the_pre_activation_of_the_dense_below_dropouts_on_top(rng, on_top):
    """predict and forward's ``logits=True`` leave out the activation of the layer the Dropouts
    on top pass through (rate 0 here, so that the training forward is comparable too)."""
    gb.seed(0)
    plain = gb.Sequential([gb.Dense(4, 5, "relu"), gb.Dense(5, 3, "tanh")], device="cpu")
    model = gb.Sequential([gb.Dense(4, 5, "relu"), gb.Dense(5, 3, "tanh")] + [gb.Dropout(0.0) for _ in range(on_top)],
                          device="cpu")
    model.set_weights(plain.get_weights())
    x, dout = rng.standard_normal((6, 4)).astype(np.float32), rng.standard_normal((6, 3)).astype(np.float32)
    np.testing.assert_array_equal(model.predict(x, logits=True), plain.predict(x, logits=True))
    assert not np.allclose(model.predict(x, logits=True), model.predict(x))
    np.testing.assert_array_equal(model.forward(x, logits=True), plain.forward(x, logits=True))
    model.backward(dout)
    plain.backward(dout)
    for ours, reference in zip(model.parameters(), plain.parameters()):
        np.testing.assert_allclose(ours.grad, reference.grad, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- every backend


@pytest.mark.parametrize("act", ["relu", "sigmoid", "gelu", "identity"])
def test_every_backend_draws_the_same_masks_and_gradients_as_numpy(backend, rng, act):
    """The same seed gives the same masks on every backend (numba in the CUDA simulator here), on
    shapes that are not multiples of 4 columns nor of any tile."""
    x = rng.standard_normal((19, 7)).astype(np.float32)
    labels = rng.integers(0, 5, 19)
    results = {}
    for name in ("numpy", backend):
        model = dropout_model(act, rate=0.4, first=0.3, backend=name)
        gb.seed(12)
        out = model.forward(x, need_input_grad=True)
        _, dout = gb.losses.cross_entropy(out, labels, backend=model.backend)
        dx = model.backward(dout, need_input_grad=True)
        results[name] = [model.backend.to_host(a) for a in (out, dx, *(p.grad for p in model.parameters()))]
    for ours, reference in zip(results[backend], results["numpy"]):
        np.testing.assert_array_equal(ours == 0, reference == 0)  # the masks, exactly
        np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- files


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_save_and_load_keep_each_dropout_where_it_stands_with_its_rate(tmp_path, rng, suffix):
    model = dropout_model("relu", rate=0.35, first=0.15)
    model[3].freeze()
    model.save(tmp_path / f"m{suffix}")
    loaded = gb.load(tmp_path / f"m{suffix}", device="cpu")
    assert [repr(layer) for layer in loaded] == [repr(layer) for layer in model]
    assert [layer.name for layer in loaded] == [layer.name for layer in model]
    x = rng.standard_normal((11, 7)).astype(np.float32)
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))
    outs = []
    for m in (model, loaded):
        gb.seed(6)
        outs.append(m.forward(x))
    np.testing.assert_array_equal(*outs)  # the same masks: the same layers draw the same keys


@pytest.mark.parametrize("entry, message", [
    ([[9, 0.5, "d"]], "expected a position in"),
    ([[1, 1.0, "d"]], "expected a position in"),
    ([[1, 0.5, "d"], [1, 0.2, "e"]], "lists a position twice"),
    ([["1", 0.5, "d"]], r"must list \[position, rate, name\] entries"),
    ({"1": 0.5}, r"must list \[position, rate, name\] entries"),
])
def test_a_file_whose_dropout_entry_is_broken_is_refused_naming_it(tmp_path, entry, message):
    import json

    model = dropout_model()
    path = tmp_path / "m.npz"
    model.save(path)
    with np.load(path) as data:
        arrays = dict(data)
    header = json.loads(str(arrays["__architecture__"]))
    header["dropout"] = entry
    arrays["__architecture__"] = np.array(json.dumps(header))
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=message):
        gb.load(path, device="cpu")


def test_onnx_export_writes_no_node_for_a_dropout_and_runs_as_predict_in_onnxruntime(tmp_path, rng):
    pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    model = dropout_model("gelu", rate=0.4, first=0.2)
    gb.seed(0)
    model.fit(rng.standard_normal((30, 7)).astype(np.float32), rng.integers(0, 5, 30), epochs=1, verbose=0)
    path = tmp_path / "m.onnx"
    model.save(path)
    import onnx

    assert not [node for node in onnx.load(path).graph.node if node.op_type == "Dropout"]
    x = rng.standard_normal((13, 7)).astype(np.float32)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x})
    np.testing.assert_allclose(out, model.predict(x), rtol=1e-5, atol=1e-6)
    loaded = gb.load(path, device="cpu")  # the inference model: the Dense layers
    np.testing.assert_allclose(loaded.predict(x), model.predict(x), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- the torch bridge


def test_the_torch_mlp_of_a_sequential_given_its_keys_applies_its_masks_and_gives_its_gradients(rng, monkeypatch):
    """The MLP draws its keys from torch's stream (gpubp.torch._dropout_key); drawn from gpubp's, as
    a Sequential draws them, they give the Sequential's masks, outputs and gradients."""
    torch = pytest.importorskip("torch")
    import gpubp.torch
    from gpubp.torch import MLP

    monkeypatch.setattr(gpubp.torch, "_dropout_key", lambda: philox.draw_key(_random.generator()))
    model = dropout_model("tanh", rate=0.3, first=0.2)
    mlp = MLP.from_sequential(model)
    assert mlp.input_dropout == 0.2 and [layer.dropout for layer in mlp.layers] == [0.3, None]
    x = rng.standard_normal((10, 7)).astype(np.float32)
    dout = rng.standard_normal((10, 5)).astype(np.float32)
    gb.seed(31)
    out = model.forward(x, need_input_grad=True)
    dx = model.backward(dout, need_input_grad=True)
    gb.seed(31)
    x_torch = torch.tensor(x, requires_grad=True)
    out_torch = mlp(x_torch)
    out_torch.backward(torch.tensor(dout))
    np.testing.assert_array_equal(out_torch.detach().numpy(), out)
    np.testing.assert_allclose(x_torch.grad.numpy(), dx, rtol=1e-6, atol=1e-7)
    dense = [layer for layer in model if isinstance(layer, gb.Dense)]
    for ours, theirs in zip(dense, mlp.layers):
        np.testing.assert_allclose(theirs.weight.grad.numpy(), ours.weight.grad, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(theirs.bias.grad.numpy(), ours.bias.grad, rtol=1e-6, atol=1e-7)
    mlp.eval()  # as nn.Dropout: no mask outside training mode
    np.testing.assert_array_equal(mlp(torch.tensor(x)).detach().numpy(), model.predict(x))
    assert [repr(layer) for layer in mlp.to_sequential()] == [repr(layer) for layer in model]


def test_nn_dropout_converts_to_gpubp_and_back(rng):
    torch = pytest.importorskip("torch")
    from gpubp.gradcheck import to_torch
    from gpubp.torch import from_torch

    module = torch.nn.Sequential(torch.nn.Dropout(0.1), torch.nn.Linear(7, 13), torch.nn.ReLU(), torch.nn.Dropout(0.4),
                                 torch.nn.Linear(13, 5))
    mlp = from_torch(module)
    model = mlp.to_sequential()
    assert [repr(layer) for layer in model] == ["Dropout(0.1)", "Dense(7, 13, activation='relu')", "Dropout(0.4)",
                                                "Dense(13, 5, activation='identity')"]
    back = to_torch(model)
    assert [type(m).__name__ for m in back] == ["Dropout", "Linear", "ReLU", "Dropout", "Linear", "Identity"]
    assert [m.p for m in back if isinstance(m, torch.nn.Dropout)] == [0.1, 0.4]
    x = torch.tensor(rng.standard_normal((6, 7)).astype(np.float32))
    module.eval()
    np.testing.assert_allclose(model.predict(x.numpy()), module(x).detach().numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="a second nn.Dropout in a row"):
        from_torch(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1), torch.nn.Dropout(0.1)))
    with pytest.raises(ValueError, match="must directly follow an nn.Linear"):
        from_torch(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1), torch.nn.ReLU()))


def test_a_bad_dropout_rate_for_the_torch_mlp_names_its_argument():
    pytest.importorskip("torch")
    from gpubp.torch import MLP

    with pytest.raises(ValueError, match=r"input_dropout: expected a number in \[0, 1\)"):
        MLP([3, 4], input_dropout=1.0)
    with pytest.raises(TypeError, match="dropout: expected a number"):
        MLP([3, 4, 2], dropout="half")


# ----------------------------------------------------------------------------- scikit-learn


def test_the_sklearn_estimators_take_dropout_draw_masks_from_random_state_and_pickle(rng):
    pytest.importorskip("sklearn")
    import pickle

    from gpubp.sklearn import MLPClassifier, MLPRegressor

    x = rng.standard_normal((80, 5))
    y = (x[:, 0] > 0).astype(int)
    fits = [MLPClassifier((16, 8), dropout=0.25, max_iter=5, random_state=3, device="cpu").fit(x, y) for _ in range(2)]
    assert [type(layer).__name__ for layer in fits[0].model_] == ["Dense", "Dropout", "Dense", "Dropout", "Dense"]
    assert fits[0].loss_curve_ == fits[1].loss_curve_  # the same masks for the same random_state
    plain = MLPClassifier((16, 8), max_iter=5, random_state=3, device="cpu").fit(x, y)
    assert plain.loss_curve_ != fits[0].loss_curve_
    assert len(plain.model_) == 3 and fits[0].get_params()["dropout"] == 0.25
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(fits[0])).predict_proba(x), fits[0].predict_proba(x))
    with pytest.raises(ValueError, match=r"dropout: expected a number in \[0, 1\)"):
        MLPRegressor(dropout=1.5, device="cpu").fit(x, x[:, 0])


def test_fine_tuning_keeps_the_dropouts_and_counts_only_layers_with_weights_for_the_rates():
    from gpubp import finetune as ft

    model = dropout_model("relu", first=0.1)
    new = ft.replace_head(model, out_features=2)
    assert [repr(layer) for layer in new][:3] == [repr(layer) for layer in model][:3]
    assert new.out_features == 2 and isinstance(new[2], gb.Dropout)
    groups = ft.param_groups(new, lr=1.0, decay=0.5)
    assert [group["lr"] for group in groups] == [0.5, 1.0]


# ----------------------------------------------------------------------------- the README's ports


def test_the_readme_keras_port_with_dropout_runs(tmp_path, rng):
    from gpubp import callbacks as cb

    x = rng.standard_normal((200, 20)).astype(np.float32)
    y = rng.integers(0, 3, 200)
    gb.seed(0)
    model = gb.Sequential([gb.Dropout(0.1), gb.Dense(20, 64, "relu"), gb.Dropout(0.5), gb.Dense(64, 3, "softmax")],
                          device="cpu")
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy",
                  metrics=["sparse_categorical_accuracy"], learning_rate=1e-3)
    callbacks = [cb.LearningRateScheduler(lambda epoch, lr: lr if epoch < 10 else lr * 0.9),
                 cb.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=2),
                 cb.EarlyStopping(monitor="val_loss", patience=5, restore_best_weights=True),
                 cb.CSVLogger(str(tmp_path / "log.csv"), append=True), cb.TerminateOnNaN()]
    history = model.fit(x, y, epochs=3, batch_size=64, validation_split=0.1, class_weight={0: 1.0, 1: 3.0, 2: 1.0},
                        callbacks=callbacks, verbose=0)
    assert len(history.history["loss"]) == 3 and "val_sparse_categorical_accuracy" in history.history


def test_the_readme_pytorch_loop_port_with_dropout_runs(rng):
    from gpubp.optim.lr_scheduler import OneCycleLR

    batches = [(rng.standard_normal((16, 20)).astype(np.float32), rng.integers(0, 3, 16), rng.uniform(0, 2, 16))
               for _ in range(4)]
    gb.seed(0)
    model = gb.Sequential([gb.Dense(20, 64, "relu"), gb.Dropout(0.5), gb.Dense(64, 3)], device="cpu")
    opt = gb.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = OneCycleLR(opt, max_lr=0.1, epochs=2, steps_per_epoch=len(batches))
    step = model.train_step("cross_entropy", opt)
    losses = []
    for epoch in range(2):
        for xb, yb, wb in batches:
            losses.append(step(xb, yb, sample_weight=wb))
            scheduler.step()
    assert len(losses) == 8 and all(math.isfinite(value) for value in losses)


def test_the_masks_of_row_blocks_counted_from_their_first_row_make_the_whole_batchs_mask(rng):
    """What fit(distributed=True) relies on: each process masks its part of the global batch with
    rows counted from the part's first row, so together they draw the one-process mask."""
    x = rng.standard_normal((10, 7)).astype(np.float32)
    whole = philox.Mask(np.array([5, 6], np.uint32), *philox.mask_constants(0.5))
    parts = [numpy_backend.dropout_forward(x[lo:hi], whole._replace(first_row=lo)) for lo, hi in ((0, 4), (4, 10))]
    np.testing.assert_array_equal(np.concatenate(parts), numpy_backend.dropout_forward(x, whole))
    with numpy_backend.compiled_kernels(False):
        np.testing.assert_array_equal(numpy_backend.dropout_forward(x[4:], whole._replace(first_row=4)), parts[1])


def test_every_backend_counts_the_mask_rows_from_first_row(backend, rng):
    x = rng.standard_normal((9, 6)).astype(np.float32)
    w = rng.standard_normal((6, 11)).astype(np.float32)
    b = np.zeros(11, np.float32)
    module = gb.backends.get(backend)
    constants = philox.mask_constants(0.5)
    key = np.array([7, 8], np.uint32)
    host, device = philox.Mask(key, *constants, 5), philox.Mask(module.asarray(key, np.uint32), *constants, 5)
    np.testing.assert_array_equal(module.to_host(module.dropout_forward(module.asarray(x), device)),
                                  numpy_backend.dropout_forward(x, host))
    y, _ = module.dense_forward(module.asarray(x), module.asarray(w), module.asarray(b), "relu", dropout=device)
    y_ref, _ = numpy_backend.dense_forward(x, w, b, "relu", dropout=host)
    np.testing.assert_array_equal(module.to_host(y) == 0, y_ref == 0)
