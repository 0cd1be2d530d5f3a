"""Every backend refuses an operand of the wrong shape, a mask on a softmax layer, and an output
over an input it reads after writing that output, before anything is launched; the NumPy backend
also refuses a label that is not a class (a host check, which a GPU backend would wait for).

The GPU kernels index flat memory with sizes taken from some operands and trust the others to
match, so a backend function called directly (as benchmarks, custom layers and the gradient
checker do) with an ``out`` buffer a row short would write past its end, and a gradient or a
label vector too short would be read past theirs. Each case here passes one such operand and
expects a ValueError naming it, no kernel launched, and every array left as it was. The CuPy
backend runs on the CPU kernel harness (its kernels would run there, and on a GPU), the Numba
backend in the simulator where there is no GPU.
"""

import contextlib

import numpy as np
import pytest

from gpubp import backends, philox
from gpubp.trace import trace

B, IN, OUT = 5, 3, 4


def _numba():
    try:
        return backends.get("numba")
    except RuntimeError as exc:
        pytest.skip(str(exc))


def _cupy_on_cpu(monkeypatch):
    from cuda_on_cpu import harness

    from gpubp.backends import cupy_backend

    # No kernel is compiled: every case is refused before the backend looks one up.
    monkeypatch.setattr(cupy_backend, "cupy", harness.cupy_shim(harness.Harness()))
    for cache in harness.BACKEND_CACHES:
        monkeypatch.setattr(cupy_backend, cache, {})
    return cupy_backend


@pytest.fixture(params=["numpy", "numba", "cupy"])
def be(request, monkeypatch):
    if request.param == "numpy":
        return backends.get("numpy")
    if request.param == "numba":
        return _numba()
    return _cupy_on_cpu(monkeypatch)


def arrays(be, *shapes, dtype=np.float32):
    rng = np.random.default_rng(0)
    return [be.asarray(rng.standard_normal(shape).astype(dtype)) for shape in shapes]


def refused(be, name, call, *watched, why="expected "):
    """``call()`` raises a ValueError naming ``name`` (then ``why``), launches nothing, and leaves
    ``watched`` as they were."""
    before = [be.to_host(a).copy() for a in watched]
    with trace() as t, pytest.raises(ValueError, match=rf"^{name}: {why}"):
        call()
    assert t.total == 0, f"launched before refusing: {dict(t.counts)}"
    for a, old in zip(watched, before):
        np.testing.assert_array_equal(be.to_host(a), old)


@pytest.mark.parametrize("wrong", ["x", "w", "b", "out", "out_z"])
def test_dense_forward_refuses_a_mis_shaped_operand(be, wrong):
    shapes = {"x": (B, IN), "w": (IN, OUT), "b": (OUT,), "out": (B, OUT), "out_z": (B, OUT)}
    shapes[wrong] = {"x": (IN,), "w": (IN + 1, OUT), "b": (OUT + 1,), "out": (B - 1, OUT), "out_z": (B, OUT - 1)}[wrong]
    ops = dict(zip(shapes, arrays(be, *shapes.values())))
    refused(be, wrong, lambda: be.dense_forward(ops["x"], ops["w"], ops["b"], "gelu", out=ops["out"],
                                                out_z=ops["out_z"]), ops["out"], ops["out_z"])


@pytest.mark.parametrize("wrong", ["w", "x", "y", "out_dx", "out_dw", "out_db"])
def test_dense_backward_refuses_a_mis_shaped_operand(be, wrong):
    shapes = {"dy": (B, OUT), "x": (B, IN), "w": (IN, OUT), "y": (B, OUT), "out_dx": (B, IN), "out_dw": (IN, OUT),
              "out_db": (OUT,)}
    shapes[wrong] = {"w": (IN, OUT + 1), "x": (B + 1, IN), "y": (B, OUT + 2), "out_dx": (B, IN - 1),
                     "out_dw": (OUT, IN), "out_db": (OUT - 1,)}[wrong]
    ops = dict(zip(shapes, arrays(be, *shapes.values())))
    refused(be, wrong, lambda: be.dense_backward(ops["dy"], ops["x"], ops["w"], ops["y"], None, "relu", True, True,
                                                 out_dx=ops["out_dx"], out_dw=ops["out_dw"], out_db=ops["out_db"]),
            ops["out_dx"], ops["out_dw"], ops["out_db"])


def test_the_dx_kernels_activation_below_must_match_dx(be):
    if be.NAME == "numpy":
        pytest.skip("the NumPy backend has no FOLDS_DX_ACT capability (no dx_act_in)")
    dy, x, w, y, out_dx, act_in = arrays(be, (B, OUT), (B, IN), (IN, OUT), (B, OUT), (B, IN), (B - 1, IN))
    refused(be, "dx_act_in", lambda: be.dense_backward(dy, x, w, y, None, "relu", True, False, out_dx=out_dx,
                                                       dx_act="relu", dx_act_in=act_in), out_dx)


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_a_softmax_layer_takes_no_dropout_mask(be, direction):
    """Its backward would need the unmasked probabilities, which the masked output has lost where
    the mask dropped (the layers and the torch bridge refuse the Dropout for the same reason)."""
    x, w, b, dy, y = arrays(be, (B, IN), (IN, OUT), (OUT,), (B, OUT), (B, OUT))
    mask = philox.Mask(be.asarray(np.array([1, 2], np.uint32)), *philox.mask_constants(0.5))
    call = {"forward": lambda: be.dense_forward(x, w, b, "softmax", out=y, dropout=mask),
            "backward": lambda: be.dense_backward(dy, x, w, y, None, "softmax", True, True, dropout=mask)}[direction]
    refused(be, "dropout", call, y, why="a Dropout after a softmax is not supported")


def test_softmax_backward_refuses_an_out_of_another_shape(be):
    dy, y, out = arrays(be, (B, OUT), (B, OUT), (B - 1, OUT))
    refused(be, "out", lambda: be.softmax_backward(dy, y, out), out)


@pytest.mark.parametrize("direction", ["dropout_forward", "dropout_backward"])
def test_a_dropout_refuses_an_out_of_another_shape(be, direction):
    src, out = arrays(be, (B, OUT), (B, OUT + 1))
    mask = philox.Mask(be.asarray(np.array([1, 2], np.uint32)), *philox.mask_constants(0.5))
    refused(be, "out", lambda: getattr(be, direction)(src, mask, out=out), out)


@pytest.mark.parametrize("wrong", ["labels", "sample_weight"])
def test_cross_entropy_refuses_labels_or_weights_not_one_per_row(be, wrong):
    (logits,) = arrays(be, (B, OUT))
    labels = be.asarray(np.arange(B - (wrong == "labels")) % OUT)
    (weights,) = arrays(be, (B - (wrong == "sample_weight"),))
    refused(be, wrong, lambda: be.softmax_cross_entropy(logits, labels, sample_weight=weights), logits)


@pytest.mark.parametrize("loss", ["mse", "mae", "huber", "bce", "poisson"])
@pytest.mark.parametrize("wrong", ["target", "sample_weight"])
def test_elementwise_losses_refuse_a_target_or_weights_of_another_shape(be, loss, wrong):
    pred, target, weights = arrays(be, (B, OUT), (B, OUT + (wrong == "target")), (B + (wrong == "sample_weight"),))
    refused(be, wrong, lambda: getattr(be, loss)(pred, target, weights), pred)


def test_a_weighted_loss_refuses_predictions_that_are_not_a_row_per_sample(be):
    pred, target, weights = arrays(be, (B,), (B,), (B,))
    refused(be, "pred", lambda: be.mse(pred, target, weights), pred)


def test_cross_entropy_refuses_logits_that_are_not_a_row_per_sample(be):
    (logits,) = arrays(be, (B,))
    refused(be, "logits", lambda: be.softmax_cross_entropy(logits, be.asarray(np.zeros(B, np.int64))), logits)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.bool_])
def test_cross_entropy_refuses_labels_that_are_not_integers_as_numpy_does(be, dtype):
    """The NumPy backend's TypeError, from the labels' dtype alone (no device read): CuPy's cast
    float labels to int (1.7 read as class 1), Numba's failed inside its kernel."""
    (logits,) = arrays(be, (B, OUT))
    classes = np.arange(B) % OUT
    labels = be.asarray(classes.astype(dtype) if dtype is np.bool_ else (classes + 0.7).astype(dtype))
    before = be.to_host(logits).copy()
    with trace() as t, pytest.raises(TypeError, match=rf"^labels: expected integer class indices, got dtype "
                                                      rf"{np.dtype(dtype)}$"):
        be.softmax_cross_entropy(logits, labels)
    assert t.total == 0, f"launched before refusing: {dict(t.counts)}"
    np.testing.assert_array_equal(be.to_host(logits), before)


UPDATES = {
    "sgd": lambda be, p, g, s: be.sgd_update(p, g, s[0], 0.1, 0.9, False, 0.0),
    "adam": lambda be, p, g, s: be.adam_update(p, g, s[0], s[1], 1e-3, 0.9, 0.999, 1e-8, 0.0, 1, False),
    "rmsprop": lambda be, p, g, s: be.rmsprop_update(p, g, s[0], s[1], s[2], 1e-2, 0.99, 1e-8, 0.0, 0.9, True),
}
STATE_NAMES = {"sgd": ["velocity"], "adam": ["m", "v"], "rmsprop": ["square_avg", "grad_avg", "momentum_buffer"]}


@pytest.mark.parametrize(("optimizer", "wrong"), [(o, i) for o in sorted(UPDATES) for i in range(1 + len(STATE_NAMES[o]))])
def test_an_update_refuses_a_gradient_or_state_unlike_its_parameter(be, optimizer, wrong):
    names = ["grad", *STATE_NAMES[optimizer]]
    param, *rest = arrays(be, (IN, OUT), *[(IN, OUT - 1) if i == wrong else (IN, OUT) for i in range(len(names))])
    refused(be, names[wrong], lambda: UPDATES[optimizer](be, param, rest[0], rest[1:]), param, *rest)


# The state each option reads and writes, left out: (optimizer, the missing array, the call with
# state s = [square_avg / m / velocity, ...] and that array None).
MISSING_STATE = {
    "sgd_momentum_velocity": ("velocity", lambda be, p, g, s: be.sgd_update(p, g, None, 0.1, 0.9, False, 0.0)),
    "sgd_nesterov_velocity": ("velocity", lambda be, p, g, s: be.sgd_update(p, g, None, 0.1, 0.9, True, 0.01)),
    "adam_m": ("m", lambda be, p, g, s: be.adam_update(p, g, None, s[1], 1e-3, 0.9, 0.999, 1e-8, 0.0, 1, False)),
    "adamw_v": ("v", lambda be, p, g, s: be.adam_update(p, g, s[0], None, 1e-3, 0.9, 0.999, 1e-8, 0.01, 1, True)),
    "rmsprop_square_avg": ("square_avg", lambda be, p, g, s: be.rmsprop_update(p, g, None, None, None, 1e-2, 0.99, 1e-8,
                                                                              0.0, 0.0, False)),
    "rmsprop_centered_grad_avg": ("grad_avg", lambda be, p, g, s: be.rmsprop_update(p, g, s[0], None, None, 1e-2, 0.99,
                                                                                   1e-8, 0.0, 0.0, True)),
    "rmsprop_momentum_buffer": ("momentum_buffer", lambda be, p, g, s: be.rmsprop_update(p, g, s[0], s[1], None, 1e-2,
                                                                                        0.99, 1e-8, 0.0, 0.9, True)),
}


@pytest.mark.parametrize("case", MISSING_STATE)
def test_an_update_refuses_state_its_options_need_given_as_none(be, case):
    """A GPU backend stood another array in for the missing one (CuPy the parameter: with momentum
    the velocity was written into it; Numba the square average, or failed inside Numba), and the
    NumPy backend's compiled update the gradient, which it overwrote."""
    name, call = MISSING_STATE[case]
    param, grad, *state = arrays(be, (IN, OUT), (IN, OUT), (IN, OUT), (IN, OUT))
    refused(be, name, lambda: call(be, param, grad, state), param, grad, *state, why="expected an array, got None")


# ----------------------------------------------------------------------------- the CuPy backend's own


@pytest.fixture
def cb(monkeypatch):
    return _cupy_on_cpu(monkeypatch)


def test_a_multi_tensor_update_refuses_a_tuple_whose_buffers_differ_in_shape(cb):
    good = arrays(cb, (IN, OUT), (IN, OUT), (IN, OUT))
    bad = arrays(cb, (OUT,), (OUT,), (OUT + 1,))
    refused(cb, r"tensors\[1\] \(velocity\)", lambda: cb.sgd_update_many([good, bad], 0.1, 0.9, False, 0.0),
            *good, *bad)


@pytest.mark.parametrize("wrong", ["weights[1]", "biases[0]", "x"])
def test_the_fused_forward_refuses_a_chain_that_does_not_connect(cb, wrong):
    x, w0, w1, b0, b1 = arrays(cb, (B, IN + (wrong == "x")), (IN, OUT), (OUT + (wrong == "weights[1]"), 2), (OUT,),
                               (2 + (wrong == "biases[0]"),))
    if wrong == "biases[0]":
        b0, b1 = b1, b0
    name = "weights[0]" if wrong == "x" else wrong  # an x of the wrong width leaves weights[0] unconnected
    refused(cb, name.replace("[", r"\[").replace("]", r"\]"),
            lambda: cb.fused_mlp_forward(x, [w0, w1], [b0, b1], ["relu", "identity"], [True, True], [True, True]))


@pytest.mark.parametrize("wrong", ["dy", "out_dw[0]", "out_db[1]", "inputs[1]"])
def test_the_fused_backward_refuses_a_buffer_of_another_shape(cb, wrong):
    dy, w0, w1, x, h, h0, dw0, dw1, db0, db1 = arrays(
        cb, (B, 2 + (wrong == "dy")), (IN, OUT), (OUT, 2), (B, IN), (B + (wrong == "inputs[1]"), OUT), (B, OUT),
        (OUT if wrong == "out_dw[0]" else IN, OUT), (OUT, 2), (OUT,), (2 - (wrong == "out_db[1]"),))
    refused(cb, wrong.replace("[", r"\[").replace("]", r"\]"),
            lambda: cb.fused_mlp_backward(dy, [w0, w1], ["relu", "identity"], [x, h], [h0, None], [False, True],
                                          [True, True], [dw0, dw1], [db0, db1]), dw0, dw1, db0, db1)


# A fused backward missing an array it reads or writes: (name, acts, need_dx, need_dw, need_db,
# which entry of inputs / act_inputs / out_dw / out_db is None). The CuPy backend handed the
# kernels dy in that slot: a dW from dy's floats, act' of them, or dW written past dy's end.
FUSED_MISSING = {
    "inputs[0]": (["relu", "identity"], [False, True], [True, True], None, ("inputs", 0)),
    "act_inputs[0]": (["relu", "identity"], [False, True], [True, True], None, ("act_inputs", 0)),
    "out_dw[0]": (["relu", "identity"], [False, True], [True, True], None, ("out_dw", 0)),
    "out_db[0]": (["relu", "identity"], [False, True], [True, True], None, ("out_db", 0)),
    "out_db[0]_bias_alone": (["relu", "identity"], [False, True], [False, True], [True, True], ("out_db", 0)),
    "act_inputs[1]_softmax": (["relu", "softmax"], [False, True], [False, True], None, ("act_inputs", 1)),
    "act_inputs[0]_dx_only": (["tanh", "identity"], [True, True], [False, True], None, ("act_inputs", 0)),
}


@pytest.mark.parametrize("case", FUSED_MISSING)
def test_the_fused_backward_refuses_a_missing_array_a_layer_reads_or_writes(cb, case):
    acts, need_dx, need_dw, need_db, (which, layer) = FUSED_MISSING[case]
    dy, w0, w1, x, h, h0, y, dw0, dw1, db0, db1 = arrays(cb, (B, 2), (IN, OUT), (OUT, 2), (B, IN), (B, OUT), (B, OUT),
                                                         (B, 2), (IN, OUT), (OUT, 2), (OUT,), (2,))
    given = {"inputs": [x, h], "act_inputs": [h0, y], "out_dw": [dw0, dw1], "out_db": [db0, db1]}
    given[which][layer] = None
    name = f"{which}[{layer}]".replace("[", r"\[").replace("]", r"\]")
    refused(cb, name, lambda: cb.fused_mlp_backward(dy, [w0, w1], acts, given["inputs"], given["act_inputs"], need_dx,
                                                    need_dw, given["out_dw"], given["out_db"], need_db=need_db),
            dy, dw0, dw1, db0, db1, why="expected an array, got None$")


def test_the_fused_backward_refuses_a_call_that_needs_nothing(cb):
    """(``min()`` of no layer was the error, after a softmax head's backward had launched.)"""
    dy, w0, w1, y = arrays(cb, (B, 2), (IN, OUT), (OUT, 2), (B, 2))
    refused(cb, "need_dx", lambda: cb.fused_mlp_backward(dy, [w0, w1], ["relu", "softmax"], [None, None], [None, y],
                                                         [False, False], [False, False], [None, None], [None, None]),
            dy, why="expected a layer that needs dX, dW or db")


def test_the_fused_backward_takes_none_for_what_no_layer_reads():
    """What ``_contract.mlp_backward`` leaves out: the input of a layer whose weight is frozen, act'
    input of an identity layer and of any layer below the lowest that needs something, the gradient
    buffers of a frozen layer (as ``Sequential`` passes them)."""
    from gpubp.backends import _contract

    a = object()
    _contract.mlp_backward(["relu", "gelu", "relu", "identity"], [False, False, True, True], [False, False, False, True],
                           None, [None, None, None, a], [None, None, a, None], [None, None, None, a],
                           [None, None, None, a])
    _contract.mlp_backward(["relu", "relu"], [False, False], [False, True], [True, True], [None, a], [a, a], [None, a],
                           [a, a])


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_the_fused_kernels_refuse_an_empty_batch(cb, direction):
    """As ``test_an_empty_batch_is_refused``: the fused kernels' grid is a block per FUSED_ROWS rows."""
    x, dy, w0, w1, b0, b1, h, dw0, dw1, db0, db1 = arrays(cb, (0, IN), (0, 2), (IN, OUT), (OUT, 2), (OUT,), (2,),
                                                          (0, OUT), (IN, OUT), (OUT, 2), (OUT,), (2,))
    name, call = {
        "forward": ("x", lambda: cb.fused_mlp_forward(x, [w0, w1], [b0, b1], ["relu", "identity"], [True, True],
                                                      [True, True])),
        "backward": ("dy", lambda: cb.fused_mlp_backward(dy, [w0, w1], ["relu", "identity"], [x, h], [h, None],
                                                         [False, True], [True, True], [dw0, dw1], [db0, db1]))}[direction]
    refused(cb, name, call, dw0, dw1, db0, db1, why="expected at least one row")


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_the_fused_kernels_refuse_a_layer_of_no_outputs(cb, direction):
    """As ``test_a_layer_of_no_inputs_or_no_outputs_is_refused``; the fused backward left the db of
    the layer above one of no outputs unwritten (its dW had no rows, so no tile)."""
    x, dy, w0, w1, b0, b1, h, dw0, dw1, db0, db1 = arrays(cb, (B, IN), (B, 2), (IN, 0), (0, 2), (0,), (2,), (B, 0),
                                                          (IN, 0), (0, 2), (0,), (2,))
    call = {"forward": lambda: cb.fused_mlp_forward(x, [w0, w1], [b0, b1], ["relu", "identity"], [True, True],
                                                    [True, True]),
            "backward": lambda: cb.fused_mlp_backward(dy, [w0, w1], ["relu", "identity"], [x, h], [h, None],
                                                      [False, True], [True, True], [dw0, dw1], [db0, db1])}[direction]
    refused(cb, r"weights\[0\]", call, db1, why=r"expected at least one input and one output feature, got shape \(3, 0\)$")


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "rmsprop"])
def test_a_multi_tensor_update_refuses_state_its_options_need_given_as_none(cb, optimizer):
    good = arrays(cb, *[(IN, OUT)] * 5)
    bad = arrays(cb, *[(OUT,)] * 5)
    name, call = {
        "sgd": ("velocity", lambda: cb.sgd_update_many([good[:3], (*bad[:2], None)], 0.1, 0.9, False, 0.0)),
        "adam": ("v", lambda: cb.adam_update_many([good[:4], (*bad[:3], None)], 1e-3, 0.9, 0.999, 1e-8, 0.0, 1, False)),
        "rmsprop": ("grad_avg", lambda: cb.rmsprop_update_many([good, (*bad[:3], None, bad[4])], 1e-2, 0.99, 1e-8, 0.0,
                                                               0.9, True))}[optimizer]
    refused(cb, rf"tensors\[1\] \({name}\)", call, *good, *bad, why="expected an array, got None$")


# ----------------------------------------------------------------------------- missing, empty, unknown


@pytest.mark.parametrize("case", ["b", "y_of_relu", "z_of_gelu", "x_for_dw", "grad", "target", "labels"])
def test_a_missing_operand_is_refused_naming_it(be, case):
    """A GPU backend made None a one-element NaN array and read it as a whole operand."""
    x, w, b, dy, y, out = arrays(be, (B, IN), (IN, OUT), (OUT,), (B, OUT), (B, OUT), (B, OUT))
    name, call = {
        "b": ("b", lambda: be.dense_forward(x, w, None, "relu", out=out)),
        "y_of_relu": ("y", lambda: be.dense_backward(dy, x, w, None, None, "relu", True, True)),
        "z_of_gelu": ("z", lambda: be.dense_backward(dy, x, w, y, None, "gelu", True, True)),
        "x_for_dw": ("x", lambda: be.dense_backward(dy, None, w, y, None, "relu", False, True)),
        "grad": ("grad", lambda: be.sgd_update(w, None, None, 0.1, 0.0, False, 0.0)),
        "target": ("target", lambda: be.mse(y, None)),
        "labels": ("labels", lambda: be.softmax_cross_entropy(y, None)),
    }[case]
    refused(be, name, call, out, w, y)


@pytest.mark.parametrize("case", ["forward", "backward", "cross_entropy"])
def test_an_empty_batch_is_refused(be, case):
    """A GPU launch of no blocks is an invalid one (and split-K divided by a chunk of 0 rows)."""
    x, w, b, dy, logits = arrays(be, (0, IN), (IN, OUT), (OUT,), (0, OUT), (0, OUT))
    name, call = {"forward": ("x", lambda: be.dense_forward(x, w, b, "relu")),
                  "backward": ("dy", lambda: be.dense_backward(dy, x, w, None, None, "identity", True, True)),
                  "cross_entropy": ("logits", lambda: be.softmax_cross_entropy(logits, be.asarray(np.zeros(0, np.int64))))
                  }[case]
    refused(be, name, call, w, why="expected at least one row")


@pytest.mark.parametrize("case", ["forward_no_inputs", "forward_no_outputs", "backward_no_inputs",
                                  "backward_no_outputs"])
def test_a_layer_of_no_inputs_or_no_outputs_is_refused(be, case):
    """As an empty batch (``test_an_empty_batch_is_refused``): a GPU launch over no columns is an
    invalid one and the dW split divided by the width (the NumPy backend computed such a layer;
    gpubp's Dense refuses a width of 0 before any of this)."""
    n_in, n_out = (0, OUT) if case.endswith("no_inputs") else (IN, 0)
    x, w, b, dy, out, out_dx, out_db = arrays(be, (B, n_in), (n_in, n_out), (n_out,), (B, n_out), (B, n_out),
                                              (B, n_in), (n_out,))
    call = (lambda: be.dense_forward(x, w, b, "relu", out=out)) if case.startswith("forward") else (
        lambda: be.dense_backward(dy, x, w, None, None, "identity", True, True, out_dx=out_dx, out_db=out_db))
    refused(be, "w", call, out, out_dx, out_db, why=rf"expected at least one input and one output feature, got shape "
                                                    rf"\({n_in}, {n_out}\)$")


def c_contiguous(a) -> bool:
    flags = getattr(a, "flags", None)
    return bool(flags.c_contiguous) if hasattr(flags, "c_contiguous") else a.is_c_contiguous()


@pytest.mark.parametrize("dtype", [None, np.float32])
def test_asarray_of_a_strided_array_of_the_backend_gives_a_c_contiguous_copy(be, dtype):
    """What the in-place operands must be (the GPU backends refuse a strided one): the Numba
    backend's returned the strided view as it was."""
    (wide,) = arrays(be, (IN, 2 * OUT))
    view = wide[:, ::2]
    got = be.asarray(view, dtype)
    assert c_contiguous(got) and tuple(got.shape) == (IN, OUT) and got.dtype == np.float32
    np.testing.assert_array_equal(be.to_host(got), be.to_host(wide)[:, ::2])


@pytest.mark.parametrize("where", ["activation", "dx_act"])
def test_an_unknown_activation_is_refused_before_any_launch(be, where):
    if where == "dx_act" and be.NAME == "numpy":
        pytest.skip("the NumPy backend has no FOLDS_DX_ACT capability (no dx_act)")
    x, w, b, dy, out_dw = arrays(be, (B, IN), (IN, OUT), (OUT,), (B, OUT), (IN, OUT))
    call = (lambda: be.dense_forward(x, w, b, "Relu")) if where == "activation" else (
        lambda: be.dense_backward(dy, x, w, None, None, "identity", True, True, out_dw=out_dw, dx_act="bogus",
                                  dx_act_in=x))
    refused(be, where, call, out_dw, why="unknown activation '(Relu|bogus)'; expected one of \\('identity', ")


def test_a_missing_output_of_the_layer_below_is_refused_naming_what_act_needs(be):
    if be.NAME == "numpy":
        pytest.skip("the NumPy backend has no FOLDS_DX_ACT capability (no dx_act)")
    x, w, dy = arrays(be, (B, IN), (IN, OUT), (B, OUT))
    refused(be, "dx_act_in", lambda: be.dense_backward(dy, x, w, None, None, "identity", True, False, dx_act="gelu"),
            why="what act' of the layer below reads .* needed for dx_act='gelu'")


@pytest.mark.parametrize("wrong", ["width", "layers", "acts"])
def test_the_fused_kernels_refuse_what_their_plan_cannot_hold(cb, wrong):
    """Past the width a kernel read shared memory out of place (NaN out), a short acts list made
    it trap, and a ninth layer shifted every argument after the weights."""
    width, layers = {"width": (cb.FUSED_MLP_MAX_WIDTH + 1, 2), "layers": (4, cb.FUSED_MLP_MAX_LAYERS + 1),
                     "acts": (4, 2)}[wrong]
    (x,) = arrays(cb, (B, width))
    ws = arrays(cb, *[(width, width)] * layers)
    bs = arrays(cb, *[(width,)] * layers)
    acts = ["relu"] * (layers - (wrong == "acts"))
    name = {"width": r"weights\[0\]", "layers": "weights", "acts": "acts"}[wrong]
    refused(cb, name, lambda: cb.fused_mlp_forward(x, ws, bs, acts, [True] * layers, [True] * layers),
            why="expected (at most|1 to|an activation)")


def test_a_capture_keeps_the_arrays_a_multi_tensor_table_points_to(cb, monkeypatch):
    """The table holds their pointers, not references: a replay after the caller dropped them
    would write freed memory that a later array reuses."""
    tensors = [tuple(arrays(cb, (IN, OUT), (IN, OUT)))]
    captured = []
    monkeypatch.setattr(cb._capturing, "arrays", captured)
    cb._multi_table(tensors)
    assert any(entry is tensors for entry in captured)


def test_clipping_refuses_a_bad_guard_before_it_sums_anything(cb):
    grads = arrays(cb, (IN, OUT), (OUT,))
    norm_sq = cb.asarray(np.zeros(1, np.float32))
    refused(cb, "guard", lambda: cb.clip_(grads, 1.0, norm_sq, cb.asarray(np.zeros(2, np.float32))), norm_sq, *grads,
            why="expected a contiguous float32 CuPy array of shape")


def test_a_backward_whose_dx_grid_is_too_wide_writes_no_gradient_first(cb, monkeypatch):
    """dX's columns are the layer's inputs; past CUDA's grid.y limit it was refused after the dz
    and dW launches had written dW and db."""
    monkeypatch.setattr(cb, "_state", lambda: {"sms": 1})  # the 128 x 128 fp32 tile
    n_in = cb.MAX_GRID_Y * 128 + 1
    x, w, dy, out_dw, out_db = arrays(cb, (1, n_in), (n_in, 1), (1, 1), (n_in, 1), (1,))
    refused(cb, "dx", lambda: cb.dense_backward(dy, x, w, None, None, "identity", True, True, out_dw=out_dw,
                                                out_db=out_db), out_dw, out_db, why="an input .* wide takes")


# ----------------------------------------------------------------------------- outputs over inputs


def taken_outputs_over_inputs(be):
    """The contract refuses each output over an input of its call (on a GPU a kernel's blocks
    write their output tiles while others still read the input), and takes out=out_z where the
    activation stores no z (out_z is never written). (Square layers, so that every pair has one
    shape.)"""
    from gpubp.backends import _contract

    x, w, b, dy, y, z = arrays(be, (B, OUT), (OUT, OUT), (OUT,), (B, OUT), (B, OUT), (B, OUT))
    _contract.dense_forward(x, w, b, y, y, "relu")
    for name, call in [("out", lambda: _contract.dense_forward(x, w, b, x, None, "gelu")),
                       ("out_z", lambda: _contract.dense_forward(x, w, b, None, x, "gelu"))]:
        with pytest.raises(ValueError, match=f"^{name}: expected memory apart from x's"):
            call()
    for source, given in (("dy", dy), ("x", x), ("y", y)):
        with pytest.raises(ValueError, match=f"^out_dx: expected memory apart from {source}'s"):
            _contract.dense_backward(dy, x, w, y, None, given, None, None, None, "relu", True)
    with pytest.raises(ValueError, match="^out_dx: expected memory apart from z's"):
        _contract.dense_backward(dy, x, w, None, z, z, None, None, None, "gelu", True)
    for source, given in (("dy", dy[:, :OUT]), ("x", x[:, :OUT])):
        with pytest.raises(ValueError, match=f"^out_dw: expected memory apart from {source}'s"):
            _contract.dense_backward(dy, x, w, y, None, None, given[:OUT], None, None, "relu", True)
    with pytest.raises(ValueError, match="^out_db: expected memory apart from dy's"):
        _contract.dense_backward(dy, x, w, y, None, None, None, dy[0], None, "relu", True)


@pytest.mark.parametrize("overlap", ["same", "partly"])
def test_dense_backward_refuses_an_out_dw_over_w(be, overlap):
    """dW is written before dX reads w: the NumPy backend gave a wrong dX for out_dw=w."""
    dy, x, buffer = arrays(be, (B, OUT), (B, IN), (IN + 1, OUT))
    w, out_dw = (buffer[:IN], buffer[:IN]) if overlap == "same" else (buffer[:IN], buffer[1:])
    refused(be, "out_dw", lambda: be.dense_backward(dy, x, w, None, None, "identity", True, True, out_dw=out_dw),
            buffer, why="expected memory apart from w's")
    taken_outputs_over_inputs(be)


@pytest.mark.parametrize("overlap", ["same", "partly"])
def test_dense_forward_refuses_an_out_z_over_out_where_it_stores_z(be, overlap):
    """gelu reads z while it writes y: the NumPy backend gave a wrong y for out=out_z."""
    x, w, b, buffer = arrays(be, (B, IN), (IN, OUT), (OUT,), (B + 1, OUT))
    out, out_z = (buffer[:B], buffer[:B]) if overlap == "same" else (buffer[:B], buffer[1:])
    refused(be, "out_z", lambda: be.dense_forward(x, w, b, "gelu", out=out, out_z=out_z), buffer,
            why="expected memory apart from out's")
    taken_outputs_over_inputs(be)


class OnDevice:
    """A device array as the contract sees one: its CUDA array interface alone (NumPy's, relabelled)."""

    def __init__(self, a):
        self.__cuda_array_interface__ = a.__array_interface__


def test_the_memory_of_device_arrays_is_compared_by_the_span_of_their_elements():
    buffer = np.zeros((6, 4), np.float32)
    cases = [
        (buffer[:3], buffer[3:], False),  # one buffer's halves
        (buffer[:3], buffer[2:], True),
        (buffer[::2], buffer[1::2], True),  # interleaved rows: spans overlap, elements do not
        (buffer[:3, :2], buffer[3:, :2], False),
        (buffer[::-1][2:], buffer[3:], True),  # rows 3, 2, 1, 0: row 3 in both
        (buffer[::-1][3:], buffer[3:], False),  # rows 2, 1, 0
        (buffer[:, ::-1][:2], buffer[1:], True),
        (buffer[:0], buffer, False),
        (np.zeros(3), buffer, False),
    ]
    from gpubp.backends import _contract

    for a, b, overlapping in cases:
        assert _contract.overlap(OnDevice(a), OnDevice(b)) is overlapping, (a.__array_interface__, b.shape)
        assert _contract.overlap(OnDevice(b), OnDevice(a)) is overlapping
        assert bool(_contract.overlap(a, b)) is overlapping  # NumPy's own check: the same bounds


def test_on_numpy_an_output_over_an_input_is_refused_before_anything_is_written():
    be = backends.get("numpy")
    rng = np.random.default_rng(1)
    x, w, dy = (rng.standard_normal((B, B)) for _ in range(3))
    b = rng.standard_normal(B)
    for act in ("identity", "relu", "gelu"):
        y, z = be.dense_forward(x, w, b, act)
        for out in ("out", "out_z"):
            given = x.copy()
            with pytest.raises(ValueError, match=f"^{out}: expected memory apart from x's"):
                be.dense_forward(given, w, b, act, **{out: given})
            np.testing.assert_array_equal(given, x)  # refused before anything was written
        for source in ("dy", "x", "y"):  # NumPy's products would copy it; a GPU's kernels race
            ops = {"dy": dy.copy(), "x": x.copy(), "y": y.copy()}
            with pytest.raises(ValueError, match=f"^out_dx: expected memory apart from {source}'s"):
                be.dense_backward(ops["dy"], ops["x"], w, ops["y"], z, act, True, True, out_dx=ops[source])
        given = w.copy()
        with pytest.raises(ValueError, match="^out_dw: expected memory apart from w's"):
            be.dense_backward(dy, x, given, y, z, act, True, True, out_dw=given)
        buffer = np.empty((B, B))  # as out and out_z: refused where z is stored, unused elsewhere
        refusal = (pytest.raises(ValueError, match="^out_z: expected memory apart from out's") if act == "gelu"
                   else contextlib.nullcontext())
        with refusal:
            be.dense_forward(x, w, b, act, out=buffer, out_z=buffer)


# ----------------------------------------------------------------------------- labels (NumPy)


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "numpy"])
@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.int8])
@pytest.mark.parametrize("bad", ["classes", "-1", "most negative"])
def test_numpy_cross_entropy_refuses_a_label_that_is_not_a_class(compiled, dtype, bad):
    """The compiled pass read and wrote the next row's gradient for a label of C; the NumPy path
    took -1 for the last class. The GPU backends take labels as given (a check would wait for the
    device); the losses check what users pass. The check reads a signed label as unsigned (a
    negative one is then above every class count), so labels of each width in range, and a strided
    view of them, give int64's result."""
    be = backends.get("numpy")
    (logits,) = arrays(be, (B, OUT))
    labels = (np.arange(B) % OUT).astype(dtype)  # 0 .. OUT - 1
    with be.compiled_kernels(compiled):
        want = be.softmax_cross_entropy(logits, labels.astype(np.int64))
        for given in (labels, np.repeat(labels, 2)[::2]):
            loss, grad = be.softmax_cross_entropy(logits, given)
            assert loss == want[0]
            np.testing.assert_array_equal(grad, want[1])
        labels[2] = {"classes": OUT, "-1": -1, "most negative": np.iinfo(dtype).min}[bad]
        low, high = min(int(labels[2]), 0), max(int(labels[2]), OUT - 1)
        refused(be, "labels", lambda: be.softmax_cross_entropy(logits, labels), logits,
                why=rf"expected class indices in \[0, {OUT}\), got values from {low} to {high}$")


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "numpy"])
def test_numpy_cross_entropy_takes_integer_labels_of_any_type_and_refuses_others(compiled):
    """Unsigned labels and a list give int64's result; floats and booleans are a TypeError naming
    labels, as ``losses.cross_entropy`` has it (the compiled pass failed inside Numba, the NumPy
    path with an IndexError)."""
    be = backends.get("numpy")
    (logits,) = arrays(be, (B, OUT))
    labels = np.array([3, 0, 1, 3, 2])
    with be.compiled_kernels(compiled):
        want = be.softmax_cross_entropy(logits, labels)
        for given in (labels.astype(np.uint8), labels.astype(np.uint64), labels.tolist()):
            loss, grad = be.softmax_cross_entropy(logits, given)
            assert loss == want[0]
            np.testing.assert_array_equal(grad, want[1])
        for given in (labels + 0.0, labels == 0):
            why = f"^labels: expected integer class indices, got dtype {given.dtype}$"
            with trace() as t, pytest.raises(TypeError, match=why):
                be.softmax_cross_entropy(logits, given)
            assert t.total == 0
