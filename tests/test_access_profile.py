"""The harness's memory-access profiler (tests/cuda_on_cpu/access_profile.py): known patterns
give the figures the hardware's rules give them, and bugs planted in a copy of ``kernels/``
(a removed padding, a transposed index) show up in the kernels' figures.

The pattern kernels are in ``tests/cuda_on_cpu/access_patterns.cu``; each access a test looks
at is found by the tag in its line's comment.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from cuda_on_cpu import access_profile, harness
from gpubp.backends import cupy_backend

pytestmark = pytest.mark.skipif(shutil.which(harness.CXX) is None, reason=f"no C++ compiler ({harness.CXX})")

PATTERNS = harness.HERE / "access_patterns.cu"


def tagged_line(source: str, tag: str) -> int:
    (number,) = [i for i, line in enumerate(source.splitlines(), start=1) if line.endswith(f"// tag: {tag}")]
    return number


@pytest.fixture(scope="module")
def patterns():
    cpu_harness = harness.Harness("profile")
    # #line keeps the file's own name and numbering, as the backend's kernel sources do.
    return cpu_harness, cpu_harness.module(f'#line 1 "{PATTERNS.name}"\n{PATTERNS.read_text()}', "access_patterns")


def profile(patterns, kernel: str, args, block=32, grid=1, shared_mem=0) -> dict:
    cpu_harness, module = patterns
    cpu_harness.profiles.clear()
    module.get_function(kernel)((grid,), (block,), args, shared_mem=shared_mem)
    (launch,) = cpu_harness.profiles
    return access_profile.summarize({kernel: (launch, "test")})[kernel]


def line(figures: dict, tag: str, kind: str, access: str) -> dict:
    number = tagged_line(PATTERNS.read_text(), tag)
    (found,) = [entry for entry in figures["lines"] if (entry["file"], entry["line"], entry["kind"], entry["access"])
                == (PATTERNS.name, number, kind, access)]
    return found


def floats(n, start=0.0):
    return harness.to_device(np.arange(start, start + n, dtype=np.float32))


# ----------------------------------------------------------------------------- known patterns


def test_a_coalesced_conflict_free_copy_takes_one_wavefront_and_full_sectors(patterns):
    out = harness.device_empty(64)
    figures = profile(patterns, "coalesced_copy", (floats(64), out), grid=2)
    assert figures["shared_wavefronts_per_request"] == 1.0 == figures["shared_ideal_wavefronts_per_request"]
    assert figures["global_load_efficiency"] == 1.0 == figures["global_store_efficiency"]
    assert figures["global_load_sectors_per_request"] == 4.0 == figures["global_store_sectors_per_request"]
    store, load = line(figures, "copy store", "shared", "store"), line(figures, "copy load", "shared", "load")
    assert (store["requests"], store["wavefronts"], load["requests"], load["wavefronts"]) == (2, 2, 2, 2)
    assert (figures["unique_bytes_read"], figures["unique_bytes_written"]) == (256, 256)
    np.testing.assert_array_equal(out.get(), np.arange(64))  # and it still computes


def test_a_stride_of_two_words_is_a_two_way_bank_conflict(patterns):
    figures = profile(patterns, "stride_two_read", (floats(64), harness.device_empty(32)))
    load = line(figures, "stride-two load", "shared", "load")
    assert (load["requests"], load["wavefronts"], load["per_request"], load["efficiency"]) == (1, 2, 2.0, 0.5)
    # Two conflict-free stores and the conflicted load: 4 wavefronts for 3 requests.
    assert figures["shared_wavefronts_per_request"] == round(4 / 3, 4)
    assert figures["shared_ideal_wavefronts_per_request"] == 1.0


def test_a_warp_reading_one_word_is_a_broadcast(patterns):
    figures = profile(patterns, "broadcast_read", (floats(32), harness.device_empty(32)))
    assert line(figures, "broadcast load", "shared", "load")["per_request"] == 1.0
    assert figures["shared_wavefronts_per_request"] == 1.0


def test_wide_accesses_take_a_phase_per_128_bytes(patterns):
    figures = profile(patterns, "wide_reads", (floats(64 * 4), harness.device_empty(32)))
    pair = line(figures, "float2 load", "shared", "load")
    quad = line(figures, "float4 load", "shared", "load")
    strided = line(figures, "strided float4 load", "shared", "load")
    repeated = line(figures, "repeated float4 load", "shared", "load")
    assert (pair["width"], pair["per_request"], pair["efficiency"]) == (8, 2.0, 1.0)  # two half-warp phases
    assert (quad["width"], quad["per_request"], quad["efficiency"]) == (16, 4.0, 1.0)  # four quarter-warp phases
    assert (strided["per_request"], strided["efficiency"]) == (8.0, 0.5)  # 2-way in every phase
    assert (repeated["per_request"], repeated["efficiency"]) == (4.0, 1.0)  # one phase per quarter, same words


def test_a_strided_global_read_moves_a_sector_per_lane(patterns):
    figures = profile(patterns, "strided_global_read", (floats(32 * 32), harness.device_empty(32)))
    load = line(figures, "strided global load", "global", "load")
    assert (load["per_request"], load["efficiency"]) == (32.0, 0.125)
    assert figures["global_load_efficiency"] == 0.125 and figures["global_store_efficiency"] == 1.0
    assert figures["unique_bytes_read"] == 32 * 4  # the floats read, not the sectors they sit in


def test_dynamic_shared_memory_is_profiled_as_shared(patterns):
    figures = profile(patterns, "dynamic_stride_two_read", (floats(64), harness.device_empty(32)), shared_mem=64 * 4)
    assert line(figures, "dynamic stride-two load", "shared", "load")["per_request"] == 2.0


def test_a_partial_warp_makes_partial_requests_that_are_still_ideal(patterns):
    figures = profile(patterns, "coalesced_copy", (floats(48), harness.device_empty(48)), block=48)
    load = line(figures, "copy load", "shared", "load")
    assert (load["requests"], load["partial_requests"], load["per_request"]) == (2, 1, 1.0)
    assert figures["global_load_efficiency"] == 1.0  # 16 lanes: two full sectors


def test_unique_bytes_count_each_byte_once_however_often_it_is_read(patterns):
    n, threads = 40, 64
    figures = profile(patterns, "sum_all", (floats(n), harness.device_empty(threads), np.int32(n)), block=threads)
    assert (figures["unique_bytes_read"], figures["unique_bytes_written"]) == (4 * n, 4 * threads)
    assert figures["global_load_sectors_per_request"] == 1.0  # a warp-uniform address: one sector


# ----------------------------------------------------------------------------- planted bugs
#
# One dense forward on 128x64 tiles, in a copy of kernels/ with one line changed. Both changes
# keep the results right: only the memory traffic tells them apart.

def forward_128x64(cb, rng):
    x, w, b = (cb.asarray(rng.standard_normal(s).astype(np.float32)) for s in ((72, 40), (40, 72), (72,)))
    cb.dense_forward(x, w, b, "identity")


FORWARD = ("one dense forward on 128x64 tiles", access_profile.H100_SMS, forward_128x64)
FORWARD_KERNEL = "dense_fwd_128x64"


def plant(tmp_path: Path, correct: str, planted: str) -> Path:
    kernels = tmp_path / "kernels"
    shutil.copytree(cupy_backend.kernel_dir(), kernels)
    source = (kernels / "gemm_tile.cuh").read_text()
    assert source.count(correct) == 1, "the code to plant the bug in has changed; update the test"
    (kernels / "gemm_tile.cuh").write_text(source.replace(correct, planted))
    return kernels


def gemm_tile_lines(figures: dict, kind: str, access: str) -> dict[int, dict]:
    return {entry["line"]: entry for entry in figures["lines"]
            if (entry["file"], entry["kind"], entry["access"]) == ("gemm_tile.cuh", kind, access)}


@pytest.fixture(scope="module")
def shipped_forward() -> dict:
    return access_profile.profile_workloads([FORWARD])[FORWARD_KERNEL]


def test_a_removed_padding_shows_as_a_two_way_conflict_on_the_transposing_stores(shipped_forward, tmp_path):
    kernels = plant(tmp_path, "constexpr int SMEM_PAD = 4;", "constexpr int SMEM_PAD = 0;")
    planted = access_profile.profile_workloads([FORWARD], kernels)[FORWARD_KERNEL]
    source = (kernels / "gemm_tile.cuh").read_text()
    # The k-contiguous operand (x) is stored to shared memory transposed, one float per k row.
    transposing = {number for number, text in enumerate(source.splitlines(), start=1)
                   if re.search(r"t\[\d \* LD\] = reg\[i\]\[h\]\.[xyzw];", text)}
    assert len(transposing) == 4
    shipped_stores, planted_stores = (gemm_tile_lines(f, "shared", "store") for f in (shipped_forward, planted))
    for number in transposing:
        assert shipped_stores[number]["per_request"] == 1.0
        assert (planted_stores[number]["per_request"], planted_stores[number]["efficiency"]) == (2.0, 0.5)
    assert planted["shared_wavefronts_per_request"] > shipped_forward["shared_wavefronts_per_request"]
    assert planted["shared_ideal_wavefronts_per_request"] == shipped_forward["shared_ideal_wavefronts_per_request"]


def test_a_transposed_staging_index_shows_as_uncoalesced_loads(shipped_forward, tmp_path):
    # Consecutive threads walk down a column of x (one row each) instead of along its rows.
    kernels = plant(tmp_path, "        k_lane = VEC ? 4 * (tid % LANES_K) : tid % LANES_K;\n        r_lane = tid / LANES_K;\n",
                    "        k_lane = VEC ? 4 * (tid / GROUP) : tid / GROUP;\n        r_lane = tid % GROUP;\n")
    planted = access_profile.profile_workloads([FORWARD], kernels)[FORWARD_KERNEL]
    shipped_loads, planted_loads = (gemm_tile_lines(f, "global", "load") for f in (shipped_forward, planted))
    assert all(entry["efficiency"] == 1.0 for entry in shipped_loads.values())
    worst = min(planted_loads.values(), key=lambda entry: entry["efficiency"])
    # 16 of each 32-byte sector used, in more sectors per request; a little more in the edge tile,
    # whose rows past the batch all read the last row (the loader clamps them), sharing its sectors.
    assert 0.5 <= worst["efficiency"] < 0.65
    assert worst["per_request"] > shipped_loads[worst["line"]]["per_request"]
    assert planted["global_load_efficiency"] < 0.8 < shipped_forward["global_load_efficiency"]


def forward_tf32(cb, rng):
    x, w, b = (cb.asarray(rng.standard_normal(s).astype(np.float32)) for s in ((136, 40), (40, 136), (136,)))
    cb.dense_forward(x, w, b, "identity", precision="tf32")


def test_a_wrong_swizzle_shows_as_a_bank_conflict_on_the_tensor_core_fragment_loads(tmp_path):
    """x's k-contiguous tile is read by ldmatrix, eight rows of one 16-byte column per matrix; the
    swizzle puts those rows in eight different bank groups. Swizzling by o % 2 still stores each
    element in a place of its own (the results stay right) but leaves them in two: 4-way conflicts."""
    workload = [("one dense forward on TF32 tensor cores", access_profile.H100_SMS, forward_tf32)]
    kernel = "dense_fwd_tf32_identity"
    kernels = tmp_path / "kernels"
    shutil.copytree(cupy_backend.kernel_dir(), kernels)
    source = (kernels / "gemm_tf32.cuh").read_text()
    correct = "(((k / T::CHUNK) ^ (o % 8)) * T::CHUNK)"
    assert source.count(correct) == 1, "the code to plant the bug in has changed; update the test"
    (kernels / "gemm_tf32.cuh").write_text(source.replace(correct, correct.replace("o % 8", "o % 2")))
    shipped = access_profile.profile_workloads(workload)[kernel]
    planted = access_profile.profile_workloads(workload, kernels)[kernel]

    def fragment_loads(figures):  # ldmatrix's reads, at its line in mma.cuh
        (entry,) = [e for e in figures["lines"] if (e["file"], e["kind"], e["access"], e["width"]) ==
                    ("mma.cuh", "shared", "load", 16)]
        return entry

    assert fragment_loads(shipped)["per_request"] == 4.0  # one wavefront per 8x8 matrix
    assert fragment_loads(planted)["per_request"] == 16.0
    assert shipped["shared_wavefronts_per_request"] <= 1.05 * shipped["shared_ideal_wavefronts_per_request"]
    assert planted["shared_wavefronts_per_request"] > shipped["shared_wavefronts_per_request"]


# ----------------------------------------------------------------------------- fused MLP work
#
# Issue 28: the fused MLP does no work on columns past a layer's width or rows past the batch
# beyond the padding of one mma tile, 16 rows x 8 columns. A fused forward's shared-memory reads
# are its product's operand reads (fp32: its stages and epilogue only store; tensor cores: the A
# fragments, the B stage and the products read back in the row pass), so for a one-layer model
# of one 64-row block and one 16-deep slice their count follows the product's work: it must
# depend on the width and the batch only through the mma tiles they cover, ceil(width / 8) and
# ceil(batch / 16), and grow with them. A kernel that pads further (fp32 before issue 28: 32
# columns a warp, 64 rows a block) reads as much for width 8 as for 24, for batch 16 as for 64.
# (Tensor cores pair two 8-column tiles per 16-byte B load: their reads grow every 16 columns.)

FUSED_WORK_IN = 16


def fused_forward_reads(precision: str, batch: int, width: int) -> int:
    def run(cb, rng):
        x, w, b = (cb.asarray(rng.standard_normal(s).astype(np.float32))
                   for s in ((batch, FUSED_WORK_IN), (FUSED_WORK_IN, width), (width,)))
        cb.fused_mlp_forward(x, [w], [b], ["identity"], [False], [False], precision)

    workload = (f"a fused {precision} layer, batch {batch}, width {width}", access_profile.H100_SMS, run)
    kernel = f"fused_mlp_fwd{cupy_backend.FUSED_PRECISIONS[precision]}"
    figures = access_profile.profile_workloads([workload])[kernel]
    return sum(entry["requests"] for entry in figures["lines"]
               if (entry["kind"], entry["access"]) == ("shared", "load"))


@pytest.mark.parametrize("precision", cupy_backend.FUSED_PRECISIONS)
def test_the_fused_forward_works_on_whole_mma_tiles_of_the_width_only(precision):
    reads = {width: fused_forward_reads(precision, 64, width) for width in (1, 8, 9, 16, 24, 40, 128)}
    assert reads[1] == reads[8] and reads[9] == reads[16], reads  # the same 8-column tiles
    assert reads[8] < reads[24] < reads[40] < reads[128], reads


@pytest.mark.parametrize("precision", cupy_backend.FUSED_PRECISIONS)
def test_the_fused_forward_works_on_whole_mma_tiles_of_the_batch_only(precision):
    reads = {batch: fused_forward_reads(precision, batch, 24) for batch in (1, 16, 17, 32, 40, 48, 64)}
    assert reads[1] == reads[16] and reads[17] == reads[32] and reads[40] == reads[48], reads  # the same 16-row tiles
    assert reads[16] < reads[32] < reads[48] < reads[64], reads


# ----------------------------------------------------------------------------- the API


LOSSES_AND_OPTIMIZERS = {name: access_profile.WORKLOADS[name] for name in ("losses", "optimizers")}
FIELDS = {"shared_wavefronts_per_request", "shared_ideal_wavefronts_per_request", "global_load_efficiency",
          "global_store_efficiency", "global_load_sectors_per_request", "global_store_sectors_per_request",
          "unique_bytes_read", "unique_bytes_written", "launch", "lines"}
LINE_FIELDS = {"file", "line", "kind", "access", "width", "requests", "per_request", "efficiency",
               "partial_requests", "called_from"}


def kernel_dir_with(tmp_path: Path, files: list[str]) -> Path:
    """A kernel directory holding ``files`` (.cu) and every shipped header."""
    kernels = tmp_path / "kernels"
    kernels.mkdir()
    for path in cupy_backend.kernel_dir().iterdir():
        if path.suffix == ".cuh" or path.name in files:
            shutil.copy(path, kernels)
    return kernels


def test_profile_kernels_reports_every_kernel_it_finds_with_every_figure(tmp_path, monkeypatch):
    monkeypatch.setattr(access_profile, "WORKLOADS", LOSSES_AND_OPTIMIZERS)
    kernels = kernel_dir_with(tmp_path, ["loss.cu", "optim.cu"])
    figures = access_profile.profile_kernels(kernels)
    # The kernels the two files define (some through macros), as the backend lists them;
    # tests/test_cupy_paths_on_cpu.py holds those lists to the compiled sources.
    defined = set(cupy_backend.KERNELS["loss.cu"]) | set(cupy_backend.KERNELS["optim.cu"])
    assert set(figures) == defined
    for name, kernel in figures.items():
        assert set(kernel) == FIELDS, name
        assert kernel["global_load_efficiency"] is not None and 0 < kernel["global_load_efficiency"] <= 1, name
        assert kernel["unique_bytes_read"] > 0 and kernel["unique_bytes_written"] > 0, name
        assert kernel["launch"]["block"] == [cupy_backend.REDUCE_THREADS, 1, 1], name
        for entry in kernel["lines"]:
            unit = "wavefronts" if entry["kind"] == "shared" else "sectors"
            assert set(entry) == LINE_FIELDS | {unit}, name
            assert entry["file"] in ("loss.cu", "optim.cu", "reduce.cuh") and entry["line"] > 0, entry
            assert entry[unit] >= entry["requests"] > 0 and 0 < entry["efficiency"] <= 1, entry
    reductions = [k for k in figures.values() if k["shared_wavefronts_per_request"] is not None]
    assert reductions and all(k["shared_wavefronts_per_request"] == 1.0 for k in reductions)  # warp sums


def test_a_kernel_no_workload_launches_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(access_profile, "WORKLOADS", LOSSES_AND_OPTIMIZERS)
    kernels = kernel_dir_with(tmp_path, ["loss.cu", "optim.cu"])
    (kernels / "extra.cu").write_text('extern "C" __global__ void never_launched(float* p) { p[0] = 0.0f; }\n')
    with pytest.raises(RuntimeError, match=r"no workload .* launches never_launched \(extra\.cu\): add"):
        access_profile.profile_kernels(kernels)
