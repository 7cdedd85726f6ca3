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

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tensorpress.errors import RecipeError
from tensorpress.methods import METHODS, MethodConfig

BUILTIN_DIR = Path(__file__).parent / "builtin"


def _describe_error(err: dict[str, Any], cls: type[MethodConfig]) -> str:
    loc = ".".join(str(p) for p in err["loc"]) or "(stage)"
    if err["type"] == "extra_forbidden":
        accepted = ", ".join(f for f in cls.model_fields if f != "method")
        return f"unknown setting {loc!r}; accepted: {accepted}"
    return f"{loc}: {err['msg']} (got {err.get('input')!r})"


def build_stage(index: int, raw: Any) -> MethodConfig:
    """Validate one stage (a dict with a ``method`` key, or a config object)."""
    if isinstance(raw, MethodConfig):
        return raw
    where = f"stage {index + 1}"
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: expected a mapping with a 'method' key, got {raw!r}")
    name = raw.get("method")
    if name not in METHODS:
        raise RecipeError(
            f"{where}: unknown method {name!r}; available methods: {', '.join(sorted(METHODS))}"
        )
    cls = METHODS[name]
    try:
        return cls(**raw)
    except ValidationError as exc:
        problems = "; ".join(_describe_error(e, cls) for e in exc.errors())
        raise RecipeError(f"{where} ({name}): {problems}") from None


class Recipe(BaseModel):
    """An ordered list of stages, applied block by block in order."""

    model_config = ConfigDict(extra="forbid")

    name: str = "custom"
    description: str = ""
    stages: list[MethodConfig] = Field(min_length=1)

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
        except yaml.YAMLError as exc:
            raise RecipeError(f"{path}: not valid YAML ({exc})") from None
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "stages": [s.model_dump(mode="json") for s in self.stages],
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
        raise RecipeError(f"unknown recipe {name!r}; built-in recipes: {', '.join(builtin_names())}")
    return Recipe.from_yaml(path)


def resolve(name_or_path: str | os.PathLike) -> Recipe:
    """A recipe from a YAML path, or a built-in name."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        return Recipe.from_yaml(path)
    return get(str(name_or_path))
