"""What a compression run returns: the model, a per-layer report and timings."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tensorpress.io.checkpoint import save_checkpoint
from tensorpress.models import LoadedModel
from tensorpress.recipe import Recipe


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    parts: list[str]  # one description per part, e.g. "int4 g128 asym"
    weight_bits: int  # exact storage of the parts
    seconds: float = 0.0
    # against the weight before the recipe's first stage: ||W - W'||^2 / ||W||^2, and the same of
    # the outputs on the calibration inputs, tr(dW XtX dWt) / tr(W XtX Wt) (None: no XtX was
    # collected for this layer, or a structural stage changed its shape)
    weight_error: float | None = None
    output_error: float | None = None

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def bits_per_weight(self) -> float:
        return self.weight_bits / self.numel


def layer_errors(original: torch.Tensor, new: torch.Tensor, xtx: torch.Tensor | None) -> tuple[float | None, float | None]:
    """Relative squared error of a compressed weight, (out, in), in weights and, given the
    calibration inputs' Gram matrix XtX (in, in), in outputs."""
    if original.shape != new.shape:
        return None, None
    with torch.no_grad():
        w = original.float()
        delta = new.float().to(w.device) - w
        denom = float(w.square().sum())
        weight_error = float(delta.square().sum()) / denom if denom > 0 else None
        if xtx is None or xtx.shape[0] != w.shape[1]:
            return weight_error, None
        h = xtx.float()
        signal = float(((w @ h) * w).sum())
        output_error = float(((delta @ h) * delta).sum()) / signal if signal > 0 else None
    return weight_error, output_error


@dataclass
class CompressionResult:
    model: LoadedModel
    recipe: Recipe
    layers: dict[str, LayerReport]
    timings: dict[str, float] = field(default_factory=dict)
    calibration: str = ""  # description of the calibration windows, "" when none were used
    # mixture-of-experts models: block name -> calibration tokens the router sent to each expert
    expert_tokens: dict[str, list[int]] = field(default_factory=dict)

    @property
    def bits_per_weight(self) -> float:
        """Bits per weight over the compressed linears (parts only, biases excluded)."""
        numel = sum(r.numel for r in self.layers.values())
        return sum(r.weight_bits for r in self.layers.values()) / numel if numel else float("nan")

    def experts(self) -> list[dict[str, Any]]:
        """Mixture-of-experts models: one row per block and expert, with the calibration tokens
        routed to it, its compressed weights, their exact bits and bytes; empty otherwise."""
        adapter, model = self.model.adapter, self.model.model
        if adapter.moe is None:
            return []
        prefix = adapter.blocks_path(model) + "."
        rows: dict[tuple[int, int], dict[str, Any]] = {}
        for name, report in self.layers.items():
            block, _, rel = name.removeprefix(prefix).partition(".")
            expert = adapter.expert_of(rel) if block.isdigit() else None
            if expert is None:
                continue
            tokens = self.expert_tokens.get(f"{prefix}{block}")
            row = rows.setdefault((int(block), expert), {"block": int(block), "expert": expert, "weights": 0, "bits": 0,
                                                         "tokens": tokens[expert] if tokens else None})
            row["weights"] += report.numel
            row["bits"] += report.weight_bits
        for row in rows.values():
            row["bits_per_weight"] = row["bits"] / row["weights"]
            row["bytes"] = row["bits"] / 8
        return [rows[k] for k in sorted(rows)]

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write a checkpoint directory (atomic); ``tp.load_compressed(path)`` reads it back."""
        return save_checkpoint(
            self.model,
            path,
            recipe=self.recipe,
            overwrite=overwrite,
            extra={
                "timings": self.timings,
                "calibration": self.calibration,
                "layer_seconds": {n: r.seconds for n, r in self.layers.items()},
                "layer_errors": {n: {"weight": r.weight_error, "output": r.output_error} for n, r in self.layers.items()},
                **({"expert_tokens": self.expert_tokens} if self.expert_tokens else {}),
            },
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "base_model": self.model.info.get("base_model", self.model.spec),
            "recipe": self.recipe.to_dict(),
            "bits_per_weight": self.bits_per_weight,
            "timings": self.timings,
            "calibration": self.calibration,
            "layers": {n: asdict(r) for n, r in self.layers.items()},
            **({"experts": self.experts()} if self.model.adapter.moe is not None else {}),
        }
