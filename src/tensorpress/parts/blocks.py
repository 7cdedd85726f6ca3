"""``BlockPart``: a weight in one of llama.cpp's block formats (math in ``block_math``).

Codes are kept unpacked (uint8, one per weight) in memory; on disk they are bit-packed, and
``nbits`` counts exactly what the format stores: ``bits`` per code, 16 per ``d`` (and per ``m``
or ``dmin``), ``scale_bits`` per sub-scale (and per minimum code) — 4.5 bits/weight for q4_0
and q4_k, the size of the tensor in a GGUF file.
"""

from __future__ import annotations

from typing import Any

import torch

from tensorpress.parts.base import Part, register_part
from tensorpress.parts.block_math import BlockGrid, block_format, dequantize_blocks
from tensorpress.parts.meta import BlockMeta
from tensorpress.parts.packing import pack_bits, unpack_bits


@register_part
class BlockPart(Part):
    kind = "blocks"
    meta_schema = BlockMeta

    def __init__(self, codes: torch.Tensor, grid: BlockGrid) -> None:
        super().__init__(*codes.shape)
        grid.check(tuple(codes.shape))
        self.fmt = grid.fmt
        self.register_buffer("codes", codes.to(torch.uint8).contiguous())
        self.register_buffer("d", grid.d.contiguous())
        self.register_buffer("sc", None if grid.sc is None else grid.sc.contiguous())
        self.register_buffer("m", None if grid.m is None else grid.m.contiguous())
        self.register_buffer("mn", None if grid.mn is None else grid.mn.contiguous())

    @property
    def grid(self) -> BlockGrid:
        return BlockGrid(self.fmt, self.d, self.sc, self.m, self.mn)

    @property
    def bits(self) -> int:
        return self.fmt.bits

    def dense(self) -> torch.Tensor:
        return dequantize_blocks(self.codes, self.grid)

    def dense_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return dequantize_blocks(self.codes[rows], self.grid.rows(rows))

    def nbits(self) -> int:
        n_sub = self.codes.numel() // self.fmt.sub
        total = self.codes.numel() * self.fmt.bits + self.d.numel() * 16
        if self.m is not None:
            total += self.m.numel() * 16
        total += n_sub * self.fmt.scale_bits * ((self.sc is not None) + (self.mn is not None))
        return total

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {"codes": pack_bits(self.codes, self.fmt.bits), "d": self.d}
        if self.sc is not None:  # signed codes stored biased by 2**(bits-1), so all are unsigned
            lo = self.fmt.sub_range()[0]
            tensors["sc"] = pack_bits((self.sc - lo).to(torch.uint8), self.fmt.scale_bits)
        if self.m is not None:
            tensors["m"] = self.m
        if self.mn is not None:
            tensors["mn"] = pack_bits(self.mn.to(torch.uint8), self.fmt.scale_bits)
        return tensors, {"shape": list(self.shape), "format": self.fmt.name}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> BlockPart:
        out_f, in_f = meta["shape"]
        fmt = block_format(meta["format"])
        if in_f % fmt.block:
            raise ValueError(f"rows of {in_f} weights do not split into {fmt.name}'s blocks of {fmt.block}")
        n_sub = out_f * in_f // fmt.sub

        def sub_codes(name: str, lo: int) -> torch.Tensor | None:
            if name not in tensors:
                return None
            codes = unpack_bits(tensors[name], fmt.scale_bits, n_sub).to(torch.int16) + lo
            return codes.reshape(out_f, in_f // fmt.sub)

        codes = unpack_bits(tensors["codes"], fmt.bits, out_f * in_f).reshape(out_f, in_f)
        sc = sub_codes("sc", fmt.sub_range()[0] if fmt.two_level else 0)
        grid = BlockGrid(fmt, tensors["d"], sc, tensors.get("m"), sub_codes("mn", 0))
        return cls(codes, grid)  # the constructor checks every field against the shape

    @classmethod
    def code_bits(cls, meta: dict[str, Any]) -> dict[str, int]:
        return {"codes": block_format(meta["format"]).bits}

    def describe(self) -> str:
        return f"{self.fmt.name} ({self.fmt.bits_per_weight():g} b/w)"
