"""Non-uniform quantization math: NF4 with absmax groups, and weighted k-means codebooks."""

from __future__ import annotations

import torch

from tensorpress.parts.codebook import NF4_LEVELS
from tensorpress.parts.quant_math import _grouped, effective_group, expand_groups


def nearest_level(values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level for every value; ``levels`` sorted ascending, (K,) or
    (rows, K) against ``values`` of shape (rows, n). Uses midpoints and a binary search."""
    mids = (levels[..., 1:] + levels[..., :-1]) / 2
    if mids.ndim == 1:
        return torch.bucketize(values, mids).to(torch.uint8)
    return torch.searchsorted(mids.contiguous(), values.contiguous()).to(torch.uint8)


def quantize_nf4(w: torch.Tensor, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes, codebook (1, 16), scales (out, G))``: each group scaled by its absmax (rounded
    to float16 first), then every weight mapped to the nearest NF4 level."""
    w = w.float()
    group = effective_group(w.shape[1], group_size)
    scales = _grouped(w, group).abs().amax(-1).clamp(min=2.0**-24).to(torch.float16)
    normed = w / expand_groups(scales.float(), w.shape[1], group)
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float16).float()
    return nearest_level(normed, levels), levels[None].half(), scales


def weighted_kmeans_1d(
    values: torch.Tensor, weights: torch.Tensor, k: int, iters: int = 25
) -> torch.Tensor:
    """Centroids (sorted, float32 ``(rows, k)``) of 1-D weighted k-means run independently on
    each row of ``values`` (rows, n) with importance ``weights`` (rows, n) or (n,), initialised
    at weighted quantiles. Lloyd iterations with nearest-centroid assignment by binary search."""
    values = values.float()
    weights = weights.float().expand_as(values).clamp(min=1e-12)
    order = values.argsort(dim=1)
    sorted_v = values.gather(1, order)
    cum = weights.gather(1, order).cumsum(1)
    cum = cum / cum[:, -1:]
    quantiles = (torch.arange(k, dtype=torch.float32) + 0.5) / k
    idx = torch.searchsorted(cum.contiguous(), quantiles.expand(values.shape[0], k).contiguous())
    centroids = sorted_v.gather(1, idx.clamp(max=values.shape[1] - 1))
    for _ in range(iters):
        centroids, _ = centroids.sort(dim=1)
        assign = nearest_level(values, centroids).long()
        num = torch.zeros_like(centroids).scatter_add_(1, assign, values * weights)
        den = torch.zeros_like(centroids).scatter_add_(1, assign, weights)
        updated = torch.where(den > 0, num / den.clamp(min=1e-30), centroids)
        if torch.allclose(updated, centroids):
            break
        centroids = updated
    return centroids.sort(dim=1).values


def quantize_kmeans(
    w: torch.Tensor, bits: int, importance: torch.Tensor | None, per_row: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, codebook)`` of a k-means codebook with ``2**bits`` levels (SqueezeLLM-style):
    ``importance`` (in,) weighs each input column (e.g. the mean squared activation), so the
    levels sit where errors cost the most output energy."""
    w = w.float()
    weights = torch.ones(w.shape[1]) if importance is None else importance.float()
    values = w if per_row else w.reshape(1, -1)
    wts = weights.expand_as(w) if per_row else weights.expand_as(w).reshape(1, -1)
    centroids = weighted_kmeans_1d(values, wts, 1 << bits).to(torch.float16)
    codes = nearest_level(values, centroids.float()).reshape(w.shape)
    return codes, centroids
