"""What a model's first training step on the CuPy backend waits for NVRTC, without a GPU.

    python bench/nvrtc_first_step.py [--arch 90] [--repeat 2] [--out bench/results/nvrtc_first_step]
    python bench/nvrtc_first_step.py --all [--arch 90]

For each model of ``MODELS``, one training step runs on the CPU kernel harness's CuPy stand-in
(tests/cuda_on_cpu), which records the NVRTC modules the backend builds for it
(``cupy_backend.kernel_part``: one per GEMM kernel launched, built for the activations it
launches where it takes one at launch, and one for a file's other kernels). Those modules are
then compiled by the real NVRTC (libnvrtc through ctypes, bench/nvrtc_build.py, as CuPy does,
to an sm_<arch> cubin, so ptxas runs) one after another on one core and timed; so are the same
kernels' modules with every activation they serve (what ``preload`` and
``GPUBP_NVRTC_ACTIVATIONS=all`` build), and the whole files that hold them, which is what the
backend compiled before it built one GEMM per module. Each module and file is timed ``--repeat`` times
(default 2) and its least time kept, once per run however many models share it: compile times
vary with the machine and its load, and the least is the one least disturbed. Writes
``<out>.json`` and ``<out>.md`` and prints the table.

``--all``: every NVRTC module of every file and every whole file, once each, one after another;
prints each file's modules' total against the file's own time, and the sums (what
``cupy_backend.preload`` compiles, against what the backend compiled before).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import numpy as np  # noqa: E402

import gpubp as gb  # noqa: E402
from gpubp.backends import cupy_backend  # noqa: E402

# name -> (layer widths, activation, precision, fused): sizes that pick the kernels a GPU's
# first step of such a model picks (132 SMs: the fp32 layers take 128x64 tiles).
MODELS = {
    "fp32 relu layers": ([784, 256, 256, 10], "relu", "fp32", False),
    "TF32 relu layers": ([784, 256, 256, 10], "relu", "tf32", False),
    "fp32 fused MLP": ([64, 64, 64, 10], "relu", "fp32", True),
    "TF32 fused MLP": ([64, 64, 64, 10], "relu", "tf32", True),
}


def first_step_modules(widths: list[int], act: str, precision: str, fused: bool) -> list[tuple[str, str]]:
    """The (file, part) NVRTC modules one Adam training step of the model builds, in order,
    from a run on the CPU stand-in."""
    import pytest

    from cuda_on_cpu import harness
    from test_kernels_on_cpu import cupy_on_cpu

    built: list[tuple[str, str]] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(cupy_backend.NVRTC_ACTIVATIONS_ENV, raising=False)  # the default: the launched activations
        cupy_on_cpu(harness.Harness(), patch, 132)
        load = cupy_backend._rawmodule
        patch.setattr(cupy_backend, "_rawmodule",
                      lambda filename, part="": (built.append((filename, part)), load(filename, part))[1])
        gb.seed(0)
        layers = [gb.Dense(n_in, n_out, act if i < len(widths) - 2 else None)
                  for i, (n_in, n_out) in enumerate(zip(widths, widths[1:]))]
        model = gb.Sequential(layers, backend="cupy", precision=precision, fused=fused)
        rng = np.random.default_rng(0)
        x, y = rng.normal(size=(72, widths[0])).astype(np.float32), rng.integers(0, widths[-1], 72)
        model.train_step("cross_entropy", gb.optim.Adam(model.parameters(), lr=1e-3))(x, y)
    return list(dict.fromkeys(built))


def compile_seconds(filename: str, part: str | None, arch: str, repeat: int) -> float:
    """The least time of ``repeat`` NVRTC compiles of ``kernels/<filename>`` to an sm_<arch> cubin:
    NVRTC module ``part``, or the whole file (None)."""
    import nvrtc_build

    options = cupy_backend.NVRTC_OPTIONS if part is None else cupy_backend.nvrtc_options(filename, part)
    least = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        result, log, _ = nvrtc_build.compile_program(cupy_backend.kernel_source(filename), filename,
                                                     nvrtc_build.cupy_options(arch, options))
        if result != 0:
            raise RuntimeError(f"NVRTC failed on {filename} ({part!r}):\n{log}")
        least = min(least, time.perf_counter() - start)
    return least


def measure(arch: str, repeat: int = 2) -> dict:
    rows, timed = {}, {}

    def seconds(filename: str, part: str | None) -> float:
        if (filename, part) not in timed:
            timed[filename, part] = compile_seconds(filename, part, arch, repeat)
        return timed[filename, part]

    for name, spec in MODELS.items():
        modules = first_step_modules(*spec)
        files = list(dict.fromkeys(filename for filename, _ in modules))
        every = list(dict.fromkeys((f, cupy_backend.split_part(part)[0]) for f, part in modules))
        rows[name] = {
            "modules": [{"file": f, "part": part, "seconds": seconds(f, part)} for f, part in modules],
            "every_activation": [{"file": f, "part": part, "seconds": seconds(f, part)} for f, part in every],
            "whole_files": [{"file": f, "seconds": seconds(f, None)} for f in files],
        }
        print(f"{name}: {sum(m['seconds'] for m in rows[name]['modules']):.1f} s in {len(modules)} modules, "
              f"{sum(m['seconds'] for m in rows[name]['every_activation']):.1f} s with every activation, "
              f"{sum(w['seconds'] for w in rows[name]['whole_files']):.1f} s in {len(files)} whole files", flush=True)
    return {"arch": arch, "repeat": repeat, "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "python": platform.python_version(), "models": rows}


def measure_all(arch: str) -> list[tuple[str, int, float, float]]:
    """(file, modules, their seconds, the whole file's seconds) for every kernel file, printed as
    each finishes."""
    rows = []
    for filename in cupy_backend.KERNEL_FILES:
        parts = cupy_backend.kernel_parts(filename)
        modules = sum(compile_seconds(filename, part, arch, 1) for part in parts)
        rows.append((filename, len(parts), modules, compile_seconds(filename, None, arch, 1)))
        print(f"{filename}: {len(parts)} modules {modules:.1f} s, whole {rows[-1][3]:.1f} s", flush=True)
    print(f"all: {sum(r[1] for r in rows)} modules {sum(r[2] for r in rows):.1f} s, "
          f"{len(rows)} whole files {sum(r[3] for r in rows):.1f} s")
    return rows


def module_name(filename: str, part: str) -> str:
    """A GEMM module by its kernel, a file's other kernels as "<file> rest", a file built whole by it."""
    if part:
        return f"`{part}`"
    return f"`{filename}` rest" if filename in cupy_backend.ONE_KERNEL_FILES else f"`{filename}`"


def markdown(report: dict) -> str:
    lines = [f"# NVRTC time of a model's first CuPy training step (sm_{report['arch']}, one core)", "",
             "Written by `python bench/nvrtc_first_step.py`: the modules are those a step on the CPU stand-in "
             "built, compiled one after another; then the same kernels' modules with every activation they "
             "serve (what `preload()` builds), and the whole files that hold them, in the same run, each the "
             f"least of {report['repeat']} compiles.", "",
             "| first step of | NVRTC modules built | their seconds | with every activation, seconds | whole files "
             "| their seconds |",
             "|---|---|---:|---:|---|---:|"]
    for name, row in report["models"].items():
        modules = ", ".join(module_name(m["file"], m["part"]) for m in row["modules"])
        files = ", ".join(f"`{w['file']}`" for w in row["whole_files"])
        every = sum(m["seconds"] for m in row.get("every_activation", row["modules"]))
        lines.append(f"| {name} | {modules} | {sum(m['seconds'] for m in row['modules']):.1f} | {every:.1f} "
                     f"| {files} | {sum(w['seconds'] for w in row['whole_files']):.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="90", help="compute capability to compile for (default 90)")
    parser.add_argument("--repeat", type=int, default=2, help="compiles per module and file; the least is kept")
    parser.add_argument("--all", action="store_true", help="every module and every whole file, once each")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "nvrtc_first_step",
                        help="writes <out>.json and <out>.md")
    args = parser.parse_args(argv)
    if args.all:
        measure_all(args.arch)
        return 0
    report = measure(args.arch, args.repeat)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    table = markdown(report)
    args.out.with_suffix(".md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
