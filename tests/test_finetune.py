"""Fine-tuning: freezing skips kernels and memory, optimizers leave frozen weights alone,
new heads, discriminative learning rates and gradual unfreezing."""

import functools
import warnings
from collections import Counter

import numpy as np
import pytest

import gpubp as gb
from gpubp import activations, backends
from gpubp import finetune as ft
from gpubp.backends import numpy_backend
from test_layers import Scale  # a layer of the user's own, without parameters


# Five layers, tiny widths (the Numba backend runs them in the CUDA simulator); gelu keeps
# its pre-activation and identity keeps nothing, so every storage rule is exercised.
SIZES = (5, 7, 6, 8, 4, 3)
ACTIVATIONS = ("relu", "tanh", "gelu", "sigmoid", None)
BATCH = 4

# Which layers each pattern freezes, and, per layer bottom to top, the backward work
# that follows: "W" = dW and db, "B" = db alone, "X" = dX, "-" = nothing at all.
PATTERNS = {
    "none_frozen": ([], ["W", "WX", "WX", "WX", "WX"]),
    "bottom_2_frozen": ([0, 1], ["-", "-", "W", "WX", "WX"]),
    "middle_frozen": ([2], ["W", "WX", "X", "WX", "WX"]),
    "all_but_head_frozen": ([0, 1, 2, 3], ["-", "-", "-", "-", "W"]),
    "all_frozen": ([0, 1, 2, 3, 4], ["-", "-", "-", "-", "-"]),
    # BitFit: every weight frozen, every bias trains
    "weights_frozen": ([], ["B", "BX", "BX", "BX", "BX"]),
    "bias_alone_above_frozen_layers": ([0, 1], ["-", "-", "B", "WX", "WX"]),
}
# The layers whose weight alone a pattern freezes (their bias trains)
FROZEN_WEIGHTS = {"weights_frozen": [0, 1, 2, 3, 4], "bias_alone_above_frozen_layers": [2]}


def make_model(backend="numpy", sizes=SIZES, activations=ACTIVATIONS, seed=0, dtype="float32"):
    gb.seed(seed)
    layers = [gb.Dense(a, b, act, dtype=dtype) for a, b, act in zip(sizes[:-1], sizes[1:], activations)]
    return gb.Sequential(layers, backend=backend, dtype=dtype)


def frozen_model(pattern, backend="numpy", **kwargs):
    model = make_model(backend, **kwargs)
    ft.freeze([model[i] for i in PATTERNS[pattern][0]])
    for i in FROZEN_WEIGHTS.get(pattern, ()):
        model[i].weight.trainable = False
    return model


def host(array):
    return backends.for_array(array).to_host(array)


def random_batch(rng, model, batch=BATCH):
    x = rng.standard_normal((batch, model.in_features)).astype(model.dtype)
    dout = rng.standard_normal((batch, model.out_features)).astype(model.dtype)
    return x, dout


def classification_data(rng, n=64, features=SIZES[0], classes=SIZES[-1]):
    x = rng.standard_normal((n, features)).astype(np.float32)
    return x, rng.integers(0, classes, n)


def trainable_flags(model):
    return [layer.trainable for layer in model]


def held_buffers(layer):
    """The arrays a layer keeps from step to step for its kernels to write into."""
    return list(layer._buffers._arrays.values())


def holds(layer, array):
    return any(held is array for held in held_buffers(layer))


# ----------------------------------------------------------------------------- freezing API


@pytest.mark.parametrize("value", ["False", 0, 1, None, np.float32(1.0)])
def test_a_parameters_trainable_flag_is_true_or_false_and_a_bad_one_changes_nothing(value, tmp_path):
    model = make_model()
    with pytest.raises(TypeError, match="trainable: expected True or False"):
        model[0].bias.trainable = value
    assert model[0].bias.trainable is True
    model[0].bias.trainable = np.False_  # NumPy's bools are bools
    assert model[0].bias.trainable is False
    model.save(tmp_path / "m.npz")  # what the flag was saved as loads back
    assert gb.load(tmp_path / "m.npz", device="cpu")[0].bias.trainable is False


def test_freezing_a_weight_alone_gives_its_gradient_buffer_back(rng):
    model = make_model()
    x, y = classification_data(rng, n=BATCH)

    def step():
        _, dout = gb.losses.cross_entropy(model.forward(x), y)
        model.backward(dout)

    step()
    dw = model[0].weight.grad
    assert holds(model[0], dw)
    for layer in model:  # BitFit: the biases alone train
        layer.weight.trainable = False
    step()
    assert not holds(model[0], dw) and model[0].weight.grad is None
    assert model[0].weight.shape not in [a.shape for a in held_buffers(model[0])]  # nor another of its shape
    assert model[0].bias.grad is not None


@pytest.mark.parametrize("dout, error, match", [
    (np.zeros((BATCH, 99), np.float32), ValueError, r"dout: expected shape \(4, 3\)"),
    (np.zeros((BATCH + 1, SIZES[-1]), np.float32), ValueError, r"dout: expected shape \(4, 3\)"),
    ("garbage", ValueError, "dout: expected shape"),
    (None, TypeError, "dout: expected an array of shape \\(4, 3\\) .*got a NoneType, which is no array"),
    (np.zeros((BATCH, SIZES[-1]), np.int64), TypeError, "dout: expected a floating-point array"),
])
def test_backward_with_every_layer_frozen_still_refuses_a_bad_dout(dout, error, match, rng):
    model = make_model().freeze()
    model.forward(classification_data(rng, n=BATCH)[0])
    with pytest.raises(error, match=match):
        model.backward(dout)
    with pytest.warns(UserWarning, match="every layer is frozen"):
        assert model.backward(np.zeros((BATCH, SIZES[-1]), np.float32)) is None


def test_layer_freeze_makes_both_parameters_frozen():
    layer = gb.Dense(3, 2)
    assert layer.freeze() is layer
    assert layer.trainable is False
    assert [p.trainable for p in layer.parameters()] == [False, False]


def test_layer_unfreeze_makes_both_parameters_trainable():
    layer = gb.Dense(3, 2).freeze()
    assert layer.unfreeze() is layer
    assert layer.trainable is True
    assert [p.trainable for p in layer.parameters()] == [True, True]


def test_trainable_setter_freezes_and_unfreezes():
    layer = gb.Dense(3, 2)
    layer.trainable = False
    assert [p.trainable for p in layer.parameters()] == [False, False]
    layer.trainable = True
    assert [p.trainable for p in layer.parameters()] == [True, True]


@pytest.mark.parametrize("select, frozen", [
    (lambda m: m[1], [1]),
    (lambda m: m[:2], [0, 1]),
    (lambda m: [m[0], m[4]], [0, 4]),
    (lambda m: m, [0, 1, 2, 3, 4]),
], ids=["one_layer", "slice", "list", "whole_model"])
def test_finetune_freeze_takes_a_layer_a_slice_a_list_or_a_model(select, frozen):
    model = make_model()
    ft.freeze(select(model))
    assert trainable_flags(model) == [i not in frozen for i in range(len(model))]


def test_finetune_unfreeze_undoes_freeze():
    model = make_model().freeze()
    ft.unfreeze(model[1:3])
    assert trainable_flags(model) == [False, True, True, False, False]


@pytest.mark.parametrize("bad", [3, "dense_0", [object()]], ids=["int", "str", "list_of_object"])
def test_finetune_freeze_rejects_what_is_not_a_layer(bad):
    with pytest.raises(TypeError, match="layers"):
        ft.freeze(bad)


@pytest.mark.parametrize("n, expected", [
    (0, [True] * 5),
    (1, [False, True, True, True, True]),
    (3, [False, False, False, True, True]),
    (5, [False] * 5),
    (-1, [False, False, False, False, True]),
    (-5, [True] * 5),
])
def test_freeze_to_freezes_layers_before_n_and_unfreezes_the_rest(n, expected):
    model = make_model()
    ft.freeze(model[3:])
    assert model.freeze_to(n) is model
    assert trainable_flags(model) == expected


def test_model_unfreeze_makes_every_layer_trainable():
    model = make_model()
    model.freeze_to(4)
    assert model.unfreeze() is model
    assert trainable_flags(model) == [True] * 5


def test_model_trainable_false_freezes_every_layer_as_in_keras(rng):
    model = make_model()
    model.trainable = False
    assert trainable_flags(model) == [False] * 5 and not model.trainable
    before = model.get_weights()
    x, y = classification_data(rng)
    with pytest.warns(UserWarning, match="every layer is frozen"):
        model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    model.trainable = True
    assert trainable_flags(model) == [True] * 5 and model.trainable


def test_trainable_false_on_a_slice_freezes_those_layers_of_the_model():
    model = make_model()
    model[:2].trainable = False
    assert trainable_flags(model) == [False, False, True, True, True] and model.trainable


def test_a_slice_whose_top_is_a_hidden_sigmoid_under_a_dropout_freezes_and_predicts():
    """model[:2] of a model with a Dropout above a hidden sigmoid layer: the slice was refused as if
    that sigmoid were an output layer, so the README's ways to freeze it (ft.freeze(model[:2]),
    model[:2].trainable = False) and feature extraction through it failed. A model built so is
    still refused."""
    gb.seed(0)
    model = gb.Sequential([gb.Dense(4, 8, "sigmoid"), gb.Dropout(0.2), gb.Dense(8, 8, "relu"), gb.Dense(8, 3)],
                          device="cpu")
    ft.freeze(model[:2])
    assert [layer.trainable for layer in model] == [False, False, True, True]
    model[:2].trainable = True
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    np.testing.assert_array_equal(model[:2].predict(x), model[:1].predict(x))  # Dropout: identity in predict
    with pytest.raises(ValueError, match=r"layers\[1\]: a Dropout cannot stand above the sigmoid output layer"):
        gb.Sequential([gb.Dense(4, 8, "sigmoid"), gb.Dropout(0.2)], device="cpu")


@pytest.mark.parametrize("value", [0, "no", None])
def test_model_trainable_takes_a_bool_only(value):
    model = make_model()
    with pytest.raises(TypeError, match="trainable: expected True or False"):
        model.trainable = value
    assert trainable_flags(model) == [True] * 5


def test_freezing_a_layer_drops_its_gradients(rng):
    model = make_model()
    x, dout = random_batch(rng, model)
    model.forward(x)
    model.backward(dout)
    model[1].freeze()
    assert model[1].weight.grad is None and model[1].bias.grad is None


def test_freezing_a_layer_gives_back_its_gradient_buffers(rng):
    model = make_model()
    x, dout = random_batch(rng, model)
    model.forward(x)
    model.backward(dout)
    frozen_grads, kept_grads = ([p.grad for p in model[i].parameters()] for i in (1, 2))
    model[1].freeze()
    model[2].trainable = True  # already trainable: nothing is frozen, so it keeps its buffers
    assert not any(holds(model[1], grad) for grad in frozen_grads)
    assert all(holds(model[2], grad) for grad in kept_grads)


def test_a_layer_frozen_one_parameter_at_a_time_gives_back_its_gradient_buffers_at_the_next_backward(rng):
    """Freezing a Parameter does not reach its layer: a layer reporting itself frozen kept a dW-sized
    buffer for good. The next backward, which trains none of it, gives them back."""
    model = make_model()
    x, dout = random_batch(rng, model)
    model.forward(x)
    model.backward(dout)
    grads = [p.grad for p in model[1].parameters()]
    model[1].weight.trainable = False
    model[1].bias.trainable = False
    assert not model[1].trainable and all(holds(model[1], grad) for grad in grads)
    model.forward(x)
    model.backward(dout)
    assert not any(holds(model[1], grad) for grad in grads)
    assert not [a for a in held_buffers(model[1]) if a.shape in (model[1].weight.shape, model[1].bias.shape)]
    assert all(p.grad is not None for p in model[2].parameters())  # the layers that train keep theirs
    for layer in model:  # every layer frozen: backward launches nothing, and still gives them back
        layer.weight.trainable = layer.bias.trainable = False
    with pytest.warns(UserWarning, match="every layer is frozen"):
        model.backward(dout)
    assert not any(a.shape == layer.weight.shape for layer in model for a in held_buffers(layer))


@pytest.mark.parametrize("activation", sorted(activations.NEEDS_Z))
def test_a_layer_whose_act_reads_z_keeps_no_output_buffer_that_backward_does_not_read(rng, activation):
    """BitFit: no layer's input is read (no dW), and act' of gelu/silu reads z, which the layer keeps in a
    buffer of its own; the output's buffer was kept from step to step too."""
    model = make_model(activations=[activation] * (len(SIZES) - 2) + ["identity"])
    for layer in model:
        layer.weight.trainable = False
    x, dout = random_batch(rng, model)
    model.forward(x)
    model.backward(dout)
    for layer in model[:-1]:
        kept = held_buffers(layer)
        assert len([a for a in kept if a.shape == (BATCH, layer.out_features)]) == 1  # z alone
        assert any(a is layer.act_input() for a in kept)
    relu = make_model(activations=["relu"] * (len(SIZES) - 2) + ["identity"])
    for layer in relu:
        layer.weight.trainable = False
    relu.forward(x)
    assert all(any(a is layer.act_input() for a in held_buffers(layer)) for layer in relu[:-1])  # y, read by act'


def test_a_gelu_layer_frozen_below_the_trainable_ones_gives_back_its_z_buffer(rng):
    model = make_model()
    assert model[2].activation == "gelu"
    x, dout = random_batch(rng, model)
    model.forward(x)
    z = model[2].act_input()  # kept for its act' while it trained
    model.freeze_to(3)
    model.forward(x)
    assert model[2].act_input() is None and not holds(model[2], z)


# ----------------------------------------------------------------------------- backward plan


@pytest.mark.parametrize("pattern", PATTERNS)
def test_backward_plan_launches_only_the_work_freezing_leaves(pattern):
    plan = frozen_model(pattern).backward_plan()
    assert [name for name, _ in plan] == [f"dense_{i}" for i in range(5)]
    for (_, kernels), work in zip(plan, PATTERNS[pattern][1]):
        assert ("dense_dw" in kernels) == ("W" in work)
        assert ("dense_db" in kernels) == ("B" in work)
        assert ("dense_dx" in kernels) == ("X" in work)
        assert bool(kernels) == (work != "-")


@functools.lru_cache(maxsize=None)
def traced_backward(backend, pattern):
    """One training forward and one traced backward per (backend, pattern), read by several tests:
    the Numba backend runs in the CUDA simulator here, where each launch is slow."""
    model = frozen_model(pattern, backend)
    x, dout = random_batch(np.random.default_rng(7), model)
    model.forward(x)
    plan = model.backward_plan()
    with gb.trace() as t, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.backward(dout)
    return model, plan, t, [str(w.message) for w in caught]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_backward_plan_equals_the_kernels_backward_launches(backend, pattern):
    _, plan, t, _ = traced_backward(backend, pattern)
    assert t.counts == Counter(k for _, kernels in plan for k in kernels)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_backward_fills_grads_of_trainable_parameters_only(backend, pattern):
    model, *_ = traced_backward(backend, pattern)
    for i, layer in enumerate(model):
        for param in layer.parameters():
            frozen = i in PATTERNS[pattern][0] or (param.name == "weight" and i in FROZEN_WEIGHTS.get(pattern, ()))
            assert (param.grad is None) == frozen, f"layer {i} {param.name}"


@pytest.mark.parametrize("pattern", [p for p in PATTERNS if p != "all_frozen"])
def test_freezing_does_not_change_the_gradients_of_trainable_layers(backend, pattern):
    full, *_ = traced_backward(backend, "none_frozen")
    partial, *_ = traced_backward(backend, pattern)
    for reference, param in zip(full.parameters(), partial.parameters()):
        if param.grad is not None:
            np.testing.assert_allclose(host(param.grad), host(reference.grad), rtol=1e-5, atol=1e-7)


def test_all_frozen_backward_launches_nothing_and_says_so(backend):
    _, plan, t, caught = traced_backward(backend, "all_frozen")
    assert t.total == 0
    assert any("every layer is frozen" in message for message in caught)
    assert "launches no kernel" in str(plan)


@pytest.mark.parametrize("act", ["identity", "relu", "gelu"])
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "dropout"])
def test_numpy_backward_computes_no_db_for_a_frozen_bias_under_a_trainable_weight(act, masked, rng, monkeypatch):
    x, w = rng.standard_normal((6, 4)).astype(np.float32), rng.standard_normal((4, 5)).astype(np.float32)
    dy = rng.standard_normal((6, 5)).astype(np.float32)
    kwargs = {"dropout": gb.Dropout(0.5).mask()} if masked else {}
    y, z = numpy_backend.dense_forward(x, w, np.zeros(5, np.float32), act, **kwargs)
    with_db = numpy_backend.dense_backward(dy, x, w, y, z, act, True, True, **kwargs)
    products, matmul = [], numpy_backend._matmul
    monkeypatch.setattr(numpy_backend, "_matmul", lambda a, b, out=None: products.append(a.ndim) or matmul(a, b, out))
    out_db = np.full(5, np.nan, np.float32)
    dx, dw, db = numpy_backend.dense_backward(dy, x, w, y, z, act, True, True, out_db=out_db, need_db=False, **kwargs)
    assert db is None and np.isnan(out_db).all()  # nothing summed into the buffer
    assert 1 not in products  # nor by ones(B) @ dz
    np.testing.assert_array_equal(dw, with_db[1])
    np.testing.assert_array_equal(dx, with_db[0])


def test_input_gradient_makes_every_layer_launch_dx(rng):
    model = frozen_model("all_but_head_frozen")
    x, dout = random_batch(rng, model)
    model.forward(x, need_input_grad=True)
    plan = model.backward_plan(need_input_grad=True)
    assert all("dense_dx" in kernels for _, kernels in plan)
    with gb.trace() as t:
        dx = model.backward(dout, need_input_grad=True)
    assert dx.shape == x.shape
    assert t.counts == Counter(k for _, kernels in plan for k in kernels)


def test_backward_after_unfreezing_asks_for_a_new_forward(rng):
    model = make_model()
    model.freeze_to(2)
    x, dout = random_batch(rng, model)
    model.forward(x)
    model.unfreeze()
    with pytest.raises(RuntimeError, match="run forward.*layer 'dense_0' needs its input"):
        model.backward(dout)


def test_backward_after_freezing_more_reuses_what_forward_kept(rng):
    model = make_model()
    x, dout = random_batch(rng, model)
    model.forward(x)
    model.freeze_to(2)
    model.backward(dout)
    assert model[0].weight.grad is None and model[2].weight.grad is not None


# ----------------------------------------------------------------------------- activation memory


def expected_activation_bytes(model, batch):
    """What backward reads: the input of a layer whose weight trains (for dW), and the output of
    every layer that does backward work (the pre-activation for gelu, nothing for identity)."""
    sizes = [model.in_features] + [layer.out_features for layer in model]
    needed = set()
    for i, (layer, (need_dx, need_dw)) in enumerate(zip(model, model._plan(False))):
        if need_dw and layer.weight.trainable:
            needed.add(("h", i, sizes[i]))
        if (need_dx or need_dw) and layer.activation != "identity":
            needed.add(("z", i, sizes[i + 1]) if layer.needs_z() else ("h", i + 1, sizes[i + 1]))
    return sum(batch * width * model.dtype.itemsize for _, _, width in needed)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_forward_keeps_only_the_activations_backward_reads(pattern, rng):
    model = frozen_model(pattern)
    model.forward(rng.standard_normal((BATCH, SIZES[0])).astype(np.float32))
    assert model.activation_bytes() == expected_activation_bytes(model, BATCH)


def test_frozen_backbone_keeps_only_the_head_input(rng):
    sizes, batch = (256, 512, 512, 512, 10), 512
    model = make_model(sizes=sizes, activations=("relu", "relu", "relu", None))
    x = rng.standard_normal((batch, 256)).astype(np.float32)
    model.forward(x)
    full = model.activation_bytes()
    model.freeze_to(-1)
    model.forward(x)
    assert full == batch * (256 + 3 * 512) * 4
    assert model.activation_bytes() == batch * 512 * 4


def test_inference_forward_keeps_nothing(rng):
    model = make_model()
    model.forward(rng.standard_normal((BATCH, SIZES[0])), training=False)
    assert model.activation_bytes() == 0


# ----------------------------------------------------------------------------- optimizers


OPTIMIZERS = {
    "sgd_momentum_decay": lambda params: gb.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2),
    "sgd_nesterov": lambda params: gb.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True),
    "adam_l2": lambda params: gb.optim.Adam(params, lr=1e-2, weight_decay=1e-2),
    "adamw": lambda params: gb.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
    "rmsprop_centered": lambda params: gb.optim.RMSprop(params, lr=1e-2, centered=True, weight_decay=1e-2),
}


@pytest.mark.parametrize("make_optimizer", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_optimizer_keeps_no_state_for_frozen_parameters(make_optimizer, rng):
    model = frozen_model("bottom_2_frozen")
    optimizer = make_optimizer(model.parameters())
    x, dout = random_batch(rng, model)
    model.forward(x)
    model.backward(dout)
    optimizer.step()
    assert set(optimizer.state) == set(model.trainable_parameters())


@pytest.mark.parametrize("make_optimizer", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
@pytest.mark.parametrize("pattern", ["bottom_2_frozen", "middle_frozen", "all_but_head_frozen", "weights_frozen"])
def test_fit_leaves_frozen_weights_bit_identical(make_optimizer, pattern, rng):
    model = frozen_model(pattern)
    before = model.get_weights()
    x, y = classification_data(rng)
    model.fit(x, y, optimizer=make_optimizer(model.parameters()), epochs=2, batch_size=16, verbose=0,
              clip_grad_norm=1.0)
    after = model.get_weights()
    for i in range(len(model)):
        for param, w_before, w_after in zip(model[i].parameters(), before[2 * i: 2 * i + 2], after[2 * i: 2 * i + 2]):
            assert np.array_equal(w_before, w_after) == (not param.trainable), f"layer {i} {param.name}"


def test_unfreezing_resumes_training_with_the_same_optimizer(rng):
    model = frozen_model("all_but_head_frozen")
    optimizer = gb.optim.Adam(model.parameters(), lr=1e-2)
    x, y = classification_data(rng)
    model.fit(x, y, optimizer=optimizer, epochs=1, batch_size=16, verbose=0)
    frozen_weights = model.get_weights()
    model.unfreeze()
    model.fit(x, y, optimizer=optimizer, epochs=1, batch_size=16, verbose=0)
    assert not any(np.array_equal(a, b) for a, b in zip(frozen_weights[:-2], model.get_weights()[:-2]))
    assert set(optimizer.state) == set(model.parameters())


# ----------------------------------------------------------------------------- replace_head


@pytest.mark.parametrize("pattern", ["none_frozen", "bottom_2_frozen", "all_but_head_frozen"])
def test_replace_head_keeps_the_backbone_weights_and_frozen_state(pattern):
    model = frozen_model(pattern)
    new = ft.replace_head(model, out_features=2)
    for old_layer, new_layer in zip(model.layers[:-1], new.layers[:-1]):
        assert (new_layer.in_features, new_layer.out_features, new_layer.activation) == \
               (old_layer.in_features, old_layer.out_features, old_layer.activation)
        assert new_layer.trainable == old_layer.trainable
    for old, copied in zip(model.get_weights()[:-2], new.get_weights()[:-2]):
        assert np.array_equal(old, copied)


def test_replace_head_keeps_a_bias_frozen_alone():
    model = make_model()
    model[0].bias.trainable = False
    new = ft.replace_head(model, out_features=2)
    assert (new[0].weight.trainable, new[0].bias.trainable) == (True, False)


@pytest.mark.parametrize("activation", [None, "sigmoid"])
def test_replace_head_adds_a_fresh_trainable_head(activation):
    model = make_model().freeze()
    new = ft.replace_head(model, out_features=2, activation=activation)
    head = new[-1]
    assert (head.in_features, head.out_features) == (SIZES[-2], 2)
    assert head.activation == activations.canonical(activation)
    assert head.trainable
    assert np.all(host(head.bias.data) == 0) and np.any(host(head.weight.data) != 0)
    assert new.backend_name == model.backend_name and new.dtype == model.dtype


def test_training_the_new_model_leaves_the_original_unchanged(rng):
    model = make_model()
    before = model.get_weights()
    new = ft.replace_head(model, out_features=2)
    x = rng.standard_normal((32, SIZES[0])).astype(np.float32)
    new.fit(x, rng.integers(0, 2, 32), optimizer=gb.optim.SGD(new.parameters(), lr=0.5), epochs=1, verbose=0)
    assert not np.array_equal(new.get_weights()[0], before[0])
    for old, now in zip(before, model.get_weights()):
        assert np.array_equal(old, now)


class Tagged(gb.Dense):
    """A Dense subclass of the user's own."""


def test_replace_head_copies_backbone_layers_of_any_kind(rng):
    gb.seed(0)
    model = gb.Sequential([Tagged(5, 7, "relu"), Scale(2.0), gb.Dropout(0.2), gb.Dense(7, 3)], device="cpu")
    model[0].bias.trainable = False
    new = ft.replace_head(model, out_features=2)
    assert [type(layer) for layer in new] == [Tagged, Scale, gb.Dropout, gb.Dense] and new[1].factor == 2.0
    assert not any(mine is theirs for mine, theirs in zip(new, model))
    assert new[0].trainable_flags() == (True, False) and new[2].rate == 0.2
    assert not np.shares_memory(new[0].weight.data, model[0].weight.data)
    x = rng.standard_normal((4, 5)).astype(np.float32)
    np.testing.assert_array_equal(new[:-1].predict(x), model[:-1].predict(x))


def test_replace_head_draws_the_new_heads_weights_alone_from_the_random_stream():
    model = gb.Sequential([gb.Dense(4, 6, "relu"), gb.Dropout(0.2), gb.Dense(6, 3)], device="cpu")
    gb.seed(5)
    head = ft.replace_head(model, out_features=7, activation="relu")[-1]
    gb.seed(5)
    np.testing.assert_array_equal(head.weight.data, gb.Dense(6, 7, "relu").weight.data)


def test_replace_head_of_a_slice_names_the_head_apart_from_the_backbone():
    model = make_model()
    new = ft.replace_head(model[1:], out_features=2)  # a slice keeps its parent's names: dense_1 .. dense_4
    names = [layer.name for layer in new]
    assert names == ["dense_1", "dense_2", "dense_3", "dense_4"]
    assert [name for name, _ in new.backward_plan()] == names


def test_replace_head_on_a_model_ending_in_a_dropout_raises():
    model = gb.Sequential([gb.Dense(8, 16, "relu"), gb.Dense(16, 3), gb.Dropout(0.5, name="drop")], device="cpu")
    with pytest.raises(ValueError, match="its last layer, 'drop', is a Dropout, not the Dense head"):
        ft.replace_head(model, 5, activation="softmax")


def test_param_groups_names_what_it_refuses():
    with pytest.raises(TypeError, match="model: expected a gpubp.Sequential, got list"):
        ft.param_groups([gb.Dense(3, 2)], 0.1)
    with pytest.raises(ValueError, match="model: expected a Sequential with at least one layer"):
        ft.param_groups(gb.Sequential([], device="cpu"), 0.1)


def test_replace_head_on_an_empty_model_raises():
    with pytest.raises(ValueError, match="at least one layer"):
        ft.replace_head(gb.Sequential([], device="cpu"), out_features=2)


@pytest.mark.parametrize("out_features, error", [(0, ValueError), (-1, ValueError), (2.5, TypeError)])
def test_replace_head_rejects_a_bad_width_and_leaves_the_model_unchanged(out_features, error):
    model = make_model()
    before = model.get_weights()
    with pytest.raises(error, match="out_features"):
        ft.replace_head(model, out_features=out_features)
    assert len(model) == 5 and model.out_features == SIZES[-1]
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


# ----------------------------------------------------------------------------- param_groups


def test_param_groups_give_the_top_layer_lr_and_lower_layers_lr_times_decay_to_the_depth():
    groups = ft.param_groups(make_model(), lr=1e-2, decay=0.5)
    assert [g["lr"] for g in groups] == pytest.approx([1e-2 * 0.5 ** d for d in (4, 3, 2, 1, 0)])
    model = make_model()
    assert [g["params"] for g in ft.param_groups(model, 1.0)] == [layer.parameters() for layer in model]


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_every_optimizer_steps_each_layer_with_its_own_learning_rate(name, rng):
    model = make_model(dtype="float64")
    lr, decay = 1e-2, 0.5
    # eps tiny and no decay, so Adam's first step is exactly lr * sign(grad)
    options = {} if name == "SGD" else {"eps": 1e-12, "weight_decay": 0.0}
    optimizer = getattr(gb.optim, name)(ft.param_groups(model, lr=lr, decay=decay), **options)
    x, dout = random_batch(rng, model)
    before = model.get_weights()
    model.forward(x)
    model.backward(dout)
    optimizer.step()
    for i, layer in enumerate(model):
        layer_lr = lr * decay ** (len(model) - 1 - i)
        step = model.get_weights()[2 * i] - before[2 * i]
        grad = layer.weight.grad
        if name == "SGD":
            np.testing.assert_allclose(step, -layer_lr * grad, rtol=1e-7, atol=1e-15)
        else:  # Adam's first step moves every weight with a gradient by lr, against the gradient's sign
            moved = grad != 0
            np.testing.assert_allclose(step[moved], -layer_lr * np.sign(grad[moved]), rtol=1e-3)


@pytest.mark.parametrize("lr, decay, error", [(-1.0, 0.5, ValueError), (1e-3, -0.5, ValueError),
                                              (1e-3, "0.5", TypeError)])
def test_param_groups_reject_bad_rates(lr, decay, error):
    with pytest.raises(error, match="lr|decay"):
        ft.param_groups(make_model(), lr=lr, decay=decay)


# ----------------------------------------------------------------------------- GradualUnfreezing


class RecordTrainable(gb.Callback):
    def __init__(self):
        self.per_epoch = []

    def on_epoch_end(self, model, epoch, logs):
        self.per_epoch.append(trainable_flags(model))


@pytest.mark.parametrize("initial, every, expected", [
    (1, 1, [[False, False, False, False, True], [False, False, False, True, True],
            [False, False, True, True, True], [False, True, True, True, True], [True] * 5, [True] * 5]),
    (2, 2, [[False, False, False, True, True]] * 2 + [[False, False, True, True, True]] * 2
     + [[False, True, True, True, True]] * 2),
], ids=["one_per_epoch", "start_with_two_then_one_every_two_epochs"])
def test_gradual_unfreezing_unfreezes_one_more_layer_from_the_top(initial, every, expected, rng):
    model = make_model()
    x, y = classification_data(rng, n=16)
    record = RecordTrainable()
    model.fit(x, y, optimizer=gb.optim.Adam(ft.param_groups(model, lr=1e-3)), epochs=len(expected),
              batch_size=16, verbose=0, callbacks=[ft.GradualUnfreezing(initial, every), record])
    assert record.per_epoch == expected


def test_gradual_unfreezing_leaves_a_layer_unchanged_until_its_epoch(rng):
    model = make_model()
    bottom = model.get_weights()[0]
    x, y = classification_data(rng, n=16)
    model.fit(x, y, optimizer="adam", epochs=4, batch_size=16, verbose=0, callbacks=[ft.GradualUnfreezing()])
    assert np.array_equal(model.get_weights()[0], bottom)
    model.fit(x, y, optimizer="adam", epochs=5, batch_size=16, verbose=0, callbacks=[ft.GradualUnfreezing()])
    assert not np.array_equal(model.get_weights()[0], bottom)


def dropout_model(dropout_on_top=False):
    """Three Dense layers with a Dropout above each hidden one (and above the head if asked)."""
    gb.seed(0)
    layers = [gb.Dense(5, 8, "relu"), gb.Dropout(0.5), gb.Dense(8, 8, "relu"), gb.Dropout(0.5), gb.Dense(8, 3)]
    return gb.Sequential(layers + [gb.Dropout(0.5)] * dropout_on_top, device="cpu")


def dense_flags(model):
    return [layer.trainable for layer in model if isinstance(layer, gb.Dense)]


@pytest.mark.parametrize("dropout_on_top", [False, True], ids=["dropout_between", "dropout_on_top"])
def test_gradual_unfreezing_counts_dense_layers_and_passes_over_dropouts(dropout_on_top):
    model = dropout_model(dropout_on_top)
    unfreezing = ft.GradualUnfreezing()
    per_epoch = []
    for epoch in range(4):
        unfreezing.on_epoch_begin(model, epoch)
        per_epoch.append(dense_flags(model))
    assert per_epoch == [[False, False, True], [False, True, True], [True, True, True], [True, True, True]]


def test_gradual_unfreezing_resumed_from_a_checkpoint_ends_as_the_uninterrupted_run(tmp_path):
    x, y = classification_data(np.random.default_rng(3), n=32)
    callbacks = [ft.GradualUnfreezing()]

    def fit(model, optimizer, epochs, initial_epoch=0, more=()):
        model.fit(x, y, optimizer=optimizer, epochs=epochs, initial_epoch=initial_epoch, batch_size=8, verbose=0,
                  callbacks=callbacks + list(more))

    whole = dropout_model()
    fit(whole, gb.optim.Adam(whole.parameters(), lr=1e-2), epochs=4)
    path = tmp_path / "run.safetensors"
    first = dropout_model()
    fit(first, gb.optim.Adam(first.parameters(), lr=1e-2), epochs=2, more=[gb.ModelCheckpoint(path)])
    ckpt = gb.load_checkpoint(path, device="cpu")
    assert dense_flags(ckpt.model) == [False, True, True]
    fit(ckpt.model, ckpt.optimizer, epochs=4, initial_epoch=ckpt.epoch)
    assert dense_flags(ckpt.model) == dense_flags(whole) == [True, True, True]
    assert all(np.array_equal(a, b) for a, b in zip(ckpt.model.get_weights(), whole.get_weights()))


def test_gradual_unfreezing_warns_once_where_the_optimizer_does_not_update_a_layer_it_unfreezes(rng):
    x, y = classification_data(rng, n=16)
    model = make_model()
    model.freeze_to(4)  # the head alone trains when the optimizer is built, so it holds the head's alone
    optimizer = gb.optim.Adam(model.trainable_parameters(), lr=1e-2)
    with pytest.warns(RuntimeWarning, match=r"does not update \['dense_3'\], which this epoch trains") as warned:
        model.fit(x, y, optimizer=optimizer, epochs=3, batch_size=16, verbose=0, callbacks=[ft.GradualUnfreezing()])
    assert len([w for w in warned if "GradualUnfreezing" in str(w.message)]) == 1
    model = make_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an optimizer over every layer: nothing to say
        model.fit(x, y, optimizer=gb.optim.Adam(ft.param_groups(model, lr=1e-2)), epochs=3, batch_size=16,
                  verbose=0, callbacks=[ft.GradualUnfreezing()])


@pytest.mark.parametrize("kwargs", [{"initial": 0}, {"every": 0}, {"initial": 1.5}])
def test_gradual_unfreezing_rejects_non_positive_counts(kwargs):
    with pytest.raises((ValueError, TypeError), match="initial|every"):
        ft.GradualUnfreezing(**kwargs)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("n, error", [(6, ValueError), (-6, ValueError), (100, ValueError),
                                      (1.0, TypeError), (True, TypeError), ("2", TypeError)])
def test_freeze_to_out_of_range_raises_and_leaves_the_model_unchanged(n, error):
    model = frozen_model("middle_frozen")
    with pytest.raises(error, match="n: expected an int"):
        model.freeze_to(n)
    assert trainable_flags(model) == [True, True, False, True, True]


# ----------------------------------------------------------------------------- end to end


def test_frozen_backbone_fine_tune_to_a_new_two_class_head_on_digits():
    """Pretrain on the ten digits, then learn "is the digit 5 or more?" with the backbone frozen."""
    x, y = gb.data.load_digits()
    x_train, x_test, y_train, y_test = gb.data.train_test_split(x, y, test_size=0.25, seed=0, stratify=True)
    gb.seed(0)
    model = gb.Sequential([gb.Dense(64, 256, "relu"), gb.Dense(256, 128, "relu"), gb.Dense(128, 10)], device="cpu")
    model.fit(x_train, y_train, optimizer=gb.optim.Adam(model.parameters(), lr=3e-3), epochs=15, batch_size=64,
              verbose=0)

    fine = ft.replace_head(model, out_features=2)
    fine.freeze_to(-1)
    backbone = fine.get_weights()[:-2]
    fine.fit(x_train, (y_train >= 5).astype(np.int64), optimizer=gb.optim.Adam(fine.parameters(), lr=1e-2),
             epochs=40, batch_size=128, verbose=0)

    accuracy = fine.evaluate(x_test, (y_test >= 5).astype(np.int64), metrics=["accuracy"])["accuracy"]
    assert accuracy >= 0.95
    assert all(np.array_equal(a, b) for a, b in zip(backbone, fine.get_weights()[:-2]))
