"""One tensor as a self-describing, checksummed, entropy-coded byte string.

Floating-point tensors (bfloat16, float16, float32, float64) are split into fields: the
exponent of every value, with its two leading mantissa bits, is rANS-coded with a per-tensor
frequency table; the sign and the other mantissa bits are stored packed and raw (they are close
to uniform). Byte tensors (uint8, int8, bool:
quantization codes, masks) are rANS-coded byte by byte. Anything else, empty tensors, and
tensors for which coding does not pay are stored raw. All of it is bit-exact: NaN payloads,
infinities, denormals and negative zero come back as they went in.

Layout (little-endian)::

    "TPLC" version:u8 codec:u8 dtype:u8 ndim:u8 shape:u64*ndim
    codec FIELDS:   width:u8 shift:u8 ebits:u8
    codec FIELDS/SYMBOLS:
                    precision:u8 alphabet:u16 present:u16 (symbol:u16 freq:u16)*present
                    chunk:u32 chunks:u32 (coded_bytes:u32 crc32:u32)*chunks
    codec RAW:      nbytes:u64 crc32:u32
    header_crc32:u32
    payload         per chunk: rANS words, then the chunk's packed raw bits

Chunks of ``CHUNK`` values are coded independently (their own rANS states and raw bit
stream), so a tensor decodes in parallel threads. Each chunk's CRC-32 covers its coded and raw
bytes and is checked before it is decoded; the coder also checks that every stream ends
exactly in its initial states. A flipped or missing byte is reported, never decoded.
"""

from __future__ import annotations

import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import cache

import numpy as np
import torch

from tensorpress.errors import CodingError
from tensorpress.lossless.coder import (
    FrequencyTable,
    decode_merge,
    decode_symbols,
    encode_symbols,
    entropy_bits,
    split_fields,
)

MAGIC = b"TPLC"
VERSION = 1
CHUNK = 1 << 18  # values per independently coded chunk: small enough that a 384 x 1536 tensor
# decodes on both threads, large enough that the per-chunk cost (48 bytes, one task) is noise
# (measured on minilm-l6 bf16: 2^18 decodes ~10 % faster than 2^16)
RAW, FIELDS, SYMBOLS = 0, 1, 2

# dtype code in the header -> torch dtype; codes are part of the format, never renumber
DTYPES: dict[int, torch.dtype] = {
    1: torch.float32, 2: torch.float16, 3: torch.bfloat16, 4: torch.float64,
    5: torch.uint8, 6: torch.int8, 7: torch.bool, 8: torch.int16, 9: torch.int32, 10: torch.int64,
}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}
# (bytes per value, shift and width of the coded field). The coded field is the exponent plus
# the two leading mantissa bits: within each binade a bell-shaped weight distribution makes those
# bits skewed (on minilm-l6 in bfloat16, coding them jointly with the exponent lowers the field-wise
# entropy from 10.61 to 10.55 bits per weight, per tensor); the remaining mantissa bits and the
# sign are close to uniform and are stored raw.
LEADING_MANTISSA_BITS = 2
FLOAT_FIELDS: dict[torch.dtype, tuple[int, int, int]] = {
    dtype: (width, mant - LEADING_MANTISSA_BITS, exp + LEADING_MANTISSA_BITS)
    for dtype, (width, mant, exp) in {
        torch.bfloat16: (2, 7, 8), torch.float16: (2, 10, 5), torch.float32: (4, 23, 8), torch.float64: (8, 52, 11),
    }.items()
}
BYTE_TYPES = (torch.uint8, torch.int8, torch.bool)


@dataclass(frozen=True)
class CodingStats:
    """What coding one tensor achieved, against the field-wise Shannon bound."""

    numel: int
    original_bits: int  # numel x dtype width
    coded_bits: int  # the whole encoding: header, tables, checksums, payload
    coded_stream_entropy_bits: float  # empirical entropy of the entropy-coded stream (exponents or bytes)
    raw_bits: int  # bits stored uncoded (sign + mantissa, or everything for RAW)
    codec: str

    @property
    def bound_bits(self) -> float:
        """Field-wise Shannon bound: entropy of the coded stream plus the raw fields."""
        return self.coded_stream_entropy_bits + self.raw_bits

    @property
    def bits_per_value(self) -> float:
        return self.coded_bits / self.numel if self.numel else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "bound_bits": self.bound_bits, "bits_per_value": self.bits_per_value}


@cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1), thread_name_prefix="tensorpress-lossless")


def _map(fn, items: list) -> list:
    """Run ``fn`` over chunks, in parallel threads when there is more than one."""
    if len(items) <= 1:
        return [fn(x) for x in items]
    return list(_pool().map(fn, items))


def _raw_bytes(t: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a flat uint8 array (little-endian, C order)."""
    t = t.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.zeros(0, dtype=np.uint8)


def _header_start(codec: int, t: torch.Tensor) -> bytes:
    return MAGIC + struct.pack(f"<BBBB{t.dim()}Q", VERSION, codec, DTYPE_CODES[t.dtype], t.dim(), *t.shape)


def _encode_raw(t: torch.Tensor, data: np.ndarray) -> bytes:
    payload = data.tobytes()
    header = _header_start(RAW, t) + struct.pack("<QI", len(payload), zlib.crc32(payload))
    return header + struct.pack("<I", zlib.crc32(header)) + payload


def encode_with_stats(t: torch.Tensor) -> tuple[bytes, CodingStats]:
    """:func:`encode`, plus what it achieved against the Shannon bound."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in DTYPE_CODES:
        raise CodingError(f"dtype {t.dtype} is not supported; supported: {sorted(str(d) for d in DTYPE_CODES)}")
    data = _raw_bytes(t)
    n = t.numel()
    width = t.element_size()

    def raw_result() -> tuple[bytes, CodingStats]:
        blob = _encode_raw(t, data)
        return blob, CodingStats(n, n * width * 8, len(blob) * 8, 0.0, n * width * 8, "raw")

    if n == 0 or (t.dtype not in FLOAT_FIELDS and t.dtype not in BYTE_TYPES):
        return raw_result()

    starts = list(range(0, n, CHUNK))
    if t.dtype in FLOAT_FIELDS:
        width, shift, ebits = FLOAT_FIELDS[t.dtype]
        codec, alphabet, rawbits = FIELDS, 1 << ebits, 8 * width - ebits
        pieces = _map(lambda s: split_fields(data[s * width:(s + CHUNK) * width], width, shift, ebits), starts)
        symbol_chunks = [p[0] for p in pieces]
        raw_chunks = [p[1] for p in pieces]
        extra = struct.pack("<BBB", width, shift, ebits)
    else:
        codec, alphabet, rawbits = SYMBOLS, 256, 0
        symbol_chunks = [data[s:s + CHUNK].astype(np.uint16) for s in starts]
        raw_chunks = [np.zeros(0, dtype=np.uint8)] * len(starts)
        extra = b""
    counts = sum(np.bincount(c, minlength=alphabet) for c in symbol_chunks)
    table = FrequencyTable.fit(counts)
    coded = _map(lambda c: encode_symbols(c, table), symbol_chunks)
    present = np.flatnonzero(table.freq)
    header = bytearray(_header_start(codec, t) + extra)
    header += struct.pack("<BHH", table.precision, alphabet, present.size)
    header += np.stack([present, table.freq[present]], axis=1).astype("<u2").tobytes()
    header += struct.pack("<II", CHUNK, len(starts))
    for c, r in zip(coded, raw_chunks, strict=True):
        header += struct.pack("<II", len(c), zlib.crc32(r.data, zlib.crc32(c)))
    header += struct.pack("<I", zlib.crc32(header))
    blob = b"".join([bytes(header), *(c + r.tobytes() for c, r in zip(coded, raw_chunks, strict=True))])
    stats = CodingStats(n, n * width * 8, len(blob) * 8, entropy_bits(counts), n * rawbits,
                        "fields" if codec == FIELDS else "symbols")
    if len(blob) >= len(data) + 64:  # coding does not pay (tiny or incompressible tensor)
        return raw_result()
    return blob, stats


def encode(t: torch.Tensor) -> bytes:
    """Losslessly encode one tensor; dtype and shape travel in the encoding."""
    return encode_with_stats(t)[0]


class _Reader:
    """Bounds-checked reads from the header."""

    def __init__(self, data: memoryview) -> None:
        self.data, self.pos = data, 0

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise CodingError(f"truncated: the header needs {self.pos + size} bytes, the data has {len(self.data)}")
        values = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return values


def decode(blob: bytes | bytearray | memoryview) -> torch.Tensor:
    """Inverse of :func:`encode`: the tensor, bit for bit, or :class:`CodingError`."""
    view = memoryview(blob).cast("B")
    r = _Reader(view)
    magic = bytes(view[:4])
    if magic != MAGIC:
        raise CodingError(f"not a tensorpress lossless encoding (starts with {magic!r}, expected {MAGIC!r})")
    r.pos = 4
    version, codec, dtype_code, ndim = r.take("<BBBB")
    if version > VERSION:
        raise CodingError(f"encoding version {version} is newer than this tensorpress reads ({VERSION})")
    if dtype_code not in DTYPES or codec not in (RAW, FIELDS, SYMBOLS):
        raise CodingError(f"unknown dtype code {dtype_code} or codec {codec} (corrupt header)")
    dtype = DTYPES[dtype_code]
    shape = r.take(f"<{ndim}Q")
    n = int(np.prod(shape, dtype=np.int64)) if ndim else 1
    itemsize = torch.empty((), dtype=dtype).element_size()
    if codec == RAW:
        nbytes, crc = r.take("<QI")
        _check_header(view, r)
        payload = view[r.pos:]
        if nbytes != n * itemsize or len(payload) != nbytes:
            raise CodingError(f"truncated or padded: {len(payload)} payload bytes, expected {n * itemsize}")
        if zlib.crc32(payload) != crc:
            raise CodingError("payload checksum mismatch (corrupt data)")
        out = np.frombuffer(payload, dtype=np.uint8).copy()
        return _as_tensor(out, dtype, shape)
    if codec == FIELDS:
        width, shift, ebits = r.take("<BBB")
        if (width, shift, ebits) != FLOAT_FIELDS.get(dtype):
            raise CodingError(f"field layout {(width, shift, ebits)} does not fit {dtype} (corrupt header)")
        rawbits = 8 * width - ebits
    else:
        width, shift, ebits, rawbits = 1, 0, 0, 0
    precision, alphabet, present = r.take("<BHH")
    pairs = np.array(r.take(f"<{2 * present}H"), dtype=np.uint32).reshape(present, 2)
    chunk, nchunks = r.take("<II")
    chunk_info = np.array(r.take(f"<{2 * nchunks}I"), dtype=np.int64).reshape(nchunks, 2)
    _check_header(view, r)
    freq = np.zeros(alphabet, dtype=np.uint32)
    if present and (pairs[:, 0] >= alphabet).any():
        raise CodingError("frequency table names a symbol outside the alphabet (corrupt header)")
    freq[pairs[:, 0]] = pairs[:, 1]
    if int(freq.sum()) != 1 << precision or chunk <= 0 or nchunks != -(-n // chunk):
        raise CodingError("inconsistent frequency table or chunk list (corrupt header)")
    table = FrequencyTable(freq, precision)
    dtable = table.decode_table()
    jobs = []
    pos = r.pos
    for i, (coded_len, crc) in enumerate(chunk_info):
        count = min(chunk, n - i * chunk)
        raw_len = (count * rawbits + 7) // 8
        jobs.append((i, pos, int(coded_len), raw_len, count, int(crc)))
        pos += int(coded_len) + raw_len
    if pos != len(view):
        raise CodingError(f"truncated or padded: {len(view)} bytes, the chunk list accounts for {pos}")
    out = np.empty(n * width, dtype=np.uint8)
    data = np.frombuffer(view, dtype=np.uint8)

    def run(job) -> None:
        i, start, coded_len, raw_len, count, crc = job
        piece = data[start:start + coded_len + raw_len]
        if zlib.crc32(piece) != crc:
            raise CodingError(f"chunk {i} of {nchunks}: checksum mismatch (corrupt data)")
        target = out[i * chunk * width:(i * chunk + count) * width]
        if codec == FIELDS:
            decode_merge(piece[:coded_len], count, table, dtable, piece[coded_len:], width, shift, ebits, target)
        else:
            decode_symbols(piece[:coded_len], count, table, dtable, target)

    _map(run, jobs)
    return _as_tensor(out, dtype, shape)


def _check_header(view: memoryview, r: _Reader) -> None:
    body_end = r.pos
    (crc,) = r.take("<I")
    if zlib.crc32(view[:body_end]) != crc:
        raise CodingError("header checksum mismatch (corrupt data)")


def _as_tensor(flat: np.ndarray, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if flat.size == 0:
        return torch.empty(shape, dtype=dtype)
    t = torch.from_numpy(flat)
    return (t.view(dtype) if dtype != torch.uint8 else t).reshape(shape)
