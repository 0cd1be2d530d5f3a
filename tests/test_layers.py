"""Parameter, Dense and Sequential: container behaviour, weights, initialisation, devices,
and the buffer rules of forward/backward (fresh outputs, no clobbering, no accumulation)."""

import copy
import math
import pickle

import numpy as np
import pytest

import gpubp as gb
from gpubp import backends
from gpubp.activations import ACTIVATIONS


def mlp(sizes=(4, 6, 5, 3), activation="relu", **kwargs):
    layers = [gb.Dense(a, b, activation) for a, b in zip(sizes[:-2], sizes[1:-1])]
    return gb.Sequential(layers + [gb.Dense(sizes[-2], sizes[-1])], device="cpu", **kwargs)


def train_step_grads(model, x, labels):
    out = model.forward(x)
    _, dout = gb.losses.cross_entropy(out, labels)
    model.backward(dout)
    return [p.grad.copy() for p in model.parameters()]


# ----------------------------------------------------------------------------- container


def test_len_indexing_and_iteration_follow_the_layer_list():
    layers = [gb.Dense(4, 6), gb.Dense(6, 5), gb.Dense(5, 3)]
    model = gb.Sequential(layers, device="cpu")
    assert len(model) == 3
    assert model[0] is layers[0] and model[-1] is layers[2]
    assert list(model) == layers


def test_a_slice_is_a_sequential_sharing_the_same_layers():
    model = mlp()
    head = model[1:]
    assert isinstance(head, gb.Sequential) and len(head) == 2
    assert head[0] is model[1] and head[1] is model[2]
    head[0].weight.data[...] = 7.0
    assert np.all(model[1].weight.data == 7.0)


@pytest.mark.parametrize("edit", [
    lambda layers: layers.append(gb.Dense(3, 5)),   # Keras's model.add, by hand
    lambda layers: layers.pop(),                    # Keras's model.pop, by hand
    lambda layers: layers.insert(0, gb.Dense(4, 4)),
    lambda layers: layers.__setitem__(1, gb.Dense(6, 3)),
    lambda layers: layers.__delitem__(0),
], ids=["append", "pop", "insert", "setitem", "delitem"])
def test_a_models_layers_are_read_only_and_say_how_to_build_the_model_wanted(edit):
    """An edited layer list skipped every check the constructor makes: a layer appended to a float64
    model stayed float32 and nameless (its file did not load), and one appended twice got wrong
    gradients. The list methods now refuse, and a slice or a sum is a list to build a model of."""
    model = mlp(dtype="float64")
    before = list(model.layers)
    with pytest.raises(TypeError, match=r"model.layers is read-only: .*model.add\(layer\) and model.pop\(\), as in "
                                        r"Keras, or build a new model, gb.Sequential\(model.layers \+ \[layer\]\)"):
        edit(model.layers)
    assert list(model.layers) == before
    with pytest.raises(AttributeError, match=r"layers: a model's layers are checked together"):
        model.layers = before[:-1]
    grown = gb.Sequential(model.layers + [gb.Dense(3, 5, "softmax")], backend="numpy", dtype="float64")
    assert [layer.name for layer in grown] == ["dense_0", "dense_1", "dense_2", "dense_3"]
    assert {p.data.dtype for p in grown.parameters()} == {np.dtype(np.float64)}
    assert isinstance(model.layers[:-1], list) and len(gb.Sequential(model.layers[:-1], backend="numpy")) == 2


def test_add_and_pop_build_a_model_as_keras_does_and_check_each_layer():
    """Keras's way of building: an empty model, then add(); pop() the top. Each is checked as the
    constructor checks the layers, the model unchanged where it is refused."""
    model = gb.Sequential(device="cpu", dtype="float64")
    model.add(gb.Dense(4, 8, "relu"))  # a float32 layer into the float64 model given
    model.add(gb.Dropout(0.2))
    model.add(gb.Dense(8, 3, "softmax"))
    assert [layer.name for layer in model] == ["dense_0", "dropout_1", "dense_2"]
    assert {p.data.dtype for p in model.parameters()} == {np.dtype(np.float64)}
    weights = model.get_weights()
    for bad, error, message in [(gb.Dense(3, 2), ValueError, r"activation 'softmax' is allowed on the last layer only"),
                                (model[0], ValueError, r"are the same Dense object"),
                                ("dense", TypeError, r"layer: expected a gpubp layer")]:
        with pytest.raises(error, match=message):
            model.add(bad)
        assert len(model) == 3
    top = model.pop()
    assert top.activation == "softmax" and len(model) == 2 and model[-1].rate == 0.2
    with pytest.raises(ValueError, match=r"layers\[2\]: in_features=5 does not match layers\[1\].out_features=8"):
        model.add(gb.Dense(5, 2))
    model.add(top)  # its weights as they were
    for want, got in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(got, want)
    x, y = np.ones((4, 4)), np.array([0, 1, 2, 0])
    np.testing.assert_allclose(model.predict(x).sum(axis=1), 1.0)
    model.fit(x, y, epochs=1, verbose=0)
    for change in (lambda: model.add(gb.Dense(3, 3)), model.pop):
        with pytest.raises(RuntimeError, match=r"this model has been compiled or trained, and its optimizer"):
            change()
    assert len(model) == 3
    with pytest.raises(IndexError, match=r"pop: the model has no layers"):
        gb.Sequential(device="cpu").pop()


def test_a_models_dtype_is_read_only():
    """Setting it left the weights in the old dtype while summary() and the outputs said the new one."""
    model = mlp()
    with pytest.raises(AttributeError, match=r"dtype: a model's dtype is fixed when it is built"):
        model.dtype = np.float64
    assert model.dtype == np.float32 and {p.data.dtype for p in model.parameters()} == {np.dtype(np.float32)}


def test_setting_an_activation_is_checked_as_the_constructor_checks_it():
    """An unknown name failed later, at the forward; "linear" was unknown then; a softmax set on a
    hidden layer trained and saved a file that gb.load refused."""
    model = mlp()
    hidden, top = model[0], model[-1]
    with pytest.raises(ValueError, match=r"activation: unknown activation 'relu7'"):
        hidden.activation = "relu7"
    with pytest.raises(ValueError, match=r"activation: 'softmax' is allowed on a model's last layer only .* "
                                         r"layers\[0\] of a 3-layer model"):
        hidden.activation = "softmax"
    assert hidden.activation == "relu"
    hidden.activation = "linear"
    top.activation = "softmax"
    assert (hidden.activation, top.activation) == ("identity", "softmax")
    np.testing.assert_allclose(model.predict(np.ones((2, 4), np.float32)).sum(axis=1), 1.0, rtol=1e-6)
    alone = gb.Dense(3, 2)
    alone.activation = "softmax"  # held by no model yet: a model's constructor places it
    with pytest.raises(ValueError, match=r"layers\[0\]: activation 'softmax' is allowed on the last layer only"):
        gb.Sequential([alone, gb.Dense(2, 2)], backend="numpy")


def test_a_layer_pickled_with_a_plain_activation_attribute_still_loads():
    """Layers pickled before ``activation`` was a checked property hold it under its own name."""
    layer = gb.Dense(3, 2, "tanh")
    state = layer.__getstate__()
    state["activation"] = state.pop("_activation")
    restored = gb.Dense.__new__(gb.Dense)
    restored.__setstate__(state)
    assert restored.activation == "tanh"


def test_a_model_pickled_with_plain_layers_and_dtype_attributes_still_loads():
    """Models pickled before ``layers`` and ``dtype`` were read-only properties hold them under their names."""
    model = mlp(dtype="float64")
    state = copy.deepcopy(model).__getstate__()
    state["layers"], state["dtype"] = list(state.pop("_layers")), state.pop("_dtype")
    restored = gb.Sequential.__new__(gb.Sequential)
    restored.__setstate__(state)
    assert restored.dtype == np.float64 and len(restored.layers) == 3
    x = np.ones((2, 4))
    np.testing.assert_array_equal(restored.predict(x), model.predict(x))


def test_a_callable_init_of_the_wrong_signature_is_named():
    with pytest.raises(TypeError, match=r"init: a callable init is called as init\(rng, shape\) .* \(4, 3\)"):
        gb.Dense(4, 3, init=lambda shape: np.zeros(shape))


def test_named_parameters_and_count_params_are_torchs_and_keras():
    """torch's named_parameters(), named as gpubp's files name the tensors (a Dropout holds none,
    so it takes no number), and Keras's count_params(), the total summary() ends with."""
    model = gb.Sequential([gb.Dense(4, 8, "relu"), gb.Dropout(0.1), gb.Dense(8, 3)], device="cpu")
    named = list(model.named_parameters())
    assert [name for name, _ in named] == ["layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias"]
    assert [param for _, param in named] == model.parameters()
    assert [name for name, _ in named] == gb.io.tensor_names(model)
    assert model.count_params() == 4 * 8 + 8 + 8 * 3 + 3
    assert model.summary().splitlines()[-3] == f"Total params: {model.count_params()}"


def test_a_layers_get_and_set_weights_are_keras_and_reach_its_model():
    model = mlp()
    x = np.ones((2, 4), np.float32)
    kernel, bias = model[-1].get_weights()
    assert kernel.shape == (5, 3) and bias.shape == (3,)
    kernel[...] = 7.0  # a copy: the layer is unchanged
    assert not np.any(model[-1].get_weights()[0] == 7.0)
    model[-1].set_weights([np.zeros((5, 3)), np.arange(3.0)])
    np.testing.assert_array_equal(model.predict(x), np.tile(np.arange(3.0, dtype=np.float32), (2, 1)))
    before = model.get_weights()
    for bad, error, message in [([np.zeros((3, 5)), np.zeros(3)], ValueError, r"weights\[0\]: expected shape \(5, 3\)"),
                                ([np.zeros((5, 3))], ValueError, r"weights: expected 2 arrays \[W, b\], got 1"),
                                ([np.zeros((5, 3)), np.full(3, np.nan)], ValueError, r"weights\[1\]"),
                                (np.zeros((5, 3)), TypeError, r"weights: expected a list of arrays")]:
        with pytest.raises(error, match=message):
            model[-1].set_weights(bad)
    for want, got in zip(before, model.get_weights()):
        np.testing.assert_array_equal(got, want)
    dropout = gb.Dropout(0.5)
    assert dropout.get_weights() == []
    dropout.set_weights([])


def test_layers_are_named_by_position():
    assert [layer.name for layer in mlp()] == ["dense_0", "dense_1", "dense_2"]


@pytest.mark.parametrize("make", [lambda name: gb.Dense(3, 2, name=name), lambda name: gb.Dropout(0.5, name=name)],
                         ids=["Dense", "Dropout"])
@pytest.mark.parametrize("name", [5, ["x"], b"x"])
def test_a_layer_name_that_is_not_a_str_is_a_type_error(make, name):
    with pytest.raises(TypeError, match=r"name: expected a str or None, got "):
        make(name)


def test_parameters_are_in_keras_order_weight_then_bias_per_layer():
    model = mlp()
    expected = [p for layer in model for p in (layer.weight, layer.bias)]
    assert model.parameters() == expected
    assert [p.shape for p in model.parameters()] == [(4, 6), (6,), (6, 5), (5,), (5, 3), (3,)]


def test_get_weights_returns_copies_in_keras_order():
    model = mlp()
    weights = model.get_weights()
    assert [w.shape for w in weights] == [(4, 6), (6,), (6, 5), (5,), (5, 3), (3,)]
    weights[0][...] = 123.0
    assert not np.any(model[0].weight.data == 123.0)


def test_set_weights_then_get_weights_round_trips():
    model = mlp()
    rng = np.random.default_rng(0)
    new = [rng.normal(size=w.shape).astype(np.float32) for w in model.get_weights()]
    model.set_weights(new)
    for a, b in zip(new, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_layers_with_mismatched_widths_are_rejected():
    with pytest.raises(ValueError, match=r"layers\[1\]: in_features=5 does not match layers\[0\].out_features=6"):
        gb.Sequential([gb.Dense(4, 6), gb.Dense(5, 3)], device="cpu")


def test_a_non_layer_is_rejected_with_its_position():
    with pytest.raises(TypeError, match=r"layers\[1\]: expected a gpubp layer such as gpubp.Dense, got str"):
        gb.Sequential([gb.Dense(4, 6), "relu"], device="cpu")


def test_layers_given_one_by_one_are_a_type_error_asking_for_a_list():
    """PyTorch's nn.Sequential takes its modules so; ours takes one list, as Keras's does."""
    with pytest.raises(TypeError, match=r"^layers: expected a list of layers, e\.g\. Sequential\(\[Dense\(4, 3\), "
                                        r"Dense\(3, 2\)\]\), got Dense \(pass the layers in one list"):
        gb.Sequential(gb.Dense(4, 3), gb.Dense(3, 2))


def test_summary_ends_with_keras_totals_counting_each_parameter():
    gb.seed(0)
    model = gb.Sequential([gb.Dense(4, 6, "relu"), gb.Dropout(0.5), gb.Dense(6, 3)], device="cpu")
    model[0].freeze()
    model[2].weight.trainable = False  # its bias alone trains: the weight counts as non-trainable
    assert model.summary().splitlines()[-3:] == ["Total params: 51", "Trainable params: 3",
                                                 "Non-trainable params: 48"]


def test_summary_returns_the_text_and_hands_it_to_print_fn(capsys):
    model, printed = mlp(), []
    text = model.summary(print_fn=printed.append)
    assert printed == [text] and "Total params: 83" in text and capsys.readouterr().out == ""


# ----------------------------------------------------------------------------- copies


def pickled(obj):
    return pickle.loads(pickle.dumps(obj))


@pytest.mark.parametrize("copier", [copy.deepcopy, pickled], ids=["deepcopy", "pickle"])
def test_a_copied_model_predicts_as_the_original_and_shares_no_array(copier, rng):
    model, x = mlp(), rng.standard_normal((5, 4)).astype(np.float32)
    model.forward(x)  # what a training forward keeps is not copied
    twin = copier(model)
    np.testing.assert_array_equal(twin.predict(x), model.predict(x))
    assert twin.backend is model.backend and twin.activation_bytes() == 0
    assert [layer.name for layer in twin] == [layer.name for layer in model]
    for mine, theirs in zip(twin.parameters(), model.parameters()):
        assert not np.shares_memory(mine.data, theirs.data) and mine.data.flags.writeable
    twin[0].weight.data[...] = 0.0
    assert not np.any(model[0].weight.data == 0.0)
    assert set(twin[0]._holders) == {twin} and set(model[0]._holders) == {model}


@pytest.mark.parametrize("copier", [copy.deepcopy, pickled], ids=["deepcopy", "pickle"])
@pytest.mark.parametrize(("dtype", "precision"), [("float64", "fp32"), ("float32", "bf16")])
def test_a_copy_keeps_dtype_precision_dropout_rates_and_frozen_flags(copier, dtype, precision, rng):
    gb.seed(0)
    model = gb.Sequential([gb.Dense(4, 6, "relu"), gb.Dropout(0.3), gb.Dense(6, 5, "tanh"), gb.Dense(5, 3)],
                          device="cpu", dtype=dtype, precision=precision, fused=False)
    model[0].freeze()
    model[2].weight.trainable = False
    twin = copier(model)
    assert (twin.dtype, twin.precision, twin.fused, twin[1].rate) == (model.dtype, precision, False, 0.3)
    assert [layer.trainable_flags() for layer in twin] == [layer.trainable_flags() for layer in model]
    assert twin.backward_plan() == model.backward_plan()
    x = rng.standard_normal((7, 4)).astype(dtype)
    outputs = []
    for net in (model, twin):  # the same random stream draws the same masks
        gb.seed(5)
        outputs.append(net.forward(x))
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_training_a_deepcopy_leaves_the_original_and_both_train(rng):
    model = mlp()
    x, y = rng.standard_normal((32, 4)).astype(np.float32), rng.integers(0, 3, 32)
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    best, before = copy.deepcopy(model), model.get_weights()
    best.fit(x, y, epochs=2, batch_size=8, verbose=0)
    for now, then in zip(model.get_weights(), before):
        np.testing.assert_array_equal(now, then)
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert not np.array_equal(model.get_weights()[0], before[0])
    assert not np.array_equal(best.get_weights()[0], model.get_weights()[0])


def test_a_copy_of_a_slice_holds_layers_of_its_own(rng):
    model = mlp()
    head = model[1:]
    twin = copy.deepcopy(head)
    assert twin[0] is not model[1] and set(twin[0]._holders) == {twin}
    x = rng.standard_normal((3, 6)).astype(np.float32)
    np.testing.assert_array_equal(twin.predict(x), head.predict(x))


@pytest.mark.parametrize("copier", [copy.deepcopy, pickled], ids=["deepcopy", "pickle"])
def test_a_copied_layer_belongs_to_no_model(copier):
    model = mlp()
    layer = copier(model[0])
    assert not layer._holders and layer.name == "dense_0"
    # a model in another dtype takes the copy (the original belongs to `model`, so it would be refused)
    wide = gb.Sequential([layer], device="cpu", dtype="float64")
    np.testing.assert_array_equal(wide[0].weight.data, model[0].weight.data.astype(np.float64))


def test_copy_copy_shares_the_layers_as_a_slice_does():
    model = mlp()
    twin = copy.copy(model)
    assert twin[0] is model[0] and set(model[0]._holders) == {model, twin}
    assert twin._scratch is not model._scratch


# ----------------------------------------------------------------------------- initialisation


@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_relu_family_layers_start_he_normal(activation):
    gb.seed(0)
    fan_in, fan_out = 400, 500
    w = gb.Dense(fan_in, fan_out, activation).weight.data
    assert abs(w.mean()) < 0.01 * math.sqrt(2 / fan_in)
    assert w.std() == pytest.approx(math.sqrt(2 / fan_in), rel=0.02)
    assert np.abs(w).max() > math.sqrt(6 / fan_in)  # normal tails pass the He-uniform limit


@pytest.mark.parametrize("activation", [a for a in ACTIVATIONS if a not in ("relu", "leaky_relu")])
def test_other_layers_start_glorot_uniform(activation):
    gb.seed(0)
    fan_in, fan_out = 400, 500
    w = gb.Dense(fan_in, fan_out, activation).weight.data
    limit = math.sqrt(6 / (fan_in + fan_out))
    assert np.abs(w).max() <= limit
    assert np.abs(w).max() > 0.99 * limit
    assert w.std() == pytest.approx(limit / math.sqrt(3), rel=0.02)


def test_biases_start_at_zero():
    assert np.all(gb.Dense(3, 4, "relu").bias.data == 0)


def test_a_callable_init_receives_the_rng_and_shape():
    layer = gb.Dense(2, 3, init=lambda rng, shape: np.full(shape, 0.5))
    np.testing.assert_array_equal(layer.weight.data, np.full((2, 3), 0.5, np.float32))


NOT_REAL = r"init: expected a real numeric array \(floats or integers\), got dtype "


@pytest.mark.parametrize("returned, error, match", [
    (np.full((3, 2), np.nan), ValueError, r"init: contains NaN or inf"),
    (np.full((3, 2), 1 + 5j), TypeError, NOT_REAL + "complex128"),  # not cast with a ComplexWarning
    (np.full((3, 2), "a"), TypeError, NOT_REAL + "<U1"),
    (np.ones((2, 3)), ValueError, r"init: expected shape \(3, 2\) for the weight \(what the callable returns\), "
                                  r"got \(2, 3\)"),
    (np.full((3, 2), 1e300), ValueError, r"init: values of magnitude up to 1e\+300 overflow to inf in the layer's "
                                         r"float32"),
], ids=["nan", "complex", "strings", "shape", "past_float32"])
def test_a_callable_inits_result_is_checked_as_set_weights_checks_weights(returned, error, match):
    with pytest.raises(error, match=f"^{match}"):
        gb.Dense(3, 2, init=lambda rng, shape: returned)


def test_the_same_seed_gives_the_same_initial_weights():
    gb.seed(42)
    first = mlp().get_weights()
    gb.seed(42)
    second = mlp().get_weights()
    gb.seed(43)
    third = mlp().get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert not np.array_equal(first[0], third[0])


# ----------------------------------------------------------------------------- devices


def test_to_cpu_keeps_the_weights_and_reports_the_cpu():
    model = mlp()
    before = model.get_weights()
    assert model.to("cpu") is model
    assert model.device == "cpu" and model.backend_name == "numpy"
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


SHARERS = {"slice": lambda model: model[:2], "rebuilt": lambda model: gb.Sequential(model.layers, device="cpu")}


@pytest.mark.parametrize("mover", ["sharer", "model"])
@pytest.mark.parametrize("share", SHARERS)
@pytest.mark.parametrize("backend", ["numba"], indirect=True)
def test_moving_layers_another_live_model_holds_is_refused_before_anything_moves(backend, share, mover, rng):
    """A slice.to() once moved its model's layers under it, and the model then failed."""
    model = mlp()
    sharer = SHARERS[share](model)
    x = rng.normal(size=(3, 4)).astype(np.float32)
    expected = model.predict(x)
    with pytest.raises(ValueError, match=r"to: layer 'dense_0' is also held by another model"):
        (sharer if mover == "sharer" else model).to(backend=backend)
    assert model.backend_name == sharer.backend_name == "numpy"
    assert all(type(p.data) is np.ndarray for p in model.parameters())
    np.testing.assert_array_equal(model.predict(x), expected)
    np.testing.assert_array_equal(sharer.predict(x), model[:len(sharer)].predict(x))


@pytest.mark.parametrize("backend", ["numba"], indirect=True)
def test_a_model_moves_once_the_slice_that_shared_its_layers_is_gone(backend, rng):
    model = mlp()
    head = model[1:]
    head.fit(rng.normal(size=(4, 6)).astype(np.float32), np.arange(4) % 3, epochs=1, verbose=0)
    head.itself = head  # a reference cycle: dropped, but alive until the garbage is collected
    del head
    assert model.to(backend=backend).backend_name == backend
    assert model.to("cpu").backend_name == "numpy"


def test_to_the_backend_a_model_is_on_is_allowed_while_a_slice_shares_its_layers(rng):
    model = mlp()
    head = model[1:]
    x = rng.normal(size=(3, 4)).astype(np.float32)
    expected = model.predict(x)
    assert model.to("cpu") is model and head.to(backend="numpy") is head
    np.testing.assert_array_equal(model.predict(x), expected)
    assert head[0] is model[1]


def test_gpubp_device_replaces_auto(monkeypatch):
    monkeypatch.setenv("GPUBP_DEVICE", "cpu")
    assert gb.Sequential([gb.Dense(2, 2)]).device == "cpu"


def test_gpubp_backend_replaces_auto(monkeypatch):
    monkeypatch.setenv("GPUBP_BACKEND", "numpy")
    assert gb.Sequential([gb.Dense(2, 2)]).backend_name == "numpy"


def test_an_explicit_device_wins_over_gpubp_device(monkeypatch):
    monkeypatch.setenv("GPUBP_DEVICE", "cuda")
    assert gb.Sequential([gb.Dense(2, 2)], device="cpu").backend_name == "numpy"


def test_gpubp_device_that_contradicts_an_explicit_backend_is_ignored(monkeypatch):
    monkeypatch.setenv("GPUBP_DEVICE", "cuda")  # set for a whole run: a model that names its backend still builds
    model = gb.Sequential([gb.Dense(2, 2)], backend="numpy")
    assert model.backend_name == "numpy" and model.device == "cpu"


def test_gpubp_backend_that_contradicts_an_explicit_device_is_ignored(monkeypatch):
    monkeypatch.setenv("GPUBP_BACKEND", "numba")
    assert gb.Sequential([gb.Dense(2, 2)], device="cpu").backend_name == "numpy"
    assert backends.resolve("cpu", "auto") == "numpy"


def test_gpubp_device_and_gpubp_backend_that_contradict_each_other_are_a_value_error_naming_both(monkeypatch):
    monkeypatch.setenv("GPUBP_DEVICE", "cuda")
    monkeypatch.setenv("GPUBP_BACKEND", "numpy")
    with pytest.raises(ValueError, match="GPUBP_BACKEND='numpy' runs on device 'cpu', but GPUBP_DEVICE='cuda'"):
        backends.resolve()


def test_an_unknown_gpubp_device_is_a_value_error(monkeypatch):
    monkeypatch.setenv("GPUBP_DEVICE", "tpu")
    with pytest.raises(ValueError, match=r"device: expected one of \('auto', 'cpu', 'cuda'\), got 'tpu'"):
        gb.Sequential([gb.Dense(2, 2)])


def test_a_backend_that_contradicts_the_device_is_a_value_error():
    with pytest.raises(ValueError, match="backend: 'numpy' runs on device 'cpu', but device='cuda' was asked for"):
        backends.resolve("cuda", "numpy")


@pytest.mark.parametrize("backend", ["numpy", "numba"], indirect=True)
def test_fused_true_on_a_backend_without_fused_kernels_says_why(backend):
    with pytest.raises(ValueError, match=f"fused=True: the '{backend}' backend has no fused MLP kernels"):
        gb.Sequential([gb.Dense(3, 4)], backend=backend, fused=True)


def test_fused_auto_runs_layer_by_layer_where_the_backend_has_no_fused_kernels():
    model = gb.Sequential([gb.Dense(3, 4)], device="cpu")
    assert model.fused == "auto" and not model.uses_fused
    assert "no fused MLP kernels" in model.why_not_fused()


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_fused_takes_auto_true_or_false_only(bad):
    with pytest.raises(ValueError, match="fused: expected True, False or 'auto'"):
        gb.Sequential([gb.Dense(3, 4)], device="cpu", fused=bad)


@pytest.mark.parametrize("flag", [np.True_, np.False_])
def test_fused_takes_numpys_bools_as_bools(flag):
    model = gb.Sequential([gb.Dense(3, 4)], device="cpu", fused="auto")
    if flag:
        with pytest.raises(ValueError, match="fused=True: the 'numpy' backend has no fused MLP kernels"):
            model.fused = flag
        assert model.fused == "auto"
    else:
        model.fused = flag
        assert model.fused is False and not model.uses_fused


def test_bf16_without_the_fused_kernels_runs_layer_by_layer():
    """The per-layer kernels compute in bf16 too (the NumPy backend emulates their rounding)."""
    model = gb.Sequential([gb.Dense(3, 4)], device="cpu", precision="bf16")
    assert model.precision == "bf16" and not model.uses_fused
    with pytest.raises(ValueError, match="fused=True: the 'numpy' backend has no fused MLP kernels"):
        gb.Sequential([gb.Dense(3, 4)], device="cpu", precision="bf16", fused=True)


def test_an_unknown_precision_is_rejected_with_the_known_ones():
    with pytest.raises(ValueError, match=r"precision: expected one of \('fp32', 'tf32', 'bf16'\), got 'fp16'"):
        gb.Sequential([gb.Dense(3, 4)], device="cpu", precision="fp16")


def test_float64_is_kept_on_the_cpu():
    model = mlp(dtype="float64")
    assert model.dtype == np.float64 and all(p.data.dtype == np.float64 for p in model.parameters())
    assert model.forward(np.ones((2, 4), np.float32)).dtype == np.float64


@pytest.mark.parametrize("layer_dtype, model_dtype", [("float64", "float32"), ("float32", "float64")])
def test_every_layer_takes_the_models_dtype(layer_dtype, model_dtype):
    """Both ways: NumPy reads np.dtype(None) as float64, which once kept a float64 layer in a float32 model."""
    model = gb.Sequential([gb.Dense(3, 4, dtype=layer_dtype), gb.Dropout(0.1), gb.Dense(4, 2)], device="cpu",
                          dtype=model_dtype)
    assert {p.data.dtype for p in model.parameters()} == {np.dtype(model_dtype)}
    assert model.predict(np.ones((1, 3), np.float32)).dtype == np.dtype(model_dtype)


@pytest.mark.parametrize("make", [lambda: gb.Dense(3, 4, dtype="float16"),
                                  lambda: gb.Sequential([gb.Dense(3, 4)], device="cpu", dtype=np.float16),
                                  lambda: gb.Sequential([gb.Dense(3, 4)], device="cpu", dtype="int32")])
def test_weights_are_float32_or_float64_only(make):
    with pytest.raises(TypeError, match=r"dtype: expected float32 or float64, got (float16|int32)"):
        make()


def test_dense_dtype_none_is_float32_as_for_sequential():
    """NumPy reads np.dtype(None) as float64; None means the default wherever gpubp takes a dtype."""
    layer = gb.Dense(4, 2, dtype=None)
    assert layer.weight.data.dtype == layer.bias.data.dtype == np.float32
    assert gb.Sequential([layer], device="cpu").dtype == np.float32


@pytest.mark.parametrize("logits", ["yes", 1, None])
def test_predict_takes_logits_as_a_bool(logits):
    with pytest.raises(TypeError, match="logits: expected True or False"):
        mlp().predict(np.ones((2, 4), np.float32), logits=logits)


@pytest.mark.parametrize("call", [lambda m, x: m.predict(x), lambda m, x: m.evaluate(x, np.zeros(2)),
                                  lambda m, x: m.fit(x, np.zeros(2), verbose=0)])
def test_a_model_without_layers_says_so(call):
    with pytest.raises(ValueError, match="the model has no layers"):
        call(gb.Sequential([], device="cpu"), np.ones((2, 3), np.float32))


# ----------------------------------------------------------------------------- forward / backward


def test_predict_in_batches_equals_predict_in_one_go(rng):
    model = mlp(activation="tanh", dtype="float64")
    x = rng.normal(size=(53, 4))
    np.testing.assert_allclose(model.predict(x, batch_size=7), model.predict(x, batch_size=1000),
                               rtol=1e-13, atol=1e-15)


def test_predict_equals_an_inference_forward(rng):
    model = mlp()
    x = rng.normal(size=(9, 4)).astype(np.float32)
    np.testing.assert_array_equal(model.predict(x), model.forward(x, training=False))


@pytest.mark.parametrize("training", [True, False])
def test_forward_returns_a_fresh_array_each_call(rng, training):
    model = mlp()
    x1, x2 = rng.normal(size=(2, 5, 4)).astype(np.float32)
    first = model.forward(x1, training=training)
    kept = first.copy()
    second = model.forward(x2, training=training)
    assert second is not first
    np.testing.assert_array_equal(first, kept)


def test_forward_says_its_output_may_be_the_array_backward_reads(rng):
    """A tanh head keeps its output for act': changing forward's output in place changes the gradients,
    which forward's docstring once hid by calling the output fresh."""
    doc = " ".join(gb.Sequential.forward.__doc__.split())
    assert "it is the model's until the next forward, so copy it before changing it in place" in doc
    model = gb.Sequential([gb.Dense(4, 3, "tanh")], device="cpu", dtype="float64")
    x, dout = rng.normal(size=(5, 4)), rng.normal(size=(5, 3))
    model.forward(x)
    model.backward(dout)
    expected = model[0].weight.grad.copy()
    model.forward(x).copy()[...] = 0  # a copy: the gradients stay
    model.backward(dout)
    np.testing.assert_array_equal(model[0].weight.grad, expected)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_an_inference_forward_does_not_clobber_what_backward_needs(rng, activation):
    model = mlp(activation=activation, dtype="float64")
    x, other = rng.normal(size=(2, 6, 4))
    labels = np.array([0, 1, 2, 0, 1, 2])
    expected = train_step_grads(model, x, labels)

    out = model.forward(x)
    _, dout = gb.losses.cross_entropy(out, labels)
    model.forward(other, training=False)  # same batch size: the buffers most likely to be shared
    model.predict(other)
    model.backward(dout)
    for want, param in zip(expected, model.parameters()):
        np.testing.assert_array_equal(param.grad, want)


OTHER_FORWARDS = {
    "slice below, same batch": lambda model, x: model[:1].forward(x),
    "slice below, smaller batch": lambda model, x: model[:1].forward(x[:2]),
    "slice above": lambda model, x: model[1:].forward(np.ones((6, 6))),
    "model built from its layers": lambda model, x: gb.Sequential(model.layers, device="cpu").forward(x),
}


@pytest.mark.parametrize("other", OTHER_FORWARDS)
def test_backward_after_another_models_forward_through_its_layers_is_refused_changing_nothing(rng, other):
    """Layers keep one set of arrays for backward: a slice's forward once silently replaced the
    model's, and its backward computed the gradients of the slice's input (or failed in a matmul)."""
    model = mlp(dtype="float64")
    x, x2 = rng.normal(size=(2, 6, 4))
    labels = np.array([0, 1, 2, 0, 1, 2])
    expected = train_step_grads(model, x, labels)
    grads = [p.grad for p in model.parameters()]
    _, dout = gb.losses.cross_entropy(model.forward(x), labels)
    OTHER_FORWARDS[other](model, x2)
    with pytest.raises(RuntimeError, match=r"backward: layer 'dense_\d' now keeps what another model's forward \(a "
                                           r"slice of this model, or a model sharing its layers\) stored"):
        model.backward(dout)
    for param, grad, want in zip(model.parameters(), grads, expected):
        assert param.grad is grad
        np.testing.assert_array_equal(param.grad, want)
    for got, want in zip(train_step_grads(model, x, labels), expected):  # after a forward of its own again
        np.testing.assert_array_equal(got, want)


def test_a_frozen_layers_output_kept_for_the_layer_above_is_checked_too(rng):
    """The input the lowest trained layer keeps is the frozen layer's output buffer, which another
    model running that frozen layer below a layer that keeps its input overwrites."""
    model = mlp(dtype="float64")
    model[0].freeze()
    x, x2 = rng.normal(size=(2, 6, 4))
    _, dout = gb.losses.cross_entropy(model.forward(x), np.array([0, 1, 2, 0, 1, 2]))
    gb.Sequential([model[0], gb.Dense(6, 2, dtype="float64")], device="cpu").forward(x2)
    with pytest.raises(RuntimeError, match=r"backward: layer 'dense_0' now keeps what another model's forward"):
        model.backward(dout)


def test_another_models_forward_below_what_backward_reads_is_allowed(rng):
    model = mlp(dtype="float64")
    model.freeze_to(2)
    x, x2 = rng.normal(size=(2, 6, 4))
    _, dout = gb.losses.cross_entropy(model.forward(x), np.array([0, 1, 2, 0, 1, 2]))
    model.backward(dout)
    expected = model[2].weight.grad.copy()
    model.forward(x)
    model[:1].forward(x2)
    model.backward(dout)
    np.testing.assert_array_equal(model[2].weight.grad, expected)


def test_backward_overwrites_gradients_instead_of_accumulating(rng):
    model = mlp(dtype="float64")
    x = rng.normal(size=(5, 4))
    labels = np.array([0, 1, 2, 1, 0])
    first = train_step_grads(model, x, labels)
    second = train_step_grads(model, x, labels)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_zero_grad_sets_every_gradient_to_none(rng):
    model = mlp()
    train_step_grads(model, rng.normal(size=(3, 4)).astype(np.float32), np.array([0, 1, 2]))
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_backward_returns_the_input_gradient_only_when_asked(rng):
    model = mlp()
    x = rng.normal(size=(3, 4)).astype(np.float32)
    _, dout = gb.losses.cross_entropy(model.forward(x), np.array([0, 1, 2]))
    assert model.backward(dout) is None
    _, dout = gb.losses.cross_entropy(model.forward(x, need_input_grad=True), np.array([0, 1, 2]))
    assert model.backward(dout, need_input_grad=True).shape == (3, 4)


def test_backward_without_a_training_forward_is_a_runtime_error(rng):
    model = mlp()
    model.forward(rng.normal(size=(3, 4)).astype(np.float32), training=False)
    with pytest.raises(RuntimeError, match="backward: run forward"):
        model.backward(np.ones((3, 3), np.float32))


def test_calling_the_model_is_forward(rng):
    model = mlp()
    x = rng.normal(size=(3, 4)).astype(np.float32)
    np.testing.assert_array_equal(model(x, training=False), model.forward(x, training=False))


def test_freezing_a_layer_clears_its_gradients(rng):
    model = mlp()
    train_step_grads(model, rng.normal(size=(3, 4)).astype(np.float32), np.array([0, 1, 2]))
    model[1].freeze()
    assert model[1].weight.grad is None and model[1].bias.grad is None
    assert not model[1].trainable and model[0].trainable


def test_freezing_a_parameter_clears_its_gradient(rng):
    model = mlp()
    train_step_grads(model, rng.normal(size=(3, 4)).astype(np.float32), np.array([0, 1, 2]))
    model[0].bias.trainable = False
    assert model[0].bias.grad is None and model[0].weight.grad is not None
    model[0].weight.trainable = False
    assert model[0].weight.grad is None


# ----------------------------------------------------------------------------- the layer protocol


class Scale(gb.Layer):
    """``y = factor * x``: a layer without parameters that keeps its width, written against the
    layer protocol alone (on the NumPy backend), to show Sequential needs nothing else."""

    kind = "scale"

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def connect(self, width, where, below):
        self.in_features = self.out_features = width

    def keeps(self, act, need_dx, need_dw):
        return False, False

    def forward(self, x, out=None, keep_input=False, keep_output=False, training=True, logits=False,
                precision="fp32"):
        return x * np.float32(self.factor)

    def backward(self, dy, need_dx, out_dx=None, precision="fp32"):
        return dy * np.float32(self.factor) if need_dx else None

    def backward_kernels(self, act, need_dx, need_dw, precision="fp32"):
        return []


def scaled_and_folded(seed=3):
    """Dense -> Scale(2) -> Dense, and the same function with the 2 folded into the second weight."""
    gb.seed(seed)
    scaled = gb.Sequential([gb.Dense(4, 5, "tanh"), Scale(2.0), gb.Dense(5, 3)], device="cpu")
    folded = gb.Sequential([gb.Dense(4, 5, "tanh"), gb.Dense(5, 3)], device="cpu")
    w0, b0, w1, b1 = scaled.get_weights()
    folded.set_weights([w0, b0, 2 * w1, b1])
    return scaled, folded


def test_sequential_holds_a_layer_that_is_not_a_dense(rng):
    scaled, folded = scaled_and_folded()
    assert [layer.name for layer in scaled] == ["dense_0", "scale_1", "dense_2"]
    assert (scaled.in_features, scaled[1].in_features, scaled[1].out_features) == (4, 5, 5)
    x, labels = rng.standard_normal((6, 4)).astype(np.float32), np.array([0, 1, 2, 0, 1, 2])
    np.testing.assert_allclose(scaled.forward(x), folded.forward(x), rtol=1e-6)
    scaled.backward(gb.losses.cross_entropy(scaled.forward(x), labels)[1])
    folded.backward(gb.losses.cross_entropy(folded.forward(x), labels)[1])
    np.testing.assert_allclose(scaled[0].weight.grad, folded[0].weight.grad, rtol=1e-5)  # dX passed through Scale
    np.testing.assert_allclose(scaled[2].weight.grad, 2 * folded[1].weight.grad, rtol=1e-5)
    assert scaled.backward_plan() == [("dense_0", ["dense_dw"]), ("scale_1", []), ("dense_2", ["dense_dw", "dense_dx"])]
    assert "scale_1" in scaled.summary() and not scaled[1].trainable


def test_a_layer_without_parameters_trains_in_fit_and_a_step_and_freezes_around_it(rng):
    scaled, _ = scaled_and_folded()
    x, y = rng.standard_normal((32, 4)).astype(np.float32), rng.integers(0, 3, 32)
    history = scaled.fit(x, y, epochs=5, batch_size=8, verbose=0)
    assert history["loss"][-1] < history["loss"][0]
    scaled.freeze_to(2)
    frozen = scaled.get_weights()[:2]
    scaled.train_step("cross_entropy", "sgd")(x, y)
    for now, before in zip(scaled.get_weights()[:2], frozen):
        np.testing.assert_array_equal(now, before)
    assert scaled.backward_plan() == [("dense_0", []), ("scale_1", []), ("dense_2", ["dense_dw"])]


class PassThrough(Scale):
    """A layer of your own that returns its input as its output and its dy as its dX, writing
    into neither ``out`` nor ``out_dx``."""

    kind = "pass"

    def __init__(self) -> None:
        super().__init__(1.0)

    def forward(self, x, out=None, keep_input=False, keep_output=False, training=True, logits=False,
                precision="fp32"):
        return x

    def backward(self, dy, need_dx, out_dx=None, precision="fp32"):
        return dy if need_dx else None


def assert_trains_as(model, plain, x, dout) -> None:
    """``model``'s training forward, backward (with and without the input gradient) and parameter
    gradients are ``plain``'s, whose parameters it shares the values of."""
    for need_input_grad in (False, True):
        np.testing.assert_array_equal(model.forward(x, need_input_grad=need_input_grad),
                                      plain.forward(x, need_input_grad=need_input_grad))
        dx, expected = model.backward(dout, need_input_grad), plain.backward(dout, need_input_grad)
        if need_input_grad:
            np.testing.assert_allclose(dx, expected, rtol=1e-6, atol=1e-7)
        for ours, reference in zip(model.parameters(), plain.parameters()):
            assert (ours.grad is None) == (reference.grad is None)
            if ours.grad is not None:
                np.testing.assert_allclose(ours.grad, reference.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("frozen", [0, 7], ids=["none", "all_but_the_top_bias"])
@pytest.mark.parametrize("passes", [1, 2, 3])
def test_a_layer_that_returns_its_input_leaves_the_layer_above_an_output_buffer_of_its_own(rng, passes, frozen):
    """The model's scratch buffers alternate by the layers that wrote into them: a Dense above a
    layer that passed its input (or dy) through is not handed that input (or dy) as its output."""
    gb.seed(0)
    plain = gb.Sequential([gb.Dense(4, 8, "relu"), gb.Dense(8, 8, "tanh"), gb.Dense(8, 8, "relu"), gb.Dense(8, 3)],
                          device="cpu")
    model = gb.Sequential([gb.Dense(4, 8, "relu"), gb.Dense(8, 8, "tanh")] + [PassThrough() for _ in range(passes)]
                          + [gb.Dense(8, 8, "relu"), gb.Dense(8, 3)], device="cpu")
    model.set_weights(plain.get_weights())
    # The first ``frozen`` parameters: layers that keep nothing write into the model's scratch buffers.
    for ours, reference in zip(model.parameters()[:frozen], plain.parameters()[:frozen]):
        ours.trainable = reference.trainable = False
    x, dout = rng.standard_normal((6, 4)).astype(np.float32), rng.standard_normal((6, 3)).astype(np.float32)
    np.testing.assert_array_equal(model.predict(x), plain.predict(x))
    assert_trains_as(model, plain, x, dout)


def test_the_fused_kernels_say_they_run_dense_layers_only():
    scaled, _ = scaled_and_folded()
    fused_backend = type("FusedBackend", (), {"FUSED_MLP_MAX_WIDTH": 128, "FUSED_MLP_MAX_LAYERS": 8})
    assert scaled.why_not_fused(fused_backend, "cupy") == \
        "layer 'scale_1' is a Scale; the fused kernels run Dense layers only"


def test_saving_a_layer_the_file_format_does_not_hold_is_refused(tmp_path):
    scaled, _ = scaled_and_folded()
    with pytest.raises(TypeError, match=r"model: layers\[1\] is a Scale; the file format holds Dense and Dropout "
                                        r"layers only"):
        scaled.save(tmp_path / "scaled.npz")
    assert not (tmp_path / "scaled.npz").exists()
