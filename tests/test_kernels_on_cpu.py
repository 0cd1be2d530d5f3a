"""Every CUDA C++ kernel in ``kernels/``, run on the CPU against the NumPy backend.

The CuPy backend itself runs here, with ``tests/cuda_on_cpu``'s stand-in for CuPy: its
launch geometry, tile and split-K choices, workspaces and argument lists are the ones a GPU
gets, and the kernels are the shipped sources (or ``GPUBP_KERNEL_DIR``'s) compiled by g++.
Two simulated GPUs pick the two code paths: 132 SMs (an H100: 128x64 tiles, split-K for
small layers with large batches) and 1 SM (128x128 tiles, no split).

The process's harness mode (``GPUBP_HARNESS_MODE``) is plain unless this file runs inside
``test_kernels_are_clean_under_sanitizer``, which reruns it in a child process under
AddressSanitizer + UBSan and under ThreadSanitizer; there the shapes shrink (each still
runs every kernel, both tile sizes, split-K and a misaligned operand) to keep CI fast, and
whole models run plain and under AddressSanitizer only (``whole_model``).
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
from test_bad_input import assert_arrays_equal, assert_weights_equal
from test_cupy_backend import (ADAM_CASES, BF16_RTOL, ELEMENTWISE_LOSS_IDS, ELEMENTWISE_LOSSES, MANY_KINDS,
                               RMSPROP_CASES, SGD_CASES, TF32_RTOL, check_activations_at_special_values,
                               check_adam_update, check_an_off_relu_unit_passes_no_gradient_even_an_infinite_one,
                               check_clip_bits, check_cross_entropy_of_a_row_with_an_infinite_logit,
                               check_cross_entropy_of_a_label_outside_the_classes,
                               check_softmax_and_cross_entropy_of_a_row_with_a_nan_logit,
                               check_cross_entropy_of_logits_sharing_a_large_offset,
                               check_no_weight_decay_keeps_an_infinite_weight,
                               check_elementwise_loss, check_large_preactivations, check_losses_at_huge_logits,
                               check_many_update, check_many_update_from_hyper, check_rmsprop_update,
                               FOLDS_DX_ACT, assert_grads_equal, check_dx_applies_the_activation_below,
                               check_sgd_update, folded_step,
                               check_softmax_cross_entropy,
                               check_sumsq_and_scale, device_scalar, many_tensors)
from test_gpu_check_scripts import load
import gpubp as gb
from gpubp import backends, philox
from gpubp.activations import ACTIVATIONS, NEEDS_Z
from gpubp.backends import cupy_backend
from gpubp.backends import numpy_backend as ref
from gpubp.layers import plan_backward
from gpubp.trace import trace

pytestmark = pytest.mark.skipif(shutil.which(harness.CXX) is None, reason=f"no C++ compiler ({harness.CXX})")

MODE = harness.current_mode()
SANITIZED = MODE != "plain"
RTOL = 1e-4
H100_SMS = 132

# (batch, in, out), none a multiple of any tile; with 132 SMs, (600, 37, 29), (600, 36, 28) and
# (1100, 13, 7) split the dW batch 2 and 4 ways (fp32 and TF32); (130, 257, 65) and (132, 260, 68)
# span several tiles of either size. (40, 36, 20), (132, 260, 68) and (600, 36, 28) have every
# extent a multiple of 4, so the fp32 GEMMs take their float4 loads; the others their scalar ones.
SHAPES = [(1, 1, 1), (19, 13, 7), (37, 29, 23), (40, 36, 20), (130, 257, 65), (132, 260, 68), (600, 37, 29),
          (600, 36, 28), (1100, 13, 7)]
BACKWARD_NEEDS = [(True, True), (True, False), (False, True)]
# (256, 96, 136): whole 128 x 128 tiles and k tiles, the three-tile pass of the pipeline with
# and without the tiles after it, in each of forward, dX and dW.
TF32_SHAPES = SHAPES + [(70, 200, 130), (256, 96, 136)]
# The sanitizer runs split the dW batch from SANITIZED_MIN_ROWS_PER_SPLIT rows a split (the
# backend: 256), so (80, 37, 29) splits 2 ways on 132 SMs as (600, 37, 29) does plain: the same
# split-K code (partials, tickets, the last block's sum, a short last chunk) on 7.5 times fewer
# rows, where every access and every barrier is a sanitizer event.
SANITIZED_MIN_ROWS_PER_SPLIT = 32
if SANITIZED:  # every kernel, both tile sizes, split-K; the rest of the matrix runs plain
    SHAPES = [(37, 29, 23), (40, 36, 20), (80, 37, 29)]
    BACKWARD_NEEDS = [(True, True)]
    TF32_SHAPES = SHAPES
# The activations the kernel tests run. The sanitizers look at memory accesses: ThreadSanitizer
# for those of a block's threads that no barrier orders, AddressSanitizer for those outside an
# allocation. An activation is a function of one value in a register, applied between the same
# loads and stores whichever it is, so under them the tests run identity (the light fp32 forward
# kernel, nothing stored for backward but y) and gelu (the heavy one, z stored and
# differentiated); the plain run checks every activation's values.
KERNEL_ACTS = ACTIVATIONS if not SANITIZED else ("identity", "gelu")
# Whole models and captured training steps launch the kernels above over and over on the same
# shapes. A data race is between threads of one block, which the kernel tests already run under
# ThreadSanitizer for every kernel; so these run plain and under AddressSanitizer (which also
# checks the workspaces the backend sizes for a whole step) but not under ThreadSanitizer,
# where they took most of CI's time. (Those skipped under both sanitizers need no mark.)
# Tests whose launch must fail run plain: a failed launch unwinds its threads with a C++
# exception, and AddressSanitizer preloaded into Python finds no __cxa_throw to pass it to.
fails_a_launch = pytest.mark.skipif(SANITIZED, reason="a test of a failing launch, which unwinds with a C++ exception "
                                                      "the preloaded sanitizer cannot pass on; runs plain")
whole_model = pytest.mark.skipif(MODE == "tsan", reason="whole models: plain and AddressSanitizer runs only; every "
                                                        "kernel runs under ThreadSanitizer in the kernel tests")
LOSS_SHAPES = [(1, 1), (37, 10), (5, 1000), (300, 3)] if not SANITIZED else [(1, 1), (37, 40)]
# The weighted loss kernels share the unweighted ones' bodies: a row, several rows and blocks, long rows.
WEIGHTED_LOSS_SHAPES = [(1, 1), (37, 10), (5, 1000)] if not SANITIZED else [(37, 40)]
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


def cupy_on_cpu(cpu_harness, monkeypatch, sms: int, version: int = 14, compute_capability: str = "90"):
    """The CuPy backend, running on the CPU harness, seeing a GPU with this many SMs, of this
    compute capability (its shared memory per block), and the stream API of CuPy ``version``."""
    monkeypatch.setattr(cupy_backend, "cupy", harness.cupy_shim(cpu_harness, sms=sms, version=version,
                                                                compute_capability=compute_capability))
    if SANITIZED:
        monkeypatch.setattr(cupy_backend, "MIN_ROWS_PER_SPLIT", SANITIZED_MIN_ROWS_PER_SPLIT)
    for cache in harness.BACKEND_CACHES:
        monkeypatch.setattr(cupy_backend, cache, {})
    # Models built with backend="cupy" get it too, whatever an earlier test found unavailable.
    monkeypatch.setitem(backends._modules, "cupy", cupy_backend)
    monkeypatch.delitem(backends._unavailable, "cupy", raising=False)
    return cupy_backend


@pytest.fixture(params=[H100_SMS, 1], ids=["132sms", "1sm"])
def cb(request, cpu_harness, monkeypatch):
    """Both GEMM paths: 132 SMs picks 128x64 tiles and split-K, 1 SM the 128x128 tiles."""
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
    names = {"ce_fwd_bwd_i32", "ce_fwd_bwd_i64", "mse_fwd_bwd", "mae_fwd_bwd", "huber_fwd_bwd", "bce_fwd_bwd",
             "ce_fwd_bwd_weighted_i32", "ce_fwd_bwd_weighted_i64", "mse_fwd_bwd_weighted", "mae_fwd_bwd_weighted",
             "huber_fwd_bwd_weighted", "poisson_fwd_bwd", "poisson_fwd_bwd_weighted",
             "bce_fwd_bwd_weighted", "sgd_update", "adam_update", "rmsprop_update",
             "sgd_update_hyper", "adam_update_hyper", "rmsprop_update_hyper", "sgd_update_many", "adam_update_many",
             "rmsprop_update_many", "sumsq", "sumsq_many", "scale_inplace", "scale_many", "scale_many_clip",
             "dropout_mask", "philox_words", "round_bf16"}
    names |= {f"dense_dz_dropout_{act}" for act in ACTIVATIONS} | {f"dense_dz_db_dropout_{act}" for act in ACTIVATIONS}
    names |= {f"dense_fwd_{precision}_{act}_dropout" for act in ACTIVATIONS for precision in ("tf32", "bf16")}
    names |= {f"dense_fwd_dropout_{cupy_backend.tile_name(tile)}" for tile in cupy_backend.GEMM_TILES}
    names |= {f"dense_{kind}_{p}" for kind in ("dx", "dw") for p in ("tf32", "bf16")}
    # dX regenerating the mask below: test_(tensor_core_)dx_regenerating_the_mask_below_...
    names |= {f"dense_dx_{p}_dropout" for p in ("tf32", "bf16")}
    names |= {f"dense_dx_dropout_{cupy_backend.tile_name(tile)}" for tile in cupy_backend.GEMM_TILES}
    names |= {f"dense_fwd_{p}_{act}" for act in ACTIVATIONS for p in ("tf32", "bf16")}
    names |= {f"dense_fwd_{cupy_backend.tile_name(tile)}" for tile in cupy_backend.GEMM_TILES}
    names.add("dense_fwd_heavy_128x128")
    names |= {f"fused_mlp_{kind}{suffix}" for kind in ("fwd", "bwd", "dw")
              for suffix in cupy_backend.FUSED_PRECISIONS.values()}
    for act in ACTIVATIONS:
        names.add(f"dense_dz_db_{act}")
    names |= {f"dense_dz_{act}" for act in ACTIVATIONS if act != "identity"}
    names |= {f"dense_{kind}_{cupy_backend.tile_name(tile)}" for kind in ("dx", "dw") for tile in cupy_backend.GEMM_TILES}
    return names


def test_the_tests_cover_every_extern_c_kernel(cpu_harness):
    shipped = set()
    for filename in cupy_backend.KERNEL_FILES:
        shipped |= set(cpu_harness.module(cupy_backend.kernel_source(filename), Path(filename).stem).kernel_names())
    assert shipped == launched_kernel_names()


def test_every_kernel_has_the_launch_bounds_it_declares(cpu_harness):
    """Every extern "C" kernel declares __launch_bounds__ (its block size, for register allocation),
    and the harness refuses a larger block, as a GPU does: a bound the harness failed to read would
    show here as the 1024 of a kernel without one."""
    bounds = {}
    for filename in cupy_backend.KERNEL_FILES:
        module = cpu_harness.module(cupy_backend.kernel_source(filename), Path(filename).stem)
        bounds |= {name: module.get_function(name).max_threads_per_block for name in module.kernel_names()}
    unbounded = sorted(name for name, bound in bounds.items() if not 32 <= bound < 1024)
    assert not unbounded, f"kernels with no __launch_bounds__ the harness could read: {unbounded}"


def test_the_static_shared_memory_the_harness_fills_is_the_kernels_shared_memory(cpu_harness):
    """The harness fills the kernel unit's zero-initialized statics with 0xff before every block,
    as the kernels' __shared__ memory (cuda_on_cpu/static_shared.ld): a harness-side variable among
    them (as kernels/one_kernel.cuh's was, until it moved to initialized data) would be clobbered.
    Every __shared__ object in kernels/ is declared in a function: a function-local static."""
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) not found on PATH")
    found = 0
    for filename in cupy_backend.KERNEL_FILES:
        library = cpu_harness.module(cupy_backend.kernel_source(filename), Path(filename).stem).path
        symbols = [line.split() for line in subprocess.run([nm, "--defined-only", "-S", str(library)],
                                                           capture_output=True, text=True, check=True).stdout.splitlines()]
        markers = {fields[-1]: int(fields[0], 16) for fields in symbols if fields[-1].startswith("gpubp_shared_")}
        begin, end = markers["gpubp_shared_begin"], markers["gpubp_shared_end"]
        # Objects only (address, size, type, name): the linker's own markers have no size.
        inside = sorted(name for at, _, _, name in (f for f in symbols if len(f) == 4) if begin <= int(at, 16) < end)
        others = [name for name in inside if not name.startswith("_ZZ")]
        assert not others, f"{filename}: statics that are not a kernel's __shared__ memory would be filled: {others}"
        found += len(inside)
    assert found, "no shared memory found between gpubp_shared_begin and gpubp_shared_end in any kernel file"


# ----------------------------------------------------------------------------- dense layer


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("act", KERNEL_ACTS)
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


@fails_a_launch
def test_a_forward_kernel_launched_for_an_activation_outside_its_set_traps(cpu_harness, rng, monkeypatch):
    """A kernel serves a set of activations, the one to apply passed at launch
    (kernels/activations.cuh): the host picking a kernel that lacks it must fail the launch, not
    leave y unwritten. On one SM, fp32 takes the 128x128 tile, whose light kernel lacks sigmoid;
    an id past the last activation is outside every set."""
    cb = cupy_on_cpu(cpu_harness, monkeypatch, 1)
    x, w, b = layer(rng, 37, 29, 23)

    def forward(act):
        return cb.dense_forward(cb.asarray(x), cb.asarray(w), cb.asarray(b), act)[0]

    close(cb.to_host(forward("sigmoid")), ref.dense_forward(*f64(x, w, b), "sigmoid")[0])
    monkeypatch.setattr(cb, "HEAVY_EPILOGUE", ())  # sigmoid sent to dense_fwd_128x128
    with pytest.raises(ValueError, match="dense_fwd_128x128 does not serve sigmoid"):
        forward("sigmoid")  # NVRTC would build it for sigmoid alone: the host refuses first
    monkeypatch.setenv(cb.NVRTC_ACTIVATIONS_ENV, "all")  # the kernel with its whole set
    with pytest.raises(harness.KernelError, match=r"__trap\(\)"):
        forward("sigmoid")
    monkeypatch.setitem(cb.ACT_ID, "relu", len(ACTIVATIONS))
    with pytest.raises(harness.KernelError, match=r"__trap\(\)"):
        forward("relu")


# The documented TF32 bound (TF32_RTOL, kernels/gemm_tf32.cuh): 2e-3 relative to the largest
# pre-activation on N(0, 1) data. An activation moves it by at most its steepest slope (1.13,
# gelu's), so every output is checked against 2e-3 x 1.13 x max |z|.
STEEPEST_SLOPE = 1.13


def normal_layer(rng, shape):
    """x (B, in), w (in, out), b (out,) all N(0, 1): the data the TF32 bound is stated for."""
    batch, n_in, n_out = shape
    return (rng.standard_normal(s).astype(np.float32) for s in ((batch, n_in), (n_in, n_out), (n_out,)))


@pytest.mark.parametrize("shape", TF32_SHAPES, ids=shape_id)
@pytest.mark.parametrize("act", KERNEL_ACTS)
def test_tf32_dense_forward_is_within_its_error_bound(cb_h100, rng, act, shape):
    x, w, b = normal_layer(rng, shape)
    y_ref, _ = ref.dense_forward(*f64(x, w, b), act)
    z_ref, _ = ref.dense_forward(*f64(x, w, b), "identity")
    y, z = cb_h100.dense_forward(cb_h100.asarray(x), cb_h100.asarray(w), cb_h100.asarray(b), act, precision="tf32")
    bound = TF32_RTOL * float(np.max(np.abs(z_ref)))
    assert np.max(np.abs(cb_h100.to_host(y) - y_ref)) <= STEEPEST_SLOPE * bound
    if act in NEEDS_Z:
        assert np.max(np.abs(cb_h100.to_host(z) - z_ref)) <= bound


@pytest.mark.parametrize("shape", TF32_SHAPES, ids=shape_id)
@pytest.mark.parametrize("act", KERNEL_ACTS)
def test_tf32_dense_backward_is_within_its_error_bound(cb_h100, rng, act, shape):
    x, w, b = normal_layer(rng, shape)
    y64, z64 = ref.dense_forward(*f64(x, w, b), act)
    dy = rng.standard_normal(y64.shape).astype(np.float32)
    y, z = y64.astype(np.float32), None if z64 is None else z64.astype(np.float32)
    dx_ref, dw_ref, db_ref = ref.dense_backward(*f64(dy, x, w, y, z), act, True, True)
    dev = [None if a is None else cb_h100.asarray(a) for a in (dy, x, w, y, z)]
    with trace() as t:
        dx, dw, db = cb_h100.dense_backward(*dev, act, True, True, precision="tf32")
    assert t.launches == cb_h100.backward_kernels(act, True, True, "tf32")
    close(cb_h100.to_host(dx), dx_ref, TF32_RTOL)
    close(cb_h100.to_host(dw), dw_ref, TF32_RTOL)
    close(cb_h100.to_host(db), db_ref)  # summed in fp32 from the unrounded dz


@fails_a_launch
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize("kind", ["fwd", "dx", "dw"])
def test_a_tensor_core_gemm_launched_without_its_dynamic_shared_memory_fails(cpu_harness, monkeypatch, rng, kind,
                                                                            precision):
    """The tensor-core GEMMs stage their tiles in dynamic shared memory, which the host must
    request at every launch (``_dynamic_shared_bytes``, read from the kernel's name). A launch
    that asks for none, as a name the lookup did not recognise once did, must fail here, not
    compute the right answer in the harness's spare buffer."""
    cb = cupy_on_cpu(cpu_harness, monkeypatch, H100_SMS)
    requested = cb._dynamic_shared_bytes
    planted = f"dense_{kind}_{precision}"
    monkeypatch.setattr(cb, "_dynamic_shared_bytes",
                        lambda name: 0 if name.startswith(planted) else requested(name))
    x, w, b = (cb.asarray(a) for a in normal_layer(rng, (37, 40, 24)))
    y, z = cb.dense_forward(x, w, b, "relu", precision="fp32")
    # The first cp.async into it is refused, before any shared write lands there.
    with pytest.raises(harness.KernelError, match=rf"{planted}\w*: cp\.async: the destination is not in the block's "
                                                  r"shared memory \(it lies past the launch's dynamic shared memory "
                                                  r"request of 0 bytes\)"):
        if kind == "fwd":
            cb.dense_forward(x, w, b, "relu", precision=precision)
        else:
            cb.dense_backward(cb.asarray(rng.standard_normal((37, 24)).astype(np.float32)), x, w, y, z, "relu",
                              kind == "dx", kind == "dw", precision=precision)


@pytest.mark.parametrize("need_dx, need_dw", BACKWARD_NEEDS)
@pytest.mark.parametrize("act", ["identity", "gelu"])
def test_tf32_backward_launches_only_what_is_needed(cb_h100, rng, act, need_dx, need_dw):
    """dz is its own launch, except for an identity layer without dW (dz is dy, and no db)."""
    x, w, b = normal_layer(rng, (37, 29, 23))
    y64, z64 = ref.dense_forward(*f64(x, w, b), act)
    dy = rng.standard_normal(y64.shape).astype(np.float32)
    z = None if z64 is None else z64.astype(np.float32)
    want = ref.dense_backward(*f64(dy, x, w, None, z), act, need_dx, need_dw)
    # identity is given no y at all: its gradient must not read one
    dev = [None if a is None else cb_h100.asarray(a) for a in (dy, x, w, None, z)]
    with trace() as t:
        got = cb_h100.dense_backward(*dev, act, need_dx, need_dw, precision="tf32")
    expected = cb_h100.backward_kernels(act, need_dx, need_dw, "tf32")
    assert t.launches == expected
    assert ("dense_dz" in expected) == (act != "identity" or need_dw)
    for g, reference, rtol in zip(got, want, (TF32_RTOL, TF32_RTOL, RTOL)):
        if reference is None:
            assert g is None
        else:
            close(cb_h100.to_host(g), reference, rtol)


def tf32_layer_of_misaligned_views(cb, rng, batch, n_in, n_out):
    """Forward, dX and dW of a gelu layer whose every array is a view one float past a 16-byte
    boundary, against float64."""
    x, w, b = normal_layer(rng, (batch, n_in, n_out))
    x_dev, w_dev = harness.to_device(x, offset_bytes=4), harness.to_device(w, offset_bytes=4)
    y, z = cb.dense_forward(x_dev, w_dev, cb.asarray(b), "gelu", precision="tf32")
    y_ref, z_ref = ref.dense_forward(*f64(x, w, b), "gelu")
    close(cb.to_host(z), z_ref, TF32_RTOL)
    dy = rng.standard_normal((batch, n_out)).astype(np.float32)
    want = ref.dense_backward(*f64(dy, x, w, None, cb.to_host(z)), "gelu", True, True)
    outs = [harness.device_empty(s, offset_bytes=4) for s in ((batch, n_in), (n_in, n_out), (n_out,))]
    got = cb.dense_backward(harness.to_device(dy, offset_bytes=4), x_dev, w_dev, None, z, "gelu", True, True,
                                 *outs, precision="tf32")
    for g, reference, rtol in zip(got, want, (TF32_RTOL, TF32_RTOL, RTOL)):
        close(cb.to_host(g), reference, rtol)


@pytest.mark.parametrize("n_in, n_out", [(4, 5), (12, 129), (5, 4)])
def test_tf32_misaligned_operands_take_the_four_byte_path(cb_h100, rng, n_in, n_out):
    """Views one float past a 16-byte boundary cannot be staged by 16-byte cp.async (a fault on a
    GPU, a failed launch here): the GEMMs stage them by 4-byte cp.async instead."""
    tf32_layer_of_misaligned_views(cb_h100, rng, 37, n_in, n_out)


# Several k tiles with a partial one (which the 4-byte path stages first), several M and N tiles
# with edges, a K below one tile, odd widths, and dW split over the batch ((600, ...): 2 splits of
# 320 and 280 rows; (80, ...) under the sanitizers' smaller splits).
TF32_MISALIGNED_SHAPES = [(290, 53, 137), (600, 37, 29), (150, 130, 10), (19, 3, 1)] if not SANITIZED else [
    (80, 37, 29)]


@pytest.mark.parametrize("shape", TF32_MISALIGNED_SHAPES, ids=shape_id)
def test_tf32_misaligned_views_of_odd_widths_over_several_tiles(cb_h100, rng, shape):
    tf32_layer_of_misaligned_views(cb_h100, rng, *shape)


def test_tf32_forward_rounds_its_inputs(cb_h100, rng):
    """Not an fp32 kernel in disguise: inputs that TF32 cannot hold come out rounded."""
    x = np.full((3, 1), 1.0 + 2.0**-12, np.float32)  # 1 + 2^-12 rounds to 1 in TF32
    w = np.ones((1, 2), np.float32)
    y, _ = cb_h100.dense_forward(cb_h100.asarray(x), cb_h100.asarray(w), cb_h100.zeros((2,)), "identity", precision="tf32")
    assert np.array_equal(cb_h100.to_host(y), np.ones((3, 2), np.float32))
    y, _ = cb_h100.dense_forward(cb_h100.asarray(x), cb_h100.asarray(w), cb_h100.zeros((2,)), "identity")
    assert np.array_equal(cb_h100.to_host(y), np.full((3, 2), 1.0 + 2.0**-12, np.float32))


# bf16 (kernels/gemm_tf32.cuh, MmaTile<bf16>): the operands are rounded to bf16 once, by round_bf16,
# and the NumPy backend's precision="bf16" rounds the same operands the same way (round_bf16), so
# the kernels must match it up to the order of their fp32 sums (RTOL), and both must stay within
# the documented bf16 bound (BF16_RTOL, 1e-2 relative to the largest pre-activation on N(0, 1)
# data) of the unrounded float64 result. The backward's dz is formed in fp32 on both sides, where
# an activation's derivative may differ by an ulp and so round to a neighbouring bf16 value:
# BF16_DZ_RTOL bounds what such a flip costs (2^-8 of one product, over the sum of at least 16).
BF16_DZ_RTOL = 1e-3
# What a product (dX, dW) is held to in each precision, against the float64 reference.
PRODUCTS_RTOL = {"fp32": RTOL, "tf32": TF32_RTOL, "bf16": BF16_RTOL}
BF16_FORWARD_LAUNCHES = ["round_bf16", "round_bf16", "dense_fwd"]


@pytest.mark.parametrize("shape", TF32_SHAPES, ids=shape_id)
@pytest.mark.parametrize("act", KERNEL_ACTS)
def test_bf16_dense_forward_matches_numpy_and_its_error_bound(cb_h100, rng, act, shape):
    x, w, b = normal_layer(rng, shape)
    y_ref, z_ref = ref.dense_forward(*f64(x, w, b), act, precision="bf16")
    y_exact, _ = ref.dense_forward(*f64(x, w, b), act)
    z_exact, _ = ref.dense_forward(*f64(x, w, b), "identity")
    with trace() as t:
        y, z = cb_h100.dense_forward(cb_h100.asarray(x), cb_h100.asarray(w), cb_h100.asarray(b), act,
                                     precision="bf16")
    assert t.launches == BF16_FORWARD_LAUNCHES
    close(cb_h100.to_host(y), y_ref)
    if act in NEEDS_Z:
        close(cb_h100.to_host(z), z_ref)
    bound = BF16_RTOL * float(np.max(np.abs(z_exact)))
    assert np.max(np.abs(cb_h100.to_host(y) - y_exact)) <= STEEPEST_SLOPE * bound


# Which gradients are asked for changes which kernels launch, not what a kernel does: every
# combination on the small shapes, dX and dW together on the large ones (split-K, several tiles).
BF16_BACKWARD_CASES = [(shape, needs) for shape in TF32_SHAPES
                       for needs in (BACKWARD_NEEDS if shape[0] <= 40 else [(True, True)])]


@pytest.mark.parametrize("shape, needs", BF16_BACKWARD_CASES,
                         ids=[f"{shape_id(shape)}-{'dx' * needs[0]}{'dw' * needs[1]}"
                              for shape, needs in BF16_BACKWARD_CASES])
@pytest.mark.parametrize("act", KERNEL_ACTS)
def test_bf16_dense_backward_matches_numpy_and_its_error_bound(cb_h100, rng, act, shape, needs):
    need_dx, need_dw = needs
    x, w, b = normal_layer(rng, shape)
    y64, z64 = ref.dense_forward(*f64(x, w, b), act)
    dy = rng.standard_normal(y64.shape).astype(np.float32)
    y, z = y64.astype(np.float32), None if z64 is None else z64.astype(np.float32)
    emulated = ref.dense_backward(dy, x, w, y, z, act, need_dx, need_dw, precision="bf16")
    exact = ref.dense_backward(*f64(dy, x, w, y, z), act, need_dx, need_dw)
    dev = [None if a is None else cb_h100.asarray(a) for a in (dy, x, w, y, z)]
    with trace() as t:
        got = cb_h100.dense_backward(*dev, act, need_dx, need_dw, precision="bf16")
    assert t.launches == cb_h100.backward_kernels(act, need_dx, need_dw, "bf16")
    parity = RTOL if act in ("identity", "relu") else BF16_DZ_RTOL  # their dz is exact in fp32
    for g, want, bound, rtol in zip(got, emulated, exact, (parity, parity, RTOL)):
        if want is None:
            assert g is None
        else:
            close(cb_h100.to_host(g), want.astype(np.float64), rtol)
            close(cb_h100.to_host(g), bound, BF16_RTOL)  # db: an fp32 sum of the unrounded dz


def test_bf16_forward_rounds_its_inputs_to_nearest_even(cb_h100):
    """Not an fp32 or tf32 kernel in disguise: 1 + 2^-8 is a tie that rounds to 1 (even), and
    1 + 3 * 2^-8 one that rounds up, to 1 + 2^-6."""
    x = np.array([[1.0 + 2.0**-8], [1.0 + 3 * 2.0**-8], [-(1.0 + 2.0**-9)]], np.float32)
    w = np.ones((1, 2), np.float32)
    y, _ = cb_h100.dense_forward(cb_h100.asarray(x), cb_h100.asarray(w), cb_h100.zeros((2,)), "identity",
                                 precision="bf16")
    expected = np.repeat(np.array([[1.0], [1.0 + 2.0**-6], [-1.0]], np.float32), 2, axis=1)
    assert np.array_equal(cb_h100.to_host(y), expected)
    assert np.array_equal(ref.dense_forward(x, w, np.zeros(2, np.float32), "identity", precision="bf16")[0], expected)


@pytest.mark.parametrize("n_in, n_out", [(4, 5), (12, 129), (5, 4)])
def test_bf16_takes_misaligned_operands(cb_h100, rng, n_in, n_out):
    """fp32 views one float past a 16-byte boundary: round_bf16 reads them by 32-bit loads, and the
    GEMMs get its aligned, padded copies."""
    batch = 37
    x, w, b = normal_layer(rng, (batch, n_in, n_out))
    x_dev, w_dev = harness.to_device(x, offset_bytes=4), harness.to_device(w, offset_bytes=4)
    y, z = cb_h100.dense_forward(x_dev, w_dev, cb_h100.asarray(b), "gelu", precision="bf16")
    _, z_ref = ref.dense_forward(*f64(x, w, b), "gelu", precision="bf16")
    close(cb_h100.to_host(z), z_ref)
    dy = rng.standard_normal((batch, n_out)).astype(np.float32)
    z_host = cb_h100.to_host(z)
    want = ref.dense_backward(dy, x, w, None, z_host, "gelu", True, True, precision="bf16")
    outs = [harness.device_empty(s, offset_bytes=4) for s in ((batch, n_in), (n_in, n_out), (n_out,))]
    got = cb_h100.dense_backward(harness.to_device(dy, offset_bytes=4), x_dev, w_dev, None, z, "gelu", True, True,
                                 *outs, precision="bf16")
    for g, reference in zip(got, want):
        close(cb_h100.to_host(g), reference.astype(np.float64), BF16_DZ_RTOL)


@pytest.mark.parametrize("need_dx, need_dw", BACKWARD_NEEDS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("act", KERNEL_ACTS)
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


# ----------------------------------------------------------------------------- act' in the dX epilogue
#
# The dX kernels take the activation of the layer below (dx_act) and return its dz
# (check_dx_applies_the_activation_below). Shapes: (batch, in, out) of the upper layer.
FOLD_SHAPES = [(1, 1, 1), (37, 29, 23), (40, 36, 20), (132, 260, 68)] if not SANITIZED else [(37, 29, 23),
                                                                                               (40, 36, 20)]
# The activations whose derivative the dX epilogue applies; under the sanitizers the one with the
# longest epilogue in registers (sigmoid: a product of y), one applied after the store (gelu: z)
# and a mask alone (identity).
DROPOUT_FOLD_ACTS = FOLDS_DX_ACT if not SANITIZED else ("identity", "sigmoid", "gelu")
FOLD_ACTS = [act for act in DROPOUT_FOLD_ACTS if act != "identity"]
# The tensor-core dX epilogues share no memory between threads (each reads back what it stored):
# AddressSanitizer checks their reads and writes, ThreadSanitizer the fp32 ones only.
tensor_core_fold = pytest.mark.skipif(MODE == "tsan", reason="tensor-core dX epilogues: plain and AddressSanitizer "
                                                             "runs only; the fp32 ones run under ThreadSanitizer")


@pytest.mark.parametrize("shape", FOLD_SHAPES, ids=shape_id)
@pytest.mark.parametrize("act", FOLD_ACTS)
def test_dx_with_the_activation_below_is_that_layers_dz_bit_for_bit(cb, rng, act, shape):
    check_dx_applies_the_activation_below(cb, rng, act, shape, "fp32")


@tensor_core_fold
@pytest.mark.parametrize("shape", FOLD_SHAPES, ids=shape_id)
@pytest.mark.parametrize("act", FOLD_ACTS)
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_tensor_core_dx_with_the_activation_below_is_that_layers_dz_bit_for_bit(cb_h100, rng, precision, act,
                                                                                shape):
    check_dx_applies_the_activation_below(cb_h100, rng, act, shape, precision)


@pytest.mark.parametrize("shape", FOLD_SHAPES, ids=shape_id)
@pytest.mark.parametrize("act", DROPOUT_FOLD_ACTS)
def test_dx_regenerating_the_mask_below_is_that_layers_masked_dz_bit_for_bit(cb, rng, act, shape):
    check_dx_applies_the_activation_below(cb, rng, act, shape, "fp32", dropout=True)


@tensor_core_fold
@pytest.mark.parametrize("shape", FOLD_SHAPES, ids=shape_id)
@pytest.mark.parametrize("act", DROPOUT_FOLD_ACTS)
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_tensor_core_dx_regenerating_the_mask_below_is_that_layers_masked_dz_bit_for_bit(cb_h100, rng, precision,
                                                                                        act, shape):
    check_dx_applies_the_activation_below(cb_h100, rng, act, shape, precision, dropout=True)


@pytest.mark.parametrize("precision", ["fp32", "tf32"])
def test_dx_reads_a_misaligned_activation_below_one_float_at_a_time(cb_h100, rng, precision):
    check_dx_applies_the_activation_below(cb_h100, rng, "sigmoid", (40, 36, 20), precision,
                                          misalign=lambda a: harness.to_device(cb_h100.to_host(a), offset_bytes=4))


@whole_model
@pytest.mark.parametrize("frozen", [(), (1,), (0, 1)], ids=["none", "middle", "bottom_2"])
@pytest.mark.parametrize("precision", ["fp32", "tf32"])
def test_a_model_whose_dx_apply_the_activations_below_gets_the_same_gradients_bit_for_bit(cb_h100, precision,
                                                                                          frozen):
    """The relu, gelu and tanh layers' act' in the dX above them (gelu's, which reads z, after the
    store): no dz pass for them but where a dz sums db (tensor cores). The plan says so, backward
    launches it, and the gradients are those of a dz pass per layer."""
    grads, launches, plan = folded_step(cb_h100, frozen, True, precision)
    want, unfolded_launches, unfolded_plan = folded_step(cb_h100, frozen, False, precision)
    assert_grads_equal(grads, want)
    for got in ((launches, plan), (unfolded_launches, unfolded_plan)):
        assert got[0] == [kernel for _, kernels in reversed(got[1]) for kernel in kernels]
    lowest = min(i for i in range(4) if i not in frozen)
    folded = [i for i in (0, 1, 2) if i >= lowest]  # relu, gelu and tanh, below a layer that computes dX
    db_pass = [int(precision == "tf32" and i not in frozen) for i in range(4)]  # an identity layer's dz sums db
    # every hidden layer that computes anything is folded, and the head is linear: dz passes sum db only
    assert [kernels.count("dense_dz") for _, kernels in plan] == db_pass
    assert [kernels.count("dense_dz") for _, kernels in unfolded_plan] == [
        db_pass[i] if i == 3 else int(i >= lowest) for i in range(4)]
    assert plan.notes == {f"dense_{i}": f"(its act' is applied by dense_{i + 1}'s dX)" for i in folded}
    assert f"dense_{folded[-1]}  " in str(plan) and "its act' is applied by" in str(plan)


@whole_model
@pytest.mark.parametrize("frozen", [(), (2,), (0, 2)], ids=["none", "middle", "bottom_2"])
@pytest.mark.parametrize("precision", ["fp32", "tf32"])
def test_a_model_whose_dx_regenerate_the_dropout_masks_below_gets_the_same_gradients(cb_h100, precision, frozen):
    """Dropouts above a relu layer and a linear one: the dX above each regenerates its mask, no
    dropout_dz pass runs, and the gradients are the masked dz passes' (bit for bit but the tensor
    cores' db, whose masked pass sums in another order)."""
    grads, launches, plan = folded_step(cb_h100, frozen, True, precision, dropout=True)
    want, unfolded_launches, unfolded_plan = folded_step(cb_h100, frozen, False, precision, dropout=True)
    weights, biases = slice(0, None, 2), slice(1, None, 2)
    assert_grads_equal(grads[weights], want[weights])
    if precision == "fp32":
        assert_grads_equal(grads[biases], want[biases])
    for got, expected in zip(grads[biases], want[biases]):
        assert (got is None) == (expected is None)
        if expected is not None:
            close(got, expected.astype(np.float64))
    assert launches == [kernel for _, kernels in reversed(plan) for kernel in kernels]
    assert "dropout_dz" not in launches and unfolded_launches.count("dropout_dz") == 2 - (0 in frozen)
    below_trained = {"dense_0": "(its act' and dropout_1's mask are applied by dense_2's dX)",
                     "dropout_1": "(its mask is regenerated by dense_2's dX)",
                     "dense_2": "(its act' is applied by dense_3's dX)"}
    assert plan.notes == {
        **({} if 0 in frozen else below_trained),  # a frozen bottom layer runs nothing to regenerate it in
        "dense_3": "(its act' and dropout_4's mask are applied by dense_5's dX)",
        "dropout_4": "(its mask is regenerated by dense_5's dX)"}


@pytest.mark.skipif(SANITIZED, reason="runs no kernel the test above does not")
def test_a_layer_that_applies_its_own_act_prime_after_the_dx_above_did_fails_the_bitwise_check(cb_h100,
                                                                                                 monkeypatch):
    """A planted bug for the test above: a layer below a folding dX forms its dz from it again."""
    backward = gb.Dense.backward
    monkeypatch.setattr(gb.Dense, "backward", lambda layer, dy, need_dx, out_dx=None, precision="fp32", below=None,
                        folded=False: backward(layer, dy, need_dx, out_dx, precision, below))
    grads, _, _ = folded_step(cb_h100, (), True)
    want, _, _ = folded_step(cb_h100, (), False)
    with pytest.raises(AssertionError):
        assert_grads_equal(grads, want)


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


@pytest.mark.parametrize("act", KERNEL_ACTS)
def test_activations_are_finite_at_large_preactivations(cb_h100, rng, act):
    """kernels/activations.cuh at +-1e4, +-1e20 and the largest float, forward and derivative."""
    check_large_preactivations(cb_h100, rng, act)


# dW split over the batch on 132 SMs, in both precisions (each layer is one 64x64 output tile):
# (batch, in, out) -> splits. The sanitizer runs split (80, 37, 29) as (600, 37, 29) (see SHAPES).
SPLIT_K_SHAPES = {(600, 37, 29): 2, (1100, 13, 7): 4} if not SANITIZED else {(80, 37, 29): 2}


@pytest.mark.parametrize("shape", SPLIT_K_SHAPES, ids=shape_id)
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_split_k_dw_is_bitwise_repeatable_matches_one_split_and_resets_its_tickets(cb_h100, rng, monkeypatch,
                                                                                  precision, shape):
    batch, n_in, n_out = shape
    assert cb_h100._dw_split(batch, 1)[0] == SPLIT_K_SHAPES[shape]
    x, w, b = layer(rng, *shape)
    y = np.tanh(x.astype(np.float64) @ w + b).astype(np.float32)
    dy = rng.standard_normal((batch, n_out)).astype(np.float32)
    dev = [cb_h100.asarray(a) for a in (dy, x, w, y)]

    def dw_and_db():
        _, dw, db = cb_h100.dense_backward(*dev, None, "tanh", False, True, precision=precision)
        return cb_h100.to_host(dw), cb_h100.to_host(db)

    split, again = dw_and_db(), dw_and_db()
    assert not cb_h100.to_host(cb_h100._state()["tickets"]).any(), "the last block of each tile resets its ticket"
    monkeypatch.setattr(cb_h100, "MAX_SPLITS", 1)
    assert cb_h100._dw_split(batch, 1)[0] == 1
    one_split = dw_and_db()
    _, dw_ref, db_ref = ref.dense_backward(*f64(dy, x, w, y), None, "tanh", False, True)
    dw_rtol = PRODUCTS_RTOL[precision]
    for got, repeat, single, want, rtol in zip(split, again, one_split, (dw_ref, db_ref), (dw_rtol, RTOL)):
        assert np.array_equal(repeat, got)
        close(got, want, rtol)  # db is an fp32 sum in either precision
        # Both round the same operands; only the order of the fp32 additions differs.
        close(got, single.astype(np.float64))


# The pass forming dz (dense_dz_db) split over the batch on 132 SMs, so that a narrow layer's
# few column strips still fill the GPU: (batch, out) -> splits.
DZ_SPLIT_SHAPES = {(600, 29): 10, (1100, 70): 18} if not SANITIZED else {(200, 29): 4}


@pytest.mark.parametrize("shape", DZ_SPLIT_SHAPES, ids=shape_id)
@pytest.mark.parametrize("precision, act, masked", [("fp32", "relu", False), ("tf32", "tanh", False),
                                                    ("bf16", "identity", True)])
def test_the_dz_pass_splits_the_batch_sums_db_in_split_order_and_resets_its_tickets(cb_h100, rng, monkeypatch,
                                                                                   precision, act, masked, shape):
    batch, n_out = shape
    assert cb_h100.dz_split(batch, n_out, 132)[0] == DZ_SPLIT_SHAPES[shape]
    x, w, b = layer(rng, batch, 11, n_out)
    host_mask, device_mask = dropout_masks(cb_h100, rng) if masked else (None, None)
    masks = {"dropout": device_mask} if masked else {}
    y, z = cb_h100.dense_forward(*(cb_h100.asarray(a) for a in (x, w, b)), act, precision=precision, **masks)
    y_host, z_host = cb_h100.to_host(y), None if z is None else cb_h100.to_host(z)
    dy = rng.standard_normal(y_host.shape).astype(np.float32)
    dy_dev, w_dev = cb_h100.asarray(dy), cb_h100.asarray(w)

    def db():  # db alone: the dz pass is the only launch that sums it, in every precision
        _, _, got = cb_h100.dense_backward(dy_dev, None, w_dev, y, z, act, False, False, precision=precision,
                                           need_db=True, **masks)
        return cb_h100.to_host(got)

    split, again = db(), db()
    assert not cb_h100.to_host(cb_h100._state()["tickets"]).any(), "the last block of each strip resets its ticket"
    monkeypatch.setattr(cb_h100, "DZ_MAX_SPLITS", 1)
    assert cb_h100.dz_split(batch, n_out, 132)[0] == 1
    one_split = db()
    _, _, db_ref = ref.dense_backward(*f64(dy, x, w, y_host, z_host), act, False, True, dropout=host_mask)
    assert np.array_equal(again, split)
    close(split, db_ref)  # an fp32 sum of the exact dz
    close(split, one_split.astype(np.float64))  # only the order of the additions differs


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


# ----------------------------------------------------------------------------- dropout
#
# kernels/philox.cuh and dropout.cu: the generator against Random123's known answers and gpubp.philox,
# bit for bit; the masks and gradients against the NumPy backend given the same key.
# (24, 16, 32): widths that are multiples of 4, the float4 path; the others the scalar one.
DROPOUT_SHAPES = [(1, 1, 1), (37, 29, 23), (130, 257, 65), (24, 16, 32)] if not SANITIZED else [(37, 29, 23),
                                                                                               (24, 16, 32)]
DROPOUT_ACTS = ACTIVATIONS if not SANITIZED else ("relu", "gelu")


def test_philox_in_cuda_gives_the_known_answers_and_equals_numpy_bit_for_bit(cb_h100, rng):
    from test_dropout import KNOWN_ANSWERS

    for counter, key, expected in KNOWN_ANSWERS:
        words = cb_h100.to_host(cb_h100.philox_words(np.array([counter], np.uint32), np.array(key, np.uint32)))
        assert [int(w) for w in words[0]] == list(expected)
    counters = rng.integers(0, 2**32, size=(300, 4), dtype=np.uint64).astype(np.uint32)
    key = rng.integers(0, 2**32, size=2, dtype=np.uint64).astype(np.uint32)
    words = cb_h100.to_host(cb_h100.philox_words(counters, key))
    np.testing.assert_array_equal(words, np.stack(philox.philox4x32_10_numpy(*counters.T, *key), axis=1))


def dropout_masks(cb, rng, rate=0.4, first_row=3):
    """The same mask for the NumPy backend (a host key) and the backend under test (a device key),
    its rows counted from ``first_row`` (as in a data-parallel step)."""
    key = rng.integers(0, 2**32, size=2, dtype=np.uint64).astype(np.uint32)
    constants = philox.mask_constants(rate)
    return philox.Mask(key, *constants, first_row), philox.Mask(cb.asarray(key, np.uint32), *constants, first_row)


@pytest.mark.parametrize("shape", DROPOUT_SHAPES, ids=shape_id)
def test_the_dropout_mask_kernel_matches_numpy_in_place_and_out_of_place(cb, rng, shape):
    x = rng.standard_normal(shape[:2]).astype(np.float32)
    host_mask, device_mask = dropout_masks(cb, rng)
    expected = ref.dropout_forward(x, host_mask)
    with trace() as t:
        out = cb.dropout_forward(cb.asarray(x), device_mask)
        back = cb.dropout_backward(cb.asarray(x), device_mask)
    assert t.launches == ["dropout_fwd", "dropout_bwd"]
    np.testing.assert_array_equal(cb.to_host(out), expected)
    np.testing.assert_array_equal(cb.to_host(back), expected)
    in_place = cb.asarray(x)
    assert cb.dropout_forward(in_place, device_mask, out=in_place) is in_place
    np.testing.assert_array_equal(cb.to_host(in_place), expected)


def check_masked_dense_layer(cb, rng, act, shape, precision, need_dx=True, need_dw=True):
    """A Dense with a Dropout above it, forward and backward, against the NumPy backend given the
    same key. Forward: one launch (the mask in the epilogue), whose output is the same kernel's
    unmasked output times scale where gpubp.philox keeps, else 0, bit for bit. Backward: the dz
    pass regenerates the mask, and nothing else is launched for it."""
    x, w, b = layer(rng, *shape)
    host_mask, device_mask = dropout_masks(cb, rng)
    xd, wd, bd = cb.asarray(x), cb.asarray(w), cb.asarray(b)
    plain_y, plain_z = cb.dense_forward(xd, wd, bd, act, precision=precision)
    with trace() as t:
        y, z = cb.dense_forward(xd, wd, bd, act, precision=precision, dropout=device_mask)
    # no dropout_fwd: the mask is applied in the Dense kernel's epilogue
    assert t.launches == (BF16_FORWARD_LAUNCHES if precision == "bf16" else ["dense_fwd"])
    y_host, z_host = cb.to_host(y), None if z is None else cb.to_host(z)
    keep = philox.keep_mask(host_mask.key, *y_host.shape, host_mask.threshold, host_mask.first_row)
    np.testing.assert_array_equal(y_host, np.where(keep, cb.to_host(plain_y) * host_mask.scale, np.float32(0)))
    if act in NEEDS_Z:
        np.testing.assert_array_equal(z_host, cb.to_host(plain_z))  # z stays unmasked
    if precision == "fp32":
        y_ref, _ = ref.dense_forward(*f64(x, w, b), act, dropout=host_mask)
        close(y_host, y_ref)
    dy = rng.standard_normal(y_host.shape).astype(np.float32)
    want = ref.dense_backward(*f64(dy, x, w, y_host, z_host), act, need_dx, need_dw, dropout=host_mask)
    with trace() as t:
        got = cb.dense_backward(cb.asarray(dy), xd, wd, y, z, act, need_dx, need_dw, precision=precision,
                                dropout=device_mask)
    rounded = ["round_bf16"] if precision == "bf16" else []  # bf16: dz, x and w rounded before their products
    expected = (["dropout_dz"] + rounded + (rounded + ["dense_dw"] if need_dw else [])
                + (rounded + ["dense_dx"] if need_dx else []))
    assert t.launches == cb.backward_kernels(act, need_dx, need_dw, precision, dropout=True) == expected
    products_rtol = PRODUCTS_RTOL[precision]
    for g, reference, rtol in zip(got, want, (products_rtol, products_rtol, RTOL)):  # db: fp32 from the exact dz
        if reference is None:
            assert g is None
        else:
            close(cb.to_host(g), reference, rtol)


@pytest.mark.parametrize("shape", DROPOUT_SHAPES, ids=shape_id)
@pytest.mark.parametrize("act", DROPOUT_ACTS)
def test_a_masked_dense_layer_matches_numpy_forward_and_backward(cb, rng, act, shape):
    check_masked_dense_layer(cb, rng, act, shape, "fp32")


@pytest.mark.parametrize("shape", DROPOUT_SHAPES, ids=shape_id)
@pytest.mark.parametrize("act", DROPOUT_ACTS)
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_a_masked_tensor_core_dense_layer_matches_numpy_forward_and_backward(cb_h100, rng, precision, act, shape):
    check_masked_dense_layer(cb_h100, rng, act, shape, precision)


@pytest.mark.parametrize("need_dx, need_dw", BACKWARD_NEEDS)
@pytest.mark.parametrize("precision", ["fp32", "tf32"])
@pytest.mark.parametrize("act", ["identity", "gelu"])
def test_a_masked_dense_layer_launches_only_what_is_needed(cb_h100, rng, act, precision, need_dx, need_dw):
    """One dz pass however the gradients are needed, for identity too (dz is no longer dy)."""
    check_masked_dense_layer(cb_h100, rng, act, (37, 29, 23), precision, need_dx, need_dw)


# A bias that trains under a frozen weight (BitFit): the pass forming dz sums db, in every
# precision, and no dW kernel runs; (act, masked) pairs cover the plain, dropout and softmax passes.
BIAS_ALONE_LAYERS = [("identity", False), ("relu", False), ("gelu", False), ("softmax", False), ("identity", True),
                     ("relu", True)]
if SANITIZED:  # each pass once: the plain, the softmax and the masked dz pass
    BIAS_ALONE_LAYERS = [("relu", False), ("softmax", False), ("identity", True)]


@pytest.mark.parametrize("need_dx", [True, False], ids=["dx", "no_dx"])
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"] if not SANITIZED else ["fp32", "tf32"])
@pytest.mark.parametrize("act, masked", BIAS_ALONE_LAYERS, ids=[f"{a}{'_dropout' * m}" for a, m in BIAS_ALONE_LAYERS])
def test_a_bias_that_trains_under_a_frozen_weight_gets_db_and_no_dw_kernel(cb_h100, rng, act, masked, precision,
                                                                           need_dx):
    x, w, b = layer(rng, 37, 29, 23)
    host_mask, device_mask = dropout_masks(cb_h100, rng) if masked else (None, None)
    xd, wd, bd = cb_h100.asarray(x), cb_h100.asarray(w), cb_h100.asarray(b)
    masks = {"dropout": device_mask} if masked else {}
    y, z = cb_h100.dense_forward(xd, wd, bd, act, precision=precision, **masks)
    y_host, z_host = cb_h100.to_host(y), None if z is None else cb_h100.to_host(z)
    dy = rng.standard_normal(y_host.shape).astype(np.float32)
    _, _, db_ref = ref.dense_backward(*f64(dy, x, w, y_host, z_host), act, False, True, dropout=host_mask)
    dx_ref, _, _ = ref.dense_backward(*f64(dy, x, w, y_host, z_host), act, True, False, dropout=host_mask,
                                      precision=precision)
    with trace() as t:
        dx, dw, db = cb_h100.dense_backward(cb_h100.asarray(dy), None, wd, y, z, act, need_dx, False,
                                            precision=precision, need_db=True, **masks)
    assert t.launches == cb_h100.backward_kernels(act, need_dx, False, precision, dropout=masked, need_db=True)
    assert "dense_dw" not in t.launches and t.launches.count("round_bf16") == (2 if need_dx and precision == "bf16"
                                                                               else 0)
    assert dw is None
    close(cb_h100.to_host(db), db_ref)  # fp32 sums of the exact dz in every precision
    if need_dx:
        close(cb_h100.to_host(dx), dx_ref, PRODUCTS_RTOL[precision])
    else:
        assert dx is None


def test_dropout_operands_off_a_16_byte_boundary_take_the_scalar_path(cb_h100, rng):
    """Widths that are multiples of 4 in views starting one float past a 16-byte boundary: a float4
    access there is misaligned (UBSan reports it; a GPU faults)."""
    host_mask, device_mask = dropout_masks(cb_h100, rng)
    x = rng.standard_normal((9, 16)).astype(np.float32)
    out = harness.device_empty((9, 16), offset_bytes=4)
    cb_h100.dropout_forward(harness.to_device(x, offset_bytes=4), device_mask, out=out)
    np.testing.assert_array_equal(cb_h100.to_host(out), ref.dropout_forward(x, host_mask))
    w = rng.standard_normal((5, 16)).astype(np.float32)
    y = np.abs(rng.standard_normal((9, 16))).astype(np.float32)
    got, _, _ = cb_h100.dense_backward(harness.to_device(x, offset_bytes=4), None, cb_h100.asarray(w),
                                       harness.to_device(y, offset_bytes=4), None, "sigmoid", True, False,
                                       dropout=device_mask)
    want, _, _ = ref.dense_backward(*f64(x, None, w, y, None), "sigmoid", True, False, dropout=host_mask)
    close(cb_h100.to_host(got), want)


@pytest.mark.skipif(SANITIZED, reason="launches no kernel the tests above do not")
def test_a_model_with_dropout_trains_on_the_cupy_backend_as_on_numpy(cb, rng):
    x = rng.standard_normal((45, 9)).astype(np.float32)
    labels = rng.integers(0, 3, 45)
    runs = {}
    for name in ("numpy", "cupy"):
        gb.seed(2)
        model = gb.Sequential([gb.Dropout(0.2), gb.Dense(9, 33, "relu"), gb.Dropout(0.5), gb.Dense(33, 3)],
                              backend=name)
        if name == "cupy":
            assert "is a Dropout; the fused kernels apply no dropout mask yet" in model.why_not_fused()
        history = model.fit(x, labels, epochs=2, batch_size=16, verbose=0)
        runs[name] = history.history["loss"], model.get_weights()
    np.testing.assert_allclose(runs["cupy"][0], runs["numpy"][0], rtol=1e-4)
    for ours, reference in zip(runs["cupy"][1], runs["numpy"][1]):
        close(ours, reference, rtol=1e-3)


# ----------------------------------------------------------------------------- fused MLP
#
# kernels/fused_mlp.cu against the NumPy backend run layer by layer in float64. A case is
# (batch, input width, output widths, activations, frozen layers, need_input_grad); together
# they cover batch 1, 20, 45, 50, 65, 127, 129, 131 and 1000, every activation (the kernels' one
# activation, with identity layers anywhere), 1 to 8 layers, widths 1, 8, 10, 16, 17, 24, 32, 33, 40,
# 64, 72, 100 and 128 (whole, partial and no 32-column fp32 warp strips; whole and partial 8-column
# tiles, fp32 quads and mma tiles alike; batches that end inside a 16-row tile),
# inputs wider than one 128-column tile, and the fine-tune tests' freeze patterns.
FUSED_RTOL = 1e-5
FUSED_CASES = {
    "one_unit": (1, 1, [1], ["sigmoid"], [], True),
    **{f"act_{act}": (129, 19, [33, 16, 5], [act, act, act], [], True) for act in ACTIVATIONS},
    **{f"{n}_layers": (127, 7, [16] * (n - 1) + [3], ["tanh", "identity", "tanh"] * 2 + ["tanh", "identity"],
                       [], False) for n in (1, 2, 5, 8)},
    "widths_wide_input": (37, 300, [128, 64, 33, 1], ["gelu_tanh", "gelu_tanh", "identity", "gelu_tanh"], [], True),
    "widths_40_72_10": (45, 40, [40, 72, 10], ["leaky_relu", "leaky_relu", "identity"], [], True),
    "batch_20_widths_8_24_40": (20, 9, [8, 24, 40], ["relu", "relu", "identity"], [], True),
    "widths_32_64_128": (50, 32, [32, 64, 128], ["sigmoid", "sigmoid", "sigmoid"], [], True),
    "widths_17_33_100_1": (131, 23, [17, 33, 100, 1], ["tanh", "tanh", "tanh", "identity"], [], True),
    "widths_1_64_128_33_wide_input": (65, 130, [1, 64, 128, 33], ["relu", "relu", "identity", "relu"], [], True),
    "batch_1000": (1000, 24, [64, 64, 64, 10], ["relu", "relu", "relu", "identity"], [], False),
    "bottom_2_frozen": (129, 20, [32, 32, 16, 16, 4], ["gelu", "gelu", "identity", "gelu", "identity"], [0, 1], False),
    "middle_frozen": (129, 20, [32, 32, 16, 16, 4], ["gelu", "gelu", "identity", "gelu", "identity"], [2], False),
    "all_but_head_frozen": (129, 20, [32, 32, 16, 16, 4], ["gelu", "gelu", "identity", "gelu", "identity"],
                            [0, 1, 2, 3], False),
    "all_but_head_frozen_input_grad": (33, 20, [32, 16, 4], ["relu", "relu", "identity"], [0, 1], True),
    "softmax_head": (65, 12, [16, 6], ["gelu", "softmax"], [], False),
    # Every activation in one model, each layer its own, with a frozen layer and the input gradient.
    "mixed_activations": (41, 150, [24, 17, 33, 9, 16, 12, 20, 5],
                          ["relu", "tanh", "gelu", "sigmoid", "leaky_relu", "gelu_tanh", "silu", "identity"], [2],
                          True),
}
if SANITIZED:  # every code path once, on small batches
    FUSED_CASES = {name: (min(batch, 33), *rest) for name, (batch, *rest) in FUSED_CASES.items()
                   if name in ("one_unit", "act_gelu", "widths_wide_input", "widths_40_72_10", "batch_20_widths_8_24_40",
                               "widths_17_33_100_1", "middle_frozen", "all_but_head_frozen_input_grad",
                               "mixed_activations")}
    FUSED_CASES["split_dw"] = (80, 5, [16, 3], ["tanh", "identity"], [], True)


def mlp_params(rng, n_in, widths):
    ws, bs = [], []
    for fan_in, fan_out in zip([n_in, *widths[:-1]], widths):
        ws.append((rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32))
        bs.append((0.5 * rng.standard_normal(fan_out)).astype(np.float32))
    return ws, bs


def reference_mlp(x, ws, bs, acts, dy, need_dx, need_dw):
    """The NumPy backend, layer by layer in float64: (y, dx, [(dw, db) or None per layer])."""
    hs, act_inputs = [x.astype(np.float64)], []
    for w, b, act in zip(ws, bs, acts):
        y, z = ref.dense_forward(hs[-1], *f64(w, b), act)
        act_inputs.append(z if act in NEEDS_Z else y)
        hs.append(y)
    return hs[-1], *reference_backward_at(ws, acts, hs[:-1], act_inputs, dy, need_dx, need_dw)


def fused_case(rng, case):
    """Random inputs, parameters and output gradient for ``FUSED_CASES[case]``, and its plan:
    (x, ws, bs, acts, dy, need_dx, need_dw, need_input_grad)."""
    batch, n_in, widths, acts, frozen, need_input_grad = FUSED_CASES[case]
    x = rng.standard_normal((batch, n_in)).astype(np.float32)
    ws, bs = mlp_params(rng, n_in, widths)
    dy = rng.standard_normal((batch, widths[-1])).astype(np.float32)
    plan = plan_backward([i not in frozen for i in range(len(widths))], need_input_grad)
    need_dx, need_dw = map(list, zip(*plan))
    return x, ws, bs, acts[: len(widths)], dy, need_dx, need_dw, need_input_grad


def run_fused(cb, x, ws, bs, acts, dy, need_dx, need_dw, precision="fp32"):
    keep_input = list(need_dw)
    lowest = min(i for i in range(len(ws)) if need_dx[i] or need_dw[i])
    keep_output = [i >= lowest and act != "identity" for i, act in enumerate(acts)]
    dev = cb.asarray
    y, inputs, act_inputs = cb.fused_mlp_forward(dev(x), [dev(w) for w in ws], [dev(b) for b in bs], acts,
                                                 keep_input, keep_output, precision)
    out_dw = [cb.empty(w.shape) if need else None for w, need in zip(ws, need_dw)]
    out_db = [cb.empty(b.shape) if need else None for b, need in zip(bs, need_dw)]
    dx = cb.fused_mlp_backward(dev(dy), [dev(w) for w in ws], acts, inputs, act_inputs, need_dx, need_dw,
                               out_dw, out_db, precision)
    return y, inputs, act_inputs, dx, out_dw, out_db


def reference_backward_at(ws, acts, inputs, act_inputs, dy, need_dx, need_dw):
    """The NumPy backend's backward in float64, differentiating at the arrays a fused forward kept."""
    host = [[None if a is None else np.asarray(a, np.float64) for a in arrays] for arrays in (inputs, act_inputs)]
    g, grads = dy.astype(np.float64), [None] * len(ws)
    for i in range(len(ws) - 1, -1, -1):
        if not (need_dx[i] or need_dw[i]):
            break
        y_or_z = host[1][i]
        y, z = (None, y_or_z) if acts[i] in NEEDS_Z else (y_or_z, None)
        g, dw, db = ref.dense_backward(g, host[0][i], ws[i].astype(np.float64), y, z, acts[i], need_dx[i], need_dw[i])
        grads[i] = (dw, db) if need_dw[i] else None
    return g if need_dx[0] else None, grads


@pytest.mark.parametrize("case", FUSED_CASES)
def test_fused_mlp_matches_numpy(cb_h100, rng, case):
    x, ws, bs, acts, dy, need_dx, need_dw, need_input_grad = fused_case(rng, case)
    y_ref, dx_ref, grads_ref = reference_mlp(x, ws, bs, acts, dy, need_dx, need_dw)
    with trace() as t:
        y, _, _, dx, dws, dbs = run_fused(cb_h100, x, ws, bs, acts, dy, need_dx, need_dw)
    expected = ["fused_mlp_fwd"] + (["softmax_fwd"] if acts[-1] == "softmax" else [])
    assert t.launches == expected + cb_h100.fused_backward_kernels(acts[-1], need_dw)
    close(cb_h100.to_host(y), y_ref, FUSED_RTOL)
    if need_input_grad:
        close(cb_h100.to_host(dx), dx_ref, FUSED_RTOL)
    else:
        assert dx is None
    for i, want in enumerate(grads_ref):
        if want is None:
            assert dws[i] is None and dbs[i] is None
        else:
            close(cb_h100.to_host(dws[i]), want[0], FUSED_RTOL)
            close(cb_h100.to_host(dbs[i]), want[1], FUSED_RTOL)


# Per layer (weight trains, bias trains): biases that train under frozen weights at the bottom, in
# the middle (an identity layer), under a frozen layer and at the head, beside a layer that trains whole.
BIAS_ALONE_FUSED = [(False, True), (False, False), (False, True), (True, True), (False, True)]


@pytest.mark.parametrize("precision", ["fp32", "tf32"] if not SANITIZED else ["fp32"])
def test_fused_mlp_sums_db_alone_where_a_bias_trains_under_a_frozen_weight(cb_h100, rng, precision):
    """The chain writes those layers' dz (STORE_DZ), a dense_dz_db pass each sums it, and the dW
    launch computes the one trainable weight's tiles only."""
    acts, widths = ["gelu", "gelu", "identity", "gelu", "identity"], [32, 32, 16, 16, 4]
    x = rng.standard_normal((129, 20)).astype(np.float32)
    ws, bs = mlp_params(rng, 20, widths)
    dy = rng.standard_normal((129, widths[-1])).astype(np.float32)
    need_dw, need_db = ([flags[k] for flags in BIAS_ALONE_FUSED] for k in (0, 1))
    trains = [dw or db for dw, db in zip(need_dw, need_db)]
    need_dx = [dx for dx, _ in plan_backward(trains, False)]
    dev = cb_h100.asarray
    _, inputs, act_inputs = cb_h100.fused_mlp_forward(dev(x), [dev(w) for w in ws], [dev(b) for b in bs], acts,
                                                      need_dw, [act != "identity" for act in acts], precision)
    assert [a is None for a in inputs] == [not dw for dw in need_dw]  # only the weight that trains kept its input
    out_dw = [cb_h100.empty(w.shape) if dw else None for w, dw in zip(ws, need_dw)]
    out_db = [cb_h100.empty(b.shape) if trains_layer else None for b, trains_layer in zip(bs, trains)]
    with trace() as t:
        dx = cb_h100.fused_mlp_backward(dev(dy), [dev(w) for w in ws], acts, inputs, act_inputs, need_dx, need_dw,
                                        out_dw, out_db, precision, need_db=need_db)
    assert t.launches == cb_h100.fused_backward_kernels(acts[-1], need_dw, need_db) \
        == ["fused_mlp_bwd", "fused_mlp_dw"] + ["dense_dz"] * 3
    assert dx is None
    _, _, grads_ref = reference_mlp(x, ws, bs, acts, dy, need_dx, trains)
    tol = FUSED_RTOL if precision == "fp32" else FUSED_TOLERANCE[precision]
    for i, want in enumerate(grads_ref):
        if need_dw[i]:
            close(cb_h100.to_host(out_dw[i]), want[0], tol)
        if need_db[i]:
            close(cb_h100.to_host(out_db[i]), want[1], tol)


# Tensor-core precisions (kernels/fused_mlp.cu): relative to the largest magnitude of each result,
# the forward against float64, the gradients against the float64 backward taken at the arrays the
# fused forward kept (a rounded forward may move a pre-activation across relu's kink, which
# changes the gradient by a whole term: that is the forward's error, bounded above, not the
# backward kernels'). Measured worst cases over FUSED_CASES: tf32 1.5e-3, bf16 1.1e-2.
FUSED_TOLERANCE = {"tf32": 3e-3, "bf16": 2e-2}
# The mma emulation is the harness's slowest path: fewer cases that still cover every activation,
# 8 layers, an input wider than 128, freezing, the input gradient and a softmax head.
PRECISION_CASES = ["act_relu", "act_gelu", "8_layers", "widths_wide_input", "widths_40_72_10", "widths_32_64_128",
                   "middle_frozen", "all_but_head_frozen_input_grad", "softmax_head", "mixed_activations"]
if SANITIZED:
    PRECISION_CASES = ["act_gelu", "widths_wide_input", "widths_40_72_10"]


@pytest.mark.parametrize("case", PRECISION_CASES)
@pytest.mark.parametrize("precision", FUSED_TOLERANCE)
def test_fused_mlp_on_tensor_cores_is_within_its_tolerance(cb_h100, rng, precision, case):
    x, ws, bs, acts, dy, need_dx, need_dw, need_input_grad = fused_case(rng, case)
    y_ref, _, _ = reference_mlp(x, ws, bs, acts, dy, need_dx, need_dw)
    with trace() as t:
        y, inputs, act_inputs, dx, dws, dbs = run_fused(cb_h100, x, ws, bs, acts, dy, need_dx, need_dw, precision)
    assert t.launches[0] == "fused_mlp_fwd" and t.launches[-len(cb_h100.fused_backward_kernels(acts[-1], need_dw)):] \
        == cb_h100.fused_backward_kernels(acts[-1], need_dw)
    tol = FUSED_TOLERANCE[precision]
    close(cb_h100.to_host(y), y_ref, tol)
    host = [[None if a is None else cb_h100.to_host(a) for a in arrays] for arrays in (inputs, act_inputs)]
    dx_ref, grads_ref = reference_backward_at(ws, acts, *host, dy, need_dx, need_dw)
    if need_input_grad:
        close(cb_h100.to_host(dx), dx_ref, tol)
    for i, want in enumerate(grads_ref):
        if want is not None:
            close(cb_h100.to_host(dws[i]), want[0], tol)
            close(cb_h100.to_host(dbs[i]), want[1], tol)


@pytest.mark.parametrize("precision, step", [("tf32", 2.0**-12), ("bf16", 2.0**-9)])
def test_fused_tensor_core_precisions_round_their_operands(cb_h100, precision, step):
    """Not fp32 in disguise: an input the precision cannot hold comes out rounded."""
    x = np.full((3, 2), 1.0 + step, np.float32)  # rounds to 1 in the precision (a tie goes to even in bf16)
    w, b = np.ones((2, 2), np.float32), np.zeros(2, np.float32)
    y, _, _ = cb_h100.fused_mlp_forward(cb_h100.asarray(x), [cb_h100.asarray(w)], [cb_h100.asarray(b)], ["identity"],
                                        [False], [False], precision)
    assert np.array_equal(cb_h100.to_host(y), np.full((3, 2), 2.0, np.float32))
    y, _, _ = cb_h100.fused_mlp_forward(cb_h100.asarray(x), [cb_h100.asarray(w)], [cb_h100.asarray(b)], ["identity"],
                                        [False], [False])
    assert np.array_equal(cb_h100.to_host(y), np.full((3, 2), 2.0 + 2 * step, np.float32))


def test_fused_forward_keeps_exactly_what_backward_reads(cb_h100, rng):
    """A frozen prefix keeps nothing; a trainable layer keeps its input; act' inputs are kept
    from the lowest trainable layer up (z for gelu, the output otherwise, nothing for identity)."""
    acts = ["gelu", "identity", "gelu", "identity"]
    x = rng.standard_normal((40, 9)).astype(np.float32)
    ws, bs = mlp_params(rng, 9, [16, 16, 8, 3])
    dev = cb_h100.asarray
    keep_input, keep_output = [False, False, True, True], [False, False, True, False]
    y, inputs, act_inputs = cb_h100.fused_mlp_forward(dev(x), [dev(w) for w in ws], [dev(b) for b in bs], acts,
                                                      keep_input, keep_output)
    assert [a is not None for a in inputs] == keep_input
    assert [a is not None for a in act_inputs] == keep_output
    y_ref, z_ref = ref.dense_forward(*f64(x, ws[0], bs[0]), acts[0])
    for i in (1, 2):
        h_ref = y_ref
        y_ref, z_ref = ref.dense_forward(h_ref, *f64(ws[i], bs[i]), acts[i])
    close(cb_h100.to_host(inputs[2]), h_ref, FUSED_RTOL)
    close(cb_h100.to_host(act_inputs[2]), z_ref, FUSED_RTOL)
    close(cb_h100.to_host(inputs[3]), y_ref, FUSED_RTOL)


@pytest.mark.parametrize("precision", ["fp32", *FUSED_TOLERANCE])
def test_fused_weight_gradients_split_over_the_batch_are_bitwise_deterministic(cb, rng, request, precision):
    sms = request.node.callspec.params["cb"]  # the SM count the fixture gave the simulated GPU
    batch = 1100 if not SANITIZED else 150  # 4 splits either way (SANITIZED_MIN_ROWS_PER_SPLIT)
    widths, acts = [16, 3], ["tanh", "identity"]
    assert cb._dw_split(batch, 2)[0] == (4 if sms == H100_SMS else 1)  # 2 dW tiles: one per layer
    x = rng.standard_normal((batch, 5)).astype(np.float32)
    ws, bs = mlp_params(rng, 5, widths)
    dy = rng.standard_normal((batch, 3)).astype(np.float32)
    runs = [run_fused(cb, x, ws, bs, acts, dy, [False, True], [True, True], precision) for _ in range(2)]
    # tensor cores: at what forward kept (None where it kept nothing)
    host = [[None if a is None else cb.to_host(a) for a in arrays] for arrays in runs[0][1:3]]
    _, grads_ref = reference_backward_at(ws, acts, *host, dy, [False, True], [True, True])
    tol = FUSED_TOLERANCE.get(precision, FUSED_RTOL)
    for i, (dw_ref, db_ref) in enumerate(grads_ref):
        close(cb.to_host(runs[0][4][i]), dw_ref, tol)
        close(cb.to_host(runs[0][5][i]), db_ref, tol)
        assert np.array_equal(cb.to_host(runs[1][4][i]), cb.to_host(runs[0][4][i]))
        assert np.array_equal(cb.to_host(runs[1][5][i]), cb.to_host(runs[0][5][i]))
    assert not cb.to_host(cb._state()["tickets"]).any(), "the last block of each tile resets its ticket"


# The fused path through the layer API: Sequential picks it on the cupy backend.
FREEZE_PATTERNS = {"none": [], "bottom_2": [0, 1], "middle": [2], "all_but_head": [0, 1, 2, 3]}
FUSED_MODEL = ([(12, 32, "tanh"), (32, 33, "tanh"), (33, 16, None), (16, 16, "tanh"), (16, 5, None)], 70)
if SANITIZED:
    FREEZE_PATTERNS = {"middle": [2]}


def narrow_model(backend, seed=3, **kwargs):
    gb.seed(seed)
    return gb.Sequential([gb.Dense(*spec) for spec in FUSED_MODEL[0]], backend=backend, **kwargs)


@whole_model
@pytest.mark.parametrize("need_input_grad", [False, True])
@pytest.mark.parametrize("pattern", FREEZE_PATTERNS)
def test_a_narrow_model_runs_fused_and_matches_the_numpy_model(cb_h100, rng, pattern, need_input_grad):
    model, reference = narrow_model("cupy"), narrow_model("numpy", dtype="float64")
    assert model.uses_fused and not reference.uses_fused
    for m in (model, reference):
        m.freeze_to(0)
        for i in FREEZE_PATTERNS[pattern]:
            m[i].freeze()
    x = rng.standard_normal((FUSED_MODEL[1], 12)).astype(np.float32)
    dout = rng.standard_normal((FUSED_MODEL[1], 5)).astype(np.float32)
    with trace() as t:
        y = model.forward(x, need_input_grad=need_input_grad)
        dx = model.backward(dout, need_input_grad=need_input_grad)
    plan = model.backward_plan(need_input_grad)
    assert t.launches == ["fused_mlp_fwd"] + [k for _, kernels in plan for k in kernels]
    assert plan[0][1][0] == "fused_mlp_bwd"
    close(cb_h100.to_host(y), reference.forward(x, need_input_grad=need_input_grad), FUSED_RTOL)
    dx_ref = reference.backward(dout, need_input_grad=need_input_grad)
    if need_input_grad:
        close(cb_h100.to_host(dx), dx_ref, FUSED_RTOL)
    for got, want in zip(model.parameters(), reference.parameters()):
        assert (got.grad is None) == (want.grad is None)
        if want.grad is not None:
            close(cb_h100.to_host(got.grad), want.grad, FUSED_RTOL)


@pytest.mark.skipif(SANITIZED, reason="the layer API adds no kernel path; the parity tests above cover them")
@pytest.mark.parametrize("pattern", FREEZE_PATTERNS)
def test_the_fused_forward_keeps_the_activations_the_per_layer_forward_keeps(cb_h100, rng, pattern):
    x = rng.standard_normal((FUSED_MODEL[1], 12)).astype(np.float32)
    kept = {}
    for fused in (True, False):
        model = narrow_model("cupy", fused=fused)
        for i in FREEZE_PATTERNS[pattern]:
            model[i].freeze()
        model.forward(x)
        kept[fused] = model.activation_bytes()
    assert kept[True] == kept[False]


@pytest.mark.skipif(SANITIZED, reason="runs no kernel of its own")
def test_fused_auto_keeps_the_per_layer_path_for_a_model_wider_than_the_fused_kernels(cb_h100, rng):
    layers = [gb.Dense(4, 129, "relu"), gb.Dense(129, 3)]
    model = gb.Sequential(layers, backend="cupy")
    assert not model.uses_fused
    with trace() as t:
        model.forward(rng.standard_normal((5, 4)).astype(np.float32))
    assert t.launches == ["dense_fwd", "dense_fwd"]
    with pytest.raises(ValueError, match=r"fused=True: layer 'dense_0' has out_features=129; .* at most 128"):
        gb.Sequential(layers, backend="cupy", fused=True)


@pytest.mark.skipif(SANITIZED, reason="the layer API adds no kernel path; the parity tests above cover them")
def test_a_model_mixing_activations_fuses_and_computes_what_the_per_layer_kernels_compute(cb_h100, rng):
    x = rng.standard_normal((5, 4)).astype(np.float32)
    target = rng.standard_normal((5, 3)).astype(np.float32)
    results = {}
    for fused in (True, False):
        gb.seed(0)
        model = gb.Sequential([gb.Dense(4, 8, "relu"), gb.Dense(8, 8, "tanh"), gb.Dense(8, 3, "sigmoid")],
                              backend="cupy", fused=fused)
        assert model.uses_fused == fused and model.why_not_fused() is None
        with trace() as t:
            out = model.forward(x)
            model.backward(gb.losses.mse(out, target)[1])
        assert (t.launches[0] == "fused_mlp_fwd") == fused
        results[fused] = [cb_h100.to_host(out)] + [cb_h100.to_host(g) for layer in model.layers
                                                   for g in (layer.weight.grad, layer.bias.grad)]
    for fused_result, per_layer in zip(results[True], results[False]):
        np.testing.assert_allclose(fused_result, per_layer, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_one_fused_kernel_per_precision_serves_every_activation(cb_h100, monkeypatch, rng, act):
    launched = harness.record_launches(cb_h100, monkeypatch)
    model = gb.Sequential([gb.Dense(4, 8, act), gb.Dense(8, 8, act), gb.Dense(8, 3)], backend="cupy")
    assert model.uses_fused
    out = model.forward(rng.standard_normal((5, 4)).astype(np.float32))
    model.backward(gb.losses.mse(out, np.zeros((5, 3), np.float32))[1])
    assert launched == ["fused_mlp_fwd", "fused_mlp_bwd", "fused_mlp_dw"]


@fails_a_launch
@pytest.mark.parametrize("act_id", [-1, len(ACTIVATIONS)])
@pytest.mark.parametrize("precision", cupy_backend.FUSED_PRECISIONS)
def test_a_fused_forward_traps_on_a_plan_with_an_activation_outside_its_set(cb_h100, monkeypatch, rng, precision,
                                                                            act_id):
    """A layer's activation id in the plan picks its epilogue at run time (kernels/activations.cuh,
    with_activation): an id outside the kernel's set must fail the launch, not apply another
    activation or leave y unwritten. Layer 0 (identity) runs; layer 1's id is outside. The kernel
    is built with every activation: the host asks for no mask (act_mask 0), as it builds one from
    the plan's ids otherwise."""
    monkeypatch.setattr(cb_h100, "act_mask", lambda acts: 0)
    ws, bs = mlp_params(rng, 3, [4, 2])
    dev = cb_h100.asarray
    x = dev(rng.standard_normal((5, 3)).astype(np.float32))
    monkeypatch.setitem(cb_h100.ACT_ID, "tanh", act_id)
    with pytest.raises(harness.KernelError, match=r"__trap\(\)"):
        cb_h100.fused_mlp_forward(x, [dev(w) for w in ws], [dev(b) for b in bs], ["identity", "tanh"], [False, False],
                                  [False, False], precision)


@pytest.mark.skipif(SANITIZED, reason="the kernels' precisions are checked above")
@pytest.mark.parametrize("precision", FUSED_TOLERANCE)
def test_a_model_in_a_tensor_core_precision_trains_within_its_tolerance(cb_h100, rng, precision):
    model, reference = narrow_model("cupy", precision=precision), narrow_model("numpy", dtype="float64")
    x = rng.standard_normal((FUSED_MODEL[1], 12)).astype(np.float32)
    dout = rng.standard_normal((FUSED_MODEL[1], 5)).astype(np.float32)
    close(cb_h100.to_host(model.forward(x)), reference.forward(x), FUSED_TOLERANCE[precision])
    model.backward(dout)
    reference.backward(dout)
    # The whole chain against float64 at float64's own activations: twice the kernel test's bound
    # (measured: 1.2e-2 for bf16), since a relu mask may differ where a pre-activation is within
    # rounding of 0.
    for got, want in zip(model.parameters(), reference.parameters()):
        close(cb_h100.to_host(got.grad), want.grad, 2 * FUSED_TOLERANCE[precision])
    per_layer = narrow_model("cupy", precision=precision, fused=False)  # the dense_*_<precision> kernels
    assert not per_layer.uses_fused
    close(cb_h100.to_host(per_layer.forward(x)), reference.forward(x), FUSED_TOLERANCE[precision])


@pytest.mark.skipif(SANITIZED, reason="runs no kernel of its own")
def test_moving_a_model_that_insists_on_fused_kernels_to_the_cpu_is_refused_before_anything_moves(cb_h100):
    model = narrow_model("cupy", fused=True)
    with pytest.raises(ValueError, match="fused=True: the 'numpy' backend has no fused MLP kernels"):
        model.to("cpu")
    assert model.backend_name == "cupy" and model.uses_fused
    assert all(cb_h100.is_array(p.data) for p in model.parameters())
    model.fused = "auto"
    assert not model.to("cpu").uses_fused


@pytest.mark.skipif(SANITIZED, reason="runs no backward kernel")
def test_a_fused_model_with_every_layer_frozen_launches_no_backward_kernel(cb_h100, rng):
    model = narrow_model("cupy").freeze()
    out = model.forward(rng.standard_normal((4, 12)).astype(np.float32))
    _, dout = gb.losses.mse(out, np.zeros((4, 5), np.float32))
    with trace() as t, pytest.warns(UserWarning, match="every layer is frozen"):
        assert model.backward(dout) is None
    assert t.total == 0
    assert "launches no kernel" in str(model.backward_plan())


@pytest.mark.skipif(SANITIZED, reason="runs no kernel of its own")
def test_a_tensor_core_precision_on_a_gpu_without_them_says_so(cpu_harness, monkeypatch):
    cupy_on_cpu(cpu_harness, monkeypatch, 40, compute_capability="75")
    assert cupy_backend.dense_precisions() == ("fp32",)
    with pytest.raises(ValueError, match=r"fused=True: the fused kernels in bf16 need tensor cores"):
        narrow_model("cupy", precision="bf16", fused=True)
    for fused in ("auto", False):
        with pytest.raises(ValueError, match=r"precision='bf16': this GPU runs the dense kernels in \('fp32',\) only "
                                             r"\(tf32 and bf16 need compute capability 8.0 or newer\)"):
            narrow_model("cupy", precision="bf16", fused=fused)


@pytest.mark.skipif(SANITIZED, reason="runs no kernel")
@pytest.mark.parametrize("precision", ["fp32", "tf32"])
def test_a_layer_too_wide_for_the_grids_y_axis_is_refused_before_any_launch(cb_h100, precision):
    """CUDA's grid y extent is at most 65535 tiles (the harness does not enforce it)."""
    widest = cupy_backend.MAX_GRID_Y * 128
    assert cupy_backend._gemm_launch("fwd", "relu", 1, widest, precision)[1][1] == cupy_backend.MAX_GRID_Y
    with trace() as t, pytest.raises(ValueError, match=rf"fwd: an output {widest + 1} wide takes 65536 tiles"):
        cupy_backend._gemm_launch("fwd", "relu", 1, widest + 1, precision)
    assert t.total == 0


# Per-block shared memory after opting in (the shim's Device reports it, and its kernels refuse an
# opt-in past it, as the driver does): sm_86/89's 99 KB hold the tf32 and bf16 fused kernels for an
# input of at most 128 features, not the fp32 fused ones (100 KB) or the per-layer TF32 dW (102 KB);
# sm_75's 64 KB none of them.
SMALL_SHARED_GPUS = {"86": ("tf32", "bf16"), "75": ()}


@pytest.mark.skipif(SANITIZED, reason="the fp32 per-layer kernels are covered above in every mode")
@pytest.mark.parametrize("cc, fused_precisions", SMALL_SHARED_GPUS.items(), ids=lambda v: f"sm_{v}" if v else "")
def test_on_a_gpu_with_less_shared_memory_fp32_runs_layer_by_layer_and_matches_numpy(cpu_harness, monkeypatch, rng,
                                                                                     cc, fused_precisions):
    cupy_on_cpu(cpu_harness, monkeypatch, 40, compute_capability=cc)
    assert cupy_backend.fused_precisions() == fused_precisions and cupy_backend.dense_precisions() == ("fp32",)
    model, reference = narrow_model("cupy"), narrow_model("numpy", dtype="float64")
    assert not model.uses_fused
    assert f"this GPU gives a block at most {harness.SHARED_OPTIN[cc]}" in model.why_not_fused()
    with pytest.raises(ValueError, match=r"fused=True: in fp32, the fused kernels for 12 inputs take 102464 bytes"):
        model.fused = True
    x = rng.standard_normal((9, 12)).astype(np.float32)
    for m in (model, reference):
        _, dout = gb.losses.mse(m.forward(x), np.zeros((9, 5), np.float32))
        m.backward(dout)
    for got, want in zip(model.parameters(), reference.parameters()):
        close(got.grad.get(), want.grad)


@pytest.mark.skipif(SANITIZED, reason="the tf32 fused kernels are covered above in every mode")
def test_on_an_sm86_gpu_tf32_runs_fused_and_the_per_layer_tensor_core_path_says_why_not(cpu_harness, monkeypatch,
                                                                                       rng):
    cupy_on_cpu(cpu_harness, monkeypatch, 84, compute_capability="86")
    model = narrow_model("cupy", precision="tf32")
    assert model.uses_fused
    x = rng.standard_normal((9, 12)).astype(np.float32)
    _, dout = gb.losses.mse(model.forward(x), np.zeros((9, 5), np.float32))
    model.backward(dout)
    assert all(np.isfinite(p.grad.get()).all() for p in model.parameters())
    with pytest.raises(ValueError, match=r"precision='tf32': this GPU runs the dense kernels in \('fp32',\) only "
                                         r"\(its per-layer tensor-core kernels take 104512 bytes of shared memory per "
                                         r"block, and this GPU gives a block at most 101376\)"):
        model.fused = False
    for precision in ("tf32", "bf16"):  # an input wider than 128 takes a second buffer, past 99 KB
        with pytest.raises(ValueError, match=rf"precision='{precision}': this GPU runs the dense kernels"):
            gb.Sequential([gb.Dense(200, 16, "relu"), gb.Dense(16, 3)], backend="cupy", precision=precision)
    with pytest.raises(ValueError, match=r"fused_mlp_fwd: 102400 bytes of dynamic shared memory .* exceed the 101376"):
        cupy_backend._fused_launch("fwd", "fp32", 12)


@pytest.mark.skipif(SANITIZED, reason="runs no kernel of its own")
def test_fused_false_runs_a_narrow_model_layer_by_layer(cb_h100, rng):
    model = narrow_model("cupy", fused=False)
    with trace() as t:
        model.forward(rng.standard_normal((3, 12)).astype(np.float32))
    assert t.launches == ["dense_fwd"] * len(model)
    assert [name for name, _ in model.backward_plan()] == [layer.name for layer in model]


# ----------------------------------------------------------------------------- losses

LOSS_CASES = [(shape, False) for shape in LOSS_SHAPES] + [(shape, True) for shape in WEIGHTED_LOSS_SHAPES]
LOSS_IDS = [f"{shape_id(shape)}-{'weighted' if weighted else 'unweighted'}" for shape, weighted in LOSS_CASES]



@pytest.mark.parametrize("label_smoothing", [0.0, 0.1], ids=["one-hot", "smoothed"])
@pytest.mark.parametrize("label_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("shape, weighted", LOSS_CASES, ids=LOSS_IDS)
def test_softmax_cross_entropy_matches_numpy(cb_h100, rng, shape, weighted, label_dtype, label_smoothing):
    check_softmax_cross_entropy(cb_h100, rng, shape, label_dtype, weighted, label_smoothing)


# Rows of C <= 16 classes share a warp (loss.cu's ce_row_lanes): batches that leave the last
# warp's row groups part empty, one to four rows per group width, and the widths' edges.
CE_ROW_GROUP_SHAPES = [(61, 16), (33, 2), (45, 17), (70, 5), (9, 1)] if not SANITIZED else [(19, 10), (7, 3)]


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1], ids=["one-hot", "smoothed"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("shape", CE_ROW_GROUP_SHAPES, ids=shape_id)
def test_softmax_cross_entropy_shares_a_warp_between_short_rows(cb_h100, rng, shape, weighted, label_smoothing):
    check_softmax_cross_entropy(cb_h100, rng, shape, np.int64, weighted, label_smoothing)


def test_the_cross_entropy_row_group_is_the_power_of_two_that_holds_the_row():
    lanes = {c: cupy_backend.ce_row_lanes(c) for c in (1, 2, 3, 4, 5, 9, 10, 16, 17, 32, 33, 1000)}
    assert lanes == {1: 1, 2: 2, 3: 4, 4: 4, 5: 8, 9: 16, 10: 16, 16: 16, 17: 32, 32: 32, 33: 32, 1000: 32}


@pytest.mark.parametrize("shape, weighted", LOSS_CASES, ids=LOSS_IDS)
@pytest.mark.parametrize("name, trace_name, options", ELEMENTWISE_LOSSES, ids=ELEMENTWISE_LOSS_IDS)
def test_elementwise_losses_match_numpy(cb_h100, rng, name, trace_name, options, shape, weighted):
    check_elementwise_loss(cb_h100, rng, name, trace_name, shape, weighted, options)


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("name, nan_gradient", [("huber", True), ("mae", False)])
def test_a_nan_prediction_gets_the_gradient_numpy_gives_it(cb_h100, name, nan_gradient, weighted):
    """Huber's gradient is NaN there (fminf/fmaxf, as a GPU and this harness run them, would have
    clipped NaN to a finite one); MAE's is 0, as PyTorch's L1Loss gives. The loss is NaN in both."""
    pred = np.array([[np.nan, 0.5, 3.0], [-2.0, np.nan, 0.25]], np.float32)
    target = np.zeros_like(pred)
    weights = (np.array([1.0, 2.0], np.float32),) if weighted else ()
    _, expected = getattr(ref, name)(pred, target, *weights)
    loss, grad = getattr(cb_h100, name)(*(cb_h100.asarray(a) for a in (pred, target, *weights)))
    assert np.isnan(loss)
    np.testing.assert_array_equal(np.isnan(grad.get()), np.isnan(pred) & nan_gradient)
    np.testing.assert_allclose(grad.get(), expected, rtol=1e-6)


def test_losses_are_finite_for_huge_logits(cb_h100):
    check_losses_at_huge_logits(cb_h100)


def test_cross_entropy_of_logits_sharing_a_large_offset(cb_h100):
    """loss.cu's one-hot row loss was log s + m - z_label: 0 for three equal logits of 1e8."""
    check_cross_entropy_of_logits_sharing_a_large_offset(cb_h100)


def test_activations_at_special_values_match_numpy(cb_h100):
    """relu(NaN) was 0 (fmaxf) and gelu'(+-inf) NaN (inf * 0)."""
    check_activations_at_special_values(cb_h100)


@pytest.mark.parametrize("precision", ["fp32", "tf32"])
def test_an_off_relu_unit_passes_no_gradient_even_an_infinite_one(cb_h100, precision):
    """dz was dy * act', NaN for an inf dy where act' is 0."""
    check_an_off_relu_unit_passes_no_gradient_even_an_infinite_one(cb_h100, precision)


def test_no_weight_decay_keeps_an_infinite_weight(cb_small_gpu):
    """fmaf(0, p, g) was NaN for an infinite p."""
    check_no_weight_decay_keeps_an_infinite_weight(cb_small_gpu)


def test_cross_entropy_of_a_row_with_an_infinite_logit(cb_h100):
    check_cross_entropy_of_a_row_with_an_infinite_logit(cb_h100)


def test_softmax_and_cross_entropy_of_a_row_with_a_nan_logit(cb_h100):
    check_softmax_and_cross_entropy_of_a_row_with_a_nan_logit(cb_h100)


def test_cross_entropy_of_a_label_outside_the_classes_is_nan_and_reads_nothing_past_its_row(cb_h100):
    check_cross_entropy_of_a_label_outside_the_classes(cb_h100)


# ----------------------------------------------------------------------------- optimizers


@pytest.mark.parametrize("n", VECTOR_SIZES)
@pytest.mark.parametrize("momentum, nesterov, weight_decay", SGD_CASES)
def test_sgd_update_matches_numpy(cb_small_gpu, rng, n, momentum, nesterov, weight_decay):
    check_sgd_update(cb_small_gpu, rng, n, momentum, nesterov, weight_decay, steps=2)


@pytest.mark.parametrize("n", VECTOR_SIZES)
@pytest.mark.parametrize("decoupled, weight_decay", ADAM_CASES)
def test_adam_update_matches_numpy(cb_small_gpu, rng, n, decoupled, weight_decay):
    check_adam_update(cb_small_gpu, rng, n, decoupled, weight_decay, steps=2)


@pytest.mark.parametrize("n", VECTOR_SIZES)
@pytest.mark.parametrize("momentum, centered, weight_decay", RMSPROP_CASES)
def test_rmsprop_update_matches_numpy(cb_small_gpu, rng, n, momentum, centered, weight_decay):
    check_rmsprop_update(cb_small_gpu, rng, n, momentum, centered, weight_decay, steps=2)


@pytest.mark.parametrize("n", VECTOR_SIZES)
@pytest.mark.parametrize("kind", ["sgd", "adam", "rmsprop"])
def test_updates_reading_their_rate_from_the_device_equal_the_eager_ones_bitwise(cb_small_gpu, rng, n, kind):
    # What a replayed step launches (*_update_hyper) against what an eager step launches.
    p, g, m, v, b = (rng.standard_normal(n).astype(np.float32) for _ in range(5))
    v = np.abs(v) + m * m  # RMSprop's centered square average stays above its mean gradient squared
    eager, replayed = ([cb_small_gpu.asarray(a) for a in (p, g, m, v, b)] for _ in range(2))
    finite_loss = device_scalar(cb_small_gpu, 0.5)
    for step in (1, 2, 7):
        lr = 0.01 * step
        if kind == "sgd":
            cb_small_gpu.sgd_update(*eager[:3], lr, 0.9, True, 1e-2)
            hyper = cb_small_gpu.asarray(np.array(cb_small_gpu.sgd_hyper(lr), np.float32))
            cb_small_gpu.sgd_update(*replayed[:3], None, 0.9, True, 1e-2, hyper=hyper, guard=finite_loss)
        elif kind == "adam":
            cb_small_gpu.adam_update(*eager[:4], lr, 0.9, 0.999, 1e-8, 1e-2, step, True)
            hyper = cb_small_gpu.asarray(np.array(cb_small_gpu.adam_hyper(lr, 0.9, 0.999, step), np.float32))
            cb_small_gpu.adam_update(*replayed[:4], None, 0.9, 0.999, 1e-8, 1e-2, None, True, hyper=hyper,
                                     guard=finite_loss)
        else:  # square_avg v, grad_avg m, momentum_buffer b
            cb_small_gpu.rmsprop_update(*eager[:2], eager[3], eager[2], eager[4], lr, 0.99, 1e-8, 1e-2, 0.9, True)
            hyper = cb_small_gpu.asarray(np.array(cb_small_gpu.rmsprop_hyper(lr), np.float32))
            cb_small_gpu.rmsprop_update(*replayed[:2], replayed[3], replayed[2], replayed[4], None, 0.99, 1e-8, 1e-2,
                                        0.9, True, hyper=hyper, guard=finite_loss)
    for a, b in zip(eager, replayed):
        np.testing.assert_array_equal(cb_small_gpu.to_host(a), cb_small_gpu.to_host(b))


@pytest.mark.parametrize("loss", [np.nan, np.inf, -np.inf] if not SANITIZED else [np.nan])
@pytest.mark.parametrize("kind", ["sgd", "adam", "rmsprop"])
def test_an_update_after_a_non_finite_loss_changes_nothing(cb_small_gpu, rng, kind, loss):
    arrays = [cb_small_gpu.asarray(rng.standard_normal(1031).astype(np.float32)) for _ in range(5)]
    before = [cb_small_gpu.to_host(a) for a in arrays]
    hyper = cb_small_gpu.asarray(np.array([0.1, 0.1, 1.0], np.float32))
    if kind == "sgd":
        cb_small_gpu.sgd_update(*arrays[:3], None, 0.9, False, 0.0, hyper=hyper[:1],
                                guard=device_scalar(cb_small_gpu, loss))
    elif kind == "adam":
        cb_small_gpu.adam_update(*arrays[:4], None, 0.9, 0.999, 1e-8, 0.0, None, False, hyper=hyper,
                                 guard=device_scalar(cb_small_gpu, loss))
    else:
        cb_small_gpu.rmsprop_update(*arrays, None, 0.99, 1e-8, 0.0, 0.9, True, hyper=hyper[:1],
                                    guard=device_scalar(cb_small_gpu, loss))
    for a, was in zip(arrays, before):
        np.testing.assert_array_equal(cb_small_gpu.to_host(a), was)


@pytest.mark.skipif(SANITIZED, reason="launches no kernel")
@pytest.mark.parametrize("name, bad", [
    ("out_loss", lambda cb: np.zeros(1, np.float32)),  # on the host
    ("out_loss", lambda cb: cb.empty((2,))),
    ("hyper", lambda cb: cb.asarray(np.zeros(3, np.float64))),
    ("hyper", lambda cb: cb.empty((6,))[::2]),  # not contiguous
    ("guard", lambda cb: cb.empty((1, 1))),
])
def test_a_device_loss_or_rate_of_the_wrong_kind_is_refused_naming_it_before_any_launch(cb_small_gpu, rng, name, bad):
    cb = cb_small_gpu
    arrays = [cb.asarray(rng.standard_normal(7).astype(np.float32)) for _ in range(4)]
    before = [cb.to_host(a) for a in arrays]
    given = {"out_loss": device_scalar(cb, 0.0), "hyper": device_scalar(cb, 0.1), "guard": device_scalar(cb, 1.0),
             name: bad(cb)}
    with trace() as t, pytest.raises(ValueError, match=rf"^{name}: expected a contiguous float32 CuPy array"):
        if name == "out_loss":
            cb.mse(arrays[0], arrays[1], out_loss=given["out_loss"])
        else:
            cb.sgd_update(*arrays[:3], None, 0.9, False, 0.0, hyper=given["hyper"], guard=given["guard"])
    assert t.total == 0
    for a, was in zip(arrays, before):
        np.testing.assert_array_equal(cb.to_host(a), was)


# ----------------------------------------------------------------------------- multi-tensor updates

# Tensor lengths of one *_many launch: empty, one element, either side of a block's chunk and
# several chunks (cupy_backend.MULTI_CHUNK = 1024).
MANY_SIZES = [5, 0, 1, 1023, 1024, 1025, 3 * 1024 + 7] if not SANITIZED else [5, 0, 1, 1025]


@pytest.mark.parametrize("option", [0, 1])
@pytest.mark.parametrize("kind", list(MANY_KINDS))
def test_a_multi_tensor_update_is_the_single_updates_bitwise_in_one_launch(cb_small_gpu, rng, kind, option):
    check_many_update(cb_small_gpu, rng, kind, option, MANY_SIZES)


@pytest.mark.parametrize("kind", list(MANY_KINDS))
def test_a_multi_tensor_update_reads_each_tensors_row_of_hyper_as_the_single_ones_read_theirs(cb_small_gpu, rng,
                                                                                              kind):
    check_many_update_from_hyper(cb_small_gpu, rng, kind, MANY_SIZES)


@pytest.mark.skipif(SANITIZED, reason="launches no kernel")
def test_the_multi_tensor_tables_kept_are_the_most_recently_used(cb_small_gpu, monkeypatch):
    cb = cb_small_gpu
    monkeypatch.setattr(cb, "MAX_MULTI_TABLES", 2)
    a, b, c = ([(cb.zeros((n,)),)] for n in (3, 4, 5))
    table_a = cb._multi_table(a)[0]
    cb._multi_table(b)
    assert cb._multi_table(a)[0] is table_a  # found again, and now the most recently used
    cb._multi_table(c)  # makes room by dropping b's
    assert cb._multi_table(a)[0] is table_a
    assert [key[-1] for key in cb._state()["multi_tables"]] == [5, 3]  # c's, then a's (their lengths)


@pytest.mark.skipif(SANITIZED, reason="launches no kernel")
def test_a_multi_tensor_update_refuses_hyper_rows_of_the_wrong_shape_before_any_launch(cb_small_gpu, rng):
    cb = cb_small_gpu
    _, many = many_tensors(cb, rng, "adam", MANY_SIZES)
    before = [tuple(cb.to_host(a) for a in tensor) for tensor in many]
    with trace() as t, pytest.raises(ValueError, match=r"^hyper: expected a contiguous float32 CuPy array of shape "
                                                       rf"\({len(many)}, >= 3\)"):
        cb.adam_update_many(many, None, 0.9, 0.999, 1e-8, 0.0, None, False, hyper=cb.empty((len(many), 1)),
                            guard=device_scalar(cb, 1.0))
    assert t.total == 0
    for tensor, was in zip(many, before):
        for a, b in zip(tensor, was):
            np.testing.assert_array_equal(cb.to_host(a), b)


@pytest.mark.parametrize("max_blocks", [cupy_backend.MAX_REDUCE_BLOCKS, 2])
def test_the_sum_of_squares_of_many_arrays_is_one_launch_and_one_read(cb_small_gpu, rng, monkeypatch, max_blocks):
    # With 2 blocks the chunks outnumber them, and each block loops over several.
    monkeypatch.setattr(cb_small_gpu, "MAX_REDUCE_BLOCKS", max_blocks)
    arrays = [rng.standard_normal(n).astype(np.float32) for n in MANY_SIZES]
    on_device = [cb_small_gpu.asarray(a) for a in arrays]
    with trace() as t:
        total = cb_small_gpu.sumsq(*on_device)
    assert t.launches == ["sumsq"]
    assert total == pytest.approx(sum(float(np.dot(a.astype(np.float64), a)) for a in arrays), rel=RTOL)
    assert cb_small_gpu.sumsq(*on_device) == total  # the same sum, in the same order, every time
    assert cb_small_gpu.sumsq(cb_small_gpu.empty((0,)), cb_small_gpu.empty((0,))) == 0.0
    with trace() as t:
        assert cb_small_gpu.sumsq() == 0.0  # no arrays: no launch, as before sumsq_many
    assert t.total == 0


def test_scaling_many_arrays_is_one_launch_of_the_single_scales_bits(cb_small_gpu, rng):
    arrays = [rng.standard_normal(n).astype(np.float32) for n in MANY_SIZES]
    singles, many = ([cb_small_gpu.asarray(a) for a in arrays] for _ in range(2))
    for a in singles:
        cb_small_gpu.scale_(a, 0.3)
    with trace() as t:
        cb_small_gpu.scale_many(many, 0.3)
    assert t.launches == ["scale"]
    for a, b in zip(many, singles):
        np.testing.assert_array_equal(cb_small_gpu.to_host(a), cb_small_gpu.to_host(b))


@pytest.mark.skipif(SANITIZED, reason="launches no kernel the two tests above do not")
def test_clipping_a_models_gradients_is_two_launches_and_matches_numpy(cb_h100, rng):
    grads = {}
    for backend in ("numpy", "cupy"):
        gb.seed(3)
        model = gb.Sequential([gb.Dense(9, 24, "gelu"), gb.Dense(24, 3)], backend=backend)
        x, y = graph_batches(np.random.default_rng(0), [17])[0]
        _, dout = gb.losses.cross_entropy(model.forward(x), y)
        model.backward(dout)
        with trace() as t:
            norm = gb.optim.clip_grad_norm(model.parameters(), 0.05)
        grads[backend] = norm, [model.backend.to_host(p.grad) for p in model.parameters()], t.launches
    assert grads["cupy"][2] == ["sumsq", "scale"]
    assert grads["cupy"][0] == pytest.approx(grads["numpy"][0], rel=RTOL)
    for got, want in zip(grads["cupy"][1], grads["numpy"][1]):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("n", VECTOR_SIZES)
def test_sumsq_and_scale_match_numpy(cb_small_gpu, rng, n):
    check_sumsq_and_scale(cb_small_gpu, rng, n)


# ----------------------------------------------------------------------------- a whole model


@pytest.mark.skipif(SANITIZED, reason="the training loop adds no kernel; the parity tests above cover them")
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "per_layer"])
def test_a_model_trains_on_the_cupy_backend_as_on_numpy(cb, rng, fused):
    x = rng.standard_normal((96, 8)).astype(np.float32)
    labels = rng.integers(0, 3, 96)
    losses = {}
    for backend in ("numpy", "cupy"):
        gb.seed(7)
        model = gb.Sequential([gb.Dense(8, 16, activation="gelu"), gb.Dense(16, 3)], backend=backend,
                              fused=fused and backend == "cupy")
        history = model.fit(x, labels, loss="cross_entropy", optimizer=gb.optim.Adam(model.parameters(), lr=1e-2),
                            epochs=3, batch_size=32, verbose=0)
        losses[backend] = history.history["loss"]
    np.testing.assert_allclose(losses["cupy"], losses["numpy"], rtol=1e-4)


# ----------------------------------------------------------------------------- captured steps (CUDA graphs)
#
# The stand-in records a capture's launches and runs them again at each replay, with the
# arguments they had at capture, and refuses what CUDA refuses during a capture (copies,
# synchronizations) as well as array math it cannot record. A replayed step must compute
# bit for bit what the eager step computes.

GRAPH_OPTIMIZERS = {
    "sgd": lambda params: gb.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam": lambda params: gb.optim.Adam(params, lr=1e-2, weight_decay=1e-3),
    "adamw": lambda params: gb.optim.AdamW(params, lr=1e-2),
    "rmsprop": lambda params: gb.optim.RMSprop(params, lr=1e-3, momentum=0.9, centered=True, weight_decay=1e-3),
}


def graph_model(fused, frozen=0, head="identity", seed=5):
    gb.seed(seed)
    model = gb.Sequential([gb.Dense(9, 24, "gelu"), gb.Dense(24, 16, "gelu"), gb.Dense(16, 3, head)],
                          backend="cupy", fused=fused)
    return model.freeze_to(frozen) if frozen else model


def run_steps(model, optimizer, batches, cuda_graph=False, rates=None):
    step = model.train_step("cross_entropy", optimizer, cuda_graph=cuda_graph)
    values, graphed = [], []
    for i, (xb, yb) in enumerate(batches):
        if rates is not None:
            for group in optimizer.param_groups:
                group["lr"] = rates[i]
        values.append(step(xb, yb))
        graphed.append(step.graphed)
    return values, graphed


def graph_batches(rng, sizes):
    return [(rng.standard_normal((n, 9)).astype(np.float32), rng.integers(0, 3, n)) for n in sizes]


@pytest.mark.skipif(SANITIZED, reason="launches no kernel the multi-tensor parity tests do not")
@pytest.mark.parametrize("opt", sorted(GRAPH_OPTIMIZERS))
def test_an_optimizer_updates_a_group_in_one_launch_as_it_would_parameter_by_parameter(cb_h100, rng, monkeypatch,
                                                                                       opt):
    # Two groups (the head at its own rate), and the first layer unfrozen after two steps, so
    # that its parameters are two steps behind: for Adam, whose update reads the step count, a
    # launch of their own.
    batches = graph_batches(rng, [17] * 4)
    runs = {}
    for multi in (False, True):
        monkeypatch.setattr(cb_h100, "MULTI_TENSOR_UPDATES", multi)
        model = graph_model(False, frozen=1)
        optimizer = GRAPH_OPTIMIZERS[opt]([{"params": model[:2].parameters()},
                                           {"params": model[2].parameters(), "lr": 3e-3}])
        step = model.train_step("cross_entropy", optimizer)
        launched = []
        for i, (xb, yb) in enumerate(batches):
            if i == 2:
                model.unfreeze()
            with trace() as t:
                step(xb, yb)
            launched.append([name for name in t.launches if name.endswith(("_update", "_update_many"))])
        runs[multi] = model.get_weights(), launched
    assert_arrays_equal(runs[True][0], runs[False][0])
    single, many = f"{opt.removesuffix('w')}_update", f"{opt.removesuffix('w')}_update_many"
    assert runs[False][1] == [[single] * 4] * 2 + [[single] * 6] * 2
    stepped = opt in ("adam", "adamw")  # the first layer's W and b are behind the second's
    assert runs[True][1] == [[many] * 2] * 2 + [[many] * (3 if stepped else 2)] * 2


# Under the sanitizers one case: the rest launch the same kernels from the same graphs.
GRAPH_CASES = [(opt, fused) for opt in sorted(GRAPH_OPTIMIZERS) for fused in (True, False)]
if SANITIZED:
    GRAPH_CASES = [("adam", False)]


@whole_model
@pytest.mark.parametrize("opt, fused", GRAPH_CASES)
def test_a_replayed_training_step_computes_what_the_eager_step_computes(cb_h100, rng, opt, fused):
    batches = graph_batches(rng, [40] * 5)
    rates = [0.05, 0.05, 0.02, 0.01, 0.01]  # a schedule changes the rate between replays
    results = {}
    for cuda_graph in (False, True):
        model = graph_model(fused)
        optimizer = GRAPH_OPTIMIZERS[opt](model.parameters())
        values, graphed = run_steps(model, optimizer, batches, cuda_graph=cuda_graph, rates=rates)
        results[cuda_graph] = (values, model.get_weights(), optimizer.state_dict())
    assert graphed == [False, True, True, True, True]  # one eager warm-up, then a capture and replays
    assert results[True][0] == results[False][0]
    assert_arrays_equal(results[True][1], results[False][1])
    for key, state in results[False][2]["state"].items():
        for name, value in state.items():
            np.testing.assert_array_equal(results[True][2]["state"][key][name], value)


@pytest.mark.skipif(SANITIZED, reason="the dropout kernels run in the dropout tests above")
def test_replayed_steps_draw_new_dropout_masks_as_the_eager_steps_do_bitwise(cb_h100, rng):
    batches = graph_batches(rng, [30] * 5)
    runs = {}
    for cuda_graph in (False, True):
        gb.seed(5)
        model = gb.Sequential([gb.Dropout(0.2), gb.Dense(9, 24, "tanh"), gb.Dropout(0.5), gb.Dense(24, 3)],
                              backend="cupy")
        step = model.train_step("cross_entropy", GRAPH_OPTIMIZERS["adam"](model.parameters()), cuda_graph=cuda_graph)
        gb.seed(8)
        values, graphed, keys = [], [], []
        for xb, yb in batches:
            values.append(step(xb, yb))
            graphed.append(step.graphed)
            keys.append(tuple(cb_h100.to_host(model[2]._key)))
        runs[cuda_graph] = values, model.get_weights(), graphed, keys
    assert runs[True][2] == [False, True, True, True, True]
    assert len(set(runs[True][3])) == 5  # a new key each step, replays included
    assert runs[True][3] == runs[False][3]
    assert runs[True][0] == runs[False][0]
    assert_arrays_equal(runs[True][1], runs[False][1])


@pytest.mark.skipif(SANITIZED, reason="launches no kernel the replay test does not")
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "per_layer"])
def test_a_replayed_step_launches_what_the_eager_step_launches_and_skips_frozen_layers(cb_h100, rng, fused):
    batches = graph_batches(rng, [33] * 3)
    model = graph_model(fused, frozen=1)
    step = model.train_step("cross_entropy", "adam", cuda_graph=True)
    with trace() as eager:
        step(*batches[0])
    step(*batches[1])  # captured and replayed
    with trace() as replayed:
        step(*batches[2])
    assert step.graphed and replayed.launches == eager.launches
    assert step.launches_per_step == len(eager.launches)
    assert "dense_dw" not in eager.launches[:1]
    # One launch updates the two trainable layers' W and b; the frozen one has no update.
    assert eager.counts["adam_update_many"] == 1 and "adam_update" not in eager.counts
    assert model[0].weight.grad is None


@pytest.mark.skipif(SANITIZED, reason="launches no kernel the replay test does not")
def test_a_replayed_step_whose_loss_is_not_finite_leaves_the_weights_and_the_optimizer_as_they_were(cb_h100, rng):
    model = graph_model(False)
    optimizer = GRAPH_OPTIMIZERS["adam"](model.parameters())
    step = model.train_step("mse", optimizer, cuda_graph=True)
    x = rng.standard_normal((20, 9)).astype(np.float32)
    target = rng.standard_normal((20, 3)).astype(np.float32)
    step(x, target)
    step(x, target)
    assert step.graphed
    weights, state = model.get_weights(), optimizer.state_dict()
    with pytest.raises(FloatingPointError, match="not updated"):
        step(x, np.full_like(target, 3e38))  # finite targets whose squared error overflows
    assert step.graphed
    assert_weights_equal(weights, model)
    assert [s["step"] for s in optimizer.state_dict()["state"].values()] == [s["step"] for s in state["state"].values()]
    step(x, target)  # and training goes on from there
    assert not all(np.array_equal(now, was) for now, was in zip(model.get_weights(), weights))


@pytest.mark.skipif(SANITIZED, reason="launches no kernel the replay test does not")
def test_weights_and_optimizer_state_loaded_between_replays_are_the_ones_trained(cb_h100, rng):
    # set_weights and load_state_dict put new arrays in place; a graph captured on the old
    # ones must not go on training those.
    batches = graph_batches(rng, [24] * 6)
    runs = {}
    for cuda_graph in (False, True):
        model = graph_model(False)
        optimizer = GRAPH_OPTIMIZERS["adam"](model.parameters())
        step = model.train_step("cross_entropy", optimizer, cuda_graph=cuda_graph)
        start_weights, values = model.get_weights(), []
        for i, (xb, yb) in enumerate(batches):
            if i == 3:
                saved = optimizer.state_dict()
                model.set_weights(start_weights)
                optimizer.load_state_dict(saved)
            values.append(step(xb, yb))
        runs[cuda_graph] = values, model.get_weights(), step.graphed
    assert runs[True][2] and runs[True][0] == runs[False][0]
    assert_arrays_equal(runs[True][1], runs[False][1])


@pytest.mark.skipif(SANITIZED, reason="launches no kernel the replay test does not")
def test_a_step_whose_first_loss_is_not_finite_is_captured_only_after_an_update_ran(cb_h100, rng):
    # The eager step before a capture loads every kernel and makes the optimizer state; one that
    # updated nothing did neither, so the next step runs eagerly again.
    x = rng.standard_normal((20, 9)).astype(np.float32)
    target = rng.standard_normal((20, 3)).astype(np.float32)
    runs = {}
    for cuda_graph in (False, True):
        model = graph_model(False)
        step = model.train_step("mse", GRAPH_OPTIMIZERS["adam"](model.parameters()), cuda_graph=cuda_graph)
        with pytest.raises(FloatingPointError):
            step(x, np.full_like(target, 3e38))
        values, graphed = [], []
        for _ in range(4):
            values.append(step(x, target))
            graphed.append(step.graphed)
        runs[cuda_graph] = values, model.get_weights(), graphed
    assert runs[True][2] == [False, True, True, True]  # eager until an update ran, then one capture
    assert runs[True][0] == runs[False][0]
    assert_arrays_equal(runs[True][1], runs[False][1])


@pytest.mark.skipif(SANITIZED, reason="the training loop adds no kernel; the tests above cover them")
@pytest.mark.parametrize("loss, head", [("cross_entropy", "softmax"), ("categorical_cross_entropy", "identity"),
                                        ("binary_cross_entropy", "sigmoid"), ("mse", "identity"),
                                        ("mae", "identity"), ("huber", "identity"),
                                        (gb.losses.Huber(0.3), "identity"), ("poisson", "identity"),
                                        (gb.losses.CrossEntropy(0.1), "softmax"),
                                        (gb.losses.CategoricalCrossEntropy(0.2), "identity")],
                         ids=["cross_entropy", "categorical_cross_entropy", "binary_cross_entropy", "mse", "mae",
                              "huber", "huber-delta-0.3", "poisson", "cross_entropy-smoothing-0.1",
                              "categorical_cross_entropy-smoothing-0.2"])
def test_fit_with_cuda_graphs_gives_the_eager_fit_bitwise(cb_h100, rng, loss, head):
    x = rng.standard_normal((100, 9)).astype(np.float32)  # 100 = 3 batches of 32 and one of 4
    labels = rng.integers(0, 3, 100)
    errors = (3 * rng.standard_normal((100, 3))).astype(np.float32)  # regression targets, some past delta
    y = {"cross_entropy": labels, "categorical_cross_entropy": np.eye(3, dtype=np.float32)[labels],
         "binary_cross_entropy": (rng.random((100, 3)) > 0.5).astype(np.float32),
         "mse": errors, "mae": errors, "huber": errors,
         "poisson": rng.poisson(2.0, (100, 3)).astype(np.float32)}[loss if isinstance(loss, str) else loss.__name__]
    runs = {}
    for cuda_graph in (False, True):
        model = graph_model("auto", head=head)
        gb.seed(11)  # the same shuffles
        # The training metrics score each batch's output: a replay's is the graph's own buffer.
        history = model.fit(x, y, loss=loss, optimizer="adam", epochs=3, batch_size=32, verbose=0,
                            cuda_graph=cuda_graph, metrics=["accuracy" if gb.losses.classifies(gb.losses.get(loss)) else "mae"])
        runs[cuda_graph] = history.history, model.get_weights()
    assert runs[True][0] == runs[False][0] and len(runs[True][0]) == 2
    assert_arrays_equal(runs[True][1], runs[False][1])


@pytest.mark.skipif(SANITIZED, reason="the weighted loss kernels run in the loss tests above")
def test_a_replayed_step_with_sample_weights_computes_what_the_eager_step_computes(cb_h100, rng):
    batches = graph_batches(rng, [24] * 3)
    weights = [rng.uniform(0, 2, 24) for _ in batches]
    runs = {}
    for cuda_graph in (False, True):
        model = graph_model(False)
        step = model.train_step("cross_entropy", GRAPH_OPTIMIZERS["adam"](model.parameters()), cuda_graph=cuda_graph)
        values, graphed = [], []
        for (xb, yb), wb in zip(batches, weights):
            values.append(step(xb, yb, sample_weight=wb))
            graphed.append(step.graphed)
        runs[cuda_graph] = values, model.get_weights(), graphed
    assert runs[True][2] == [False, True, True]  # the weights of each replay are copied in with its batch
    assert runs[True][0] == runs[False][0]
    assert_arrays_equal(runs[True][1], runs[False][1])


@pytest.mark.skipif(SANITIZED, reason="launches no kernel the replay test does not")
def test_a_per_batch_schedule_replays_graphs_that_read_each_new_rate_from_the_device(cb_h100, rng):
    batches = graph_batches(rng, [24] * 4)
    runs = {}
    for cuda_graph in (False, True):
        model = graph_model(False)
        optimizer = GRAPH_OPTIMIZERS["adam"](model.parameters())
        scheduler = gb.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=4, cycle_momentum=False)
        step = model.train_step("cross_entropy", optimizer, cuda_graph=cuda_graph)
        values, graphed = [], []
        for xb, yb in batches:
            values.append(step(xb, yb))
            graphed.append(step.graphed)
            scheduler.step()
        runs[cuda_graph] = values, model.get_weights(), graphed
    assert runs[True][2] == [False, True, True, True]  # a new rate every step, and no new capture for it
    assert runs[True][0] == runs[False][0]
    assert_arrays_equal(runs[True][1], runs[False][1])


@pytest.mark.skipif(SANITIZED, reason="launches no kernel the replay test does not")
def test_a_schedule_that_cycles_the_momentum_trains_under_cuda_graph_auto_as_eagerly(cb_h100, rng):
    x, labels = rng.standard_normal((64, 9)).astype(np.float32), rng.integers(0, 3, 64)
    runs = {}
    for cuda_graph in (False, "auto"):
        model = graph_model(False)
        optimizer = GRAPH_OPTIMIZERS["adam"](model.parameters())
        scheduler = gb.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, epochs=2, steps_per_epoch=2)
        gb.seed(3)
        history = model.fit(x, labels, optimizer=optimizer, scheduler=scheduler, epochs=2, batch_size=32,
                            cuda_graph=cuda_graph, verbose=0)
        runs[cuda_graph] = history.history["loss"], model.get_weights()
    assert runs["auto"][0] == runs[False][0]
    assert_arrays_equal(runs["auto"][1], runs[False][1])


def test_clipping_on_the_device_scales_by_the_bits_the_host_computes(cb_small_gpu, rng):
    check_clip_bits(cb_small_gpu, rng, 48 if not SANITIZED else 4)


@whole_model
@pytest.mark.parametrize("max_norm", [0.05, 0.0, 1e3], ids=["clips", "zero", "above_the_norm"])
def test_a_replayed_step_clips_the_gradients_as_the_eager_step_does(cb_h100, rng, max_norm):
    # The norm summed and the scale computed on the device, in double, against the host's.
    batches = graph_batches(rng, [24] * 4)
    runs = {}
    for cuda_graph in (False, True):
        model = graph_model(False, frozen=1)
        step = model.train_step("cross_entropy", GRAPH_OPTIMIZERS["adam"](model.parameters()), cuda_graph=cuda_graph,
                                clip_grad_norm=max_norm)
        values, graphed = [], []
        for xb, yb in batches:
            with trace() as t:
                values.append(step(xb, yb))
            graphed.append(step.graphed)
        runs[cuda_graph] = values, model.get_weights(), graphed, [model.backend.to_host(p.grad) for p in
                                                                  model.parameters() if p.grad is not None]
    assert runs[True][2] == [False, True, True, True]
    assert runs[True][0] == runs[False][0]
    assert_arrays_equal(runs[True][1], runs[False][1])
    assert_arrays_equal(runs[True][3], runs[False][3])  # the clipped gradients themselves
    assert t.counts["sumsq"] == 1 and t.counts["scale"] == 1  # the last call, replayed: the clip's two launches


def fill_the_update_table_cache(cb) -> None:
    """Make MAX_MULTI_TABLES tables of other tensors, so that every older table leaves the cache."""
    for n in range(1, cb.MAX_MULTI_TABLES + 1):
        a = cb.zeros((n,), np.float32)
        cb._multi_table([(a, a)])


@pytest.mark.skipif(SANITIZED, reason="launches no kernel the replay test does not")
def test_a_step_captured_after_its_update_tables_left_the_cache_replays_as_the_eager_step(cb_h100, rng):
    # Other models' updates between the eager warm-up and the capture (and between replays) push
    # the step's multi-tensor tables out of the cache: the capture, where no host copy may run,
    # makes its own and fills them after it ends; a replay reads the ones its graph holds.
    batches = graph_batches(rng, [20] * 5)
    runs = {}
    for cuda_graph in (False, True):
        model = graph_model(False)
        step = model.train_step("cross_entropy", GRAPH_OPTIMIZERS["adam"](model.parameters()), cuda_graph=cuda_graph)
        values, graphed = [], []
        for i, (xb, yb) in enumerate(batches):
            if i in (1, 3):
                fill_the_update_table_cache(cb_h100)
            values.append(step(xb, yb))
            graphed.append(step.graphed)
        runs[cuda_graph] = values, model.get_weights(), graphed
    assert runs[True][2] == [False, True, True, True, True]
    assert runs[True][0] == runs[False][0]
    assert_arrays_equal(runs[True][1], runs[False][1])


class DeviceOutOfMemory(MemoryError):
    """As CuPy's OutOfMemoryError, a MemoryError, not a RuntimeError."""


@pytest.mark.skipif(SANITIZED, reason="launches no kernel the replay test does not")
def test_cuda_graph_auto_trains_eagerly_where_a_capture_runs_out_of_memory(cb_h100, rng, monkeypatch):
    """A capture allocates buffers of its own, so it can run out of memory where an eager step
    fits; under "auto" that was not caught, and every later step tried to capture again."""
    batches = graph_batches(rng, [20] * 4)
    model = graph_model(False)
    step = model.train_step("cross_entropy", GRAPH_OPTIMIZERS["adam"](model.parameters()))
    eager = [step(xb, yb) for xb, yb in batches], model.get_weights()
    real_capture = cb_h100.capture

    def out_of_memory():
        raise DeviceOutOfMemory("Out of memory allocating 1,048,576 bytes")

    monkeypatch.setattr(cb_h100, "capture", lambda fn: real_capture(lambda: (fn(), out_of_memory())))
    model = graph_model(False)
    step = model.train_step("cross_entropy", GRAPH_OPTIMIZERS["adam"](model.parameters()), cuda_graph="auto")
    with pytest.warns(RuntimeWarning, match="could not be captured \\(Out of memory") as warned:
        values = [step(xb, yb) for xb, yb in batches]
    assert len([w for w in warned if issubclass(w.category, RuntimeWarning)]) == 1  # one capture tried
    assert values == eager[0]
    assert_arrays_equal(model.get_weights(), eager[1])


@pytest.mark.skipif(SANITIZED, reason="launches no kernel the replay test does not")
def test_cuda_graph_auto_trains_eagerly_where_a_capture_fails_and_true_raises(cb_h100, rng, monkeypatch):
    batches = graph_batches(rng, [20] * 4)
    model = graph_model(False)
    step = model.train_step("cross_entropy", GRAPH_OPTIMIZERS["adam"](model.parameters()))
    eager = [step(xb, yb) for xb, yb in batches], model.get_weights()

    real_capture = cb_h100.capture

    def failing_capture(fn):  # the step, then a copy to the host, which CUDA refuses in a capture
        return real_capture(lambda: (fn(), cb_h100.to_host(cb_h100.zeros((1,), np.float32))))

    monkeypatch.setattr(cb_h100, "capture", failing_capture)
    model = graph_model(False)
    step = model.train_step("cross_entropy", GRAPH_OPTIMIZERS["adam"](model.parameters()), cuda_graph="auto")
    values, graphed = [], []
    with pytest.warns(RuntimeWarning, match="cuda_graph='auto': the step could not be captured") as warned:
        for xb, yb in batches:
            values.append(step(xb, yb))
            graphed.append(step.graphed)
    assert len([w for w in warned if issubclass(w.category, RuntimeWarning)]) == 1  # one capture tried
    assert graphed == [False] * 4
    assert values == eager[0]
    assert_arrays_equal(model.get_weights(), eager[1])

    model = graph_model(False)
    step = model.train_step("cross_entropy", GRAPH_OPTIMIZERS["adam"](model.parameters()), cuda_graph=True)
    step(*batches[0])
    before = model.get_weights()
    with pytest.raises(RuntimeError, match="capturing"):
        step(*batches[1])
    assert_arrays_equal(model.get_weights(), before)


@pytest.mark.parametrize("setting, expected", [
    ({"loss": lambda out, y, backend=None: (0.0, out)}, "is not one of gpubp's"),
    ({"loss": "mse", "head": "softmax"}, "softmax output layer trained with mse"),
])
def test_cuda_graph_true_says_why_a_step_cannot_be_captured(cb_h100, setting, expected):
    setting = dict(setting)
    model = graph_model(False, head=setting.pop("head", "identity"))
    weights = model.get_weights()
    with pytest.raises(ValueError, match=f"cuda_graph=True: .*{expected}"):
        model.train_step(cuda_graph=True, **setting)
    assert model.train_step(cuda_graph="auto", **setting).why_not_graphed() is not None
    assert_weights_equal(weights, model)


def test_a_capture_refuses_host_copies_and_still_ends(cb_h100):
    a = cb_h100.asarray(np.ones(4, np.float32))
    cb_h100.scale_(a, 1.0)  # loads the module: a capture must not (drivers before CUDA 12.3 refuse it)
    with pytest.raises(harness.CaptureError, match="device-to-host copy"):
        cb_h100.capture(lambda: cb_h100.to_host(a))
    with pytest.raises(harness.CaptureError, match="array math"):
        cb_h100.capture(lambda: cb_h100.cupy.exp(a, out=a))
    graph = cb_h100.capture(lambda: cb_h100.scale_(a, 2.0))  # the stream is usable again
    np.testing.assert_array_equal(cb_h100.to_host(a), np.ones(4))  # captured, not run
    graph.launch()
    graph.launch()
    np.testing.assert_array_equal(cb_h100.to_host(a), np.full(4, 4.0))


@pytest.mark.skipif(SANITIZED, reason="launches no kernel the tests above do not")
def test_the_gpu_load_check_passes_for_nvrtc_and_refuses_a_fatbin_path_that_is_not_there(cb_h100, capsys,
                                                                                          monkeypatch, tmp_path):
    monkeypatch.setenv(cupy_backend.AOT_ENV, str(tmp_path))  # no fatbins there
    load_check = load("gpu_load_check")
    assert load_check.main(["nvrtc"]) == 0
    assert "FAIL" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        load_check.main(["fatbin"])
    assert "FAIL the manifest check for sm_90" in capsys.readouterr().out


# ----------------------------------------------------------------------------- sanitizers


# This file again in a child process, stopping at the first failure. -s: a sanitizer ends the
# process on its first report, so pytest must not hold stderr. Without the plugins this file does
# not use (a second of every child's start).
RERUN_THIS_FILE = [sys.executable, "-m", "pytest", __file__, "-q", "-x", "-s", "-p", "no:cacheprovider",
                   "-p", "no:hypothesispytest", "-p", "no:benchmark"]

# Each sanitizer run is split into this many child processes (conftest.py's --shard), which
# together run every test of this file, so that pytest-xdist spreads them over the cores.
SANITIZER_SHARDS = {"asan": 2, "tsan": 2}


@pytest.mark.slow
@pytest.mark.skipif(SANITIZED, reason="runs from the plain-mode process")
@pytest.mark.parametrize("mode, shard", [(mode, i) for mode, n in SANITIZER_SHARDS.items() for i in range(n)],
                         ids=[f"{mode}-{i + 1}of{n}" for mode, n in SANITIZER_SHARDS.items() for i in range(n)])
def test_kernels_are_clean_under_sanitizer(mode, shard):
    """This file again, in a child process under the sanitizer: any out-of-bounds access,
    misaligned vector access, undefined behaviour or data race fails it with the report."""
    done = subprocess.run(
        [*RERUN_THIS_FILE, f"--shard={shard}/{SANITIZER_SHARDS[mode]}"],
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
        "            stage(cur ^ 1);\n            __syncthreads();\n            cur ^= 1;\n        }\n",
        "            stage(cur ^ 1);\n            cur ^= 1;\n        }\n",
        "tsan", "dense_forward_matches and 132sms and identity and 80x37x29", "data race"),
    "k tail reads one row past k_end": (
        "gemm_tile.cuh",
        "load_row(i, next, k_lane + i * KSTEP < k_valid);",
        "load_row(i, next, k_lane + i * KSTEP <= k_valid);",
        "asan", "dense_forward_matches and 132sms and identity and 37x29x23", "heap-buffer-overflow"),
    "k tail slice dropped": (
        "gemm_tile.cuh",
        "            cur ^= 1;\n            multiply(cur);\n",
        "            cur ^= 1;\n",
        "plain", "dense_forward_matches and 1sm and identity and 600x37x29", "max error"),
    "edge column not masked": (
        "gemm_tile.cuh",
        "valid[c] = o + c * SPACING < o_extent;",
        "valid[c] = o + c * SPACING <= o_extent;",
        "asan", "dense_forward_matches and 132sms and identity and 37x29x23", "heap-buffer-overflow"),
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
        "a[i][2] = __float_as_uint(shared_load(base + 4 * L::LD));",
        "a[i][2] = __float_as_uint(shared_load(base));",
        "plain", "tf32_dense_backward and identity and 37x29x23", "max error"),
    "tensor cores, 4-byte copy: the partial first k tile reads past k_end": (
        "gemm_tf32.cuh",
        "if constexpr (FIRST) cp_async_ca4_zfill(dst, row[i] + j, k + j >= r);",
        "if constexpr (FIRST) cp_async_ca4_zfill(dst, row[i] + j, false);",
        "plain", "tf32_misaligned_views and 290x53x137", "max error"),
    "tensor cores, 4-byte copy: columns past the operand not zero-filled": (
        "gemm_tf32.cuh",
        "32 * jj >= width || (FIRST && k + ROWS * i >= r));",
        "(FIRST && k + ROWS * i >= r));",
        "asan", "tf32_misaligned_views and 80x37x29", "heap-buffer-overflow"),
    "tensor cores: missing cp.async wait": (
        "gemm_tf32.cuh",
        "        cp_async_wait<T::STAGES - 2>();\n",
        "",
        "plain", "tf32_dense_forward and identity and 256x96x136", "still has in flight"),
    "tensor cores: wait for one group too few": (
        "gemm_tf32.cuh",
        "        cp_async_wait<T::STAGES - 2>();\n",
        "        cp_async_wait<T::STAGES - 1>();\n",
        "plain", "tf32_dense_forward and identity and 256x96x136", "still has in flight"),
    "tensor cores: wrong ldmatrix row address": (
        "gemm_tf32.cuh",
        "KContiguous<E>::offset(f.warp_row + i * T::MMA_M + lane % 16,",
        "KContiguous<E>::offset(f.warp_row + i * T::MMA_M + lane % 8,",
        "plain", "tf32_dense_forward and identity and 37x29x23", "assert"),
    "bf16: transposed ldmatrix names the wrong k rows": (
        "gemm_tf32.cuh",
        "kk * T::MMA_K + 8 * (q / 2) + lane % 8));",
        "kk * T::MMA_K + 8 * (q % 2) + lane % 8));",
        "plain", "bf16_dense_backward_matches and identity and 37x29x23", "max error"),
    "bf16: rounding swaps the columns of a pair": (
        "dense_forward_tf32.cu",
        "out[(r * ld + c) / 2] = gpubp::pack_bf16x2(lo, hi);",
        "out[(r * ld + c) / 2] = gpubp::pack_bf16x2(hi, lo);",
        "plain", "bf16_dense_forward_matches and identity and 37x29x23", "max error"),
    "bf16: padding of a rounded operand left unwritten": (
        "dense_forward_tf32.cu",
        "hi = r < rows && c + 1 < cols ? src[r * src_ld + c + 1] : 0.0f;",
        "hi = r < rows && c + 1 < cols ? src[r * src_ld + c + 1] : 1.0f;",
        "plain", "bf16_dense_forward_matches and identity and 37x29x23", "max error"),
    "split-K finish drops the last split": (
        "split_k.cuh",
        "for (int s = 0; s < splits; ++s) sum += __ldcg(ws + s * split_stride + idx);",
        "for (int s = 0; s < splits - 1; ++s) sum += __ldcg(ws + s * split_stride + idx);",
        "plain", "split_k_dw and tf32 and 600x37x29", "max error"),
    "dz pass: a strip's db drops the batch's last split": (
        "dense_backward_tf32.cu",
        "for (int s = warp; s < splits; s += WARPS) sum +=",
        "for (int s = warp; s < splits - 1; s += WARPS) sum +=",
        "plain", "dz_pass_splits and fp32 and 600x29", "max error"),
    "dz pass: the last block of a strip leaves its ticket taken": (
        "dense_backward_tf32.cu",
        "    split_k_reset(tickets + blockIdx.x);\n",
        "",
        "plain", "dz_pass_splits and fp32 and 600x29", "resets its ticket"),
    "fused: removed barrier before a layer reads its input": (
        "fused_mlp.cu",
        "            __syncthreads();  // the stages, and the previous layer's epilogue, are complete\n",
        "",
        "tsan", "fused_mlp_matches and act_gelu", "data race"),
    "fused: the column quad that holds the last columns of a layer skipped": (
        "fused_mlp.cu",
        "const int q = (n - Fused::STRIP * warp + QUAD_COLS - 1) / QUAD_COLS;",
        "const int q = (n - Fused::STRIP * warp) / QUAD_COLS;",
        "plain", "fused_mlp_matches and widths_17_33_100_1", "max error"),
    "fused: the row quad that holds the batch's last rows skipped": (
        "fused_mlp.cu",
        "const long long q = (rows + QUAD_ROWS - 1) / QUAD_ROWS;",
        "const long long q = rows / QUAD_ROWS;",
        "plain", "fused_mlp_matches and widths_17_33_100_1", "max error"),
    "fused: the next product's K padding left unwritten (uninitialized shared memory)": (
        "fused_mlp.cu",
        "return t.col_quads((n + BK - 1) / BK * BK);",
        "return t.col_quads(n);",
        "plain", "fused_mlp_matches and widths_17_33_100_1", "max error"),
    "fused: transposed weight stage off by one k": (
        "fused_mlp.cu",
        "wt.init(wl, p.out, n0, p.in, 0, threadIdx.x);",
        "wt.init(wl, p.out, n0, p.in, 1, threadIdx.x);",
        "asan", "fused_mlp_matches and act_gelu", "heap-buffer-overflow"),
    "fused: wrong tensor-core A fragment": (
        "fused_mlp.cu",
        "abuf + g * MmaRows::A_LD + 16 * s + 4 * t);",
        "abuf + g * MmaRows::A_LD + 16 * s + 4 * (t ^ 1));",
        "plain", "fused_mlp_on_tensor_cores and tf32 and act_gelu", "max error"),
    "philox: a round that leaves the key out": (
        "philox.cuh",
        "        c2 = hi0 ^ c3 ^ k1;\n",
        "        c2 = hi0 ^ c3;\n",
        "plain", "philox_in_cuda", "assert"),
    "dropout: the last column group reads one past the row": (
        "dropout.cuh",
        "for (int e = 0; e < 4; ++e) v[e] = e < count ? p[base + e] : 0.0f;",
        "for (int e = 0; e < 4; ++e) v[e] = e <= count ? p[base + e] : 0.0f;",
        "asan", "dropout_mask_kernel and 132sms", "heap-buffer-overflow"),
    "dropout: the fused forward masks with the next column group's words": (
        "dense_forward.cu",
        "const PhiloxWords words = mask.words(row, col);",
        "const PhiloxWords words = mask.words(row, col + 4);",
        "plain", "masked_dense_layer_matches and 1sm and relu", "assert|mismatch"),
    "dropout: the tf32 dz pass regenerates the mask one row off": (
        "dense_backward_tf32.cu",
        "const PhiloxWords words = mask.words(row, col);",
        "const PhiloxWords words = mask.words(row + 1, col);",
        "plain", "masked_tensor_core_dense_layer and tf32 and relu and 37x29x23", "max error"),
    "dropout: the fp32 dz pass forgets the first row's offset": (
        "dropout.cuh",
        "return dropout_words(k0, k1, first_row + row, col);",
        "return dropout_words(k0, k1, row, col);",
        "plain", "masked_dense_layer_matches and 132sms and gelu and 37x29x23", "assert|mismatch|max error"),
    "fused: weight stage stored without its swizzle": (
        "fused_mlp.cu",
        "MmaRows::slot(g, t)) + 2 * q + r] = word;",
        "4 * g + t) + 2 * q + r] = word;",
        "plain", "fused_mlp_on_tensor_cores and bf16 and act_gelu", "max error"),
    "dX epilogue: act' of the layer below taken at another column": (
        "dense_backward.cu",
        "for (int j = 0; j < 4; ++j) v[j] = act_backward<ACT>(v[j], a[j], a[j]);",
        "for (int j = 0; j < 4; ++j) v[j] = act_backward<ACT>(v[j], a[3 - j], a[3 - j]);",
        "plain", "dx_with_the_activation_below and 1sm and tanh and 37x29x23", "max error|mismatch"),
    "dX epilogue: reads the layer below's output one past a row's end": (
        "dense_backward.cu",
        "const int count = static_cast<int>(valid_cols < 4 ? valid_cols : 4);",
        "const int count = static_cast<int>(valid_cols < 4 ? valid_cols + 1 : 4);",
        "asan", "dx_with_the_activation_below and 132sms and sigmoid and 37x29x23", "heap-buffer-overflow"),
    "dX after the store (an act' of z): reads z one element on, past the last row's end": (
        "dense_backward.cu",
        "load_group(z, row * N + col, count, vec, a);",
        "load_group(z, row * N + col + 1, count, vec, a);",
        "asan", "dx_with_the_activation_below and 132sms and gelu and 37x29x23", "heap-buffer-overflow"),
    "tensor cores: dX after the store (an act' of z) leaves half the pairs as stored": (
        "dense_backward_tf32.cu",
        "for (int p = 0; p < T::TILES_M * T::TILES_N * 2; ++p) {",
        "for (int p = 0; p < T::TILES_M * T::TILES_N; ++p) {",
        "plain", "tensor_core_dx_with_the_activation_below and tf32 and gelu and 37x29x23", "max error|mismatch"),
    "tensor cores: dX epilogue applies a pair's first act' to both": (
        "dense_backward_tf32.cu",
        "v1 = act_backward<ACT>(v1, a1, a1);",
        "v1 = act_backward<ACT>(v1, a0, a0);",
        "plain", "tensor_core_dx_with_the_activation_below and tf32 and tanh and 37x29x23", "max error|mismatch"),
    "dX epilogue: the mask below regenerated from the next column group's words": (
        "dense_backward.cu",
        "const PhiloxWords words = mask.words(row, col);",
        "const PhiloxWords words = mask.words(row, col + 4);",
        "plain", "dx_regenerating_the_mask_below and 1sm and relu and 37x29x23", "max error|mismatch"),
    "tensor cores: dX epilogue masks a pair's second column with its first one's word": (
        "dense_backward_tf32.cu",
        "v1 = masked_dz<ACT>(v1, a1, upper ? words.w[3] : words.w[1], mask, keep_prob);",
        "v1 = masked_dz<ACT>(v1, a1, upper ? words.w[2] : words.w[0], mask, keep_prob);",
        "plain", "tensor_core_dx_regenerating and tf32 and relu and 37x29x23", "max error|mismatch"),
    "fused: tensor-core dx written past the input width": (
        "fused_mlp.cu",
        "                    if (c >= cols) continue;\n",
        "",
        "asan", "fused_mlp_on_tensor_cores and tf32 and act_gelu", "heap-buffer-overflow"),
    # Cross-block synchronization: blocks run on two OS threads at once (runtime.cpp), so these
    # race, as on a GPU, and ThreadSanitizer sees the unordered accesses.
    "grid reduction: ticket taken without an atomic": (
        "reduce.cuh",
        "is_last = atomicAdd(ticket, 1u) == gridDim.x - 1;",
        "is_last = (*ticket)++ == gridDim.x - 1;",
        "tsan", "elementwise_losses and mse", "data race"),
    "grid reduction: no fence between a block's partial and its ticket": (
        "reduce.cuh",
        "        __threadfence();  // the partial is visible device-wide before the ticket is taken\n",
        "",
        "tsan", "elementwise_losses and mse", "data race"),
    "split-K: ticket taken without an atomic": (
        "split_k.cuh",
        "is_last = atomicAdd(ticket, 1u) == static_cast<unsigned int>(splits - 1);",
        "is_last = (*ticket)++ == static_cast<unsigned int>(splits - 1);",
        "tsan", "split_k_dw and fp32", "data race"),
    "split-K: no fence before the ticket": (
        "split_k.cuh",
        "        __threadfence();\n        is_last = atomicAdd(ticket, 1u)",
        "        is_last = atomicAdd(ticket, 1u)",
        "tsan", "split_k_dw and fp32", "data race"),
}


@pytest.mark.slow
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
        [*RERUN_THIS_FILE, "-k", selection],
        env=env, capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    output = done.stdout + done.stderr
    assert done.returncode != 0, f"{bug} went unnoticed in {mode} mode:\n{output[-4000:]}"
    assert re.search(reason, output), f"{bug} failed, but not for the expected reason ({reason}):\n{output[-4000:]}"


@pytest.mark.skipif(SANITIZED, reason="launches no kernel the replay test does not")
def test_the_rehearsal_catches_a_host_read_of_device_memory_in_a_captured_step(cb_h100, rng, monkeypatch):
    """A planted bug: the clip reads the norm on the host (float(norm_sq[0])) to skip its scaling
    launch. CuPy refuses that device-to-host copy while the stream captures; so does the stand-in,
    whose indexing gives device arrays, as CuPy's does."""
    clip = cupy_backend.clip_

    def clip_reading_the_norm(arrays, max_norm, norm_sq, guard):
        clip(arrays, max_norm, norm_sq, guard)
        if max_norm / (float(norm_sq[0]) ** 0.5 + 1e-6) >= 1.0:
            return

    monkeypatch.setattr(cupy_backend, "clip_", clip_reading_the_norm)
    model = graph_model(False, frozen=1)
    step = model.train_step("cross_entropy", GRAPH_OPTIMIZERS["adam"](model.parameters()), cuda_graph=True,
                            clip_grad_norm=1.0)
    with pytest.raises(RuntimeError, match="device-to-host copy"):
        for xb, yb in graph_batches(rng, [24] * 3):
            step(xb, yb)
