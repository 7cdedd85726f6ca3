"""Packed CPU matmul kernels for quantized parts: our int4 kernel, torch's weight-only int4 / int8 ops.

* int4, ours (``_int4.c``, the default where it runs: x86-64 with AVX2 and FMA, input width and
  group size multiples of 64): codes packed two per byte, float32 activations, per-group
  ``W = s * (q - z)`` applied as ``s * (q . x) - s * z * sum(x)`` per group, rows split over
  torch's OpenMP threads. Outputs agree with the dense float32 path to float32 rounding. On
  smollm2-135m at batch 1 it runs the model's linears several times faster than torch's op
  below (which reaches ~3 GMAC/s here); see ``bench/README.md``.
* int4, torch (the fallback, or ``packed_kernels(int4="torch")``):
  ``torch.ops.aten._weight_int4pack_mm_for_cpu`` computes ``x @ W.T`` from 4-bit codes
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

torch's two ops run their fast path only with **bfloat16 activations** on this kind of CPU (AVX2, no
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

import ctypes
from functools import cache
from pathlib import Path

import torch

from tensorpress.errors import TensorpressError
from tensorpress.native import find_library
from tensorpress.parts.quant_math import QuantGrid
from tensorpress.switch import Switch

INT4_GROUPS = (32, 64, 128, 256)
INT4_BACKENDS = ("auto", "tensorpress", "torch")
KERNEL_MAX_TOKENS = 16  # above this many tokens per call, dequantize + float32 GEMM is faster
_ACT = torch.bfloat16  # torch's kernels' fast path
_INNER_K_TILES = 2  # the input width must be a multiple of 16 * inner_k_tiles
_RUN = 64  # our kernel packs runs of 64 inputs into 32 bytes: widths and groups are multiples
_KERNELS: Switch[str | None] = Switch(None)  # None: off; else the int4 backend asked for


def packed_kernels(enabled: bool = True, int4: str = "auto"):
    """Context manager: use (or not) the packed int4/int8 kernels inside; restores the setting.

    ``int4``: ``"auto"`` (ours where it runs, else torch's), ``"tensorpress"`` (ours, or the
    dense path where it cannot run) or ``"torch"`` (torch's op, for comparison)."""
    if int4 not in INT4_BACKENDS:
        raise TensorpressError(f"int4 kernel {int4!r} is not one of {', '.join(INT4_BACKENDS)}")
    return _KERNELS.set(int4 if enabled else None)


def kernels_enabled() -> bool:
    return _KERNELS.value is not None


def kernel_mode() -> str | None:
    """The current setting: ``None`` (kernels off) or the int4 backend asked for."""
    return _KERNELS.value


@cache
def _int4_library() -> ctypes.CDLL | None:
    """Our compiled int4 kernel when this install has it and this CPU can run it."""
    lib = find_library(Path(__file__).parent, "_int4")
    if lib is None or not lib.tp_int4_supported():
        return None
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.tp_int4_pack.argtypes = [p, p, i, i]
    lib.tp_int4_pack.restype = None
    lib.tp_int4_matmul.argtypes = [p, p, p, p, p, i, i, i, i]
    lib.tp_int4_matmul.restype = i
    return lib


def int4_kernel_available() -> bool:
    """Whether our int4 kernel (``_int4.c``) is built and runs on this CPU."""
    return _int4_library() is not None


def _ours_fits(group: int, in_features: int) -> bool:
    return in_features % _RUN == 0 and group % _RUN == 0


def _int4_backend(group: int, in_features: int, out_features: int) -> str | None:
    """Which int4 kernel a weight of this shape uses under the current setting, if any."""
    wanted = _KERNELS.value
    if wanted in ("auto", "tensorpress") and _ours_fits(group, in_features) and int4_kernel_available():
        return "tensorpress"
    if wanted in ("auto", "torch") and group in INT4_GROUPS and in_features >= group and out_features % 16 == 0:
        return "torch"
    return None


class _Int4Slice:
    """A column range of the weight packed for the int4 kernel."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int) -> None:
        self.group = group
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), _INNER_K_TILES)
        offsets = (8.0 - zeros) * scales  # (out, G)
        self.scales_and_zeros = torch.stack([scales, offsets], dim=-1).transpose(0, 1).to(_ACT).contiguous()  # (G, out, 2)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group, self.scales_and_zeros)


class _Int4Ours:
    """A weight packed for ``_int4.c``: (out, in / 2) bytes, float32 scales and ``-s * z`` shifts."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int) -> None:
        lib = _int4_library()
        assert lib is not None
        self.lib, self.group = lib, group
        self.out_features, self.in_features = codes.shape
        codes = codes.to(torch.uint8).contiguous()
        self.packed = torch.empty(self.out_features, self.in_features // 2, dtype=torch.uint8)
        lib.tp_int4_pack(codes.data_ptr(), self.packed.data_ptr(), self.out_features, self.in_features)
        self.scales = scales.float().contiguous()  # (out, G)
        self.shifts = (-scales * zeros).float().contiguous()
        self._weights = (self.packed.data_ptr(), self.scales.data_ptr(), self.shifts.data_ptr())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().contiguous()  # (tokens, in)
        tokens = x.shape[0]
        y = torch.empty(tokens, self.out_features)
        rc = self.lib.tp_int4_matmul(*self._weights, x.data_ptr(), y.data_ptr(), tokens, self.out_features, self.in_features, self.group)
        if rc != 0:  # the shapes were checked when packing; this is a broken build
            raise TensorpressError(f"the int4 kernel refused a {tuple(x.shape)} input for a {self.out_features} x {self.in_features} weight")
        return y


class PackedWeight:
    """``x @ W.T`` for one quantized weight through the packed kernels; ``backend`` says which
    kernel (``"tensorpress"``, ``"torch"`` or ``"int8"``)."""

    def __init__(self, codes: torch.Tensor, grid: QuantGrid) -> None:
        out_f, in_f = codes.shape
        self.out_features, self.in_features = out_f, in_f
        self.group = grid.group_size or in_f
        scales, zeros = grid.scales.float(), grid.zero_points()
        self.int8: tuple[torch.Tensor, torch.Tensor] | None = None
        self.int4: _Int4Slice | _Int4Ours | None = None
        self.pad = 0
        if grid.bits == 8:
            self.backend = "int8"
            self.int8 = ((codes.to(torch.int16) - 128).to(torch.int8).contiguous(), scales[:, 0].to(_ACT).contiguous())
            return
        group = self.group
        backend = _int4_backend(group, in_f, out_f)
        if backend is None:
            raise TensorpressError(f"no int4 kernel takes a {out_f} x {in_f} weight in groups of {group} (check PackedWeight.supports first)")
        self.backend = backend
        if backend == "tensorpress":
            self.int4 = _Int4Ours(codes, scales, zeros, group)
            return
        self.pad = -in_f % group  # zero codes against zero inputs: the short last group, padded
        padded = torch.nn.functional.pad(codes, (0, self.pad)) if self.pad else codes
        self.int4 = _Int4Slice(padded, scales, zeros, group)

    @staticmethod
    def supports(grid: QuantGrid, out_features: int, in_features: int) -> bool:
        """Whether a kernel takes this weight under the current :func:`packed_kernels` setting."""
        if grid.bits == 8:
            return grid.symmetric and grid.group_size is None
        if grid.bits != 4:
            return False
        return _int4_backend(grid.group_size or in_features, in_features, out_features) is not None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        if isinstance(self.int4, _Int4Ours):
            return self.int4(x.reshape(-1, self.in_features)).to(x.dtype).reshape(*lead, -1)
        x2 = x.reshape(-1, self.in_features).to(_ACT)
        if self.int8 is not None:
            w, s = self.int8
            y = torch.ops.aten._weight_int8pack_mm(x2, w, s)
        else:
            assert self.int4 is not None
            y = self.int4(torch.nn.functional.pad(x2, (0, self.pad)) if self.pad else x2.contiguous())
        return y.to(x.dtype).reshape(*lead, -1)
