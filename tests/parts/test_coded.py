"""Entropy-coded codes (``CodesStorage``): coding is used only where it lowers the storage."""

import torch

from tensorpress.parts import QuantizedPart
from tensorpress.parts.quant_math import QuantGrid


def _part(codes: torch.Tensor, bits: int) -> QuantizedPart:
    out_f, in_f = codes.shape
    return QuantizedPart(codes, QuantGrid(torch.ones(out_f, 1, dtype=torch.float16), None, bits, None, True))


def test_codes_that_would_code_larger_than_packed_stay_packed():
    """Uniform 3-bit codes hold 3 bits each: coding can only add its header and table, so the
    part keeps the packed codes and its storage (a small layer of a 3-bit recipe grew by a byte)."""
    g = torch.Generator().manual_seed(0)
    part = _part(torch.randint(0, 8, (32, 128), generator=g, dtype=torch.uint8), 3)
    packed = part.nbits()
    part.entropy_code()
    assert not part.codes_coded and part.nbits() == packed
    part.entropy_code()  # idempotent either way
    assert part.nbits() == packed


def test_skewed_codes_are_coded_below_their_width():
    g = torch.Generator().manual_seed(0)
    codes = torch.randn(32, 128, generator=g).mul(0.8).round().clamp(-8, 7).add(8).to(torch.uint8)  # 4-bit, peaked
    part = _part(codes, 4)
    packed = part.nbits()
    part.entropy_code()
    assert part.codes_coded and part.nbits() < packed
    assert part.nbits() - 16 * 32 == len(part._coded_codes) * 8
