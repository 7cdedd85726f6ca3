"""tp.lossless.encode / decode: bit-exact round trips, size against the Shannon bound, and
corruption that is detected instead of decoded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tensorpress as tp
from tensorpress.errors import CodingError
from tensorpress.lossless import decode, encode, encode_with_stats
from tensorpress.lossless import format as fmt
from tensorpress.lossless.coder import FrequencyTable

INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
FLOATS = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns as integers (so NaN payloads and -0.0 compare exactly)."""
    return t.contiguous().view(INT_VIEW[t.element_size()])


def assert_bit_exact(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(bits_of(a), bits_of(b))


@pytest.mark.parametrize("dtype", FLOATS)
def test_float_round_trip_is_bit_exact_with_special_values(dtype):
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(300, 170, generator=g) * 0.02).to(dtype)
    flat = t.view(-1)
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, -1e-45], dtype=torch.float64)
    flat[: specials.numel()] = specials.to(dtype)
    flat[-1] = torch.finfo(dtype).tiny / 4  # a denormal
    assert_bit_exact(decode(encode(t)), t)


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from(FLOATS), words=st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=400))
def test_any_bit_pattern_round_trips(dtype, words):
    """Random bit patterns: NaNs with payloads, infinities, denormals, both zeros."""
    raw = np.array(words, dtype=np.uint64).view(np.uint8)
    width = torch.empty((), dtype=dtype).element_size()
    t = torch.from_numpy(raw[: raw.size // width * width].copy()).view(dtype)
    assert_bit_exact(decode(encode(t)), t)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.bool, torch.int16, torch.int32, torch.int64])
def test_integer_and_bool_tensors_round_trip(dtype):
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, 2 if dtype == torch.bool else 16, (64, 33), generator=g).to(dtype)
    out = decode(encode(t))
    assert out.dtype == dtype and torch.equal(out, t)


def test_empty_and_scalar_tensors():
    for t in (torch.zeros(0, 5), torch.tensor(3.5), torch.tensor(7, dtype=torch.uint8)):
        assert_bit_exact(decode(encode(t)), t)


def test_non_contiguous_input_is_encoded_as_its_values():
    t = torch.randn(40, 30).t()
    assert_bit_exact(decode(encode(t)), t.contiguous())


def test_unsupported_dtype_and_type_are_clear_errors():
    with pytest.raises(CodingError, match="complex64"):
        encode(torch.zeros(3, dtype=torch.complex64))
    with pytest.raises(TypeError, match="ndarray"):
        encode(np.zeros(3))


def test_many_chunks_round_trip_in_parallel(monkeypatch):
    monkeypatch.setattr(fmt, "CHUNK", 1000)
    t = (torch.randn(10_007) * 0.05).to(torch.bfloat16)
    blob = encode(t)
    assert_bit_exact(decode(blob), t)


def test_bfloat16_size_is_near_the_field_wise_bound():
    t = (torch.randn(512, 512, generator=torch.Generator().manual_seed(2)) * 0.03).to(torch.bfloat16)
    blob, stats = encode_with_stats(t)
    assert stats.codec == "fields" and stats.coded_bits == len(blob) * 8
    assert stats.coded_bits <= stats.bound_bits * 1.005
    assert stats.bound_bits < 16 * t.numel() * 0.72  # a Gaussian's exponent carries ~3 bits, not 8


def test_codes_are_coded_below_their_nominal_width():
    """4-bit codes with a peaked histogram: fewer than 4 bits each, within 2 % of their entropy."""
    g = torch.Generator().manual_seed(3)
    codes = (torch.randn(256, 256, generator=g) * 2.5 + 7.5).round().clamp(0, 15).to(torch.uint8)
    blob, stats = encode_with_stats(codes)
    assert stats.codec == "symbols"
    assert stats.coded_bits < 4 * codes.numel()
    assert stats.coded_bits <= stats.coded_stream_entropy_bits * 1.02
    assert torch.equal(decode(blob), codes)


def test_incompressible_data_falls_back_to_raw():
    t = torch.randint(0, 256, (5000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    blob, stats = encode_with_stats(t)
    assert stats.codec == "raw" and len(blob) < t.numel() + 64
    assert torch.equal(decode(blob), t)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.uint8, torch.int32])
def test_every_flipped_byte_is_detected(dtype, monkeypatch):
    monkeypatch.setattr(fmt, "CHUNK", 512)
    g = torch.Generator().manual_seed(5)
    if dtype == torch.uint8:
        t = torch.randint(0, 8, (1500,), dtype=torch.uint8, generator=g)
    else:
        t = (torch.randn(1500, generator=g) * 3).to(dtype)
    blob = encode(t)
    for pos in range(0, len(blob), max(1, len(blob) // 300)):
        bad = bytearray(blob)
        bad[pos] ^= 0x10
        with pytest.raises(CodingError):
            decode(bytes(bad))


def test_truncated_and_padded_data_are_detected():
    blob = encode(torch.randn(5000).to(torch.bfloat16))
    for cut in (3, 10, len(blob) // 2, len(blob) - 1):
        with pytest.raises(CodingError):
            decode(blob[:cut])
    with pytest.raises(CodingError, match="padded"):
        decode(blob + b"\0")
    with pytest.raises(CodingError, match="not a tensorpress"):
        decode(b"PK\x03\x04" + blob[4:])


def test_frequency_table_sums_to_its_precision_and_keeps_rare_symbols():
    counts = np.array([10**9, 1, 0, 5, 3000], dtype=np.int64)
    table = FrequencyTable.fit(counts)
    assert int(table.freq.sum()) == 1 << table.precision
    assert (table.freq[counts > 0] >= 1).all() and table.freq[2] == 0


def test_public_api_is_on_the_package():
    assert tp.lossless.encode is encode and tp.lossless.decode is decode
