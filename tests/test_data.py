"""Datasets that need no network, and the seeded, optionally stratified train/test split."""

import re
import socket
import sys
from pathlib import Path

import numpy as np
import pytest

import gpubp as gb
from gpubp import _random, data


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn", reason="load_digits needs scikit-learn: pip install 'gpubp[demo]'")
    return data.load_digits()


def test_digits_are_1797_images_of_64_pixels_scaled_to_0_1(digits):
    x, y = digits
    assert x.shape == (1797, 64) and x.dtype == np.float32
    assert x.min() == 0.0 and x.max() == 1.0
    assert y.shape == (1797,) and y.dtype == np.int64
    assert set(np.unique(y)) == set(range(10))


def test_digits_load_with_the_network_blocked(monkeypatch):
    pytest.importorskip("sklearn", reason="load_digits needs scikit-learn: pip install 'gpubp[demo]'")

    def no_network(*args, **kwargs):
        raise OSError("network access in an offline test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    x, _ = data.load_digits()
    assert len(x) == 1797


def test_digits_without_scikit_learn_is_an_import_error_naming_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"load_digits needs scikit-learn.*pip install \"gpubp\[demo\]\"") as caught:
        data.load_digits()
    extra = re.search(r"gpubp\[(\w+)\]", str(caught.value)).group(1)
    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text(encoding="utf-8")
    requirements = re.search(rf"^{extra} = \[(.*?)\]", pyproject, re.M | re.S).group(1)
    assert '"scikit-learn' in requirements  # the extra the hint names installs it


def test_xor_is_the_four_points_and_their_exclusive_or():
    x, y = data.xor()
    assert x.dtype == np.float32 and y.dtype == np.float32 and y.shape == (4, 1)
    np.testing.assert_array_equal(y[:, 0], np.logical_xor(x[:, 0], x[:, 1]))
    assert {tuple(row) for row in x} == {(0, 0), (0, 1), (1, 0), (1, 1)}


def test_regression_has_the_asked_shape_and_inputs_in_minus_one_to_one():
    x, y = data.regression(n_samples=50, n_features=3, seed=0)
    assert x.shape == (50, 3) and y.shape == (50, 1)
    assert x.dtype == np.float32 and y.dtype == np.float32
    assert x.min() >= -1 and x.max() <= 1


def test_regression_with_a_seed_is_reproducible_and_seeds_differ():
    a, b, c = (data.regression(20, seed=s) for s in (1, 1, 2))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_regression_without_a_seed_follows_gb_seed():
    gb.seed(5)
    first = data.regression(10)
    gb.seed(5)
    np.testing.assert_array_equal(first[1], data.regression(10)[1])


def test_regression_noise_is_the_spread_around_the_clean_targets():
    _, clean = data.regression(200, noise=0.0, seed=4)
    _, noisy = data.regression(200, noise=0.1, seed=4)
    residual = noisy - clean
    assert residual.std() == pytest.approx(0.1, rel=0.2)


def test_regression_targets_follow_the_formula_its_docstring_gives():
    x, y = data.regression(200, 3, noise=0.0, seed=4)
    rng = np.random.default_rng(4)
    rng.uniform(-1, 1, (200, 3))  # x's draws, then a's and b's
    a, b = (rng.normal(0, 1, 3) / np.sqrt(3) for _ in range(2))
    xd = x.astype(np.float64)
    np.testing.assert_allclose(y[:, 0], np.sin(2 * xd @ a) + 0.5 * (xd @ b) ** 2, atol=1e-5)
    assert "y = sin(2 x @ a) + 0.5 (x @ b)^2 + noise" in data.regression.__doc__


def test_regression_rejects_a_non_positive_sample_count():
    with pytest.raises(ValueError, match="n_samples: expected a positive int, got 0"):
        data.regression(n_samples=0)


def labelled(n=100, classes=4):
    x = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
    return x, np.arange(n) % classes


def test_split_partitions_the_rows_in_sklearn_order():
    x, y = labelled()
    x_train, x_test, y_train, y_test = data.train_test_split(x, y, test_size=0.25, seed=0)
    assert len(x_test) == 25 and len(x_train) == 75
    rows = np.concatenate([x_train[:, 0], x_test[:, 0]])
    np.testing.assert_array_equal(np.sort(rows), x[:, 0])
    np.testing.assert_array_equal(y_train, (x_train[:, 0] // 2).astype(int) % 4)  # rows keep their labels


@pytest.mark.parametrize("n", [2, 3, 4, 7, 10, 99, 101])
@pytest.mark.parametrize("test_size", [0.1, 0.125, 0.25, 0.3, 0.5, 0.7, 0.9])
def test_split_sizes_are_scikit_learns(n, test_size):
    """ceil(test_size * N) test samples; an empty part is a ValueError on both sides."""
    model_selection = pytest.importorskip("sklearn.model_selection")
    x, y = labelled(n)
    try:
        expected = [len(part) for part in model_selection.train_test_split(x, y, test_size=test_size)[:2]]
    except ValueError:
        with pytest.raises(ValueError, match=rf"test_size: {test_size} of {n} samples leaves an empty split"):
            data.train_test_split(x, y, test_size=test_size, seed=0)
        return
    assert [len(part) for part in data.train_test_split(x, y, test_size=test_size, seed=0)[:2]] == expected


@pytest.mark.parametrize("x, y, error, message", [
    ((row for row in np.zeros((8, 2))), np.arange(8), TypeError, r"^x: expected an array of samples, got an iterator"),
    (np.zeros((8, 2)), None, TypeError, r"^y: expected an array of targets, got a NoneType"),
    (np.zeros((8, 2)), 3, TypeError, r"^y: expected an array with one row per sample, got int"),
    ([[0.0], [1.0, 2.0]] * 4, np.arange(8), ValueError, r"^x: expected an array of samples, got something NumPy "
                                                         r"cannot make one array of"),
])
def test_a_split_of_what_is_no_array_names_the_argument(x, y, error, message):
    with pytest.raises(error, match=message):
        data.train_test_split(x, y, seed=0)


def test_a_split_takes_a_torch_tensor_that_requires_grad_as_fit_does():
    torch = pytest.importorskip("torch")
    x = torch.arange(16.0).reshape(8, 2).requires_grad_()
    x_train, x_test, _, _ = data.train_test_split(x, np.arange(8), seed=0)
    np.testing.assert_array_equal(np.sort(np.concatenate([x_train, x_test])[:, 0]), np.arange(0, 16, 2))


@pytest.mark.parametrize("seed", [-1, 1.5, True, "0"])
def test_a_bad_split_seed_is_named(seed):
    x, y = labelled(10)
    with pytest.raises(ValueError, match="seed: expected None or an int >= 0"):
        data.train_test_split(x, y, seed=seed)


@pytest.mark.parametrize("seed", [-1, True, 1.5, "3"])
def test_a_bad_regression_seed_is_named(seed):
    with pytest.raises(ValueError, match=r"seed: expected None or an int >= 0"):
        data.regression(10, seed=seed)


@pytest.mark.parametrize("seed, error", [(-1, ValueError), (True, TypeError), (1.5, TypeError)])
def test_a_bad_library_seed_is_named_and_keeps_the_stream(seed, error):
    gb.seed(3)
    state = _random.get_state()
    with pytest.raises(error, match=r"^seed: expected an int"):
        gb.seed(seed)
    assert _random.get_state() == state


def test_split_with_a_seed_is_reproducible_and_seeds_differ():
    x, y = labelled()
    a, b, c = (data.train_test_split(x, y, seed=s) for s in (7, 7, 8))
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a[1], c[1])


def test_stratified_split_keeps_each_class_share():
    x = np.zeros((200, 1), np.float32)
    y = np.repeat([0, 1, 2], [120, 60, 20])
    _, _, y_train, y_test = data.train_test_split(x, y, test_size=0.25, seed=0, stratify=True)
    assert np.bincount(y_test).tolist() == [30, 15, 5]
    assert np.bincount(y_train).tolist() == [90, 45, 15]


@pytest.mark.parametrize("test_size", [0.2, 0.9])
def test_a_stratified_split_that_leaves_a_part_empty_raises(test_size):
    x = np.zeros((6, 2), np.float32)
    y = np.array([0, 0, 1, 1, 2, 2])  # 0.2 of 2 rounds to 0 test samples a class, 0.9 to 2
    with pytest.raises(ValueError, match=rf"test_size: {test_size} of each class \(rounded\) leaves an empty split"):
        data.train_test_split(x, y, test_size=test_size, seed=0, stratify=True)


@pytest.mark.parametrize("stratify, extra", [("False", ""), ([1], "; pass the labels as y"), (0.0, ""),
                                             (np.arange(10) % 2, "; pass the labels as y")],
                         ids=["string", "list", "float", "labels as in scikit-learn"])
def test_a_stratify_that_is_not_a_bool_is_a_type_error_naming_it(stratify, extra):
    """'False' and [1] stratified, 0.0 did not, and scikit-learn's stratify=y failed inside NumPy."""
    x, y = labelled(10, 2)
    with pytest.raises(TypeError, match=rf"^stratify: expected True or False, got \w+{re.escape(extra)}"):
        data.train_test_split(x, y, stratify=stratify)


def test_a_stratify_of_numpy_bool_is_a_bool():
    x, y = labelled(10, 2)
    for u, v in zip(data.train_test_split(x, y, seed=1, stratify=np.True_),
                    data.train_test_split(x, y, seed=1, stratify=True)):
        np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("test_size, stratify", [(0.95, False), (0.2, True)])
def test_a_refused_split_draws_nothing_from_the_library_stream(test_size, stratify):
    x = np.zeros((6, 2), np.float32)
    y = np.array([0, 0, 1, 1, 2, 2])
    gb.seed(3)
    state = _random.get_state()
    with pytest.raises(ValueError, match="test_size: .* leaves an empty split"):
        data.train_test_split(x, y, test_size=test_size, stratify=stratify)
    assert _random.get_state() == state


@pytest.mark.parametrize("test_size", [0, 1, 1.5, True])
def test_split_rejects_a_test_size_outside_0_1(test_size):
    x, y = labelled()
    with pytest.raises(ValueError, match=r"test_size: expected a float in \(0, 1\)"):
        data.train_test_split(x, y, test_size=test_size)


@pytest.mark.parametrize("test_size", [None, "0.2"])
def test_split_rejects_a_test_size_that_is_not_a_number(test_size):
    x, y = labelled()
    with pytest.raises(TypeError, match=r"test_size: expected a float in \(0, 1\), got (NoneType|str)"):
        data.train_test_split(x, y, test_size=test_size)


def test_a_stratified_split_of_one_hot_rows_names_y():
    x, y = labelled(10, 2)
    with pytest.raises(ValueError, match=r"y: stratify=True needs class labels of shape \(10,\), got shape "
                                         r"\(10, 2\); for one-hot rows pass y.argmax\(axis=1\)"):
        data.train_test_split(x, np.eye(2)[y], stratify=True)


def test_a_stratified_split_of_a_label_column_suggests_ravel_not_argmax():
    x, y = labelled(10, 2)  # argmax(axis=1) of one column is all zeros: a single class
    with pytest.raises(ValueError, match=r"got shape \(10, 1\); for a single column of labels pass y.ravel\(\)$"):
        data.train_test_split(x, y[:, None], stratify=True)


def test_split_rejects_x_and_y_of_different_lengths():
    x, y = labelled()
    with pytest.raises(ValueError, match="y: expected 100 rows to match x, got 99"):
        data.train_test_split(x, y[:99])
