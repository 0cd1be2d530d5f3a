"""Write the record of one GPU check: bench/results/gpu_summary.json and bench/results/<device>.md.

    python bench/gpu_summary.py --device "NVIDIA H100 80GB HBM3" --junit gpu.xml --junit rest.xml \\
        --sanitizer-dir logs/ --benchmark bench.json --out-dir bench/results
    python bench/gpu_summary.py --file-stem "NVIDIA H100 80GB HBM3"    # NVIDIA_H100_80GB_HBM3

``bash bench/gpu_check.sh`` runs this last, on what its earlier steps wrote:

- ``--junit``: pytest's ``--junitxml`` reports (one per test run); their counts are summed.
- ``--sanitizer-dir``: ``<tool>.log`` (compute-sanitizer's output) and ``<tool>.status`` (its
  exit status) for each tool in ``SANITIZER_TOOLS``; a tool with no log reads "not run".
- ``--benchmark``: the pytest-benchmark JSON of bench/test_gpu_dense.py, whose benchmarks name
  their ``workload``, ``backend`` and ``device`` in ``extra_info``; given more than once (parts
  of the file run separately), the reports are merged (``merge``): only the benchmarks of
  ``--device`` are kept, and of a benchmark in several reports the newest report's.
- ``--benchmark-lines``: a file bench/benchmark_lines.py wrote as each benchmark of a pytest run
  finished, one JSON line each (``read_benchmark_lines``), beside the run's ``--benchmark``
  report of the same name but ``.json``. The benchmarks that report lacks (all of them where it
  is missing or cannot be read: the run's process died before writing it) are taken from the
  line file; of one in both, the report's (``read_benchmarks``).
- ``--steps``, ``--facts``: the first-contact stage's steps file and bench/first_contact.py's
  facts JSON, tabulated in the markdown; ``--command`` names the command that reproduces it.
- ``--results-out DIR``: also write the JSON, the markdown and the merged benchmark report into
  DIR, as ``carry`` does: what is taken off a GPU machine (gpu_check.sh copies the raw inputs).

Every input is read softly: one that cannot be read (a file a step cut off mid-write leaves
truncated) is left out and its error recorded as ``<input>_error`` (junit_error,
benchmark_error, sanitizer_error, steps_error, facts_error), so the record is still written.

The JSON has exactly these keys: device, date, commit (see ``source_commit``: the commit the
measured tree is, or "unknown"), kernels_sha256 (over the bytes of kernels/*.cu and
kernels/*.cuh concatenated in sorted path order), tests {passed, failed, skipped}
(errors count as failed; null when there is no junit report to read), sanitizer {tool:
"clean" | its first error | "cut off ..." | "not run"}, ratios, timings_ms (the median of each
benchmark's rounds, keyed "<workload> | <backend>"), and, past the issue's schema,
launches_per_step ({"kernels": n, "host_launches": m} per training-step benchmark),
tree_sha256 (``tree_sha256``: the source measured, which names its commit where git cannot),
goals ({ratio: {comparison, threshold, measured, met}} for each of ``GOALS``; measured and met
are null where a benchmark of the ratio is missing), timing_stats ({"<workload> | <backend>":
{dtype, rounds, iqr_ms, min_ms, max_ms}}: how far the rounds behind each median spread),
benchmark_conflicts (a benchmark found in more than one report: each report's datetime and
median, and which was kept),
benchmarks_of_other_devices ({device: count} of the benchmarks left out),
benchmarks_recovered ({"<workload> | <backend>": the line file it came from} for each benchmark
taken from a ``--benchmark-lines`` file: its pytest run died before its report held it), where
bench/results/kernel_model.json exists, model_bounds: the kernel model's bound beside each
measured gpubp benchmark (bench/model_bounds.py says how it is made), and the ``<input>_error``
of any input that could not be read.

Every time is host wall clock per call, ending in a device synchronize, so Python's dispatch
and the kernel launches are in it, the ``kernels ...`` workloads' too (they time the dense
kernels' calls without a model around them, not the device's time). A ratio's two medians are
of one device, though not always of one process (parts run apart; first-contact's Numba group
takes the CuPy step's time from an earlier group). A speed ratio is baseline time / gpubp
time, so more than 1 means gpubp is faster; ``frozen_step_vs_forward`` is a cost ratio, frozen
step time / forward time (lower is better, 1.0 is the floor).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SANITIZER_TOOLS = ("memcheck", "racecheck", "initcheck", "synccheck")

# Workloads of bench/test_gpu_dense.py that the ratios read (that file imports these names).
FWD_4096 = "forward 4096x4096x4096 relu"
STEP_1024 = "train step 1024-1024-1024-1024@8192"
STEP_MLP64 = "train step 64-64-64-64-64-10@65536"
STEP_B64 = "train step 784-256-256-10@64"
FROZEN_STEP = "frozen-backbone step 256-512-512-512-10@8192"
FROZEN_FORWARD = "forward 256-512-512-512-10@8192"
# One 4096^3 GEMM of a layer on tensor cores ("tf32" or "bf16"; gemm "forward", "dX" or "dW").
GEMM_4096 = "{precision} 4096^3 {gemm}"
# The activations of its models (gpubp_model): relu hidden layers and a linear head.
HIDDEN_ACT, HEAD_ACT = "relu", "identity"

# name -> ((workload, backend) whose time is the numerator, (workload, backend) the denominator)
RATIOS = {
    "fwd_4096_fp32_vs_cublas": ((FWD_4096, "cublas-gemm"), (FWD_4096, "gpubp-cupy")),
    "fwd_4096_fp32_vs_cublas_unfused": ((FWD_4096, "cublas-unfused"), (FWD_4096, "gpubp-cupy")),
    "fwd_4096_tf32_vs_cublas": ((GEMM_4096.format(precision="tf32", gemm="forward"), "cublas-tf32"),
                                (GEMM_4096.format(precision="tf32", gemm="forward"), "gpubp-cupy-tf32")),
    "fwd_4096_bf16_vs_cublas": ((GEMM_4096.format(precision="bf16", gemm="forward"), "cublas-bf16"),
                                (GEMM_4096.format(precision="bf16", gemm="forward"), "gpubp-cupy-bf16")),
    "step_1024_vs_torch_eager": ((STEP_1024, "torch"), (STEP_1024, "gpubp-cupy")),
    "step_1024_vs_torch_compile": ((STEP_1024, "torch-compile"), (STEP_1024, "gpubp-cupy")),
    "step_1024_bf16_vs_torch_eager": ((STEP_1024, "torch-bf16"), (STEP_1024, "gpubp-cupy-bf16")),
    "mlp64_step_vs_torch_eager": ((STEP_MLP64, "torch"), (STEP_MLP64, "gpubp-cupy")),
    "mlp64_step_vs_torch_compile": ((STEP_MLP64, "torch-compile"), (STEP_MLP64, "gpubp-cupy")),
    "mlp64_step_fused_vs_per_layer": ((STEP_MLP64, "gpubp-cupy-per-layer"), (STEP_MLP64, "gpubp-cupy")),
    "mlp64_step_bf16_vs_torch_eager": ((STEP_MLP64, "torch-bf16"), (STEP_MLP64, "gpubp-cupy-bf16")),
    "numba_vs_cupy_1024": ((STEP_1024, "gpubp-cupy"), (STEP_1024, "gpubp-numba")),
    "frozen_step_vs_forward": ((FROZEN_STEP, "gpubp-cupy"), (FROZEN_FORWARD, "gpubp-cupy")),
    "step_b64_graph_vs_torch_eager": ((STEP_B64, "torch"), (STEP_B64, "gpubp-cupy-graph")),
    "step_b64_graph_vs_eager": ((STEP_B64, "gpubp-cupy"), (STEP_B64, "gpubp-cupy-graph")),
}
RATIO_MEANINGS = {
    "fwd_4096_fp32_vs_cublas": "cuBLAS SGEMM alone (cupy.matmul) / gpubp forward with its fused bias and relu, "
                               "4096^3, TF32 off",
    "fwd_4096_fp32_vs_cublas_unfused": "cuBLAS SGEMM + bias + relu as separate passes / gpubp fused forward (relu), "
                                       "4096^3, TF32 off",
    "fwd_4096_tf32_vs_cublas": "cuBLAS TF32 GEMM alone (torch.matmul) / gpubp TF32 forward with its bias and relu, "
                               "4096^3",
    "fwd_4096_bf16_vs_cublas": "torch.matmul under bf16 autocast (its casts and cuBLAS's bf16 GEMM) / gpubp bf16 "
                               "forward with its bias, relu and rounding passes, 4096^3",
    "step_1024_vs_torch_eager": "PyTorch eager / gpubp-cupy, train step 1024-1024-1024-1024 @ 8192, Adam",
    "step_1024_vs_torch_compile": "torch.compile / gpubp-cupy, the 1024 train step",
    "step_1024_bf16_vs_torch_eager": "PyTorch eager under bf16 autocast / gpubp-cupy's per-layer kernels in bf16, "
                                     "the 1024 train step",
    "mlp64_step_vs_torch_eager": "PyTorch eager / gpubp-cupy (fused MLP kernels), train step 64-64-64-64-64-10 @ 65536, "
                                 "Adam",
    "mlp64_step_vs_torch_compile": "torch.compile / gpubp-cupy (fused MLP kernels), the mlp64 train step",
    "mlp64_step_fused_vs_per_layer": "gpubp-cupy per-layer kernels / fused MLP kernels, the mlp64 train step",
    "mlp64_step_bf16_vs_torch_eager": "PyTorch eager under bf16 autocast / gpubp fused MLP kernels in bf16, "
                                      "the mlp64 train step",
    "numba_vs_cupy_1024": "gpubp-cupy / gpubp-numba, the 1024 train step",
    "frozen_step_vs_forward": "frozen-backbone step / forward, 256-512-512-512-10 @ 8192 (cost: lower is better)",
    "step_b64_graph_vs_torch_eager": "PyTorch eager / gpubp-cupy replaying a CUDA graph, train step 784-256-256-10 "
                                     "@ 64, Adam",
    "step_b64_graph_vs_eager": "gpubp-cupy eager / the same step replayed from a CUDA graph, 784-256-256-10 @ 64",
}
# The speed goals, as (comparison, threshold) on a ratio of RATIOS: the headline ones, issue
# 28's tensor-core ones (the forward against cuBLAS at the same precision, the bf16 step against
# PyTorch's), and the frozen-backbone step's cost (bench/test_finetune.py's target).
GOALS = {
    "fwd_4096_fp32_vs_cublas": (">=", 0.9),
    "step_1024_vs_torch_eager": (">=", 1.2),
    "mlp64_step_vs_torch_eager": (">=", 3.0),
    "step_b64_graph_vs_torch_eager": (">=", 2.0),
    "numba_vs_cupy_1024": (">=", 0.5),
    "fwd_4096_tf32_vs_cublas": (">=", 0.7),
    "fwd_4096_bf16_vs_cublas": (">=", 0.6),
    "step_1024_bf16_vs_torch_eager": (">=", 1.2),
    "frozen_step_vs_forward": ("<=", 1.1),
}

# compute-sanitizer prefixes its own lines with this; continuation lines are indented after it.
SANITIZER_PREFIX = "========="
_SANITIZER_INFO = ("COMPUTE-SANITIZER", "ERROR SUMMARY", "RACECHECK SUMMARY", "LEAK SUMMARY",
                   "Target application returned an error")
# What compute-sanitizer says of a target that a signal ended: of a run cut off, the cut itself.
_SANITIZER_SIGNALLED = "Error: process didn't terminate successfully"


def kernels_sha256(root: Path = ROOT) -> str:
    """sha256 over the bytes of kernels/*.cu and kernels/*.cuh, concatenated in sorted path order."""
    digest = hashlib.sha256()
    for path in sorted([*(root / "kernels").glob("*.cu"), *(root / "kernels").glob("*.cuh")]):
        digest.update(path.read_bytes())
    return digest.hexdigest()


# The source a GPU run measures, for ``tree_sha256``: every file below these folders, these files.
TREE_FOLDERS = ("gpubp", "kernels", "tests")
TREE_FILES = ("bench/*.py", "bench/*.sh", "pyproject.toml", "CMakeLists.txt")
# What is not source there (as .gitignore has it): caches, build outputs, results.
_NOT_SOURCE_FOLDERS = {"__pycache__", ".pytest_cache", ".hypothesis", ".benchmarks", "results", "_aot"}
_NOT_SOURCE_SUFFIXES = (".pyc", ".pyo", ".pyd", ".fatbin")


def tree_files(root: Path = ROOT) -> list[str]:
    """The paths (relative, with /) that ``tree_sha256`` hashes, sorted."""
    paths = [p for folder in TREE_FOLDERS for p in (root / folder).rglob("*")]
    paths += [p for pattern in TREE_FILES for p in root.glob(pattern)]
    return sorted({p.relative_to(root).as_posix() for p in paths
                   if p.is_file() and not p.name.endswith(_NOT_SOURCE_SUFFIXES)
                   and not _NOT_SOURCE_FOLDERS & set(p.relative_to(root).parts[:-1])
                   and not any(part.endswith(".egg-info") for part in p.relative_to(root).parts)})


def tree_sha256(root: Path = ROOT) -> str:
    """sha256 of ``sha256sum``'s lines ("<sha256 of the file>  <path>\\n") for ``tree_files``,
    in sorted path order: what the record names the measured source by, where a copy of the
    project has no git history to name its commit. To find which commit a result came from,
    recompute it on a checkout of a candidate (``git worktree add /tmp/at <commit>``, or
    ``git archive <commit> | tar -x -C /tmp/at``), which holds no caches:

        python bench/gpu_summary.py --tree-sha256 /tmp/at
    """
    digest = hashlib.sha256()
    for path in tree_files(root):
        digest.update(f"{hashlib.sha256((root / path).read_bytes()).hexdigest()}  {path}\n".encode())
    return digest.hexdigest()


COMMIT_ENV = "GPUBP_COMMIT"
# `git archive` writes the archived commit into this file (.gitattributes marks it export-subst);
# in a git work tree it holds the placeholder.
COMMIT_FILE = Path("bench") / "commit.txt"
_SHA = re.compile(r"[0-9a-f]{40}")


def git_commit(root: Path = ROOT) -> str:
    """HEAD's sha, with "-dirty" when tracked files differ from it (the tree measured is not HEAD)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    sha = git("rev-parse", "HEAD")
    return sha + "-dirty" if git("status", "--porcelain", "--untracked-files=no") else sha


def source_commit(root: Path = ROOT) -> str:
    """The commit of the tree being measured, in any copy of it; never raises.

    ``GPUBP_COMMIT`` when set (for a copy made some other way, such as the working tree a GPU
    machine is sent); else, in a git work tree, ``git_commit``; else the commit ``git archive``
    recorded in bench/commit.txt (a release tarball); else "unknown"."""
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV]
    if (root / ".git").exists():
        try:
            return git_commit(root)
        except (OSError, subprocess.CalledProcessError):  # no git, or not a repository after all
            pass
    recorded = root / COMMIT_FILE
    if recorded.is_file() and _SHA.fullmatch(recorded.read_text().strip()):
        return recorded.read_text().strip()
    return "unknown"


def count_tests(reports: list[ET.ElementTree]) -> dict[str, int] | None:
    """{passed, failed, skipped} summed over parsed pytest --junitxml reports; errors count as
    failed. None without a report: the tests did not run (or wrote nothing), not 0 of 0."""
    if not reports:
        return None
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    for report in reports:
        root = report.getroot()
        suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
        for suite in suites:
            tests, skipped = int(suite.get("tests", 0)), int(suite.get("skipped", 0))
            failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
            counts["failed"] += failed
            counts["skipped"] += skipped
            counts["passed"] += tests - failed - skipped
    return counts


def junit_counts(junit_paths: list[Path]) -> dict[str, int] | None:
    """``count_tests`` of the pytest --junitxml reports at ``junit_paths``."""
    return count_tests([ET.parse(path) for path in junit_paths])


# The exit status gpu_check.sh's sanitize() leaves while the sanitizer runs, and keeps when the
# step's timeout stops it (timeout's own status for a command it stopped).
CUT_OFF = 124
# bench/sanitizer_driver.py's lines start so: the last says how far a cut-off run got.
DRIVER_PREFIX = "sanitizer driver:"


def sanitizer_result(log: str, status: int) -> str:
    """"clean", or the first error compute-sanitizer reported (its headline), or why the run
    failed: for a run cut off (``CUT_OFF``), where the driver had got to."""
    last_other = last_progress = ""
    for line in log.splitlines():
        if not line.startswith(SANITIZER_PREFIX):
            last_other = line.strip() or last_other
            last_progress = line.strip() if line.startswith(DRIVER_PREFIX) else last_progress
            continue
        message = line[len(SANITIZER_PREFIX):]
        if message.startswith(" ") and not message.startswith("  "):
            message = message.strip()
            if message.startswith(_SANITIZER_SIGNALLED) and status == CUT_OFF:
                continue
            if message and not message.startswith(_SANITIZER_INFO):
                return message
    if status == 0:
        return "clean"
    if status == CUT_OFF:
        return f"cut off before it finished, no error found; last: {last_progress or last_other or 'no output'}"
    return f"exit status {status}: {last_other or 'no output'}"


def sanitizer_results(log_dir: Path | None) -> dict[str, str]:
    """``sanitizer_result`` per tool of ``SANITIZER_TOOLS`` from ``<tool>.log`` and
    ``<tool>.status`` in ``log_dir``: "not run" without a log; a status that is missing or not a
    number (its writer was stopped) reads as ``CUT_OFF``."""
    results = {}
    for tool in SANITIZER_TOOLS:
        log = log_dir / f"{tool}.log" if log_dir else None
        if log is None or not log.exists():
            results[tool] = "not run"
            continue
        status_file = log_dir / f"{tool}.status"
        status = status_file.read_text().strip() if status_file.is_file() else ""
        results[tool] = sanitizer_result(log.read_text(errors="replace"), int(status) if status.isdigit() else CUT_OFF)
    return results


def _report_time(report: dict) -> datetime.datetime:
    """When pytest-benchmark wrote ``report`` (its "datetime"), for ordering; the earliest time
    for a report that does not say."""
    try:
        when = datetime.datetime.fromisoformat(report["datetime"])
    except (KeyError, TypeError, ValueError):
        return datetime.datetime.min.replace(tzinfo=datetime.timezone.utc)
    return when if when.tzinfo else when.replace(tzinfo=datetime.timezone.utc)


def _benchmark_key(bench: dict) -> str:
    """What names a benchmark across reports: its "workload | backend", which the summary keys
    its times by, else pytest's name of it."""
    info = bench.get("extra_info", {})
    if "workload" in info and "backend" in info:
        return f"{info['workload']} | {info['backend']}"
    return bench.get("fullname") or bench.get("name", "")


def merge(reports: list[dict], device: str | None = None) -> dict:
    """One pytest-benchmark report from several (runs of parts of a benchmark file, stages run
    apart, say). With ``device``, only the benchmarks whose ``extra_info["device"]`` is that
    device: a ratio must not divide one GPU's time by another's; the others are counted per
    device they name under "other_devices". Of a benchmark in more than one report, the one
    from the newest report (its "datetime"; of equal ones, the later given) is kept, whatever
    order the files were named in, and each report's datetime and median is listed under
    "conflicts"."""
    found: dict[str, list[tuple[datetime.datetime, int, dict, dict]]] = {}
    other_devices: dict[str, int] = {}
    for index, report in enumerate(reports):
        for bench in report.get("benchmarks", []):
            named = bench.get("extra_info", {}).get("device")
            if device is not None and named != device:
                other_devices[str(named)] = other_devices.get(str(named), 0) + 1
                continue
            found.setdefault(_benchmark_key(bench), []).append((_report_time(report), index, report, bench))
    benchmarks, conflicts = [], {}
    for key, copies in found.items():
        newest = max(copies, key=lambda copy: copy[:2])
        benchmarks.append(newest[3])
        if len(copies) > 1:
            conflicts[key] = [{"datetime": report.get("datetime"), "kept": bench is newest[3],
                               "median_ms": round(bench["stats"]["median"] * 1e3, 4)} for _, _, report, bench in copies]
    return {"benchmarks": benchmarks, "conflicts": conflicts, "other_devices": other_devices}


# bench/benchmark_lines.py's file of a pytest run's benchmarks, beside its report: <report stem>.jsonl
LINES_SUFFIX = ".jsonl"


def benchmark_lines_path(report: Path) -> Path:
    """The line file that goes with the pytest-benchmark report at ``report``."""
    return report.with_suffix(LINES_SUFFIX)


def read_benchmark_lines(path: Path) -> dict:
    """A pytest-benchmark report of the benchmarks bench/benchmark_lines.py wrote into ``path``
    as each finished: one JSON object a line, a benchmark as the report holds it and the
    "datetime" it was written, which becomes the report's (its latest line's). A line that does
    not parse (a kill mid-write cuts the last) is left out; of a benchmark written twice, the
    later line is kept."""
    found: dict[str, dict] = {}
    times = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            bench = json.loads(line)
        except ValueError:
            continue
        if isinstance(bench, dict) and isinstance(bench.get("stats"), dict):
            times.append(bench.pop("datetime", None))
            found.pop(_benchmark_key(bench), None)
            found[_benchmark_key(bench)] = bench
    report: dict = {"benchmarks": list(found.values())}
    when = max((t for t in times if t), key=lambda t: _report_time({"datetime": t}), default=None)
    if when is not None:
        report["datetime"] = when
    return report


def with_lines(reports: dict[Path, dict], lines: dict[Path, dict]) -> tuple[list[dict], dict[str, tuple[dict, str]]]:
    """The pytest-benchmark ``reports`` (path -> report), each with the benchmarks it lacks from
    its line file in ``lines`` (path -> ``read_benchmark_lines``; ``benchmark_lines_path``
    pairs them), and, as a report of its own, a line file whose report is not in ``reports``
    (missing, or unreadable); and {key: (benchmark, the line file's name)} of each benchmark
    taken from a line file. Of a benchmark in both, the report's is taken."""
    out = {path.resolve(): dict(report) for path, report in reports.items()}
    recovered: dict[str, tuple[dict, str]] = {}
    for path, found in lines.items():
        report = out.setdefault(path.with_suffix(".json").resolve(), {**found, "benchmarks": []})
        held = {_benchmark_key(bench) for bench in report.get("benchmarks", [])}
        taken = [bench for bench in found["benchmarks"] if _benchmark_key(bench) not in held]
        report["benchmarks"] = [*report.get("benchmarks", []), *taken]
        recovered.update((_benchmark_key(bench), (bench, path.name)) for bench in taken)
    return list(out.values()), recovered


def read_benchmarks(reports: list[Path], lines: list[Path], device: str | None, errors: dict[str, str]) -> dict:
    """``merge`` of the pytest-benchmark reports at ``reports`` and the line files at ``lines``
    (``with_lines``) that exist, each read softly (``read_softly``, into ``errors``), with
    "recovered": {key: line file's name} for each benchmark kept that came from a line file."""
    found = {path: report for path in reports if path.exists()
             for report in read_softly([path], lambda p: json.loads(p.read_text()), errors, "benchmark_error")}
    written = {path: report for path in lines if path.exists()
               for report in read_softly([path], read_benchmark_lines, errors, "benchmark_error")}
    merged, recovered = with_lines(found, written)
    report = merge(merged, device)
    report["recovered"] = {key: name for key, (bench, name) in recovered.items()
                           if any(kept is bench for kept in report["benchmarks"])}
    return report


def merge_reports(paths: list[Path]) -> dict:
    """``merge`` of the pytest-benchmark reports at ``paths`` that exist, for a table of one
    device: ValueError, naming the devices, where their benchmarks are of more than one."""
    reports = [json.loads(path.read_text()) for path in paths if path.exists()]
    devices = sorted({str(bench.get("extra_info", {}).get("device")) for report in reports
                      for bench in report.get("benchmarks", [])})
    if len(devices) > 1:
        raise ValueError(f"the benchmarks are of {len(devices)} devices ({', '.join(devices)}): "
                         "a table compares one device's, so give the files of one")
    return merge(reports)


def read_softly(paths: list[Path], read, errors: dict[str, str], key: str) -> list:
    """``read(path)`` for each of ``paths``; one that raises (a file cut off mid-write, say) is
    left out and its error added to ``errors[key]``, so that the record is written whatever
    one input holds."""
    found = []
    for path in paths:
        try:
            found.append(read(path))
        except Exception as exc:  # noqa: BLE001 - recorded in the summary, which is still written
            error = f"{path.name}: {type(exc).__name__}: {' '.join(str(exc).split())}"[:500]
            errors[key] = f"{errors[key]}; {error}" if key in errors else error
    return found


def benchmark_medians(report: dict) -> dict[tuple[str, str], float]:
    """{(workload, backend): median seconds} for every benchmark that names both."""
    medians = {}
    for bench in report.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if "workload" in info and "backend" in info:
            medians[(info["workload"], info["backend"])] = bench["stats"]["median"]
    return medians


def timing_stats(report: dict) -> dict[str, dict]:
    """{"workload | backend": {dtype, rounds, iqr_ms, min_ms, max_ms}} for every benchmark that
    names both: what a median alone hides (a spread this wide, or 5 rounds, says to read the
    median loosely); None for a statistic the report lacks."""
    def ms(stats, name):
        return round(stats[name] * 1e3, 4) if isinstance(stats.get(name), (int, float)) else None

    out = {}
    for bench in report.get("benchmarks", []):
        info, stats = bench.get("extra_info", {}), bench.get("stats", {})
        if "workload" in info and "backend" in info:
            out[f"{info['workload']} | {info['backend']}"] = {
                "dtype": info.get("dtype"), "rounds": stats.get("rounds"), "iqr_ms": ms(stats, "iqr"),
                "min_ms": ms(stats, "min"), "max_ms": ms(stats, "max")}
    return dict(sorted(out.items()))


def goals(measured: dict[str, float | None]) -> dict[str, dict]:
    """Each of GOALS beside its measured ratio (``ratios``' value): met true or false, null
    where the ratio is (a benchmark missing)."""
    out = {}
    for name, (comparison, threshold) in GOALS.items():
        value = measured.get(name)
        met = None if value is None else value >= threshold if comparison == ">=" else value <= threshold
        out[name] = {"comparison": comparison, "threshold": threshold, "measured": value, "met": met}
    return out


def ratios(medians: dict[tuple[str, str], float]) -> dict[str, float | None]:
    """Each of RATIOS as numerator time / denominator time; None where a benchmark is missing."""
    out = {}
    for name, (numerator, denominator) in RATIOS.items():
        if numerator in medians and denominator in medians and medians[denominator] > 0:
            out[name] = round(medians[numerator] / medians[denominator], 4)
        else:
            out[name] = None
    return out


def launches_per_step(report: dict) -> dict[str, dict[str, int]]:
    """{"workload | backend": {"kernels": n, "host_launches": m}} for every step benchmark that
    counted them: kernels run per training step (gpubp's trace, the PyTorch profiler), and
    launches made from Python (1 for a step replayed from a CUDA graph)."""
    counts = {}
    for bench in report.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if "kernels_per_step" in info and "workload" in info and "backend" in info:
            counts[f"{info['workload']} | {info['backend']}"] = {
                "kernels": info["kernels_per_step"], "host_launches": info["host_launches_per_step"]}
    return dict(sorted(counts.items()))


def timings_ms(medians: dict[tuple[str, str], float]) -> dict[str, float]:
    return {f"{workload} | {backend}": round(seconds * 1e3, 4)
            for (workload, backend), seconds in sorted(medians.items())}


def summary(*, device: str, date: str, commit: str, kernels: str, tests: dict | None, sanitizer: dict,
            medians: dict, launches: dict | None = None, tree: str | None = None, stats: dict | None = None,
            conflicts: dict | None = None, other_devices: dict | None = None, recovered: dict | None = None) -> dict:
    """The gpu_summary.json object, keys in the issue's order, then the launch counts, the
    source tree's sha256, the goals, the spread of each timing and what merging the benchmark
    reports found (``merge``, ``read_benchmarks``)."""
    measured = ratios(medians)
    return {
        "device": device, "date": date, "commit": commit, "kernels_sha256": kernels, "tests": tests,
        "sanitizer": sanitizer, "ratios": measured, "timings_ms": timings_ms(medians),
        "launches_per_step": launches or {}, "tree_sha256": tree, "goals": goals(measured),
        "timing_stats": stats or {}, "benchmark_conflicts": conflicts or {},
        "benchmarks_of_other_devices": other_devices or {}, "benchmarks_recovered": recovered or {},
    }


def markdown(data: dict, command: str = "bash bench/gpu_check.sh", steps: list | None = None,
             facts: dict | None = None, sections: list[str] | None = None) -> str:
    """The human-readable twin of the summary: bench/results/<device>.md; with the first-contact
    stage's ``steps`` (``read_steps``) and ``facts`` (bench/first_contact.py's), sections on them;
    ``sections``: more lines, after the timings (the model's bounds)."""
    def fmt(x):
        return "missing" if x is None else f"{x:.2f}x"

    def number(x, form="{:.3f}"):
        return "?" if x is None else form.format(x)

    tests = data["tests"]
    lines = [
        f"# GPU check on {data['device']}",
        "",
        f"{data['date']}, commit `{data['commit']}`, source tree sha256 `{data.get('tree_sha256') or '?'}` "
        f"(bench/gpu_summary.py --tree-sha256), kernels sha256 `{data['kernels_sha256'][:16]}...`; "
        f"reproduce with `{command}`. Each row's dtype says its precision: float32 with TF32 off unless it "
        "reads tf32 or bf16. Every time is the median of its rounds of host wall clock per call, each call "
        "ending in a device synchronize, so Python's dispatch and the launches are in it (in the `kernels ...` "
        "rows too: the dense kernels' calls without a model, not device time).",
        "",
        "Tests: no junit report (they did not run, or wrote none)." if tests is None else
        f"Tests: {tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped"
        + (" (cut off at the step's budget: only the tests that finished)." if data.get("tests_cut_off") else "."),
        "",
        "| compute-sanitizer | result |",
        "|---|---|",
        *(f"| {tool} | {result} |" for tool, result in data["sanitizer"].items()),
        "",
        "| ratio | value | definition |",
        "|---|---|---|",
        *(f"| {name} | {fmt(value)} | {RATIO_MEANINGS.get(name, '')} |" for name, value in data["ratios"].items()),
        "",
        "| goal | target | measured | met |",
        "|---|---|---|---|",
        *(f"| {name} | {goal['comparison']} {goal['threshold']:.2f} | {fmt(goal['measured'])} "
          f"| {'not measured' if goal['met'] is None else 'yes' if goal['met'] else 'no'} |"
          for name, goal in data["goals"].items()),
        "",
        "| workload | backend | dtype | median ms | IQR ms | min-max ms | rounds |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, ms in data["timings_ms"].items():
        workload, backend = key.split(" | ")
        spread = data["timing_stats"].get(key, {})
        lines.append(f"| {workload} | {backend} | {spread.get('dtype') or '?'} | {ms:.3f} "
                     f"| {number(spread.get('iqr_ms'))} "
                     f"| {number(spread.get('min_ms'))}-{number(spread.get('max_ms'))} "
                     f"| {number(spread.get('rounds'), '{}')} |")
    if data["launches_per_step"]:
        lines += ["", "| training step | backend | kernels | launches from Python |", "|---|---|---|---|"]
        for key, count in data["launches_per_step"].items():
            workload, backend = key.split(" | ")
            lines.append(f"| {workload} | {backend} | {count['kernels']} | {count['host_launches']} |")
    if sections:
        lines += ["", *sections]
    if steps:
        lines += ["", "| first-contact step | result | seconds | budget (s) |", "|---|---|---|---|",
                  *(f"| {name} | {result} | {seconds} | {budget} |" for name, result, seconds, budget in steps)]
    if facts:
        lines += ["", *facts_markdown(facts)]
    if data["benchmarks_of_other_devices"]:
        lines += ["", "Benchmarks of other devices, left out: " + ", ".join(
            f"{device} ({count})" for device, count in data["benchmarks_of_other_devices"].items()) + "."]
    if data["benchmark_conflicts"]:
        lines += ["", "Benchmarks in more than one report (the newest report's kept):",
                  *(f"- {key}: " + "; ".join(f"{copy['median_ms']:.3f} ms at {copy['datetime'] or 'no date'}"
                                             + (" (kept)" if copy["kept"] else "") for copy in copies)
                    for key, copies in data["benchmark_conflicts"].items())]
    if data.get("benchmarks_recovered"):
        lines += ["", "Benchmarks recovered from the line files written as each finished (their pytest run died "
                  "before its report held them):",
                  *(f"- {key}: {source}" for key, source in data["benchmarks_recovered"].items())]
    unread = [f"- {key}: {value}" for key, value in data.items() if key.endswith("_error")]
    if unread:
        lines += ["", "Inputs that could not be read (left out above):", *unread]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- first contact

CARRY_FILES = 8  # what `gpu_check.sh first-contact` leaves in GPUBP_RESULTS_OUT: at most 8 files,
CARRY_BYTES = 15_000_000  # each under 16 MB (gpu_check.sh's CARRY_BYTES, for the raw files it copies),
_NOT_IN_A_CARRIED_NAME = re.compile(r"[^A-Za-z0-9._-]")  # with flat names of these characters


def read_steps(path: Path) -> list[tuple[str, str, str, str]]:
    """The first-contact steps file: one ``name<TAB>result<TAB>seconds<TAB>budget`` line per step run."""
    return [tuple(line.split("\t")) for line in path.read_text().splitlines() if line.count("\t") == 3]


def _found(pair) -> str:
    """gpubp._toolkit's (where, how it was found), or (None, why not): "where (how)"."""
    where, how = pair if isinstance(pair, (list, tuple)) and len(pair) == 2 else ("?", "?")
    return f"{'not found' if where is None else where} ({how})"


def facts_markdown(facts: dict) -> list[str]:
    """bench/first_contact.py's facts: the device, the toolkit, and each kernel file's NVRTC build."""
    device = facts.get("device", {})
    memory = device.get("totalGlobalMem")
    host = [f"Versions: {', '.join(f'{k} {v}' for k, v in facts.get('versions', {}).items())}"
            + (f"; torch sees {facts['torch_cuda']}" if "torch_cuda" in facts else "") + ".",
            "",
            f"NVRTC: {_found(facts.get('nvrtc'))}; CUDA headers: {_found(facts.get('cuda_headers'))}.",
            "", f"{facts.get('kernel_cache_files_before', '?')} files in CuPy's kernel cache before the compiles."]
    if "error" in facts:  # CuPy could not reach the GPU: what the host could say
        return [f"Device facts: {facts['error']}", "", *host, "",
                *(f"{name} unset" if value is None else f"{name}={value}"
                  for name, value in facts.get("environment", {}).items()),
                "", "```", facts.get("nvidia_smi", "nvidia-smi: not asked"), "```"]
    lines = [f"Device facts: {facts['device_facts_error']}"] if "device_facts_error" in facts else [
        f"Device: {device.get('name', '?')}, compute capability {facts.get('compute_capability', '?')}, "
        f"{device.get('multiProcessorCount', '?')} SMs, "
        + (f"{memory / 2**30:.1f} GiB" if isinstance(memory, int) else "memory ?")
        + f"; driver {facts.get('driver_version', '?')}, runtime {facts.get('runtime_version', '?')}, "
        f"NVRTC {'.'.join(map(str, facts.get('nvrtc_version', ['?'])))}."]
    lines += ["", *host]
    files = facts.get("kernel_files", {})
    if files:
        lines += ["", "| kernel file | from | NVRTC modules | compile + load (s, summed) | kernels | most registers "
                  "| most static shared (B) | local memory in |", "|---|---|---|---|---|---|---|---|"]
        for name, built in files.items():
            kernels = built.get("kernels", {})
            if "error" in built:
                lines.append(f"| {name} | error: {' '.join(built['error'].split())[:300]} | | | | | | |")
                continue
            spilling = ", ".join(k for k, v in kernels.items() if v["local_bytes"]) or "none"
            lines.append(f"| {name} | {built['origin']} | {built.get('modules', 1)} "
                         f"| {built['compile_and_load_seconds']:.2f} | {len(kernels)} "
                         f"| {max((v['registers'] for v in kernels.values()), default=0)} "
                         f"| {max((v['static_shared_bytes'] for v in kernels.values()), default=0)} | {spilling} |")
    return lines


def carry(out_dir: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` (name -> content) into ``out_dir``: what leaves the GPU machine, so at most
    CARRY_FILES, flat names of letters, digits and ``._-``, each under CARRY_BYTES (a bigger one
    keeps its start and its end around a line saying how many bytes were cut)."""
    if len(files) > CARRY_FILES:
        raise ValueError(f"files: at most {CARRY_FILES} can be carried, got {len(files)}: {sorted(files)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        if len(content) >= CARRY_BYTES:
            head = CARRY_BYTES // 3
            tail = CARRY_BYTES - head - 200
            cut = f"\n[... {len(content) - head - tail} bytes cut here: the file had {len(content)} ...]\n".encode()
            content = content[:head] + cut + content[-tail:]
        (out_dir / _NOT_IN_A_CARRIED_NAME.sub("_", name)).write_bytes(content)


def file_stem(device: str) -> str:
    """The device name as a file name: every character but letters and digits becomes '_'."""
    return "".join(c if c.isascii() and c.isalnum() else "_" for c in device) or "unknown_gpu"


KERNEL_MODEL = ROOT / "bench" / "results" / "kernel_model.json"


def bounds_beside(report: dict, facts: dict | None, model_path: Path = KERNEL_MODEL) -> tuple[dict, list[str]] | None:
    """(the summary's ``model_bounds``, its markdown lines) from bench/model_bounds.py, or None
    when there is no kernel model or no benchmark. Imported here, not above, so that this script
    also runs alone; whatever goes wrong is reported in the record, never keeps it from being
    written. Without ``facts`` the device is asked (bench/first_contact.py's facts); facts that
    hold none (CuPy could not reach the GPU) give no bound, rather than asking again."""
    if not model_path.is_file() or not report["benchmarks"]:
        return None
    bench = str(Path(__file__).resolve().parent)
    if bench not in sys.path:  # as when this runs as a script; its siblings import each other
        sys.path.insert(0, bench)
    try:
        import model_bounds

        if facts is None:
            import cupy
            from first_contact import device_facts, host_facts

            facts = {**host_facts(), **device_facts(cupy)}
        elif "device" not in facts:
            raise ValueError("the device facts hold no device")
        bounds = model_bounds.model_bounds(report, json.loads(model_path.read_text()), facts, kernels_sha256())
        return bounds, model_bounds.markdown(bounds)
    except Exception as exc:  # noqa: BLE001 - the record is written whatever this finds
        bounds = {"error": f"{type(exc).__name__}: {exc}"}
        return bounds, [f"Kernel model bounds: {bounds['error']}."]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--file-stem", metavar="DEVICE", help="only print the file name stem for DEVICE")
    parser.add_argument("--tree-sha256", metavar="DIR", type=Path, nargs="?", const=ROOT,
                        help="only print tree_sha256 of the project at DIR (this one by default)")
    parser.add_argument("--device")
    parser.add_argument("--junit", type=Path, action="append", default=[])
    parser.add_argument("--sanitizer-dir", type=Path)
    parser.add_argument("--benchmark", type=Path, action="append", default=[])
    parser.add_argument("--benchmark-lines", type=Path, action="append", default=[],
                        help="bench/benchmark_lines.py's file of a run whose --benchmark report may lack benchmarks")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--command", default="bash bench/gpu_check.sh", help="the command the report names")
    parser.add_argument("--steps", type=Path, help="the first-contact steps file")
    parser.add_argument("--facts", type=Path, help="bench/first_contact.py's facts JSON")
    parser.add_argument("--results-out", type=Path, help="also copy the JSON, the report and the merged benchmarks here")
    parser.add_argument("--kernel-model", type=Path, default=KERNEL_MODEL,
                        help="bench/kernel_model.py's JSON, whose bounds go beside the measured times")
    args = parser.parse_args(argv)
    if args.file_stem is not None:
        print(file_stem(args.file_stem))
        return 0
    if args.tree_sha256 is not None:
        print(tree_sha256(args.tree_sha256))
        return 0
    if not args.device:
        parser.error("--device is required")

    errors: dict[str, str] = {}
    report = read_benchmarks(args.benchmark, args.benchmark_lines, args.device, errors)
    sanitizer = read_softly([args.sanitizer_dir], sanitizer_results, errors, "sanitizer_error")
    data = summary(
        device=args.device, date=datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
        commit=source_commit(), kernels=kernels_sha256(),
        tests=count_tests(read_softly([p for p in args.junit if p.exists()], ET.parse, errors, "junit_error")),
        sanitizer=sanitizer[0] if sanitizer else {}, medians=benchmark_medians(report),
        launches=launches_per_step(report), tree=tree_sha256(), stats=timing_stats(report),
        conflicts=report["conflicts"], other_devices=report["other_devices"], recovered=report["recovered"],
    )
    steps = read_softly([args.steps] if args.steps and args.steps.is_file() else [], read_steps, errors, "steps_error")
    facts = read_softly([args.facts] if args.facts and args.facts.is_file() else [],
                        lambda p: json.loads(p.read_text()), errors, "facts_error")
    # With --facts (first-contact), the facts are what there is: the device is not asked again.
    bounds = bounds_beside(report, facts[0] if facts else ({} if args.facts else None), args.kernel_model)
    if bounds is not None:
        data["model_bounds"] = bounds[0]
    if steps:
        data["steps"] = [{"step": name, "result": result, "seconds": int(seconds), "budget": int(budget)}
                         for name, result, seconds, budget in steps[0]]
        # Interrupted, pytest's junit report counts only the tests that finished.
        data["tests_cut_off"] = any(step["step"] == "tests" and step["result"] == "out of time"
                                    for step in data["steps"])
    data.update(errors)
    try:
        table = markdown(data, args.command, steps[0] if steps else None, facts[0] if facts else None,
                         bounds[1] if bounds else None)
    except Exception as exc:  # noqa: BLE001  (the JSON and the results folder's files come first)
        data["report_error"] = f"{type(exc).__name__}: {exc}"
        table = f"# GPU check on {data['device']}\n\nThe report failed: {data['report_error']}; see gpu_summary.json.\n"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2) + "\n"
    (args.out_dir / "gpu_summary.json").write_text(text)
    (args.out_dir / f"{file_stem(args.device)}.md").write_text(table)
    print(table)
    if args.results_out:
        report_name = f"{file_stem(args.device)}.md"
        # A report under another name, from an earlier publish that could not ask the device its
        # name: only so many files come back from the GPU machine, and this one replaces it.
        for stale in Path(args.results_out).glob("*.md"):
            if stale.name != report_name:
                stale.unlink()
        files = {"gpu_summary.json": text.encode(), report_name: table.encode()}
        if report["benchmarks"]:
            files["benchmarks.json"] = json.dumps(report, indent=1).encode()
        carry(args.results_out, files)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
