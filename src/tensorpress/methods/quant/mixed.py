"""Mixed precision: per-layer bit widths that meet a target average bits per weight.

Each layer's sensitivity to a bit width is its RTN error weighted by the diagonal of its input
Hessian, ``sum_j E[x_j^2] * ||W[:, j] - Q_b(W)[:, j]||^2`` (the output error the layer would cause
if its inputs were uncorrelated); its cost is the exact storage of that width (codes, scales,
zero points). A greedy allocation starts every layer at the narrowest width and repeatedly
upgrades the layer with the largest error reduction per extra bit until the budget
``target * total weights`` would be exceeded.
"""

from __future__ import annotations

import torch

from tensorpress.parts import QuantizedPart
from tensorpress.parts.quant_math import quantize_rtn


def width_costs(
    weight: torch.Tensor, act_sq_mean: torch.Tensor, widths: list[int], group_size: int | None, symmetric: bool
) -> dict[int, tuple[float, int]]:
    """``{bits: (weighted error, storage bits)}`` of one layer for every candidate width."""
    out = {}
    for bits in widths:
        part = QuantizedPart(*quantize_rtn(weight, bits, group_size, symmetric))
        err = ((part.dense() - weight.float()).square().sum(0) * act_sq_mean.float()).sum().item()
        out[bits] = (err, part.nbits())
    return out


def allocate_bits(costs: dict[str, dict[int, tuple[float, int]]], numel: dict[str, int], target: float) -> dict[str, int]:
    """Greedy allocation of widths per layer under ``target`` average bits per weight."""
    budget = target * sum(numel.values())
    choice = {name: min(c) for name, c in costs.items()}
    spent = sum(costs[n][b][1] for n, b in choice.items())
    if spent > budget:
        raise ValueError(
            f"target {target} bits/weight is below the narrowest width's cost "
            f"({spent / sum(numel.values()):.3f} bits/weight with scales)"
        )
    while True:
        best = None
        for name, bits in choice.items():
            wider = [b for b in sorted(costs[name]) if b > bits]
            if not wider:
                continue
            nxt = wider[0]
            gain = costs[name][bits][0] - costs[name][nxt][0]
            extra = costs[name][nxt][1] - costs[name][bits][1]
            if spent + extra <= budget and (best is None or gain / extra > best[0]):
                best = (gain / extra, name, nxt, extra)
        if best is None:
            return choice
        _, name, nxt, extra = best
        choice[name] = nxt
        spent += extra
