"""The CuPy backend (kernels/*.cu) against the NumPy reference, on a real GPU.

Every test is marked ``gpu`` and skips with the reason on a machine without one.
Results are compared with the NumPy backend run in float64 on the same float32 inputs,
by error relative to the reference's largest magnitude; shapes are chosen not to be
multiples of any tile (plus shapes that pick the 128x128 tiles and the split-K dW path).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import gpubp as gb
from gpubp import activations, backends, philox
from gpubp.backends import cupy_backend
from gpubp.activations import ACTIVATIONS, NAMES, NEEDS_Z
from gpubp.backends import numpy_backend as ref
from gpubp.trace import trace

pytestmark = pytest.mark.gpu

RTOL = 1e-4
# The documented TF32 bound (kernels/gemm_tf32.cuh): 2e-3 relative to the largest |C| on N(0, 1) data.
TF32_RTOL = 2e-3
# The documented bf16 bound (kernels/gemm_tf32.cuh): 1e-2 relative to the largest |C| on N(0, 1) data.
BF16_RTOL = 1e-2
# (batch, in, out): odd shapes; 1500 x 1500 outputs take the 128x128 tiles on any GPU
# with at most 144 SMs; batch 4096 into a 64 x 48 layer takes the split-K dW path.
SHAPES = [(19, 13, 7), (3, 33, 17), (1, 1, 1), (37, 29, 23), (130, 257, 65)]
LARGE_SHAPES = [(1500, 77, 1500), (4096, 64, 48), (2053, 37, 70)]
# (batch, in, out) of a layer whose dX applies the act' below: 1500 x 1500 dX outputs take the 128x128 tiles.
LARGE_FOLD_SHAPES = [(1500, 1500, 77)]


@pytest.fixture(scope="module")
def cb():
    try:
        return backends.get("cupy")
    except RuntimeError as exc:
        pytest.skip(str(exc))


def close(actual, expected, rtol=RTOL, floor=1e-30):
    """Max |actual - expected| within rtol of max |expected|, or of ``floor`` where that is larger
    (a bound on the values' size, for a reference that is zero up to float64's rounding)."""
    actual = np.asarray(actual, np.float64)
    scale = max(float(np.max(np.abs(expected))), floor) if np.size(expected) else 1.0
    err = float(np.max(np.abs(actual - expected))) / scale if np.size(expected) else 0.0
    assert err <= rtol, f"max error {err:.3g} relative to max |reference| {scale:.3g}"


def layer(rng, batch, n_in, n_out):
    x = rng.standard_normal((batch, n_in)).astype(np.float32)
    w = (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)
    b = rng.standard_normal(n_out).astype(np.float32)
    return x, w, b


@pytest.mark.parametrize("shape", SHAPES + LARGE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("act", NAMES)
def test_dense_forward_matches_numpy(cb, rng, act, shape):
    x, w, b = layer(rng, *shape)
    y_ref, z_ref = ref.dense_forward(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), act)
    with trace() as t:
        y, z = cb.dense_forward(cb.asarray(x), cb.asarray(w), cb.asarray(b), act)
    assert t.launches == ["dense_fwd"] + (["softmax_fwd"] if act == "softmax" else [])
    close(cb.to_host(y), y_ref)
    if act in NEEDS_Z:
        close(cb.to_host(z), z_ref)
    else:
        assert z is None


@pytest.mark.parametrize("need_dx, need_dw", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("shape", SHAPES + LARGE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("act", NAMES)
def test_dense_backward_matches_numpy_and_launches_what_it_plans(cb, rng, act, shape, need_dx, need_dw):
    x, w, b = layer(rng, *shape)
    x64, w64, b64 = (a.astype(np.float64) for a in (x, w, b))
    y64, z64 = ref.dense_forward(x64, w64, b64, act)
    dy = rng.standard_normal(y64.shape).astype(np.float32)
    y, z = y64.astype(np.float32), None if z64 is None else z64.astype(np.float32)
    # The reference differentiates at the same float32 y/z the GPU kernel reads.
    dx_ref, dw_ref, db_ref = ref.dense_backward(
        dy.astype(np.float64), x64, w64, y.astype(np.float64), None if z is None else z.astype(np.float64),
        act, need_dx, need_dw,
    )
    dev = [None if a is None else cb.asarray(a) for a in (dy, x, w, y, z)]
    with trace() as t:
        dx, dw, db = cb.dense_backward(*dev, act, need_dx, need_dw)
    assert t.launches == cb.backward_kernels(act, need_dx, need_dw)
    for got, want in ((dx, dx_ref), (dw, dw_ref), (db, db_ref)):
        if want is None:
            assert got is None
        else:
            close(cb.to_host(got), want)


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_activation_and_its_derivative_are_finite_at_large_preactivations(cb, rng, act):
    check_large_preactivations(cb, rng, act)


def check_large_preactivations(cb, rng, act):
    """z = x @ [[1]] + 0 = x exactly; 1e20 squares past float32's range, the largest float doubles past it.
    Also run on the CPU kernel harness (test_kernels_on_cpu.py)."""
    big = np.finfo(np.float32).max
    x = np.array([[1e4], [-1e4], [1e20], [-1e20], [big], [-big], [30.0], [-30.0], [0.5]], np.float32)
    w, b = np.ones((1, 1), np.float32), np.zeros(1, np.float32)
    dy = rng.standard_normal((len(x), 1)).astype(np.float32)
    y_ref, z_ref = ref.dense_forward(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), act)
    dx_ref, _, _ = ref.dense_backward(dy.astype(np.float64), None, w.astype(np.float64), y_ref, z_ref, act, True,
                                      False)
    y, z = cb.dense_forward(cb.asarray(x), cb.asarray(w), cb.asarray(b), act)
    dx, _, _ = cb.dense_backward(cb.asarray(dy), None, cb.asarray(w), y, z, act, True, False)
    for got, want in ((cb.to_host(y), y_ref), (cb.to_host(dx), dx_ref)):
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-6)


def test_dense_backward_fills_given_buffers(cb, rng):
    x, w, b = layer(rng, 37, 29, 23)
    y, _ = cb.dense_forward(cb.asarray(x), cb.asarray(w), cb.asarray(b), "relu")
    dy = cb.asarray(rng.standard_normal((37, 23)).astype(np.float32))
    bufs = cb.empty((37, 29)), cb.empty((29, 23)), cb.empty((23,))
    out = cb.dense_backward(dy, cb.asarray(x), cb.asarray(w), y, None, "relu", True, True, *bufs)
    assert all(got is buf for got, buf in zip(out, bufs))


# Layers with fewer output tiles than an H100 has SMs and a large batch: dW splits the batch.
SPLIT_K_LAYERS = [(4096, 64, 48), (2048, 77, 13), (1500, 77, 1500)]


def split_k_gradients(cb, layers, precision):
    """(dw, db) on the host for each layer of ``layers``, their dW kernels launched back to back."""
    on_device = [cb.dense_backward(dy, x, w, y, None, "tanh", False, True, precision=precision)[1:]
                 for x, w, y, dy in layers]
    return [(cb.to_host(dw), cb.to_host(db)) for dw, db in on_device]


@pytest.mark.parametrize("precision", ["fp32", "tf32"])
def test_split_k_dw_is_bitwise_repeatable_matches_one_split_and_numpy_and_resets_its_tickets(cb, rng, monkeypatch,
                                                                                            precision):
    if precision not in cb.dense_precisions():
        pytest.skip(f"this GPU runs the dense kernels in {cb.dense_precisions()} only")
    layers, references = [], []
    for batch, n_in, n_out in SPLIT_K_LAYERS:
        _, grid, *_ = cb._gemm_launch("dw", "tanh", n_in, n_out, precision)
        splits, _ = cb._dw_split(batch, grid[0] * grid[1], cb.TF32_BK if precision == "tf32" else cb.BK)
        assert splits > 1, f"layer {(batch, n_in, n_out)} does not split dW on this GPU; pick a smaller one"
        x, w, b = layer(rng, batch, n_in, n_out)
        y = np.tanh(x.astype(np.float64) @ w + b).astype(np.float32)
        dy = rng.standard_normal((batch, n_out)).astype(np.float32)
        layers.append([cb.asarray(a) for a in (x, w, y, dy)])
        references.append(ref.dense_backward(dy.astype(np.float64), x.astype(np.float64), w.astype(np.float64),
                                             y.astype(np.float64), None, "tanh", False, True)[1:])
    runs = [split_k_gradients(cb, layers, precision) for _ in range(3)]
    monkeypatch.setattr(cb, "MAX_SPLITS", 1)
    single_split = split_k_gradients(cb, layers, precision)
    dw_rtol = TF32_RTOL if precision == "tf32" else RTOL
    for i, (dw_ref, db_ref) in enumerate(references):
        dw, db = runs[0][i]
        for later in runs[1:]:
            assert np.array_equal(later[i][0], dw), f"layer {i}: dW differs between runs"
            assert np.array_equal(later[i][1], db), f"layer {i}: db differs between runs"
        close(dw, dw_ref, dw_rtol)
        close(db, db_ref)  # an fp32 sum in either precision
        # One split rounds the same operands; only the order of the fp32 additions differs.
        close(dw, single_split[i][0].astype(np.float64))
        close(db, single_split[i][1].astype(np.float64))
    assert not cb.to_host(cb._state()["tickets"]).any()


MISALIGNED_FEATURES = [1, 3, 4, 5, 127, 128, 129]


def misaligned(cb, host):
    """``host`` on the GPU one float past the start of an allocation (which CUDA aligns to 256
    bytes): C-contiguous, so the backend takes it as it is, but misaligned for float4 access."""
    padded = np.concatenate([np.zeros(1, host.dtype), host.ravel()])
    view = cb.asarray(padded)[1:].reshape(host.shape)
    assert view.data.ptr % 16 == 4
    return view


@pytest.mark.parametrize("n_out", MISALIGNED_FEATURES)
@pytest.mark.parametrize("n_in", MISALIGNED_FEATURES)
@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_misaligned_operands_and_out_buffers_give_the_reference_results(cb, rng, act, n_in, n_out):
    """The float4 paths must fall back to scalar access for a base that is not 16-byte aligned."""
    batch = 37
    x, w, b = layer(rng, batch, n_in, n_out)
    dy = rng.standard_normal((batch, n_out)).astype(np.float32)
    x64, w64, b64, dy64 = (a.astype(np.float64) for a in (x, w, b, dy))
    y_ref, z_ref = ref.dense_forward(x64, w64, b64, act)
    x_d, w_d, b_d, dy_d = (misaligned(cb, a) for a in (x, w, b, dy))
    out_y, out_z = (misaligned(cb, np.zeros((batch, n_out), np.float32)) for _ in range(2))
    y, z = cb.dense_forward(x_d, w_d, b_d, act, out=out_y, out_z=out_z)
    assert y is out_y and (z is out_z if act in NEEDS_Z else z is None)
    close(cb.to_host(y), y_ref)
    grads_ref = ref.dense_backward(dy64, x64, w64, cb.to_host(y).astype(np.float64),
                                   None if z is None else cb.to_host(z).astype(np.float64), act, True, True)
    bufs = [misaligned(cb, np.zeros(shape, np.float32)) for shape in ((batch, n_in), (n_in, n_out), (n_out,))]
    grads = cb.dense_backward(dy_d, x_d, w_d, y, z, act, True, True, *bufs)
    for got, buf, want in zip(grads, bufs, grads_ref):
        assert got is buf
        close(cb.to_host(got), want)


FOLD_IN = 11  # the lower layer's input width in check_dx_applies_the_activation_below
# The activations of a lower layer whose dz the dX above forms (the backend's FOLDS_DX_ACT), in order.
FOLDS_DX_ACT = [act for act in ACTIVATIONS if act in cupy_backend.FOLDS_DX_ACT]


def check_dx_applies_the_activation_below(cb, rng, act, shape, precision, misalign=None, dropout=False):
    """An upper layer (batch, in, out) = ``shape`` above a lower one with activation ``act``: the
    upper layer's dX given ``act`` (``dx_act``) is the lower layer's dz, within RTOL of float64's
    dx * act', and the lower layer's gradients from it (run as identity's) are bit for bit those its
    own dz pass gives; nothing more is launched for it. ``misalign``: a copy of an array that is
    not aligned for vector access, for what the epilogue reads. ``dropout``: the lower layer's
    forward masks its output (rate 0.4, rows from 3), and the dX epilogue regenerates the mask
    (``dx_dropout``) as the lower layer's own dz pass would. On tensor cores the masked dz pass sums
    db in another order than the unmasked one (32 row groups, not 8): db is then held to RTOL."""
    batch, n_mid, n_out = shape
    x, w0, b0 = (cb.asarray(a) for a in layer(rng, batch, FOLD_IN, n_mid))
    w1 = cb.asarray(layer(rng, batch, n_mid, n_out)[1])
    key = rng.integers(0, 2**32, size=2, dtype=np.uint64).astype(np.uint32)
    mask = philox.Mask(cb.asarray(key, np.uint32), *philox.mask_constants(0.4), 3) if dropout else None
    masked = {} if mask is None else {"dropout": mask}
    y0, z0 = cb.dense_forward(x, w0, b0, act, precision=precision, **masked)
    act_in = z0 if act in NEEDS_Z else y0
    if misalign is not None:
        act_in = misalign(act_in)
    dy = cb.asarray(rng.standard_normal((batch, n_out)).astype(np.float32))
    plain, _, _ = cb.dense_backward(dy, y0, w1, None, None, "identity", True, False, precision=precision)
    below = {"dx_act": act, "dx_act_in": act_in} | ({} if mask is None else {"dx_dropout": mask})
    with trace() as t:
        dz, _, _ = cb.dense_backward(dy, y0, w1, None, None, "identity", True, False, precision=precision, **below)
    assert t.launches == cb.backward_kernels("identity", True, False, precision)
    y64, z64 = (None if a is None else cb.to_host(a).astype(np.float64) for a in (y0, z0))
    plain64 = cb.to_host(plain).astype(np.float64)
    if mask is not None:  # the activation's own output where kept, and dy scaled there, 0 elsewhere
        keep = philox.keep_mask(key, batch, n_mid, mask.threshold, mask.first_row)
        plain64 = np.where(keep, plain64 * np.float64(mask.scale), 0.0)
        y64 = None if y64 is None else y64 * np.float64(mask.keep_prob)
    want = plain64.copy()
    if act != "identity":
        activations.backward(act, plain64, y64, z64, want)
    close(cb.to_host(dz), want)
    own = cb.dense_backward(plain, x, w0, y0, z0, act, True, True, precision=precision, **masked)
    with trace() as t:
        folded = cb.dense_backward(dz, x, w0, y0, z0, "identity", True, True, precision=precision)
    assert t.launches == cb.backward_kernels("identity", True, True, precision)
    *products, db = folded
    for got, expected in zip(products, own):
        np.testing.assert_array_equal(cb.to_host(got), cb.to_host(expected))
    if mask is None or precision == "fp32":
        np.testing.assert_array_equal(cb.to_host(db), cb.to_host(own[2]))
    else:
        close(cb.to_host(db), cb.to_host(own[2]).astype(np.float64))


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES + LARGE_FOLD_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("act", [act for act in FOLDS_DX_ACT if act != "identity"])
def test_dx_with_the_activation_below_is_that_layers_dz_bit_for_bit(cb, rng, act, shape, precision):
    if precision not in cb.dense_precisions():
        pytest.skip(f"this GPU runs the dense kernels in {cb.dense_precisions()} only")
    check_dx_applies_the_activation_below(cb, rng, act, shape, precision)


@pytest.mark.parametrize("precision", ["fp32", "tf32"])
def test_dx_reads_a_misaligned_activation_below_one_float_at_a_time(cb, rng, precision):
    if precision not in cb.dense_precisions():
        pytest.skip(f"this GPU runs the dense kernels in {cb.dense_precisions()} only")
    check_dx_applies_the_activation_below(cb, rng, "sigmoid", (40, 36, 20), precision,
                                          misalign=lambda a: misaligned(cb, cb.to_host(a)))


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES + LARGE_FOLD_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("act", FOLDS_DX_ACT)
def test_dx_regenerating_the_mask_below_is_that_layers_masked_dz_bit_for_bit(cb, rng, act, shape, precision):
    if precision not in cb.dense_precisions():
        pytest.skip(f"this GPU runs the dense kernels in {cb.dense_precisions()} only")
    check_dx_applies_the_activation_below(cb, rng, act, shape, precision, dropout=True)


def folded_step(cb, frozen=(), fold=True, precision="fp32", dropout=False):
    """(gradients, backward's launches, its plan) of one step of a per-layer model whose hidden layers
    each have another activation, on the backend ``cb`` (cupy or numba) with its dX epilogues
    forming the dz below (``fold``) or with a dz pass per layer (the capability switched off).
    ``dropout``: Dropouts above the relu layer and above a linear one."""
    gb.seed(4)
    layers = [gb.Dense(9, 24, "relu"), gb.Dense(24, 20, "gelu"), gb.Dense(20, 16, "tanh"), gb.Dense(16, 5)]
    if dropout:
        layers = [gb.Dense(9, 24, "relu"), gb.Dropout(0.3), gb.Dense(24, 20, "gelu"), gb.Dense(20, 16),
                  gb.Dropout(0.2), gb.Dense(16, 5)]
    model = gb.Sequential(layers, backend=cb.NAME, fused=False, precision=precision)
    for i in frozen:
        model[i].freeze()
    rng = np.random.default_rng(9)
    x = rng.standard_normal((37, 9)).astype(np.float32)
    dout = cb.asarray(rng.standard_normal((37, 5)).astype(np.float32))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cb, "FOLDS_DX_ACT", cb.FOLDS_DX_ACT if fold else frozenset())
        model.forward(x)
        with trace() as t:
            model.backward(dout)
        plan = model.backward_plan()
    return [None if p.grad is None else cb.to_host(p.grad) for p in model.parameters()], t.launches, plan


def assert_grads_equal(got, want):
    assert [g is None for g in got] == [w is None for w in want]
    for g, w in zip(got, want):
        if w is not None:
            np.testing.assert_array_equal(g, w)


def test_strided_and_float64_inputs_are_read_as_their_values(cb, rng):
    """The raw kernels index flat float32 memory: views and float64 arrays, which the layer
    API and the losses pass through unchanged, must still give the reference results."""
    x, w, b = layer(rng, 37, 29, 23)
    x_view = cb.asarray(np.repeat(x, 2, axis=1))[:, ::2]  # column-strided, equals x
    w_view = cb.asarray(np.ascontiguousarray(w.T)).T  # transposed, equals w
    assert not x_view.flags.c_contiguous and not w_view.flags.c_contiguous
    x64, w64, b64 = (a.astype(np.float64) for a in (x, w, b))
    y_ref, _ = ref.dense_forward(x64, w64, b64, "tanh")
    y, _ = cb.dense_forward(x_view, w_view, cb.asarray(b), "tanh")
    close(cb.to_host(y), y_ref)
    dy = rng.standard_normal(y_ref.shape).astype(np.float32)
    want = ref.dense_backward(dy.astype(np.float64), x64, w64, cb.to_host(y).astype(np.float64), None, "tanh",
                              True, True)
    dy_view = cb.asarray(np.ascontiguousarray(dy.T)).T
    for got, expected in zip(cb.dense_backward(dy_view, x_view, w_view, y, None, "tanh", True, True), want):
        close(cb.to_host(got), expected)

    logits = (5 * rng.standard_normal((37, 10))).astype(np.float32)
    labels = rng.integers(0, 10, 37)
    loss_ref, grad_ref = ref.softmax_cross_entropy(logits.astype(np.float64), labels)
    labels_view = cb.asarray(np.repeat(labels, 2))[::2]
    for device_logits in (cb.asarray(np.ascontiguousarray(logits.T)).T, cb.asarray(logits.astype(np.float64))):
        loss, grad = cb.softmax_cross_entropy(device_logits, labels_view)
        assert loss == pytest.approx(loss_ref, rel=RTOL)
        close(cb.to_host(grad), grad_ref)
    target = rng.random((37, 10)).astype(np.float32)
    loss_ref, grad_ref = ref.mse(logits.astype(np.float64), target.astype(np.float64))
    loss, grad = cb.mse(cb.asarray(logits.astype(np.float64)), cb.asarray(target))
    assert loss == pytest.approx(loss_ref, rel=RTOL)
    close(cb.to_host(grad), grad_ref)


# ----------------------------------------------------------------------------- losses
#
# The check_* bodies are shared with tests/test_kernels_on_cpu.py, which runs them on the CPU
# kernel harness at smaller sizes.

LOSS_SHAPES = [(1, 1), (19, 13), (37, 10), (257, 1000), (5000, 3)]


def sample_weights(cb, rng, batch, weighted):
    """(host, device) per-sample weights in [0, 2), or (None, None) for the unweighted kernels."""
    if not weighted:
        return None, None
    host = rng.uniform(0, 2, batch).astype(np.float32)
    return host, cb.asarray(host)


def check_softmax_cross_entropy(cb, rng, shape, label_dtype, weighted=False, label_smoothing=0.0):
    """Loss and gradient against NumPy in float64, with a masked (-inf) logit in every row that
    has more than one; the loss written to device memory (``out_loss``) is the same bits. With
    ``label_smoothing`` the masked rows' loss is +inf (as in PyTorch; the gradient stays finite),
    so the logits are also checked unmasked, where the loss is finite."""
    logits = (5 * rng.standard_normal(shape)).astype(np.float32)
    labels = rng.integers(0, shape[1], shape[0]).astype(label_dtype)
    masked = logits.copy()
    if shape[1] > 1:  # never the label's
        masked[np.arange(shape[0]), (labels + 1) % shape[1]] = -np.inf
    weights, device_weights = sample_weights(cb, rng, shape[0], weighted)
    options = {"label_smoothing": label_smoothing} if label_smoothing else {}
    for z in [masked] if not label_smoothing or shape[1] == 1 else [logits, masked]:
        loss_ref, grad_ref = ref.softmax_cross_entropy(z.astype(np.float64), labels, weights, label_smoothing)
        with trace() as t:
            loss, grad = cb.softmax_cross_entropy(cb.asarray(z), cb.asarray(labels), device_weights, **options)
        assert t.launches == ["ce_fwd_bwd"]
        assert isinstance(loss, float)
        if np.isinf(loss_ref):
            assert loss == loss_ref == np.inf
        else:
            assert loss == pytest.approx(loss_ref, rel=RTOL, abs=1e-6)
        # Each gradient entry lies in [-w / B, w / B]: errors count against that, so a gradient
        # that is zero (one class, or two with one masked) is not held to float64's rounding.
        close(cb.to_host(grad), grad_ref, floor=(1.0 if weights is None else float(weights.max())) / shape[0])
        out = cb.empty((1,))
        assert cb.softmax_cross_entropy(cb.asarray(z), cb.asarray(labels), device_weights, out_loss=out,
                                        **options)[0] is out
        assert float(cb.to_host(out)[0]) == loss


# (backend function, trace name, options): the elementwise losses, Huber at its default delta
# and at one that puts most errors past it (pred is 3 N(0, 1), target U(0, 1)); Poisson's log
# rates reach about 12 there, rates of about 1e5.
ELEMENTWISE_LOSSES = [("mse", "mse_fwd_bwd", {}), ("mae", "mae_fwd_bwd", {}), ("bce", "bce_fwd_bwd", {}),
                      ("huber", "huber_fwd_bwd", {}), ("huber", "huber_fwd_bwd", {"delta": 0.25}),
                      ("poisson", "poisson_fwd_bwd", {})]
ELEMENTWISE_LOSS_IDS = ["mse", "mae", "bce", "huber", "huber-delta-0.25", "poisson"]


def check_elementwise_loss(cb, rng, name, trace_name, shape, weighted=False, options=None):
    options = options or {}
    pred = (3 * rng.standard_normal(shape)).astype(np.float32)
    target = rng.random(shape).astype(np.float32)
    weights, device_weights = sample_weights(cb, rng, shape[0], weighted)
    loss_ref, grad_ref = getattr(ref, name)(pred.astype(np.float64), target.astype(np.float64), weights, **options)
    with trace() as t:
        loss, grad = getattr(cb, name)(cb.asarray(pred), cb.asarray(target), device_weights, **options)
    assert t.launches == [trace_name]
    assert loss == pytest.approx(loss_ref, rel=RTOL)
    close(cb.to_host(grad), grad_ref)
    out = cb.empty((1,))
    getattr(cb, name)(cb.asarray(pred), cb.asarray(target), device_weights, out_loss=out, **options)
    assert float(cb.to_host(out)[0]) == loss


def check_losses_at_huge_logits(cb):
    logits = np.array([[1e4, -1e4, 0.0, 88.0, -88.0], [-1e4, -1e4, -1e4, -1e4, -1e4]], np.float32)
    labels = np.array([1, 2], np.int64)
    loss_ref, grad_ref = ref.softmax_cross_entropy(logits.astype(np.float64), labels)
    loss, grad = cb.softmax_cross_entropy(cb.asarray(logits), cb.asarray(labels))
    assert loss == pytest.approx(loss_ref, rel=RTOL)
    close(cb.to_host(grad), grad_ref)
    target = np.array([[0.0, 1.0, 0.5, 0.0, 1.0], [1.0, 0.0, 0.5, 1.0, 0.0]], np.float32)
    loss_ref, grad_ref = ref.bce(logits.astype(np.float64), target.astype(np.float64))
    loss, grad = cb.bce(cb.asarray(logits), cb.asarray(target))
    assert loss == pytest.approx(loss_ref, rel=RTOL)
    close(cb.to_host(grad), grad_ref)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1], ids=["one-hot", "smoothed"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("label_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("shape", LOSS_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_softmax_cross_entropy_matches_numpy(cb, rng, shape, label_dtype, weighted, label_smoothing):
    check_softmax_cross_entropy(cb, rng, shape, label_dtype, weighted, label_smoothing)


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("shape", LOSS_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name, trace_name, options", ELEMENTWISE_LOSSES, ids=ELEMENTWISE_LOSS_IDS)
def test_elementwise_losses_match_numpy(cb, rng, name, trace_name, options, shape, weighted):
    check_elementwise_loss(cb, rng, name, trace_name, shape, weighted, options)


def check_cross_entropy_of_logits_sharing_a_large_offset(cb):
    """Logits [0, -1, -2] + c have the same loss for every c: the kernel must take z_label - m
    before adding log s, which m would otherwise absorb (from c = 1e8 float32 makes the three equal)."""
    labels = np.array([2, 0], np.int64)
    for offset in (1e4, 1e6, 1e8, 1e30):
        logits = np.tile(np.array([0.0, -1.0, -2.0]) + offset, (2, 1)).astype(np.float32)
        for smoothing in (0.0, 0.1):
            for weights in (None, np.array([1.0, 2.0], np.float32)):
                expected, _ = ref.softmax_cross_entropy(logits.astype(np.float64), labels, weights, smoothing)
                loss, _ = cb.softmax_cross_entropy(cb.asarray(logits), cb.asarray(labels),
                                                   None if weights is None else cb.asarray(weights),
                                                   label_smoothing=smoothing)
                assert loss == pytest.approx(expected, rel=1e-6), (offset, smoothing, weights)


# Pre-activations where the formulas meet their limits: NaN, the kinks, +-inf, and past exp's range.
SPECIAL_Z = np.array([np.nan, 0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, 1e30, -1e30, 40.0, -40.0, 1e-40],
                     np.float32)


# The subnormal among them, as a GPU compiled with -ftz=true reads it: a zero of its sign.
SUBNORMAL = (SPECIAL_Z != 0) & (np.abs(SPECIAL_Z) < np.finfo(np.float32).tiny)
FLUSHED_Z = np.where(SUBNORMAL, np.copysign(np.float32(0), SPECIAL_Z), SPECIAL_Z).astype(np.float32)


def check_activations_at_special_values(cb, acts=ACTIVATIONS):
    """act(z) and db = sum over the batch of act'(z) for z = SPECIAL_Z, put in through the bias (x
    and w zero, so z is b exactly), against the NumPy backend, NaN where it is NaN. The subnormal
    column may match NumPy's result for it or for the zero it flushes to: the CuPy kernels are
    built with -ftz=true, which the CPU harness and Numba's kernels do not model (relu's db is 2
    there, 0 on an H200)."""
    x, w = np.zeros((2, 1), np.float32), np.zeros((1, SPECIAL_Z.size), np.float32)
    dy = np.ones((2, SPECIAL_Z.size), np.float32)

    def reference(b, act):
        with np.errstate(invalid="ignore", over="ignore"):  # NumPy's warnings about the NaN and inf it makes
            y_ref, z_ref = ref.dense_forward(x, w, b, act)
            _, _, db_ref = ref.dense_backward(dy, x, w, y_ref, z_ref, act, need_dx=False, need_dw=True)
        return y_ref, db_ref

    for act in acts:
        (y_ref, db_ref), (y_flushed, db_flushed) = reference(SPECIAL_Z, act), reference(FLUSHED_Z, act)
        y, z = cb.dense_forward(cb.asarray(x), cb.asarray(w), cb.asarray(SPECIAL_Z), act)
        _, _, db = cb.dense_backward(cb.asarray(dy), cb.asarray(x), cb.asarray(w), y, z, act, need_dx=False,
                                     need_dw=True)
        y, db = cb.to_host(y), cb.to_host(db)
        close = dict(rtol=1e-5, atol=1e-30, equal_nan=True)
        if np.allclose(y[:, SUBNORMAL], y_flushed[:, SUBNORMAL], **close) \
                and np.allclose(db[SUBNORMAL], db_flushed[SUBNORMAL], **close):
            y_ref[:, SUBNORMAL], db_ref[SUBNORMAL] = y_flushed[:, SUBNORMAL], db_flushed[SUBNORMAL]
        # 2e-6: CUDA documents tanhf at 2 ulp and normcdff at 5 (the harness's glibc is within 1), and
        # gelu_tanh's 1 + tanh at z = -1 doubles tanh's error: about 7e-7 on a GPU, where 1e-6 was tight.
        np.testing.assert_allclose(y, y_ref, rtol=2e-6, atol=1e-30, err_msg=f"{act} forward")
        np.testing.assert_allclose(db, db_ref, rtol=1e-5, atol=1e-30, err_msg=f"{act} backward")


def check_an_off_relu_unit_passes_no_gradient_even_an_infinite_one(cb, precision="fp32"):
    """relu's gradient is a select: where y is 0, an inf or NaN gradient from above gives 0 (PyTorch's
    threshold_backward), not inf * 0's NaN: in the dz pass, the masked dz pass, and the dX epilogue
    that applies the activation of the layer below. Expected values from the NumPy backend."""
    x, w, b = np.ones((2, 1), np.float32), np.ones((1, 2), np.float32), np.array([-2.0, 1.0], np.float32)
    dy = np.array([[np.inf, 1.0], [np.nan, 2.0]], np.float32)  # z = [-1, 2] a row: unit 0 off
    key = np.array([7, 11], np.uint32)
    for rate in (None, 0.25):
        masks = [None if rate is None else philox.Mask(k, *philox.mask_constants(rate), 0)
                 for k in (key, cb.asarray(key, np.uint32))]
        kwargs = [{} if m is None else {"dropout": m} for m in masks]
        y_ref, z_ref = ref.dense_forward(x, w, b, "relu", **kwargs[0])
        expected = ref.dense_backward(dy, x, w, y_ref, z_ref, "relu", True, True, **kwargs[0])
        y, z = cb.dense_forward(*(cb.asarray(a) for a in (x, w, b)), "relu", precision=precision, **kwargs[1])
        got = cb.dense_backward(cb.asarray(dy), cb.asarray(x), cb.asarray(w), y, z, "relu", True, True,
                                precision=precision, **kwargs[1])
        for name, a, e in zip(("dx", "dw", "db"), got, expected):
            assert np.isfinite(e).all()
            np.testing.assert_allclose(cb.to_host(a), e, rtol=1e-6 if precision == "fp32" else TF32_RTOL,
                                       err_msg=f"{name}, dropout {rate}")
    # the layer above's dX, applying this layer's relu: its dz
    w_up, dy_up = np.ones((2, 1), np.float32), np.array([[np.inf], [1.0]], np.float32)
    y_ref, _ = ref.dense_forward(x, w, b, "relu")
    plain, _, _ = ref.dense_backward(dy_up, y_ref, w_up, None, None, "identity", True, False)
    expected = np.empty_like(plain)
    activations.backward("relu", plain, y_ref, None, expected)
    y, _ = cb.dense_forward(*(cb.asarray(a) for a in (x, w, b)), "relu", precision=precision)
    dz, _, _ = cb.dense_backward(cb.asarray(dy_up), y, cb.asarray(w_up), None, None, "identity", True, False,
                                 precision=precision, dx_act="relu", dx_act_in=y)
    np.testing.assert_array_equal(cb.to_host(dz), expected)  # [[0, inf], [0, 1]]


def check_no_weight_decay_keeps_an_infinite_weight(cb):
    """weight_decay 0 adds nothing to the gradient, not 0 * p, which is NaN for an infinite p."""
    updates = {
        "sgd": lambda be, p, g, s: be.sgd_update(p, g, None, 0.1, 0.0, False, 0.0),
        "sgd_momentum": lambda be, p, g, s: be.sgd_update(p, g, s[0], 0.1, 0.9, True, 0.0),
        "adam": lambda be, p, g, s: be.adam_update(p, g, s[0], s[1], 0.1, 0.9, 0.999, 1e-8, 0.0, 1, False),
        "adamw": lambda be, p, g, s: be.adam_update(p, g, s[0], s[1], 0.1, 0.9, 0.999, 1e-8, 0.0, 1, True),
        "rmsprop": lambda be, p, g, s: be.rmsprop_update(p, g, s[0], None, None, 0.1, 0.99, 1e-8, 0.0, 0.0, False),
    }
    for name, update in updates.items():
        arrays = [np.array([np.inf, -np.inf, 1.0], np.float32), np.ones(3, np.float32)]
        state = [np.zeros(3, np.float32), np.zeros(3, np.float32)]
        with np.errstate(invalid="ignore"):  # inf - inf in NumPy's step, where the weight is inf anyway
            update(ref, *arrays, state)
        assert np.isinf(arrays[0][:2]).all(), (name, arrays[0])
        p = cb.asarray(np.array([np.inf, -np.inf, 1.0], np.float32))
        update(cb, p, cb.asarray(np.ones(3, np.float32)), [cb.zeros((3,)), cb.zeros((3,))])
        np.testing.assert_allclose(cb.to_host(p), arrays[0], rtol=1e-6, atol=1e-6, err_msg=name)  # 1 steps to ~0


def check_cross_entropy_of_a_row_with_an_infinite_logit(cb):
    """A +inf logit makes its row's softmax NaN everywhere (exp(inf - inf) is in the sum), its loss NaN."""
    logits = np.array([[np.inf, 0.0, 1.0], [0.5, 0.0, 1.0]], np.float32)
    labels = np.array([1, 2], np.int64)
    for smoothing in (0.0, 0.1):
        with np.errstate(invalid="ignore"):
            loss_ref, grad_ref = ref.softmax_cross_entropy(logits, labels, label_smoothing=smoothing)
        loss, grad = cb.softmax_cross_entropy(cb.asarray(logits), cb.asarray(labels), label_smoothing=smoothing)
        assert math.isnan(loss_ref) and math.isnan(loss)
        np.testing.assert_allclose(cb.to_host(grad), grad_ref, rtol=1e-6, err_msg=f"smoothing {smoothing}")


def check_cross_entropy_of_a_label_outside_the_classes(cb):
    """A label outside [0, C) makes the loss and its row's gradient NaN, in every row position,
    without reading through it: z[label] read another row's logit, or past the last row (which ends
    the CUDA context), and gave a finite loss. The other rows' gradients are numpy's. (The NumPy
    backend refuses such labels on the host, where reading them costs no wait.)"""
    rng = np.random.default_rng(7)
    logits = rng.standard_normal((4, 5)).astype(np.float32)
    good = np.array([0, 2, 1, 4], np.int64)
    for dtype in (np.int64, np.int32):
        for bad_row, bad in ((3, 5), (1, -1), (3, 1 << 30)):
            labels = good.astype(dtype)
            labels[bad_row] = bad
            for smoothing in (0.0, 0.1):
                _, grad_ref = ref.softmax_cross_entropy(logits, good, label_smoothing=smoothing)
                loss, grad = cb.softmax_cross_entropy(cb.asarray(logits), cb.asarray(labels),
                                                      label_smoothing=smoothing)
                case = f"{dtype.__name__} label {bad} in row {bad_row}, smoothing {smoothing}"
                assert math.isnan(loss), f"{case}: loss {loss}"
                grad = cb.to_host(grad)
                others = [r for r in range(4) if r != bad_row]
                np.testing.assert_allclose(grad[others], grad_ref[others], rtol=1e-5, atol=1e-7, err_msg=case)
                assert np.isnan(grad[bad_row]).all(), case


def check_softmax_and_cross_entropy_of_a_row_with_a_nan_logit(cb):
    """A NaN logit makes its row's softmax, loss terms and gradient NaN wherever it sits in the row
    (the row reductions merge partial sums lane by lane: one that skipped a NaN partial gave a
    finite loss), and leaves the other rows alone."""
    logits = np.array([[1.0, np.nan, 2.0, 0.0, 0.5], [0.5, -1.0, 3.0, 0.0, 1.0], [0.0, 1.0, 0.5, 2.0, np.nan]],
                      np.float32)
    labels = np.array([0, 2, 1], np.int64)
    with np.errstate(invalid="ignore"):
        for smoothing in (0.0, 0.1):
            loss_ref, grad_ref = ref.softmax_cross_entropy(logits, labels, label_smoothing=smoothing)
            loss, grad = cb.softmax_cross_entropy(cb.asarray(logits), cb.asarray(labels), label_smoothing=smoothing)
            assert math.isnan(loss_ref) and math.isnan(loss), f"smoothing {smoothing}: loss {loss}"
            # rtol 4e-6, not 1e-6: CUDA's expf is within 2 ulp and the lane merge contracts into
            # FMAs, which a gradient p - eps/C that cancels ~2.5x turns into up to ~7e-7 (1e-6
            # held on the CPU harness alone, at 2.6e-7).
            np.testing.assert_allclose(cb.to_host(grad), grad_ref, rtol=4e-6, err_msg=f"smoothing {smoothing}")
        y_ref, y = logits.copy(), cb.asarray(logits)
        ref.softmax_(y_ref)
        cb.softmax_(y)
    np.testing.assert_allclose(cb.to_host(y), y_ref, rtol=1e-6)
    assert np.isnan(y_ref[[0, 2]]).all() and np.isfinite(y_ref[1]).all()


def test_losses_are_finite_for_huge_logits(cb):
    check_losses_at_huge_logits(cb)


def test_cross_entropy_of_logits_sharing_a_large_offset(cb):
    check_cross_entropy_of_logits_sharing_a_large_offset(cb)


def test_activations_at_special_values_match_numpy(cb):
    check_activations_at_special_values(cb)


@pytest.mark.parametrize("precision", ["fp32", "tf32"])
def test_an_off_relu_unit_passes_no_gradient_even_an_infinite_one(cb, precision):
    check_an_off_relu_unit_passes_no_gradient_even_an_infinite_one(cb, precision)


def test_no_weight_decay_keeps_an_infinite_weight(cb):
    check_no_weight_decay_keeps_an_infinite_weight(cb)


def test_cross_entropy_of_a_row_with_an_infinite_logit(cb):
    check_cross_entropy_of_a_row_with_an_infinite_logit(cb)


def test_cross_entropy_of_a_label_outside_the_classes_is_nan(cb):
    check_cross_entropy_of_a_label_outside_the_classes(cb)


def test_softmax_and_cross_entropy_of_a_row_with_a_nan_logit(cb):
    check_softmax_and_cross_entropy_of_a_row_with_a_nan_logit(cb)


def test_loss_is_bitwise_deterministic(cb, rng):
    logits = cb.asarray(rng.standard_normal((70000, 10)).astype(np.float32))
    labels = cb.asarray(rng.integers(0, 10, 70000))
    losses = {cb.softmax_cross_entropy(logits, labels)[0] for _ in range(5)}
    assert len(losses) == 1


# ----------------------------------------------------------------------------- optimizers

SGD_CASES = [(0.0, False, 0.0), (0.0, False, 1e-2), (0.9, False, 1e-2), (0.9, True, 0.0)]
ADAM_CASES = [(False, 0.0), (False, 1e-2), (True, 1e-2)]
RMSPROP_CASES = [(0.0, False, 0.0), (0.0, True, 1e-2), (0.9, False, 1e-2), (0.9, True, 0.0)]


def check_sgd_update(cb, rng, n, momentum, nesterov, weight_decay, steps=3):
    p, g = (rng.standard_normal(n).astype(np.float32) for _ in range(2))
    v = rng.standard_normal(n).astype(np.float32) if momentum else None
    p_ref, v_ref = p.astype(np.float64), None if v is None else v.astype(np.float64)
    p_dev, v_dev = cb.asarray(p), None if v is None else cb.asarray(v)
    for _ in range(steps):
        ref.sgd_update(p_ref, g.astype(np.float64), v_ref, 0.1, momentum, nesterov, weight_decay)
        with trace() as t:
            cb.sgd_update(p_dev, cb.asarray(g), v_dev, 0.1, momentum, nesterov, weight_decay)
        assert t.launches == ["sgd_update"]
    close(cb.to_host(p_dev), p_ref)
    if v is not None:
        close(cb.to_host(v_dev), v_ref)


def check_adam_update(cb, rng, n, decoupled, weight_decay, steps=3):
    p, g = (rng.standard_normal(n).astype(np.float32) for _ in range(2))
    state_ref = [p.astype(np.float64), np.zeros(n), np.zeros(n)]
    state_dev = [cb.asarray(p), cb.zeros((n,)), cb.zeros((n,))]
    for step in range(1, steps + 1):
        grad = g * step
        ref.adam_update(state_ref[0], grad.astype(np.float64), state_ref[1], state_ref[2],
                        1e-2, 0.9, 0.999, 1e-8, weight_decay, step, decoupled)
        with trace() as t:
            cb.adam_update(state_dev[0], cb.asarray(grad), state_dev[1], state_dev[2],
                           1e-2, 0.9, 0.999, 1e-8, weight_decay, step, decoupled)
        assert t.launches == ["adam_update"]
    for got, want in zip(state_dev, state_ref):
        close(cb.to_host(got), want)


def check_rmsprop_update(cb, rng, n, momentum, centered, weight_decay, steps=3):
    p = rng.standard_normal(n).astype(np.float32)
    # param, square_avg, grad_avg (centered only), momentum_buffer (with momentum only)
    used = (True, True, centered, bool(momentum))
    state_ref = [p.astype(np.float64)] + [np.zeros(n) if u else None for u in used[1:]]
    state_dev = [cb.asarray(p)] + [cb.zeros((n,)) if u else None for u in used[1:]]
    for _ in range(steps):
        grad = rng.standard_normal(n).astype(np.float32)
        ref.rmsprop_update(state_ref[0], grad.astype(np.float64), *state_ref[1:], 1e-2, 0.9, 1e-8, weight_decay,
                           momentum, centered)
        with trace() as t:
            cb.rmsprop_update(state_dev[0], cb.asarray(grad), *state_dev[1:], 1e-2, 0.9, 1e-8, weight_decay,
                              momentum, centered)
        assert t.launches == ["rmsprop_update"]
    for got, want in zip(state_dev, state_ref):
        if want is not None:
            close(cb.to_host(got), want)


def check_sumsq_and_scale(cb, rng, n):
    a = rng.standard_normal(n).astype(np.float32)
    dev = cb.asarray(a)
    assert cb.sumsq(dev) == pytest.approx(float(np.dot(a.astype(np.float64), a)), rel=RTOL)
    cb.scale_(dev, 0.5)
    close(cb.to_host(dev), a.astype(np.float64) * 0.5)


def device_scalar(cb, value):
    return cb.asarray(np.array([value], np.float32))


# Tensor lengths of one multi-tensor launch: empty, one element, either side of a block's
# 1024-element chunk, and several chunks.
MANY_SIZES = [5, 0, 1, 1023, 1024, 1025, 3 * 1024 + 7, 100_003]
# kind -> (buffers per tensor after param and grad, option tuples: the single update's after lr)
MANY_KINDS = {
    "sgd": (1, [(0.9, True, 1e-2), (0.0, False, 0.0)]),
    "adam": (2, [(0.9, 0.999, 1e-8, 1e-2, True), (0.8, 0.99, 1e-6, 1e-2, False)]),
    "rmsprop": (3, [(0.99, 1e-8, 1e-2, 0.9, True), (0.9, 1e-6, 0.0, 0.0, False)]),
}


def many_tensors(cb, rng, kind, sizes):
    """A tensor of each length in ``sizes``, (param, grad, state...), twice: on the device for
    single-tensor updates and for one multi-tensor update, the same values."""
    extra = MANY_KINDS[kind][0]
    host = []
    for n in sizes:
        arrays = [rng.standard_normal(n).astype(np.float32) for _ in range(2 + extra)]
        if kind == "rmsprop":  # square_avg above grad_avg squared, as a centered average keeps it
            arrays[2] = np.abs(arrays[2]) + arrays[3] ** 2
        host.append(arrays)
    return ([tuple(cb.asarray(a) for a in arrays) for arrays in host] for _ in range(2))


def single_update(cb, kind, tensor, lr, options, step, hyper=None, guard=None):
    if kind == "sgd":
        cb.sgd_update(*tensor, lr, *options, hyper=hyper, guard=guard)
    elif kind == "adam":
        cb.adam_update(*tensor, lr, *options[:4], step, options[4], hyper=hyper, guard=guard)
    else:
        cb.rmsprop_update(*tensor, lr, *options, hyper=hyper, guard=guard)


def many_update(cb, kind, tensors, lr, options, step, hyper=None, guard=None):
    if kind == "sgd":
        cb.sgd_update_many(tensors, lr, *options, hyper=hyper, guard=guard)
    elif kind == "adam":
        cb.adam_update_many(tensors, lr, *options[:4], step, options[4], hyper=hyper, guard=guard)
    else:
        cb.rmsprop_update_many(tensors, lr, *options, hyper=hyper, guard=guard)


def assert_tensors_equal(cb, got, want):
    for t, (a_tensor, b_tensor) in enumerate(zip(got, want)):
        for j, (a, b) in enumerate(zip(a_tensor, b_tensor)):
            np.testing.assert_array_equal(cb.to_host(a), cb.to_host(b), err_msg=f"tensor {t}, buffer {j}")


def check_many_update(cb, rng, kind, option, sizes):
    """A multi-tensor update of tensors of ``sizes`` is their single updates' bits, in one launch."""
    options = MANY_KINDS[kind][1][option]
    singles, many = many_tensors(cb, rng, kind, sizes)
    for step in (1, 2):
        lr = 0.01 * step
        for tensor in singles:
            single_update(cb, kind, tensor, lr, options, step)
        with trace() as t:
            many_update(cb, kind, many, lr, options, step)
        assert t.launches == [f"{kind}_update_many"]
    assert_tensors_equal(cb, many, singles)


def check_many_update_from_hyper(cb, rng, kind, sizes):
    """Each tensor reads its row of ``hyper`` as the single updates read theirs: rows that differ
    per tensor (its own step, as a replayed step's tensors may have), from a (tensors, 3) array,
    as TrainStep's capture hands a batch its rows; a non-finite loss changes nothing."""
    options = MANY_KINDS[kind][1][0]
    singles, many = many_tensors(cb, rng, kind, sizes)
    rows = np.zeros((len(sizes), 3), np.float32)
    for t in range(len(sizes)):
        lr = 0.01 * (t + 1)
        values = cb.adam_hyper(lr, *options[:2], t + 1) if kind == "adam" else (lr,)
        rows[t, :len(values)] = values
    hyper, finite = cb.asarray(rows), device_scalar(cb, 0.25)
    for t, tensor in enumerate(singles):
        single_update(cb, kind, tensor, None, options, None, hyper=hyper[t, :3 if kind == "adam" else 1],
                      guard=finite)
    many_update(cb, kind, many, None, options, None, hyper=hyper, guard=finite)
    assert_tensors_equal(cb, many, singles)
    before = [tuple(cb.to_host(a) for a in tensor) for tensor in many]
    many_update(cb, kind, many, None, options, None, hyper=hyper, guard=device_scalar(cb, np.nan))
    for tensor, was in zip(many, before):  # a non-finite loss: nothing changes
        for a, b in zip(tensor, was):
            np.testing.assert_array_equal(cb.to_host(a), b)


def check_clip_bits(cb, rng, trials):
    """``clip_`` over many norms and limits scales by the bits the host computes, as a float
    computation of the scale would not now and then; and not at all after a non-finite loss."""
    finite, nan = device_scalar(cb, 0.5), device_scalar(cb, np.nan)
    for trial in range(trials):
        host = [(rng.standard_normal(n) * 10 ** rng.uniform(-3, 3)).astype(np.float32) for n in (3, 1030)]
        max_norm = float(10 ** rng.uniform(-2, 2))
        eager, device = ([cb.asarray(a) for a in host] for _ in range(2))
        norm = math.sqrt(cb.sumsq(*eager))  # as gpubp.optim.clip_grad_norm computes the scale
        if max_norm / (norm + 1e-6) < 1:
            cb.scale_many(eager, max_norm / (norm + 1e-6))
        norm_sq = cb.empty((1,))
        cb.clip_(device, max_norm, norm_sq, nan)
        for a, was in zip(device, host):
            np.testing.assert_array_equal(cb.to_host(a), was)
        cb.clip_(device, max_norm, norm_sq, finite)
        for a, b in zip(device, eager):
            np.testing.assert_array_equal(cb.to_host(a), cb.to_host(b), err_msg=f"trial {trial}, max_norm {max_norm}")
    # A non-finite norm scales as torch's clip_grad_norm_ does: NaN makes every gradient NaN, inf
    # scales by 0 (an infinite element becomes NaN).
    for bad in (np.nan, np.inf):
        host = [np.array([1.0, bad, -2.0], np.float32), np.ones(1030, np.float32)]
        device = [cb.asarray(a) for a in host]
        cb.clip_(device, 1.0, cb.empty((1,)), finite)
        scale = np.float32(1.0 / (bad + 1e-6))  # nan, or 0
        with np.errstate(invalid="ignore"):  # inf x 0
            want = [was * scale for was in host]
        for a, w in zip(device, want):
            np.testing.assert_array_equal(cb.to_host(a), w, err_msg=f"a norm of {bad}")


@pytest.mark.parametrize("option", [0, 1])
@pytest.mark.parametrize("kind", list(MANY_KINDS))
def test_multi_tensor_updates_are_the_single_updates_bitwise(cb, rng, kind, option):
    check_many_update(cb, rng, kind, option, MANY_SIZES)


@pytest.mark.parametrize("kind", list(MANY_KINDS))
def test_multi_tensor_updates_read_each_tensors_row_of_hyper(cb, rng, kind):
    check_many_update_from_hyper(cb, rng, kind, MANY_SIZES)


def test_clipping_on_the_device_scales_by_the_bits_the_host_computes(cb, rng):
    check_clip_bits(cb, rng, 64)


@pytest.mark.parametrize("momentum, nesterov, weight_decay", SGD_CASES)
def test_sgd_update_matches_numpy(cb, rng, momentum, nesterov, weight_decay):
    check_sgd_update(cb, rng, 1031, momentum, nesterov, weight_decay)


@pytest.mark.parametrize("decoupled, weight_decay", ADAM_CASES)
def test_adam_update_matches_numpy(cb, rng, decoupled, weight_decay):
    check_adam_update(cb, rng, 1031, decoupled, weight_decay)


@pytest.mark.parametrize("momentum, centered, weight_decay", RMSPROP_CASES)
def test_rmsprop_update_matches_numpy(cb, rng, momentum, centered, weight_decay):
    check_rmsprop_update(cb, rng, 1031, momentum, centered, weight_decay)


@pytest.mark.parametrize("n", [1, 1031, 3_000_001])
def test_sumsq_and_scale(cb, rng, n):
    check_sumsq_and_scale(cb, rng, n)


# ----------------------------------------------------------------------------- integration


def test_auto_device_picks_cupy(cb):
    assert backends.resolve("auto", "auto") == "cupy"


def test_fit_learns_a_separable_problem_on_cupy(cb, rng):
    centers = 4 * rng.standard_normal((3, 8))
    labels = rng.integers(0, 3, 600)
    x = (centers[labels] + rng.standard_normal((600, 8))).astype(np.float32)
    model = gb.Sequential(
        [gb.Dense(8, 32, activation="gelu"), gb.Dense(32, 32, activation="relu"), gb.Dense(32, 3)],
        backend="cupy",
    )
    model.fit(x, labels, loss="cross_entropy", optimizer=gb.optim.Adam(model.parameters(), lr=1e-2),
              epochs=30, batch_size=64, verbose=0)
    predicted = np.argmax(cb.to_host(cb.asarray(model.predict(x))), axis=1)
    assert np.mean(predicted == labels) > 0.95


def test_nvrtc_builds_the_kernels_a_model_launches_for_its_activations_alone(cb, rng, monkeypatch, tmp_path):
    """With GPUBP_NVRTC_ACTIVATIONS unset (gpu_check.sh sets "all", so its other tests load the
    whole-set modules it compiled first), a model's fp32 forward kernel and fused MLP kernels are
    built for the activations it launches, and train as the NumPy backend does."""
    monkeypatch.delenv(cb.NVRTC_ACTIVATIONS_ENV, raising=False)
    monkeypatch.setenv(cb.AOT_ENV, str(tmp_path))  # no fatbins: NVRTC builds everything
    for cache in ("_rawmodules", "_functions"):
        monkeypatch.setattr(cb, cache, {})
    x, labels = rng.standard_normal((70, 13)).astype(np.float32), rng.integers(0, 5, 70)
    for fused, act in ((False, "gelu"), (True, "silu")):
        models = [gb.Sequential([gb.Dense(13, 24, act), gb.Dense(24, 5)], backend=backend, fused=fused)
                  for backend, fused in (("cupy", fused), ("numpy", "auto"))]
        models[0].set_weights(models[1].get_weights())
        losses = [model.train_step("cross_entropy", gb.optim.SGD(model.parameters(), lr=0.1))(x, labels)
                  for model in models]
        assert abs(losses[0] - losses[1]) <= RTOL * abs(losses[1])
        for got, want in zip(*(model.get_weights() for model in models)):
            close(got, want.astype(np.float64))
    parts = {part for _, _, part in cb._rawmodules}
    assert {"dense_fwd_128x64:identity", "dense_fwd_128x64:gelu", "fused_mlp_fwd:identity+silu",
            "fused_mlp_bwd:identity+silu"} <= parts
    assert not parts & set(cb.ACT_KERNELS)  # no kernel built for every activation it serves


@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_cupy_and_numba_backends_share_arrays(cb, rng, act):
    try:
        nb = backends.get("numba")
    except RuntimeError as exc:
        pytest.skip(str(exc))
    x, w, b = (cb.asarray(a) for a in layer(rng, 37, 29, 23))
    y_nb, z_nb = nb.dense_forward(x, w, b, act)
    assert cb.is_array(y_nb)
    y_cb, z_cb = cb.dense_forward(x, w, b, act)
    close(cb.to_host(y_nb), cb.to_host(y_cb).astype(np.float64))
    dy = cb.asarray(rng.standard_normal((37, 23)).astype(np.float32))
    # numba's forward output feeds the cupy backward, and the other way round.
    grads_cb = cb.dense_backward(dy, x, w, y_nb, z_nb, act, True, True)
    grads_nb = nb.dense_backward(dy, x, w, y_cb, z_cb, act, True, True)
    for got, want in zip(grads_nb, grads_cb):
        assert cb.is_array(got)
        close(cb.to_host(got), cb.to_host(want).astype(np.float64))
