"""The gpu tests rehearsed on the CPU harness (tests/cuda_on_cpu/rehearsal.py), in a pytest of
their own: the rehearsal swaps the CuPy backend's ``cupy`` for the whole process.

Without a GPU these tests are the only run the ``gpu`` tests get, so a stale call in one of
them (the rehearsal's first run found one) fails here instead of in a GPU's first minutes.
The large shapes of tests/test_cupy_backend.py are left out: the harness takes minutes on them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cuda_on_cpu import harness, rehearsal
from test_cupy_backend import LARGE_FOLD_SHAPES, LARGE_SHAPES, SHAPES
from test_cupy_paths_on_cpu import cb, cpu_harness, kernel_families  # noqa: F401  (cb and cpu_harness are fixtures)
from test_gpu_check_scripts import load

TESTS = Path(__file__).parent
NOT_LARGE = "not (" + " or ".join("x".join(map(str, shape)) for shape in LARGE_SHAPES + LARGE_FOLD_SHAPES) + ")"
# The dX-forms-the-dz-below tests run check_dx_applies_the_activation_below, which
# tests/test_kernels_on_cpu.py runs on the harness over every activation, precision and shape
# already: rehearsed at one shape each, for a stale call.
FOLD_ONCE = f"not ((activation_below or mask_below) and not {'x'.join(map(str, SHAPES[3]))})"


def pytest_run(*args, cwd=TESTS.parent, timeout=900) -> subprocess.CompletedProcess:
    # Not as a pytest-xdist worker, which its variables would say: pytest-benchmark turns itself off there.
    env = {name: value for name, value in os.environ.items() if not name.startswith("PYTEST_XDIST")}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), str(TESTS), os.environ.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                           "-o", "addopts=-rs --strict-markers", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def rehearse(*args, **kwargs) -> subprocess.CompletedProcess:
    return pytest_run(rehearsal.OPTION, "-m", "gpu", *args, **kwargs)


def counts(output: str) -> dict[str, int]:
    summary = output.strip().splitlines()[-1]
    return {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", summary)}


@pytest.mark.slow
def test_the_gpu_tests_pass_on_the_cpu_harness():
    done = rehearse("-k", f"{NOT_LARGE} and {FOLD_ONCE}", "tests")
    found = counts(done.stdout)
    assert done.returncode == 0 and not found.get("failed") and not found.get("error"), done.stdout[-6000:]
    assert found["passed"] >= 450, done.stdout[-3000:]  # 500 when written
    # Each skip is one the rehearsal names, or a test that needs the real cupy module.
    skips = [line for line in done.stdout.splitlines() if line.startswith("SKIPPED")]
    assert all("gpu rehearsal:" in line or "could not import 'cupy'" in line for line in skips), skips


def test_every_test_the_rehearsal_cannot_run_exists():
    defined = set(re.findall(r"^def (test_\w+)", "\n".join(p.read_text() for p in TESTS.glob("test_*.py")), re.M))
    assert set(rehearsal.CANNOT_REHEARSE) <= defined


def test_the_rehearsal_catches_a_gpu_test_that_calls_the_backend_as_it_no_longer_is(tmp_path):
    # The stale call the first rehearsal found: _gemm_launch returned three values when the test
    # was written, and four since.
    source = (TESTS / "test_cupy_backend.py").read_text()
    fixed = '        _, grid, *_ = cb._gemm_launch("dw", "tanh", n_in, n_out, precision)'
    assert fixed in source
    (tmp_path / "test_cupy_backend.py").write_text(source.replace(fixed, fixed.replace("*_", "_")))
    shutil.copy(TESTS / "conftest.py", tmp_path / "conftest.py")
    done = rehearse("-c", str(TESTS.parent / "pyproject.toml"), "--rootdir", str(tmp_path),
                    "-k", "test_split_k_dw_is_bitwise_repeatable and fp32", str(tmp_path), cwd=tmp_path)
    found = counts(done.stdout)
    assert done.returncode == 1 and found.get("failed") == 1 and not found.get("passed"), done.stdout[-3000:]
    assert "ValueError: too many values to unpack" in done.stdout


@pytest.mark.slow
def test_the_gpubp_gpu_benchmarks_run_on_the_cpu_harness_at_small_sizes():
    # bench/ as the GPU stages run it, through the rehearsal plugin; of the fused sweep, one
    # width, depth and batch (the whole sweep takes about two minutes here).
    done = pytest_run("-p", "cuda_on_cpu.rehearsal", "-k", "not test_fused_mlp or -32-4-14-",
                      "bench/test_gpu_dense.py", "bench/test_gpu_fused.py")
    found = counts(done.stdout)
    assert done.returncode == 0 and not found.get("failed") and not found.get("error"), done.stdout[-6000:]
    assert found["passed"] >= 26 + 12, done.stdout[-3000:]  # every gpubp benchmark of the dense file
    skips = [line for line in done.stdout.splitlines() if line.startswith("SKIPPED")]
    assert skips and all("gpu rehearsal:" in line for line in skips), skips


def test_the_benchmark_rehearsal_catches_a_benchmark_that_calls_the_backend_as_it_never_was(tmp_path):
    source = (TESTS.parent / "bench" / "test_gpu_dense.py").read_text()
    call = 'cb.dense_forward(a, w, b, "relu", out=out)'
    assert call in source
    (tmp_path / "test_gpu_dense.py").write_text(source.replace(call, call.replace("out=out", "output=out")))
    done = pytest_run("-p", "cuda_on_cpu.rehearsal", "-k", "test_forward_4096_relu",
                      str(tmp_path / "test_gpu_dense.py"), cwd=TESTS.parent / "bench")
    found = counts(done.stdout)
    assert done.returncode == 1 and found.get("failed") == 1 and not found.get("passed"), done.stdout[-3000:]
    assert "unexpected keyword argument 'output'" in done.stdout


@pytest.mark.skipif(shutil.which(harness.CXX) is None, reason=f"no C++ compiler ({harness.CXX})")
def test_the_racecheck_run_launches_every_kernel_family_and_pipeline_wrap_of_the_reduced_run(cb, monkeypatch):
    """bench/sanitizer_driver.py --reduced-racecheck drops the largest shape from the tensor-core
    precisions (racecheck's minute): never a kernel, nor a tensor-core dW whose split of the batch
    runs more k tiles than the cp.async ring has stages. Launches are recorded, not run."""
    driver = load("sanitizer_driver")
    launched = []
    monkeypatch.setattr(cb._Launch, "__call__", lambda self, grid, block, args, **kwargs: launched.append(
        (self.function.kernel.name, grid, args)))

    def drive(coverage) -> set[str]:
        launched.clear()
        driver.drive_every_precision(cb, lambda *shape: cb.zeros(shape), coverage)
        return kernel_families(name for name, _, _ in launched)

    assert drive(driver.REDUCED_RACECHECK) == drive(driver.REDUCED)
    drive(driver.REDUCED_RACECHECK)
    tensor_core_dw = [(name, grid[2], int(args[8]) // (cb.BF16_BK if "bf16" in name else cb.TF32_BK))
                      for name, grid, args in launched if name.startswith(("dense_dw_tf32", "dense_dw_bf16"))]
    wrapping = {name for name, splits, k_tiles in tensor_core_dw if splits > 1 and k_tiles > cb.TF32_STAGES}
    assert tensor_core_dw and wrapping == {name for name, *_ in tensor_core_dw}
    assert driver.REDUCED_RACECHECK._replace(tensor_core_dense=None) == driver.REDUCED
