"""Exact storage accounting: bits per weight over the compressed linears and over the model.

Dense tensors count ``numel * dtype bits``; a compressed linear counts its parts' ``nbits``
(codes, scales, zero points, indices, masks). Tied tensors (a head sharing the embedding) are
counted once. Buffers that are not weights (position ids, rotary tables) are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tensorpress.parts import CompressedLinear
from tensorpress.parts.base import dtype_bits


@dataclass(frozen=True)
class SizeReport:
    linear_bits: int  # storage of the compressed linears' weights
    linear_weights: int  # number of weights those linears stand for
    model_bits: int  # storage of every parameter, compressed ones as their parts
    model_weights: int  # number of parameters the model stands for

    @property
    def bits_per_weight_linears(self) -> float:
        return self.linear_bits / self.linear_weights if self.linear_weights else float("nan")

    @property
    def bits_per_weight_model(self) -> float:
        return self.model_bits / self.model_weights

    @property
    def model_bytes(self) -> float:
        return self.model_bits / 8


def size_report(model: nn.Module) -> SizeReport:
    linears = [m for m in model.modules() if isinstance(m, CompressedLinear)]
    linear_bits = sum(m.weight_nbits() for m in linears)
    linear_weights = sum(m.in_features * m.out_features for m in linears)
    dense = list(model.parameters())  # deduplicated: a tied tensor appears once
    model_bits = linear_bits + sum(p.numel() * dtype_bits(p.dtype) for p in dense)
    model_weights = linear_weights + sum(p.numel() for p in dense)
    return SizeReport(linear_bits, linear_weights, model_bits, model_weights)
