"""Schemas of the settings each part kind saves beside its tensors (``Part.state()``'s dict).

A checkpoint's manifest is untrusted input, so the dict is validated (strict types, ranges)
before ``from_state`` reads it: a string where a group size belongs, a bit width of 40 or a
rank larger than the matrix is a ``ValueError`` naming the setting, which the loader turns
into a ``CheckpointError``. Ranges that depend on the shape are checked against it here too.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Positive = Annotated[int, Field(ge=1, le=1 << 24)]
Bits = Annotated[int, Field(ge=1, le=8)]


class PartMeta(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class ShapedMeta(PartMeta):
    shape: list[Positive] = Field(min_length=2, max_length=2)


class GridMeta(ShapedMeta):
    """A uniform quantization grid: ``bits``, groups along the input (None: per row)."""

    bits: Bits
    group_size: Positive | None
    symmetric: bool


class CodedMeta(PartMeta):
    codes_coding: Literal["tplc"] | None = None


class QuantizedMeta(GridMeta, CodedMeta):
    pass


class BlockMeta(ShapedMeta):
    format: Literal["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "iq4_nl", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]


class CodebookMeta(ShapedMeta, CodedMeta):
    bits: Bits
    group_size: Positive | None


class LowRankMeta(ShapedMeta):
    factor_bits: Literal[8, 16, 32]
    rank: Annotated[int, Field(ge=0)]  # 0: a layer the budget allocation emptied on purpose

    @model_validator(mode="after")
    def _rank_fits(self) -> LowRankMeta:
        if self.rank > min(self.shape):
            raise ValueError(f"rank {self.rank} exceeds the smaller side of the {self.shape} matrix")
        return self


class SparseMeta(ShapedMeta):
    nnz: Annotated[int, Field(ge=0)]

    @model_validator(mode="after")
    def _nnz_fits(self) -> SparseMeta:
        if self.nnz > self.shape[0] * self.shape[1]:
            raise ValueError(f"nnz {self.nnz} exceeds the {self.shape[0] * self.shape[1]} entries of the matrix")
        return self


class MaskedMeta(ShapedMeta):
    pattern: list[Positive] | None = Field(None, min_length=2, max_length=2)
    bits: Bits | None = None
    group_size: Positive | None = None
    symmetric: bool | None = None

    @model_validator(mode="after")
    def _pattern_fits(self) -> MaskedMeta:
        if self.pattern is not None and not (self.pattern[0] <= self.pattern[1] <= 64):
            raise ValueError(f"N:M pattern {self.pattern} needs N <= M <= 64")
        if self.bits is not None and self.symmetric is None:
            raise ValueError("quantized kept values need 'symmetric'")
        return self


def check_meta(schema: type[PartMeta], meta: object) -> None:
    """Raise ``ValueError`` naming the first bad setting if ``meta`` does not fit ``schema``."""
    from pydantic import ValidationError

    try:
        schema.model_validate(meta)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(settings)"
        raise ValueError(f"setting {where}: {first['msg']} (got {str(first.get('input'))[:60]!r})") from None
