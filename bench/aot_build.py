"""The shipped ahead-of-time build of the CUDA kernels, run once and shared.

    PYTHONPATH=. python bench/aot_build.py        # build (or find) it; prints the install folder
    PYTHONPATH=. python bench/aot_build.py 90     # the same with sm_90's SASS alone

``build()`` runs what ``CMakeLists.txt`` says (configure, build, install) for every
``kernels/*.cu`` and every shipped architecture (or, with ``sass``, the SASS of some of them:
``GPUBP_SASS_ARCHS``, from the same PTX), into a folder of the temporary directory named by a
hash of everything that goes in: ``CMakeLists.txt``, every ``kernels/*.cu`` and ``*.cuh``,
nvcc's and cmake's versions, the SASS architectures, and this file. The test suite builds the
SASS of ``archs_under_test()``: sm_90's alone unless ``GPUBP_TEST_ARCHS`` adds others. A second
caller (another pytest-xdist worker: ``tests/test_kernels_compile.py`` checks the fatbins,
``bench/kernel_model.py`` reads their sm_90 and sm_80 code) waits on a file lock and reuses the
first one's build instead of compiling every kernel again. A build that fails is not kept. It is
built in place (CMake's build folder keeps absolute paths) and marked whole by a ``complete``
file written last.

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


# The architectures the test suite compiles the kernels for, with CMake (SASS) and with NVRTC.
TEST_ARCHS_ENV = "GPUBP_TEST_ARCHS"


def archs_under_test(root: Path = ROOT) -> list[str]:
    """The newest shipped architecture (sm_90, the H100/H200 the kernels are tuned for, which the
    kernel model reads) and those ``GPUBP_TEST_ARCHS`` adds: "all", or a comma-separated list of
    shipped ones ("75,80" or "sm_75, sm_80"). Each architecture more costs minutes of a 2-core
    machine; ``bench/kernel_model.py``, whose committed report CI requires to be current, builds
    them all."""
    shipped = shipped_archs(root)
    wanted = os.environ.get(TEST_ARCHS_ENV, "").strip()
    if wanted == "all":
        return shipped
    archs = [a.strip().removeprefix("sm_") for a in wanted.split(",") if a.strip()]
    if [a for a in archs if a not in shipped] or (wanted and not archs):
        raise ValueError(f"{TEST_ARCHS_ENV}={wanted!r}: expected 'all' or a comma-separated list of the shipped "
                         f"architectures {shipped}")
    return sorted({*archs, shipped[-1]}, key=shipped.index)


def sass_archs(root: Path, sass: list[str] | None) -> list[str]:
    """The architectures a build makes SASS for: ``sass`` (in shipped order), or every shipped one."""
    shipped = shipped_archs(root)
    if sass is None:
        return shipped
    unknown = [a for a in sass if a not in shipped]
    if unknown or not sass:
        raise ValueError(f"sass: expected some of the shipped architectures {shipped}, got {sass}")
    return sorted(set(sass), key=shipped.index)


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


def inputs(root: Path = ROOT, sass: list[str] | None = None) -> list[bytes]:
    """Everything the build depends on, as bytes, in a fixed order."""
    kernels = sorted(p for p in (root / "kernels").iterdir() if p.suffix in (".cu", ".cuh"))
    nvcc, cmake = shutil.which("nvcc"), shutil.which("cmake")
    parts = [Path(__file__).read_bytes(), (root / "CMakeLists.txt").read_bytes(),
             *(p.name.encode() + b"\0" + p.read_bytes() for p in kernels),
             str(nvcc).encode(), _version(nvcc).encode(), str(cmake).encode(), _version(cmake).encode(),
             " ".join(sass_archs(root, sass)).encode()]
    return parts


def key(root: Path = ROOT, sass: list[str] | None = None) -> str:
    digest = hashlib.sha256()
    for part in inputs(root, sass):
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()[:24]


def uses_tensor_cores(unit: str, kernel_dir: Path = ROOT / "kernels") -> bool:
    """Whether ``<kernel_dir>/<unit>`` reaches mma.cuh, directly or through another header: the
    files whose sm_80-and-newer code CMakeLists.txt builds from compute_80
    (tests/test_kernels_compile.py checks that its build log agrees)."""
    return '#line 1 "mma.cuh"' in cupy_backend.kernel_source(unit, kernel_dir)


def gencode(root: Path, unit: str, sass: list[str] | None = None) -> list[str]:
    """The -gencode flags CMakeLists.txt gives nvcc for ``unit``: PTX for the lowest shipped
    architecture (compute_80 for the tensor-core files, whose older architectures keep the lowest
    one's), SASS for ``sass_archs(root, sass)``."""
    lowest, archs = shipped_archs(root)[0], sass_archs(root, sass)
    if not uses_tensor_cores(unit, root / "kernels"):
        return ["-gencode", f"arch=compute_{lowest},code=[sm_{',sm_'.join(archs)},compute_{lowest}]"]
    older, tensor = [a for a in archs if int(a) < 80], [a for a in archs if int(a) >= 80]
    flags = ["-gencode", f"arch=compute_{lowest},code=[sm_{',sm_'.join(older)}]"] if older else []
    return flags + ["-gencode", f"arch=compute_80,code=[{''.join(f'sm_{a},' for a in tensor)}compute_80]"]


def _nvcc_directly(root: Path, out: Path, sass: list[str] | None) -> None:
    """The nvcc commands CMakeLists.txt runs, for a machine without cmake (no manifest)."""
    out.mkdir(parents=True)
    for unit in sorted((root / "kernels").glob("*.cu")):
        done = subprocess.run(["nvcc", *common_flags(root), *gencode(root, unit.name, sass),
                               "-o", str(out / f"{unit.stem}.fatbin"), str(unit)], capture_output=True, text=True)
        if done.returncode:
            raise BuildFailed(f"nvcc {unit.name} failed:\n{done.stdout[-6000:]}{done.stderr[-6000:]}")


def _cmake(root: Path, folder: Path, sass: list[str] | None) -> None:
    build, installed = folder / "build", folder / "installed"
    done = subprocess.run(["cmake", "-S", str(root), "-B", str(build), f"-DGPUBP_AOT_DIR={installed}",
                           f"-DGPUBP_SASS_ARCHS={';'.join(sass_archs(root, sass))}"],
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


def build(root: Path = ROOT, cache: Path | None = None, sass: list[str] | None = None) -> Path:
    """The ``installed/`` folder of the build of ``root`` (see the module docstring), with SASS for
    ``sass`` (some shipped architectures; by default every one); raises ``FileNotFoundError``
    without nvcc and ``BuildFailed`` when the build fails."""
    if shutil.which("nvcc") is None:
        raise FileNotFoundError("nvcc not found on PATH: cannot compile the CUDA kernels")
    cache = cache or Path(tempfile.gettempdir()) / CACHE_NAME
    cache.mkdir(parents=True, exist_ok=True)
    build_key = key(root, sass)  # reads every input and runs nvcc and cmake: once
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
                _nvcc_directly(root, done / "installed", sass)
            else:
                _cmake(root, done, sass)
        except BaseException:
            shutil.rmtree(done, ignore_errors=True)
            raise
        complete.write_text(build_key + "\n")
    return done / "installed"


if __name__ == "__main__":
    print(build(sass=sys.argv[1].split(",") if len(sys.argv) > 1 else None))
    sys.exit(0)
