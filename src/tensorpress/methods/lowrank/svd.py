"""Low-rank decomposition methods: a linear becomes two thinner matmuls (``LowRankPart``).

* ``svd``: plain truncated SVD of the weight (no calibration);
* ``asvd``: columns scaled by mean activation magnitudes before truncation (ASVD);
* ``svd_llm``: truncation in the whitened space of the input Gram matrix, which minimises the
  output error on the calibration inputs (SVD-LLM).

The rank of a layer comes from ``rank`` (fixed), ``keep`` (the fraction of the layer's
parameters the factors may hold: the same ratio everywhere) or ``target_reduction`` (a global
budget: the fraction of the selected linears' parameters to remove, with ranks allocated across
layers from their spectra, ``allocation``). A layer whose rank would not save parameters
(``r >= in*out/(in+out)``) stays dense.
"""

from __future__ import annotations

import logging
import math
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from tensorpress.errors import RecipeError
from tensorpress.methods.base import LayerInput, MethodConfig, matches, register_method
from tensorpress.methods.lowrank.lowrank_math import (
    channel_scales,
    fisher_component_costs,
    hessian_root,
    spectrum,
    truncate,
)
from tensorpress.parts import DensePart, LowRankPart, Part

log = logging.getLogger(__name__)

_STEP = 8  # ranks are allocated in steps of this many components


class LowRankSettings(MethodConfig):
    """Settings of every method that fits low-rank factors."""

    factor_bits: Literal[8, 16, 32] = Field(16, description="storage of the factors: int8 (+ a float16 scale per component), float16 or float32")
    damp: float = Field(0.01, gt=0, le=1, description="eigenvalue floor of the input Gram matrix, relative to its mean")


class _Truncation(LowRankSettings):
    rank: int | None = Field(None, ge=1, description="fixed rank for every selected layer (>= 1)")
    keep: float | None = Field(None, gt=0, le=1, description="fraction of each layer's parameters kept by its factors (rank = keep * in*out/(in+out))")
    target_reduction: float | None = Field(
        None, gt=0, lt=1, description="fraction of the selected linears' parameters to remove in all; ranks allocated across layers"
    )
    allocation: Literal["greedy", "uniform"] = Field(
        "greedy",
        description="with target_reduction: greedy = add rank where it removes the most relative output "
        "error per parameter (layers may stay dense); uniform = the same keep ratio everywhere",
    )
    sensitivity: Literal["fisher", "relative"] = Field(
        "fisher",
        description="greedy allocation's error measure: fisher = each dropped component's estimated LM-loss "
        "increase (squared loss gradients on allocation_samples windows, causal models); relative = the "
        "layer's relative output error (every layer weighted alike)",
    )
    rank_overrides: dict[str, Annotated[int, Field(ge=1)]] = Field(
        default_factory=dict, description="per-layer ranks {pattern: rank}, first match wins (filled by the allocation)"
    )
    allocation_samples: int = Field(16, ge=1, description="calibration windows used by the allocation")

    @model_validator(mode="after")
    def _one_size(self) -> _Truncation:
        given = [k for k in ("rank", "keep", "target_reduction") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give only one of rank, keep, target_reduction (got {', '.join(given)})")
        if not given and not self.rank_overrides:
            raise ValueError("give one of rank, keep or target_reduction")
        return self

    def root(self, layer: LayerInput) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(S, S^-1)`` of the space the truncation measures error in; None = weight space."""
        return None

    def rank_for(self, name: str, shape: tuple[int, int]) -> int | None:
        """The layer's rank, or None to keep it dense."""
        for pattern, rank in self.rank_overrides.items():
            if matches(name, [pattern]):
                return rank
        if self.rank is not None:
            return self.rank
        if self.keep is not None:
            even = LowRankPart.break_even_rank(*shape)
            if self.keep * even < 1:  # rank 0 would zero the layer
                raise RecipeError(
                    f"{self.name}: keep={self.keep} leaves rank 0 for {name} ({shape[0]} x {shape[1]}: rank = "
                    f"keep x {even:.1f}); accepted for this layer: {math.ceil(1000 / even) / 1000} <= keep <= 1"
                )
            return int(self.keep * even)
        raise RecipeError(f"{self.name}: no rank for {name} (target_reduction is resolved by the engine's allocation)")

    def apply(self, layer: LayerInput) -> list[Part]:
        rank = self.rank_for(layer.name, tuple(layer.weight.shape))
        if rank is None or rank >= LowRankPart.break_even_rank(*layer.weight.shape):
            return [DensePart(layer.weight)]
        a, b = truncate(layer.weight, rank, self.root(layer))
        return [LowRankPart(a, b, self.factor_bits)]

    # budgeted allocation -------------------------------------------------------------------
    def wants_allocation(self) -> bool:
        return self.target_reduction is not None

    def allocation_stats(self) -> frozenset[str]:
        if self.target_reduction is not None and self.allocation == "greedy" and self.sensitivity == "fisher":
            return self.needs | {"fisher"}
        return self.needs

    def allocation_options(self, layers: list[LayerInput]) -> tuple[dict[str, dict[Any, tuple[float, float]]], float] | None:
        """Greedy ``target_reduction``: per layer, ranks in steps of ``_STEP`` up to its break-even
        rank, priced by the error of the components they drop (``sensitivity``) and their
        parameters, or ``"dense"`` (no error, ``in*out`` parameters); the budget is
        ``(1 - target_reduction)`` of all the layers' parameters."""
        if self.target_reduction is None or self.allocation != "greedy":
            return None
        options = {}
        for layer in layers:
            out_f, in_f = layer.weight.shape
            if self.sensitivity == "fisher":
                errors = fisher_component_costs(layer.weight, layer.stats["fisher"], self.root(layer))
            else:  # each layer's relative output error, every layer alike
                energy = spectrum(layer.weight, self.root(layer)).square()
                errors = energy / energy.sum().clamp(min=1e-30)
            rel = errors.tolist()
            tail = [0.0] * (len(rel) + 1)  # tail[r]: error of the components beyond rank r
            for i in range(len(rel) - 1, -1, -1):
                tail[i] = tail[i + 1] + rel[i]
            even = LowRankPart.break_even_rank(out_f, in_f)
            dense = math.ceil(even)  # a rank at the break-even point keeps the layer dense
            ranks = [r for r in range(0, int(even) // _STEP * _STEP + 1, _STEP) if r < even]
            choices = {r: (tail[min(r, len(tail) - 1)], float(r * (out_f + in_f))) for r in ranks}
            choices[dense] = (0.0, float(out_f * in_f))
            options[layer.name] = choices
        return options, (1 - self.target_reduction) * sum(layer.weight.numel() for layer in layers)

    def with_allocation(self, choice: dict[str, Any]) -> _Truncation:
        """``rank_overrides`` from the chosen ranks (dense layers: their break-even rank)."""
        return self._with_ranks({name: int(rank) for name, rank in choice.items()})

    def allocate(self, layers: list[LayerInput]) -> _Truncation:
        """Resolve a uniform ``target_reduction`` into ``rank_overrides``."""
        if self.target_reduction is None:
            return self
        ranks = {layer.name: int((1 - self.target_reduction) * LowRankPart.break_even_rank(*layer.weight.shape)) for layer in layers}
        _check_uniform_ranks(self, ranks, {layer.name: tuple(layer.weight.shape) for layer in layers})
        return self._with_ranks(ranks)

    def _with_ranks(self, ranks: dict[str, int]) -> _Truncation:
        overrides = {f"re:{name.replace('.', '[.]')}": rank for name, rank in ranks.items()}
        log.info("%s: ranks for %.0f %% fewer parameters on %d layers", self.name, 100 * (self.target_reduction or 0), len(ranks))
        return self.model_copy(update={"rank_overrides": overrides, "target_reduction": None})


def _check_uniform_ranks(stage: _Truncation, ranks: dict[str, int], shapes: dict[str, tuple[int, int]]) -> None:
    """Refuse a uniform ``target_reduction`` that leaves layers at rank 0, as ``keep`` would: the
    same ratio everywhere removing the output of every layer of some shape. (The greedy
    allocation may leave a layer at rank 0 by choice: its output is worth less than the ranks
    spent elsewhere.)"""
    zero = sorted(name for name, rank in ranks.items() if rank < 1)
    if zero:
        even = min(LowRankPart.break_even_rank(*shapes[name]) for name in zero)  # rank = (1 - t) x break-even
        raise RecipeError(
            f"{stage.name}: target_reduction={stage.target_reduction} with allocation 'uniform' leaves rank 0 for "
            f"{len(zero)} of {len(ranks)} layers (e.g. {zero[0]}), removing their output; accepted: "
            f"0 < target_reduction <= {math.floor(1000 * (1 - 1 / even)) / 1000}"
        )



@register_method
class SVD(_Truncation):
    name: ClassVar[str] = "svd"
    summary: ClassVar[str] = "truncated SVD of each weight into two thin factors (weight-space error, no calibration)"
    method: Literal["svd"] = "svd"


@register_method
class ASVD(_Truncation):
    name: ClassVar[str] = "asvd"
    summary: ClassVar[str] = "activation-aware SVD: columns scaled by mean |x|^alpha before truncation (ASVD)"
    needs: ClassVar[frozenset[str]] = frozenset({"act_abs"})
    method: Literal["asvd"] = "asvd"
    alpha: float = Field(0.5, ge=0, le=2, description="exponent of the activation-magnitude scaling")

    def root(self, layer: LayerInput) -> tuple[torch.Tensor, torch.Tensor]:
        return channel_scales(layer.stats["act_abs"] / max(layer.stats["tokens"], 1), self.alpha)


@register_method
class SVDLLM(_Truncation):
    name: ClassVar[str] = "svd_llm"
    summary: ClassVar[str] = "SVD in the whitened input space: truncation minimises the output error on calibration data (SVD-LLM)"
    needs: ClassVar[frozenset[str]] = frozenset({"xtx"})
    method: Literal["svd_llm"] = "svd_llm"

    def root(self, layer: LayerInput) -> tuple[torch.Tensor, torch.Tensor]:
        return hessian_root(layer.stats["xtx"], self.damp)
