"""Test configuration shared by every test module.

With no GPU, Numba's CUDA simulator is switched on here, before anything imports
Numba, so the Numba-CUDA kernels run for real (in Python) on small shapes.
Tests marked ``gpu`` need a real device and skip, with the reason, otherwise.
"""

import os

# The suite runs many small matrix products; one BLAS thread is faster for those and keeps
# timings steady on a shared 2-core machine. Must be set before NumPy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from gpubp._driver import cuda_device_count  # noqa: E402

GPU_COUNT, NO_GPU_REASON = cuda_device_count()
if GPU_COUNT == 0:
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from gpubp import backends  # noqa: E402

# Every backend a model can run on here: numba runs in the CUDA simulator without a GPU.
BACKENDS = ["numpy", "numba", pytest.param("cupy", marks=pytest.mark.gpu)]


def pytest_report_header(config):
    where = f"{GPU_COUNT} CUDA GPU(s)" if GPU_COUNT else f"no CUDA GPU ({NO_GPU_REASON})"
    return f"gpubp: {where}; Numba CUDA simulator {'on' if SIMULATOR else 'off'}"


def pytest_collection_modifyitems(config, items):
    if GPU_COUNT:
        return
    skip = pytest.mark.skip(reason=f"needs a CUDA GPU: {NO_GPU_REASON}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(params=BACKENDS)
def backend(request):
    """The name of each backend that can run here; the others skip with the reason."""
    reason = backends.available()[request.param]
    if reason:
        pytest.skip(f"backend {request.param!r} is not available here: {reason}")
    return request.param
