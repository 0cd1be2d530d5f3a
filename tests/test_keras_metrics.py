"""Metric names as Keras spells them, each against its Keras definition written out here.

(Keras itself is not installed for these tests: it needs a backend framework; the
definitions below follow keras.metrics' documented formulas.)"""

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


def test_auc_of_logits_is_the_auc_of_their_sigmoid(rng):
    logits, y = rng.standard_normal((30, 1)) * 3, (rng.random(30) > 0.5).astype(np.float32)
    assert metrics.get("auc")[1](logits, y) == metrics.auc(1 / (1 + np.exp(-logits)), y)


def binary_model():
    gb.seed(5)
    return gb.Sequential([gb.Dense(3, 4, "relu"), gb.Dense(4, 1, "sigmoid")], device="cpu")


def test_evaluate_and_fit_take_keras_names_and_log_them_as_given(rng):
    x, y = rng.standard_normal((32, 3)).astype(np.float32), (rng.random(32) > 0.5).astype(np.float32)
    model = binary_model()
    names = ["binary_accuracy", "auc", "mean_absolute_error", "mean_squared_error"]
    history = model.fit(x, y, loss="binary_crossentropy", epochs=1, batch_size=8, validation_data=(x, y),
                        metrics=names, verbose=0)
    assert set(history.history) == {"loss", "val_loss", *(f"val_{name}" for name in names)}
    result = model.evaluate(x, y, loss="binary_crossentropy", metrics=names + ["accuracy", "mae"])
    probabilities = model.predict(x)
    assert result["binary_accuracy"] == result["accuracy"] == np.mean((probabilities[:, 0] > 0.5) == y)
    assert result["mean_absolute_error"] == result["mae"]
    assert result["auc"] == metrics.auc(probabilities, y)
