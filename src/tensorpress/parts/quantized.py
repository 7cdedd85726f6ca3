"""``QuantizedPart``: uniform integer codes with per-group float16 scales (and zero points).

In memory the codes are kept unpacked (uint8, one per weight) so that dequantization is a
cheap elementwise op; on disk they are bit-packed (see ``packing``), and ``nbits`` counts the
packed size exactly: ``out*in*bits`` for the codes, ``16`` per scale and ``bits`` per zero point.
"""

from __future__ import annotations

from typing import Any

import torch

from tensorpress.parts.base import Part, dtype_bits, register_part
from tensorpress.parts.coded import CodesStorage
from tensorpress.parts.kernels import KERNEL_MAX_TOKENS, PackedWeight, kernel_mode
from tensorpress.parts.meta import QuantizedMeta
from tensorpress.parts.packing import pack_bits, unpack_bits
from tensorpress.parts.quant_math import QuantGrid, dequantize


@register_part
class QuantizedPart(CodesStorage, Part):
    kind = "quantized"
    meta_schema = QuantizedMeta

    def __init__(self, codes: torch.Tensor, grid: QuantGrid) -> None:
        super().__init__(*codes.shape)
        if not 2 <= grid.bits <= 8:
            raise ValueError(f"bits must be in 2..8, got {grid.bits}")
        self.bits = grid.bits
        self.group_size = grid.group_size
        self.symmetric = grid.symmetric
        self.register_buffer("codes", codes.to(torch.uint8).contiguous())
        self.register_buffer("scales", grid.scales.contiguous())
        self.register_buffer("zeros", None if grid.zeros is None else grid.zeros.contiguous())
        self._packed: PackedWeight | None = None  # built on first use of a packed kernel
        self._packed_mode: str | None = None  # the kernel setting ``_packed`` was decided under

    @property
    def grid(self) -> QuantGrid:
        return QuantGrid(self.scales, self.zeros, self.bits, self.group_size, self.symmetric)

    def dense(self) -> torch.Tensor:
        return dequantize(self.codes, self.grid)

    def dense_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return dequantize(self.codes[rows], self.grid.rows(rows))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # decode runs this once per linear per token: the kernel path does as little as it can
        mode = kernel_mode()
        # (not when autograd must see the product: the kernels return plain tensors)
        if mode is not None and x.is_cpu and x.dtype in (torch.float32, torch.bfloat16) and not (x.requires_grad and torch.is_grad_enabled()):
            if self._packed_mode != mode:  # first use, or another backend asked for: (re)pack
                grid = self.grid
                self._packed = PackedWeight(self.codes, grid) if PackedWeight.supports(grid, self.out_features, self.in_features) else None
                self._packed_mode = mode
            if self._packed is not None and x.numel() <= KERNEL_MAX_TOKENS * self.in_features:
                return self._packed(x)
        return torch.nn.functional.linear(x, self.dense().to(x.dtype))

    def nbits(self) -> int:
        total = self.codes_nbits() + self.scales.numel() * dtype_bits(self.scales.dtype)
        if self.zeros is not None:
            total += self.zeros.numel() * self.bits
        return total

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        codes, coding = self.codes_state()
        tensors = {"codes": codes, "scales": self.scales}
        if self.zeros is not None:
            tensors["zeros"] = pack_bits(self.zeros, self.bits)
        meta = {
            "shape": list(self.shape),
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            **coding,
        }
        return tensors, meta

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> QuantizedPart:
        out_f, in_f = meta["shape"]
        bits = int(meta["bits"])
        codes, coded = cls.codes_from_state(tensors["codes"], meta, bits, (out_f, in_f))
        scales = tensors["scales"]
        zeros = None
        if "zeros" in tensors:
            zeros = unpack_bits(tensors["zeros"], bits, scales.numel()).reshape(scales.shape)
        grid = QuantGrid(scales, zeros, bits, meta["group_size"], bool(meta["symmetric"]))
        grid.check((out_f, in_f))
        part = cls(codes, grid)
        part._coded_codes = coded
        return part

    @classmethod
    def code_bits(cls, meta: dict[str, Any]) -> dict[str, int]:
        bits = int(meta["bits"])
        return {"zeros": bits} if meta.get("codes_coding") else {"codes": bits, "zeros": bits}

    def describe(self) -> str:
        group = "per-channel" if self.group_size is None else f"g{self.group_size}"
        coded = " coded" if self.codes_coded else ""
        return f"int{self.bits} {group} {'sym' if self.symmetric else 'asym'}{coded}"
