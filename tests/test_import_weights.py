"""Pretrained weights: PyTorch state dicts, Keras Dense weights and set_weights.

PyTorch is a test-only dependency: the tests that build a real ``torch.nn.Sequential``
skip without it; the rest use NumPy arrays laid out as PyTorch and Keras lay them out.
"""

import math

import numpy as np
import pytest

import gpubp as gb
from gpubp import io

SIZES = (6, 9, 7, 3)  # tiny: the Numba backend runs in the CUDA simulator here


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch", reason="PyTorch is a test-only dependency: pip install 'gpubp[torch]'")


def torch_mlp(torch, activation):
    """Linear -> activation -> Linear -> activation -> Linear, as PyTorch users build it."""
    torch.manual_seed(0)
    act = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh, "gelu": torch.nn.GELU}[activation]
    return torch.nn.Sequential(
        torch.nn.Linear(SIZES[0], SIZES[1]), act(),
        torch.nn.Linear(SIZES[1], SIZES[2]), act(),
        torch.nn.Linear(SIZES[2], SIZES[3]),
    )


def numpy_state_dict(rng, sizes=SIZES):
    """A state dict of NumPy arrays in PyTorch's layout: weight (out, in), keys as nn.Sequential names them."""
    sd = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        sd[f"{2 * i}.weight"] = rng.standard_normal((fan_out, fan_in)).astype(np.float32)
        sd[f"{2 * i}.bias"] = rng.standard_normal(fan_out).astype(np.float32)
    return sd


def keras_weights(rng, sizes=SIZES):
    """``model.get_weights()`` of a Keras stack of Dense layers: kernel (in, units), bias (units,)."""
    weights = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        weights += [rng.standard_normal((fan_in, fan_out)).astype(np.float32),
                    rng.standard_normal(fan_out).astype(np.float32)]
    return weights


def make_model(activation="relu"):
    gb.seed(0)
    acts = [activation, activation, None]
    return gb.Sequential([gb.Dense(a, b, act) for a, b, act in zip(SIZES[:-1], SIZES[1:], acts)], device="cpu")


def reference_forward(weights, activation, x):
    act = {"relu": lambda z: np.maximum(z, 0), "tanh": np.tanh}[activation]
    h = x.astype(np.float64)
    for i in range(0, len(weights), 2):
        h = h @ weights[i] + weights[i + 1]
        if i + 2 < len(weights):
            h = act(h)
    return h


# ----------------------------------------------------------------------------- PyTorch


@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu"])
def test_torch_sequential_imports_with_the_same_outputs(torch, backend, activation, rng):
    net = torch_mlp(torch, activation)
    model = io.from_torch_state_dict(net.state_dict(), activations=[activation, activation, None], backend=backend)
    x = rng.standard_normal((5, SIZES[0])).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(model.predict(x), expected, rtol=1e-5, atol=1e-5)


def test_torch_linear_weights_are_transposed_to_in_out(torch):
    net = torch_mlp(torch, "relu")
    model = io.from_torch_state_dict(net.state_dict(), device="cpu")
    for layer, linear in zip(model, net[::2]):
        assert np.array_equal(layer.weight.data, linear.weight.detach().numpy().T)
        assert np.array_equal(layer.bias.data, linear.bias.detach().numpy())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_a_torch_state_dict_of_another_float_type_imports_its_values_exactly(torch, dtype):
    """NumPy has no bfloat16: those tensors widen to float32 first (exact), as float16 ones do."""
    net = torch_mlp(torch, "relu").to(getattr(torch, dtype))
    model = io.from_torch_state_dict(net.state_dict(), device="cpu")
    expected = [t.detach().float().numpy() for t in net.state_dict().values()]
    for got, want in zip(model.get_weights(), expected):
        np.testing.assert_array_equal(got, want.T if want.ndim == 2 else want)


def test_state_dict_of_numpy_arrays_imports_like_one_of_tensors(torch):
    net = torch_mlp(torch, "tanh")
    as_numpy = {key: value.numpy() for key, value in net.state_dict().items()}
    from_tensors = io.from_torch_state_dict(net.state_dict(), activations=["tanh", "tanh", None], device="cpu")
    from_arrays = io.from_torch_state_dict(as_numpy, activations=["tanh", "tanh", None], device="cpu")
    for a, b in zip(from_tensors.get_weights(), from_arrays.get_weights()):
        assert np.array_equal(a, b)


def test_training_an_imported_model_leaves_the_torch_module_unchanged(torch, rng):
    net = torch_mlp(torch, "relu")
    before = {key: value.clone() for key, value in net.state_dict().items()}
    model = io.from_torch_state_dict(net.state_dict(), device="cpu")
    x = rng.standard_normal((16, SIZES[0])).astype(np.float32)
    model.fit(x, rng.integers(0, SIZES[-1], 16), optimizer=gb.optim.SGD(model.parameters(), lr=0.5), verbose=0)
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key


# ----------------------------------------------------------------------------- NumPy state dicts


def test_numpy_state_dict_builds_a_model_with_the_reference_outputs(rng):
    sd = numpy_state_dict(rng)
    model = io.from_torch_state_dict(sd, device="cpu")
    assert [(layer.in_features, layer.out_features, layer.activation) for layer in model] == \
           [(6, 9, "relu"), (9, 7, "relu"), (7, 3, "identity")]
    x = rng.standard_normal((4, SIZES[0])).astype(np.float32)
    weights = [sd[key].T if key.endswith("weight") else sd[key] for key in sd]
    np.testing.assert_allclose(model.predict(x), reference_forward(weights, "relu", x), rtol=1e-5, atol=1e-5)


def test_state_dict_loads_into_an_existing_model(rng):
    sd = numpy_state_dict(rng)
    model = make_model()
    assert io.from_torch_state_dict(sd, model=model) is model
    assert all(np.array_equal(w, sd[f"{2 * i}.weight"].T) for i, w in enumerate(model.get_weights()[::2]))


def test_state_dict_loads_into_a_model_with_dropout_layers(rng):
    """nn.Sequential(Linear, ReLU, Dropout, Linear, ...): the Dropouts hold no weights on either side."""
    sd = numpy_state_dict(rng)
    model = gb.Sequential([gb.Dense(6, 9, "relu"), gb.Dropout(0.5), gb.Dense(9, 7, "relu"), gb.Dropout(0.2),
                           gb.Dense(7, 3)], device="cpu")
    assert io.from_torch_state_dict(sd, model=model) is model
    dense = [layer for layer in model if isinstance(layer, gb.Dense)]
    assert all(np.array_equal(layer.weight.data, sd[f"{2 * i}.weight"].T) for i, layer in enumerate(dense))
    with pytest.raises(ValueError, match=r"3 Linear layers \['0', '2', '4'\], but the model has 2 Dense layers"):
        io.from_torch_state_dict(sd, model=gb.Sequential([gb.Dense(6, 9), gb.Dropout(0.5), gb.Dense(9, 3)],
                                                          device="cpu"))


def test_imported_weights_do_not_share_memory_with_the_state_dict(rng):
    sd = numpy_state_dict(rng)
    model = io.from_torch_state_dict(sd, device="cpu")
    for param in model.parameters():
        assert not any(np.shares_memory(param.data, value) for value in sd.values())


def without(sd, key):
    return {k: v for k, v in sd.items() if k != key}


def replaced(sd, key, value):
    return {**sd, key: value}


BAD_STATE_DICTS = {
    "missing_bias": (lambda sd: without(sd, "2.bias"), "missing key '2.bias'"),
    "missing_weight": (lambda sd: without(sd, "2.weight"), "missing key '2.weight'"),
    "missing_layer": (lambda sd: without(without(sd, "4.weight"), "4.bias"), "2 Linear layers"),
    "weight_not_transposed": (lambda sd: replaced(sd, "2.weight", sd["2.weight"].T),
                              r"'2.weight' has shape \(9, 7\) and '2.bias' \(7,\): a weight stored \(in, out\)"),
    "weight_wrong_width": (lambda sd: replaced(sd, "2.weight", np.ones((7, 8), np.float32)), "'2.weight'"),
    "bias_wrong_length": (lambda sd: replaced(sd, "0.bias", np.ones(8, np.float32)), r"'0.bias' has shape \(8,\)"),
    "weight_not_2d": (lambda sd: replaced(sd, "0.weight", np.ones((9, 6, 1), np.float32)), "2-D"),
}


@pytest.mark.parametrize("corrupt, message", BAD_STATE_DICTS.values(), ids=BAD_STATE_DICTS.keys())
def test_bad_state_dict_raises_a_clear_error_and_leaves_the_model_unchanged(corrupt, message, rng):
    model = make_model()
    before = model.get_weights()
    with pytest.raises(ValueError, match=message):
        io.from_torch_state_dict(corrupt(numpy_state_dict(rng)), model=model)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


@pytest.mark.parametrize("into_a_model", [False, True])
@pytest.mark.parametrize("key, bad, message", [
    ("2.weight", np.nan, "contains NaN or inf"),
    ("4.bias", 1e300, r"values of magnitude up to 1e\+300 overflow to inf in the (new )?model's float32"),
], ids=["nan", "float64_past_float32"])
def test_a_bad_value_in_a_state_dict_is_named_by_its_key(rng, into_a_model, key, bad, message):
    """By the argument and key the caller passed, not by set_weights' ``weights[i]``."""
    sd = {name: value.astype(np.float64) for name, value in numpy_state_dict(rng).items()}
    sd[key][0] = bad
    model = make_model() if into_a_model else None
    before = model.get_weights() if into_a_model else None
    with pytest.raises(ValueError, match=rf"^state_dict: '{key}': {message}"):
        io.from_torch_state_dict(sd, model=model, **({} if into_a_model else {"device": "cpu"}))
    if into_a_model:
        assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


@pytest.mark.parametrize("corrupt, message", [
    (lambda sd: without(sd, "2.weight"), "missing key '2.weight'"),
    (lambda sd: replaced(sd, "2.weight", np.ones((7, 8), np.float32)), "layer 1 takes 8 inputs but layer 0 gives 9"),
], ids=["missing_weight", "layers_do_not_chain"])
def test_bad_state_dict_without_a_model_raises_a_clear_error(corrupt, message, rng):
    with pytest.raises(ValueError, match=message):
        io.from_torch_state_dict(corrupt(numpy_state_dict(rng)), device="cpu")


def test_a_state_dict_of_in_out_weights_points_to_mlp_to_sequential(rng):
    sd = {f"layers.{i // 2}.{name}": value.T if value.ndim == 2 else value
          for i, (name, value) in enumerate(zip(["weight", "bias"] * 3, numpy_state_dict(rng).values()))}
    with pytest.raises(ValueError, match=r"state_dict: 'layers.0.weight' has shape \(6, 9\) and 'layers.0.bias' "
                                         r"\(9,\): a weight stored \(in, out\), as gpubp.torch.MLP stores them, .*"
                                         r"MLP.to_sequential\(\)"):
        io.from_torch_state_dict(sd, device="cpu")


# Square layers only (nothing in the shapes tells the layout), a square first layer, none square;
# straight from state_dict(), through torch.save, and inside another module. Nothing is loaded.
@pytest.mark.parametrize("sizes", [(8, 8, 8), (8, 8, 3), (6, 9, 3)])
@pytest.mark.parametrize("into_a_model", [False, True])
@pytest.mark.parametrize("how", ["state_dict", "torch_save", "nested"])
def test_the_state_dict_of_a_gpubp_torch_mlp_points_to_to_sequential(torch, tmp_path, sizes, into_a_model, how):
    from gpubp.torch import MLP

    mlp = MLP(list(sizes))
    state = (torch.nn.Sequential(mlp) if how == "nested" else mlp).state_dict()
    if how == "torch_save":
        torch.save(state, tmp_path / "mlp.pt")
        state = torch.load(tmp_path / "mlp.pt")
    model = gb.Sequential([gb.Dense(a, b) for a, b in zip(sizes[:-1], sizes[1:])], device="cpu")
    before = model.get_weights()
    where = r" \(the module at '0'\)" if how == "nested" else ""
    message = rf"state_dict: the state of a gpubp.torch.MLP{where}, .* MLP.to_sequential\(\)"
    with pytest.raises(ValueError, match=message):
        io.from_torch_state_dict(state, **({"model": model} if into_a_model else {"device": "cpu"}))
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


def test_a_torch_module_with_its_linear_layers_in_an_attribute_named_layers_imports(torch):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(6, 9), torch.nn.Linear(9, 9), torch.nn.Linear(9, 3)])

        def forward(self, x):
            for linear in self.layers[:-1]:
                x = torch.relu(linear(x))
            return self.layers[-1](x)

    torch.manual_seed(0)
    net = Net()
    assert list(net.state_dict())[:2] == ["layers.0.weight", "layers.0.bias"]  # the keys an MLP's state dict has
    model = io.from_torch_state_dict(net.state_dict(), device="cpu")
    x = torch.randn(5, 6)
    with torch.no_grad():
        np.testing.assert_allclose(model.predict(x.numpy()), net(x).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad, error", [([1, 2], TypeError), ({}, ValueError), ({"0.bias": np.ones(3)}, ValueError),
                                        ({"0.weight": np.array([["a"]]), "0.bias": np.ones(1)}, TypeError)],
                         ids=["not_a_mapping", "empty", "no_weights", "not_numeric"])
def test_state_dict_that_is_not_one_raises(bad, error):
    with pytest.raises(error, match="state_dict|state dict"):
        io.from_torch_state_dict(bad, device="cpu")


def test_activations_must_name_one_per_layer(rng):
    with pytest.raises(ValueError, match="activations: expected 3 entries"):
        io.from_torch_state_dict(numpy_state_dict(rng), activations=["relu", None], device="cpu")


# ----------------------------------------------------------------------------- Keras


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_keras_dense_kernels_import_as_they_are(activation, rng):
    weights = keras_weights(rng)
    model = io.from_keras_weights(weights, activations=[activation, activation, None], device="cpu")
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), weights))
    x = rng.standard_normal((4, SIZES[0])).astype(np.float32)
    np.testing.assert_allclose(model.predict(x), reference_forward(weights, activation, x), rtol=1e-5, atol=1e-5)


def test_keras_weights_load_into_an_existing_model(rng):
    weights = keras_weights(rng)
    model = make_model()
    assert io.from_keras_weights(weights, model=model) is model
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), weights))


@pytest.mark.parametrize("corrupt, message", [
    (lambda w: w[:-1], "non-empty list"),
    (lambda w: [], "non-empty list"),
    (lambda w: w[:2] + [w[2].T] + w[3:], r"weights\[3\]: expected bias shape \(9,\)"),
    (lambda w: w[:1] + [np.ones(5, np.float32)] + w[2:], r"weights\[1\]: expected bias shape \(9,\)"),
    (lambda w: w[:2] + [np.ones((9, 8), np.float32), np.ones(8, np.float32)] + w[4:], r"weights\[2\]: expected shape"),
], ids=["odd_length", "empty", "kernel_transposed", "bias_wrong_length", "kernel_wrong_width"])
def test_bad_keras_weights_raise_and_leave_the_model_unchanged(corrupt, message, rng):
    model = make_model()
    before = model.get_weights()
    with pytest.raises(ValueError, match=message):
        io.from_keras_weights(corrupt(keras_weights(rng)), model=model)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


def test_keras_leaky_relu_is_refused_since_its_slope_is_not_gpubps(rng):
    """keras.activations.leaky_relu has slope 0.2 (LeakyReLU's default 0.3); gpubp's has 0.01."""
    with pytest.raises(ValueError, match=r"^activations\[1\]: Keras's 'leaky_relu' .* negative slope of 0\.2, .* "
                                         r"gpubp's leaky_relu has a fixed 0\.01"):
        io.from_keras_weights(keras_weights(rng), activations=["relu", "leaky_relu", None], device="cpu")


def test_keras_weights_of_a_slope_of_0_01_load_into_a_model_built_with_leaky_relu(rng):
    """The way the refusal points to, for a Keras LeakyReLU(negative_slope=0.01)."""
    weights = keras_weights(rng)
    model = io.from_keras_weights(weights, model=make_model("leaky_relu"))
    x = rng.standard_normal((4, SIZES[0])).astype(np.float32)
    expected = keras_forward(weights, x, lambda z: np.where(z > 0, z, 0.01 * z), KERAS_3["linear"])
    np.testing.assert_allclose(model.predict(x), expected, rtol=1e-5, atol=1e-5)


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# What each activation string gpubp takes computes in Keras 3 (keras.activations), in float64.
KERAS_3 = {
    "linear": lambda z: z,
    "relu": lambda z: np.maximum(z, 0),
    "sigmoid": lambda z: 1 / (1 + np.exp(-z)),
    "tanh": np.tanh,
    "gelu": lambda z: 0.5 * z * (1 + np.vectorize(math.erf)(z / math.sqrt(2))),  # approximate=False
    "silu": lambda z: z / (1 + np.exp(-z)),
    "swish": lambda z: z / (1 + np.exp(-z)),
    "softmax": _softmax,  # over the last axis
}


def keras_forward(weights, x, hidden, top):
    """The outputs of Keras Dense layers of ``weights``: ``hidden`` between them, ``top`` on the last."""
    h = x.astype(np.float64)
    for i in range(0, len(weights), 2):
        h = h @ weights[i] + weights[i + 1]
        h = hidden(h) if i + 2 < len(weights) else top(h)
    return h


@pytest.mark.parametrize("name", KERAS_3)
def test_the_keras_activation_strings_gpubp_takes_compute_what_they_compute_in_keras_3(name, rng):
    weights = keras_weights(rng)
    model = io.from_keras_weights(weights, activations=["relu", "relu", name], device="cpu")
    x = rng.standard_normal((4, SIZES[0])).astype(np.float32)
    expected = keras_forward(weights, x, KERAS_3["relu"], KERAS_3[name])
    np.testing.assert_allclose(model.predict(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["elu", "selu", "softplus", "softsign", "exponential", "relu6", "mish",
                                  "log_softmax", "hard_sigmoid", "hard_silu", "hard_swish", "celu", "log_sigmoid"])
def test_keras_activation_strings_gpubp_has_no_function_for_are_refused(name, rng):
    with pytest.raises(ValueError, match=rf"^activations\[2\]: unknown activation '{name}'"):
        io.from_keras_weights(keras_weights(rng), activations=["relu", "relu", name], device="cpu")


IMPORTERS = {
    "torch": lambda rng, **kwargs: io.from_torch_state_dict(numpy_state_dict(rng), **kwargs),
    "keras": lambda rng, **kwargs: io.from_keras_weights(keras_weights(rng), **kwargs),
}


@pytest.mark.parametrize("argument, value", [("activations", ["tanh", "tanh", "sigmoid"]), ("dtype", np.float64),
                                             ("device", "cpu"), ("backend", "numpy")])
@pytest.mark.parametrize("importer", IMPORTERS.values(), ids=IMPORTERS.keys())
def test_the_arguments_of_a_new_model_are_refused_beside_model(importer, argument, value, rng):
    """They would be ignored: the weights go into ``model`` as it is."""
    model = make_model()
    before = model.get_weights()
    with pytest.raises(TypeError, match=rf"^{argument}: does not apply with model="):
        importer(rng, model=model, **{argument: value})
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    assert [layer.activation for layer in model] == ["relu", "relu", "identity"] and model.dtype == np.float32


# ----------------------------------------------------------------------------- set_weights


def test_set_weights_copies_the_arrays(rng):
    weights = keras_weights(rng)
    model = make_model()
    model.set_weights(weights)
    model.fit(rng.standard_normal((16, SIZES[0])).astype(np.float32), rng.integers(0, 3, 16),
              optimizer=gb.optim.SGD(model.parameters(), lr=0.5), verbose=0)
    assert not np.array_equal(model.get_weights()[0], weights[0])
    assert all(not np.shares_memory(p.data, w) for p, w in zip(model.parameters(), weights))


@pytest.mark.parametrize("index", [0, 1, 5])
def test_set_weights_checks_every_shape_before_changing_any(index, rng):
    model = make_model()
    before = model.get_weights()
    weights = keras_weights(rng)
    weights[index] = np.ones(weights[index].shape + (1,), np.float32)
    with pytest.raises(ValueError, match=rf"weights\[{index}\]: expected shape"):
        model.set_weights(weights)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


@pytest.mark.parametrize("weights, error, message", [
    ("not a list", TypeError, "expected a list"),
    ([np.ones((6, 9))], ValueError, "expected 6 arrays"),
], ids=["not_a_list", "wrong_count"])
def test_set_weights_rejects_what_is_not_the_model_s_weight_list(weights, error, message):
    with pytest.raises(error, match=message):
        make_model().set_weights(weights)
