"""GPTQ (Frantar et al., 2022) as a pure function of a weight and its input Hessian.

Columns are quantized one at a time; the error of each is spread over the columns not yet
quantized through the inverse Hessian's upper Cholesky factor, so the layer's output on the
calibration inputs changes as little as possible. Updates inside a block of ``block_size``
columns are applied immediately, those to later columns once per block (lazy batch updates).

Grouping: without ``act_order``, a group's grid is chosen when its first column is reached, from
the already-updated weights (natural order). With ``act_order``, columns are processed by
decreasing Hessian diagonal, and every group's grid is fixed up front from the original weights
("static groups"), so scales and zeros stay in natural column order and the stored layout is the
same as RTN's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from tensorpress.parts.quant_math import QuantGrid, compute_grid, compute_grid_mse, effective_group

log = logging.getLogger(__name__)


def _find_grid(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool, mse: bool) -> QuantGrid:
    if mse:
        return compute_grid_mse(w, bits, group_size, symmetric)
    return compute_grid(w, bits, group_size, symmetric)


def inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``, float32, computed in float64.

    If the damped Hessian is still not positive definite (too few calibration tokens for the
    input width), the damping is raised tenfold until it is, and a warning says so."""
    h = h.double()
    mean_diag = torch.diagonal(h).mean().item()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(6):
        factor, info = torch.linalg.cholesky_ex(h + damp * mean_diag * eye)
        if info.item() == 0:
            inv = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if info.item() == 0:
                if attempt:
                    log.warning("Hessian needed damping %.3g (relative) to be positive definite", damp)
                return upper.float()
        damp *= 10
    raise ValueError("the Hessian is not positive definite even with strong damping")


@dataclass
class GPTQResult:
    codes: torch.Tensor  # uint8 (out, in), natural column order
    grid: QuantGrid
    sensitivity: torch.Tensor | None = None  # GPTQ's error metric err**2 per weight (out, in)
    outliers: torch.Tensor | None = None  # float16-exact corrections at the outlier positions, else 0


def gptq_quantize(*args, **kwargs) -> tuple[torch.Tensor, QuantGrid]:
    """``gptq(...)`` reduced to ``(codes, grid)``: codes uint8 (out, in) in natural column
    order and the grid, in the layout of ``parts.quant_math``."""
    result = gptq(*args, **kwargs)
    return result.codes, result.grid


def gptq(
    weight: torch.Tensor,
    xtx: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    act_order: bool = True,
    damp: float = 0.01,
    block_size: int = 128,
    mse: bool = False,
    outlier_mask: torch.Tensor | None = None,
    sensitivity: bool = False,
) -> GPTQResult:
    """GPTQ with the extras outlier-aware quantization needs.

    ``outlier_mask`` (bool, out x in): weights kept exactly instead of quantized — their error is
    zero, they are left out of the grids' ranges, and ``outliers`` holds the float16 corrections
    ``w - dequant(code)`` that a sparse part adds back. ``sensitivity``: also return GPTQ's error
    metric per weight, ``((w - q) / [U]_jj)^2`` with ``U`` the inverse Hessian's Cholesky factor."""
    w = weight.detach().float().clone()
    out_f, n = w.shape
    h = xtx.detach().double().clone()
    dead = torch.diagonal(h) == 0  # inputs that were always zero: any weight there is free
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    group = effective_group(n, group_size)
    n_groups = -(-n // group)
    maxq = (1 << bits) - 1
    mask = outlier_mask.bool() if outlier_mask is not None else None

    def ranged(values: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        # outliers are zeroed for the range (0 is on every grid, so it never widens it)
        return values if keep is None else values.masked_fill(keep, 0.0)

    scales = torch.empty(out_f, n_groups, dtype=torch.float16)
    zeros = None if symmetric else torch.empty(out_f, n_groups, dtype=torch.uint8)
    if act_order:
        static = _find_grid(ranged(w, mask), bits, group_size, symmetric, mse)
        scales.copy_(static.scales)
        if zeros is not None:
            zeros.copy_(static.zeros)
        perm = torch.argsort(torch.diagonal(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    else:
        perm = torch.arange(n)
    mask_p = None if mask is None else mask[:, perm]
    col_group = perm // group  # group of the column processed at each position
    zero_implicit = float(1 << (bits - 1))

    hinv = inverse_hessian_factor(h, damp)
    codes = torch.empty(out_f, n, dtype=torch.uint8)
    sens = torch.empty(out_f, n) if sensitivity else None
    corrections = torch.zeros(out_f, n) if mask is not None else None
    for b0 in range(0, n, block_size):
        b1 = min(b0 + block_size, n)
        w_blk = w[:, b0:b1].clone()
        err_blk = torch.empty_like(w_blk)
        hinv_blk = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            g = int(col_group[col])
            if not act_order and col % group == 0:
                # dynamic group: grid from the current (already error-compensated) weights
                end = min(col + group, n)
                span = torch.cat([w_blk[:, i : i + end - col], w[:, b1:end]], dim=1)
                grid = _find_grid(ranged(span, None if mask_p is None else mask_p[:, col:end]), bits, None, symmetric, mse)
                scales[:, g] = grid.scales[:, 0]
                if zeros is not None:
                    zeros[:, g] = grid.zeros[:, 0]
            scale = scales[:, g].float()
            zero = zeros[:, g].float() if zeros is not None else zero_implicit
            x = w_blk[:, i]
            q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
            codes[:, col] = q.to(torch.uint8)
            deq = (q - zero) * scale
            if corrections is not None:
                keep = mask_p[:, col]
                fix = torch.where(keep, (x - deq).half().float(), torch.zeros_like(x))
                corrections[:, col] = fix
                deq = deq + fix
            err = (x - deq) / hinv_blk[i, i]
            if sens is not None:
                sens[:, col] = err.square()
            w_blk[:, i:] -= err[:, None] * hinv_blk[i, i:][None, :]
            err_blk[:, i] = err
        w[:, b1:] -= err_blk @ hinv[b0:b1, b1:]
    inv = torch.argsort(perm)
    grid = QuantGrid(scales, zeros, bits, group_size, symmetric)
    return GPTQResult(
        codes[:, inv] if act_order else codes,
        grid,
        None if sens is None else sens[:, inv],
        None if corrections is None else corrections[:, inv],
    )
