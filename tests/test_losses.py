"""Losses: values against their formulas, gradients against central differences, stability."""

import math

import numpy as np
import pytest

from gpubp import backends, losses

LOSS_NAMES = ("cross_entropy", "mse", "mae", "huber", "binary_cross_entropy", "poisson")
SHAPES = [(1, 1), (1, 4), (5, 3), (7, 1)]


def reference_loss(name, pred, target):
    """The textbook definitions in float64, written independently of the kernels."""
    if name == "cross_entropy":
        shifted = pred - pred.max(axis=1, keepdims=True)
        log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        return -np.mean(log_softmax[np.arange(len(target)), target])
    if name == "mse":
        return np.mean((pred - target) ** 2)
    if name == "mae":
        return np.mean(np.abs(pred - target))
    if name == "huber":  # delta 1; pred is N(0, 2) and target U(0, 1), so errors lie on both sides of it
        error = np.abs(pred - target)
        return np.mean(np.where(error <= 1, error**2 / 2, error - 0.5))
    if name == "poisson":  # the negative log-likelihood of counts at rate exp(pred), less log(target!)
        return np.mean(np.exp(pred) - target * pred)
    p = 1 / (1 + np.exp(-pred))
    return np.mean(-target * np.log(p) - (1 - target) * np.log(1 - p))


def make_case(name, shape, seed=0):
    rng = np.random.default_rng(seed)
    pred = rng.normal(0, 2, shape)
    if name == "cross_entropy":
        return pred, rng.integers(0, shape[1], shape[0])
    if name == "poisson":  # counts, some of them 0
        return pred, rng.poisson(2.0, shape).astype(np.float64)
    return pred, rng.uniform(0, 1, shape)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_loss_value_matches_its_definition(name, shape):
    pred, target = make_case(name, shape)
    value, _ = losses.get(name)(pred, target)
    assert value == pytest.approx(reference_loss(name, pred, target), rel=1e-12)


def central_differences(value, pred, step=1e-6):
    """The gradient of ``value(pred)`` (a float) by float64 central differences, element by element."""
    numerical = np.zeros_like(pred)
    for index in np.ndindex(pred.shape):
        plus, minus = pred.copy(), pred.copy()
        plus[index] += step
        minus[index] -= step
        numerical[index] = (value(plus) - value(minus)) / (2 * step)
    return numerical


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_gradient_is_the_derivative_of_the_mean_loss(name, shape):
    pred, target = make_case(name, shape, seed=1)
    fn = losses.get(name)
    _, grad = fn(pred, target)
    numerical = central_differences(lambda p: fn(p, target)[0], pred)
    np.testing.assert_allclose(grad, numerical, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])  # scipy's expit has no float16 loop
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_loss_is_a_python_float_and_the_gradient_keeps_the_prediction_dtype(name, dtype):
    pred, target = make_case(name, (3, 2))
    value, grad = losses.get(name)(pred.astype(dtype), target)
    assert type(value) is float
    assert grad.dtype == dtype and grad.shape == (3, 2)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_loss_does_not_modify_its_inputs(name):
    pred, target = make_case(name, (4, 3))
    pred_copy, target_copy = pred.copy(), target.copy()
    losses.get(name)(pred, target)
    np.testing.assert_array_equal(pred, pred_copy)
    np.testing.assert_array_equal(target, target_copy)


def test_cross_entropy_of_equal_logits_is_log_of_the_class_count():
    value, grad = losses.cross_entropy(np.zeros((3, 10)), np.array([0, 4, 9]))
    assert value == pytest.approx(math.log(10), rel=1e-12)
    np.testing.assert_allclose(grad.sum(axis=1), 0, atol=1e-15)  # softmax minus one-hot sums to 0


def test_mse_of_a_unit_difference_is_one():
    value, grad = losses.mse(np.ones((2, 3)), np.zeros((2, 3)))
    assert value == 1.0
    np.testing.assert_allclose(grad, np.full((2, 3), 2 / 6))


def test_binary_cross_entropy_at_logit_zero_is_log_two():
    value, grad = losses.binary_cross_entropy(np.zeros((4, 1)), np.array([[0.0], [1.0], [1.0], [0.0]]))
    assert value == pytest.approx(math.log(2), rel=1e-12)
    np.testing.assert_allclose(grad[:, 0], [0.5 / 4, -0.5 / 4, -0.5 / 4, 0.5 / 4])


def test_mse_accepts_a_flat_target_for_a_single_output():
    pred = np.array([[1.0], [2.0]])
    assert losses.mse(pred, np.array([1.0, 4.0]))[0] == pytest.approx(2.0)


# ----------------------------------------------------------------------------- stability


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_entropy_is_stable_for_logits_of_plus_minus_1e4(dtype):
    logits = np.array([[1e4, -1e4], [1e4, -1e4]], dtype=dtype)
    value, grad = losses.cross_entropy(logits, np.array([0, 1]))  # right, then wrong by 2e4
    assert value == pytest.approx((0.0 + 2e4) / 2, rel=1e-6)
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(grad, [[0, 0], [0.5, -0.5]], atol=1e-7)


# Rows of 41 classes (more than the 32 lanes a GPU kernel spreads a row over) with -inf
# (masked) logits where a lane's first read lands: column 0, and 32, lane 0's second read.
MASKED_COLUMNS = {"first": [0], "first-of-two-passes": [0, 32], "middle": [5, 6], "last": [40]}


def masked_rows(masked):
    """(logits (4, 41) float32 with -inf in the ``masked`` columns, labels among the kept columns,
    the kept columns, the generator drawn from)."""
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 2, (4, 41)).astype(np.float32)
    logits[:, masked] = -np.inf
    kept = np.setdiff1d(np.arange(41), masked)
    return logits, rng.choice(kept, 4), kept, rng


@pytest.mark.parametrize("masked", MASKED_COLUMNS.values(), ids=MASKED_COLUMNS.keys())
def test_cross_entropy_gives_minus_inf_logits_zero_probability_on_every_backend(backend, masked):
    be = backends.get(backend)
    logits, labels, kept, _ = masked_rows(masked)
    finite = logits[:, kept].astype(np.float64)
    expected = reference_loss("cross_entropy", finite, np.searchsorted(kept, labels))
    value, grad = losses.cross_entropy(be.asarray(logits), be.asarray(labels), backend=be)
    grad = be.to_host(grad)
    assert value == pytest.approx(expected, rel=1e-5)
    assert np.all(grad[:, masked] == 0)
    probabilities = np.exp(finite - finite.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    probabilities[np.arange(4), np.searchsorted(kept, labels)] -= 1
    np.testing.assert_allclose(grad[:, kept], probabilities / 4, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_binary_cross_entropy_is_stable_for_logits_of_plus_minus_1e4(dtype):
    logits = np.array([[1e4], [-1e4], [1e4], [-1e4]], dtype=dtype)
    value, grad = losses.binary_cross_entropy(logits, np.array([[1.0], [0.0], [0.0], [1.0]]))
    assert value == pytest.approx((0 + 0 + 1e4 + 1e4) / 4, rel=1e-6)
    np.testing.assert_allclose(grad[:, 0], [0, 0, 0.25, -0.25], atol=1e-7)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mse_is_finite_at_1e4(dtype):
    value, grad = losses.mse(np.full((2, 2), 1e4, dtype), np.zeros((2, 2)))
    assert value == pytest.approx(1e8, rel=1e-6)
    assert np.all(np.isfinite(grad))


# Each term fits float32 (1e38, 2e38 - 0.5), their sum of 8 does not: the mean must be the term.
FLOAT32_SUM_OVERFLOWS = {"mse": (1e19, 1e38), "mae": (2e38, 2e38), "huber": (2e38, 2e38 - 0.5)}


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("name", FLOAT32_SUM_OVERFLOWS)
def test_elementwise_losses_of_float32_sum_their_terms_in_float64(name, weighted):
    """mse, mae and huber summed their float32 terms in float32 (a BLAS dot), which overflowed
    to inf where the mean is finite, as the cross-entropies', bce's and poisson's float64 sums do
    not. A squared error past float32's range is still inf, as on every backend (and for
    TerminateOnNaN); the gradient stays float32."""
    error, term = FLOAT32_SUM_OVERFLOWS[name]
    pred, target = np.full((8, 1), error, np.float32), np.zeros((8, 1), np.float32)
    weights = np.ones(8, np.float32) if weighted else None
    value, grad = losses.get(name)(pred, target, sample_weight=weights)
    assert value == pytest.approx(term, rel=1e-6)
    assert grad.dtype == np.float32 and np.all(np.isfinite(grad))
    if name == "mse":  # 3e38 squared is past float32's range: inf, as the float32 kernels give
        assert losses.mse(np.full((8, 1), 3e38, np.float32), target, sample_weight=weights)[0] == math.inf


def test_mse_of_float32_millions_of_terms_keeps_float64_digits():
    rng = np.random.default_rng(9)
    pred = (rng.normal(size=(1_000_000, 1)) + 3).astype(np.float32)
    expected = float(np.mean(pred.astype(np.float64) ** 2))
    assert losses.mse(pred, np.zeros_like(pred))[0] == pytest.approx(expected, rel=1e-9)


# ----------------------------------------------------------------------------- names and checks


@pytest.mark.parametrize("alias, name", [
    ("sparse_categorical_crossentropy", "cross_entropy"), ("mean_squared_error", "mse"),
    ("bce", "binary_cross_entropy"), ("binary_crossentropy", "binary_cross_entropy"),
    ("categorical_crossentropy", "categorical_cross_entropy"), ("huber_loss", "huber"),
    ("mean_absolute_error", "mae"), ("l1", "mae"), ("poisson_nll", "poisson"),
])
def test_keras_spellings_name_the_same_loss(alias, name):
    assert losses.get(alias) is losses.get(name)


def test_a_callable_loss_is_used_as_given():
    def my_loss(pred, target, backend=None):
        return 0.0, pred
    assert losses.get(my_loss) is my_loss


@pytest.mark.parametrize("cls", [losses.Huber, losses.CrossEntropy, losses.CategoricalCrossEntropy])
def test_a_loss_class_is_built_with_its_defaults_as_keras_builds_it(cls):
    """fit(loss=gb.losses.Huber) called the class with (pred, target) (a TypeError of Huber's
    __init__), and compile(loss=gb.losses.CrossEntropy) stored the class itself."""
    assert losses.get(cls) == cls()

    class NeedsDelta:
        def __init__(self, delta):
            self.delta = delta

    with pytest.raises(TypeError, match=r"^loss: got the class NeedsDelta, which cannot be built without arguments "
                                        r"\(.*\); pass an instance, NeedsDelta\(\.\.\.\)$"):
        losses.get(NeedsDelta)


def test_fit_and_compile_take_a_loss_class_as_its_default_instance():
    import gpubp as gb

    rng = np.random.default_rng(10)
    x, y = rng.normal(size=(8, 3)).astype(np.float32), rng.normal(size=(8, 3)).astype(np.float32)
    trained = []
    for loss in (losses.Huber, losses.Huber()):
        gb.seed(0)
        model = gb.Sequential([gb.Dense(3, 3)], device="cpu")
        model.fit(x, y, loss=loss, optimizer="sgd", epochs=1, batch_size=8, verbose=0)
        trained.append(model.get_weights())
        assert model.loss == losses.Huber()
    for got, want in zip(*trained):
        np.testing.assert_array_equal(got, want)
    model.compile(loss=losses.CrossEntropy)
    assert model.loss == losses.CrossEntropy()


def test_unknown_loss_name_is_a_value_error_listing_the_known_ones():
    with pytest.raises(ValueError, match=r"loss: unknown loss 'hinge'; expected one of .*'cross_entropy'"):
        losses.get("hinge")


def test_loss_of_the_wrong_type_is_a_type_error():
    with pytest.raises(TypeError, match="loss: expected a name or a callable, got int"):
        losses.get(3)


def test_cross_entropy_labels_out_of_range_name_the_range_and_the_values():
    with pytest.raises(ValueError, match=r"labels: expected class indices in \[0, 3\), got values from 0 to 3"):
        losses.cross_entropy(np.zeros((2, 3)), np.array([0, 3]))


def test_cross_entropy_negative_labels_are_rejected():
    with pytest.raises(ValueError, match=r"labels: expected class indices in \[0, 3\), got values from -1 to 2"):
        losses.cross_entropy(np.zeros((2, 3)), np.array([-1, 2]))


def test_cross_entropy_float_labels_are_a_type_error():
    with pytest.raises(TypeError, match="labels: expected integer class indices, got dtype float64"):
        losses.cross_entropy(np.zeros((2, 3)), np.array([0.0, 1.0]))


def test_cross_entropy_label_count_must_match_the_batch():
    with pytest.raises(ValueError, match=r"labels: expected shape \(2,\) to match logits \(2, 3\), got \(3,\)"):
        losses.cross_entropy(np.zeros((2, 3)), np.array([0, 1, 2]))


def test_integer_predictions_are_a_type_error():
    with pytest.raises(TypeError, match="pred: expected a floating-point array, got dtype int64"):
        losses.mse(np.zeros((2, 3), np.int64), np.zeros((2, 3)))


def test_one_dimensional_predictions_are_rejected_with_their_shape():
    with pytest.raises(ValueError, match=r"logits: expected a 2-D array \(batch, outputs\).*got shape \(3,\)"):
        losses.cross_entropy(np.zeros(3), np.array([0, 1, 2]))


def test_mse_target_shape_must_match_the_predictions():
    with pytest.raises(ValueError, match=r"target: expected shape \(2, 3\) to match the predictions, got \(3, 2\)"):
        losses.mse(np.zeros((2, 3)), np.zeros((3, 2)))


def test_binary_cross_entropy_targets_must_lie_in_0_1():
    with pytest.raises(ValueError, match=r"target: expected values in \[0, 1\], got values from 0.0 to 2.0"):
        losses.binary_cross_entropy(np.zeros((2, 1)), np.array([[0.0], [2.0]]))


# ----------------------------------------------------------------------------- sample weights


WEIGHTED = ("cross_entropy", "categorical_cross_entropy", "mse", "mae", "huber", "binary_cross_entropy", "poisson")


def torch_weighted(name, pred, target, weights):
    """The loss and its gradient as torch computes them with weights, Keras's rule: each
    sample's loss times its weight, summed, over the batch (for bce, over all elements,
    which is what torch's mean with ``weight=`` does)."""
    torch = pytest.importorskip("torch", reason="the oracle is PyTorch: pip install 'gpubp[torch]'")
    functional = torch.nn.functional
    z = torch.tensor(pred, requires_grad=True)
    w = torch.tensor(weights)
    if name in ("cross_entropy", "categorical_cross_entropy"):  # class indices, or one-hot probabilities
        value = (functional.cross_entropy(z, torch.tensor(target), reduction="none") * w).sum() / len(pred)
    elif name == "mse":
        value = (functional.mse_loss(z, torch.tensor(target), reduction="none") * w[:, None]).mean()
    elif name == "mae":
        value = (functional.l1_loss(z, torch.tensor(target), reduction="none") * w[:, None]).mean()
    elif name == "huber":
        value = (functional.huber_loss(z, torch.tensor(target), reduction="none") * w[:, None]).mean()
    elif name == "poisson":
        value = (functional.poisson_nll_loss(z, torch.tensor(target), log_input=True, full=False, reduction="none")
                 * w[:, None]).mean()
    else:
        value = functional.binary_cross_entropy_with_logits(z, torch.tensor(target), weight=w[:, None])
    value.backward()
    return value.item(), z.grad.numpy()


def weighted_case(name, shape, seed=0):
    pred, target = make_case("cross_entropy" if name == "categorical_cross_entropy" else name, shape, seed)
    if name == "categorical_cross_entropy":
        target = np.eye(shape[1])[target]
    weights = np.random.default_rng(seed + 1).uniform(0, 3, shape[0])
    weights[0] = 0.0  # a sample that does not count
    return pred, target, weights


@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (7, 1), (6, 4)], ids=str)
@pytest.mark.parametrize("name", WEIGHTED)
def test_weighted_losses_and_gradients_equal_torchs(name, shape):
    pred, target, weights = weighted_case(name, shape)
    value, grad = losses.get(name)(pred, target, sample_weight=weights)
    expected_value, expected_grad = torch_weighted(name, pred, target, weights)
    assert value == pytest.approx(expected_value, rel=1e-12, abs=1e-15)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", WEIGHTED)
def test_weights_of_one_give_the_unweighted_loss(name):
    pred, target, _ = weighted_case(name, (6, 4))
    unweighted = losses.get(name)(pred.astype(np.float32), target)
    weighted = losses.get(name)(pred.astype(np.float32), target, sample_weight=np.ones(6))
    assert weighted[0] == pytest.approx(unweighted[0], rel=1e-6)
    np.testing.assert_allclose(weighted[1], unweighted[1], rtol=1e-6)


@pytest.mark.parametrize("weights, error, message", [
    (np.ones(5), ValueError, r"sample_weight: expected shape \(6,\), one weight per sample, got \(5,\)"),
    (np.array([1, 1, -0.5, 1, 1, 1]), ValueError, "sample_weight: expected finite weights >= 0, got -0.5 at sample 2"),
    (np.array([1, 1, 1, np.nan, 1, 1]), ValueError, "sample_weight: expected finite weights >= 0, got nan at sample 3"),
    (np.array(["a"] * 6), TypeError, "sample_weight: expected numeric weights, got dtype <U1"),
])
def test_bad_sample_weights_are_named(weights, error, message):
    pred, target, _ = weighted_case("mse", (6, 2))
    with pytest.raises(error, match=message):
        losses.mse(pred, target, sample_weight=weights)


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("name", ["mae", "huber"])
def test_a_nan_prediction_gets_torchs_gradient_on_every_backend(backend, name, weighted):
    """The loss is NaN; the NaN element's gradient is 0 for MAE (L1Loss's sign(NaN) is 0, where
    np.sign gives NaN) and NaN for Huber, and every other element's is finite."""
    be = backends.get(backend)
    pred, target, weights = weighted_case(name, (4, 3), seed=5)
    pred[1, 2] = np.nan
    weights = weights if weighted else np.ones(4)
    expected_value, expected_grad = torch_weighted(name, pred, target, weights)
    assert math.isnan(expected_value)
    args = [be.asarray(a.astype(np.float32)) for a in (pred, target)]
    value, grad = losses.get(name)(*args, sample_weight=be.asarray(weights.astype(np.float32)) if weighted else None,
                                   backend=be)
    assert math.isnan(value)
    np.testing.assert_allclose(be.to_host(grad), expected_grad, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- Huber's delta


@pytest.mark.parametrize("delta", [0.05, 0.5, 2.0, 100.0])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_huber_with_any_delta_equals_torchs_huber_loss(delta, weighted):
    torch = pytest.importorskip("torch", reason="the oracle is PyTorch: pip install 'gpubp[torch]'")
    pred, target, weights = weighted_case("huber", (6, 4), seed=3)
    weights = weights if weighted else np.ones(6)
    z = torch.tensor(pred, requires_grad=True)
    expected = (torch.nn.functional.huber_loss(z, torch.tensor(target), reduction="none", delta=delta)
                * torch.tensor(weights)[:, None]).mean()
    expected.backward()
    for loss in (lambda *a, **k: losses.huber(*a, delta=delta, **k), losses.Huber(delta)):
        value, grad = loss(pred, target, sample_weight=weights if weighted else None)
        assert value == pytest.approx(expected.item(), rel=1e-12)
        np.testing.assert_allclose(grad, z.grad.numpy(), rtol=1e-12, atol=1e-15)


def test_huber_is_half_the_squared_error_inside_delta_and_linear_past_it():
    pred, target = make_case("huber", (5, 3))
    assert losses.huber(pred, target, delta=100.0)[0] == pytest.approx(losses.mse(pred, target)[0] / 2, rel=1e-12)
    # Past delta each error costs delta (|e| - delta / 2) and pulls with delta: the mean absolute
    # error times delta, less delta^2 / 2.
    tiny = 1e-3
    error = np.abs(pred - target)
    assert error.min() > tiny
    value, grad = losses.huber(pred, target, delta=tiny)
    assert value == pytest.approx(tiny * error.mean() - tiny**2 / 2, rel=1e-12)
    np.testing.assert_array_equal(grad, tiny * np.sign(pred - target) / pred.size)


@pytest.mark.parametrize("delta, error, message", [
    (0.0, ValueError, r"delta: expected a finite number > 0, got 0\.0"),
    (-1.0, ValueError, r"delta: expected a finite number > 0, got -1\.0"),
    (float("inf"), ValueError, r"delta: expected a finite number > 0, got inf"),
    (float("nan"), ValueError, r"delta: expected a finite number > 0, got nan"),
    ("1", TypeError, "delta: expected a number, got str"),
    (True, TypeError, "delta: expected a number, got bool"),
])
def test_a_bad_huber_delta_is_named(delta, error, message):
    pred, target = make_case("huber", (2, 2))
    with pytest.raises(error, match=message):
        losses.huber(pred, target, delta=delta)
    with pytest.raises(error, match=message):
        losses.Huber(delta)


def test_huber_losses_of_equal_delta_are_equal_and_name_themselves():
    assert losses.Huber(0.5) == losses.Huber(0.5) and hash(losses.Huber(0.5)) == hash(losses.Huber(0.5))
    assert losses.Huber(0.5) != losses.Huber(1.0)
    assert repr(losses.Huber(2)) == "Huber(delta=2.0)" and losses.Huber().__name__ == "huber"
    assert losses.get(losses.Huber(0.5)) == losses.Huber(0.5)
    assert losses.base(losses.Huber(0.5)) is losses.huber and losses.base(losses.mse) is losses.mse
    assert losses.options(losses.Huber(0.5)) == {"delta": 0.5} and losses.options(losses.huber) == {}


@pytest.mark.parametrize("delta", [0.2, 1.0])
def test_fit_with_a_huber_loss_takes_the_step_of_its_delta(delta):
    import gpubp as gb

    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(8, 4)).astype(np.float32), rng.normal(0, 2, size=(8, 2)).astype(np.float32)
    gb.seed(0)
    model = gb.Sequential([gb.Dense(4, 5, "tanh"), gb.Dense(5, 2)], device="cpu")
    model.backward(losses.huber(model.forward(x), y, delta=delta)[1])
    expected = [w - 0.25 * p.grad for w, p in zip(model.get_weights(), model.parameters())]
    model.compile(optimizer="sgd", loss=losses.Huber(delta), learning_rate=0.25)
    with gb.trace() as t:
        history = model.fit(x, y, epochs=1, batch_size=8, shuffle=False, verbose=0)
    assert t.counts["huber_fwd_bwd"] == 1
    for got, want in zip(model.get_weights(), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert model.evaluate(x, y)["loss"] == pytest.approx(losses.huber(model.predict(x), y, delta=delta)[0], rel=1e-6)
    assert history["loss"][0] > model.evaluate(x, y)["loss"]


# ----------------------------------------------------------------------------- Poisson


@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (7, 1), (6, 4)], ids=str)
def test_poisson_equals_torchs_poisson_nll_loss_on_log_rates(shape):
    torch = pytest.importorskip("torch", reason="the oracle is PyTorch: pip install 'gpubp[torch]'")
    pred, target = make_case("poisson", shape, seed=5)
    z = torch.tensor(pred, requires_grad=True)
    expected = torch.nn.functional.poisson_nll_loss(z, torch.tensor(target), log_input=True, full=False)
    expected.backward()
    value, grad = losses.poisson(pred, target)
    assert value == pytest.approx(expected.item(), rel=1e-12)
    np.testing.assert_allclose(grad, z.grad.numpy(), rtol=1e-12, atol=1e-15)


def test_poisson_is_smallest_where_the_rate_is_the_count():
    counts = np.array([[0.5, 1.0, 3.0, 7.0]])
    value, grad = losses.poisson(np.log(counts), counts)
    np.testing.assert_allclose(grad, 0.0, atol=1e-15)
    assert value == pytest.approx(np.mean(counts - counts * np.log(counts)), rel=1e-12)
    for shift in (-0.1, 0.1):
        assert losses.poisson(np.log(counts) + shift, counts)[0] > value


@pytest.mark.parametrize("bad, shown", [(-1.0, r"-1\.0 at \(1, 0\)"), (np.nan, r"nan at \(1, 0\)"),
                                        (np.inf, r"inf at \(1, 0\)")])
def test_poisson_targets_must_be_finite_counts_of_zero_or_more(bad, shown):
    target = np.array([[0.0, 2.0], [bad, 1.0]])
    with pytest.raises(ValueError, match=rf"^target: expected finite counts >= 0 for the poisson loss, got {shown}"):
        losses.poisson(np.zeros((2, 2)), target)
    with pytest.raises(ValueError, match="^target: "):
        losses.get("poisson")(np.zeros((2, 2)), target, sample_weight=np.ones(2))


def test_fit_with_the_poisson_loss_learns_log_rates_and_refuses_negative_counts():
    import gpubp as gb

    rng = np.random.default_rng(6)
    x = rng.normal(size=(400, 3)).astype(np.float32)
    counts = rng.poisson(np.exp(0.8 * x[:, :1] - 0.5 * x[:, 1:2] + 0.5)).astype(np.float32)
    gb.seed(0)
    model = gb.Sequential([gb.Dense(3, 16, "tanh"), gb.Dense(16, 1)], device="cpu")
    before = model.get_weights()
    with pytest.raises(ValueError, match=r"^y: poisson expects counts >= 0, got values from -1\.0"):
        model.fit(x, counts - 1, loss="poisson", epochs=1, verbose=0)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))  # nothing trained
    history = model.fit(x, counts, loss="poisson", optimizer="adam", learning_rate=0.02, epochs=60, batch_size=50,
                        verbose=0)
    assert history["loss"][-1] < history["loss"][0]
    predicted_mean = np.exp(model.predict(x))  # predict gives log rates
    constant = np.full_like(counts, counts.mean())
    assert losses.poisson(np.log(predicted_mean), counts)[0] < losses.poisson(np.log(constant), counts)[0] - 0.1


def test_mae_gradient_is_the_sign_of_the_error_and_zero_where_there_is_none():
    pred = np.array([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]])
    target = np.array([[0.0, 2.0, 4.0], [-1.0, 0.0, 0.0]])
    value, grad = losses.mae(pred, target)
    assert value == pytest.approx((1.0 + 0.0 + 1.0 + 0.0 + 0.5 + 0.0) / 6, rel=1e-15)
    np.testing.assert_array_equal(grad, np.array([[1.0, 0.0, -1.0], [0.0, 1.0, 0.0]]) / 6)


# ----------------------------------------------------------------------------- label smoothing


def torch_smoothed(pred, labels, weights, eps):
    """PyTorch's ``cross_entropy(label_smoothing=eps)`` per sample, times the weights, summed over
    the batch: (loss, gradient), in float64."""
    torch = pytest.importorskip("torch", reason="the oracle is PyTorch: pip install 'gpubp[torch]'")
    z = torch.tensor(pred.astype(np.float64), requires_grad=True)
    per_sample = torch.nn.functional.cross_entropy(z, torch.tensor(labels), reduction="none", label_smoothing=eps)
    value = (per_sample * torch.tensor(np.ones(len(pred)) if weights is None else weights)).sum() / len(pred)
    value.backward()
    return value.item(), z.grad.numpy()


def smoothed_case(shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(0, 3, shape), rng.integers(0, shape[1], shape[0]), rng.uniform(0, 3, shape[0])


# (5, 7): the compiled NumPy path (short rows, no weights); (6, 45) and (3, 33): NumPy's own, rows
# longer than the 32 lanes of a GPU row and not a multiple of them.
SMOOTHED_SHAPES = [(1, 1), (5, 7), (6, 45), (3, 33)]


@pytest.mark.parametrize("eps", [0.05, 0.1, 0.5, 0.9])
@pytest.mark.parametrize("shape", SMOOTHED_SHAPES, ids=str)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_label_smoothing_equals_torchs_cross_entropy(eps, shape, weighted):
    pred, labels, weights = smoothed_case(shape)
    weights = weights if weighted else None
    expected_value, expected_grad = torch_smoothed(pred, labels, weights, eps)
    one_hot = np.eye(shape[1])[labels]
    for value, grad in (losses.cross_entropy(pred, labels, weights, label_smoothing=eps),
                        losses.CrossEntropy(eps)(pred, labels, sample_weight=weights),
                        losses.categorical_cross_entropy(pred, one_hot, weights, label_smoothing=eps),
                        losses.CategoricalCrossEntropy(label_smoothing=eps)(pred, one_hot, weights)):
        assert value == pytest.approx(expected_value, rel=1e-12)
        np.testing.assert_allclose(grad, expected_grad, rtol=1e-11, atol=1e-15)
    if shape[1] > 1:  # eps / C of the target moves off the label: another loss
        assert abs(losses.cross_entropy(pred, labels, weights)[0] - expected_value) > 1e-3 * eps


@pytest.mark.parametrize("shape", SMOOTHED_SHAPES, ids=str)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_label_smoothing_in_float32_equals_torchs_cross_entropy(shape, weighted):
    pred, labels, weights = smoothed_case(shape, seed=5)
    weights = weights.astype(np.float32) if weighted else None
    expected_value, expected_grad = torch_smoothed(pred.astype(np.float32), labels, weights, 0.1)
    value, grad = losses.cross_entropy(pred.astype(np.float32), labels, weights, label_smoothing=0.1)
    assert grad.dtype == np.float32
    assert value == pytest.approx(expected_value, rel=1e-6)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape", [(1, 4), (5, 3), (4, 40)], ids=str)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_label_smoothing_gradient_is_the_derivative_of_the_mean_loss(shape, weighted):
    pred, labels, weights = smoothed_case(shape, seed=1)
    weights = weights if weighted else None
    loss = losses.CrossEntropy(0.3)
    _, grad = loss(pred, labels, weights)
    numerical = central_differences(lambda p: loss(p, labels, weights)[0], pred)
    np.testing.assert_allclose(grad, numerical, rtol=1e-6, atol=1e-9)


def test_label_smoothing_of_equal_logits_costs_log_c_and_pulls_nowhere_but_to_the_label():
    # Equal logits: softmax is uniform, so every class's cross-entropy is log C whatever the target,
    # and the gradient is (1/C - target) / B: -(1 - eps)(1 - 1/C) / B at the label, (1 - eps) / (C B) elsewhere.
    value, grad = losses.cross_entropy(np.zeros((2, 10)), np.array([3, 7]), label_smoothing=0.2)
    assert value == pytest.approx(math.log(10), rel=1e-12)
    expected = np.full((2, 10), 0.8 / 10 / 2)
    expected[[0, 1], [3, 7]] = -0.8 * 0.9 / 2
    np.testing.assert_allclose(grad, expected, rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_label_smoothing_is_stable_for_logits_of_plus_minus_1e4(dtype):
    logits = np.array([[1e4, -1e4], [1e4, -1e4]], dtype=dtype)
    value, grad = losses.cross_entropy(logits, np.array([0, 1]), label_smoothing=0.1)
    # a target of (0.95, 0.05): right costs 0.05 * 2e4, wrong 0.95 * 2e4
    assert value == pytest.approx((0.05 * 2e4 + 0.95 * 2e4) / 2, rel=1e-6)
    np.testing.assert_allclose(grad, [[0.025, -0.025], [0.475, -0.475]], atol=1e-7)


@pytest.mark.parametrize("masked", MASKED_COLUMNS.values(), ids=MASKED_COLUMNS.keys())
def test_label_smoothing_makes_a_masked_logits_loss_inf_with_torchs_gradient_on_every_backend(backend, masked):
    # PyTorch's rule: the smoothed target puts eps / C on the masked class, whose log-probability is -inf.
    be = backends.get(backend)
    logits, labels, _, rng = masked_rows(masked)
    expected_value, expected_grad = torch_smoothed(logits, labels, None, 0.1)
    assert expected_value == math.inf
    for weights in (None, rng.uniform(0.5, 2, 4).astype(np.float32)):
        if weights is not None:
            expected_grad = torch_smoothed(logits, labels, weights, 0.1)[1]
        value, grad = losses.cross_entropy(be.asarray(logits), be.asarray(labels),
                                           None if weights is None else be.asarray(weights), backend=be,
                                           label_smoothing=0.1)
        assert value == math.inf
        np.testing.assert_allclose(be.to_host(grad), expected_grad, atol=1e-6)
    assert math.isfinite(losses.cross_entropy(be.asarray(logits), be.asarray(labels), backend=be)[0])


def test_label_smoothing_zero_is_the_one_hot_loss_bit_for_bit():
    for shape in [(5, 7), (6, 45)]:
        for dtype in (np.float32, np.float64):
            pred, labels, weights = smoothed_case(shape, seed=9)
            pred = pred.astype(dtype)
            for w in (None, weights.astype(dtype)):
                plain = losses.cross_entropy(pred, labels, w)
                for zero in (0, 0.0, np.float32(0)):
                    value, grad = losses.cross_entropy(pred, labels, w, label_smoothing=zero)
                    assert value == plain[0] and grad.tobytes() == plain[1].tobytes()
                    value, grad = losses.CrossEntropy(zero)(pred, labels, w)
                    assert value == plain[0] and grad.tobytes() == plain[1].tobytes()


BAD_LABEL_SMOOTHING = [
    (1.0, ValueError, r"label_smoothing: expected a number in \[0, 1\), got 1\.0"),
    (-0.1, ValueError, r"label_smoothing: expected a number in \[0, 1\), got -0\.1"),
    (float("nan"), ValueError, r"label_smoothing: expected a number in \[0, 1\), got nan"),
    (float("inf"), ValueError, r"label_smoothing: expected a number in \[0, 1\), got inf"),
    ("0.1", TypeError, "label_smoothing: expected a number, got str"),
    (True, TypeError, "label_smoothing: expected a number, got bool"),
    (None, TypeError, "label_smoothing: expected a number, got NoneType"),
]


@pytest.mark.parametrize("eps, error, message", BAD_LABEL_SMOOTHING)
def test_a_bad_label_smoothing_is_named(eps, error, message):
    pred, labels, _ = smoothed_case((2, 3))
    with pytest.raises(error, match=message):
        losses.cross_entropy(pred, labels, label_smoothing=eps)
    with pytest.raises(error, match=message):
        losses.categorical_cross_entropy(pred, np.eye(3)[labels], label_smoothing=eps)
    with pytest.raises(error, match=message):
        losses.CrossEntropy(eps)
    with pytest.raises(error, match=message):
        losses.CategoricalCrossEntropy(eps)


def test_cross_entropy_losses_of_equal_label_smoothing_are_equal_and_name_themselves():
    assert losses.CrossEntropy(0.1) == losses.CrossEntropy(0.1)
    assert hash(losses.CrossEntropy(0.1)) == hash(losses.CrossEntropy(0.1))
    assert losses.CrossEntropy(0.1) != losses.CrossEntropy(0.2)
    assert losses.CrossEntropy(0.1) != losses.CategoricalCrossEntropy(0.1)
    assert repr(losses.CrossEntropy(0.1)) == "CrossEntropy(label_smoothing=0.1)"
    assert repr(losses.CategoricalCrossEntropy()) == "CategoricalCrossEntropy(label_smoothing=0.0)"
    assert losses.CrossEntropy().__name__ == "cross_entropy"
    assert losses.CategoricalCrossEntropy().__name__ == "categorical_cross_entropy"
    assert losses.get(losses.CrossEntropy(0.1)) == losses.CrossEntropy(0.1)
    assert losses.base(losses.CrossEntropy(0.1)) is losses.cross_entropy
    assert losses.base(losses.CategoricalCrossEntropy(0.1)) is losses.categorical_cross_entropy
    assert losses.options(losses.CrossEntropy(0.1)) == {"label_smoothing": 0.1}
    assert losses.options(losses.cross_entropy) == {}
    assert losses.fuses(losses.CrossEntropy(0.1), "softmax") and not losses.fuses(losses.CrossEntropy(0.1), "sigmoid")
    assert losses.fuses(losses.CategoricalCrossEntropy(0.1), "softmax")
    assert not losses.fuses(losses.Huber(0.5), "softmax")


def smoothed_fit_case():
    rng = np.random.default_rng(4)
    return rng.normal(size=(8, 4)).astype(np.float32), rng.integers(0, 3, 8)


@pytest.mark.parametrize("one_hot", [False, True], ids=["CrossEntropy", "CategoricalCrossEntropy"])
@pytest.mark.parametrize("head", ["softmax", "identity"])
def test_fit_with_label_smoothing_takes_the_step_of_the_smoothed_loss(one_hot, head):
    import gpubp as gb

    x, labels = smoothed_fit_case()
    y = np.eye(3, dtype=np.float32)[labels] if one_hot else labels
    loss = losses.CategoricalCrossEntropy(0.1) if one_hot else losses.CrossEntropy(0.1)
    gb.seed(0)
    model = gb.Sequential([gb.Dense(4, 5, "tanh"), gb.Dense(5, 3, head)], device="cpu")
    # a softmax head is fused into the loss: the loss is given the logits
    model.backward(losses.cross_entropy(model.forward(x, logits=True), labels, label_smoothing=0.1)[1])
    expected = [w - 0.25 * p.grad for w, p in zip(model.get_weights(), model.parameters())]
    model.backward(losses.cross_entropy(model.forward(x, logits=True), labels)[1])
    unsmoothed = [w - 0.25 * p.grad for w, p in zip(model.get_weights(), model.parameters())]
    model.compile(optimizer="sgd", loss=loss, learning_rate=0.25)
    with gb.trace() as t:
        history = model.fit(x, y, epochs=1, batch_size=8, shuffle=False, verbose=0)
    assert t.counts["ce_fwd_bwd"] == 1 and "softmax_fwd" not in t.counts and "softmax_bwd" not in t.counts
    for got, want in zip(model.get_weights(), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert max(np.abs(got - other).max() for got, other in zip(model.get_weights(), unsmoothed)) > 1e-4
    logits = model.predict(x, logits=True)
    assert model.evaluate(x, y)["loss"] == pytest.approx(
        losses.cross_entropy(logits, labels, label_smoothing=0.1)[0], rel=1e-6)
    assert history["loss"][0] > model.evaluate(x, y)["loss"]


@pytest.mark.parametrize("loss, y, error, message", [
    (losses.CrossEntropy(0.1), "one-hot", TypeError, "y: cross_entropy expects 1-D integer class labels"),
    (losses.CategoricalCrossEntropy(0.1), "labels", ValueError, r"y: expected shape \(8, 3\)"),
    ("changed", "labels", ValueError, r"label_smoothing: expected a number in \[0, 1\), got 1\.5"),
], ids=["class-loss-with-one-hot-rows", "one-hot-loss-with-labels", "label-smoothing-set-to-1.5"])
def test_fit_with_a_bad_smoothed_loss_is_refused_and_changes_no_weight(loss, y, error, message):
    import gpubp as gb
    from test_bad_input import assert_weights_equal

    x, labels = smoothed_fit_case()
    y = np.eye(3, dtype=np.float32)[labels] if y == "one-hot" else labels
    if loss == "changed":
        loss = losses.CrossEntropy(0.1)
        loss.label_smoothing = 1.5  # after the check of its construction
    model = gb.Sequential([gb.Dense(4, 5, "tanh"), gb.Dense(5, 3, "softmax")], device="cpu")
    before = model.get_weights()
    with pytest.raises(error, match=message):
        model.fit(x, y, loss=loss, optimizer="sgd", epochs=1, batch_size=4, verbose=0)
    assert_weights_equal(before, model)
    if "label_smoothing" in message:  # a training step refuses it when built, before any batch
        with pytest.raises(error, match=message):
            model.train_step(loss)


@pytest.mark.parametrize("target, shown", [
    ([[np.nan, -0.5], [0.0, 7.0]], r"from -0.5 to 7.0 and NaN"),
    ([[np.nan, 0.5], [0.0, 1.0]], r"from 0.0 to 1.0 and NaN"),
])
def test_binary_cross_entropy_refuses_nan_targets_and_those_they_would_hide(target, shown):
    """min() and max() of targets holding a NaN are NaN, which passed both comparisons of the range
    check: -0.5 and 7.0 beside it got finite, wrong gradients."""
    with pytest.raises(ValueError, match=rf"^target: expected values in \[0, 1\], got values {shown}"):
        losses.binary_cross_entropy(np.zeros((2, 2)), np.array(target))


def test_a_sample_weight_past_the_predictions_dtype_is_refused_by_the_loss_itself():
    """fit refused it already; a direct call gave an inf loss and gradient with an overflow warning."""
    predictions, target = np.zeros((2, 1), np.float32), np.ones((2, 1), np.float32)
    with pytest.raises(ValueError, match=r"^sample_weight: 1e\+39 at sample 1 is beyond float32's range"):
        losses.mse(predictions, target, sample_weight=np.array([1.0, 1e39]))
    loss, _ = losses.mse(predictions.astype(np.float64), target, sample_weight=np.array([1.0, 1e39]))
    assert math.isfinite(loss)
