"""ggml's 32-weight block types as exact containers of tensorpress' quantization grids.

Pure functions from a ``QuantizedPart``'s codes and grid to the bytes of a ggml tensor, and
back to floats through ``gguf.quants.dequantize`` to prove the two agree. No model, no file.

A ggml block holds 32 consecutive weights of one row with one float16 scale ``d`` (layouts as
documented by ``gguf/quants.py``; all little-endian):

=====  =====  ============================================  =====================
type   bytes  layout                                        weight
=====  =====  ============================================  =====================
Q4_0   18     ``d``, 16 bytes of nibbles                    ``d * (n - 8)``
Q4_1   20     ``d``, ``m`` (float16), 16 bytes of nibbles   ``d * n + m``
Q8_0   34     ``d``, 32 int8 ``q``                          ``d * q``
=====  =====  ============================================  =====================

Nibble order: byte ``j`` of a block holds element ``j`` in its low nibble and element
``j + 16`` in its high nibble.

tensorpress stores ``w = (code - zero) * scale`` per group of ``group_size`` weights along the
row. Every 32-block lies inside one group when the group length and the row length are
multiples of 32; then, per block, ``d = scale`` and

* Q8_0 holds the block when every ``code - zero`` is in ``[-128, 127]`` (``q = code - zero``);
* Q4_0 when every ``code - zero`` is in ``[-8, 7]`` (``n = code - zero + 8``);
* Q4_1 when every code is below 16 and ``m = -zero * scale`` is a float16 exactly
  (``n = code``; ``d * n + m`` then rounds to ``(code - zero) * scale`` in float32).

Those are checks on the values, not on the grid's flags: a symmetric 8-bit grid always fits
Q8_0 and a symmetric 4-bit grid Q4_0, a 3-bit grid (any zero) fits Q4_0, a 4-bit asymmetric
grid fits Q8_0 but only rarely Q4_1.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from tensorpress.parts.quant_math import effective_group

BLOCK = 32
Q4_0, Q4_1, Q8_0 = GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0
CANDIDATES = (Q4_0, Q4_1, Q8_0)  # by size: the first that holds a layer is the one written
CODE_BITS = {Q4_0: 4, Q4_1: 4, Q8_0: 8}  # the width of the grid a type is the natural home of


def bits_per_weight(qtype: GGMLQuantizationType) -> float:
    """Storage of a ggml type, scales (and minima) included: 4.5 for Q4_0, 8.5 for Q8_0."""
    block, nbytes = GGML_QUANT_SIZES[qtype]
    return 8 * nbytes / block


@dataclass(frozen=True)
class BlockGrid:
    """A quantized weight seen as 32-weight blocks: ``codes`` uint8 ``(out, nb, 32)``,
    ``offsets = code - zero`` int16 (same shape), and each block's zero point (int16) and scale
    (float16), ``(out, nb)``."""

    codes: torch.Tensor
    offsets: torch.Tensor
    zero: torch.Tensor
    scale: torch.Tensor

    def minima(self) -> torch.Tensor:
        # -zero*scale in float32: exact (an 8-bit integer times a float16 has at most 19 significant bits)
        return -(self.zero.float() * self.scale.float())


def block_grid(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int | None) -> BlockGrid | None:
    """The blocks of ``codes`` (uint8 ``(out, in)``) on the grid ``scales``/``zeros``
    (``(out, G)``, zeros as stored or implicit), or None when a block would straddle two
    groups (a group or row length that is not a multiple of 32)."""
    out_f, in_f = codes.shape
    group = effective_group(in_f, group_size)
    if in_f % BLOCK or group % BLOCK:
        return None
    of_block = torch.arange(in_f // BLOCK) * BLOCK // group  # the group each block lies in
    zero = zeros.to(torch.int16)[:, of_block]
    blocks = codes.reshape(out_f, in_f // BLOCK, BLOCK)
    offsets = blocks.to(torch.int16) - zero[..., None]
    return BlockGrid(blocks, offsets, zero, scales.to(torch.float16)[:, of_block])


def holds(qtype: GGMLQuantizationType, grid: BlockGrid) -> bool:
    """Whether ``qtype`` represents every weight of ``grid`` exactly."""
    if qtype == Q4_1:
        minima = grid.minima()
        return int(grid.codes.max()) <= 15 and torch.equal(minima.to(torch.float16).float(), minima)
    lo, hi = (-8, 7) if qtype == Q4_0 else (-128, 127)
    return int(grid.offsets.min()) >= lo and int(grid.offsets.max()) <= hi


def _nibbles(values: torch.Tensor) -> np.ndarray:
    """``(out, nb, 32)`` values in 0..15 -> ``(out, nb, 16)`` bytes: elements 0..15 in the low
    nibbles, 16..31 in the high ones."""
    values = values.to(torch.uint8)
    return (values[..., : BLOCK // 2] | (values[..., BLOCK // 2 :] << 4)).numpy()


def _f16_bytes(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().numpy().view(np.uint8).reshape(*t.shape, 2)


def encode(qtype: GGMLQuantizationType, grid: BlockGrid) -> np.ndarray:
    """The ggml bytes of ``grid`` as ``qtype``: uint8 ``(out, nb * type_size)``; call only
    where :func:`holds` is true."""
    if sys.byteorder != "little":  # ggml files are little-endian; the views below are native
        raise NotImplementedError("GGUF block export needs a little-endian machine")
    fields = [_f16_bytes(grid.scale)]
    if qtype == Q8_0:
        fields.append(grid.offsets.to(torch.int8).numpy().view(np.uint8))
    elif qtype == Q4_0:
        fields.append(_nibbles(grid.offsets + 8))
    elif qtype == Q4_1:
        fields += [_f16_bytes(grid.minima().to(torch.float16)), _nibbles(grid.codes)]
    else:
        raise ValueError(f"no block encoder for {qtype.name}")
    return np.concatenate(fields, axis=-1).reshape(grid.codes.shape[0], -1)


def decoded(data: np.ndarray, qtype: GGMLQuantizationType) -> torch.Tensor:
    """What a ggml reader gets back from ``data``: float32 ``(rows, in)``."""
    return torch.from_numpy(np.ascontiguousarray(dequantize(data, qtype), dtype=np.float32))


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal float32 tensors bit for bit (so ``-0.0`` differs from ``0.0``)."""
    a, b = a.float().contiguous(), b.float().contiguous()
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


# --- block formats (``parts.block_math``): every llama.cpp type a ``BlockPart`` can hold -----
#
# Byte layouts per block, as ``gguf/quants.py`` reads them (element e of a 256-weight block;
# "2-bit fields of 4 quarters" = e // 128 picks a 32-byte half... spelled out per type below).


def _f16(t: torch.Tensor) -> np.ndarray:
    """float16 ``(N,)`` -> ``(N, 2)`` bytes."""
    return t.reshape(-1).contiguous().numpy().view(np.uint8).reshape(-1, 2)


def _fields(v: np.ndarray, groups: int, width: int, per: int) -> np.ndarray:
    """``(N, groups * per)`` values of ``width`` bits -> ``(N, per)`` bytes: value ``k * per + j``
    in bits ``k * width ..`` of byte ``j`` (how ggml interleaves nibbles, 2-bit and 1-bit fields)."""
    v = v.reshape(v.shape[0], groups, per).astype(np.uint8)
    out = np.zeros((v.shape[0], per), dtype=np.uint8)
    for k in range(groups):
        out |= v[:, k] << np.uint8(k * width)
    return out


def _halves(v: np.ndarray, groups: int, width: int, per: int) -> np.ndarray:
    """The 256 values of a K block as two 128-value halves, each packed by :func:`_fields`."""
    n = v.shape[0]
    h = v.reshape(n * 2, 128)
    return _fields(h, groups, width, per).reshape(n, 2 * per)


def _k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 12 bytes of eight 6-bit scales and minima: bytes 0-3 hold scales 0-3 (low 6
    bits) and the top 2 bits of scales 4-7; bytes 4-7 the same for the minima; bytes 8-11 the
    low nibbles of scales 4-7 and (high nibble) of minima 4-7."""
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    lo = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    mid = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    hi = (sc[:, 4:] & 0xF) | ((mn[:, 4:] & 0xF) << 4)
    return np.concatenate([lo, mid, hi], axis=1)


def _q3_scales(sc: np.ndarray) -> np.ndarray:
    """Q3_K's 12 bytes of sixteen 6-bit scales stored +32: low nibbles in bytes 0-7 (scale i in
    byte i % 8, high nibble for i >= 8), the top 2 bits in bytes 8-11 (scale i in byte 8 + i % 4,
    bits 2 * (i // 4))."""
    u = (sc + 32).astype(np.uint8)
    return np.concatenate([_fields(u & 0xF, 2, 4, 8), _fields(u >> 4, 4, 2, 4)], axis=1)


def encode_blocks(codes: torch.Tensor, grid) -> tuple[np.ndarray, GGMLQuantizationType]:
    """The ggml bytes of a block-format weight (``parts.block_math``): uint8 ``(out, row
    bytes)`` and its ggml type."""
    if sys.byteorder != "little":
        raise NotImplementedError("GGUF block export needs a little-endian machine")
    fmt = grid.fmt
    qtype = GGMLQuantizationType[fmt.name.upper()]
    out_f = codes.shape[0]
    c = codes.reshape(-1, fmt.block).numpy()
    per = fmt.block // fmt.sub
    sc = None if grid.sc is None else grid.sc.reshape(-1, per).numpy()
    mn = None if grid.mn is None else grid.mn.reshape(-1, per).numpy()
    d = _f16(grid.d)
    m = None if grid.m is None else _f16(grid.m)
    name = fmt.name
    if name in ("q4_0", "iq4_nl"):
        fields = [d, _fields(c, 2, 4, 16)]
    elif name == "q4_1":
        fields = [d, m, _fields(c, 2, 4, 16)]
    elif name in ("q5_0", "q5_1"):
        qh = np.packbits((c >> 4).astype(np.uint8), axis=1, bitorder="little")
        fields = [d] + ([m] if name == "q5_1" else []) + [qh, _fields(c & 0xF, 2, 4, 16)]
    elif name == "q8_0":
        fields = [d, (c.astype(np.int16) - 128).astype(np.int8).view(np.uint8)]
    elif name == "q2_k":
        fields = [(sc | (mn << 4)).astype(np.uint8), _halves(c, 4, 2, 32), d, m]
    elif name == "q3_k":
        fields = [_fields(c >> 2, 8, 1, 32), _halves(c & 3, 4, 2, 32), _q3_scales(sc), d]
    elif name == "q4_k":
        fields = [d, m, _k_scales(sc, mn), _fields(c.reshape(-1, 64), 2, 4, 32).reshape(c.shape[0], 128)]
    elif name == "q5_k":
        ql = _fields((c & 0xF).reshape(-1, 64), 2, 4, 32).reshape(c.shape[0], 128)
        fields = [d, m, _k_scales(sc, mn), _fields(c >> 4, 8, 1, 32), ql]
    elif name == "q6_k":
        ql = _fields((c & 0xF).reshape(-1, 128), 2, 4, 64).reshape(c.shape[0], 128)
        fields = [ql, _halves(c >> 4, 4, 2, 32), sc.astype(np.int8).view(np.uint8), d]
    else:
        raise ValueError(f"no block encoder for {name}")
    data = np.concatenate([np.ascontiguousarray(f, dtype=np.uint8) for f in fields], axis=1)
    return data.reshape(out_f, -1), qtype


def _unfields(b: np.ndarray, groups: int, width: int) -> np.ndarray:
    """Inverse of :func:`_fields`: ``(N, per)`` bytes -> ``(N, groups * per)`` values."""
    mask = np.uint8((1 << width) - 1)
    return np.concatenate([(b >> np.uint8(k * width)) & mask for k in range(groups)], axis=1)


def _unhalves(b: np.ndarray, groups: int, width: int) -> np.ndarray:
    n = b.shape[0]
    return _unfields(b.reshape(n * 2, -1), groups, width).reshape(n, -1)


def _k_unscales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lo, mid, hi = b[:, :4], b[:, 4:8], b[:, 8:12]
    sc = np.concatenate([lo & 0x3F, (hi & 0xF) | ((lo >> 6) << 4)], axis=1)
    mn = np.concatenate([mid & 0x3F, (hi >> 4) | ((mid >> 6) << 4)], axis=1)
    return sc, mn


def decode_blocks(data: np.ndarray, fmt, shape: tuple[int, int]):
    """Inverse of :func:`encode_blocks`: a ggml tensor's bytes (uint8, ``out`` rows) in block
    format ``fmt`` -> ``(codes uint8 (out, in), BlockGrid)``; ``ValueError`` when the bytes do not
    have the size ``shape`` needs."""
    from tensorpress.parts.block_math import BlockGrid

    out_f, in_f = shape
    qtype = GGMLQuantizationType[fmt.name.upper()]
    block, nbytes = GGML_QUANT_SIZES[qtype]
    if in_f % block or data.size != out_f * in_f // block * nbytes:
        raise ValueError(f"{data.size} bytes are no {fmt.name} tensor of shape {shape}")
    b = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, nbytes)
    name = fmt.name

    def f16(lo: int) -> torch.Tensor:
        return torch.from_numpy(b[:, lo : lo + 2].copy().view(np.float16).reshape(out_f, -1))

    sc = mn = m = None
    if name in ("q4_0", "iq4_nl", "q8_0"):
        d = f16(0)
        codes = _unfields(b[:, 2:], 2, 4) if name != "q8_0" else (b[:, 2:].view(np.int8).astype(np.int16) + 128)
    elif name == "q4_1":
        d, m, codes = f16(0), f16(2), _unfields(b[:, 4:], 2, 4)
    elif name in ("q5_0", "q5_1"):
        at = 4 if name == "q5_1" else 2
        d, m = f16(0), (f16(2) if name == "q5_1" else None)
        high = np.unpackbits(b[:, at : at + 4], axis=1, bitorder="little")
        codes = _unfields(b[:, at + 4 :], 2, 4) | (high << 4)
    elif name == "q2_k":
        scales = b[:, :16]
        sc, mn = scales & 0xF, scales >> 4
        codes = _unhalves(b[:, 16:80], 4, 2)
        d, m = f16(80), f16(82)
    elif name == "q3_k":
        high = _unfields(b[:, :32], 8, 1)
        codes = _unhalves(b[:, 32:96], 4, 2) | (high << 2)
        u = _unfields(b[:, 96:104], 2, 4) | (_unfields(b[:, 104:108], 4, 2) << 4)
        sc = u.astype(np.int16) - 32
        d = f16(108)
    elif name in ("q4_k", "q5_k"):
        d, m = f16(0), f16(2)
        sc, mn = _k_unscales(b[:, 4:16])
        if name == "q4_k":
            codes = _unfields(b[:, 16:].reshape(-1, 32), 2, 4).reshape(b.shape[0], 256)
        else:
            low = _unfields(b[:, 48:].reshape(-1, 32), 2, 4).reshape(b.shape[0], 256)
            codes = low | (_unfields(b[:, 16:48], 8, 1) << 4)
    elif name == "q6_k":
        low = _unfields(b[:, :128].reshape(-1, 64), 2, 4).reshape(b.shape[0], 256)
        codes = low | (_unhalves(b[:, 128:192], 4, 2) << 4)
        sc = b[:, 192:208].view(np.int8).astype(np.int16)
        d = f16(208)
    else:
        raise ValueError(f"no block decoder for {name}")

    def sub(v):
        return None if v is None else torch.from_numpy(np.asarray(v, dtype=np.int16).reshape(out_f, in_f // fmt.sub))

    codes_t = torch.from_numpy(np.asarray(codes).astype(np.uint8).reshape(out_f, in_f))
    return codes_t, BlockGrid(fmt, d, sub(sc), m, sub(mn))
