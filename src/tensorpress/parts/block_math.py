"""Block formats: llama.cpp's quantization grids as pure tensor math (no modules, no files).

A block format stores a row of weights in blocks of ``block`` consecutive weights (32, or 256
for the two-level "K" formats) and quantizes each ``sub``-weight sub-block on its own scale:

* one-level formats (``q4_0``, ``q4_1``, ``q5_0``, ``q5_1``, ``q8_0``, ``iq4_nl``; sub = block = 32):
  a float16 scale ``d`` per block, and for ``q4_1``/``q5_1`` a float16 minimum ``m``;
* two-level formats (``q2_k`` .. ``q6_k``; block 256, sub-blocks of 16 or 32): one float16 ``d``
  per block and an integer sub-scale code ``sc`` of ``scale_bits`` per sub-block (signed for
  ``q3_k``/``q6_k``), the sub-block's scale being ``d * sc``; the asymmetric ones (``q2_k``,
  ``q4_k``, ``q5_k``) also a float16 ``dmin`` per block and a minimum code ``mn`` per sub-block.

In float32, with ``level = code - offset`` (``iq4_nl``: ``level = IQ4_NL_LEVELS[code]``) and
``S = d`` or ``d * sc`` per sub-block, a weight is

* ``S * level``                for the symmetric formats,
* ``S * level + m``            for ``q4_1`` and ``q5_1``,
* ``S * level - dmin * mn``    for ``q2_k``, ``q4_k`` and ``q5_k``,

each product and sum rounded to float32 in that order — the order ggml's reference dequantizers
use, so the weights here are the runtime's bit for bit. Layout in memory, for a weight of
``(out, in)`` with ``in`` a multiple of ``block``: ``codes`` uint8 ``(out, in)``, ``d`` (and
``m``/``dmin``) float16 ``(out, in/block)``, ``sc`` (and ``mn``) int16 ``(out, in/sub)``.

Choosing a grid (:func:`fit_block_grid`) follows the reference quantizers' structure: a float
scale (and minimum) per sub-block from the weights' range — for the symmetric formats the value
of largest magnitude is mapped to the most negative level, which uses every level — then ``d``
(and ``dmin``) from the largest sub-block scale, rounded to float16, then the sub-scale codes
against that float16 ``d``; the codes of the weights are chosen last, on the scales stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

IQ4_NL_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


@dataclass(frozen=True)
class BlockFormat:
    name: str
    bits: int  # width of a weight's code
    block: int  # weights per block (one d per block)
    sub: int  # weights per sub-block (one scale per sub-block)
    scale_bits: int  # width of a sub-scale code; 0: d is the sub-block's scale
    signed_scales: bool
    minimum: Literal["none", "float", "coded"]
    offset: int  # level = code - offset (symmetric formats); 0 where a minimum is stored
    levels: tuple[int, ...] | None = None  # a level table instead of code - offset

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    @property
    def two_level(self) -> bool:
        return self.scale_bits > 0

    def sub_range(self) -> tuple[int, int]:
        """The range of a sub-scale (or sub-minimum) code."""
        if self.signed_scales:
            return -(1 << (self.scale_bits - 1)), (1 << (self.scale_bits - 1)) - 1
        return 0, (1 << self.scale_bits) - 1

    def bits_per_weight(self) -> float:
        """Storage per weight, every scale and minimum included (4.5 for q4_0 and q4_k)."""
        per_block = 16 * (2 if self.minimum != "none" else 1)
        per_sub = self.scale_bits * (2 if self.minimum == "coded" else 1)
        return self.bits + per_block / self.block + per_sub / self.sub

    def level_table(self) -> torch.Tensor:
        """float32 ``(2**bits,)``: the level each code stands for."""
        if self.levels is not None:
            return torch.tensor(self.levels, dtype=torch.float32)
        return torch.arange(self.maxq + 1, dtype=torch.float32) - self.offset


def _fmt(name, bits, block, sub, scale_bits, signed, minimum, offset, levels=None) -> BlockFormat:
    return BlockFormat(name, bits, block, sub, scale_bits, signed, minimum, offset, levels)


FORMATS: dict[str, BlockFormat] = {f.name: f for f in (
    _fmt("q4_0", 4, 32, 32, 0, False, "none", 8),
    _fmt("q4_1", 4, 32, 32, 0, False, "float", 0),
    _fmt("q5_0", 5, 32, 32, 0, False, "none", 16),
    _fmt("q5_1", 5, 32, 32, 0, False, "float", 0),
    _fmt("q8_0", 8, 32, 32, 0, False, "none", 128),
    _fmt("iq4_nl", 4, 32, 32, 0, False, "none", 0, IQ4_NL_LEVELS),
    _fmt("q2_k", 2, 256, 16, 4, False, "coded", 0),
    _fmt("q3_k", 3, 256, 16, 6, True, "none", 4),
    _fmt("q4_k", 4, 256, 32, 6, False, "coded", 0),
    _fmt("q5_k", 5, 256, 32, 6, False, "coded", 0),
    _fmt("q6_k", 6, 256, 16, 8, True, "none", 32),
)}

# What llama.cpp writes when a row is not a multiple of 256 (its llama-quant.cpp): the weights
# keep a 32-weight format of about the same precision.
K_FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}


def block_format(name: str) -> BlockFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown block format {name!r}; known: {', '.join(FORMATS)}") from None


def format_for_width(fmt: BlockFormat, in_features: int) -> BlockFormat | None:
    """``fmt`` if rows of ``in_features`` split into its blocks, else llama.cpp's fallback for
    that width (None when no 32-weight format fits either)."""
    if in_features % fmt.block == 0:
        return fmt
    fallback = FORMATS.get(K_FALLBACK.get(fmt.name, ""))
    if fallback is not None and in_features % fallback.block == 0:
        return fallback
    return None


@dataclass(frozen=True)
class BlockGrid:
    """The scales of one weight matrix in a block format (shapes in the module docstring)."""

    fmt: BlockFormat
    d: torch.Tensor  # float16 (out, in/block)
    sc: torch.Tensor | None = None  # int16 (out, in/sub), two-level formats
    m: torch.Tensor | None = None  # float16 (out, in/block): the minimum (float) or dmin (coded)
    mn: torch.Tensor | None = None  # int16 (out, in/sub): minimum codes (coded)

    def rows(self, rows: slice | torch.Tensor) -> BlockGrid:
        def cut(t):
            return None if t is None else t[rows].contiguous()

        return BlockGrid(self.fmt, cut(self.d), cut(self.sc), cut(self.m), cut(self.mn))

    def check(self, shape: tuple[int, int]) -> None:
        """Raise ``ValueError`` unless every field has the shape, dtype and range a
        ``shape`` weight needs in this format."""
        out_f, in_f = shape
        fmt = self.fmt
        if in_f % fmt.block:
            raise ValueError(f"rows of {in_f} weights do not split into {fmt.name}'s blocks of {fmt.block}")
        per_block, per_sub = (out_f, in_f // fmt.block), (out_f, in_f // fmt.sub)
        want = {"d": (torch.float16, per_block),
                "sc": (torch.int16, per_sub) if fmt.two_level else None,
                "m": (torch.float16, per_block) if fmt.minimum != "none" else None,
                "mn": (torch.int16, per_sub) if fmt.minimum == "coded" else None}
        lo, hi = fmt.sub_range() if fmt.two_level else (0, 0)
        for field, spec in want.items():
            t = getattr(self, field)
            if spec is None:
                if t is not None:
                    raise ValueError(f"{fmt.name} stores no {field}")
                continue
            if t is None or t.dtype != spec[0] or tuple(t.shape) != spec[1]:
                got = "nothing" if t is None else f"{t.dtype} {tuple(t.shape)}"
                raise ValueError(f"{fmt.name} needs {field} {spec[0]} {spec[1]}, got {got}")
            if field in ("sc", "mn") and t.numel() and (int(t.min()) < (0 if field == "mn" else lo) or int(t.max()) > hi):
                raise ValueError(f"{fmt.name} {field} codes lie outside [{0 if field == 'mn' else lo}, {hi}]")

    def sub_scales(self) -> torch.Tensor:
        """float32 ``(out, in/sub)``: each sub-block's scale, ``d`` or ``d * sc`` in float32."""
        fmt = self.fmt
        d = self.d.float().repeat_interleave(fmt.block // fmt.sub, dim=1)
        return d * self.sc.float() if fmt.two_level else d

    def sub_offsets(self) -> torch.Tensor | None:
        """float32 ``(out, in/sub)`` added after the product: ``m``, or ``-(dmin * mn)``."""
        fmt = self.fmt
        if fmt.minimum == "none":
            return None
        m = self.m.float().repeat_interleave(fmt.block // fmt.sub, dim=1)
        return m if fmt.minimum == "float" else -(m * self.mn.float())

    def columns(self, in_features: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per weight: the scale and the added offset, float32 ``(out, in)`` (offset None for
        symmetric formats), for quantizers that place codes column by column."""
        scale = self.sub_scales().repeat_interleave(self.fmt.sub, dim=1)
        offset = self.sub_offsets()
        return scale, None if offset is None else offset.repeat_interleave(self.fmt.sub, dim=1)


def dequantize_blocks(codes: torch.Tensor, grid: BlockGrid) -> torch.Tensor:
    """float32 ``(out, in)``: what ``codes`` on ``grid`` stand for, rounded as ggml rounds."""
    out_f, in_f = codes.shape
    fmt = grid.fmt
    levels = grid.fmt.level_table()[codes.long()].reshape(out_f, in_f // fmt.sub, fmt.sub)
    w = grid.sub_scales()[..., None] * levels
    offset = grid.sub_offsets()
    if offset is not None:
        w = w + offset[..., None]
    return w.reshape(out_f, in_f)


def quantize_to_blocks(w: torch.Tensor, grid: BlockGrid) -> torch.Tensor:
    """uint8 codes ``(out, in)`` of ``w`` on a fixed grid: the nearest level of each weight."""
    scale, offset = grid.columns(w.shape[1])
    return nearest_codes(w.float(), scale, offset, grid.fmt)


def nearest_codes(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, fmt: BlockFormat) -> torch.Tensor:
    """The code whose weight ``scale * level (+ offset)`` is nearest each ``x`` (shapes
    broadcast); a zero scale gives the code of level 0 (or the lowest code)."""
    target = x if offset is None else x - offset
    ratio = torch.where(scale != 0, target / torch.where(scale != 0, scale, 1.0), 0.0)
    if fmt.levels is None:
        return torch.clamp(torch.round(ratio) + fmt.offset, 0, fmt.maxq).to(torch.uint8)
    table = fmt.level_table()
    mids = (table[1:] + table[:-1]) / 2  # a non-uniform table: the nearest level by midpoints
    return torch.bucketize(ratio.contiguous(), mids).to(torch.uint8)


def _signed_extreme(g: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude along the last axis, with its sign."""
    idx = g.abs().argmax(dim=-1, keepdim=True)
    return g.gather(-1, idx).squeeze(-1)


def _sub_grids(g: torch.Tensor, fmt: BlockFormat, mse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float scale (and minimum) per sub-block of ``g`` ``(out, n_sub, sub)``: from the range,
    or with ``mse`` the range shrunk by the factor (40 from 1 down to 0.22) that minimises
    ``sum |w - w_hat|**2.4`` on the float grid."""
    if fmt.minimum == "none":
        extreme = _signed_extreme(g)
        # the extreme weight lands on the most negative level (-offset, or the table's first)
        lowest = -fmt.offset if fmt.levels is None else fmt.levels[0]
        scale, low = extreme / lowest, None
    else:
        low = g.amin(dim=-1)
        if fmt.minimum == "coded":
            low = low.clamp(max=0)  # the minimum code is unsigned: -dmin * mn <= 0
        scale = (g.amax(dim=-1) - low) / fmt.maxq
    if not mse:
        return scale, low
    table = fmt.level_table()
    best_err = torch.full(scale.shape, float("inf"))
    best_scale, best_low = scale.clone(), None if low is None else low.clone()
    for i in range(40):
        p = 1.0 - 0.8 * i / 40
        s, lo = scale * p, None if low is None else low * p
        codes = nearest_codes(g, s[..., None], None if lo is None else lo[..., None], fmt)
        approx = s[..., None] * table[codes.long()]
        if lo is not None:
            approx = approx + lo[..., None]
        err = (approx - g).abs().pow(2.4).sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, s, best_scale)
        if lo is not None:
            best_low = torch.where(better, lo, best_low)
    return best_scale, best_low


def _second_level(values: torch.Tensor, fmt: BlockFormat, per_block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float sub-block values ``(out, n_sub)`` as one float16 ``d`` per block times integer
    codes: ``(d (out, n_blocks) float16, codes (out, n_sub) int16)``."""
    out_f, n_sub = values.shape
    v = values.reshape(out_f, n_sub // per_block, per_block)
    lo, hi = fmt.sub_range()
    if fmt.signed_scales:
        d = _signed_extreme(v) / lo  # the extreme sub-scale on the most negative code
    else:
        d = v.amax(dim=-1) / hi
    d16 = d.to(torch.float16)
    df = d16.float()[..., None]
    codes = torch.where(df != 0, v / torch.where(df != 0, df, 1.0), 0.0).round().clamp(lo, hi)
    return d16, codes.reshape(out_f, n_sub).to(torch.int16)


def fit_block_grid(w: torch.Tensor, fmt: BlockFormat, mse: bool = False) -> BlockGrid:
    """The grid of ``w`` (float ``(out, in)``, ``in`` a multiple of ``fmt.block``) in ``fmt``."""
    w = w.float()
    out_f, in_f = w.shape
    if in_f % fmt.block:
        raise ValueError(f"rows of {in_f} weights do not split into {fmt.name}'s blocks of {fmt.block}")
    g = w.reshape(out_f, in_f // fmt.sub, fmt.sub)
    scale, low = _sub_grids(g, fmt, mse)
    if not torch.isfinite(scale).all() or scale.abs().max() > 65504:
        raise OverflowError(f"a block's range exceeds float16; weights are too large for {fmt.name}")
    if not fmt.two_level:
        m = None if low is None else low.to(torch.float16)
        return BlockGrid(fmt, scale.to(torch.float16), m=m)
    per_block = fmt.block // fmt.sub
    d, sc = _second_level(scale, fmt, per_block)
    if fmt.minimum == "none":
        return BlockGrid(fmt, d, sc)
    dmin, mn = _second_level(-low, fmt, per_block)
    return BlockGrid(fmt, d, sc, dmin, mn)
