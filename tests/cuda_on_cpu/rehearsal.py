"""A rehearsal of the ``gpu`` tests without a GPU: ``pytest -m gpu --gpu-rehearsal tests``;
and of the GPU benchmarks: ``pytest -p cuda_on_cpu.rehearsal bench/test_gpu_dense.py
bench/test_gpu_fused.py`` (with ``tests`` on ``PYTHONPATH``).

The tests marked ``gpu`` run on a real device only, so a mistake in one of them (a call that
no longer matches the backend, say) would first show on a GPU, in the few minutes one is lent.
With ``--gpu-rehearsal`` the CuPy backend runs on the CPU harness instead (``cupy_shim``, an
H100's 132 SMs and compute capability 9.0), its arrays count as CuPy's, and the ``gpu`` tests
run rather than skip. What the stand-in cannot do is skipped by name in ``CANNOT_REHEARSE``,
with the reason, and a test that imports cupy itself skips. The harness runs one thread per CUDA
thread, so the large shapes of tests/test_cupy_backend.py cost about 80 s of CPU more than the
other 500 tests' 50 s; tests/test_gpu_rehearsal.py leaves them out with ``-k``.

The harness computes what the CUDA code computes, not what a GPU's timing or memory model
adds: a pass here says the tests and the backend's Python agree, not that the GPU will.

As a plugin (``-p cuda_on_cpu.rehearsal``, for bench/), it also shrinks the benchmarks'
workloads (``shrink``: widths over 128 to 136, so the per-layer kernels still run; batches to
72 at most), times each once, and skips what is not gpubp's CuPy backend (PyTorch, cuBLAS and
the Numba backend need a real GPU), so every gpubp benchmark's code runs as the GPU stage runs
it, if not at its size.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from cuda_on_cpu import harness
from gpubp import _checks, backends
from gpubp.backends import cupy_backend

OPTION = "--gpu-rehearsal"
SMS = 132  # an H100 SXM's (an H200 has the same): small layers take the 128x64 tiles and split dW

# test function name -> why the stand-in cannot run it (it skips with that reason).
CANNOT_REHEARSE = {
    "test_cupy_and_numba_backends_share_arrays": "the Numba backend runs in the CUDA simulator here, "
                                                 "which cannot take the stand-in's arrays",
}


# The GPU benchmarks' implementations the stand-in runs: gpubp's CuPy backend, fused or not.
BENCH_IMPLS = ("gpubp-cupy", "gpubp-fused", "gpubp-per-layer")
WIDE, BATCH = 136, 72


def install() -> None:
    """Put the CuPy backend on the CPU harness for the rest of this process."""
    cpu = harness.Harness()
    cpu.prebuild({Path(f).stem: cupy_backend.kernel_source(f) for f in cupy_backend.KERNEL_FILES})
    cupy_backend.cupy = harness.cupy_shim(cpu, sms=SMS)
    for cache in harness.BACKEND_CACHES:
        setattr(cupy_backend, cache, {})
    backends._modules["cupy"] = cupy_backend
    backends._unavailable.pop("cupy", None)
    # A test that imports cupy itself would mix a real GPU's arrays with the stand-in's: hidden,
    # `pytest.importorskip("cupy")` skips it, on a machine with CuPy too.
    sys.modules["cupy"] = None
    array_kind = _checks.array_kind
    # The stand-in's arrays are NumPy arrays underneath; as CuPy's, they go to the CuPy backend.
    _checks.array_kind = lambda a: "cupy" if isinstance(a, harness.DeviceArray) else array_kind(a)
    cupy_backend.cupy.cuda.runtime.getDeviceProperties = lambda device: {"name": b"CPU harness (rehearsal)"}


def skip_what_cannot_run(items) -> None:
    """Skip the tests of ``CANNOT_REHEARSE``, with the reason."""
    for item in items:
        reason = CANNOT_REHEARSE.get(getattr(item, "originalname", None) or item.name)
        if reason:
            item.add_marker(pytest.mark.skip(reason=f"gpu rehearsal: {reason}"))


# ----------------------------------------------------------------------------- as a plugin, for bench/


def shrink(widths, batch) -> tuple[list[int], int]:
    return [min(w, WIDE) for w in widths], min(batch, BATCH)


def shrink_module(module) -> None:
    """bench/test_gpu_dense.py's and test_gpu_fused.py's workloads, small, timed once."""
    small = {"ROUNDS": 1, "WARMUP": 0, "FWD_SIZE": WIDE}
    for name in ("STEP_WORKLOADS", "MLPS", "SINGLE_LAYERS"):
        if hasattr(module, name):
            small[name] = {key: shrink(*value) for key, value in getattr(module, name).items()}
    for name in ("FROZEN_MODEL", "SMALL_STEP"):
        if hasattr(module, name):
            small[name] = shrink(*getattr(module, name))
    if hasattr(module, "runner"):  # test_gpu_fused.py: the batch is 2**power
        runner = module.runner
        small["runner"] = lambda impl, mode, widths, batch: runner(impl, mode, *shrink(widths, batch))
    for name, value in small.items():
        if hasattr(module, name):
            setattr(module, name, value)


def pytest_configure(config):
    install()


def pytest_collection_modifyitems(config, items):
    for module in {item.module for item in items}:
        shrink_module(module)
    for item in items:
        impl = getattr(item, "callspec", None) and item.callspec.params.get("impl")
        if not (impl or "").startswith(BENCH_IMPLS):
            item.add_marker(pytest.mark.skip(reason=f"gpu rehearsal: {impl or item.name} needs a real GPU"))
