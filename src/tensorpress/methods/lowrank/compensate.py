"""Low-rank repair of a compressed weight.

* ``eora`` (EoRA): a stage after any other stage. The compression error ``W - W_hat`` of each
  layer is approximated at rank ``r`` in the eigenspace of its input activations (``X^T X =
  Q L Q^T``; truncation of ``(W - W_hat) Q L^1/2``, mapped back), so the directions the inputs
  actually use are repaired first; a ``LowRankPart`` is added to the layer's parts. Training-free.
  ``whiten: false`` is the plain-SVD compensation (weight-space truncation of the error).
* ``qlr`` (quantized + low-rank, LQ-LoRA / INT2.1 style): ``W ~ Q + A B`` found by alternating
  GPTQ quantization of ``W - A B`` with an activation-aware rank-``r`` fit of ``W - Q``.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from tensorpress.errors import RecipeError
from tensorpress.methods.base import LayerInput, register_method
from tensorpress.methods.lowrank.lowrank_math import hessian_root, truncate
from tensorpress.methods.lowrank.svd import LowRankSettings
from tensorpress.methods.quant.gptq import GPTQ
from tensorpress.parts import LowRankPart, Part, QuantizedPart
from tensorpress.parts.quant_math import dequantize


@register_method
class EoRA(LowRankSettings):
    name: ClassVar[str] = "eora"
    summary: ClassVar[str] = "adds a rank-r part fitting the earlier stages' error in the input activations' eigenspace (EoRA)"
    needs: ClassVar[frozenset[str]] = frozenset({"xtx"})

    method: Literal["eora"] = "eora"
    rank: int = Field(16, ge=0, description="rank of the compensation")
    whiten: bool = Field(True, description="fit the error in the activations' eigenspace (EoRA); false = plain SVD of the error")

    def apply(self, layer: LayerInput) -> list[Part]:
        if layer.parts is None:
            raise RecipeError(
                f"eora: {layer.name} is not compressed by an earlier stage; put eora after the "
                "stage whose error it should repair, with targets that stage selected"
            )
        if self.rank == 0:
            return list(layer.parts)
        error = layer.original.float() - layer.weight.float()
        root = hessian_root(layer.stats["xtx"], self.damp) if self.whiten else None
        a, b = truncate(error, self.rank, root)
        return [*layer.parts, LowRankPart(a, b, self.factor_bits)]


@register_method
class QLR(GPTQ):
    name: ClassVar[str] = "qlr"
    summary: ClassVar[str] = "quantized + low-rank: alternate GPTQ of W - AB and an activation-aware rank-r fit of W - Q"

    method: Literal["qlr"] = "qlr"
    rank: int = Field(8, ge=1, description="rank of the low-rank part")
    factor_bits: Literal[8, 16, 32] = Field(16, description="storage of the factors: int8 (+ a float16 scale per component), float16 or float32")
    iterations: int = Field(3, ge=1, le=20, description="alternations of quantization and low-rank fit")

    def apply(self, layer: LayerInput) -> list[Part]:
        w = layer.weight.float()
        xtx = layer.stats["xtx"]
        root = hessian_root(xtx, self.damp)
        a, b = truncate(w, self.rank, root)  # start from the activation-weighted principal part
        for _ in range(self.iterations):
            low = LowRankPart(a, b, self.factor_bits)
            codes, grid = self.quantize(w - low.dense(), xtx, layer.name)
            a, b = truncate(w - dequantize(codes, grid), self.rank, root)
        return [QuantizedPart(codes, grid), LowRankPart(a, b, self.factor_bits)]
