import pytest
import torch

from tensorpress.parts import QuantizedPart
from tensorpress.parts.kernels import PackedWeight, packed_kernels
from tensorpress.parts.quant_math import quantize_rtn


@pytest.mark.parametrize(
    "in_f, bits, group, symmetric",
    [
        (256, 4, 64, False),
        (576, 4, 128, False),  # shorter last group (64): packed with zero padding to 640
        (160, 4, 64, True),  # last group of 32
        (200, 4, 64, False),  # last group of 8
        (576, 8, None, True),  # int8 per-channel kernel
    ],
)
def test_packed_kernels_agree_with_the_dense_path(in_f, bits, group, symmetric):
    w = torch.randn(96, in_f)
    codes, grid = quantize_rtn(w, bits, group, symmetric)
    part = QuantizedPart(codes, grid)
    assert PackedWeight.supports(grid, 96, in_f)
    x = torch.randn(3, 5, in_f)
    dense = part(x)
    with packed_kernels():
        packed = part(x)
    assert part._packed is not None
    # the kernels compute with bfloat16 activations and scales (their only fast path here)
    torch.testing.assert_close(packed, dense, rtol=2e-2, atol=1e-2 * dense.abs().max().item())
    assert packed.dtype == torch.float32 and not torch.equal(packed, dense)
    # many tokens at once (prefill): dequantize + float32 GEMM, exactly the dense path
    many = torch.randn(2, 20, in_f)
    with packed_kernels():
        assert torch.equal(part(many), torch.nn.functional.linear(many, part.dense()))


def test_layouts_the_kernels_cannot_take_fall_back_to_dense():
    w = torch.randn(8, 96)
    # 3 bits; a group the op does not take; 8 bits grouped or asymmetric; 4 bits with 8 rows (< 16)
    for bits, group, symmetric in ((3, 32, False), (4, 48, False), (8, 32, True), (8, None, False), (4, 32, False)):
        codes, grid = quantize_rtn(w, bits, group, symmetric)
        assert not PackedWeight.supports(grid, 8, 96)
        part = QuantizedPart(codes, grid)
        x = torch.randn(2, 96)
        with packed_kernels():
            assert torch.equal(part(x), torch.nn.functional.linear(x, part.dense()))
        assert part._packed is None


def test_kernels_are_off_by_default_and_the_switch_restores():
    codes, grid = quantize_rtn(torch.randn(16, 64), 4, 32, False)
    part = QuantizedPart(codes, grid)
    part(torch.randn(1, 64))
    assert part._packed is None
    with packed_kernels():
        with packed_kernels(False):
            part(torch.randn(1, 64))
            assert part._packed is None
        part(torch.randn(1, 64))
        assert part._packed is not None
