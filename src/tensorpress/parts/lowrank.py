"""``LowRankPart``: a rank-r weight ``A @ B`` (A: out x r, B: r x in), run as two thin matmuls.

The factors are stored as float32, float16 (default) or int8 codes with one float16 scale per
rank component (a column of ``A``, a row of ``B``: symmetric, ``w = code * scale``). Balanced
factors (``A = U sqrt(S)``, ``B = sqrt(S) V^T``) keep both at the same magnitude, which is what
makes 8-bit factors cheap in accuracy. ``nbits`` counts every code and scale.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tensorpress.parts.base import Part, register_part
from tensorpress.parts.meta import LowRankMeta

FACTOR_BITS = (8, 16, 32)
_SCALE_DTYPE = torch.float16


def _int8_rows(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes of each row of ``m`` with a float16 scale per row."""
    scale = (m.abs().amax(dim=1) / 127).clamp(min=1e-8).to(_SCALE_DTYPE)
    codes = torch.round(m / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return codes, scale


@register_part
class LowRankPart(Part):
    kind = "lowrank"
    meta_schema = LowRankMeta

    def __init__(self, a: torch.Tensor, b: torch.Tensor, factor_bits: int = 16) -> None:
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise ValueError(f"low-rank factors must be (out, r) and (r, in); got {tuple(a.shape)} and {tuple(b.shape)}")
        if factor_bits not in FACTOR_BITS:
            raise ValueError(f"factor_bits must be one of {FACTOR_BITS}, got {factor_bits}")
        super().__init__(a.shape[0], b.shape[1])
        self.rank = a.shape[1]
        self.factor_bits = factor_bits
        a, b = a.detach().float(), b.detach().float()
        if factor_bits == 8:
            a_codes, a_scale = _int8_rows(a.T)  # per rank component: rows of A^T
            b_codes, b_scale = _int8_rows(b)
            self.register_buffer("a_codes", a_codes.T.contiguous())
            self.register_buffer("b_codes", b_codes)
            self.register_buffer("a_scale", a_scale)
            self.register_buffer("b_scale", b_scale)
        else:
            dtype = torch.float16 if factor_bits == 16 else torch.float32
            self.register_buffer("a", a.to(dtype).contiguous())
            self.register_buffer("b", b.to(dtype).contiguous())

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` as float32, exactly as stored."""
        if self.factor_bits == 8:
            return self.a_codes.float() * self.a_scale.float()[None, :], self.b_codes.float() * self.b_scale.float()[:, None]
        return self.a.float(), self.b.float()

    def dense(self) -> torch.Tensor:
        if self.rank == 0:
            return torch.zeros(self.shape)
        a, b = self.factors()
        return a @ b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.factors()
        return nn.functional.linear(nn.functional.linear(x, b.to(x.dtype)), a.to(x.dtype))

    def nbits(self) -> int:
        codes = self.rank * (self.out_features + self.in_features) * self.factor_bits
        scales = 2 * self.rank * 16 if self.factor_bits == 8 else 0
        return codes + scales

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        names = ("a_codes", "b_codes", "a_scale", "b_scale") if self.factor_bits == 8 else ("a", "b")
        meta = {"factor_bits": self.factor_bits, "shape": list(self.shape), "rank": self.rank}
        return {n: getattr(self, n).contiguous() for n in names}, meta

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> LowRankPart:
        bits = int(meta["factor_bits"])
        if bits not in FACTOR_BITS:
            raise ValueError(f"low-rank part: factor_bits {bits} is not one of {FACTOR_BITS}")
        out_f, in_f = meta["shape"]
        rank = int(meta["rank"])
        part = cls(torch.zeros(out_f, rank), torch.zeros(rank, in_f), bits)
        names = ("a_codes", "b_codes", "a_scale", "b_scale") if bits == 8 else ("a", "b")
        for name in names:
            stored = tensors[name]
            expected = getattr(part, name)
            if stored.shape != expected.shape or stored.dtype != expected.dtype:
                raise ValueError(
                    f"low-rank part: tensor {name!r} is {tuple(stored.shape)} {stored.dtype}, "
                    f"expected {tuple(expected.shape)} {expected.dtype}"
                )
            setattr(part, name, stored.clone())
        return part

    def describe(self) -> str:
        kind = {8: "int8", 16: "fp16", 32: "fp32"}[self.factor_bits]
        return f"lowrank r{self.rank} {kind}"

    @staticmethod
    def break_even_rank(out_features: int, in_features: int) -> float:
        """Rank at which the factors hold as many numbers as the dense weight."""
        return out_features * in_features / (out_features + in_features)
