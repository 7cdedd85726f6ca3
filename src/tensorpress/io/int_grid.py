"""A compressed linear as plain integer codes on per-group scales and zero points.

The checkpoint formats of the GPU runtimes (compressed-tensors for vLLM, GPTQ for transformers
and friends) store one thing: ``W[r, c] = (q[r, c] - z[r, g]) * s[r, g]`` with ``g = c // group``.
``integer_grid`` finds that form for a layer whose weight *is* such a grid — one
``QuantizedPart``, or one ``BlockPart`` of a llama.cpp type without a level table (q4_0, q5_0,
q8_0, and the two-level q3_k / q6_k, whose sub-block scales ``d * sc`` are exact float32
numbers; the types with a minimum when every minimum is an integer multiple of its scale) —
and checks that it decodes to the layer's own weight bit for bit. Anything else (sums of parts,
sparse or low-rank parts, codebooks) has no such form and is reported with why.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tensorpress.parts import BlockPart, CompressedLinear, QuantizedPart
from tensorpress.parts.quant_math import effective_group, expand_groups


@dataclass(frozen=True)
class IntGrid:
    codes: torch.Tensor  # uint8 (out, in), in [0, 2**bits)
    scales: torch.Tensor  # float32 (out, G)
    zeros: torch.Tensor  # int16 (out, G), in [0, 2**bits)
    bits: int
    group: int  # columns per group; the last group of a row is shorter when it does not divide in
    symmetric: bool  # every zero is 2**(bits-1)
    per_channel: bool = False  # one group per row by the quantizer's settings (not a group that spans the row)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def divides(self) -> bool:
        """Whether the groups split every row evenly (formats without a group index need it)."""
        return self.shape[1] % self.group == 0

    def dense(self) -> torch.Tensor:
        """float32 ``(out, in)``: ``(q - z) * s``, the decode formula of every target format."""
        in_f = self.shape[1]
        zero = expand_groups(self.zeros.float(), in_f, self.group)
        scale = expand_groups(self.scales, in_f, self.group)
        return (self.codes.float() - zero) * scale

    def scales_as(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The scales in ``dtype``, or None if some scale is not a ``dtype`` number exactly."""
        cast = self.scales.to(dtype)
        return cast if torch.equal(cast.float(), self.scales) else None


def integer_grid(layer: CompressedLinear) -> IntGrid | str:
    """``layer``'s weight as codes on per-group scales and zero points, checked to decode to
    ``layer.dense()`` bit for bit, or a sentence saying why it has no such form."""
    parts = list(layer.parts)
    if len(parts) != 1:
        return f"its weight is a sum of {len(parts)} parts ({' + '.join(p.describe() for p in parts)})"
    part = parts[0]
    if isinstance(part, QuantizedPart):
        grid = part.grid
        zeros = grid.zero_points().to(torch.int16)
        found = IntGrid(part.codes, part.scales.float(), zeros, part.bits,
                        effective_group(part.in_features, part.group_size), part.symmetric, part.group_size is None)
    elif isinstance(part, BlockPart):
        found = _from_blocks(part)
        if isinstance(found, str):
            return found
    else:
        return f"it is {part.describe()}, not integer codes on a uniform grid"
    if not torch.equal(found.dense(), layer.dense()):
        return "its codes and scales do not decode to its weight bit for bit as (q - z) * s"
    return found


def _from_blocks(part: BlockPart) -> IntGrid | str:
    fmt = part.fmt
    if fmt.levels is not None:
        return f"{fmt.name}'s codes index a table of non-uniform levels"
    grid = part.grid
    scales = grid.sub_scales()
    offsets = grid.sub_offsets()
    if offsets is None:
        zeros = torch.full(scales.shape, fmt.offset, dtype=torch.int16)
        return IntGrid(part.codes, scales, zeros, fmt.bits, fmt.sub, fmt.offset == 1 << (fmt.bits - 1))
    # w = s * q + m: a zero point exists where -m / s is an integer in the code range
    zeros = torch.round(-offsets / scales)
    if not torch.equal(zeros * scales, -offsets) or zeros.min() < 0 or zeros.max() > fmt.maxq:
        return f"its {fmt.name} minima are not whole multiples of the block scales"
    return IntGrid(part.codes, scales, zeros.to(torch.int16), fmt.bits, fmt.sub, False)
