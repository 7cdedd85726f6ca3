"""Packed CPU matmul kernels for quantized parts: our 4/8-bit kernel, torch's weight-only int4 / int8 ops.

* ours (``_qmatmul.c``, the default where it runs: x86-64 with AVX2 and FMA, input width and
  group size multiples of 64, 4 or 8 bits, any grid): float32 activations, per-group
  ``W = s * (q - z)`` applied as ``s * (q . x) - s * z * sum(x)``, rows split over torch's
  OpenMP threads. 4-bit codes are repacked two per byte so that they unpack with a shift and a
  mask; 8-bit codes are read as stored. Outputs agree with the dense float32 path to float32
  rounding. On smollm2-135m at batch 1 it runs the model's linears several times faster than
  torch's int4 op below; see ``bench/README.md``.
* int4, torch (the fallback, or ``packed_kernels(backend="torch")``):
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
* int8, torch: ``torch.ops.aten._weight_int8pack_mm`` for 8-bit symmetric per-channel grids
  (``W = (q - 128) * s``).

torch's two ops run their fast path only with **bfloat16 activations** on this kind of CPU (AVX2, no
AVX-512): with float32 inputs they are 10-20x slower than a float32 matmul (measured, see
``bench/README.md``). So they are called with the activations, scales and offsets in bfloat16
and the result is cast back: outputs agree with the dense path to bfloat16 precision, not
float32. All kernels only pay off when few tokens go through (decode: the weights are read from
memory once per token, 4-8x fewer bytes); for more than ``KERNEL_MAX_TOKENS`` tokens (prefill)
float32 GEMM on the dequantized weight is faster and is used instead.

Whether a part uses a kernel is decided by :func:`packed_kernels` (a context manager). By
default only our kernel is on ("tensorpress"): its results are the dense path's up to float32
rounding, so quantized models decode fast without asking; torch's bfloat16 ops are used only
inside ``packed_kernels()`` / ``packed_kernels(backend="torch")``, and ``packed_kernels(False)``
turns every kernel off (``bench/speed.py``'s dequantizing configuration).
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

INT4_GROUPS = (32, 64, 128, 256)  # torch's int4 op
BACKENDS = ("auto", "tensorpress", "torch")
KERNEL_MAX_TOKENS = 16  # above this many tokens per call, dequantize + float32 GEMM is faster
_ACT = torch.bfloat16  # torch's kernels' fast path
_INNER_K_TILES = 2  # torch's int4 op: the input width must be a multiple of 16 * inner_k_tiles
_RUN = 64  # our kernel reads runs of 64 inputs: widths and groups are multiples of it
_KERNELS: Switch[str | None] = Switch("tensorpress")  # None: off; else the backend asked for


def packed_kernels(enabled: bool = True, backend: str = "auto"):
    """Context manager: use (or not) the packed kernels inside; restores the setting.

    ``backend``: ``"auto"`` (ours where it runs, else torch's), ``"tensorpress"`` (ours, or the
    dense path where it cannot run) or ``"torch"`` (torch's int4/int8 ops, for comparison)."""
    if backend not in BACKENDS:
        raise TensorpressError(f"kernel backend {backend!r} is not one of {', '.join(BACKENDS)}")
    return _KERNELS.set(backend if enabled else None)


def kernel_mode() -> str | None:
    """The current setting: ``None`` (kernels off) or the backend asked for."""
    return _KERNELS.value


@cache
def _library() -> ctypes.CDLL | None:
    """Our compiled kernel when this install has it and this CPU can run it."""
    lib = find_library(Path(__file__).parent, "_qmatmul")
    if lib is None or not lib.tp_qmatmul_supported():
        return None
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.tp_pack4.argtypes = [p, p, i, i]
    lib.tp_pack4.restype = None
    lib.tp_qmatmul.argtypes = [p, p, p, p, p, i, i, i, i, i]
    lib.tp_qmatmul.restype = i
    return lib


def our_kernel_available() -> bool:
    """Whether our kernel (``_qmatmul.c``) is built and runs on this CPU."""
    return _library() is not None


def _backend(grid: QuantGrid, out_features: int, in_features: int) -> str | None:
    """Which kernel a weight of this grid and shape uses under the current setting, if any."""
    wanted = _KERNELS.value
    group = grid.group_size or in_features
    if wanted is None:
        return None
    if (
        wanted in ("auto", "tensorpress") and grid.bits in (4, 8)
        and in_features % _RUN == 0 and group % _RUN == 0 and our_kernel_available()
    ):
        return "tensorpress"
    if wanted in ("auto", "torch"):
        if grid.bits == 4 and group in INT4_GROUPS and in_features >= group and out_features % 16 == 0:
            return "torch"  # the int4 packing takes 16 output rows at a time
        if grid.bits == 8 and grid.symmetric and grid.group_size is None:
            return "torch"
    return None


class _TorchInt4:
    """The weight packed for torch's int4 op (zero-padded to whole groups)."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int) -> None:
        self.group = group
        self.in_features = codes.shape[1]
        self.pad = -self.in_features % group  # zero codes against zero inputs: the short last group, padded
        padded = torch.nn.functional.pad(codes, (0, self.pad)) if self.pad else codes
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(padded.to(torch.int32).contiguous(), _INNER_K_TILES)
        offsets = (8.0 - zeros) * scales  # (out, G)
        self.scales_and_zeros = torch.stack([scales, offsets], dim=-1).transpose(0, 1).to(_ACT).contiguous()  # (G, out, 2)

    def __call__(self, x2: torch.Tensor) -> torch.Tensor:
        x2 = torch.nn.functional.pad(x2, (0, self.pad)) if self.pad else x2.contiguous()
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group, self.scales_and_zeros)


class _TorchInt8:
    """The weight as torch's int8 op takes it (symmetric per-channel)."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor) -> None:
        self.codes = (codes.to(torch.int16) - 128).to(torch.int8).contiguous()
        self.scales = scales[:, 0].to(_ACT).contiguous()

    def __call__(self, x2: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x2, self.codes, self.scales)


class _Ours:
    """A weight for ``_qmatmul.c``: 4-bit codes repacked (out, in / 2) or 8-bit codes as stored,
    float32 scales and ``-s * z`` shifts (out, G)."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int, bits: int) -> None:
        lib = _library()
        assert lib is not None
        self.lib, self.group, self.bits = lib, group, bits
        self.out_features, self.in_features = codes.shape
        codes = codes.to(torch.uint8).contiguous()
        if bits == 4:
            self.codes = torch.empty(self.out_features, self.in_features // 2, dtype=torch.uint8)
            lib.tp_pack4(codes.data_ptr(), self.codes.data_ptr(), self.out_features, self.in_features)
        else:
            self.codes = codes
        self.scales = scales.float().contiguous()
        self.shifts = (-scales * zeros).float().contiguous()
        self._weights = (self.codes.data_ptr(), self.scales.data_ptr(), self.shifts.data_ptr())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` in float32 for ``x`` of shape (..., in); decode calls this once per linear per token."""
        x = x.contiguous() if x.dtype == torch.float32 else x.float().contiguous()
        y = torch.empty(*x.shape[:-1], self.out_features)
        tokens = x.numel() // self.in_features
        rc = self.lib.tp_qmatmul(*self._weights, x.data_ptr(), y.data_ptr(), tokens, self.bits, self.out_features, self.in_features, self.group)
        if rc != 0:  # the shapes were checked when packing; this is a broken build
            raise TensorpressError(f"the {self.bits}-bit kernel refused a {tuple(x.shape)} input for a {self.out_features} x {self.in_features} weight")
        return y


class PackedWeight:
    """``x @ W.T`` for one quantized weight through a packed kernel; ``backend`` says which
    (``"tensorpress"`` or ``"torch"``)."""

    def __init__(self, codes: torch.Tensor, grid: QuantGrid) -> None:
        out_f, in_f = codes.shape
        self.out_features, self.in_features = out_f, in_f
        backend = _backend(grid, out_f, in_f)
        if backend is None:
            raise TensorpressError(
                f"no packed kernel takes a {out_f} x {in_f} weight at {grid.bits} bits in groups of {grid.group_size} "
                "(check PackedWeight.supports first)"
            )
        self.backend = backend
        scales, zeros = grid.scales.float(), grid.zero_points()
        group = grid.group_size or in_f
        self.ours = _Ours(codes, scales, zeros, group, grid.bits) if backend == "tensorpress" else None
        self.torch_op = None
        if self.ours is None:
            self.torch_op = _TorchInt4(codes, scales, zeros, group) if grid.bits == 4 else _TorchInt8(codes, scales)

    @staticmethod
    def supports(grid: QuantGrid, out_features: int, in_features: int) -> bool:
        """Whether a kernel takes this weight under the current :func:`packed_kernels` setting."""
        return _backend(grid, out_features, in_features) is not None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.ours is not None:
            y = self.ours(x)
            return y if x.dtype == torch.float32 else y.to(x.dtype)
        lead = x.shape[:-1]
        y = self.torch_op(x.reshape(-1, self.in_features).to(_ACT))
        return y.to(x.dtype).reshape(*lead, -1)
