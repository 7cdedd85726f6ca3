"""Round-to-nearest (RTN) uniform quantization: the floor every other quantizer must beat."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tensorpress.methods.base import LayerInput, MethodConfig, register_method
from tensorpress.parts import Part, QuantizedPart
from tensorpress.parts.quant_math import compute_grid, compute_grid_mse, quantize_with_grid


class QuantSettings(MethodConfig):
    """Settings every uniform weight quantizer shares."""

    bits: int = Field(4, ge=2, le=8, description="bits per weight code (2..8)")
    group_size: int | None = Field(
        128,
        ge=1,
        description="weights per scale along the input dimension; null = one scale per output "
        "channel; a group size that does not divide the input dimension leaves a shorter last group",
    )
    symmetric: bool = Field(False, description="symmetric grid (no stored zero point)")
    mse: bool = Field(
        False,
        description="search each group's clipping range (80 shrink factors, error norm 2.4) "
        "instead of using its min/max",
    )

    def grid_for(self, weight):
        """The grid of ``weight`` under these settings (min/max, or the MSE search)."""
        if self.mse:
            return compute_grid_mse(weight, self.bits, self.group_size, self.symmetric)
        return compute_grid(weight, self.bits, self.group_size, self.symmetric)


@register_method
class RTN(QuantSettings):
    name = "rtn"
    summary = "round-to-nearest uniform quantization (per channel or per group), no calibration"

    method: Literal["rtn"] = "rtn"

    def apply(self, layer: LayerInput) -> list[Part]:
        grid = self.grid_for(layer.weight)
        return [QuantizedPart(quantize_with_grid(layer.weight, grid), grid)]
