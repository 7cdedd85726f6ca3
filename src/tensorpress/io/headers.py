"""Validation of the binary headers of weight files handed to tensorpress: safetensors and GGUF.

Both are read by libraries (``safetensors``, ``gguf``/``transformers``) that trust the counts
and offsets they find; a truncated or hostile file can make them allocate from a count, read
past the end or fail with an untyped error. Here every header is walked with bounds first:
counts bounded by the bytes that remain, dtypes and value types from allow-lists, every
tensor's extent consistent with its shape and inside the file. A violation is a
``CheckpointError`` naming the file and the field; a file that passes reads cleanly.
"""

from __future__ import annotations

import itertools
import json
import math
import mmap
import os
import struct
from pathlib import Path
from typing import Any

from tensorpress.errors import CheckpointError

MAX_HEADER = 100 << 20  # the safetensors library's own limit on a header
MAX_TENSORS = 1 << 20
MAX_DIMS = 8

# safetensors dtype -> bytes per element
SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
                      "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _fail(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}")


def safetensors_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a safetensors file after checking it against the file: a bounded
    length, an object of tensors with allow-listed dtypes and shapes whose byte ranges tile the
    data section exactly (no gaps, no overlaps, nothing past the end)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _fail(path, f"not a safetensors file: {size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER, size - 8):
            raise _fail(path, f"header length {n} exceeds the file ({size} bytes) or the {MAX_HEADER}-byte limit")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _fail(path, f"header is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise _fail(path, "header is not a JSON object")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise _fail(path, "__metadata__ must map strings to strings")
    data = size - 8 - n
    extents = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if len(header) > MAX_TENSORS:
            raise _fail(path, f"{len(header)} tensors, more than {MAX_TENSORS}")
        where = f"tensor {name[:80]!r}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise _fail(path, f"{where}: expected exactly dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES:
            raise _fail(path, f"{where}: dtype {dtype!r} is not one of {', '.join(SAFETENSORS_DTYPES)}")
        if not (isinstance(shape, list) and len(shape) <= MAX_DIMS and all(type(d) is int and 0 <= d <= data for d in shape)):
            raise _fail(path, f"{where}: shape {shape!r} is not a list of at most {MAX_DIMS} sizes within the file")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data):
            raise _fail(path, f"{where}: data_offsets {offsets!r} are not a range inside the {data}-byte data section")
        if math.prod(shape) * SAFETENSORS_DTYPES[dtype] != offsets[1] - offsets[0]:
            raise _fail(path, f"{where}: shape {shape} of {dtype} does not fill its {offsets[1] - offsets[0]} bytes")
        extents.append((offsets[0], offsets[1], name))
    extents.sort()
    end = 0
    for start, stop, name in extents:
        if start != end:
            raise _fail(path, f"tensor {name[:80]!r} starts at byte {start} of the data section, expected {end} (gap or overlap)")
        end = stop
    if end != data:
        raise _fail(path, f"the tensors cover {end} of the {data} data bytes")
    return header


# --- GGUF -----------------------------------------------------------------------------------

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
MAX_KV = 1 << 20
MAX_STRING = 1 << 24
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _Cursor:
    def __init__(self, path: Path, data: mmap.mmap) -> None:
        self.path, self.data, self.pos = path, data, 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise _fail(self.path, f"truncated GGUF: {what} needs {n} bytes at offset {self.pos}, the file has {len(self.data)}")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("<Q", what)
        if n > MAX_STRING:
            raise _fail(self.path, f"{what}: string of {n} bytes, more than {MAX_STRING}")
        try:
            return bytes(self.take(n, what)).decode("utf-8")
        except UnicodeDecodeError:
            raise _fail(self.path, f"{what}: not UTF-8") from None

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY and depth == 0:
            itype, count = self.unpack("<I", what), self.unpack("<Q", what)
            if itype not in _SCALARS and itype != _STRING:
                raise _fail(self.path, f"{what}: array of value type {itype}, accepted: scalars and strings")
            width = struct.calcsize(_SCALARS[itype]) if itype in _SCALARS else 8
            if count * width > len(self.data) - self.pos:
                raise _fail(self.path, f"{what}: array of {count} items does not fit in the remaining file")
            if itype in _SCALARS:
                self.pos += count * width  # numbers are not needed here, only their extent (checked above)
                return count
            return [self.string(f"{what}[{i}]") for i in range(count)]
        raise _fail(self.path, f"{what}: value type {vtype} is not a GGUF value type (0-12, arrays not nested)")


def gguf_header(path: str | os.PathLike) -> dict[str, Any]:
    """Walk a GGUF file's header with bounds: magic, version, key/value pairs (value types from
    the specification, no nested arrays), and the tensor table (at most 4 dimensions, known
    ggml types, every tensor's bytes aligned and inside the file). Returns ``{"version",
    "metadata": {key: value or array length}, "tensors": {name: (type name, shape)}}``."""
    path = Path(path)
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise _fail(path, "not a GGUF file: it is empty")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:  # a header walk reads no tensor data
            return _walk_gguf(path, data)


def _walk_gguf(path: Path, data: mmap.mmap) -> dict[str, Any]:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    cur = _Cursor(path, data)
    if bytes(cur.take(4, "magic")) != GGUF_MAGIC:
        raise _fail(path, "not a GGUF file (magic bytes)")
    version = cur.unpack("<I", "version")
    if version not in GGUF_VERSIONS:
        raise _fail(path, f"GGUF version {version}; this tensorpress reads versions {GGUF_VERSIONS}")
    n_tensors, n_kv = cur.unpack("<Q", "tensor count"), cur.unpack("<Q", "key/value count")
    if n_tensors > MAX_TENSORS or n_kv > MAX_KV:
        raise _fail(path, f"{n_tensors} tensors and {n_kv} key/value pairs, more than the limits {MAX_TENSORS}/{MAX_KV}")
    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"key {i}")
        metadata[key] = cur.value(cur.unpack("<I", f"type of {key!r}"), f"value of {key!r}")
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
        raise _fail(path, f"general.alignment {alignment!r} is not a power of two")
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    extents = []
    for i in range(n_tensors):
        name = cur.string(f"name of tensor {i}")
        n_dims = cur.unpack("<I", f"dimensions of {name!r}")
        if not 1 <= n_dims <= 4:
            raise _fail(path, f"tensor {name!r}: {n_dims} dimensions, accepted 1-4")
        shape = tuple(cur.unpack("<Q", f"shape of {name!r}") for _ in range(n_dims))
        tcode = cur.unpack("<I", f"type of {name!r}")
        offset = cur.unpack("<Q", f"offset of {name!r}")
        try:
            ttype = GGMLQuantizationType(tcode)
            block, type_size = GGML_QUANT_SIZES[ttype]
        except (ValueError, KeyError):
            raise _fail(path, f"tensor {name!r}: ggml type {tcode} is unknown") from None
        if name in tensors:
            raise _fail(path, f"tensor {name!r} is listed twice")
        if any(d == 0 or d > len(data) * 8 for d in shape) or shape[0] % block:
            raise _fail(path, f"tensor {name!r}: shape {shape} does not fit its type {ttype.name} (rows in blocks of {block})")
        nbytes = math.prod(shape) // block * type_size
        if offset % alignment:
            raise _fail(path, f"tensor {name!r}: offset {offset} is not aligned to {alignment}")
        tensors[name] = (ttype.name, shape)
        extents.append((offset, nbytes, name))
    start = -(-cur.pos // alignment) * alignment
    for offset, nbytes, name in extents:
        if start + offset + nbytes > len(data):
            raise _fail(path, f"tensor {name!r}: {nbytes} bytes at data offset {offset} run past the end of the file "
                              f"({len(data)} bytes; truncated?)")
    extents.sort()
    for (a, n, name), (b, _, other) in itertools.pairwise(extents):
        if a + n > b:
            raise _fail(path, f"tensors {name!r} and {other!r} overlap")
    return {"version": version, "metadata": metadata, "tensors": tensors}
