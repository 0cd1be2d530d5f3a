"""The activation registry: forward values, derivatives, names, and stability for large |z|."""

import math

import numpy as np
import pytest

import gpubp as gb
from gpubp import activations
from gpubp.activations import ACTIVATIONS
from gpubp.backends import numpy_backend


def _gelu_tanh(z):
    return 0.5 * z * (1 + math.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))


DEFINITIONS = {  # the textbook formulas, one scalar at a time
    "identity": lambda z: z,
    "relu": lambda z: max(z, 0.0),
    "leaky_relu": lambda z: z if z > 0 else 0.01 * z,
    "sigmoid": lambda z: 1 / (1 + math.exp(-z)),
    "tanh": math.tanh,
    "gelu": lambda z: 0.5 * z * (1 + math.erf(z / math.sqrt(2))),
    "gelu_tanh": _gelu_tanh,
    "silu": lambda z: z / (1 + math.exp(-z)),
}
# Values at z = -m and z = m for a large m, and derivatives at z = m and z = -m.
LIMIT_VALUES = {
    "identity": lambda m: (-m, m), "relu": lambda m: (0.0, m), "leaky_relu": lambda m: (-0.01 * m, m),
    "sigmoid": lambda m: (0.0, 1.0), "tanh": lambda m: (-1.0, 1.0), "gelu": lambda m: (0.0, m),
    "gelu_tanh": lambda m: (0.0, m), "silu": lambda m: (0.0, m),
}
LIMIT_SLOPES = {
    "identity": (1.0, 1.0), "relu": (1.0, 0.0), "leaky_relu": (1.0, 0.01), "sigmoid": (0.0, 0.0),
    "tanh": (0.0, 0.0), "gelu": (1.0, 0.0), "gelu_tanh": (1.0, 0.0), "silu": (1.0, 0.0),
}
# 1e20 squares past float32's range (z^2 overflows from 1.8e19); "max" is the dtype's largest float.
MAGNITUDES = [1e4, 1e20, "max"]


def magnitude(m, dtype):
    return np.finfo(dtype).max if m == "max" else dtype(m)


def run_forward(name, z):
    y = np.empty_like(z)
    activations.forward(name, z, y)
    return y


def run_backward(name, dy, z):
    """dz = dy * act'(.), given what a backend stores: y always, z only for NEEDS_Z."""
    y = run_forward(name, z)
    out = np.empty_like(dy)
    activations.backward(name, dy, y, z if name in activations.NEEDS_Z else None, out)
    return out


def points(dtype=np.float64):
    """Values spread over [-4, 4], none within 1e-3 of relu's kink at 0."""
    z = np.linspace(-4, 4, 41)
    return z[np.abs(z) > 1e-3].astype(dtype)


def test_the_registry_lists_the_eight_contract_activations():
    assert set(ACTIVATIONS) == set(DEFINITIONS)
    assert activations.NEEDS_Z == {"gelu", "gelu_tanh", "silu"}


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_forward_matches_the_definition(name):
    z = points()
    expected = np.array([DEFINITIONS[name](v) for v in z])
    np.testing.assert_allclose(run_forward(name, z), expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", [a for a in ACTIVATIONS if a not in activations.NEEDS_Z])
def test_forward_in_place_equals_out_of_place(name):
    z = points()
    expected = run_forward(name, z)
    activations.forward(name, z, z)
    np.testing.assert_array_equal(z, expected)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_derivative_matches_central_differences(name):
    z = points()
    dy = np.random.default_rng(0).normal(size=z.shape)
    eps = 1e-6
    numerical = dy * (run_forward(name, z + eps) - run_forward(name, z - eps)) / (2 * eps)
    np.testing.assert_allclose(run_backward(name, dy, z), numerical, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_backward_may_write_into_dy(name):
    z = points()
    dy = np.random.default_rng(1).normal(size=z.shape)
    expected = run_backward(name, dy.copy(), z)
    y = run_forward(name, z)
    activations.backward(name, dy, y, z if name in activations.NEEDS_Z else None, dy)
    np.testing.assert_array_equal(dy, expected)


def test_gelu_is_the_exact_erf_form_and_gelu_tanh_its_approximation():
    z = np.array([1.0])
    assert run_forward("gelu", z)[0] == pytest.approx(0.8413447460685429, abs=1e-15)  # Phi(1)
    assert run_forward("gelu_tanh", z)[0] == pytest.approx(_gelu_tanh(1.0), abs=1e-15)
    assert run_forward("gelu", z)[0] != run_forward("gelu_tanh", z)[0]


@pytest.mark.parametrize("m", MAGNITUDES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_forward_is_finite_and_exact_in_the_limit_at_large_abs_z(name, dtype, m):
    m = magnitude(m, dtype)
    z = np.array([-m, m], dtype=dtype)
    y = run_forward(name, z)  # any overflow warning fails the test (pytest config)
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y, LIMIT_VALUES[name](m), rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("m", MAGNITUDES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_derivative_is_finite_and_has_the_right_limit_at_large_abs_z(name, dtype, m):
    m = magnitude(m, dtype)
    z = np.array([m, -m], dtype=dtype)
    dz = run_backward(name, np.ones_like(z), z)
    assert np.all(np.isfinite(dz))
    np.testing.assert_allclose(dz, LIMIT_SLOPES[name], atol=1e-6)


def test_gelu_derivatives_reach_their_limits_exactly_at_the_saturation_point():
    """What makes clamping z at GELU_SATURATION change no result."""
    s = activations.GELU_SATURATION
    for dtype in (np.float32, np.float64):
        z = np.array([s, -s, 2 * s, -2 * s], dtype=dtype)
        for name in ("gelu", "gelu_tanh"):
            assert run_backward(name, np.ones_like(z), z).tolist() == [1.0, 0.0, 1.0, 0.0]


def test_nan_stays_nan_through_every_activation():
    z = np.array([np.nan])
    for name in ACTIVATIONS:
        assert np.isnan(run_forward(name, z)).all()
        if name in activations.NEEDS_Z:
            assert np.isnan(run_backward(name, np.ones_like(z), z)).all()


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_dense_layer_applies_its_activation_to_x_at_w_plus_b(name):
    gb.seed(0)
    layer = gb.Dense(3, 4, name)
    model = gb.Sequential([layer], dtype="float64", device="cpu")
    model.set_weights([np.arange(12.0).reshape(3, 4) / 10 - 0.55, np.array([0.1, -0.2, 0.3, -0.4])])
    x = np.random.default_rng(0).normal(size=(5, 3))
    z = x @ layer.weight.data + layer.bias.data
    np.testing.assert_allclose(model.forward(x), run_forward(name, z), rtol=1e-12)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_backend_keeps_z_only_for_activations_whose_derivative_needs_it(name):
    x, w, b = np.ones((2, 3)), np.ones((3, 4)), np.zeros(4)
    _, z = numpy_backend.dense_forward(x, w, b, name)
    assert (z is not None) == (name in {"gelu", "gelu_tanh", "silu"})


@pytest.mark.parametrize("alias", [None, "linear", "none"])
def test_none_and_linear_mean_identity(alias):
    assert activations.canonical(alias) == "identity"
    assert gb.Dense(2, 2, alias).activation == "identity"


def test_swish_is_silu():  # Keras's older name for it
    assert activations.canonical("swish") == "silu"
    assert gb.Dense(2, 2, "swish").activation == "silu"


def test_unknown_activation_name_is_a_value_error_listing_the_known_ones():
    with pytest.raises(ValueError, match=r"activation: unknown activation 'mish'; expected one of .*'gelu_tanh'"):
        gb.Dense(2, 2, activation="mish")


def test_activation_of_the_wrong_type_is_a_type_error():
    with pytest.raises(TypeError, match="activation must be a str or None, got int"):
        gb.Dense(2, 2, activation=3)


# ----------------------------------------------------------------------------- softmax


def test_softmax_rows_sum_to_one_and_stay_finite_at_huge_logits():
    z = np.array([[1e4, 0.0, -1e4], [-1e4, -1e4, -1e4], [1.0, 2.0, 3.0]], np.float32)
    y = run_forward("softmax", z)
    np.testing.assert_allclose(y.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(y[0], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(y[1], 1 / 3, rtol=1e-6)
    np.testing.assert_allclose(y[2], np.exp([1.0, 2.0, 3.0]) / np.exp([1.0, 2.0, 3.0]).sum(), rtol=1e-6)


def test_softmax_backward_is_the_jacobian_vector_product(rng):
    z = rng.normal(size=(4, 5))
    dy = rng.normal(size=(4, 5))
    eps = 1e-6
    expected = np.zeros_like(z)
    for index in np.ndindex(z.shape):
        plus, minus = z.copy(), z.copy()
        plus[index] += eps
        minus[index] -= eps
        expected[index] = np.sum(dy * (run_forward("softmax", plus) - run_forward("softmax", minus))) / (2 * eps)
    np.testing.assert_allclose(run_backward("softmax", dy, z), expected, rtol=1e-6, atol=1e-9)


def test_softmax_is_a_known_name_outside_the_elementwise_kernel_list():
    assert activations.canonical("softmax") == "softmax"
    assert "softmax" not in ACTIVATIONS and "softmax" in activations.NAMES
