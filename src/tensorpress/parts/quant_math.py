"""Pure tensor math of uniform integer quantization (no modules, no models).

Layout shared by every uniform quantizer in tensorpress, for a weight ``W`` of shape
``(out, in)``:

* ``codes``  uint8 ``(out, in)``, values in ``[0, 2**bits)``;
* ``scales`` float16 ``(out, G)``;
* ``zeros``  uint8 ``(out, G)``, the integer zero point (asymmetric only; symmetric grids use
  the implicit zero ``2**(bits-1)`` and store none),

where ``G = ceil(in / group_size)`` groups run along the input dimension (``group_size=None``
means one group per output row). When ``group_size`` does not divide ``in``, the last group of
each row is shorter (576 inputs with group 128: four groups of 128 and one of 64), as in the
reference GPTQ code; its scale and zero cost the same bits as any other group's.

Dequantization is ``W_hat[r, c] = (codes[r, c] - zero[r, g]) * scale[r, g]`` with ``g = c //
group_size``. Scales are rounded to float16 *before* the codes are chosen, so the codes are the
best ones for the scales that are actually stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCALE_DTYPE = torch.float16
_MIN_SCALE = 2.0**-24  # smallest positive float16 (subnormal): a scale never rounds to zero


@dataclass(frozen=True)
class QuantGrid:
    """Per-group scales and zero points of one weight matrix."""

    scales: torch.Tensor  # float16 (out, G)
    zeros: torch.Tensor | None  # uint8 (out, G), None for symmetric
    bits: int
    group_size: int | None
    symmetric: bool

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def rows(self, rows: slice | torch.Tensor) -> QuantGrid:
        """The grid of some output rows (a range, for matrices quantized stacked; an index, for lookups)."""
        zeros = None if self.zeros is None else self.zeros[rows].contiguous()
        return QuantGrid(self.scales[rows].contiguous(), zeros, self.bits, self.group_size, self.symmetric)

    def check(self, shape: tuple[int, int]) -> None:
        """Raise ``ValueError`` unless the grid fits a weight of ``shape``: one float16 scale (and
        zero point, asymmetric only) per row and group, zero points within ``bits`` (a checkpoint
        whose settings and tensors disagree must not load as some other matrix)."""
        expected = (shape[0], num_groups(shape[1], self.group_size))
        if tuple(self.scales.shape) != expected or self.scales.dtype != torch.float16:
            raise ValueError(f"scales are {self.scales.dtype} {tuple(self.scales.shape)}, a {shape} weight in groups of "
                             f"{self.group_size} needs float16 {expected}")
        if self.symmetric != (self.zeros is None):
            raise ValueError(f"a {'symmetric' if self.symmetric else 'asymmetric'} grid "
                             f"{'has' if self.zeros is not None else 'lacks'} zero points")
        if self.zeros is not None and (tuple(self.zeros.shape) != expected or int(self.zeros.max()) > self.maxq):
            raise ValueError(f"zero points {tuple(self.zeros.shape)} do not fit {expected} at {self.bits} bits")

    def zero_points(self) -> torch.Tensor:
        """Zero points as float32 ``(out, G)`` (the implicit one for symmetric grids)."""
        if self.zeros is None:
            return torch.full(self.scales.shape, float(1 << (self.bits - 1)))
        return self.zeros.float()


def num_groups(in_features: int, group_size: int | None) -> int:
    if group_size is None or group_size >= in_features:
        return 1
    return -(-in_features // group_size)


def effective_group(in_features: int, group_size: int | None) -> int:
    """The group length along the input dimension (a whole row when per-channel)."""
    if group_size is None or group_size >= in_features:
        return in_features
    return group_size


def _grouped(w: torch.Tensor, group: int) -> torch.Tensor:
    """``(out, in)`` -> ``(out, G, group)``, zero-padding the last group (zeros never widen
    the range: every grid below contains 0)."""
    out_f, in_f = w.shape
    n_groups = -(-in_f // group)
    pad = n_groups * group - in_f
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(out_f, n_groups, group)


def expand_groups(t: torch.Tensor, in_features: int, group: int) -> torch.Tensor:
    """``(out, G)`` per-group values -> ``(out, in)`` per-column values."""
    return t.repeat_interleave(group, dim=1)[:, :in_features]


def compute_grid(
    w: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    shrink: torch.Tensor | float = 1.0,
) -> QuantGrid:
    """Min/max grid of ``w`` (float, ``(out, in)``), optionally with the range shrunk by
    ``shrink`` (a float or an ``(out, G)`` tensor in ``(0, 1]``) as an MSE search does."""
    w = w.float()
    group = effective_group(w.shape[1], group_size)
    g = _grouped(w, group)
    maxq = (1 << bits) - 1
    if symmetric:
        amax = g.abs().amax(dim=-1) * shrink
        scale = amax / ((1 << (bits - 1)) - 1)
        zeros = None
    else:
        lo = g.amin(dim=-1).clamp(max=0) * shrink
        hi = g.amax(dim=-1).clamp(min=0) * shrink
        scale = (hi - lo) / maxq
    scale = scale.clamp(min=_MIN_SCALE).to(SCALE_DTYPE)
    if not torch.isfinite(scale).all():
        raise OverflowError("a group's range exceeds float16; weights are too large to quantize")
    if not symmetric:
        zeros = torch.round(-lo / scale.float()).clamp(0, maxq).to(torch.uint8)
    return QuantGrid(scale, zeros, bits, group_size, symmetric)


def quantize_with_grid(w: torch.Tensor, grid: QuantGrid) -> torch.Tensor:
    """Codes (uint8 ``(out, in)``) of ``w`` on a fixed grid."""
    in_f = w.shape[1]
    group = effective_group(in_f, grid.group_size)
    scale = expand_groups(grid.scales.float(), in_f, group)
    zero = expand_groups(grid.zero_points(), in_f, group)
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, grid.maxq).to(torch.uint8)


def dequantize(codes: torch.Tensor, grid: QuantGrid) -> torch.Tensor:
    """Float32 ``(out, in)`` weight that ``codes`` on ``grid`` stand for."""
    in_f = codes.shape[1]
    group = effective_group(in_f, grid.group_size)
    scale = expand_groups(grid.scales.float(), in_f, group)
    zero = expand_groups(grid.zero_points(), in_f, group)
    return (codes.float() - zero) * scale


def quantize_rtn(
    w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool
) -> tuple[torch.Tensor, QuantGrid]:
    """Round-to-nearest quantization: ``(codes, grid)``."""
    grid = compute_grid(w, bits, group_size, symmetric)
    return quantize_with_grid(w, grid), grid


def compute_grid_mse(
    w: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    steps: int = 40,
    max_shrink: float = 0.8,
    norm: float = 2.4,
) -> QuantGrid:
    """Per-group grid whose range is shrunk by the factor in ``(1 - max_shrink, 1]`` that
    minimises ``sum |w - w_hat|**norm`` over the group (the clipping search of the reference
    GPTQ quantizer, which tries 100 candidates; 40 in steps of 0.02 here, norm 2.4). Same grids as ``compute_grid(shrink=p)``,
    evaluated in the grouped layout ``(out, G, group)`` without expanding per column."""
    w = w.float()
    group = effective_group(w.shape[1], group_size)
    g = _grouped(w, group)  # padded zeros quantize exactly: 0 is on every grid
    maxq = (1 << bits) - 1
    if symmetric:
        amax = g.abs().amax(dim=-1)
        half = float(1 << (bits - 1))
    else:
        lo = g.amin(dim=-1).clamp(max=0)
        hi = g.amax(dim=-1).clamp(min=0)
    best_err = torch.full(g.shape[:2], float("inf"))
    best_scale = torch.zeros(g.shape[:2], dtype=SCALE_DTYPE)
    best_zero = torch.zeros(g.shape[:2])
    for i in range(steps):
        p = 1.0 - max_shrink * i / steps
        if symmetric:
            scale = (amax * p / (half - 1)).clamp(min=_MIN_SCALE).to(SCALE_DTYPE)
            zero = torch.full_like(amax, half)
        else:
            scale = ((hi - lo) * p / maxq).clamp(min=_MIN_SCALE).to(SCALE_DTYPE)
            zero = torch.round(-lo * p / scale.float()).clamp(0, maxq)
        s32 = scale.float()[..., None]
        z = zero[..., None]
        # |dequant(quant(g)) - g| ** norm, in place on one temporary
        err = torch.div(g, s32).round_().add_(z).clamp_(0, maxq).sub_(z).mul_(s32).sub_(g).abs_().pow_(norm).sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    if not torch.isfinite(best_scale).all():
        raise OverflowError("a group's range exceeds float16; weights are too large to quantize")
    zeros = None if symmetric else best_zero.to(torch.uint8)
    return QuantGrid(best_scale, zeros, bits, group_size, symmetric)
