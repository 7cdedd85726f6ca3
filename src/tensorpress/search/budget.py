"""Budgets in the units users think in, turned into a budget for the searched linears' bits.

``3.0bpw``: bits per weight of the compressed block linears (parts only, every scale, zero point,
index and mask counted); ``9.2bpw-model``: bits per parameter of the whole model (embeddings,
norms and head at their stored width included, a tied table once); ``60MB`` / ``57.2MiB`` /
``60000000B``: bytes of the model's tensors as stored (the parts' exact bytes plus every other
tensor's), which is the checkpoint's payload before its small headers and manifest; a GGUF size
(``parse_budget("80MB", gguf=True)``, CLI ``--gguf-size``): bytes of the whole ``.gguf`` file
``tensorpress export --format gguf`` writes (header, vocabulary, every tensor in its ggml type
with the writer's alignment padding).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from tensorpress.errors import SearchError

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*(bpw-model|bpw|b|kb|mb|gb|kib|mib|gib)?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Budget:
    value: float
    unit: str  # "bpw", "bpw-model", "bytes" or "gguf" (bytes of the GGUF file)
    text: str

    def linear_bits(self, linear_numel: int, rest_bits: int, model_numel: int) -> float:
        """The budget for the linears' parts, in bits, given everything else's fixed storage
        (with a relative slack of 1e-12, so that a budget spelled as the decimal of a recipe's
        exact size admits that recipe)."""
        if self.unit == "bpw":
            bits = self.value * linear_numel
        elif self.unit == "bpw-model":
            bits = self.value * model_numel - rest_bits
        else:
            bits = self.value * 8 - rest_bits
        return bits + 1e-12 * abs(bits)

    def describe(self, linear_bits: float, linear_numel: int, rest_bits: int, model_numel: int) -> str:
        """``linear_bits`` of the linears, spelled in this budget's unit."""
        if self.unit == "bpw":
            return f"{linear_bits / linear_numel:.4f} bits/weight"
        if self.unit == "bpw-model":
            return f"{(linear_bits + rest_bits) / model_numel:.4f} bits/parameter of the model"
        if self.unit == "gguf":
            return f"{(linear_bits + rest_bits) / 8 / 1e6:.3f} MB of GGUF file"
        return f"{(linear_bits + rest_bits) / 8 / 1e6:.3f} MB"


def parse_budget(text: str | float, gguf: bool = False) -> Budget:
    """``Budget`` from ``3.0bpw``, ``3.0`` (bits/weight), ``9.2bpw-model``, ``60MB``, ``57MiB``, ``6e7B``;
    with ``gguf`` a size only (``80MB``), of the GGUF file."""
    if gguf:
        match = _PATTERN.match(str(text))
        if not match or (match.group(2) or "").lower() not in _UNITS:
            raise SearchError(f"GGUF size {text!r} is not understood; give the file's size with its unit "
                              "(80MB, 76MiB, 80000000B)")
        budget = parse_budget(text)
        return Budget(budget.value, "gguf", str(text))
    if isinstance(text, (int, float)):
        text = f"{text}bpw"
    match = _PATTERN.match(str(text))
    if not match:
        raise SearchError(f"budget {text!r} is not understood; give bits per weight of the linears (3.0bpw), of the "
                          "whole model (9.2bpw-model) or a size (60MB, 57MiB, 60000000B)")
    value, unit = float(match.group(1)), (match.group(2) or "bpw").lower()
    if value <= 0:
        raise SearchError(f"budget {text!r} must be positive")
    if unit in ("bpw", "bpw-model"):
        return Budget(value, unit, str(text))
    return Budget(value * _UNITS[unit], "bytes", str(text))


def rest_of_model(model: nn.Module, layers: list[str]) -> tuple[int, int]:
    """``(bits, parameters)`` of every tensor but the searched linears' weights, at its stored
    width; a tensor shared by two names (a tied head) counted once."""
    skip = {f"{name}.weight" for name in layers}
    seen: set[int] = set()
    bits = numel = 0
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name in skip or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        bits += tensor.numel() * tensor.element_size() * 8
        numel += tensor.numel()
    return bits, numel
