"""``lossless``: entropy-code the integer codes of the parts earlier stages produced.

A stage after a quantizer (or a codebook method). It changes no weight: each part holding
``codes`` stores them rANS-coded with a per-tensor frequency table from now on, and its
``nbits`` (hence the reported bits per weight and the checkpoint on disk) falls to the coded
size. A 4-bit GPTQ code stream is far from uniform, so this costs nothing in accuracy and saves
a few tenths of a bit per weight; layers with no coded parts are left as they are.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from tensorpress.errors import RecipeError
from tensorpress.methods.base import LayerInput, MethodConfig, register_method
from tensorpress.parts import Part
from tensorpress.parts.coded import CodesStorage


@register_method
class EntropyCode(MethodConfig):
    name: ClassVar[str] = "lossless"
    summary: ClassVar[str] = "entropy-codes the integer codes of earlier stages' parts (rANS, exact; lowers bits/weight)"

    method: Literal["lossless"] = "lossless"

    def apply(self, layer: LayerInput) -> list[Part]:
        if layer.parts is None:
            raise RecipeError(
                f"lossless: {layer.name} is not compressed by an earlier stage; put lossless after a "
                "quantization stage, with targets that stage selected"
            )
        for part in layer.parts:
            if isinstance(part, CodesStorage):
                part.entropy_code()
        return list(layer.parts)
