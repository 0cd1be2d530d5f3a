"""The CUDA kernels build on a machine without a GPU: nvcc via CMake, NVRTC, and packaging.

- One CMake build (configure, build, install into a temporary folder) compiles every
  ``kernels/*.cu`` for every architecture in ``CMakeLists.txt`` with warnings and register
  spills as errors; the tests below check what it produced. Without cmake, the same nvcc
  command runs directly. Skipped, with the reason, when nvcc is absent.
- NVRTC (what the CuPy backend uses when no matching fatbin is installed) compiles the
  include-expanded sources that the backend hands it, through libnvrtc and ctypes; no GPU
  or CuPy needed. Skipped when no libnvrtc is found (``pip install nvidia-cuda-nvrtc``
  provides one).
- The sources are found through ``importlib.resources`` in a built wheel.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from gpubp.backends import cupy_backend
from test_gpu_check_scripts import load

REPO = Path(__file__).resolve().parents[1]
KERNELS = REPO / "kernels"
UNITS = sorted(p.name for p in KERNELS.glob("*.cu"))
NVCC = shutil.which("nvcc")
CMAKE = shutil.which("cmake")
# What CMakeLists.txt builds, read as bench/kernel_model.py (which compiles the same way) reads it.
kernel_model = load("kernel_model")
shipped_archs, uses_tensor_cores = kernel_model.shipped_archs, kernel_model.uses_tensor_cores


def test_backend_knows_every_kernel_file():
    assert sorted(cupy_backend.KERNEL_FILES) == UNITS


def test_nvcc_13_supports_every_shipped_arch():
    if NVCC is None:
        pytest.skip("nvcc not found on PATH")
    listed = subprocess.run([NVCC, "--list-gpu-code"], capture_output=True, text=True, check=True).stdout
    for arch in shipped_archs():
        assert f"sm_{arch}" in listed.split(), f"this nvcc cannot build sm_{arch}"


@pytest.fixture(scope="module")
def aot_build(tmp_path_factory):
    """Build every kernel file once; returns the folder holding the fatbins (and manifest)."""
    if NVCC is None:
        pytest.skip("nvcc not found on PATH: cannot compile the CUDA kernels")
    root = tmp_path_factory.mktemp("aot")
    if CMAKE is None:  # the same nvcc commands CMakeLists.txt runs, minus the manifest
        archs = shipped_archs()
        older, tensor = [a for a in archs if int(a) < 80], [a for a in archs if int(a) >= 80]
        for unit in UNITS:
            gencode = ["-gencode", f"arch=compute_{archs[0]},code=[sm_{',sm_'.join(archs)},compute_{archs[0]}]"]
            if uses_tensor_cores(unit):
                gencode = ["-gencode", f"arch=compute_{archs[0]},code=[sm_{',sm_'.join(older)}]",
                           "-gencode", f"arch=compute_80,code=[sm_{',sm_'.join(tensor)},compute_80]"]
            subprocess.run(
                [NVCC, "--fatbin", "-std=c++17", "--threads", "0", *gencode,
                 "-Werror", "all-warnings", "-Xptxas", "-warn-spills",
                 "-o", str(root / unit.replace(".cu", ".fatbin")), str(KERNELS / unit)],
                check=True,
            )
        return root
    build, installed = root / "build", root / "installed"
    subprocess.run([CMAKE, "-S", str(REPO), "-B", str(build), f"-DGPUBP_AOT_DIR={installed}"], check=True,
                   capture_output=True)
    jobs = str(max(2, os.cpu_count() or 2))
    done = subprocess.run([CMAKE, "--build", str(build), "-j", jobs], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-6000:]
    (root / "build.log").write_text(done.stdout)
    subprocess.run([CMAKE, "--install", str(build)], check=True, capture_output=True)
    return installed


@pytest.mark.parametrize("unit", UNITS)
def test_kernel_compiles_for_every_shipped_arch(aot_build, unit):
    fatbin = aot_build / unit.replace(".cu", ".fatbin")
    assert fatbin.stat().st_size > 0
    # A fatbin names each embedded image's architecture in its ELF/PTX headers.
    image = fatbin.read_bytes()
    for arch in shipped_archs():
        assert f"sm_{arch}".encode() in image, f"{fatbin.name} has no sm_{arch} code"


@pytest.mark.parametrize("unit", UNITS)
def test_cmake_builds_the_tensor_core_files_for_compute_80(aot_build, unit):
    """mma.sync needs sm_80: sm_80-and-newer code compiled from older PTX is the trapping stand-in."""
    if CMAKE is None:
        pytest.skip("cmake not found on PATH")
    (line,) = [line for line in (aot_build.parent / "build.log").read_text().splitlines() if f" {unit} -> " in line]
    assert ("from compute_80" in line) == uses_tensor_cores(unit), line


def test_cmake_manifest_matches_the_shipped_sources(aot_build):
    if CMAKE is None:
        pytest.skip("cmake not found on PATH")
    manifest = (aot_build / cupy_backend.AOT_MANIFEST).read_text().splitlines()
    assert manifest[0].split()[1:] == shipped_archs()
    built = {line.split()[2]: line.split()[1] for line in manifest[1:]}
    assert built == cupy_backend.source_hashes()


def test_backend_accepts_the_installed_fatbins_only_for_shipped_archs(aot_build, monkeypatch):
    if CMAKE is None:
        pytest.skip("cmake not found on PATH")
    monkeypatch.setenv(cupy_backend.AOT_ENV, str(aot_build))
    assert cupy_backend._aot_mismatch(shipped_archs()[-1]) is None
    assert "not sm_70" in cupy_backend._aot_mismatch("70")


# ----------------------------------------------------------------------------- NVRTC


def find_libnvrtc() -> str | None:
    candidates = []
    for entry in sys.path:  # the nvidia-cuda-nvrtc wheel (what cupy-cuda1Nx pulls in)
        candidates += sorted(glob.glob(os.path.join(entry, "nvidia", "*", "lib", "libnvrtc.so*")))
        candidates += sorted(glob.glob(os.path.join(entry, "nvidia", "*", "lib", "nvrtc64*.dll")))
    for var in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(var):
            candidates += sorted(glob.glob(os.path.join(os.environ[var], "lib*", "libnvrtc.so*")))
    found = ctypes.util.find_library("nvrtc")
    if found:
        candidates.append(found)
    for name in candidates:
        if "builtins" in os.path.basename(name):
            continue
        try:
            ctypes.CDLL(name)
            return name
        except OSError:
            continue
    return None


LIBNVRTC = find_libnvrtc()


def nvrtc_compile(source: str, name: str, options: list[str]) -> tuple[int, str]:
    """Compile ``source`` to PTX with NVRTC; returns (nvrtcResult, log)."""
    lib = ctypes.CDLL(LIBNVRTC)
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None) == 0
    opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
    result = lib.nvrtcCompileProgram(prog, len(options), opts)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return result, log.value.decode(errors="replace")


@pytest.mark.skipif(LIBNVRTC is None, reason="no libnvrtc found (pip install nvidia-cuda-nvrtc provides one)")
@pytest.mark.parametrize("unit", UNITS)
def test_kernel_compiles_with_nvrtc_as_the_backend_feeds_it(unit):
    source = cupy_backend.kernel_source(unit)
    assert '#include "' not in source  # local headers are inlined, so CuPy's cache key sees them
    arch = shipped_archs()[0]
    result, log = nvrtc_compile(source, unit, ["-std=c++17", f"-arch=compute_{arch}"])
    assert result == 0, log
    assert "warning" not in log.lower(), log


# ----------------------------------------------------------------------------- packaging


def test_kernel_sources_are_found_in_the_installed_package(tmp_path):
    """Build the wheel, unpack it, and ask the backend where its kernels are from there."""
    # Build from a copy: setuptools writes build/ next to pyproject.toml.
    src = tmp_path / "src"
    skip = shutil.ignore_patterns("__pycache__", "_aot")
    for folder in ("gpubp", "kernels"):
        shutil.copytree(REPO / folder, src / folder, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, src / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(src)],
        check=True, capture_output=True,
    )
    (wheel,) = tmp_path.glob("gpubp-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = (
        "from gpubp.backends import cupy_backend as cb; "
        "print(cb.kernel_dir()); print(len(cb.kernel_source('dense_forward.cu')))"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    assert Path(out[0]) == site / "gpubp" / "kernels"
    assert int(out[1]) > 0
    shipped = sorted(p.name for p in (site / "gpubp" / "kernels").iterdir())
    assert shipped == sorted(p.name for p in KERNELS.iterdir() if p.suffix in (".cu", ".cuh"))
