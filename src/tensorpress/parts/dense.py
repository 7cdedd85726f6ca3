"""``DensePart``: an uncompressed weight (or a dense residual) kept as it is."""

from __future__ import annotations

from typing import Any

import torch

from tensorpress.parts.base import Part, dtype_bits, register_part


@register_part
class DensePart(Part):
    kind = "dense"

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__(*weight.shape)
        self.register_buffer("weight", weight.detach().clone())

    def dense(self) -> torch.Tensor:
        return self.weight.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight.to(x.dtype))

    def nbits(self) -> int:
        return self.weight.numel() * dtype_bits(self.weight.dtype)

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {"weight": self.weight.contiguous()}, {}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> DensePart:
        return cls(tensors["weight"])

    def describe(self) -> str:
        return f"dense {str(self.weight.dtype).removeprefix('torch.')}"
