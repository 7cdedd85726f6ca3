"""Method configs and the registry that recipes resolve method names through.

A method is a pydantic config (its settings, validated, with defaults declared once) whose
``apply`` turns one linear's weight and calibration statistics into parts. Methods see no
architecture: the engine hands them a ``LayerInput`` and replaces the linear with the parts.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tensorpress.parts.base import Part

# Statistics a method may declare in ``needs`` (the engine collects only what is declared):
#   "xtx"      sum over calibration tokens of x x^T, float64 (in, in)
#   "act_sq"   sum over calibration tokens of x**2 per input channel, float64 (in,)
#   "act_abs"  sum over calibration tokens of |x| per input channel, float64 (in,)
#   "act_sum"  sum over calibration tokens of x per input channel, float64 (in,)
#   "tokens"   number of calibration tokens seen (int)
KNOWN_STATS = frozenset({"xtx", "act_sq", "act_abs", "act_sum"})

DEFAULT_IGNORE = ["lm_head", "re:.*embed.*"]


@dataclass
class LayerInput:
    """What a method sees of one linear."""

    name: str  # full module name, e.g. "model.layers.3.mlp.down_proj"
    weight: torch.Tensor  # the current effective weight, float32 (out, in)
    original: torch.Tensor  # the weight before any stage of the recipe, float32 (out, in)
    parts: list[Part] | None  # the parts an earlier stage produced, None while still dense
    stats: dict[str, Any] = field(default_factory=dict)


def row_ranges(layers: list[LayerInput]) -> list[slice]:
    """The rows of each layer's weight in ``torch.cat`` of all of them (``apply_shared``)."""
    out, start = [], 0
    for layer in layers:
        out.append(slice(start, start + layer.weight.shape[0]))
        start += layer.weight.shape[0]
    return out


def matches(name: str, patterns: list[str]) -> bool:
    """Whether a module name matches any pattern.

    ``re:<regex>`` is matched against the whole name (``re.fullmatch``); any other pattern is a
    glob matched against the whole name or any dotted suffix of it, so ``down_proj``,
    ``mlp.*`` and ``model.layers.*.mlp.down_proj`` all match ``model.layers.3.mlp.down_proj``.
    """
    pieces = name.split(".")
    suffixes = [".".join(pieces[i:]) for i in range(len(pieces))]
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.fullmatch(pattern[3:], name):
                return True
        elif any(fnmatch.fnmatchcase(s, pattern) for s in suffixes):
            return True
    return False


class MethodConfig(BaseModel):
    """Settings shared by every method; subclasses add theirs and implement ``apply``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()

    method: str
    targets: list[str] = Field(
        default_factory=lambda: ["*"],
        description="module-name patterns to compress (glob, or 're:' regex); default all "
        "linears of the transformer blocks (the LM head too unless ignored; the input embeddings only "
        "when a pattern other than '*' names them)",
    )
    ignore: list[str] = Field(
        default_factory=lambda: list(DEFAULT_IGNORE),
        description="module-name patterns never touched (default: lm_head and embeddings)",
    )
    seed: int = Field(0, description="seed of any randomness in the method")
    sequential: bool = Field(
        True,
        description="true-sequential inside a block: each group of linears (q/k/v, o, gate/up, down) "
        "gets statistics of inputs that went through the already compressed groups (one lockstep pass); "
        "false: every group's statistics from the uncompressed block, as the reference GPTQ/SparseGPT/"
        "Wanda code does (a statistics pass, then a pass to propagate)",
    )

    @model_validator(mode="after")
    def _regexes_compile(self) -> MethodConfig:
        for setting, patterns in self.patterns().items():
            for pattern in patterns:
                if pattern.startswith("re:"):
                    try:
                        re.compile(pattern[3:])
                    except re.error as exc:
                        raise ValueError(f"{setting}: {pattern!r} is not a valid regular expression ({exc})") from None
        return self

    def patterns(self) -> dict[str, list[str]]:
        """Every module-name pattern of these settings, by setting: ``targets``, ``ignore`` and
        the keys of each ``*_overrides`` mapping (``bits_overrides``, ``rank_overrides``, ...)."""
        out = {"targets": list(self.targets), "ignore": list(self.ignore)}
        for setting in type(self).model_fields:
            value = getattr(self, setting)
            if setting.endswith("_overrides") and isinstance(value, dict):
                out[setting] = list(value)
        return out

    def selects(self, name: str) -> bool:
        return matches(name, self.targets) and not matches(name, self.ignore)

    def apply(self, layer: LayerInput) -> list[Part]:
        """The new list of parts for this linear."""
        raise NotImplementedError

    def apply_shared(self, layers: list[LayerInput]) -> list[list[Part]] | None:
        """Optional: the parts of several linears that read the same input (one ``stats`` for all,
        e.g. q/k/v), computed together — for methods whose per-row result depends only on the
        row and the shared statistics, one pass over the stacked rows replaces one per linear.
        ``None`` (the default): the engine calls ``apply`` for each."""
        return None

    def wants_allocation(self) -> bool:
        """True if the stage must see every selected layer (``allocate``) before compressing."""
        return False

    def allocation_stats(self) -> frozenset[str]:
        """Statistics ``allocate`` needs in each layer's ``stats``: any of ``KNOWN_STATS``, and
        ``"fisher"`` (mean squared gradient of the causal LM loss with respect to each weight,
        float32 (out, in), on ``allocation_samples`` windows). Default: ``needs``."""
        return self.needs

    def allocation_options(self, layers: list[LayerInput]) -> tuple[dict[str, dict[Any, tuple[float, float]]], float] | None:
        """For a budgeted allocation: ``({layer: {option: (error, cost)}}, budget)``, the options
        each layer could take, priced, and the total cost allowed; the allocation layer
        (``tensorpress.search``) chooses one per layer and calls ``with_allocation``. ``None``
        (the default): the stage's ``allocate`` sets the layers by a rule of its own."""
        return None

    def with_allocation(self, choice: dict[str, Any]) -> MethodConfig:
        """A copy of this stage with each layer's chosen option (from ``allocation_options``)."""
        raise NotImplementedError(f"{self.name} prices no allocation options")

    def allocate(self, layers: list[LayerInput]) -> MethodConfig:
        """A copy of this stage with per-layer settings chosen from all its layers at once
        (weights of the uncompressed model, ``needs`` statistics on ``allocation_samples``
        windows), for stages whose ``allocation_options`` are ``None``; called by the allocation
        layer when ``wants_allocation()``."""
        return self

    def input_scales(self, group: list[LayerInput]) -> torch.Tensor | None:
        """Optional: a per-input-channel scale ``s`` (in,) for a group of linears that read the
        same input. The engine then rewrites the model exactly — the group's weights times
        ``s`` column-wise, the module producing the input divided by ``s`` — before ``apply``
        sees the (scaled) weights. ``None``: leave the group as it is. Called only for groups
        whose input producer can absorb the scale, with every member of the group selected."""
        return None

    @classmethod
    def scales_inputs(cls) -> bool:
        return cls.input_scales is not MethodConfig.input_scales

    @classmethod
    def settings(cls) -> list[tuple[str, str, str]]:
        """``(name, default, description)`` of every setting, for ``tensorpress methods``."""
        rows = []
        for fname, info in cls.model_fields.items():
            if fname == "method":
                continue
            default = info.get_default(call_default_factory=True)
            rows.append((fname, repr(default), info.description or ""))
        return rows


METHODS: dict[str, type[MethodConfig]] = {}


def register_method(cls: type[MethodConfig]) -> type[MethodConfig]:
    if not cls.name or cls.name in METHODS:
        raise ValueError(f"method name {cls.name!r} is empty or registered twice")
    unknown = cls.needs - KNOWN_STATS
    if unknown:
        raise ValueError(f"method {cls.name!r} needs unknown statistics {sorted(unknown)}")
    METHODS[cls.name] = cls
    return cls
