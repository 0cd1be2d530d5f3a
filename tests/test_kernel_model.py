"""The static performance model (bench/kernel_model.py): speed regressions fail CI like wrong results.

The shipped kernels and every Numba kernel variant are modelled for sm_90 and compared by name
with the committed report, ``bench/results/kernel_model.json``: a spill, a kernel one report
names and the other does not, or a memory figure, or the issue ratio (the issue ceiling before
its cap at 1: instructions per HMMA, or the FFMA share, in other terms) of the hot loop or of any
of its copies, worse than the committed one fails. The model's figures are static counts, not timings. The shipped kernels are read
from the fatbins of the CMake build (bench/aot_build.py), which tests/test_kernels_compile.py
checks and shares, instead of being compiled a second time: that build fails on a register
spill for every architecture, and a planted source built both ways shows the fatbin gives the
figures ptxas gives. The Numba PTX is the compile tests/test_numba_backend.py shares. The
build makes sm_90's SASS alone, and the report's sm_80 figures are not rebuilt here, to keep CI
short: the committed report must be of the kernels as they are, and bench/kernel_model.py writes
it only from a build of every shipped architecture, with spills as errors; a planted pair of
files shows that a build of sm_90 alone gives the full build's sm_90 code.

The SASS reader is shown not to be blind on planted sources whose answers are known: loops
with a known FFMA or HMMA count, nested and sibling loops, an unrolled loop beside its
remainder, a kernel that spills, a kernel without launch bounds (tests/test_sass_reader.py
checks it on hand-written SASS). Skipped, with the reason, when nvcc is absent.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from test_gpu_check_scripts import load
from test_sass_reader import FP32_COPIES, HMMA_COPIES, listing
from gpubp.backends import cupy_backend

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "bench" / "results" / "kernel_model.json"
NVCC = shutil.which("nvcc")
NO_NVCC = "nvcc not found on PATH: cannot compile the CUDA kernels"

km = load("kernel_model")
numba_variants = load("numba_variants")


@pytest.fixture(scope="module")
def committed() -> dict:
    return json.loads(COMMITTED.read_text())


@pytest.fixture(scope="module")
def fresh() -> dict:
    if NVCC is None:
        pytest.skip(NO_NVCC)
    # Without the preload modules: tests/test_kernels_compile.py compiles and checks those.
    return km.build_report(archs=(km.PRIMARY_ARCH,), sass_archs=km.aot_build.archs_under_test(), preload=False)


def comparable(committed: dict, fresh: dict) -> dict:
    """The committed report without its Numba kernels, or its NVRTC builds, where this machine
    cannot compile them."""
    if fresh["nvrtc_unavailable"]:
        committed = {**committed, "nvrtc": {}}
    if not fresh["numba_unavailable"]:
        return committed
    kernels = {name: k for name, k in committed["kernels"].items() if not name.startswith(numba_variants.PREFIX)}
    return {**committed, "kernels": kernels}


def problems_of(kind: str, committed: dict, fresh: dict) -> list[str]:
    return [message for found, message in km.regressions(comparable(committed, fresh), fresh) if found == kind]


# ----------------------------------------------------------------------------- the shipped kernels


def toolchains(committed: dict, fresh: dict) -> str:
    return f"toolchain of the committed report: {committed['toolchain']}; here: {fresh['toolchain']}"


def test_the_committed_report_is_of_the_kernels_as_they_are(committed):
    """Every kernel change re-runs the model; its report is also the only build of the
    architectures other than sm_90 that a change must pass (spills are errors there)."""
    assert committed["kernels_sha256"] == km.kernels_sha256(ROOT), (
        "kernels/ changed since bench/results/kernel_model.json was written: run "
        "PYTHONPATH=. python bench/kernel_model.py and commit its report")


def test_the_report_refuses_an_architecture_the_build_makes_no_sass_for():
    with pytest.raises(ValueError, match="sass_archs: .* no SASS for .*sm_80"):
        km.build_report(archs=("sm_90", "sm_80"), sass_archs=["90"])


def test_no_kernel_spills(committed, fresh):
    # The shipped kernels' spills are read as 0 from a build that fails on any spill.
    assert km.aot_build.strict(), "CMakeLists.txt no longer fails the build on a register spill"
    assert problems_of("spill", committed, fresh) == [], toolchains(committed, fresh)


def test_the_committed_report_names_every_kernel_and_nothing_else(committed, fresh):
    assert problems_of("unlisted", committed, fresh) == [], toolchains(committed, fresh)


def test_no_hot_loop_ceiling_or_memory_figure_is_worse_than_committed(committed, fresh):
    assert problems_of("worse", committed, fresh) == [], toolchains(committed, fresh)


# The SIMT fp32 GEMMs (forward in every activation, with and without the fused dropout, dX,
# dW, both tiles): issue 28's goal.
SIMT_GEMM = re.compile(r"dense_(fwd(_heavy)?(_dropout)?|dx|dw)_\d+x\d+")
SIMT_FFMA_GOAL = 0.85


def test_the_simt_gemms_issue_at_least_85_percent_ffma_in_their_hot_loops(fresh):
    gemms = {name: k for name, k in fresh["kernels"].items() if SIMT_GEMM.fullmatch(name)}
    shipped = set(cupy_backend.KERNELS["dense_forward.cu"]) | {
        name for name in cupy_backend.KERNELS["dense_backward.cu"] if SIMT_GEMM.fullmatch(name)}
    assert set(gemms) == shipped and len(shipped) == 5 + 2 * len(cupy_backend.GEMM_TILES)
    assert below_the_ffma_goal(gemms) == {}, f"FFMA share below {SIMT_FFMA_GOAL}"


def below_the_ffma_goal(kernels: dict) -> dict:
    """{kernel: its hot loop's FFMA share, or why it has none} for each of ``kernels`` short of SIMT_FFMA_GOAL."""
    return {name: (k["hot_loop"] or {}).get("ffma_share", "no hot loop") for name, k in kernels.items()
            if not k["hot_loop"] or k["hot_loop"]["ffma_share"] < SIMT_FFMA_GOAL}


def test_the_ffma_goal_fails_a_loop_below_85_percent_or_no_loop():
    kernels = {"at": figures(loop(100, ffma=85)), "below": figures(loop(100, ffma=84)), "none": figures()}
    for k in kernels.values():
        if k["hot_loop"]:
            k["hot_loop"]["ffma_share"] = k["hot_loop"]["ffma"] / k["hot_loop"]["instructions"]
    assert below_the_ffma_goal(kernels) == {"below": 0.84, "none": "no hot loop"}


def test_the_simt_gemms_hot_loop_is_the_float4_copy_the_benchmarks_run_beside_the_scalar_one(fresh):
    """gemm_tile.cuh's main loop in two copies of 1024 FFMA: 16-byte loads where every operand
    row is 16-byte aligned (every benchmark), 4-byte loads otherwise; the hot loop is the first."""
    for name, k in fresh["kernels"].items():
        if SIMT_GEMM.fullmatch(name):
            (scalar,) = k["sibling_loops"]
            assert k["hot_loop"]["ffma"] == scalar["ffma"] == 1024, name
            assert scalar["ldg"] == 4 * k["hot_loop"]["ldg"] and scalar["issue_ceiling"] < k["issue_ceiling"], name


# The fused MLP's fp32 kernels (forward and backward, each serving every activation, and dW): the same goal.
FUSED_FP32 = re.compile(r"fused_mlp_(fwd|bwd|dw)")  # not _tf32, _bf16


def test_the_fused_fp32_kernels_issue_at_least_85_percent_ffma_in_their_hot_loops(fresh):
    fused = {name: k for name, k in fresh["kernels"].items() if FUSED_FP32.fullmatch(name)}
    assert len(fused) == 3
    assert below_the_ffma_goal(fused) == {}, f"FFMA share below {SIMT_FFMA_GOAL}"


# Issue 28's goal for the per-layer tensor-core GEMMs: about 4 instructions per HMMA keep an
# sm_90 sub-partition's tensor core busy (HMMA.1688 tf32 and HMMA.16816 bf16 take 4 cycles).
PER_LAYER_TENSOR_CORE = re.compile(r"dense_(fwd|dx|dw)_(tf32|bf16)(_\w+)?")
MAX_INSTRUCTIONS_PER_HMMA = 4.0


def per_layer_tensor_core(kernels: dict) -> dict:
    found = {name: k for name, k in kernels.items() if PER_LAYER_TENSOR_CORE.fullmatch(name)}
    assert found, "no per-layer tensor-core kernel in the report"
    return found


def nvrtc_builds(fresh: dict) -> dict:
    """The report's NVRTC builds of the speed goals' kernels, by module (skips without libnvrtc)."""
    if fresh["nvrtc_unavailable"]:
        pytest.skip(f"NVRTC cannot compile here: {fresh['nvrtc_unavailable']}")
    return fresh["nvrtc"]


def test_nvrtc_builds_every_speed_goal_kernel_as_a_models_first_step_does(fresh):
    built = {cupy_backend.split_part(part)[0]: part for part in nvrtc_builds(fresh)}
    goals = {name for name in km._ordered(fresh["kernels"])[0] if not name.startswith(numba_variants.PREFIX)}
    assert set(built) == goals and len(goals) == 18
    assert built["dense_fwd_128x128"] == "dense_fwd_128x128:relu"  # its epilogue for relu alone
    assert built["fused_mlp_bwd_bf16"] == "fused_mlp_bwd_bf16:identity+relu"


def test_nvrtcs_builds_keep_the_occupancy_and_the_issue_rate_of_the_shipped_build(fresh):
    """What a pip install runs (no fatbin) is as fast, by the model, as the CMake build the goals
    are set on: the same warps per SM, the issue ratio of the hot loop and of each copy (not the
    ceiling, which is 1 for every tensor-core loop) within the comparison's tolerance of the
    shipped build's, as ``regressions`` compares them, and no spill."""
    arch = km.ARCHS[fresh["arch"]]
    for part, k in nvrtc_builds(fresh).items():
        shipped = fresh["kernels"][cupy_backend.split_part(part)[0]]
        assert k["spill_bytes"] == 0, part
        assert k["occupancy_warps"] >= shipped["occupancy_warps"], (part, k["occupancy_warps"], shipped["occupancy_warps"])
        assert km.slower_copies(f"{part} (NVRTC, against the shipped build)", shipped, k, arch) == []


def test_every_copy_of_the_per_layer_tensor_core_loops_stages_by_cp_async(fresh):
    """gemm_tf32.cuh's k loop in two copies for fp32 operands: staged by 16-byte cp.async where
    both operands' rows are 16-byte aligned, by 4-byte cp.async otherwise (ScalarCopier), so
    both run in the pipeline and neither loads through registers. bf16 operands always take
    the 16-byte copy: one loop."""
    for name, k in per_layer_tensor_core(fresh["kernels"]).items():
        assert k["hot_loop"]["ldgsts"] and k["hot_loop"]["ldg"] == 0, name
        if "_tf32" in name:
            (other,) = k["sibling_loops"]
            assert other["ldgsts"] and other["ldg"] == 0 and other["hmma"] == k["hot_loop"]["hmma"], name
        else:
            assert k["sibling_loops"] == [], name


def over_the_hmma_goal(kernels: dict) -> dict:
    """{kernel: its hot loop's instructions per HMMA, or why it has no such figure} for each of
    ``kernels`` whose hot loop issues more than MAX_INSTRUCTIONS_PER_HMMA per HMMA or holds no
    HMMA (no loop, an FFMA loop, or wgmma's HGMMA, which the goal, set on mma.sync, does not
    cover: the report's ``instr_per_hmma`` is None there)."""
    over = {}
    for name, k in kernels.items():
        loop = k["hot_loop"]
        per_hmma = loop and loop["instr_per_hmma"]
        if per_hmma is None:
            held = (", ".join(loop["hmma_by_shape"]) or "no tensor-core instruction") if loop else "no loop"
            over[name] = f"no HMMA in its hot loop ({held}): the goal counts instructions per HMMA"
        elif per_hmma > MAX_INSTRUCTIONS_PER_HMMA:
            over[name] = per_hmma
    return over


def test_the_per_layer_tensor_core_loops_issue_at_most_4_instructions_per_hmma(fresh):
    over = over_the_hmma_goal(per_layer_tensor_core(fresh["kernels"]))
    assert over == {}, f"more than {MAX_INSTRUCTIONS_PER_HMMA} instructions per HMMA on sm_90"


FUSED_TENSOR_CORE = re.compile(r"fused_mlp_(fwd|bwd|dw)_(tf32|bf16)")


def test_the_fused_tensor_core_loops_issue_at_most_4_instructions_per_hmma(fresh):
    fused = {name: k for name, k in fresh["kernels"].items() if FUSED_TENSOR_CORE.fullmatch(name)}
    assert len(fused) == 6
    over = over_the_hmma_goal(fused)
    assert over == {}, f"more than {MAX_INSTRUCTIONS_PER_HMMA} instructions per HMMA on sm_90"


def test_the_hmma_goal_fails_a_hot_loop_without_hmma_with_a_message_not_a_type_error():
    """An HGMMA loop (wgmma) has no instructions per HMMA: the goal names it instead of comparing
    None with 4."""
    def kernel(per_hmma, shapes):
        return {"hot_loop": {"instr_per_hmma": per_hmma, "hmma_by_shape": shapes}}
    kernels = {"within": kernel(3.5, {"HMMA.1688.F32.TF32": 8}), "over": kernel(4.5, {"HMMA.1688.F32.TF32": 8}),
               "wgmma": kernel(None, {"HGMMA.64x128x16.F32.BF16": 2}), "loopless": {"hot_loop": None}}
    assert over_the_hmma_goal(kernels) == {
        "over": 4.5,
        "wgmma": "no HMMA in its hot loop (HGMMA.64x128x16.F32.BF16): the goal counts instructions per HMMA",
        "loopless": "no HMMA in its hot loop (no loop): the goal counts instructions per HMMA"}


# Issue 28's memory goal for every GEMM, per layer and fused, in every precision, on the access
# profiler's workloads: shared memory conflict-free (at most 1.05 times the wavefronts the same
# bytes take without bank conflicts) and global loads at least 90% efficient.
GEMM = re.compile(r"dense_(fwd|dx|dw)_\w+|fused_mlp_\w+")
MAX_CONFLICT_FACTOR = 1.05
MIN_GLOBAL_LOAD_EFFICIENCY = 0.90


def memory_goal_misses(kernels: dict) -> dict:
    misses = {}
    for name, k in kernels.items():
        if not GEMM.fullmatch(name):
            continue
        shared, ideal, loads = (k["shared_wavefronts_per_request"], k["shared_ideal_wavefronts_per_request"],
                                k["global_load_efficiency"])
        if loads is None or loads < MIN_GLOBAL_LOAD_EFFICIENCY:
            misses[name] = f"global load efficiency {loads}"
        elif shared is not None and shared > MAX_CONFLICT_FACTOR * ideal:
            misses[name] = f"{shared} shared wavefronts per request where {ideal} are conflict-free"
    return misses


def test_every_gemm_reads_shared_memory_without_conflicts_and_global_memory_at_least_90_percent_efficiently(fresh):
    if not fresh["memory_figures"].startswith("from "):
        pytest.skip(f"no memory figures: {fresh['memory_figures']}")
    gemms = [name for name in fresh["kernels"] if GEMM.fullmatch(name)]
    families = ("dense_fwd_", "dense_dx_", "dense_dw_", "fused_mlp_fwd", "fused_mlp_bwd", "fused_mlp_dw")
    assert all(any(name.startswith(f) for name in gemms) for f in families), \
        "the GEMM pattern has lost the kernels it is about"
    assert memory_goal_misses(fresh["kernels"]) == {}


def test_the_memory_goal_fails_a_conflicting_or_uncoalesced_gemm_and_ignores_other_kernels():
    def k(shared, ideal, loads):
        return {"shared_wavefronts_per_request": shared, "shared_ideal_wavefronts_per_request": ideal,
                "global_load_efficiency": loads}
    kernels = {"dense_fwd_tf32_relu": k(4.0, 4.0, 0.95), "dense_dw_128x128": k(2.0, 1.0, 1.0),
               "fused_mlp_fwd": k(3.0, 3.0, 0.85), "adam_update_hyper": k(None, None, 0.5)}
    assert memory_goal_misses(kernels) == {
        "dense_dw_128x128": "2.0 shared wavefronts per request where 1.0 are conflict-free",
        "fused_mlp_fwd": "global load efficiency 0.85"}


def test_the_per_layer_tensor_core_kernels_do_not_spill_on_sm_80_either(committed):
    spills = {name: k["spill_bytes"] for name, k in per_layer_tensor_core(committed["other_archs"]["sm_80"]).items()
              if k["spill_bytes"]}
    assert spills == {}


# Issue 32's goal for the Numba backend's GEMMs: the forward (one kernel for every activation),
# dX and dW, compiled with the launch bounds the backend gives them.
NUMBA_GEMM = re.compile(re.escape(numba_variants.PREFIX) + r"dense_(forward|dx|dw)")
NUMBA_FFMA_GOAL = 0.70


def test_the_numba_gemms_issue_at_least_70_percent_ffma_without_spilling(fresh):
    if fresh["numba_unavailable"]:
        pytest.skip(f"the Numba kernels cannot be compiled here: {fresh['numba_unavailable']}")
    gemms = {name: k for name, k in fresh["kernels"].items() if NUMBA_GEMM.fullmatch(name)}
    assert len(gemms) == 3
    below = {name: k["hot_loop"]["ffma_share"] for name, k in gemms.items()
             if k["hot_loop"]["ffma_share"] < NUMBA_FFMA_GOAL}
    assert below == {}, f"FFMA share below {NUMBA_FFMA_GOAL}"
    assert {name: k["spill_bytes"] for name, k in gemms.items() if k["spill_bytes"]} == {}


def test_the_numba_gemms_are_modelled_under_the_launch_bounds_they_run_with(fresh):
    """TILE_BLOCKS_PER_SM blocks of TILE_THREADS: at most 128 registers a thread, 16 warps per SM."""
    if fresh["numba_unavailable"]:
        pytest.skip(f"the Numba kernels cannot be compiled here: {fresh['numba_unavailable']}")
    from gpubp.backends import numba_backend as nb

    per_block = nb.TILE_THREADS * nb.TILE_BLOCKS_PER_SM
    gemms = {name: k for name, k in fresh["kernels"].items() if NUMBA_GEMM.fullmatch(name)}
    assert all(k["registers"] <= 65536 // per_block for k in gemms.values())
    assert all(k["occupancy_warps"] >= per_block // 32 for k in gemms.values())


def test_every_numba_variant_is_modelled(fresh):
    if fresh["numba_unavailable"]:
        pytest.skip(f"the Numba kernels cannot be compiled here: {fresh['numba_unavailable']}")
    numba = {name: k for name, k in fresh["kernels"].items() if name.startswith(numba_variants.PREFIX)}
    assert numba
    assert all(k["hot_loop"] and k["occupancy_warps"] for k in numba.values())


def test_the_committed_tables_are_written_from_the_committed_json(committed):
    assert COMMITTED.with_suffix(".md").read_text() == km.markdown(committed)


def test_the_backends_static_shared_memory_allowance_covers_every_kernel_launched_with_dynamic_memory(committed):
    """cupy_backend compares a kernel's dynamic shared memory plus STATIC_SHARED_ALLOWANCE with the
    GPU's per-block limit before it opts in; the compiled kernels' static __shared__ must fit it."""
    reports = [committed["kernels"], *committed["other_archs"].values()]
    static = {name: k["smem_bytes"] - k["dynamic_smem_bytes"] for kernels in reports for name, k in kernels.items()
              if k.get("dynamic_smem_bytes")}
    assert static and {name for name in static if name.startswith("fused_mlp")}
    assert {name: b for name, b in static.items() if b > cupy_backend.STATIC_SHARED_ALLOWANCE} == {}


README = ROOT / "README.md"


def ffma_range(kernels: dict, pattern: re.Pattern) -> str:
    """"86-90%": the lowest and highest FFMA share, in percent, of the hot loops ``pattern`` names."""
    shares = [k["hot_loop"]["ffma_share"] for name, k in kernels.items() if pattern.fullmatch(name)]
    return f"{round(100 * min(shares))}-{round(100 * max(shares))}%"


def test_the_readme_shows_the_committed_figures(committed):
    """The README's table of the speed goals' kernels, and the FFMA shares its prose gives for
    the fp32 and Numba GEMMs, are the committed report's."""
    readme = README.read_text(encoding="utf-8")
    assert km.readme_table(committed) in readme, (
        "README's kernel table differs from kernel_model.json: python bench/kernel_model.py rewrites it")
    simt, numba = (ffma_range(committed["kernels"], pattern) for pattern in (SIMT_GEMM, NUMBA_GEMM))
    for phrase in (f"The fp32 GEMM loops issue an FFMA in {simt} of their slots", f"the Numba GEMM loops in {numba}",
                   f"its GEMM loops issue an FFMA in {numba} of their slots, the `cupy` fp32 GEMMs' in {simt}"):
        assert " ".join(phrase.split()) in " ".join(readme.split()), f"README lacks {phrase!r}"


def test_update_readme_rewrites_the_table_and_nothing_else(committed, tmp_path):
    readme = tmp_path / "README.md"
    text = README.read_text(encoding="utf-8")
    readme.write_text(text, encoding="utf-8")
    assert not km.update_readme(committed, readme)
    changed = json.loads(json.dumps(committed))
    changed["kernels"]["dense_dw_tf32"]["registers"] += 1
    assert km.update_readme(changed, readme)
    updated = readme.read_text(encoding="utf-8")
    assert km.readme_table(changed) in updated and km.readme_table(committed) not in updated
    assert updated.replace(km.readme_table(changed), km.readme_table(committed)) == text


def test_a_figure_that_changed_makes_the_readme_stale(committed):
    name = "numba:dense_dx"
    changed = json.loads(json.dumps(committed))
    changed["kernels"][name]["hot_loop"]["instructions"] += 1
    assert km.readme_table(changed) not in README.read_text(encoding="utf-8")
    changed["kernels"]["numba:dense_dw"]["hot_loop"]["ffma_share"] -= 0.05  # the lowest share
    assert ffma_range(changed["kernels"], NUMBA_GEMM) != ffma_range(committed["kernels"], NUMBA_GEMM)


# ----------------------------------------------------------------------------- the comparison


def report(**kernels) -> dict:
    return {"arch": "sm_90", "kernels": kernels, "other_archs": {"sm_80": {}}}


def loop(instructions: int, ffma: int = 0, hmma: int = 0, at: int = 1, arch: str = "sm_90") -> dict:
    """A loop of the report, the ``at``-th of its kernel: ``hmma`` HMMA.1688 tf32 (4 cycles on
    sm_90) or ``ffma`` FFMA in ``instructions``, its ceiling as the model takes it on ``arch``."""
    mix = {"instructions": instructions, "ffma": ffma, "hmma": hmma,
           "hmma_by_shape": {"HMMA.1688.F32.TF32": hmma} if hmma else {}}
    return {"address": f"{0x100 * at:#06x}-{0x100 * at + 0x80:#06x}", **mix,
            "issue_ceiling": round(km.issue_ceiling(mix, km.ARCHS[arch]), 4)}


def figures(*loops: dict, spill=0, **memory) -> dict:
    """A kernel whose hot loop has these copies, the first the hot loop (none: no loop)."""
    return {"spill_bytes": spill, "issue_ceiling": loops[0]["issue_ceiling"] if loops else None,
            "hot_loop": loops[0] if loops else None, "sibling_loops": list(loops[1:]),
            **dict.fromkeys(km.MEMORY_FIELDS), **memory}


def fp32(*instructions: int, arch: str = "sm_90") -> dict:
    """A kernel whose hot loop has copies of 50 FFMA in these instruction counts."""
    return figures(*(loop(n, ffma=50, at=at, arch=arch) for at, n in enumerate(instructions, 1)))


def tensor(*instructions: int) -> dict:
    """A kernel whose hot loop has copies of 64 HMMA in these instruction counts (at fewer than 256,
    all at a ceiling of 1 on sm_90)."""
    return figures(*(loop(n, hmma=64, at=at) for at, n in enumerate(instructions, 1)))


def test_regressions_compare_the_nvrtc_builds_as_the_shipped_ones():
    def with_nvrtc(**parts) -> dict:
        return {**report(), "nvrtc": parts}

    old = with_nvrtc(**{"k:relu": fp32(100)})
    assert km.regressions(old, with_nvrtc(**{"k:relu": fp32(100)})) == []
    ((kind, message),) = km.regressions(old, with_nvrtc(**{"k:relu": fp32(125)}))
    assert kind == "worse" and message.startswith("k:relu (sm_90 NVRTC): the hot loop (0x0100-0x0180) issues 125")
    spilling = {**fp32(100), "spill_bytes": 4}
    assert [kind for kind, _ in km.regressions(old, with_nvrtc(**{"k:relu": spilling}))] == ["spill"]
    assert [kind for kind, _ in km.regressions(old, with_nvrtc())] == ["unlisted"]


def test_regressions_fail_an_issue_ratio_beyond_the_tolerance_only():
    old = report(k=fp32(100))
    assert km.regressions(old, report(k=fp32(101))) == []  # 50 FFMA in 101: 1% below
    assert km.regressions(old, report(k=fp32(96))) == []
    ((kind, message),) = km.regressions(old, report(k=fp32(103)))  # 3% below
    assert kind == "worse" and message == (
        "k (sm_90): the hot loop (0x0100-0x0180) issues 103 instructions for 50 FFMA, issue ratio 0.4854; the "
        "committed report's copy 1 (0x0100-0x0180) 100 instructions for 50 FFMA, issue ratio 0.5000")


def test_regressions_fail_a_spill_and_kernels_that_one_report_lacks():
    problems = km.regressions(report(a=figures(), b=figures()), report(b=figures(spill=8), c=figures()))
    assert sorted(kind for kind, _ in problems) == ["spill", "unlisted", "unlisted"]
    assert any("c (sm_90) is not in the committed report" in message for _, message in problems)
    assert any("a (sm_90) is in the committed report but was not built" in message for _, message in problems)


def test_regressions_compare_every_copy_of_the_hot_loop():
    committed = report(k=fp32(80, 90))
    assert km.regressions(committed, report(k=fp32(80, 90))) == []
    assert km.regressions(committed, report(k=fp32(80))) == []  # a copy gone
    assert km.regressions(committed, report(k=fp32(80, 91))) == []
    ((kind, message),) = km.regressions(committed, report(k=fp32(80, 103)))
    assert kind == "worse" and message == (
        "k (sm_90): copy 2 of the hot loop (0x0200-0x0280) issues 103 instructions for 50 FFMA, issue ratio 0.4854; "
        "the committed report's copy 2 (0x0200-0x0280) 90 instructions for 50 FFMA, issue ratio 0.5556")
    # A new copy slower than the committed slowest, and a hot loop slower than committed (once).
    ((_, message),) = km.regressions(committed, report(k=fp32(80, 90, 120)))
    assert message.startswith("k (sm_90): copy 3 of the hot loop (0x0300-0x0380) issues 120 instructions")
    assert message.endswith("the committed report's copy 2 (0x0200-0x0280) 90 instructions for 50 FFMA, "
                            "issue ratio 0.5556")
    ((_, message),) = km.regressions(committed, report(k=fp32(90, 90)))
    assert message.startswith("k (sm_90): the hot loop (0x0100-0x0180) issues 90 instructions for 50 FFMA")
    ((_, message),) = km.regressions(committed, report(k=figures()))
    assert message.startswith("k (sm_90): no hot loop now, the committed report's 80 instructions for 50 FFMA")


def test_regressions_fail_a_tensor_core_loop_or_copy_grown_at_a_ceiling_of_1():
    """Every sm_90 tensor-core loop issues fewer than 4 instructions per HMMA, at a ceiling of 1
    that a loop growing by 10% does not move: the comparison takes the issue ratio, uncapped."""
    committed = report(k=tensor(176, 180))
    assert {c["issue_ceiling"] for c in [*km.copies(tensor(176, 180)), *km.copies(tensor(194, 198))]} == {1.0}
    assert km.regressions(committed, report(k=tensor(178, 182))) == []  # 1% more
    ((_, message),) = km.regressions(committed, report(k=tensor(176, 198)))
    assert message == ("k (sm_90): copy 2 of the hot loop (0x0200-0x0280) issues 198 instructions for 64 HMMA "
                       "(3.09 each), issue ratio 1.2929; the committed report's copy 2 (0x0200-0x0280) 180 "
                       "instructions for 64 HMMA (2.81 each), issue ratio 1.4222")
    messages = [message for _, message in km.regressions(committed, report(k=tensor(194, 198)))]
    assert [m.split(" issues ")[0] for m in messages] == ["k (sm_90): the hot loop (0x0100-0x0180)",
                                                          "k (sm_90): copy 2 of the hot loop (0x0200-0x0280)"]
    # A tensor-core kernel whose hot loop is now an FFMA loop: ratios of different peaks.
    ((_, message),) = km.regressions(committed, report(k=fp32(60)))
    assert message.startswith("k (sm_90): the hot loop is now an FFMA loop (60 instructions for 50 FFMA, issue ratio "
                              "0.8333), the committed report's a tensor-core loop (176 instructions for 64 HMMA")


def test_regressions_fail_an_sm_80_fp32_loop_grown_at_a_ceiling_of_1():
    """sm_80's FP32 lanes take 2 cycles a warp's FFMA: an FFMA share over one half is a ceiling of 1
    there, and the comparison takes the ratio, twice the share."""
    def sm_80(kernel: dict) -> dict:
        return {"arch": "sm_90", "kernels": {}, "other_archs": {"sm_80": {"k": kernel}}}
    committed = sm_80(fp32(80, arch="sm_80"))
    assert fp32(80, arch="sm_80")["issue_ceiling"] == fp32(88, arch="sm_80")["issue_ceiling"] == 1.0
    assert km.regressions(committed, sm_80(fp32(81, arch="sm_80"))) == []
    ((_, message),) = km.regressions(committed, sm_80(fp32(88, arch="sm_80")))
    assert message == ("k (sm_80): the hot loop (0x0100-0x0180) issues 88 instructions for 50 FFMA, issue ratio "
                       "1.1364; the committed report's copy 1 (0x0100-0x0180) 80 instructions for 50 FFMA, issue "
                       "ratio 1.2500")


def kernel_at(report_: dict, where: list) -> dict:
    for key in where:
        report_ = report_[key]
    return report_


def grown(committed: dict, where: list, loop_at: str, by: float = 0.10) -> dict:
    """``committed`` with one loop (``where``: the keys to its kernel; ``loop_at``: "hot_loop" or
    "sibling_loops", its first copy) issuing ``by`` more instructions, its ceiling as the model takes it."""
    changed = json.loads(json.dumps(committed))
    kernel = kernel_at(changed, where)
    target = kernel["hot_loop"] if loop_at == "hot_loop" else kernel["sibling_loops"][0]
    target["instructions"] = round(target["instructions"] * (1 + by))
    arch = km.ARCHS[where[1] if where[0] == "other_archs" else committed["arch"]]
    target["issue_ceiling"] = round(km.issue_ceiling(target, arch), 4)
    if loop_at == "hot_loop":
        kernel["issue_ceiling"] = target["issue_ceiling"]
    return changed


@pytest.mark.parametrize("where, loop_at, problem", [
    (["kernels", "dense_dx_tf32"], "hot_loop", "dense_dx_tf32 (sm_90): the hot loop (0x1e20-0x3a00) issues 479 "
                                               "instructions for 192 HMMA (2.49 each)"),
    (["kernels", "fused_mlp_fwd_tf32"], "sibling_loops", "fused_mlp_fwd_tf32 (sm_90): copy 2 of the hot loop"),
    (["kernels", "fused_mlp_bwd_bf16"], "hot_loop", "fused_mlp_bwd_bf16 (sm_90): the hot loop"),
    (["nvrtc", "dense_fwd_bf16_relu"], "hot_loop", "dense_fwd_bf16_relu (sm_90 NVRTC): the hot loop"),
    (["other_archs", "sm_80", "fused_mlp_fwd"], "hot_loop", "fused_mlp_fwd (sm_80): the hot loop"),
    (["other_archs", "sm_80", "dense_fwd_tf32_relu"], "sibling_loops", "dense_fwd_tf32_relu (sm_80): copy 2"),
])
def test_a_committed_loop_at_a_ceiling_of_1_grown_by_10_percent_fails_the_comparison(committed, where, loop_at,
                                                                                       problem):
    """The committed report against itself with one of its loops at a ceiling of 1 issuing 10% more
    instructions: the ceilings do not move, the comparison fails all the same."""
    assert km.regressions(committed, committed) == []
    changed = grown(committed, where, loop_at)
    before, after = (kernel_at(r, where)["hot_loop" if loop_at == "hot_loop" else "sibling_loops"]
                     for r in (committed, changed))
    if loop_at != "hot_loop":
        before, after = before[0], after[0]
    assert before["issue_ceiling"] == after["issue_ceiling"] == 1.0 and after["instructions"] > before["instructions"]
    problems = km.regressions(committed, changed)
    assert [kind for kind, _ in problems] == ["worse"] and problems[0][1].startswith(problem), problems
    assert km.regressions(committed, grown(committed, where, loop_at, by=0.01)) == []


# Growing a loop of hand-written SASS by one instruction, as ptxas would (the model's figures of it).
RESOURCES = km.sass.Resources(registers=32, spill_stores=0, spill_loads=0, stack_frame=0, smem_bytes=0)


def planted_figures(lines: str, arch: str = "sm_90") -> dict:
    return km.kernel_figures(RESOURCES, km.sass.sass_functions(listing(lines))["planted"], 128, km.ARCHS[arch])


def test_hand_written_loops_grown_at_a_ceiling_of_1_fail_the_comparison():
    # HMMA_COPIES: 2 HMMA.16816 bf16 (8 cycles) in copies of 6 and 7 instructions.
    tensor_copies = planted_figures(HMMA_COPIES)
    copy_grown = planted_figures(HMMA_COPIES.replace("160: NOP", "160: IADD3 R2, R2, 0x10, RZ"))
    both_grown = planted_figures(HMMA_COPIES.replace("160: NOP", "160: IADD3 R2, R2, 0x10, RZ").replace(
        "240: ISETP", "238: IADD3 R2, R2, 0x10, RZ\n240: ISETP"))
    for k in (tensor_copies, copy_grown, both_grown):
        assert k["peak"] == "tensor" and {c["issue_ceiling"] for c in km.copies(k)} == {1.0}
    assert km.regressions(report(k=tensor_copies), report(k=tensor_copies)) == []
    ((_, message),) = km.regressions(report(k=tensor_copies), report(k=copy_grown))
    assert message.startswith("k (sm_90): copy 2 of the hot loop (0x0100-0x0170) issues 8 instructions for 2 HMMA")
    problems = km.regressions(report(k=tensor_copies), report(k=both_grown))
    assert [message.split(" issues ")[0] for _, message in problems] == [
        "k (sm_90): the hot loop (0x0200-0x0250)", "k (sm_90): copy 2 of the hot loop (0x0100-0x0170)"]
    # FP32_COPIES on sm_80: 8 FFMA (16 cycles) in copies of 12 and 15 instructions.
    fp32_copies = planted_figures(FP32_COPIES, "sm_80")
    hot_grown = planted_figures(FP32_COPIES.replace("\nd0: ISETP", "\nc8: IADD3 R0, R0, 0x10, RZ\nd0: ISETP"), "sm_80")
    assert fp32_copies["issue_ceiling"] == hot_grown["issue_ceiling"] == 1.0
    on_sm_80 = [{"arch": "sm_90", "kernels": {}, "other_archs": {"sm_80": {"k": k}}} for k in (fp32_copies, hot_grown)]
    ((_, message),) = km.regressions(*on_sm_80)
    assert message.startswith("k (sm_80): the hot loop (0x0030-0x00e0) issues 13 instructions for 8 FFMA")


def test_regressions_compare_memory_figures_once_the_committed_report_has_them():
    unmeasured = report(k=figures())
    measured = figures(shared_wavefronts_per_request=1.0, global_load_efficiency=0.9, global_store_efficiency=1.0)
    assert km.regressions(unmeasured, report(k=measured)) == []
    conflicts = dict(measured, shared_wavefronts_per_request=2.0)
    uncoalesced = dict(measured, global_load_efficiency=0.5)
    assert "wavefronts_per_request rose" in km.regressions(report(k=measured), report(k=conflicts))[0][1]
    assert "global_load_efficiency fell" in km.regressions(report(k=measured), report(k=uncoalesced))[0][1]
    assert "now unmeasured" in km.regressions(report(k=measured), unmeasured)[0][1]


def test_regressions_compare_the_shared_conflict_factor_not_the_wavefronts():
    """Conflict-free 16-byte reads (4 wavefronts per request, ideal 4) turned into 2-way conflicting
    4-byte reads (2 per request, ideal 1): fewer wavefronts per request, twice the conflict factor."""
    conflict_free = figures(shared_wavefronts_per_request=4.0, shared_ideal_wavefronts_per_request=4.0,
                            global_load_efficiency=1.0, global_store_efficiency=1.0)
    conflicting = dict(conflict_free, shared_wavefronts_per_request=2.0, shared_ideal_wavefronts_per_request=1.0)
    ((kind, message),) = km.regressions(report(k=conflict_free), report(k=conflicting))
    assert kind == "worse" and message == "k (sm_90) shared conflict factor (wavefronts over ideal) rose from 1.0 to 2.0"
    assert km.regressions(report(k=conflicting), report(k=conflict_free)) == []
    # Without the ideal in one report, the wavefronts themselves.
    assert "wavefronts_per_request rose" in km.regressions(
        report(k=dict(conflicting, shared_ideal_wavefronts_per_request=None)), report(k=conflict_free))[0][1]


def with_resources(k: dict, registers=120, stack_bytes=0, smem_bytes=32768, threads=256) -> dict:
    warps, limit = km.occupancy(registers, smem_bytes, threads, km.ARCHS["sm_90"])
    return {**k, "threads": threads, "registers": registers, "stack_bytes": stack_bytes, "smem_bytes": smem_bytes,
            "occupancy_warps": warps, "occupancy_limit": limit}


@pytest.mark.parametrize("change, messages", [
    ({"registers": 122}, []),  # within the tolerance, and the same occupancy
    ({"registers": 168}, ["k (sm_90) occupancy fell from 16 to 8 warps/SM (limited by registers)",
                          "k (sm_90) registers rose from 120 to 168"]),
    ({"stack_bytes": 8}, ["k (sm_90) stack_bytes rose from 0 to 8"]),
    ({"smem_bytes": 36864}, ["k (sm_90) smem_bytes rose from 32768 to 36864"]),
    ({"smem_bytes": 120000}, ["k (sm_90) occupancy fell from 16 to 8 warps/SM (limited by shared memory)",
                              "k (sm_90) smem_bytes rose from 32768 to 120000"]),
    ({"registers": 96, "smem_bytes": 16384}, []),  # better
])
def test_regressions_fail_fewer_warps_or_more_registers_stack_or_shared_memory(change, messages):
    committed = report(k=with_resources(fp32(100)))
    fresh = report(k=with_resources(fp32(100), **change))
    assert [(kind, message) for kind, message in km.regressions(committed, fresh)] == [("worse", m) for m in messages]


def test_the_committed_report_with_fewer_warps_a_stack_or_more_shared_memory_fails_the_comparison(committed):
    changed = json.loads(json.dumps(committed))
    arch = km.ARCHS[committed["arch"]]
    k = changed["kernels"]["dense_fwd_128x128"]
    k["registers"] = 168
    k["occupancy_warps"], k["occupancy_limit"] = km.occupancy(168, k["smem_bytes"], k["threads"], arch)
    changed["kernels"]["dense_dx_tf32"]["stack_bytes"] += 512
    changed["other_archs"]["sm_80"]["fused_mlp_fwd_bf16"]["smem_bytes"] += 40960
    messages = [message for kind, message in km.regressions(committed, changed) if kind == "worse"]
    assert len(messages) == len(km.regressions(committed, changed)) == 4, messages
    assert messages[0].startswith("dense_dx_tf32 (sm_90) stack_bytes rose from")
    assert messages[1].startswith("dense_fwd_128x128 (sm_90) occupancy fell from")
    assert messages[2].startswith("dense_fwd_128x128 (sm_90) registers rose from")
    assert messages[3].startswith("fused_mlp_fwd_bf16 (sm_80) smem_bytes rose from")


def test_regressions_fail_a_hot_loop_doing_other_work_per_pass():
    """The committed hot loop made slower stops being the hot loop: an epilogue loop left rolled,
    with more FFMA and a higher issue ratio, is taken for it; the ratios alone compare well."""
    main_loop = loop(40, ffma=8)
    slower_main_loop, epilogue = loop(100, ffma=8, at=1), loop(40, ffma=16, at=2)
    assert km.issue_ratio(epilogue, km.ARCHS["sm_90"]) > km.issue_ratio(main_loop, km.ARCHS["sm_90"])
    ((kind, message),) = km.regressions(report(k=figures(main_loop)), report(k=figures(epilogue)))
    assert kind == "worse" and message == (
        "k (sm_90): the hot loop (0x0200-0x0280) does {'FFMA': 16} per pass, the committed report's "
        "(0x0100-0x0180) {'FFMA': 8}: another loop is taken for the hot loop, or its work changed")
    assert km.regressions(report(k=figures(main_loop)), report(k=figures(loop(40, ffma=8, at=3)))) == []
    assert slower_main_loop  # (not in the fresh report's loops: the model no longer calls it hot)
    # Tensor-core work is compared by shape.
    bf16 = figures(dict(loop(40, hmma=8), hmma_by_shape={"HMMA.16816.F32.BF16": 8}))
    problems = km.regressions(report(k=tensor(40)), report(k=bf16))
    assert any(kind == "worse" and "does {'HMMA.16816.F32.BF16': 8} per pass" in message for kind, message in problems)


def test_the_model_refuses_to_write_a_report_worse_than_the_one_it_replaces(committed, tmp_path, monkeypatch,
                                                                            capsys):
    """A kernel change re-runs the model (the committed report must be of the kernels as they are),
    so the run itself compares: a regression is printed and nothing written, unless accepted with
    a reason, which the report records."""
    out = tmp_path / "kernel_model.json"
    km.write(committed, out)
    before = out.read_text()
    worse = grown(committed, ["kernels", "dense_dx_tf32"], "hot_loop")
    monkeypatch.setattr(km, "update_readme", lambda report, readme: False)
    monkeypatch.setattr(km, "build_report", lambda *args, **kwargs: json.loads(json.dumps(worse)))
    with pytest.raises(SystemExit) as refused:
        km.main(["--out", str(out)])
    assert refused.value.code == 1 and out.read_text() == before
    assert "worse: dense_dx_tf32 (sm_90): the hot loop (0x1e20-0x3a00) issues 479" in capsys.readouterr().out
    km.main(["--out", str(out), "--accept", "a planted regression"])
    written = json.loads(out.read_text())
    accepted = written.pop("accepted")
    assert written == worse and accepted["reason"] == "a planted regression"
    assert [m.split(":")[0] for m in accepted["regressions"]] == ["worse"]
    assert accepted["against_kernels_sha256"] == committed["kernels_sha256"] and "against_commit" in accepted
    assert "Accepted regressions" in out.with_suffix(".md").read_text()
    # No worse than the report it replaces (a kernel added included): written, nothing accepted.
    better = json.loads(json.dumps(committed))
    better["kernels"]["planted_new_kernel"] = better["kernels"]["dense_dx_tf32"]
    monkeypatch.setattr(km, "build_report", lambda *args, **kwargs: better)
    km.main(["--out", str(out)])
    assert json.loads(out.read_text()) == better


# ----------------------------------------------------------------------------- the model's formulas


@pytest.mark.parametrize("registers, smem, threads, expected", [
    (128, 16896, 256, (16, "registers")),  # 4096 registers a warp: 4 warps per sub-partition, 2 blocks
    (168, 8448, 64, (12, "registers")),  # 5376 a warp: 3 per sub-partition, 6 blocks of 2 warps
    (32, 0, 256, (64, "warps")),
    (16, 0, 32, (32, "blocks")),
    (32, 100_000, 128, (8, "shared memory")),  # 101 120 bytes with the reserved KiB: 2 blocks in 228 KiB
    (255, 0, 1024, (0, "registers")),  # 8192 registers a warp x 32 warps is past the 64K a block may hold
])
def test_occupancy_takes_the_tightest_of_the_four_limits(registers, smem, threads, expected):
    assert km.occupancy(registers, smem, threads, km.ARCHS["sm_90"]) == expected


def mix(instructions, ffma=0, **hmma_by_shape):
    return {"instructions": instructions, "ffma": ffma, "hmma": sum(hmma_by_shape.values()),
            "hmma_by_shape": {f"HMMA.{shape}": n for shape, n in hmma_by_shape.items()}}


@pytest.mark.parametrize("opcode, shape, operands, sm_90_cycles", [
    ("HMMA.1688.F32.TF32", "1688", "TF32", 4),
    ("HMMA.16816.F32.BF16", "16816", "BF16", 4),
    ("HMMA.16816.F32", "16816", "F16", 4),  # mma.sync f16 inputs, f32 accumulator: the input type is not written
    ("HMMA.16816.F16", "16816", "F16", 4),  # f16 inputs and accumulator
    ("HGMMA.64x128x16.F32.BF16", "64x128x16", "BF16", 64),  # a warpgroup's: 16 x 128 x 16 per sub-partition
    ("HGMMA.64x64x8.F32.TF32", "64x64x8", "TF32", 32),
    ("HGMMA.64x256x16.F32", "64x256x16", "F16", 128),
])
def test_tensor_core_opcodes_give_their_shape_and_input_type(opcode, shape, operands, sm_90_cycles):
    assert km.tensor_op(opcode)[::2] == (shape, operands)
    assert km.tensor_cycles(opcode, km.ARCHS["sm_90"]) == sm_90_cycles
    assert km.tensor_cycles(opcode, km.ARCHS["sm_80"]) == 2 * sm_90_cycles


def test_a_kernels_figures_are_its_fastest_copys_and_every_copy_is_recorded():
    arch = km.ARCHS["sm_90"]
    resources = km.sass.Resources(registers=32, spill_stores=0, spill_loads=0, stack_frame=0, smem_bytes=0)
    code = km.sass.sass_functions(listing(FP32_COPIES))["planted"]
    k = km.kernel_figures(resources, code, 128, arch)
    assert k["peak"] == "fp32" and k["hot_loop"]["address"] == "0x0030-0x00e0"
    assert k["issue_ceiling"] == k["hot_loop"]["issue_ceiling"] == round(8 / 12, 4)
    assert [(c["address"], c["ldg"], c["issue_ceiling"]) for c in k["sibling_loops"]] == [
        ("0x0200-0x02e0", 4, round(8 / 15, 4))]
    tensor = km.kernel_figures(resources, km.sass.sass_functions(listing(HMMA_COPIES))["planted"], 128, arch)
    assert tensor["peak"] == "tensor" and (tensor["hot_loop"]["instructions"], tensor["issue_ceiling"]) == (6, 1.0)
    assert [(c["instructions"], c["instr_per_hmma"], c["issue_ceiling"]) for c in tensor["sibling_loops"]] == [
        (7, 3.5, 1.0)]
    memory = {"source": "k.cu", **dict.fromkeys(km.MEMORY_FIELDS + km.MEMORY_DETAILS)}
    assert f"| {km._cell(8 / 12)} | 2 | {km._cell(8 / 15)} |" in km.table_row("k", {**k, **memory})
    # Both copies at the tensor-core peak: the slowest copy is the one issuing more instructions.
    assert "| 1.00 tc | 2 | 1.00 tc (3.5 instr/HMMA) |" in km.table_row("t", {**tensor, **memory})


# Tensor-core instructions in no innermost loop: before an FFMA loop, in an outer loop around one,
# and in a kernel without a loop. The hot loop would be the FFMA loop (or none).
HMMA_OUTSIDE_THE_LOOP = """
0: HMMA.1688.F32.TF32 R8, R4, R6, R8
10: LDS R2, [R0]
20: FFMA R4, R2, R3, R4
30: IADD3 R0, R0, 0x4, RZ
40: @P0 BRA 0x10
50: STG.E [R2.64], R8
60: EXIT
70: BRA 0x70
"""
HMMA_IN_AN_OUTER_LOOP = """
0: HMMA.1688.F32.TF32 R8, R4, R6, R8
10: LDS R2, [R0]
20: FFMA R4, R2, R3, R4
30: @P0 BRA 0x10
40: IADD3 R0, R0, 0x4, RZ
50: @P1 BRA 0x0
60: EXIT
70: BRA 0x70
"""
HMMA_WITHOUT_A_LOOP = """
0: HMMA.1688.F32.TF32 R8, R4, R6, R8
10: STG.E [R2.64], R8
20: EXIT
30: BRA 0x30
"""


@pytest.mark.parametrize("lines, where", [(HMMA_OUTSIDE_THE_LOOP, "its hot loop (0x0010-0x0040) holds none"),
                                          (HMMA_IN_AN_OUTER_LOOP, "its hot loop (0x0010-0x0030) holds none"),
                                          (HMMA_WITHOUT_A_LOOP, "it has no loop")])
def test_a_kernel_with_tensor_core_instructions_outside_its_hot_loop_is_refused(lines, where):
    """Its ceiling would be an FFMA loop's (or none), labelled with the tensor-core peak that
    bench/model_bounds.py would multiply it by: refused, not modelled."""
    code = km.sass.sass_functions(listing(lines))["planted"]
    with pytest.raises(ValueError, match=re.escape(
            "the kernel (sm_90) has tensor-core instructions (1, the first HMMA.1688.F32.TF32 at 0x0000) but none in "
            f"an innermost loop, so {where}: ")):
        km.kernel_figures(RESOURCES, code, 128, km.ARCHS["sm_90"])


def test_the_peak_is_the_hot_loops_own():
    """An HMMA outside the loops beside a hot loop of HMMA: the tensor-core peak; a kernel
    without tensor-core instructions: fp32."""
    before = planted_figures(HMMA_COPIES.replace("100: LDSM", "0: HMMA.1688.F32.TF32 R8, R4, R6, R8\n100: LDSM"))
    assert before["peak"] == "tensor" and before["hot_loop"]["hmma"] == 2
    assert planted_figures(FP32_COPIES)["peak"] == "fp32"


PADDED_LOOP = """
        Function : padded
        /*0000*/                   LDS.128 R4, [R2] ;
        /*0010*/                   HMMA.1688.F32.TF32 R8, R4, R6, R8 ;
        /*0020*/                   NOP ;
        /*0030*/                   @!UPT UIADD3 URZ, URZ, URZ, URZ ;
        /*0040*/                   @!PT LDS RZ, [RZ] ;
        /*0050*/                   @P0 IADD3 R2, R2, 0x10, RZ ;
        /*0060*/                   @!P1 BRA 0x0 ;
"""


def test_padding_is_not_counted_as_issued_work():
    """NOP and an instruction predicated on never-true (ptxas's sm_90 padding) are not issued work;
    an instruction on a real predicate is."""
    (code,) = km.sass.sass_functions(PADDED_LOOP).values()
    assert [i.padding for i in code] == [False, False, True, True, True, False, False]
    found = km.sass.instruction_mix(code)
    assert found["instructions"] == 4 and found["hmma"] == 1 and found["lds"] == 1 and found["other"] == 2


def test_the_fp32_ceiling_is_the_ffma_share_on_sm_90_and_twice_it_on_sm_80():
    assert km.issue_ceiling(mix(100, ffma=40), km.ARCHS["sm_90"]) == 0.4
    assert km.issue_ceiling(mix(100, ffma=40), km.ARCHS["sm_80"]) == 0.8
    assert km.issue_ceiling(mix(100, ffma=60), km.ARCHS["sm_80"]) == 1.0


def test_the_tensor_ceiling_counts_4_cycles_per_hmma_on_sm_90_and_8_on_sm_80():
    two = {"1688.F32.TF32": 1, "16816.F32.BF16": 1}
    assert km.issue_ceiling(mix(16, **two), km.ARCHS["sm_90"]) == 0.5
    assert km.issue_ceiling(mix(16, **two), km.ARCHS["sm_80"]) == 1.0
    assert km.issue_ceiling(mix(2, **two), km.ARCHS["sm_90"]) == 1.0
    with pytest.raises(ValueError, match="no tensor-core rate"):
        km.issue_ceiling(mix(16, **{"884.F32.F16": 1}), km.ARCHS["sm_90"])


# NVIDIA's published dense peaks (H100 datasheet; A100 datasheet) and the clocks nvidia-smi gives
# as clocks.max.sm for them.
PUBLISHED_PEAKS = {"sm_90": (132, 1980, {"bf16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),
                   "sm_80": (108, 1410, {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12})}


@pytest.mark.parametrize("arch", PUBLISHED_PEAKS)
def test_the_bounds_peaks_are_nvidias_published_dense_figures(arch):
    mb = load("model_bounds")
    sms, mhz, published = PUBLISHED_PEAKS[arch]
    facts = {"device": {"multiProcessorCount": sms}, "compute_capability": arch.removeprefix("sm_"),
             "nvidia_smi": f"name, clocks.max.sm [MHz]\nGPU, {mhz} MHz\n"}
    shape = "4096x4096x4096"
    runs = {("bf16 4096^3 forward", "gpubp-cupy-bf16"): "bf16", ("tf32 4096^3 dW", "gpubp-cupy-tf32"): "tf32",
            ("forward 4096^3", "gpubp-cupy"): "fp32"}
    products = {run: mb.products(*run, shape, sms)[0] for run in runs}  # one GEMM each
    # Each kernel at a ceiling of 1: the bound is the flops at the peak, over the grid's share-out.
    kernels = {p.kernel: {"issue_ceiling": 1.0, "peak": "fp32" if runs[run] == "fp32" else "tensor"}
               for run, p in products.items()}
    model = {"kernels_sha256": "", "arch": "sm_90", "kernels": kernels, "other_archs": {"sm_80": kernels}}
    report = {"benchmarks": [{"stats": {"median": 1.0}, "extra_info": {"workload": w, "backend": b, "shape": shape}}
                             for w, b in runs]}
    bounds = mb.model_bounds(report, model, facts, "")
    for (workload, backend), precision in runs.items():
        product = products[workload, backend]
        peak = product.flops / (bounds["benchmarks"][f"{workload} | {backend}"]["bound_ms"] / 1e3
                                * mb.share_out(product.blocks, sms))
        assert peak == pytest.approx(published[precision], rel=2e-3), (arch, precision)
    assert bounds["tensor_clock_mhz"] == {"sm_90": 1830, "sm_80": 1410}[arch]
    assert f"tensor cores at {bounds['tensor_clock_mhz']} MHz" in mb.markdown(bounds)[0]


def test_numba_variants_are_named_by_origin_flags_and_differing_argument_types():
    f32 = ("array", "float32", 2, "C")
    entries = [
        {"origin": ("factory", "_dense_dw_kernel", ("relu", True)), "types": [f32], "threads": 64,
         "params": ["x"], "factory_params": ["act", "store_dz"]},
        {"origin": ("factory", "_dense_dw_kernel", ("relu", False)), "types": [f32], "threads": 64,
         "params": ["x"], "factory_params": ["act", "store_dz"]},
        *({"origin": ("attribute", "_ce_kernel"), "types": [f32, ("array", labels, 1, "C")], "threads": 256,
           "params": ["logits", "labels"], "factory_params": []} for labels in ("int32", "int64")),
    ]
    assert [v["name"] for v in numba_variants._named(entries)] == [
        "numba:ce(labels=int32)", "numba:ce(labels=int64)", "numba:dense_dw[relu,store_dz]", "numba:dense_dw[relu]"]


# ----------------------------------------------------------------------------- planted sources

PLANTED_MMA_HEADER = r"""
#pragma once
// m16n8k8 TF32 mma.sync, as kernels/mma.cuh wraps it: including a header of this name is
// what makes the build compile a file's front end for compute_80. Older code traps.
__device__ __forceinline__ void mma_tf32(float (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
#if __CUDA_ARCH__ >= 800
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    __trap();
#endif
}
"""

PLANTED_TENSOR = r"""
#include "mma.cuh"
// The outer loop holds 3 HMMA, the inner one 2 (two accumulators, so they cannot merge).
extern "C" __global__ void __launch_bounds__(32) planted_mma_loops(float* out, const unsigned* in, int n, int m) {
    const int lane = threadIdx.x;
    unsigned a[4], b[2];
    for (int r = 0; r < 4; ++r) a[r] = in[lane + 32 * r];
    for (int r = 0; r < 2; ++r) b[r] = in[128 + lane + 32 * r];
    float c[4] = {0.f, 0.f, 0.f, 0.f}, d[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll 1
    for (int j = 0; j < m; ++j) {
        mma_tf32(d, a, b);
#pragma unroll 1
        for (int i = 0; i < n; ++i) {
            mma_tf32(c, a, b);
            mma_tf32(d, a, b);
        }
    }
    for (int r = 0; r < 4; ++r) out[lane + 32 * r] = c[r] + d[r];
}

// A trip count known at run time only: nvcc unrolls the loop to 4 HMMA and leaves a loop of 1
// for the remainder, the smaller loop.
extern "C" __global__ void __launch_bounds__(32) planted_unrolled_mma(float* out, const unsigned* in, int n) {
    const int lane = threadIdx.x;
    float c[4] = {0.f, 0.f, 0.f, 0.f};
    for (int i = 0; i < n; ++i) {
        unsigned a[4], b[2];
        for (int r = 0; r < 4; ++r) a[r] = in[192 * i + lane + 32 * r];
        for (int r = 0; r < 2; ++r) b[r] = in[192 * i + 128 + lane + 32 * r];
        mma_tf32(c, a, b);
    }
    for (int r = 0; r < 4; ++r) out[lane + 32 * r] = c[r];
}
"""

# Eight independent FMA chains: 8 FFMA per pass of a loop the compiler may not unroll.
FMA_CHAINS = """
#pragma unroll 1
        for (int i = 0; i < n; ++i) {{
#pragma unroll
            for (int k = 0; k < {chains}; ++k) acc[k] = fmaf(acc[k], x[k], y);
        }}"""

PLANTED_SIMT = r"""
#define LOAD_CHAINS(N)                                                              \
    const int t = threadIdx.x;                                                      \
    float acc[N], x[N];                                                             \
    for (int k = 0; k < N; ++k) { acc[k] = in[t + 64 * k]; x[k] = in[t + 4096 + 64 * k]; } \
    const float y = in[t + 8192];
#define STORE_CHAINS(N)                                                             \
    float sum = 0.f;                                                                \
    for (int k = 0; k < N; ++k) sum += acc[k];                                      \
    out[t] = sum;

extern "C" __global__ void __launch_bounds__(64) planted_ffma_loop(float* out, const float* in, int n) {
    LOAD_CHAINS(8)
    {
""" + FMA_CHAINS.format(chains=8) + r"""
    }
    STORE_CHAINS(8)
}

// An outer loop holding two inner loops (8 and 4 FFMA) and 2 FFMA of its own: the hot loop is
// the innermost one with the most FFMA, not the outer loop that holds more. (The compiler also
// makes a copy of the outer loop without the inner ones, for n < 1: an innermost loop of 2 FFMA.)
extern "C" __global__ void __launch_bounds__(128) planted_nested_loops(float* out, const float* in, int n, int m) {
    LOAD_CHAINS(8)
#pragma unroll 1
    for (int j = 0; j < m; ++j) {
""" + FMA_CHAINS.format(chains=4) + FMA_CHAINS.format(chains=8) + r"""
#pragma unroll
        for (int k = 0; k < 2; ++k) acc[k] = fmaf(acc[k], y, x[k]);
    }
    STORE_CHAINS(8)
}

// A loop feeding 4 FFMA from shared memory (a tiled main loop) and a rolled loop of 8 FFMA on
// registers (an epilogue): the hot loop is the one that reads shared memory.
extern "C" __global__ void __launch_bounds__(64) planted_tile_and_epilogue(float* out, const float* in, int n) {
    LOAD_CHAINS(8)
    __shared__ float tile[256];
    for (int k = 0; k < 4; ++k) tile[t + 64 * k] = in[t + 256 * k];
    __syncthreads();
#pragma unroll 1
    for (int i = 0; i < n; ++i) {
#pragma unroll
        for (int k = 0; k < 4; ++k) acc[k] = fmaf(tile[(i + 64 * k + t) & 255], x[k], acc[k]);
    }
""" + FMA_CHAINS.format(chains=8) + r"""
    STORE_CHAINS(8)
}

// 64 values live through the loop, with at most 32 registers (1024 threads x 2 blocks per SM).
extern "C" __global__ void __launch_bounds__(1024, 2) planted_spill(float* out, const float* in, int n) {
    LOAD_CHAINS(64)
#pragma unroll 1
    for (int i = 0; i < n; ++i) {
#pragma unroll
        for (int k = 0; k < 64; ++k) acc[k] = fmaf(acc[k], acc[(k + 1) % 64], x[k] * y);
    }
    STORE_CHAINS(64)
}

// Dynamic shared memory only: none static, which sm_90 code still reserves 1 KiB of shared memory for.
extern "C" __global__ void __launch_bounds__(256) planted_dynamic_shared(float* out, const float* in) {
    extern __shared__ float staged[];
    staged[threadIdx.x] = in[threadIdx.x];
    __syncthreads();
    out[threadIdx.x] = staged[255 - threadIdx.x];
}

extern "C" __global__ void planted_unbounded(float* out, const float* in, int n) {
    LOAD_CHAINS(8)
    {
""" + FMA_CHAINS.format(chains=8) + r"""
    }
    STORE_CHAINS(8)
}
"""


@pytest.fixture(scope="module")
def planted_dir(tmp_path_factory) -> Path:
    """A folder named kernels holding the planted sources."""
    if NVCC is None:
        pytest.skip(NO_NVCC)
    kernels = tmp_path_factory.mktemp("planted") / "kernels"
    kernels.mkdir()
    (kernels / "mma.cuh").write_text(PLANTED_MMA_HEADER)
    (kernels / "tensor.cu").write_text(PLANTED_TENSOR)
    (kernels / "simt.cu").write_text(PLANTED_SIMT)
    return kernels


@pytest.fixture(scope="module")
def planted(planted_dir) -> dict[str, dict]:
    """The planted kernels' sm_90 figures, compiled as the model compiles kernels/."""
    found = {}
    for unit in ("simt.cu", "tensor.cu"):
        found.update(km.cuda_unit(unit, planted_dir, archs=("sm_90",))["sm_90"])
    return found


def test_the_hot_loop_of_a_simple_loop_has_its_known_ffma_count(planted):
    k = planted["planted_ffma_loop"]
    loop = k["hot_loop"]
    assert loop["ffma"] == 8
    assert 8 < loop["instructions"] <= 8 + 4  # the counter's add, compare and branch
    assert loop["ffma_share"] == round(8 / loop["instructions"], 4) == k["issue_ceiling"]
    assert loop["hmma"] == 0 and loop["instr_per_hmma"] is None and k["peak"] == "fp32"


def test_the_hot_loop_is_the_innermost_loop_with_the_most_ffma(planted):
    assert planted["planted_nested_loops"]["hot_loop"]["ffma"] == 8


def test_the_hot_loop_of_a_tiled_kernel_is_one_that_reads_shared_memory(planted):
    loop = planted["planted_tile_and_epilogue"]["hot_loop"]
    assert (loop["ffma"], loop["lds"]) == (4, 4)


def test_a_tensor_core_kernels_hot_loop_is_the_innermost_loop_with_the_most_hmma(planted):
    k = planted["planted_mma_loops"]
    loop = k["hot_loop"]
    assert loop["hmma"] == 2 and loop["hmma_by_shape"] == {"HMMA.1688.F32.TF32": 2}
    assert loop["instr_per_hmma"] == round(loop["instructions"] / 2, 2)
    assert k["peak"] == "tensor" and k["issue_ceiling"] == round(min(1.0, 2 * 4 / loop["instructions"]), 4)
    unrolled = planted["planted_unrolled_mma"]
    assert unrolled["hot_loop"]["hmma"] == 4 and unrolled["sibling_loops"] == []


def test_a_spilling_kernel_reports_its_spills_and_fails_the_comparison(planted):
    k = planted["planted_spill"]
    assert k["spill_bytes"] > 0 and k["registers"] <= 32
    kinds = [kind for kind, _ in km.regressions(report(planted_spill=k), report(planted_spill=k))]
    assert kinds == ["spill"]


def test_the_launch_shape_is_read_from_launch_bounds(planted):
    assert planted["planted_ffma_loop"]["threads"] == 64
    assert planted["planted_nested_loops"]["threads"] == 128
    assert planted["planted_spill"]["threads"] == 1024
    assert planted["planted_unbounded"]["threads"] is None
    assert planted["planted_unbounded"]["occupancy_warps"] is None


# A module of one kernel, as Numba makes each, with a shared array of external linkage (compiled
# with -rdc, Numba's ".visible .shared"): 40000 bytes, which allow 5 blocks of 256 threads per SM
# (41024 bytes each with the reserved KiB), 40 warps.
PLANTED_SHARED = r"""
__shared__ float staged[10000];
extern "C" __global__ void __launch_bounds__(256) planted_shared(float* out, const float* in) {
    staged[threadIdx.x] = in[threadIdx.x];
    __syncthreads();
    out[threadIdx.x] = staged[255 - threadIdx.x];
}
"""


@pytest.mark.skipif(NVCC is None, reason=NO_NVCC)
def test_a_module_compiled_as_its_launch_links_it_keeps_its_shared_memory(tmp_path):
    """``ptxas -c``, as the Numba kernels are compiled, reports no shared memory: the model takes
    the PTX's declarations, so that occupancy sees the limit."""
    source, ptx = tmp_path / "shared.cu", tmp_path / "shared.ptx"
    source.write_text(PLANTED_SHARED)
    subprocess.run([NVCC, "-ptx", "-rdc=true", "-arch=compute_90", "-o", str(ptx), str(source)], check=True,
                   capture_output=True)
    assert ".visible .shared" in ptx.read_text()
    whole, linked = (km.assemble(ptx, km.ARCHS["sm_90"], relocatable=r)["planted_shared"] for r in (False, True))
    assert whole["smem_bytes"] == linked["smem_bytes"] == 40000
    assert (linked["occupancy_warps"], linked["occupancy_limit"]) == (40, "shared memory")


# ----------------------------------------------------------------------------- figures read from a fatbin


def test_a_fatbin_gives_the_figures_ptxas_gives(planted_dir, tmp_path):
    """The model reads the shipped kernels from the CMake build's fatbins (cuobjdump -sass, -elf,
    -res-usage) instead of compiling them again; the planted files, built both ways as that
    build builds them, have the same figures on both architectures. Spills aside: a fatbin does
    not record them, and the shipped build fails on one (tests/test_kernels_compile.py)."""
    archs = tuple(km.CUDA_ARCHS)
    for unit in ("simt.cu", "tensor.cu"):
        compiled = km.cuda_unit(unit, planted_dir, archs=archs)
        fatbin = tmp_path / unit.replace(".cu", ".fatbin")
        code = ",".join(archs)
        subprocess.run([NVCC, "--fatbin", *km.codegen_flags(), "-gencode",
                        f"arch={km.front_end_arch(unit, planted_dir)},code=[{code}]", "-o", str(fatbin),
                        str(planted_dir / unit)], check=True, capture_output=True)
        read = km.cuda_unit(unit, planted_dir, archs=archs, fatbin=fatbin)
        for arch in archs:
            assert sorted(read[arch]) == sorted(compiled[arch])
            for name, figures in compiled[arch].items():
                if name == "planted_spill":
                    assert figures["spill_bytes"] > 0 and read[arch][name]["spill_bytes"] == 0
                    figures = {**figures, "spill_bytes": 0}
                assert read[arch][name] == figures, (arch, name)
    assert compiled["sm_90"]["planted_mma_loops"]["peak"] == "tensor"


# A loop with FFMA that spills nowhere (the planted SIMT file's spilling kernel would fail a build).
PLANTED_FFMA = r"""
extern "C" __global__ void __launch_bounds__(128) planted_axpy_loop(float* y, const float* x, float a, int n) {
    float acc = y[threadIdx.x];
    for (int i = 0; i < n; ++i) acc = fmaf(a, x[i * 128 + threadIdx.x], acc);
    y[threadIdx.x] = acc;
}
"""


@pytest.mark.skipif(NVCC is None, reason=NO_NVCC)
def test_a_build_of_some_architectures_sass_is_the_full_builds_for_them(tmp_path):
    """CMakeLists.txt's GPUBP_SASS_ARCHS (what the suite builds: sm_90 alone) changes which SASS a
    fatbin holds, not the PTX it is made from: a planted tensor-core file's sm_90 code, and
    another's, is the full build's."""
    root = tmp_path / "tree"
    (root / "kernels").mkdir(parents=True)
    (root / "kernels" / "mma.cuh").write_text(PLANTED_MMA_HEADER)
    (root / "kernels" / "tensor.cu").write_text(PLANTED_TENSOR)
    (root / "kernels" / "simt.cu").write_text(PLANTED_FFMA)
    shutil.copy(ROOT / "CMakeLists.txt", root / "CMakeLists.txt")
    full = km.aot_build.build(root, cache=tmp_path / "cache")
    alone = km.aot_build.build(root, cache=tmp_path / "cache", sass=["90"])
    assert full != alone
    cuobjdump = km.cuda_tool("cuobjdump")
    for unit in ("simt", "tensor"):
        assert km.fatbin_images(alone / f"{unit}.fatbin")[0] == ["sm_90"], unit
        assert km.fatbin_images(full / f"{unit}.fatbin")[0] == ["sm_75", "sm_80", "sm_90"], unit
        code = [subprocess.run([cuobjdump, "-sass", "-arch", "sm_90", str(folder / f"{unit}.fatbin")],
                               capture_output=True, text=True, check=True).stdout for folder in (full, alone)]
        assert "FFMA" in code[0] or "HMMA" in code[0]
        assert code[0] == code[1], unit


def test_cmake_refuses_sass_for_an_architecture_it_does_not_ship(tmp_path):
    if shutil.which("cmake") is None:
        pytest.skip("cmake not found on PATH")
    done = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(tmp_path / "build"), "-DGPUBP_SASS_ARCHS=70;90"],
                          capture_output=True, text=True)
    assert done.returncode != 0 and "GPUBP_SASS_ARCHS: 70 is not one of GPUBP_CUDA_ARCHS" in done.stderr, done.stderr


RES_USAGE = """
Fatbin elf code:
================
arch = sm_90

Resource usage:
 Common:
  GLOBAL:0
 Function tiled:
  REG:40 STACK:8 SHARED:5120 LOCAL:0 CONSTANT[0]:552 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function streaming:
  REG:26 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:552 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_res_usage_reads_registers_stack_and_static_shared_memory_less_the_reserved_window():
    sass = km.sass
    found = sass.res_usage(RES_USAGE, reserved_smem=1024)
    assert found == {"tiled": sass.Resources(registers=40, spill_stores=0, spill_loads=0, stack_frame=8, smem_bytes=4096),
                     "streaming": sass.Resources(registers=26, spill_stores=0, spill_loads=0, stack_frame=0,
                                                 smem_bytes=0)}
    assert sass.res_usage(RES_USAGE)["tiled"].smem_bytes == 5120
    with pytest.raises(ValueError, match="reserved"):
        sass.res_usage(RES_USAGE.replace("SHARED:5120", "SHARED:512"), reserved_smem=1024)
    elf = "   1d   ff80      0  0  1                       NOBITS        3    0        0 .nv.shared.reserved.0\n"
    assert sass.reserved_shared_memory(elf, 1024) == 1024
    assert sass.reserved_shared_memory(elf.replace("reserved", "tile"), 1024) == 0
