"""A performance model of every kernel, without a GPU: what the compiler made of each one.

    PYTHONPATH=. python bench/kernel_model.py [--kernel-dir DIR] [--out FILE] [--jobs N] [--compile] [--accept REASON]

(from the repository root) writes ``bench/results/kernel_model.json`` and, next to it, ``kernel_model.md`` (``--out`` names
the JSON). Where that JSON exists, the fresh figures are first compared with it (``regressions``,
as CI compares them): any regression but a kernel added or removed is printed and nothing is
written (exit status 1), unless ``--accept REASON`` is given, which writes the report with the
regressions, the reason and what they were measured against under ``accepted``.
``tests/test_kernel_model.py`` rebuilds the model for sm_90 in CI and fails on a spill, on a kernel the committed report does not name, and on a figure worse than the
committed one (the hot loops' by ``issue_ratio``, uncapped; occupancy, registers, stack and
shared memory; the hot loop's work per pass: ``regressions``).

What is compiled. Every ``kernels/*.cu`` as the shipped build (``CMakeLists.txt``) compiles it:
the front end for ``compute_80`` when the file reaches ``mma.cuh`` and for the lowest shipped
architecture otherwise, then ptxas for sm_90 and sm_80. By default the model does not compile
them itself: it reads the sm_90 and sm_80 code of the shipped build's fatbins
(``bench/aot_build.py``, one build per set of inputs, shared through the temporary folder with
tests/test_kernels_compile.py) with ``cuobjdump``, the resources from ``-res-usage`` instead of
ptxas's report. That build fails on a register spill (``-Xptxas -warn-spills`` with ``-Werror
all-warnings``), so the spills of its kernels are 0. ``--compile`` (and any ``--kernel-dir``
outside a tree with a CMakeLists.txt) compiles with ``nvcc -ptx`` and ptxas instead; both ways
give the same figures. The kernels of the speed goals are also compiled as a pip install's first
step compiles them where no fatbin serves the GPU (``first_step_parts``: one NVRTC module per
GEMM kernel, for a relu model's activations; ``bench/nvrtc_build.py``, straight for sm_90 as
CuPy compiles) and modelled the same way, under the report's ``nvrtc``. Every NVRTC module
``cupy_backend.preload`` compiles (``preload_modules``) is compiled so as well, and its spills
and compile inputs recorded under ``nvrtc_preload``: tests/test_kernels_compile.py compiles each
kernel that takes its activation at launch for some activations, and leaves the slow modules
that hold one for every activation to this record where the inputs and the NVRTC are the same.
Every Numba-CUDA kernel
variant the Numba backend can launch (``bench/numba_variants.py``) through
``numba.cuda.compile_ptx`` for compute capability 9.0 (a compile tests/test_numba_backend.py
shares) and ptxas for sm_90. Results are cached by a hash of everything that goes into them
(sources, toolchain versions, this model's code) in the temporary folder.

What is read (``bench/sass_reader.py``), per kernel and architecture:

- ptxas's report: registers per thread, spill bytes (spill stores plus spill loads), and
  static shared memory per block, to which the dynamic shared memory the CuPy backend launches
  the kernel with is added (``cupy_backend._dynamic_shared_bytes``: the TF32 GEMMs' pipeline).
  A Numba kernel's module is compiled as its launch links it (``ptxas -c``), whose report has no
  shared memory: its static shared memory is what the PTX declares (``sass.ptx_shared_bytes``);
- the launch shape: ``__launch_bounds__``'s thread count from the cubin (``EIATTR_MAX_THREADS``);
  for Numba kernels, the block the backend launches them with. The model assumes a kernel
  is launched with exactly that many threads;
- the hot loop in the SASS (``sass.hot_loops``): among the innermost loops, those with the most
  tensor-core instructions (HMMA, HGMMA) per pass in a kernel that has any, else those with the
  most FFMA; loops with the same count are copies of one main loop (a template's aligned and
  unaligned paths, the fused kernels' first and later k chunks), the hot loop is the copy that
  issues the fewest instructions (the highest ceiling), and the others are recorded beside it
  (``sibling_loops``), each with its own ceiling: what a launch that takes another path runs.
  An instruction mix counts every instruction in the loop's address range once (static counts:
  both sides of a branch inside the loop count) but padding: NOP, and an instruction on a
  never-true predicate (sm_90's ``@!UPT UIADD3 URZ, ...``).

The model, per kernel:

- ``occupancy_warps``: resident warps per SM, the least of four limits, as CUDA's occupancy
  calculator takes them: (1) warps: 64 per SM; (2) blocks: 32 per SM; (3) registers: a
  warp's registers are ``registers x 32`` rounded up to 256, each of the SM's 4
  sub-partitions holds ``floor(16384 / that)`` warps, and whole blocks fit in 4 times that
  (none when a block's warps, rounded up to a multiple of 4, need more than 64K registers);
  (4) shared memory: each block takes its static shared memory plus 1 KiB the system
  reserves, rounded up to 128 bytes, out of 228 KiB per SM on sm_90 and 164 KiB on sm_80 (the
  largest carveout, which the driver picks for a kernel that needs it); dynamic shared memory
  counts as the backend requests it.
- ``issue_ceiling``: the largest fraction of the SM's peak that the hot loop can sustain if
  each sub-partition issues one warp instruction per cycle and nothing else stalls. A pass
  of the loop costs a warp ``I`` issue cycles (``I`` = its instructions) on its sub-partition:

  * fp32 (a hot loop without tensor-core instructions): the FP32 pipe needs ``F x c`` cycles for
    the loop's ``F`` FFMA, ``c`` = 32 lanes / FP32 lanes per sub-partition (1 on sm_90, 2 on
    sm_80), so ``ceiling = F c / max(I, F c)``; on sm_90 that is the FFMA share ``F / I``.
  * tensor (a hot loop with HMMA or HGMMA): each keeps the sub-partition's tensor core busy for
    ``2 m n k / dense peak flops per sub-partition per cycle`` cycles: on sm_90 512 (tf32) and
    1024 (bf16, f16), so HMMA.1688 tf32 and HMMA.16816 bf16 take 4 cycles; on sm_80 256 and
    512, 8 cycles. The opcode gives the shape and the input type (``tensor_op``):
    ``HMMA.<shape>.<accumulator>[.<input>]``, the input written where it is not f16
    (HMMA.16816.F32.BF16; HMMA.16816.F32 and HMMA.16816.F16 take f16); an HGMMA.MxNxK
    (``wgmma``) is a warpgroup's, each of its 4 warps issuing it on its own sub-partition, which
    does an (M/4) x N x K share. With ``T`` the sum over the loop's tensor-core instructions,
    ``ceiling = T / max(I, T)``: about 4 instructions per HMMA reach the sm_90 peak.
    The peak is the dense tensor-core peak of the datasheets (H100 SXM: 495 TFLOP/s tf32,
    989 bf16 at 132 SMs and 1.83 GHz, below the 1.98 GHz of its fp32 peak; A100: 156 and 312 at
    108 SMs and 1.41 GHz), as bench/model_bounds.py's bounds take it; on Hopper ``mma.sync``
    itself is not known to reach it (``wgmma`` does), so the real ceiling may be lower still.
    A kernel with tensor-core instructions but none in its hot loop (none in an innermost loop)
    is refused (``kernel_figures``): no ceiling the model takes would describe its work.

  The ceiling before that cap, ``busy / I`` (``issue_ratio``; busy = ``F c`` or ``T``), is what
  the comparison with the committed report takes (``regressions``), for the hot loop and each
  of its copies: every sm_90 tensor-core loop issues fewer than 4 instructions per HMMA, and
  every sm_80 fp32 GEMM loop has an FFMA share above one half, so their ceilings are all 1,
  which a loop could grow by up to a half without moving (sm_90 ``dense_dx_tf32``'s from 2.64
  to 4 instructions per HMMA). The report does not record it: it is computed from each loop's
  instruction mix, in both reports, when they are compared.

  The ceiling is a bound, not a prediction: the model cannot see latency and how well the
  resident warps hide it, dependency stalls, shared-memory bank conflicts (the access
  profiler's figures cover those), L2 and DRAM bandwidth and hit rates, clocks and power
  limits, the warp scheduler's choices, tail effects of the grid, and how often each branch
  inside the loop is taken. Kernels that stream memory (losses, optimizer updates) are bound
  by bandwidth, which their ceiling does not describe.

Memory figures. ``shared_wavefronts_per_request``, ``global_load_efficiency`` and
``global_store_efficiency`` come from the access profiler of the CPU kernel harness
(``tests/cuda_on_cpu/access_profile.py``, whose docstring says what it counts and what it
cannot see), through ``memory_figures``, for the CUDA C++ kernels, each from one launch of the
profiler's workloads (``memory_workloads`` in the report); they are null where the profiler is
absent, and for Numba kernels, which it does not run. Beside them:
``shared_ideal_wavefronts_per_request`` (the same bytes without bank conflicts: 4 for a
conflict-free 16-byte access, so the ratio of the two is the conflict factor, which CI compares
in place of the wavefronts where both reports have it) and
``memory_lines_below_ideal``, the source lines whose requests take more wavefronts than the
ideal or use less than every byte of the sectors they move.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import aot_build
import numba_variants
import nvrtc_build
import sass_reader as sass
import temp_cache
from gpu_summary import HEAD_ACT, HIDDEN_ACT, kernels_sha256

from gpubp.backends import cupy_backend

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "kernels"
RESULTS = ROOT / "bench" / "results"
ACCESS_PROFILER = ROOT / "tests" / "cuda_on_cpu" / "access_profile.py"
CACHE_FOLDER = "gpubp-kernel-model"  # in the temporary folder (temp_cache.py)
PRIMARY_ARCH = "sm_90"
CUDA_ARCHS = ("sm_90", "sm_80")  # the CUDA C++ kernels; Numba's are modelled for PRIMARY_ARCH only
NUMBA_SOURCE = "numba_backend.py"
MEMORY_FIELDS = ("shared_wavefronts_per_request", "global_load_efficiency", "global_store_efficiency")
MEMORY_DETAILS = ("shared_ideal_wavefronts_per_request", "memory_lines_below_ideal")
# Higher is better for these (the others: lower is better).
HIGHER_IS_BETTER = ("global_load_efficiency", "global_store_efficiency")
# A fresh figure may be this much worse, relatively, than the committed one before CI fails:
# one instruction more in a 50-instruction loop.
TOLERANCE = 0.02
RERUN = "run bench/kernel_model.py and commit its report"
# The kernels bench/gpu_summary.py's ratios time (regular expressions, in the order shown).
SPEED_GOALS = (
    "dense_fwd_128x128", "dense_dx_128x128", "dense_dw_128x128",
    r"dense_fwd_(tf32|bf16)_relu", r"dense_dx_(tf32|bf16)", r"dense_dw_(tf32|bf16)",
    r"fused_mlp_fwd(_tf32|_bf16)?", r"fused_mlp_bwd(_tf32|_bf16)?", r"fused_mlp_dw(_tf32|_bf16)?",
    "numba:dense_forward", "numba:dense_dx", "numba:dense_dw",
)


@dataclass(frozen=True)
class Arch:
    """Per-SM limits and pipe widths of one architecture (CUDA C Programming Guide, compute
    capabilities table; the occupancy calculator's allocation granularities)."""

    name: str
    cc: tuple[int, int]
    max_warps: int
    max_blocks: int
    registers: int  # 32-bit registers per SM
    sub_partitions: int
    register_unit: int  # a warp's registers are allocated in multiples of this
    max_registers_per_block: int
    smem: int  # bytes of shared memory per SM at the largest carveout
    smem_reserved: int  # bytes the system takes per block
    smem_unit: int
    ffma_cycles: int  # cycles one warp's FFMA occupies a sub-partition's FP32 lanes
    tensor_flops: dict  # dense tensor-core flops per sub-partition per cycle, by operand type


ARCHS = {
    "sm_90": Arch("sm_90", (9, 0), max_warps=64, max_blocks=32, registers=65536, sub_partitions=4,
                  register_unit=256, max_registers_per_block=65536, smem=228 * 1024, smem_reserved=1024,
                  smem_unit=128, ffma_cycles=1, tensor_flops={"TF32": 512, "BF16": 1024, "F16": 1024}),
    "sm_80": Arch("sm_80", (8, 0), max_warps=64, max_blocks=32, registers=65536, sub_partitions=4,
                  register_unit=256, max_registers_per_block=65536, smem=164 * 1024, smem_reserved=1024,
                  smem_unit=128, ffma_cycles=2, tensor_flops={"TF32": 256, "BF16": 512, "F16": 512}),
}
# HMMA shape (as SASS spells it) -> (m, n, k)
HMMA_SHAPES = {"1688": (16, 8, 8), "16816": (16, 8, 16), "1684": (16, 8, 4)}
# wgmma's M is always 64: a warpgroup's 4 warps take 16 rows each.
_HGMMA_SHAPE = re.compile(r"64x(\d+)x(\d+)")


# ----------------------------------------------------------------------------- tools


def cuda_tool(name: str) -> str:
    """A CUDA binary: from the nvidia-cuda-* wheels (``pip install nvidia-cuda-cuobjdump
    nvidia-cuda-nvdisasm``, in the dev extra), else from PATH."""
    try:
        import nvidia
    except ImportError:
        wheels = []
    else:
        wheels = [path for base in nvidia.__path__ for path in sorted(Path(base).glob(f"*/bin/{name}"))]
    found = [str(p) for p in wheels if os.access(p, os.X_OK)] or [shutil.which(name)]
    if found[0] is None:
        raise FileNotFoundError(f"{name} not found in the nvidia-* wheels or on PATH "
                                "(pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
    return found[0]


def _run(*command: str) -> str:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return done.stdout + done.stderr


def toolchain() -> dict[str, str]:
    """The versions the figures depend on."""
    def release(tool: str) -> str:
        return re.search(r"V(\d+\.\d+\.\d+)", _run(tool, "--version")).group(1)

    return {"nvcc": release("nvcc"), "ptxas": release("ptxas"), "cuobjdump": release(cuda_tool("cuobjdump")),
            "numba_cuda": importlib.metadata.version("numba-cuda")}


# ----------------------------------------------------------------------------- what the shipped build compiles


# CMakeLists.txt's architectures, code-generation flags and choice of front end, as the shared
# build reads them.
shipped_archs, codegen_flags = aot_build.shipped_archs, aot_build.codegen_flags
uses_tensor_cores = aot_build.uses_tensor_cores


def front_end_arch(unit: str, kernel_dir: Path = KERNELS) -> str:
    """The virtual architecture CMakeLists.txt compiles ``unit``'s sm_80-and-newer SASS from."""
    return "compute_80" if uses_tensor_cores(unit, kernel_dir) else f"compute_{shipped_archs()[0]}"


# ----------------------------------------------------------------------------- the model


def occupancy(registers: int, smem_bytes: int, threads: int, arch: Arch) -> tuple[int, str]:
    """(resident warps per SM, the limit that binds) for blocks of ``threads`` threads."""
    warps = -(-threads // 32)
    per_warp = -(-registers * 32 // arch.register_unit) * arch.register_unit
    per_block_smem = -(-(smem_bytes + arch.smem_reserved) // arch.smem_unit) * arch.smem_unit
    blocks = {
        "warps": arch.max_warps // warps,
        "blocks": arch.max_blocks,
        "registers": (arch.registers // arch.sub_partitions // per_warp) * arch.sub_partitions // warps,
        "shared memory": arch.smem // per_block_smem,
    }
    # The launch check takes a block's warps as if spread over every sub-partition.
    if per_warp * -(-warps // arch.sub_partitions) * arch.sub_partitions > arch.max_registers_per_block:
        blocks["registers"] = 0
    limit = min(blocks, key=blocks.get)
    return blocks[limit] * warps, limit


def tensor_op(opcode: str) -> tuple[str, tuple[int, int, int] | None, str]:
    """(shape as SASS spells it, the (m, n, k) one sub-partition computes or None for a shape
    not known here, input type) of an HMMA or HGMMA opcode: ``<op>.<shape>.<accumulator>``
    followed by the input type where it is not F16 (see the module docstring)."""
    base, shape, *types = opcode.split(".")  # types: the accumulator's, then the inputs' where written
    operands = types[1] if len(types) > 1 else "F16"
    if base == "HGMMA" and (mnk := _HGMMA_SHAPE.fullmatch(shape)):
        return shape, (16, int(mnk.group(1)), int(mnk.group(2))), operands
    return shape, HMMA_SHAPES.get(shape) if base == "HMMA" else None, operands


def tensor_cycles(opcode: str, arch: Arch) -> float:
    """Cycles one HMMA or HGMMA keeps a sub-partition's tensor core busy at the dense peak."""
    shape, mnk, operands = tensor_op(opcode)
    if mnk is None or operands not in arch.tensor_flops:
        raise ValueError(f"{opcode}: no tensor-core rate for shape {shape!r} with {operands!r} operands on {arch.name}")
    m, n, k = mnk
    return 2 * m * n * k / arch.tensor_flops[operands]


def work_cycles(mix: dict, arch: Arch) -> float:
    """The cycles one pass of a loop (its ``instruction_mix``, or a loop of the report) keeps its
    sub-partition's pipe busy: the tensor core's for its tensor-core instructions where it has
    any, else the FP32 lanes' for its FFMA (see the module docstring)."""
    if mix["hmma_by_shape"]:
        return sum(n * tensor_cycles(opcode, arch) for opcode, n in mix["hmma_by_shape"].items())
    return mix["ffma"] * arch.ffma_cycles


def issue_ratio(mix: dict, arch: Arch) -> float:
    """``work_cycles`` per instruction the pass issues: the issue ceiling before its cap at 1,
    the figure ``regressions`` compares (4 / instructions per HMMA for an sm_90 loop of
    HMMA.1688 tf32 or HMMA.16816 bf16; the FFMA share for an sm_90 fp32 loop, twice it on sm_80)."""
    return work_cycles(mix, arch) / mix["instructions"]


def issue_ceiling(mix: dict, arch: Arch) -> float:
    """The fraction of the fp32 (no tensor-core instruction) or tensor-core peak the loop can
    sustain at one issue per cycle per sub-partition (see the module docstring)."""
    return min(1.0, issue_ratio(mix, arch))


def loop_figures(loop: sass.Loop, arch: Arch) -> dict:
    """One loop's instruction mix and issue ceiling."""
    mix = sass.instruction_mix(loop.body)
    return {
        "address": f"{loop.start:#06x}-{loop.end:#06x}",
        "instructions": mix["instructions"],
        "ffma": mix["ffma"],
        "hmma": mix["hmma"],
        "hgmma": mix["hgmma"],
        "ffma_share": round(mix["ffma"] / mix["instructions"], 4),
        "instr_per_hmma": round(mix["instructions"] / mix["hmma"], 2) if mix["hmma"] else None,
        **{kind: mix[kind] for kind in ("lds", "ldsm", "sts", "ldg", "ldgsts", "stg", "other")},
        "hmma_by_shape": mix["hmma_by_shape"],
        "issue_ceiling": round(issue_ceiling(mix, arch), 4),
    }


def kernel_figures(resources: sass.Resources, code: list[sass.Instruction], threads: int | None, arch: Arch,
                   dynamic_smem: int = 0, name: str = "the kernel") -> dict:
    """The model's figures for one compiled kernel (memory figures not included); ``dynamic_smem``:
    the dynamic shared memory the backend launches it with. ``hot_loop`` is the fastest copy of
    the hot loop and ``sibling_loops`` the others, fastest first (``sass.hot_loops``). ``peak``
    is the peak the hot loop's ceiling is a fraction of: the tensor-core peak where the hot loop
    holds tensor-core instructions, else fp32. A kernel (``name``, for the message) with a
    tensor-core instruction outside its hot loop and none in it is refused (ValueError): its
    ceiling would be an FFMA loop's fraction of the fp32 peak while its work runs on the tensor
    cores, which the model cannot bound."""
    hot, *siblings = [loop_figures(loop, arch) for loop in sass.hot_loops(code)] or [None]
    tensor = [i for i in code if i.base in sass.TENSOR and not i.padding]
    if tensor and not (hot and hot["hmma_by_shape"]):
        where = f"its hot loop ({hot['address']}) holds none" if hot else "it has no loop"
        raise ValueError(f"{name} ({arch.name}) has tensor-core instructions ({len(tensor)}, the first "
                         f"{tensor[0].opcode} at {tensor[0].address:#06x}) but none in an innermost loop, so {where}: "
                         "no ceiling the model takes would describe its tensor-core work, nor the fp32 peak bound it")
    smem = resources.smem_bytes + dynamic_smem
    warps, limit = occupancy(resources.registers, smem, threads, arch) if threads else (None, None)
    return {
        "threads": threads,
        "registers": resources.registers,
        "spill_bytes": resources.spill_stores + resources.spill_loads,
        "stack_bytes": resources.stack_frame,
        "smem_bytes": smem,
        "dynamic_smem_bytes": dynamic_smem,
        "occupancy_warps": warps,
        "occupancy_limit": limit,
        "peak": "tensor" if hot and hot["hmma_by_shape"] else "fp32",
        "hot_loop": hot,
        "sibling_loops": siblings,
        "issue_ceiling": hot["issue_ceiling"] if hot else None,
    }


def read_cubin(cubin: Path, resources: dict[str, sass.Resources], arch: Arch,
               threads: int | None = None) -> dict[str, dict]:
    """Figures of every entry function of one cubin, whose ``resources`` ptxas reported;
    ``threads`` is the block size of kernels that have no ``__launch_bounds__``."""
    cuobjdump = cuda_tool("cuobjdump")
    code = sass.sass_functions(_run(cuobjdump, "-sass", str(cubin)))
    bounds = sass.max_threads(_run(cuobjdump, "-elf", str(cubin)))
    return {name: kernel_figures(found, code[name], bounds.get(name, threads), arch,
                                 cupy_backend._dynamic_shared_bytes(name), name)
            for name, found in resources.items()}


def fatbin_images(fatbin: Path) -> tuple[list[str], list[str]]:
    """The architectures ("sm_90", ...) of ``fatbin``'s SASS (ELF) images and of its PTX, sorted,
    as ``cuobjdump --list-elf --list-ptx`` names them."""
    listed = _run(cuda_tool("cuobjdump"), "--list-elf", "--list-ptx", str(fatbin))
    return (sorted(re.findall(r"ELF file\s+\d+:.*\.(sm_\d+)\.cubin", listed)),
            sorted(re.findall(r"PTX file\s+\d+:.*\.(sm_\d+)\.ptx", listed)))


def read_fatbin(fatbin: Path, arch: Arch) -> dict[str, dict]:
    """Figures of every entry function in ``fatbin``'s ``arch`` code, as ``assemble`` gives them
    for the same PTX: the SASS and launch bounds as ``read_cubin`` reads them, the resources from
    ``cuobjdump -res-usage`` instead of ptxas's report. A fatbin holds no spill counts: it must
    come from a build that fails on a spill (``aot_build.strict``), so its spills are 0."""
    cuobjdump = cuda_tool("cuobjdump")
    where = ("-arch", arch.name, str(fatbin))
    sass_text = _run(cuobjdump, "-sass", *where)
    images = len(re.findall(rf"(?m)^\s*code for {arch.name}\s*$", sass_text))
    if images != 1:
        raise ValueError(f"{fatbin.name}: {images} {arch.name} images, expected one")
    code = sass.sass_functions(sass_text)
    elf = _run(cuobjdump, "-elf", *where)
    bounds = sass.max_threads(elf)
    resources = sass.res_usage(_run(cuobjdump, "-res-usage", *where),
                               sass.reserved_shared_memory(elf, arch.smem_reserved))
    if set(resources) != set(code):
        raise ValueError(f"{fatbin.name} ({arch.name}): -res-usage names {sorted(resources)}, -sass {sorted(code)}")
    return {name: kernel_figures(resources[name], code[name], bounds.get(name), arch,
                                 cupy_backend._dynamic_shared_bytes(name), name)
            for name in resources}


def assemble(ptx: Path, arch: Arch, threads: int | None = None, relocatable: bool = False) -> dict[str, dict]:
    """ptxas for ``arch`` (the shipped build's default optimization), then ``read_cubin``.
    ``relocatable``: as ``ptxas -c``, the way a linker compiles PTX (numba-cuda builds each
    kernel's cubin with one at launch): ptxas then lays out no shared memory itself and takes
    each array's declared alignment, so a 4-byte-aligned array's 16-byte loads become four. Its
    report then has no shared memory either: the kernel's static shared memory is what the PTX
    declares (``sass.ptx_shared_bytes``; a Numba module holds one kernel)."""
    cubin = ptx.with_suffix(f".{arch.name}.cubin")
    log = _run("ptxas", f"-arch={arch.name}", *(["-c"] if relocatable else []), "-v", "-o", str(cubin), str(ptx))
    resources = sass.ptxas_resources(log)
    if relocatable:
        if len(resources) != 1:
            raise ValueError(f"{ptx.name}: {len(resources)} kernels, where its shared memory is one kernel's")
        shared = sass.ptx_shared_bytes(ptx.read_text())
        resources = {name: dataclasses.replace(r, smem_bytes=shared) for name, r in resources.items()}
    return read_cubin(cubin, resources, arch, threads)


# ----------------------------------------------------------------------------- compiling, cached


def _model_code() -> list[bytes]:
    return [Path(path).read_bytes() for path in (__file__, sass.__file__, numba_variants.__file__, aot_build.__file__)]


def _cached(parts: list, compute):
    """``compute()``'s JSON result, kept in the temporary folder under a hash of ``parts``
    (another process computing the same result is waited for, not repeated)."""
    return temp_cache.cached_json(CACHE_FOLDER, parts, compute)


def cuda_unit(unit: str, kernel_dir: Path = KERNELS, archs: tuple[str, ...] = CUDA_ARCHS,
              tools: dict | None = None, fatbin: Path | None = None) -> dict[str, dict[str, dict]]:
    """{arch: {kernel: figures}} for one ``kernels/*.cu`` file: read from ``fatbin`` (the
    shipped build's, which compiled the file as below) when given, else compiled here."""
    tools = tools or toolchain()
    if fatbin is not None:
        return _cached([unit, "fatbin", list(archs), tools, fatbin.read_bytes(), *_model_code()],
                       lambda: {arch: read_fatbin(fatbin, ARCHS[arch]) for arch in archs})
    sources = [p.read_bytes() for p in sorted(kernel_dir.iterdir()) if p.suffix in (".cu", ".cuh")]
    virtual = front_end_arch(unit, kernel_dir)

    def compute():
        with tempfile.TemporaryDirectory(prefix="gpubp-kernel-model-") as folder:
            ptx = Path(folder) / unit.replace(".cu", ".ptx")
            _run("nvcc", "-ptx", *codegen_flags(), f"-arch={virtual}", "-o", str(ptx), str(kernel_dir / unit))
            return {arch: assemble(ptx, ARCHS[arch]) for arch in archs}

    return _cached([unit, virtual, list(archs), tools, *sources, *_model_code()], compute)


def first_step_parts() -> list[tuple[str, str]]:
    """(file, NVRTC module) of every CUDA C++ kernel of ``SPEED_GOALS``, as the CuPy backend builds it
    where no fatbin serves the GPU (what a pip install runs): one module per GEMM kernel
    (``cupy_backend.kernel_part``), and where the kernel takes its activation at launch the module
    of the benchmarks' models (``cupy_backend.model_parts``) that holds their hidden layers'."""
    hidden = cupy_backend.act_mask([HIDDEN_ACT])
    parts = []
    for filename in cupy_backend.ONE_KERNEL_FILES:
        modules = {cupy_backend.split_part(part)[0]: part for part in cupy_backend.model_parts(
            filename, (HEAD_ACT, HIDDEN_ACT)) if cupy_backend.split_part(part)[1] & hidden}
        parts += [(filename, modules.get(name, name)) for name in cupy_backend.GEMM_KERNELS[filename]
                  if any(re.fullmatch(pattern, name) for pattern in SPEED_GOALS)]
    return parts


def nvrtc_inputs(filename: str, part: str, kernel_dir: Path = KERNELS) -> tuple[str, list[str]]:
    """(source, options) of NVRTC module ``part``'s compile for PRIMARY_ARCH, as CuPy compiles it."""
    options = nvrtc_build.cupy_options(PRIMARY_ARCH.removeprefix("sm_"), cupy_backend.nvrtc_options(filename, part))
    return cupy_backend.kernel_source(filename, kernel_dir), options


def nvrtc_kernels(kernel_dir: Path, jobs: int) -> dict[str, dict]:
    """{module: figures} for every ``first_step_parts`` module, compiled by NVRTC for PRIMARY_ARCH as
    CuPy compiles it on the GPU (bench/nvrtc_build.py, whose cache tests/test_kernels_compile.py
    shares), read as a fatbin's code is; the spills from ptxas's report."""
    arch = ARCHS[PRIMARY_ARCH]

    def one(item: tuple[str, str]) -> tuple[str, dict]:
        filename, part = item
        name = cupy_backend.split_part(part)[0]
        source, options = nvrtc_inputs(filename, part, kernel_dir)
        compiled = nvrtc_build.cubin(source, filename, options)
        with tempfile.TemporaryDirectory(prefix="gpubp-kernel-model-") as folder:
            figures = read_fatbin(nvrtc_build.write_cubin(compiled, Path(folder) / "module.cubin"), arch)[name]
        return part, {"source": filename, **figures, "spill_bytes": sum(compiled["spills"].get(name, (0, 0)))}

    with ThreadPoolExecutor(jobs) as pool:
        return dict(pool.map(one, first_step_parts()))


def preload_modules() -> list[tuple[str, str]]:
    """(file, NVRTC module) of every module ``cupy_backend.preload`` compiles where no fatbin serves
    the GPU: ``cupy_backend.kernel_parts`` of every kernel file, each kernel for every activation
    it serves."""
    return [(filename, part) for filename in cupy_backend.KERNEL_FILES for part in cupy_backend.kernel_parts(filename)]


def nvrtc_preload(kernel_dir: Path, jobs: int) -> dict:
    """Every ``preload_modules`` module compiled by NVRTC for PRIMARY_ARCH (``nvrtc_build.cubin``,
    cached as ``nvrtc_kernels``' compiles are; an error, or a warning other than a spill, raises):
    {"nvrtc": ``nvrtc_build.identity()``, "modules": {file: {part: {"kernels": [...], "spills":
    {kernel: [bytes stored, loaded]}, "inputs_sha256": ``nvrtc_build.inputs_sha256``}}}}."""
    def one(item: tuple[str, str]) -> tuple[str, str, dict]:
        filename, part = item
        source, options = nvrtc_inputs(filename, part, kernel_dir)
        compiled = nvrtc_build.cubin(source, filename, options)
        return filename, part, {"kernels": list(cupy_backend.part_kernels(filename, part)),
                                "spills": compiled["spills"],
                                "inputs_sha256": nvrtc_build.inputs_sha256(source, options)}

    modules: dict[str, dict] = {}
    with ThreadPoolExecutor(jobs) as pool:
        for filename, part, record in pool.map(one, preload_modules()):
            modules.setdefault(filename, {})[part] = record
    return {"nvrtc": nvrtc_build.identity(), "modules": modules}


def numba_kernels(tools: dict, jobs: int) -> dict[str, dict]:
    """{variant name: figures} for every Numba kernel variant, on PRIMARY_ARCH."""
    package = [p.read_bytes() for p in sorted((ROOT / "gpubp").rglob("*.py"))]
    arch = ARCHS[PRIMARY_ARCH]

    def compute():
        # The compile tests/test_numba_backend.py shares (one per session, in the temporary folder).
        compiled = numba_variants.every_ptx(arch.cc, jobs)
        variants = [numba_variants.from_dict(v) for v in compiled["variants"]]
        ptx = compiled["traced"]
        with tempfile.TemporaryDirectory(prefix="gpubp-kernel-model-") as folder, ThreadPoolExecutor(jobs) as pool:
            def one(index_variant):
                index, variant = index_variant
                path = Path(folder) / f"variant{index}.ptx"
                path.write_text(ptx[variant.name])
                # One kernel per Numba PTX module, compiled as its launch links it.
                (figures,) = assemble(path, arch, variant.threads, relocatable=True).values()
                return variant.name, figures

            return dict(pool.map(one, enumerate(variants)))

    return _cached(["numba", tools, *package, *_model_code()], compute)


# ----------------------------------------------------------------------------- memory figures


def memory_figures(kernel_dir: Path) -> tuple[dict[str, dict], list[str], str | None]:
    """The access profiler's figures per CUDA C++ kernel and the descriptions of the workloads
    it launched them in, or ({}, [], why there are none)."""
    if not ACCESS_PROFILER.is_file():
        return {}, [], f"the access profiler ({ACCESS_PROFILER.relative_to(ROOT)}) is not in this tree"
    sys.path.insert(0, str(ACCESS_PROFILER.parents[1]))
    try:
        from cuda_on_cpu import access_profile
    finally:
        sys.path.remove(str(ACCESS_PROFILER.parents[1]))
    workloads = [description for description, _, _ in access_profile.WORKLOADS.values()]
    return access_profile.profile_kernels(kernel_dir), workloads, None


def memory_of(profile: dict) -> dict:
    """The report's memory fields from one kernel's profile (all null for an empty one)."""
    if not profile:
        return dict.fromkeys(MEMORY_FIELDS + MEMORY_DETAILS)
    below = [{"line": f"{entry['file']}:{entry['line']}", "kind": entry["kind"], "access": entry["access"],
              "width": entry["width"], "requests": entry["requests"], "per_request": entry["per_request"],
              "efficiency": entry["efficiency"]}
             for entry in profile["lines"] if entry["efficiency"] < 1]
    return {**{field: profile[field] for field in MEMORY_FIELDS},
            "shared_ideal_wavefronts_per_request": profile["shared_ideal_wavefronts_per_request"],
            "memory_lines_below_ideal": below}


# ----------------------------------------------------------------------------- the report


def shipped_fatbins(kernel_dir: Path, sass_archs: list[str] | None = None) -> dict[str, Path] | None:
    """{unit: fatbin} from the shared build of the tree holding ``kernel_dir``
    (``bench/aot_build.py``: CMakeLists.txt's build, run once per set of inputs and reused), or
    None where that tree has no CMakeLists.txt. The build fails on a register spill, which
    ``read_fatbin`` relies on: refused if CMakeLists.txt has lost the flags that make it so.
    ``sass_archs``: the architectures to build SASS for (by default every shipped one, so that the
    report is written only from a build that every architecture passed)."""
    root = kernel_dir.parent
    if not (root / "CMakeLists.txt").is_file() or kernel_dir != root / "kernels":
        return None
    if not aot_build.strict(root):
        raise RuntimeError(f"{root / 'CMakeLists.txt'} no longer builds with {' '.join(aot_build.STRICT_FLAGS)}: "
                           "a fatbin would hide register spills; use --compile")
    installed = aot_build.build(root, sass=sass_archs)
    return {p.name: installed / f"{p.stem}.fatbin" for p in kernel_dir.glob("*.cu")}


def build_report(kernel_dir: Path = KERNELS, jobs: int | None = None, archs: tuple[str, ...] = CUDA_ARCHS,
                 from_fatbins: bool = True, sass_archs: list[str] | None = None, preload: bool = True) -> dict:
    """Model every kernel in ``kernel_dir`` for ``archs`` (PRIMARY_ARCH first) and every Numba
    backend kernel (only where numba-cuda finds libNVVM; ``numba_unavailable`` says why not).
    The CUDA C++ kernels are read from the shipped build's fatbins (``shipped_fatbins``, with SASS
    for ``sass_archs``, by default every shipped architecture) when ``from_fatbins`` and the tree has a
    CMakeLists.txt, else compiled with nvcc -ptx and ptxas; both give the same figures
    (tests/test_kernel_model.py checks it on planted kernels). ``preload``: also compile every
    module ``preload`` builds with NVRTC (``nvrtc_preload``; None in the report without it)."""
    kernel_dir = Path(kernel_dir).resolve()
    if from_fatbins and sass_archs is not None:
        unbuilt = [arch for arch in archs if arch.removeprefix("sm_") not in sass_archs]
        if unbuilt:
            raise ValueError(f"sass_archs: {sass_archs} builds no SASS for {unbuilt}, which archs asks for")
    if kernel_dir.name != "kernels":
        raise ValueError(f"kernel_dir: expected a folder named kernels (its sha256 is taken as "
                         f"bench/gpu_summary.py takes it), got {kernel_dir}")
    jobs = jobs or os.cpu_count() or 1
    tools = toolchain()
    units = sorted((p.name for p in kernel_dir.glob("*.cu")), key=lambda u: -(kernel_dir / u).stat().st_size)
    with ThreadPoolExecutor(jobs) as pool:
        numba_done = pool.submit(numba_kernels, tools, jobs)
        fatbins = pool.submit(shipped_fatbins, kernel_dir, sass_archs) if from_fatbins else None
        memory, memory_workloads, memory_missing = memory_figures(kernel_dir)
        fatbins = fatbins.result() if fatbins else None
        per_unit = {unit: pool.submit(cuda_unit, unit, kernel_dir, archs, tools, fatbins and fatbins[unit])
                    for unit in units}
        by_arch: dict[str, dict] = {arch: {} for arch in archs}
        for unit in sorted(per_unit):
            for arch, kernels in per_unit[unit].result().items():
                by_arch[arch].update({name: {"source": unit, **figures} for name, figures in kernels.items()})
        try:
            numba_figures, numba_missing = numba_done.result(), None
        except numba_variants.NVVMUnavailable as exc:
            numba_figures, numba_missing = {}, str(exc)
    for name, figures in by_arch[PRIMARY_ARCH].items():
        figures.update(memory_of(memory.get(name, {})))
    for name, figures in numba_figures.items():
        by_arch[PRIMARY_ARCH][name] = {"source": NUMBA_SOURCE, **figures, **memory_of({})}
    nvrtc_missing = None if nvrtc_build.LIBNVRTC else "no libnvrtc found (pip install nvidia-cuda-nvrtc provides one)"
    nvrtc = {} if nvrtc_missing else nvrtc_kernels(kernel_dir, jobs)
    preloaded = nvrtc_preload(kernel_dir, jobs) if preload and not nvrtc_missing else None
    return {
        "kernels_sha256": kernels_sha256(kernel_dir.parent),
        "arch": PRIMARY_ARCH,
        "toolchain": tools,
        "numba_unavailable": numba_missing,
        "memory_figures": memory_missing or f"from {ACCESS_PROFILER.relative_to(ROOT)} (CUDA C++ kernels only; "
                                            "the profiler does not run Numba kernels)",
        "memory_workloads": memory_workloads,
        "kernels": dict(sorted(by_arch[PRIMARY_ARCH].items())),
        "other_archs": {arch: dict(sorted(by_arch[arch].items())) for arch in archs if arch != PRIMARY_ARCH},
        "nvrtc_unavailable": nvrtc_missing,
        "nvrtc": {part: {**figures, **memory_of({})} for part, figures in sorted(nvrtc.items())},
        "nvrtc_preload": preloaded,
    }


def regressions(committed: dict, fresh: dict, tolerance: float = TOLERANCE) -> list[tuple[str, str]]:
    """Why ``fresh`` is worse than ``committed``, as (kind, message) pairs; empty when it is not.

    Kinds: "spill" (a fresh kernel spills), "unlisted" (a kernel one report names and the other
    does not: the committed report needs a re-run), "worse" (a figure worse than the committed
    one by more than ``tolerance``, relative: a memory figure, compared where the committed
    report has it (the shared wavefronts as the conflict factor, over their conflict-free ideal,
    where both reports have that: ``memory_worse``); the resources (``resources_worse``: fewer
    warps per SM, more registers, stack or shared memory); the ``issue_ratio`` of the hot loop
    and of every copy of it, not the ceiling, which is capped at 1: ``slower_copies``; and a hot
    loop doing other work per pass, another loop taken for it: ``changed_work``)."""
    problems = []
    sections = [(fresh["arch"], fresh["arch"], committed["kernels"], fresh["kernels"])]
    sections += [(arch, arch, committed["other_archs"].get(arch, {}), kernels)
                 for arch, kernels in fresh["other_archs"].items()]
    sections += [(f"{fresh['arch']} NVRTC", fresh["arch"], committed.get("nvrtc", {}), fresh.get("nvrtc", {}))]
    for label, arch, old, new in sections:
        problems += [("spill", f"{name} ({label}) spills {k['spill_bytes']} bytes")
                     for name, k in sorted(new.items()) if k["spill_bytes"]]
        problems += [("unlisted", f"{name} ({label}) is not in the committed report: {RERUN}")
                     for name in sorted(set(new) - set(old))]
        problems += [("unlisted", f"{name} ({label}) is in the committed report but was not built: {RERUN}")
                     for name in sorted(set(old) - set(new))]
        for name in sorted(set(old) & set(new)):
            kernel = f"{name} ({label})"
            problems += [("worse", message) for message in (
                *memory_worse(kernel, old[name], new[name], tolerance),
                *resources_worse(kernel, old[name], new[name], tolerance),
                *slower_copies(kernel, old[name], new[name], ARCHS[arch], tolerance),
                *changed_work(kernel, old[name], new[name]))]
    return problems


def memory_worse(kernel: str, was: dict, now: dict, tolerance: float = TOLERANCE) -> list[str]:
    """Why the fresh kernel's memory figures (``now``) are worse than the committed ones (``was``):
    each of MEMORY_FIELDS compared where the committed report has it, the shared wavefronts per
    request as the conflict factor (over ``shared_ideal_wavefronts_per_request``) where both
    reports have their ideal: fewer wavefronts per request of narrower accesses with more bank
    conflicts are worse, not better."""
    problems = []
    for field in MEMORY_FIELDS:
        old, new = was.get(field), now.get(field)
        if old is None:
            continue
        ideal = "shared_ideal_wavefronts_per_request"
        if field == MEMORY_FIELDS[0] and new is not None and was.get(ideal) and now.get(ideal):
            field, old, new = "shared conflict factor (wavefronts over ideal)", old / was[ideal], new / now[ideal]
            old, new = round(old, 4), round(new, 4)
        if new is None:
            problems.append(f"{kernel} {field}: {old} in the committed report, now unmeasured")
        elif field in HIGHER_IS_BETTER and new < old * (1 - tolerance):
            problems.append(f"{kernel} {field} fell from {old} to {new}")
        elif field not in HIGHER_IS_BETTER and new > old * (1 + tolerance):
            problems.append(f"{kernel} {field} rose from {old} to {new}")
    return problems


# Resources lower is better for, compared with the tolerance (a growth from 0 always fails).
GROWING_RESOURCES = ("registers", "stack_bytes", "smem_bytes")


def resources_worse(kernel: str, was: dict, now: dict, tolerance: float = TOLERANCE) -> list[str]:
    """Why the fresh kernel's resources (``now``) are worse than the committed ones (``was``):
    fewer resident warps per SM (``occupancy_warps``), or registers per thread, stack frame
    (local memory: a spill the strict build does not see, or an array moved there) or shared
    memory per block grown by more than ``tolerance``. Fields either report lacks are skipped."""
    problems = []
    old, new = was.get("occupancy_warps"), now.get("occupancy_warps")
    if old is not None and new is not None and new < old:
        problems.append(f"{kernel} occupancy fell from {old} to {new} warps/SM "
                        f"(limited by {now.get('occupancy_limit')})")
    for field in GROWING_RESOURCES:
        old, new = was.get(field), now.get(field)
        if old is not None and new is not None and new > old * (1 + tolerance):
            problems.append(f"{kernel} {field} rose from {old} to {new}")
    return problems


def loop_work(loop: dict) -> dict:
    """A loop's work per pass: its tensor-core instructions by opcode where it has any, else its FFMA."""
    return dict(loop["hmma_by_shape"]) if loop["hmma_by_shape"] else {"FFMA": loop["ffma"]}


def changed_work(kernel: str, was: dict, now: dict) -> list[str]:
    """Why the fresh hot loop (``now``'s) may not be the committed one (``was``'s): a different
    work per pass (FFMA, or tensor-core instructions by shape). A loop made slower can stop being
    the hot loop when another (an epilogue left rolled) has more work, and the issue ratio of
    that other loop says nothing of the one that got slower: such a change needs a look, and
    ``--accept`` where it is meant. The change between tensor-core and FFMA work is
    ``slower_copies``'s."""
    old, new = was.get("hot_loop"), now.get("hot_loop")
    if not old or not new or bool(old["hmma_by_shape"]) != bool(new["hmma_by_shape"]):
        return []
    if loop_work(old) == loop_work(new):
        return []
    return [f"{kernel}: the hot loop ({new['address']}) does {loop_work(new)} per pass, the committed report's "
            f"({old['address']}) {loop_work(old)}: another loop is taken for the hot loop, or its work changed"]


def copies(k: dict) -> list[dict]:
    """Every copy of a kernel's hot loop, the hot loop first (none where it has no loop)."""
    return [k["hot_loop"], *k["sibling_loops"]] if k.get("hot_loop") else []


def _pass(loop: dict, arch: Arch) -> str:
    """"507 instructions for 192 HMMA (2.64 each), issue ratio 1.5148": what ``slower_copies`` compares."""
    if loop["hmma_by_shape"]:
        work, n = "tensor-core instructions", sum(loop["hmma_by_shape"].values())
        if n == loop["hmma"]:
            work = "HMMA"
        each = f" ({loop['instructions'] / n:.2f} each)"
    else:
        work, n, each = "FFMA", loop["ffma"], ""
    return f"{loop['instructions']} instructions for {n} {work}{each}, issue ratio {issue_ratio(loop, arch):.4f}"


def slower_copies(kernel: str, was: dict, now: dict, arch: Arch, tolerance: float = TOLERANCE) -> list[str]:
    """Why a copy of the fresh hot loop (``now``), the hot loop itself included, is worse than the
    committed one (``was``), for ``arch``. The figure is each loop's ``issue_ratio``, its work's
    pipe cycles per instruction issued (the issue ceiling before its cap at 1: a tensor-core
    loop issuing fewer than 4 instructions per HMMA on sm_90, or an fp32 loop with an FFMA share
    over one half on sm_80, is at a ceiling of 1 however much it grows). Each report's copies are
    ranked by it, highest first (the hot loop is the first: the copies have the same work and it
    issues the fewest instructions), and compared rank by rank, a fresh copy past the committed
    report's last against the committed slowest: a copy that got slower fails, and so does a new
    copy slower than any the committed report has. So does a kernel whose hot loop is gone, or
    has changed between tensor-core and FFMA work (whose ratios are of different peaks)."""
    committed = sorted(copies(was), key=lambda c: -issue_ratio(c, arch))
    fresh = sorted(copies(now), key=lambda c: -issue_ratio(c, arch))
    if not committed:
        return []
    if not fresh:
        return [f"{kernel}: no hot loop now, the committed report's {_pass(committed[0], arch)}: {RERUN}"]
    if bool(fresh[0]["hmma_by_shape"]) != bool(committed[0]["hmma_by_shape"]):
        kinds = [("a tensor-core" if loop["hmma_by_shape"] else "an FFMA") for loop in (fresh[0], committed[0])]
        return [f"{kernel}: the hot loop is now {kinds[0]} loop ({_pass(fresh[0], arch)}), the committed report's "
                f"{kinds[1]} loop ({_pass(committed[0], arch)}): {RERUN}"]
    problems = []
    for rank, loop in enumerate(fresh):
        against = min(rank, len(committed) - 1)
        floor = committed[against]
        if issue_ratio(loop, arch) < issue_ratio(floor, arch) * (1 - tolerance):
            which = "the hot loop" if loop is now["hot_loop"] else f"copy {rank + 1} of the hot loop"
            problems.append(f"{kernel}: {which} ({loop['address']}) issues {_pass(loop, arch)}; the committed "
                            f"report's copy {against + 1} ({floor['address']}) {_pass(floor, arch)}")
    return problems


def _ordered(kernels: dict) -> tuple[list[str], list[str]]:
    """(the speed goals' kernels in SPEED_GOALS order, every other kernel by name)."""
    goals = []
    for pattern in SPEED_GOALS:
        goals += [name for name in sorted(kernels) if re.fullmatch(pattern, name) and name not in goals]
    return goals, [name for name in sorted(kernels) if name not in goals]


def _cell(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


TABLE_HEAD = ("| kernel | threads | regs | spill B | smem B | warps/SM | loop instr | FFMA | HMMA | LDS+LDSM | LDG+LDGSTS "
              "| FFMA share | instr/HMMA | ceiling | copies | slowest copy | smem wavefronts/req | ideal | ld eff | st eff |\n"
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def _hmma_cell(loop: dict) -> str:
    """"8 (1688 tf32)": the loop's tensor-core instructions and their shapes and input types."""
    if not loop.get("hmma_by_shape"):
        return _cell(loop.get("hmma"))
    shapes = " + ".join(f"{shape} {operands.lower()}" for shape, _, operands in map(tensor_op, loop["hmma_by_shape"]))
    return f"{sum(loop['hmma_by_shape'].values())} ({shapes})"


def _ceiling_cell(ceiling: float | None, k: dict) -> str:
    return _cell(ceiling) + (" tc" if k["peak"] == "tensor" else "")


def _copies_cells(k: dict) -> list[str]:
    """The copies of the hot loop, and where there are several, the slowest one's ceiling (and
    instructions per HMMA): the last, the one issuing the most instructions."""
    found = copies(k)
    if len(found) < 2:
        return [_cell(len(found) or None), "-"]
    slowest = found[-1]
    per_hmma = f" ({slowest['instr_per_hmma']:.1f} instr/HMMA)" if slowest["instr_per_hmma"] else ""
    return [str(len(found)), _ceiling_cell(slowest["issue_ceiling"], k) + per_hmma]


def table_row(name: str, k: dict) -> str:
    loop = k["hot_loop"] or {}
    wavefronts, load, store = MEMORY_FIELDS
    memory = ([_cell(k.get(f)) for f in (wavefronts, "shared_ideal_wavefronts_per_request", load, store)]
              if k["source"] != NUMBA_SOURCE else ["n/a"] * 4)
    cells = [f"`{name}`", _cell(k["threads"]), _cell(k["registers"]), _cell(k["spill_bytes"]), _cell(k["smem_bytes"]),
             _cell(k["occupancy_warps"]), _cell(loop.get("instructions")), _cell(loop.get("ffma")),
             _hmma_cell(loop),
             _cell(loop["lds"] + loop["ldsm"] if loop else None), _cell(loop["ldg"] + loop["ldgsts"] if loop else None),
             _cell(loop.get("ffma_share")), _cell(loop.get("instr_per_hmma"), 1),
             _ceiling_cell(k["issue_ceiling"], k), *_copies_cells(k), *memory]
    return "| " + " | ".join(cells) + " |"


README_HEAD = ("| kernel | threads | regs | warps/SM | loop instructions | FFMA | HMMA | FFMA share | instr / HMMA | ceiling "
               "| copies | slowest copy |\n"
               "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def readme_table(report: dict) -> str:
    """The README's table of the speed goals' kernels ("Performance without a GPU"): the columns
    of ``table_row`` a reader compares across kernels, from the same figures."""
    rows = []
    for name in _ordered(report["kernels"])[0]:
        k = report["kernels"][name]
        loop = k["hot_loop"] or {}
        cells = [f"`{name}`", _cell(k["threads"]), _cell(k["registers"]), _cell(k["occupancy_warps"]),
                 _cell(loop.get("instructions")), _cell(loop.get("ffma")), _hmma_cell(loop),
                 _cell(loop.get("ffma_share")), _cell(loop.get("instr_per_hmma"), 1),
                 _ceiling_cell(k["issue_ceiling"], k), *_copies_cells(k)]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join([README_HEAD, *rows])


def update_readme(report: dict, readme: Path) -> bool:
    """Put ``readme_table(report)`` in place of the table ``readme`` has under ``README_HEAD``;
    True where that changed the file."""
    text = readme.read_text(encoding="utf-8")
    start = text.index(README_HEAD)
    end = text.index("\n\n", start)
    updated = text[:start] + readme_table(report) + text[end:]
    if updated != text:
        readme.write_text(updated, encoding="utf-8")
    return updated != text


def _ordered_parts(parts: dict) -> list[str]:
    """NVRTC modules in the order of their kernels in ``_ordered``."""
    by_kernel = {cupy_backend.split_part(part)[0]: part for part in parts}
    return [by_kernel[name] for name in sum(_ordered(by_kernel), [])]


def preload_lines(report: dict) -> list[str]:
    """The markdown's account of ``nvrtc_preload``."""
    preloaded = report.get("nvrtc_preload")
    if not preloaded:
        return [f"Not compiled here: {report.get('nvrtc_unavailable') or 'built without them'}."]
    modules = [record for parts in preloaded["modules"].values() for record in parts.values()]
    spills = sorted((kernel, sum(bytes_)) for record in modules for kernel, bytes_ in record["spills"].items())
    return [f"{len(modules)} modules holding {sum(len(record['kernels']) for record in modules)} kernels, each "
            f"kernel that takes its activation at launch for every activation it serves, compiled straight for "
            f"{report['arch']} by NVRTC {preloaded['nvrtc']['version']} (libnvrtc sha256 "
            f"`{preloaded['nvrtc']['sha256'][:16]}...`): "
            + (", ".join(f"`{kernel}` spills {n} bytes" for kernel, n in spills) if spills else "no spills") + "."]


def markdown(report: dict) -> str:
    kernels, nvrtc = report["kernels"], report.get("nvrtc", {})
    goals, rest = _ordered(kernels)
    tools = report["toolchain"]
    lines = [
        "# Kernel model: what the compiler made of each kernel",
        "",
        f"Written by `python bench/kernel_model.py` for kernels sha256 `{report['kernels_sha256'][:16]}...`, "
        f"nvcc {tools['nvcc']}, numba-cuda {tools['numba_cuda']}; no GPU involved. Figures for "
        f"{report['arch']} (H100) unless named; see the docstring of `bench/kernel_model.py` for every formula.",
        "",
        "- **warps/SM**: theoretical occupancy for the kernel's launch shape (`threads` per block).",
        "- **loop**: the hot loop in the SASS (the innermost loop with the most HMMA per pass in a tensor-core kernel, "
        "else with the most FFMA; of several such copies, the one issuing the fewest instructions), static counts "
        "per pass.",
        "- **ceiling**: the largest fraction of the fp32 peak (or, marked `tc`, the dense tensor-core peak) that loop "
        "can sustain at one instruction issued per cycle per sub-partition. A bound, not a prediction.",
        "- **copies**: the loops with the hot loop's FFMA or HMMA count (its copies: a template's aligned and "
        "unaligned paths, the fused kernels' first and later k chunks), and the **slowest copy**'s ceiling: what a "
        "launch on the other path runs (the JSON's `sibling_loops` has each).",
        f"- **memory** (wavefronts per shared request, their conflict-free ideal, global load and store efficiency: "
        f"bytes used over bytes moved in 32-byte sectors): {report['memory_figures']}. "
        "`n/a`: Numba kernels, which the profiler does not run."
        + (" Each kernel is profiled in its first launch by one of these workloads: "
           + "; ".join(report["memory_workloads"]) + "." if report["memory_workloads"] else ""),
        *([f"- **Numba kernels**: not compiled here: {report['numba_unavailable']}."]
          if report["numba_unavailable"] else []),
        *([f"- **Accepted regressions** (`--accept`: {report['accepted']['reason']}): "
           + "; ".join(report["accepted"]["regressions"]) + "."] if report.get("accepted") else []),
        "",
        "## The kernels the speed goals are about",
        "",
        TABLE_HEAD,
        *[table_row(name, kernels[name]) for name in goals],
        "",
        f"## The same kernels as NVRTC builds them for a model's first step ({report['arch']})",
        "",
        "What a pip install runs where no CMake fatbin serves the GPU: each GEMM kernel in an NVRTC module of its own, "
        "built for a relu model's activations where it takes its activation at launch (`cupy_backend.kernel_part`), "
        f"compiled straight for {report['arch']} as CuPy compiles it (the CMake build's code comes from compute_80 PTX). "
        "Memory figures: the same source's, above.",
        "",
        *([TABLE_HEAD, *[table_row(part, nvrtc[part]) for part in _ordered_parts(nvrtc)]]
          if not report.get("nvrtc_unavailable") else [f"Not compiled here: {report['nvrtc_unavailable']}."]),
        "",
        f"## Every NVRTC module `preload()` compiles ({report['arch']})",
        "",
        *preload_lines(report),
        "",
        f"## Every other kernel ({report['arch']})",
        "",
        TABLE_HEAD,
        *[table_row(name, kernels[name]) for name in rest],
        "",
        "## Source lines below the memory ideal, in the kernels the speed goals are about",
        "",
        "Shared: more wavefronts per request than the same bytes need without bank conflicts (efficiency = ideal / "
        "actual). Global: sectors moved that the request does not use in full (efficiency = bytes used / bytes "
        "moved; a warp-uniform 4-byte read is 0.125).",
        "",
        "| kernel | line | space | access | bytes/lane | requests | per request | efficiency |",
        "|---|---|---|---|---:|---:|---:|---:|",
        *[f"| `{name}` | {entry['line']} | {entry['kind']} | {entry['access']} | {entry['width']} | "
          f"{entry['requests']} | {_cell(entry['per_request'])} | {_cell(entry['efficiency'], 3)} |"
          for name in goals for entry in kernels[name]["memory_lines_below_ideal"] or []],
    ]
    for arch, others in report["other_archs"].items():
        lines += ["", f"## {arch} (A100): the CUDA C++ kernels", "",
                  "| kernel | regs | spill B | smem B | warps/SM | loop instr | ceiling | copies | slowest copy |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name in sum(_ordered(others), []):
            k = others[name]
            cells = [f"`{name}`", k["registers"], k["spill_bytes"], k["smem_bytes"], _cell(k["occupancy_warps"]),
                     _cell((k["hot_loop"] or {}).get("instructions")), _ceiling_cell(k["issue_ceiling"], k),
                     *_copies_cells(k)]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def write(report: dict, out: Path) -> None:
    """``out`` (JSON) and the same name with ``.md`` (the tables)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(report))


def refused(committed: dict, fresh: dict) -> list[str]:
    """The ``regressions`` that keep ``main`` from writing ``fresh`` over ``committed`` without
    ``--accept``: all but "unlisted" (a kernel added or removed is what a re-run records)."""
    return [f"{kind}: {message}" for kind, message in regressions(committed, fresh) if kind != "unlisted"]


def _commit() -> str | None:
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def accepted(found: list[str], reason: str, committed: dict) -> dict:
    """The report's record of regressions written with ``--accept REASON``: what they were, why,
    and what they were measured against (the replaced report's kernels and the commit checked out)."""
    return {"regressions": found, "reason": reason, "against_kernels_sha256": committed.get("kernels_sha256"),
            "against_commit": _commit()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel-dir", type=Path, default=KERNELS, help="the CUDA sources (a folder named kernels)")
    parser.add_argument("--out", type=Path, default=RESULTS / "kernel_model.json",
                        help="the JSON report; the tables go next to it with .md")
    parser.add_argument("--jobs", type=int, default=None, help="compilations at once (default: CPU count)")
    parser.add_argument("--compile", action="store_true",
                        help="compile the CUDA kernels with nvcc -ptx and ptxas instead of reading the shipped build's "
                             "fatbins (bench/aot_build.py)")
    parser.add_argument("--accept", metavar="REASON",
                        help="write the report even where it is worse than the one at --out (``regressions``), "
                             "recording the regressions and REASON under the report's 'accepted'")
    args = parser.parse_args(argv)
    report = build_report(args.kernel_dir, args.jobs, from_fatbins=not args.compile)
    if args.out.is_file():
        found = refused(json.loads(args.out.read_text()), report)
        if found and args.accept is None:
            print(f"{args.out} not written: the fresh figures are worse than its own:", *found,
                  "Fix the kernels, or re-run with --accept REASON to write them and record why.", sep="\n")
            sys.exit(1)
        if found:
            report["accepted"] = accepted(found, args.accept, json.loads(args.out.read_text()))
    write(report, args.out)
    print(f"{len(report['kernels'])} kernels -> {args.out} and {args.out.with_suffix('.md')}")
    if args.kernel_dir == KERNELS and update_readme(report, KERNELS.parent / "README.md"):
        print("README.md: the kernel table updated; check the FFMA shares its prose states "
              "(tests/test_kernel_model.py::test_the_readme_shows_the_committed_figures)")


if __name__ == "__main__":
    main()
