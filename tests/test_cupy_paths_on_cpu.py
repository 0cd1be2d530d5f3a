"""How the CuPy backend and the PyTorch bridge drive CuPy, on the CPU stand-in for CuPy 13 and 14.

``tests/test_kernels_on_cpu.py`` checks what the kernels compute on the CPU harness; this file
checks the calls around them that only a GPU run would otherwise exercise: kernel loading and
CUDA-graph capture in ``gpubp/backends/cupy_backend.py``, and the CUDA path of ``gpubp.torch``
(streams, DLPack, who allocates the tensors it returns). The stand-in (``cupy_shim`` in
``tests/cuda_on_cpu/harness.py``) refuses what CuPy and CUDA refuse in each of these respects;
each behaviour has a test here, and a test that the stand-in does refuse the mistake.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import types

import numpy as np
import pytest

from cuda_on_cpu import harness
from test_gpu_check_scripts import H200_SMS, benchmark_layers, load
from test_kernels_on_cpu import cpu_harness, cupy_on_cpu  # noqa: F401  (cpu_harness is a fixture)
import gpubp as gb
from gpubp import philox
from gpubp.activations import ACTIVATIONS
from gpubp.backends import cupy_backend

pytestmark = pytest.mark.skipif(shutil.which(harness.CXX) is None, reason=f"no C++ compiler ({harness.CXX})")


@pytest.fixture
def cb(cpu_harness, monkeypatch):  # noqa: F811
    return cupy_on_cpu(cpu_harness, monkeypatch, 132)


def on_another_thread(fn):
    """Run ``fn()`` on a new thread (whose current stream is the legacy default one); returns
    the exception it raised, or None."""
    raised = []

    def run():
        try:
            fn()
        except Exception as exc:  # handed back to the test, which checks it
            raised.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return raised[0] if raised else None


# ----------------------------------------------------------------------------- kernel loading


def test_each_file_lists_exactly_the_kernels_its_source_defines(cpu_harness):  # noqa: F811
    for filename, names in cupy_backend.KERNELS.items():
        module = cpu_harness.module(cupy_backend.kernel_source(filename), filename.removesuffix(".cu"))
        assert sorted(names) == sorted(module.kernel_names()), filename


def test_loading_a_file_looks_up_every_kernel_it_defines(cb):
    cb._rawmodule("optim.cu")
    assert {key[1] for key in cb._functions} == set(cb.KERNELS["optim.cu"])


def recorded_modules(cb, monkeypatch) -> list:
    """Every RawModule the backend makes from now on, as (file, its -DGPUBP_ONLY_KERNEL or None,
    the kernels looked up from it, the activations of its -DGPUBP_ONLY_ACTS or None)."""
    made, raw_module = [], cb.cupy.RawModule

    class Recording(raw_module):
        def __init__(self, code=None, options=(), path=None):
            super().__init__(code=code, options=options, path=path)
            only = [o.split("=", 1)[1].strip('"') for o in options if o.startswith("-DGPUBP_ONLY_KERNEL=")]
            acts = [int(o.split("=", 1)[1].rstrip("u"), 0) for o in options if o.startswith("-DGPUBP_ONLY_ACTS=")]
            self.entry = (re.search(r'#line 1 "(\w+\.cu)"', code or "").group(1), only[0] if only else None, [],
                          cb.act_names(acts[0]) if acts else None)
            made.append(self.entry)

        def get_function(self, name):
            self.entry[2].append(name)
            return super().get_function(name)

    monkeypatch.setattr(cb.cupy, "RawModule", Recording)
    return made


@pytest.mark.parametrize("precision", ["fp32", "tf32"])
def test_nvrtc_builds_each_gemm_kernel_a_step_launches_alone_and_the_other_kernels_together(cb, monkeypatch,
                                                                                          precision):
    made = recorded_modules(cb, monkeypatch)
    gb.seed(0)
    model = gb.Sequential([gb.Dense(40, 136, "relu"), gb.Dense(136, 9)], backend="cupy", fused=False,
                          precision=precision)
    x, y = np.random.default_rng(0).normal(size=(72, 40)).astype(np.float32), np.arange(72) % 9
    loss = model.train_step("cross_entropy", gb.optim.SGD(model.parameters(), lr=0.1))(x, y)
    assert np.isfinite(loss)
    for filename, only, looked_up, acts in made:
        if filename not in cb.ONE_KERNEL_FILES:
            assert only is None and sorted(looked_up) == sorted(cb.KERNELS[filename]), filename
        elif only:  # a GEMM's module: that kernel alone, and its epilogue for one activation where it takes one
            assert looked_up == [only] and only in cb.GEMM_KERNELS[filename], (filename, only, looked_up)
            assert (acts is not None) == (only in cb.ACT_KERNELS) and acts != (), (only, acts)
        else:  # the file's other kernels
            assert sorted(looked_up) == sorted(cb.part_kernels(filename, "")) and looked_up and acts is None, filename
    gemms = sorted((only, acts or ()) for _, only, _, acts in made if only)
    assert len(gemms) == len(set(gemms)), "a GEMM kernel was compiled twice"
    if precision == "fp32":  # one forward kernel for both layers, built once per activation
        forward = [("dense_fwd_128x64", ("identity",)), ("dense_fwd_128x64", ("relu",))]
    else:  # a kernel per activation
        forward = [("dense_fwd_tf32_identity", ()), ("dense_fwd_tf32_relu", ())]
    assert [gemm for gemm in gemms if gemm[0].startswith("dense_fwd")] == forward  # not the file's other GEMMs


def test_a_gemm_kernel_launched_from_a_module_built_for_another_does_nothing(cb):
    """The stand-in acts as NVRTC's one-kernel build: dense_forward.cu built for
    dense_fwd_128x128 has an empty dense_fwd_128x64."""
    source, rng = cb.kernel_source("dense_forward.cu"), np.random.default_rng(0)
    x, w, b = (cb.asarray(rng.normal(size=s).astype(np.float32)) for s in ((5, 7), (7, 6), (6,)))
    expected = np.maximum(cb.to_host(x) @ cb.to_host(w) + cb.to_host(b), 0)
    for part, computes in (("dense_fwd_128x64", True), ("dense_fwd_128x128", False), ("", False)):
        module = cb.cupy.RawModule(code=source, options=cb.nvrtc_options("dense_forward.cu", part))
        y, z = cb.zeros((5, 6)), cb.zeros((5, 6))
        module.get_function("dense_fwd_128x64")((1, 1), (128,), (x, w, b, y, z, np.int32(5), np.int32(6),
                                                                np.int32(7), np.int32(cb.ACT_ID["relu"])))
        if computes:
            np.testing.assert_allclose(cb.to_host(y), expected, rtol=1e-5, atol=1e-6)
        else:
            assert not np.any(cb.to_host(y)), part


def test_a_step_whose_gemm_comes_from_the_wrong_module_fails(cb, monkeypatch):
    """A planted routing bug: every module built as the file's non-GEMM part leaves the GEMMs empty."""
    options = cb.nvrtc_options
    monkeypatch.setattr(cb, "nvrtc_options", lambda filename, part: options(filename, ""))
    x = cb.asarray(np.ones((3, 4), np.float32))
    y, _ = cb.dense_forward(x, cb.asarray(np.ones((4, 5), np.float32)), cb.zeros((5,)), "relu")
    assert not np.any(cb.to_host(y) == 4.0)  # relu(1 * 1 * 4): nothing written, as on a GPU
    monkeypatch.setattr(cb, "nvrtc_options", options)
    for cache in harness.BACKEND_CACHES:
        monkeypatch.setattr(cb, cache, {})
    y, _ = cb.dense_forward(x, cb.asarray(np.ones((4, 5), np.float32)), cb.zeros((5,)), "relu")
    np.testing.assert_array_equal(cb.to_host(y), np.full((3, 5), 4.0, np.float32))  # the routing as shipped


def small_fused_step(cb, acts: list[str], fused: bool = True) -> float:
    """One SGD step of a 12-16-...-5 model with hidden activations ``acts`` on the stand-in."""
    gb.seed(0)
    widths = [12] + [16] * len(acts) + [5]
    layers = [gb.Dense(a, b, act) for a, b, act in zip(widths, widths[1:], [*acts, "identity"])]
    model = gb.Sequential(layers, backend="cupy", fused=fused)
    x, y = np.random.default_rng(0).normal(size=(20, 12)).astype(np.float32), np.arange(20) % 5
    return model.train_step("cross_entropy", gb.optim.SGD(model.parameters(), lr=0.1))(x, y)


def test_a_kernel_that_takes_its_activation_at_launch_is_built_for_the_launched_ones(cb, monkeypatch):
    made = recorded_modules(cb, monkeypatch)
    assert np.isfinite(small_fused_step(cb, ["gelu", "relu"]))
    fused = sorted((only, acts) for filename, only, _, acts in made if filename == "fused_mlp.cu" and only)
    assert fused == [("fused_mlp_bwd", ("identity", "relu", "gelu")), ("fused_mlp_dw", None),
                     ("fused_mlp_fwd", ("identity", "relu", "gelu"))]
    made.clear()  # a model whose activations a loaded module holds builds nothing more
    assert np.isfinite(small_fused_step(cb, ["relu"]))
    assert made == []
    assert np.isfinite(small_fused_step(cb, ["tanh"]))  # one it does not hold: its own modules
    assert sorted((only, acts) for _, only, _, acts in made) == [("fused_mlp_bwd", ("identity", "tanh")),
                                                                 ("fused_mlp_fwd", ("identity", "tanh"))]


def test_gpubp_nvrtc_activations_all_builds_each_kernel_for_every_activation_and_a_bad_value_names_it(cb, monkeypatch):
    made = recorded_modules(cb, monkeypatch)
    monkeypatch.setenv(cb.NVRTC_ACTIVATIONS_ENV, "all")
    assert np.isfinite(small_fused_step(cb, ["gelu"]))
    assert sorted(only for filename, only, _, acts in made if filename == "fused_mlp.cu" and acts is None) == [
        "fused_mlp_bwd", "fused_mlp_dw", "fused_mlp_fwd"]
    monkeypatch.setenv(cb.NVRTC_ACTIVATIONS_ENV, "some")
    with pytest.raises(ValueError, match=f"{cb.NVRTC_ACTIVATIONS_ENV}='some': expected one of launched, all"):
        small_fused_step(cb, ["silu"], fused=False)  # read when a kernel is first looked up


def test_a_module_built_for_some_activations_computes_them_and_traps_on_another(cb):
    """The stand-in acts as NVRTC's build with -DGPUBP_ONLY_ACTS (kernels/activations.cuh)."""
    source, rng = cb.kernel_source("dense_forward.cu"), np.random.default_rng(0)
    x, w, b = (cb.asarray(rng.normal(size=s).astype(np.float32)) for s in ((5, 7), (7, 6), (6,)))
    module = cb.cupy.RawModule(code=source, options=cb.nvrtc_options("dense_forward.cu", cb.kernel_part(
        "dense_forward.cu", "dense_fwd_128x64", cb.act_mask(["relu", "tanh"]))))
    kernel = module.get_function("dense_fwd_128x64")
    z = cb.to_host(x) @ cb.to_host(w) + cb.to_host(b)
    for act, expected in (("relu", np.maximum(z, 0)), ("tanh", np.tanh(z)), ("gelu", None)):
        y = cb.zeros((5, 6))
        args = (x, w, b, y, y, np.int32(5), np.int32(6), np.int32(7), np.int32(cb.ACT_ID[act]))
        if expected is None:
            with pytest.raises(harness.KernelError, match=r"__trap\(\)"):
                kernel((1, 1), (128,), args)
        else:
            kernel((1, 1), (128,), args)
            np.testing.assert_allclose(cb.to_host(y), expected, rtol=1e-5, atol=1e-6)


def test_a_step_whose_kernel_was_built_for_other_activations_fails(cb, monkeypatch):
    """A planted routing bug: every kernel built for identity alone, whatever the launch needs."""
    part = cb.kernel_part
    monkeypatch.setattr(cb, "kernel_part", lambda filename, name, acts=0: part(filename, name, acts and 1))
    with pytest.raises(harness.KernelError, match=r"__trap\(\)"):
        small_fused_step(cb, ["relu"])
    assert np.isfinite(small_fused_step(cb, []))  # identity alone is what it was built for


def test_kernel_part_names_the_activations_and_refuses_one_the_kernel_does_not_serve(cb):
    relu_gelu = cb.act_mask(["gelu", "relu"])
    assert cb.kernel_part("fused_mlp.cu", "fused_mlp_fwd_tf32", relu_gelu) == "fused_mlp_fwd_tf32:relu+gelu"
    assert cb.split_part("fused_mlp_fwd_tf32:relu+gelu") == ("fused_mlp_fwd_tf32", relu_gelu)
    assert cb.nvrtc_options("fused_mlp.cu", "fused_mlp_fwd_tf32:relu+gelu")[-1] == "-DGPUBP_ONLY_ACTS=0x22u"
    assert cb.kernel_part("fused_mlp.cu", "fused_mlp_dw", relu_gelu) == "fused_mlp_dw"  # takes no activation
    assert cb.kernel_part("dense_forward.cu", "dense_fwd_heavy_128x128", 0) == "dense_fwd_heavy_128x128"
    with pytest.raises(ValueError, match="dense_fwd_heavy_128x128 does not serve relu"):
        cb.kernel_part("dense_forward.cu", "dense_fwd_heavy_128x128", relu_gelu)


def test_model_parts_are_the_modules_a_models_steps_build(cb, monkeypatch):
    """A per-layer forward or dX kernel once per activation it serves, a fused kernel once for the plan's."""
    assert cb.model_parts("fused_mlp.cu", ["relu", "gelu"])[:2] == ("fused_mlp_fwd:relu+gelu", "fused_mlp_bwd:relu+gelu")
    assert set(cb.model_parts("dense_forward.cu", ["gelu", "relu"])) == {
        "dense_fwd_128x128:relu", "dense_fwd_heavy_128x128:gelu", "dense_fwd_128x64:relu", "dense_fwd_128x64:gelu",
        *(f"dense_fwd_dropout_128x{n}:{act}" for n in (128, 64) for act in ("relu", "gelu"))}
    # the dX kernels take the activation of the layer below, whose act' they apply
    assert cb.model_parts("dense_backward.cu", ["relu"]) == (
        "dense_dx_128x128:relu", "dense_dx_128x64:relu", "dense_dx_dropout_128x128:relu", "dense_dx_dropout_128x64:relu")
    assert cb.model_parts("dense_backward_tf32.cu", ["relu", "gelu"]) == tuple(
        f"dense_dx_{p}{dropout}:{act}" for dropout in ("", "_dropout") for p in ("tf32", "bf16") for act in ("relu", "gelu"))
    made = recorded_modules(cb, monkeypatch)
    small_fused_step(cb, ["gelu", "relu"])
    built = {f"{only}:{'+'.join(acts)}" for filename, only, _, acts in made if acts}
    assert built == set(cb.model_parts("fused_mlp.cu", ["identity", "relu", "gelu"])[:2])  # fp32's
    made.clear()
    small_fused_step(cb, ["gelu", "relu"], fused=False)  # the head's dX applies relu's, relu's dX gelu's
    built = {f"{only}:{'+'.join(acts)}" for filename, only, _, acts in made if acts}
    assert {part for part in built if part.startswith("dense_dx")} == {"dense_dx_128x64:relu",
                                                                        "dense_dx_128x64:gelu"}
    assert built <= set(cb.model_parts("dense_forward.cu", ["identity", "relu", "gelu"])
                        + cb.model_parts("dense_backward.cu", ["identity", "relu", "gelu"]))


def test_preloaded_kernels_serve_every_activation_and_nothing_more_is_built(cb, monkeypatch):
    cb.preload(jobs=2)
    made = recorded_modules(cb, monkeypatch)
    assert np.isfinite(small_fused_step(cb, ["silu"])) and np.isfinite(small_fused_step(cb, ["gelu"], fused=False))
    assert made == []


def test_preload_loads_every_kernel_of_every_file(cb):
    seconds = cb.preload(jobs=2)
    assert set(seconds) == {(f, part) for f in cb.KERNEL_FILES for part in cb.kernel_parts(f)}
    assert {key[1] for key in cb._functions} == {name for names in cb.KERNELS.values() for name in names}
    assert all(cb.origin[f] == "nvrtc" for f in cb.KERNEL_FILES)


def test_preload_on_a_gpu_with_99_kb_a_block_opts_in_only_the_kernels_that_fit(cpu_harness, monkeypatch):  # noqa: F811
    """An sm_86 block has at most 101376 bytes of shared memory; the stand-in's driver refuses an
    opt-in past it. The kernels that need more are loaded (a fatbin or a whole-set module holds
    them beside the others) and never opted in, so the load does not fail; the backend never
    launches them there (tests/test_kernels_on_cpu.py)."""
    cb = cupy_on_cpu(cpu_harness, monkeypatch, 84, compute_capability="86")
    cb.preload(jobs=2)
    limits = {key[1]: launch.shared_limit for key, launch in cb._functions.items()}
    assert limits["fused_mlp_fwd"] == limits["dense_dw_tf32"] == limits["dense_dw_bf16"] == cb.DEFAULT_SHARED_LIMIT
    assert limits["fused_mlp_fwd_tf32"] == cb._fused_shared_bytes("fwd", "tf32", cb.FUSED_MLP_MAX_WIDTH)
    assert limits["dense_dx_tf32"] == cb.TF32_SHARED_BYTES["dx"] <= 101376 - cb.STATIC_SHARED_ALLOWANCE


def test_preload_loads_fatbins_whole_and_every_nvrtc_part_where_the_driver_refuses_one(cb, monkeypatch):
    """With fatbins that serve this GPU a file loads whole; the stand-in's driver refuses every
    GPU binary, as an old driver refuses a new toolkit's, and then each NVRTC part compiles."""
    monkeypatch.setattr(cb, "_aot_mismatch", lambda arch: None)
    seconds = cb.preload(jobs=2)
    assert set(seconds) == {(f, None) for f in cb.KERNEL_FILES}
    assert {key[1] for key in cb._functions} == {name for names in cb.KERNELS.values() for name in names}
    assert {key[1:] for key in cb._rawmodules} == {(f, part) for f in cb.KERNEL_FILES for part in cb.kernel_parts(f)}


def test_the_first_step_benchmark_finds_the_modules_a_step_builds_and_tabulates_them(monkeypatch):
    """bench/nvrtc_first_step.py's discovery on the stand-in (its NVRTC timing needs libnvrtc)."""
    first_step = load("nvrtc_first_step")
    monkeypatch.setenv(cupy_backend.NVRTC_ACTIVATIONS_ENV, "all")  # the benchmark finds what a step builds unset
    modules = first_step.first_step_modules([40, 136, 9], "relu", "tf32", False)
    assert ("dense_forward_tf32.cu", "dense_fwd_tf32_relu") in modules
    assert ("dense_forward_tf32.cu", "dense_fwd_tf32_identity") in modules  # the linear head
    assert ("dense_backward_tf32.cu", "dense_dx_tf32:relu") in modules  # the head's dX applies relu'
    assert all(cupy_backend.split_part(part)[0] in {"", *cupy_backend.kernel_parts(f)} for f, part in modules)
    assert not any(f == "fused_mlp.cu" or "dropout" in part for f, part in modules)
    fp32 = first_step.first_step_modules([40, 136, 9], "relu", "fp32", False)
    assert [part for _, part in fp32 if part.startswith("dense_fwd")] == ["dense_fwd_128x64:relu",
                                                                          "dense_fwd_128x64:identity"]
    report = {"arch": "90", "repeat": 1, "models": {"m": {
        "modules": [{"file": f, "part": part, "seconds": 1.0} for f, part in modules],
        "every_activation": [{"file": f, "part": part, "seconds": 2.0} for f, part in modules],
        "whole_files": [{"file": "dense_forward_tf32.cu", "seconds": 30.0}]}}}
    row = first_step.markdown(report).splitlines()[-1]
    assert row.startswith("| m | `dense_fwd_tf32_relu`") and row.endswith(
        f"| {len(modules):.1f} | {2 * len(modules):.1f} | `dense_forward_tf32.cu` | 30.0 |")
    assert "`loss.cu`" in row and "`dense_backward_tf32.cu` rest" in row


def test_info_says_where_the_cupy_kernels_come_from(cb, capsys, monkeypatch, tmp_path):
    from gpubp.__main__ import main as gpubp_main

    monkeypatch.setenv(cb.AOT_ENV, str(tmp_path))  # no fatbins there
    gpubp_main(["info"])
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("cupy kernels ")]
    assert "compiled by NVRTC on first use" in line and f"no {tmp_path / cb.AOT_MANIFEST}" in line
    assert "preload()" in line and "for the activations it launches" in line
    monkeypatch.setenv(cb.NVRTC_ACTIVATIONS_ENV, "all")
    gpubp_main(["info"])
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("cupy kernels ")]
    assert f"with every activation it serves ({cb.NVRTC_ACTIVATIONS_ENV}=all)" in line
    monkeypatch.setenv(cb.NVRTC_ACTIVATIONS_ENV, "everything")
    gpubp_main(["info"])
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("cupy kernels ")]
    assert line.startswith(f"cupy kernels not loadable: {cb.NVRTC_ACTIVATIONS_ENV}='everything'")
    monkeypatch.delenv(cb.NVRTC_ACTIVATIONS_ENV)
    monkeypatch.setattr(cb, "_aot_mismatch", lambda arch: None)
    gpubp_main(["info"])
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("cupy kernels ")]
    assert line == f"cupy kernels from the CMake fatbins in {tmp_path}: no compiling"


@pytest.mark.parametrize("on_device", [False, True], ids=["host", "device"])
def test_copy_into_takes_a_host_or_device_source_of_the_same_shape_and_kind_and_refuses_others(cb, on_device):
    def source(a):
        return cb.asarray(a) if on_device else a

    dst = cb.asarray(np.zeros((2, 3), np.float32))
    cb.copy_into(dst, source(np.arange(6.0).reshape(2, 3)))  # float64 into float32: the same kind
    np.testing.assert_array_equal(cb.to_host(dst), np.arange(6.0, dtype=np.float32).reshape(2, 3))
    for bad in (np.ones((1, 3), np.float32), np.ones(6, np.float32)):  # no broadcasting, no reshaping
        with pytest.raises(ValueError, match=r"src: expected shape \(2, 3\)"):
            cb.copy_into(dst, source(bad))
    labels = cb.asarray(np.zeros(3, np.int64))
    with pytest.raises(TypeError, match="src: cannot copy float64 into int64"):
        cb.copy_into(labels, source(np.array([0.0, 1.7, 2.0])))
    np.testing.assert_array_equal(cb.to_host(dst), np.arange(6.0, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(cb.to_host(labels), np.zeros(3, np.int64))


def test_a_capture_launches_kernels_that_no_eager_call_used_before(cb):
    """The update kernels that read their rate from the device run only in captured steps."""
    p, g = cb.asarray(np.ones(5, np.float32)), cb.asarray(np.full(5, 2.0, np.float32))
    hyper, guard = cb.asarray(np.array([0.25], np.float32)), cb.asarray(np.zeros(1, np.float32))
    cb.sgd_update(p, g, None, 0.5, 0.0, False, 0.0)  # eager: loads optim.cu; 1 - 0.5 * 2 = 0
    graph = cb.capture(lambda: cb.sgd_update(p, g, None, None, 0.0, False, 0.0, hyper=hyper, guard=guard))
    graph.launch()
    np.testing.assert_array_equal(cb.to_host(p), np.full(5, -0.5, np.float32))


def test_the_stand_in_refuses_a_kernels_first_lookup_during_a_capture(cb):
    cp = cb.cupy
    module = cp.RawModule(code=cupy_backend.kernel_source("optim.cu"))
    module.get_function("scale_inplace")
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        module.get_function("scale_inplace")  # looked up before: loaded already
        with pytest.raises(harness.CaptureError, match="loading the kernel sumsq"):
            module.get_function("sumsq")
        stream.end_capture()


# ----------------------------------------------------------------------------- the capture stream


def test_work_another_thread_puts_on_the_legacy_stream_during_a_capture_runs_and_is_not_captured(cb):
    a, b = cb.asarray(np.ones(4, np.float32)), cb.asarray(np.ones(4, np.float32))
    cb.scale_(a, 1.0)  # loads optim.cu before the capture

    def step():
        cb.scale_(a, 2.0)
        assert on_another_thread(lambda: cb.scale_(b, 3.0)) is None

    graph = cb.capture(step)
    np.testing.assert_array_equal(cb.to_host(b), np.full(4, 3.0))  # ran at once, on its own stream
    np.testing.assert_array_equal(cb.to_host(a), np.ones(4))  # captured, not run
    graph.launch()
    np.testing.assert_array_equal(cb.to_host(a), np.full(4, 2.0))
    np.testing.assert_array_equal(cb.to_host(b), np.full(4, 3.0))


def test_another_threads_multi_tensor_launch_during_a_capture_runs_now_and_stays_out_of_the_graph(cb):
    """The capture state was process-wide: another thread's scale_many (another model's update)
    was recorded into the capturing thread's graph, which then held its arrays, and one whose
    table was new got a table filled only after the capture ended, and read garbage."""
    a = cb.asarray(np.ones(4, np.float32))
    cached, new = [cb.asarray(np.ones(n, np.float32)) for n in (3, 5)], [cb.asarray(np.ones(7, np.float32))]
    cb.scale_many([a], 1.0)  # loads the kernel before the capture
    cb.scale_many(cached, 1.0)  # and makes this list's table
    raised = {}

    def step():
        cb.scale_many([a], 2.0)
        raised["cached"] = on_another_thread(lambda: cb.scale_many(cached, 3.0))
        # A new table is uploaded on the other thread's stream, which CUDA permits beside a
        # capture in CuPy's relaxed mode; this stand-in refuses any copy during one: either is
        # right, an update that silently reads an unfilled table is not.
        raised["new"] = on_another_thread(lambda: cb.scale_many(new, 3.0))

    graph = cb.capture(step)
    assert raised["cached"] is None
    for other in cached:
        np.testing.assert_array_equal(cb.to_host(other), np.full(other.size, 3.0, np.float32))
    assert isinstance(raised["new"], harness.CaptureError) or (cb.to_host(new[0]) == 3.0).all(), raised["new"]
    recorded = {id(x) for entry in graph._arrays if isinstance(entry, list) for tensor in entry for x in tensor}
    assert id(a) in recorded and not recorded & {id(x) for x in cached + new}
    graph.launch()
    np.testing.assert_array_equal(cb.to_host(a), np.full(4, 2.0, np.float32))


@pytest.mark.parametrize("non_blocking", [False, True], ids=["blocking", "non_blocking"])
def test_the_stand_in_invalidates_a_blocking_streams_capture_when_the_legacy_stream_is_used(cb, non_blocking):
    cp = cb.cupy
    b = cb.asarray(np.ones(4, np.float32))
    cb.scale_(b, 1.0)
    stream = cp.cuda.Stream(non_blocking=non_blocking)
    with stream:
        stream.begin_capture()
        raised = on_another_thread(lambda: cb.scale_(b, 3.0))
        if non_blocking:
            assert raised is None
            stream.end_capture()
        else:
            assert isinstance(raised, harness.CaptureError)
            with pytest.raises(harness.CaptureError, match="invalidated.*non_blocking=True"):
                stream.end_capture()


def test_the_stand_in_refuses_a_capture_on_the_legacy_stream(cb):
    legacy = cb.cupy.cuda.Stream.null
    with legacy, pytest.raises(RuntimeError, match="default \\(legacy\\) stream"):
        legacy.begin_capture()


# ----------------------------------------------------------------------------- external streams


class TorchStream:
    """What ``torch.cuda.current_stream()`` gives, as older torch releases have it: the
    pointer in ``cuda_stream`` and no ``__cuda_stream__``."""

    def __init__(self, pointer: int):
        self.cuda_stream = pointer


class CudaStreamProtocol:
    def __init__(self, result):
        self.result = result

    def __cuda_stream__(self):
        return self.result


def test_the_stand_in_takes_external_streams_as_cupy_14_does(cpu_harness):  # noqa: F811
    cp = harness.cupy_shim(cpu_harness, version=14)
    assert cp.cuda.Stream.from_external(CudaStreamProtocol((0, 0x5000))).ptr == 0x5000
    for refused in (0x5000, TorchStream(0x5000), CudaStreamProtocol((1, 0x5000)), CudaStreamProtocol((0, "0x5000"))):
        with pytest.raises(TypeError):
            cp.cuda.Stream.from_external(refused)
    with pytest.warns(DeprecationWarning, match="from_external"):
        cp.cuda.ExternalStream(0x5000, 0)


def test_the_stand_in_takes_external_streams_as_cupy_13_does(cpu_harness):  # noqa: F811
    cp = harness.cupy_shim(cpu_harness, version=13)
    assert not hasattr(cp.cuda.Stream, "from_external")
    assert cp.cuda.ExternalStream(0x5000, 0).ptr == 0x5000


# ----------------------------------------------------------------------------- the PyTorch bridge

torch = pytest.importorskip("torch")

from test_torch import allocated_by_torch, grads_of, plain_torch, random_input  # noqa: E402
from gpubp import torch as gpubp_torch  # noqa: E402
from gpubp.torch import MLP  # noqa: E402

TORCH_STREAM = 0x7E57


def test_allocated_by_torch_tells_torchs_memory_from_memory_it_was_handed(cb):
    assert allocated_by_torch(torch.empty(3))
    assert not allocated_by_torch(torch.from_dlpack(np.ones(3)))
    assert not allocated_by_torch(torch.from_dlpack(cb.cupy.empty((3,), np.float32)))


@pytest.fixture(params=[13, 14], ids=["cupy13", "cupy14"])
def bridge_on_cupy(request, cpu_harness, monkeypatch):  # noqa: F811
    """gpubp.torch's CUDA path on the stand-in: CPU tensors stand for CUDA ones, the stand-in's
    CuPy (13 or 14) launches the kernels, and torch's current stream is ``TORCH_STREAM``.
    Returns the stream pointer of every kernel launch."""
    cb = cupy_on_cpu(cpu_harness, monkeypatch, 132, version=request.param)
    monkeypatch.setitem(gpubp_torch.BACKEND_OF_DEVICE, "cpu", "cupy")
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: TorchStream(TORCH_STREAM))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    streams = []
    launch = cb._Launch.__call__

    def recording_launch(self, grid, block, args, **kwargs):
        streams.append(cb.cupy.cuda.get_current_stream().ptr)
        launch(self, grid, block, args, **kwargs)

    monkeypatch.setattr(cb._Launch, "__call__", recording_launch)
    return streams


def test_the_bridge_runs_the_cupy_kernels_on_torchs_stream_and_returns_memory_torch_allocated(bridge_on_cupy):
    gb.seed(0)
    mlp = MLP([7, 9, 5], activation="gelu")
    x = random_input()
    inputs = [x, *mlp.parameters()]
    with gb.trace() as t:
        out = mlp(x)
        grad_out = torch.ones_like(out)
        got = grads_of(out, inputs, grad_out)
    assert t.counts["dense_fwd"] == 2 and t.counts["dense_dw"] == 2 and t.counts["dense_dx"] == 2
    assert set(bridge_on_cupy) == {TORCH_STREAM}
    want = plain_torch(mlp, x)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    for g, w in zip(got, grads_of(want, inputs, grad_out)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    assert all(allocated_by_torch(tensor) for tensor in (out, *got))


# ----------------------------------------------------------------------------- the sanitizer driver's reduced run


def kernel_families(names) -> set[str]:
    """Kernel names with the activation taken out: dense_fwd_relu_128x64 -> dense_fwd_128x64."""
    acts = "|".join(sorted(ACTIVATIONS, key=len, reverse=True))
    return {re.sub(rf"_({acts})(?=_|$)", "", name) for name in names}


def test_the_reduced_sanitizer_run_launches_every_kernel_family_the_full_run_does(cb, monkeypatch):
    """Shapes and activations go, never a tile, a split-K path or a loss or update kernel.
    Launches are recorded, not run (the choices are made before a launch); the fused and graphed
    steps, which read their loss back, are the same in both runs: every precision, both cases."""
    driver = load("sanitizer_driver")
    launched = []
    monkeypatch.setattr(cb._Launch, "__call__", lambda self, *args, **kwargs: launched.append(self.function.kernel.name))
    rng = np.random.default_rng(0)

    def families(coverage):
        launched.clear()
        driver.drive_dense(cb, lambda *shape: cb.zeros(shape), coverage.dense, coverage.activations)
        for precision in ("tf32", "bf16"):
            driver.drive_dense(cb, lambda *shape: cb.zeros(shape), coverage.dense, coverage.activations, precision)
        driver.drive_misaligned_dense(cb, rng, coverage.misaligned, coverage.misaligned_activations)
        driver.drive_losses_and_optimizers(cb, lambda *shape: cb.zeros(shape), rng, coverage)
        return kernel_families(launched)

    full, reduced = driver.COVERAGE["cupy"], driver.REDUCED
    assert families(reduced) == families(full)
    assert {"dense_fwd_128x128", "dense_dw_128x64", "dense_dz", "dense_fwd_tf32", "dense_dw_bf16",
            "round_bf16"} <= families(reduced)
    assert (reduced.graph_cases, reduced.misaligned_activations) == (full.graph_cases, full.misaligned_activations)
    assert set(reduced.fused_batches) < set(full.fused_batches) and len(reduced.dense) < len(full.dense)


# ----------------------------------------------------------------------------- first contact's facts


def fake_driver_facts(cb, monkeypatch, tmp_path):
    """What a driver reports, made up here for the stand-in: the device's properties and each
    kernel's attributes (the CPU harness has no registers); and an empty kernel cache."""
    runtime = cb.cupy.cuda.runtime
    for name, value in (("getDeviceProperties", lambda device: {"name": b"Stand-in GPU", "uuid": b"\x01\xfe",
                                                                "multiProcessorCount": 132}),
                        ("driverGetVersion", lambda: 13000), ("runtimeGetVersion", lambda: 13000)):
        monkeypatch.setattr(runtime, name, value, raising=False)
    monkeypatch.setattr(cb.cupy.cuda, "nvrtc", types.SimpleNamespace(getVersion=lambda: (13, 0)), raising=False)
    look_up = cb._look_up_kernels
    attributes = types.SimpleNamespace(num_regs=40, shared_size_bytes=8192, local_size_bytes=0, max_threads_per_block=256)
    monkeypatch.setattr(cb, "_look_up_kernels", lambda module, filename, part=None: dict.fromkeys(
        look_up(module, filename, part), attributes))
    monkeypatch.setenv("CUPY_CACHE_DIR", str(tmp_path / "empty_cache"))
    monkeypatch.setenv(cb.AOT_ENV, str(tmp_path))  # facts points it at an empty folder; this puts it back after


def test_first_contact_facts_compile_every_kernel_file_and_record_each_kernels_attributes(cb, monkeypatch, tmp_path):
    """bench/first_contact.py facts on the stand-in."""
    fc = load("first_contact")
    fake_driver_facts(cb, monkeypatch, tmp_path)
    assert fc.facts(tmp_path / "facts.json") == 0
    facts = json.loads((tmp_path / "facts.json").read_text())
    assert facts["device"]["name"] == "Stand-in GPU" and facts["device"]["uuid"] == "01fe"
    assert facts["compute_capability"] == "90" and facts["kernel_cache_files_before"] == 0
    assert list(facts["kernel_files"]) == list(cb.KERNEL_FILES)
    for filename, built in facts["kernel_files"].items():
        assert built["origin"] == "nvrtc" and built["compile_and_load_seconds"] >= 0
        assert sorted(built["kernels"]) == sorted(cb.KERNELS[filename])
        assert built["modules"] == len(cb.kernel_parts(filename))
    # one module per GEMM kernel of dense_forward.cu (5), none besides: it has no other kernel
    assert facts["kernel_files"]["dense_forward.cu"]["modules"] == len(cb.KERNELS["dense_forward.cu"]) == 5
    assert facts["kernel_files"]["optim.cu"]["modules"] == 1
    # and a relu model's modules of the kernels that take their activation at launch, for the benchmarks
    relu_model = facts["kernel_files"]["fused_mlp.cu"]["first_step_modules"]
    assert sorted(relu_model) == sorted(cb.model_parts("fused_mlp.cu", fc.FIRST_STEP_ACTS))
    assert relu_model["fused_mlp_fwd:identity+relu"]["seconds"] >= 0 and facts["kernel_files"]["optim.cu"][
        "first_step_modules"] == {}
    assert facts["kernel_compile"]["modules"] == sum(len(cb.kernel_parts(f)) + len(cb.model_parts(f, fc.FIRST_STEP_ACTS))
                                                     for f in cb.KERNEL_FILES)
    assert facts["kernel_files"]["optim.cu"]["kernels"]["sumsq"]["registers"] == 40
    report = load("gpu_summary").facts_markdown(facts)
    assert "Device: Stand-in GPU, compute capability 90, 132 SMs" in report[0]
    kernels = len(cb.KERNELS["optim.cu"])
    assert any(line.startswith("| optim.cu | nvrtc | 1 |") and line.endswith(f"| {kernels} | 40 | 8192 | none |")
               for line in report)
    gemms = len(cb.KERNELS["dense_forward.cu"])
    assert any(line.startswith(f"| dense_forward.cu | nvrtc | {gemms} |") for line in report)


def test_first_contact_facts_compile_the_kernel_files_side_by_side(cb, monkeypatch, tmp_path):
    """Two modules compile at once with two threads: each compile waits (up to 30 s) until another
    one is under way too, which one-after-another compiling never lets happen."""
    fc = load("first_contact")
    fake_driver_facts(cb, monkeypatch, tmp_path)
    together, compile_part = threading.Barrier(2, timeout=30), cb._rawmodule
    monkeypatch.setattr(cb, "_rawmodule", lambda filename, part="": (together.wait(), compile_part(filename, part))[1])
    monkeypatch.setattr(cb, "KERNEL_FILES", ("optim.cu", "loss.cu"))
    assert fc.facts(tmp_path / "facts.json", jobs=2) == 0
    facts = json.loads((tmp_path / "facts.json").read_text())
    assert list(facts["kernel_files"]) == list(cb.KERNEL_FILES)
    assert facts["kernel_compile"]["threads"] == 2 and facts["kernel_compile"]["wall_seconds"] >= 0


def test_a_kernel_file_that_fails_to_compile_is_recorded_and_the_others_still_compile(cb, monkeypatch, tmp_path,
                                                                                        capsys):
    fc = load("first_contact")
    fake_driver_facts(cb, monkeypatch, tmp_path)
    broken, compile_file = cb.KERNEL_FILES[0], cb._rawmodule

    def compile_or_fail(filename, part=""):
        if filename == broken and part == cb.kernel_parts(broken)[-1]:  # one module of the file
            raise RuntimeError("NVRTC_ERROR_COMPILATION: made up here")
        return compile_file(filename, part)

    monkeypatch.setattr(cb, "_rawmodule", compile_or_fail)
    assert fc.facts(tmp_path / "facts.json") == 1
    facts = json.loads((tmp_path / "facts.json").read_text())
    assert facts["kernel_files"][broken] == {"error": "RuntimeError: NVRTC_ERROR_COMPILATION: made up here"}
    assert all(facts["kernel_files"][name]["origin"] == "nvrtc" for name in cb.KERNEL_FILES if name != broken)
    assert f"{broken}: RuntimeError: NVRTC_ERROR_COMPILATION" in capsys.readouterr().out


# ----------------------------------------------------------------------------- dropout in the Dense kernels


@pytest.mark.parametrize("precision", ["fp32", "tf32"])
def test_a_dropout_above_a_dense_launches_no_pass_of_its_own(cb, monkeypatch, precision):
    """The kernels a training step of Dropout -> Dense -> Dropout -> Dense launches, by name: the
    Dropout above the first Dense is applied in that Dense's forward kernel (its _dropout variant)
    and regenerated, with tanh's act', in the epilogue of the second Dense's dX (its _dropout
    variant), which hands the first its dz; only the Dropout on the input, which stands on no
    Dense, runs dropout.cu's mask pass, and no dropout dz pass is left in backward."""
    launched = harness.record_launches(cb, monkeypatch)
    gb.seed(1)
    model = gb.Sequential([gb.Dropout(0.2), gb.Dense(9, 33, "tanh"), gb.Dropout(0.5), gb.Dense(33, 3)],
                          backend="cupy", precision=precision, fused=False)
    x = np.random.default_rng(0).standard_normal((21, 9)).astype(np.float32)
    with gb.trace() as t:
        out = model.forward(x)
    forward = list(launched)
    assert t.launches == ["dropout_fwd", "dense_fwd", "dense_fwd"]
    assert forward[0] == "dropout_mask"
    dropout_forward = "dense_fwd_tf32_tanh_dropout" if precision == "tf32" else r"dense_fwd_dropout_128x\d+"
    assert re.fullmatch(dropout_forward, forward[1]), forward
    forward_kernel = "dense_fwd_tf32_identity" if precision == "tf32" else r"dense_fwd_128x\d+"
    assert re.fullmatch(forward_kernel, forward[2]), forward
    launched.clear()
    plan = model.backward_plan()
    with gb.trace() as t:
        model.backward(cb.asarray(np.ones(out.shape, np.float32)))
    db_dz = ["dense_dz"] if precision == "tf32" else []  # TF32's identity dz pass sums db, with no mask
    assert [kernels for _, kernels in plan] == [[], db_dz + ["dense_dw"], [], db_dz + ["dense_dw", "dense_dx"]]
    assert "(its mask is regenerated by dense_3's dX)" in str(plan)
    assert t.launches == db_dz + ["dense_dw", "dense_dx"] + db_dz + ["dense_dw"]
    dx_kernel = "dense_dx_tf32_dropout" if precision == "tf32" else r"dense_dx_dropout_128x\d+"
    assert any(re.fullmatch(dx_kernel, name) for name in launched), launched
    assert not any(name.startswith(("dropout_", "dense_dz_tanh", "dense_dz_db_tanh", "dense_dz_dropout",
                                    "dense_dz_db_dropout")) for name in launched)


@pytest.mark.parametrize("fused", [False, True], ids=["per_layer", "fused"])
@pytest.mark.parametrize("precision", ["fp32", "tf32"])
def test_a_model_whose_biases_alone_train_launches_no_dw_kernel_and_gets_numpys_gradients(cb, precision, fused):
    """BitFit through Sequential on the CuPy kernels: every weight frozen, every bias training.
    The plan names a db pass and no dW, backward launches exactly that, keeps no layer's input,
    and the bias gradients are the NumPy backend's."""
    def make(backend, **kwargs):
        gb.seed(2)
        model = gb.Sequential([gb.Dense(9, 33, "gelu"), gb.Dense(33, 17, "relu"), gb.Dense(17, 3)], backend=backend,
                              **kwargs)
        for layer in model:
            layer.weight.trainable = False
        return model

    model, reference = make("cupy", precision=precision, fused=fused), make("numpy")
    assert model.uses_fused == fused
    rng = np.random.default_rng(0)
    x = rng.standard_normal((41, 9)).astype(np.float32)
    dout = rng.standard_normal((41, 3)).astype(np.float32)
    model.forward(x)
    reference.forward(x)
    plan = model.backward_plan()
    assert all("dense_dw" not in kernels and "fused_mlp_dw" not in kernels for _, kernels in plan)
    with gb.trace() as t:
        model.backward(cb.asarray(dout))
    assert t.launches == [k for _, kernels in reversed(plan) for k in kernels]  # fused: one entry
    assert t.counts["dense_dz"] == 3
    reference.backward(dout)
    rtol = 1e-4 if precision == "fp32" else 3e-3
    for layer, want in zip(model, reference):
        assert layer.weight.grad is None
        got = cb.to_host(layer.bias.grad)
        assert np.max(np.abs(got - want.bias.grad)) <= rtol * np.max(np.abs(want.bias.grad))


# ----------------------------------------------------------------------------- the split-K sweep


class FakeBenchmark:
    """pytest-benchmark's fixture, as far as bench/test_gpu_dense.py's ``measure`` uses it."""

    def __init__(self):
        self.group, self.extra_info, self.calls = None, {}, 0
        self.stats = types.SimpleNamespace(stats=types.SimpleNamespace(median=1e-3))

    def pedantic(self, fn, rounds, warmup_rounds, iterations):
        for _ in range(warmup_rounds + rounds * iterations):
            fn()
            self.calls += 1


@pytest.mark.parametrize("precision", ["fp32", "tf32"])
@pytest.mark.parametrize("choice", ["splits=2", "heuristic"])
def test_the_split_k_sweep_forces_each_split_and_records_the_heuristics(cb, monkeypatch, precision, choice):
    """bench/test_gpu_splitk.py's benchmark, run on the stand-in at a small shape: the split it
    forces (or the heuristic's) is the one the dW launch used, whatever k step it asks with."""
    sweep = load("test_gpu_splitk")
    monkeypatch.setattr(cb.cupy.cuda.runtime, "getDeviceProperties", lambda device: {"name": b"Stand-in GPU"},
                        raising=False)
    benchmark = FakeBenchmark()
    sweep.test_dw_split(benchmark, cb.cupy, monkeypatch, precision, 256, (8, 4), choice)
    k_step = cb.TF32_BK if precision == "tf32" else cb.BK
    expected = 2 if choice == "splits=2" else cb.dw_split(256, 1, 132, k_step)[0]
    assert benchmark.extra_info["splits"] == expected and benchmark.calls > 0
    assert benchmark.extra_info["device"] == "Stand-in GPU"


# ----------------------------------------------------------------------------- the dz pass's batch split


@pytest.mark.parametrize("workload, n_in, n_out, batch", benchmark_layers(),
                         ids=lambda v: str(v) if not isinstance(v, str) else v.replace(" ", "_"))
def test_the_dz_pass_fills_an_h200_at_every_benchmark_layer(workload, n_in, n_out, batch):
    """dense_dz_db's blocks on 132 SMs: a full wave at its occupancy (DZ_BLOCKS_PER_SM a SM; 90%, as
    chunks of whole row steps round) unless the batch runs out of DZ_MIN_ROWS chunks or the splits
    reach DZ_MAX_SPLITS. One block per 32 columns alone gave a 64-wide layer 2 blocks, each walking
    the whole batch, and a 1024-wide one 32."""
    cb = cupy_backend
    splits, rows = cb.dz_split(batch, n_out, H200_SMS)
    strips = -(-n_out // cb.DZ_COLUMNS)
    assert rows % cb.DZ_ROW_STEP == 0 and (splits - 1) * rows < batch <= splits * rows
    assert 1 <= splits <= cb.DZ_MAX_SPLITS
    assert (strips * splits >= 0.9 * cb.DZ_BLOCKS_PER_SM * H200_SMS or splits == cb.DZ_MAX_SPLITS
            or rows <= 2 * cb.DZ_MIN_ROWS), (strips, splits, rows)


@pytest.mark.parametrize("batch, n_out", [(1, 1), (31, 4096), (64, 64), (65, 64), (8192, 1024), (65536, 64),
                                          (4096, 4096), (10**6, 10)])
def test_the_dz_pass_splits_only_a_batch_too_narrow_to_fill_the_gpu(batch, n_out):
    cb = cupy_backend
    splits, rows = cb.dz_split(batch, n_out, H200_SMS)
    assert (splits - 1) * rows < batch <= splits * rows, "every split has rows, together all of them"
    if -(-n_out // cb.DZ_COLUMNS) >= cb.DZ_BLOCKS_PER_SM * H200_SMS or batch <= cb.DZ_MIN_ROWS:
        assert splits == 1


# ----------------------------------------------------------------------------- in-place operands
#
# The raw kernels write flat float32 memory from an array's data pointer: an in-place operand
# (a parameter, optimizer state, an ``out`` buffer) that is strided or of another dtype would be
# miswritten on a GPU (the stand-in's argument check happens to refuse another dtype, with a
# TypeError, and a strided view it writes as flat memory, as a GPU would). The backend refuses
# them with numba_backend's wording, before anything is launched.


def refusal(name: str, dtype: str = "float32") -> str:
    return ("^" + re.escape(f"{name}: expected a C-contiguous float32 CuPy array (it is written in place), "
                            f"got dtype {dtype}")
            + r", shape \(.*\) with strides \(.*\)")


def strided(cb, shape, seed=0):
    """A (shape) float32 view of every other column of a C-contiguous device array."""
    rows, cols = shape if len(shape) == 2 else (1, shape[0])
    base = cb.asarray(np.random.default_rng(seed).standard_normal((rows, 2 * cols)).astype(np.float32))
    view = base[:, ::2] if len(shape) == 2 else base[0, ::2]
    assert not view.flags.c_contiguous and view.dtype == np.float32
    return view


def device(cb, shape, seed=0, dtype=np.float32):
    return cb.asarray(np.random.default_rng(seed).standard_normal(shape).astype(dtype))


def unchanged(cb, *arrays):
    """A check that ``arrays`` (and a view's whole base) still hold what they hold now."""
    whole = [a.base if a.base is not None else a for a in arrays]
    before = [cb.to_host(a).copy() for a in whole]
    return lambda: all(np.array_equal(cb.to_host(a), b) for a, b in zip(whole, before))


OPTIMIZER_REFUSALS = {
    "sgd/strided param": ("sgd_update", "param", "strided", (0.1, 0.9, False, 0.01)),
    "sgd/float64 velocity": ("sgd_update", "velocity", "float64", (0.1, 0.9, True, 0.0)),
    "adam/float64 param": ("adam_update", "param", "float64", (1e-3, 0.9, 0.999, 1e-8, 0.0, 1, True)),
    "adam/strided v": ("adam_update", "v", "strided", (1e-3, 0.9, 0.999, 1e-8, 0.01, 3, False)),
    "rmsprop/strided square_avg": ("rmsprop_update", "square_avg", "strided", (1e-2, 0.99, 1e-8, 0.0, 0.9, True)),
    "rmsprop/float64 momentum_buffer": ("rmsprop_update", "momentum_buffer", "float64",
                                        (1e-2, 0.99, 1e-8, 0.0, 0.9, True)),
}
OPTIMIZER_STATE = {"sgd_update": ("velocity",), "adam_update": ("m", "v"),
                   "rmsprop_update": ("square_avg", "grad_avg", "momentum_buffer")}


def optimizer_arrays(cb, update: str, bad: str | None = None, kind: str = "", shape=(6, 10)) -> dict:
    """param, grad and ``update``'s state of ``shape``, ``bad`` strided or float64 (``kind``)."""
    arrays = {}
    for i, name in enumerate(("param", "grad") + OPTIMIZER_STATE[update]):
        if name != bad:
            a = device(cb, shape, seed=i)
        elif kind == "strided":
            a = strided(cb, shape, seed=i)
        else:
            a = device(cb, shape, seed=i, dtype=np.float64)
        arrays[name] = abs(a) if name in ("v", "square_avg") and name != bad else a
    return arrays


@pytest.mark.parametrize("case", OPTIMIZER_REFUSALS, ids=list(OPTIMIZER_REFUSALS))
def test_an_optimizer_update_refuses_a_strided_or_float64_operand_it_writes_and_writes_nothing(cb, case):
    update, bad, kind, options = OPTIMIZER_REFUSALS[case]
    arrays = optimizer_arrays(cb, update, bad, kind)
    same = unchanged(cb, *arrays.values())
    with pytest.raises(ValueError, match=refusal(bad, "float64" if kind == "float64" else "float32")):
        getattr(cb, update)(*arrays.values(), *options)
    assert same()


@pytest.mark.parametrize("kind", ["strided", "float64"])
@pytest.mark.parametrize("update, options", [("sgd_update", (0.1, 0.9, True, 0.01)),
                                             ("adam_update", (1e-3, 0.9, 0.999, 1e-8, 0.01, 2, True))])
def test_an_optimizer_update_reads_a_strided_or_float64_grad_as_its_float32_copy(cb, update, options, kind):
    """grad is only read: normalized (as numba_backend's ``_contiguous`` does), the update is the
    one of its contiguous float32 copy, and the caller's grad is left as it was."""
    want = optimizer_arrays(cb, update)
    got = {name: cb.asarray(cb.to_host(a)) for name, a in want.items()}
    got["grad"] = strided(cb, (6, 10)) if kind == "strided" else device(cb, (6, 10), dtype=np.float64)
    want["grad"] = cb.asarray(cb.to_host(got["grad"]), np.float32)
    same = unchanged(cb, got["grad"])
    getattr(cb, update)(*want.values(), *options)
    getattr(cb, update)(*got.values(), *options)
    assert same()
    for name in want:
        if name != "grad":
            np.testing.assert_array_equal(cb.to_host(got[name]), cb.to_host(want[name]), err_msg=name)


@pytest.mark.parametrize("kind", ["strided", "float64"])
def test_an_update_many_refuses_a_bad_operand_of_any_tensor_and_updates_none(cb, kind):
    tensors = [tuple(optimizer_arrays(cb, "adam_update", shape=(3, 5)).values()),
               tuple(optimizer_arrays(cb, "adam_update", "m", kind, shape=(4, 7)).values())]
    same = unchanged(cb, *(a for tensor in tensors for a in tensor))
    with pytest.raises(ValueError, match=refusal("tensors[1] (m)", "float64" if kind == "float64" else "float32")):
        cb.adam_update_many(tensors, 1e-3, 0.9, 0.999, 1e-8, 0.0, 1, True)
    assert same()
    # grad is only read, but through the launch's table of pointers: refused alike, not copied
    tensors = [tuple(optimizer_arrays(cb, "sgd_update", "grad", kind, shape=(4, 7)).values())]
    same = unchanged(cb, *tensors[0])
    read = ("tensors[0] (grad): expected a C-contiguous float32 CuPy array "
            "(a *_many launch reads it through its pointer)")
    with pytest.raises(ValueError, match="^" + re.escape(read)):
        cb.sgd_update_many(tensors, 0.1, 0.9, False, 0.0)
    assert same()


def test_dense_forward_refuses_a_strided_out_or_a_float64_out_z_and_writes_nothing(cb):
    x, w, b = device(cb, (5, 7), 1), device(cb, (7, 6), 2), device(cb, (6,), 3)
    out, out_z = strided(cb, (5, 6), 4), device(cb, (5, 6), 5)
    same = unchanged(cb, x, w, b, out, out_z)
    with pytest.raises(ValueError, match=refusal("out")):
        cb.dense_forward(x, w, b, "relu", out=out)
    out, out_z = device(cb, (5, 6), 4), device(cb, (5, 6), 5, np.float64)
    same_too = unchanged(cb, out, out_z)
    with pytest.raises(ValueError, match=refusal("out_z", "float64")):
        cb.dense_forward(x, w, b, "gelu", out=out, out_z=out_z)
    assert same() and same_too()


@pytest.mark.parametrize("precision", ["fp32", "tf32"])
def test_dense_backward_refuses_a_float64_out_dw_or_a_strided_out_dx_and_writes_nothing(cb, precision):
    dy, x, w, y = device(cb, (9, 6), 1), device(cb, (9, 7), 2), device(cb, (7, 6), 3), abs(device(cb, (9, 6), 4))
    out_dx, out_dw, out_db = device(cb, (9, 7), 5), device(cb, (7, 6), 6, np.float64), device(cb, (6,), 7)
    same = unchanged(cb, dy, x, w, y, out_dx, out_dw, out_db)
    with pytest.raises(ValueError, match=refusal("out_dw", "float64")):
        cb.dense_backward(dy, x, w, y, None, "relu", True, True, out_dx, out_dw, out_db, precision=precision)
    out_dx, out_dw = strided(cb, (9, 7), 5), device(cb, (7, 6), 6)
    same_too = unchanged(cb, out_dx, out_dw)
    with pytest.raises(ValueError, match=refusal("out_dx")):
        cb.dense_backward(dy, x, w, y, None, "relu", True, True, out_dx, out_dw, out_db, precision=precision)
    assert same() and same_too()


def test_scale_scale_many_and_clip_refuse_a_strided_or_float64_array_and_scale_nothing(cb):
    a = strided(cb, (4, 6))
    same = unchanged(cb, a)
    with pytest.raises(ValueError, match=refusal("a")):
        cb.scale_(a, 0.5)
    arrays = [device(cb, (3, 4), 1), device(cb, (5,), 2, np.float64)]
    same_too = unchanged(cb, *arrays)
    with pytest.raises(ValueError, match=refusal("arrays[1]", "float64")):
        cb.scale_many(arrays, 0.5)
    arrays = [device(cb, (3, 4), 1), strided(cb, (5, 3), 2)]
    norm_sq, guard = cb.zeros((1,)), cb.zeros((1,))
    same_clip = unchanged(cb, *arrays, norm_sq)
    with pytest.raises(ValueError, match=refusal("arrays[1]")):
        cb.clip_(arrays, 0.1, norm_sq, guard)
    assert same() and same_too() and same_clip()


def test_a_dropout_pass_refuses_a_strided_out_and_writes_nothing(cb):
    mask = philox.Mask(cb.asarray(np.array([1, 2], np.uint32)), *philox.mask_constants(0.5))
    x, out = device(cb, (6, 8), 1), strided(cb, (6, 8), 2)
    same = unchanged(cb, x, out)
    for run in (cb.dropout_forward, cb.dropout_backward):
        with pytest.raises(ValueError, match=refusal("out")):
            run(x, mask, out=out)
    assert same()


def test_the_stand_in_refuses_host_reads_of_device_memory_during_a_capture(cb):
    cp = cb.cupy
    a = cp.asarray(np.arange(4, dtype=np.float32))
    assert isinstance(a[1], harness.DeviceArray) and float(a[1]) == 1.0 and int(a[2]) == 2 and a.tolist()[3] == 3.0
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        element = a[0]  # a device array, as on CuPy: no copy yet
        assert isinstance(element, harness.DeviceArray) and element.shape == ()
        for read in (lambda: float(a[0]), lambda: int(a[0]), lambda: bool(a[0]), lambda: a.item(0),
                     lambda: a.tolist(), lambda: list(a), lambda: [0][a[0]]):
            with pytest.raises(harness.CaptureError, match="device-to-host copy"):
                read()
        stream.end_capture()


def test_cupy_copyto_takes_a_numpy_source_only_as_a_scalar_baked_at_the_capture(cb):
    """CuPy's copyto refuses a NumPy source of more than one element and takes a one-element one
    by value, when it is called: a captured graph replays the value of the capture."""
    cp = cb.cupy
    dst = cp.asarray(np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="non-scalar numpy.ndarray cannot be used for copyto"):
        cp.copyto(dst, np.arange(4, dtype=np.float32))
    host = np.array([5.0], np.float32)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        cp.copyto(dst, host)
        graph = stream.end_capture()
    host[0] = 42.0
    graph.launch()
    np.testing.assert_array_equal(dst.get(), np.full(4, 5.0, np.float32))


def test_a_copy_into_planted_to_hand_cupy_copyto_a_host_array_fails(cb, monkeypatch):
    """A planted bug: copy_into passing a host source to cupy.copyto, which CuPy refuses."""
    def copy_into(dst, src):
        cb.cupy.copyto(dst, np.asarray(src, dtype=dst.dtype))

    monkeypatch.setattr(cb, "copy_into", copy_into)
    with pytest.raises(ValueError, match="non-scalar numpy.ndarray"):
        cb.copy_into(cb.asarray(np.zeros((2, 3), np.float32)), np.ones((2, 3)))
