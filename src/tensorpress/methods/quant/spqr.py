"""Outlier-aware quantization (SpQR / dense-and-sparse): GPTQ plus a sparse float16 part.

A first GPTQ pass measures each weight's sensitivity (GPTQ's own error metric); the
``outliers`` fraction with the highest sensitivity is then kept exactly in a ``SparsePart``
while a second GPTQ pass quantizes the rest with those weights out of the grids' ranges and
out of the error feedback. The sparse part's indices are counted in its bits. With ``format``
(or ``file_type``) the base is on a llama.cpp type's grid, fitted without the outliers.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from tensorpress.methods.base import LayerInput, register_method
from tensorpress.methods.quant.gptq import GPTQ
from tensorpress.methods.quant.gptq_math import gptq
from tensorpress.parts import Part, SparsePart
from tensorpress.parts.block_math import fit_block_grid


@register_method
class SpQR(GPTQ):
    name: ClassVar[str] = "spqr"
    summary: ClassVar[str] = "GPTQ with the most sensitive weights kept in a sparse float16 part (dense-and-sparse)"

    method: Literal["spqr"] = "spqr"
    outliers: float = Field(0.01, ge=0, le=0.2, description="fraction of weights kept exactly in the sparse part")

    def _run(self, layer: LayerInput, outlier_mask: torch.Tensor | None = None, **extra) -> object:
        fmt = self.format_for(layer.name, layer.weight.shape[1])
        fixed = None
        if fmt is not None:  # the base on a llama.cpp type's grid, fitted without the outliers
            fixed = fit_block_grid(_without(layer.weight, outlier_mask), fmt, self.mse)
        return gptq(
            layer.weight, layer.stats["xtx"], self.bits_for(layer.name), self.group_size, self.symmetric,
            act_order=self.act_order, damp=self.damp, block_size=self.block_size, mse=self.mse,
            outlier_mask=outlier_mask, fixed=fixed, **extra,
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
        return [self.part(final.codes, final.grid), SparsePart.from_dense_mask(final.outliers, mask)]


def _without(weight: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``weight`` with the masked outliers replaced by their row's mean of the other weights,
    so that they widen no block's range (zero would, in a block of one sign under a min)."""
    if mask is None:
        return weight
    keep = ~mask
    mean = (weight * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp(min=1)
    return torch.where(mask, mean, weight)
