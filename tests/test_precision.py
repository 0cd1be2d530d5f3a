"""``Sequential(precision=...)``: "tf32" selects the TF32 tensor-core kernels on the cupy backend
(run here on the CPU kernel harness), is an fp32 no-op elsewhere, and survives slicing,
``replace_head`` and save/load. The kernels' error bound is tested in test_kernels_on_cpu.py."""

from __future__ import annotations

import shutil
from collections import Counter

import numpy as np
import pytest
from cuda_on_cpu import harness
from test_kernels_on_cpu import cupy_on_cpu

import gpubp as gb
from gpubp import finetune as ft


def model(precision="fp32", backend="numpy", fused="auto"):
    gb.seed(3)
    return gb.Sequential([gb.Dense(20, 33, activation="gelu"), gb.Dense(33, 5)], backend=backend,
                         precision=precision, fused=fused)


def test_precision_defaults_to_fp32_and_rejects_unknown_values_naming_the_argument():
    assert model().precision == "fp32"
    with pytest.raises(ValueError, match=r"precision: expected one of \('fp32', 'tf32', 'bf16'\), got 'fp16'"):
        model("fp16")
    m = model()
    before = m.get_weights()
    with pytest.raises(ValueError, match="precision"):
        m.precision = "fp16"
    assert m.precision == "fp32"
    assert all(np.array_equal(a, b) for a, b in zip(before, m.get_weights()))


def test_tf32_on_the_numpy_backend_computes_fp32(rng):
    x = rng.standard_normal((9, 20)).astype(np.float32)
    assert np.array_equal(model("tf32").predict(x), model("fp32").predict(x))


def test_bf16_on_the_numpy_backend_rounds_the_operands_of_every_product(rng):
    """The emulation the bf16 GPU kernels are tested against: x and W rounded to bf16 (nearest
    even) before each product, fp32 accumulation; weights and gradients stay fp32."""
    from gpubp import activations
    from gpubp.backends.numpy_backend import round_bf16

    x = rng.standard_normal((9, 20)).astype(np.float32)
    m, reference = model("bf16"), model("fp32")
    w0, b0, w1, b1 = reference.get_weights()
    h = np.empty((9, 33), np.float32)
    activations.forward("gelu", round_bf16(x) @ round_bf16(w0) + b0, h)
    expected = round_bf16(h) @ round_bf16(w1) + b1
    out = m.forward(x)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    fp32_out = reference.forward(x)
    assert not np.array_equal(out, fp32_out)
    np.testing.assert_allclose(out, fp32_out, atol=1e-2 * 4 * np.abs(fp32_out).max())
    m.backward(gb.losses.cross_entropy(out, rng.integers(0, 5, 9))[1])
    assert all(p.data.dtype == np.float32 and p.grad.dtype == np.float32 for p in m.parameters())


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_precision_survives_slicing_replace_head_and_save_load(tmp_path, suffix):
    m = model("tf32")
    assert m[:1].precision == "tf32"
    assert ft.replace_head(m, out_features=3).precision == "tf32"
    m.save(tmp_path / f"m{suffix}")
    assert gb.load(tmp_path / f"m{suffix}").precision == "tf32"


def test_a_slice_set_to_another_precision_leaves_the_models_kernels_alone(monkeypatch, rng):
    """Slices share their layers; the precision each layer's kernels get is its model's, at the call."""
    from gpubp.backends import numpy_backend

    seen = []
    for name in ("dense_forward", "dense_backward"):
        kernel = getattr(numpy_backend, name)
        monkeypatch.setattr(numpy_backend, name,
                            lambda *args, kernel=kernel, **kwargs: seen.append(args[-1]) or kernel(*args, **kwargs))
    m = model("tf32")
    m[1:].precision = "fp32"
    out = m.forward(rng.standard_normal((9, 20)).astype(np.float32))
    m.backward(gb.losses.cross_entropy(out, rng.integers(0, 5, 9))[1])
    assert m.precision == "tf32" and seen == ["tf32"] * 4


PRECISIONS = ("fp32", "tf32", "bf16")


def plan_and_traced_backward(m, rng):
    """The kernels ``backward_plan()`` lists, and those a training forward's backward launches."""
    plan = m.backward_plan()
    out = m.forward(rng.standard_normal((9, 20)).astype(np.float32))
    _, dout = gb.losses.cross_entropy(out, rng.integers(0, 5, 9))
    with gb.trace() as t:
        m.backward(dout)
    return Counter(kernel for _, kernels in plan for kernel in kernels), t.counts


@pytest.mark.parametrize("precision", PRECISIONS)
def test_backward_plan_lists_what_backward_launches_in_each_precision(precision, rng):
    planned, launched = plan_and_traced_backward(model(precision), rng)
    assert planned == launched
    assert ("round_bf16" in launched) == (precision == "bf16")


@pytest.mark.parametrize("before, after", [(a, b) for a in PRECISIONS for b in PRECISIONS if a != b])
def test_backward_plan_lists_what_backward_launches_after_a_precision_change(before, after, rng):
    m = model(before)
    plan_and_traced_backward(m, rng)
    m.precision = after
    planned, launched = plan_and_traced_backward(m, rng)
    assert planned == launched
    assert ("round_bf16" in launched) == (after == "bf16")


def test_a_precision_change_drops_what_the_last_training_forward_kept(rng):
    """Backward runs in the precision of the forward whose arrays it reads, so it needs a forward in the new one."""
    m = model("fp32")
    out = m.forward(rng.standard_normal((9, 20)).astype(np.float32))
    m.precision = "bf16"
    with pytest.raises(RuntimeError, match=r"run forward\(x\) in training mode first .*set to another precision"):
        m.backward(np.ones_like(out))


def test_setting_the_precision_a_model_has_keeps_what_its_forward_kept(rng):
    m = model("bf16")
    out = m.forward(rng.standard_normal((9, 20)).astype(np.float32))
    m.precision = "bf16"
    m.backward(np.ones_like(out))
    assert all(p.grad is not None for p in m.parameters())


TENSOR_CORE_KERNELS = {
    (False, p): {f"dense_fwd_{p}_gelu", f"dense_fwd_{p}_identity", f"dense_dw_{p}", f"dense_dx_{p}"}
    | ({"round_bf16"} if p == "bf16" else set())
    for p in ("tf32", "bf16")} | {
    (True, p): {f"fused_mlp_fwd_{p}", f"fused_mlp_bwd_{p}", f"fused_mlp_dw_{p}"} for p in ("tf32", "bf16")}


@pytest.mark.skipif(shutil.which(harness.CXX) is None, reason=f"no C++ compiler ({harness.CXX})")
@pytest.mark.parametrize("fused", [False, True], ids=["per_layer", "fused"])
def test_tensor_core_precisions_select_their_kernels_on_the_cupy_backend(monkeypatch, rng, fused):
    """On the CPU kernel harness (tests/cuda_on_cpu), where the CuPy backend runs unchanged."""
    cb = cupy_on_cpu(harness.Harness(), monkeypatch, 132)
    # the names of the kernels launched (every kernel of a file is looked up when it loads)
    launched = harness.record_launches(cb, monkeypatch)
    x = rng.standard_normal((40, 20)).astype(np.float32)
    labels = rng.integers(0, 5, 40)
    outputs = {}
    for precision in ("fp32", "tf32", "bf16"):
        launched.clear()
        m = model(precision, backend="cupy", fused=fused)
        assert m.uses_fused == fused
        out = m.forward(x)
        m.backward(gb.losses.cross_entropy(out, labels)[1])
        outputs[precision] = cb.to_host(out)
        tensor_core = {name for name in launched if "tf32" in name or "bf16" in name}
        assert tensor_core == TENSOR_CORE_KERNELS.get((fused, precision), set())
    for precision, tolerance in (("tf32", 5e-3), ("bf16", 3e-2)):
        assert not np.array_equal(outputs[precision], outputs["fp32"])
        np.testing.assert_allclose(outputs[precision], outputs["fp32"], atol=tolerance * np.abs(outputs["fp32"]).max())


@pytest.mark.skipif(shutil.which(harness.CXX) is None, reason=f"no C++ compiler ({harness.CXX})")
def test_a_bf16_model_loads_on_the_cpu_as_bf16_emulated(monkeypatch, tmp_path, caplog):
    cupy_on_cpu(harness.Harness(), monkeypatch, 132)
    saved = model("bf16", backend="cupy")
    assert saved.uses_fused
    saved.save(tmp_path / "m.npz")
    with caplog.at_level("WARNING", logger="gpubp"):
        loaded = gb.load(tmp_path / "m.npz", device="cpu")
    assert loaded.precision == "bf16" and not caplog.text
    assert all(np.array_equal(a, b) for a, b in zip(saved.get_weights(), loaded.get_weights()))
