"""The safetensors file format, read strictly and written without the safetensors package.

A file is: an 8-byte little-endian header length ``n`` (at most ``HEADER_LIMIT``, the
format's own cap); ``n`` bytes of UTF-8 JSON mapping each tensor's name to ``{"dtype",
"shape", "data_offsets": [begin, end]}`` (offsets into the data that follows) plus an
optional ``"__metadata__"`` of strings, no key twice; then the data, every byte of it
belonging to exactly one tensor. The reader reads the header alone first and checks all of
that against the file's size before it reads any data, so a truncated or forged file is a
ValueError that says what is wrong, never a partial result, and a caller can refuse a file
(another program's model) before reading its data. Arrays come back as NumPy arrays of their
own, independent of the file.
"""

from __future__ import annotations

import io
import json
import math
import reprlib

import numpy as np

DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
          "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}
NAMES = {np.dtype(code): name for name, code in DTYPES.items()}
LENGTH_BYTES = 8
# The most axes a shape may have: NumPy 2's limit (NumPy 1's is 32, which np.empty then enforces). It
# also bounds the cost of multiplying a forged shape's ints.
MAX_AXES = 64
# The longest header the format allows (the safetensors package refuses longer ones): the most a
# reader allocates before anything says what the file should hold.
HEADER_LIMIT = 100_000_000
# The most characters of a value read from a file that an error message shows: a forged entry may
# be megabytes long.
ECHO_CHARS = 100
_ECHO = reprlib.Repr()
_ECHO.maxstring = _ECHO.maxother = ECHO_CHARS
_ECHO.maxlist = _ECHO.maxdict = _ECHO.maxtuple = 20


def echo(value) -> str:
    """``repr(value)`` of a value read from a file, cut to ``ECHO_CHARS`` characters for an error
    message (without building the whole repr of a long one first)."""
    text = _ECHO.repr(value)
    return text if len(text) <= ECHO_CHARS else text[:ECHO_CHARS - 3] + "..."


def unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """``json.loads``'s ``object_pairs_hook``: an object naming a key twice is a ValueError, as
    the safetensors package refuses it, rather than the last one silently winning (two readers
    would see two files)."""
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"the key {echo(key)} appears twice in one object")
        obj[key] = value
    return obj


def write(file, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Write a safetensors file holding ``tensors`` (in name order) and ``metadata`` to ``file``.

    Arrays are written from their own memory, without an intermediate copy of the whole file.
    """
    header: dict = {"__metadata__": metadata}
    arrays, offset = [], 0
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        if array.dtype not in NAMES:
            raise TypeError(f"tensors[{name!r}]: dtype {array.dtype} has no safetensors equivalent")
        header[name] = {"dtype": NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        arrays.append(array)
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    file.write(len(text).to_bytes(LENGTH_BYTES, "little") + text)
    for array in arrays:
        file.write(array.reshape(-1).view(np.uint8).data)


def dumps(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """The bytes of the file :func:`write` writes."""
    buffer = io.BytesIO()
    write(buffer, tensors, metadata)
    return buffer.getvalue()


def loads(blob: bytes) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """``(metadata, tensors)`` from the bytes of a file; ValueError saying what is wrong otherwise."""
    file = io.BytesIO(blob)
    metadata, entries, data_start = read_header(file, len(blob))
    return metadata, read_tensors(file, layout(entries, data_start, len(blob)))


def read_header(file, size: int) -> tuple[dict[str, str], dict, int]:
    """``(metadata, entries, data_start)`` of the safetensors file open as ``file``, ``size`` bytes
    long: its header alone read and parsed, ``metadata`` checked; ``entries`` maps each tensor's
    name to its header entry, which :func:`layout` checks; the data starts at byte ``data_start``."""
    file.seek(0)
    start = file.read(LENGTH_BYTES)
    if len(start) < LENGTH_BYTES:
        raise ValueError(f"truncated: {len(start)} bytes, fewer than the {LENGTH_BYTES}-byte header length")
    length = int.from_bytes(start, "little")
    if length > size - LENGTH_BYTES:
        raise ValueError(f"the header length ({length} bytes) runs past the end of the file "
                         f"({size} bytes): the file is truncated or not safetensors")
    if length > HEADER_LIMIT:
        raise ValueError(f"the header length ({length} bytes) is more than the {HEADER_LIMIT} bytes the "
                         "safetensors format allows")
    try:
        header = json.loads(file.read(length).decode("utf-8"), object_pairs_hook=unique_keys)
    except (ValueError, RecursionError) as exc:  # decoding, parsing, a key twice; nested past Python's limit
        raise ValueError(f"the header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError(f"the header is a JSON {type(header).__name__}, expected an object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("the header's '__metadata__' must map names to strings")
    return metadata, header, LENGTH_BYTES + length


def layout(entries: dict, data_start: int, size: int) -> dict[str, tuple[str, list[int], int, int]]:
    """``(dtype, shape, begin, end)`` of each tensor of :func:`read_header`'s ``entries``, ``begin``
    and ``end`` its bytes' offsets in the file, in the order of the data: every entry checked to
    agree with itself, and the tensors' data to cover the ``size - data_start`` bytes after the
    header without gaps or overlaps."""
    spans = sorted((_span(name, entry), name) for name, entry in entries.items())
    covered = 0
    for (begin, end), name in spans:
        if begin != covered:
            raise ValueError(f"tensor {echo(name)} starts at data byte {begin}, expected {covered} "
                             "(the tensors' data must follow each other without gaps or overlaps)")
        covered = end
    if covered != size - data_start:
        problem = "truncated" if covered > size - data_start else "has trailing bytes"
        raise ValueError(f"the file {problem}: its tensors need {covered} bytes of data, the file holds "
                         f"{size - data_start}")
    return {name: (entries[name]["dtype"], entries[name]["shape"], data_start + begin, data_start + end)
            for (begin, end), name in spans}


def read_tensors(file, spans: dict[str, tuple[str, list[int], int, int]]) -> dict[str, np.ndarray]:
    """The tensors whose ``spans`` :func:`layout` gives, read from ``file`` into arrays of their own."""
    tensors = {}
    for name, (dtype, shape, begin, end) in spans.items():
        try:
            array = np.empty(shape, DTYPES[dtype])
        except ValueError as exc:  # more axes than this NumPy allows
            raise ValueError(f"tensor {echo(name)}: {exc}") from None
        file.seek(begin)
        if file.readinto(array.reshape(-1).view(np.uint8)) != end - begin:  # cut short since it was measured
            raise ValueError(f"the file is truncated: tensor {echo(name)}'s data ends at byte {end}, past the file's "
                             "end")
        tensors[name] = array
    return tensors


def _span(name: str, entry) -> tuple[int, int]:
    """The (begin, end) data offsets of one header entry, after checking it agrees with itself."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise ValueError(f"tensor {echo(name)}: expected 'dtype', 'shape' and 'data_offsets' in the header, "
                         f"got {echo(entry)}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ValueError(f"tensor {echo(name)}: unsupported dtype {echo(dtype)}; expected one of {sorted(DTYPES)}")
    if not isinstance(shape, list) or len(shape) > MAX_AXES or not all(_count(n) for n in shape):
        raise ValueError(f"tensor {echo(name)}: the shape {echo(shape)} is not a list of at most {MAX_AXES} ints "
                         ">= 0")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_count(n) for n in offsets) \
            or offsets[0] > offsets[1]:
        raise ValueError(f"tensor {echo(name)}: data_offsets {echo(offsets)} are not [begin, end] with begin <= end")
    needed = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize
    if offsets[1] - offsets[0] != needed:
        raise ValueError(f"tensor {echo(name)}: the header's shape {tuple(shape)} of {dtype} needs {needed} bytes, "
                         f"but its data_offsets span {offsets[1] - offsets[0]}")
    return offsets[0], offsets[1]


def _count(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 0
