"""The Numba-CUDA backend matches the NumPy reference, kernel by kernel.

With no GPU, tests/conftest.py turns on Numba's CUDA simulator, so these kernels run for
real with every thread in Python: shapes stay tiny and are chosen not to be multiples of
the 64 x 64 x 16 tile. Agreement is max|numba - numpy| <= 1e-5 * max|numpy| in float32.
"""

import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

import gpubp as gb
from gpubp import backends
from gpubp.activations import ACTIVATIONS, NAMES, NEEDS_Z
from gpubp.backends import numpy_backend as ref
from gpubp.trace import trace

try:
    nb = backends.get("numba")
except RuntimeError as exc:
    pytest.skip(str(exc), allow_module_level=True)

RTOL = 1e-5

# (batch, in, out), each inside one 64 x 64 block but ragged against it and the 16-deep K slice.
ODD_SHAPES = [(19, 13, 7), (3, 33, 17), (1, 1, 1), (37, 29, 23)]
# (70, 20, 9): forward and dX span two row blocks; dW runs five K slices.
# (5, 70, 66): forward and dX span two column blocks over five K slices; dW runs a 2 x 2 grid,
# so db and the stored dz come from its first row tile only.
MULTI_BLOCK_SHAPES = [(70, 20, 9), (5, 70, 66)]
# Every activation on one shape; every shape with gelu, the one that also stores z;
# softmax (its row kernels around the identity ones) also across two column blocks.
DENSE_CASES = [(act, ODD_SHAPES[0]) for act in NAMES] + [
    ("gelu", shape) for shape in ODD_SHAPES[1:] + MULTI_BLOCK_SHAPES
] + [("softmax", MULTI_BLOCK_SHAPES[1])]
DENSE_IDS = [f"{act}-{'x'.join(map(str, shape))}" for act, shape in DENSE_CASES]


def host(a) -> np.ndarray:
    return nb.to_host(a)


def assert_matches(actual, expected, rtol=RTOL):
    """max|actual - expected| <= rtol * max|expected|; ``actual`` on the device or the host."""
    actual = host(actual) if nb.is_array(actual) else actual
    assert actual.shape == expected.shape
    assert actual.dtype == np.float32
    scale = max(float(np.abs(expected).max()), np.finfo(np.float32).tiny)
    err = float(np.abs(actual - expected).max()) / scale
    assert err <= rtol, f"relative error {err:.3g} > {rtol:g}"


def randn(rng, *shape) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32)


def dense_inputs(rng, batch, fan_in, fan_out):
    return randn(rng, batch, fan_in), randn(rng, fan_in, fan_out), randn(rng, fan_out)


def to_device(*arrays):
    return [nb.asarray(a) for a in arrays]


def y_and_z(act, y, z):
    """What dense_backward reads: z for gelu/gelu_tanh, y for the others (the other is None)."""
    return (None, z) if act in NEEDS_Z else (y, None)


# ----------------------------------------------------------------------------- dense layer


@pytest.mark.parametrize("act, shape", DENSE_CASES, ids=DENSE_IDS)
def test_dense_forward_matches_numpy(rng, act, shape):
    x, w, b = dense_inputs(rng, *shape)
    y_ref, z_ref = ref.dense_forward(x, w, b, act)
    with trace() as t:
        y, z = nb.dense_forward(*to_device(x, w, b), act)
    assert t.launches == ["dense_fwd"] + (["softmax_fwd"] if act == "softmax" else [])
    assert_matches(y, y_ref)
    if act in NEEDS_Z:
        assert_matches(z, z_ref)
    else:
        assert z is None


@pytest.mark.parametrize("act, shape", DENSE_CASES, ids=DENSE_IDS)
def test_dense_backward_matches_numpy(rng, act, shape):
    x, w, b = dense_inputs(rng, *shape)
    dy = randn(rng, shape[0], shape[2])
    y_ref, z_ref = ref.dense_forward(x, w, b, act)
    dx_ref, dw_ref, db_ref = ref.dense_backward(dy, x, w, *y_and_z(act, y_ref, z_ref), act, True, True)
    dy_dev, x_dev, w_dev, y_dev = to_device(dy, x, w, y_ref)
    z_dev = nb.asarray(z_ref) if act in NEEDS_Z else None
    with trace() as t:
        dx, dw, db = nb.dense_backward(dy_dev, x_dev, w_dev, *y_and_z(act, y_dev, z_dev), act, True, True)
    assert t.launches == nb.backward_kernels(act, True, True)
    assert_matches(dx, dx_ref)
    assert_matches(dw, dw_ref)
    assert_matches(db, db_ref)
    np.testing.assert_array_equal(host(dy_dev), dy)


@pytest.mark.parametrize("need_dx, need_dw", [(True, False), (False, True), (False, False)])
def test_dense_backward_launches_only_the_kernels_it_needs(rng, need_dx, need_dw):
    act, (batch, fan_in, fan_out) = "gelu", ODD_SHAPES[0]
    x, w, b = dense_inputs(rng, batch, fan_in, fan_out)
    dy = randn(rng, batch, fan_out)
    _, z_ref = ref.dense_forward(x, w, b, act)
    dx_ref, dw_ref, db_ref = ref.dense_backward(dy, x, w, None, z_ref, act, True, True)
    dy_dev, w_dev, z_dev = to_device(dy, w, z_ref)
    # A frozen layer's input is not kept, so x is None whenever dW is not needed.
    x_dev = nb.asarray(x) if need_dw else None
    with trace() as t:
        dx, dw, db = nb.dense_backward(dy_dev, x_dev, w_dev, None, z_dev, act, need_dx, need_dw)
    assert t.counts == Counter(nb.backward_kernels(act, need_dx, need_dw))
    assert t.launches == nb.backward_kernels(act, need_dx, need_dw)
    if need_dx:
        assert_matches(dx, dx_ref)
    else:
        assert dx is None
    if need_dw:
        assert_matches(dw, dw_ref)
        assert_matches(db, db_ref)
    else:
        assert dw is None and db is None


def test_dense_writes_into_the_buffers_it_is_given(rng):
    act, (batch, fan_in, fan_out) = "gelu_tanh", ODD_SHAPES[0]
    x, w, b = dense_inputs(rng, batch, fan_in, fan_out)
    dy = randn(rng, batch, fan_out)
    y_ref, z_ref = ref.dense_forward(x, w, b, act)
    dx_ref, dw_ref, db_ref = ref.dense_backward(dy, x, w, None, z_ref, act, True, True)
    out, out_z, out_dx, out_dw = (nb.empty(s) for s in [dy.shape, dy.shape, x.shape, w.shape])
    out_db = nb.empty(b.shape)
    x_dev, w_dev, b_dev, dy_dev = to_device(x, w, b, dy)
    y, z = nb.dense_forward(x_dev, w_dev, b_dev, act, out, out_z)
    dx, dw, db = nb.dense_backward(dy_dev, x_dev, w_dev, None, z, act, True, True, out_dx, out_dw, out_db)
    assert all(got is given for got, given in zip((y, z, dx, dw, db), (out, out_z, out_dx, out_dw, out_db)))
    for actual, expected in [(y, y_ref), (z, z_ref), (dx, dx_ref), (dw, dw_ref), (db, db_ref)]:
        assert_matches(actual, expected)


# 1e20 squares past float32's range; the largest float32 doubles past it.
LARGE_PREACTIVATIONS = np.array(
    [[1e4], [-1e4], [1e20], [-1e20], [np.finfo(np.float32).max], [np.finfo(np.float32).min], [30.0], [-30.0],
     [0.5], [0.0]], np.float32)


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_activation_and_its_derivative_are_stable_at_large_preactivations(rng, act):
    # x (n, 1) @ [[1]] + 0 makes z = x exactly, so y = act(z) and dx = dy * act'(z): elementwise.
    x = LARGE_PREACTIVATIONS
    w = np.ones((1, 1), np.float32)
    b = np.zeros(1, np.float32)
    dy = randn(rng, len(x), 1)
    y_ref, z_ref = ref.dense_forward(x, w, b, act)
    dx_ref, _, _ = ref.dense_backward(dy, x, w, *y_and_z(act, y_ref, z_ref), act, True, False)
    x_dev, w_dev, b_dev, dy_dev = to_device(x, w, b, dy)
    y, z = nb.dense_forward(x_dev, w_dev, b_dev, act)
    # need_dw=False: the dX kernel forms dz from dy and y (or z) as it loads its tiles.
    dx, _, _ = nb.dense_backward(dy_dev, None, w_dev, *y_and_z(act, y, z), act, True, False)
    for actual, expected in [(host(y), y_ref), (host(dx), dx_ref)]:
        assert np.isfinite(actual).all()
        np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=1e-6)


# Grid limits of every CUDA device since compute capability 3.0 (programming guide, "Features
# and Technical Specifications"): 2^31 - 1 blocks along x, 65535 along y.
MAX_GRID_X = 2**31 - 1
MAX_GRID_Y = 65535


@pytest.mark.parametrize("batch", [4_194_240, 4_194_241, 100_000_000])
def test_the_dense_grid_puts_the_batch_on_x_so_any_batch_launches(batch):
    """forward tiles a (batch, out) result, dX a (batch, in) one; 4,194,240 = 65535 x 64."""
    for rows, cols in [(batch, 10), (batch, 1024)]:
        grid_x, grid_y = nb.tile_grid(rows, cols)
        assert grid_x * nb.BLOCK_M >= rows
        assert grid_x <= MAX_GRID_X and grid_y <= MAX_GRID_Y


def test_the_dense_grid_covers_every_element_with_whole_tiles():
    for rows, cols in [(1, 1), (64, 64), (65, 64), (64, 129)]:
        grid_x, grid_y = nb.tile_grid(rows, cols)
        assert (grid_x - 1) * nb.BLOCK_M < rows <= grid_x * nb.BLOCK_M
        assert (grid_y - 1) * nb.BLOCK_N < cols <= grid_y * nb.BLOCK_N


def test_backward_kernels_names_what_dense_backward_launches():
    assert nb.backward_kernels("relu", True, True) == ["dense_dw", "dense_dx"]
    assert nb.backward_kernels("relu", False, True) == ["dense_dw"]
    assert nb.backward_kernels("relu", True, False) == ["dense_dx"]
    assert nb.backward_kernels("relu", False, False) == []
    assert nb.backward_kernels("softmax", True, True) == ["softmax_bwd", "dense_dw", "dense_dx"]
    assert nb.backward_kernels("softmax", False, False) == []


def test_softmax_is_stable_and_its_backward_may_overwrite_dy(rng):
    z = np.array([[1e4, 0.0, -1e4], [30.0, 30.0, 29.0], [-50.0, -60.0, -70.0]], np.float32)
    y_ref = z.copy()
    ref.softmax_(y_ref)
    y = nb.asarray(z)
    nb.softmax_(y)
    assert_matches(y, y_ref)
    dy = randn(rng, 3, 3)
    dz_ref = ref.softmax_backward(dy, y_ref, np.empty_like(dy))
    dy_dev = nb.asarray(dy)
    assert nb.softmax_backward(dy_dev, y, dy_dev) is dy_dev
    assert_matches(dy_dev, dz_ref)


# ----------------------------------------------------------------------------- losses


def ce_inputs(rng, batch, classes, label_dtype=np.int64, scale=1.0):
    logits = randn(rng, batch, classes) * np.float32(scale)
    return logits, rng.integers(0, classes, batch).astype(label_dtype)


def mse_inputs(rng, *shape):
    return randn(rng, *shape), randn(rng, *shape)


def bce_inputs(rng, *shape):
    logits = randn(rng, *shape) * np.float32(3.0)
    logits.flat[:2] = [1e4, -1e4]
    return logits, rng.random(shape, dtype=np.float32)


LOSS_CASES = [
    # (backend function, trace name, inputs)
    ("softmax_cross_entropy", "ce_fwd_bwd", lambda rng: ce_inputs(rng, 19, 7)),
    # C > 32 lanes per row, int32 labels
    ("softmax_cross_entropy", "ce_fwd_bwd", lambda rng: ce_inputs(rng, 3, 33, np.int32)),
    # logits ~ 1e4: the online max keeps exp in range
    ("softmax_cross_entropy", "ce_fwd_bwd", lambda rng: ce_inputs(rng, 9, 5, scale=1e4)),
    ("softmax_cross_entropy", "ce_fwd_bwd", lambda rng: ce_inputs(rng, 1, 1)),
    ("mse", "mse_fwd_bwd", lambda rng: mse_inputs(rng, 19, 7)),
    # 276 elements: two reduction blocks
    ("mse", "mse_fwd_bwd", lambda rng: mse_inputs(rng, 23, 12)),
    ("bce", "bce_fwd_bwd", lambda rng: bce_inputs(rng, 19, 7)),
    ("bce", "bce_fwd_bwd", lambda rng: bce_inputs(rng, 1, 2)),
]


@pytest.mark.parametrize(
    "loss_name, kernel_name, make_inputs", LOSS_CASES,
    ids=["ce-19x7", "ce-3x33-int32", "ce-large-logits", "ce-1x1", "mse-19x7", "mse-23x12", "bce-19x7", "bce-1x2"],
)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_loss_matches_numpy(rng, loss_name, kernel_name, make_inputs, weighted):
    prediction, target = make_inputs(rng)
    weights = rng.uniform(0, 2, len(prediction)).astype(np.float32) if weighted else None
    loss_ref, grad_ref = getattr(ref, loss_name)(prediction, target, weights)
    with trace() as t:
        loss, grad = getattr(nb, loss_name)(*to_device(prediction, target), *to_device(weights) if weighted else ())
    assert t.launches == [kernel_name]
    assert isinstance(loss, float)
    assert abs(loss - loss_ref) <= RTOL * max(abs(loss_ref), 1.0)
    assert_matches(grad, grad_ref)


# ----------------------------------------------------------------------------- optimizers

PARAM_SHAPE = (19, 13)
STEPS = 3


def optimizer_state(rng, *names):
    """A parameter, its gradients for STEPS steps, and zeroed state buffers, as host arrays."""
    param = randn(rng, *PARAM_SHAPE)
    grads = [randn(rng, *PARAM_SHAPE) for _ in range(STEPS)]
    return param, grads, {name: np.zeros(PARAM_SHAPE, np.float32) for name in names}


@pytest.mark.parametrize(
    "momentum, nesterov, weight_decay",
    [(0.0, False, 0.0), (0.0, False, 1e-2), (0.9, False, 0.0), (0.9, True, 1e-2)],
    ids=["plain", "weight-decay", "momentum", "nesterov-weight-decay"],
)
def test_sgd_update_matches_numpy(rng, momentum, nesterov, weight_decay):
    param, grads, state = optimizer_state(rng, "velocity")
    velocity = state["velocity"] if momentum else None
    param_dev = nb.asarray(param)
    velocity_dev = nb.asarray(velocity) if momentum else None
    with trace() as t:
        for grad in grads:
            ref.sgd_update(param, grad, velocity, 0.1, momentum, nesterov, weight_decay)
            nb.sgd_update(param_dev, nb.asarray(grad), velocity_dev, 0.1, momentum, nesterov, weight_decay)
    assert t.counts["sgd_update"] == 2 * STEPS
    assert_matches(param_dev, param)
    if momentum:
        assert_matches(velocity_dev, velocity)


@pytest.mark.parametrize(
    "weight_decay, decoupled", [(0.0, False), (1e-2, False), (1e-2, True)], ids=["adam", "adam-l2", "adamw"]
)
def test_adam_update_matches_numpy(rng, weight_decay, decoupled):
    param, grads, state = optimizer_state(rng, "m", "v")
    param_dev, m_dev, v_dev = to_device(param, state["m"], state["v"])
    with trace() as t:
        for step, grad in enumerate(grads, start=1):
            args = (1e-2, 0.9, 0.999, 1e-8, weight_decay, step, decoupled)
            ref.adam_update(param, grad, state["m"], state["v"], *args)
            nb.adam_update(param_dev, nb.asarray(grad), m_dev, v_dev, *args)
    assert t.counts["adam_update"] == 2 * STEPS
    for actual, expected in [(param_dev, param), (m_dev, state["m"]), (v_dev, state["v"])]:
        assert_matches(actual, expected)


# ----------------------------------------------------------------------------- helpers


def test_sumsq_matches_numpy_across_reduction_blocks(rng):
    a = randn(rng, 23, 12)
    assert nb.sumsq(nb.asarray(a)) == pytest.approx(ref.sumsq(a), rel=RTOL)


def test_scale_multiplies_in_place(rng):
    a = randn(rng, 19, 13)
    a_dev = nb.asarray(a)
    nb.scale_(a_dev, 0.25)
    ref.scale_(a, 0.25)
    assert_matches(a_dev, a)


def test_array_helpers_round_trip(rng):
    a = randn(rng, 3, 4)
    a_dev = nb.asarray(a)
    assert nb.is_array(a_dev) and not nb.is_array(a)
    assert nb.asarray(a_dev) is a_dev
    np.testing.assert_array_equal(host(a_dev), a)
    np.testing.assert_array_equal(host(nb.asarray(a.astype(np.float64), np.float32)), a)
    np.testing.assert_array_equal(host(nb.zeros((2, 5))), np.zeros((2, 5), np.float32))
    assert tuple(nb.empty((2, 5)).shape) == (2, 5) and nb.empty((2, 5)).dtype == np.float32
    nb.synchronize()


def test_backend_reports_itself_available_here():
    assert nb.unavailable_reason() is None
    assert (nb.NAME, nb.DEVICE, nb.DTYPES) == ("numba", "cuda", (np.float32,))


# ----------------------------------------------------------------------------- whole model


def test_model_on_numba_trains_like_the_numpy_model(rng):
    x = randn(rng, 9, 5)
    labels = rng.integers(0, 3, 9)
    numpy_model = gb.Sequential([gb.Dense(5, 7, activation="tanh"), gb.Dense(7, 3)], backend="numpy")
    numba_model = gb.Sequential([gb.Dense(5, 7, activation="tanh"), gb.Dense(7, 3)], backend="numba")
    numba_model.set_weights(numpy_model.get_weights())
    trajectories = []
    for model in (numpy_model, numba_model):
        optimizer = gb.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        losses = []
        for _ in range(3):
            loss, dout = gb.losses.cross_entropy(model.forward(x), labels)
            model.backward(dout)
            optimizer.step()
            model.zero_grad()
            losses.append(loss)
        trajectories.append(losses)
    np.testing.assert_allclose(trajectories[1], trajectories[0], rtol=RTOL)
    assert trajectories[1][-1] < trajectories[1][0]
    for got, expected in zip(numba_model.get_weights(), numpy_model.get_weights()):
        assert_matches(got, expected)


# ----------------------------------------------------------------------------- real compiler

# Runs with the simulator off: compile_ptx needs libNVVM but no GPU.
COMPILE_SCRIPT = """
import json
from numba import cuda
from numba.cuda import types
from numba.cuda.cudadrv import nvvm
if not nvvm.is_available():
    print(json.dumps({"skip": "libNVVM (the CUDA toolkit's compiler library) is not installed"}))
    raise SystemExit
from gpubp.backends import numba_backend as nb
f32, i64, flag = types.float32, types.int64, types.boolean
v, m = types.Array(f32, 1, "C"), types.Array(f32, 2, "C")
labels = types.Array(i64, 1, "C")
returns, float64_ops = {}, {}
for name, fn in [*nb._FORWARD.items(), *(("d" + n, g) for n, g in nb._GRAD.items())]:
    ptx, returns[name] = cuda.compile_ptx(fn.py_func, (f32,), device=True, cc=(9, 0))
    float64_ops[name] = ptx.count(".f64")
kernels = {
    "dense_fwd": (nb._dense_forward_kernel("gelu"), (m, m, v, m, m)),
    "dense_dw": (nb._dense_dw_kernel("gelu", True), (m, m, m, m, v, m)),
    "dense_dx": (nb._dense_dx_kernel("gelu"), (m, m, m, m)),
    "softmax_fwd": (nb._softmax_kernel, (m,)),
    "softmax_bwd": (nb._softmax_backward_kernel, (m, m, m)),
    "ce_fwd_bwd": (nb._softmax_cross_entropy_kernel, (m, labels, v, m, v, f32)),
    "mse_fwd_bwd": (nb._mse_kernel, (v, v, v, i64, v, v, f32)),
    "bce_fwd_bwd": (nb._bce_kernel, (v, v, v, i64, v, v, f32)),
    "sumsq": (nb._sumsq_kernel, (v, v)),
    "scale_": (nb._scale_kernel, (v, f32)),
    "sgd_update": (nb._sgd_kernel, (v, v, f32, f32)),
    "sgd_update_momentum": (nb._sgd_momentum_kernel, (v, v, v, f32, f32, flag, f32)),
    "adam_update": (nb._adam_kernel, (v, v, v, v) + (f32,) * 9),
}
for name, (kernel, signature) in kernels.items():
    ptx, _ = cuda.compile_ptx(kernel.py_func, signature, cc=(9, 0))
    float64_ops[name] = ptx.count(".f64")
print(json.dumps({"returns": {k: str(t) for k, t in returns.items()}, "float64_ops": float64_ops}))
"""


@pytest.mark.slow
def test_every_kernel_compiles_to_ptx_with_float32_math_only():
    """The simulator runs kernels as Python, so Numba never types them there. Compile them
    with the real toolchain: every activation (forward and derivative) must return float32,
    and no kernel may contain a float64 instruction (an untyped constant would add some)."""
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "0"}
    done = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    if "skip" in report:
        pytest.skip(report["skip"])
    not_float32 = {name: t for name, t in report["returns"].items() if t != "float32"}
    assert not not_float32, f"activations returning another type than float32: {not_float32}"
    float64_ops = {name: n for name, n in report["float64_ops"].items() if n}
    assert not float64_ops, f"float64 instructions per kernel: {float64_ops}"
