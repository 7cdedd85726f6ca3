import pytest
import torch

from tensorpress.errors import TensorpressError
from tensorpress.parts import QuantizedPart
from tensorpress.parts.kernels import PackedWeight, our_kernel_available, packed_kernels
from tensorpress.parts.quant_math import quantize_rtn

needs_ours = pytest.mark.skipif(not our_kernel_available(), reason="our kernel needs x86-64 with AVX2 and FMA")


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
def test_torch_kernels_agree_with_the_dense_path(in_f, bits, group, symmetric):
    w = torch.randn(96, in_f)
    codes, grid = quantize_rtn(w, bits, group, symmetric)
    part = QuantizedPart(codes, grid)
    x = torch.randn(3, 5, in_f)
    with packed_kernels(False):
        dense = part(x)
    with packed_kernels(backend="torch"):
        assert PackedWeight.supports(grid, 96, in_f)
        packed = part(x)
    assert part._packed is not None and part._packed.backend == "torch"
    # torch's kernels compute with bfloat16 activations and scales (their only fast path here)
    torch.testing.assert_close(packed, dense, rtol=2e-2, atol=1e-2 * dense.abs().max().item())
    assert packed.dtype == torch.float32 and not torch.equal(packed, dense)
    # many tokens at once (prefill): dequantize + float32 GEMM, exactly the dense path
    many = torch.randn(2, 20, in_f)
    with packed_kernels(backend="torch"):
        assert torch.equal(part(many), torch.nn.functional.linear(many, part.dense()))


@needs_ours
@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 7, 16])
@pytest.mark.parametrize(
    "out_f, in_f, bits, group, symmetric",
    [
        (96, 576, 4, 128, False),  # shorter last group (64), no padding needed
        (8, 256, 4, 64, True),  # 8 rows: torch's op needs multiples of 16, ours does not
        (40, 192, 4, None, False),  # one group per row
        (24, 128, 4, 64, False),
        (96, 576, 8, None, True),  # the grid torch's int8 op takes
        (40, 576, 8, 128, False),  # one it does not
    ],
)
def test_our_kernel_agrees_with_the_dense_path_in_float32(tokens, out_f, in_f, bits, group, symmetric):
    codes, grid = quantize_rtn(torch.randn(out_f, in_f) * 3, bits, group, symmetric)
    part = QuantizedPart(codes, grid)
    x = torch.randn(tokens, in_f)
    with packed_kernels(False):
        dense = part(x)
        bf16 = part(x.bfloat16())
    packed = part(x)  # ours is on by default
    assert part._packed.backend == "tensorpress"
    # float32 activations and scales: only the summation order differs from the dense GEMM
    torch.testing.assert_close(packed, dense, rtol=1e-5, atol=1e-5 * dense.abs().max().item())
    with packed_kernels():
        assert part(x.bfloat16()).dtype == torch.bfloat16
        torch.testing.assert_close(part(x.bfloat16()), bf16, rtol=2e-2, atol=2e-2 * bf16.abs().max().item())


@needs_ours
def test_our_kernel_is_preferred_and_the_backend_switch_repacks():
    codes, grid = quantize_rtn(torch.randn(32, 256), 4, 64, False)
    part = QuantizedPart(codes, grid)
    x = torch.randn(1, 256)
    with packed_kernels():
        part(x)
        assert part._packed.backend == "tensorpress"
        with packed_kernels(backend="torch"):
            part(x)
            assert part._packed.backend == "torch"
        part(x)
        assert part._packed.backend == "tensorpress"
    # widths our kernel cannot take (not a multiple of 64) go to torch's op under "auto" ...
    codes, grid = quantize_rtn(torch.randn(32, 200), 4, 64, False)
    part = QuantizedPart(codes, grid)
    with packed_kernels():
        part(torch.randn(1, 200))
        assert part._packed.backend == "torch"
    # ... and to the dense path when ours is asked for explicitly
    with packed_kernels(backend="tensorpress"):
        x = torch.randn(1, 200)
        assert torch.equal(part(x), torch.nn.functional.linear(x, part.dense()))
        assert part._packed is None


def test_unknown_kernel_backend_is_refused():
    with pytest.raises(TensorpressError, match="'cuda'.*auto, tensorpress, torch"):
        packed_kernels(backend="cuda")


def test_layouts_the_kernels_cannot_take_fall_back_to_dense():
    w = torch.randn(8, 96)
    # 3 bits; a group neither int4 kernel takes; 8 bits grouped or asymmetric; 4 bits, 8 rows (< 16), torch's op
    cases = ((3, 32, False, "auto"), (4, 48, False, "auto"), (8, 32, True, "auto"), (8, None, False, "auto"), (4, 32, False, "torch"))
    for bits, group, symmetric, backend in cases:
        codes, grid = quantize_rtn(w, bits, group, symmetric)
        part = QuantizedPart(codes, grid)
        x = torch.randn(2, 96)
        with packed_kernels(backend=backend):
            assert not PackedWeight.supports(grid, 8, 96)
            assert torch.equal(part(x), torch.nn.functional.linear(x, part.dense()))
        assert part._packed is None


def test_only_our_exact_kernel_is_on_by_default_and_the_switch_restores():
    codes, grid = quantize_rtn(torch.randn(16, 64), 4, 64, False)
    part = QuantizedPart(codes, grid)
    x = torch.randn(1, 64)
    with packed_kernels(False):
        part(x)
        assert part._packed is None
    part(x)
    expected = "tensorpress" if our_kernel_available() else None
    assert (part._packed.backend if part._packed is not None else None) == expected
    with packed_kernels(backend="torch"):
        with packed_kernels(False):
            assert torch.equal(part(x), torch.nn.functional.linear(x, part.dense()))  # off: the dense path
        part(x)
        assert part._packed.backend == "torch"
    # a product autograd must see takes the dense path
    xg = torch.randn(1, 64, requires_grad=True)
    part(xg).sum().backward()
    torch.testing.assert_close(xg.grad, part.dense().sum(dim=0, keepdim=True))
    # torch's bfloat16 ops never run unasked: a grid only they take stays dense by default
    codes, grid = quantize_rtn(torch.randn(16, 96), 4, 32, False)
    part = QuantizedPart(codes, grid)
    x = torch.randn(1, 96)
    assert torch.equal(part(x), torch.nn.functional.linear(x, part.dense()))
    assert part._packed is None
