"""The scripts of bench/gpu_check.sh, on the CPU: the record writer (bench/gpu_summary.py), the
benchmark builders (bench/test_gpu_dense.py) and the sanitizer driver (bench/sanitizer_driver.py).

The summary writer is fed fabricated inputs in the formats the GPU run produces: pytest
--junitxml reports, compute-sanitizer logs, a pytest-benchmark JSON. The benchmark module's
step builders and the sanitizer driver's calls run once on tiny shapes with the NumPy
backend (which implements the same kernel contract), NumPy and PyTorch's CPU build.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import types
import warnings
from pathlib import Path

import numpy as np
import pytest

from cuda_on_cpu import harness
import gpubp as gb
from gpubp import backends
from gpubp._driver import cuda_device_count
from gpubp.backends import numpy_backend

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def load(name: str):
    """A bench/ script as a module; bench/ is on the path while it loads, as when it runs as a
    script, since the scripts import their siblings (gpu_summary, test_gpu_dense). It is in
    sys.modules as ``bench_<name>`` (dataclasses look their module up there)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


H200_SMS = 132


def benchmark_layers() -> list[tuple[str, int, int, int]]:
    """(workload, in, out, batch) of every dense layer the GPU benchmarks train or time
    (bench/test_gpu_dense.py: the train steps, the kernel-level MLPs and single layers, the
    frozen-backbone model), for the tests that check their launches fill an H200."""
    dense = load("test_gpu_dense")
    workloads = {**dense.STEP_WORKLOADS, **dense.MLPS, **dense.SINGLE_LAYERS, "frozen": dense.FROZEN_MODEL}
    return [(name, n_in, n_out, batch) for name, (widths, batch) in workloads.items()
            for n_in, n_out in zip(widths[:-1], widths[1:])]


@pytest.fixture(scope="module")
def gs():
    return load("gpu_summary")


@pytest.fixture(scope="module")
def dense():
    return load("test_gpu_dense")


# ----------------------------------------------------------------------------- kernels_sha256 and commit


def test_kernels_sha256_hashes_cu_and_cuh_bytes_in_sorted_path_order(gs, tmp_path):
    kernels = tmp_path / "kernels"
    (kernels / "sub").mkdir(parents=True)
    files = {"b.cu": b"second", "a.cuh": b"first", "c.cu": b"third"}
    for name, data in files.items():
        (kernels / name).write_bytes(data)
    (kernels / "notes.txt").write_bytes(b"not a kernel")
    (kernels / "sub" / "d.cu").write_bytes(b"not at the top level")
    assert gs.kernels_sha256(tmp_path) == hashlib.sha256(b"firstsecondthird").hexdigest()


def test_kernels_sha256_of_the_shipped_kernels_changes_with_any_byte(gs, tmp_path):
    shutil.copytree(ROOT / "kernels", tmp_path / "kernels")
    assert gs.kernels_sha256(tmp_path) == gs.kernels_sha256(ROOT)
    source = tmp_path / "kernels" / "activations.cuh"
    source.write_bytes(source.read_bytes() + b" ")
    assert gs.kernels_sha256(tmp_path) != gs.kernels_sha256(ROOT)


def git_in(folder: Path):
    """``git`` run in ``folder`` with an identity for commits; returns its stdout."""
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}

    def git(*args):
        return subprocess.run(["git", *args], cwd=folder, env=env, check=True, capture_output=True,
                              text=True).stdout.strip()

    return git


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_commit_is_heads_sha_marked_dirty_when_a_tracked_file_changed(gs, tmp_path):
    git = git_in(tmp_path)
    git("init", "-q")
    (tmp_path / "f.txt").write_text("a")
    git("add", "f.txt")
    git("commit", "-qm", "one")
    sha = git("rev-parse", "HEAD")
    (tmp_path / "untracked.txt").write_text("b")
    assert gs.git_commit(tmp_path) == sha
    (tmp_path / "f.txt").write_text("changed")
    assert gs.git_commit(tmp_path) == sha + "-dirty"


def test_commit_is_the_environments_then_gits_then_the_archives_record_then_unknown(gs, tmp_path, monkeypatch):
    monkeypatch.delenv(gs.COMMIT_ENV, raising=False)
    (tmp_path / "bench").mkdir()
    record = tmp_path / gs.COMMIT_FILE
    record.write_text("$Format:%H$\n")  # as in a git work tree: not substituted
    assert gs.source_commit(tmp_path) == "unknown"
    record.write_text("ab" * 20 + "\n")  # as git archive leaves it
    assert gs.source_commit(tmp_path) == "ab" * 20
    monkeypatch.setattr(gs, "git_commit", lambda root: "cd" * 20)
    assert gs.source_commit(tmp_path) == "ab" * 20  # no .git here: git is not asked
    (tmp_path / ".git").mkdir()
    assert gs.source_commit(tmp_path) == "cd" * 20
    monkeypatch.setenv(gs.COMMIT_ENV, "ef" * 20)
    assert gs.source_commit(tmp_path) == "ef" * 20


def test_commit_is_unknown_where_git_fails(gs, tmp_path, monkeypatch):
    monkeypatch.delenv(gs.COMMIT_ENV, raising=False)
    (tmp_path / ".git").mkdir()  # not a repository git can read
    assert gs.source_commit(tmp_path) == "unknown"


def test_tree_sha256_hashes_each_source_files_path_and_bytes_in_sorted_order(gs, tmp_path):
    for name, data in {"gpubp/b.py": b"2", "gpubp/a.py": b"1", "kernels/k.cu": b"3", "bench/x.sh": b"4",
                       "pyproject.toml": b"5", "gpubp/__pycache__/a.cpython-311.pyc": b"cache", "bench/results/r.json": b"6",
                       "bench/notes.md": b"not source", "tests/.pytest_cache/v": b"cache"}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    listed = ["bench/x.sh", "gpubp/a.py", "gpubp/b.py", "kernels/k.cu", "pyproject.toml"]
    assert gs.tree_files(tmp_path) == listed
    lines = "".join(f"{hashlib.sha256((tmp_path / p).read_bytes()).hexdigest()}  {p}\n" for p in listed)
    assert gs.tree_sha256(tmp_path) == hashlib.sha256(lines.encode()).hexdigest()  # sha256sum's lines, hashed
    (tmp_path / "gpubp" / "a.py").rename(tmp_path / "gpubp" / "c.py")  # the same bytes elsewhere: another tree
    assert gs.tree_sha256(tmp_path) != hashlib.sha256(lines.encode()).hexdigest()


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs this git checkout")
def test_tree_sha256_of_this_checkout_is_that_of_the_files_git_would_copy(gs, tmp_path, capsys):
    """What a GPU machine is sent (tracked files and untracked ones git does not ignore) hashes
    as this checkout does: the caches and builds git ignores here are left out."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for path in filter(None, listed):
        if (ROOT / path).is_file():
            (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ROOT / path, tmp_path / path)
    assert gs.tree_files(tmp_path) == gs.tree_files(ROOT)
    assert gs.tree_sha256(tmp_path) == gs.tree_sha256(ROOT)
    gs.main(["--tree-sha256", str(tmp_path)])
    assert capsys.readouterr().out == gs.tree_sha256(ROOT) + "\n"


def copy_for_the_summary(destination: Path) -> None:
    """What bench/gpu_summary.py reads of the project: itself, kernels/ and the commit record, as
    a work tree holds it (this copy of the project may itself come from git archive)."""
    (destination / "bench").mkdir(parents=True)
    shutil.copy(BENCH / "gpu_summary.py", destination / "bench" / "gpu_summary.py")
    (destination / "bench" / "commit.txt").write_text("$Format:%H$\n")
    shutil.copytree(ROOT / "kernels", destination / "kernels")


def run_summary(copy: Path, env: dict) -> dict:
    done = subprocess.run([sys.executable, str(copy / "bench" / "gpu_summary.py"), "--device", "Fake GPU",
                           "--out-dir", str(copy / "out")], cwd=copy, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads((copy / "out" / "gpu_summary.json").read_text())


def test_the_summary_runs_in_a_copy_without_git_history(gs, tmp_path):
    copy = tmp_path / "copy"
    copy_for_the_summary(copy)
    env = {k: v for k, v in os.environ.items() if k != gs.COMMIT_ENV}
    data = run_summary(copy, env)
    assert data["commit"] == "unknown"
    assert data["kernels_sha256"] == gs.kernels_sha256()
    assert data["tree_sha256"] == gs.tree_sha256(copy)  # names the source when the commit cannot
    assert run_summary(copy, {**env, gs.COMMIT_ENV: "ab" * 20})["commit"] == "ab" * 20


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_a_git_archive_of_the_project_records_its_commit_for_the_summary(gs, tmp_path):
    repo = tmp_path / "repo"
    copy_for_the_summary(repo)
    shutil.copy(ROOT / ".gitattributes", repo / ".gitattributes")
    git = git_in(repo)
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "one")
    git("archive", "--format=tar", "-o", str(tmp_path / "release.tar"), "HEAD")
    with tarfile.open(tmp_path / "release.tar") as release:
        release.extractall(tmp_path / "release", filter="data")
    env = {k: v for k, v in os.environ.items() if k != gs.COMMIT_ENV}
    assert run_summary(tmp_path / "release", env)["commit"] == git("rev-parse", "HEAD")


# ----------------------------------------------------------------------------- test counts

JUNIT_GPU = """<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests"><testsuite name="pytest"
errors="0" failures="1" skipped="2" tests="20" time="3.1"><testcase classname="t" name="a"/></testsuite></testsuites>"""
JUNIT_REST = """<?xml version="1.0" encoding="utf-8"?><testsuite name="pytest" errors="1" failures="0"
skipped="0" tests="7" time="1.0"><testcase classname="t" name="b"/></testsuite>"""


def test_test_counts_sum_junit_reports_and_count_errors_as_failures(gs, tmp_path):
    (tmp_path / "gpu.xml").write_text(JUNIT_GPU)
    (tmp_path / "rest.xml").write_text(JUNIT_REST)
    counts = gs.junit_counts([tmp_path / "gpu.xml", tmp_path / "rest.xml"])
    assert counts == {"passed": 17 + 6, "failed": 1 + 1, "skipped": 2}


def test_test_counts_are_null_without_a_report_not_zero(gs, tmp_path):
    assert gs.junit_counts([]) is None
    gs.main(["--device", "Fake GPU", "--out-dir", str(tmp_path)])
    assert json.loads((tmp_path / "gpu_summary.json").read_text())["tests"] is None
    assert "Tests: no junit report" in (tmp_path / "Fake_GPU.md").read_text()


def test_test_counts_read_pytests_own_junit_report(gs, tmp_path):
    (tmp_path / "test_three.py").write_text(
        "import pytest\n"
        "def test_ok(): pass\n"
        "def test_bad(): assert False\n"
        "@pytest.mark.skip(reason='x')\n"
        "def test_skipped(): pass\n"
    )
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    f"--junitxml={tmp_path / 'r.xml'}", str(tmp_path / "test_three.py")],
                   cwd=tmp_path, capture_output=True)
    assert gs.junit_counts([tmp_path / "r.xml"]) == {"passed": 1, "failed": 1, "skipped": 1}


# ----------------------------------------------------------------------------- sanitizer logs

CLEAN = """========= COMPUTE-SANITIZER
sanitizer driver: every cupy kernel ran
sanitizer driver: every numba kernel ran
========= ERROR SUMMARY: 0 errors
"""
RACECHECK_CLEAN = """========= COMPUTE-SANITIZER
sanitizer driver: every cupy kernel ran
========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)
"""
MEMCHECK_ERROR = """========= COMPUTE-SANITIZER
========= Invalid __global__ read of size 16 bytes
=========     at dense_fwd_relu_64x64+0x1a30
=========     by thread (3,0,0) in block (0,1,0)
=========     Address 0x7f3a00000204 is misaligned
=========
========= Invalid __global__ read of size 16 bytes
=========     at dense_fwd_relu_64x64+0x1a30
========= ERROR SUMMARY: 2 errors
"""
RACECHECK_ERROR = """========= COMPUTE-SANITIZER
========= Error: Race reported between Write access at dense_dw_kernel+0x4c0
=========     and Read access at dense_dw_kernel+0x610 [256 hazards]
=========
sanitizer driver: every numba kernel ran
========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)
"""
SYNCCHECK_ERROR = """========= COMPUTE-SANITIZER
========= Barrier error detected. Divergent thread(s) in block
=========     at ce_fwd_bwd_i64+0x2f0
========= ERROR SUMMARY: 1 error
"""
CUT_OFF_LOG = """========= COMPUTE-SANITIZER
sanitizer driver: cupy dense fp32 (37, 29, 23) at 0.4 s
sanitizer driver: cupy dense fp32 (1500, 77, 1500) at 3.1 s
Traceback (most recent call last):
KeyboardInterrupt
========= Target application returned an error
========= ERROR SUMMARY: 0 errors
"""
DRIVER_CRASH = """========= COMPUTE-SANITIZER
Traceback (most recent call last):
  File "bench/sanitizer_driver.py", line 9, in <module>
RuntimeError: backend 'cupy' is not available: CuPy is not installed

========= Target application returned an error
========= ERROR SUMMARY: 0 errors
"""


@pytest.mark.parametrize("log, status, result", [
    (CLEAN, 0, "clean"),
    (RACECHECK_CLEAN, 0, "clean"),
    (MEMCHECK_ERROR, 1, "Invalid __global__ read of size 16 bytes"),
    (RACECHECK_ERROR, 1, "Error: Race reported between Write access at dense_dw_kernel+0x4c0"),
    (SYNCCHECK_ERROR, 1, "Barrier error detected. Divergent thread(s) in block"),
    (DRIVER_CRASH, 1, "exit status 1: RuntimeError: backend 'cupy' is not available: CuPy is not installed"),
    ("", 139, "exit status 139: no output"),
    (CUT_OFF_LOG, 124, "cut off before it finished, no error found; last: "
                       "sanitizer driver: cupy dense fp32 (1500, 77, 1500) at 3.1 s"),
    (CUT_OFF_LOG.replace("KeyboardInterrupt", MEMCHECK_ERROR), 124, "Invalid __global__ read of size 16 bytes"),
    # compute-sanitizer's words for a target a signal ended: the cut, not an error the kernels made
    (CUT_OFF_LOG.replace("========= Target", "========= Error: process didn't terminate successfully\n========= Target"),
     124, "cut off before it finished, no error found; last: sanitizer driver: cupy dense fp32 (1500, 77, 1500) at 3.1 s"),
    (DRIVER_CRASH.replace("========= Target", "========= Error: process didn't terminate successfully\n========= Target"),
     1, "Error: process didn't terminate successfully"),
], ids=["clean", "racecheck-clean", "memcheck", "racecheck", "synccheck", "driver-crash", "killed", "cut-off",
        "error-then-cut-off", "cut-off-signalled", "signalled-not-cut-off"])
def test_sanitizer_result_is_clean_or_the_first_error(gs, log, status, result):
    assert gs.sanitizer_result(log, status) == result


def test_a_sanitizer_log_without_a_status_reads_as_cut_off_not_as_a_crash(gs, tmp_path):
    """Its writer was stopped before the status was written (or while it was)."""
    (tmp_path / "memcheck.log").write_text(CUT_OFF_LOG)
    (tmp_path / "racecheck.log").write_text(CUT_OFF_LOG)
    (tmp_path / "racecheck.status").write_text("")
    results = gs.sanitizer_results(tmp_path)
    assert results["memcheck"] == results["racecheck"] == gs.sanitizer_result(CUT_OFF_LOG, gs.CUT_OFF)


def test_sanitizer_results_read_each_tools_log_and_status_and_mark_missing_ones(gs, tmp_path):
    (tmp_path / "memcheck.log").write_text(CLEAN)
    (tmp_path / "memcheck.status").write_text("0\n")
    (tmp_path / "synccheck.log").write_text(SYNCCHECK_ERROR)
    (tmp_path / "synccheck.status").write_text("1\n")
    assert gs.sanitizer_results(tmp_path) == {
        "memcheck": "clean", "racecheck": "not run", "initcheck": "not run",
        "synccheck": "Barrier error detected. Divergent thread(s) in block",
    }


# ----------------------------------------------------------------------------- ratios


def benchmark_report(medians_ms: dict, device: str = "Fake GPU", when: str | None = None) -> dict:
    """A pytest-benchmark JSON report with one benchmark per (workload, backend), of ``device``,
    written at ``when`` (ISO 8601, as pytest-benchmark's "datetime")."""
    report = {"benchmarks": [
        {"name": f"test[{workload}-{backend}]", "group": workload,
         "stats": {"median": ms / 1e3, "mean": 2 * ms / 1e3, "min": ms / 2e3},
         "extra_info": {"workload": workload, "backend": backend, "device": device}}
        for (workload, backend), ms in medians_ms.items()
    ]}
    if when is not None:
        report["datetime"] = when
    return report


def all_ratio_benchmarks(gs) -> dict:
    tf32, bf16 = (gs.GEMM_4096.format(precision=p, gemm="forward") for p in ("tf32", "bf16"))
    return {
        (gs.FWD_4096, "cublas-gemm"): 3.0, (gs.FWD_4096, "cublas-unfused"): 4.0, (gs.FWD_4096, "gpubp-cupy"): 2.0,
        (tf32, "cublas-tf32"): 1.0, (tf32, "gpubp-cupy-tf32"): 1.25, (bf16, "cublas-bf16"): 0.5,
        (bf16, "gpubp-cupy-bf16"): 1.0,
        (gs.STEP_1024, "torch"): 8.0, (gs.STEP_1024, "gpubp-cupy"): 4.0, (gs.STEP_1024, "gpubp-numba"): 16.0,
        (gs.STEP_1024, "torch-compile"): 5.0, (gs.STEP_1024, "torch-bf16"): 6.0, (gs.STEP_1024, "gpubp-cupy-bf16"): 2.0,
        (gs.STEP_MLP64, "torch"): 5.0, (gs.STEP_MLP64, "gpubp-cupy"): 10.0,
        (gs.STEP_MLP64, "torch-compile"): 4.0, (gs.STEP_MLP64, "gpubp-cupy-per-layer"): 20.0,
        (gs.STEP_MLP64, "torch-bf16"): 6.0, (gs.STEP_MLP64, "gpubp-cupy-bf16"): 1.0,
        (gs.FROZEN_STEP, "gpubp-cupy"): 1.1, (gs.FROZEN_FORWARD, "gpubp-cupy"): 1.0,
        (gs.STEP_B64, "torch"): 0.3, (gs.STEP_B64, "gpubp-cupy"): 0.4, (gs.STEP_B64, "gpubp-cupy-graph"): 0.1,
    }


def test_speed_ratios_are_baseline_over_gpubp_and_the_frozen_ratio_is_a_cost(gs):
    medians = gs.benchmark_medians(benchmark_report(all_ratio_benchmarks(gs)))
    assert gs.ratios(medians) == {
        "fwd_4096_fp32_vs_cublas": 1.5,  # gpubp 2 ms, cuBLAS's bare SGEMM 3 ms: gpubp faster
        "fwd_4096_fp32_vs_cublas_unfused": 2.0,  # gpubp 2 ms, SGEMM + bias + relu 4 ms
        "fwd_4096_tf32_vs_cublas": 0.8,  # gpubp 1.25 ms, cuBLAS TF32 1 ms
        "fwd_4096_bf16_vs_cublas": 0.5,  # gpubp 1 ms, bf16 autocast matmul 0.5 ms
        "step_1024_vs_torch_eager": 2.0,  # gpubp 4 ms, torch 8 ms
        "step_1024_vs_torch_compile": 1.25,  # gpubp 4 ms, torch.compile 5 ms
        "step_1024_bf16_vs_torch_eager": 3.0,  # gpubp bf16 2 ms, torch bf16 autocast 6 ms
        "mlp64_step_vs_torch_eager": 0.5,  # gpubp 10 ms, torch 5 ms: torch faster
        "mlp64_step_vs_torch_compile": 0.4,  # gpubp 10 ms, torch.compile 4 ms
        "mlp64_step_fused_vs_per_layer": 2.0,  # fused 10 ms, per-layer 20 ms
        "mlp64_step_bf16_vs_torch_eager": 6.0,  # gpubp bf16 1 ms, torch bf16 autocast 6 ms
        "numba_vs_cupy_1024": 0.25,  # cupy 4 ms, numba 16 ms: cupy faster
        "frozen_step_vs_forward": 1.1,  # frozen step 1.1 ms over a 1.0 ms forward
        "step_b64_graph_vs_torch_eager": 3.0,  # replayed graph 0.1 ms, torch 0.3 ms
        "step_b64_graph_vs_eager": 4.0,  # replayed 0.1 ms, eager 0.4 ms
    }


def test_ratios_use_the_median_and_a_missing_benchmark_gives_null(gs):
    times = all_ratio_benchmarks(gs)
    del times[(gs.STEP_1024, "torch")]
    report = benchmark_report(times)
    report["benchmarks"].append({"name": "unnamed", "stats": {"median": 1.0}, "extra_info": {}})
    ratios = gs.ratios(gs.benchmark_medians(report))
    assert ratios["step_1024_vs_torch_eager"] is None
    assert ratios["fwd_4096_fp32_vs_cublas"] == 1.5  # the means would also give 1.5, the mins too; medians read


def test_launch_counts_come_from_the_step_benchmarks_that_counted_them(gs):
    report = benchmark_report({("step", "torch"): 1.0, ("step", "gpubp-cupy-graph"): 1.0, ("forward", "gpubp-cupy"): 1.0})
    for bench, (kernels, host) in zip(report["benchmarks"], [(40, 40), (22, 1)]):
        bench["extra_info"].update(kernels_per_step=kernels, host_launches_per_step=host)
    assert gs.launches_per_step(report) == {"step | gpubp-cupy-graph": {"kernels": 22, "host_launches": 1},
                                            "step | torch": {"kernels": 40, "host_launches": 40}}
    data = gs.summary(device="d", date="2026-11-23", commit="c", kernels="k",
                      tests={"passed": 1, "failed": 0, "skipped": 0}, sanitizer={},
                      medians=gs.benchmark_medians(report), launches=gs.launches_per_step(report))
    assert "| step | gpubp-cupy-graph | 22 | 1 |" in gs.markdown(data)


def test_reports_of_separate_runs_merge_and_a_missing_one_is_skipped(gs, tmp_path):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps(benchmark_report({("w", "torch"): 2.0, ("w", "gpubp-cupy"): 1.0})))
    second.write_text(json.dumps(benchmark_report({("w", "gpubp-cupy"): 0.5, ("v", "torch"): 3.0})))
    merged = gs.merge_reports([first, tmp_path / "missing.json", second])
    assert gs.timings_ms(gs.benchmark_medians(merged)) == {"v | torch": 3.0, "w | gpubp-cupy": 0.5, "w | torch": 2.0}


def test_timings_are_median_milliseconds_per_workload_and_backend(gs):
    medians = gs.benchmark_medians(benchmark_report({("w", "gpubp-cupy"): 1.25, ("w", "torch"): 2.5}))
    assert gs.timings_ms(medians) == {"w | gpubp-cupy": 1.25, "w | torch": 2.5}


def test_the_summary_takes_its_devices_benchmarks_and_the_newest_report_of_each_and_says_so(gs, tmp_path):
    """Stages may run on separate machines, and a part of an older run may lie in the check
    folder: a ratio must not divide one GPU's time by another's, nor take a stale time because
    its file's name sorts later."""
    h200, h100 = "NVIDIA H200", "NVIDIA H100 80GB HBM3"
    fresh = tmp_path / "bench_a_full_run.json"
    fresh.write_text(json.dumps(benchmark_report({(gs.STEP_1024, "torch"): 2.0, (gs.STEP_1024, "gpubp-cupy"): 1.0},
                                                 h200, "2030-01-02T10:00:00+00:00")))
    stale = tmp_path / "bench_b_train_step_part.json"  # named after the fresh one, written before it
    stale.write_text(json.dumps(benchmark_report({(gs.STEP_1024, "gpubp-cupy"): 4.0}, h200, "2030-01-01T10:00:00+00:00")))
    other = tmp_path / "bench_c_other_gpu.json"
    other.write_text(json.dumps(benchmark_report({(gs.STEP_1024, "torch"): 3.0, (gs.FWD_4096, "cublas-gemm"): 1.0},
                                                 h100, "2030-01-03T10:00:00+00:00")))
    for order in ([fresh, stale, other], [other, stale, fresh]):
        out = tmp_path / "out"
        gs.main(["--device", h200, *(a for path in order for a in ("--benchmark", str(path))), "--out-dir", str(out),
                 "--kernel-model", str(tmp_path / "none.json")])
        data = json.loads((out / "gpu_summary.json").read_text())
        assert data["ratios"]["step_1024_vs_torch_eager"] == 2.0
        assert data["timings_ms"] == {f"{gs.STEP_1024} | gpubp-cupy": 1.0, f"{gs.STEP_1024} | torch": 2.0}
        assert data["benchmarks_of_other_devices"] == {h100: 2}
        conflict = data["benchmark_conflicts"][f"{gs.STEP_1024} | gpubp-cupy"]
        assert sorted((c["datetime"], c["median_ms"], c["kept"]) for c in conflict) == [
            ("2030-01-01T10:00:00+00:00", 4.0, False), ("2030-01-02T10:00:00+00:00", 1.0, True)]
        table = (out / "NVIDIA_H200.md").read_text()
        assert f"Benchmarks of other devices, left out: {h100} (2)." in table
        assert (f"- {gs.STEP_1024} | gpubp-cupy: " in table and "1.000 ms at 2030-01-02T10:00:00+00:00 (kept)" in table
                and "4.000 ms at 2030-01-01T10:00:00+00:00" in table)


def test_the_summary_records_each_goal_and_whether_it_is_met(gs):
    times = all_ratio_benchmarks(gs)
    del times[(gs.STEP_1024, "gpubp-numba")]
    data = gs.summary(device="d", date="2026-11-23", commit="c", kernels="k", tests=None, sanitizer={},
                      medians=gs.benchmark_medians(benchmark_report(times)))
    assert data["goals"] == {
        "fwd_4096_fp32_vs_cublas": {"comparison": ">=", "threshold": 0.9, "measured": 1.5, "met": True},
        "step_1024_vs_torch_eager": {"comparison": ">=", "threshold": 1.2, "measured": 2.0, "met": True},
        "mlp64_step_vs_torch_eager": {"comparison": ">=", "threshold": 3.0, "measured": 0.5, "met": False},
        "step_b64_graph_vs_torch_eager": {"comparison": ">=", "threshold": 2.0, "measured": 3.0, "met": True},
        "numba_vs_cupy_1024": {"comparison": ">=", "threshold": 0.5, "measured": None, "met": None},
        "fwd_4096_tf32_vs_cublas": {"comparison": ">=", "threshold": 0.7, "measured": 0.8, "met": True},
        "fwd_4096_bf16_vs_cublas": {"comparison": ">=", "threshold": 0.6, "measured": 0.5, "met": False},
        "step_1024_bf16_vs_torch_eager": {"comparison": ">=", "threshold": 1.2, "measured": 3.0, "met": True},
        "frozen_step_vs_forward": {"comparison": "<=", "threshold": 1.1, "measured": 1.1, "met": True},
    }
    table = gs.markdown(data)
    assert "| numba_vs_cupy_1024 | >= 0.50 | missing | not measured |" in table
    assert "| mlp64_step_vs_torch_eager | >= 3.00 | 0.50x | no |" in table
    assert "| frozen_step_vs_forward | <= 1.10 | 1.10x | yes |" in table


def test_the_summary_records_each_timings_rounds_spread_and_dtype_and_says_what_a_time_is(gs):
    report = benchmark_report({(gs.STEP_1024, "gpubp-cupy-bf16"): 2.0, (gs.FWD_4096, "gpubp-cupy"): 1.0})
    report["benchmarks"][0]["stats"].update(rounds=5, iqr=0.0001, min=0.0019, max=0.0025)
    report["benchmarks"][0]["extra_info"]["dtype"] = "bf16"
    data = gs.summary(device="d", date="2026-11-23", commit="c", kernels="k", tests=None, sanitizer={},
                      medians=gs.benchmark_medians(report), stats=gs.timing_stats(report))
    assert data["timing_stats"] == {
        f"{gs.FWD_4096} | gpubp-cupy": {"dtype": None, "rounds": None, "iqr_ms": None, "min_ms": 0.5, "max_ms": None},
        f"{gs.STEP_1024} | gpubp-cupy-bf16": {"dtype": "bf16", "rounds": 5, "iqr_ms": 0.1, "min_ms": 1.9, "max_ms": 2.5}}
    table = gs.markdown(data)
    assert f"| {gs.STEP_1024} | gpubp-cupy-bf16 | bf16 | 2.000 | 0.100 | 1.900-2.500 | 5 |" in table
    assert f"| {gs.FWD_4096} | gpubp-cupy | ? | 1.000 | ? | 0.500-? | ? |" in table
    # Not "fp32, TF32 off" over rows in tf32 and bf16; and the kernels' rows are not device time.
    assert "fp32, TF32 off;" not in table
    assert "float32 with TF32 off unless it reads tf32 or bf16" in table
    assert "host wall clock per call" in table and "Python's dispatch and the launches are in it" in table
    assert "`kernels ...` rows too: the dense kernels' calls without a model, not device time" in table


def test_the_tables_refuse_the_benchmarks_of_several_devices(gs, tmp_path):
    """bench/results keeps every device's JSON: one table with one device in its title must not
    take cells from another's file."""
    step = "fused step 64x4@2^17"
    for name, device, ms in (("NVIDIA_H100_80GB_HBM3_fused.json", "NVIDIA H100 80GB HBM3", 1.0),
                             ("NVIDIA_H200_fused.json", "NVIDIA H200", 0.8)):
        (tmp_path / name).write_text(json.dumps(benchmark_report({(step, "gpubp-fused"): ms, (step, "torch"): 5 * ms},
                                                                 device)))
    paths = [str(p) for p in sorted(tmp_path.glob("*_fused*.json"))]
    assert load("fused_table").main(paths) == 2
    with pytest.raises(SystemExit, match=r"splitk_table.py: the benchmarks are of 2 devices \(NVIDIA H100 80GB HBM3, "
                                         r"NVIDIA H200\)"):
        load("splitk_table").main(paths)
    with pytest.raises(ValueError, match="give the files of one"):
        gs.merge_reports([Path(p) for p in paths])


def test_the_tables_take_the_newest_file_of_a_benchmark_in_several(gs, tmp_path):
    step = "fused step 64x4@2^17"
    (tmp_path / "a_new.json").write_text(json.dumps(benchmark_report({(step, "torch"): 2.0}, when="2030-01-02T00:00:00")))
    (tmp_path / "b_old.json").write_text(json.dumps(benchmark_report({(step, "torch"): 9.0}, when="2030-01-01T00:00:00")))
    merged = gs.merge_reports(sorted(tmp_path.glob("*.json")))
    assert gs.benchmark_medians(merged) == {(step, "torch"): 0.002}


# ----------------------------------------------------------------------------- schema and files


def test_summary_has_exactly_the_issues_schema(gs):
    data = gs.summary(device="NVIDIA H100 80GB HBM3", date="2026-11-23", commit="ab" * 20, kernels="cd" * 32,
                      tests={"passed": 3, "failed": 0, "skipped": 1},
                      sanitizer=dict.fromkeys(gs.SANITIZER_TOOLS, "clean"),
                      medians=gs.benchmark_medians(benchmark_report(all_ratio_benchmarks(gs))))
    assert list(data) == ["device", "date", "commit", "kernels_sha256", "tests", "sanitizer", "ratios", "timings_ms",
                          "launches_per_step", "tree_sha256", "goals", "timing_stats", "benchmark_conflicts",
                          "benchmarks_of_other_devices", "benchmarks_recovered"]
    assert set(data["tests"]) == {"passed", "failed", "skipped"}
    assert list(data["sanitizer"]) == ["memcheck", "racecheck", "initcheck", "synccheck"]
    assert set(data["ratios"]) >= {"fwd_4096_fp32_vs_cublas", "step_1024_vs_torch_eager", "mlp64_step_vs_torch_eager",
                                   "numba_vs_cupy_1024", "frozen_step_vs_forward"}
    assert all(isinstance(v, float) for v in data["ratios"].values())
    assert json.loads(json.dumps(data)) == data


def test_main_writes_the_json_and_the_devices_markdown(gs, tmp_path, monkeypatch):
    monkeypatch.setenv(gs.COMMIT_ENV, "f" * 40)
    (tmp_path / "gpu.xml").write_text(JUNIT_GPU)
    logs = tmp_path / "logs"
    logs.mkdir()
    for tool in gs.SANITIZER_TOOLS:
        (logs / f"{tool}.log").write_text(CLEAN)
        (logs / f"{tool}.status").write_text("0")
    (tmp_path / "bench.json").write_text(json.dumps(benchmark_report(all_ratio_benchmarks(gs), "NVIDIA H100 80GB HBM3")))
    out = tmp_path / "results"
    gs.main(["--device", "NVIDIA H100 80GB HBM3", "--junit", str(tmp_path / "gpu.xml"), "--sanitizer-dir", str(logs),
             "--benchmark", str(tmp_path / "bench.json"), "--out-dir", str(out)])
    data = json.loads((out / "gpu_summary.json").read_text())
    assert data["device"] == "NVIDIA H100 80GB HBM3"
    assert data["commit"] == "f" * 40
    assert data["kernels_sha256"] == gs.kernels_sha256()
    assert data["tests"] == {"passed": 17, "failed": 1, "skipped": 2}
    assert set(data["sanitizer"].values()) == {"clean"}
    assert data["ratios"]["step_1024_vs_torch_eager"] == 2.0
    assert len(data["date"]) == 10 and data["date"][4] == "-"
    table = (out / "NVIDIA_H100_80GB_HBM3.md").read_text()
    assert "| step_1024_vs_torch_eager | 2.00x |" in table
    assert "| synccheck | clean |" in table


def test_an_input_that_cannot_be_read_is_left_out_and_named_and_the_record_still_written(gs, tmp_path):
    """A step cut off mid-write leaves a truncated file; the steps after it must still publish."""
    (tmp_path / "gpu.xml").write_text(JUNIT_GPU[:90])
    (tmp_path / "rest.xml").write_text(JUNIT_REST)
    (tmp_path / "good.json").write_text(json.dumps(benchmark_report(all_ratio_benchmarks(gs))))
    (tmp_path / "cut.json").write_text('{"benchmarks": [{"name": ')
    (tmp_path / "facts.json").write_text(json.dumps(FACTS)[:50])
    out = tmp_path / "results"
    gs.main(["--device", "Fake GPU", "--junit", str(tmp_path / "gpu.xml"), "--junit", str(tmp_path / "rest.xml"),
             "--benchmark", str(tmp_path / "cut.json"), "--benchmark", str(tmp_path / "good.json"),
             "--facts", str(tmp_path / "facts.json"), "--out-dir", str(out)])
    data = json.loads((out / "gpu_summary.json").read_text())
    assert data["tests"] == {"passed": 6, "failed": 1, "skipped": 0}  # rest.xml's
    assert data["junit_error"].startswith("gpu.xml: ParseError: ")
    assert data["benchmark_error"].startswith("cut.json: JSONDecodeError: ")
    assert data["facts_error"].startswith("facts.json: JSONDecodeError: ")
    assert data["ratios"]["fwd_4096_fp32_vs_cublas"] == 1.5
    table = (out / "Fake_GPU.md").read_text()
    assert "Inputs that could not be read" in table and "- junit_error: gpu.xml: ParseError" in table


def test_facts_that_hold_no_device_give_no_bound_rather_than_asking_the_device(gs, tmp_path):
    (tmp_path / "bench.json").write_text(json.dumps(benchmark_report({(gs.FWD_4096, "gpubp-cupy"): 4.0})))
    (tmp_path / "facts.json").write_text(json.dumps({"error": "CuPy is not installed", "nvidia_smi": "smi says"}))
    (tmp_path / "model.json").write_text(json.dumps({"kernels": {}}))
    gs.main(["--device", "Fake GPU", "--benchmark", str(tmp_path / "bench.json"), "--facts", str(tmp_path / "facts.json"),
             "--kernel-model", str(tmp_path / "model.json"), "--out-dir", str(tmp_path)])
    data = json.loads((tmp_path / "gpu_summary.json").read_text())
    assert data["model_bounds"] == {"error": "ValueError: the device facts hold no device"}
    table = (tmp_path / "Fake_GPU.md").read_text()
    assert "Device facts: CuPy is not installed" in table and "smi says" in table


def test_facts_of_a_toolkit_without_nvrtc_or_headers_still_give_the_summary_and_its_files(gs, tmp_path):
    """gpubp._toolkit says (None, why) where it finds no NVRTC or headers; the report joined them as
    strings and raised, so no summary reached the results folder: the case a first contact may meet."""
    facts = {"nvrtc": [None, "cuda-pathfinder found none"], "cuda_headers": [None, "not in CUDA_HOME"],
             "versions": {"cupy": "14.2"}}
    (tmp_path / "facts.json").write_text(json.dumps(facts))
    out = tmp_path / "out"
    gs.main(["--device", "Fake GPU", "--facts", str(tmp_path / "facts.json"), "--out-dir", str(tmp_path / "check"),
             "--results-out", str(out), "--kernel-model", str(tmp_path / "no_model.json")])
    table = (out / "Fake_GPU.md").read_text()
    assert "NVRTC: not found (cuda-pathfinder found none); CUDA headers: not found (not in CUDA_HOME)." in table
    assert json.loads((out / "gpu_summary.json").read_text())["device"] == "Fake GPU"


def test_a_report_that_fails_still_writes_the_summary_json_and_carries_it(gs, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("made up")

    monkeypatch.setattr(gs, "markdown", broken)
    out = tmp_path / "out"
    gs.main(["--device", "Fake GPU", "--out-dir", str(tmp_path / "check"), "--results-out", str(out)])
    data = json.loads((out / "gpu_summary.json").read_text())
    assert data["report_error"] == "KeyError: 'made up'"
    assert "The report failed: KeyError: 'made up'" in (out / "Fake_GPU.md").read_text()


def test_the_results_folder_keeps_one_device_report_when_the_device_name_changes(gs, tmp_path):
    """A publish that could not ask the device its name writes unknown_gpu.md; the next, named,
    report replaces it, so the folder holds no more files than come back from the GPU machine."""
    out, results = tmp_path / "check", tmp_path / "results_out"
    for device in ("unknown gpu", "NVIDIA H200"):
        gs.main(["--device", device, "--out-dir", str(out), "--results-out", str(results)])
    assert sorted(path.name for path in results.glob("*.md")) == ["NVIDIA_H200.md"]


def test_the_tests_step_waits_for_xdist_to_write_its_report_before_the_kill():
    """After a SIGINT, pytest-xdist waits 10 s for a stuck worker and only then writes the junit
    report; a 10 s grace before the SIGKILL lost the report of a run with a hung kernel."""
    script = (ROOT / "bench" / "gpu_check.sh").read_text()
    assert 'if [ "$name" = tests ] && [ "$limit" -ge 80 ]; then grace=20; fi' in script
    assert " tests -v -rfEs " in script


def gpu_check(*stages, env=None):
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), *stages], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})})


def test_gpu_check_refuses_an_unknown_stage_before_running_any():
    done = gpu_check("summary", "tset")
    assert done.returncode == 2
    assert ("unknown stage 'tset'; expected some of: tests sanitize demo aot bench fused splitk finetune ncu summary"
            in done.stderr)
    assert "==== summary" not in done.stdout


def test_gpu_checks_summary_stage_reads_what_earlier_stages_left_in_the_check_folder(gs, tmp_path):
    """Stages may run in separate calls: the summary reads the check folder they wrote."""
    check, results = tmp_path / "check", tmp_path / "results"
    check.mkdir()
    (check / "device.txt").write_text("NVIDIA H100 80GB HBM3\n")
    (check / "gpu_tests.xml").write_text(JUNIT_GPU)
    for tool in gs.SANITIZER_TOOLS:
        (check / f"{tool}.log").write_text(CLEAN)
        (check / f"{tool}.status").write_text("0")
    times = all_ratio_benchmarks(gs)
    split = len(times) // 2  # as two runs of parts of the benchmark file left them
    for name, part in (("bench_a.json", dict(list(times.items())[:split])), ("bench_b.json", dict(list(times.items())[split:]))):
        (check / name).write_text(json.dumps(benchmark_report(part, "NVIDIA H100 80GB HBM3")))
    done = gpu_check("summary", env={"GPUBP_CHECK_DIR": str(check), "GPUBP_RESULTS_DIR": str(results)})
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads((results / "gpu_summary.json").read_text())
    assert data["device"] == "NVIDIA H100 80GB HBM3"
    assert data["tests"] == {"passed": 17, "failed": 1, "skipped": 2}
    assert data["ratios"]["step_1024_vs_torch_eager"] == 2.0
    assert (results / "NVIDIA_H100_80GB_HBM3.md").is_file()


def test_gpu_check_runs_first_contact_only_alone():
    done = gpu_check("first-contact", "summary")
    assert done.returncode == 2 and "first-contact runs alone" in done.stderr


# ----------------------------------------------------------------------------- gpu_check.sh first-contact
#
# The stage runs on the CPU with stand-ins for what needs a GPU: PYTHON, COMPUTE_SANITIZER and
# cmake are one fake program that logs each call, and, for the calls a rule matches, waits for a
# file (``wait_for``, up to 30 s, else fails), writes the files the real one would, prints, leaves
# a process behind holding its output (``linger``), sleeps and exits as the rule says; any other Python call (bench/gpu_summary.py, the xdist probe) runs
# for real.

FAKE_TOOL = """
import json, os, shutil, signal, sys, time
call = " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(call + "".join(f" | {name}=" + os.environ.get(name, "") for name in ENV_LOGGED) + "\\n")
for rule in json.loads(os.environ["FAKE_PLAN"]):
    if rule["match"] in call:
        waited = 0
        while rule.get("wait_for") and not os.path.exists(rule["wait_for"]):
            if waited >= 30:
                sys.exit("gave up waiting for " + rule["wait_for"])
            time.sleep(0.1)
            waited += 0.1
        for source, copy in rule.get("snapshot", {}).items():
            shutil.copy(source, copy)
        for path, text in rule.get("files", {}).items():
            open(path, "w").write(text)
        for part in rule.get("prints", [rule.get("stdout", "")]):  # a number: that many x's
            print(part if isinstance(part, str) else "x" * part, flush=True)
        if rule.get("linger") and os.fork() == 0:  # a process left behind, deaf to the step's SIGINT
            os.setsid()
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            open(rule["linger"]["pid_file"], "w").write(str(os.getpid()))
            time.sleep(rule["linger"]["seconds"])
            os._exit(0)
        time.sleep(rule.get("sleep", 0))
        sys.exit(rule.get("exit", 0))
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""
ENV_LOGGED = ("GPUBP_NVRTC_ACTIVATIONS", "PYTHONUNBUFFERED", "TEARDOWN_CUPTI")  # each call's, in the calls' log

FACTS = {"device": {"name": "Fake H200", "multiProcessorCount": 132, "totalGlobalMem": 150 * 2**30},
         "compute_capability": "90", "driver_version": 13000, "runtime_version": 13000, "nvrtc_version": [13, 0],
         "versions": {"cupy": "14.2.0"}, "nvrtc": ["/x/libnvrtc.so.13", "cuda-pathfinder, site-packages"],
         "cuda_headers": ["/x/include", "cuda-pathfinder"], "kernel_cache_files_before": 0,
         "kernel_files": {"optim.cu": {"origin": "nvrtc", "compile_and_load_seconds": 0.5, "kernels": {
             "sgd_update": {"registers": 20, "static_shared_bytes": 0, "local_bytes": 8, "max_threads_per_block": 1024}}}}}
# What the fake GPU commands do, in the order first-contact runs them.
GPU_CALLS = ["first_contact.py facts", "gpu_load_check.py nvrtc", "cmake", "gpu_load_check.py fatbin",
             "-m pytest -m gpu", "--tool memcheck", "--tool racecheck", "first_contact.py bench"]


def first_contact(gs, tmp_path, *, overrides=(), budgets=""):
    """Run ``gpu_check.sh first-contact`` with fake GPU tools; ``overrides`` are rules tried before
    the plain ones. Calls are told apart by the text of GPU_CALLS, so the test's name (in
    ``tmp_path``) must not hold "cmake". Returns (the finished process, the GPU calls made, in order, the check folder,
    the results-out folder)."""
    check, out, bin_dir = tmp_path / "check", tmp_path / "out", tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("python", "compute-sanitizer", "cmake", "nvidia-smi"):
        (bin_dir / tool).write_text(f"#!{sys.executable}\nENV_LOGGED = {ENV_LOGGED!r}\n{FAKE_TOOL}")
        (bin_dir / tool).chmod(0o755)
    fwd = benchmark_report({(gs.FWD_4096, "cublas-gemm"): 3.0, (gs.FWD_4096, "gpubp-cupy"): 2.0}, "Fake H200")
    plan = [*overrides,
            {"match": "nvidia-smi --query-gpu=compute_cap", "stdout": "9.0"},
            {"match": "import cupy", "stdout": "Fake H200"},
            {"match": "import xdist"},
            {"match": "first_contact.py facts", "files": {str(check / "facts.json"): json.dumps(FACTS)}},
            {"match": "gpu_load_check.py", "stdout": "ok  every kernel file loads"},
            {"match": "cmake"},
            {"match": "-m pytest -m gpu", "files": {str(check / "gpu_tests.xml"): JUNIT_GPU}},
            {"match": "--tool memcheck", "stdout": CLEAN},
            {"match": "--tool racecheck", "stdout": RACECHECK_CLEAN},
            {"match": "first_contact.py bench", "files": {str(check / "bench_first_contact_fwd_4096.json"): json.dumps(fwd)}}]
    log = tmp_path / "calls.log"
    done = gpu_check("first-contact", env={
        "PYTHON": str(bin_dir / "python"), "COMPUTE_SANITIZER": str(bin_dir / "compute-sanitizer"),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_LOG": str(log), "FAKE_PLAN": json.dumps(plan),
        "GPUBP_CHECK_DIR": str(check), "GPUBP_RESULTS_DIR": str(tmp_path / "results"), "GPUBP_RESULTS_OUT": str(out),
        "GPUBP_FIRST_CONTACT_BUDGETS": budgets, "GPUBP_COMMIT": "ab" * 20, "PYTHONUNBUFFERED": ""})
    calls = [next(c for c in GPU_CALLS if c in line) for line in log.read_text().splitlines()
             if any(c in line for c in GPU_CALLS)]
    calls = [c for i, c in enumerate(calls) if c not in calls[:i]]  # cmake runs thrice
    # The CMake build runs beside the facts and the NVRTC load check: any of the three may be logged first.
    return done, sorted(calls, key=lambda c: GPU_CALLS.index(c)) if set(calls[:3]) == set(GPU_CALLS[:3]) else calls, \
        check, out


def gpu_check_stage(tmp_path, stage: str, plan: list, device: str = "NVIDIA H200", env=None):
    """``gpu_check.sh <stage>`` on ``device`` (named in the check folder, as a GPU run leaves it)
    with a fake PYTHON whose calls ``plan``'s rules match (FAKE_TOOL); any other runs for real;
    ``env`` adds to the environment. Returns the finished process, the results folder and the
    calls made."""
    check, results, bin_dir = tmp_path / "check", tmp_path / "results", tmp_path / "bin"
    for folder in (check, results, bin_dir):
        folder.mkdir(exist_ok=True)
    (check / "device.txt").write_text(device + "\n")
    (bin_dir / "python").write_text(f"#!{sys.executable}\nENV_LOGGED = {ENV_LOGGED!r}\n{FAKE_TOOL}")
    (bin_dir / "python").chmod(0o755)
    log = tmp_path / "calls.log"
    done = gpu_check(stage, env={"PYTHON": str(bin_dir / "python"), "FAKE_LOG": str(log), "FAKE_PLAN": json.dumps(plan),
                                 "GPUBP_CHECK_DIR": str(check), "GPUBP_RESULTS_DIR": str(results), **(env or {})})
    return done, results, log.read_text()


def test_the_fused_and_splitk_tables_read_this_devices_files_only(gs, tmp_path):
    """bench/results keeps every device's JSON; the stages' tables glob this device's."""
    results = tmp_path / "results"
    results.mkdir()
    step, shape = "fused step 64x4@2^17", "dw split-K 4096x64x48 fp32"
    for stem, device, ms in (("NVIDIA_H100_80GB_HBM3", "NVIDIA H100 80GB HBM3", 9.0), ("NVIDIA_H200", "NVIDIA H200", 1.0)):
        (results / f"{stem}_fused.json").write_text(json.dumps(benchmark_report(
            {(step, "gpubp-fused"): ms, (step, "torch"): 2 * ms}, device)))
        splitk = splitk_report({(shape, "splits=1"): ms, (shape, "heuristic"): ms}, {"splits=1": 1, "heuristic": 2})
        for bench in splitk["benchmarks"]:
            bench["extra_info"]["device"] = device
        (results / f"{stem}_splitk.json").write_text(json.dumps(splitk))
    done, results, _ = gpu_check_stage(tmp_path, "fused", [{"match": "-m pytest bench/test_gpu_fused.py"}])
    assert done.returncode == 0, done.stdout + done.stderr
    fused = (results / "fused_mlp.md").read_text()
    assert "on NVIDIA H200" in fused and "| step 64x4@2^17 | 1.000 | 2.000 | 2.00 | - |" in fused
    done, results, _ = gpu_check_stage(tmp_path, "splitk", [{"match": "-m pytest bench/test_gpu_splitk.py"}])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| 4096x64x48 fp32 | 2 | 1.0000 | - | - | 1 | 1.0000 | 1.00 |" in (results / "splitk.md").read_text()


@pytest.mark.parametrize("report, ok", [
    ('"ID","Process ID","Kernel Name"\n"0","1","dense_fwd_128x128"\n', True),
    ("==PROF== Connected to process 1\n==ERROR== ERR_NVGPUCTRPERM - The user does not have permission to access "
     "NVIDIA GPU Performance Counters on the target device 0.\n", False),
    ("==ERROR== LibraryNotLoaded: cannot load the profiling library\n", False),
], ids=["report", "no_permission", "no_library"])
def test_the_ncu_stage_fails_where_ncu_exits_0_without_a_report(tmp_path, report, ok):
    """ncu exits 0 where it may not read the counters: its ==ERROR== lines stood in the CSV as a result."""
    check, results = tmp_path / "check", tmp_path / "results"
    check.mkdir()
    (check / "device.txt").write_text("NVIDIA H200\n")
    ncu = tmp_path / "ncu"
    ncu.write_text(f"#!/bin/sh\nprintf '%s' {shlex.quote(report)}\nexit 0\n")
    ncu.chmod(0o755)
    done = gpu_check("ncu", env={"NCU": str(ncu), "GPUBP_CHECK_DIR": str(check), "GPUBP_RESULTS_DIR": str(results)})
    assert (done.returncode == 0) == ok, done.stdout + done.stderr
    assert ("FAILED: Nsight Compute (no report" in done.stdout) != ok
    if not ok:
        assert "==ERROR==" in done.stdout


def finetune_report() -> dict:
    """bench/test_finetune.py's JSON for the cupy backend: medians of 1, 3 and 1.05 ms, minima
    half as long, means twice."""
    return {"benchmarks": [{"stats": {"min": ms / 2e3, "median": ms / 1e3, "mean": ms / 0.5e3},
                            "extra_info": {"backend": "cupy", "shape": [256, 512, 10], "batch": 512, "step": step,
                                           "device": "NVIDIA H200"}}
                           for step, ms in (("forward", 1.0), ("full", 3.0), ("frozen_backbone", 1.05))]}


def test_the_finetune_table_takes_the_median_by_default_as_the_gpu_records_other_tables_do(tmp_path, capsys):
    """It took the minimum, where bench/gpu_summary.py, fused_table.py, splitk_table.py and
    model_bounds.py take the median."""
    ratios = load("finetune_ratios")
    path = tmp_path / "finetune.json"
    path.write_text(json.dumps(finetune_report()))
    ratios.main([str(path)])
    table = capsys.readouterr().out
    assert "| forward ms (median) |" in table and "| cupy | 256x512x10 | 512 | 1.00 | 3.00 | 1.05 |" in table
    ratios.main([str(path), "--stat", "min"])
    assert "| cupy | 256x512x10 | 512 | 0.50 | 1.50 | 0.53 |" in capsys.readouterr().out


def test_the_finetune_stage_runs_the_gpu_backends_fine_tuning_benchmarks_and_tabulates_them(gs, tmp_path):
    """bench/test_finetune.py's cupy and numba steps run on a GPU only; no stage ran them."""
    json_path = tmp_path / "results" / "NVIDIA_H200_finetune.json"
    done, results, calls = gpu_check_stage(tmp_path, "finetune", [
        {"match": "-m pytest bench/test_finetune.py", "files": {str(json_path): json.dumps(finetune_report())}}])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "-m pytest bench/test_finetune.py -q -k (cupy or numba) --benchmark-json " + str(json_path) in calls
    table = (results / "finetune_NVIDIA_H200.md").read_text()
    assert "| cupy | 256x512x10 | 512 | 1.00 | 3.00 | 1.05 |" in table  # the medians
    script = (BENCH / "gpu_check.sh").read_text()
    assert "finetune" not in script[script.index("FIRST_CONTACT_STEPS=("):].split("\n")[0]  # not a first-contact step
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "then `bench fused splitk finetune ncu`" in readme
    assert "The `finetune` stage runs `bench/test_finetune.py`" in readme


def test_gpu_check_has_torchs_profiler_detach_cupti_unless_the_caller_says_otherwise(tmp_path, monkeypatch):
    """The benchmarks count PyTorch's kernels with its profiler (CUPTI, through Kineto), then time
    gpubp in the same process (the mlp64 group); Kineto leaves CUPTI attached, slowing what runs
    after it, unless TEARDOWN_CUPTI=1 (PyTorch issue 144455)."""
    monkeypatch.delenv("TEARDOWN_CUPTI", raising=False)
    plan = [{"match": "-m pytest bench/test_gpu_dense.py"}]
    for caller, expected in (({}, "1"), ({"TEARDOWN_CUPTI": "0"}, "0")):
        folder = tmp_path / (caller.get("TEARDOWN_CUPTI") or "unset")
        folder.mkdir()
        done, _, calls = gpu_check_stage(folder, "bench", plan, env=caller)
        assert done.returncode == 0, done.stdout + done.stderr
        benchmarks = next(line for line in calls.splitlines() if "-m pytest bench/test_gpu_dense.py" in line)
        assert benchmarks.endswith(f" | TEARDOWN_CUPTI={expected}"), benchmarks


def test_first_contacts_tests_step_runs_the_numba_gpu_tests_and_they_exist():
    """The Numba backend's tests run in the simulator without a GPU; the ones marked numba_gpu
    (its dense kernels, the dW split, the losses, a model) are the first contact's Numba check."""
    script = (ROOT / "bench" / "gpu_check.sh").read_text()
    fc_tests = script[script.index("fc_tests() {"):]
    assert '-m "gpu or numba_gpu"' in fc_tests[:fc_tests.index("\n}")]
    marked = re.findall(r"@pytest\.mark\.numba_gpu.*\n(?:@.*\n|\s.*\n)*def (test_\w+)",
                        (ROOT / "tests" / "test_numba_backend.py").read_text())
    assert {"test_dense_forward_matches_numpy", "test_dense_backward_matches_numpy",
            "test_model_on_numba_trains_like_the_numpy_model"} <= set(marked), marked


def test_first_contact_runs_its_steps_in_order_of_value_and_carries_off_what_they_found(gs, tmp_path):
    done, calls, check, out = first_contact(gs, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert calls == GPU_CALLS
    steps = gs.read_steps(check / "first_contact_steps.tsv")
    assert [(name, result, budget) for name, result, _, budget in steps] == [
        ("facts", "ok", "100"), ("tests", "ok", "135"), ("memcheck", "ok", "55"), ("racecheck", "ok", "70"),
        ("bench", "ok", "125"), ("summary", "ok", "20")]
    # with the five publishes between steps, each under half the summary's budget and a second's grace
    assert sum(int(budget) for *_, budget in steps) + 5 * (20 // 2 + 1) <= 560
    carried = sorted(p.name for p in out.iterdir())
    assert carried == sorted(["gpu_summary.json", "Fake_H200.md", "benchmarks.json", "first_contact.log", "facts.json",
                              "gpu_tests.xml", "memcheck.log", "racecheck.log"])
    assert all(p.stat().st_size < 16_000_000 for p in out.iterdir())
    data = json.loads((out / "gpu_summary.json").read_text())
    assert data["commit"] == "ab" * 20 and data["device"] == "Fake H200" and data["tree_sha256"] == gs.tree_sha256()
    assert data["tests"] == {"passed": 17, "failed": 1, "skipped": 2} and data["tests_cut_off"] is False
    assert [(step["step"], step["result"], step["budget"]) for step in data["steps"]] == [
        ("facts", "ok", 100), ("tests", "ok", 135), ("memcheck", "ok", 55), ("racecheck", "ok", 70),
        ("bench", "ok", 125)]  # the summary's own step is recorded after it
    assert data["sanitizer"] == {"memcheck": "clean", "racecheck": "clean", "initcheck": "not run",
                                 "synccheck": "not run"}
    assert data["ratios"]["fwd_4096_fp32_vs_cublas"] == 1.5
    report = (out / "Fake_H200.md").read_text()
    assert "| bench | ok |" in report and "| optim.cu | nvrtc | 1 | 0.50 | 1 | 20 | 0 | sgd_update |" in report
    assert "==== first-contact step racecheck" in (out / "first_contact.log").read_text()
    assert "sanitizer_driver.py --reduced-racecheck cupy" in (tmp_path / "calls.log").read_text()


def test_first_contacts_tests_go_on_past_collection_errors_and_dump_a_stuck_tests_stacks(gs, tmp_path):
    done, _, _, _ = first_contact(gs, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    tests = next(line for line in (tmp_path / "calls.log").read_text().splitlines() if "-m pytest -m gpu" in line)
    assert "--continue-on-collection-errors" in tests and "-o faulthandler_timeout=60" in tests
    assert " -rfEs " in tests  # the failures and errors listed last, where the log's end shows them


def test_first_contacts_tests_and_sanitizers_load_whole_activation_sets_and_the_benchmarks_a_users_modules(gs, tmp_path):
    done, _, _, _ = first_contact(gs, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    logged = [(c, dict(field.split("=", 1) for field in line.split(" | ")[1:]))
              for line in (tmp_path / "calls.log").read_text().splitlines() for c in GPU_CALLS if c in line]
    assert {c: env["GPUBP_NVRTC_ACTIVATIONS"] for c, env in logged} == {
        **dict.fromkeys(GPU_CALLS, ""), "-m pytest -m gpu": "all", "--tool memcheck": "all", "--tool racecheck": "all"}
    # and print unbuffered, so that a step killed mid-way has everything it printed in the log
    assert {env["PYTHONUNBUFFERED"] for _, env in logged} == {"1"}


def test_a_first_contact_step_that_fails_or_runs_out_of_time_leaves_what_the_others_found(gs, tmp_path):
    snapshot = tmp_path / "while_racecheck_ran.json"
    done, calls, check, out = first_contact(gs, tmp_path, budgets="tests=8", overrides=[
        {"match": "-m pytest -m gpu", "files": {str(check := tmp_path / "check") + "/gpu_tests.xml": JUNIT_GPU},
         "sleep": 60},
        {"match": "--tool memcheck", "stdout": MEMCHECK_ERROR, "exit": 1},
        {"match": "--tool racecheck", "stdout": RACECHECK_CLEAN,
         "snapshot": {str(tmp_path / "out" / "gpu_summary.json"): str(snapshot)}}])
    assert done.returncode == 1
    assert "first-contact tests: out of time after 8 s" in done.stdout and "compute-sanitizer memcheck" in done.stdout
    assert calls == GPU_CALLS  # the steps after the failures still ran
    steps = {name: (result, int(seconds)) for name, result, seconds, _ in gs.read_steps(check / "first_contact_steps.tsv")}
    assert steps["tests"][0] == "out of time" and steps["tests"][1] <= 9  # stopped at its budget, not after 60 s
    assert steps["memcheck"][0] == "failed (exit status 1)" and steps["racecheck"][0] == "ok"
    # The summary carried off while racecheck ran already held what the steps before it found.
    earlier = json.loads(snapshot.read_text())
    assert earlier["tests"] == {"passed": 17, "failed": 1, "skipped": 2}  # what the cut-off run reported
    assert earlier["sanitizer"]["memcheck"] == "Invalid __global__ read of size 16 bytes"
    assert earlier["sanitizer"]["racecheck"] == "not run"
    final = json.loads((out / "gpu_summary.json").read_text())
    assert final["sanitizer"]["racecheck"] == "clean" and final["ratios"]["fwd_4096_fp32_vs_cublas"] == 1.5
    # The counts are the finished tests': the JSON says so, not only the report's steps table.
    assert final["tests_cut_off"] is True and final["steps"][1]["result"] == "out of time"
    assert "| tests | out of time | " in (out / "Fake_H200.md").read_text()
    assert "skipped (cut off at the step's budget: only the tests that finished)." in (out / "Fake_H200.md").read_text()


def test_a_process_a_step_left_behind_holding_the_log_does_not_hold_the_stage_past_its_end(gs, tmp_path):
    """At the end the stage waits for the log's tee to write its last lines; a leftover process (one
    stuck in a CUDA call after its step's SIGINT, say) kept tee's input open, and the wait ran to
    the caller's limit."""
    pid_file = tmp_path / "lingering.pid"
    fwd = benchmark_report({(gs.FWD_4096, "cublas-gemm"): 3.0, (gs.FWD_4096, "gpubp-cupy"): 2.0}, "Fake H200")
    started = time.monotonic()
    try:
        done, calls, check, out = first_contact(gs, tmp_path, overrides=[
            {"match": "first_contact.py bench", "linger": {"pid_file": str(pid_file), "seconds": 90},
             "files": {str(tmp_path / "check" / "bench_first_contact_fwd_4096.json"): json.dumps(fwd)}}])
        elapsed = time.monotonic() - started
    finally:
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
    assert done.returncode == 0, done.stdout + done.stderr
    assert elapsed < 60, elapsed
    assert "| summary | ok |" in (out / "Fake_H200.md").read_text() or "==== first-contact step summary" in done.stdout
    assert json.loads((out / "gpu_summary.json").read_text())["ratios"]["fwd_4096_fp32_vs_cublas"] == 1.5


CUT_OFF_AT = "sanitizer driver: cupy dense fp32 (37, 29, 23) at 0.4 s"


def test_a_sanitizer_its_budget_cuts_off_leaves_its_log_and_every_later_summary(gs, tmp_path):
    """The step's SIGINT reaches the sanitizer, tee and the shell that would write its status:
    the status reads cut off, the log keeps what was printed, and later publishes still work."""
    out = tmp_path / "out"
    done, calls, check, _ = first_contact(gs, tmp_path, budgets="memcheck=6", overrides=[
        {"match": "--tool memcheck", "stdout": CUT_OFF_AT, "sleep": 60},
        {"match": "--tool racecheck", "stdout": RACECHECK_CLEAN,
         "snapshot": {str(out / "first_contact.log"): str(tmp_path / "log_while_racecheck_ran")}}])
    assert done.returncode == 1 and calls == GPU_CALLS
    steps = {name: result for name, result, *_ in gs.read_steps(check / "first_contact_steps.tsv")}
    assert steps == {"facts": "ok", "tests": "ok", "memcheck": "out of time", "racecheck": "ok", "bench": "ok",
                     "summary": "ok"}
    assert (check / "memcheck.status").read_text().strip() == str(gs.CUT_OFF)
    final = json.loads((out / "gpu_summary.json").read_text())
    assert final["sanitizer"]["memcheck"] == f"cut off before it finished, no error found; last: {CUT_OFF_AT}"
    assert final["sanitizer"]["racecheck"] == "clean" and final["ratios"]["fwd_4096_fp32_vs_cublas"] == 1.5
    assert CUT_OFF_AT in (out / "memcheck.log").read_text()
    # The log in the results folder is written as the run prints, not copied between steps.
    assert "==== compute-sanitizer racecheck" in (tmp_path / "log_while_racecheck_ran").read_text()


def test_a_summary_writer_that_hangs_costs_little_fails_the_summary_step_and_the_raw_files_come_back(gs, tmp_path):
    started = time.monotonic()
    done, calls, check, out = first_contact(gs, tmp_path, budgets="summary=4", overrides=[
        {"match": "gpu_summary.py --device", "sleep": 60}])
    assert time.monotonic() - started < 50  # five publishes of 2 s and a summary step of 4, not of a minute
    assert done.returncode == 1 and calls == GPU_CALLS and "FAILED: first-contact summary" in done.stdout
    steps = {name: result for name, result, *_ in gs.read_steps(check / "first_contact_steps.tsv")}
    assert steps["bench"] == "ok" and steps["summary"].startswith("failed")
    assert sorted(p.name for p in out.iterdir()) == ["facts.json", "first_contact.log", "gpu_tests.xml",
                                                     "memcheck.log", "racecheck.log"]
    assert json.loads((out / "facts.json").read_text()) == FACTS
    assert (out / "gpu_tests.xml").read_text() == JUNIT_GPU and CLEAN in (out / "memcheck.log").read_text()


def test_a_raw_file_too_big_to_carry_keeps_its_start_and_end_and_the_log_its_start(gs, tmp_path):
    assert f"\nCARRY_BYTES={gs.CARRY_BYTES}\n" in (BENCH / "gpu_check.sh").read_text()
    done, _, _, out = first_contact(gs, tmp_path, overrides=[
        {"match": "--tool memcheck", "prints": ["first line", gs.CARRY_BYTES, CLEAN]}])
    assert done.returncode == 0, done.stderr[-3000:]
    kept = (out / "memcheck.log").read_text()
    assert len(kept) < gs.CARRY_BYTES and kept.startswith("first line") and kept.endswith(CLEAN + "\n")
    assert f"bytes cut here: the file had {len('first line') + gs.CARRY_BYTES + len(CLEAN) + 3} ..." in kept
    assert (out / "first_contact.log").stat().st_size == gs.CARRY_BYTES
    assert json.loads((out / "gpu_summary.json").read_text())["sanitizer"]["memcheck"] == "clean"


def test_the_fatbin_builds_lines_reach_the_log_as_they_come(gs, tmp_path):
    done, _, check, out = first_contact(gs, tmp_path, budgets="facts=8", overrides=[
        {"match": "cmake --build", "stdout": "building dense_forward.cu", "sleep": 60}])
    assert gs.read_steps(check / "first_contact_steps.tsv")[0][:2] == ("facts", "out of time")
    assert "cmake| building dense_forward.cu" in (out / "first_contact.log").read_text()


def test_first_contacts_fatbin_build_runs_beside_the_nvrtc_load_check(gs, tmp_path):
    # The NVRTC load check waits until the build has started: run one after the other, it would
    # give up after 30 s and fail the step.
    started = tmp_path / "cmake_started"
    done, calls, check, _ = first_contact(gs, tmp_path, overrides=[
        {"match": "gpu_load_check.py nvrtc", "wait_for": str(started), "stdout": "ok  nvrtc"},
        {"match": "cmake", "files": {str(started): ""}, "sleep": 1}])
    assert done.returncode == 0, done.stdout + done.stderr
    assert calls == GPU_CALLS
    assert gs.read_steps(check / "first_contact_steps.tsv")[0][:2] == ("facts", "ok")


def test_first_contacts_fatbin_build_starts_before_the_facts_and_builds_this_gpus_sass_alone(gs, tmp_path):
    # The facts wait until the build has started: started after them, as it was, the build ran
    # past the step's budget on a 2-core machine, and so did its fatbin check.
    started = tmp_path / "cmake_started"
    done, calls, check, _ = first_contact(gs, tmp_path, overrides=[
        {"match": "first_contact.py facts", "wait_for": str(started),
         "files": {str(tmp_path / "check" / "facts.json"): json.dumps(FACTS)}},
        {"match": "cmake -S", "files": {str(started): ""}}])
    assert done.returncode == 0, done.stdout + done.stderr
    assert calls == GPU_CALLS
    configure = [line for line in (tmp_path / "calls.log").read_text().splitlines() if line.startswith("cmake -S")]
    assert len(configure) == 1 and "-DGPUBP_SASS_ARCHS=90" in configure[0]
    assert gs.read_steps(check / "first_contact_steps.tsv")[0][:2] == ("facts", "ok")


def test_a_failed_fatbin_build_fails_the_facts_step_and_skips_the_fatbin_check(gs, tmp_path):
    done, calls, check, _ = first_contact(gs, tmp_path, overrides=[
        {"match": "cmake --build", "stdout": "nvcc fatal : made up here", "exit": 1}])
    assert done.returncode == 1
    assert "gpu_load_check.py fatbin" not in calls and calls[-1] == "first_contact.py bench"
    assert "nvcc fatal : made up here" in done.stdout and "FAILED: first-contact facts" in done.stdout
    steps = {name: result for name, result, *_ in gs.read_steps(check / "first_contact_steps.tsv")}
    assert steps["facts"].startswith("failed") and steps["tests"] == "ok"


def test_first_contact_refuses_a_budget_for_a_step_it_does_not_have(gs, tmp_path):
    done = gpu_check("first-contact", env={"GPUBP_FIRST_CONTACT_BUDGETS": "test=60", "GPUBP_CHECK_DIR": str(tmp_path)})
    assert done.returncode == 2 and "'test=60' is not <step>=<seconds>" in done.stderr


def test_carried_files_have_flat_names_and_a_big_one_keeps_its_start_and_end(gs, tmp_path, monkeypatch):
    monkeypatch.setattr(gs, "CARRY_BYTES", 1000)
    big = b"first line\n" + b"x" * 5000 + b"\nlast line\n"
    gs.carry(tmp_path, {"NVIDIA H200 (MIG 1g).md": b"report", "log.txt": big})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["NVIDIA_H200__MIG_1g_.md", "log.txt"]
    kept = (tmp_path / "log.txt").read_bytes()
    assert len(kept) < 1000 and kept.startswith(b"first line") and kept.endswith(b"last line\n")
    assert f"bytes cut here: the file had {len(big)} ".encode() in kept
    with pytest.raises(ValueError, match="at most 8"):
        gs.carry(tmp_path, {f"f{i}": b"" for i in range(9)})


def test_the_first_contact_benchmarks_are_the_tests_behind_their_ratios(gs):
    fc = load("first_contact")
    ids = [node for group in fc.HEADLINE for node in fc.node_ids(group)]
    listed = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *ids],
                            cwd=ROOT, capture_output=True, text=True)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert [line for line in listed.stdout.splitlines() if "::" in line] == ids
    assert len(ids) == len(set(ids))  # a benchmark an earlier group ran is not run again
    for place, (group, names) in enumerate(fc.HEADLINE.items()):
        so_far = [node for before in list(fc.HEADLINE)[:place + 1] for node in fc.node_ids(before)]
        for numerator, denominator in (gs.RATIOS[name] for name in names):
            for workload, backend in (numerator, denominator):
                assert any(node.endswith(f"-{backend}]") and workload in node or node.endswith(f"[{backend}]")
                           for node in so_far), (group, workload, backend)


def test_first_contact_measures_the_numba_goal_last_within_the_bench_steps_budget(gs):
    """numba_vs_cupy_1024 was a goal first-contact never timed. Its group compiles the Numba
    kernels in its warm-up, so it runs last (it cannot take the other groups' time) with more
    time than they have, and the bench step grew by what the facts step gave up."""
    fc = load("first_contact")
    assert list(fc.HEADLINE) == ["fwd_4096", "step_1024", "mlp64", "step_b64", "numba_1024"]
    assert fc.HEADLINE["numba_1024"] == ("numba_vs_cupy_1024",)
    assert fc.node_ids("numba_1024") == [f"{fc.DENSE_BENCHMARKS}::test_train_step[{gs.STEP_1024}-gpubp-numba]"]
    assert fc.GROUP_SECONDS["numba_1024"] > max(fc.GROUP_SECONDS[group] for group in list(fc.HEADLINE)[:-1])
    script = (BENCH / "gpu_check.sh").read_text()
    budgets = dict(re.findall(r"\[(\w+)\]=(\d+)", re.search(r"declare -A budget=\((.*)\)", script).group(1)))
    assert sum(map(int, budgets.values())) == 505 and budgets["bench"] == "125"
    # The step's SIGINT comes 10 s before its end; four groups of 15 s leave the last its 40 s.
    assert fc.group_seconds(fc.GROUP_SECONDS["numba_1024"], int(budgets["bench"]) - 10 - 4 * 15) >= 40
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "and, last, `numba_vs_cupy_1024`" in readme and "(100, 135, 55, 70, 125 and 20 s;" in readme


def test_first_contact_alternates_which_side_of_a_ratio_runs_first_in_its_fresh_process(gs):
    """The first benchmark of a pytest run meets a cold GPU and cold caches: it must not always
    be the baseline (nor always gpubp)."""
    fc = load("first_contact")
    first = []
    for group, names in fc.HEADLINE.items():
        nodes = fc.node_ids(group)
        (_, baseline), (_, gpubp) = gs.RATIOS[names[0]]
        at = [next(i for i, node in enumerate(nodes) if node.endswith((f"-{backend}]", f"[{backend}]")))
              for backend in (baseline, gpubp)] if len(nodes) > 1 else None
        first.append(None if at is None else "gpubp" if at[1] < at[0] else "baseline")
    assert first == ["baseline", "gpubp", "baseline", "gpubp", None]  # the Numba group times one benchmark


def test_first_contact_facts_keep_what_needs_no_cupy_when_cupy_cannot_reach_the_gpu(gs, tmp_path, monkeypatch):
    fc = load("first_contact")
    cb = backends.cupy_backend
    monkeypatch.setattr(cb, "unavailable_reason", lambda: "made up: cudaErrorNoDevice")
    monkeypatch.setenv(cb.AOT_ENV, str(tmp_path))  # facts points it at an empty folder; this puts it back after
    monkeypatch.setenv("CUDA_PATH", "/made/up/cuda")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.setenv("CUPY_CACHE_DIR", str(tmp_path / "empty_cache"))
    assert fc.facts(tmp_path / "facts.json") == 1
    facts = json.loads((tmp_path / "facts.json").read_text())
    assert facts["error"] == "made up: cudaErrorNoDevice"
    assert {"nvidia_smi", "tools", "versions", "nvrtc", "cuda_headers", "environment", "kernel_cache_files_before"} <= set(facts)
    assert facts["environment"]["CUDA_PATH"] == "/made/up/cuda" and facts["environment"]["CUDA_HOME"] is None
    assert set(facts["tools"]) == set(fc.TOOL_VERSIONS) and facts["versions"]["python"]
    table = "\n".join(gs.facts_markdown(facts))
    assert "Device facts: made up: cudaErrorNoDevice" in table and "CUDA_PATH=/made/up/cuda" in table
    assert "CUDA_HOME unset" in table and facts["nvidia_smi"] in table and "NVRTC: " in table


def test_first_contact_facts_record_the_hosts_kernel_and_the_cupti_teardown(monkeypatch):
    """gVisor reports Linux 4.4.0: a container runtime, which may refuse a sanitizer the device
    and lengthens launch-bound times, showed nowhere in the facts; nor did TEARDOWN_CUPTI."""
    fc = load("first_contact")
    gvisor = platform.uname_result("Linux", "runsc", "4.4.0", "#1 SMP Sun Jan 10 15:06:54 PST 2016", "x86_64")
    monkeypatch.setattr(platform, "uname", lambda: gvisor)
    monkeypatch.setenv("TEARDOWN_CUPTI", "1")
    facts = fc.host_facts()
    assert facts["uname"] == {"system": "Linux", "release": "4.4.0", "version": "#1 SMP Sun Jan 10 15:06:54 PST 2016",
                              "machine": "x86_64"}
    assert facts["environment"]["TEARDOWN_CUPTI"] == "1"
    assert json.loads(json.dumps(facts)) == facts  # as facts.json holds it


BENCHMARK_FILE = """
import time
def test_quick(benchmark):
    benchmark(lambda: None)
def test_hangs(benchmark):
    benchmark(lambda: None)
    time.sleep(60)
"""


def test_a_first_contact_benchmark_group_that_hangs_costs_its_own_time_and_keeps_what_finished(tmp_path, monkeypatch):
    fc = load("first_contact")
    (tmp_path / "test_made_up.py").write_text(BENCHMARK_FILE)
    monkeypatch.setattr(fc, "HEADLINE", {"hangs": (), "quick": ()})
    monkeypatch.setattr(fc, "node_ids", lambda group: [
        f"{tmp_path / 'test_made_up.py'}::test_quick", *([f"{tmp_path / 'test_made_up.py'}::test_hangs"] * (group == "hangs"))])
    monkeypatch.setenv("GPUBP_BENCH_GROUP_SECONDS", "8")
    # After the SIGINT, pytest-benchmark asks py-cpuinfo before it writes its JSON, which took past
    # the 10 s grace on a loaded 2-core machine with cold caches: the group was then killed and read
    # as one that wrote no JSON. The grace is not what this test is about; the hang's 60 s still is.
    monkeypatch.setattr(fc, "GROUP_GRACE", 30)
    for name in [name for name in os.environ if name.startswith("PYTEST_XDIST")]:  # pytest-benchmark is off there
        monkeypatch.delenv(name)
    started = time.monotonic()
    assert fc.bench(tmp_path) == 1
    assert time.monotonic() - started < 58  # the hang's sleep is 60 s
    steps = [line.split("\t") for line in (tmp_path / fc.STEPS_FILE).read_text().splitlines()]
    assert [(name, result, budget) for name, result, _, budget in steps] == [
        ("bench hangs", "out of time after 8 s", "8"), ("bench quick", "ok", "8")]
    # The SIGINT let pytest-benchmark write the benchmarks that finished before the hang.
    for group in ("hangs", "quick"):
        report = json.loads((tmp_path / f"bench_first_contact_{group}.json").read_text())
        assert [b["name"] for b in report["benchmarks"]][:1] == ["test_quick"]


# A group of two benchmarks of STEP_1024 (gpubp 4 ms, PyTorch 8 ms a call, on a clock of their
# own, so the times are exact) and a test whose process then dies as DEATHS says.
DYING_GROUP = """
import os, signal, time

import pytest

NOW = 0.0


def clock():
    return NOW


def timed(benchmark, backend, ms):
    def call():
        global NOW
        NOW += ms / 1e3
    benchmark.pedantic(call, rounds=3)
    benchmark.extra_info.update(workload={workload!r}, backend=backend, device="Fake GPU")


@pytest.mark.benchmark(timer=clock)
def test_gpubp(benchmark):
    timed(benchmark, "gpubp-cupy", 4.0)


@pytest.mark.benchmark(timer=clock)
def test_torch(benchmark):
    timed(benchmark, "torch", 8.0)


def test_dies(benchmark):
    {death}
"""
# A hard crash, a kill, and a hang in C code, which takes no SIGINT, killed after its grace.
DEATHS = {"exit": "os._exit(3)", "kill": "os.kill(os.getpid(), signal.SIGKILL)",
          "hang": "signal.signal(signal.SIGINT, signal.SIG_IGN)\n    time.sleep(60)"}


def dying_group(gs, folder: Path, death: str = "exit") -> Path:
    """DYING_GROUP in ``folder``, dying by ``death``: its path."""
    test = folder / "test_made_up.py"
    test.write_text(DYING_GROUP.format(workload=gs.STEP_1024, death=DEATHS[death]))
    return test


@pytest.mark.parametrize("death", DEATHS)
def test_a_first_contact_group_whose_process_dies_keeps_the_benchmarks_it_finished(gs, tmp_path, monkeypatch, death):
    """pytest-benchmark writes its JSON as the run ends: a process that died lost every benchmark
    of its group, step_1024_vs_torch_eager and numba_vs_cupy_1024 with the CuPy step's."""
    fc = load("first_contact")
    test = dying_group(gs, tmp_path, death)
    monkeypatch.setattr(fc, "HEADLINE", {"dies": ()})
    monkeypatch.setattr(fc, "node_ids", lambda group: [f"{test}::{name}" for name in ("test_gpubp", "test_torch",
                                                                                      "test_dies")])
    monkeypatch.setattr(fc, "GROUP_GRACE", 1)
    monkeypatch.setenv("GPUBP_BENCH_GROUP_SECONDS", "10")
    monkeypatch.delenv("GPUBP_STEP_SECONDS", raising=False)
    for name in [name for name in os.environ if name.startswith("PYTEST_XDIST")]:  # pytest-benchmark is off there
        monkeypatch.delenv(name)
    report, lines = tmp_path / "bench_first_contact_dies.json", tmp_path / "bench_first_contact_dies.jsonl"
    # An earlier run's files, which are not this run's results.
    report.write_text(json.dumps(benchmark_report({(gs.STEP_1024, "torch"): 100.0}, "Fake GPU")))
    lines.write_text(json.dumps(benchmark_report({(gs.STEP_1024, "gpubp-numba"): 1.0}, "Fake GPU")["benchmarks"][0]) + "\n")
    assert fc.bench(tmp_path) == 1
    assert not report.exists()
    [(name, result, _, _)] = [line.split("\t") for line in (tmp_path / fc.STEPS_FILE).read_text().splitlines()]
    assert name == "bench dies" and result.startswith("out of time after 10 s" if death == "hang" else "failed")
    assert result.endswith("; no JSON, 2 finished benchmarks in bench_first_contact_dies.jsonl")
    out = tmp_path / "results"
    gs.main(["--device", "Fake GPU", "--benchmark", str(report), "--benchmark-lines", str(lines), "--out-dir", str(out)])
    data = json.loads((out / "gpu_summary.json").read_text())
    assert data["ratios"]["step_1024_vs_torch_eager"] == 2.0
    assert data["timings_ms"] == {f"{gs.STEP_1024} | gpubp-cupy": 4.0, f"{gs.STEP_1024} | torch": 8.0}
    assert data["timing_stats"][f"{gs.STEP_1024} | torch"]["rounds"] == 3
    assert data["benchmarks_recovered"] == dict.fromkeys(data["timings_ms"], lines.name)
    table = (out / "Fake_GPU.md").read_text()
    assert "| step_1024_vs_torch_eager | 2.00x |" in table
    assert "Benchmarks recovered from the line files" in table and f"- {gs.STEP_1024} | torch: {lines.name}" in table


def run_with_benchmark_lines(test: Path, report: Path, lines: Path | None) -> subprocess.CompletedProcess:
    """pytest on ``test``'s two benchmarks with bench/benchmark_lines.py loaded, as
    bench/first_contact.py runs a group, writing ``report``; GPUBP_BENCH_LINES is ``lines``, or unset."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("PYTEST_XDIST") and name != "GPUBP_BENCH_LINES"}
    env["PYTHONPATH"] = os.pathsep.join([str(BENCH), env.get("PYTHONPATH", "")])
    if lines is not None:
        env["GPUBP_BENCH_LINES"] = str(lines)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "benchmark_lines",
                           f"{test}::test_gpubp", f"{test}::test_torch", "--benchmark-json", str(report)],
                          cwd=test.parent, env=env, capture_output=True, text=True, timeout=120)


def test_each_benchmarks_line_is_what_the_json_holds_of_it_and_when_it_was_written(gs, tmp_path):
    test, report, lines = dying_group(gs, tmp_path), tmp_path / "report.json", tmp_path / "lines.jsonl"
    done = run_with_benchmark_lines(test, report, lines)
    assert done.returncode == 0, done.stdout + done.stderr
    written = [json.loads(line) for line in lines.read_text().splitlines()]
    assert [bench.pop("datetime")[:4] for bench in written] == [json.loads(report.read_text())["datetime"][:4]] * 2
    assert written == json.loads(report.read_text())["benchmarks"]
    assert [bench["extra_info"]["backend"] for bench in written] == ["gpubp-cupy", "torch"]
    assert {"name", "fullname", "group", "params", "extra_info", "stats"} <= set(written[0])
    assert gs.read_benchmark_lines(lines)["benchmarks"] == written


def test_without_the_variable_the_benchmark_lines_plugin_writes_nothing(gs, tmp_path):
    test, report = dying_group(gs, tmp_path), tmp_path / "report.json"
    done = run_with_benchmark_lines(test, report, None)
    assert done.returncode == 0, done.stdout + done.stderr
    written = {path.relative_to(tmp_path).as_posix() for path in tmp_path.rglob("*")
               if path.is_file() and "__pycache__" not in path.parts}
    assert written == {"test_made_up.py", "report.json"}
    assert [bench["extra_info"]["backend"] for bench in json.loads(report.read_text())["benchmarks"]] == [
        "gpubp-cupy", "torch"]


def test_a_benchmark_lines_writer_that_cannot_read_pytest_benchmark_warns_once_and_lets_the_run_go_on(tmp_path):
    """It reads pytest-benchmark's internals, which another version may lack: a safety net that
    raised inside pytest's hooks would cost the GPU run the very results it guards."""
    lines = load("benchmark_lines")

    class Unreadable:  # a benchmark without the Metadata attributes the writer reads
        pass

    config = types.SimpleNamespace(_benchmarksession=types.SimpleNamespace(benchmarks=[Unreadable()]))
    writer = lines.BenchmarkLines(config, str(tmp_path / "lines.jsonl"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # pyproject.toml's filterwarnings, which the GPU run's pytest applies: a RuntimeWarning raised
        # there, an INTERNALERROR that ended the group after its first benchmark.
        warnings.simplefilter("error", RuntimeWarning)
        writer.pytest_runtest_logreport(types.SimpleNamespace(when="call"))
    assert len(caught) == 1
    assert re.match("GPUBP_BENCH_LINES: benchmark lines not written .*AttributeError", str(caught[0].message))
    config._benchmarksession.benchmarks.append(Unreadable())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        writer.pytest_runtest_logreport(types.SimpleNamespace(when="call"))  # no second warning, no error
    assert not (tmp_path / "lines.jsonl").exists()


def test_a_benchmark_in_a_groups_json_and_its_line_file_is_taken_from_the_json(gs, tmp_path):
    """The JSON, written last, wins; a line file's other benchmarks are added, and named; a line a
    kill cut off mid-write is left out, with no error."""
    report, lines = tmp_path / "bench_first_contact_step_1024.json", tmp_path / "bench_first_contact_step_1024.jsonl"
    report.write_text(json.dumps(benchmark_report({(gs.STEP_1024, "torch"): 8.0, (gs.STEP_1024, "gpubp-cupy"): 4.0},
                                                  "Fake GPU", when="2026-11-23T10:00:05+00:00")))
    written = benchmark_report({(gs.STEP_1024, "torch"): 80.0, (gs.STEP_1024, "gpubp-numba"): 16.0}, "Fake GPU")
    lines.write_text("".join(json.dumps({**bench, "datetime": "2026-11-23T10:00:01.000001+00:00"}) + "\n"
                             for bench in written["benchmarks"]) + '{"name": "test[cut')
    out = tmp_path / "results"
    gs.main(["--device", "Fake GPU", "--benchmark", str(report), "--benchmark-lines", str(lines), "--out-dir", str(out),
             "--results-out", str(tmp_path / "carried")])
    data = json.loads((out / "gpu_summary.json").read_text())
    assert data["ratios"]["step_1024_vs_torch_eager"] == 2.0  # the JSON's 8 ms, not the line's 80
    assert data["ratios"]["numba_vs_cupy_1024"] == 0.25
    assert data["benchmarks_recovered"] == {f"{gs.STEP_1024} | gpubp-numba": lines.name}
    assert not data["benchmark_conflicts"] and not any(key.endswith("_error") for key in data)
    carried = json.loads((tmp_path / "carried" / "benchmarks.json").read_text())
    assert carried["recovered"] == data["benchmarks_recovered"] and len(carried["benchmarks"]) == 3
    # With its JSON cut off mid-write, every benchmark of the line file is taken, and the cut named.
    report.write_text('{"benchmarks": [{"name": ')
    gs.main(["--device", "Fake GPU", "--benchmark", str(report), "--benchmark-lines", str(lines), "--out-dir", str(out)])
    data = json.loads((out / "gpu_summary.json").read_text())
    assert data["benchmark_error"].startswith(f"{report.name}: JSONDecodeError")
    assert data["ratios"]["numba_vs_cupy_1024"] is None and data["timings_ms"][f"{gs.STEP_1024} | torch"] == 80.0
    assert set(data["benchmarks_recovered"]) == {f"{gs.STEP_1024} | torch", f"{gs.STEP_1024} | gpubp-numba"}


def test_first_contact_summarises_the_benchmarks_of_a_group_that_died_and_forgets_an_earlier_runs(gs, tmp_path):
    check = tmp_path / "check"
    check.mkdir()
    earlier = benchmark_report({(gs.STEP_MLP64, "torch"): 5.0, (gs.STEP_MLP64, "gpubp-cupy"): 1.0}, "Fake H200")
    (check / "bench_first_contact_mlp64.jsonl").write_text("".join(json.dumps(b) + "\n" for b in earlier["benchmarks"]))
    fwd = benchmark_report({(gs.FWD_4096, "cublas-gemm"): 3.0, (gs.FWD_4096, "gpubp-cupy"): 2.0}, "Fake H200")
    step = benchmark_report({(gs.STEP_1024, "torch"): 8.0, (gs.STEP_1024, "gpubp-cupy"): 4.0}, "Fake H200")
    done, calls, check, out = first_contact(gs, tmp_path, overrides=[
        {"match": "first_contact.py bench", "exit": 1, "files": {
            str(check / "bench_first_contact_fwd_4096.json"): json.dumps(fwd),
            str(check / "bench_first_contact_step_1024.jsonl"): "".join(json.dumps(b) + "\n" for b in step["benchmarks"])}}])
    assert done.returncode == 1 and calls == GPU_CALLS
    data = json.loads((out / "gpu_summary.json").read_text())
    assert data["ratios"]["fwd_4096_fp32_vs_cublas"] == 1.5 and data["ratios"]["step_1024_vs_torch_eager"] == 2.0
    assert data["ratios"]["mlp64_step_vs_torch_eager"] is None  # the earlier run's line file was removed
    assert data["benchmarks_recovered"] == {f"{gs.STEP_1024} | gpubp-cupy": "bench_first_contact_step_1024.jsonl",
                                            f"{gs.STEP_1024} | torch": "bench_first_contact_step_1024.jsonl"}
    assert "Benchmarks recovered from the line files" in (out / "Fake_H200.md").read_text()


def test_a_benchmark_group_is_given_no_more_than_what_the_step_has_left():
    """gpu_check.sh's SIGINT would stop a group mid-run, before it records anything: a group is
    stopped by first_contact.py first, with its grace and a margin to spare."""
    fc = load("first_contact")
    assert fc.group_seconds(40, None) == 40  # run alone, not under gpu_check.sh
    assert fc.group_seconds(40, 90) == 40
    assert fc.group_seconds(40, 30) == 30 - fc.GROUP_GRACE - fc.STEP_MARGIN
    assert fc.group_seconds(40, 4) == 1


def test_file_stem_keeps_letters_and_digits_only(gs, capsys):
    gs.main(["--file-stem", "NVIDIA H100 80GB HBM3 (MIG 1g.10gb)"])
    assert capsys.readouterr().out == "NVIDIA_H100_80GB_HBM3__MIG_1g_10gb_\n"


# ----------------------------------------------------------------------------- bench/test_gpu_dense.py


def test_the_gpu_benchmarks_time_every_workload_the_ratios_read(gs, dense):
    needed = {pair for numerator, denominator in gs.RATIOS.values() for pair in (numerator, denominator)}
    assert needed <= dense.summary_benchmarks()


def test_the_gpubp_train_step_updates_every_trainable_weight(dense):
    model, step = dense.gpubp_train_step("numpy", [6, 5, 4], 8)
    before = model.get_weights()
    step()
    assert all(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


def test_the_graph_benchmark_step_runs_eagerly_where_there_are_no_graphs(dense):
    model, step = dense.gpubp_train_step("numpy", [6, 5, 4], 8, cuda_graph="auto")
    before = model.get_weights()
    step()
    assert not step.train_step.graphed and "no CUDA graphs" in step.train_step.why_not_graphed()
    assert all(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


def test_the_gpubp_kernel_count_of_a_step_is_its_trace(dense):
    model, step = dense.gpubp_train_step("numpy", [6, 5, 4], 8)
    # forward 2, loss 1, backward: dW+dX on the top layer, dW on the first, Adam on 4 parameters
    assert dense.gpubp_kernels_per_step(step) == 2 + 1 + 3 + 4


def test_the_frozen_backbone_step_updates_only_the_head(dense):
    model, step = dense.gpubp_train_step("numpy", [6, 5, 5, 4], 8, frozen_backbone=True)
    before = model.get_weights()
    step()
    changed = [not np.array_equal(a, b) for a, b in zip(before, model.get_weights())]
    assert changed == [False, False, False, False, True, True]


def test_the_forward_pass_and_kernel_passes_run(dense, rng):
    dense.gpubp_forward_pass("numpy", [6, 5, 4], 8)()
    x = rng.standard_normal((8, 6)).astype(np.float32)
    layers = [(rng.standard_normal((6, 5)).astype(np.float32), np.zeros(5, np.float32), "relu"),
              (rng.standard_normal((5, 4)).astype(np.float32), np.zeros(4, np.float32), "identity")]
    dy = rng.standard_normal((8, 4)).astype(np.float32)
    for train in (False, True):
        dense.kernel_pass(numpy_backend, x, layers, dy, train, lambda: None)()
        dense.unfused_kernel_pass(np, x, layers, dy, train, lambda: None)()


def test_the_unfused_baseline_computes_relu_of_x_at_w_plus_b(dense, rng):
    a, w = rng.standard_normal((7, 5)).astype(np.float32), rng.standard_normal((5, 3)).astype(np.float32)
    b, out = rng.standard_normal(3).astype(np.float32), np.empty((7, 3), np.float32)
    dense.unfused_relu_forward(np, a, w, b, out, lambda: None)()
    np.testing.assert_allclose(out, np.maximum(a @ w + b, 0), rtol=1e-6)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16_autocast"])
def test_the_torch_train_step_updates_the_weights(dense, bf16):
    torch = pytest.importorskip("torch")
    model, step = dense.torch_train_step(torch, "cpu", [6, 5, 4], 8, bf16=bf16)
    before = [p.detach().clone() for p in model.parameters()]
    step()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_the_torch_frozen_backbone_step_updates_only_the_head(dense):
    torch = pytest.importorskip("torch")
    model, step = dense.torch_train_step(torch, "cpu", [6, 5, 5, 4], 8, frozen_backbone=True)
    before = [p.detach().clone() for p in model.parameters()]
    step()
    changed = [not torch.equal(a, b) for a, b in zip(before, model.parameters())]
    assert changed == [False, False, False, False, True, True]


def test_the_torch_fp32_step_enters_no_autocast(dense, monkeypatch):
    """The fp32 baseline entered a disabled autocast every step, about 3 us of a batch-64 step."""
    torch = pytest.importorskip("torch")
    entered, real = [], torch.autocast
    monkeypatch.setattr(torch, "autocast", lambda *args, **kwargs: entered.append(kwargs) or real(*args, **kwargs))
    for bf16 in (False, True):
        dense.torch_train_step(torch, "cpu", [6, 5, 4], 8, bf16=bf16)[1]()
    assert entered == [{"device_type": "cpu", "dtype": torch.bfloat16}]


class FakeBenchmark:
    """pytest-benchmark's fixture as bench/test_gpu_dense.py's ``measure`` uses it: pedantic runs
    ``warmup_rounds`` untimed calls, then the rounds, noting when the first round started."""

    def __init__(self):
        self.extra_info, self.group, self.round_started = {}, None, None

    def pedantic(self, fn, rounds, warmup_rounds, iterations):
        for _ in range(warmup_rounds):
            fn()
        self.round_started = time.perf_counter()
        for _ in range(rounds * iterations):
            fn()
        self.stats = types.SimpleNamespace(stats=types.SimpleNamespace(median=1e-3))


def numpy_as_cupy():
    """NumPy dressed as the little of CuPy the benchmarks' builders call."""
    stream = types.SimpleNamespace(synchronize=lambda: None)
    cuda = types.SimpleNamespace(get_current_stream=lambda: stream, Device=lambda: types.SimpleNamespace(id=0),
                                 runtime=types.SimpleNamespace(getDeviceProperties=lambda i: {"name": b"Fake GPU"}))
    return types.SimpleNamespace(asarray=np.asarray, empty=np.empty, matmul=np.matmul, add=np.add, maximum=np.maximum,
                                 cuda=cuda)


def test_a_benchmark_is_warmed_up_by_time_after_its_first_call(dense, monkeypatch):
    """Three warm-up calls were milliseconds after a first call that compiles or loads: the
    first timed rounds met a GPU still at its idle clocks."""
    monkeypatch.setattr(dense, "WARMUP_SECONDS", 0.05)
    monkeypatch.setattr(dense, "ROUNDS", 2)
    calls = []

    def fn():
        time.sleep(0.03 if not calls else 0.002)  # the first call compiles
        calls.append(time.perf_counter())

    benchmark = FakeBenchmark()
    dense.measure(benchmark, numpy_as_cupy(), fn, workload="w", backend="gpubp-cupy", shape=[1], flops=1.0)
    untimed = [t for t in calls if t < benchmark.round_started]
    assert len(calls) == len(untimed) + 2
    assert untimed[-1] - untimed[0] >= 0.05 and len(untimed) >= 10
    monkeypatch.setattr(dense, "WARMUP", 7)  # a cap in calls: a fast call does not spin for long
    calls.clear()
    assert dense.warm_up(lambda: calls.append(1)) == 7 == len(calls)


@pytest.mark.parametrize("backend, dtype", [
    ("gpubp-cupy", "float32"), ("gpubp-cupy-bf16", "bf16"), ("torch-bf16", "bf16"), ("cublas-tf32", "tf32"),
    ("gpubp-fused-tf32", "tf32"), ("torch-compile", "float32")])
def test_a_benchmark_is_labelled_with_the_precision_it_computes_in(dense, monkeypatch, backend, dtype):
    """The bf16 train steps said "float32"."""
    monkeypatch.setattr(dense, "ROUNDS", 1)
    monkeypatch.setattr(dense, "WARMUP", 0)
    benchmark = FakeBenchmark()
    dense.measure(benchmark, numpy_as_cupy(), lambda: None, workload="w", backend=backend, shape=[1], flops=1.0)
    assert benchmark.extra_info["dtype"] == dtype
    dense.measure(benchmark, numpy_as_cupy(), lambda: None, workload="w", backend="splits=4", shape=[1], flops=1.0,
                  dtype="tf32")
    assert benchmark.extra_info["dtype"] == "tf32"


@pytest.mark.parametrize("impl", ["gpubp-cupy", "cublas-gemm", "cublas-unfused"])
def test_the_fp32_forwards_goal_is_against_the_bare_gemm_and_the_unfused_one_is_its_own_ratio(dense, gs, monkeypatch,
                                                                                              impl):
    """cuBLAS + bias + relu as separate passes is an easier baseline than cuBLAS's GEMM alone."""
    monkeypatch.setattr(dense, "FWD_SIZE", 8)
    monkeypatch.setattr(dense, "ROUNDS", 1)
    monkeypatch.setattr(dense, "WARMUP", 0)
    if impl == "gpubp-cupy":
        monkeypatch.setattr(dense, "gpu_backend", lambda impl: numpy_backend)
    computed = {}
    xp = numpy_as_cupy()
    xp.empty = lambda shape, dtype: computed.setdefault("out", np.empty(shape, dtype))
    benchmark = FakeBenchmark()
    dense.test_forward_4096_relu(benchmark, xp, impl)
    rng = np.random.default_rng(0)
    a, w = rng.standard_normal((8, 8), dtype=np.float32), rng.standard_normal((8, 8), dtype=np.float32) / np.sqrt(8)
    b = rng.standard_normal(8, dtype=np.float32)
    expected = a @ w if impl == "cublas-gemm" else np.maximum(a @ w + b, 0)
    np.testing.assert_allclose(computed["out"], expected, rtol=1e-5, atol=1e-5)
    assert benchmark.extra_info["backend"] == impl and benchmark.extra_info["workload"] == gs.FWD_4096
    assert gs.RATIOS["fwd_4096_fp32_vs_cublas"][0] == (gs.FWD_4096, "cublas-gemm")
    assert gs.RATIOS["fwd_4096_fp32_vs_cublas_unfused"][0] == (gs.FWD_4096, "cublas-unfused")


def test_each_step_benchmark_counts_the_flops_its_step_computes_no_dx_at_the_input(dense, gs, monkeypatch):
    """Three GEMMs a layer counted the first layer's dX, which no step computes (its data needs
    no gradient): the TFLOP/s of the steps read 9 to 33% high. Each step benchmark of every
    backend counts bench/model_bounds.py's products of its step instead. The steps are stand-ins
    here: only what the benchmarks record is checked."""
    mb = load("model_bounds")
    monkeypatch.setattr(dense, "ROUNDS", 1)
    monkeypatch.setattr(dense, "WARMUP", 0)

    def step():
        pass

    step.train_step = types.SimpleNamespace(graphed=True, why_not_graphed=lambda: None)
    for builder in ("gpubp_train_step", "torch_train_step"):
        monkeypatch.setattr(dense, builder, lambda *args, **kwargs: (None, step))
    monkeypatch.setattr(dense, "gpu_backend", lambda impl: types.SimpleNamespace(
        NAME="cupy", dense_precisions=lambda: ("fp32", "tf32", "bf16")))
    monkeypatch.setattr(dense, "cuda_torch", lambda: None)
    monkeypatch.setattr(dense, "record_launches", lambda *args: None)
    runs = [(dense.test_train_step, {"workload": w, "impl": i}) for w in dense.STEP_WORKLOADS for i in dense.STEP_IMPLS]
    runs += [(dense.test_1024_train_step_in_bf16_against_torch_autocast, {"impl": i})
             for i in dense.STEP_1024_BF16_IMPLS]
    runs += [(dense.test_1024_train_step_under_torch_compile, {})]
    runs += [(dense.test_mlp64_train_step_baselines_of_the_fused_kernels, {"impl": i}) for i in dense.MLP64_EXTRA_IMPLS]
    runs += [(dense.test_small_batch_train_step, {"impl": i}) for i in dense.SMALL_STEP_IMPLS]
    runs += [(dense.test_frozen_backbone_step_and_forward, {"workload": gs.FROZEN_STEP, "impl": i})
             for i in dense.FROZEN_IMPLS]
    timed = set()
    for test, params in runs:
        benchmark = FakeBenchmark()
        test(benchmark, numpy_as_cupy(), **params)
        info = benchmark.extra_info
        counted = info["tflops"] * 1e12 * 1e-3  # FakeBenchmark's median is 1 ms
        planned = sum(p.flops for p in mb.products(info["workload"], "gpubp-cupy", info["shape"], H200_SMS))
        assert counted == pytest.approx(planned, rel=1e-9), (test.__name__, params)
        if info["workload"].startswith("train step"):  # three GEMMs a layer, less the first layer's dX
            *widths, batch = info["shape"]
            assert counted == pytest.approx(3 * dense.gemm_flops(widths, batch) - 2.0 * batch * widths[0] * widths[1])
        timed.add((info["workload"], info["backend"]))
    assert {pair for pair in dense.summary_benchmarks() if "step" in pair[0]} <= timed
    fused = load("test_gpu_fused")
    widths, batch = [64] * 4 + [fused.CLASSES], 2**14
    modes = {"step": "train step", "frozen step": "frozen-backbone step", "forward": "forward pass"}
    for mode, workload in modes.items():
        planned = sum(p.flops for p in mb.products(workload, "gpubp-cupy", widths + [batch], H200_SMS))
        assert fused.mode_flops(mode, widths, batch) == pytest.approx(planned), mode


def test_the_benchmarks_count_flops_without_loading_the_toolchains_scripts():
    """bench/model_bounds.py, whose products the benchmarks count, imported bench/kernel_model.py,
    which imports bench/nvrtc_build.py, which loads an NVRTC library (RTLD_GLOBAL) as it is
    imported: into a benchmark's process, before CuPy loads its own."""
    done = subprocess.run([sys.executable, "-c", "import sys, test_gpu_dense, test_gpu_fused; "
                           "print(sorted({'kernel_model', 'nvrtc_build', 'aot_build'} & set(sys.modules)))"],
                          cwd=BENCH, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCH), str(ROOT)])},
                          capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


@pytest.fixture
def cupy_stand_in(monkeypatch):
    """The CuPy backend on the CPU stand-in of CuPy (tests/cuda_on_cpu), as the benchmarks'
    rehearsal runs it, for this test."""
    if shutil.which(harness.CXX) is None:
        pytest.skip(f"no C++ compiler ({harness.CXX})")
    from test_kernels_on_cpu import cupy_on_cpu  # here, not above: that module imports this one

    return cupy_on_cpu(harness.Harness(), monkeypatch, H200_SMS)


class RecordingRounds(FakeBenchmark):
    """Notes after each timed round whether the step replayed its CUDA graph."""

    def pedantic(self, fn, rounds, warmup_rounds, iterations):
        self.replayed = []

        def timed():
            fn()
            self.replayed.append(fn.train_step.graphed)

        super().pedantic(timed, rounds, warmup_rounds, iterations)


class EagerRounds(FakeBenchmark):
    """Timed rounds that run the step eagerly (as a round would whose batch or settings differed
    from the captured graph's), the graph there to replay again after them."""

    def pedantic(self, fn, rounds, warmup_rounds, iterations):
        fn.train_step.cuda_graph = False
        try:
            super().pedantic(fn, rounds, warmup_rounds, iterations)
        finally:
            fn.train_step.cuda_graph = True


def small_graph_step(dense, monkeypatch, warm_up_calls: int):
    monkeypatch.setattr(dense, "SMALL_STEP", ([24, 136, 10], 16))
    monkeypatch.setattr(dense, "ROUNDS", 2)
    monkeypatch.setattr(dense, "WARMUP", warm_up_calls)
    monkeypatch.setattr(dense, "WARMUP_SECONDS", 600)  # the warm-up is warm_up_calls calls


def test_the_graph_benchmarks_timed_rounds_replay_the_graph_whatever_the_warm_up(dense, cupy_stand_in, monkeypatch):
    """Without a warm-up (the rehearsal's) the timed rounds were the batch's eager first step and
    the capture, and the check that they replayed passed on record_launches' extra step."""
    small_graph_step(dense, monkeypatch, warm_up_calls=0)
    benchmark = RecordingRounds()
    dense.test_small_batch_train_step(benchmark, numpy_as_cupy(), "gpubp-cupy-graph")
    assert benchmark.replayed == [True, True]
    assert benchmark.extra_info["host_launches_per_step"] == 1 < benchmark.extra_info["kernels_per_step"]


def test_the_graph_benchmark_fails_where_its_timed_rounds_ran_eagerly(dense, cupy_stand_in, monkeypatch):
    """The check read ``graphed`` after record_launches' extra step, which replays the graph
    whatever the timed rounds did."""
    small_graph_step(dense, monkeypatch, warm_up_calls=2)
    with pytest.raises(AssertionError, match="the timed rounds ran eagerly"):
        dense.test_small_batch_train_step(EagerRounds(), numpy_as_cupy(), "gpubp-cupy-graph")


def dynamo_graphs(torch, monkeypatch) -> list[list]:
    """torch.compile records each graph Dynamo compiles (the sizes of its tensor inputs, a
    symbolic one as its symbol) instead of compiling it."""
    graphs = []

    def recording(graph_module, example_inputs):
        graphs.append([tuple(str(size) for size in node.meta["example_value"].shape)
                       for node in graph_module.graph.nodes
                       if node.op == "placeholder" and isinstance(node.meta.get("example_value"), torch.Tensor)])
        return graph_module.forward

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **options: real(model, backend=recording, **options))
    return graphs


def test_each_torch_compile_baseline_gets_a_static_graph_of_its_own_shapes(dense, monkeypatch):
    """Dynamo's state is per code object (nn.Sequential.forward) and lasts the process: the
    second baseline of another batch was compiled for a symbolic batch, and past the recompile
    limit (8; 2 here, to reach it sooner) none was compiled at all, the model running eagerly."""
    torch = pytest.importorskip("torch")
    import torch._dynamo

    fused = load("test_gpu_fused")
    graphs = dynamo_graphs(torch, monkeypatch)
    shapes = [([8, 8, 4], 16, "step"), ([8, 8, 4], 24, "step"), ([8, 8, 4], 40, "forward"), ([6, 6, 6, 3], 32, "step")]
    with torch._dynamo.config.patch(recompile_limit=2):
        for widths, batch, mode in shapes:
            run = (fused.torch_forward_pass(torch, "cpu", widths, batch, compiled=True) if mode == "forward" else
                   dense.torch_train_step(torch, "cpu", widths, batch, compiled=True)[1])
            before = len(graphs)
            run()
            run()
            assert len(graphs) == before + 1, (widths, batch, graphs[before:])  # compiled once, for this shape
            assert (str(batch), str(widths[0])) in graphs[-1], graphs[-1]  # the batch, not a symbol
    torch._dynamo.reset()


def test_a_splitk_round_times_back_to_back_dw_passes_and_one_synchronize(monkeypatch):
    """One pass per round timed a host round trip: launch, synchronize, return, for kernels of
    microseconds."""
    splitk = load("test_gpu_splitk")
    be = backends.get("numpy")
    synchronized = []
    monkeypatch.setattr(be, "synchronize", lambda: synchronized.append(1))
    run = splitk.dw_pass(be, 64, 6, 5)
    with gb.trace() as launched:
        run()
    assert launched.counts["dense_dw"] == splitk.LAUNCHES >= 10 and synchronized == [1]


@pytest.mark.skipif(cuda_device_count()[0] > 0, reason="a GPU is present: the benchmarks would run")
def test_the_gpu_benchmarks_collect_and_skip_with_the_reason_without_a_gpu():
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                          str(BENCH / "test_gpu_dense.py")], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "GPU benchmarks need the CuPy backend" in run.stdout
    assert " passed" not in run.stdout and "error" not in run.stdout.lower()


# ----------------------------------------------------------------------------- bench/sanitizer_driver.py


@pytest.fixture
def driver():
    return load("sanitizer_driver")


@pytest.fixture
def tiny_driver(driver, monkeypatch):
    """The driver on tiny shapes for the NumPy backend, which implements the same contract (the
    CUDA simulator would take seconds per call); gpu_check.sh runs it on the GPU backends."""
    monkeypatch.setitem(driver.COVERAGE, "numpy", driver.Coverage(
        dense=[(3, 5, 4)], misaligned=[(3, 1, 4), (3, 4, 1)], losses=((2, 3),), parameters=(1, 5)))
    return driver


def test_the_sanitizer_driver_makes_only_calls_of_the_kernel_contract_and_says_where_it_is(tiny_driver, capsys):
    tiny_driver.main(["numpy"])
    lines = capsys.readouterr().out.splitlines()
    assert [re.sub(r" at \d+\.\d s$", "", line) for line in lines] == [
        "sanitizer driver: numpy dense fp32 (3, 5, 4)", "sanitizer driver: numpy misaligned operands",
        "sanitizer driver: numpy losses and optimizers", "sanitizer driver: every numpy kernel ran"]


@pytest.mark.parametrize("tensor_cores", [False, True], ids=["fp32_only", "tf32_tile"])
def test_the_sanitizer_driver_drives_tf32_only_where_the_backend_has_tensor_core_kernels(tiny_driver, monkeypatch,
                                                                                          tensor_cores):
    """A backend whose "tf32" computes fp32 (NumPy here, Numba on the GPU) would rerun the same kernels."""
    be = backends.get("numpy")
    assert "tf32" in be.dense_precisions()
    if tensor_cores:  # the CUDA C++ backend's mark of its TF32 kernels
        monkeypatch.setattr(be, "TF32_TILE", 64, raising=False)
    precisions = []
    dense_forward = be.dense_forward

    def recording_dense_forward(*args, precision="fp32", **kwargs):
        precisions.append(precision)
        return dense_forward(*args, precision=precision, **kwargs)

    monkeypatch.setattr(be, "dense_forward", recording_dense_forward)
    tiny_driver.drive("numpy")
    assert set(precisions) == ({"fp32", "tf32", "bf16"} if tensor_cores else {"fp32"})


def test_the_sanitizer_driver_turns_cupys_memory_pool_off_but_for_the_captured_graphs(tiny_driver, monkeypatch):
    """The pool rounds arrays up and shares allocations, which hides a small overrun from memcheck;
    a capture needs it (a cudaFree synchronizes, which invalidates a capture)."""
    be = backends.get("numpy")
    allocator = ["the pool"]
    cuda = types.SimpleNamespace(get_allocator=lambda: allocator[0], set_allocator=lambda a: allocator.__setitem__(0, a))
    monkeypatch.setattr(be, "cupy", types.SimpleNamespace(cuda=cuda), raising=False)
    monkeypatch.setattr(be, "capture", None, raising=False)  # a backend with CUDA graphs
    seen = {}
    dense_forward = be.dense_forward

    def recording_dense_forward(*args, **kwargs):
        seen.setdefault("dense", allocator[0])
        return dense_forward(*args, **kwargs)

    monkeypatch.setattr(be, "dense_forward", recording_dense_forward)
    monkeypatch.setattr(tiny_driver, "drive_replayed_steps", lambda be, rng, cases: seen.setdefault("graphs", allocator[0]))
    tiny_driver.drive("numpy")
    assert seen == {"dense": None, "graphs": "the pool"}


def test_the_sanitizer_drivers_misaligned_operands_hold_their_values_one_float_past_the_start(driver, backend):
    be = backends.get(backend)
    host = np.arange(12, dtype=np.float32).reshape(3, 4)
    view = driver.misaligned(be, host)
    assert view.shape == (3, 4)
    np.testing.assert_array_equal(be.to_host(view), host)


def test_the_sanitizer_driver_rejects_an_unknown_backend(driver):
    with pytest.raises(SystemExit, match=r"unknown backend\(s\) \['cpu'\]"):
        driver.main(["cpu"])
    with pytest.raises(SystemExit, match=r"--reduced or --reduced-racecheck \(one\) drives the cupy backend alone"):
        driver.main(["--reduced", "cupy", "numba"])
    with pytest.raises(SystemExit, match=r"\(one\) drives the cupy backend alone"):
        driver.main(["--reduced", "--reduced-racecheck", "cupy"])


# ----------------------------------------------------------------------------- bench/fused_table.py


def test_the_fused_table_has_a_row_per_workload_with_medians_and_speed_ratios():
    table = load("fused_table")
    times_ms = {("fused step 64x4@2^14", "gpubp-fused"): 2.0, ("fused step 64x4@2^14", "torch"): 6.0,
                ("fused step 64x4@2^14", "gpubp-per-layer"): 3.0, ("fused forward 32x8@2^20", "torch"): 1.0,
                ("train step 1024-1024-1024-1024@8192", "torch"): 9.0}  # another file's: not in the table
    lines = table.markdown(benchmark_report(times_ms)).splitlines()
    assert "on Fake GPU" in lines[0]
    assert lines[2] == "| workload | gpubp-fused | gpubp-per-layer | torch | torch / fused | per-layer / fused |"
    assert lines[4:] == ["| step 64x4@2^14 | 2.000 | 3.000 | 6.000 | 3.00 | 1.50 |",
                         "| forward 32x8@2^20 | - | - | 1.000 | - | - |"]


# ----------------------------------------------------------------------------- bench/splitk_table.py


def splitk_report(times_ms: dict, splits: dict) -> dict:
    """A split-K sweep's report: per (workload, backend) the median of a round of 20 passes
    (``times_ms`` per pass) and the split it ran (``splits`` by backend)."""
    report = benchmark_report({key: 20 * ms for key, ms in times_ms.items()})
    for bench in report["benchmarks"]:
        bench["extra_info"].update(splits=splits.get(bench["extra_info"]["backend"]), launches_per_round=20)
    return report


def test_the_splitk_table_sets_the_heuristic_against_its_split_forced_and_the_fastest_other_split():
    table = load("splitk_table")
    shape = "dw split-K 4096x64x48 fp32"
    report = splitk_report({(shape, "splits=1"): 0.4, (shape, "splits=8"): 0.1, (shape, "heuristic"): 0.2,
                            (shape, "splits=16"): 0.25, (shape, "splits=32"): 0.01,  # 32 ran as 16: not 16's time
                            ("dw split-K 32768x77x13 tf32", "splits=4"): 0.3},
                           {"splits=1": 1, "splits=8": 8, "heuristic": 16, "splits=16": 16, "splits=32": 16,
                            "splits=4": 4})
    report["benchmarks"].append(benchmark_report({("train step 1024-1024-1024-1024@8192", "torch"): 9.0})
                                ["benchmarks"][0])  # another file's
    rows = table.rows(report)  # the 32768 shape has no heuristic run: no row
    assert [(r["workload"], r["heuristic_splits"], r["best_other_splits"]) for r in rows] == [(shape, 16, 8)]
    assert rows[0]["heuristic_ms"] == pytest.approx(0.2)  # per pass, not per round of 20
    assert rows[0]["heuristic_over_same"] == pytest.approx(0.8)
    assert rows[0]["heuristic_over_best_other"] == pytest.approx(2.0)
    text = table.markdown(rows)
    assert "| 4096x64x48 fp32 | 16 | 0.2000 | 0.2500 | 0.80 | 8 | 0.1000 | 2.00 |" in text
    assert "fastest other split: geometric mean 2.000, worst 2.000" in text
    assert "same split forced (the noise): geometric mean 0.800" in text


def test_the_splitk_tables_control_reads_one_where_every_split_is_as_fast():
    """With every split equally fast and 3% noise per median, the heuristic over the least of
    six medians (its own configuration's among them) read as a 4% loss; its own split forced,
    the same configuration, reads as what it is, and is never taken for another split."""
    table = load("splitk_table")
    rng = np.random.default_rng(0)
    over_same, best_other = [], set()
    choices = {f"splits={s}": s for s in (1, 2, 4, 8, 16, 32)} | {"heuristic": 8}
    for _ in range(200):
        times = {("dw split-K 4096x64x48 fp32", backend): 0.03 * rng.normal(1, 0.03) for backend in choices}
        row, = table.rows(splitk_report(times, choices))
        over_same.append(row["heuristic_over_same"])
        best_other.add(row["best_other_splits"])
    assert np.median(over_same) == pytest.approx(1.0, abs=0.01)
    assert 8 not in best_other


# ----------------------------------------------------------------------------- bench/ncu_driver.py


def test_the_ncu_driver_profiles_one_warmed_up_call_of_each_case(monkeypatch):
    driver = load("ncu_driver")
    monkeypatch.setattr(driver, "SIZES", {"fwd_4096": 9, "step_1024": ([6, 6, 6, 6], 8),
                                          "step_mlp64": ([6, 4, 4, 3], 10), "step_b64": ([7, 5, 5, 3], 4)})
    profiled = []

    @contextlib.contextmanager
    def region():
        with gb.trace() as launched:
            yield
        profiled.append(launched.launches)

    be = backends.get("numpy")
    with gb.trace() as everything:
        driver.profile(be, driver.CASES, region)
    per_precision = len(be.dense_precisions())
    assert len(profiled) == per_precision + 3
    assert profiled[0] == ["dense_fwd", "dense_dw", "dense_dx"]
    assert all("adam_update" in launches for launches in profiled[per_precision:])
    assert everything.total == 2 * sum(len(launches) for launches in profiled)  # each once warm-up, once profiled


def test_the_ncu_driver_rejects_an_unknown_case():
    with pytest.raises(SystemExit, match=r"unknown case\(s\) \['fwd'\]"):
        load("ncu_driver").main(["fwd"])


# ----------------------------------------------------------------------------- the model's bounds (bench/model_bounds.py)

SMI_CSV = ("name, driver_version, pstate, clocks.current.sm [MHz], clocks.max.sm [MHz], clocks.current.memory [MHz]\n"
           "NVIDIA H200, 580.65.06, P0, 345 MHz, 1980 MHz, 3201 MHz")
H200_FACTS = {"device": {"name": "NVIDIA H200", "multiProcessorCount": 132}, "nvidia_smi": SMI_CSV}


@pytest.fixture(scope="module")
def mb():
    return load("model_bounds")


def fake_model(names, ceiling=0.5, peak="fp32", sha="00" * 32) -> dict:
    return {"kernels_sha256": sha, "arch": "sm_90",
            "kernels": {name: {"issue_ceiling": ceiling, "peak": peak} for name in names}}


def shaped_report(rows) -> dict:
    """A benchmark report whose benchmarks also name their shape, as bench/test_gpu_dense.py's do,
    on an H200."""
    return {"benchmarks": [{"stats": {"median": ms / 1e3}, "extra_info": {"workload": w, "backend": b, "shape": s,
                                                                          "device": "NVIDIA H200"}}
                           for w, b, s, ms in rows]}


def test_a_training_steps_products_are_the_forward_then_dw_everywhere_and_dx_above_the_input(mb, gs):
    cb = backends.cupy_backend
    found = mb.products(gs.STEP_1024, "gpubp-cupy", [1024] * 4 + [8192], 132)
    assert [p.kind for p in found] == ["fwd"] * 3 + ["dw", "dx", "dw", "dx", "dw"]
    assert {(p.m, p.n, p.k) for p in found if p.kind == "dw"} == {(1024, 1024, 8192)}
    assert {(p.m, p.n, p.k) for p in found if p.kind != "dw"} == {(8192, 1024, 1024)}
    # as the backend picks them: 64 tiles of 128x128 would leave SMs idle, so dW takes 128x64 and splits the batch
    assert found[0].kernel == "dense_fwd_128x128" and found[0].blocks == 64 * 8
    assert found[3].kernel == "dense_dw_128x64" and found[3].blocks == 128 * cb.dw_split(8192, 128, 132)[0] == 384
    assert found[4].kernel == "dense_dx_128x128"
    tf32 = mb.products(gs.STEP_1024, "gpubp-cupy-tf32", [1024] * 4 + [8192], 132)
    assert [p.kernel for p in tf32[:3]] == ["dense_fwd_tf32_relu"] * 2 + ["dense_fwd_tf32_identity"]


def test_a_frozen_backbone_step_runs_the_forward_and_the_heads_dw_only(mb, gs):
    found = mb.products(gs.FROZEN_STEP, "gpubp-cupy", [256, 512, 512, 512, 10, 8192], 132)
    assert [(p.kind, p.m, p.n, p.k) for p in found] == [
        ("fwd", 8192, 512, 256), ("fwd", 8192, 512, 512), ("fwd", 8192, 512, 512), ("fwd", 8192, 10, 512),
        ("dw", 512, 10, 8192)]
    forward = mb.products(gs.FROZEN_FORWARD, "gpubp-cupy", [256, 512, 512, 512, 10, 8192], 132)
    assert [p.kind for p in forward] == ["fwd"] * 4


@pytest.mark.parametrize("frozen", [False, True])
def test_the_products_are_the_dense_kernels_a_step_launches(mb, dense, frozen):
    """The trace of a real (NumPy) step counts the same forward, dW and dX launches."""
    widths, batch = [6, 5, 5, 4], 8
    _, step = dense.gpubp_train_step("numpy", widths, batch, frozen_backbone=frozen)
    with gb.trace() as launched:
        step()
    workload = "frozen-backbone step" if frozen else "train step"
    kinds = [p.kind for p in mb.products(workload, "gpubp-cupy-per-layer", widths + [batch], 132)]
    assert {kind: kinds.count(kind) for kind in ("fwd", "dw", "dx")} == {
        kind: launched.counts[f"dense_{kind}"] for kind in ("fwd", "dw", "dx")}


def test_narrow_models_run_the_fused_kernels_unless_the_backend_is_per_layer(mb, gs):
    shape = [64] * 5 + [10, 65536]
    assert {p.kernel for p in mb.products(gs.STEP_MLP64, "gpubp-cupy", shape, 132)} == {
        "fused_mlp_fwd", "fused_mlp_bwd", "fused_mlp_dw"}
    assert {p.kernel for p in mb.products(gs.STEP_MLP64, "gpubp-cupy-bf16", shape, 132)} == {
        "fused_mlp_fwd_bf16", "fused_mlp_bwd_bf16", "fused_mlp_dw_bf16"}
    assert all(p.kernel.startswith("dense_") for p in mb.products(gs.STEP_MLP64, "gpubp-cupy-per-layer", shape, 132))
    assert {p.kernel for p in mb.products(gs.STEP_MLP64, "gpubp-numba", shape, 132)} == {
        "numba:dense_forward", "numba:dense_dw", "numba:dense_dx"}


def test_baselines_and_kernel_workloads_get_no_bound(mb, gs):
    assert mb.products(gs.STEP_1024, "torch", [1024] * 4 + [8192], 132) is None
    assert mb.products(gs.FWD_4096, "cublas-unfused", "4096x4096x4096", 132) is None
    assert mb.products("kernels forward layer 64wide@65536", "gpubp-cupy", "64wide@65536", 132) is None


def test_the_single_4096_gemms_name_their_kernel(mb, gs):
    assert [p.kernel for p in mb.products(gs.FWD_4096, "gpubp-cupy", "4096x4096x4096", 132)] == ["dense_fwd_128x128"]
    assert [p.kernel for p in mb.products("tf32 4096^3 dX", "gpubp-cupy-tf32", "4096x4096x4096", 132)] == [
        "dense_dx_tf32"]
    assert [p.kernel for p in mb.products("bf16 4096^3 forward", "gpubp-cupy-bf16", "4096x4096x4096", 132)] == [
        "dense_fwd_bf16_relu"]


def test_every_kernel_a_bound_needs_is_in_the_committed_model(mb, gs, dense):
    model = json.loads((BENCH / "results" / "kernel_model.json").read_text())
    shapes = {gs.FWD_4096: "4096x4096x4096"} | {w: widths + [batch] for w, (widths, batch) in dense.STEP_WORKLOADS.items()}
    shapes |= {gs.STEP_B64: dense.SMALL_STEP[0] + [dense.SMALL_STEP[1]], gs.FROZEN_STEP: dense.FROZEN_MODEL[0] + [8192],
               gs.FROZEN_FORWARD: dense.FROZEN_MODEL[0] + [8192]}
    shapes |= {f"{p} 4096^3 {g}": "4096x4096x4096" for p in ("tf32", "bf16") for g in dense.TF32_GEMMS}
    backends_ = ["gpubp-cupy", "gpubp-cupy-tf32", "gpubp-cupy-bf16", "gpubp-cupy-per-layer", "gpubp-numba"]
    needed = {p.kernel for w, shape in shapes.items() for b in backends_ for p in mb.products(w, b, shape, 132) or []}
    assert needed - set(model["kernels"]) == set()
    assert len(needed) > 12


def test_the_sm_clock_is_nvidia_smis_max_else_the_device_clock_rate(mb):
    assert mb.sm_clock_hz(H200_FACTS) == 1980e6
    assert mb.sm_clock_hz({"nvidia_smi": "nvidia-smi: not found", "device": {"clockRate": 1755000}}) == 1755e6
    assert mb.sm_clock_hz({"nvidia_smi": "nvidia-smi: not found", "device": {}}) is None


def test_the_share_out_charges_the_busiest_sm(mb):
    assert mb.share_out(132, 132) == 1.0
    assert mb.share_out(133, 132) == 133 / 264
    assert mb.share_out(1, 132) == 1 / 132
    assert mb.share_out(None, 132) == 1.0


def test_the_bound_is_the_flops_at_the_ceiling_of_the_devices_peak(mb, gs):
    report = shaped_report([(gs.FWD_4096, "gpubp-cupy", "4096x4096x4096", 4.0),
                            ("tf32 4096^3 dW", "gpubp-cupy-tf32", "4096x4096x4096", 1.0),
                            (gs.FWD_4096, "cublas-unfused", "4096x4096x4096", 3.0)])
    model = fake_model(["dense_fwd_128x128"], ceiling=0.8)
    model["kernels"]["dense_dw_tf32"] = {"issue_ceiling": 1.0, "peak": "tensor"}
    bounds = mb.model_bounds(report, model, H200_FACTS, "00" * 32)
    assert bounds["sms"] == 132 and bounds["sm_clock_mhz"] == 1980 and bounds["model_is_of_these_kernels"]
    fp32_peak = 132 * 4 * 64 * 1980e6
    tiles = 32 * 32  # 1024 blocks: the busiest SMs run 8, so 1024 / (8 * 132) of the time does work
    expected = 2 * 4096**3 / (0.8 * fp32_peak * tiles / (8 * 132))
    row = bounds["benchmarks"][f"{gs.FWD_4096} | gpubp-cupy"]
    assert row["bound_ms"] == pytest.approx(expected * 1e3, abs=1e-4)
    assert row["ratio"] == pytest.approx(4.0e-3 / expected, abs=0.01) and row["kernels"] == {"dense_fwd_128x128": 0.8}
    tf32 = bounds["benchmarks"]["tf32 4096^3 dW | gpubp-cupy-tf32"]
    tf32_tiles = 32 * 32  # 128x128 tiles, dW's batch unsplit since they fill the SMs
    assert tf32["bound_ms"] == pytest.approx(
        2 * 4096**3 / (132 * 4 * 512 * 1830e6 * tf32_tiles / (8 * 132)) * 1e3, abs=1e-4)
    assert set(bounds["benchmarks"]) == {f"{gs.FWD_4096} | gpubp-cupy", "tf32 4096^3 dW | gpubp-cupy-tf32"}


def test_the_bound_takes_the_figures_and_rates_of_the_devices_architecture(mb, gs):
    report = shaped_report([(gs.FWD_4096, "gpubp-cupy", "4096x4096x4096", 4.0)])
    model = fake_model(["dense_fwd_128x128"], ceiling=0.8)
    model["other_archs"] = {"sm_80": {"dense_fwd_128x128": {"issue_ceiling": 0.5, "peak": "fp32"}}}
    a100 = {"device": {"multiProcessorCount": 108, "clockRate": 1410000}, "compute_capability": "80"}
    bounds = mb.model_bounds(report, model, a100, "00" * 32)
    row = bounds["benchmarks"][f"{gs.FWD_4096} | gpubp-cupy"]
    assert bounds["arch"] == "sm_80" and row["kernels"] == {"dense_fwd_128x128": 0.5}
    peak = 108 * 4 * 32 * 1410e6  # sm_80: an FFMA takes a sub-partition's 16 FP32 lanes 2 cycles
    assert row["bound_ms"] == pytest.approx(2 * 4096**3 / (0.5 * peak * 1024 / (10 * 108)) * 1e3, abs=1e-4)
    rtx = {**H200_FACTS, "compute_capability": "86"}
    assert mb.model_bounds(report, model, rtx, "00" * 32) == {
        "error": "the kernel model has no figures for sm_86, the device's architecture"}


def test_a_kernel_the_model_lacks_or_missing_device_numbers_are_said(mb, gs):
    report = shaped_report([(gs.FWD_4096, "gpubp-cupy", "4096x4096x4096", 4.0)])
    bounds = mb.model_bounds(report, fake_model(["dense_fwd_128x64"]), H200_FACTS, "11" * 32)
    assert not bounds["model_is_of_these_kernels"]
    assert bounds["benchmarks"][f"{gs.FWD_4096} | gpubp-cupy"] == {
        "error": "the kernel model has no issue ceiling for dense_fwd_128x128"}
    table = "\n".join(mb.markdown(bounds))
    assert "regenerate it" in table and "no issue ceiling for dense_fwd_128x128" in table
    assert "error" in mb.model_bounds(report, fake_model(["dense_fwd_128x128"]), {"device": {}}, "00" * 32)


def test_main_puts_the_models_bounds_beside_the_measured_times(gs, tmp_path, monkeypatch):
    monkeypatch.setenv(gs.COMMIT_ENV, "f" * 40)
    (tmp_path / "bench.json").write_text(json.dumps(shaped_report([(gs.FWD_4096, "gpubp-cupy", "4096x4096x4096", 4.0)])))
    (tmp_path / "facts.json").write_text(json.dumps(H200_FACTS))
    (tmp_path / "model.json").write_text(json.dumps(fake_model(["dense_fwd_128x128"], sha=gs.kernels_sha256())))
    out = tmp_path / "results"
    args = ["--device", "NVIDIA H200", "--benchmark", str(tmp_path / "bench.json"), "--facts", str(tmp_path / "facts.json"),
            "--out-dir", str(out)]
    gs.main([*args, "--kernel-model", str(tmp_path / "model.json")])
    data = json.loads((out / "gpu_summary.json").read_text())
    row = data["model_bounds"]["benchmarks"][f"{gs.FWD_4096} | gpubp-cupy"]
    assert row["measured_ms"] == 4.0 and row["bound_ms"] > 0
    table = (out / "NVIDIA_H200.md").read_text()
    assert f"| {gs.FWD_4096} | gpubp-cupy | {row['bound_ms']:.3f} | 4.000 |" in table
    assert "regenerate" not in table
    gs.main([*args, "--kernel-model", str(tmp_path / "none.json")])
    assert "model_bounds" not in json.loads((out / "gpu_summary.json").read_text())
