"""GPTQ: Hessian-aware quantization with error feedback (math in ``gptq_math``)."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from tensorpress.methods.base import LayerInput, register_method, row_ranges
from tensorpress.methods.quant.gptq_math import gptq_quantize
from tensorpress.methods.quant.rtn import QuantSettings
from tensorpress.parts import BlockPart, Part, QuantGrid, QuantizedPart
from tensorpress.parts.block_math import BlockGrid, fit_block_grid


@register_method
class GPTQ(QuantSettings):
    name: ClassVar[str] = "gptq"
    summary: ClassVar[str] = "GPTQ: quantize column by column, spreading each error through the inverse Hessian"
    needs: ClassVar[frozenset[str]] = frozenset({"xtx"})

    method: Literal["gptq"] = "gptq"
    act_order: bool = Field(True, description="process columns by decreasing Hessian diagonal (groups stay static, in natural order)")
    damp: float = Field(0.01, gt=0, le=1, description="damping added to the Hessian diagonal, relative to its mean")
    block_size: int = Field(128, ge=1, description="columns per lazy batch update (speed only)")

    def quantize(self, weight: torch.Tensor, xtx: torch.Tensor, name: str) -> tuple[torch.Tensor, QuantGrid | BlockGrid]:
        """``(codes, grid)`` of ``weight`` under these settings (the width or format ``name``
        gets). A block format's grid is fixed first from the original weights (its two-level
        scales included), then the column loop chooses the codes on it."""
        fmt = self.format_for(name, weight.shape[1])
        fixed = None if fmt is None else fit_block_grid(weight, fmt, self.mse)
        return gptq_quantize(
            weight, xtx, self.bits_for(name), self.group_size, self.symmetric,
            act_order=self.act_order, damp=self.damp, block_size=self.block_size, mse=self.mse, fixed=fixed,
        )

    @staticmethod
    def part(codes: torch.Tensor, grid: QuantGrid | BlockGrid) -> Part:
        return BlockPart(codes, grid) if isinstance(grid, BlockGrid) else QuantizedPart(codes, grid)

    def apply(self, layer: LayerInput) -> list[Part]:
        return [self.part(*self.quantize(layer.weight, layer.stats["xtx"], layer.name))]

    def apply_shared(self, layers: list[LayerInput]) -> list[list[Part]] | None:
        """Linears sharing a Hessian (q/k/v, gate/up) at the same width, as one stacked matrix:
        GPTQ treats rows independently given ``H`` (grids per row, column order and inverse
        Hessian from ``H`` alone), so this is the same algorithm with one column loop and one
        Cholesky instead of one per linear."""
        bits = {self.bits_for(layer.name) for layer in layers}
        formats = {self.format_for(layer.name, layer.weight.shape[1]) for layer in layers}
        if len(layers) < 2 or len(bits) != 1 or len(formats) != 1 or type(self).apply is not GPTQ.apply:  # subclasses make other parts
            return None
        stacked = torch.cat([layer.weight for layer in layers])
        codes, grid = self.quantize(stacked, layers[0].stats["xtx"], layers[0].name)
        return [[self.part(codes[rows].contiguous(), grid.rows(rows))] for rows in row_ranges(layers)]
