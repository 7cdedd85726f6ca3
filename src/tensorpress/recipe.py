"""Recipes: an ordered list of method stages, written in YAML or built in Python.

```yaml
name: rtn-w4g128
stages:
  - method: rtn
    bits: 4
    group_size: 128
```

Every stage is validated against its method's pydantic config; a mistake raises
``RecipeError`` naming the stage, the setting and what is accepted.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tensorpress.errors import RecipeError
from tensorpress.methods import METHODS, MethodConfig

BUILTIN_DIR = Path(__file__).parent / "builtin"


_BOUNDS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def _accepted_range(cls: type[MethodConfig], loc: tuple[Any, ...]) -> str:
    """``"0 < sparsity < 1"``: the bounds a numeric setting (or, for ``loc`` inside a mapping or
    list setting, each of its values) is declared with; ``""`` if it has none."""
    info = cls.model_fields.get(str(loc[0]))
    if info is None:
        return ""
    constraints = info.metadata
    if len(loc) > 1:  # an item of e.g. sparsity_overrides: the constraints of the value type
        args = get_args(info.annotation)
        extras = get_args(args[-1])[1:] if args else ()
        constraints = [c for extra in extras for c in getattr(extra, "metadata", [extra])]
    bounds = {k: getattr(c, k) for c in constraints for k in ("gt", "ge", "lt", "le") if getattr(c, k, None) is not None}
    name = loc[0] if len(loc) == 1 else "each value"
    low = f"{bounds['gt']} < " if "gt" in bounds else f"{bounds['ge']} <= " if "ge" in bounds else ""
    high = f" < {bounds['lt']}" if "lt" in bounds else f" <= {bounds['le']}" if "le" in bounds else ""
    if low and not high:  # "rank >= 1" reads better than "1 <= rank"
        return f"{name} {'>' if 'gt' in bounds else '>='} {bounds.get('gt', bounds.get('ge'))}"
    return f"{low}{name}{high}" if low or high else ""


def _describe_error(err: dict[str, Any], cls: type[MethodConfig]) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        accepted = ", ".join(f for f in cls.model_fields if f != "method")
        return f"unknown setting {loc!r}; accepted: {accepted}"
    if not loc:  # a check across settings: its message names them and the values
        return err["msg"].removeprefix("Value error, ")
    accepted = _accepted_range(cls, err["loc"]) if err["type"] in _BOUNDS else ""
    return f"{loc}: {err['msg']} (got {err.get('input')!r})" + (f", accepted: {accepted}" if accepted else "")


def build_stage(index: int, raw: Any) -> MethodConfig:
    """Validate one stage (a dict with a ``method`` key, or a config object)."""
    if isinstance(raw, MethodConfig):
        return raw
    where = f"stage {index + 1}"
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: expected a mapping with a 'method' key, got {raw!r}")
    name = raw.get("method")
    if not isinstance(name, str) or name not in METHODS:
        raise RecipeError(
            f"{where}: unknown method {name!r}; available methods: {', '.join(sorted(METHODS))}"
        )
    cls = METHODS[name]
    try:
        return cls.model_validate(raw)  # not cls(**raw): YAML keys need not be strings
    except ValidationError as exc:
        problems = "; ".join(_describe_error(e, cls) for e in exc.errors())
        raise RecipeError(f"{where} ({name}): {problems}") from None


class ExpertPolicy(BaseModel):
    """What a recipe says about a mixture-of-experts model's experts that few calibration tokens
    reach (``engine/experts.py``); ignored for other models."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # default 1: an expert keeps its own routed tokens however few (GPTQ's damping copes), only
    # one no calibration token reached gets substitute statistics: on an upcycled 8-expert
    # SmolLM2 at w3g128 with 4 x 512 tokens, routed-only gave ppl 67.6, weighted 85.9, rtn 92.1
    # for the experts below their input width (bench/moe.py)
    min_tokens: int | None = Field(1, ge=0, description="routed tokens below which an expert is starved "
                                   "(None: the expert's input width)")
    few_tokens: Literal["weighted", "rtn"] = Field("weighted", description="statistics of a starved expert: all "
                                                   "tokens weighted by router probability, or round-to-nearest")


class Recipe(BaseModel):
    """An ordered list of stages, applied block by block in order."""

    model_config = ConfigDict(extra="forbid")

    name: str = "custom"
    description: str = ""
    stages: list[MethodConfig] = Field(min_length=1)
    experts: ExpertPolicy = Field(default_factory=ExpertPolicy)
    # where each block's calibration statistics come from: "compressed" (inputs that went through
    # the blocks compressed before it, and within a block through the linears compressed before
    # it: GPTQ's sequential order) or "original" (the uncompressed model's activations, so every
    # linear is compressed from its own weight and the original model's statistics alone, the
    # same whatever the other linears get: what a per-layer level database needs)
    inputs: Literal["compressed", "original"] = "compressed"

    @field_validator("stages", mode="before")
    @classmethod
    def _build_stages(cls, value: Any) -> list[MethodConfig]:
        if not isinstance(value, list) or not value:
            raise RecipeError(f"a recipe needs a non-empty list of stages, got {value!r}")
        return [build_stage(i, raw) for i, raw in enumerate(value)]

    @classmethod
    def from_dict(cls, data: Any, source: str = "recipe") -> Recipe:
        if not isinstance(data, dict):
            raise RecipeError(f"{source}: a recipe is a mapping with 'stages', got {type(data).__name__}")
        unknown = set(data) - set(cls.model_fields)
        if unknown:
            raise RecipeError(
                f"{source}: unknown top-level field(s) {sorted(unknown)}; accepted: "
                f"{', '.join(cls.model_fields)}"
            )
        if "stages" not in data:
            raise RecipeError(f"{source}: missing 'stages' (a list of method stages)")
        try:
            return cls(**data)
        except RecipeError as exc:
            raise RecipeError(f"{source}: {exc}") from None
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise RecipeError(f"{source}: {problems}") from None

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> Recipe:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise RecipeError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        except (yaml.YAMLError, RecursionError) as exc:
            raise RecipeError(f"{path}: not valid YAML ({str(exc)[:300]})") from None
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "stages": [s.model_dump(mode="json") for s in self.stages],
            **({"experts": self.experts.model_dump(mode="json")} if self.experts != ExpertPolicy() else {}),
            **({"inputs": self.inputs} if self.inputs != "compressed" else {}),
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def needs_calibration(self) -> bool:
        """Whether compressing with this recipe needs calibration windows (statistics, or a
        bit allocation to measure)."""
        return any(stage.needs or getattr(stage, "target_bits", None) is not None for stage in self.stages)


def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def get(name: str) -> Recipe:
    """A built-in named recipe (``tensorpress recipes`` lists them)."""
    path = BUILTIN_DIR / f"{name}.yaml"
    if not path.is_file():
        close = difflib.get_close_matches(str(name), builtin_names(), n=3)
        hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
        raise RecipeError(
            f"unknown recipe {name!r}; {hint}built-in recipes: {', '.join(builtin_names())} (a recipe file is "
            "given by its path, ending in .yaml or .yml)"
        )
    return Recipe.from_yaml(path)


RecipeLike = Recipe | str | os.PathLike | dict


def resolve(recipe: RecipeLike) -> Recipe:
    """The ``Recipe`` that ``recipe`` names: a ``Recipe`` as it is, a built-in name, a YAML path
    (``str`` or ``os.PathLike``), or a dict with ``stages`` as a YAML file would hold it (so
    recipes kept in other configs need no file). Anything else is a ``RecipeError``."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    if not isinstance(recipe, (str, os.PathLike)):
        raise RecipeError(
            f"expected a recipe: a tp.Recipe, a built-in recipe name (e.g. 'rtn-w4g128'; tensorpress recipes "
            f"lists them), a YAML path, or a dict with 'stages'; got {type(recipe).__name__}"
        )
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        return Recipe.from_yaml(path)
    return get(str(recipe))
