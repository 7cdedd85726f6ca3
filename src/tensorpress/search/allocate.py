"""Allocations across layers, resolved before the engine compresses: one place for all of them.

A stage that sets a total and lets the layers share it — ``target_bits`` of the quantizers
(per-layer widths or llama.cpp types), SVD-LLM's ``target_reduction`` (per-layer ranks), OWL's
per-block sparsities — is turned here into a stage with fixed per-layer settings, on the model
as the structural stages left it. Budgeted choices go through ``greedy_choice`` (the methods
only price their options: ``width_costs``, ``format_costs``, ``allocation_options``); OWL's is a
rule of its own (outlier ratios), applied by the stage's ``allocate``. ``compress`` is the
engine with this allocation layer plugged in: ``tp.compress``.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from typing import Any

from torch import nn

from tensorpress.data import TokenWindows
from tensorpress.engine import CompressionResult
from tensorpress.engine import compress as engine_compress
from tensorpress.engine.linears import weight_of
from tensorpress.engine.sequential import (
    fisher_importance,
    stage_linears,
    whole_model_stats,
)
from tensorpress.errors import CalibrationError, RecipeError
from tensorpress.methods import LayerInput
from tensorpress.methods.quant.mixed import format_costs, width_costs
from tensorpress.models import LoadedModel
from tensorpress.recipe import Recipe, RecipeLike
from tensorpress.search.greedy import greedy_choice

log = logging.getLogger(__name__)


def compress(lm: LoadedModel, recipe: RecipeLike, calib: TokenWindows | None = None, *, batch_size: int = 8,
             inplace: bool = False) -> CompressionResult:
    """Compress ``lm`` with ``recipe`` (a ``Recipe``, a built-in name, a YAML path or a dict with
    ``stages``); the original is left untouched unless ``inplace``. Allocations across layers
    are resolved by this layer (``resolve``)."""
    return engine_compress(lm, recipe, calib, batch_size=batch_size, inplace=inplace, allocate=resolve)


def resolve(lm: LoadedModel, model: nn.Module, recipe: Recipe, calib: TokenWindows | None, batch_size: int) -> Recipe:
    """``recipe`` with every cross-layer allocation replaced by per-layer settings."""
    recipe = allocate_widths(lm, model, recipe, calib, batch_size)
    return allocate_stages(lm, model, recipe, calib, batch_size)


def allocate_widths(lm: LoadedModel, model: nn.Module, recipe: Recipe, calib: TokenWindows | None, batch_size: int) -> Recipe:
    """Resolve ``target_bits`` of quantizer stages into per-layer ``bits_overrides``, from the
    layers' weights and their inputs' mean squares on a few calibration windows."""
    prefix = lm.adapter.blocks_path(model)
    blocks = lm.adapter.blocks(model)
    stages = list(recipe.stages)
    for index, stage in enumerate(stages):
        if getattr(stage, "target_bits", None) is None:
            continue
        if calib is None:
            raise CalibrationError(f"stage {index + 1} ({stage.name}): target_bits needs calibration data")
        per_block = {i: stage_linears(lm, b, f"{prefix}.{i}", stage) for i, b in enumerate(blocks)}
        windows = calib.input_ids[: stage.allocation_samples]
        names = {f"{prefix}.{i}.{rel}": blocks[i].get_submodule(rel) for i, rels in per_block.items() for rel in rels}
        if stage.sensitivity == "fisher":
            importance = fisher_importance(lm, model, names, windows, f"stage {index + 1} ({stage.name})")
        else:
            stats = whole_model_stats(lm, model, per_block, frozenset({"act_sq"}), windows, batch_size, "measuring layer sensitivities")
            importance = {name: st["act_sq"] / max(st["tokens"], 1) for name, st in stats.items()}
        formats = getattr(stage, "format_choices", None)
        costs, numel = {}, {}
        try:
            for name, module in names.items():
                weight = weight_of(module)
                if formats:
                    costs[name] = format_costs(weight, importance[name], formats, stage.mse)
                else:
                    costs[name] = width_costs(weight, importance[name], stage.bit_choices, stage.group_size, stage.symmetric)
                numel[name] = weight.numel()
        except ValueError as exc:
            raise RecipeError(f"stage {index + 1} ({stage.name}): {exc}") from None
        total = sum(numel.values())
        try:
            widths = greedy_choice(costs, stage.target_bits * total)
        except ValueError:
            cheapest = sum(min(c[1] for c in options.values()) for options in costs.values())
            raise RecipeError(f"stage {index + 1} ({stage.name}): target {stage.target_bits} bits/weight is below the "
                              f"narrowest width's cost ({cheapest / total:.3f} bits/weight with scales)") from None
        counts = dict(sorted(Counter(widths.values()).items()))
        log.info("stage %d (%s): %s for %.3f bits/weight: %s", index + 1, stage.name,
                 "llama.cpp types" if formats else "widths", stage.target_bits, counts)
        if formats:  # each layer's chosen type by its exact name; the most common one for the rest
            update = {"format": counts and max(counts, key=counts.get), "format_choices": None, "target_bits": None,
                      "format_overrides": {f"re:{re.escape(name)}": fmt for name, fmt in widths.items()}}
        else:
            update = {"bits_overrides": widths, "target_bits": None}
        stages[index] = stage.model_copy(update=update)
    return recipe.model_copy(update={"stages": stages})


def allocate_stages(lm: LoadedModel, model: nn.Module, recipe: Recipe, calib: TokenWindows | None, batch_size: int) -> Recipe:
    """Let each stage that ``wants_allocation()`` see all its layers at once (weights of the
    uncompressed model and, if it declares ``needs``, their statistics on its
    ``allocation_samples`` windows) and replace it by the copy its ``allocate`` returns."""
    prefix = lm.adapter.blocks_path(model)
    blocks = lm.adapter.blocks(model)
    stages = list(recipe.stages)
    for index, stage in enumerate(stages):
        if not stage.wants_allocation():
            continue
        per_block = {i: stage_linears(lm, b, f"{prefix}.{i}", stage) for i, b in enumerate(blocks)}
        stats: dict[str, dict[str, Any]] = {}
        wanted = stage.allocation_stats()
        if wanted:
            if calib is None:
                raise CalibrationError(f"stage {index + 1} ({stage.name}): its allocation needs calibration data")
            windows = calib.input_ids[: getattr(stage, "allocation_samples", len(calib.input_ids))]
            if wanted - {"fisher"}:
                stats = whole_model_stats(lm, model, per_block, wanted - {"fisher"}, windows, batch_size,
                                           f"statistics for the {stage.name} allocation")
            if "fisher" in wanted:
                modules = {f"{prefix}.{i}.{rel}": blocks[i].get_submodule(rel) for i, rels in per_block.items() for rel in rels}
                for name, fisher in fisher_importance(lm, model, modules, windows, f"stage {index + 1} ({stage.name})").items():
                    stats.setdefault(name, {})["fisher"] = fisher
        layers = []
        for i, rels in per_block.items():
            for rel in rels:
                name = f"{prefix}.{i}.{rel}"
                weight = weight_of(blocks[i].get_submodule(rel))
                layers.append(LayerInput(name, weight, weight, None, stats.get(name, {})))
        options = stage.allocation_options(layers)
        if options is None:  # a rule of the method's own (OWL's outlier ratios, a uniform share)
            stages[index] = stage.allocate(layers)
        else:
            costs, budget = options
            try:
                stages[index] = stage.with_allocation(greedy_choice(costs, budget))
            except ValueError as exc:
                raise RecipeError(f"stage {index + 1} ({stage.name}): {exc}") from None
    return recipe.model_copy(update={"stages": stages})
