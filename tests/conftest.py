"""Test configuration shared by every test module.

With no GPU, Numba's CUDA simulator is switched on here, before anything imports
Numba, so the Numba-CUDA kernels run for real (in Python) on small shapes.
Tests marked ``gpu`` need a real device and skip, with the reason, otherwise.

Run time: under pytest-xdist (``-n auto``), tests marked ``slow`` are handed out first, and
the tests of each fixture in ``ONE_WORKER_FIXTURES`` share one worker; ``--shard I/N`` runs
one of N parts of a run (the sanitizer reruns of one file are split so).
"""

import os
import sys

# The suite runs many small matrix products; one BLAS thread is faster for those and keeps
# timings steady on a shared 2-core machine. Must be set before NumPy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# Where the environment forbids bytecode files (PYTHONDONTWRITEBYTECODE, as on our CI machines),
# each of the suite's hundred-odd child interpreters (planted bugs, sanitizer shards, the command
# line, torchrun) compiled gpubp, the tests and pytest's rewritten asserts from source again: a
# child pytest took 2.7 s to collect tests/test_kernels_on_cpu.py, 0.8 s with a bytecode cache.
# The cache goes to the temporary folder, not the tree, which stays as the environment wants it.
# Set here, before pytest-xdist starts its workers, so that they inherit it too.
if os.environ.get("PYTHONDONTWRITEBYTECODE") and not os.environ.get("PYTHONPYCACHEPREFIX"):
    import tempfile

    del os.environ["PYTHONDONTWRITEBYTECODE"]
    os.environ["PYTHONPYCACHEPREFIX"] = os.path.join(tempfile.gettempdir(), "gpubp-pycache")

from gpubp._driver import cuda_device_count  # noqa: E402

GPU_COUNT, NO_GPU_REASON = cuda_device_count()
if GPU_COUNT == 0:
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
if SIMULATOR:  # blocks that wait on events instead of polling their threads: simulator_blocks.py
    import simulator_blocks

    simulator_blocks.install_on_import()
    # The simulator runs each thread of a block as a Python thread. They give up the GIL at every
    # barrier and at their end anyway; the interpreter's forced switch every 5 ms only adds GIL
    # hand-offs among them (system time). Every 50 ms took about a tenth off the Numba tests'
    # CPU time on a 2-core machine, and no test here times a thread finer than that.
    sys.setswitchinterval(0.05)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

from gpubp import backends  # noqa: E402

import xdist_groups  # noqa: E402
from cuda_on_cpu import rehearsal  # noqa: E402

# The property tests draw the same examples on every run (derived from each test's code), so a
# run's result does not depend on chance and a failure reproduces; ``--hypothesis-profile=explore``
# draws new ones each run, to look for what the fixed draws miss (the option loads its profile
# after this file has loaded this one).
settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile("repeatable")

# Every backend a model can run on here: numba runs in the CUDA simulator without a GPU.
BACKENDS = ["numpy", "numba", pytest.param("cupy", marks=pytest.mark.gpu)]


def pytest_report_header(config):
    where = f"{GPU_COUNT} CUDA GPU(s)" if GPU_COUNT else f"no CUDA GPU ({NO_GPU_REASON})"
    return f"gpubp: {where}; Numba CUDA simulator {'on' if SIMULATOR else 'off'}"


# Module-scoped fixtures that compile for minutes and keep their result in memory only: every
# test using one joins one xdist group (with -n the suite runs --dist loadgroup: xdist_groups.py),
# so one pytest-xdist worker computes it once, instead of every worker computing it again.
# fixture -> group, by file. The CMake build (bench/aot_build.py) is shared through the
# temporary folder, and the kernel model reads its fatbins: on another worker the model would
# wait minutes for the build's lock, idle, so both fixtures' tests share one worker.
ONE_WORKER_FIXTURES = {
    "test_kernels_compile.py": {"aot_build": "cmake_build"},
    "test_kernel_model.py": {"fresh": "cmake_build"},
    "test_numba_backend.py": {"compiled_variants": "test_numba_backend.compiled_variants"},
    "test_distributed.py": {"ranks": "test_distributed.ranks"},
}


def pytest_configure(config):
    # With -n: loadgroup scheduling, and each worker tags its grouped tests so (xdist_groups.py).
    if not config.pluginmanager.has_plugin("xdist_groups"):
        config.pluginmanager.register(xdist_groups, "xdist_groups")
    # Without pytest-xdist (not installed, or -p no:xdist) nothing registers its xdist_group mark,
    # which --strict-markers would refuse where the hook below adds it.
    if not config.pluginmanager.has_plugin("xdist"):
        config.addinivalue_line("markers", "xdist_group(name): run on one pytest-xdist worker (a no-op without it)")
    if config.getoption(rehearsal.OPTION):
        rehearsal.install()


def pytest_addoption(parser):
    parser.addoption(rehearsal.OPTION, action="store_true", default=False,
                     help="run the gpu-marked tests without a GPU, the CuPy backend on the CPU kernel harness "
                          "(tests/cuda_on_cpu/rehearsal.py)")
    parser.addoption("--shard", metavar="I/N", default=None,
                     help="run only the I-th (from 0) of N interleaved parts of the tests collected: every N-th "
                          "from the I-th; the sanitizer runs of tests/test_kernels_on_cpu.py split the file so")


def shard_of(spec: str) -> tuple[int, int]:
    index, _, count = spec.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise pytest.UsageError(f"--shard: expected I/N with 0 <= I < N, got {spec!r}")
    return int(index), int(count)


# tryfirst: before pytest-xdist reads the xdist_group marks this adds.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    if config.getoption("shard"):
        index, count = shard_of(config.getoption("shard"))
        config.hook.pytest_deselected(items=[item for i, item in enumerate(items) if i % count != index])
        items[:] = items[index::count]
    for item in items:
        groups = ONE_WORKER_FIXTURES.get(item.path.name, {})
        shared = sorted(set(groups) & set(item.fixturenames))
        if shared:
            item.add_marker(pytest.mark.xdist_group(groups[shared[0]]))
    # The longest tests start first, so that no worker is left with one of them at the end.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    if config.getoption(rehearsal.OPTION):
        rehearsal.skip_what_cannot_run(items)
        return
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
