"""Safetensors headers checked before torch or the safetensors library reads a file: a damaged or hostile file is one
line naming it, never a crash (or a 2^60-byte allocation) inside a loader.

The format: 8 bytes little-endian header length N, N bytes of JSON header ({name: {dtype, shape, data_offsets}},
optional "__metadata__" of text values), then the tensor bytes, which the offsets must cover exactly.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

from sovtune.errors import SovtuneError

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
# Bits per element of the dtypes safetensors knows (sub-byte float types pack several elements per byte).
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16,
    "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64, "F4": 4,
    "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip


class WeightFileError(SovtuneError):
    """A weight file is damaged or not what its name says."""


def check_safetensors(path: str | os.PathLike[str]) -> None:
    """Raise WeightFileError (naming the file and what is wrong) unless `path` has a well-formed safetensors header
    whose tensors lie exactly within the file."""
    path = Path(path)
    problem = _header_problem(path)
    if problem is not None:
        raise WeightFileError(
            f"{path}: not a valid safetensors file ({problem}); it is damaged or was not written by safetensors: "
            "download or save it again"
        )


def check_safetensors_in(folder: str | os.PathLike[str]) -> None:
    """Every *.safetensors file directly in `folder` (a model or adapter folder)."""
    folder = Path(folder)
    if folder.is_dir():
        for path in sorted(folder.glob("*.safetensors")):
            check_safetensors(path)


def _header_problem(path: Path) -> str | None:
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                return f"{size} bytes, shorter than the 8-byte header length"
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES:
                return f"header length {length:,} bytes, above the format's limit of {MAX_HEADER_BYTES:,}"
            if 8 + length > size:
                return f"header length {length:,} bytes, but the file has only {size - 8:,} after it (truncated?)"
            raw = handle.read(length)
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # not UTF-8, not JSON, too deep, or numbers of 4,300+ digits
        return "the header is not JSON"
    if not isinstance(header, dict):
        return f"the header is a JSON {type(header).__name__}, not an object"
    return _tensors_problem(header, size - 8 - length)


def _tensors_problem(header: dict[str, Any], data_bytes: int) -> str | None:
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        return "__metadata__ must map names to text"
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            return f"tensor {name[:80]!r} is not described by an object"
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str):
            return f"tensor {name[:80]!r} has a dtype that is not text"
        if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 2**63 for d in shape):
            return f"tensor {name[:80]!r} has a shape that is not a list of sizes"
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            return f"tensor {name[:80]!r} has data_offsets that are not [begin, end]"
        begin, end = offsets
        if not 0 <= begin <= end <= data_bytes:
            return f"tensor {name[:80]!r} lies at bytes {begin}..{end}, past the {data_bytes:,} bytes of data"
        bits = DTYPE_BITS.get(dtype)  # a dtype newer than this table is left to the library
        if bits is not None and (math.prod(shape) * bits + 7) // 8 != end - begin:
            return f"tensor {name[:80]!r} of shape {shape} and dtype {dtype} does not take {end - begin:,} bytes"
        spans.append((begin, end))
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            return "the tensors overlap or leave gaps in the data"
        position = end
    if position != data_bytes:
        return f"the tensors take {position:,} of the {data_bytes:,} bytes of data"
    return None
