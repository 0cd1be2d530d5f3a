"""The CPU kernel harness itself (tests/cuda_on_cpu): each CUDA construct it emulates gives what
the CUDA programming guide and the PTX ISA say, and misuse that a GPU would punish (or that
compute-sanitizer would report) fails the launch here too, naming the source line.

The kernels are in ``tests/cuda_on_cpu/selftest.cu``. The sanitizer cases run a few lines of
Python in a child process under the sanitizer and expect its report.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from cuda_on_cpu import harness
from gpubp.backends import cupy_backend

pytestmark = pytest.mark.skipif(shutil.which(harness.CXX) is None, reason=f"no C++ compiler ({harness.CXX})")

SELFTEST = harness.HERE / "selftest.cu"


def selftest_source() -> str:
    mma = (cupy_backend.kernel_dir() / "mma.cuh").read_text()
    return SELFTEST.read_text().replace('#include "mma.cuh"', mma)


# The runtime switches fibers with its own x86-64 stack switch, or elsewhere with ucontext; the
# kernels run on both here, so that the one this machine does not use is not left untested.
FIBER_SWITCHES = {"stack switch": (), "ucontext": ("GPUBP_CPU_UCONTEXT_FIBERS",)}


@pytest.fixture(scope="module", params=list(FIBER_SWITCHES))
def kernels(request):
    return harness.Harness("plain", defines=FIBER_SWITCHES[request.param]).module(selftest_source(), "selftest")


def ints(n):
    return harness.device_empty((n,), np.int32)


# ----------------------------------------------------------------------------- what runs


def test_warp_shuffles_votes_and_masks(kernels):
    out = ints(64 * 8)
    kernels.get_function("warp_ops")((1,), (64,), (out,))
    got = out.get().reshape(64, 8)
    lane = np.arange(64) % 32
    assert (got[:, 0] == sum(range(32))).all()
    assert (got[:, 1] == np.where(lane + 3 < 32, lane + 3, lane)).all()
    assert (got[:, 2] == np.where(lane % 16 >= 5, lane - 5, lane)).all()
    assert (got[:, 3] == (lane // 8) * 8 + 7).all()
    assert (got[:, 4].view(np.uint32) == 0xAAAAAAAA).all()
    assert (got[:, 5] == 1).all() and (got[:, 6] == 0).all()
    assert (got[:, 7] == lane ^ 4).all()


def test_a_xor_shuffle_narrower_than_the_warp_reads_an_earlier_segment(kernels):
    """PTX shfl.sync.bfly reads lane ^ b unless it is past the caller's segment: with width 8 and
    b 16, lanes 16..31 read lanes 0..15 (an earlier segment), lanes 0..15 keep their own value."""
    out = ints(32)
    kernels.get_function("xor_across_groups")((1,), (32,), (out,))
    lane = np.arange(32)
    assert np.array_equal(out.get(), np.where(lane >= 16, lane ^ 16, lane))


def test_a_partial_mask_exchanges_among_its_lanes_only(kernels):
    out = harness.to_device(np.full(32, -1.0, np.float32))
    kernels.get_function("half_warp_shuffle")((1,), (32,), (out,))
    lane = np.arange(16)
    assert np.array_equal(out.get()[:16], lane ^ 1)
    assert (out.get()[16:] == -1).all()


def test_atomics_count_every_thread_once(kernels):
    count, largest, claimed = ints(1), ints(1), harness.device_empty((1,), np.uint32)
    total = harness.device_empty((1,), np.float32)
    count[:], total[:], largest[:], claimed[:] = 0, 0, -1, 0
    kernels.get_function("atomics")((3,), (96,), (count.view(np.uint32), total, largest, claimed))
    assert count[0] == 288 and total[0] == 144.0 and largest[0] == 287
    assert 1 <= claimed[0] <= 288


def test_dynamic_shared_memory_is_sized_by_the_launch(kernels):
    values = np.arange(300, dtype=np.float32)
    out = harness.device_empty((300,))
    kernels.get_function("reverse_through_shared")(
        (1,), (64,), (harness.to_device(values), out, np.int32(300)), shared_mem=300 * 4)
    assert np.array_equal(out.get(), values[::-1])


def test_a_store_past_the_dynamic_shared_request_fails_the_launch(kernels):
    values = np.arange(300, dtype=np.float32)
    out = harness.device_empty((300,))
    args = (harness.to_device(values), out, np.int32(300))
    with pytest.raises(harness.KernelError, match=r"reverse_through_shared: wrote dynamic shared memory at byte "
                                                  r"1024, past the launch's request of 1024 bytes"):
        kernels.get_function("reverse_through_shared")((1,), (64,), args, shared_mem=256 * 4)


def test_dynamic_shared_memory_past_48_kib_needs_the_kernels_opt_in(kernels):
    values = np.arange(16384, dtype=np.float32)
    out = harness.device_empty((16384,))
    kernel = kernels.get_function("reverse_through_shared")
    args = (harness.to_device(values), out, np.int32(16384))
    with pytest.raises(harness.KernelError, match="max_dynamic_shared_size_bytes"):
        kernel((1,), (64,), args, shared_mem=16384 * 4)
    kernel.max_dynamic_shared_size_bytes = 16384 * 4
    kernel((1,), (64,), args, shared_mem=16384 * 4)
    assert np.array_equal(out.get(), values[::-1])


@pytest.mark.parametrize("order_seed", [0, 7])
def test_static_shared_memory_starts_every_block_undefined(kernels, order_seed):
    """Not zero, and not what the previous block left: 0xff bytes (NaN, -1), in every block."""
    sums = harness.device_empty((3,))
    kernels.get_function("sum_without_zeroing")((3,), (32,), (sums,), order_seed=order_seed)
    assert np.isnan(sums.get()).all()
    slots = ints(4)
    kernels.get_function("read_before_write")((4,), (32,), (slots,), order_seed=order_seed)
    assert (slots.get() == -1).all()
    # A second launch of the same kernel sees none of the first's values either.
    kernels.get_function("read_before_write")((1,), (32,), (slots,))
    assert slots.get()[0] == -1


# A __shared__ array inside an inline function, as reduce.cuh's and split_k.cuh's are, in two
# kernel files: each file's library must get its own, refilled at each of its block starts.
SHARED_IN_AN_INLINE_FUNCTION = """
__device__ __forceinline__ int* block_scratch() { __shared__ int scratch[4]; return scratch; }
extern "C" __global__ void %s(int* out, int write) {
    int* s = block_scratch();
    if (write) { if (threadIdx.x == 0) s[0] = 777; return; }
    if (threadIdx.x == 0) out[0] = s[0];  // read before any write in this block
}
"""


def test_shared_memory_in_an_inline_function_starts_undefined_in_every_library():
    """With gcc's default GNU_UNIQUE symbols the two libraries shared the first one's array, which
    the second's block starts never refilled: a read before a write got the last launch's 777."""
    plain = harness.Harness("plain")
    slot = ints(1)
    for name in ("scratch_in_the_first_file", "scratch_in_the_second_file"):
        kernel = plain.module(SHARED_IN_AN_INLINE_FUNCTION % name, name).get_function(name)
        kernel((1,), (32,), (slot, np.int32(1)))
        slot[:] = 0
        kernel((1,), (32,), (slot, np.int32(0)))
        assert slot.get()[0] == -1, name


@pytest.mark.parametrize("kernel, bound", [("at_most_64", 64), ("at_most_128", 128), ("block_ids", 1024)])
def test_a_block_past_the_kernels_launch_bounds_fails_the_launch(kernels, kernel, bound):
    function = kernels.get_function(kernel)
    assert function.max_threads_per_block == bound
    out = ints(2 * bound)
    function((2,), (bound,), (out,))
    if bound < 1024:
        with pytest.raises(harness.KernelError, match=rf"{kernel}: a block of {bound + 32} threads exceeds the "
                                                      rf"{bound} of its __launch_bounds__"):
            function((1,), (bound + 32,), (ints(bound + 32),))


@pytest.mark.parametrize("grid, block", [((3,), (5,)), ((2, 3), (4, 2)), ((2, 1, 2), (2, 2, 3))])
def test_every_block_and_thread_runs_once_with_its_own_ids(kernels, grid, block):
    blocks, threads = int(np.prod(grid)), int(np.prod(block))
    out = ints(blocks * threads)
    kernels.get_function("block_ids")(grid, block, (out,), order_seed=99)  # blocks in shuffled order
    expected = (np.arange(blocks)[:, None] * 10000 + np.arange(threads)[None, :]).ravel()
    assert np.array_equal(out.get(), expected)


def bf16_rne(x: np.ndarray) -> np.ndarray:
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def tf32_rna(x: np.ndarray) -> np.ndarray:
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x1000) & 0xFFFFE000).astype(np.uint32)


def test_half_bfloat16_and_tf32_conversions_round_as_the_hardware(kernels, rng):
    x = np.concatenate([rng.standard_normal(500) * 10, [1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-8 + 2**-9, 65519.0,
                                                          1e-7, -0.0, 1 + 2**-11 + 2**-13]]).astype(np.float32)
    n = x.size
    half, bf16, tf32 = (harness.device_empty((n,), dt) for dt in (np.uint16, np.uint16, np.uint32))
    kernels.get_function("convert")((1,), (128,), (harness.to_device(x), half, bf16, tf32, np.int32(n)))
    assert np.array_equal(half.get(), x.astype(np.float16).view(np.uint16))
    assert np.array_equal(bf16.get(), bf16_rne(x))
    assert np.array_equal(tf32.get(), tf32_rna(x))
    # Ties go away from zero in cvt.rna: 1 + 2^-11 is halfway between two TF32 values.
    assert tf32.get()[500].view(np.float32) == np.float32(1 + 2**-10)


@pytest.mark.parametrize("kind", ["tf32", "bf16", "f16"])
def test_mma_sync_multiplies_by_the_ptx_fragment_layouts(kernels, rng, kind):
    k = 8 if kind == "tf32" else 16
    a = rng.standard_normal((16, k)).astype(np.float32)
    b = rng.standard_normal((k, 8)).astype(np.float32)
    c = rng.standard_normal((16, 8)).astype(np.float32)
    if kind == "tf32":
        a_bits, b_bits = harness.device_empty((1,), np.uint16), harness.device_empty((1,), np.uint16)
        a_used, b_used = (tf32_rna(m).view(np.float32) for m in (a, b))
        code = 0
    elif kind == "bf16":
        a_bits, b_bits = harness.to_device(bf16_rne(a)), harness.to_device(bf16_rne(b))
        a_used, b_used = ((bf16_rne(m).astype(np.uint32) << 16).view(np.float32) for m in (a, b))
        code = 1
    else:
        a_bits, b_bits = harness.to_device(a.astype(np.float16).view(np.uint16)), harness.to_device(
            b.astype(np.float16).view(np.uint16))
        a_used, b_used = a.astype(np.float16).astype(np.float32), b.astype(np.float16).astype(np.float32)
        code = 2
    d = harness.device_empty((16, 8))
    kernels.get_function("one_mma")(
        (1,), (32,), (harness.to_device(a), harness.to_device(b), a_bits, b_bits, harness.to_device(c), d,
                      np.int32(code)))
    want = a_used.astype(np.float64) @ b_used.astype(np.float64) + c
    np.testing.assert_allclose(d.get(), want, rtol=1e-5, atol=1e-5)


def test_an_async_copy_lands_at_the_wait_of_its_group_not_at_the_issue(kernels):
    values = np.arange(1, 13, dtype=np.float32)
    out = harness.device_empty((36,))
    kernels.get_function("async_copy_groups")((1,), (1,), (harness.to_device(values), out))
    issued, first_wait, second_wait = out.get().reshape(3, 12)
    assert (issued == -1).all()
    assert np.array_equal(first_wait[:8], [1, -1, -1, -1, 5, 6, -1, -1])
    assert (first_wait[8:] == -1).all()
    assert np.array_equal(second_wait, [1, -1, -1, -1, 5, 6, -1, -1, 9, 10, 11, 12])


# mma.cuh's 4-byte zero-filling copy (cp.async.ca ... 4, ignore-src), as the TF32 GEMMs stage
# operands whose rows are not 16-byte aligned: a copy from a source 4 bytes past a 16-byte
# boundary, and two zero fills whose sources are not read (one is null).
FOUR_BYTE_ZERO_FILLS = """
extern "C" __global__ void four_byte_zero_fills(const float* in, float* out) {
    __shared__ __align__(16) float buffer[4];
    for (int i = 0; i < 4; ++i) buffer[i] = -1.0f;
    gpubp::cp_async_ca4_zfill(buffer, in + 1, false);
    gpubp::cp_async_ca4_zfill(buffer + 1, nullptr, true);
    gpubp::cp_async_ca4_zfill(buffer + 2, in + 3, true);
    gpubp::cp_async_wait_all();
    for (int i = 0; i < 4; ++i) out[i] = gpubp::shared_load(buffer + i);
}
"""


def test_a_four_byte_async_copy_zero_fills_without_reading_its_source():
    mma = (cupy_backend.kernel_dir() / "mma.cuh").read_text()
    module = harness.Harness("plain").module(mma + FOUR_BYTE_ZERO_FILLS, "four_byte_zero_fills")
    out = harness.device_empty((4,))
    module.get_function("four_byte_zero_fills")((1,), (1,), (harness.to_device(np.arange(1, 5, dtype=np.float32)), out))
    assert np.array_equal(out.get(), [2, 0, 0, -1])


def ldmatrix_expected(tile: np.ndarray, count: int, trans: bool) -> np.ndarray:
    """What each lane receives, from the PTX ISA's description of ldmatrix."""
    rows = tile[(np.arange(32) * 5) % 32]  # the row lane l names
    out = np.zeros((32, count), np.uint32)
    for lane in range(32):
        for i in range(count):
            matrix = rows[8 * i: 8 * i + 8]  # (8, 8) 16-bit elements
            if trans:
                r, c = 2 * (lane % 4), lane // 4
                lo, hi = matrix[r, c], matrix[r + 1, c]
            else:
                r, c = lane // 4, 2 * (lane % 4)
                lo, hi = matrix[r, c], matrix[r, c + 1]
            out[lane, i] = int(lo) | int(hi) << 16
    return out


@pytest.mark.parametrize("dynamic", [False, True], ids=["static shared", "dynamic shared"])
@pytest.mark.parametrize("trans", [False, True], ids=["plain", "trans"])
@pytest.mark.parametrize("count", [1, 2, 4])
def test_ldmatrix_gives_each_lane_the_ptx_fragment(kernels, rng, count, trans, dynamic):
    """From a __shared__ array, and from the dynamic shared memory, whose request (512 bytes) the
    tile fills to its last byte: both are the block's shared memory, which cp.async and ldmatrix need."""
    tile = rng.integers(0, 2**16, size=(32, 8), dtype=np.uint16)
    out = harness.device_empty((32 * count,), np.uint32)
    kernels.get_function("ldmatrix_rows")(
        (1,), (32,), (harness.to_device(tile.ravel()), out, np.int32(count), np.int32(trans), np.int32(dynamic)),
        shared_mem=tile.nbytes if dynamic else 0)
    assert np.array_equal(out.get().reshape(32, count), ldmatrix_expected(tile, count, trans))


# ----------------------------------------------------------------------------- what fails


@pytest.mark.parametrize("kernel, block, message", [
    ("barrier_in_divergent_code", 32, "wait at different barriers"),
    ("return_before_barrier", 32, "wait at different barriers"),
    ("shuffle_from_outside_the_mask", 32, "not in the mask"),
    ("masks_disagree", 32, "disagree on a warp collective"),
    ("shuffles_at_different_lines", 32, "disagree on a warp collective"),
    ("half_warp_shuffle", 8, "lanes that do not exist"),
    ("read_before_wait", 32, "still has in flight"),
    ("ldmatrix_before_wait", 32, "still has in flight"),
    ("return_without_wait", 32, "never waited for"),
    ("misaligned_async_copy", 32, "aligned to the copy size"),
])
def test_misuse_fails_the_launch_naming_the_line(kernels, kernel, block, message):
    out = harness.device_empty((4 * 33,))
    with pytest.raises(harness.KernelError, match=message) as failure:
        kernels.get_function(kernel)((1,), (block,), (out,))
    assert "selftest" in str(failure.value) or kernel in str(failure.value)


# The PTX ISA: ldmatrix reads the .shared state space only (undefined behaviour elsewhere), and
# cp.async copies from .global into .shared. The file:line is the kernel's call of the wrapper in
# mma.cuh (which takes its caller's location), in the selftest unit.
NOT_SHARED = r" is not in the block's shared memory \("
WHERE = r".*\(\S*/selftest\.cpp:\d+, block \(0,0,0\), thread \d+\)$"


@pytest.mark.parametrize("kernel, shared_mem, message", [
    ("ldmatrix_from_global", 0,
     r"ldmatrix_from_global: ldmatrix\.x4: the row address" + NOT_SHARED +
     r"its dynamic shared memory or a __shared__ variable\): ldmatrix reads the \.shared state space only"),
    ("ldmatrix_past_the_dynamic_request", 256,
     r"ldmatrix\.x4: the row address" + NOT_SHARED + r"it lies past the launch's dynamic shared memory request of "
     r"256 bytes\)"),
    ("async_copy_into_global", 0,
     r"async_copy_into_global: cp\.async: the destination" + NOT_SHARED +
     r"its dynamic shared memory or a __shared__ variable\): cp\.async copies from global memory into shared memory"),
    ("async_copy_from_shared", 0,
     r"async_copy_from_shared: cp\.async: the source is in shared memory, not global memory"),
    ("zero_filled_copy_from_dynamic_shared", 0, r"cp\.async: the source is in shared memory, not global memory"),
])
def test_an_operand_in_the_wrong_state_space_fails_the_launch(kernels, kernel, shared_mem, message):
    out = harness.device_empty((4 * 33,))
    with pytest.raises(harness.KernelError, match=message + WHERE):
        kernels.get_function(kernel)((1,), (32,), (out,), shared_mem=shared_mem)


def selftest_line(kernel: str, marker: str) -> int:
    """The line number, in the harness's selftest.cpp, of the line of `kernel` that ends with
    `marker`: the unit is selftest_source() after one line, its #include of cuda_on_cpu.h."""
    lines = selftest_source().splitlines()
    start = next(i for i, text in enumerate(lines) if f" {kernel}(" in text)
    return next(i for i in range(start, len(lines)) if lines[i].endswith(marker)) + 2


# PTX ISA: ldmatrix.sync.aligned and mma.sync.aligned need every lane of the warp to execute the
# same instruction (undefined behaviour otherwise). Even and odd lanes that reach one from the two
# branches of an if/else fail the launch, naming both lines of the kernel: the wrappers in mma.cuh
# pass their caller's line to the harness, not their own (one line for every call site).
@pytest.mark.parametrize("kernel, op", [
    ("ldmatrix_at_different_lines", "ldmatrix.x4"),
    ("mma_at_different_lines", "mma.sync.m16n8k8.tf32"),
])
def test_lanes_at_different_lines_of_an_aligned_collective_fail_the_launch(kernels, kernel, op):
    with pytest.raises(harness.KernelError, match="disagree on a warp collective") as failure:
        kernels.get_function(kernel)((1,), (32,), (harness.device_empty((32,)),))
    sites = re.findall(r"at (\S+) at \S*/(selftest\.cpp:\d+)", str(failure.value))
    assert sorted(sites) == sorted((op, f"selftest.cpp:{selftest_line(kernel, f'// selftest: {lanes} lanes')}")
                                   for lanes in ("even", "odd")), str(failure.value)


def test_syncwarp_may_be_reached_from_different_lines(kernels):
    out = harness.device_empty((32,))
    kernels.get_function("syncwarp_at_different_lines")((1,), (32,), (out,))
    assert (out.get() == 2.0).all()


def test_a_deadlock_is_reported_not_hung(kernels):
    with pytest.raises(harness.KernelError, match="deadlock"):
        kernels.get_function("warp_waits_for_a_lane_at_the_barrier")((1,), (32,), (harness.device_empty((32,)),))


@pytest.mark.parametrize("grid, block, message", [
    ((1, 65536), (32,), "gridDim.y"),
    ((1,), (1025,), "at most 1024 threads"),
])
def test_launch_limits_are_the_gpus(kernels, grid, block, message):
    with pytest.raises(harness.KernelError, match=message):
        kernels.get_function("block_ids")(grid, block, (ints(1),))


def test_arguments_are_checked_against_the_kernel_signature(kernels):
    kernel = kernels.get_function("store_one_past_the_end")
    with pytest.raises(TypeError, match="takes 2 arguments"):
        kernel((1,), (4,), (harness.device_empty((4,)),))
    with pytest.raises(TypeError, match=r"argument 1 \(i\): expected a numpy.int32"):
        kernel((1,), (4,), (harness.device_empty((4,)), 3))
    with pytest.raises(TypeError, match="dtype float64 does not match"):
        kernel((1,), (4,), (harness.device_empty((4,), np.float64), np.int32(3)))
    with pytest.raises(TypeError, match="expected a device array"):
        kernel((1,), (4,), (np.zeros(4, np.float32), np.int32(3)))


# ----------------------------------------------------------------------------- the sanitizers


def run_under(mode: str, kernel: str, args: str, block: int, grid: int = 1, repeat: int = 1) -> subprocess.CompletedProcess:
    script = textwrap.dedent(f"""
        import sys, numpy as np
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from cuda_on_cpu import harness
        import test_cuda_on_cpu as t
        module = harness.Harness().module(t.selftest_source(), "selftest")
        args = {args}
        for _ in range({repeat}):
            module.get_function({kernel!r})(({grid},), ({block},), args)
        print("finished")
    """)
    return subprocess.run([sys.executable, "-c", script], env=harness.sanitizer_env(mode), capture_output=True,
                          text=True, timeout=300)


def test_thread_sanitizer_reports_a_shared_memory_race():
    done = run_under("tsan", "racy_neighbour_read", "(harness.device_empty((64,)),)", 64)
    assert done.returncode != 0 and "data race" in done.stderr, done.stderr[-3000:]
    assert "selftest.cu" in done.stderr or "racy_neighbour_read" in done.stderr


def test_thread_sanitizer_reports_a_race_a_shuffle_does_not_order_and_none_after_syncwarp():
    """Of the warp collectives only __syncwarp orders memory among the lanes, as on a GPU."""
    racy = run_under("tsan", "neighbour_read_after_a_shuffle", "(harness.device_empty((32,)),)", 32)
    assert racy.returncode != 0 and "data race" in racy.stderr, racy.stderr[-3000:]
    ordered = run_under("tsan", "neighbour_read_after_syncwarp", "(harness.device_empty((32,)),)", 32)
    assert ordered.returncode == 0 and "finished" in ordered.stdout, ordered.stderr[-3000:]


def test_address_sanitizer_reports_a_store_one_past_the_end():
    done = run_under("asan", "store_one_past_the_end", "(harness.device_empty((16,)), np.int32(16))", 32)
    assert done.returncode != 0 and "heap-buffer-overflow" in done.stderr, done.stderr[-3000:]
    assert "finished" not in done.stdout


def test_address_sanitizer_is_quiet_on_a_store_that_fits():
    done = run_under("asan", "store_one_past_the_end", "(harness.device_empty((16,)), np.int32(15))", 32)
    assert done.returncode == 0 and "finished" in done.stdout, done.stderr[-3000:]


STATE_SPACES = """
    import sys, numpy as np
    sys.path.insert(0, {tests!r})
    from cuda_on_cpu import harness
    import test_cuda_on_cpu as t
    module = harness.Harness().module(t.selftest_source(), "selftest")
    tile = np.arange(256, dtype=np.uint16)
    for dynamic in (0, 1):
        out = harness.device_empty((128,), np.uint32)
        module.get_function("ldmatrix_rows")((1,), (32,), (harness.to_device(tile), out, np.int32(4), np.int32(1),
                                              np.int32(dynamic)), shared_mem=512 * dynamic)
        assert np.array_equal(out.get().reshape(32, 4), t.ldmatrix_expected(tile.reshape(32, 8), 4, True))
    print("correct use ran")
    for kernel, shared_mem in (("ldmatrix_from_global", 0), ("ldmatrix_past_the_dynamic_request", 256),
                               ("async_copy_into_global", 0), ("async_copy_from_shared", 0)):
        try:
            module.get_function(kernel)((1,), (32,), (harness.device_empty((4 * 33,)),), shared_mem=shared_mem)
        except harness.KernelError as failure:
            print("refused:", failure)
"""


@pytest.mark.parametrize("mode", ["asan", "tsan"])
def test_the_state_space_checks_hold_under_the_sanitizers(mode):
    """Correct use from static and dynamic shared memory is quiet, and each misuse fails its launch with
    the harness's message, before the access: no sanitizer report (under AddressSanitizer an ldmatrix
    past the dynamic shared request would read poisoned bytes)."""
    script = textwrap.dedent(STATE_SPACES.format(tests=str(Path(__file__).parent)))
    env = harness.sanitizer_env(mode)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "correct use ran" in done.stdout, done.stderr[-3000:]
    refusals = [line for line in done.stdout.splitlines() if line.startswith("refused:")]
    assert len(refusals) == 4, done.stdout
    assert "is not in the block's shared memory" in refusals[0] and "ldmatrix.x4" in refusals[0]
    assert "past the launch's dynamic shared memory request of 256 bytes" in refusals[1]
    assert "cp.async: the destination is not in the block's shared memory" in refusals[2]
    assert "cp.async: the source is in shared memory" in refusals[3]


LAST_BLOCK_SUM = ("(harness.to_device(np.arange(8 * 32, dtype=np.float32)), harness.device_empty((8,)), "
                  "harness.to_device(np.zeros(1, np.uint32)), harness.device_empty((1,)), np.int32({variant}))")


def test_blocks_run_concurrently_and_a_last_block_reduction_is_quiet_with_its_fences_and_atomic():
    done = run_under("tsan", "last_block_sum", LAST_BLOCK_SUM.format(variant=0), 32, grid=8, repeat=3)
    assert done.returncode == 0 and "finished" in done.stdout, done.stderr[-3000:]


@pytest.mark.parametrize("variant, bug", [(1, "a ticket taken without an atomic"),
                                          (2, "no fence between the partial and the ticket")])
def test_thread_sanitizer_reports_a_cross_block_race(variant, bug):
    """Blocks run on two OS threads at once (runtime.cpp, gpubp_cpu_launch), so what orders one
    block's accesses before another's is only what orders them on a GPU: atomics and fences."""
    done = run_under("tsan", "last_block_sum", LAST_BLOCK_SUM.format(variant=variant), 32, grid=8, repeat=3)
    assert done.returncode != 0 and "data race" in done.stderr, f"{bug}:\n{done.stderr[-3000:]}"
