import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tensorpress.parts import CompressedLinear, DensePart, QuantizedPart
from tensorpress.parts.quant_math import compute_grid, dequantize, num_groups, quantize_rtn, quantize_with_grid


def _weight(out_f=16, in_f=96, seed=0):
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=40, deadline=None)
@given(
    bits=st.integers(2, 8),
    group=st.sampled_from([None, 8, 32, 40, 96, 200]),
    symmetric=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_dense_equals_dequantize_of_quantize(bits, group, symmetric, seed):
    w = _weight(seed=seed)
    codes, grid = quantize_rtn(w, bits, group, symmetric)
    part = QuantizedPart(codes, grid)
    assert torch.equal(part.dense(), dequantize(codes, grid))
    assert int(codes.max()) < (1 << bits)
    # every weight lands within half a step of its grid (min/max grids clip nothing), up to the
    # drift of the range that rounding the scale to float16 (relative 2**-11) causes
    scale = grid.scales.float().repeat_interleave(group or 96, dim=1)[:, :96]
    slack = scale * ((1 << bits) - 1) * 2.0**-11
    assert ((part.dense() - w).abs() <= scale / 2 + slack + 1e-6).all()


@settings(max_examples=30, deadline=None)
@given(bits=st.integers(2, 8), group=st.sampled_from([None, 16, 40]), symmetric=st.booleans())
def test_state_round_trip_is_exact(bits, group, symmetric):
    codes, grid = quantize_rtn(_weight(seed=bits), bits, group, symmetric)
    part = QuantizedPart(codes, grid)
    tensors, meta = part.state()
    again = QuantizedPart.from_state(tensors, meta)
    assert torch.equal(again.dense(), part.dense())
    stored_bits = sum(t.numel() * t.element_size() * 8 for t in tensors.values())
    # packed tensors round up to whole bytes: at most 7 bits of slack per packed tensor
    assert 0 <= stored_bits - part.nbits() < 8 * len(tensors)


def test_nbits_counts_codes_scales_and_zeros():
    codes, grid = quantize_rtn(_weight(8, 256), 4, 128, symmetric=False)
    assert QuantizedPart(codes, grid).nbits() == 8 * 256 * 4 + 8 * 2 * 16 + 8 * 2 * 4
    codes, grid = quantize_rtn(_weight(8, 256), 4, 128, symmetric=True)
    assert QuantizedPart(codes, grid).nbits() == 8 * 256 * 4 + 8 * 2 * 16


def test_group_that_does_not_divide_leaves_a_shorter_last_group():
    w = _weight(4, 576)
    codes, grid = quantize_rtn(w, 4, 128, symmetric=False)
    assert num_groups(576, 128) == 5 and grid.scales.shape == (4, 5)
    # the last group (columns 512..575) gets its own range
    tail = w[:, 512:]
    expected = ((tail.amax(1).clamp(min=0) - tail.amin(1).clamp(max=0)) / 15).half()
    assert torch.equal(grid.scales[:, 4], expected)


def test_more_bits_means_less_error():
    w = _weight(32, 256)
    errors = [(QuantizedPart(*quantize_rtn(w, b, 64, False)).dense() - w).pow(2).mean().item() for b in range(2, 9)]
    assert all(a > b for a, b in zip(errors, errors[1:]))
    snr_db = 10 * torch.log10(w.pow(2).mean() / errors[-1]).item()
    assert snr_db > 40  # 8 bits with groups of 64


def test_zero_rows_quantize_to_zero():
    w = torch.zeros(3, 64)
    codes, grid = quantize_rtn(w, 3, 32, symmetric=False)
    assert torch.equal(dequantize(codes, grid), w)


def test_codes_are_best_for_the_stored_float16_scales():
    w = _weight(8, 64)
    grid = compute_grid(w, 4, 16, symmetric=False)
    codes = quantize_with_grid(w, grid)
    err = (dequantize(codes, grid) - w).abs()
    for delta in (-1, 1):
        moved = (codes.int() + delta).clamp(0, 15).to(torch.uint8)
        assert (err <= (dequantize(moved, grid) - w).abs() + 1e-7).all()


def test_compressed_linear_sums_parts_and_bias():
    w = _weight(8, 32)
    bias = torch.randn(8)
    codes, grid = quantize_rtn(w, 8, None, True)
    residual = w - dequantize(codes, grid)
    layer = CompressedLinear([QuantizedPart(codes, grid), DensePart(residual)], bias)
    x = torch.randn(5, 32)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, w, bias), rtol=1e-5, atol=1e-5)
    assert layer.weight_nbits() == QuantizedPart(codes, grid).nbits() + 8 * 32 * 32


def test_compressed_linear_rejects_mismatched_parts():
    with pytest.raises(ValueError, match="disagree"):
        CompressedLinear([DensePart(torch.zeros(2, 3)), DensePart(torch.zeros(3, 2))])


@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_search_never_does_worse_than_min_max(symmetric):
    from tensorpress.parts.quant_math import compute_grid_mse

    w = torch.randn(32, 200) ** 3  # heavy tails: clipping pays off
    plain = compute_grid(w, 3, 64, symmetric)
    searched = compute_grid_mse(w, 3, 64, symmetric)

    def err(grid, power):
        return (dequantize(quantize_with_grid(w, grid), grid) - w).abs().pow(power).sum().item()

    assert err(searched, 2.4) <= err(plain, 2.4) * (1 + 1e-6)
    assert err(searched, 2.0) < err(plain, 2.0)
    # the first candidate (no shrink) is min/max, and each grid is a valid one of compute_grid's
    assert searched.scales.shape == plain.scales.shape and (searched.scales <= plain.scales).all()
