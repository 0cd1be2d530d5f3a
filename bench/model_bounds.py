"""The kernel performance model's bound beside each measured gpubp benchmark.

bench/gpu_summary.py calls ``model_bounds`` when bench/results/kernel_model.json exists (written
by bench/kernel_model.py), so a GPU check's record puts, next to each measured time, the time
the model says the same work cannot beat:

- the GEMM products the benchmark runs, from its ``workload``, ``backend`` and ``shape``
  (bench/test_gpu_dense.py's ``extra_info``): per layer the forward (batch x out x in), then in
  a training step dW (in x out x batch) where the layer trains and dX (batch x in x out) where a
  layer below it trains (``gpubp.layers.plan_backward``: nothing below the first trainable layer
  computes an input gradient; the input itself needs none);
- the kernel that runs each, as the backend picks it: the per-layer fp32 kernels by the tile
  that suits the output (``cupy_backend.gemm_tile``), the tensor-core kernels for tf32 and bf16,
  the fused MLP kernels for a model whose layers are at most ``FUSED_MLP_MAX_WIDTH`` wide (unless
  the backend is "-per-layer"), the Numba kernels for "gpubp-numba";
- the bound: each product's ``2 m n k`` flops at the kernel's ``issue_ceiling`` (the model's
  figures for the device's architecture: its primary sm_90, or sm_80 from ``other_archs``,
  which has the CUDA C++ kernels only; the ceiling of the hot loop, the fastest copy of the
  main loop, which the benchmarks' aligned operands run: a launch on a slower copy, listed in
  the model's ``sibling_loops``, only takes longer) of the device's peak, where the peak is SMs x 4
  sub-partitions x flops per sub-partition per cycle (64 FFMA flops on sm_90's FP32 lanes, the
  model's ``tensor_flops`` for tf32 and bf16) x the clock: for fp32 the SM clock (nvidia-smi's
  ``clocks.max.sm``), for the tensor cores that clock x ``TENSOR_CLOCK[arch]``, so that the
  tensor-core peaks are NVIDIA's published dense figures. NVIDIA states Hopper's tensor-core
  rates at a lower clock than its fp32 rate (the H100 Tensor Core GPU Architecture whitepaper's
  table of specifications and the H100 datasheet): H100 SXM5's 494.7 TFLOP/s tf32 and 989.4
  bf16 are 132 SMs x 2048 and 4096 flops per cycle at 1830 MHz, its 66.9 TFLOP/s fp32 is 132 x
  256 at 1980 MHz, the clocks.max.sm of an H100 SXM and an H200 (H100 PCIe: 1620 against 1755
  MHz, the same ratio within 0.2%). Ampere's are at the one clock (A100: 312 TFLOP/s bf16 and
  19.5 fp32 at 1410 MHz). A per-layer kernel's grid also pays for its uneven share-out: its
  blocks (dW's after the batch split, ``cupy_backend.dw_split``) are equal work, so the SM that
  gets the most of them, ``ceil(blocks / SMs)``, takes at least that many blocks' flops at one
  SM's rate. (Counting blocks per SM, not the resident slots the occupancy allows, keeps it a
  bound: one block whose warps cover the four sub-partitions may issue at the SM's full rate.)

The ceilings are the shipped (CMake) build's; where the GPU ran NVRTC's builds instead (no fatbin
serves it, as in a first-contact run), the model's ``nvrtc`` figures of the same kernels have the
same hot-loop ceilings (their hot loops differ by 2 instructions at most, in the fused
tensor-core forwards, at a ceiling of 1 either way).

The bound leaves out everything but those products: the elementwise passes (dz, the loss, the
optimizer), memory traffic, launch latency, and the clock falling under load. A measured time
near its bound (ratio near 1) leaves the model nothing to find; a ratio of 3 says two thirds of
the time goes where the model does not look. Workloads of single kernels on toy shapes
("kernels ...") and the baselines (torch, cuBLAS) get no bound.
"""

from __future__ import annotations

import csv
import io
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from gpu_summary import HEAD_ACT, HIDDEN_ACT

from gpubp.backends import cupy_backend as cb
from gpubp.layers import plan_backward

FP32_FLOPS_PER_CYCLE = 64  # per sub-partition: 32 lanes x 2 flops per FFMA, at 1 FFMA per cycle
SUB_PARTITIONS = 4
# The tensor cores' clock as a fraction of clocks.max.sm, at which NVIDIA's dense tensor-core
# peaks are stated (see the module docstring).
TENSOR_CLOCK = {"sm_90": 1830 / 1980, "sm_80": 1.0}
TENSOR_OPERANDS = {"tf32": "TF32", "bf16": "BF16"}
_SINGLE_GEMM = re.compile(r"(tf32|bf16) \d+\^3 (forward|dX|dW)")
_GEMM_KIND = {"forward": "fwd", "dX": "dx", "dW": "dw"}


@dataclass(frozen=True)
class Product:
    """One GEMM: an (m, n) output over k, run by ``kernel``; ``blocks`` its grid's size (None
    where the backend's grid is not modelled: the fused and Numba kernels)."""

    kind: str  # "fwd", "dx" or "dw"
    m: int
    n: int
    k: int
    kernel: str
    blocks: int | None = None

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.n * self.k


def precision_of(backend: str) -> str | None:
    """The dense precision of a gpubp benchmark backend ("gpubp-cupy-tf32" -> "tf32"); "numba"
    for the Numba backend; None for a baseline (torch, cuBLAS)."""
    if backend == "gpubp-numba":
        return "numba"
    if not backend.startswith("gpubp-cupy"):
        return None
    variant = backend[len("gpubp-cupy"):].lstrip("-")
    return variant if variant in TENSOR_OPERANDS else "fp32"


def _per_layer(kind: str, m: int, n: int, k: int, act: str, precision: str, sms: int) -> Product:
    """A per-layer CuPy kernel's product, its grid counted as the backend launches it."""
    if precision in TENSOR_OPERANDS:
        tile, k_step = (cb.TF32_TILE, cb.TF32_TILE), (cb.BF16_BK if precision == "bf16" else cb.TF32_BK)
    else:
        tile, k_step = cb.gemm_tile(m, n, sms), cb.BK
    tiles = -(-m // tile[0]) * (-(-n // tile[1]))
    splits = cb.dw_split(k, tiles, sms, k_step)[0] if kind == "dw" else 1
    return Product(kind, m, n, k, cb._dense_name(kind, act, precision, tile), tiles * splits)


def _kernel_of(kind: str, m: int, n: int, k: int, act: str, precision: str, fused: bool, sms: int) -> Product:
    if precision == "numba":
        return Product(kind, m, n, k, {"fwd": "numba:dense_forward", "dx": "numba:dense_dx", "dw": "numba:dense_dw"}[kind])
    if fused:
        return Product(kind, m, n, k, f"fused_mlp_{'bwd' if kind == 'dx' else kind}{cb.FUSED_PRECISIONS[precision]}")
    return _per_layer(kind, m, n, k, act, precision, sms)


def products(workload: str, backend: str, shape, sms: int) -> list[Product] | None:
    """The GEMM products of one benchmark of bench/test_gpu_dense.py, or None when it has no bound."""
    precision = precision_of(backend)
    if precision is None or workload.startswith("kernels "):
        return None
    if isinstance(shape, str):  # a single n^3 GEMM: the fp32 relu forward, or a tf32/bf16 one
        if not re.fullmatch(r"\d+x\d+x\d+", shape):
            return None
        m, n, k = (int(v) for v in shape.split("x"))
        single = _SINGLE_GEMM.fullmatch(workload)
        if single:
            return [_per_layer(_GEMM_KIND[single.group(2)], m, n, k, HIDDEN_ACT, single.group(1), sms)]
        if workload.startswith("forward ") and precision == "fp32":
            return [_per_layer("fwd", m, n, k, HIDDEN_ACT, precision, sms)]
        return None
    *widths, batch = (int(v) for v in shape)
    layers = list(zip(widths[:-1], widths[1:]))
    if workload.startswith("train step"):
        trainable = [True] * len(layers)
    elif workload.startswith("frozen-backbone step"):
        trainable = [False] * (len(layers) - 1) + [True]
    elif workload.startswith("forward "):
        trainable = None
    else:
        return None
    fused = (precision != "numba" and not backend.endswith("-per-layer")
             and len(layers) <= cb.FUSED_MLP_MAX_LAYERS and all(o <= cb.FUSED_MLP_MAX_WIDTH for _, o in layers))
    acts = [HIDDEN_ACT] * (len(layers) - 1) + [HEAD_ACT]
    out = [_kernel_of("fwd", batch, o, i, act, precision, fused, sms) for (i, o), act in zip(layers, acts)]
    if trainable is not None:
        for (i, o), (need_dx, need_dw) in reversed(list(zip(layers, plan_backward(trainable, False)))):
            if need_dw:
                out.append(_kernel_of("dw", i, o, batch, HEAD_ACT, precision, fused, sms))
            if need_dx:
                out.append(_kernel_of("dx", batch, i, o, HEAD_ACT, precision, fused, sms))
    return out


def sm_clock_hz(facts: dict) -> float | None:
    """The SM clock the bound assumes: nvidia-smi's clocks.max.sm (``facts["nvidia_smi"]``, its
    CSV), else the device property clockRate (kHz); None when neither says."""
    text = facts.get("nvidia_smi")
    if isinstance(text, str):
        rows = list(csv.reader(io.StringIO(text), skipinitialspace=True))
        if len(rows) >= 2:
            for name, value in zip(rows[0], rows[1]):
                found = re.fullmatch(r"([\d.]+) MHz", value.strip())
                if name.strip().startswith("clocks.max.sm") and found:
                    return float(found.group(1)) * 1e6
    khz = facts.get("device", {}).get("clockRate")
    return float(khz) * 1e3 if isinstance(khz, (int, float)) and khz > 0 else None


def peak_flops(entry: dict, precision: str, arch: dict, sms: int, clock_hz: float) -> float:
    """The device's peak for a kernel of the model (``entry``) at SM clock ``clock_hz``: fp32, or
    its tensor-core rate at ``arch["tensor_clock"]`` of that clock."""
    if entry["peak"] == "tensor":
        per_cycle, clock_hz = arch["tensor_flops"][TENSOR_OPERANDS[precision]], clock_hz * arch["tensor_clock"]
    else:
        per_cycle = FP32_FLOPS_PER_CYCLE / arch["ffma_cycles"]
    return sms * SUB_PARTITIONS * per_cycle * clock_hz


def share_out(blocks: int | None, sms: int) -> float:
    """The share of the SMs' time that a grid of ``blocks`` equal blocks can use:
    blocks / (SMs x the most blocks one SM gets); 1 where the grid is not modelled."""
    if blocks is None:
        return 1.0
    return blocks / (-(-blocks // sms) * sms)


def kernels_for(model: dict, arch: str) -> dict | None:
    """The model's kernels for ``arch`` ("sm_90"): its primary architecture's, or one of
    ``other_archs`` (the CUDA C++ kernels only); None when the model has no figures for it."""
    if model.get("arch", "sm_90") == arch:
        return model["kernels"]
    return model.get("other_archs", {}).get(arch)


def bound_seconds(found: list[Product], kernels: dict, arch: dict, precision: str, sms: int,
                  clock_hz: float) -> tuple[float, dict]:
    """(seconds, {kernel: its issue ceiling}) for ``found`` at the ceilings of ``kernels`` (the
    model's, for the device's architecture); a kernel missing there raises KeyError naming it."""
    total, ceilings = 0.0, {}
    for product in found:
        entry = kernels.get(product.kernel)
        if entry is None or not entry.get("issue_ceiling"):
            raise KeyError(f"the kernel model has no issue ceiling for {product.kernel}")
        rate = entry["issue_ceiling"] * peak_flops(entry, precision, arch, sms, clock_hz)
        total += product.flops / (rate * share_out(product.blocks, sms))
        ceilings[product.kernel] = entry["issue_ceiling"]
    return total, ceilings


def _archs() -> dict:
    """bench/kernel_model.py's ``ARCHS``, imported when a bound is made, not with this module:
    kernel_model imports the toolchain's scripts (bench/nvrtc_build.py loads an NVRTC library,
    RTLD_GLOBAL, as it is imported), which ``products`` does not need and the benchmarks that count
    their FLOPs by it (bench/test_gpu_dense.py) must not load before CuPy loads its own."""
    bench = str(Path(__file__).resolve().parent)
    if bench not in sys.path:  # loaded by its path (the tests): its siblings import each other
        sys.path.insert(0, bench)
    from kernel_model import ARCHS

    return ARCHS


def model_bounds(report: dict, model: dict, facts: dict, kernels_sha256: str) -> dict:
    """The summary's ``model_bounds``: the device numbers the bound assumes, whether the model
    is of the measured kernels, and per "workload | backend": bound_ms, measured_ms, ratio
    (measured / bound: 1 is the floor) and the kernels' issue ceilings. ``error`` instead where
    the device numbers are missing."""
    sms = facts.get("device", {}).get("multiProcessorCount")
    clock_hz = sm_clock_hz(facts)
    if not isinstance(sms, int) or clock_hz is None:
        return {"error": "no SM count or SM clock in the device facts (bench/first_contact.py's)"}
    # The device's architecture, where the facts name it; else the model's own.
    capability = facts.get("compute_capability")
    arch_name = f"sm_{capability}" if capability else model.get("arch", "sm_90")
    kernels, archs = kernels_for(model, arch_name), _archs()
    if kernels is None or arch_name not in archs:
        return {"error": f"the kernel model has no figures for {arch_name}, the device's architecture"}
    arch = {"tensor_flops": archs[arch_name].tensor_flops, "ffma_cycles": archs[arch_name].ffma_cycles,
            "tensor_clock": TENSOR_CLOCK[arch_name]}
    out = {"sms": sms, "sm_clock_mhz": round(clock_hz / 1e6),
           "tensor_clock_mhz": round(clock_hz * arch["tensor_clock"] / 1e6), "arch": arch_name,
           "model_is_of_these_kernels": model.get("kernels_sha256") == kernels_sha256, "benchmarks": {}}
    for bench in report.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if not {"workload", "backend", "shape"} <= info.keys():
            continue
        found = products(info["workload"], info["backend"], info["shape"], sms)
        if not found:
            continue
        key = f"{info['workload']} | {info['backend']}"
        try:
            seconds, ceilings = bound_seconds(found, kernels, arch, precision_of(info["backend"]), sms, clock_hz)
        except KeyError as exc:
            out["benchmarks"][key] = {"error": str(exc.args[0])}
            continue
        measured = bench["stats"]["median"]
        out["benchmarks"][key] = {"bound_ms": round(seconds * 1e3, 4), "measured_ms": round(measured * 1e3, 4),
                                  "ratio": round(measured / seconds, 2), "kernels": ceilings}
    out["benchmarks"] = dict(sorted(out["benchmarks"].items()))
    return out


def markdown(bounds: dict) -> list[str]:
    """The bounds as a markdown section for the device report."""
    if "error" in bounds:
        return [f"Kernel model bounds: {bounds['error']}."]
    stale = "" if bounds["model_is_of_these_kernels"] else (
        " **The model was made from other kernels than these: regenerate it (bench/kernel_model.py).**")
    lines = [f"Kernel model bounds ({bounds['arch']}, {bounds['sms']} SMs at {bounds['sm_clock_mhz']} MHz, their tensor "
             f"cores at {bounds['tensor_clock_mhz']} MHz): the GEMM "
             f"products alone at each kernel's issue ceiling; measured / bound, 1 is the floor.{stale}", "",
             "| workload | backend | bound ms | measured ms | measured / bound | kernels (issue ceiling) |",
             "|---|---|---|---|---|---|"]
    for key, row in bounds["benchmarks"].items():
        workload, backend = key.split(" | ")
        if "error" in row:
            lines.append(f"| {workload} | {backend} | | | | {row['error']} |")
            continue
        kernels = ", ".join(f"{name} {ceiling:.2f}" for name, ceiling in row["kernels"].items())
        lines.append(f"| {workload} | {backend} | {row['bound_ms']:.3f} | {row['measured_ms']:.3f} "
                     f"| {row['ratio']:.2f} | {kernels} |")
    return lines
