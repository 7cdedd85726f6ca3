"""Checks the engine runs before it spends time: every pattern of a recipe selects something,
weights are finite, calibration statistics are finite. Each failure is a typed error naming
the stage or the layer and what would be accepted."""

from __future__ import annotations

import difflib
from typing import Any

import torch
from torch import nn

from tensorpress.engine.linears import is_linear
from tensorpress.errors import CalibrationError, InvalidWeightError, RecipeError
from tensorpress.methods import MethodConfig, matches
from tensorpress.methods.base import DEFAULT_IGNORE
from tensorpress.methods.structural.depth import LinearBridge
from tensorpress.models import LoadedModel
from tensorpress.parts import CompressedLinear

_SYNTAX = "globs match a whole name or a dotted suffix of it, 're:' regexes the whole name"


def block_linears(lm: LoadedModel, model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Every linear of the model's blocks: full name -> (block, name relative to the block); a
    linear bridge (``drop_blocks`` with ``replace: linear``) has none, it stays as fitted."""
    prefix = lm.adapter.blocks_path(model)
    out = {}
    for i, block in enumerate(lm.adapter.blocks(model)):
        if isinstance(block, LinearBridge):
            continue
        for rel in lm.adapter.block_linears():
            if is_linear(block.get_submodule(rel)):
                out[f"{prefix}.{i}.{rel}"] = (block, rel)
    return out


def check_finite(name: str, weight: torch.Tensor) -> None:
    bad = (~torch.isfinite(weight)).sum().item()
    if bad:
        raise InvalidWeightError(
            f"{name}: the weight has {bad} NaN/Inf value(s) out of {weight.numel()}; "
            "a weight must be finite to be compressed (is the checkpoint corrupt?)"
        )


def check_weights_finite(lm: LoadedModel, model: nn.Module, stages: list[MethodConfig],
                         outside: list[tuple[str, nn.Module]]) -> None:
    """Every linear some stage selects (the head and embeddings too, if selected: ``outside``
    the blocks) has finite weights: checked before any statistics pass, where a NaN would
    surface far away (a Hessian that is not positive definite, with no layer named)."""
    modules = {name: block.get_submodule(rel) for name, (block, rel) in block_linears(lm, model).items()}
    modules.update(outside)
    for name, module in modules.items():
        if any(stage.selects(name) for stage in stages):
            weight = module.dense() if isinstance(module, CompressedLinear) else module.weight.detach()
            check_finite(name, weight)


def check_stats_finite(who: str, stats: dict[str, Any]) -> None:
    """The calibration statistics of ``who`` (a linear, or linears that read the same input) are
    finite: an overflow in the activations makes ``X^T X`` infinite, and a method would then
    fail without naming a layer."""
    for key, value in stats.items():
        if isinstance(value, torch.Tensor) and not torch.isfinite(value).all():
            bad = (~torch.isfinite(value)).sum().item()
            raise CalibrationError(
                f"{who}: the calibration statistic {key!r} has {bad} NaN/Inf value(s): the activations "
                "reaching this layer overflow or are NaN (a non-finite weight upstream, e.g. in a norm or the embeddings, "
                "or a float16 overflow: load the model in float32, or calibrate on other text)"
            )


def _near(pattern: str, names: list[str]) -> str:
    """Names or dotted suffixes close to ``pattern``, to suggest in an error."""
    # suffixes from a block index on ("3.mlp.up_proj") are left out: they read as noise
    pool = sorted({".".join(p[i:]) for p in (n.split(".") for n in names) for i in range(len(p)) if i == 0 or not p[i].isdigit()})
    close = difflib.get_close_matches(pattern.removeprefix("re:"), pool, n=4, cutoff=0.6)
    hint = f"near matches: {', '.join(repr(c) for c in close)}" if close else "no near matches"
    if not pattern.startswith("re:") and any(matches(n, [f"{pattern}.*"]) for n in names):
        hint += f"; {pattern!r} names modules holding linears: {pattern + '.*'!r} selects them"
    return hint


def check_patterns(lm: LoadedModel, model: nn.Module, stages: list[MethodConfig],
                   outside: list[tuple[str, nn.Module]]) -> None:
    """Every stage selects some linear (or the head or embeddings, ``outside`` the blocks), and
    every one of its patterns does its part: a pattern that matches nothing is almost always a
    typo whose layers silently fall back to a default."""
    names = list(block_linears(lm, model))
    example = names[0] if names else "(none)"
    everything = names + [name for name, _ in outside]
    for i, stage in enumerate(stages):
        where = f"stage {i + 1} ({stage.name})"
        selected = [n for n in everything if stage.selects(n)]
        if not selected:
            raise RecipeError(
                f"{where}: targets {stage.targets} minus ignore {stage.ignore} match no linear of the model's "
                f"blocks (names look like {example!r})"
            )
        for setting, patterns in stage.patterns().items():
            if setting == "targets":
                pool = [n for n in everything if not matches(n, stage.ignore)]
            elif setting == "ignore":
                # Only patterns the user wrote: the defaults (lm_head, re:.*embed.*) are written for every
                # architecture and match no linear of many (no head; embeddings are lookup tables). A
                # user's ignore pattern must match a linear: it is there to protect one, and one that
                # matches none (a typo, or 'mlp' for the linears inside it) protects nothing.
                patterns = [p for p in patterns if p not in DEFAULT_IGNORE]
                pool = everything
            else:  # an override applies only to the linears this stage compresses
                pool = selected
            for pattern in patterns:
                if any(matches(n, [pattern]) for n in pool):
                    continue
                if setting == "targets":
                    hidden = [n for n in everything if matches(n, [pattern])]
                    if hidden:
                        raise RecipeError(
                            f"{where}: targets pattern {pattern!r} matches only linears that ignore {stage.ignore} "
                            f"excludes (e.g. {hidden[0]!r}); remove them from ignore or drop the pattern"
                        )
                scope = "the linears this stage selects" if setting.endswith("_overrides") else "the model's linears"
                raise RecipeError(
                    f"{where}: {setting} pattern {pattern!r} matches none of {scope} ({_near(pattern, pool)}; "
                    f"{_SYNTAX}; names look like {example!r})"
                )
