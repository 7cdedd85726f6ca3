"""``MaskedPart``: a pruned weight — a mask of kept positions and the kept values.

The mask is stored either as a bitmask (one bit per weight) or, for an N:M pattern (N weights
kept in every group of M consecutive inputs), as one combination index per group, of
``ceil(log2(C(M, N)))`` bits (2:4: 3 bits per 4 weights, 0.75 bits/weight). The kept values are
float16, or quantized (codes of the kept weights only, at ``bits`` each, plus the grid's scales
and zero points over the full matrix's groups). ``nbits`` counts exactly what ``state`` saves.
"""

from __future__ import annotations

import math
from functools import cache
from itertools import combinations
from typing import Any

import torch

from tensorpress.parts.base import Part, dtype_bits, register_part
from tensorpress.parts.meta import MaskedMeta
from tensorpress.parts.packing import pack_bits, pack_wide, unpack_bits, unpack_wide
from tensorpress.parts.quant_math import QuantGrid, dequantize


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """``"2:4"`` -> ``(2, 4)`` (N kept of every M); ``None``/``"unstructured"`` -> ``None``."""
    if pattern is None or pattern == "unstructured":
        return None
    try:
        n, m = (int(x) for x in pattern.split(":"))
    except ValueError:
        raise ValueError(f"pattern must be 'unstructured' or 'N:M' (e.g. '2:4'), got {pattern!r}") from None
    if not 0 < n < m <= 16:
        raise ValueError(f"pattern {pattern!r}: need 0 < N < M <= 16")
    return n, m


@cache
def _combinations(n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All M-bit masks with N bits set, in lexicographic order of their positions (as ints),
    and the inverse lookup from a mask int to its index (-1 where invalid)."""
    masks = torch.tensor([sum(1 << p for p in c) for c in combinations(range(m), n)], dtype=torch.int64)
    lookup = torch.full((1 << m,), -1, dtype=torch.int64)
    lookup[masks] = torch.arange(masks.numel())
    return masks, lookup


def nm_index_bits(n: int, m: int) -> int:
    return max(1, math.ceil(math.log2(math.comb(m, n))))


def encode_nm(mask: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Combination index of every group of ``m`` inputs (int64, out x in/m); errors if a group
    does not keep exactly ``n``."""
    out_f, in_f = mask.shape
    if in_f % m:
        raise ValueError(f"an {n}:{m} pattern needs the input dimension ({in_f}) divisible by {m}")
    groups = mask.reshape(out_f, in_f // m, m).to(torch.int64)
    ints = (groups << torch.arange(m)).sum(-1)
    _, lookup = _combinations(n, m)
    index = lookup[ints]
    if (index < 0).any():
        raise ValueError(f"the mask does not keep exactly {n} of every {m} weights")
    return index


def decode_nm(index: torch.Tensor, n: int, m: int, shape: tuple[int, int]) -> torch.Tensor:
    masks, _ = _combinations(n, m)
    if index.numel() and (index.min() < 0 or index.max() >= masks.numel()):
        raise ValueError(f"an {n}:{m} combination index is out of range")
    ints = masks[index]
    return (((ints.unsqueeze(-1) >> torch.arange(m)) & 1).bool()).reshape(shape)


@register_part
class MaskedPart(Part):
    kind = "masked"
    meta_schema = MaskedMeta

    def __init__(
        self,
        mask: torch.Tensor,
        values: torch.Tensor | None = None,
        *,
        pattern: tuple[int, int] | None = None,
        codes: torch.Tensor | None = None,
        grid: QuantGrid | None = None,
    ) -> None:
        super().__init__(*mask.shape)
        if (values is None) == (codes is None):
            raise ValueError("give either float values or quantized codes with their grid")
        self.pattern = pattern
        if pattern is not None:
            encode_nm(mask, *pattern)  # validates the pattern
        self.register_buffer("mask", mask.bool().contiguous())
        # in memory: full (out, in) tensors; only the kept positions are stored on disk
        self.register_buffer("values", None if values is None else (values * mask).to(torch.float16).contiguous())
        self.register_buffer("codes", None if codes is None else codes.to(torch.uint8).contiguous())
        self.grid_settings = None
        if codes is not None:
            if grid is None:
                raise ValueError("quantized values need their grid")
            self.register_buffer("scales", grid.scales.contiguous())
            self.register_buffer("zeros", None if grid.zeros is None else grid.zeros.contiguous())
            self.grid_settings = (grid.bits, grid.group_size, grid.symmetric)

    @property
    def kept(self) -> int:
        return int(self.mask.sum())

    @property
    def sparsity(self) -> float:
        return 1.0 - self.kept / self.mask.numel()

    @property
    def grid(self) -> QuantGrid | None:
        if self.grid_settings is None:
            return None
        bits, group_size, symmetric = self.grid_settings
        return QuantGrid(self.scales, self.zeros, bits, group_size, symmetric)

    def dense(self) -> torch.Tensor:
        if self.values is not None:
            return self.values.float()
        return dequantize(self.codes, self.grid) * self.mask

    def mask_nbits(self) -> int:
        if self.pattern is None:
            return self.mask.numel()
        n, m = self.pattern
        return self.out_features * (self.in_features // m) * nm_index_bits(n, m)

    def nbits(self) -> int:
        total = self.mask_nbits()
        if self.values is not None:
            return total + self.kept * 16
        bits = self.grid_settings[0]
        total += self.kept * bits + self.scales.numel() * dtype_bits(self.scales.dtype)
        if self.zeros is not None:
            total += self.zeros.numel() * bits
        return total

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        meta: dict[str, Any] = {"shape": list(self.shape), "pattern": None if self.pattern is None else list(self.pattern)}
        if self.pattern is None:
            tensors = {"mask": pack_bits(self.mask.reshape(-1).to(torch.uint8), 1)}
        else:
            tensors = {"mask": pack_wide(encode_nm(self.mask, *self.pattern).reshape(-1), nm_index_bits(*self.pattern))}
        if self.values is not None:
            tensors["values"] = self.values[self.mask]
        else:
            bits, group_size, symmetric = self.grid_settings
            tensors["codes"] = pack_bits(self.codes[self.mask], bits)
            tensors["scales"] = self.scales
            if self.zeros is not None:
                tensors["zeros"] = pack_bits(self.zeros, bits)
            meta.update(bits=bits, group_size=group_size, symmetric=symmetric)
        return tensors, meta

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> MaskedPart:
        out_f, in_f = meta["shape"]
        pattern = tuple(meta["pattern"]) if meta.get("pattern") else None
        if pattern is None:
            mask = unpack_bits(tensors["mask"], 1, out_f * in_f).reshape(out_f, in_f).bool()
        else:
            n, m = pattern
            count = out_f * (in_f // m)
            mask = decode_nm(unpack_wide(tensors["mask"], nm_index_bits(n, m), count), n, m, (out_f, in_f))
        kept = int(mask.sum())
        if "values" in tensors:
            if tensors["values"].numel() != kept:
                raise ValueError(f"{tensors['values'].numel()} stored values for {kept} kept weights")
            values = torch.zeros(out_f, in_f, dtype=torch.float16)
            values[mask] = tensors["values"].to(torch.float16)
            return cls(mask, values, pattern=pattern)
        bits = int(meta["bits"])
        codes = torch.zeros(out_f, in_f, dtype=torch.uint8)
        codes[mask] = unpack_bits(tensors["codes"], bits, kept)
        scales = tensors["scales"]
        zeros = unpack_bits(tensors["zeros"], bits, scales.numel()).reshape(scales.shape) if "zeros" in tensors else None
        grid = QuantGrid(scales, zeros, bits, meta["group_size"], bool(meta["symmetric"]))
        grid.check((out_f, in_f))
        return cls(mask, pattern=pattern, codes=codes, grid=grid)

    def describe(self) -> str:
        shape = "unstructured" if self.pattern is None else f"{self.pattern[0]}:{self.pattern[1]}"
        values = "fp16" if self.values is not None else f"int{self.grid_settings[0]}"
        return f"pruned {self.sparsity:.0%} {shape} {values}"
