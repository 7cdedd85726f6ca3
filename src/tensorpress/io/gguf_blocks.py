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
