"""Outlier-aware quantization (SpQR / dense-and-sparse): GPTQ plus a sparse float16 part.

A first GPTQ pass measures each weight's sensitivity (GPTQ's own error metric); the
``outliers`` fraction with the highest sensitivity is then kept exactly in a ``SparsePart``
while a second GPTQ pass quantizes the rest with those weights out of the grids' ranges and
out of the error feedback. The sparse part's indices are counted in its bits.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator

from tensorpress.methods.base import LayerInput, register_method
from tensorpress.methods.quant.gptq import GPTQ
from tensorpress.methods.quant.gptq_math import gptq
from tensorpress.parts import Part, QuantizedPart, SparsePart


@register_method
class SpQR(GPTQ):
    name: ClassVar[str] = "spqr"
    summary: ClassVar[str] = "GPTQ with the most sensitive weights kept in a sparse float16 part (dense-and-sparse)"

    method: Literal["spqr"] = "spqr"
    outliers: float = Field(0.01, ge=0, le=0.2, description="fraction of weights kept exactly in the sparse part")

    @model_validator(mode="after")
    def _no_format(self):
        if self.format is not None or self.file_type is not None:
            raise ValueError("spqr keeps outliers beside a tensorpress grid; format and file_type (llama.cpp "
                             "types) apply to rtn, gptq and awq")
        return self

    def _run(self, layer: LayerInput, **extra) -> object:
        return gptq(
            layer.weight, layer.stats["xtx"], self.bits_for(layer.name), self.group_size, self.symmetric,
            act_order=self.act_order, damp=self.damp, block_size=self.block_size, mse=self.mse, **extra,
        )

    def apply(self, layer: LayerInput) -> list[Part]:
        k = round(self.outliers * layer.weight.numel())
        if k == 0:
            return super().apply(layer)
        first = self._run(layer, sensitivity=True)
        mask = torch.zeros(layer.weight.numel(), dtype=torch.bool)
        mask[torch.topk(first.sensitivity.reshape(-1), k).indices] = True
        mask = mask.reshape(layer.weight.shape)
        final = self._run(layer, outlier_mask=mask)
        return [QuantizedPart(final.codes, final.grid), SparsePart.from_dense_mask(final.outliers, mask)]
