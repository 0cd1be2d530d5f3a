"""Every CUDA C++ kernel in ``kernels/``, run on the CPU against the NumPy backend.

The CuPy backend itself runs here, with ``tests/cuda_on_cpu``'s stand-in for CuPy: its
launch geometry, tile and split-K choices, workspaces and argument lists are the ones a GPU
gets, and the kernels are the shipped sources (or ``GPUBP_KERNEL_DIR``'s) compiled by g++.
Two simulated GPUs pick the two code paths: 132 SMs (an H100: 64x64 tiles, split-K for
small layers with large batches) and 1 SM (128x128 tiles, no split).

The process's harness mode (``GPUBP_HARNESS_MODE``) is plain unless this file runs inside
``test_kernels_are_clean_under_sanitizer``, which reruns it in a child process under
AddressSanitizer + UBSan and under ThreadSanitizer; there the shapes shrink (each still
runs every kernel, both tile sizes, split-K and a misaligned operand) to keep CI fast.
Tolerances are the GPU tests' (``tests/test_cupy_backend.py``): 1e-4 relative to the
reference's largest magnitude, against the NumPy backend in float64.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cuda_on_cpu import harness
from gpubp import backends
from gpubp.activations import ACTIVATIONS, NEEDS_Z
from gpubp.backends import cupy_backend
from gpubp.backends import numpy_backend as ref
from gpubp.trace import trace

pytestmark = pytest.mark.skipif(shutil.which(harness.CXX) is None, reason=f"no C++ compiler ({harness.CXX})")

MODE = harness.current_mode()
SANITIZED = MODE != "plain"
RTOL = 1e-4
H100_SMS = 132

# (batch, in, out), none a multiple of any tile; with 132 SMs, (600, 37, 29) and (1100, 13, 7)
# split the dW batch 2 and 4 ways; (130, 257, 65) spans several tiles of either size.
SHAPES = [(1, 1, 1), (19, 13, 7), (37, 29, 23), (130, 257, 65), (600, 37, 29), (1100, 13, 7)]
BACKWARD_NEEDS = [(True, True), (True, False), (False, True)]
TF32_SHAPES = SHAPES + [(70, 200, 130)]
if SANITIZED:  # every kernel, both tile sizes, split-K; the rest of the matrix runs plain
    SHAPES = [(37, 29, 23), (600, 37, 29)]
    BACKWARD_NEEDS = [(True, True)]
    TF32_SHAPES = SHAPES
LOSS_SHAPES = [(1, 1), (37, 10), (5, 1000), (300, 3)] if not SANITIZED else [(1, 1), (37, 40)]
VECTOR_SIZES = [1, 1031, 9001] if not SANITIZED else [1, 5001]


def close(actual, expected, rtol=RTOL):
    actual = np.asarray(actual, np.float64)
    scale = max(float(np.max(np.abs(expected))), 1e-30) if np.size(expected) else 1.0
    err = float(np.max(np.abs(actual - expected))) / scale if np.size(expected) else 0.0
    assert err <= rtol, f"max error {err:.3g} relative to max |reference| {scale:.3g}"


PREBUILD_ENV = "GPUBP_HARNESS_PREBUILD"  # "0": compile each kernel file on first use only


@pytest.fixture(scope="module")
def cpu_harness():
    h = harness.Harness()
    if os.environ.get(PREBUILD_ENV) != "0":  # all files at once, one compiler per core
        h.prebuild({Path(f).stem: cupy_backend.kernel_source(f) for f in cupy_backend.KERNEL_FILES})
    return h


def cupy_on_cpu(cpu_harness, monkeypatch, sms: int):
    """The CuPy backend, running on the CPU harness, seeing a GPU with this many SMs."""
    monkeypatch.setattr(cupy_backend, "cupy", harness.cupy_shim(cpu_harness, sms=sms))
    for cache in ("_rawmodules", "_functions", "_device_state", "origin"):
        monkeypatch.setattr(cupy_backend, cache, {})
    # Models built with backend="cupy" get it too, whatever an earlier test found unavailable.
    monkeypatch.setitem(backends._modules, "cupy", cupy_backend)
    monkeypatch.delitem(backends._unavailable, "cupy", raising=False)
    return cupy_backend


@pytest.fixture(params=[H100_SMS, 1], ids=["132sms", "1sm"])
def cb(request, cpu_harness, monkeypatch):
    """Both GEMM paths: 132 SMs picks 64x64 tiles and split-K, 1 SM the 128x128 tiles."""
    return cupy_on_cpu(cpu_harness, monkeypatch, request.param)


@pytest.fixture
def cb_h100(cpu_harness, monkeypatch):
    """For kernels whose launch does not depend on the SM count (TF32, losses)."""
    return cupy_on_cpu(cpu_harness, monkeypatch, H100_SMS)


@pytest.fixture
def cb_small_gpu(cpu_harness, monkeypatch):
    """One SM caps elementwise grids at 16 blocks, so the optimizer kernels' grid-stride loops run."""
    return cupy_on_cpu(cpu_harness, monkeypatch, 1)


def layer(rng, batch, n_in, n_out):
    x = rng.standard_normal((batch, n_in)).astype(np.float32)
    w = (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)
    b = rng.standard_normal(n_out).astype(np.float32)
    return x, w, b


def f64(*arrays):
    return [None if a is None else a.astype(np.float64) for a in arrays]


def shape_id(shape):
    return "x".join(map(str, shape))


# ----------------------------------------------------------------------------- the kernel set


def launched_kernel_names() -> set[str]:
    """Every kernel name the backend can launch: what the parametrizations below cover."""
    names = {"ce_fwd_bwd_i32", "ce_fwd_bwd_i64", "mse_fwd_bwd", "bce_fwd_bwd", "sgd_update", "adam_update",
             "sumsq", "scale_inplace"}
    for act in ACTIVATIONS:
        names |= {f"dense_{kind}_tf32_{act}" for kind in ("fwd", "dx", "dw")}
        for tile in cupy_backend.GEMM_TILES:
            names |= {f"dense_{kind}_{act}_{tile}x{tile}" for kind in ("fwd", "dx", "dw")}
    return names


def test_the_tests_cover_every_extern_c_kernel(cpu_harness):
    shipped = set()
    for filename in cupy_backend.KERNEL_FILES:
        shipped |= set(cpu_harness.module(cupy_backend.kernel_source(filename), Path(filename).stem).kernel_names())
    assert shipped == launched_kernel_names()


# ----------------------------------------------------------------------------- dense layer


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_dense_forward_matches_numpy(cb, rng, act, shape):
    x, w, b = layer(rng, *shape)
    y_ref, z_ref = ref.dense_forward(*f64(x, w, b), act)
    with trace() as t:
        y, z = cb.dense_forward(cb.asarray(x), cb.asarray(w), cb.asarray(b), act)
    assert t.launches == ["dense_fwd"]
    close(cb.to_host(y), y_ref)
    if act in NEEDS_Z:
        close(cb.to_host(z), z_ref)
    else:
        assert z is None


# The documented TF32 bound (kernels/dense_forward_tf32.cu): 2e-3 relative to the largest
# pre-activation on N(0, 1) data. An activation moves it by at most its steepest slope (1.13,
# gelu's), so every output is checked against 2e-3 x 1.13 x max |z|.
TF32_RTOL = 2e-3
STEEPEST_SLOPE = 1.13


@pytest.mark.parametrize("shape", TF32_SHAPES, ids=shape_id)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_tf32_dense_forward_is_within_its_error_bound(cb_h100, rng, act, shape):
    x = rng.standard_normal(shape[:2]).astype(np.float32)
    w = rng.standard_normal(shape[1:]).astype(np.float32)
    b = rng.standard_normal(shape[2]).astype(np.float32)
    y_ref, _ = ref.dense_forward(*f64(x, w, b), act)
    z_ref, _ = ref.dense_forward(*f64(x, w, b), "identity")
    y, z = cb_h100.dense_forward(cb_h100.asarray(x), cb_h100.asarray(w), cb_h100.asarray(b), act, precision="tf32")
    bound = TF32_RTOL * float(np.max(np.abs(z_ref)))
    assert np.max(np.abs(cb_h100.to_host(y) - y_ref)) <= STEEPEST_SLOPE * bound
    if act in NEEDS_Z:
        assert np.max(np.abs(cb_h100.to_host(z) - z_ref)) <= bound


@pytest.mark.parametrize("shape", TF32_SHAPES, ids=shape_id)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_tf32_dense_backward_is_within_its_error_bound(cb_h100, rng, act, shape):
    x = rng.standard_normal(shape[:2]).astype(np.float32)
    w = rng.standard_normal(shape[1:]).astype(np.float32)
    b = rng.standard_normal(shape[2]).astype(np.float32)
    y64, z64 = ref.dense_forward(*f64(x, w, b), act)
    dy = rng.standard_normal(y64.shape).astype(np.float32)
    y, z = y64.astype(np.float32), None if z64 is None else z64.astype(np.float32)
    dx_ref, dw_ref, db_ref = ref.dense_backward(*f64(dy, x, w, y, z), act, True, True)
    dev = [None if a is None else cb_h100.asarray(a) for a in (dy, x, w, y, z)]
    with trace() as t:
        dx, dw, db = cb_h100.dense_backward(*dev, act, True, True, precision="tf32")
    assert t.launches == cb_h100.backward_kernels(act, True, True)
    close(cb_h100.to_host(dx), dx_ref, TF32_RTOL)
    close(cb_h100.to_host(dw), dw_ref, TF32_RTOL)
    close(cb_h100.to_host(db), db_ref)  # summed in fp32 from the unrounded dz


def test_tf32_forward_rounds_its_inputs(cb_h100, rng):
    """Not an fp32 kernel in disguise: inputs that TF32 cannot hold come out rounded."""
    x = np.full((3, 1), 1.0 + 2.0**-12, np.float32)  # 1 + 2^-12 rounds to 1 in TF32
    w = np.ones((1, 2), np.float32)
    y, _ = cb_h100.dense_forward(cb_h100.asarray(x), cb_h100.asarray(w), cb_h100.zeros((2,)), "identity", precision="tf32")
    assert np.array_equal(cb_h100.to_host(y), np.ones((3, 2), np.float32))
    y, _ = cb_h100.dense_forward(cb_h100.asarray(x), cb_h100.asarray(w), cb_h100.zeros((2,)), "identity")
    assert np.array_equal(cb_h100.to_host(y), np.full((3, 2), 1.0 + 2.0**-12, np.float32))


@pytest.mark.parametrize("need_dx, need_dw", BACKWARD_NEEDS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_dense_backward_matches_numpy(cb, rng, act, shape, need_dx, need_dw):
    x, w, b = layer(rng, *shape)
    y64, z64 = ref.dense_forward(*f64(x, w, b), act)
    dy = rng.standard_normal(y64.shape).astype(np.float32)
    y, z = y64.astype(np.float32), None if z64 is None else z64.astype(np.float32)
    # The reference differentiates at the same float32 y/z the kernel reads.
    want = ref.dense_backward(*f64(dy, x, w, y, z), act, need_dx, need_dw)
    dev = [None if a is None else cb.asarray(a) for a in (dy, x, w, y, z)]
    with trace() as t:
        got = cb.dense_backward(*dev, act, need_dx, need_dw)
    assert t.launches == cb.backward_kernels(act, need_dx, need_dw)
    for g, expected in zip(got, want):
        if expected is None:
            assert g is None
        else:
            close(cb.to_host(g), expected)


def test_a_softmax_output_layer_matches_numpy(cb_h100, rng):
    x, w, b = layer(rng, 37, 29, 11)
    y_ref, _ = ref.dense_forward(*f64(x, w, b), "softmax")
    y, _ = cb_h100.dense_forward(cb_h100.asarray(x), cb_h100.asarray(w), cb_h100.asarray(b), "softmax")
    close(cb_h100.to_host(y), y_ref)
    dy = rng.standard_normal(y_ref.shape).astype(np.float32)
    want = ref.dense_backward(*f64(dy, x, w, cb_h100.to_host(y), None), "softmax", True, True)
    for got, expected in zip(cb_h100.dense_backward(cb_h100.asarray(dy), cb_h100.asarray(x), cb_h100.asarray(w), y, None, "softmax",
                                               True, True), want):
        close(cb_h100.to_host(got), expected)


def test_split_k_path_is_taken_and_is_bitwise_deterministic(cb_h100, rng):
    x, w, b = layer(rng, 1100, 13, 7)
    assert cb_h100._dw_split(1100, 1)[0] == 4
    y, _ = cb_h100.dense_forward(cb_h100.asarray(x), cb_h100.asarray(w), cb_h100.asarray(b), "tanh")
    dy = cb_h100.asarray(rng.standard_normal((1100, 7)).astype(np.float32))
    runs = [cb_h100.dense_backward(dy, cb_h100.asarray(x), cb_h100.asarray(w), y, None, "tanh", False, True)
            for _ in range(3)]
    for _, dw, db in runs[1:]:
        assert np.array_equal(cb_h100.to_host(dw), cb_h100.to_host(runs[0][1]))
        assert np.array_equal(cb_h100.to_host(db), cb_h100.to_host(runs[0][2]))
    assert not cb_h100.to_host(cb_h100._state()["tickets"]).any(), "the last block of each tile resets its ticket"


@pytest.mark.parametrize("n_in, n_out", [(4, 5), (8, 127), (12, 129), (5, 4)])
def test_misaligned_operands_take_the_scalar_path(cb, rng, n_in, n_out):
    """Views that start one float past a 16-byte boundary (as ``flat[1:]`` slices do) must not be
    read or written as float4: under UBSan that is a misaligned access, on a GPU a fault."""
    batch = 37
    x, w, b = layer(rng, batch, n_in, n_out)
    x_dev, w_dev = harness.to_device(x, offset_bytes=4), harness.to_device(w, offset_bytes=4)
    y_out = harness.device_empty((batch, n_out), offset_bytes=4)
    z_out = harness.device_empty((batch, n_out), offset_bytes=4)
    y, z = cb.dense_forward(x_dev, w_dev, cb.asarray(b), "gelu", out=y_out, out_z=z_out)
    assert y is y_out and z is z_out
    y_ref, z_ref = ref.dense_forward(*f64(x, w, b), "gelu")
    close(cb.to_host(y), y_ref)
    close(cb.to_host(z), z_ref)
    dy = rng.standard_normal((batch, n_out)).astype(np.float32)
    want = ref.dense_backward(*f64(dy, x, w, None, cb.to_host(z)), "gelu", True, True)
    outs = [harness.device_empty(s, offset_bytes=4) for s in ((batch, n_in), (n_in, n_out), (n_out,))]
    got = cb.dense_backward(harness.to_device(dy, offset_bytes=4), x_dev, w_dev, None, z, "gelu", True, True, *outs)
    for g, expected in zip(got, want):
        close(cb.to_host(g), expected)


# ----------------------------------------------------------------------------- losses


@pytest.mark.parametrize("label_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("shape", LOSS_SHAPES, ids=shape_id)
def test_softmax_cross_entropy_matches_numpy(cb_h100, rng, shape, label_dtype):
    logits = (5 * rng.standard_normal(shape)).astype(np.float32)
    labels = rng.integers(0, shape[1], shape[0]).astype(label_dtype)
    if shape[1] > 1:  # a masked logit in every row, never the label's
        logits[np.arange(shape[0]), (labels + 1) % shape[1]] = -np.inf
    loss_ref, grad_ref = ref.softmax_cross_entropy(logits.astype(np.float64), labels)
    with trace() as t:
        loss, grad = cb_h100.softmax_cross_entropy(cb_h100.asarray(logits), cb_h100.asarray(labels))
    assert t.launches == ["ce_fwd_bwd"]
    assert loss == pytest.approx(loss_ref, rel=RTOL, abs=1e-6)
    close(cb_h100.to_host(grad), grad_ref)


@pytest.mark.parametrize("shape", LOSS_SHAPES, ids=shape_id)
@pytest.mark.parametrize("name, trace_name", [("mse", "mse_fwd_bwd"), ("bce", "bce_fwd_bwd")])
def test_elementwise_losses_match_numpy(cb_h100, rng, name, trace_name, shape):
    pred = (3 * rng.standard_normal(shape)).astype(np.float32)
    target = rng.random(shape).astype(np.float32)
    loss_ref, grad_ref = getattr(ref, name)(*f64(pred, target))
    with trace() as t:
        loss, grad = getattr(cb_h100, name)(cb_h100.asarray(pred), cb_h100.asarray(target))
    assert t.launches == [trace_name]
    assert loss == pytest.approx(loss_ref, rel=RTOL)
    close(cb_h100.to_host(grad), grad_ref)


def test_losses_are_finite_for_huge_logits(cb_h100):
    logits = np.array([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4]], np.float32)
    labels = np.array([1, 2], np.int64)
    loss_ref, grad_ref = ref.softmax_cross_entropy(logits.astype(np.float64), labels)
    loss, grad = cb_h100.softmax_cross_entropy(cb_h100.asarray(logits), cb_h100.asarray(labels))
    assert loss == pytest.approx(loss_ref, rel=RTOL)
    close(cb_h100.to_host(grad), grad_ref)
    target = np.array([[0.0, 1.0, 0.5], [1.0, 0.0, 0.5]], np.float32)
    loss_ref, grad_ref = ref.bce(*f64(logits, target))
    loss, grad = cb_h100.bce(cb_h100.asarray(logits), cb_h100.asarray(target))
    assert loss == pytest.approx(loss_ref, rel=RTOL)
    close(cb_h100.to_host(grad), grad_ref)


# ----------------------------------------------------------------------------- optimizers


@pytest.mark.parametrize("n", VECTOR_SIZES)
@pytest.mark.parametrize("momentum, nesterov, weight_decay", [(0.0, False, 0.0), (0.9, False, 1e-2), (0.9, True, 0.0)])
def test_sgd_update_matches_numpy(cb_small_gpu, rng, n, momentum, nesterov, weight_decay):
    p, g = (rng.standard_normal(n).astype(np.float32) for _ in range(2))
    v = rng.standard_normal(n).astype(np.float32) if momentum else None
    p_ref, v_ref = f64(p, v)
    p_dev, v_dev = cb_small_gpu.asarray(p), None if v is None else cb_small_gpu.asarray(v)
    for _ in range(2):
        ref.sgd_update(p_ref, g.astype(np.float64), v_ref, 0.1, momentum, nesterov, weight_decay)
        with trace() as t:
            cb_small_gpu.sgd_update(p_dev, cb_small_gpu.asarray(g), v_dev, 0.1, momentum, nesterov, weight_decay)
        assert t.launches == ["sgd_update"]
    close(cb_small_gpu.to_host(p_dev), p_ref)
    if v is not None:
        close(cb_small_gpu.to_host(v_dev), v_ref)


@pytest.mark.parametrize("n", VECTOR_SIZES)
@pytest.mark.parametrize("decoupled, weight_decay", [(False, 0.0), (False, 1e-2), (True, 1e-2)])
def test_adam_update_matches_numpy(cb_small_gpu, rng, n, decoupled, weight_decay):
    p, g = (rng.standard_normal(n).astype(np.float32) for _ in range(2))
    state_ref = [p.astype(np.float64), np.zeros(n), np.zeros(n)]
    state_dev = [cb_small_gpu.asarray(p), cb_small_gpu.zeros((n,)), cb_small_gpu.zeros((n,))]
    for step in range(1, 3):
        grad = g * step
        ref.adam_update(state_ref[0], grad.astype(np.float64), state_ref[1], state_ref[2],
                        1e-2, 0.9, 0.999, 1e-8, weight_decay, step, decoupled)
        cb_small_gpu.adam_update(state_dev[0], cb_small_gpu.asarray(grad), state_dev[1], state_dev[2],
                       1e-2, 0.9, 0.999, 1e-8, weight_decay, step, decoupled)
    for got, want in zip(state_dev, state_ref):
        close(cb_small_gpu.to_host(got), want)


@pytest.mark.parametrize("n", VECTOR_SIZES)
def test_sumsq_and_scale_match_numpy(cb_small_gpu, rng, n):
    a = rng.standard_normal(n).astype(np.float32)
    dev = cb_small_gpu.asarray(a)
    assert cb_small_gpu.sumsq(dev) == pytest.approx(float(np.dot(a.astype(np.float64), a)), rel=RTOL)
    cb_small_gpu.scale_(dev, 0.5)
    close(cb_small_gpu.to_host(dev), a.astype(np.float64) * 0.5)


# ----------------------------------------------------------------------------- a whole model


@pytest.mark.skipif(SANITIZED, reason="the training loop adds no kernel; the parity tests above cover them")
def test_a_model_trains_on_the_cupy_backend_as_on_numpy(cb, rng):
    import gpubp as gb

    x = rng.standard_normal((96, 8)).astype(np.float32)
    labels = rng.integers(0, 3, 96)
    losses = {}
    for backend in ("numpy", "cupy"):
        gb.seed(7)
        model = gb.Sequential([gb.Dense(8, 16, activation="gelu"), gb.Dense(16, 3)], backend=backend)
        history = model.fit(x, labels, loss="cross_entropy", optimizer=gb.optim.Adam(model.parameters(), lr=1e-2),
                            epochs=3, batch_size=32, verbose=0)
        losses[backend] = history.history["loss"]
    np.testing.assert_allclose(losses["cupy"], losses["numpy"], rtol=1e-4)


# ----------------------------------------------------------------------------- sanitizers


@pytest.mark.skipif(SANITIZED, reason="runs from the plain-mode process")
@pytest.mark.parametrize("mode", ["asan", "tsan"])
def test_kernels_are_clean_under_sanitizer(mode):
    """This file again, in a child process under the sanitizer: any out-of-bounds access,
    misaligned vector access, undefined behaviour or data race fails it with the report."""
    done = subprocess.run(
        # -s: a sanitizer ends the process on its first report, so pytest must not hold stderr.
        [sys.executable, "-m", "pytest", __file__, "-q", "-x", "-s", "-p", "no:cacheprovider"],
        env=harness.sanitizer_env(mode), capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, f"{mode}:\n{done.stdout[-8000:]}\n{done.stderr[-8000:]}"


# ----------------------------------------------------------------------------- planted bugs
#
# The harness is only worth its CI time if it catches real kernel bugs. Each case plants one in
# a copy of kernels/ (GPUBP_KERNEL_DIR points the backend there) and reruns part of this file
# in the mode that should catch it: the run must fail, for the expected reason.
PLANTED_BUGS = {
    "removed __syncthreads": (
        "gemm_tile.cuh",
        "            b.store(tid, Bs[cur ^ 1]);\n        }\n        __syncthreads();\n",
        "            b.store(tid, Bs[cur ^ 1]);\n        }\n",
        "tsan", "dense_forward_matches and 132sms and relu and 37x29x23", "data race"),
    "off-by-one store guard": (
        "gemm_tile.cuh",
        "if (j < valid) p[idx + j] = v[j];",
        "if (j <= valid) p[idx + j] = v[j];",
        "asan", "dense_forward_matches and 132sms and identity and 37x29x23", "heap-buffer-overflow"),
    "wrong shuffle offset": (
        "reduce.cuh",
        "for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(FULL_WARP, v, offset);",
        "for (int offset = 8; offset > 0; offset /= 2) v += __shfl_xor_sync(FULL_WARP, v, offset);",
        "plain", "elementwise_losses and mse", "max error|assert"),
    "wrong mma fragment index": (
        "gemm_tf32.cuh",
        "a[i][2] = __float_as_uint(tile[g * T::LDA + t + 4]);",
        "a[i][2] = __float_as_uint(tile[g * T::LDA + t]);",
        "plain", "tf32_dense_forward and identity and 37x29x23", "assert"),
}


@pytest.mark.skipif(SANITIZED, reason="runs from the plain-mode process")
@pytest.mark.parametrize("bug", PLANTED_BUGS)
def test_a_planted_kernel_bug_fails_the_suite(bug, tmp_path):
    filename, correct, planted, mode, selection, reason = PLANTED_BUGS[bug]
    kernels = tmp_path / "kernels"
    shutil.copytree(cupy_backend.kernel_dir(), kernels)
    source = (kernels / filename).read_text()
    assert source.count(correct) == 1, f"the code to plant {bug!r} in has changed; update PLANTED_BUGS"
    (kernels / filename).write_text(source.replace(correct, planted))
    env = {**harness.sanitizer_env(mode), cupy_backend.KERNEL_DIR_ENV: str(kernels), PREBUILD_ENV: "0"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-x", "-s", "-p", "no:cacheprovider", "-k", selection],
        env=env, capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    output = done.stdout + done.stderr
    assert done.returncode != 0, f"{bug} went unnoticed in {mode} mode:\n{output[-4000:]}"
    assert re.search(reason, output), f"{bug} failed, but not for the expected reason ({reason}):\n{output[-4000:]}"
