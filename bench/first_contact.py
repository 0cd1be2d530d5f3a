"""The first minutes on a GPU: what the device is and how the kernels build on it, then the
headline benchmarks with few rounds. ``bash bench/gpu_check.sh first-contact`` runs both.

    python bench/first_contact.py facts <facts.json>
    python bench/first_contact.py bench <folder>

``facts``: first what needs no CuPy (``host_facts``: the host's kernel as ``uname`` gives it,
nvidia-smi's view (clocks, power, MIG mode), the tools' and libraries' versions, where NVRTC and
the CUDA headers are, and the variables that decide it), written before CuPy is asked, so that a
GPU CuPy cannot reach still leaves them; then the device as the CUDA runtime reports it, the
driver, runtime and NVRTC versions (``device_facts``); then every kernel file compiled by NVRTC
for this GPU through the CuPy backend (with an empty AOT folder, so no fatbin is used), with the
seconds each took to compile and load, and per kernel the registers, static shared memory and
local memory (spills) the driver reports. Each file is built as ``preload`` builds it, one NVRTC
module per GEMM kernel, with every activation it serves, and one for its other kernels
(``cupy_backend.kernel_parts``: 60 modules), so CuPy's cache then holds what the tests load
(gpu_check.sh runs them with ``GPUBP_NVRTC_ACTIVATIONS=all``); and the 14 modules a relu model's
first step builds of the kernels that take their activation at launch
(``cupy_backend.model_parts``), which the benchmarks load as a user's model would. The modules
compile side by side, one per thread (CuPy lets go of the GIL while NVRTC compiles), as many at
once as there are cores: one after another the 60 take about 114 s on one core of a 2023 server
CPU, most of the step's 130 s, and side by side about as long as the slowest module
(fused_mlp_fwd, 9 to 13 s there). The JSON is rewritten as each file's modules finish, so a run
cut short keeps what it found. The compile times are cold only when CuPy's cache
(``CUPY_CACHE_DIR``) starts empty, which ``kernel_cache_files_before`` records.

``bench``: the benchmarks of bench/test_gpu_dense.py behind the headline ratios, one pytest run
per group of ``HEADLINE``, in that order, each writing ``bench_first_contact_<group>.json`` into
the folder as soon as it finishes, with ``GPUBP_BENCH_ROUNDS`` rounds (5 unless set); a
benchmark an earlier group ran is not run again (``node_ids``), and every other group runs its
benchmarks in reverse, so that gpubp's side of a ratio runs first in a fresh process as often
as the baseline does. Each run has its ``GROUP_SECONDS`` (``GPUBP_BENCH_GROUP_SECONDS`` for
all), then SIGINT, on which pytest-benchmark still writes the benchmarks that finished, so one
that hangs costs its group, not the others; how each group ended is added to the first-contact
steps file in the folder (``STEPS_FILE``). pytest-benchmark writes its JSON only as the run ends,
so each run also has bench/benchmark_lines.py write every benchmark as it finishes into
``bench_first_contact_<group>.jsonl``: a group whose process dies hard (a segfault, a CUDA fault
that aborts) or hangs past its grace and is killed keeps what it finished, which
bench/gpu_summary.py takes from there (``read_benchmarks``) and names as recovered. A group's
JSON and line file from an earlier run are removed before it runs.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from benchmark_lines import LINES_ENV
from gpu_summary import (FWD_4096, HEAD_ACT, HIDDEN_ACT, RATIOS, STEP_1024, STEP_B64, STEP_MLP64, benchmark_lines_path,
                         read_benchmark_lines)

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent  # on the benchmark runs' path, for their ``-p benchmark_lines``
DENSE_BENCHMARKS = "bench/test_gpu_dense.py"

# The headline ratios (bench/gpu_summary.py's names) in order of value, grouped into pytest runs.
# The Numba group is last: it compiles the Numba kernels in its warm-up, the longest group, so
# it takes what the others leave of the step rather than the others' time.
HEADLINE = {
    "fwd_4096": ("fwd_4096_fp32_vs_cublas", "fwd_4096_fp32_vs_cublas_unfused"),
    "step_1024": ("step_1024_vs_torch_eager",),
    "mlp64": ("mlp64_step_vs_torch_eager",),
    "step_b64": ("step_b64_graph_vs_torch_eager", "step_b64_graph_vs_eager"),
    "numba_1024": ("numba_vs_cupy_1024",),
}
# The test of bench/test_gpu_dense.py that times each workload, as a pytest test id.
TEST_OF_WORKLOAD = {
    FWD_4096: "test_forward_4096_relu[{backend}]",
    STEP_1024: "test_train_step[{workload}-{backend}]",
    STEP_MLP64: "test_train_step[{workload}-{backend}]",
    STEP_B64: "test_small_batch_train_step[{backend}]",
}
ROUNDS = "5"
# Seconds each group's pytest run may take, a few times what one should need: PyTorch's import
# and CUDA's start are most of it (about 10 s), then per benchmark its first call, half a second
# of warm-up (test_gpu_dense.WARMUP_SECONDS) and 5 rounds. The Numba group also compiles the
# Numba kernels of the step in its first call: the seven of a relu Adam step take 6 s of a core
# of the 2-core VM they were timed on (README), so it has more. The step has 115 s
# (gpu_check.sh's 125 less its grace): four groups of about 15 s leave the Numba group about
# 40 after its grace and margin; a hang in the first group costs that group's 40 s and grace,
# and the Numba group, last, what was left. A group that would run past the step's end is
# stopped first (group_seconds), so it records what it timed.
GROUP_SECONDS = {**dict.fromkeys(HEADLINE, 40), "numba_1024": 60}
GROUP_GRACE = 10  # after the SIGINT, for pytest-benchmark to write its JSON (it asks py-cpuinfo first)
# Under gpu_check.sh the step has GPUBP_STEP_SECONDS before its own SIGINT: a group is given no
# more than what is left of that, less its grace and this margin, so that first_contact.py stops
# each group itself (and records it) rather than being stopped in the middle of one.
STEP_MARGIN = 3
# The file gpu_check.sh first-contact records each step's result in, in the check folder.
STEPS_FILE = "first_contact_steps.tsv"
TOOL_VERSIONS = {"nvcc": ["--version"], "compute-sanitizer": ["--version"], "ncu": ["--version"],
                 "cmake": ["--version"]}
SMI_QUERY = ("name,driver_version,pstate,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,"
             "temperature.gpu,persistence_mode,mig.mode.current,ecc.mode.current")


def node_ids(group: str) -> list[str]:
    """The pytest node ids of the benchmarks behind ``group``'s ratios that no earlier group of
    HEADLINE runs, each (workload, backend) once: baseline, then gpubp, ratio by ratio, and in
    reverse in every other group, so that neither side is always the first (cold) one."""
    place = list(HEADLINE).index(group)
    earlier = {pair for before in list(HEADLINE)[:place] for ratio in HEADLINE[before] for pair in RATIOS[ratio]}
    pairs = [pair for pair in dict.fromkeys(pair for ratio in HEADLINE[group] for pair in RATIOS[ratio])
             if pair not in earlier]
    return [f"{DENSE_BENCHMARKS}::" + TEST_OF_WORKLOAD[workload].format(workload=workload, backend=backend)
            for workload, backend in (pairs[::-1] if place % 2 else pairs)]


def run_group(argv: list[str], env: dict, seconds: float) -> int | None:
    """Run ``argv``; past ``seconds``, SIGINT (pytest then writes what it has), then SIGKILL.
    Its exit status, or None when it ran out of time."""
    process = subprocess.Popen(argv, cwd=ROOT, env=env)
    try:
        return process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=GROUP_GRACE)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        return None


def group_seconds(most: float, step_left: float | None) -> float:
    """A group's time: ``most``, or what the step has left (``step_left`` seconds, None when
    unbounded) after the group's grace and STEP_MARGIN, whichever is less (1 s at least)."""
    if step_left is None:
        return most
    return max(1.0, min(most, step_left - GROUP_GRACE - STEP_MARGIN))


def bench(folder: Path) -> int:
    env = {**os.environ, "GPUBP_BENCH_ROUNDS": os.environ.get("GPUBP_BENCH_ROUNDS", ROUNDS)}
    every = os.environ.get("GPUBP_BENCH_GROUP_SECONDS")
    step_seconds = os.environ.get("GPUBP_STEP_SECONDS")
    step_end = time.perf_counter() + float(step_seconds) if step_seconds else None
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH), env.get("PYTHONPATH")]))
    failed = []
    for group in HEADLINE:
        start = time.perf_counter()
        most = float(every) if every else GROUP_SECONDS[group]
        seconds = group_seconds(most, None if step_end is None else step_end - start)
        report = folder / f"bench_first_contact_{group}.json"
        lines = benchmark_lines_path(report)
        for stale in (report, lines):  # an earlier run's: not this run's results, and the lines are appended
            stale.unlink(missing_ok=True)
        status = run_group([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                            "-p", "benchmark_lines", *node_ids(group), "--benchmark-json", str(report)],
                           {**env, LINES_ENV: str(lines)}, seconds)
        took = time.perf_counter() - start
        result = "ok" if status == 0 else f"out of time after {seconds:g} s" if status is None else \
            f"failed (exit status {status})"
        if status != 0 and not report.is_file():  # the process died before writing its JSON
            kept = len(read_benchmark_lines(lines)["benchmarks"]) if lines.is_file() else 0
            result += f"; no JSON, {kept} finished benchmark{'' if kept == 1 else 's'} in {lines.name}"
        print(f"first-contact benchmarks {group}: {result}, {took:.1f} s", flush=True)
        with open(folder / STEPS_FILE, "a") as steps:  # a row of the record's steps table
            steps.write(f"bench {group}\t{result}\t{took:.0f}\t{seconds:g}\n")
        if status != 0:
            failed.append(group)
    return 1 if failed else 0


# ----------------------------------------------------------------------------- facts


def _command(argv: list[str]) -> str:
    """The output of a command (20 s at most), or why there is none."""
    if shutil.which(argv[0]) is None:
        return f"{argv[0]}: not found"
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return f"{argv[0]}: no answer in 20 s"
    except OSError as exc:
        return f"{argv[0]}: {exc}"
    return (done.stdout + done.stderr).strip()


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _plain(value):
    """A device property as JSON: bytes as text where they are text (the name), else as hex."""
    if isinstance(value, bytes):
        try:
            text = value.split(b"\0")[0].decode("ascii")
        except UnicodeDecodeError:
            return value.hex()
        return text if text.isprintable() else value.hex()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _cupy_version() -> str:
    """The installed CuPy distribution (cupy-cuda12x, say) and its version, without importing it."""
    found = sorted(f"{d.metadata['Name']} {d.version}" for d in importlib.metadata.distributions()
                   if (d.metadata["Name"] or "").lower().startswith("cupy"))
    return ", ".join(found) or "not installed"


# The variables that decide which CUDA libraries and headers are found, where CuPy caches, and
# whether PyTorch's profiler detaches CUPTI after the benchmarks' kernel counts (gpu_check.sh sets it).
ENVIRONMENT = ("CUDA_PATH", "CUDA_HOME", "LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES", "CUPY_CACHE_DIR", "TEARDOWN_CUPTI")
# What the host's kernel says of itself (platform.uname()): a container runtime shows in it (gVisor
# reports a Linux 4.4.0), which may refuse a sanitizer the device and lengthens launch-bound times.
UNAME_FIELDS = ("system", "release", "version", "machine")


def host_facts() -> dict:
    """What needs no CuPy: the host's kernel (``UNAME_FIELDS``), nvidia-smi's view, the tools' and
    libraries' versions, where NVRTC and the CUDA headers are, and the variables that decide it."""
    from gpubp import _toolkit

    uname = platform.uname()
    return {
        "uname": {field: getattr(uname, field) for field in UNAME_FIELDS},
        "nvidia_smi": _command(["nvidia-smi", f"--query-gpu={SMI_QUERY}", "--format=csv"]),
        "tools": {tool: _command([tool, *args]).splitlines()[-1:] for tool, args in TOOL_VERSIONS.items()},
        "versions": {"python": platform.python_version(), "cupy": _cupy_version(),
                     **{dist: _version(dist) for dist in ("numpy", "numba", "numba-cuda", "cuda-pathfinder", "torch")}},
        "nvrtc": list(_toolkit.nvrtc_library()),
        "cuda_headers": list(_toolkit.cuda_headers()),
        "environment": {name: os.environ.get(name) for name in ENVIRONMENT},
        "cupy_cache_dir": os.environ.get("CUPY_CACHE_DIR", "~/.cupy/kernel_cache"),
    }


def device_facts(cupy) -> dict:
    """What CuPy says of the device: its properties, the driver, runtime and NVRTC versions, and
    whether PyTorch sees CUDA."""
    runtime = cupy.cuda.runtime
    device = cupy.cuda.Device()
    properties = runtime.getDeviceProperties(device.id)
    torch_cuda = "not installed"
    try:
        import torch

        torch_cuda = f"{torch.__version__}, CUDA {torch.version.cuda}, available: {torch.cuda.is_available()}"
    except ImportError:
        pass
    return {
        "device": {key: _plain(value) for key, value in sorted(properties.items())},
        "compute_capability": device.compute_capability,
        "driver_version": runtime.driverGetVersion(),
        "runtime_version": runtime.runtimeGetVersion(),
        "nvrtc_version": list(cupy.cuda.nvrtc.getVersion()),
        "cupy_version": cupy.__version__,
        "torch_cuda": torch_cuda,
    }


def part_facts(cupy_backend, filename: str, part: str, device: int = 0) -> dict:
    """Compile and load NVRTC module ``part`` of ``filename`` through the backend (NVRTC, as the AOT
    folder is empty) on ``device``, timed, and the driver's attributes of each of its kernels."""
    start = time.perf_counter()
    with cupy_backend.cupy.cuda.Device(device):  # a new thread's current device is device 0
        cupy_backend._rawmodule(filename, part)
    seconds = time.perf_counter() - start
    kernels = {}
    for name in cupy_backend.part_kernels(filename, part):
        kernel = cupy_backend._functions[(device, name, cupy_backend.split_part(part)[1] or None)].function
        kernels[name] = {"registers": kernel.num_regs, "static_shared_bytes": kernel.shared_size_bytes,
                         "local_bytes": kernel.local_size_bytes, "max_threads_per_block": kernel.max_threads_per_block}
    return {"seconds": seconds, "kernels": kernels}


# The activations whose modules facts also builds as a model's first step does (the benchmarks'
# models), so that the benchmarks find them in CuPy's cache.
FIRST_STEP_ACTS = (HEAD_ACT, HIDDEN_ACT)


def facts(out: Path, jobs: int | None = None) -> int:
    """The device facts and every kernel compiled, into ``out``: each file's NVRTC modules
    (``cupy_backend.kernel_parts``: one per GEMM kernel, each with every activation it serves, one
    for the rest), as ``preload`` builds them, so CuPy's cache then holds what the tests load; and
    the modules a relu model's first step builds (``cupy_backend.model_parts``, ``FIRST_STEP_ACTS``),
    which the benchmarks load; ``jobs`` at once (one per core, unless given). Per file: its modules'
    compile and load seconds summed, each kernel's attributes, and each first-step module's.
    Returns 0, or 1 if anything failed."""
    cache = Path(os.path.expanduser(os.environ.get("CUPY_CACHE_DIR", "~/.cupy/kernel_cache")))
    found = host_facts()  # before CuPy is imported: kept whatever CuPy then does
    found["kernel_cache_files_before"] = sum(1 for p in cache.rglob("*") if p.is_file()) if cache.is_dir() else 0
    out.write_text(json.dumps(found, indent=2) + "\n")
    print(json.dumps(found, indent=1), flush=True)

    from gpubp.backends import cupy_backend

    os.environ[cupy_backend.AOT_ENV] = tempfile.mkdtemp()  # no fatbins: NVRTC compiles every file
    if cupy_backend.unavailable_reason() is not None:
        found["error"] = cupy_backend.unavailable_reason()
        out.write_text(json.dumps(found, indent=2) + "\n")
        print(f"first contact: {found['error']}")
        return 1
    status = 0
    try:
        found.update(device_facts(cupy_backend.cupy))
    except Exception as exc:  # recorded; the kernel files are still compiled and timed
        found["device_facts_error"], status = f"{type(exc).__name__}: {exc}", 1
    found["kernel_files"] = {}
    out.write_text(json.dumps(found, indent=2) + "\n")
    print(json.dumps({key: value for key, value in found.items()
                      if key in ("compute_capability", "driver_version", "runtime_version", "nvrtc_version",
                                 "cupy_version", "torch_cuda", "device_facts_error")}, indent=1), flush=True)
    files = list(cupy_backend.KERNEL_FILES)
    whole = {filename: cupy_backend.kernel_parts(filename) for filename in files}
    parts = {filename: whole[filename] + cupy_backend.model_parts(filename, FIRST_STEP_ACTS) for filename in files}
    jobs = jobs or max(1, min(sum(map(len, parts.values())), os.cpu_count() or 1))
    device = cupy_backend.cupy.cuda.Device().id
    built: dict[str, dict[str, dict]] = {filename: {} for filename in files}  # file -> part -> result
    done: dict[str, dict] = {}
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        running = {pool.submit(part_facts, cupy_backend, filename, part, device): (filename, part)
                   for filename in files for part in parts[filename]}
        for future in as_completed(running):
            filename, part = running[future]
            try:
                built[filename][part] = future.result()
            except Exception as exc:  # a compile or load error: recorded, and the other modules still run
                built[filename][part] = {"error": f"{type(exc).__name__}: {exc}"[-4000:]}
                status = 1
            if len(built[filename]) < len(parts[filename]):
                continue
            errors = [result["error"] for result in built[filename].values() if "error" in result]
            result = done[filename] = {"error": errors[0]} if errors else {
                "origin": cupy_backend.origin[filename], "modules": len(whole[filename]),
                "compile_and_load_seconds": round(sum(built[filename][part]["seconds"] for part in whole[filename]), 3),
                "kernels": {name: kernel for part in whole[filename] for name, kernel in
                            built[filename][part]["kernels"].items()},
                "first_step_modules": {part: {"seconds": round(built[filename][part]["seconds"], 3), **kernel}
                                       for part in parts[filename][len(whole[filename]):]
                                       for kernel in built[filename][part]["kernels"].values()}}
            spilling = [name for name, k in result.get("kernels", {}).items() if k["local_bytes"]]
            spilled = f", local memory in {', '.join(spilling)}" if spilling else ""
            print(f"{filename}: " + (result["error"] if "error" in result else
                  f"{result['origin']} in {result['compile_and_load_seconds']:.2f} s ({result['modules']} modules), "
                  f"{len(result['kernels'])} kernels{spilled}"), flush=True)
            found["kernel_files"] = {name: done[name] for name in files if name in done}  # in the backend's order
            found["kernel_compile"] = {"threads": jobs, "modules": sum(map(len, parts.values())),
                                       "wall_seconds": round(time.perf_counter() - start, 3)}
            out.write_text(json.dumps(found, indent=2) + "\n")
    return status


def main(argv: list[str]) -> int:
    commands = {"facts": facts, "bench": bench}
    if len(argv) != 2 or argv[0] not in commands:
        raise SystemExit(f"usage: first_contact.py {{{'|'.join(commands)}}} <path>")
    return commands[argv[0]](Path(argv[1]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
