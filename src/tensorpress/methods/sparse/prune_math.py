"""Pruning masks from importance scores, and SparseGPT (Frantar & Alistarh, 2023).

Masks are bool ``(out, in)``, True where a weight is kept. ``pattern`` is ``None`` (unstructured)
or ``(n, m)``: ``n`` weights kept in every group of ``m`` consecutive inputs.
"""

from __future__ import annotations

import itertools

import torch

from tensorpress.methods.quant.gptq_math import inverse_hessian_factor
from tensorpress.parts.quant_math import QuantGrid, compute_grid, effective_group


def keep_mask(scores: torch.Tensor, sparsity: float, pattern: tuple[int, int] | None, per: str = "row") -> torch.Tensor:
    """Keep the highest-scoring weights: ``per="row"`` prunes the same fraction in every output
    row (Wanda), ``per="layer"`` one threshold over the whole matrix (magnitude); an N:M
    pattern keeps the ``n`` best of every group of ``m`` inputs (``sparsity`` is then implied)."""
    out_f, in_f = scores.shape
    if pattern is not None:
        n, m = pattern
        if in_f % m:
            raise ValueError(f"an {n}:{m} pattern needs the input dimension ({in_f}) divisible by {m}")
        groups = scores.reshape(out_f, in_f // m, m)
        top = groups.topk(n, dim=-1).indices
        return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True).reshape(out_f, in_f)
    if per == "layer":
        k = int(scores.numel() * sparsity)
        mask = torch.ones(scores.numel(), dtype=torch.bool)
        if k:
            mask[torch.argsort(scores.reshape(-1))[:k]] = False
        return mask.reshape(out_f, in_f)
    k = int(in_f * sparsity)
    mask = torch.ones_like(scores, dtype=torch.bool)
    if k:
        mask.scatter_(1, torch.argsort(scores, dim=1)[:, :k], False)
    return mask


def drop_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of ``values``' shape, False at its ``k`` smallest entries (0 < k <= numel).

    Ties at the k-th value are broken by the lowest flat index first, the order a stable sort
    gives, so the mask does not depend on a sort implementation. A selection (``kthvalue``) and
    two comparisons instead of a full sort: 6x faster for SparseGPT's 128 x 1536 blocks."""
    flat = values.reshape(-1)
    threshold = flat.kthvalue(k).values
    kept = flat > threshold
    ties = (flat == threshold).nonzero().squeeze(1)
    kept[ties[k - int((flat < threshold).sum()):]] = True  # the later ties are kept
    return kept.reshape(values.shape)


def sparsegpt(
    weight: torch.Tensor,
    xtx: torch.Tensor,
    sparsity: float,
    pattern: tuple[int, int] | None = None,
    damp: float = 0.01,
    block_size: int = 128,
    bits: int | None = None,
    group_size: int | None = 128,
    symmetric: bool = False,
    row_splits: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, QuantGrid | None]:
    """Prune (and optionally quantize the survivors) column by column, compensating each
    column's error on the columns not yet processed through the inverse Hessian.

    Unstructured: in each block of ``block_size`` columns, the weights with the smallest
    ``w^2 / [U]_jj^2`` (U the inverse Hessian's upper Cholesky factor) across the block are
    pruned, a fraction ``sparsity`` of them (adaptive mask selection). N:M: the mask of each
    group of ``m`` columns is chosen when its first column is reached, from the updated weights.
    With ``bits``, the kept weights are quantized in the same pass (grids per group of
    ``group_size`` inputs, fixed from the updated weights when the group's first column is
    reached); 0 is on every grid, so pruned weights stay exactly 0.

    ``row_splits``: sizes of consecutive row ranges that are separate matrices stacked (linears
    sharing ``xtx``); each range gets its own adaptive-mask threshold. Default: one matrix.

    Returns ``(weight, mask, grid)``: the new float weight (pruned entries 0; the dequantized
    values when quantizing), the kept mask, and the grid (``None`` without ``bits``).
    """
    w = weight.detach().float().clone()
    out_f, n = w.shape
    h = xtx.detach().double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    hinv = inverse_hessian_factor(h, damp)
    diag = torch.diagonal(hinv)
    group = effective_group(n, group_size) if bits is not None else n
    n_groups = -(-n // group)
    scales = torch.empty(out_f, n_groups, dtype=torch.float16) if bits is not None else None
    zeros = None if bits is None or symmetric else torch.empty(out_f, n_groups, dtype=torch.uint8)
    maxq = (1 << bits) - 1 if bits is not None else 0
    zero_implicit = float(1 << (bits - 1)) if bits is not None else 0.0

    # W^T (in, out): the column being processed is a contiguous row (as in GPTQ)
    wt = w.T.contiguous()
    del w
    keep_t = torch.ones(n, out_f, dtype=torch.bool)
    sizes = row_splits or [out_f]
    if sum(sizes) != out_f or min(sizes) <= 0:
        raise ValueError(f"row_splits {row_splits} do not add up to the weight's {out_f} rows")
    edges = [0, *itertools.accumulate(sizes)]
    segments = [slice(a, b) for a, b in itertools.pairwise(edges)]
    scale = zero = None
    for b0 in range(0, n, block_size):
        b1 = min(b0 + block_size, n)
        blk = wt[b0:b1]
        err_blk = torch.empty(b1 - b0, out_f)
        hinv_blk = hinv[b0:b1, b0:b1]
        d_blk = diag[b0:b1]
        if pattern is None:
            # one threshold over the block's saliencies (of each stacked matrix), as in the
            # reference (adaptive mask)
            saliency = blk.square() / d_blk.square()[:, None]  # (block, out)
            for rows in segments:
                part = saliency[:, rows]
                k = int(part.numel() * sparsity)
                if k:
                    keep_t[b0:b1, rows] = drop_smallest(part, k)
        for i in range(b1 - b0):
            col = b0 + i
            if pattern is not None and i % pattern[1] == 0:
                nn_, m = pattern
                span = slice(i, min(i + m, b1 - b0))
                saliency = blk[span].square() / d_blk[span].square()[:, None]  # (m, out)
                top = saliency.topk(min(nn_, saliency.shape[0]), dim=0).indices
                keep_t[b0 + span.start:b0 + span.stop] = torch.zeros_like(saliency, dtype=torch.bool).scatter_(0, top, True)
            if bits is not None and col % group == 0:
                end = min(col + group, n)
                span_w = torch.cat([blk[i:i + end - col], wt[b1:end]]).T
                grid = compute_grid(span_w, bits, None, symmetric)
                g = col // group
                scales[:, g] = grid.scales[:, 0]
                if zeros is not None:
                    zeros[:, g] = grid.zeros[:, 0]
                scale = scales[:, g].float()
                zero = zeros[:, g].float() if zeros is not None else zero_implicit
            x = blk[i]
            q = torch.where(keep_t[col], x, 0.0)
            if bits is not None:
                q = torch.div(q, scale).round_().add_(zero).clamp_(0, maxq).sub_(zero).mul_(scale)
                q = torch.where(keep_t[col], q, 0.0)
            err = torch.sub(x, q).div_(diag[col])
            blk[i] = q
            # a (k x 1)(1 x out) GEMM: torch's CPU addr_ is ~40x slower for this shape (measured)
            blk[i + 1:].addmm_(hinv_blk[i, i + 1:, None], err[None], alpha=-1)
            err_blk[i] = err
        if b1 < n:
            wt[b1:].addmm_(hinv[b0:b1, b1:].T, err_blk, alpha=-1)
    grid = None if bits is None else QuantGrid(scales, zeros, bits, group_size, symmetric)
    return wt.T.contiguous(), keep_t.T.contiguous(), grid
