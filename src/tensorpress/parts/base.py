"""The ``Part`` protocol: one additive piece of a compressed weight.

A compressed weight ``W`` (out x in) is a sum of parts; each part can materialise its
contribution (``dense``), apply it to activations (``forward``), report its exact storage in
bits (``nbits``) and serialise itself to named tensors plus a JSON-able dict (``state`` /
``from_state``). Parts are ``nn.Module``s whose tensors are buffers, so ``.to(device)`` moves
them with the model.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from tensorpress.parts.meta import PartMeta, check_meta

PART_TYPES: dict[str, type[Part]] = {}


def register_part(cls: type[Part]) -> type[Part]:
    """Class decorator: make a part type loadable from a checkpoint by its ``kind``."""
    if cls.kind in PART_TYPES:
        raise ValueError(f"part kind {cls.kind!r} registered twice")
    PART_TYPES[cls.kind] = cls
    return cls


def dtype_bits(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size() * 8


class Part(nn.Module):
    """Base class of all parts. Subclasses set ``kind`` and implement the abstract methods."""

    kind: ClassVar[str] = ""
    meta_schema: ClassVar[type[PartMeta]] = PartMeta  # what ``state()``'s dict may hold

    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__()
        self.out_features = out_features
        self.in_features = in_features

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def dense(self) -> torch.Tensor:
        """This part's contribution to the weight, float32 ``(out, in)``."""
        raise NotImplementedError

    def dense_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """float32 ``(len(rows), in)``: the dense weight's rows ``rows`` (a 1-D index), for
        embedding lookups; parts that can decode rows alone override it."""
        return self.dense()[rows]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.dense().to(x.dtype))

    def nbits(self) -> int:
        """Exact storage in bits: every code, scale, zero point, index and mask."""
        raise NotImplementedError

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors to save (as stored: packed) and a JSON-able dict of settings."""
        raise NotImplementedError

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Part:
        raise NotImplementedError

    @classmethod
    def code_bits(cls, meta: dict[str, Any]) -> dict[str, int]:
        """Which of this kind's saved tensors are bit-packed integer codes, and their width
        (lossless packing codes those as symbols rather than as bytes)."""
        return {}

    def describe(self) -> str:
        """One short human-readable line, for ``tensorpress inspect``."""
        return self.kind

    def extra_repr(self) -> str:
        return f"{self.describe()}, shape={self.shape}"


def part_from_state(kind: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Part:
    try:
        cls = PART_TYPES[kind]
    except KeyError:
        raise KeyError(f"unknown part kind {kind!r}; known: {sorted(PART_TYPES)}") from None
    check_meta(cls.meta_schema, meta)
    return cls.from_state(tensors, meta)
