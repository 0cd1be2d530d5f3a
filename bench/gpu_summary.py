"""Write the record of one GPU check: bench/results/gpu_summary.json and bench/results/<device>.md.

    python bench/gpu_summary.py --device "NVIDIA H100 80GB HBM3" --junit gpu.xml --junit rest.xml \\
        --sanitizer-dir logs/ --benchmark bench.json --out-dir bench/results
    python bench/gpu_summary.py --file-stem "NVIDIA H100 80GB HBM3"    # NVIDIA_H100_80GB_HBM3

``bash bench/gpu_check.sh`` runs this last, on what its earlier steps wrote:

- ``--junit``: pytest's ``--junitxml`` reports (one per test run); their counts are summed.
- ``--sanitizer-dir``: ``<tool>.log`` (compute-sanitizer's output) and ``<tool>.status`` (its
  exit status) for each tool in ``SANITIZER_TOOLS``; a tool with no log reads "not run".
- ``--benchmark``: the pytest-benchmark JSON of bench/test_gpu_dense.py, whose benchmarks name
  their ``workload`` and ``backend`` in ``extra_info``; given more than once (parts of the file
  run separately), the reports are merged.
- ``--steps``, ``--facts``: the first-contact stage's steps file and bench/first_contact.py's
  facts JSON, tabulated in the markdown; ``--command`` names the command that reproduces it.
- ``--results-out DIR``: also write the JSON, the markdown, the merged benchmark report and each
  ``--carry`` file into DIR, as ``carry`` does: what is taken off a GPU machine.

The JSON has exactly these keys: device, date, commit (see ``source_commit``: the commit the
measured tree is, or "unknown"), kernels_sha256 (over the bytes of kernels/*.cu and
kernels/*.cuh concatenated in sorted path order), tests {passed, failed, skipped}
(errors count as failed), sanitizer {tool: "clean" | its first error}, ratios, timings_ms
(the median of each benchmark's rounds, keyed "<workload> | <backend>"), and, past the issue's
schema, launches_per_step ({"kernels": n, "host_launches": m} per training-step benchmark) and,
where bench/results/kernel_model.json exists, model_bounds: the kernel model's bound beside each
measured gpubp benchmark (bench/model_bounds.py says how it is made).

Every ratio is taken from medians of one run. A speed ratio is baseline time / gpubp time,
so more than 1 means gpubp is faster; ``frozen_step_vs_forward`` is a cost ratio, frozen
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
# The activations of its models (gpubp_model): relu hidden layers and a linear head.
HIDDEN_ACT, HEAD_ACT = "relu", "identity"

# name -> ((workload, backend) whose time is the numerator, (workload, backend) the denominator)
RATIOS = {
    "fwd_4096_fp32_vs_cublas": ((FWD_4096, "cublas-unfused"), (FWD_4096, "gpubp-cupy")),
    "step_1024_vs_torch_eager": ((STEP_1024, "torch"), (STEP_1024, "gpubp-cupy")),
    "step_1024_vs_torch_compile": ((STEP_1024, "torch-compile"), (STEP_1024, "gpubp-cupy")),
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
    "fwd_4096_fp32_vs_cublas": "cuBLAS SGEMM + bias + relu / gpubp fused forward (relu), 4096^3, TF32 off",
    "step_1024_vs_torch_eager": "PyTorch eager / gpubp-cupy, train step 1024-1024-1024-1024 @ 8192, Adam",
    "step_1024_vs_torch_compile": "torch.compile / gpubp-cupy, the 1024 train step",
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

# compute-sanitizer prefixes its own lines with this; continuation lines are indented after it.
SANITIZER_PREFIX = "========="
_SANITIZER_INFO = ("COMPUTE-SANITIZER", "ERROR SUMMARY", "RACECHECK SUMMARY", "LEAK SUMMARY",
                   "Target application returned an error")


def kernels_sha256(root: Path = ROOT) -> str:
    """sha256 over the bytes of kernels/*.cu and kernels/*.cuh, concatenated in sorted path order."""
    digest = hashlib.sha256()
    for path in sorted([*(root / "kernels").glob("*.cu"), *(root / "kernels").glob("*.cuh")]):
        digest.update(path.read_bytes())
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


def junit_counts(junit_paths: list[Path]) -> dict[str, int]:
    """{passed, failed, skipped} summed over pytest --junitxml reports; errors count as failed."""
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    for path in junit_paths:
        root = ET.parse(path).getroot()
        suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
        for suite in suites:
            tests, skipped = int(suite.get("tests", 0)), int(suite.get("skipped", 0))
            failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
            counts["failed"] += failed
            counts["skipped"] += skipped
            counts["passed"] += tests - failed - skipped
    return counts


def sanitizer_result(log: str, status: int) -> str:
    """"clean", or the first error compute-sanitizer reported (its headline), or why the run failed."""
    last_other = ""
    for line in log.splitlines():
        if not line.startswith(SANITIZER_PREFIX):
            last_other = line.strip() or last_other
            continue
        message = line[len(SANITIZER_PREFIX):]
        if message.startswith(" ") and not message.startswith("  "):
            message = message.strip()
            if message and not message.startswith(_SANITIZER_INFO):
                return message
    if status == 0:
        return "clean"
    return f"exit status {status}: {last_other or 'no output'}"


def sanitizer_results(log_dir: Path | None) -> dict[str, str]:
    results = {}
    for tool in SANITIZER_TOOLS:
        log = log_dir / f"{tool}.log" if log_dir else None
        if log is None or not log.exists():
            results[tool] = "not run"
            continue
        status = int((log_dir / f"{tool}.status").read_text().strip() or 1)
        results[tool] = sanitizer_result(log.read_text(errors="replace"), status)
    return results


def merge_reports(paths: list[Path]) -> dict:
    """One pytest-benchmark report from several (runs of parts of a benchmark file, say):
    the benchmarks of each that exists, in order, so a later run of a benchmark wins."""
    benchmarks = []
    for path in paths:
        if path.exists():
            benchmarks += json.loads(path.read_text()).get("benchmarks", [])
    return {"benchmarks": benchmarks}


def benchmark_medians(report: dict) -> dict[tuple[str, str], float]:
    """{(workload, backend): median seconds} for every benchmark that names both."""
    medians = {}
    for bench in report.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if "workload" in info and "backend" in info:
            medians[(info["workload"], info["backend"])] = bench["stats"]["median"]
    return medians


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


def summary(*, device: str, date: str, commit: str, kernels: str, tests: dict, sanitizer: dict,
            medians: dict, launches: dict | None = None) -> dict:
    """The gpu_summary.json object, keys in the issue's order, then the launch counts."""
    return {
        "device": device, "date": date, "commit": commit, "kernels_sha256": kernels, "tests": tests,
        "sanitizer": sanitizer, "ratios": ratios(medians), "timings_ms": timings_ms(medians),
        "launches_per_step": launches or {},
    }


def markdown(data: dict, command: str = "bash bench/gpu_check.sh", steps: list | None = None,
             facts: dict | None = None, sections: list[str] | None = None) -> str:
    """The human-readable twin of the summary: bench/results/<device>.md; with the first-contact
    stage's ``steps`` (``read_steps``) and ``facts`` (bench/first_contact.py's), sections on them;
    ``sections``: more lines, after the timings (the model's bounds)."""
    def fmt(x):
        return "missing" if x is None else f"{x:.2f}x"

    tests = data["tests"]
    lines = [
        f"# GPU check on {data['device']}",
        "",
        f"{data['date']}, commit `{data['commit']}`, kernels sha256 `{data['kernels_sha256'][:16]}...`; "
        f"reproduce with `{command}`. fp32, TF32 off; every time is the median of its rounds.",
        "",
        f"Tests: {tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped.",
        "",
        "| compute-sanitizer | result |",
        "|---|---|",
        *(f"| {tool} | {result} |" for tool, result in data["sanitizer"].items()),
        "",
        "| ratio | value | definition |",
        "|---|---|---|",
        *(f"| {name} | {fmt(value)} | {RATIO_MEANINGS.get(name, '')} |" for name, value in data["ratios"].items()),
        "",
        "| workload | backend | median ms |",
        "|---|---|---|",
    ]
    for key, ms in data["timings_ms"].items():
        workload, backend = key.split(" | ")
        lines.append(f"| {workload} | {backend} | {ms:.3f} |")
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
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- first contact

CARRY_FILES = 8  # what `gpu_check.sh first-contact` copies to GPUBP_RESULTS_OUT: at most 8 files,
CARRY_BYTES = 15_000_000  # each under 16 MB,
_NOT_IN_A_CARRIED_NAME = re.compile(r"[^A-Za-z0-9._-]")  # with flat names of these characters


def read_steps(path: Path) -> list[tuple[str, str, str, str]]:
    """The first-contact steps file: one ``name<TAB>result<TAB>seconds<TAB>budget`` line per step run."""
    return [tuple(line.split("\t")) for line in path.read_text().splitlines() if line.count("\t") == 3]


def facts_markdown(facts: dict) -> list[str]:
    """bench/first_contact.py's facts: the device, the toolkit, and each kernel file's NVRTC build."""
    if "error" in facts:
        return [f"Device facts: {facts['error']}"]
    device = facts.get("device", {})
    memory = device.get("totalGlobalMem")
    lines = [f"Device facts: {facts['device_facts_error']}"] if "device_facts_error" in facts else [
        f"Device: {device.get('name', '?')}, compute capability {facts.get('compute_capability', '?')}, "
        f"{device.get('multiProcessorCount', '?')} SMs, "
        + (f"{memory / 2**30:.1f} GiB" if isinstance(memory, int) else "memory ?")
        + f"; driver {facts.get('driver_version', '?')}, runtime {facts.get('runtime_version', '?')}, "
        f"NVRTC {'.'.join(map(str, facts.get('nvrtc_version', ['?'])))}; "
        f"{', '.join(f'{k} {v}' for k, v in facts.get('versions', {}).items())}.",
        "",
        f"NVRTC: {' ('.join(facts.get('nvrtc', ['?', '?']))}); CUDA headers: {' ('.join(facts.get('cuda_headers', ['?', '?']))})."]
    lines += ["", f"{facts.get('kernel_cache_files_before', '?')} files in CuPy's kernel cache before the compiles."]
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
    written. Without ``facts`` the device is asked (bench/first_contact.py's device_facts)."""
    if not model_path.is_file() or not report["benchmarks"]:
        return None
    bench = str(Path(__file__).resolve().parent)
    if bench not in sys.path:  # as when this runs as a script; its siblings import each other
        sys.path.insert(0, bench)
    try:
        import model_bounds

        if facts is None or "device" not in facts:
            import cupy
            from first_contact import device_facts

            facts = device_facts(cupy)
        bounds = model_bounds.model_bounds(report, json.loads(model_path.read_text()), facts, kernels_sha256())
        return bounds, model_bounds.markdown(bounds)
    except Exception as exc:  # noqa: BLE001 - the record is written whatever this finds
        bounds = {"error": f"{type(exc).__name__}: {exc}"}
        return bounds, [f"Kernel model bounds: {bounds['error']}."]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--file-stem", metavar="DEVICE", help="only print the file name stem for DEVICE")
    parser.add_argument("--device")
    parser.add_argument("--junit", type=Path, action="append", default=[])
    parser.add_argument("--sanitizer-dir", type=Path)
    parser.add_argument("--benchmark", type=Path, action="append", default=[])
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--command", default="bash bench/gpu_check.sh", help="the command the report names")
    parser.add_argument("--steps", type=Path, help="the first-contact steps file")
    parser.add_argument("--facts", type=Path, help="bench/first_contact.py's facts JSON")
    parser.add_argument("--results-out", type=Path,
                        help="also copy the JSON, the report, the merged benchmarks and each --carry file here")
    parser.add_argument("--carry", type=Path, action="append", default=[])
    parser.add_argument("--kernel-model", type=Path, default=KERNEL_MODEL,
                        help="bench/kernel_model.py's JSON, whose bounds go beside the measured times")
    args = parser.parse_args(argv)
    if args.file_stem is not None:
        print(file_stem(args.file_stem))
        return 0
    if not args.device:
        parser.error("--device is required")

    report = merge_reports(args.benchmark)
    data = summary(
        device=args.device, date=datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
        commit=source_commit(), kernels=kernels_sha256(), tests=junit_counts([p for p in args.junit if p.exists()]),
        sanitizer=sanitizer_results(args.sanitizer_dir), medians=benchmark_medians(report),
        launches=launches_per_step(report),
    )
    steps = read_steps(args.steps) if args.steps and args.steps.is_file() else None
    facts = json.loads(args.facts.read_text()) if args.facts and args.facts.is_file() else None
    bounds = bounds_beside(report, facts, args.kernel_model)
    if bounds is not None:
        data["model_bounds"] = bounds[0]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2) + "\n"
    (args.out_dir / "gpu_summary.json").write_text(text)
    table = markdown(data, args.command, steps, facts, bounds[1] if bounds else None)
    (args.out_dir / f"{file_stem(args.device)}.md").write_text(table)
    print(table)
    if args.results_out:
        files = {"gpu_summary.json": text.encode(), f"{file_stem(args.device)}.md": table.encode()}
        if report["benchmarks"]:
            files["benchmarks.json"] = json.dumps(report, indent=1).encode()
        files.update((path.name, path.read_bytes()) for path in args.carry if path.is_file())
        carry(args.results_out, files)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
