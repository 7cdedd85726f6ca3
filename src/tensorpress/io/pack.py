"""Lossless packing of whole model directories and tensorpress checkpoints.

``pack(source, out)`` copies a model directory (a Hugging Face directory, a built-in model, a
hub id, or a tensorpress checkpoint) with every ``*.safetensors`` file replaced by a
``*.safetensors.tplc`` container of losslessly coded tensors; every other file is copied as is.
Bit-packed quantization codes in a tensorpress checkpoint are unpacked first and coded as
symbols, so they cost less than their nominal width. ``lossless.json`` records, per file, the
original size and sha256 and, per tensor, its dtype, shape, the sha256 of its bytes, its coded
size and the Shannon bound of its coded fields.

``unpack(packed, out)`` writes the original files back; ``read_tensors`` decodes one container
in memory. Every decoded tensor's sha256 is checked against ``lossless.json`` and every stored
file's sha256 before it is read; a mismatch raises :class:`CodingError` naming the file and the
tensor. Writes go to a temporary sibling directory renamed into place at the end.

Container layout (``.tplc``): ``"TPLK" version:u32 index_bytes:u64 index(JSON) index_crc32:u32``,
then the tensors' encodings (``format.encode``) back to back at the offsets the index gives.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tensorpress import __version__
from tensorpress.errors import CheckpointError, CodingError, ModelNotFoundError
from tensorpress.io.checkpoint import load_manifest
from tensorpress.io.files import (
    atomic_dir,
    check_output,
    confined,
    sha256_bytes,
    sha256_file,
)
from tensorpress.io.headers import safetensors_header
from tensorpress.io.schema import ContainerIndex, PackManifest, validated
from tensorpress.lossless.format import CodingStats, decode, encode_with_stats
from tensorpress.parts.packing import pack_bits, unpack_bits
from tensorpress.progress import track

PACK_MANIFEST = "lossless.json"
PACK_FORMAT = "tensorpress-lossless"
PACK_VERSION = 1
CONTAINER_MAGIC = b"TPLK"
SUFFIX = ".tplc"


def _tensor_sha256(t: torch.Tensor) -> str:
    t = t.contiguous()
    return sha256_bytes(t.reshape(-1).view(torch.uint8).numpy().data) if t.numel() else sha256_bytes(b"")


def resolve_source(spec: str | os.PathLike) -> Path:
    """The local directory holding a model's files: a directory, a built-in name or a hub id."""
    from tensorpress.models.loading import BUILTIN_MODELS, _builtin_dir, _is_hub_id

    spec_str = os.fspath(spec)
    if spec_str in BUILTIN_MODELS:
        builtin = BUILTIN_MODELS[spec_str]
        if builtin.gguf_file:
            raise ModelNotFoundError(
                f"built-in model {spec_str!r} ships as GGUF ({builtin.gguf_file}), which has no "
                "safetensors weights to pack; compress it and pack the checkpoint, or save it first"
            )
        return _builtin_dir(builtin)
    path = Path(spec_str).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelNotFoundError(f"{path} is a file; pack takes a model directory, a built-in name or a hub id")
    if _is_hub_id(spec_str):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(spec_str, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
        except Exception as exc:  # the hub client raises many types; the message says which
            raise ModelNotFoundError(f"cannot fetch {spec_str!r} from the hub or its cache ({exc})") from exc
    raise ModelNotFoundError(f"no such model {spec_str!r}: not a directory, a built-in name or a hub id 'org/name'")


def _code_bits(source: Path) -> dict[str, int]:
    """Tensor name -> bits, for the bit-packed code tensors of a tensorpress checkpoint."""
    from tensorpress.io.checkpoint import FORMAT, read_manifest
    from tensorpress.parts import PART_TYPES

    manifest_path = source / "manifest.json"
    if not manifest_path.is_file():
        return {}
    try:
        found = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return {}
    if not isinstance(found, dict) or found.get("format") != FORMAT:
        return {}  # some other program's manifest.json: copied as it is
    manifest = read_manifest(source)  # a tensorpress checkpoint: validated like any other
    out: dict[str, int] = {}
    for layer, entry in manifest["layers"].items():
        for i, part in enumerate(entry["parts"]):
            cls = PART_TYPES.get(part["kind"])
            if cls is None:
                continue
            try:
                widths = cls.code_bits(part["meta"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{manifest_path}: part {i} of layer {layer} has settings {part['meta']} "
                                      f"that a {part['kind']} part cannot have") from None
            for tensor, bits in widths.items():
                out[f"{layer}.parts.{i}.{tensor}"] = bits
    return out


@dataclass
class _Entry:
    name: str
    blob: bytes
    stats: CodingStats
    sha256: str
    dtype: str
    shape: list[int]
    unpacked_bits: int | None  # the tensor was bit-packed codes of this width, coded as symbols


def _encode_tensor(name: str, t: torch.Tensor, bits: int | None) -> _Entry:
    sha = _tensor_sha256(t)
    if bits is not None and t.dtype == torch.uint8 and t.dim() == 1:
        # bit-packed codes: code the codes themselves; the padding codes are zero
        codes = unpack_bits(t, bits, t.numel() * 8 // bits)
        if torch.equal(pack_bits(codes, bits), t):
            blob, stats = encode_with_stats(codes)
            # the stats speak of the original tensor: its packed bits, and the codes' entropy
            stats = CodingStats(codes.numel(), t.numel() * 8, stats.coded_bits, stats.coded_stream_entropy_bits,
                                stats.raw_bits, f"codes{bits}:{stats.codec}")
            return _Entry(name, blob, stats, sha, str(t.dtype).removeprefix("torch."), list(t.shape), bits)
    blob, stats = encode_with_stats(t)
    return _Entry(name, blob, stats, sha, str(t.dtype).removeprefix("torch."), list(t.shape), None)


def _write_container(path: Path, entries: list[_Entry], metadata: dict[str, str] | None) -> None:
    index, offset = [], 0
    for e in entries:
        index.append({"name": e.name, "offset": offset, "bytes": len(e.blob), "unpacked_bits": e.unpacked_bits})
        offset += len(e.blob)
    index_bytes = json.dumps({"tensors": index, "metadata": metadata}, separators=(",", ":")).encode()
    with open(path, "wb") as f:
        f.write(CONTAINER_MAGIC + struct.pack("<IQ", PACK_VERSION, len(index_bytes)) + index_bytes)
        f.write(struct.pack("<I", zlib.crc32(index_bytes)))
        for e in entries:
            f.write(e.blob)


def _read_container(path: Path) -> tuple[list[dict[str, Any]], dict[str, str] | None, memoryview]:
    data = memoryview(path.read_bytes())
    head = 4 + struct.calcsize("<IQ")
    if len(data) < head or bytes(data[:4]) != CONTAINER_MAGIC:
        raise CodingError(f"{path}: not a tensorpress lossless container")
    version, n = struct.unpack_from("<IQ", data, 4)
    if version > PACK_VERSION:
        raise CodingError(f"{path}: container version {version} is newer than this tensorpress reads ({PACK_VERSION})")
    if len(data) < head + n + 4:
        raise CodingError(f"{path}: truncated container index")
    index_bytes = data[head:head + n]
    (crc,) = struct.unpack_from("<I", data, head + n)
    if zlib.crc32(index_bytes) != crc:
        raise CodingError(f"{path}: container index checksum mismatch (corrupt)")
    try:
        index = json.loads(bytes(index_bytes))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CodingError(f"{path}: container index is not valid JSON ({type(exc).__name__})") from None
    validated(ContainerIndex, index, f"{path}: container index")
    payload = data[head + n + 4:]
    for item in index["tensors"]:
        if item["offset"] + item["bytes"] > len(payload):
            raise CodingError(f"{path}: tensor {item['name'][:80]!r} lies past the end of the container (truncated?)")
    return index["tensors"], index.get("metadata"), payload


def _safetensors_metadata(path: Path) -> dict[str, str] | None:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def pack(source: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> dict[str, Any]:
    """Write a lossless copy of ``source`` at ``out``; returns the ``lossless.json`` manifest."""
    src = resolve_source(source)
    out = Path(out)
    check_output(out, overwrite)
    if (src / PACK_MANIFEST).is_file():
        raise CodingError(f"{src} is already packed (it has {PACK_MANIFEST}); unpack it first")
    files = sorted(p for p in src.rglob("*") if p.is_file() and not p.name.startswith("."))
    weights = [p for p in files if p.suffix == ".safetensors"]
    if not weights:
        raise ModelNotFoundError(f"{src} holds no *.safetensors files to pack")
    for path in files:  # a symlink out of the directory would pack a stranger's file
        confined(src, path.relative_to(src).as_posix(), str(src))
    for path in weights:
        safetensors_header(path)
    code_bits = _code_bits(src)
    manifest: dict[str, Any] = {
        "format": PACK_FORMAT, "format_version": PACK_VERSION, "tensorpress_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "source": str(source),
        "checkpoint": (src / "manifest.json").is_file(), "files": {},
    }
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for path in files:
            rel = path.relative_to(src).as_posix()
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            entry: dict[str, Any] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
            if path in weights:
                entries = []
                with safe_open(str(path), framework="pt") as f:
                    names = list(f.keys())
                    for name in track(names, f"packing {rel}", total=len(names)):
                        entries.append(_encode_tensor(name, f.get_tensor(name), code_bits.get(name)))
                stored = target.with_name(target.name + SUFFIX)
                _write_container(stored, entries, _safetensors_metadata(path))
                entry["stored"] = rel + SUFFIX
                entry["stored_bytes"] = stored.stat().st_size
                entry["stored_sha256"] = sha256_file(stored)
                entry["tensors"] = {
                    e.name: {"dtype": e.dtype, "shape": e.shape, "sha256": e.sha256, **e.stats.to_dict()} for e in entries
                }
            else:
                shutil.copy2(path, target)
                entry["stored"] = rel
            manifest["files"][rel] = entry
        (tmp / PACK_MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return manifest


def is_packed(path: str | os.PathLike) -> bool:
    return (Path(path) / PACK_MANIFEST).is_file()


def read_pack_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """``lossless.json`` of a packed directory, after checking format, version, every field's
    type and every file name (inside the directory; no name both a file and a folder)."""
    path = Path(path)
    manifest = load_manifest(path, PACK_MANIFEST, PACK_FORMAT, PACK_VERSION, "packed model")
    where = str(path / PACK_MANIFEST)
    validated(PackManifest, manifest, where)
    names = set(manifest["files"])
    for rel, entry in manifest["files"].items():
        confined(path, rel, f"{where}: files")
        confined(path, entry["stored"], f"{where}: files.{rel}.stored")
        parents = {"/".join(rel.split("/")[:i]) for i in range(1, rel.count("/") + 1)}
        if parents & names:
            raise CheckpointError(f"{where}: {rel!r} lies inside {min(parents & names)!r}, which is listed as a file")
    return manifest


def _check_stored(path: Path, rel: str, entry: dict[str, Any]) -> Path:
    stored = confined(path, entry["stored"], f"{path / PACK_MANIFEST}: files.{rel}.stored")
    if not stored.is_file():
        raise CheckpointError(f"{path}: {entry['stored']} (for {rel}) is missing")
    digest_key = "stored_sha256" if "stored_sha256" in entry else "sha256"
    if sha256_file(stored) != entry[digest_key]:
        raise CheckpointError(f"{path}: {entry['stored']} does not match its sha256 in {PACK_MANIFEST} (corrupt)")
    return stored


def file_problems(path: Path, manifest: dict[str, Any]) -> dict[str, str | None]:
    """For every original file of a packed directory: ``None`` if its stored file matches its
    sha256 and (weights files) every tensor decodes to its recorded sha256, else the problem."""
    found: dict[str, str | None] = {}
    for rel, entry in manifest["files"].items():
        try:
            if entry.get("tensors") is None:
                _check_stored(path, rel, entry)
            else:
                _decode_file(path, rel, manifest)
            found[rel] = None
        except (CheckpointError, CodingError) as exc:
            found[rel] = str(exc)
    return found


def verify_copied_files(path: Path, manifest: dict[str, Any]) -> None:
    """Every file copied as is (config, tokenizer, checkpoint manifest) matches its sha256."""
    for rel, entry in manifest["files"].items():
        if entry.get("tensors") is None:
            _check_stored(path, rel, entry)


def _decode_file(path: Path, rel: str, manifest: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    """The tensors of one packed weights file and its safetensors metadata (file checked by
    sha256 first, every tensor by sha256 after decoding)."""
    entry = manifest["files"].get(rel)
    if entry is None or entry.get("tensors") is None:
        raise CheckpointError(f"{path}: {rel} is not a packed weights file of this directory")
    stored = _check_stored(path, rel, entry)
    index, metadata, payload = _read_container(stored)
    tensors: dict[str, torch.Tensor] = {}
    for item in index:
        name = item["name"]
        expected = entry["tensors"].get(name)
        if expected is None:
            raise CodingError(f"{stored}: tensor {name} is not listed in {PACK_MANIFEST}")
        try:
            t = decode(payload[item["offset"]:item["offset"] + item["bytes"]])
            if item.get("unpacked_bits"):
                t = pack_bits(t, int(item["unpacked_bits"]))
        except CodingError as exc:
            raise CodingError(f"{stored}: tensor {name}: {exc}") from None
        if _tensor_sha256(t) != expected["sha256"]:
            raise CodingError(f"{stored}: tensor {name} decodes to bytes that do not match its sha256")
        tensors[name] = t
    if set(tensors) != set(entry["tensors"]):
        raise CodingError(f"{stored}: tensors {sorted(set(entry['tensors']) - set(tensors))[:5]} are missing")
    return tensors, metadata


def read_tensors(path: str | os.PathLike, rel: str, manifest: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Decode the tensors of one original safetensors file ``rel`` of a packed directory."""
    path = Path(path)
    return _decode_file(path, rel, manifest or read_pack_manifest(path))[0]


def unpack(packed: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> dict[str, bool]:
    """Write the original files of a packed directory at ``out``.

    Returns, per weights file, whether the rewritten file is byte-identical to the original
    (its tensors always are: each is checked by sha256)."""
    packed, out = Path(packed), Path(out)
    manifest = read_pack_manifest(packed)
    identical: dict[str, bool] = {}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for rel, entry in manifest["files"].items():
            target = confined(tmp, rel, f"{packed / PACK_MANIFEST}: files")  # checked on read; checked again where written
            target.parent.mkdir(parents=True, exist_ok=True)
            if entry.get("tensors") is not None:
                tensors, metadata = _decode_file(packed, rel, manifest)
                save_file(tensors, str(target), metadata=metadata)
                identical[rel] = sha256_file(target) == entry["sha256"]
            else:
                shutil.copyfile(_check_stored(packed, rel, entry), target)
    return identical


def summary(manifest: dict[str, Any]) -> dict[str, float]:
    """Totals over every coded tensor: values, original/coded/bound bits."""
    tensors = [t for e in manifest["files"].values() for t in (e.get("tensors") or {}).values()]
    return {
        "tensors": len(tensors),
        "values": sum(t["numel"] for t in tensors),
        "original_bits": sum(t["original_bits"] for t in tensors),
        "coded_bits": sum(t["coded_bits"] for t in tensors),
        "bound_bits": sum(t["bound_bits"] for t in tensors),
    }
