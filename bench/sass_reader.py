"""Read what the compiler made of a kernel: ptxas's resource report, a cubin's SASS and its
``.nv.info`` attributes, and find each kernel's hot loop in the SASS.

The readers take the text the tools print, so they are tested on planted sources
(``tests/test_kernel_model.py``) without anything but the CUDA compiler:

- ``ptxas_resources(log)``: ``ptxas -v``'s per-function registers, spill stores and loads,
  stack frame and static shared memory;
- ``res_usage(text)``: ``cuobjdump -res-usage``'s per-function registers, stack frame and
  shared memory (what a built fatbin says without ptxas's report; it has no spill counts);
- ``ptx_shared_bytes(ptx)``: the static shared memory a PTX module declares, what a block of
  its kernel takes where ptxas does not say (``ptxas -c``, as a relocatable module is compiled,
  leaves shared memory for the linker to lay out and reports none);
- ``sass_functions(text)``: ``cuobjdump -sass`` as a list of ``Instruction`` per function
  (address, predicate, opcode, branch target, whether control can pass to the next one);
- ``max_threads(text)``: ``cuobjdump -elf``'s ``EIATTR_MAX_THREADS`` per function, the block
  size ``__launch_bounds__`` promised (kernels without launch bounds have none);
- ``loops(code)``: the loops of a function from its backward branches. A branch at address
  ``b`` to a target ``t < b`` closes the loop ``[t, b]`` when control entering at ``t`` can get to
  ``b`` without leaving ``[t, b]`` (``_reaches``, over fall-through and branches; a switch's
  indirect jump may go to any code that follows one without fall-through and that no branch
  names). ptxas places slow paths (a ``BRA.DIV``'s ``WARPSYNC.COLLECTIVE`` ... ``ENDCOLLECTIVE``,
  a division's ``CALL``) after the function's ``EXIT``, each ending in a branch back to where it
  left, and the code from there reaches that branch only through the ``EXIT``: no loop.
  Branches back to one target (a ``continue``) make one loop, ending at the last of them. A
  branch to itself is not a loop: every function ends with one, after its last ``EXIT``, that
  never runs. The loop body is every instruction in that address range, both sides of any
  forward branch inside it included, so counts are static: what one pass issues when every
  guarded path runs;
- ``hot_loops(code)``: the copies of the loop that bounds a kernel's throughput, fastest first.
  The candidates are the innermost loops (holding no other). For a kernel with tensor-core
  instructions (HMMA, HGMMA) in one, those with the most of them per pass; otherwise those with
  the most FFMA, and where some innermost loop with FFMA reads shared memory, only those count
  (a loop without FFMA, a shared-memory reduction after a grid-stride FFMA loop, never does): a tiled
  kernel's main loop feeds its FFMA from shared memory, while an epilogue loop the compiler left
  rolled (Numba's dense forward with sigmoid runs one over its 64 accumulators, with more FFMA
  than the main loop) reads none. Loops with the same count are copies of one main loop, made by
  the compiler or a template (the fp32 GEMMs' float4 and scalar-load paths, the fused kernels'
  first and later k chunks), and the fastest copy, the one issuing the fewest instructions, is
  the hot loop; the others are what a launch on another path runs. Where no candidate holds an
  FFMA (a streaming kernel, which the ceiling does not describe), the largest is the one copy;
- ``instruction_mix(body)``: the loop's instructions by kind.

SASS is not a documented language: opcodes are read by their base name (the part before the
first dot), and only the few that the model names are told apart.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

# ----------------------------------------------------------------------------- ptxas -v

_PTXAS_ENTRY = re.compile(r"Compiling entry function '(\S+)'")
_PTXAS_PROPERTIES = re.compile(r"Function properties for (\S+)")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers(?:.*?, (\d+) bytes smem)?")


@dataclass(frozen=True)
class Resources:
    registers: int
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    stack_frame: int  # bytes of local memory per thread (spills and local arrays)
    smem_bytes: int  # static shared memory per block


def ptxas_resources(log: str) -> dict[str, Resources]:
    """Per entry function, what ``ptxas -v`` reported (one architecture's log). The log gives
    each function's properties (stack frame, spills) after its name, and each entry's
    registers and shared memory after "Compiling entry function"."""
    frames: dict[str, list[int]] = {}
    found = {}
    entry = properties_of = None
    for line in log.splitlines():
        if match := _PTXAS_ENTRY.search(line):
            entry = match.group(1)
        elif match := _PTXAS_PROPERTIES.search(line):
            properties_of = match.group(1)
        elif match := _PTXAS_FRAME.search(line):
            frames[properties_of] = [int(g) for g in match.groups()]
        elif (match := _PTXAS_USED.search(line)) and entry:
            stack, spill_stores, spill_loads = frames[entry]
            found[entry] = Resources(registers=int(match.group(1)), spill_stores=spill_stores,
                                     spill_loads=spill_loads, stack_frame=stack, smem_bytes=int(match.group(2) or 0))
            entry = None
    return found


# ----------------------------------------------------------------------------- cuobjdump -res-usage

_RES_FUNCTION = re.compile(r"^\s*Function (\S+):\s*$")
_RES_FIGURES = re.compile(r"\bREG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def res_usage(text: str, reserved_smem: int = 0) -> dict[str, Resources]:
    """Per function, what ``cuobjdump -res-usage`` of one architecture's cubin reports, as
    ``ptxas -v`` reports it. Spill counts are not in a cubin: they are 0 here (the caller must
    know that the build fails on a spill). ``reserved_smem``: the shared memory the compiler
    reserves at the start of every block that uses shared memory at all, which
    ``cuobjdump`` counts in SHARED and ptxas does not (1 KiB on sm_90, none on sm_80; see
    ``reserved_shared_memory``)."""
    found = {}
    name = None
    for line in text.splitlines():
        if match := _RES_FUNCTION.match(line):
            name = match.group(1)
        elif name and (match := _RES_FIGURES.search(line)):
            registers, stack, shared, _local = (int(g) for g in match.groups())
            if shared and shared < reserved_smem:
                raise ValueError(f"{name}: SHARED:{shared} is less than the {reserved_smem} bytes reserved")
            found[name] = Resources(registers=registers, spill_stores=0, spill_loads=0, stack_frame=stack,
                                    smem_bytes=shared - reserved_smem if shared else 0)
            name = None
    return found


def reserved_shared_memory(elf_text: str, reserved: int) -> int:
    """``reserved`` when ``cuobjdump -elf`` of one cubin shows the reserved shared-memory window
    (the ``.nv.shared.reserved.0`` section sm_90 code has), else 0."""
    return reserved if re.search(r"(?m)\s\.nv\.shared\.reserved\.0\s*$", elf_text) else 0


# ----------------------------------------------------------------------------- PTX

# A module-scope shared array: ".visible .shared .align 16 .b8 name[16896];" (an .extern one,
# the dynamic shared memory, has no size).
_PTX_SHARED = re.compile(r"(?m)^\s*(?:\.(?:visible|global|weak)\s+)*\.shared\s+(?:\.align\s+(\d+)\s+)?"
                         r"\.[a-z]+(\d+)\s+[\w$]+\[(\d+)\]")


def ptx_shared_bytes(ptx: str) -> int:
    """The bytes of the shared arrays ``ptx`` declares, laid out in their order, each at its
    alignment (``.align``, else its element size): what ptxas reports as ``bytes smem`` for a
    module of one kernel compiled whole."""
    end = 0
    for align, bits, length in _PTX_SHARED.findall(ptx):
        size = int(bits) // 8
        step = int(align or size)
        end = -(-end // step) * step + size * int(length)
    return end


# ----------------------------------------------------------------------------- SASS


@dataclass(frozen=True)
class Instruction:
    address: int
    predicate: str  # "" when unconditional, else e.g. "@!P0"
    opcode: str  # with its modifiers: "HMMA.1688.F32.TF32"
    target: int | None  # the branch target, for BRA and JMP
    falls_through: bool = True  # False after an EXIT, RET or jump that nothing guards

    @property
    def base(self) -> str:
        return self.opcode.partition(".")[0]

    @property
    def indirect(self) -> bool:
        """A jump to an address in a register (a switch's jump table, which is not in the SASS)."""
        return self.base in ("BRX", "JMX")

    @property
    def padding(self) -> bool:
        """A NOP, or an instruction whose predicate is never true (``@!PT``, ``@!UPT``): ptxas for
        sm_90 pads with ``@!UPT UIADD3 URZ, URZ, URZ, URZ`` where it padded with NOP for sm_80
        PTX. Neither is work the loop issues."""
        return self.base == "NOP" or self.predicate.strip() in ("@!PT", "@!UPT")


_FUNCTION = re.compile(r"^\s*Function : (\S+)")
# Opcodes are upper case but for the shape of a wgmma: HGMMA.64x128x16.F32.BF16.
_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")
_BRANCHES = ("BRA", "JMP")
_TARGET = re.compile(r"0x([0-9a-f]+)\s*$")
# Control never passes these to the next instruction unless a predicate guards them, in front
# (@P0 BRA) or as an operand (BRA P6, 0x...; EXIT P1); BRA.DIV and BRA.CONV branch only when the
# warp is divergent or converged, so they may fall through too.
_LEAVES = ("EXIT", "RET", "BRA", "JMP", "BRX", "JMX")
_MAY_FALL_THROUGH = {"DIV", "CONV"}
_PREDICATE_OPERAND = re.compile(r"!?U?P[T0-9]+\b")


def sass_functions(text: str) -> dict[str, list[Instruction]]:
    """``cuobjdump -sass`` of one cubin -> the instructions of each function, in address order."""
    functions: dict[str, list[Instruction]] = {}
    code: list[Instruction] | None = None
    for line in text.splitlines():
        if match := _FUNCTION.match(line):
            code = functions.setdefault(match.group(1), [])
        elif code is not None and (match := _INSTRUCTION.match(line)):
            address, predicate, opcode, operands = match.groups()
            base, *modifiers = opcode.split(".")
            operands = operands.strip()
            target = None
            if base in _BRANCHES and (jump := _TARGET.search(operands)):
                target = int(jump.group(1), 16)
            leaves = (base in _LEAVES and not predicate and not _MAY_FALL_THROUGH & set(modifiers)
                      and not _PREDICATE_OPERAND.match(operands))
            code.append(Instruction(int(address, 16), (predicate or "").strip(), opcode, target, not leaves))
    return functions


# ----------------------------------------------------------------------------- .nv.info

_NV_INFO = re.compile(r"^\.nv\.info\.(\S+)")
_MAX_THREADS = re.compile(r"Attribute:\s+EIATTR_MAX_THREADS\s+Format:\s+\S+\s+Value:\s+(0x[0-9a-f]+) (0x[0-9a-f]+) "
                          r"(0x[0-9a-f]+)")


def max_threads(elf_text: str) -> dict[str, int]:
    """``cuobjdump -elf``: the block size each function's ``__launch_bounds__`` allows (x*y*z)."""
    found = {}
    sections = re.split(r"(?m)^(?=\.nv\.info\.)", elf_text)
    for section in sections:
        head = _NV_INFO.match(section)
        bounds = _MAX_THREADS.search(section)
        if head and bounds:
            x, y, z = (int(v, 16) for v in bounds.groups())
            found[head.group(1)] = x * y * z
    return found


# ----------------------------------------------------------------------------- loops


@dataclass(frozen=True)
class Loop:
    start: int  # address of its first instruction (the backward branches' target)
    end: int  # address of its last backward branch
    body: tuple[Instruction, ...]

    def contains(self, other: Loop) -> bool:
        return self != other and self.start <= other.start and other.end <= self.end


def loops(code: list[Instruction]) -> list[Loop]:
    """Every loop closed by a backward branch that its head reaches (see the module docstring),
    outermost first where they nest."""
    index = {ins.address: at for at, ins in enumerate(code)}
    targets = {ins.target for ins in code}
    # Where an indirect jump (a switch's BRX) may go: the code after one without fall-through
    # that no branch names (each case of the switch; never an out-of-line slow path, which its
    # BRA.DIV names).
    unnamed = [at for at in range(1, len(code)) if not code[at - 1].falls_through and code[at].address not in targets]
    ends: dict[int, int] = {}
    for ins in code:
        if ins.target is not None and ins.target < ins.address and _reaches(code, index, unnamed, ins.target,
                                                                            ins.address):
            ends[ins.target] = max(ends.get(ins.target, ins.target), ins.address)
    found = [Loop(start, end, tuple(i for i in code if start <= i.address <= end)) for start, end in ends.items()]
    return sorted(found, key=lambda loop: (loop.start, -loop.end))


def _reaches(code: list[Instruction], index: dict[int, int], unnamed: list[int], head: int, latch: int) -> bool:
    """Whether control entering ``code`` (in address order) at ``head`` can get to the
    instruction at ``latch`` without leaving ``[head, latch]``: along fall-through (where the
    instruction has one, ``Instruction.falls_through``), branch targets, and from an indirect
    jump to any of the ``unnamed`` positions (see ``loops``)."""
    if head not in index:
        return False
    first, last = index[head], index[latch]
    todo, seen = [first], set()
    while todo:
        at = todo.pop()
        if at == last:
            return True
        if at in seen or not first <= at < last:
            continue
        seen.add(at)
        ins = code[at]
        if ins.indirect:
            todo += unnamed
        if ins.target in index:
            todo.append(index[ins.target])
        if ins.falls_through:
            todo.append(at + 1)
    return False


def innermost(found: list[Loop]) -> list[Loop]:
    return [loop for loop in found if not any(loop.contains(other) for other in found)]


def hot_loops(code: list[Instruction]) -> list[Loop]:
    """The copies of the loop that bounds a kernel's throughput, the hot loop (fastest) first
    (see the module docstring); empty where the kernel has no loop."""
    candidates = innermost(loops(code))
    tensor = [loop for loop in candidates if count(loop.body, *TENSOR)]
    if tensor:
        candidates, work = tensor, TENSOR
    else:
        fed = [loop for loop in candidates if count(loop.body, "FFMA") and count(loop.body, "LDS", "LDSM")]
        candidates, work = fed or candidates, ("FFMA",)
    if not candidates:
        return []
    most = max(count(loop.body, *work) for loop in candidates)
    if not most:  # a streaming kernel: its largest loop, an unrolled one rather than its remainder
        return [max(candidates, key=lambda loop: (len(loop.body), -loop.start))]
    copies = [loop for loop in candidates if count(loop.body, *work) == most]
    return sorted(copies, key=lambda loop: (sum(not i.padding for i in loop.body), loop.start))


def count(body, *bases: str) -> int:
    return sum(1 for i in body if i.base in bases)


# Tensor-core instructions: mma.sync (HMMA) and Hopper's wgmma (HGMMA).
TENSOR = ("HMMA", "HGMMA")
# Opcodes the mix names; everything else issued (integer, control, conversions, ...) is "other".
MIX_KINDS = ("FFMA", "HMMA", "HGMMA", "LDS", "LDSM", "STS", "LDG", "LDGSTS", "STG")


def instruction_mix(body) -> dict:
    """Counts of the loop body's instructions: ``instructions`` (all but padding, ``Instruction.padding``,
    which is not issued work), one count per ``MIX_KINDS`` entry in lower case, ``other``, and
    ``hmma_by_shape``, the tensor-core instructions by opcode ({"HMMA.1688.F32.TF32": n, ...}, HGMMA's too)."""
    issued = [i for i in body if not i.padding]
    bases = Counter(i.base for i in issued)
    mix = {"instructions": len(issued)}
    for kind in MIX_KINDS:
        mix[kind.lower()] = bases[kind]
    mix["other"] = len(issued) - sum(bases[kind] for kind in MIX_KINDS)
    mix["hmma_by_shape"] = dict(sorted(Counter(i.opcode for i in issued if i.base in TENSOR).items()))
    return mix
