"""Where NVRTC and the CUDA headers are: what CuPy needs to compile ``kernels/*.cu`` at run time.

CuPy 14 finds both through ``cuda-pathfinder`` (NVRTC with ``load_nvidia_dynamic_lib("nvrtc")``,
the headers with ``find_nvidia_header_directory("cudart")``) and raises "Failed to find CUDA
headers" at the first kernel without them, unless a CMake-built fatbin serves the GPU. The
``gpubp[cuda12]``/``gpubp[cuda13]`` extras bring both (CuPy's ``ctk`` extra). Where
``cuda-pathfinder`` is not installed (CuPy 13), the usual places are searched: the NVIDIA
wheels on ``sys.path``, ``CUDA_PATH``/``CUDA_HOME`` and ``/usr/local/cuda``.

Used by ``python -m gpubp info`` and by the NVRTC tests; imports neither CuPy nor Numba.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys

try:
    from cuda import pathfinder
except ImportError:
    pathfinder = None

_HEADER = "cuda_runtime.h"


def _toolkit_roots() -> list[str]:
    roots = [os.environ[var] for var in ("CUDA_PATH", "CUDA_HOME") if os.environ.get(var)]
    return roots + ["/usr/local/cuda"]


def nvrtc_library() -> tuple[str | None, str]:
    """(path of a libnvrtc that loads, how it was found), or (None, why none was)."""
    if pathfinder is not None:
        try:
            loaded = pathfinder.load_nvidia_dynamic_lib("nvrtc")
        except Exception as exc:  # DynamicLibNotFoundError, or a library that fails to load
            return None, f"cuda-pathfinder found none ({' '.join(str(exc).split())[:200]})"
        return loaded.abs_path, f"cuda-pathfinder, {getattr(loaded, 'found_via', 'found')}"
    candidates = []
    for entry in sys.path:  # the nvidia-cuda-nvrtc wheels
        candidates += sorted(glob.glob(os.path.join(entry, "nvidia", "*", "lib", "libnvrtc.so*")))
        candidates += sorted(glob.glob(os.path.join(entry, "nvidia", "*", "bin", "nvrtc64*.dll")))
    for root in _toolkit_roots():
        candidates += sorted(glob.glob(os.path.join(root, "lib*", "libnvrtc.so*")))
    found = ctypes.util.find_library("nvrtc")
    if found:
        candidates.append(found)
    for name in candidates:
        if "builtins" in os.path.basename(name):
            continue
        try:
            ctypes.CDLL(name)
        except OSError:
            continue
        return name, "searched without cuda-pathfinder"
    return None, "not in the NVIDIA wheels on sys.path, CUDA_PATH, CUDA_HOME or /usr/local/cuda"


def cuda_headers() -> tuple[str | None, str]:
    """(the folder holding cuda_runtime.h, how it was found), or (None, why none was)."""
    if pathfinder is not None:
        try:
            folder = pathfinder.find_nvidia_header_directory("cudart")
        except Exception as exc:  # an unsupported layout, say
            return None, f"cuda-pathfinder failed ({' '.join(str(exc).split())[:200]})"
        if folder is None:
            return None, "cuda-pathfinder found none"
        return folder, "cuda-pathfinder"
    candidates = [os.path.join(entry, "nvidia", "*", "include") for entry in sys.path]
    candidates += [os.path.join(root, "include") for root in _toolkit_roots()]
    for pattern in candidates:
        for folder in sorted(glob.glob(pattern)):
            if os.path.isfile(os.path.join(folder, _HEADER)):
                return folder, "searched without cuda-pathfinder"
    return None, "not in the NVIDIA wheels on sys.path, CUDA_PATH, CUDA_HOME or /usr/local/cuda"
