"""The safetensors file format, read strictly and written without the safetensors package.

A file is: an 8-byte little-endian header length ``n``; ``n`` bytes of UTF-8 JSON mapping
each tensor's name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into
the data that follows) plus an optional ``"__metadata__"`` of strings; then the data, every
byte of it belonging to exactly one tensor. The reader checks all of that before it builds
any array, so a truncated or forged file is a ValueError that says what is wrong, never a
partial result. Arrays come back as NumPy copies, independent of the file.
"""

from __future__ import annotations

import io
import json
import math

import numpy as np

DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
          "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}
NAMES = {np.dtype(code): name for name, code in DTYPES.items()}
LENGTH_BYTES = 8


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
    if len(blob) < LENGTH_BYTES:
        raise ValueError(f"truncated: {len(blob)} bytes, fewer than the {LENGTH_BYTES}-byte header length")
    length = int.from_bytes(blob[:LENGTH_BYTES], "little")
    if length > len(blob) - LENGTH_BYTES:
        raise ValueError(f"the header length ({length} bytes) runs past the end of the file "
                         f"({len(blob)} bytes): the file is truncated or not safetensors")
    try:
        header = json.loads(blob[LENGTH_BYTES:LENGTH_BYTES + length].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # nested past Python's limit
        raise ValueError(f"the header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError(f"the header is a JSON {type(header).__name__}, expected an object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("the header's '__metadata__' must map names to strings")
    data = memoryview(blob)[LENGTH_BYTES + length:]
    spans = sorted((_span(name, entry), name) for name, entry in header.items())
    covered = 0
    for (begin, end), name in spans:
        if begin != covered:
            raise ValueError(f"tensor {name!r} starts at data byte {begin}, expected {covered} "
                             "(the tensors' data must follow each other without gaps or overlaps)")
        covered = end
    if covered != len(data):
        problem = "truncated" if covered > len(data) else "has trailing bytes"
        raise ValueError(f"the file {problem}: its tensors need {covered} bytes of data, the file holds {len(data)}")
    tensors = {}
    for (begin, end), name in spans:
        entry = header[name]
        tensors[name] = np.frombuffer(data[begin:end], DTYPES[entry["dtype"]]).reshape(entry["shape"]).copy()
    return metadata, tensors


def _span(name: str, entry) -> tuple[int, int]:
    """The (begin, end) data offsets of one header entry, after checking it agrees with itself."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise ValueError(f"tensor {name!r}: expected 'dtype', 'shape' and 'data_offsets' in the header, got {entry!r}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ValueError(f"tensor {name!r}: unsupported dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    if not isinstance(shape, list) or not all(_count(n) for n in shape):
        raise ValueError(f"tensor {name!r}: the shape {shape!r} is not a list of ints >= 0")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_count(n) for n in offsets) \
            or offsets[0] > offsets[1]:
        raise ValueError(f"tensor {name!r}: data_offsets {offsets!r} are not [begin, end] with begin <= end")
    needed = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize
    if offsets[1] - offsets[0] != needed:
        raise ValueError(f"tensor {name!r}: the header's shape {tuple(shape)} of {dtype} needs {needed} bytes, "
                         f"but its data_offsets span {offsets[1] - offsets[0]}")
    return offsets[0], offsets[1]


def _count(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 0
