"""The shipped ahead-of-time build of the CUDA kernels, run once and shared.

    PYTHONPATH=. python bench/aot_build.py        # build (or find) it; prints the install folder

``build()`` runs what ``CMakeLists.txt`` says (configure, build, install) for every
``kernels/*.cu`` and every shipped architecture, into a folder of the temporary directory
named by a hash of everything that goes in: ``CMakeLists.txt``, every ``kernels/*.cu`` and
``*.cuh``, nvcc's and cmake's versions, and this file. A second caller (another pytest-xdist
worker: ``tests/test_kernels_compile.py`` checks the fatbins, ``bench/kernel_model.py`` reads
their sm_90 and sm_80 code) waits on a file lock and reuses the first one's build instead of
compiling every kernel again. A build that fails is not kept. It is built in place (CMake's build folder keeps absolute
paths) and marked whole by a ``complete`` file written last.

The folder holds ``installed/`` (the fatbins and ``manifest.txt``, what ``cmake --install``
puts in ``gpubp/_aot``), ``build.log`` (``cmake --build``'s output, one ``<unit> -> <fatbin>``
line per kernel file) and ``build/``. Without cmake the same nvcc commands run directly; then
there is no manifest and no build log.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from gpubp.backends import cupy_backend

ROOT = Path(__file__).resolve().parents[1]
CACHE_NAME = "gpubp-aot"
# What CMakeLists.txt makes nvcc check, the same in the fallback without cmake: a build that
# succeeds has no warning and, for every architecture, no register spill.
STRICT_FLAGS = ("-Werror", "all-warnings", "-Xptxas", "-warn-spills")


class BuildFailed(RuntimeError):
    """The build failed; the message ends with the tail of its output."""


def shipped_archs(root: Path = ROOT) -> list[str]:
    """GPUBP_CUDA_ARCHS from CMakeLists.txt: the one list of architectures we ship."""
    match = re.search(r"set\(GPUBP_CUDA_ARCHS ([0-9 ]+)\)", (root / "CMakeLists.txt").read_text())
    return match.group(1).split()


def codegen_flags(root: Path = ROOT) -> list[str]:
    """GPUBP_CODEGEN_FLAGS from CMakeLists.txt: the flags nvcc builds the fatbins with."""
    match = re.search(r"set\(GPUBP_CODEGEN_FLAGS ([^)]+)\)", (root / "CMakeLists.txt").read_text())
    return match.group(1).split()


def common_flags(root: Path = ROOT) -> list[str]:
    """NVCC_COMMON from CMakeLists.txt, with GPUBP_CODEGEN_FLAGS expanded: every nvcc flag of the
    build but the architectures and files."""
    match = re.search(r"set\(NVCC_COMMON ([^)]+)\)", (root / "CMakeLists.txt").read_text())
    flags = []
    for flag in match.group(1).split():
        flags += codegen_flags(root) if flag == "${GPUBP_CODEGEN_FLAGS}" else [flag]
    return flags


def strict(root: Path = ROOT) -> bool:
    """Whether the build fails on any warning and on a register spill, so that the fatbins of a
    build that succeeded spill nowhere (``bench/kernel_model.py`` relies on it)."""
    flags = common_flags(root)
    return any(flags[i:i + len(STRICT_FLAGS)] == list(STRICT_FLAGS) for i in range(len(flags)))


def _version(tool: str | None) -> str:
    if tool is None:
        return "absent"
    return subprocess.run([tool, "--version"], capture_output=True, text=True, check=True).stdout


def inputs(root: Path = ROOT) -> list[bytes]:
    """Everything the build depends on, as bytes, in a fixed order."""
    kernels = sorted(p for p in (root / "kernels").iterdir() if p.suffix in (".cu", ".cuh"))
    nvcc, cmake = shutil.which("nvcc"), shutil.which("cmake")
    parts = [Path(__file__).read_bytes(), (root / "CMakeLists.txt").read_bytes(),
             *(p.name.encode() + b"\0" + p.read_bytes() for p in kernels),
             str(nvcc).encode(), _version(nvcc).encode(), str(cmake).encode(), _version(cmake).encode()]
    return parts


def key(root: Path = ROOT) -> str:
    digest = hashlib.sha256()
    for part in inputs(root):
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()[:24]


def uses_tensor_cores(unit: str, kernel_dir: Path = ROOT / "kernels") -> bool:
    """Whether ``<kernel_dir>/<unit>`` reaches mma.cuh, directly or through another header: the
    files whose sm_80-and-newer code CMakeLists.txt builds from compute_80
    (tests/test_kernels_compile.py checks that its build log agrees)."""
    return '#line 1 "mma.cuh"' in cupy_backend.kernel_source(unit, kernel_dir)


def _nvcc_directly(root: Path, out: Path) -> None:
    """The nvcc commands CMakeLists.txt runs, for a machine without cmake (no manifest)."""
    archs = shipped_archs(root)
    older, tensor = [a for a in archs if int(a) < 80], [a for a in archs if int(a) >= 80]
    out.mkdir(parents=True)
    for unit in sorted((root / "kernels").glob("*.cu")):
        gencode = ["-gencode", f"arch=compute_{archs[0]},code=[sm_{',sm_'.join(archs)},compute_{archs[0]}]"]
        if uses_tensor_cores(unit.name, root / "kernels"):
            gencode = ["-gencode", f"arch=compute_{archs[0]},code=[sm_{',sm_'.join(older)}]",
                       "-gencode", f"arch=compute_80,code=[sm_{',sm_'.join(tensor)},compute_80]"]
        done = subprocess.run(["nvcc", *common_flags(root), *gencode, "-o", str(out / f"{unit.stem}.fatbin"),
                               str(unit)], capture_output=True, text=True)
        if done.returncode:
            raise BuildFailed(f"nvcc {unit.name} failed:\n{done.stdout[-6000:]}{done.stderr[-6000:]}")


def _cmake(root: Path, folder: Path) -> None:
    build, installed = folder / "build", folder / "installed"
    done = subprocess.run(["cmake", "-S", str(root), "-B", str(build), f"-DGPUBP_AOT_DIR={installed}"],
                          capture_output=True, text=True)
    if done.returncode:
        raise BuildFailed(f"cmake configure failed:\n{done.stdout[-6000:]}{done.stderr[-6000:]}")
    jobs = str(max(2, os.cpu_count() or 2))
    done = subprocess.run(["cmake", "--build", str(build), "-j", jobs], capture_output=True, text=True)
    if done.returncode:
        raise BuildFailed(f"cmake --build failed:\n{done.stdout[-6000:]}{done.stderr[-6000:]}")
    (folder / "build.log").write_text(done.stdout)
    done = subprocess.run(["cmake", "--install", str(build)], capture_output=True, text=True)
    if done.returncode:
        raise BuildFailed(f"cmake --install failed:\n{done.stdout[-6000:]}{done.stderr[-6000:]}")


def build(root: Path = ROOT, cache: Path | None = None) -> Path:
    """The ``installed/`` folder of the build of ``root`` (see the module docstring); raises
    ``FileNotFoundError`` without nvcc and ``BuildFailed`` when the build fails."""
    if shutil.which("nvcc") is None:
        raise FileNotFoundError("nvcc not found on PATH: cannot compile the CUDA kernels")
    cache = cache or Path(tempfile.gettempdir()) / CACHE_NAME
    cache.mkdir(parents=True, exist_ok=True)
    build_key = key(root)  # reads every input and runs nvcc and cmake: once
    done = cache / build_key
    complete = done / "complete"  # written last: the folder is whole
    if complete.is_file():
        return done / "installed"
    with open(done.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second caller waits here for the first one's build
        if complete.is_file():
            return done / "installed"
        shutil.rmtree(done, ignore_errors=True)  # what a failed or killed build left
        try:
            if shutil.which("cmake") is None:
                _nvcc_directly(root, done / "installed")
            else:
                _cmake(root, done)
        except BaseException:
            shutil.rmtree(done, ignore_errors=True)
            raise
        complete.write_text(build_key + "\n")
    return done / "installed"


if __name__ == "__main__":
    print(build())
    sys.exit(0)
