"""Ask the CUDA driver how many GPUs it sees, without importing CuPy or Numba.

Used by ``python -m gpubp info`` and by the test suite, which must decide whether to
turn on Numba's CUDA simulator *before* Numba is imported.
"""

from __future__ import annotations

import ctypes
import ctypes.util


def cuda_device_count() -> tuple[int, str | None]:
    """Return ``(count, None)``, or ``(0, reason)`` when no usable driver or device is found."""
    names = ["libcuda.so.1", "libcuda.so", "nvcuda.dll"]
    found = ctypes.util.find_library("cuda")
    if found:
        names.insert(0, found)
    lib = None
    for name in names:
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if lib is None:
        return 0, "no CUDA driver library (libcuda) found"
    status = lib.cuInit(0)
    if status != 0:
        return 0, f"the CUDA driver failed to initialise (cuInit returned {status})"
    count = ctypes.c_int(0)
    status = lib.cuDeviceGetCount(ctypes.byref(count))
    if status != 0:
        return 0, f"cuDeviceGetCount returned {status}"
    if count.value == 0:
        return 0, "the CUDA driver sees no GPU"
    return count.value, None
