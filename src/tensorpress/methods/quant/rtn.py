"""Round-to-nearest (RTN) uniform quantization: the floor every other quantizer must beat."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from tensorpress.methods.base import LayerInput, MethodConfig, matches, register_method
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
        description="search each group's clipping range (40 shrink factors from 1 down to 0.22, error norm 2.4) "
        "instead of using its min/max",
    )

    bits_overrides: dict[str, Annotated[int, Field(ge=2, le=8)]] = Field(
        default_factory=dict,
        description="per-layer widths: {module-name pattern: bits}, first match wins (filled in "
        "by the allocation when target_bits is set)",
    )
    target_bits: float | None = Field(
        None,
        gt=1,
        le=8.5,
        description="choose each layer's width among bit_choices so that the average bits/weight "
        "(scales and zeros included) meets this target; needs calibration data",
    )
    bit_choices: list[Annotated[int, Field(ge=2, le=8)]] = Field(default_factory=lambda: [2, 3, 4, 8], description="widths the allocation may pick")
    allocation_samples: int = Field(16, ge=1, description="calibration windows used to measure layer sensitivities")
    sensitivity: Literal["fisher", "activations"] = Field(
        "fisher",
        description="layer sensitivity for the allocation: fisher = RTN error weighted by squared "
        "gradients of the LM loss (causal models); activations = RTN error weighted by mean "
        "squared inputs (no gradients; encoders too)",
    )

    def bits_for(self, name: str) -> int:
        """The width of the layer ``name``: an override if one matches, else ``bits``."""
        for pattern, bits in self.bits_overrides.items():
            if matches(name, [pattern]):
                return bits
        return self.bits

    def grid_for(self, weight, bits: int | None = None):
        """The grid of ``weight`` under these settings (min/max, or the MSE search)."""
        bits = self.bits if bits is None else bits
        if self.mse:
            return compute_grid_mse(weight, bits, self.group_size, self.symmetric)
        return compute_grid(weight, bits, self.group_size, self.symmetric)


@register_method
class RTN(QuantSettings):
    name = "rtn"
    summary = "round-to-nearest uniform quantization (per channel or per group), no calibration"

    method: Literal["rtn"] = "rtn"

    def apply(self, layer: LayerInput) -> list[Part]:
        grid = self.grid_for(layer.weight, self.bits_for(layer.name))
        return [QuantizedPart(quantize_with_grid(layer.weight, grid), grid)]
