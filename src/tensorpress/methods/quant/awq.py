"""AWQ (Lin et al., 2023): activation-aware per-input-channel scaling before quantization.

For each group of linears that read the same input, a scale ``s = mean|x| ** alpha``
(normalised so that ``max(s) * min(s) = 1``) is searched over ``alpha`` in ``[0, 1)``; the alpha
whose quantized weights ``Q(W s) / s`` give the least output error ``tr(dW H dW^T)`` on the
calibration inputs (``H = X^T X``) wins. The engine folds ``1/s`` into the module producing the
input (a norm, or the previous linear's rows), so the scaled model computes exactly what the
original did before quantization. With ``quantize: false`` the stage only scales, leaving dense
weights for a later stage (AWQ followed by GPTQ).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from tensorpress.methods.base import LayerInput, register_method
from tensorpress.methods.quant.rtn import QuantSettings
from tensorpress.parts import DensePart, Part


@register_method
class AWQ(QuantSettings):
    name: ClassVar[str] = "awq"
    summary: ClassVar[str] = "activation-aware scaling (searched per input-sharing group, folded exactly), then RTN"
    needs: ClassVar[frozenset[str]] = frozenset({"xtx", "act_abs"})

    method: Literal["awq"] = "awq"
    grid: int = Field(20, ge=2, le=200, description="alphas tried in [0, 1)")
    quantize: bool = Field(True, description="quantize after scaling (false: scale only, for a later stage such as gptq)")

    def input_scales(self, group: list[LayerInput]) -> torch.Tensor | None:
        stats = group[0].stats
        x_mean = (stats["act_abs"] / max(stats["tokens"], 1)).float()
        h = stats["xtx"].float()
        best_err, best_scale = float("inf"), None
        for k in range(self.grid):
            alpha = k / self.grid
            s = x_mean.pow(alpha).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            err = 0.0
            for layer in group:
                delta = self.round_trip(layer.weight * s, layer.name) / s - layer.weight  # (out, in)
                err += ((delta @ h) * delta).sum().item()
            if err < best_err:
                best_err, best_scale = err, s
        return best_scale

    def apply(self, layer: LayerInput) -> list[Part]:
        if not self.quantize:
            return [DensePart(layer.weight)]
        return self.rounded(layer.weight, layer.name)
