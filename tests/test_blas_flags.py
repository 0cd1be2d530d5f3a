"""The NumPy backend's matrix and dot products do not turn the BLAS's floating-point flags into
warnings: a flag the BLAS sets from data it never uses once failed CI as "invalid value
encountered in matmul" on finite inputs. A real inf * 0 or overflow sets the same flag, so it
stands in for the spurious one here: the value reaches the result (NaN, inf), as on the GPU
backends, and no warning is raised. pytest's settings ignore that one message for the tests' own
reference products, so every test here turns warnings into errors itself."""

import warnings

import numpy as np
import pytest

import gpubp as gb
from gpubp.backends import numpy_backend as nb


@pytest.fixture(params=["context variable", "np.errstate"])
def warnings_are_errors(request, monkeypatch):
    """Every warning an error, with each of the backend's two ways of quieting its products: NumPy 2's
    error-state context variable, and ``np.errstate`` where that is missing (NumPy 1.x)."""
    if request.param == "np.errstate":
        monkeypatch.setattr(nb, "_error_state", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        before = np.geterr()
        yield
        assert np.geterr() == before, "a product left NumPy's error settings changed"


def inf_by_zero(batch: int, fan_in: int, fan_out: int, dtype):
    """x with an inf in column 0 and w with row 0 zero: x @ w has inf * 0 in every element."""
    x = np.ones((batch, fan_in), dtype)
    x[:, 0] = np.inf
    w = np.ones((fan_in, fan_out), dtype)
    w[0] = 0
    return x, w


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("fan_out", [1, 7])  # 1: NumPy's gemv, where CI saw the spurious flag
@pytest.mark.parametrize("act", ["identity", "relu", "tanh", "gelu"])  # gelu keeps z
def test_dense_forward_carries_inf_times_zero_as_nan_without_a_warning(warnings_are_errors, act, fan_out, dtype):
    x, w = inf_by_zero(3, 5, fan_out, dtype)
    y, _ = nb.dense_forward(x, w, np.zeros(fan_out, dtype), act)
    assert np.isnan(y).all()
    out = np.empty((3, fan_out), dtype)  # the layers' persistent buffers take the same path
    y, _ = nb.dense_forward(x, w, np.zeros(fan_out, dtype), act, out=out, out_z=np.empty_like(out))
    assert y is out and np.isnan(out).all()


@pytest.mark.parametrize("fan_out", [1, 7])
def test_dense_backward_carries_inf_times_zero_as_nan_without_a_warning(warnings_are_errors, fan_out):
    dy = np.ones((4, fan_out), np.float32)
    dy[0], dy[1] = np.inf, -np.inf  # db = inf - inf
    x = np.zeros((4, 5), np.float32)  # dw = x.T @ dy: inf * 0
    w = np.zeros((5, fan_out), np.float32)  # dx = dy @ w.T: inf * 0
    dx, dw, db = nb.dense_backward(dy, x, w, None, None, "identity", need_dx=True, need_dw=True)
    assert np.isnan(dx[:2]).all() and np.isnan(dw).all() and np.isnan(db).all()


def test_a_dot_product_that_overflows_gives_inf_without_a_warning(warnings_are_errors):
    big = np.full(8, 1e30, np.float32)
    assert nb.sumsq(big) == np.inf
    loss, _ = nb.mse(big[:, None], -big[:, None])
    assert loss == np.inf


def test_a_model_predicts_nan_for_an_inf_input_without_a_warning(warnings_are_errors):
    gb.seed(0)
    model = gb.Sequential([gb.Dense(5, 4, "tanh"), gb.Dense(4, 1)], backend="numpy")
    model.layers[0].weight.data[0] = 0
    x = np.ones((3, 5), np.float32)
    x[1, 0] = np.inf
    y = model.predict(x)
    assert np.isnan(y[1]).all() and np.isfinite(y[[0, 2]]).all()


def test_numpy_itself_still_warns_here(warnings_are_errors):
    """The check above could pass because the flags never reach NumPy on this machine; they do."""
    x, w = inf_by_zero(3, 5, 1, np.float32)
    with pytest.raises(RuntimeWarning, match="invalid value encountered in matmul"):
        np.matmul(x, w)


def test_numpy_2_products_take_the_fast_way():
    """np.errstate costs a small model's step 14%; the context variable 4%."""
    if int(np.__version__.split(".")[0]) < 2:
        pytest.skip(f"NumPy {np.__version__} has no error-state context variable")
    assert nb._error_state is not None
