"""Metric names as Keras spells them, each against its Keras definition written out here.

(Keras itself is not installed for these tests: it needs a backend framework; the
definitions below follow keras.metrics' documented formulas.)"""

import re

import numpy as np
import pytest

import gpubp as gb
from gpubp import metrics


@pytest.fixture
def scores(rng):
    return rng.standard_normal((50, 4))


@pytest.fixture
def one_hot(rng):
    return np.eye(4)[rng.integers(0, 4, 50)]


def test_mean_absolute_and_squared_error_are_the_means_over_every_output(rng, scores):
    y = rng.standard_normal((50, 4))
    assert metrics.get("mean_absolute_error")[1](scores, y) == pytest.approx(np.abs(scores - y).mean(), rel=1e-12)
    assert metrics.get("mean_squared_error")[1](scores, y) == pytest.approx(((scores - y) ** 2).mean(), rel=1e-12)


def test_binary_accuracy_thresholds_every_output_and_compares_it_with_its_target(rng):
    probabilities, y = rng.random((40, 3)), (rng.random((40, 3)) > 0.5).astype(np.float32)
    expected = np.mean([[float(y[i, j] == (probabilities[i, j] > 0.5)) for j in range(3)] for i in range(40)])
    assert metrics.get("binary_accuracy", probabilities=True)[1](probabilities, y) == pytest.approx(expected)
    logits = np.log(probabilities / (1 - probabilities))  # the same outputs before the sigmoid
    assert metrics.get("binary_accuracy")[1](logits, y) == pytest.approx(expected)


def test_categorical_accuracy_compares_the_argmax_of_scores_and_one_hot_targets(scores, one_hot):
    expected = np.mean([np.argmax(s) == np.argmax(t) for s, t in zip(scores, one_hot)])
    assert metrics.categorical_accuracy(scores, one_hot) == expected
    with pytest.raises(ValueError, match="categorical_accuracy: expected one-hot targets of shape"):
        metrics.categorical_accuracy(scores, one_hot.argmax(axis=1))


def test_sparse_categorical_accuracy_compares_the_argmax_with_the_label(scores, one_hot):
    labels = one_hot.argmax(axis=1)
    assert metrics.sparse_categorical_accuracy(scores, labels) == metrics.categorical_accuracy(scores, one_hot)
    assert metrics.sparse_categorical_accuracy(scores, labels.reshape(-1, 1).astype(np.float32)) == \
        metrics.categorical_accuracy(scores, one_hot)


def test_top_k_counts_the_target_among_the_k_highest_ties_included():
    scores = np.array([[0.1, 0.5, 0.5, 0.2],    # target 2 ties the top: in the top 1
                       [0.4, 0.3, 0.2, 0.1],    # target 3 is the lowest: in the top 4 only
                       [0.3, 0.3, 0.3, 0.1]])   # target 0 ties the second and third
    y = np.eye(4)[[2, 3, 0]]
    assert [metrics.top_k_categorical_accuracy(scores, y, k) for k in (1, 2, 3, 4)] == [2 / 3, 2 / 3, 2 / 3, 1.0]
    assert metrics.get("top_k_categorical_accuracy")[1](scores, y) == 1.0  # k = 5 by default, as in Keras
    top_2 = metrics.TopKCategoricalAccuracy(k=2, name="top_2")
    assert metrics.get(top_2) == ("top_2", top_2) and top_2(scores, y) == 2 / 3


@pytest.mark.parametrize("k", [0, -1, 2.5, True, np.float64(2.0), "2"])
def test_top_k_refuses_a_k_that_is_not_a_positive_int_in_the_function_and_the_class(k):
    """k = 0 scored 1.0 and k = -1 scored 0.0 (NumPy's partition from the other end), 2.5 raised
    NumPy's error: the function checks k as the class does."""
    scores, y = np.array([[0.1, 0.5, 0.4]]), np.eye(3)[[0]]
    message = rf"^k: expected a positive int, got {re.escape(repr(k))}$"
    with pytest.raises(ValueError, match=message):
        metrics.top_k_categorical_accuracy(scores, y, k)
    with pytest.raises(ValueError, match=message):
        metrics.TopKCategoricalAccuracy(k)


def test_top_k_takes_a_numpy_integer_k_in_the_function_and_the_class():
    scores, y = np.array([[0.1, 0.5, 0.4], [0.3, 0.2, 0.5]]), np.eye(3)[[2, 1]]
    top_2 = metrics.TopKCategoricalAccuracy(np.int64(2))
    assert top_2.k == 2 and type(top_2.k) is int
    assert top_2(scores, y) == metrics.top_k_categorical_accuracy(scores, y, np.int32(2)) == 0.5


def keras_thresholds():
    return np.array([-1e-7] + [(i + 1) / 199 for i in range(198)] + [1 + 1e-7])


def test_auc_equals_the_exact_roc_auc_when_no_two_scores_share_a_threshold_bin(rng):
    sklearn_metrics = pytest.importorskip("sklearn.metrics", reason="the oracle is scikit-learn")
    bins = rng.choice(199, size=60, replace=False)
    probabilities = (bins + rng.uniform(0.1, 0.9, 60)) / 199  # one score between each pair of thresholds
    y = (rng.random(60) > 0.4).astype(np.float32)
    assert metrics.auc(probabilities[:, None], y) == pytest.approx(sklearn_metrics.roc_auc_score(y, probabilities),
                                                                   rel=1e-12)


def test_auc_counts_scores_between_two_thresholds_as_one_point_of_the_curve():
    # Keras counts a score as positive above a threshold; two scores between the same two
    # thresholds are indistinguishable, so their pair counts half (the trapezoid's diagonal).
    probabilities = np.array([0.9, 0.3001, 0.3002, 0.1])
    y = np.array([1, 0, 1, 0])
    # Pairs (positive, negative): (0.9, 0.3001) 1, (0.9, 0.1) 1, (0.3002, 0.3001) tied: 1/2, (0.3002, 0.1) 1.
    assert metrics.auc(probabilities[:, None], y) == pytest.approx(3.5 / 4, rel=1e-12)
    assert keras_thresholds()[59] < 0.3001 < 0.3002 < keras_thresholds()[60]


def test_auc_refuses_a_from_logits_that_is_not_a_flag(rng):
    scores, y = rng.standard_normal(8), (rng.random(8) > 0.5).astype(np.float32)
    with pytest.raises(TypeError, match="from_logits: expected True or False, got 'False'"):  # read as True
        gb.metrics.auc(scores, y, from_logits="False")


def test_auc_of_logits_is_the_auc_of_their_sigmoid(rng):
    logits, y = rng.standard_normal((30, 1)) * 3, (rng.random(30) > 0.5).astype(np.float32)
    assert metrics.get("auc")[1](logits, y) == metrics.auc(1 / (1 + np.exp(-logits)), y)


@pytest.mark.parametrize("num_thresholds", [1, 0, -3, 2.5, True])
def test_auc_refuses_a_num_thresholds_that_is_not_an_int_above_1_as_keras_does(num_thresholds):
    with pytest.raises(ValueError, match=rf"^num_thresholds: expected an int > 1, got {num_thresholds!r}$"):
        metrics.auc(np.array([[0.2], [0.6], [0.9]]), np.array([0, 1, 1]), num_thresholds=num_thresholds)


def test_auc_with_2_thresholds_has_only_the_end_points_of_the_curve():
    assert metrics.auc(np.array([[0.2], [0.6], [0.9]]), np.array([0, 1, 1]), num_thresholds=2) == 0.5


@pytest.mark.parametrize("metric", ["auc", "binary_accuracy"])
def test_smoothed_binary_targets_score_as_the_labels_they_round_to_as_in_accuracy(rng, metric):
    """binary_cross_entropy takes targets in [0, 1]: smoothed ones (0.05, 0.95) are class 1 from
    0.5 on in every metric alike, as accuracy, precision, recall and f1 read them. auc counted
    every target other than 0 as a positive (0.0 for these) and binary_accuracy compared 0.95
    with 1 exactly (0.0)."""
    hard = rng.integers(0, 2, 200)
    probabilities = np.clip(hard * 0.4 + rng.uniform(0, 0.6, 200), 0, 1)[:, None]
    smoothed = np.where(hard == 1, 0.95, 0.05)
    _, fn = metrics.get(metric, probabilities=True)
    assert fn(probabilities, hard) > 0.7
    assert fn(probabilities, smoothed) == fn(probabilities, hard)
    assert fn(probabilities, smoothed[:, None].astype(np.float32)) == fn(probabilities, hard)
    if metric == "binary_accuracy":  # one output: the same question as accuracy's
        assert fn(probabilities, smoothed) == metrics.get("accuracy", probabilities=True)[1](probabilities, smoothed)


@pytest.mark.parametrize("metric", ["auc", "binary_accuracy"])
@pytest.mark.parametrize("bad", [2.0, -1.0, np.nan])
def test_a_binary_target_outside_0_1_is_refused_naming_it(metric, bad):
    """A target of 2 counted as a positive in auc (and never matched in binary_accuracy): a
    target outside [0, 1] is no binary class."""
    y = np.array([0.0, 1.0, 0.0, 1.0])
    y[2] = bad
    with pytest.raises(ValueError, match=rf"^{metric}: expected binary targets y in \[0, 1\] \(class 1 from 0.5 on\), "
                                         rf"got {bad} in row 2$"):
        getattr(metrics, metric)(np.array([[0.2], [0.6], [0.4], [0.9]]), y)


def binary_model():
    gb.seed(5)
    return gb.Sequential([gb.Dense(3, 4, "relu"), gb.Dense(4, 1, "sigmoid")], device="cpu")


def test_evaluate_and_fit_take_keras_names_and_log_them_as_given(rng):
    x, y = rng.standard_normal((32, 3)).astype(np.float32), (rng.random(32) > 0.5).astype(np.float32)
    model = binary_model()
    names = ["binary_accuracy", "auc", "mean_absolute_error", "mean_squared_error"]
    history = model.fit(x, y, loss="binary_crossentropy", epochs=1, batch_size=8, validation_data=(x, y),
                        metrics=names, verbose=0)
    assert set(history.history) == {"loss", *names, "val_loss", *(f"val_{name}" for name in names)}
    result = model.evaluate(x, y, loss="binary_crossentropy", metrics=names + ["accuracy", "mae"])
    probabilities = model.predict(x)
    assert result["binary_accuracy"] == result["accuracy"] == np.mean((probabilities[:, 0] > 0.5) == y)
    assert result["mean_absolute_error"] == result["mae"]
    assert result["auc"] == metrics.auc(probabilities, y)


# ----------------------------------------------------------------------------- metrics as callables


@pytest.mark.parametrize("probabilities", [True, False], ids=["probabilities", "logits"])
@pytest.mark.parametrize("name", ["accuracy", "precision", "recall", "f1", "binary_accuracy", "auc"])
def test_gpubps_own_metric_function_given_as_a_callable_scores_as_its_name(rng, name, probabilities):
    """Keras scores ``keras.metrics.binary_accuracy`` as it scores ``"binary_accuracy"``: with the
    threshold of the scores it is given, not the function's default."""
    p, y = rng.uniform(0.05, 0.95, (40, 1)), (rng.random(40) > 0.5).astype(np.float32)
    scores = p if probabilities else np.log(p / (1 - p))
    by_name = metrics.get(name, probabilities=probabilities)
    by_function = metrics.get(getattr(metrics, name), probabilities=probabilities)
    assert by_function[0] == name
    assert by_function[1](scores, y) == by_name[1](scores, y)


def test_evaluate_scores_gpubps_metric_functions_as_their_names(rng):
    x, y = rng.standard_normal((32, 3)).astype(np.float32), (rng.random(32) > 0.5).astype(np.float32)
    model = binary_model()
    names = ["accuracy", "precision", "recall", "f1", "binary_accuracy", "auc", "mean_squared_error"]
    by_name = model.evaluate(x, y, loss="binary_crossentropy", metrics=names)
    assert model.evaluate(x, y, loss="binary_crossentropy", metrics=[getattr(metrics, n) for n in names]) == by_name


@pytest.mark.parametrize("bad", [["accuracy"], {"name": "accuracy"}, None, 3])
def test_a_metric_neither_a_name_nor_a_callable_is_refused_naming_metrics(bad):
    model = gb.Sequential([gb.Dense(2, 2)], device="cpu")
    with pytest.raises(TypeError, match=rf"^metrics: expected a metric name or a callable, got {type(bad).__name__}"):
        model.compile(loss="cross_entropy", metrics=[bad])


# ----------------------------------------------------------------------------- target shapes


WRONG_SHAPES = [  # (metric, scores' shape, targets' shape, the error)
    ("accuracy", (6, 2), (1,), r"^y: expected class labels of shape \(6,\) or \(6, 1\), got \(1,\)"),
    ("accuracy", (6, 2), (6, 3), r"^y: expected class labels, or one target per output of shape \(6, 2\)"),
    ("f1", (6, 2), (6, 5), r"^y: expected class labels, or one target per output of shape \(6, 2\)"),
    ("precision", (6, 1), (6, 2), r"^y: expected class labels, or one target per output of shape \(6, 1\)"),
    ("sparse_categorical_accuracy", (6, 3), (6, 3), r"^y: expected class labels of shape \(6,\) or \(6, 1\)"),
    ("binary_accuracy", (6, 2), (2, 6), r"^binary_accuracy: expected one target per output, y of shape \(6, 2\)"),
    ("mean_squared_error", (6, 2), (2, 6), r"^mean_squared_error: expected one target per output"),
    ("mean_absolute_error", (6, 1), (1, 6), r"^mean_absolute_error: expected one target per output"),
    ("auc", (6, 1), (2, 3), r"^auc: expected one target per output"),
]


@pytest.mark.parametrize("metric, scores_shape, y_shape, message", WRONG_SHAPES,
                         ids=[f"{metric}-scores{s}-y{y}" for metric, s, y, _ in WRONG_SHAPES])
def test_a_metric_refuses_targets_of_another_shape_than_the_scores_need(rng, metric, scores_shape, y_shape, message):
    scores, y = rng.random(scores_shape), rng.integers(0, 2, y_shape).astype(np.float64)
    with pytest.raises(ValueError, match=message):
        getattr(metrics, metric)(scores, y)


@pytest.mark.parametrize("bad", [0.9, 1.5, np.nan, np.inf])
@pytest.mark.parametrize("metric", ["accuracy", "precision", "recall", "f1", "sparse_categorical_accuracy"])
def test_class_labels_that_are_not_whole_numbers_are_refused_not_truncated(rng, metric, bad):
    scores, y = rng.random((6, 3)), np.array([0.0, 2.0, 1.0, 0.0, 1.0, 2.0])
    y[3] = bad
    with pytest.raises(ValueError, match=rf"^y: expected class labels \(whole numbers\), got {bad} in row 3"):
        getattr(metrics, metric)(scores, y)


@pytest.mark.parametrize("metric", ["accuracy", "precision", "recall", "f1"])
def test_soft_targets_of_a_single_output_count_as_the_class_they_are_nearer(rng, metric):
    """binary_cross_entropy takes targets in [0, 1] (smoothed or distilled labels): the default
    accuracy of such a model scores them, class 1 from 0.5 on, rather than refusing them."""
    scores = rng.random((40, 1))
    soft = rng.random(40)
    fn = getattr(metrics, metric)
    assert fn(scores, soft) == fn(scores, (soft >= 0.5).astype(np.int64))
    gb.seed(0)
    model = gb.Sequential([gb.Dense(3, 1, "sigmoid")], device="cpu")
    x = rng.standard_normal((40, 3)).astype(np.float32)
    hard = (soft >= 0.5).astype(np.float32)
    scored = [model.evaluate(x, y, loss="binary_cross_entropy", metrics=[metric])[metric]
              for y in (soft.astype(np.float32), hard)]
    assert scored[0] == scored[1]


@pytest.mark.parametrize("metric", ["accuracy", "precision", "recall", "f1"])
def test_labels_a_column_of_labels_and_one_hot_rows_of_the_same_classes_score_alike(rng, metric, scores):
    labels = rng.integers(0, 4, 50)
    fn = getattr(metrics, metric)
    expected = fn(scores, labels)
    assert fn(scores, labels.reshape(-1, 1).astype(np.float32)) == expected
    assert fn(scores, np.eye(4)[labels]) == expected
    single, binary = scores[:, :1], labels % 2
    assert fn(single, binary.reshape(-1, 1).astype(np.float32)) == fn(single, binary)


def probability_rows(rng, labels, classes):
    """Softmax rows whose argmax is ``labels`` and which sum to 1 only to rounding (some rows
    1 - 1e-16, say), as a teacher's probabilities do."""
    logits = np.eye(classes)[labels] * 4 + rng.normal(size=(len(labels), classes)) * 0.1
    rows = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert np.any(rows.sum(axis=1) != 1) and np.all(rows.argmax(axis=1) == labels)
    return rows


@pytest.mark.parametrize("rows", ["softmax float64", "smoothed float32"])
@pytest.mark.parametrize("metric", ["precision", "recall", "f1"])
def test_probability_rows_score_as_their_argmax_not_as_multi_hot_labels(rng, metric, rows):
    """A row of probabilities that did not sum to exactly 1 made the targets multi-hot, each
    column scored against target != 0 (recall 0.93 became 0.30). Only 0/1 targets are multi-hot."""
    labels = rng.integers(0, 7, 100)
    scores = np.eye(7)[labels] * 0.5 + rng.uniform(0, 0.6, (100, 7))
    if rows == "softmax float64":
        soft = probability_rows(rng, labels, 7)
    else:
        soft = (0.85 * np.eye(7)[labels] + 0.15 / 7).astype(np.float32)
        soft[0] *= np.float32(0.9999)  # rounding that leaves a row short of 1
    fn = getattr(metrics, metric)
    assert fn(scores, soft, 0.5) == fn(scores, labels, 0.5) == fn(scores, np.eye(7)[labels], 0.5)


ROWS_OF_NO_CLASS = [  # targets, one per output, with values outside [0, 1]
    ("regression values", np.array([[0.5, -1.2, 3.0], [0.1, 0.2, 0.7]]), "row 0 with values from -1.2 to 3.0"),
    ("counts", np.array([[0, 2, 1], [1, 0, 0]]), "row 0 with values from 0 to 2"),
]


@pytest.mark.parametrize("metric", ["accuracy", "precision", "recall", "f1"])
@pytest.mark.parametrize("y, shown", [(y, shown) for _, y, shown in ROWS_OF_NO_CLASS],
                         ids=[name for name, _, _ in ROWS_OF_NO_CLASS])
def test_rows_of_targets_that_name_no_class_are_refused(rng, metric, y, shown):
    with pytest.raises(ValueError, match=r"^y: expected targets in \[0, 1\] \(one-hot, multi-hot or probability "
                                         rf"rows\), got {shown}"):
        getattr(metrics, metric)(rng.random((2, 3)), y)


@pytest.mark.parametrize("metric", ["precision", "recall", "f1"])
def test_soft_multi_hot_targets_score_as_the_labels_they_round_to(rng, metric):
    """Binary cross-entropy's smoothed or distilled targets, a column per label, in rows that do not
    sum to 1: each label is on from 0.5, as a single binary target is."""
    hard = (rng.random((60, 4)) < 0.4).astype(np.float64)
    hard[0] = [1, 1, 0, 0]  # some row with two labels: multi-hot
    soft = np.where(hard == 1, rng.uniform(0.5, 1.0, hard.shape), rng.uniform(0.0, 0.5, hard.shape))
    scores = rng.random((60, 4))
    fn = getattr(metrics, metric)
    assert fn(scores, soft, 0.5) == fn(scores, hard, 0.5)
    assert metrics.accuracy(scores, soft) == metrics.accuracy(scores, soft.argmax(axis=1))  # the argmax, as for 0/1


def test_evaluate_without_a_loss_refuses_targets_of_another_width_and_labels_outside_the_classes(rng):
    gb.seed(0)
    model = gb.Sequential([gb.Dense(4, 2, "softmax")], device="cpu")
    x = rng.standard_normal((6, 4)).astype(np.float32)
    with pytest.raises(ValueError, match=r"^y: expected class labels \(6,\) or one target per output \(6, 2\), "
                                         r"got shape \(6, 3\)"):
        model.evaluate(x, np.eye(3)[rng.integers(0, 3, 6)])
    with pytest.raises(ValueError, match=r"^y: expected class labels in \[0, 2\), got values from 0 to 2"):
        model.evaluate(x, np.array([[0], [1], [2], [0], [1], [0]]))
    assert set(model.evaluate(x, np.eye(2)[rng.integers(0, 2, 6)])) == {"accuracy"}
    multi_label = gb.Sequential([gb.Dense(4, 3, "sigmoid")], device="cpu")
    assert set(multi_label.evaluate(x, (rng.random((6, 3)) > 0.5).astype(np.float32), metrics=["f1"])) == {"f1"}


def test_a_metric_class_is_built_with_its_defaults_as_keras_builds_it(rng):
    """TopKCategoricalAccuracy (the class) was called as a metric, with the scores as k."""
    name, fn = metrics.get(metrics.TopKCategoricalAccuracy)
    assert name == "top_k_categorical_accuracy" and isinstance(fn, metrics.TopKCategoricalAccuracy) and fn.k == 5
    gb.seed(0)
    model = gb.Sequential([gb.Dense(3, 6)], device="cpu")
    x, y = rng.standard_normal((8, 3)).astype(np.float32), np.eye(6)[rng.integers(0, 6, 8)]
    result = model.evaluate(x, y, loss="categorical_crossentropy", metrics=[metrics.TopKCategoricalAccuracy])
    assert result["top_k_categorical_accuracy"] == metrics.top_k_categorical_accuracy(model.predict(x), y)

    class NeedsK:
        def __init__(self, k):
            self.k = k

    with pytest.raises(TypeError, match=r"^metrics: got the class NeedsK, which cannot be built without arguments "
                                        r"\(.*\); pass an instance, NeedsK\(\.\.\.\)$"):
        metrics.get(NeedsK)
