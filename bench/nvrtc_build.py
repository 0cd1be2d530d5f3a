"""NVRTC as CuPy 14 runs it on a GPU, without one: libnvrtc through ctypes, to an sm_XX cubin.

- ``cupy_options(arch, backend_options)``: the options CuPy compiles a RawModule with on a GPU of
  compute capability ``arch``: the backend's (``cupy_backend.nvrtc_options``), CuPy's own, the
  CUDA headers, and ``-arch=sm_<arch>``, which asks NVRTC for a cubin, so ptxas runs (and
  enforces the static shared-memory limit) at compile time;
- ``compile_program(source, name, options, cubin_to=None)``: one compile, (nvrtcResult, log, cubin
  size);
- ``cubin(source, name, options)``: one compile with ptxas's spill warning on that must succeed
  with no warning but spills: {"size", "spills": {kernel: [stored, loaded]}, "cubin": base64},
  kept in the temporary folder (``temp_cache``) by everything that goes into it (libnvrtc's
  file, the options, the source), so tests/test_kernels_compile.py's compile of a module and
  bench/kernel_model.py's read of the same module happen once per machine;
- ``identity()``: which NVRTC this is, exactly (its version and the sha256 of its library file),
  and ``inputs_sha256(source, options)``: what else goes into a compile. Together they say when a
  compile recorded elsewhere (bench/kernel_model.py's of every module ``preload`` builds) is the
  one this machine would make.

``LIBNVRTC`` is None where no libnvrtc is found (``pip install nvidia-cuda-nvrtc`` provides one).
"""

from __future__ import annotations

import base64
import ctypes
import functools
import hashlib
import re
import tempfile
from pathlib import Path

import temp_cache

from gpubp import _toolkit
from gpubp.backends import cupy_backend

LIBNVRTC, _ = _toolkit.nvrtc_library()
CUDA_HEADERS, _ = _toolkit.cuda_headers()
CACHE_FOLDER = "gpubp-nvrtc"

SPILL = re.compile(r"ptxas warning : Registers are spilled to local memory in function '(\w+)', "
                   r"(\d+) bytes spill stores, (\d+) bytes spill loads")


class NvrtcError(RuntimeError):
    """A compile that failed, or warned of anything but a spill; the message holds NVRTC's log."""


def cupy_options(arch: str, backend_options=cupy_backend.NVRTC_OPTIONS) -> list[str]:
    """What CuPy 14 compiles a RawModule with on a GPU of compute capability ``arch``."""
    options = [*backend_options, "-ftz=true", "--device-as-default-execution-space", f"-arch=sm_{arch}"]
    return options + ([f"-I{CUDA_HEADERS}"] if CUDA_HEADERS else [])


def compile_program(source: str, name: str, options: list[str], cubin_to: Path | None = None) -> tuple[int, str, int]:
    """Compile ``source`` with NVRTC; returns (nvrtcResult, log, size of the cubin, 0 if none), and
    writes the cubin to ``cubin_to`` when given."""
    lib = ctypes.CDLL(LIBNVRTC)
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None) != 0:
        raise NvrtcError(f"nvrtcCreateProgram failed for {name}")
    opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
    result = lib.nvrtcCompileProgram(prog, len(options), opts)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    cubin = ctypes.c_size_t(0)
    if result == 0 and any(o.startswith("-arch=sm_") for o in options):
        if lib.nvrtcGetCUBINSize(prog, ctypes.byref(cubin)) != 0:
            raise NvrtcError(f"nvrtcGetCUBINSize failed for {name}")
        if cubin_to is not None:
            code = ctypes.create_string_buffer(cubin.value)
            if lib.nvrtcGetCUBIN(prog, code) != 0:
                raise NvrtcError(f"nvrtcGetCUBIN failed for {name}")
            cubin_to.write_bytes(code.raw)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return result, log.value.decode(errors="replace"), cubin.value


def cubin(source: str, name: str, options: list[str]) -> dict:
    """``compile_program`` with ptxas's spill warning on, cached: {"size": cubin bytes, "spills":
    {kernel: [stored, loaded]}, "cubin": the cubin, base64}. Raises ``NvrtcError`` on an error or a
    warning other than a spill."""
    options = [*options, "-Xptxas", "-warn-spills"]
    lib = Path(LIBNVRTC).resolve()

    def compute() -> dict:
        with tempfile.TemporaryDirectory(prefix="gpubp-nvrtc-") as folder:
            path = Path(folder) / "module.cubin"
            result, log, size = compile_program(source, name, options, cubin_to=path)
            if result != 0:
                raise NvrtcError(f"{name} {' '.join(options)}:\n{log}")
            spills = {kernel: [int(stored), int(loaded)] for kernel, stored, loaded in SPILL.findall(log)}
            others = [line for line in log.splitlines() if "warning" in line.lower() and not SPILL.search(line)]
            if others:
                raise NvrtcError(f"{name} {' '.join(options)}:\n{log}")
            return {"size": size, "spills": spills, "cubin": base64.b64encode(path.read_bytes()).decode()}

    return temp_cache.cached_json(CACHE_FOLDER, [str(lib), lib.stat().st_size, lib.stat().st_mtime_ns, *options,
                                                 source], compute)


@functools.cache
def identity() -> dict[str, str]:
    """{"version": NVRTC's "major.minor", "sha256": of the libnvrtc file}: the version alone does not
    name a build, which patch releases (13.5.37 and a later 13.5.x wheel) share."""
    lib = ctypes.CDLL(LIBNVRTC)
    major, minor = ctypes.c_int(), ctypes.c_int()
    if lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)) != 0:
        raise NvrtcError(f"nvrtcVersion failed for {LIBNVRTC}")
    with open(LIBNVRTC, "rb") as library:
        digest = hashlib.file_digest(library, "sha256").hexdigest()
    return {"version": f"{major.value}.{minor.value}", "sha256": digest}


def inputs_sha256(source: str, options: list[str]) -> str:
    """sha256 of a compile's source and options, but the ``-I`` of the CUDA headers: a path of the
    machine, and no kernel includes a header from it (kernel_source inlines the local ones; the
    sources include no system header, which tests/test_kernels_compile.py checks)."""
    digest = hashlib.sha256()
    for part in [option for option in options if not option.startswith("-I")] + [source]:
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()


def write_cubin(compiled: dict, path: Path) -> Path:
    """``cubin``'s cubin written to ``path``."""
    path.write_bytes(base64.b64decode(compiled["cubin"]))
    return path
