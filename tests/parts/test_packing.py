import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tensorpress.parts.packing import pack_bits, packed_nbytes, unpack_bits


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(0, 300), seed=st.integers(0, 2**31 - 1))
def test_pack_round_trips_for_every_width(bits, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n,), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_nbytes(n, bits)
    assert torch.equal(unpack_bits(packed, bits, n), codes)


def test_pack_layout_is_little_endian_bit_stream():
    # codes 1, 2, 3 at 2 bits: bits 01 | 10 | 11 (LSB first) -> byte 0b00111001
    assert pack_bits(torch.tensor([1, 2, 3], dtype=torch.uint8), 2).tolist() == [0b00111001]


def test_pack_rejects_codes_too_wide():
    with pytest.raises(ValueError, match="exceeds 3 bits"):
        pack_bits(torch.tensor([8], dtype=torch.uint8), 3)


def test_unpack_rejects_short_buffer():
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_bits(torch.zeros(1, dtype=torch.uint8), 4, 3)
