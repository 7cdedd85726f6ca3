"""Structural methods: they change the network's shape (blocks, FFN channels) instead of
replacing linears by parts. Each rewrites the model's modules and config in place, so the
result is an ordinary smaller model that plain ``transformers`` saves and loads.

They run before any per-linear stage of a recipe (the engine checks they come first), each
from its own calibration statistics.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from pydantic import Field
from torch import nn

from tensorpress.methods.base import LayerInput, MethodConfig
from tensorpress.parts import Part


class StructuralMethod(MethodConfig):
    structural: ClassVar[bool] = True
    calibrated: ClassVar[bool] = True  # whether transform needs calibration windows

    samples: int | None = Field(None, ge=1, description="calibration windows used (default: all that are given)")

    def windows(self, calib: Any) -> Any:
        """The calibration windows this stage uses: the first ``samples`` of ``calib``."""
        return dataclasses.replace(calib, input_ids=calib.input_ids[: self.samples]) if self.samples else calib

    def transform(self, lm: Any, model: nn.Module, calib: Any, runner: Any) -> dict[str, Any]:
        """Rewrite ``model`` (the compression copy of ``lm.model``) in place; returns what was
        done, for the report (e.g. which blocks were removed). A ``"tokenizer"`` entry replaces
        the result's tokenizer (``trim_vocab``). ``runner`` (``engine.structural.BlockRunner``)
        runs the model: forward passes for statistics and the block-by-block pruning walk; the
        transform itself holds the math and the rewrite."""
        raise NotImplementedError

    def apply(self, layer: LayerInput) -> list[Part]:  # pragma: no cover - never called per linear
        raise TypeError(f"{self.name} is structural: the engine calls transform(), not apply()")


def is_structural(stage: MethodConfig) -> bool:
    return bool(getattr(stage, "structural", False))
