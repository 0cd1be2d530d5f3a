"""bench/sass_reader.py on hand-written SASS and PTX, whose loops and answers are known: which
backward branches close loops, which loop is a kernel's hot loop and which are its copies, and
the opcodes and declarations the reader must not misread. No compiler needed (the planted
sources of tests/test_kernel_model.py check the same reader on what nvcc makes)."""

from __future__ import annotations

from test_gpu_check_scripts import load

sass = load("sass_reader")


def listing(lines: str) -> str:
    """``cuobjdump -sass`` of one function, "planted", from "address: instruction" lines."""
    printed = ["\tFunction : planted"]
    for line in lines.strip().splitlines():
        address, instruction = line.split(":", 1)
        printed.append(f"        /*{int(address, 16):04x}*/                   {instruction.strip()} ;")
    return "\n".join(printed) + "\n"


def code(lines: str) -> list:
    """The instructions of ``listing(lines)``, as the reader reads them."""
    return sass.sass_functions(listing(lines))["planted"]


def run(start: int, n: int, instruction: str) -> str:
    """``n`` copies of ``instruction`` from address ``start`` on, 0x10 apart."""
    return "\n".join(f"{start + 0x10 * i:x}: {instruction}" for i in range(n))


def spans(found) -> list[tuple[int, int]]:
    return [(loop.start, loop.end) for loop in found]


# ----------------------------------------------------------------------------- which branches close loops

# A main loop (0x100-0x200) of 14 FFMA, then a shuffle reduction behind a BRA.DIV whose slow path
# ptxas placed after the EXIT, branching back to 0x230, and an epilogue of 28 FFMA: the branch
# back from 0x930 reaches nothing from 0x230 but through the EXIT, so it closes no loop.
OUT_OF_LINE_SLOW_PATH = f"""
0: MOV R1, c[0x0][0x28]
10: S2R R0, SR_TID.X
100: LDS.128 R8, [R0]
{run(0x110, 14, "FFMA R4, R2, R3, R4")}
1f0: ISETP.GE.AND P0, PT, R0, 0x40, PT
200: @!P0 BRA 0x100
210: BRA.DIV UR4, 0x900
220: SHFL.BFLY PT, R5, R4, 0x1, 0x1f
230: LDS R6, [R0+0x100]
{run(0x240, 28, "FFMA R6, R6, R6, R5")}
400: STG.E [R2.64], R6
410: EXIT
900: MOV R7, 0xffffffff
910: WARPSYNC.COLLECTIVE R7, 0x930
920: SHFL.BFLY PT, R5, R4, 0x1, 0x1f
930: BRA 0x230
940: BRA 0x940
"""


def test_a_branch_back_from_an_out_of_line_slow_path_closes_no_loop():
    found = code(OUT_OF_LINE_SLOW_PATH)
    assert spans(sass.loops(found)) == [(0x100, 0x200)]
    assert spans(sass.hot_loops(found)) == [(0x100, 0x200)]


# A loop (0x100-0x1c0) with a BRA.DIV in it, whose slow path (0x900) branches back into the
# loop: the BRA.DIV may fall through, so the loop's own branch back is reached and it is a
# loop; the slow path's branch back to 0x130 closes none.
SLOW_PATH_INSIDE_A_LOOP = f"""
100: LDS R4, [R0]
110: BRA.DIV UR4, 0x900
120: SHFL.BFLY PT, R5, R4, 0x1, 0x1f
{run(0x130, 8, "FFMA R6, R4, R5, R6")}
1b0: ISETP.GE.AND P0, PT, R0, 0x40, PT
1c0: @!P0 BRA 0x100
1d0: EXIT
900: WARPSYNC.COLLECTIVE R7, 0x920
910: SHFL.BFLY PT, R5, R4, 0x1, 0x1f
920: BRA 0x130
930: BRA 0x930
"""


def test_a_loop_holding_a_bra_div_is_a_loop_and_its_slow_paths_branch_back_is_not():
    assert spans(sass.loops(code(SLOW_PATH_INSIDE_A_LOOP))) == [(0x100, 0x1c0)]


# A loop whose body leaves unconditionally on one path (a break: BRA out; a return: EXIT) while
# another path, behind a conditional branch, or an unguarded branch on a predicate operand,
# goes on to the branch back: a loop all the same.
LOOP_WITH_A_BREAK_AND_A_RETURN = """
100: LDS R4, [R0]
110: FFMA R6, R4, R4, R6
120: @P1 BRA 0x150
130: STG.E [R2.64], R6
140: BRA 0x300
150: BRA !P2, 0x180
160: STG.E [R2.64], R6
170: EXIT
180: ISETP.GE.AND P0, PT, R0, 0x40, PT
190: @!P0 BRA 0x100
300: EXIT
310: BRA 0x310
"""


def test_a_loop_that_breaks_or_returns_on_one_path_is_a_loop():
    assert spans(sass.loops(code(LOOP_WITH_A_BREAK_AND_A_RETURN))) == [(0x100, 0x190)]


# A switch (BRX, its jump table not in the SASS) inside a loop (0x100-0x1a0) whose cases end in
# branches to the join, and after the function's EXIT a slow path (0x900) branching back to
# 0x110: an indirect jump may go to the cases (the code after a jump that no branch names), so
# the loop is one, but not to the slow path, which its BRA.DIV names.
SWITCH_IN_A_LOOP = """
100: BRA.DIV UR4, 0x900
110: LDC R8, c[0x2][R0]
120: BRX R8 -0x130
130: FFMA R6, R4, R4, R6
140: BRA 0x190
150: FMUL R6, R6, 0.5
160: BRA 0x190
170: FADD R6, R6, 1
180: BRA 0x190
190: ISETP.GE.AND P0, PT, R0, 0x40, PT
1a0: @!P0 BRA 0x100
1b0: EXIT
900: WARPSYNC.COLLECTIVE R7, 0x910
910: BRA 0x110
920: BRA 0x920
"""


def test_a_switch_in_a_loop_reaches_the_branch_back_and_does_not_reach_a_slow_path():
    found = code(SWITCH_IN_A_LOOP)
    assert [(i.address, i.falls_through, i.indirect) for i in found if i.base in ("BRA", "BRX", "EXIT")] == [
        (0x100, True, False), (0x120, False, True), (0x140, False, False), (0x160, False, False),
        (0x180, False, False), (0x1a0, True, False), (0x1b0, False, False), (0x910, False, False),
        (0x920, False, False)]
    assert spans(sass.loops(found)) == [(0x100, 0x1a0)]


# ----------------------------------------------------------------------------- the hot loop and its copies

# A template's two copies of one main loop, chosen at run time: the float4 copy (0x030-0x0e0:
# one LDG.E.128, 12 instructions) and the scalar-load copy (0x200-0x2e0: four LDG.E, 15), both
# with 8 FFMA from shared memory.
FP32_COPIES = f"""
0: S2R R0, SR_TID.X
10: ISETP.NE.AND P1, PT, R5, RZ, PT
20: @!P1 BRA 0x200
30: LDG.E.128 R8, [R2.64]
40: LDS.128 R12, [R0]
{run(0x50, 8, "FFMA R4, R8, R12, R4")}
d0: ISETP.GE.AND P0, PT, R0, R6, PT
e0: @!P0 BRA 0x30
f0: BRA 0x300
{run(0x200, 4, "LDG.E R8, [R2.64]")}
240: LDS.128 R12, [R0]
{run(0x250, 8, "FFMA R4, R8, R12, R4")}
2d0: ISETP.GE.AND P0, PT, R0, R6, PT
2e0: @!P0 BRA 0x200
300: STG.E [R2.64], R4
310: EXIT
320: BRA 0x320
"""


def test_the_hot_loop_is_the_fastest_of_equal_ffma_copies_and_the_others_are_its_siblings():
    hot, *siblings = sass.hot_loops(code(FP32_COPIES))
    assert (hot.start, hot.end) == (0x30, 0xe0) and sass.instruction_mix(hot.body)["instructions"] == 12
    assert spans(siblings) == [(0x200, 0x2e0)] and sass.instruction_mix(siblings[0].body)["instructions"] == 15


# A runtime trip count, as nvcc compiles it: a main loop unrolled to 4 HMMA (0x100-0x1a0) and a
# remainder loop of 1 (0x200-0x240), the smaller.
UNROLLED_HMMA_LOOP = f"""
100: LDSM.16.M88.4 R8, [R0]
{run(0x110, 4, "HMMA.1688.F32.TF32 R4, R8, R12, R4")}
150: IADD3 R0, R0, 0x40, RZ
160: IADD3 R1, R1, -0x4, RZ
170: ISETP.GT.AND P0, PT, R1, 0x3, PT
180: LDS R9, [R0]
190: NOP
1a0: @P0 BRA 0x100
200: LDS R8, [R0]
210: HMMA.1688.F32.TF32 R4, R8, R12, R4
220: IADD3 R1, R1, -0x1, RZ
230: ISETP.NE.AND P0, PT, R1, RZ, PT
240: @P0 BRA 0x200
250: EXIT
260: BRA 0x260
"""


def test_a_tensor_core_kernels_hot_loop_has_the_most_hmma_not_the_fewest_instructions():
    assert spans(sass.hot_loops(code(UNROLLED_HMMA_LOOP))) == [(0x100, 0x1a0)]


# Two copies of a loop of 2 HMMA, as a template's first and later k chunks: the later one
# (0x100-0x170) reads its partial sums too, an LDS more; the first (0x200-0x260) is the faster.
HMMA_COPIES = f"""
100: LDSM.16.M88.4 R8, [R0]
110: LDS.128 R16, [R2]
{run(0x120, 2, "HMMA.16816.F32.BF16 R4, R8, R12, R4")}
140: IADD3 R1, R1, -0x1, RZ
150: ISETP.NE.AND P0, PT, R1, RZ, PT
160: NOP
170: @P0 BRA 0x100
200: LDSM.16.M88.4 R8, [R0]
{run(0x210, 2, "HMMA.16816.F32.BF16 R4, R8, R12, R4")}
230: IADD3 R1, R1, -0x1, RZ
240: ISETP.NE.AND P0, PT, R1, RZ, PT
250: @P0 BRA 0x200
260: EXIT
270: BRA 0x270
"""


def test_equal_hmma_copies_are_all_reported_the_fastest_first():
    assert spans(sass.hot_loops(code(HMMA_COPIES))) == [(0x200, 0x250), (0x100, 0x170)]


def test_a_streaming_kernels_hot_loop_is_its_largest_loop():
    """No FFMA in any loop: the ceiling says nothing there, and the largest loop is the one
    reported (an unrolled grid-stride loop rather than its remainder), alone."""
    found = code(f"""
{run(0x100, 6, "LDG.E R4, [R2.64]")}
{run(0x160, 5, "STG.E [R2.64], R4")}
1b0: @P0 BRA 0x100
200: LDG.E R4, [R2.64]
210: STG.E [R2.64], R4
220: @P0 BRA 0x200
230: EXIT
240: BRA 0x240
""")
    assert spans(sass.hot_loops(found)) == [(0x100, 0x1b0)]


# A norm-style kernel: a grid-stride loop of 3 FFMA over global memory (0x100-0x170), then the
# shared-memory tree reduction, a rolled loop of LDS and FADD with no FFMA (0x200-0x260).
GRID_STRIDE_THEN_REDUCTION = """
0: S2R R0, SR_TID.X
100: LDG.E R2, [R4.64]
110: LDG.E R3, [R6.64]
120: FFMA R8, R2, R2, R8
130: FFMA R9, R2, R3, R9
140: FFMA R8, R3, R3, R8
150: IADD3 R0, R0, R10, RZ
160: ISETP.GE.AND P0, PT, R0, R11, PT
170: @!P0 BRA 0x100
180: STS [R12], R8
190: BAR.SYNC.DEFER_BLOCKING 0x0
200: LDS R13, [R12]
210: LDS R14, [R12+0x200]
220: FADD R13, R13, R14
230: STS [R12], R13
240: BAR.SYNC.DEFER_BLOCKING 0x0
250: ISETP.GT.AND P1, PT, R15, 0x1, PT
260: @P1 BRA 0x200
270: EXIT
280: BRA 0x280
"""


def test_a_loop_reading_shared_memory_without_ffma_is_not_taken_over_an_ffma_loop():
    """The shared-memory filter keeps a tiled kernel's main loop over a rolled epilogue; a loop
    with no FFMA (the reduction) is no main loop, however much shared memory it reads."""
    assert spans(sass.hot_loops(code(GRID_STRIDE_THEN_REDUCTION))) == [(0x100, 0x170)]
    # With an FFMA in it, the loop reading shared memory is taken over the one with more FFMA.
    fed = code(GRID_STRIDE_THEN_REDUCTION.replace("220: FADD R13, R13, R14", "220: FFMA R13, R13, R14, R13"))
    assert spans(sass.hot_loops(fed)) == [(0x200, 0x260)]


# ----------------------------------------------------------------------------- opcodes and declarations


def test_wgmma_is_read_whole_and_counted_as_tensor_core_work():
    found = code("""
0: WARPGROUP.ARRIVE
10: HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24
20: HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24, gsb0
30: WARPGROUP.DEPBAR.LE gsb0, 0x0
40: ISETP.GE.AND P0, PT, R0, R2, PT
50: @!P0 BRA 0x0
60: EXIT
70: BRA 0x70
""")
    assert found[1].opcode == "HGMMA.64x128x16.F32.BF16" and found[1].base == "HGMMA"
    (hot,) = sass.hot_loops(found)
    mix = sass.instruction_mix(hot.body)
    assert (mix["hgmma"], mix["hmma"], mix["other"]) == (2, 0, 4)
    assert mix["hmma_by_shape"] == {"HGMMA.64x128x16.F32.BF16": 2}


PTX = """
.visible .shared .align 16 .b8 _cudapy_smem_1[16896];
.visible .shared .align 4 .b8 _cudapy_smem_2[2];
.shared .b64 flags[3];
.extern .shared .align 16 .b8 dynamic[];
.visible .entry kernel(.param .u64 p)
{
	.shared .align 4 .b8 tile[100];
	st.shared.u32 	[_cudapy_smem_2], %r1;
	ld.shared.f32 	%f1, [tile];
}
"""


def test_the_ptx_declares_the_static_shared_memory_laid_out_at_each_arrays_alignment():
    # 16896, 2 more, padded to 16904 for the 8-byte words (24 bytes), and 100 at 4: 17028.
    assert sass.ptx_shared_bytes(PTX) == 16896 + 2 + 6 + 24 + 100
    assert sass.ptx_shared_bytes(".visible .entry k()\n{\n\tret;\n}\n") == 0
