"""Unstructured and N:M pruning: ``magnitude``, ``wanda`` and ``sparsegpt``.

Every method produces a ``MaskedPart`` (mask + kept values, float16 or quantized with ``bits``).
Shared settings: ``sparsity`` (fraction of weights removed; implied by an N:M ``pattern``),
``pattern`` (``unstructured`` or ``N:M``, N kept of every M inputs), per-layer
``sparsity_overrides``, and a non-uniform ``allocation``:

* ``owl`` (Outlier-Weighed Layerwise sparsity, Yin et al. 2024): each block's share of outlier
  weights (Wanda score above ``owl_m`` times the layer's mean) sets its sparsity within
  ``sparsity ± owl_lambda``, more outliers → fewer pruned, average kept at ``sparsity``.
* ``global`` (magnitude only): one magnitude threshold across all selected layers.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Annotated, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from tensorpress.errors import RecipeError
from tensorpress.methods.base import LayerInput, MethodConfig, matches, register_method, row_ranges
from tensorpress.methods.sparse.prune_math import keep_mask, sparsegpt
from tensorpress.parts import MaskedPart, Part
from tensorpress.parts.masked import parse_pattern
from tensorpress.parts.quant_math import compute_grid, quantize_with_grid

_BLOCK = re.compile(r"^(.*\.\d+)\.")  # "model.layers.3.mlp.up_proj" -> "model.layers.3"


class PruneSettings(MethodConfig):
    sparsity: float = Field(0.5, gt=0, lt=1, description="fraction of weights removed (unstructured), 0 < sparsity < 1")
    pattern: str = Field("unstructured", description="'unstructured', or 'N:M' = N weights kept in every M consecutive inputs (2:4, 4:8)")
    sparsity_overrides: dict[str, Annotated[float, Field(gt=0, lt=1)]] = Field(
        default_factory=dict, description="per-layer sparsity {module-name pattern: sparsity}, first match wins (filled in by the allocation)"
    )
    allocation: Literal["uniform", "owl", "global"] = Field(
        "uniform", description="uniform; owl = outlier-weighted per-block sparsity (same average); global = one magnitude threshold (magnitude only)"
    )
    owl_lambda: float = Field(0.08, ge=0, lt=0.5, description="owl: largest deviation of a block's sparsity from the average")
    owl_m: float = Field(5.0, gt=1, description="owl: a weight is an outlier when its Wanda score exceeds this many times the layer mean")
    allocation_samples: int = Field(16, ge=1, description="calibration windows for the owl statistics")
    bits: int | None = Field(None, ge=2, le=8, description="quantize the kept weights to this many bits (null: float16)")
    group_size: int | None = Field(128, ge=1, description="with bits: weights per quantization group along the input")
    symmetric: bool = Field(False, description="with bits: symmetric grid")

    @model_validator(mode="after")
    def _check(self):
        try:
            pattern = parse_pattern(self.pattern)
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        if pattern is not None and self.allocation != "uniform":
            raise ValueError(f"allocation {self.allocation!r} chooses unstructured sparsities; it cannot be used with pattern {self.pattern}")
        if self.allocation == "owl" and not self.needs:
            raise ValueError("owl allocation ranks layers by activation outliers: use it with wanda or sparsegpt")
        if self.allocation == "global" and self.method != "magnitude":
            raise ValueError("allocation 'global' is a magnitude threshold: use it with magnitude")
        return self

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    def sparsity_for(self, name: str) -> float:
        if self.nm is not None:
            n, m = self.nm
            return 1 - n / m
        for pattern, value in self.sparsity_overrides.items():
            if matches(name, [pattern]):
                return value
        return self.sparsity

    def wants_allocation(self) -> bool:
        return self.allocation != "uniform" and not self.sparsity_overrides

    def allocate(self, layers: list[LayerInput]) -> PruneSettings:
        if self.allocation == "owl":
            overrides = _owl(layers, self.sparsity, self.owl_lambda, self.owl_m)
            spared = sorted(name for name, value in overrides.items() if value <= 0)
            if spared:  # a block's sparsity may fall to sparsity - 2 x owl_lambda (clamped at 0: nothing pruned)
                raise RecipeError(
                    f"{self.name}: owl with sparsity={self.sparsity} and owl_lambda={self.owl_lambda} leaves "
                    f"{len(spared)} layer(s) (e.g. {spared[0]}) at sparsity 0, nothing pruned; accepted: every "
                    f"layer at 0 < sparsity < 1, which owl_lambda < sparsity / 2 = {self.sparsity / 2:g} ensures"
                )
        else:
            overrides = _global_magnitude(layers, self.sparsity)
        return self.model_copy(update={"sparsity_overrides": overrides})

    def part(self, weight: torch.Tensor, mask: torch.Tensor) -> MaskedPart:
        """The stored part for ``weight`` (already zero where pruned) under these settings."""
        if self.bits is None:
            return MaskedPart(mask, weight, pattern=self.nm)
        grid = compute_grid(weight * mask, self.bits, self.group_size, self.symmetric)
        return MaskedPart(mask, pattern=self.nm, codes=quantize_with_grid(weight, grid), grid=grid)


def _input_norms(layer: LayerInput) -> torch.Tensor:
    """Per-input-channel L2 norm of the calibration activations, float32 (in,)."""
    if "act_sq" in layer.stats:
        return layer.stats["act_sq"].float().sqrt()
    if "xtx" in layer.stats:
        return torch.diagonal(layer.stats["xtx"]).float().sqrt()
    raise RecipeError(f"{layer.name}: activation statistics are missing (this stage needs calibration data)")


def _owl(layers: list[LayerInput], target: float, lam: float, m: float) -> dict[str, float]:
    """Per-layer sparsities (one per block) from each block's outlier ratio, mean = target."""
    outliers: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for layer in layers:
        score = layer.weight.abs() * _input_norms(layer)[None, :]
        block = _BLOCK.match(layer.name)
        key = block.group(1) if block else layer.name
        outliers[key][0] += float((score > m * score.mean()).sum())
        outliers[key][1] += score.numel()
    keys = list(outliers)
    ratio = torch.tensor([outliers[k][0] / outliers[k][1] for k in keys], dtype=torch.float64)
    spread = ratio.max() - ratio.min()
    keep = (ratio - ratio.min()) / spread * 2 * lam if spread > 0 else torch.zeros_like(ratio)
    keep = keep - keep.mean() + (1 - target)  # more outliers -> more kept; average kept 1 - target
    sparsity = (1 - keep).clamp(0.0, 0.99)
    by_block = dict(zip(keys, sparsity.tolist(), strict=True))
    out = {}
    for layer in layers:
        block = _BLOCK.match(layer.name)
        out[layer.name] = round(by_block[block.group(1) if block else layer.name], 6)
    return out


def _global_magnitude(layers: list[LayerInput], target: float) -> dict[str, float]:
    magnitudes = torch.cat([layer.weight.abs().reshape(-1) for layer in layers])
    k = int(magnitudes.numel() * target)
    if k == 0:
        return {layer.name: 0.0 for layer in layers}
    threshold = magnitudes.kthvalue(k).values
    return {layer.name: float((layer.weight.abs() <= threshold).float().mean()) for layer in layers}


@register_method
class Magnitude(PruneSettings):
    name: ClassVar[str] = "magnitude"
    summary: ClassVar[str] = "prune the smallest weights by magnitude (per layer, or one global threshold), unstructured or N:M"

    method: Literal["magnitude"] = "magnitude"

    def apply(self, layer: LayerInput) -> list[Part]:
        mask = keep_mask(layer.weight.abs(), self.sparsity_for(layer.name), self.nm, per="layer")
        return [self.part(layer.weight * mask, mask)]


@register_method
class Wanda(PruneSettings):
    name: ClassVar[str] = "wanda"
    summary: ClassVar[str] = "prune by |W| x input activation norm, per output row (Wanda), unstructured or N:M"
    needs: ClassVar[frozenset[str]] = frozenset({"act_sq"})

    method: Literal["wanda"] = "wanda"

    def apply(self, layer: LayerInput) -> list[Part]:
        scores = layer.weight.abs() * _input_norms(layer)[None, :]
        mask = keep_mask(scores, self.sparsity_for(layer.name), self.nm, per="row")
        return [self.part(layer.weight * mask, mask)]


@register_method
class SparseGPT(PruneSettings):
    name: ClassVar[str] = "sparsegpt"
    summary: ClassVar[str] = "SparseGPT: prune (and optionally quantize) column by column with inverse-Hessian error compensation"
    needs: ClassVar[frozenset[str]] = frozenset({"xtx"})

    method: Literal["sparsegpt"] = "sparsegpt"
    damp: float = Field(0.01, gt=0, le=1, description="damping added to the Hessian diagonal, relative to its mean")
    block_size: int = Field(128, ge=1, description="columns per adaptive-mask block and lazy batch update")

    def apply(self, layer: LayerInput) -> list[Part]:
        return self._run([layer])[0]

    def apply_shared(self, layers: list[LayerInput]) -> list[list[Part]] | None:
        """Linears sharing a Hessian (q/k/v, gate/up) at the same sparsity, as one stacked
        matrix with each linear's rows thresholded on their own (the adaptive mask of a block is
        chosen per linear, as when they run one by one): one column loop and one Cholesky."""
        if len(layers) < 2 or len({self.sparsity_for(layer.name) for layer in layers}) != 1:
            return None
        return self._run(layers)

    def _run(self, layers: list[LayerInput]) -> list[list[Part]]:
        block = self.block_size
        if self.nm is not None:
            block = max(self.nm[1], block // self.nm[1] * self.nm[1])  # N:M groups never straddle blocks
        ranges = row_ranges(layers)
        weight, mask, grid = sparsegpt(
            torch.cat([layer.weight for layer in layers]), layers[0].stats["xtx"], self.sparsity_for(layers[0].name), self.nm,
            damp=self.damp, block_size=block, bits=self.bits, group_size=self.group_size, symmetric=self.symmetric,
            row_splits=[r.stop - r.start for r in ranges],
        )
        out: list[list[Part]] = []
        for rows in ranges:
            if grid is None:
                out.append([MaskedPart(mask[rows].contiguous(), weight[rows].contiguous(), pattern=self.nm)])
            else:
                part_grid = grid.rows(rows)
                codes = quantize_with_grid(weight[rows].contiguous(), part_grid)
                out.append([MaskedPart(mask[rows].contiguous(), pattern=self.nm, codes=codes, grid=part_grid)])
        return out
