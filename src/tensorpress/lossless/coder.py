"""The compiled rANS coder (``_rans.c``) and its frequency tables.

``FrequencyTable.fit(counts)`` quantises empirical symbol counts to frequencies summing to
``2**precision`` (every present symbol at least 1), choosing the smallest precision whose
expected code length is within 0.1 % of the finest one (smaller decode tables; on whole
minilm-l6 tensors capping it lower did not decode faster). ``encode_symbols`` /
``decode_symbols`` run one chunk through the C coder; ctypes releases the GIL for the call, so
chunks in different threads run in parallel.
"""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from tensorpress.errors import CodingError
from tensorpress.native import find_library, looked_for

PRECISIONS = range(10, 16)  # probability bits; <= 15 keeps every frequency in a uint16
LANES = 8  # interleaved rANS states, as compiled into _rans.c


@cache
def library() -> ctypes.CDLL:
    """The compiled coder, loaded once."""
    if sys.byteorder != "little":
        raise CodingError("tensorpress.lossless supports little-endian machines only")
    here = Path(__file__).parent
    lib = find_library(here, "_rans")
    if lib is None:
        raise CodingError(
            f"the compiled entropy coder is missing from {here} (looked for {looked_for('_rans')}); "
            "reinstall tensorpress from source with a C compiler present (pip install -e .)"
        )
    p, size = ctypes.c_void_p, ctypes.c_size_t
    lib.tp_rans_encode.argtypes = [p, size, p, p, ctypes.c_uint, ctypes.c_uint, p, size]
    lib.tp_rans_encode.restype = ctypes.c_long
    lib.tp_rans_decode.argtypes = [p, size, size, p, ctypes.c_uint, p, ctypes.c_int]
    lib.tp_rans_decode.restype = ctypes.c_int
    lib.tp_split.argtypes = [p, size, ctypes.c_int, ctypes.c_int, ctypes.c_int, p, p]
    lib.tp_split.restype = None
    lib.tp_decode_merge.argtypes = [p, size, size, p, ctypes.c_uint, p, ctypes.c_int, ctypes.c_int, ctypes.c_int, p]
    lib.tp_decode_merge.restype = ctypes.c_int
    return lib


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def entropy_bits(counts: np.ndarray) -> float:
    """Empirical Shannon entropy of a stream with these symbol counts, in bits (total)."""
    c = counts[counts > 0].astype(np.float64)
    if c.size == 0:
        return 0.0
    n = c.sum()
    return float(-(c * np.log2(c / n)).sum())


def _quantise(counts: np.ndarray, precision: int) -> np.ndarray:
    """Frequencies summing to 2**precision, >= 1 where counts > 0 (deterministic)."""
    total_f = 1 << precision
    present = counts > 0
    freq = np.floor(counts.astype(np.float64) * total_f / counts.sum()).astype(np.int64)
    freq[present & (freq == 0)] = 1
    excess = int(freq.sum()) - total_f
    order = np.argsort(-counts, kind="stable")  # most frequent first
    if excess < 0:
        freq[order[0]] -= excess
    else:
        for s in order:  # take back from the most frequent symbols, never below 1
            if excess == 0:
                break
            take = min(excess, int(freq[s]) - 1)
            freq[s] -= take
            excess -= take
    return freq


@dataclass(frozen=True)
class FrequencyTable:
    """Quantised frequencies of one stream's symbols (index = symbol)."""

    freq: np.ndarray  # uint32, length = alphabet size
    precision: int

    @classmethod
    def fit(cls, counts: np.ndarray) -> FrequencyTable:
        counts = np.asarray(counts, dtype=np.int64)
        if counts.sum() == 0:
            raise ValueError("cannot fit a frequency table to an empty stream")
        present = int((counts > 0).sum())
        usable = [p for p in PRECISIONS if (1 << p) >= present]
        if not usable:
            raise ValueError(f"{present} distinct symbols exceed the coder's {1 << PRECISIONS[-1]} slots")
        costs = {}
        for p in usable:
            f = _quantise(counts, p)
            nz = counts > 0
            costs[p] = float(-(counts[nz] * np.log2(f[nz] / (1 << p))).sum())
        best = costs[usable[-1]]
        precision = next(p for p in usable if costs[p] <= best * 1.001 + 1e-9)
        return cls(_quantise(counts, precision).astype(np.uint32), precision)

    @property
    def starts(self) -> np.ndarray:
        return (np.cumsum(self.freq, dtype=np.uint64) - self.freq).astype(np.uint32)

    def decode_table(self) -> np.ndarray:
        """One entry per slot, as the C ``slot_t``: symbol, its frequency, slot - its start."""
        symbols = np.repeat(np.arange(self.freq.size, dtype=np.uint32), self.freq)
        slots = np.arange(1 << self.precision, dtype=np.uint32)
        table = np.zeros((slots.size, 4), dtype=np.uint16)
        table[:, 0] = symbols
        table[:, 1] = self.freq[symbols]
        table[:, 2] = slots - self.starts[symbols]
        return table


def encode_symbols(symbols: np.ndarray, table: FrequencyTable) -> bytes:
    """rANS-code a uint16 array of symbols (each with a nonzero frequency in ``table``)."""
    symbols = np.ascontiguousarray(symbols, dtype=np.uint16)
    freq = np.ascontiguousarray(table.freq, dtype=np.uint32)
    starts = table.starts
    # worst case per symbol: precision bits plus renormalisation slack; plus the final states
    cap = 4 * LANES + 2 * (symbols.size * (table.precision + 1) // 16 + 2 * LANES + 2)
    out = np.empty(cap, dtype=np.uint8)
    n = library().tp_rans_encode(_ptr(symbols), symbols.size, _ptr(freq), _ptr(starts),
                                 freq.size, table.precision, _ptr(out), cap)
    if n < 0:
        raise CodingError("a symbol outside the frequency table, or the output buffer was too small")
    return out[:n].tobytes()


def decode_symbols(data: np.ndarray, n: int, table: FrequencyTable, decode_table: np.ndarray,
                   out: np.ndarray) -> None:
    """Decode ``n`` symbols from ``data`` (uint8 view) into ``out`` (uint16, or uint8 when every
    symbol fits a byte; length n)."""
    if out.dtype not in (np.uint8, np.uint16) or out.size < n or not out.flags.c_contiguous:
        raise ValueError(f"decode_symbols writes {n} contiguous uint8/uint16 values, got {out.dtype} x {out.size}")
    if out.dtype == np.uint8 and table.freq.size > 256:
        raise ValueError("an alphabet wider than a byte needs a uint16 output")
    rc = library().tp_rans_decode(_ptr(data), data.size, n, _ptr(decode_table), table.precision, _ptr(out),
                                  out.dtype.itemsize)
    if rc != 0:
        raise CodingError("the coded stream is inconsistent (corrupt or truncated)")


def decode_merge(data: np.ndarray, n: int, table: FrequencyTable, decode_table: np.ndarray, raw: np.ndarray,
                 width: int, shift: int, ebits: int, out: np.ndarray) -> None:
    """Decode ``n`` coded fields and merge them with their raw bits into ``out`` (uint8,
    ``n * width`` bytes), block by block in cache: :func:`decode_symbols` followed by the inverse of :func:`split_fields`."""
    if out.size < n * width or raw.size < (n * (8 * width - ebits) + 7) // 8:
        raise ValueError("output or raw buffer too small")
    rc = library().tp_decode_merge(_ptr(data), data.size, n, _ptr(decode_table), table.precision,
                                   _ptr(raw), width, shift, ebits, _ptr(out))
    if rc != 0:
        raise CodingError("the coded stream is inconsistent (corrupt or truncated)")


def split_fields(values: np.ndarray, width: int, shift: int, ebits: int) -> tuple[np.ndarray, np.ndarray]:
    """Exponent symbols (uint16) and packed raw bits (uint8) of raw little-endian values."""
    n = values.size // width
    symbols = np.empty(n, dtype=np.uint16)
    raw = np.zeros((n * (8 * width - ebits) + 7) // 8, dtype=np.uint8)
    library().tp_split(_ptr(values), n, width, shift, ebits, _ptr(symbols), _ptr(raw))
    return symbols, raw
