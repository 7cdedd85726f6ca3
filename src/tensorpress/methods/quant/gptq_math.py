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

from tensorpress.parts.block_math import BlockGrid, nearest_codes
from tensorpress.parts.quant_math import (
    QuantGrid,
    compute_grid,
    compute_grid_mse,
    effective_group,
)

log = logging.getLogger(__name__)


def _find_grid(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool, mse: bool) -> QuantGrid:
    if mse:
        return compute_grid_mse(w, bits, group_size, symmetric)
    return compute_grid(w, bits, group_size, symmetric)


def inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) * I)^-1 = U^T U``, float32,
    computed in float64.

    With ``J`` the order-reversing permutation and ``J H J = L L^T``: ``H^-1 = J L^-T L^-1 J``,
    so ``U = J L^-1 J`` (upper triangular) — one Cholesky and one triangular inverse instead of
    a Cholesky, an inverse and a second Cholesky. If the damped Hessian is still not positive
    definite (too few calibration tokens for the input width), the damping is raised tenfold
    until it is, and a warning says so."""
    h = h.double().flip(0, 1)
    mean_diag = torch.diagonal(h).mean().item()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(6):
        lower, info = torch.linalg.cholesky_ex(h + damp * mean_diag * eye)
        if info.item() == 0:
            if attempt:
                log.warning("Hessian needed damping %.3g (relative) to be positive definite", damp)
            inverse = torch.linalg.solve_triangular(lower, eye, upper=False)
            return inverse.flip(0, 1).float()
        damp *= 10
    raise ValueError("the Hessian is not positive definite even with strong damping")


@dataclass
class GPTQResult:
    codes: torch.Tensor  # uint8 (out, in), natural column order
    grid: QuantGrid | BlockGrid
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
    fixed: BlockGrid | None = None,
) -> GPTQResult:
    """GPTQ with the extras outlier-aware quantization needs.

    ``outlier_mask`` (bool, out x in): weights kept exactly instead of quantized — their error is
    zero, they are left out of the grids' ranges, and ``outliers`` holds the float16 corrections
    ``w - dequant(code)`` that a sparse part adds back. ``sensitivity``: also return GPTQ's error
    metric per weight, ``((w - q) / [U]_jj)^2`` with ``U`` the inverse Hessian's Cholesky factor.

    ``fixed``: a block-format grid (``parts.block_math``) chosen up front from the original
    weights; the column loop places codes on it (``bits``, ``group_size``, ``symmetric`` unused),
    in decreasing-Hessian-diagonal order with ``act_order``. With ``outlier_mask`` too, the grid
    should have been fitted with the outliers out of the ranges (as ``SpQR`` does)."""
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
    if fixed is not None:
        perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(n)
        w, h = w[:, perm], h[perm][:, perm]
    elif act_order:
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
    diag = torch.diagonal(hinv).tolist()
    # Work on W^T (in, out): the column being quantized is a contiguous row, and the updates of
    # the rows below it are single rank-1 and matrix products (both addmm_).
    wt = w.T.contiguous()
    del w
    codes_t = torch.empty(n, out_f, dtype=torch.uint8)
    sens_t = torch.empty(n, out_f) if sensitivity else None
    fixes_t = torch.zeros(n, out_f) if mask is not None else None
    keep_t = None if mask_p is None else mask_p.T.contiguous()
    col_scale = col_zero = col_offset = None
    if fixed is not None:  # each processed column's scale and added offset, up front
        scale_full, offset_full = fixed.columns(n)
        col_scale = scale_full[:, perm].T.contiguous()
        col_offset = None if offset_full is None else offset_full[:, perm].T.contiguous()
        table = fixed.fmt.level_table()
    elif act_order:  # static grids: each processed column's scale and zero, up front
        col_scale = scales.float().T[col_group].contiguous()
        col_zero = zeros.float().T[col_group].contiguous() if zeros is not None else None
    for b0 in range(0, n, block_size):
        b1 = min(b0 + block_size, n)
        blk = wt[b0:b1]  # a view: rows are updated in place
        err_blk = torch.empty(b1 - b0, out_f)
        hinv_blk = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if fixed is not None:
                x = blk[i]
                q = nearest_codes(x, col_scale[col], None if col_offset is None else col_offset[col], fixed.fmt)
                codes_t[col] = q
                deq = col_scale[col] * table[q.long()]
                if col_offset is not None:
                    deq = deq + col_offset[col]
                if fixes_t is not None:
                    fix = torch.where(keep_t[col], (x - deq).half().float(), 0.0)
                    fixes_t[col] = fix
                    deq = deq + fix
                err = torch.sub(x, deq).div_(diag[col])
                if sens_t is not None:
                    sens_t[col] = err.square()
                blk[i + 1 :].addmm_(hinv_blk[i, i + 1 :, None], err[None], alpha=-1)
                err_blk[i] = err
                continue
            g = int(col_group[col])
            if not act_order and col % group == 0:
                # dynamic group: grid from the current (already error-compensated) weights
                end = min(col + group, n)
                span = torch.cat([blk[i : i + end - col], wt[b1:end]]).T
                keep = None if mask_p is None else mask_p[:, col:end]
                grid = _find_grid(ranged(span, keep), bits, None, symmetric, mse)
                scales[:, g] = grid.scales[:, 0]
                if zeros is not None:
                    zeros[:, g] = grid.zeros[:, 0]
            if act_order:
                scale = col_scale[col]
                zero = col_zero[col] if col_zero is not None else zero_implicit
            else:
                scale = scales[:, g].float()
                zero = zeros[:, g].float() if zeros is not None else zero_implicit
            x = blk[i]
            q = torch.div(x, scale).round_().add_(zero).clamp_(0, maxq)
            codes_t[col] = q
            deq = q.sub_(zero).mul_(scale)
            if fixes_t is not None:
                fix = torch.where(keep_t[col], (x - deq).half().float(), 0.0)
                fixes_t[col] = fix
                deq += fix
            err = torch.sub(x, deq).div_(diag[col])
            if sens_t is not None:
                sens_t[col] = err.square()
            # a (k x 1)(1 x out) GEMM: torch's CPU addr_ is ~40x slower for this shape (measured)
            blk[i + 1 :].addmm_(hinv_blk[i, i + 1 :, None], err[None], alpha=-1)
            err_blk[i] = err
        if b1 < n:
            wt[b1:].addmm_(hinv[b0:b1, b1:].T, err_blk, alpha=-1)
    codes = codes_t.T
    sens = None if sens_t is None else sens_t.T
    corrections = None if fixes_t is None else fixes_t.T
    inv = torch.argsort(perm)
    grid = fixed if fixed is not None else QuantGrid(scales, zeros, bits, group_size, symmetric)
    return GPTQResult(
        codes[:, inv] if act_order else codes,
        grid,
        None if sens is None else sens[:, inv],
        None if corrections is None else corrections[:, inv],
    )
