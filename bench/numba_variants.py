"""Every Numba-CUDA kernel variant the Numba backend can launch, and its PTX.

``gpubp/backends/numba_backend.py`` compiles some kernels once per activation and flag (closures
made by cached factories such as ``_dense_dz_kernel(act)``), others once (module-level kernels,
as the dense forward, whose activation is a launch argument), and each per argument types. No
table here names them: ``variants()`` calls every function of the kernel contract
(``gpubp/backends/__init__.py``) over every activation, precision and flag, in Numba's CUDA
simulator with each launch recorded instead of run, and names each launched kernel by where
it comes from:

- a module-level kernel, ``_sgd_momentum_kernel`` -> ``numba:sgd_momentum``;
- a call of a cached factory (a module function with ``cache_info``, as ``functools.cache``
  gives), ``_dense_dw_kernel("gelu", True)`` -> ``numba:dense_dw[gelu,store_dz]`` (a False
  flag is left out of the name);
- a kernel launched with several argument types gets the differing ones in its name:
  ``numba:softmax_cross_entropy(labels=int32)``.

A kernel that comes from neither is an error, so a rewritten backend is followed or refused,
never half-read. ``every_ptx(cc)`` then compiles each variant, and every entry of the backend's
``kernel_variants()``, with ``numba_backend.kernel_ptx`` for that compute capability and the
launch bounds the backend's kernel carries, the simulator off (libNVVM is needed, not a GPU),
in parallel processes, once per set of inputs (cached in the temporary folder).

What it cannot see: a kernel the contract's functions never launch (a dead kernel), the
optional fused-MLP capability, which the Numba backend does not have (``drive_contract`` says
where to add it), and the dropout variants (the masked forward and dX, dropout_dz, the mask alone),
which ``drive_contract`` does not drive, to keep the model's compile time down; the backend's
``kernel_variants()`` lists them and tests/test_numba_backend.py compiles them (float32 only,
no spills).

    python bench/numba_variants.py            # list the variants
"""

from __future__ import annotations

import inspect
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import temp_cache

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "numba:"


@dataclass(frozen=True)
class Variant:
    name: str  # "numba:dense_dw[gelu,store_dz]"
    origin: tuple  # ("attribute", "_sgd_kernel") or ("factory", "_dense_dw_kernel", ["gelu", True])
    types: tuple  # per argument: ("array", dtype, ndim, layout) or ("scalar", dtype); dtypes as NumPy names
    threads: int  # threads per block of its launch


# ----------------------------------------------------------------------------- driving the contract


def drive_contract(backend) -> None:
    """Call every function of the kernel contract on tiny arrays, over every activation, precision
    and flag the contract has. A backend gaining the optional fused-MLP capability needs its
    ``fused_mlp_forward``/``fused_mlp_backward`` driven here too."""
    import numpy as np

    from gpubp.activations import NAMES

    rng = np.random.default_rng(0)

    def array(*shape):
        return backend.asarray(rng.standard_normal(shape).astype(np.float32))

    batch, n_in, n_out = 3, 5, 4
    x, w, b, dy = array(batch, n_in), array(n_in, n_out), array(n_out), array(batch, n_out)
    for precision, act in itertools.product(backend.dense_precisions(), NAMES):
        y, z = backend.dense_forward(x, w, b, act, precision=precision)
        for need_dx, need_dw in itertools.product((False, True), repeat=2):
            backend.dense_backward(dy, x, w, y, z, act, need_dx, need_dw, precision=precision)
    backend.softmax_(y)
    backend.softmax_backward(dy, y, array(batch, n_out))
    for label_dtype in (np.int32, np.int64):
        backend.softmax_cross_entropy(dy, backend.asarray(np.arange(batch, dtype=label_dtype) % n_out))
    backend.mse(dy, y)
    backend.mae(dy, y)
    backend.huber(dy, y)
    backend.bce(dy, y)
    backend.poisson(dy, y)
    for momentum, nesterov in ((0.0, False), (0.9, False), (0.9, True)):
        velocity = array(n_in, n_out) if momentum else None
        backend.sgd_update(w, array(n_in, n_out), velocity, 0.1, momentum, nesterov, 1e-4)
    second_moment = backend.asarray(rng.random((n_in, n_out), dtype=np.float32))
    for decoupled in (False, True):
        backend.adam_update(w, array(n_in, n_out), array(n_in, n_out), second_moment, 1e-3, 0.9, 0.999, 1e-8,
                            1e-2, 1, decoupled)
    for momentum, centered in ((0.0, False), (0.9, True)):
        backend.rmsprop_update(w, array(n_in, n_out), second_moment, array(n_in, n_out) if centered else None,
                               array(n_in, n_out) if momentum else None, 1e-2, 0.99, 1e-8, 1e-2, momentum, centered)
    backend.sumsq(w)
    backend.scale_(w, 0.5)


def _type_of(value) -> tuple:
    import numba
    from numba.np.numpy_support import as_dtype

    kind = numba.typeof(value)
    if isinstance(kind, numba.types.Array):
        return ("array", as_dtype(kind.dtype).name, kind.ndim, kind.layout)
    return ("scalar", as_dtype(kind).name)


def _trace() -> list[dict]:
    """In the simulator: drive the contract with launches recorded, not run (see the module docstring)."""
    from numba.cuda.simulator.kernel import FakeCUDAKernel

    from gpubp.backends import numba_backend as backend

    origins: dict[int, tuple] = {}
    factory_params: dict[str, list[str]] = {}
    for name, value in vars(backend).items():
        if isinstance(value, FakeCUDAKernel):
            origins[id(value)] = ("attribute", name)
        elif callable(value) and hasattr(value, "cache_info"):
            factory_params[name] = list(inspect.signature(value).parameters)
            setattr(backend, name, _recording_factory(name, value, origins))

    launches: list[tuple] = []

    def configure(kernel, config):
        threads = math.prod(config[1]) if isinstance(config[1], tuple) else config[1]
        return lambda *args: launches.append((kernel, tuple(_type_of(a) for a in args), threads))

    FakeCUDAKernel.__getitem__ = configure
    drive_contract(backend)

    seen: dict[tuple, dict] = {}
    for kernel, types, threads in launches:
        if id(kernel) not in origins:
            raise RuntimeError(f"numba_backend launched {kernel.fn.__qualname__}, which is neither a module-level "
                               "kernel nor made by a cached factory: extend bench/numba_variants.py to name it")
        origin = origins[id(kernel)]
        seen.setdefault((origin, types, threads), {"origin": origin, "types": types, "threads": threads,
                                                    "params": list(inspect.signature(kernel.fn).parameters),
                                                    "factory_params": factory_params.get(origin[1], [])})
    return _named(list(seen.values()))


def _recording_factory(name: str, factory, origins: dict):
    """``factory`` that also notes, for each kernel it returns, the call that made it."""
    def record(*args):
        kernel = factory(*args)
        origins[id(kernel)] = ("factory", name, args)
        return kernel

    return record


def _named(found: list[dict]) -> list[dict]:
    """Give each traced launch its variant name (see the module docstring)."""
    by_origin: dict[tuple, list[dict]] = {}
    for entry in found:
        by_origin.setdefault(entry["origin"], []).append(entry)
    named = []
    for entries in by_origin.values():
        for entry in entries:
            origin = entry["origin"]
            base = origin[1].strip("_").removesuffix("_kernel")
            if origin[0] == "factory":
                parts = [str(arg) if not isinstance(arg, bool) else param
                         for param, arg in zip(entry["factory_params"], origin[2]) if arg is not False]
                base += f"[{','.join(parts)}]"
            differing = [i for i in range(len(entry["types"]))
                         if len({json.dumps(e["types"][i]) for e in entries}) > 1]
            if differing:
                base += "(" + ", ".join(f"{entry['params'][i]}={entry['types'][i][1]}" for i in differing) + ")"
            if len({e["threads"] for e in entries}) > 1:
                base += f"<{entry['threads']}>"
            named.append({"name": PREFIX + base, "origin": origin, "types": entry["types"],
                          "threads": entry["threads"]})
    return sorted(named, key=lambda v: v["name"])


# ----------------------------------------------------------------------------- compiling


class NVVMUnavailable(RuntimeError):
    """numba-cuda cannot compile here: libNVVM (part of the CUDA toolkit) was not found."""


NO_NVVM = "libNVVM (the CUDA toolkit's compiler library) is not installed"


def _traced_kernel(entry: dict):
    """(dispatcher, signature) of a traced variant, with the simulator off."""
    import numpy as np
    from numba import types
    from numba.np.numpy_support import from_dtype

    from gpubp.backends import numba_backend as backend

    def numba_type(spec):
        if spec[0] == "array":
            return types.Array(from_dtype(np.dtype(spec[1])), spec[2], spec[3])
        return from_dtype(np.dtype(spec[1]))

    origin = entry["origin"]
    kernel = getattr(backend, origin[1])
    if origin[0] == "factory":
        kernel = kernel(*origin[2])
    return kernel, tuple(numba_type(spec) for spec in entry["types"])


def _compile_all(traced: list[dict], cc: tuple[int, int], part: int, parts: int) -> dict:
    """With the simulator off, the ``part``-th of ``parts`` shares of ``every_ptx``'s work: each
    distinct kernel compile of the traced variants and of ``numba_backend.kernel_variants()``
    (one dispatcher with the same argument types is one compile, whichever list names it)."""
    from numba import cuda, types
    from numba.cuda.cudadrv import nvvm

    from gpubp.backends import numba_backend as backend

    if not nvvm.is_available():
        return {"unavailable": NO_NVVM}
    named = [("traced", entry["name"], *_traced_kernel(entry)) for entry in traced]
    named += [("backend", f"{v.name}[{v.variant}]", v.kernel, tuple(v.signature)) for v in backend.kernel_variants()]
    compiles: dict[tuple, list] = {}
    for which, name, kernel, signature in named:  # in the same order in every part
        compiles.setdefault((id(kernel), tuple(map(str, signature))), []).append((which, name, kernel, signature))
    result = {"traced": {}, "backend": {}, "device_functions": {}}
    for uses in list(compiles.values())[part::parts]:
        _, _, kernel, signature = uses[0]
        ptx = backend.kernel_ptx(kernel, signature, cc)
        for which, name, _, _ in uses:
            result[which][name] = ptx
    if part == 0:  # the activations, forward and derivative, as device functions
        for name, fn in [*backend._FORWARD.items(), *(("d" + n, g) for n, g in backend._GRAD.items())]:
            with backend._device_functions_compiled_for(cc):  # one may call another
                ptx, restype = cuda.compile_ptx(fn.py_func, (types.float32,), device=True, cc=cc)
            result["device_functions"][name] = {"returns": str(restype), "float64_ops": ptx.count(".f64")}
    return result


def _child(command: str, payload, simulator: bool, timeout: float):
    """Run this file's ``command`` in a fresh interpreter (the simulator is chosen at import)."""
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1" if simulator else "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory(prefix="gpubp-numba-") as folder:
        request, reply = Path(folder) / "request.json", Path(folder) / "reply.json"
        request.write_text(json.dumps(payload))
        done = subprocess.run([sys.executable, __file__, command, str(request), str(reply)], env=env,
                              capture_output=True, text=True, timeout=timeout)
        if done.returncode:
            raise RuntimeError(f"bench/numba_variants.py {command} failed:\n{done.stderr[-4000:]}")
        return json.loads(reply.read_text())


def variants(timeout: float = 300) -> list[Variant]:
    """Every kernel variant the Numba backend launches, by name (see the module docstring)."""
    return [from_dict(v) for v in _child("trace", None, simulator=True, timeout=timeout)]


def every_ptx(cc: tuple[int, int] = (9, 0), jobs: int | None = None, timeout: float = 600) -> dict:
    """One compile, shared: the PTX of every traced variant (``variants()``, which the kernel
    model models) and of every entry of ``numba_backend.kernel_variants()`` (which
    tests/test_numba_backend.py checks), each distinct kernel compiled once, and the activations
    as device functions. Kept in the temporary folder under a hash of what goes in (the gpubp
    package, this file, numba-cuda's version, ``cc``); a second process asking for it (another
    pytest-xdist worker) waits on a file lock and reads the first one's result. Returns
    {"variants": [asdict(Variant)], "traced": {name: ptx}, "backend": {"name[variant]": ptx},
    "device_functions": {name: {"returns": type, "float64_ops": count}}}; raises
    ``NVVMUnavailable`` where numba-cuda finds no libNVVM."""
    import importlib.metadata
    from concurrent.futures import ThreadPoolExecutor

    def compute():
        traced = [asdict(v) for v in variants(timeout)]
        workers = max(1, jobs or os.cpu_count() or 1)
        payloads = [{"traced": traced, "cc": list(cc), "part": part, "parts": workers} for part in range(workers)]
        with ThreadPoolExecutor(workers) as pool:
            parts = list(pool.map(lambda payload: _child("compile_all", payload, False, timeout), payloads))
        result = {"variants": traced, "traced": {}, "backend": {}, "device_functions": {}}
        for part in parts:
            if "unavailable" in part:
                return {"unavailable": part["unavailable"]}
            for field in ("traced", "backend", "device_functions"):
                result[field].update(part[field])
        return result

    sources = [Path(__file__), *sorted((ROOT / "gpubp").rglob("*.py"))]
    inputs = [list(cc), importlib.metadata.version("numba-cuda"),
              *(str(p.relative_to(ROOT)).encode() + b"\0" + p.read_bytes() for p in sources)]
    result = temp_cache.cached_json("gpubp-numba-ptx", inputs, compute)
    if "unavailable" in result:
        raise NVVMUnavailable(result["unavailable"])
    return result


def from_dict(entry: dict) -> Variant:
    return Variant(entry["name"], _frozen(entry["origin"]), _frozen(entry["types"]), entry["threads"])


def _frozen(value):
    return tuple(_frozen(v) for v in value) if isinstance(value, list) else value


def main(argv: list[str]) -> None:
    if argv and argv[0] in ("trace", "compile_all"):
        command, request, reply = argv
        if command == "trace":
            result = _trace()
        else:
            payload = json.loads(Path(request).read_text())
            result = _compile_all(payload["traced"], tuple(payload["cc"]), payload["part"], payload["parts"])
        Path(reply).write_text(json.dumps(result))
        return
    for variant in variants():
        print(f"{variant.name:56s} {variant.threads:4d} threads  {len(variant.types)} arguments")


if __name__ == "__main__":
    main(sys.argv[1:])
