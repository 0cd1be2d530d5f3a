"""MLPClassifier.fit: gpubp.sklearn against scikit-learn's own, at the same settings.

Both fit ``hidden_layer_sizes=(256, 256)``, relu, ``solver="adam"``, ``batch_size=64``, 30 epochs
(``max_iter=30``, and ``n_iter_no_change`` past it so that neither stops early), no early
stopping, ``random_state=0``, on scikit-learn's 8x8 digits scaled to [0, 1] (1437 training and
360 test images, a stratified split), given the same arrays: float32, and float64 (scikit-learn's
default; each library computes in the type it is given). gpubp runs on the CPU (``device="cpu"``)
with its compiled kernels where Numba is installed. ``extra_info`` holds the test accuracy.

Each test times one fit, and the runs are interleaved: run 1 of gpubp, run 1 of scikit-learn,
then the other float type, then run 2, ..., so that a change in the machine's load reaches both
libraries alike. ``bench/sklearn_table.py`` gives each library's median over the runs, and the
ratio taken within each run as its median and range.

On a shared machine, time one thread's CPU time; on a quiet one, also the wall clock with every
core (the README's CPU tables explain why)::

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 python -m pytest bench/test_sklearn_fit.py \\
        --benchmark-timer time.process_time --benchmark-json bench/results/sklearn_fit_1thread.json
    python -m pytest bench/test_sklearn_fit.py --benchmark-json bench/results/sklearn_fit_all_cores.json
    python bench/sklearn_table.py bench/results/sklearn_fit_1thread.json bench/results/sklearn_fit_all_cores.json \\
        --markdown bench/results/sklearn_fit.md
"""

from __future__ import annotations

import warnings

import pytest

pytest.importorskip("pytest_benchmark")
sklearn = pytest.importorskip("sklearn")

from sklearn import neural_network  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

from gpubp import sklearn as gpubp_sklearn  # noqa: E402
from gpubp.backends import numpy_backend  # noqa: E402
from test_cpu_step import thread_info  # noqa: E402

RUNS = 5
DTYPES = ("float32", "float64")
LIBRARIES = {"gpubp": (gpubp_sklearn.MLPClassifier, {"device": "cpu"}),
             "scikit-learn": (neural_network.MLPClassifier, {})}
SETTINGS = dict(hidden_layer_sizes=(256, 256), activation="relu", solver="adam", batch_size=64, max_iter=30,
                n_iter_no_change=1000, early_stopping=False, random_state=0)
CASES = [(run, dtype, library) for run in range(1, RUNS + 1) for dtype in DTYPES for library in LIBRARIES]


@pytest.fixture(scope="module")
def digits() -> dict:
    """{dtype: (x_train, x_test)}, the labels, after one warm-up fit of each library and type
    (Numba compiles gpubp's kernels on first use)."""
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x / 16, y, test_size=0.2, stratify=y, random_state=0)
    arrays = {dtype: (x_train.astype(dtype), x_test.astype(dtype)) for dtype in DTYPES}
    for estimator, extra in LIBRARIES.values():
        for dtype in DTYPES:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                estimator(**{**SETTINGS, "max_iter": 1}, **extra).fit(arrays[dtype][0][:256], y_train[:256])
    return {"arrays": arrays, "y_train": y_train, "y_test": y_test}


@pytest.mark.parametrize("run, dtype, library", CASES, ids=[f"run{r}-{d}-{lib}" for r, d, lib in CASES])
def test_fit(benchmark, digits, run, dtype, library):
    estimator, extra = LIBRARIES[library]
    x_train, x_test = digits["arrays"][dtype]
    fitted = []

    def fit():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            fitted.append(estimator(**SETTINGS, **extra).fit(x_train, digits["y_train"]))

    benchmark.group = dtype
    benchmark.pedantic(fit, rounds=1, iterations=1)
    clf = fitted[-1]
    assert clf.n_iter_ == SETTINGS["max_iter"]
    benchmark.extra_info.update(library=library, dtype=dtype, run=run, epochs=clf.n_iter_,
                                test_accuracy=clf.score(x_test, digits["y_test"]),
                                scikit_learn_version=sklearn.__version__,
                                cpu_kernels=numpy_backend.cpu_kernels() if library == "gpubp" else None,
                                **thread_info())
