"""gpubp.sklearn: scikit-learn's own estimator checks, the same steps as scikit-learn's MLPs,
and what scikit-learn users do with an estimator (pipelines, grid search, partial_fit, pickle)."""

import pickle
import warnings

import numpy as np
import pytest
from sklearn import neural_network
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.metrics import mean_poisson_deviance, r2_score
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils import get_tags
from sklearn.utils.estimator_checks import parametrize_with_checks

import gpubp as gb
from gpubp import _random
from gpubp import sklearn as gbsk
from gpubp.sklearn import EXPECTED_FAILED_CHECKS, MLPClassifier, MLPRegressor

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")

# sklearn/utils/_test_common/instance_generator.py runs scikit-learn's own MLPs through these
# checks with max_iter=100 (the default is 200) to keep them fast; so do we. The CPU, so the
# checks' float64 data is computed in float64 and their tolerances apply. The Poisson regressor
# too: its positive_only tag has the checks fit it on targets > 0 (a few seconds more).
CHECKED = [MLPClassifier(max_iter=100, device="cpu"), MLPRegressor(max_iter=100, device="cpu"),
           MLPRegressor(loss="poisson", max_iter=100, device="cpu")]


def expected_failed_checks(estimator) -> dict[str, str]:
    name = type(estimator).__name__
    return EXPECTED_FAILED_CHECKS[f"{name}(loss='poisson')" if getattr(estimator, "loss", None) == "poisson"
                                  else name]


@parametrize_with_checks(CHECKED, expected_failed_checks=expected_failed_checks, xfail_strict=True)
def test_scikit_learn_estimator_checks(estimator, check):
    check(estimator)


def test_expected_failures_are_few_and_explained():
    assert set(EXPECTED_FAILED_CHECKS) == {"MLPClassifier", "MLPRegressor", "MLPRegressor(loss='poisson')"}
    for reasons in EXPECTED_FAILED_CHECKS.values():
        assert len(reasons) <= 3
        assert all(name.startswith("check_") and len(reason) > 20 for name, reason in reasons.items())


@pytest.mark.parametrize("name", ["MLPClassifier", "MLPRegressor"])
def test_parameters_are_scikit_learns_with_its_defaults(name):
    theirs = getattr(neural_network, name)().get_params()
    ours = getattr(gbsk, name)().get_params()
    del theirs["max_fun"]  # lbfgs's budget: gpubp has no lbfgs
    assert {key: ours[key] for key in theirs} == theirs
    assert set(ours) - set(theirs) == {"device", "backend", "precision", "dropout"}


# ----------------------------------------------------------------------------- scikit-learn as the oracle

rng = np.random.default_rng(0)
X_SMALL = rng.normal(size=(40, 5))
# (estimator, y, its parameters); the counts come from their own stream, so the data of the
# tests below that draw from ``rng`` stays what it was.
COUNTS = np.random.default_rng(3).poisson(np.exp(0.5 * X_SMALL[:, :2] - 0.2), (40, 2)).astype(float)
TARGETS = {
    "two regression targets": ("MLPRegressor", rng.normal(size=(40, 2)), {}),
    "one regression target": ("MLPRegressor", rng.normal(size=40), {}),
    "four classes": ("MLPClassifier", rng.integers(0, 4, 40), {}),
    "two classes": ("MLPClassifier", np.where(rng.integers(0, 2, 40) == 1, "yes", "no"), {}),
    "three labels": ("MLPClassifier", rng.integers(0, 2, (40, 3)), {}),
    "poisson counts": ("MLPRegressor", COUNTS[:, 0], {"loss": "poisson"}),
    "two poisson targets": ("MLPRegressor", COUNTS, {"loss": "poisson"}),
}
# tol is so large that no epoch counts as an improvement: the adaptive rate divides by 5, the others stop.
# Momentum is PyTorch's form, its buffers rescaled when the rate changes: the schedules run with and without.
# Adam adds epsilon after the bias correction, as PyTorch does, scikit-learn before: a tiny one hides that.
SOLVERS = {
    "adam": dict(solver="adam", epsilon=1e-15),
    "sgd": dict(solver="sgd"),
    "sgd, invscaling rate": dict(solver="sgd", learning_rate="invscaling", power_t=0.7, momentum=0.0),
    "sgd, adaptive rate": dict(solver="sgd", learning_rate="adaptive", momentum=0.0),
    "sgd, invscaling rate, nesterov momentum": dict(solver="sgd", learning_rate="invscaling", power_t=0.7),
    "sgd, adaptive rate, momentum": dict(solver="sgd", learning_rate="adaptive", momentum=0.7,
                                         nesterovs_momentum=False),
    "sgd, momentum 1": dict(solver="sgd", momentum=1.0),  # scikit-learn takes [0, 1]
}


def fitted_from_the_same_weights(name, X, y, sample_weight=None, **params):
    """scikit-learn's estimator and ours, both trained for up to 6 epochs from the same random
    weights on full batches in order, with the same parameters."""
    params = dict(hidden_layer_sizes=(7, 6), activation="tanh", alpha=0.3, batch_size=len(X), shuffle=False,
                  learning_rate_init=0.05, tol=1e9, n_iter_no_change=1, warm_start=True, max_iter=1, random_state=0,
                  **params)
    theirs = getattr(neural_network, name)(**params).fit(X, y)
    ours = getattr(gbsk, name)(**params, device="cpu").fit(X, y)
    draw = np.random.default_rng(1)  # its own stream: the start must not depend on which tests ran before
    start = [draw.normal(size=w.shape) for pair in zip(theirs.coefs_, theirs.intercepts_) for w in pair]
    theirs.coefs_, theirs.intercepts_ = [w.copy() for w in start[::2]], [b.copy() for b in start[1::2]]
    ours.model_.set_weights(start)
    theirs.set_params(max_iter=6).fit(X, y, sample_weight=sample_weight)
    ours.set_params(max_iter=6).fit(X, y, sample_weight=sample_weight)
    return theirs, ours, start


def assert_same_training(theirs, ours, start, solver):
    assert ours.n_iter_ == theirs.n_iter_ and ours.t_ == theirs.t_
    steps_theirs = [w - w0 for w, w0 in zip(theirs.coefs_ + theirs.intercepts_, start[::2] + start[1::2])]
    steps_ours = [w - w0 for w, w0 in zip(ours.coefs_ + ours.intercepts_, start[::2] + start[1::2])]
    scale = max(np.abs(step).max() for step in steps_theirs)
    tolerance = 1e-9 if solver == "adam" else 1e-12  # Adam's division by sqrt(v) magnifies rounding
    for step_ours, step_theirs in zip(steps_ours, steps_theirs):
        np.testing.assert_allclose(step_ours, step_theirs, rtol=0, atol=tolerance * scale)
    # The first entry is the first fit's, from each library's own initial weights.
    np.testing.assert_allclose(ours.loss_curve_[1:], theirs.loss_curve_[1:], rtol=tolerance)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("target", TARGETS)
def test_training_takes_scikit_learns_steps(target, solver):
    name, y, params = TARGETS[target]
    assert_same_training(*fitted_from_the_same_weights(name, X_SMALL, y, **SOLVERS[solver], **params), solver)


@pytest.mark.parametrize("solver", ["adam", "sgd"])
@pytest.mark.parametrize("target", TARGETS)
def test_sample_weights_take_scikit_learns_steps(target, solver):
    name, y, params = TARGETS[target]
    weights = np.random.default_rng(2).integers(0, 4, len(y)).astype(float)
    assert_same_training(*fitted_from_the_same_weights(name, X_SMALL, y, weights, **SOLVERS[solver], **params),
                         solver)


@pytest.mark.parametrize("sample_weight", [None, np.full(10, 2.0)])
def test_a_short_last_batch_divides_the_penalty_by_its_own_size(sample_weight):
    """As scikit-learn's: batches of 4, 4 and 2 divide alpha's penalty by 4, 4 and 2 (times the
    mean weight, which here is every batch's: so the steps are scikit-learn's with weights too)."""
    x, y = X_SMALL[:10], X_SMALL[:10, 0]
    params = dict(hidden_layer_sizes=(4,), activation="tanh", solver="sgd", momentum=0.0, alpha=1.0, batch_size=4,
                  shuffle=False, learning_rate_init=0.1, max_iter=1, random_state=0)
    theirs = neural_network.MLPRegressor(**params).fit(x, y)
    ours = MLPRegressor(**params, device="cpu").fit(x, y)
    # Copies: scikit-learn steps its arrays in place, and the numpy backend may hold the ones it is given.
    ours.model_.set_weights([w.copy() for pair in zip(theirs.coefs_, theirs.intercepts_) for w in pair])
    theirs.set_params(warm_start=True).fit(x, y, sample_weight=sample_weight)
    ours.set_params(warm_start=True).fit(x, y, sample_weight=sample_weight)
    for mine, expected in zip(ours.coefs_ + ours.intercepts_, theirs.coefs_ + theirs.intercepts_):
        np.testing.assert_allclose(mine, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("target", TARGETS)
def test_fitted_attributes_are_scikit_learns(target):
    name, y, params = TARGETS[target]
    params = dict(hidden_layer_sizes=(8,), max_iter=3, random_state=0, **params)
    theirs = getattr(neural_network, name)(**params).fit(X_SMALL, y)
    ours = getattr(gbsk, name)(**params, device="cpu").fit(X_SMALL, y)
    public = {key for key in vars(theirs) if key.endswith("_") and not key.startswith("_")}
    for key in public:
        mine, expected = getattr(ours, key), getattr(theirs, key)
        if key in ("coefs_", "intercepts_"):
            assert [a.shape for a in mine] == [a.shape for a in expected]
        elif key in ("loss_", "loss_curve_", "best_loss_"):
            assert np.shape(mine) == np.shape(expected)
        else:
            np.testing.assert_array_equal(mine, expected, err_msg=key)
    for method in ("predict", "predict_proba"):
        if hasattr(theirs, method):
            mine, expected = getattr(ours, method)(X_SMALL), getattr(theirs, method)(X_SMALL)
            assert (mine.shape, mine.dtype) == (expected.shape, expected.dtype)


@pytest.mark.parametrize("call", ["fit", "partial_fit"])
def test_the_estimators_warnings_point_at_the_callers_line(call):
    """Like scikit-learn's, a warning names the line that called fit, not a line of gpubp."""
    x, y = X_SMALL, (X_SMALL[:, 0] > 0).astype(int)
    clf = MLPClassifier((4,), max_iter=2, batch_size=100, random_state=0, device="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        getattr(clf, call)(x, y, **({"classes": [0, 1]} if call == "partial_fit" else {}))
    expected = {UserWarning, ConvergenceWarning} if call == "fit" else {UserWarning}
    assert {w.category for w in caught} == expected
    assert {w.filename for w in caught} == {__file__}


def test_early_stopping_keeps_the_best_epoch_by_validation_score():
    x, y = load_digits(return_X_y=True)
    clf = MLPClassifier((32,), early_stopping=True, n_iter_no_change=3, learning_rate_init=0.01, max_iter=200,
                        random_state=0, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        clf.fit(x / 16, y)
    assert clf.n_iter_ < 200 and clf.best_loss_ is None
    assert len(clf.validation_scores_) == clf.n_iter_
    assert clf.best_validation_score_ == max(clf.validation_scores_) > 0.9
    best = int(np.argmax(clf.validation_scores_))
    assert clf.n_iter_ == best + 1 + clf.n_iter_no_change + 1  # stopped after n_iter_no_change + 1 epochs without


@pytest.mark.parametrize("y", [np.array(["a"] * 30 + ["b"] * 29 + ["c"]), np.repeat(list("abcde"), 6)],
                         ids=["a class of one sample", "more classes than validation samples"])
def test_early_stopping_splits_several_classes_unstratified_as_scikit_learn(y):
    """scikit-learn stratifies the validation split only for one output (binary classes)."""
    x = np.random.default_rng(6).normal(size=(len(y), 4))
    clf = MLPClassifier((8,), early_stopping=True, max_iter=3, random_state=0, device="cpu").fit(x, y)
    assert len(clf.validation_scores_) == clf.n_iter_ == 3


def test_early_stopping_names_its_parameters_when_a_binary_class_is_too_small_to_stratify():
    x = np.random.default_rng(6).normal(size=(60, 4))
    clf = MLPClassifier((8,), early_stopping=True, max_iter=3, random_state=0, device="cpu")
    with pytest.raises(ValueError, match="early_stopping=True, validation_fraction=0.1: holding out 6 of 60 samples "
                                         "stratified by class fails: The least populated class"):
        clf.fit(x, np.array(["a"] * 59 + ["b"]))
    assert not hasattr(clf, "model_")


def test_partial_fit_continues_training_and_needs_the_classes_first():
    x, y = load_digits(return_X_y=True)
    clf = MLPClassifier((32,), learning_rate_init=0.01, random_state=0, device="cpu")
    with pytest.raises(ValueError, match="classes: the first call to partial_fit needs every class"):
        clf.partial_fit(x[:100] / 16, y[:100])
    for start in list(range(0, 1000, 250)) * 4:
        clf.partial_fit(x[start:start + 250] / 16, y[start:start + 250], classes=np.arange(10))
    assert clf.n_iter_ == 1 and clf.t_ == 4000 and len(clf.loss_curve_) == 16
    assert clf.loss_curve_[-1] < clf.loss_curve_[0] / 2
    assert clf.score(x[1000:] / 16, y[1000:]) > 0.8
    with pytest.raises(ValueError, match=r"y: classes \[10\] are not among classes_"):
        clf.partial_fit(x[:2] / 16, np.array([1, 10]))


def test_a_pipeline_in_a_grid_search():
    x, y = load_digits(return_X_y=True)
    mlp = MLPClassifier(max_iter=30, learning_rate_init=0.01, random_state=0, device="cpu")
    pipe = Pipeline([("scale", StandardScaler()), ("mlp", mlp)])
    grid = {"mlp__hidden_layer_sizes": [(16,), (48,)], "mlp__alpha": [1e-4, 1.0]}
    search = GridSearchCV(pipe, grid, cv=3).fit(x[:600], y[:600])
    assert len(search.cv_results_["params"]) == 4
    assert search.best_score_ > 0.8
    assert isinstance(search.best_estimator_.named_steps["mlp"].model_, gb.Sequential)
    assert search.score(x[600:], y[600:]) > 0.85


def test_multilabel_targets_train_one_sigmoid_per_label():
    x = rng.normal(size=(200, 6))
    y = np.stack([x[:, 0] > 0, x[:, 1] + x[:, 2] > 0, x[:, 3] < 0.5], axis=1).astype(int)
    clf = MLPClassifier((32,), max_iter=300, learning_rate_init=0.01, random_state=0, device="cpu").fit(x, y)
    probabilities = clf.predict_proba(x)
    assert clf.out_activation_ == "logistic" and clf.model_[-1].activation == "sigmoid"
    assert probabilities.shape == (200, 3) and not np.allclose(probabilities.sum(axis=1), 1)
    np.testing.assert_array_equal(clf.predict(x), (probabilities > 0.5).astype(int))
    assert clf.score(x, y) > 0.9  # the subset accuracy: every label of a row right


def test_multi_output_regression():
    x = rng.normal(size=(200, 4))
    y = np.stack([x @ [1.0, -2.0, 0.5, 0.0], np.tanh(x[:, 0] * x[:, 1])], axis=1)
    reg = MLPRegressor(hidden_layer_sizes=(64,), learning_rate_init=0.01, max_iter=400, random_state=0,
                       device="cpu").fit(x, y)
    assert reg.predict(x).shape == (200, 2) and reg.n_outputs_ == 2
    assert reg.score(x, y) > 0.9


def test_pickled_estimators_predict_and_train_on_as_the_original():
    x, y = load_digits(return_X_y=True)
    clf = MLPClassifier((16,), max_iter=5, random_state=0, device="cpu").fit(x / 16, y)
    copy = pickle.loads(pickle.dumps(clf))
    np.testing.assert_array_equal(copy.predict_proba(x / 16), clf.predict_proba(x / 16))
    clf.partial_fit(x / 16, y)
    copy.partial_fit(x / 16, y)  # Adam's moments came along, so the step is the same
    for theirs, ours in zip(clf.model_.get_weights(), copy.model_.get_weights()):
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("changed", [{"solver": "sgd"}, {"device": "cuda"}, {"device": "cpu", "backend": "numba"}])
def test_a_pickle_holds_what_was_fitted_whatever_set_params_changed_since(changed):
    """set_params changes the parameters, not the fitted model or the optimizer partial_fit steps on,
    so a pickle (or deepcopy) loads what was fitted, and trains on as the original does."""
    x, y = load_digits(return_X_y=True)
    clf = MLPClassifier((16,), max_iter=3, random_state=0, device="cpu").fit(x / 16, y)
    clf.set_params(**changed)
    copy = pickle.loads(pickle.dumps(clf))
    assert copy.get_params() == clf.get_params()
    assert copy.model_.backend_name == "numpy" and isinstance(copy._optimizer, gb.optim.Adam)
    np.testing.assert_array_equal(copy.predict_proba(x / 16), clf.predict_proba(x / 16))
    if changed == {"solver": "sgd"}:  # the others may not train here: partial_fit refuses another backend
        clf.partial_fit(x / 16, y)
        copy.partial_fit(x / 16, y)
        for theirs, ours in zip(clf.model_.get_weights(), copy.model_.get_weights()):
            np.testing.assert_array_equal(ours, theirs)


def test_a_pickle_of_a_backend_that_does_not_run_here_loads_on_the_one_auto_picks():
    x, y = load_digits(return_X_y=True)
    clf = MLPClassifier((16,), max_iter=2, random_state=0, device="cpu").fit(x / 16, y)
    header, tensors, _ = clf.__getstate__()["model_"]
    state = dict(clf.__getstate__(), model_=(header, tensors, "cupy"))
    copy = MLPClassifier.__new__(MLPClassifier)
    if gb.backends.available()["cupy"] is None:
        pytest.skip("CuPy runs here, so the pickle loads on it")
    with pytest.warns(RuntimeWarning, match="fitted on the 'cupy' backend, which does not run here"):
        copy.__setstate__(state)
    np.testing.assert_array_equal(copy.predict_proba(x / 16), clf.predict_proba(x / 16))


@pytest.mark.parametrize("solver", ["adam", "sgd"])
def test_a_pickle_written_before_the_backend_and_solver_were_recorded_still_loads(solver):
    x, y = load_digits(return_X_y=True)
    clf = MLPClassifier((16,), solver=solver, max_iter=2, random_state=0, device="cpu").fit(x / 16, y)
    state = clf.__getstate__()
    older = dict(state, model_=state["model_"][:2], _optimizer=state["_optimizer"][1])  # (header, tensors), state
    copy = MLPClassifier.__new__(MLPClassifier)
    copy.__setstate__(older)
    np.testing.assert_array_equal(copy.predict_proba(x / 16), clf.predict_proba(x / 16))
    assert type(copy._optimizer) is type(clf._optimizer)


def test_partial_fit_steps_on_the_held_optimizer_after_set_params_changes_the_solver():
    """As scikit-learn's: partial_fit keeps the optimizer it has, at its own rate; a changed solver
    applies from the next fit that builds one."""
    x, y = load_digits(return_X_y=True)  # a regressor: SGD's rate is scaled for its squared error
    kept = MLPRegressor(hidden_layer_sizes=(16,), max_iter=3, random_state=0, device="cpu").fit(x / 16, y)
    switched = pickle.loads(pickle.dumps(kept)).set_params(solver="sgd")
    kept.partial_fit(x / 16, y)
    switched.partial_fit(x / 16, y)
    for theirs, ours in zip(kept.model_.get_weights(), switched.model_.get_weights()):
        np.testing.assert_array_equal(ours, theirs)
    switched.fit(x / 16, y)
    assert isinstance(switched._optimizer, gb.optim.SGD)


def test_an_epoch_whose_held_out_predictions_overflow_scores_nan_and_training_goes_on(monkeypatch):
    """scikit-learn's MLPs score an early-stopping epoch NaN where a prediction is inf or NaN (a
    Poisson exp that overflows, say); r2_score would raise. NaN counts as no improvement."""
    x = np.random.default_rng(0).normal(size=(60, 3))
    y = np.random.default_rng(1).poisson(2.0, 60).astype(float)
    reg = MLPRegressor(loss="poisson", hidden_layer_sizes=(4,), early_stopping=True, n_iter_no_change=2, max_iter=20, random_state=0,
                       device="cpu")
    monkeypatch.setattr(MLPRegressor, "_predict_arrays", lambda self, X: np.full((len(X), 1), np.inf))
    reg.fit(x, y)
    assert reg.n_iter_ == 3 and np.isnan(reg.validation_scores_).all()
    assert np.isnan(reg.score(x, y))
    monkeypatch.undo()
    assert np.isfinite(reg.score(x, y))


def test_random_state_makes_fits_repeat_and_leaves_the_library_stream_alone():
    x, y = load_digits(return_X_y=True)
    gb.seed(5)
    before = _random.get_state()
    first = MLPClassifier((16,), max_iter=3, random_state=7, device="cpu").fit(x / 16, y)
    again = MLPClassifier((16,), max_iter=3, random_state=7, device="cpu").fit(x / 16, y)
    other = MLPClassifier((16,), max_iter=3, random_state=8, device="cpu").fit(x / 16, y)
    assert _random.get_state() == before
    np.testing.assert_array_equal(first.coefs_[0], again.coefs_[0])
    assert not np.array_equal(first.coefs_[0], other.coefs_[0])


def test_float32_data_trains_a_float32_model():
    x, y = load_digits(return_X_y=True)
    clf = MLPClassifier((16,), max_iter=3, random_state=0, device="cpu").fit((x / 16).astype(np.float32), y)
    assert clf.model_.dtype == np.float32 and clf.coefs_[0].dtype == np.float32
    assert clf.predict_proba((x[:3] / 16).astype(np.float32)).dtype == np.float32


@pytest.mark.parametrize("estimator", ["classifier", "regressor", "poisson"])
def test_predictions_come_in_the_wider_of_the_inputs_and_the_models_float_type(estimator):
    """As scikit-learn's MLPs: float64 input gives float64 predictions from a float32 model (the
    same outputs), and float32 input a float64 model's float64 ones."""
    x, y = load_digits(return_X_y=True)
    x = x / 16
    make = {"classifier": lambda: MLPClassifier((8,), max_iter=2, random_state=0, device="cpu"),
            "regressor": lambda: MLPRegressor(hidden_layer_sizes=(8,), max_iter=2, random_state=0, device="cpu"),
            "poisson": lambda: MLPRegressor(hidden_layer_sizes=(8,), max_iter=2, loss="poisson", random_state=0, device="cpu")}[estimator]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        narrow = make().fit(x.astype(np.float32), y)
        wide = make().fit(x, y)
    predict = narrow.predict_proba if estimator == "classifier" else narrow.predict
    as_float32 = predict(x[:5].astype(np.float32))
    as_float64 = predict(x[:5])
    assert as_float32.dtype == np.float32 and as_float64.dtype == np.float64
    np.testing.assert_allclose(as_float64, as_float32, rtol=1e-6)  # Poisson's exp is taken in float64
    assert (wide.predict_proba if estimator == "classifier" else wide.predict)(x[:5].astype(np.float32)).dtype \
        == np.float64


def test_model_is_a_sequential_to_fine_tune():
    x, y = load_digits(return_X_y=True)
    clf = MLPClassifier((32, 32), max_iter=10, random_state=0, device="cpu").fit(x / 16, y)
    model = clf.model_
    frozen = model[0].weight.data.copy()
    model.freeze_to(2)
    clf.set_params(warm_start=True, max_iter=2).fit(x / 16, y)
    np.testing.assert_array_equal(clf.model_[0].weight.data, frozen)
    assert clf.model_ is model


@pytest.mark.parametrize("params, match", [
    (dict(solver="lbfgs"), "solver: 'lbfgs' is a full-batch quasi-Newton method"),
    (dict(activation="swish"), "activation: expected one of"),
    (dict(hidden_layer_sizes=(8, 0)), r"hidden_layer_sizes\[1\]: expected a positive int"),
    (dict(batch_size=0), "batch_size: expected a positive int"),
    (dict(momentum=1.5), r"momentum: expected a number in \[0, 1\]"),
    (dict(learning_rate_init=0.0), "learning_rate_init: expected a finite number > 0, got 0.0"),
    (dict(learning_rate_init=-1.0), "learning_rate_init: expected a finite number > 0, got -1.0"),
    (dict(epsilon=float("inf")), "epsilon: expected a finite number > 0, got inf"),
    (dict(early_stopping=True, validation_fraction=0.01), "validation_fraction: 0.01 of 50 samples holds out 1"),
    (dict(random_state=-1), r"random_state: expected None, an int in \[0, 2\*\*32 - 1\] or a numpy.random.RandomState, "
                            "got -1"),
    (dict(random_state="0"), "random_state: expected None, .* got '0'"),
    (dict(random_state=np.random.default_rng(0)), "random_state: expected None, .* got Generator"),
])
def test_bad_parameters_are_named_when_fit_starts(params, match):
    clf = MLPClassifier(**params, device="cpu")
    with pytest.raises(ValueError, match=match):
        clf.fit(rng.normal(size=(50, 3)), np.arange(50) % 2)
    assert not hasattr(clf, "model_")


def test_a_learning_rate_that_is_no_number_says_it_must_be_above_zero():
    clf = MLPClassifier(learning_rate_init="0.1", device="cpu")
    with pytest.raises(TypeError, match=r"learning_rate_init: expected a number > 0, got str '0.1'"):
        clf.fit(X_SMALL, X_SMALL[:, 0] > 0)


def test_assigned_coefs_and_intercepts_are_what_predict_uses_as_in_scikit_learn():
    """scikit-learn's MLPs predict with whatever list is assigned to coefs_ or intercepts_ (to load,
    prune or initialise weights); so do these, which write it into model_."""
    x, y = X_SMALL, (X_SMALL[:, 0] > 0).astype(int)
    ours = MLPClassifier((5,), max_iter=3, random_state=0, device="cpu").fit(x, y)
    theirs = neural_network.MLPClassifier((5,), max_iter=3, random_state=0).fit(x, y)
    draw = np.random.default_rng(2)
    theirs.coefs_ = [draw.normal(size=w.shape) for w in theirs.coefs_]
    theirs.intercepts_ = [draw.normal(size=b.shape) for b in theirs.intercepts_]
    ours.coefs_, ours.intercepts_ = theirs.coefs_, theirs.intercepts_
    np.testing.assert_allclose(ours.predict_proba(x), theirs.predict_proba(x), rtol=1e-12)
    coefs, intercepts = ours.coefs_, ours.intercepts_
    coefs[-1][:], intercepts[-1][:] = 0, 0  # edited copies change nothing until they are assigned
    assert not np.allclose(ours.predict_proba(x), 0.5)
    ours.coefs_, ours.intercepts_ = coefs, intercepts
    np.testing.assert_array_equal(ours.predict_proba(x), 0.5)


@pytest.mark.parametrize("attribute, value, error, match", [
    ("coefs_", lambda w: w[:1], ValueError, r"coefs_: expected 2 arrays, one per layer, got 1"),
    ("coefs_", lambda w: [w[0], w[1].T], ValueError, r"coefs_\[1\]: expected shape \(5, 1\) for layer 1's weight"),
    ("intercepts_", lambda b: [b[0], np.full_like(b[1], np.nan)], ValueError, r"intercepts_\[1\]: contains NaN"),
    ("coefs_", lambda w: w[0], TypeError, r"coefs_: expected a list of arrays, one per layer, got ndarray"),
])
def test_a_bad_assignment_to_coefs_or_intercepts_is_refused_naming_it_with_the_weights_unchanged(attribute, value,
                                                                                                 error, match):
    clf = MLPClassifier((5,), max_iter=3, random_state=0, device="cpu").fit(X_SMALL, X_SMALL[:, 0] > 0)
    before = clf.model_.get_weights()
    with pytest.raises(error, match=match):
        setattr(clf, attribute, value(getattr(clf, attribute)))
    for now, then in zip(clf.model_.get_weights(), before):
        np.testing.assert_array_equal(now, then)


@pytest.mark.parametrize("verbose, error", [("x", TypeError), (None, TypeError), (0.5, TypeError), (-1, ValueError)])
def test_verbose_is_a_flag_or_a_level(verbose, error, capsys):
    """scikit-learn's rule: True, False or an int >= 0, where a truthy string would print."""
    clf = MLPClassifier((4,), max_iter=1, verbose=verbose, device="cpu")
    with pytest.raises(error, match=f"^verbose: expected True, False or an int >= 0, got .*{verbose!r}"):
        clf.fit(X_SMALL, X_SMALL[:, 0] > 0)
    assert not hasattr(clf, "model_") and capsys.readouterr().out == ""
    for level in (np.True_, 2, np.int64(0)):
        MLPClassifier((4,), max_iter=1, verbose=level, device="cpu").fit(X_SMALL, X_SMALL[:, 0] > 0)
    assert capsys.readouterr().out.count("Iteration 1, loss = ") == 2


def test_a_regressor_loss_other_than_scikit_learns_two_is_refused():
    with pytest.raises(ValueError, match=r"loss: expected one of \('squared_error', 'poisson'\), got 'absolute_error'"):
        MLPRegressor(loss="absolute_error", device="cpu").fit(X_SMALL, np.ones(40))


# ----------------------------------------------------------------------------- a call that raises changes nothing

BINARY = (X_SMALL[:, 0] > 0).astype(int)
X_WIDER = np.random.default_rng(4).normal(size=(40, 6))  # their own streams, as COUNTS
LETTERS = np.array(["a", "b", "c"])[np.random.default_rng(5).integers(0, 3, 40)]
# (estimator, parameters set after its fit on (X_SMALL, BINARY), the method called, its X, y and
# sample_weight, the error): the wider X and the letters would change n_features_in_ and classes_.
FAILING_CALLS = {
    "all-zero sample_weight": ("MLPClassifier", {}, "fit", (X_SMALL, BINARY, np.zeros(40)),
                               "sample_weight: every training sample's weight is zero"),
    "all-zero sample_weight, warm_start": ("MLPClassifier", {"warm_start": True}, "fit",
                                           (X_SMALL, BINARY, np.zeros(40)), "sample_weight: every training"),
    "all-zero sample_weight, partial_fit": ("MLPClassifier", {}, "partial_fit", (X_SMALL, BINARY, np.zeros(40)),
                                            "sample_weight: every training"),
    "too few sample weights": ("MLPClassifier", {}, "fit", (X_WIDER, LETTERS, np.ones(39)),
                               r"sample_weight: expected shape \(40,\)"),
    "negative sample weights": ("MLPClassifier", {}, "fit", (X_WIDER, LETTERS, -np.ones(40)),
                                "sample_weight: expected finite weights >= 0"),
    "a validation split too small": ("MLPClassifier", {"early_stopping": True, "validation_fraction": 0.01}, "fit",
                                     (X_WIDER, LETTERS, None), "validation_fraction: 0.01 of 40 samples"),
    "negative poisson targets": ("MLPRegressor", {"loss": "poisson"}, "fit", (X_WIDER, -np.ones(40), None),
                                 "y: loss='poisson' needs targets >= 0"),
}


@pytest.mark.parametrize("call", FAILING_CALLS)
def test_a_call_that_raises_leaves_the_fitted_estimator_as_it_was(call):
    name, params, method, (x, y, sample_weight), match = FAILING_CALLS[call]
    estimator = getattr(gbsk, name)(hidden_layer_sizes=(8,), max_iter=5, random_state=0, device="cpu")
    estimator.fit(X_SMALL, BINARY)
    estimator.set_params(**params)
    model, coefs, before = estimator.model_, estimator.coefs_, pickle.dumps(estimator)
    with pytest.raises(ValueError, match=match):
        getattr(estimator, method)(x, y, sample_weight=sample_weight)
    assert estimator.model_ is model and estimator.n_features_in_ == 5
    for ours, theirs in zip(estimator.coefs_, coefs):
        np.testing.assert_array_equal(ours, theirs)
    # The pickle holds every fitted attribute, the weights and the optimizer's state.
    assert pickle.dumps(estimator) == before


def test_a_first_partial_fit_that_raises_leaves_the_classifier_unfitted():
    clf = MLPClassifier((8,), random_state=0, device="cpu")
    with pytest.raises(ValueError, match="sample_weight: expected finite weights >= 0"):
        clf.partial_fit(X_SMALL, BINARY, sample_weight=-np.ones(40), classes=[0, 1])
    assert not hasattr(clf, "classes_") and not hasattr(clf, "n_features_in_")
    with pytest.raises(ValueError, match="classes: the first call to partial_fit needs every class"):
        clf.partial_fit(X_SMALL, BINARY)


# Inputs ten times X_SMALL and targets in the hundreds: SGD at a rate of 1 overflows the loss within two epochs.
X_LARGE = 10 * X_SMALL
Y_LARGE = X_SMALL @ [1.0, 2.0, 3.0, -1.0, 0.5] * 100


@pytest.mark.parametrize("params", [{}, {"dropout": 0.5, "activation": "identity"},
                                    {"warm_start": False}])
def test_a_fit_whose_loss_overflows_leaves_the_fitted_estimator_as_it_was(params):
    """A warm fit trains model_ in place (with dropout turned on, a new model around its layers),
    a fit from scratch a new one: either way, the estimator is put back as it was."""
    reg = MLPRegressor(hidden_layer_sizes=(8,), solver="sgd", learning_rate_init=1e-5, max_iter=3, batch_size=10,
                       warm_start=True, random_state=0, device="cpu").fit(X_LARGE, Y_LARGE)
    reg.set_params(learning_rate_init=1.0, **params)
    model, layers, coefs, curve = reg.model_, list(reg.model_), reg.coefs_, list(reg.loss_curve_)
    before, predicted = pickle.dumps(reg), reg.predict(X_LARGE)
    with pytest.raises(FloatingPointError, match="fit: the loss became .*; the estimator is left as it was"):
        reg.fit(X_LARGE, Y_LARGE)
    assert reg.model_ is model and len(model) == len(layers) and all(a is b for a, b in zip(model, layers))
    assert [layer.activation for layer in model] == ["relu", "identity"]
    assert reg.n_iter_ == 3 and reg.t_ == 120 and reg.loss_curve_ == curve
    for ours, theirs in zip(reg.coefs_, coefs):
        np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(reg.predict(X_LARGE), predicted)
    assert pickle.dumps(reg) == before


def test_a_first_fit_whose_loss_overflows_leaves_the_estimator_unfitted():
    reg = MLPRegressor(hidden_layer_sizes=(8,), solver="sgd", learning_rate_init=1.0, max_iter=3, batch_size=10,
                       random_state=0, device="cpu")
    with pytest.raises(FloatingPointError, match="fit: the loss became"):
        reg.fit(X_LARGE, Y_LARGE)
    assert set(vars(reg)) == set(reg.get_params())  # the parameters, and nothing fitted
    with pytest.raises(NotFittedError):
        reg.predict(X_LARGE)


def test_a_partial_fit_whose_loss_overflows_leaves_the_weights_and_adams_state_as_they_were():
    x = X_SMALL.astype(np.float32)  # a float32 model, where a target of 1e20 squares to inf
    reg = MLPRegressor(hidden_layer_sizes=(8,), batch_size=10, shuffle=False, random_state=0, device="cpu")
    reg.partial_fit(x, X_SMALL[:, 0])
    # The call would run the model in these (dropout builds a new model around its Dense layers).
    reg.set_params(dropout=0.5, activation="tanh", precision="bf16")
    model, layers, before = reg.model_, list(reg.model_), pickle.dumps(reg)
    overflowing = X_SMALL[:, 0].copy()
    overflowing[-10:] = 1e20  # the last batch's: three batches take their steps before it overflows
    with pytest.raises(FloatingPointError, match="epoch 1, batch 4"):
        reg.partial_fit(x, overflowing)
    assert reg.model_ is model and len(model) == len(layers) and all(a is b for a, b in zip(model, layers))
    assert [layer.activation for layer in model] == ["relu", "identity"] and model.precision == "fp32"
    assert reg.t_ == 40 and pickle.dumps(reg) == before
    # It trains on as if that call had not been made: as its copy from before the call does.
    twin = pickle.loads(before)
    reg.partial_fit(x, X_SMALL[:, 0])
    twin.partial_fit(x, X_SMALL[:, 0])
    for ours, theirs in zip(reg.model_.get_weights(), twin.model_.get_weights()):
        np.testing.assert_array_equal(ours, theirs)


# Inputs of 1e150 and targets of 1e30: one SGD step at a rate of 1e8 takes weights past the float64
# range, from a loss (taken before the step) that is still finite.
X_HUGE = X_SMALL * 1e150
Y_HUGE = X_SMALL[:, 0] * 1e30


def test_a_fit_whose_last_step_overflows_the_weights_raises_and_leaves_the_estimator_as_it_was():
    """Sequential.fit checks each batch's loss, which comes before its step; the weights the
    last step leaves are checked after training, as scikit-learn checks them."""
    params = dict(hidden_layer_sizes=(8,), solver="sgd", momentum=0.0, batch_size=40, random_state=0, device="cpu")
    message = "fit: the weights became inf or NaN in training .*; the estimator is left as it was"
    reg = MLPRegressor(**params, learning_rate_init=1e8, max_iter=1)
    with pytest.raises(FloatingPointError, match=message):
        reg.fit(X_HUGE, Y_HUGE)
    assert set(vars(reg)) == set(reg.get_params())  # the parameters, and nothing fitted
    reg = MLPRegressor(**params, max_iter=3).fit(X_SMALL, X_SMALL[:, 0])
    reg.set_params(warm_start=True, learning_rate_init=1e8, max_iter=1)
    before = pickle.dumps(reg)
    with pytest.raises(FloatingPointError, match=message):
        reg.fit(X_HUGE, Y_HUGE)
    assert pickle.dumps(reg) == before


@pytest.mark.parametrize("warm", [False, True])
def test_a_fit_interrupted_by_ctrl_c_leaves_the_estimator_as_it_was(warm, monkeypatch):
    """The KeyboardInterrupt propagates (scikit-learn's fit warns and returns the model so far)."""
    reg = MLPRegressor(hidden_layer_sizes=(8,), max_iter=5, batch_size=10, random_state=0, device="cpu")
    if warm:
        reg.set_params(warm_start=True).fit(X_SMALL, X_SMALL[:, 0])
    before = pickle.dumps(reg)
    end_epoch = gbsk._Epochs.on_epoch_end

    def interrupted(self, model, epoch, logs):  # Ctrl-C as the third epoch ends, after two epochs' records
        if epoch == 2:
            raise KeyboardInterrupt
        end_epoch(self, model, epoch, logs)

    monkeypatch.setattr(gbsk._Epochs, "on_epoch_end", interrupted)
    with pytest.raises(KeyboardInterrupt):
        reg.fit(X_SMALL, X_SMALL[:, 0])
    assert pickle.dumps(reg) == before
    if not warm:
        assert set(vars(reg)) == set(reg.get_params())


def test_a_convergence_warning_made_an_error_comes_after_the_fit():
    """As scikit-learn's: the fit ran its max_iter epochs, and stays."""
    reg = MLPRegressor(hidden_layer_sizes=(8,), max_iter=2, random_state=0, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        with pytest.raises(ConvergenceWarning, match="max_iter: all 2 epochs ran"):
            reg.fit(X_SMALL, X_SMALL[:, 0])
    assert reg.n_iter_ == 2 and len(reg.loss_curve_) == 2 and reg.predict(X_SMALL).shape == (40,)


# ----------------------------------------------------------------------------- warm starts take the parameters


def warm_regressor(**params):
    return MLPRegressor(hidden_layer_sizes=(8, 8), warm_start=True, max_iter=2, batch_size=10, random_state=0,
                        device="cpu", **params).fit(X_SMALL, X_SMALL[:, 0])


@pytest.mark.parametrize("method", ["fit", "partial_fit"])
def test_a_warm_fit_runs_the_hidden_layers_in_the_current_activation(method):
    reg = warm_regressor()
    getattr(reg.set_params(activation="tanh"), method)(X_SMALL, X_SMALL[:, 0])
    # The output layer's activation is the task's.
    assert [layer.activation for layer in reg.model_] == ["tanh", "tanh", "identity"]
    (w0, w1, w2), (b0, b1, b2) = reg.coefs_, reg.intercepts_
    expected = np.tanh(np.tanh(X_SMALL @ w0 + b0) @ w1 + b1) @ w2 + b2
    np.testing.assert_allclose(reg.predict(X_SMALL), expected.ravel(), rtol=1e-12)


@pytest.mark.parametrize("method", ["fit", "partial_fit"])
def test_a_warm_fit_runs_in_the_current_precision(method):
    reg = warm_regressor()
    model = reg.model_
    getattr(reg.set_params(precision="bf16"), method)(X_SMALL, X_SMALL[:, 0])
    assert reg.model_ is model and model.precision == "bf16"


@pytest.mark.parametrize("method", ["fit", "partial_fit"])
def test_a_warm_fit_sets_a_changed_dropout_rate_in_place(method):
    reg = warm_regressor(dropout=0.2)
    model = reg.model_
    getattr(reg.set_params(dropout=0.5), method)(X_SMALL, X_SMALL[:, 0])
    assert reg.model_ is model and [layer.rate for layer in model if isinstance(layer, gb.Dropout)] == [0.5, 0.5]


@pytest.mark.parametrize("method", ["fit", "partial_fit"])
def test_turning_dropout_on_and_off_in_a_warm_fit_keeps_the_dense_layers(method):
    reg = warm_regressor()
    dense = list(reg.model_)
    weights = reg.model_.get_weights()
    getattr(reg.set_params(dropout=0.5, max_iter=1), method)(X_SMALL, X_SMALL[:, 0])
    assert [type(layer).__name__ for layer in reg.model_] == ["Dense", "Dropout", "Dense", "Dropout", "Dense"]
    assert all(ours is theirs for ours, theirs in zip(reg.model_[::2], dense))
    assert not np.array_equal(reg.model_.get_weights()[0], weights[0])  # trained on from them
    getattr(reg.set_params(dropout=0.0), method)(X_SMALL, X_SMALL[:, 0])
    assert all(ours is theirs for ours, theirs in zip(reg.model_, dense)) and len(reg.model_) == 3


def interrupted(self, model, epoch, logs):
    raise KeyboardInterrupt  # Ctrl-C


def dropout_keys(reg) -> tuple:
    """The keys of the masks the Dropouts drew last: one batch a call, that call's."""
    return tuple(tuple(layer.backend.to_host(layer._key).tolist()) for layer in reg.model_
                 if isinstance(layer, gb.Dropout))


@pytest.mark.parametrize("method", ["fit", "partial_fit"])
def test_each_call_draws_new_dropout_masks_and_a_fresh_estimator_the_same_ones(method, monkeypatch):
    """random_state seeds the masks' stream in the fit that builds the model; later calls draw on from it,
    where reseeding would draw the first call's masks again. A call that raises puts it back as it was."""
    params = dict(hidden_layer_sizes=(8, 8), dropout=0.5, batch_size=40, max_iter=1, warm_start=method == "fit",
                  random_state=0, device="cpu")
    reg, twin = MLPRegressor(**params), MLPRegressor(**params)
    keys = []
    for call in range(3):
        getattr(reg, method)(X_SMALL, X_SMALL[:, 0])
        getattr(twin, method)(X_SMALL, X_SMALL[:, 0])
        keys.append(dropout_keys(reg))
        assert dropout_keys(twin) == keys[-1]
        if call == 0:  # a call interrupted as its epoch ends, its masks drawn: the next call draws them again
            with monkeypatch.context() as patch:
                patch.setattr(gbsk._Epochs, "on_epoch_end", interrupted)
                with pytest.raises(KeyboardInterrupt):
                    getattr(reg, method)(X_SMALL, X_SMALL[:, 0])
    assert len(set(keys)) == 3
    for ours, theirs in zip(reg.model_.get_weights(), twin.model_.get_weights()):
        np.testing.assert_array_equal(ours, theirs)


def test_turning_dropout_on_between_partial_fits_keeps_the_optimizer_state():
    reg = MLPRegressor(hidden_layer_sizes=(8, 8), batch_size=10, random_state=0, device="cpu")
    reg.partial_fit(X_SMALL, X_SMALL[:, 0])
    reg.set_params(dropout=0.5).partial_fit(X_SMALL, X_SMALL[:, 0])
    assert sum(isinstance(layer, gb.Dropout) for layer in reg.model_) == 2
    # Adam's step count went on: four batches a call, no fresh moments.
    assert {entry["step"] for entry in reg._optimizer.state_dict()["state"].values()} == {8}


def relu_outputs(reg, x):
    """What a relu MLPRegressor's coefs_ and intercepts_ give for ``x``: what predict must return."""
    *hidden, last = zip(reg.coefs_, reg.intercepts_)
    for weight, bias in hidden:
        x = np.maximum(x @ weight + bias, 0)
    return (x @ last[0] + last[1]).ravel()


@pytest.mark.parametrize("method", ["fit", "partial_fit"])
@pytest.mark.parametrize("fitted, changed", [("squared_error", "poisson"), ("poisson", "squared_error")])
def test_a_warm_call_refuses_a_loss_that_changes_the_output(fitted, changed, method):
    """The output is the mean for squared_error and its log for poisson: going on from one as the
    other would train it towards the other and have predict read it as the other."""
    reg = MLPRegressor(fitted, hidden_layer_sizes=(8,), warm_start=True, max_iter=2, batch_size=10, random_state=0,
                       device="cpu").fit(X_SMALL, COUNTS[:, 0])
    before = pickle.dumps(reg.set_params(loss=changed))
    with pytest.raises(ValueError, match=f"^loss: '{changed}', but the model was fitted with loss='{fitted}'.* fit "
                                         "with warm_start=False for a new model"):
        getattr(reg, method)(X_SMALL, COUNTS[:, 0])
    assert pickle.dumps(reg) == before
    reg.set_params(warm_start=False).fit(X_SMALL, COUNTS[:, 0])
    outputs = reg.model_.predict(X_SMALL).ravel()
    assert reg.out_activation_ == {"poisson": "exp", "squared_error": "identity"}[changed]
    np.testing.assert_allclose(reg.predict(X_SMALL), np.exp(outputs) if changed == "poisson" else outputs,
                               rtol=1e-12)


@pytest.mark.parametrize("method", ["fit", "partial_fit"])
def test_a_warm_call_refuses_other_hidden_layer_sizes(method):
    reg = warm_regressor()
    before = pickle.dumps(reg.set_params(hidden_layer_sizes=(8, 4)))
    with pytest.raises(ValueError, match=r"^hidden_layer_sizes: \(8, 4\), but the fitted model's hidden layers are "
                                         r"\(8, 8\); .* fit with warm_start=False for a new model"):
        getattr(reg, method)(X_SMALL, X_SMALL[:, 0])
    assert pickle.dumps(reg) == before
    getattr(reg.set_params(hidden_layer_sizes=[8, 8]), method)(X_SMALL, X_SMALL[:, 0])  # the same sizes: trains on
    reg.set_params(hidden_layer_sizes=(8, 4), warm_start=False).fit(X_SMALL, X_SMALL[:, 0])
    assert [w.shape for w in reg.coefs_] == [(5, 8), (8, 4), (4, 1)] and reg.n_layers_ == 4


@pytest.mark.parametrize("method", ["fit", "partial_fit"])
def test_a_warm_call_refuses_another_device_or_backend(method):
    """The fitted model stays where it is: a warm call that would pick another backend is refused
    (the numba backend runs in the CUDA simulator here), the estimator unchanged."""
    reg = warm_regressor()
    before = pickle.dumps(reg.set_params(device="cuda", backend="numba"))
    with pytest.raises(ValueError, match=r"^device='cuda', backend='numba': the 'numba' backend, but the fitted model "
                                         r"runs on the 'numpy' one; .* warm_start=False"):
        getattr(reg, method)(X_SMALL, X_SMALL[:, 0])
    assert pickle.dumps(reg) == before
    getattr(reg.set_params(device="auto", backend="numpy"), method)(X_SMALL, X_SMALL[:, 0])  # the same backend


def test_a_warm_early_stopping_fit_that_never_beats_the_best_score_ends_on_its_weights():
    """As scikit-learn's (its _best_coefs): best_validation_score_ carries over a warm fit, and so
    do the weights that scored it, where no epoch of the warm fit beats it."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 5))
    y = x @ rng.standard_normal(5) + 0.1 * rng.standard_normal(200)
    reg = MLPRegressor(hidden_layer_sizes=(16,), early_stopping=True, warm_start=True, max_iter=300, random_state=0,
                       device="cpu").fit(x, y)
    best, coefs, scored = reg.best_validation_score_, [c.copy() for c in reg.coefs_], len(reg.validation_scores_)
    reg.set_params(learning_rate_init=0.1, max_iter=2).fit(x, y)
    assert reg.validation_scores_[scored:] and max(reg.validation_scores_[scored:]) < best  # never beaten
    assert reg.best_validation_score_ == best
    for got, want in zip(reg.coefs_, coefs):
        np.testing.assert_array_equal(got, want)


def test_a_warm_fit_that_turns_early_stopping_on_and_off_keeps_the_records_of_the_current_criterion():
    reg = warm_regressor()  # two epochs, no early stopping
    reg.set_params(early_stopping=True, max_iter=3).fit(X_SMALL, X_SMALL[:, 0])
    assert reg.n_iter_ == 3 and len(reg.loss_curve_) == 5 and reg.best_loss_ is None
    assert len(reg.validation_scores_) == 3 and reg.best_validation_score_ == max(reg.validation_scores_)
    np.testing.assert_allclose(reg.predict(X_SMALL), relu_outputs(reg, X_SMALL), rtol=1e-12)
    reg.set_params(early_stopping=False).fit(X_SMALL, X_SMALL[:, 0])
    assert reg.n_iter_ == 3 and len(reg.loss_curve_) == 8
    assert reg.validation_scores_ is None and reg.best_validation_score_ is None
    assert reg.best_loss_ == min(reg.loss_curve_[-3:])
    np.testing.assert_allclose(reg.predict(X_SMALL), relu_outputs(reg, X_SMALL), rtol=1e-12)


def test_partial_fit_after_an_early_stopping_fit_records_its_training_loss():
    reg = MLPRegressor(hidden_layer_sizes=(8,), early_stopping=True, max_iter=2, batch_size=10, random_state=0,
                       device="cpu").fit(X_SMALL, X_SMALL[:, 0])
    reg.set_params(early_stopping=False).partial_fit(X_SMALL, X_SMALL[:, 0])
    assert reg.n_iter_ == 1 and len(reg.loss_curve_) == 3
    assert reg.validation_scores_ is None and reg.best_validation_score_ is None
    assert reg.best_loss_ == reg.loss_curve_[-1]
    np.testing.assert_allclose(reg.predict(X_SMALL), relu_outputs(reg, X_SMALL), rtol=1e-12)


# ----------------------------------------------------------------------------- Poisson regression


def poisson_toy(n, seed):
    """Counts whose log mean is a smooth function of 3 features, means from about 0.2 to 20."""
    draw = np.random.default_rng(seed)
    x = draw.uniform(-1, 1, (n, 3))
    mean = np.exp(0.5 + 1.2 * x[:, 0] - 0.8 * x[:, 1] ** 2 + 0.6 * np.sin(3 * x[:, 2]))
    return x, draw.poisson(mean).astype(float), mean


def test_a_poisson_regressor_predicts_means_that_beat_the_constant_mean():
    x, y, _ = poisson_toy(600, seed=4)
    x_test, y_test, mean_test = poisson_toy(400, seed=5)
    reg = MLPRegressor(loss="poisson", hidden_layer_sizes=(32,), learning_rate_init=0.01, max_iter=300,
                       random_state=0, device="cpu").fit(x, y)
    predicted = reg.predict(x_test)
    assert reg.out_activation_ == "exp" and reg.model_[-1].activation == "identity"
    assert predicted.shape == (400,) and np.all(predicted > 0)
    # predict is scikit-learn's: exp of the log rate the model outputs.
    np.testing.assert_allclose(predicted, np.exp(reg.model_.predict(x_test)).ravel(), rtol=1e-12)
    constant = np.full_like(y_test, y.mean())
    ours, baseline = mean_poisson_deviance(y_test, predicted), mean_poisson_deviance(y_test, constant)
    best = mean_poisson_deviance(y_test, mean_test)  # the true means: only the counts' own noise is left
    assert ours < 0.6 * baseline and ours < 1.1 * best, (ours, baseline, best)
    assert reg.score(x_test, y_test) == pytest.approx(r2_score(y_test, predicted), rel=1e-12)


def test_a_poisson_regressors_tags_say_its_targets_are_positive():
    """So scikit-learn's checks, and tools that read the tags, give it targets > 0."""
    assert get_tags(MLPRegressor(loss="poisson")).target_tags.positive_only
    assert not get_tags(MLPRegressor()).target_tags.positive_only


def test_a_poisson_regressor_refuses_negative_targets_naming_y():
    reg = MLPRegressor(loss="poisson", max_iter=5, device="cpu")
    with pytest.raises(ValueError, match=r"^y: loss='poisson' needs targets >= 0 \(counts or rates\), got values "
                                         r"from -1\.0 to 3\.0"):
        reg.fit(X_SMALL, np.r_[-1.0, np.full(38, 2.0), 3.0])
    assert not hasattr(reg, "model_")
    MLPRegressor(loss="squared_error", max_iter=5, device="cpu").fit(X_SMALL, np.r_[-1.0, np.full(38, 2.0), 3.0])
