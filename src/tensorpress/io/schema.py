"""Schemas of the JSON files tensorpress reads from a directory it did not write itself.

A checkpoint's ``manifest.json``, a packed directory's ``lossless.json`` and a container's
index are untrusted: each is validated here (strict types, bounded counts and sizes, dtypes
from an allow-list) before any field is used. A violation is a ``CheckpointError`` naming the
file and the field. Names of files are checked against the directory by ``files.confined``
where they are used.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from tensorpress.errors import CheckpointError

# bounds: far above any real model, low enough that nothing is allocated from a hostile count
MAX_FILES = 100_000
MAX_LAYERS = 1_000_000
MAX_PARTS = 16
MAX_DIM = 1 << 24  # rows or columns of one linear
MAX_BYTES = 1 << 50
MAX_TENSOR_DIMS = 8

Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
ModuleName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$", max_length=512)]
TensorName = Annotated[str, StringConstraints(min_length=1, max_length=1024)]
FileName = Annotated[str, StringConstraints(min_length=1, max_length=4096)]
Count = Annotated[int, Field(ge=0, le=MAX_BYTES)]
Dim = Annotated[int, Field(ge=1, le=MAX_DIM)]

MODEL_DTYPES = ("float32", "float16", "bfloat16")
# dtypes a packed tensor may record (those the lossless format and safetensors hold)
TENSOR_DTYPES = ("float32", "float16", "bfloat16", "float64", "uint8", "int8", "int16", "int32", "int64", "bool",
                 "uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2")


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class FileEntry(_Strict):
    sha256: Sha256
    bytes: Count


class PartEntry(_Strict):
    kind: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    meta: dict[str, Any]
    tensors: list[TensorName] = Field(max_length=32)
    nbits: Count
    describe: Annotated[str, StringConstraints(max_length=4096)] = ""


class LayerEntry(_Strict):
    shape: list[Dim] = Field(min_length=2, max_length=2)
    bias: bool
    parts: list[PartEntry] = Field(min_length=1, max_length=MAX_PARTS)
    weight_bits: Count
    role: Literal["linear", "embedding"] = "linear"  # an embedding is rebuilt as a CompressedEmbedding
    padding_idx: Annotated[int, Field(ge=0)] | None = None


class CheckpointManifest(_Strict):
    model_config = ConfigDict(strict=True, extra="allow")  # save(extra=...) adds fields of its own

    format: Literal["tensorpress-checkpoint"]
    format_version: Annotated[int, Field(ge=1)]
    tensorpress_version: Annotated[str, StringConstraints(max_length=64)]
    created: Annotated[str, StringConstraints(max_length=64)] = ""
    base_model: Annotated[str, StringConstraints(max_length=4096)] | None = None
    model_type: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_\-]+$", max_length=64)]
    model_class: Annotated[str, StringConstraints(max_length=128)]  # checked against transformers on load
    dtype: Literal[MODEL_DTYPES] = "float32"
    recipe: dict[str, Any] | None = None
    layers: dict[ModuleName, LayerEntry] = Field(max_length=MAX_LAYERS)
    aliases: dict[TensorName, TensorName] = Field(default_factory=dict, max_length=MAX_LAYERS)
    bridges: list[Annotated[int, Field(ge=0, le=MAX_LAYERS)]] = Field(default_factory=list, max_length=MAX_LAYERS)
    tied_heads: dict[ModuleName, ModuleName] = Field(default_factory=dict, max_length=4)  # head -> embedding layer
    files: dict[FileName, FileEntry] = Field(max_length=MAX_FILES)


class PackedTensor(_Strict):
    model_config = ConfigDict(strict=True, extra="allow")  # coding statistics beyond those read here

    dtype: Literal[TENSOR_DTYPES]
    shape: list[Annotated[int, Field(ge=0, le=MAX_BYTES)]] = Field(max_length=MAX_TENSOR_DIMS)
    sha256: Sha256
    numel: Count
    original_bits: Count
    coded_bits: Count
    bound_bits: Annotated[float, Field(ge=0, allow_inf_nan=False)] | int
    coded_stream_entropy_bits: Annotated[float, Field(ge=0, allow_inf_nan=False)] | int
    raw_bits: Count
    codec: Annotated[str, StringConstraints(max_length=64)]


class PackedFile(_Strict):
    bytes: Count
    sha256: Sha256
    stored: FileName
    stored_bytes: Count | None = None
    stored_sha256: Sha256 | None = None
    tensors: dict[TensorName, PackedTensor] | None = Field(None, max_length=MAX_LAYERS)

    @model_validator(mode="after")
    def _coded_files_have_their_digest(self) -> PackedFile:
        if self.tensors is not None and self.stored_sha256 is None:
            raise ValueError("a coded weights file needs 'stored_sha256'")
        return self


class PackManifest(_Strict):
    format: Literal["tensorpress-lossless"]
    format_version: Annotated[int, Field(ge=1)]
    tensorpress_version: Annotated[str, StringConstraints(max_length=64)]
    created: Annotated[str, StringConstraints(max_length=64)] = ""
    source: Annotated[str, StringConstraints(max_length=4096)]
    checkpoint: bool
    files: dict[FileName, PackedFile] = Field(max_length=MAX_FILES)


class ContainerItem(_Strict):
    name: TensorName
    offset: Count
    bytes: Count
    unpacked_bits: Annotated[int, Field(ge=1, le=8)] | None = None


class ContainerIndex(_Strict):
    tensors: list[ContainerItem] = Field(max_length=MAX_LAYERS)
    metadata: dict[Annotated[str, StringConstraints(max_length=1024)], Annotated[str, StringConstraints(max_length=1 << 16)]] | None = None


def clip(value: Any, n: int = 60) -> str:
    """``repr(value)``, cut to ``n`` characters: an error names a hostile value without
    printing megabytes of it."""
    text = repr(value)
    return text if len(text) <= n else text[:n] + "…"


def _describe(exc: ValidationError) -> str:
    problems = []
    for e in exc.errors()[:3]:
        loc = ".".join(clip(p, 80).strip("'") for p in e["loc"]) or "(top level)"
        problems.append(f"{loc}: {e['msg']} (got {clip(e.get('input'))})")
    more = len(exc.errors()) - 3
    return "; ".join(problems) + (f"; and {more} more" if more > 0 else "")


def validated(schema: type[BaseModel], data: Any, where: str) -> dict[str, Any]:
    """``data`` (parsed JSON) if it fits ``schema``, else a ``CheckpointError`` naming ``where``
    (the file) and the offending fields."""
    try:
        schema.model_validate(data)
    except ValidationError as exc:
        raise CheckpointError(f"{where} is invalid: {_describe(exc)}") from None
    return data
