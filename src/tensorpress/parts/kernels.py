"""Packed CPU matmul kernels for quantized parts (torch's weight-only int4 / int8 ops).

* int4: ``torch.ops.aten._weight_int4pack_mm_for_cpu`` computes ``x @ W.T`` from 4-bit codes
  packed by ``_convert_weight_to_int4pack_for_cpu``, with per-group ``(scale, offset)`` pairs
  where ``W = (q - 8) * scale + offset``; our asymmetric grid ``(q - z) * s`` maps to
  ``offset = (8 - z) * s``. The op needs the input width to be a multiple of the group size
  (32, 64, 128 or 256): a layer whose last group is shorter (576 inputs, group 128) is packed
  with zero codes up to the next multiple (640) and its inputs are padded with zeros, so the
  padding contributes exactly nothing; it exists only in the kernel's runtime copy, the stored
  codes and the bits counted are the real ones. (One call per layer: splitting into a main part
  and a tail instead took two kernel calls and two input copies, about 1.3-1.6x the time of
  the padded call per 576-input layer at batch 1, measured.)
* int8: ``torch.ops.aten._weight_int8pack_mm`` for 8-bit symmetric per-channel grids
  (``W = (q - 128) * s``).

Both ops run their fast path only with **bfloat16 activations** on this kind of CPU (AVX2, no
AVX-512): with float32 inputs they are 10-20x slower than a float32 matmul (measured, see
``bench/README.md``). So the kernels are called with the activations, scales and offsets in
bfloat16 and the result is cast back: outputs agree with the dense path to bfloat16 precision,
not float32. And they only pay off when few tokens go through (decode: the weights are read
from memory once per token, 4-8x fewer bytes); for more than ``KERNEL_MAX_TOKENS`` tokens
(prefill) float32 GEMM on the dequantized weight is faster and is used instead.

Whether a part uses a kernel is decided by :func:`packed_kernels` (a context manager; off by
default, see ``bench/speed.py``).
"""

from __future__ import annotations

import torch

from tensorpress.parts.quant_math import QuantGrid
from tensorpress.switch import Switch

INT4_GROUPS = (32, 64, 128, 256)
KERNEL_MAX_TOKENS = 16  # above this many tokens per call, dequantize + float32 GEMM is faster
_ACT = torch.bfloat16  # the kernels' fast path
_INNER_K_TILES = 2  # the input width must be a multiple of 16 * inner_k_tiles
_KERNELS: Switch[bool] = Switch(False)


def packed_kernels(enabled: bool = True):
    """Context manager: use (or not) the packed int4/int8 kernels inside; restores the setting."""
    return _KERNELS.set(enabled)


def kernels_enabled() -> bool:
    return _KERNELS.value


class _Int4Slice:
    """A column range of the weight packed for the int4 kernel."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int) -> None:
        self.group = group
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), _INNER_K_TILES)
        offsets = (8.0 - zeros) * scales  # (out, G)
        self.scales_and_zeros = torch.stack([scales, offsets], dim=-1).transpose(0, 1).to(_ACT).contiguous()  # (G, out, 2)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group, self.scales_and_zeros)


class PackedWeight:
    """``x @ W.T`` for one quantized weight through the packed kernels."""

    def __init__(self, codes: torch.Tensor, grid: QuantGrid) -> None:
        out_f, in_f = codes.shape
        self.in_features = in_f
        scales, zeros = grid.scales.float(), grid.zero_points()
        self.int8: tuple[torch.Tensor, torch.Tensor] | None = None
        self.int4: _Int4Slice | None = None
        self.pad = 0
        if grid.bits == 8:
            self.int8 = ((codes.to(torch.int16) - 128).to(torch.int8).contiguous(), scales[:, 0].to(_ACT).contiguous())
            return
        group = grid.group_size or in_f
        self.pad = -in_f % group  # zero codes against zero inputs: the short last group, padded
        padded = torch.nn.functional.pad(codes, (0, self.pad)) if self.pad else codes
        self.int4 = _Int4Slice(padded, scales, zeros, group)

    @staticmethod
    def supports(grid: QuantGrid, out_features: int, in_features: int) -> bool:
        if grid.bits == 8:
            return grid.symmetric and grid.group_size is None
        if grid.bits != 4:
            return False
        group = grid.group_size or in_features
        # the int4 packing takes 16 output rows at a time
        return group in INT4_GROUPS and in_features >= group and out_features % 16 == 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(_ACT)
        if self.int8 is not None:
            w, s = self.int8
            y = torch.ops.aten._weight_int8pack_mm(x2, w, s)
        else:
            assert self.int4 is not None
            y = self.int4(torch.nn.functional.pad(x2, (0, self.pad)) if self.pad else x2.contiguous())
        return y.to(x.dtype).reshape(*lead, -1)
