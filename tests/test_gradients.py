"""Backward against float64 central differences, and against PyTorch.

Every activation is checked with every loss on small shapes that include batch 1 and
odd widths; hypothesis draws further random shapes and depths. The checks use
``gpubp.gradcheck``, the package's own utility.
"""

import zlib

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import gpubp as gb
from gpubp import activations, gradcheck
from gpubp.activations import ACTIVATIONS
from gpubp.backends import numpy_backend

LOSSES = ("mse", "mae", "huber", "cross_entropy", "binary_cross_entropy", "poisson")
SHAPES = [  # (batch, in, hidden, out)
    (1, 3, 5, 2),
    (7, 5, 3, 4),
    (4, 1, 9, 1),
]


def random_model(sizes, activation, seed, dtype="float64", head=None):
    """A model whose every layer uses ``activation`` (the last ``head`` if given), with random
    (non-zero) biases.

    Zero biases would put relu's kink exactly at z = 0 for any input row that an earlier
    relu zeroed, where the derivative is not defined and central differences disagree.
    """
    rng = np.random.default_rng(seed)
    acts = [activation] * (len(sizes) - 2) + [head or activation]
    model = gb.Sequential([gb.Dense(a, b, act) for a, b, act in zip(sizes[:-1], sizes[1:], acts)],
                          dtype=dtype, device="cpu")
    model.set_weights([rng.normal(0.0, 0.8, w.shape) for w in model.get_weights()])
    return model


def distance_to_a_kink(model, x):
    """The smallest |z| over every relu/leaky_relu pre-activation (inf for smooth activations).

    A probe of +-eps that crosses z = 0 sees the mean of two slopes, not the derivative.
    """
    smallest, h = np.inf, x
    for layer in model:
        z = h @ layer.weight.data + layer.bias.data
        if layer.activation in activations.RELU_FAMILY:
            smallest = min(smallest, float(np.abs(z).min()))
        h = np.empty_like(z)
        activations.forward(layer.activation, z, h)
    return smallest


def random_target(loss, batch, out, seed):
    rng = np.random.default_rng(seed)
    if loss in ("huber", "mae"):  # errors inside and past huber's delta = 1
        return rng.uniform(-2.0, 2.0, (batch, out))
    if loss == "cross_entropy":
        return rng.integers(0, out, batch)
    if loss == "categorical_cross_entropy":
        return np.eye(out)[rng.integers(0, out, batch)]
    if loss == "poisson":  # counts for the model's log rates
        return rng.poisson(1.5, (batch, out)).astype(np.float64)
    return rng.uniform(0.0, 1.0, (batch, out))


def softmax_head_model(sizes, seed):
    return random_model(sizes, "tanh", seed, head="softmax")


def unfused(loss):
    """``loss`` as a plain function, which training never fuses with the last layer's activation:
    backward then runs that activation's own backward on the loss's gradient."""
    loss_fn = gb.losses.get(loss)
    return lambda out, target, backend=None: loss_fn(out, target, backend=backend)


# A head and the loss that applies its activation itself: fit gives the loss the logits.
FUSED_PAIRINGS = [("softmax", "cross_entropy"), ("softmax", "categorical_cross_entropy"),
                  ("sigmoid", "binary_cross_entropy")]
# A head whose output the loss takes as it is.
UNFUSED_PAIRINGS = [("sigmoid", "mse"), ("softmax", "mse"), ("softmax", "binary_cross_entropy")]


def head_case(head, loss, seed=9):
    model = random_model([4, 6, 3], "tanh", seed, head=head)
    x = np.random.default_rng(seed).normal(size=(5, 4))
    return model, x, random_target(loss, 5, 3, seed)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_backward_matches_central_differences(activation, loss, shape):
    batch, n_in, hidden, n_out = shape
    model = random_model([n_in, hidden, n_out], activation, seed=zlib.crc32(repr((activation, loss, shape)).encode()))
    x = np.random.default_rng(1).normal(size=(batch, n_in))
    errors = gradcheck.check_gradients(model, x, random_target(loss, batch, n_out, 2), loss=loss)
    assert set(errors) == {"input", "layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias"}


GRADCHECK_EPS = 1e-6


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 9),
    sizes=st.lists(st.integers(1, 9), min_size=2, max_size=4),
    activation=st.sampled_from(ACTIVATIONS),
    loss=st.sampled_from(LOSSES),
    seed=st.integers(0, 2**32 - 1),
)
def test_backward_matches_central_differences_on_random_shapes(batch, sizes, activation, loss, seed):
    model = random_model(sizes, activation, seed)
    x = np.random.default_rng(seed).normal(size=(batch, sizes[0]))
    assume(distance_to_a_kink(model, x) > 1e-4)
    # With these weights a loss reaches the hundreds; the default atol takes the rounding of the
    # central differences at that loss into account.
    gradcheck.check_gradients(model, x, random_target(loss, batch, sizes[-1], seed), loss=loss, eps=GRADCHECK_EPS)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("loss", LOSSES + ("categorical_cross_entropy",))
def test_softmax_output_backward_is_its_jacobian_vector_product_for_every_loss(loss, shape):
    batch, n_in, hidden, n_out = shape
    model = softmax_head_model([n_in, hidden, n_out], seed=zlib.crc32(repr((loss, shape)).encode()))
    x = np.random.default_rng(1).normal(size=(batch, n_in))
    # unfused: a cross-entropy would otherwise take the logits, and the softmax's backward not run
    errors = gradcheck.check_gradients(model, x, random_target(loss, batch, n_out, 2), loss=unfused(loss))
    assert set(errors) == {"input", "layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias"}


@pytest.mark.parametrize("head, loss", FUSED_PAIRINGS + UNFUSED_PAIRINGS)
def test_the_loss_checked_is_the_loss_evaluate_computes(head, loss):
    model, x, target = head_case(head, loss)
    value, _ = gradcheck.analytic_gradients(model, x, target, loss=loss)
    assert value == pytest.approx(model.evaluate(x, target, loss=loss)["loss"], rel=1e-12)


@pytest.mark.parametrize("head, loss", FUSED_PAIRINGS)
def test_a_fused_head_is_checked_with_the_gradients_training_computes(head, loss):
    model, x, target = head_case(head, loss)
    _, checked = gradcheck.analytic_gradients(model, x, target, loss=loss)
    logits = model.forward(x, logits=True)  # what fit's step runs for this pairing
    model.backward(gb.losses.get(loss)(logits, target)[1])
    for i, layer in enumerate(model):
        np.testing.assert_allclose(checked[f"layers.{i}.weight"], layer.weight.grad, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(checked[f"layers.{i}.bias"], layer.bias.grad, rtol=1e-12, atol=1e-15)
    gradcheck.check_gradients(model, x, target, loss=loss)  # central differences of that same loss


@pytest.mark.parametrize("model_layers", [
    lambda: [gb.Dropout(0.3), gb.Dense(5, 6, "relu"), gb.Dense(6, 7)],
    lambda: [gb.Dense(5, 6, "tanh"), gb.Dropout(0.3), gb.Dense(6, 4, "tanh"), gb.Dropout(0.3), gb.Dense(4, 7)],
], ids=["dropout_first", "dropout_between"])
def test_gradients_are_named_as_the_model_file_names_the_weights(model_layers, tmp_path):
    gb.seed(0)
    model = gb.Sequential(model_layers(), dtype="float64", device="cpu")
    x = np.random.default_rng(0).normal(size=(3, 5))
    errors = gradcheck.check_gradients(model, x, np.array([0, 6, 3]), loss="cross_entropy")
    model.save(tmp_path / "model.npz")
    assert set(errors) - {"input"} == set(np.load(tmp_path / "model.npz").files) - {"__architecture__"}


def test_frozen_layers_get_no_gradient_and_the_rest_still_check():
    model = random_model([4, 6, 5, 3], "tanh", seed=3)
    model[1].freeze()
    x = np.random.default_rng(0).normal(size=(5, 4))
    errors = gradcheck.check_gradients(model, x, np.array([0, 2, 1, 1, 0]), loss="cross_entropy")
    assert "layers.1.weight" not in errors and "layers.1.bias" not in errors
    assert model[1].weight.grad is None and model[1].bias.grad is None
    assert {"input", "layers.0.weight", "layers.2.weight"} <= set(errors)


def plant_a_one_percent_error(monkeypatch, gradient):
    """The NumPy backend's dense backward, with its ``"dw"`` or ``"db"`` 1% too large."""
    plant(monkeypatch, gradient, lambda grad: np.multiply(grad, 1.01, out=grad))


def plant(monkeypatch, gradient, spoil):
    """The NumPy backend's dense backward, with ``spoil`` applied to its ``"dw"`` or ``"db"`` in place."""
    real = numpy_backend.dense_backward

    def spoiled(*args, **kwargs):
        grads = dict(zip(("dx", "dw", "db"), real(*args, **kwargs)))
        if grads[gradient] is not None:
            spoil(grads[gradient])
        return grads["dx"], grads["dw"], grads["db"]

    monkeypatch.setattr(numpy_backend, "dense_backward", spoiled)


def test_check_gradients_catches_a_wrong_weight_gradient(monkeypatch):
    plant_a_one_percent_error(monkeypatch, "dw")
    model = random_model([3, 4, 2], "sigmoid", seed=0)
    x = np.random.default_rng(0).normal(size=(3, 3))
    with pytest.raises(AssertionError, match=r"layers\.\d\.weight: backward gives"):
        gradcheck.check_gradients(model, x, random_target("mse", 3, 2, 0), loss="mse")


def test_check_gradients_reports_the_worst_element_as_plain_numbers(monkeypatch):
    plant_a_one_percent_error(monkeypatch, "dw")
    model = random_model([3, 4, 2], "sigmoid", seed=0)
    x = np.random.default_rng(0).normal(size=(3, 3))
    number = r"-?\d+\.\d+(e-?\d+)?"
    with pytest.raises(AssertionError, match=rf"^layers\.0\.weight: backward gives {number} at \(\d+, \d+\), "
                                             rf"central differences give {number} \(max abs error"):
        gradcheck.check_gradients(model, x, random_target("mse", 3, 2, 0), loss="mse")


def set_first_element(value):
    """A spoil for :func:`plant`: the gradient's first element becomes ``value``."""
    def spoil(grad):
        grad.reshape(-1)[0] = value
    return spoil


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("gradient, name", [("dw", "weight"), ("db", "bias")])
@pytest.mark.parametrize("check", ["check_gradients", "compare_with_torch"])
def test_a_non_finite_gradient_fails_the_check(monkeypatch, check, gradient, name, bad):
    if check == "compare_with_torch":
        pytest.importorskip("torch", reason="PyTorch is the oracle here: pip install 'gpubp[torch]'")
    plant(monkeypatch, gradient, set_first_element(bad))
    model = random_model([3, 4, 2], "tanh", seed=0)
    x = np.random.default_rng(0).normal(size=(3, 3))
    with pytest.raises(AssertionError, match=rf"^layers\.0\.{name}: .*\b{bad}\b"):
        getattr(gradcheck, check)(model, x, random_target("mse", 3, 2, 0), loss="mse")


@pytest.mark.parametrize("atol", [None, 1e-6], ids=["default_atol", "atol_given"])
@pytest.mark.parametrize("fill, shown", [(1e200, "inf"), (float("nan"), "nan")], ids=["inf_loss", "nan_loss"])
def test_check_gradients_refuses_a_non_finite_loss_before_probing(monkeypatch, fill, shown, atol):
    monkeypatch.setattr(gradcheck, "numerical_gradients", lambda *a: pytest.fail("probed a non-finite loss"))
    model = random_model([3, 4, 2], "tanh", seed=0)
    x = np.random.default_rng(0).normal(size=(3, 3))
    with pytest.raises(ValueError, match=rf"^loss: its value here is {shown}; central differences"):
        gradcheck.check_gradients(model, x, np.full((3, 2), fill), loss="mse", atol=atol)


def test_check_gradients_refuses_a_default_atol_that_overflows():
    model, x, target = large_loss_case()
    with pytest.raises(ValueError, match=r"^atol: the default, 1e-8 \+ rounding_floor\(loss=.*\), is inf"):
        gradcheck.check_gradients(model, x, target, loss="mse", eps=1e-320)


def large_loss_case():
    """A regression on targets in the thousands: a loss of about 1e7, whose central differences
    carry about 1e-3 of rounding noise, more than rtol makes of its smaller gradients (15 to 1400)."""
    model = random_model([3, 5, 2], "tanh", seed=4)
    rng = np.random.default_rng(5)
    return model, rng.normal(size=(6, 3)), rng.normal(3000.0, 500.0, (6, 2))


def test_the_default_atol_grows_with_the_rounding_of_the_central_differences():
    model, x, target = large_loss_case()
    value, _ = gradcheck.analytic_gradients(model, x, target, "mse")
    assert value > 1e6
    gradcheck.check_gradients(model, x, target, loss="mse")
    with pytest.raises(AssertionError, match="atol=1e-08"):  # a fixed atol calls the noise a wrong gradient
        gradcheck.check_gradients(model, x, target, loss="mse", atol=1e-8)


def test_the_default_atol_still_catches_a_wrong_gradient_at_a_large_loss(monkeypatch):
    model, x, target = large_loss_case()
    plant_a_one_percent_error(monkeypatch, "db")
    with pytest.raises(AssertionError, match=r"layers\.\d\.bias: backward gives"):
        gradcheck.check_gradients(model, x, target, loss="mse")


@pytest.mark.parametrize("argument, value, error", [
    ("eps", 0.0, ValueError), ("eps", float("nan"), ValueError), ("rtol", -1e-5, ValueError),
    ("atol", float("inf"), ValueError), ("eps", "1e-6", TypeError), ("rtol", None, TypeError),
    ("atol", True, TypeError),
])
def test_check_gradients_refuses_a_bad_step_or_tolerance_before_any_work(monkeypatch, argument, value, error):
    model, x, target = large_loss_case()
    before = model.get_weights()
    monkeypatch.setattr(gradcheck, "analytic_gradients", lambda *a: pytest.fail("ran before checking its arguments"))
    with pytest.raises(error, match=rf"^{argument}: expected a (finite )?number"):
        gradcheck.check_gradients(model, x, target, **{argument: value})
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


@pytest.mark.parametrize("argument, value, error", [
    ("rtol", float("nan"), ValueError), ("atol", float("nan"), ValueError), ("rtol", -1.0, ValueError),
    ("atol", float("inf"), ValueError), ("rtol", "1e-6", TypeError), ("atol", "1e-6", TypeError),
])
def test_compare_with_torch_refuses_a_bad_tolerance_before_any_work(monkeypatch, argument, value, error):
    model, x, target = large_loss_case()
    monkeypatch.setattr(gradcheck, "analytic_gradients", lambda *a: pytest.fail("ran before checking its arguments"))
    with pytest.raises(error, match=rf"^{argument}: expected a (finite )?number"):
        gradcheck.compare_with_torch(model, x, target, **{argument: value})


def test_numerical_gradients_need_a_float64_model():
    model = gb.Sequential([gb.Dense(2, 2)], device="cpu")
    with pytest.raises(ValueError, match="float64 model on the numpy backend, got float32"):
        gradcheck.numerical_gradients(model, np.ones((1, 2)), np.ones((1, 2)))


@pytest.mark.parametrize("check", ["check_gradients", "numerical_gradients", "compare_with_torch"])
def test_the_checks_refuse_a_bf16_model_before_any_work(monkeypatch, check):
    """bf16 rounds the products' operands: the loss is a step function, its central differences 0,
    and the PyTorch twin does not round."""
    model = random_model([5, 7, 3], "tanh", seed=1)
    model.precision = "bf16"
    monkeypatch.setattr(gradcheck, "analytic_gradients", lambda *a: pytest.fail("ran before checking the model"))
    x = np.random.default_rng(0).normal(size=(6, 5))
    with pytest.raises(ValueError, match=r"^model: precision='bf16' rounds .*set model\.precision = 'fp32'"):
        getattr(gradcheck, check)(model, x, random_target("mse", 6, 3, 0))


def test_check_gradients_takes_a_tf32_model_which_computes_fp32_on_the_numpy_backend():
    model = random_model([5, 7, 3], "tanh", seed=1)
    model.precision = "tf32"
    x = np.random.default_rng(0).normal(size=(6, 5))
    gradcheck.check_gradients(model, x, random_target("mse", 6, 3, 0))


def test_numerical_gradients_leave_the_weights_exactly_as_they_were():
    model = random_model([3, 4, 2], "gelu", seed=5)
    before = model.get_weights()
    gradcheck.numerical_gradients(model, np.ones((2, 3)), np.zeros((2, 2)), loss="mse")
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_a_probe_that_raises_leaves_the_weights_exactly_as_they_were():
    """A loss that raises (or a KeyboardInterrupt) mid-probe left that element moved by eps."""
    model = random_model([3, 4, 2], "gelu", seed=5)
    before = model.get_weights()
    calls = []

    def interrupted(predictions, target, sample_weight=None):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return gb.losses.mse(predictions, target)

    with pytest.raises(KeyboardInterrupt):
        gradcheck.numerical_gradients(model, np.ones((2, 3)), np.zeros((2, 2)), loss=interrupted)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- PyTorch


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_outputs_loss_and_gradients_match_pytorch_in_float64(activation, loss):
    pytest.importorskip("torch", reason="PyTorch is the oracle here: pip install 'gpubp[torch]'")
    model = random_model([5, 7, 3], activation, seed=11)
    x = np.random.default_rng(4).normal(size=(6, 5))
    errors = gradcheck.compare_with_torch(model, x, random_target(loss, 6, 3, 5), loss=loss, rtol=1e-10, atol=1e-12)
    assert {"output", "loss", "input", "layers.0.weight", "layers.1.bias"} <= set(errors)


@pytest.mark.parametrize("loss", LOSSES + ("categorical_cross_entropy",))
def test_softmax_output_matches_pytorch_softmax_module_in_float64(loss):
    pytest.importorskip("torch", reason="PyTorch is the oracle here: pip install 'gpubp[torch]'")
    model = softmax_head_model([5, 7, 4], seed=12)
    x = np.random.default_rng(4).normal(size=(6, 5))
    errors = gradcheck.compare_with_torch(model, x, random_target(loss, 6, 4, 5), loss=loss, rtol=1e-10, atol=1e-12)
    assert {"output", "loss", "input", "layers.0.weight", "layers.1.bias"} <= set(errors)


@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh"])
def test_float32_model_matches_pytorch_float32(activation):
    pytest.importorskip("torch", reason="PyTorch is the oracle here: pip install 'gpubp[torch]'")
    model = random_model([9, 13, 4], activation, seed=2, dtype="float32")
    x = np.random.default_rng(3).normal(size=(11, 9)).astype(np.float32)
    gradcheck.compare_with_torch(model, x, random_target("cross_entropy", 11, 4, 1), loss="cross_entropy",
                                 rtol=1e-4, atol=1e-5)


def wide_float32_case():
    """A 64-512-10 relu model in float32, whose outputs differ from PyTorch's by 1.7e-6: the order
    of the sums, each side as close to the float64 result as the other."""
    gb.seed(0)
    model = gb.Sequential([gb.Dense(64, 512, "relu"), gb.Dense(512, 10)], device="cpu")
    rng = np.random.default_rng(0)
    return model, rng.normal(size=(256, 64)).astype(np.float32), rng.integers(0, 10, 256)


def test_compare_with_torch_passes_a_correct_float32_model_at_its_default_tolerances():
    pytest.importorskip("torch", reason="PyTorch is the oracle here: pip install 'gpubp[torch]'")
    model, x, labels = wide_float32_case()
    gradcheck.compare_with_torch(model, x, labels, loss="cross_entropy")


@pytest.mark.parametrize("gradient, name", [("dw", "weight"), ("db", "bias")])
def test_compare_with_torch_catches_a_gradient_one_percent_off_in_float32_at_its_defaults(monkeypatch, gradient,
                                                                                         name):
    pytest.importorskip("torch", reason="PyTorch is the oracle here: pip install 'gpubp[torch]'")
    plant_a_one_percent_error(monkeypatch, gradient)
    model, x, labels = wide_float32_case()
    with pytest.raises(AssertionError, match=rf"^layers\.\d\.{name}: gpubp and PyTorch differ"):
        gradcheck.compare_with_torch(model, x, labels, loss="cross_entropy")


def test_a_huber_loss_of_another_delta_matches_pytorch_and_central_differences():
    pytest.importorskip("torch", reason="PyTorch is the oracle here: pip install 'gpubp[torch]'")
    model = random_model([5, 7, 3], "gelu", seed=13)
    x = np.random.default_rng(6).normal(size=(6, 5))
    target = random_target("huber", 6, 3, 7)
    for delta in (0.2, 3.0):
        gradcheck.compare_with_torch(model, x, target, loss=gb.losses.Huber(delta), rtol=1e-10, atol=1e-12)
        gradcheck.check_gradients(model, x, target, loss=gb.losses.Huber(delta))


@pytest.mark.parametrize("one_hot", [False, True], ids=["CrossEntropy", "CategoricalCrossEntropy"])
def test_a_label_smoothed_cross_entropy_matches_pytorch_and_central_differences(one_hot):
    pytest.importorskip("torch", reason="PyTorch is the oracle here: pip install 'gpubp[torch]'")
    model = random_model([5, 7, 35], "gelu", seed=13)  # 35 classes: more than a GPU row's 32 lanes
    x = np.random.default_rng(6).normal(size=(6, 5))
    labels = random_target("cross_entropy", 6, 35, 7)
    target = np.eye(35)[labels] if one_hot else labels
    loss_class = gb.losses.CategoricalCrossEntropy if one_hot else gb.losses.CrossEntropy
    for eps in (0.1, 0.6):
        gradcheck.compare_with_torch(model, x, target, loss=loss_class(eps), rtol=1e-10, atol=1e-12)
        gradcheck.check_gradients(model, x, target, loss=loss_class(eps))
    with pytest.raises(AssertionError, match="loss: gpubp and PyTorch differ"):  # eps reaches PyTorch, and matters
        _compare_with_eps_lost(model, x, target, loss_class(0.1))


def _compare_with_eps_lost(model, x, target, loss):
    """compare_with_torch with our loss smoothed and PyTorch's not."""
    from unittest import mock

    real = gradcheck._torch_loss
    with mock.patch.object(gradcheck, "_torch_loss", lambda _, out, t: real(gb.losses.base(loss).__name__, out, t)):
        gradcheck.compare_with_torch(model, x, target, loss=loss, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("head, loss", FUSED_PAIRINGS + UNFUSED_PAIRINGS)
def test_the_pytorch_twin_computes_the_loss_evaluate_computes(head, loss):
    pytest.importorskip("torch", reason="PyTorch is the oracle here: pip install 'gpubp[torch]'")
    from unittest import mock

    model, x, target = head_case(head, loss)
    twin_losses = []
    real = gradcheck._torch_loss

    def recorded(*args):
        value = real(*args)
        twin_losses.append(value.item())
        return value

    with mock.patch.object(gradcheck, "_torch_loss", recorded):
        gradcheck.compare_with_torch(model, x, target, loss=loss, rtol=1e-10, atol=1e-12)
    assert twin_losses == [pytest.approx(model.evaluate(x, target, loss=loss)["loss"], rel=1e-12)]


def test_the_pytorch_twin_names_gradients_as_the_model_file_does():
    pytest.importorskip("torch", reason="PyTorch is the oracle here: pip install 'gpubp[torch]'")
    gb.seed(0)
    model = gb.Sequential([gb.Dropout(0.0), gb.Dense(5, 6, "relu"), gb.Dropout(0.0), gb.Dense(6, 3)],
                          dtype="float64", device="cpu")
    errors = gradcheck.compare_with_torch(model, np.ones((2, 5)), np.array([0, 2]), loss="cross_entropy",
                                          rtol=1e-10, atol=1e-12)
    assert set(errors) == {"output", "loss", "input", "layers.0.weight", "layers.0.bias", "layers.1.weight",
                           "layers.1.bias"}


def test_pytorch_twin_skips_gradients_of_frozen_layers():
    pytest.importorskip("torch", reason="PyTorch is the oracle here: pip install 'gpubp[torch]'")
    model = random_model([4, 5, 5, 2], "relu", seed=8)
    model[0].freeze()
    errors = gradcheck.compare_with_torch(model, np.ones((3, 4)), np.zeros((3, 2)), loss="mse",
                                          rtol=1e-10, atol=1e-12)
    assert "layers.0.weight" not in errors and "layers.1.weight" in errors


def test_a_nan_where_pytorch_has_the_same_nan_is_no_difference():
    pytest.importorskip("torch", reason="PyTorch is the oracle here: pip install 'gpubp[torch]'")
    model = random_model([5, 7, 3], "tanh", seed=11)
    x = np.random.default_rng(4).normal(size=(4, 5))
    x[1, 2] = np.nan  # row 1's outputs, the loss and every weight gradient are NaN on both sides
    _, grads = gradcheck.analytic_gradients(model, x, np.zeros((4, 3)), loss="mse")
    assert np.isnan(grads["layers.0.weight"]).any() and np.isfinite(grads["input"][0]).all()
    errors = gradcheck.compare_with_torch(model, x, np.zeros((4, 3)), loss="mse", rtol=1e-10, atol=1e-12)
    assert all(np.isfinite(error) for error in errors.values())
