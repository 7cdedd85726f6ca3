"""Mixed precision: per-layer bit widths that meet a target average bits per weight.

Each layer's sensitivity to a bit width is its RTN error weighted per weight by an importance:

* ``fisher`` (causal models, the default): the diagonal empirical Fisher information of the
  language-model loss, ``E[(dL/dW_ij)^2]`` over the allocation windows, so
  ``sum_ij F_ij (W - Q_b(W))_ij^2`` estimates the loss increase (second order) and is comparable
  across layers of different kinds and depths;
* ``activations``: the mean squared input of each column, ``E[x_j^2]``, i.e. the layer's own
  output error were its inputs uncorrelated (not comparable across layers, but needs no
  gradients and works for encoders).

Its cost is the exact storage of that width (codes, scales, zero points). With ``format_choices``
the candidates are llama.cpp types instead (``format_costs``: the type's own two-level grid and
its exact bits per weight), so the allocation's result exports to GGUF as it is. The allocation
itself (``tensorpress.search.allocate``, greedy: every layer starts at the narrowest width and
the layer with the largest error reduction per extra bit is upgraded while the budget
``target * total weights`` holds) is the allocation layer's.
"""

from __future__ import annotations

import torch
from torch import nn

from tensorpress.parts import BlockPart, QuantizedPart
from tensorpress.parts.block_math import (
    block_format,
    fit_block_grid,
    format_for_width,
    quantize_to_blocks,
)
from tensorpress.parts.quant_math import quantize_rtn
from tensorpress.progress import track


def width_costs(
    weight: torch.Tensor, importance: torch.Tensor, widths: list[int], group_size: int | None, symmetric: bool
) -> dict[int, tuple[float, int]]:
    """``{bits: (weighted error, storage bits)}`` of one layer for every candidate width;
    ``importance`` is per weight (out, in) or per input column (in,)."""
    out = {}
    importance = importance.float()
    for bits in widths:
        part = QuantizedPart(*quantize_rtn(weight, bits, group_size, symmetric))
        err = ((part.dense() - weight.float()).square() * importance).sum().item()
        out[bits] = (err, part.nbits())
    return out


def format_costs(
    weight: torch.Tensor, importance: torch.Tensor, formats: list[str], mse: bool
) -> dict[str, tuple[float, int]]:
    """``{format: (weighted error, storage bits)}`` of one layer for every candidate llama.cpp
    type, each on llama.cpp's fallback where the rows do not split into its blocks (a layer
    whose rows split into none of them is an error). Candidates that resolve to the same
    type are costed once, under the first name."""
    out, seen = {}, set()
    importance = importance.float()
    for name in formats:
        fmt = format_for_width(block_format(name), weight.shape[1])
        if fmt is None:
            raise ValueError(f"rows of {weight.shape[1]} weights split into no block of {name} or its fallback")
        if fmt.name in seen:
            continue
        seen.add(fmt.name)
        grid = fit_block_grid(weight, fmt, mse)
        part = BlockPart(quantize_to_blocks(weight, grid), grid)
        err = ((part.dense() - weight.float()).square() * importance).sum().item()
        out[name] = (err, part.nbits())
    return out


def fisher_diagonals(model: nn.Module, weights: dict[str, torch.Tensor], windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean squared gradient of the causal LM loss with respect to each of ``weights``
    (name -> parameter of ``model``), one window (row of ``windows``) at a time: the diagonal of
    the empirical Fisher information. Only these weights get gradients; flags are restored."""
    flags = {p: p.requires_grad for p in model.parameters()}
    fisher = {name: torch.zeros_like(w, dtype=torch.float32) for name, w in weights.items()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        with torch.enable_grad():
            for row in track(list(windows), "measuring layer sensitivities (Fisher)"):
                ids = row[None].to(next(iter(weights.values())).device)
                loss = model(input_ids=ids, labels=ids).loss
                # a mixture-of-experts expert no token of this window was routed to has no gradient
                grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
                for name, g in zip(weights, grads):
                    if g is not None:
                        fisher[name] += g.float().square()
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return {name: f / len(windows) for name, f in fisher.items()}
