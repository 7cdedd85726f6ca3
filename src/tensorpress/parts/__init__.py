"""Part types, ``CompressedLinear``, bit packing and size accounting."""

from tensorpress.parts.base import PART_TYPES, Part, part_from_state, register_part
from tensorpress.parts.blocks import BlockPart
from tensorpress.parts.codebook import CodebookPart
from tensorpress.parts.dense import DensePart
from tensorpress.parts.linear import CompressedEmbedding, CompressedLinear, TiedHead
from tensorpress.parts.lowrank import LowRankPart
from tensorpress.parts.masked import MaskedPart
from tensorpress.parts.quant_math import QuantGrid
from tensorpress.parts.quantized import QuantizedPart
from tensorpress.parts.sparse import SparsePart

__all__ = [
    "PART_TYPES",
    "BlockPart",
    "CodebookPart",
    "CompressedEmbedding",
    "CompressedLinear",
    "DensePart",
    "LowRankPart",
    "MaskedPart",
    "Part",
    "QuantGrid",
    "QuantizedPart",
    "SparsePart",
    "TiedHead",
    "part_from_state",
    "register_part",
]
