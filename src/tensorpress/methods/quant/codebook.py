"""Non-uniform (codebook) quantizers: NF4 and SqueezeLLM-style weighted k-means."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from tensorpress.methods.base import LayerInput, MethodConfig, register_method
from tensorpress.methods.quant.codebook_math import quantize_kmeans, quantize_nf4
from tensorpress.parts import Part
from tensorpress.parts.codebook import CodebookPart


@register_method
class NF4(MethodConfig):
    name: ClassVar[str] = "nf4"
    summary: ClassVar[str] = "4-bit NormalFloat levels with one float16 absmax scale per group (QLoRA), no calibration"

    method: Literal["nf4"] = "nf4"
    group_size: int | None = Field(64, ge=1, description="weights per absmax scale along the input dimension; null = per output channel")

    def apply(self, layer: LayerInput) -> list[Part]:
        codes, codebook, scales = quantize_nf4(layer.weight, self.group_size)
        return [CodebookPart(codes, codebook, scales, self.group_size)]


@register_method
class KMeans(MethodConfig):
    name: ClassVar[str] = "kmeans"
    summary: ClassVar[str] = "k-means codebook of 2^bits float16 levels weighted by activation energy (SqueezeLLM-style)"
    needs: ClassVar[frozenset[str]] = frozenset({"act_sq"})

    method: Literal["kmeans"] = "kmeans"
    bits: int = Field(4, ge=2, le=8, description="bits per code: 2^bits levels")
    per_row: bool = Field(False, description="one codebook per output row instead of one per tensor")
    weighted: bool = Field(True, description="weigh each input column by its mean squared activation")

    def apply(self, layer: LayerInput) -> list[Part]:
        importance = None
        if self.weighted:
            importance = layer.stats["act_sq"] / max(layer.stats["tokens"], 1)
        codes, codebook = quantize_kmeans(layer.weight, self.bits, importance, self.per_row)
        return [CodebookPart(codes, codebook)]
