"""The CUDA kernels build on a machine without a GPU: nvcc via CMake, NVRTC, and packaging.

- One CMake build (configure, build, install into a temporary folder) compiles every
  ``kernels/*.cu`` with warnings and register spills as errors; the tests below check what it
  produced. Without cmake, the same nvcc command runs directly. Skipped, with the reason, when
  nvcc is absent. The build is ``bench/aot_build.py``'s, cached by its inputs and shared with
  the kernel model (tests/test_kernel_model.py reads its sm_90 code), so a test session compiles
  it once. It builds the SASS of sm_90 alone (``GPUBP_SASS_ARCHS``; from the PTX the full build
  compiles, so the same SASS): the other architectures' ptxas runs, and the compute_75 front end
  of the tensor-core files, would double a 2-core machine's build. ``bench/kernel_model.py``
  builds every architecture, and tests/test_kernel_model.py requires its committed report to be
  of the kernels as they are. ``GPUBP_TEST_ARCHS=all`` (or a list such as ``75,80``) builds
  those architectures here too.
- NVRTC (what the CuPy backend uses when no matching fatbin is installed) compiles the
  include-expanded sources that the backend hands it as CuPy 14 does, one module per GEMM kernel
  and one for a file's other kernels (``cupy_backend.kernel_parts``), and some modules built for
  the activations a model launches (``ACT_PARTS``), to an sm_XX cubin, so ptxas runs here
  (register spills, the static shared-memory limit); through libnvrtc and ctypes
  (bench/nvrtc_build.py), no GPU or CuPy needed. Skipped when no libnvrtc is found (``pip install
  nvidia-cuda-nvrtc`` provides one). Both paths use the same flags. NVRTC compiles for the
  architectures of ``GPUBP_TEST_ARCHS`` too, by default sm_90 alone (the H100/H200 the kernels
  are tuned for): each architecture costs a whole front end and ptxas run, minutes per kernel
  file on a 2-core machine. For sm_90 the modules that hold a kernel for every activation it
  takes at launch (half the NVRTC time) are left to the committed kernel model, which compiles
  every ``preload`` module whenever it runs, where it compiled them from the same inputs with
  the same NVRTC and found no spill (``left_to_the_model``); each of those kernels is compiled
  here for some activations alone.
- ``python -m gpubp info`` says where NVRTC and the CUDA headers are, and the CUDA extras
  bring them.
- The sources are found through ``importlib.resources`` in a built wheel.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gpubp import _toolkit
from gpubp.__main__ import main as gpubp_main
from gpubp.backends import cupy_backend
from cuda_on_cpu import harness
from test_gpu_check_scripts import load

REPO = Path(__file__).resolve().parents[1]
KERNELS = REPO / "kernels"
UNITS = sorted(p.name for p in KERNELS.glob("*.cu"))
NVCC = shutil.which("nvcc")
CMAKE = shutil.which("cmake")
# What CMakeLists.txt builds, read as bench/kernel_model.py (which compiles the same way) reads it.
kernel_model = load("kernel_model")
aot = load("aot_build")
shipped_archs, uses_tensor_cores = kernel_model.shipped_archs, kernel_model.uses_tensor_cores
codegen_flags = kernel_model.codegen_flags


def test_backend_knows_every_kernel_file():
    assert sorted(cupy_backend.KERNEL_FILES) == UNITS


def test_nvcc_13_supports_every_shipped_arch():
    if NVCC is None:
        pytest.skip("nvcc not found on PATH")
    listed = subprocess.run([NVCC, "--list-gpu-code"], capture_output=True, text=True, check=True).stdout
    for arch in shipped_archs():
        assert f"sm_{arch}" in listed.split(), f"this nvcc cannot build sm_{arch}"


@pytest.fixture(scope="module")
def aot_build():
    """Build every kernel file once, with the SASS of ``aot.archs_under_test()``; returns the folder
    holding the fatbins (and manifest). The build is bench/aot_build.py's, shared through the
    temporary folder with the kernel model (tests/test_kernel_model.py), which reads its sm_90
    code instead of compiling again."""
    if NVCC is None:
        pytest.skip("nvcc not found on PATH: cannot compile the CUDA kernels")
    try:
        return aot.build(REPO, sass=aot.archs_under_test())
    except aot.BuildFailed as failed:
        pytest.fail(str(failed))


@pytest.mark.parametrize("unit", UNITS)
def test_kernel_compiles_to_the_sass_asked_for_and_the_ptx_it_is_made_from(aot_build, unit):
    """sm_90's SASS (and any GPUBP_TEST_ARCHS adds), and the PTX a newer GPU JITs: compute_75's,
    or compute_80's for the tensor-core files."""
    fatbin = aot_build / unit.replace(".cu", ".fatbin")
    elf, ptx = kernel_model.fatbin_images(fatbin)
    assert elf == [f"sm_{arch}" for arch in aot.archs_under_test()], fatbin.name
    assert ptx == [f"sm_{80 if uses_tensor_cores(unit) else shipped_archs()[0]}"], fatbin.name


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
    assert manifest[0].split()[1:] == aot.archs_under_test()  # those with SASS
    built = {line.split()[2]: line.split()[1] for line in manifest[1:]}
    assert built == cupy_backend.source_hashes()


def test_backend_accepts_the_installed_fatbins_only_for_the_archs_they_hold(aot_build, monkeypatch):
    if CMAKE is None:
        pytest.skip("cmake not found on PATH")
    monkeypatch.setenv(cupy_backend.AOT_ENV, str(aot_build))
    assert cupy_backend._aot_mismatch(shipped_archs()[-1]) is None
    assert "none of which runs on sm_70" in cupy_backend._aot_mismatch("70")
    if "75" not in aot.archs_under_test():  # no sm_75 SASS built: NVRTC's, not a fatbin that lacks it
        assert "none of which runs on sm_75" in cupy_backend._aot_mismatch("75")


def test_the_fatbins_serve_every_gpu_of_a_major_version_from_its_shipped_minor_up(tmp_path, monkeypatch):
    """A manifest of sm_75, sm_80 and sm_90 SASS serves sm_75 (Turing), sm_80 to sm_89 (Ampere,
    Ada) and sm_90 (Hopper): CUDA runs a cubin on its major version's equal or higher minor ones."""
    (tmp_path / cupy_backend.AOT_MANIFEST).write_text(
        "archs 75 80 90\n" + "".join(f"source {digest} {name}\n" for name, digest in cupy_backend.source_hashes().items()))
    monkeypatch.setenv(cupy_backend.AOT_ENV, str(tmp_path))
    served = {arch: cupy_backend.sass_for(arch, ["75", "80", "90"]) for arch in ("75", "80", "86", "87", "89", "90")}
    assert served == {"75": "75", "80": "80", "86": "80", "87": "80", "89": "80", "90": "90"}
    assert all(cupy_backend._aot_mismatch(arch) is None for arch in served)
    for newer_or_older in ("70", "72", "100", "120"):  # no SASS of that major: NVRTC compiles for it
        assert cupy_backend.sass_for(newer_or_older, ["75", "80", "90"]) is None
        assert f"none of which runs on sm_{newer_or_older}" in cupy_backend._aot_mismatch(newer_or_older)
    assert cupy_backend.sass_for("86", ["80", "86", "90"]) == "86"  # its own, where shipped


def test_the_build_is_shared_and_found_again_without_compiling(aot_build):
    """A second caller (the kernel model on another pytest-xdist worker) gets the same folder."""
    assert aot.build(REPO, sass=aot.archs_under_test()) == aot_build
    assert (aot_build.parent / "complete").is_file()


def test_the_shared_build_is_keyed_by_every_input(tmp_path):
    for name in ("CMakeLists.txt", "kernels"):
        (shutil.copytree if name == "kernels" else shutil.copy)(REPO / name, tmp_path / name)
    before = aot.key(tmp_path)
    assert before == aot.key(REPO)
    for changed in (tmp_path / "kernels" / "mma.cuh", tmp_path / "CMakeLists.txt"):
        text = changed.read_text()
        changed.write_text(text + "\n")
        assert aot.key(tmp_path) != before, changed.name
        changed.write_text(text)
    assert aot.key(tmp_path) == before
    assert aot.key(tmp_path, sass=["90"]) != before and aot.key(tmp_path, sass=shipped_archs()) == before


def test_without_cmake_nvcc_gets_the_gencodes_cmake_gives_it():
    """The fallback's flags, as CMakeLists.txt forms them: PTX for compute_75 (compute_80 for the
    tensor-core files, whose sm_75 SASS keeps compute_75's), SASS for the architectures asked for."""
    plain, tensor = "dropout.cu", "dense_forward_tf32.cu"
    assert uses_tensor_cores(tensor) and not uses_tensor_cores(plain)
    assert aot.gencode(REPO, plain) == ["-gencode", "arch=compute_75,code=[sm_75,sm_80,sm_90,compute_75]"]
    assert aot.gencode(REPO, plain, ["90"]) == ["-gencode", "arch=compute_75,code=[sm_90,compute_75]"]
    assert aot.gencode(REPO, tensor) == ["-gencode", "arch=compute_75,code=[sm_75]",
                                         "-gencode", "arch=compute_80,code=[sm_80,sm_90,compute_80]"]
    assert aot.gencode(REPO, tensor, ["90"]) == ["-gencode", "arch=compute_80,code=[sm_90,compute_80]"]
    assert aot.gencode(REPO, tensor, ["75"]) == ["-gencode", "arch=compute_75,code=[sm_75]",
                                                 "-gencode", "arch=compute_80,code=[compute_80]"]
    with pytest.raises(ValueError, match="sass: expected some of the shipped architectures"):
        aot.gencode(REPO, plain, ["70"])


def test_the_build_fails_on_a_spill_so_a_built_fatbin_has_none(tmp_path):
    """bench/kernel_model.py reads spills as 0 from the fatbins on the strength of this."""
    assert aot.strict(REPO)
    assert all(flag in aot.common_flags(REPO) for flag in ("-Werror", "all-warnings", "-warn-spills"))
    cmake = (REPO / "CMakeLists.txt").read_text()
    (tmp_path / "CMakeLists.txt").write_text(cmake.replace(" -Xptxas -warn-spills", ""))
    assert not aot.strict(tmp_path)


# ----------------------------------------------------------------------------- NVRTC

nvrtc = load("nvrtc_build")  # libnvrtc through ctypes, as CuPy 14 compiles on a GPU
LIBNVRTC = nvrtc.LIBNVRTC
needs_nvrtc = pytest.mark.skipif(LIBNVRTC is None, reason="no libnvrtc found (pip install nvidia-cuda-nvrtc provides one)")


# Register spills ptxas reports when NVRTC compiles straight for an architecture, as CuPy does:
# (file, arch) -> {kernel: (bytes stored, bytes loaded)}. The CMake build, whose sm_80-and-newer
# code comes from compute_80 PTX, has none (spills fail it). Any other spill fails the test, and
# so does one listed here that is gone, so this list stays the truth.
KNOWN_NVRTC_SPILLS: dict[tuple[str, str], dict[str, tuple[int, int]]] = {}


# Modules of the kernels that take their activation at launch built for some activations (what a
# model's first step builds), beside the whole-set ones kernel_parts lists: the kernels the kernel
# model does not build so (bench/kernel_model.py first_step_parts: its NVRTC builds of the speed
# goals' kernels, which a warning fails as it fails these), with the heavy epilogues.
ACT_PARTS = {"dense_forward.cu": ("dense_fwd_128x64:relu", "dense_fwd_heavy_128x128:silu",
                                  "dense_fwd_dropout_128x128:gelu", "dense_fwd_dropout_128x64:sigmoid+gelu_tanh"),
             "dense_backward.cu": ("dense_dx_128x64:sigmoid+tanh", "dense_dx_dropout_128x128:sigmoid",
                                   "dense_dx_dropout_128x64:identity+leaky_relu"),
             "dense_backward_tf32.cu": ("dense_dx_tf32_dropout:relu", "dense_dx_bf16_dropout:gelu_tanh")}


def test_every_kernel_that_takes_its_activation_at_launch_is_compiled_for_some_activations_alone():
    built = {cupy_backend.split_part(part)[0] for parts in ACT_PARTS.values() for part in parts}
    built |= {cupy_backend.split_part(part)[0] for _, part in kernel_model.first_step_parts()}
    assert set(cupy_backend.ACT_KERNELS) <= built
    for unit, parts in ACT_PARTS.items():  # each as the backend names it, for some activations
        assert all(cupy_backend.kernel_part(unit, *cupy_backend.split_part(part)) == part for part in parts)
        assert all(cupy_backend.split_part(part)[1] for part in parts)


COMMITTED_MODEL = json.loads((REPO / "bench" / "results" / "kernel_model.json").read_text())
PRIMARY = kernel_model.PRIMARY_ARCH.removeprefix("sm_")


# dense_forward_tf32.cu compiles one GEMM module per activation, precision and mask (32, a
# third of the suite's NVRTC time): all but these, one per precision and mask with the erf-
# and tanh-heavy epilogues among them, are left to the kernel model's record as the whole-set
# modules are.
PER_ACTIVATION_KEPT = {"dense_forward_tf32.cu": {"dense_fwd_tf32_relu", "dense_fwd_tf32_silu_dropout",
                                                 "dense_fwd_bf16_gelu_tanh", "dense_fwd_bf16_gelu_dropout"}}


def _left_to_the_model_if_recorded(unit: str, part: str) -> bool:
    """A module the kernel model's record may stand for: a whole-set module of a kernel of
    ``ACT_KERNELS``, or a per-activation GEMM module of ``PER_ACTIVATION_KEPT``'s unit but those kept."""
    if part in cupy_backend.ACT_KERNELS:
        return True
    return unit in PER_ACTIVATION_KEPT and part != "" and part not in PER_ACTIVATION_KEPT[unit]


def left_to_the_model(unit: str, report: dict) -> set[str]:
    """The modules of ``unit`` that the NVRTC test below does not compile for the primary
    architecture: each holding a kernel of ``ACT_KERNELS`` for every activation it serves, and
    most of dense_forward_tf32.cu's per-activation modules (the slowest compiles: most of the NVRTC
    time of the suite), where ``report`` (the committed kernel model's ``nvrtc_preload``) compiled
    that module from the same inputs with this machine's NVRTC, without a spill. Each whole-set
    kernel is compiled here for some activations alone (``ACT_PARTS`` and the kernel model's
    first-step modules), and each family of per-activation ones in ``PER_ACTIVATION_KEPT``, so every
    kernel's code still goes through NVRTC in CI."""
    preloaded = report.get("nvrtc_preload")
    if not preloaded or preloaded["nvrtc"] != nvrtc.identity():
        return set()
    records = preloaded["modules"].get(unit, {})
    return {part for part in cupy_backend.kernel_parts(unit)
            if _left_to_the_model_if_recorded(unit, part) and part in records and not records[part]["spills"]
            and records[part]["inputs_sha256"] == nvrtc.inputs_sha256(*kernel_model.nvrtc_inputs(unit, part))}


@needs_nvrtc
@pytest.mark.parametrize("unit", UNITS)
def test_kernel_compiles_with_nvrtc_to_a_cubin_as_cupy_does(unit):
    """Every NVRTC module of ``unit`` that preload builds, and some that a model's first step builds
    (``ACT_PARTS``), for each architecture of ``aot.archs_under_test()``; for the primary one, but
    the modules ``left_to_the_model``."""
    source = cupy_backend.kernel_source(unit)
    assert '#include "' not in source  # local headers are inlined, so CuPy's cache key sees them
    assert "#include <" not in source  # nvrtc_build.inputs_sha256 leaves out the CUDA headers' -I
    archs = aot.archs_under_test()
    left = left_to_the_model(unit, COMMITTED_MODEL)
    builds = [(arch, part) for arch in archs for part in (*cupy_backend.kernel_parts(unit), *ACT_PARTS.get(unit, ()))
              if not (arch == PRIMARY and part in left)]
    # NVRTC compiles concurrently from several threads: one per core.
    with ThreadPoolExecutor(max_workers=min(len(builds), os.cpu_count() or 1)) as pool:
        done = list(pool.map(lambda build: nvrtc.cubin(source, unit, nvrtc.cupy_options(
            build[0], cupy_backend.nvrtc_options(unit, build[1]))), builds))
    assert all(c["size"] > 0 for c in done), dict(zip(builds, done))
    compiled = {arch: {"spills": {}} for arch in archs}
    for (arch, _), c in zip(builds, done):
        compiled[arch]["spills"].update(c["spills"])
    spills = {arch: {k: tuple(v) for k, v in c["spills"].items()} for arch, c in compiled.items() if c["spills"]}
    assert spills == {arch: known for (file, arch), known in KNOWN_NVRTC_SPILLS.items() if file == unit and arch in archs}


def test_the_kernel_model_compiled_every_preload_module_from_the_inputs_of_now_without_a_spill():
    """What ``left_to_the_model`` relies on: the committed kernel model compiled every module
    ``preload`` builds, from the sources and options of now. (bench/kernel_model.py compiles them
    again whenever it runs, which every kernel change requires: tests/test_kernel_model.py.)"""
    preloaded = COMMITTED_MODEL["nvrtc_preload"]
    assert preloaded is not None, "the committed kernel model was written without NVRTC: run bench/kernel_model.py"
    recorded = {(unit, part): record for unit, parts in preloaded["modules"].items() for part, record in parts.items()}
    assert sorted(recorded) == sorted(kernel_model.preload_modules())
    stale = [module for module, record in recorded.items()
             if record["inputs_sha256"] != nvrtc.inputs_sha256(*kernel_model.nvrtc_inputs(*module))]
    assert stale == [], "compiled from other sources or options than today's: run bench/kernel_model.py"
    for unit in UNITS:
        spills = {kernel: tuple(bytes_) for (u, _), record in recorded.items() if u == unit
                  for kernel, bytes_ in record["spills"].items()}
        assert spills == KNOWN_NVRTC_SPILLS.get((unit, PRIMARY), {}), unit
    assert all(record["kernels"] == list(cupy_backend.part_kernels(*module)) for module, record in recorded.items())


@needs_nvrtc
def test_only_modules_compiled_by_this_nvrtc_from_the_same_inputs_without_a_spill_are_left_to_the_model():
    whole_sets = {unit: {part for part in cupy_backend.kernel_parts(unit) if part in cupy_backend.ACT_KERNELS}
                  for unit in UNITS}
    assert sum(map(len, whole_sets.values())) == len(cupy_backend.ACT_KERNELS)
    per_activation = {unit: set(cupy_backend.kernel_parts(unit)) - {""} - kept
                      for unit, kept in PER_ACTIVATION_KEPT.items()}
    for unit, kept in PER_ACTIVATION_KEPT.items():  # each kept module is one of the unit's, and some are left
        assert kept < set(cupy_backend.kernel_parts(unit)) and len(per_activation[unit]) >= 24
    if COMMITTED_MODEL["nvrtc_preload"]["nvrtc"] == nvrtc.identity():  # else all are compiled here
        expected = {unit: whole_sets[unit] | per_activation.get(unit, set()) for unit in UNITS}
        assert {unit: left_to_the_model(unit, COMMITTED_MODEL) for unit in UNITS} == expected
    unit, part = "fused_mlp.cu", "fused_mlp_fwd"
    records = COMMITTED_MODEL["nvrtc_preload"]["modules"]

    def planted(**record) -> dict:
        modules = {**records, unit: {**records[unit], part: {**records[unit][part], **record}}}
        return {**COMMITTED_MODEL, "nvrtc_preload": {"nvrtc": nvrtc.identity(), "modules": modules}}

    assert part in left_to_the_model(unit, planted())
    assert part not in left_to_the_model(unit, planted(spills={part: [8, 8]}))
    assert part not in left_to_the_model(unit, planted(inputs_sha256="0" * 64))
    other_nvrtc = {**planted()["nvrtc_preload"], "nvrtc": {**nvrtc.identity(), "sha256": "0" * 64}}
    assert left_to_the_model(unit, {**COMMITTED_MODEL, "nvrtc_preload": other_nvrtc}) == set()
    assert left_to_the_model(unit, {**COMMITTED_MODEL, "nvrtc_preload": None}) == set()


def test_the_inputs_of_an_nvrtc_compile_are_its_options_but_the_headers_path_and_its_source():
    digest = nvrtc.inputs_sha256("int x;", ["-arch=sm_90", "-I/usr/local/cuda/include"])
    assert digest == nvrtc.inputs_sha256("int x;", ["-arch=sm_90", "-I/opt/cuda/include"])
    assert digest != nvrtc.inputs_sha256("int x;", ["-arch=sm_80", "-I/usr/local/cuda/include"])
    assert digest != nvrtc.inputs_sha256("int y;", ["-arch=sm_90", "-I/usr/local/cuda/include"])
    assert nvrtc.inputs_sha256("a", ["b"]) != nvrtc.inputs_sha256("", ["ba"])  # parts stay apart


def test_the_test_architectures_default_to_the_newest_and_a_bad_choice_names_the_variable(monkeypatch):
    shipped = shipped_archs()
    monkeypatch.delenv(aot.TEST_ARCHS_ENV, raising=False)
    assert aot.archs_under_test() == [shipped[-1]]
    monkeypatch.setenv(aot.TEST_ARCHS_ENV, "all")
    assert aot.archs_under_test() == shipped
    monkeypatch.setenv(aot.TEST_ARCHS_ENV, f"sm_{shipped[1]}, {shipped[0]}")
    assert aot.archs_under_test() == [shipped[0], shipped[1], shipped[-1]]  # in shipped order, the newest always
    for bad in ("70", "all,80", ","):
        monkeypatch.setenv(aot.TEST_ARCHS_ENV, bad)
        with pytest.raises(ValueError, match=aot.TEST_ARCHS_ENV):
            aot.archs_under_test()


# 49,156 bytes of static shared memory, 4 past the 48 KiB a block may declare statically.
OVER_THE_SHARED_LIMIT = """extern "C" __global__ void too_much_shared(float* a) {
    __shared__ float stage[12289];
    stage[threadIdx.x] = a[threadIdx.x];
    __syncthreads();
    a[threadIdx.x] = stage[12288 - threadIdx.x];
}
"""


# More live values than 24 registers hold.
MANY_LIVE_VALUES = """extern "C" __global__ void many_live_values(const float* in, float* out) {
    float v[32];
#pragma unroll
    for (int i = 0; i < 32; ++i) v[i] = in[threadIdx.x * 32 + i];
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < 32; ++i) s += v[i] * v[31 - i];
    out[threadIdx.x] = s * v[threadIdx.x & 31];
}
"""


@needs_nvrtc
def test_a_cubin_compile_catches_what_a_ptx_compile_lets_through():
    """ptxas enforces the static shared-memory limit; PTX for compute_XX is made without it."""
    arch = shipped_archs()[-1]
    assert nvrtc.compile_program(OVER_THE_SHARED_LIMIT, "planted.cu", [f"-arch=compute_{arch}"])[0] == 0
    result, log, _ = nvrtc.compile_program(OVER_THE_SHARED_LIMIT, "planted.cu", nvrtc.cupy_options(arch))
    assert result != 0 and "too much shared data" in log, log


@needs_nvrtc
def test_the_cubin_compile_reports_the_kernels_that_spill():
    spills = nvrtc.cubin(MANY_LIVE_VALUES, "planted.cu", [*nvrtc.cupy_options(shipped_archs()[-1]), "-maxrregcount=24"])
    assert list(spills["spills"]) == ["many_live_values"]


def test_nvrtc_and_the_cmake_fatbins_compile_with_the_same_flags():
    assert codegen_flags() == list(cupy_backend.NVRTC_OPTIONS)
    assert "-ftz=true" in cupy_backend.NVRTC_OPTIONS  # what CuPy adds to every NVRTC compile


# ----------------------------------------------------------------------------- one GEMM kernel per NVRTC module

_ENTRY = re.compile(r'extern\s+"C"\s+__gpubp_kernel_marker__\s+void\s+(?:__gpubp_launch_bounds__\s*\([^()]*\)\s*)?'
                    r'(\w+)\s*\([^{]*\{\s*'
                    r'(?:if\s*\(\s*!\s*::\s*gpubp\s*::\s*kernel_compiled\s*\(\s*"(\w*)"\s*\)\s*\)\s*return\s*;)?')


def one_kernel_guards(source: str) -> dict[str, str | None]:
    """Each extern "C" kernel of ``source`` (include-expanded) -> the name its first statement,
    kernels/one_kernel.cuh's guard, spells; None where it has no guard. From the preprocessor's
    output, as the CPU harness finds the kernels."""
    done = subprocess.run([harness.CXX, "-std=c++20", "-E", "-P", "-DGPUBP_CUDA_ON_CPU=1", "-DGPUBP_CPU_SCAN=1",
                           "-include", str(harness.HEADER), "-x", "c++", "-"], input=source, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    return {name: guard or None for name, guard in _ENTRY.findall(done.stdout)}  # no kernel is named ""


def guard_mistakes(filename: str, source: str) -> list[str]:
    """What is wrong with ``filename``'s guards: a GEMM kernel of the backend's without its own
    name in one, any other kernel with one."""
    guards = one_kernel_guards(source)
    gemms = set(cupy_backend.GEMM_KERNELS.get(filename, ()))
    wrong = [f"{name}: guard names {guard!r}" for name, guard in guards.items() if name in gemms and guard != name]
    wrong += [f"{name}: guarded, but not a GEMM kernel of the backend's" for name, guard in guards.items()
              if name not in gemms and guard is not None]
    return wrong + [f"{name}: no such kernel" for name in gemms - set(guards)]


needs_cxx = pytest.mark.skipif(shutil.which(harness.CXX) is None, reason=f"no C++ compiler ({harness.CXX})")


@needs_cxx
@pytest.mark.parametrize("unit", UNITS)
def test_each_gemm_kernel_opens_with_the_guard_that_names_it_and_no_other_kernel_has_one(unit):
    assert guard_mistakes(unit, cupy_backend.kernel_source(unit)) == []


@needs_cxx
def test_a_guard_that_names_another_kernel_is_found():
    source = cupy_backend.kernel_source("dense_backward.cu")
    guard = "GPUBP_ONLY_KERNEL_GUARD(dense_dw_##BM##x##BN)"
    planted = source.replace(guard, guard.replace("dense_dw", "dense_dx"))
    assert planted != source
    assert guard_mistakes("dense_backward.cu", planted) == ["dense_dw_128x128: guard names 'dense_dx_128x128'",
                                                            "dense_dw_128x64: guard names 'dense_dx_128x64'"]
    unguarded = source.replace(guard, "")
    assert guard_mistakes("dense_backward.cu", unguarded) == ["dense_dw_128x128: guard names None",
                                                              "dense_dw_128x64: guard names None"]


@needs_nvrtc
def module_code_sizes(unit: str, part: str, tmp_path: Path) -> dict[str, int]:
    """Instructions per kernel in ``cuobjdump -sass`` of NVRTC module ``part`` of ``unit`` (the
    compile the NVRTC test above caches); skips without cuobjdump."""
    try:
        cuobjdump = kernel_model.cuda_tool("cuobjdump")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    options = nvrtc.cupy_options(shipped_archs()[-1], cupy_backend.nvrtc_options(unit, part))
    cubin = nvrtc.write_cubin(nvrtc.cubin(cupy_backend.kernel_source(unit), unit, options), tmp_path / "module.cubin")
    listing = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    return {name: len(code) for name, code in load("sass_reader").sass_functions(listing).items()}


@needs_nvrtc
def test_an_nvrtc_module_holds_the_code_of_its_gemm_kernel_and_an_empty_entry_for_each_other(tmp_path):
    """dense_backward.cu built for dense_dx_128x64 and for its other kernels (""), read back with
    cuobjdump: every GEMM entry but the one named is an empty kernel (a few instructions), the
    named one and the elementwise kernels are whole."""
    unit = "dense_backward.cu"
    for part in ("dense_dx_128x64", ""):
        sizes = module_code_sizes(unit, part, tmp_path)
        assert set(sizes) == set(cupy_backend.KERNELS[unit])
        for name, size in sizes.items():
            whole = name == part or name not in cupy_backend.GEMM_KERNELS[unit]
            assert (size > 40) == whole, (part, name, size)


@needs_nvrtc
def test_an_nvrtc_module_built_for_one_activation_holds_that_epilogue_alone(tmp_path):
    """dense_fwd_128x64 serves every activation; built for relu alone (-DGPUBP_ONLY_ACTS) its
    code is a fraction of the whole-set build's: the seven other epilogues are not compiled."""
    unit, name = "dense_forward.cu", "dense_fwd_128x64"
    whole = module_code_sizes(unit, name, tmp_path)[name]
    relu = module_code_sizes(unit, f"{name}:relu", tmp_path)[name]
    assert relu < 0.6 * whole, (relu, whole)


# ----------------------------------------------------------------------------- finding NVRTC and the headers


def test_the_cuda_extras_bring_nvrtc_and_the_headers_through_cupys_ctk_extra():
    pyproject = (REPO / "pyproject.toml").read_text()
    for extra, cupy in (("cuda12", "cupy-cuda12x"), ("cuda13", "cupy-cuda13x")):
        (requirements,) = re.findall(rf"^{extra} = \[(.*)\]$", pyproject, re.MULTILINE)
        assert f'"{cupy}[ctk]>=14"' in requirements, requirements  # CuPy has the ctk extra from 14 on


def test_info_says_where_nvrtc_and_the_cuda_headers_are(capsys):
    gpubp_main(["info"])
    lines = capsys.readouterr().out.splitlines()
    for what, (path, how) in (("NVRTC", _toolkit.nvrtc_library()), ("CUDA headers", _toolkit.cuda_headers())):
        (line,) = [line for line in lines if line.startswith(f"{what} ")]
        assert (f"{path} ({how})" if path else "not found") in line


def test_without_cuda_pathfinder_the_usual_places_are_searched(tmp_path, monkeypatch):
    monkeypatch.setattr(_toolkit, "pathfinder", None)
    monkeypatch.setattr(_toolkit, "_toolkit_roots", lambda: [str(tmp_path / "cuda")])
    monkeypatch.setattr(sys, "path", [str(tmp_path / "site")])
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    assert _toolkit.cuda_headers()[0] is None and _toolkit.nvrtc_library()[0] is None
    include = tmp_path / "site" / "nvidia" / "cu13" / "include"
    include.mkdir(parents=True)
    (include / "cuda_runtime.h").write_text("")
    assert _toolkit.cuda_headers() == (str(include), "searched without cuda-pathfinder")


def test_info_says_how_to_get_what_is_missing(capsys, monkeypatch):
    monkeypatch.setattr(_toolkit, "nvrtc_library", lambda: (None, "cuda-pathfinder found none"))
    gpubp_main(["info"])
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("NVRTC ")]
    assert "not found: cuda-pathfinder found none" in line and 'pip install "gpubp[cuda13]"' in line


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
