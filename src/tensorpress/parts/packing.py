"""Bit packing of small unsigned integer codes into bytes.

Codes of ``bits`` bits (1–8) are laid out as one little-endian bit stream: code ``i`` occupies
bits ``[i*bits, (i+1)*bits)`` of the stream, least significant bit first. The packed size is
exactly ``ceil(n * bits / 8)`` bytes, so the storage reported by ``nbits()`` is what is written.
"""

from __future__ import annotations

import numpy as np
import torch


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes needed to hold ``n`` codes of ``bits`` bits."""
    return (n * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a tensor of codes in ``[0, 2**bits)`` into a flat uint8 tensor."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    flat = codes.reshape(-1).to(torch.uint8).numpy()
    if flat.size and int(flat.max()) >= (1 << bits):
        raise ValueError(f"a code exceeds {bits} bits (max {int(flat.max())})")
    if bits == 8:
        return torch.from_numpy(flat.copy())
    # (n, bits) matrix of the codes' bits, least significant first, then one bit stream.
    shifts = np.arange(bits, dtype=np.uint8)
    bit_matrix = (flat[:, None] >> shifts) & 1
    return torch.from_numpy(np.packbits(bit_matrix.reshape(-1), bitorder="little"))


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` codes as a flat uint8 tensor."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    raw = packed.reshape(-1).to(torch.uint8).numpy()
    if raw.size < packed_nbytes(n, bits):
        raise ValueError(f"{raw.size} bytes cannot hold {n} codes of {bits} bits")
    if bits == 8:
        return torch.from_numpy(raw[:n].copy())
    stream = np.unpackbits(raw, bitorder="little", count=n * bits).reshape(n, bits)
    weights = (1 << np.arange(bits, dtype=np.uint16)).astype(np.uint16)
    return torch.from_numpy((stream.astype(np.uint16) @ weights).astype(np.uint8))


def pack_wide(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integers of up to 24 bits as a little-endian bit stream."""
    v = values.to(torch.int64)
    bit_cols = torch.stack([(v >> b) & 1 for b in range(bits)], dim=1).to(torch.uint8)  # (n, bits)
    return pack_bits(bit_cols.reshape(-1), 1)


def unpack_wide(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    bit_cols = unpack_bits(packed, 1, n * bits).reshape(n, bits).to(torch.int64)
    return (bit_cols << torch.arange(bits)).sum(dim=1)
