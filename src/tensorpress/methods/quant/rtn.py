"""Round-to-nearest (RTN) uniform quantization: the floor every other quantizer must beat."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from tensorpress.errors import RecipeError
from tensorpress.methods.base import LayerInput, MethodConfig, matches, register_method
from tensorpress.methods.quant.file_types import FileTypeName
from tensorpress.parts import BlockPart, Part, QuantizedPart
from tensorpress.parts.block_math import (
    K_FALLBACK,
    BlockFormat,
    block_format,
    dequantize_blocks,
    fit_block_grid,
    format_for_width,
    quantize_to_blocks,
)
from tensorpress.parts.quant_math import (
    compute_grid,
    compute_grid_mse,
    dequantize,
    quantize_with_grid,
)

FormatName = Literal["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "iq4_nl", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]
# settings a format fixes: setting them too is a contradiction, not a preference
_FORMAT_FIXES = ("bits", "group_size", "symmetric", "bits_overrides", "target_bits")


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

    format: FormatName | None = Field(
        None,
        description="quantize onto a llama.cpp type's own grid (q4_0, q4_1, q5_0, q5_1, q8_0, iq4_nl, "
        "or the two-level q2_k .. q6_k), so a GGUF export writes the codes as that type bit for bit; "
        "the format fixes bits, groups and zero points. Rows that do not split into the format's blocks "
        "take llama.cpp's own fallback: " + ", ".join(f"{k} -> {v}" for k, v in K_FALLBACK.items()),
    )
    format_overrides: dict[str, FormatName] = Field(
        default_factory=dict,
        description="per-layer formats: {module-name pattern: format}, first match wins (llama.cpp's "
        "mixes, e.g. q6_k for attention values and FFN down projections in a q4_k_m file)",
    )
    file_type: FileTypeName | None = Field(
        None,
        description="quantize every selected tensor onto the type llama.cpp's own quantizer gives it in a "
        "file of this type (q4_0 .. q8_0, q2_k, q3_k_s/m/l, q4_k_s/m, q5_k_s/m, q6_k): by role, block and row "
        "width, as its llama-quant.cpp mixes them, so files compare at equal size; the engine resolves it "
        "into format and format_overrides. A stage that also selects the embeddings and head gives them "
        "llama.cpp's type too (one table when they are tied)",
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
    format_choices: list[FormatName] | None = Field(
        None,
        min_length=2,
        description="with target_bits: the llama.cpp types the allocation may pick per layer (e.g. [q2_k, q3_k, "
        "q4_k, q6_k]) instead of bit_choices, each costed at its exact bits (super-block scales included, "
        "llama.cpp's fallback for rows off its blocks), so the result exports to GGUF exactly; the engine "
        "resolves it into format and format_overrides",
    )
    allocation_samples: int = Field(16, ge=1, description="calibration windows used to measure layer sensitivities")
    sensitivity: Literal["fisher", "activations"] = Field(
        "fisher",
        description="layer sensitivity for the allocation: fisher = RTN error weighted by squared "
        "gradients of the LM loss (causal models); activations = RTN error weighted by mean "
        "squared inputs (no gradients; encoders too)",
    )

    @model_validator(mode="after")
    def _format_fixes_the_grid(self):
        if self.file_type is not None:
            clash = [k for k in (*_FORMAT_FIXES, "format", "format_overrides") if k in self.model_fields_set]
            if clash:
                raise ValueError(f"file_type: {self.file_type} chooses every tensor's llama.cpp type; drop "
                                 f"{', '.join(clash)}")
            return self
        if self.format_choices is not None:
            if self.target_bits is None:
                raise ValueError("format_choices are the types the target_bits allocation picks from; set target_bits")
            clash = [k for k in ("format", "format_overrides", "bits", "group_size", "symmetric", "bits_overrides",
                                 "bit_choices") if k in self.model_fields_set]
            if clash:
                raise ValueError(f"format_choices lets the allocation choose each layer's llama.cpp type; drop "
                                 f"{', '.join(clash)}")
            return self
        if self.format is None and self.format_overrides:
            raise ValueError("format_overrides needs a format for the other layers")
        if self.format is not None:  # (None: an allocation's resolved copy saved with the choice it replaced)
            clash = [k for k in _FORMAT_FIXES if k in self.model_fields_set and getattr(self, k) not in (None, {})]
            if clash:
                raise ValueError(f"format: {self.format} fixes the grid; drop {', '.join(clash)} "
                                 "(or drop format for a tensorpress grid)")
        return self

    def format_for(self, name: str, in_features: int) -> BlockFormat | None:
        """The block format of the layer ``name`` (an override if one matches, else ``format``),
        llama.cpp's fallback where its rows do not split into the format's blocks; None
        without a format."""
        if self.file_type is not None:
            raise RecipeError(f"{name}: file_type {self.file_type} is resolved per tensor by the engine "
                              "(tp.compress) before a method runs")
        if self.format is None:
            return None
        chosen = next((f for p, f in self.format_overrides.items() if matches(name, [p])), self.format)
        fmt = format_for_width(block_format(chosen), in_features)
        if fmt is None:
            raise RecipeError(f"{name}: rows of {in_features} weights split into no llama.cpp block "
                              f"(format {chosen} needs a multiple of {block_format(chosen).block}, its "
                              "fallback one of 32); leave the layer out of this stage with exclude")
        return fmt

    def rounded(self, weight, name: str) -> list[Part]:
        """Round-to-nearest parts of ``weight`` for the layer ``name`` under these settings."""
        fmt = self.format_for(name, weight.shape[1])
        if fmt is not None:
            grid = fit_block_grid(weight, fmt, self.mse)
            return [BlockPart(quantize_to_blocks(weight, grid), grid)]
        grid = self.grid_for(weight, self.bits_for(name))
        return [QuantizedPart(quantize_with_grid(weight, grid), grid)]

    def round_trip(self, weight, name: str):
        """``weight`` rounded to its grid and back (float32), for searches that measure the error."""
        fmt = self.format_for(name, weight.shape[1])
        if fmt is not None:
            grid = fit_block_grid(weight, fmt, self.mse)
            return dequantize_blocks(quantize_to_blocks(weight, grid), grid)
        grid = self.grid_for(weight, self.bits_for(name))
        return dequantize(quantize_with_grid(weight, grid), grid)

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
        return self.rounded(layer.weight, layer.name)
