"""``SparsePart``: a few weights kept exactly (float16), anywhere in the matrix.

Stored row-compressed: ``counts`` (nonzeros per output row, ``ceil(log2(in + 1))`` bits each),
``cols`` (column of each nonzero, ``ceil(log2(in))`` bits each, rows in order) and ``values``
(float16). ``nbits`` counts exactly those bits — the index cost of outliers is never free.
"""

from __future__ import annotations

from typing import Any

import torch

from tensorpress.parts.base import Part, dtype_bits, register_part
from tensorpress.parts.meta import SparseMeta
from tensorpress.parts.packing import pack_wide, unpack_wide


def _bits_for(n: int) -> int:
    """Bits to write any integer in ``[0, n)``."""
    return max(1, (n - 1).bit_length())


@register_part
class SparsePart(Part):
    kind = "sparse"
    meta_schema = SparseMeta

    def __init__(self, shape: tuple[int, int], rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__(*shape)
        order = torch.argsort(rows * shape[1] + cols)
        self.register_buffer("rows", rows[order].to(torch.int32).contiguous())
        self.register_buffer("cols", cols[order].to(torch.int32).contiguous())
        self.register_buffer("values", values[order].to(torch.float16).contiguous())

    @classmethod
    def from_dense_mask(cls, weight: torch.Tensor, mask: torch.Tensor) -> SparsePart:
        rows, cols = mask.nonzero(as_tuple=True)
        return cls(tuple(weight.shape), rows, cols, weight[rows, cols])

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def dense(self) -> torch.Tensor:
        w = torch.zeros(self.out_features, self.in_features)
        w[self.rows.long(), self.cols.long()] = self.values.float()
        return w

    def nbits(self) -> int:
        return (
            self.out_features * _bits_for(self.in_features + 1)
            + self.nnz * (_bits_for(self.in_features) + dtype_bits(self.values.dtype))
        )

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        counts = torch.bincount(self.rows.long(), minlength=self.out_features)
        tensors = {
            "counts": pack_wide(counts, _bits_for(self.in_features + 1)),
            "cols": pack_wide(self.cols, _bits_for(self.in_features)),
            "values": self.values,
        }
        return tensors, {"shape": list(self.shape), "nnz": self.nnz}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> SparsePart:
        out_f, in_f = meta["shape"]
        counts = unpack_wide(tensors["counts"], _bits_for(in_f + 1), out_f)
        cols = unpack_wide(tensors["cols"], _bits_for(in_f), int(meta["nnz"]))
        rows = torch.repeat_interleave(torch.arange(out_f), counts)
        return cls((out_f, in_f), rows, cols, tensors["values"])

    def describe(self) -> str:
        return f"sparse fp16 {self.nnz / (self.out_features * self.in_features):.2%}"
