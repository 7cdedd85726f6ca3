"""The checkpoint directory format (version 1).

```
out/
  manifest.json        format, versions, base model, recipe, per-layer parts and bits,
                       sha256 and size of every other file
  config.json          the model's transformers config
  tokenizer files      as the tokenizer saves them
  dense.safetensors    every tensor of the model not held by a compressed linear (tied
                       tensors once: the others are listed as aliases)
  parts.safetensors    the parts' tensors as stored (codes bit-packed), keyed
                       "<layer>.parts.<i>.<tensor>"
```

Writes go to a temporary sibling directory that is renamed into place at the end, so an
interrupted save never leaves a half-written directory under the target name. Loading checks
every file's size and sha256 before reading any of it, and never unpickles.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tensorpress import __version__
from tensorpress.errors import (
    CheckpointError,
    CodingError,
    TensorpressError,
    UnsupportedArchitectureError,
)
from tensorpress.io.files import atomic_dir, confined, read_json, sha256_file
from tensorpress.io.headers import safetensors_header
from tensorpress.io.schema import CheckpointManifest, clip, validated
from tensorpress.models import LoadedModel, adapter_for
from tensorpress.parts import (
    PART_TYPES,
    CompressedEmbedding,
    CompressedLinear,
    TiedHead,
    part_from_state,
)
from tensorpress.parts.linear import embed_scale_of

log = logging.getLogger(__name__)

FORMAT = "tensorpress-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DENSE_FILE = "dense.safetensors"
PARTS_FILE = "parts.safetensors"
MAX_MANIFEST_BYTES = 1 << 30


def _dense_state(model: torch.nn.Module, compressed: set[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors of the model outside compressed parts, each storage once, plus aliases."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, tuple[int, ...]], str] = {}
    for name, tensor in model.state_dict().items():
        owner, _, _ = name.rpartition(".parts.")
        if owner in compressed:
            continue
        key = (tensor.untyped_storage().data_ptr(), tuple(tensor.shape))
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.detach().contiguous()
    return tensors, aliases


def _tied_heads(model: torch.nn.Module, layers: dict[str, CompressedLinear]) -> dict[str, str]:
    """``{head: embedding layer}`` for heads that read a compressed embedding's parts."""
    owner = {id(m): n for n, m in layers.items()}
    return {n: owner[id(m.table)] for n, m in model.named_modules() if isinstance(m, TiedHead) and id(m.table) in owner}


def save_checkpoint(
    lm: LoadedModel,
    path: str | os.PathLike,
    *,
    recipe: Any = None,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``lm`` (compressed or not) as a checkpoint directory at ``path``."""
    path = Path(path)
    from tensorpress.methods.structural.depth import bridge_indices

    model = lm.model
    layers = {n: m for n, m in model.named_modules() if isinstance(m, CompressedLinear)}
    with atomic_dir(path, overwrite=overwrite) as tmp:
        model.config.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
        dense, aliases = _dense_state(model, set(layers))
        save_file(dense, tmp / DENSE_FILE, metadata={"format": "pt"})
        part_tensors: dict[str, torch.Tensor] = {}
        layer_entries: dict[str, Any] = {}
        for name, layer in layers.items():
            entries = []
            for i, part in enumerate(layer.parts):
                tensors, meta = part.state()
                for tname, t in tensors.items():
                    part_tensors[f"{name}.parts.{i}.{tname}"] = t.contiguous()
                entries.append({"kind": part.kind, "meta": meta, "tensors": sorted(tensors), "nbits": part.nbits(), "describe": part.describe()})
            layer_entries[name] = {
                "shape": [layer.out_features, layer.in_features],
                "bias": layer.bias is not None,
                "parts": entries,
                "weight_bits": layer.weight_nbits(),
            }
            if isinstance(layer, CompressedEmbedding):
                layer_entries[name].update(role="embedding", padding_idx=layer.padding_idx)
        if part_tensors:
            save_file(part_tensors, tmp / PARTS_FILE, metadata={"format": "pt"})
        files = {
            str(p.relative_to(tmp)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        }
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "tensorpress_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "base_model": lm.info.get("base_model", lm.spec),
            "model_type": model.config.model_type,
            "model_class": type(model).__name__,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "recipe": recipe.to_dict() if recipe is not None else None,
            "layers": layer_entries,
            "aliases": aliases,
            "bridges": bridge_indices(lm.adapter.blocks(model)),  # drop_blocks with replace: linear
            "tied_heads": _tied_heads(model, layers),
            "files": files,
            **(extra or {}),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    log.info("saved checkpoint %s", path)
    return path


def load_manifest(path: Path, name: str, fmt: str, max_version: int, what: str) -> dict[str, Any]:
    """The JSON manifest ``path/name`` after checking its ``format`` and ``format_version``
    (``what`` names the kind of directory in the errors)."""
    mpath = path / name
    if not mpath.is_file():
        raise CheckpointError(f"{path} is not a {what}: {name} is missing")
    manifest = read_json(mpath, MAX_MANIFEST_BYTES, "manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise CheckpointError(f"{mpath} is not a {fmt} manifest (format {clip(found)})")
    version = manifest.get("format_version")
    if type(version) is not int or version > max_version:
        raise CheckpointError(
            f"{path} has {what} format version {clip(version)}, newer than this tensorpress "
            f"{__version__} reads (up to {max_version}); upgrade tensorpress to load it"
        )
    return manifest


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a checkpoint, after checking format, version and every field's type."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path} is not a directory")
    manifest = load_manifest(path, MANIFEST, FORMAT, FORMAT_VERSION, "tensorpress checkpoint")
    validated(CheckpointManifest, manifest, str(path / MANIFEST))
    for key, default in (("aliases", {}), ("bridges", []), ("dtype", "float32"), ("recipe", None), ("base_model", None)):
        manifest.setdefault(key, default)  # fields older checkpoints of format 1 may lack
    for name in manifest["files"]:
        confined(path, name, f"{path / MANIFEST}: files")
    for required in (DENSE_FILE, "config.json"):
        if required not in manifest["files"]:
            raise CheckpointError(f"{path}: the manifest lists no {required}")
    if manifest["layers"] and PARTS_FILE not in manifest["files"]:
        raise CheckpointError(f"{path}: the manifest lists compressed layers but no {PARTS_FILE}")
    return manifest


def file_problems(path: Path, manifest: dict[str, Any]) -> dict[str, str | None]:
    """For every file the manifest lists: ``None`` if it exists inside ``path`` with its
    recorded size and sha256, else what is wrong with it."""
    found: dict[str, str | None] = {}
    for name, entry in manifest["files"].items():
        fpath = confined(path, name, f"{path / MANIFEST}: files")
        if not fpath.is_file():
            found[name] = "listed in the manifest is missing"
        elif (size := fpath.stat().st_size) != entry["bytes"]:
            found[name] = f"is {size} bytes, the manifest says {entry['bytes']} (truncated or replaced)"
        elif sha256_file(fpath) != entry["sha256"]:
            found[name] = "does not match its sha256 in the manifest (corrupt or tampered with)"
        else:
            found[name] = None
    return found


def verify_files(path: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists exists inside ``path`` with its recorded size and sha256."""
    for name, problem in file_problems(path, manifest).items():
        if problem is not None:
            raise CheckpointError(f"{path}: {name} {problem}")


def verify(path: str | os.PathLike) -> dict[str, str | None]:
    """Check every file of a checkpoint or packed directory against its manifest (sizes and
    sha256; in a packed directory every tensor decoded and checked too): file name -> ``None``
    when it matches, else the problem. A manifest that is itself invalid raises ``CheckpointError``."""
    from tensorpress.io.pack import file_problems as packed_problems
    from tensorpress.io.pack import is_packed, read_pack_manifest

    path = Path(path)
    if is_packed(path):
        found = packed_problems(path, read_pack_manifest(path))
        if (path / MANIFEST).is_file() and found.get(MANIFEST) is None:
            read_manifest(path)  # a packed checkpoint: its own manifest must be valid too
        return found
    return file_problems(path, read_manifest(path))


def _model_class(name: str):
    import transformers

    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise CheckpointError(f"manifest names model class {name!r}, which is not a transformers model class")
    return cls


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    safetensors_header(file)
    try:
        return load_file(file)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{file} cannot be read as safetensors ({exc})") from None


def _packed_tensor_source(path: Path):
    """For a losslessly packed checkpoint: its manifest and a reader of its weight files."""
    from tensorpress.io.pack import (
        read_pack_manifest,
        read_tensors,
        verify_copied_files,
    )

    packed = read_pack_manifest(path)
    verify_copied_files(path, packed)
    manifest = read_manifest(path)
    return manifest, lambda name: read_tensors(path, name, packed)


@contextlib.contextmanager
def untrusted(what: str) -> Iterator[None]:
    """Around library calls that read files of a directory we did not write: whatever the
    library raises on a bad file (its error types are many and undocumented) becomes a
    ``CheckpointError`` naming ``what``; our own typed errors pass through."""
    try:
        yield
    except TensorpressError:
        raise
    except Exception as exc:  # noqa: BLE001 - third-party parsers of untrusted files
        raise CheckpointError(f"{what} cannot be read ({type(exc).__name__}: {str(exc)[:200]})") from None


def _build_model(path: Path, manifest: dict[str, Any], config: Any, adapter: Any, dense_shapes: dict[str, tuple[int, ...]]):
    """The model the manifest describes, after checking on the meta device (no memory) that
    its tensors are the ones the files hold: a config that asks for more or other weights than
    the files carry is refused before anything is allocated."""
    from math import prod

    from tensorpress.models.loading import weights_beyond

    cls = _model_class(manifest["model_class"])
    compressed = manifest["layers"]
    held = sum(prod(s) for s in dense_shapes.values()) + sum(prod(e["shape"]) for e in compressed.values())
    with untrusted(f"{path}: config.json"):
        wanted = weights_beyond(cls, config, held)
    if wanted is not None and not manifest.get("bridges"):
        raise CheckpointError(f"{path}: {DENSE_FILE} does not hold the tensors the config describes "
                              f"(it asks for {wanted:,} weights; the files hold {held:,})")
    with untrusted(f"{path}: config.json"), torch.device("meta"):
        skeleton = cls(config)
        adapter = adapter.bind(skeleton)  # mixture-of-experts models: experts as linears, as they were saved
    for name, entry in compressed.items():
        try:
            module = skeleton.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{path}: the manifest's layer {name!r} is not a module of this {manifest['model_class']}") from None
        weight = getattr(module, "weight", None)
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else None
        if shape is not None and type(module).__name__ == "Conv1D":
            shape = shape[::-1]  # GPT-2's Conv1D keeps (in, out)
        if shape != tuple(entry["shape"]):
            raise CheckpointError(f"{path}: layer {name} is {list(entry['shape'])} in the manifest but {shape} in the model")
    for head, table in manifest.get("tied_heads", {}).items():
        module = skeleton.get_submodule(head) if _has_module(skeleton, head) else None
        if compressed.get(table, {}).get("role") != "embedding" or not isinstance(module, torch.nn.Linear):
            raise CheckpointError(f"{path}: tied head {head!r} -> {table!r} names no linear head and compressed embedding")
    # a compressed linear's weight is its parts (a tied head's is its embedding's); its bias stays in the dense file
    held = {f"{name}.weight" for name in [*compressed, *manifest.get("tied_heads", {})]} | set(manifest["aliases"])
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items() if k not in held}
    if manifest.get("bridges"):
        expected = None  # bridges replace blocks after construction; checked by load_state_dict below
    if expected is not None and expected != dense_shapes:
        wrong = sorted(k for k in set(expected) | set(dense_shapes) if expected.get(k) != dense_shapes.get(k))
        raise CheckpointError(f"{path}: {DENSE_FILE} does not hold the tensors the config describes "
                              f"(differing: {wrong[:5]}{' …' if len(wrong) > 5 else ''})")
    dtype = getattr(torch, manifest["dtype"])
    with untrusted(f"{path}: config.json"):
        model = cls(config)
    adapter.bind(model)
    return model.to(dtype).eval(), dtype


def _has_module(model: torch.nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _rebuild_layer(path: Path, name: str, entry: dict[str, Any], part_tensors: dict[str, torch.Tensor], dtype) -> CompressedLinear:
    """One compressed linear from its manifest entry; every part checked against the entry
    (kind, shape, exact bits) so that an edited manifest cannot rebuild a different layer."""
    parts = []
    shape = tuple(entry["shape"])
    for i, p in enumerate(entry["parts"]):
        where = f"{path}: part {i} of layer {name}"
        if p["kind"] not in PART_TYPES:
            raise CheckpointError(f"{where}: unknown part kind {p['kind']!r}; known: {', '.join(sorted(PART_TYPES))}")
        if "shape" in p["meta"] and p["meta"]["shape"] != list(shape):
            raise CheckpointError(f"{where}: shape {p['meta']['shape']!r} differs from the layer's {list(shape)}")
        missing = [t for t in p["tensors"] if f"{name}.parts.{i}.{t}" not in part_tensors]
        if missing:
            raise CheckpointError(f"{where}: tensors {missing} are not in {PARTS_FILE}")
        tensors = {t: part_tensors[f"{name}.parts.{i}.{t}"] for t in p["tensors"]}
        try:
            part = part_from_state(p["kind"], tensors, p["meta"])
            bits = part.nbits()
        except (KeyError, ValueError, TypeError, IndexError, RuntimeError, AttributeError, OverflowError, CodingError) as exc:
            raise CheckpointError(f"{where} cannot be rebuilt ({type(exc).__name__}: {str(exc)[:200]})") from None
        if part.shape != shape or bits != p["nbits"]:
            raise CheckpointError(f"{where}: rebuilds as {list(part.shape)} in {bits} bits, the manifest says "
                                  f"{list(shape)} in {p['nbits']} bits")
        parts.append(part)
    if entry.get("role") == "embedding":
        if entry["bias"]:
            raise CheckpointError(f"{path}: embedding layer {name} cannot have a bias")
        layer = CompressedEmbedding(parts, entry.get("padding_idx"), dtype)
    else:
        bias = torch.zeros(shape[0], dtype=dtype) if entry["bias"] else None
        layer = CompressedLinear(parts, bias)
    if layer.weight_nbits() != entry["weight_bits"]:
        raise CheckpointError(f"{path}: layer {name} holds {layer.weight_nbits()} bits, the manifest says {entry['weight_bits']}")
    return layer


def load_checkpoint(path: str | os.PathLike) -> LoadedModel:
    """Rebuild the (compressed) model a checkpoint holds, after verifying every file.

    A losslessly packed directory (``tensorpress pack``) loads too: a packed checkpoint is
    decoded in memory, a packed Hugging Face directory through a temporary unpacked copy. A
    ``.gguf`` file loads with its block-quantized tensors as parts (``io.gguf_import``)."""
    from transformers import AutoConfig, AutoTokenizer

    from tensorpress.io.gguf_import import is_gguf, load_gguf_compressed
    from tensorpress.io.pack import is_packed

    path = Path(path)
    if is_gguf(path):
        return load_gguf_compressed(path)
    if is_packed(path):
        if not (path / MANIFEST).is_file():
            return _load_packed_model_dir(path)
        manifest, tensors_of = _packed_tensor_source(path)
    else:
        manifest = read_manifest(path)
        verify_files(path, manifest)

        def tensors_of(name: str) -> dict[str, torch.Tensor]:
            return _load_tensors(path / name)

    with untrusted(f"{path}: config.json"):
        config = AutoConfig.from_pretrained(path)
    try:
        adapter = adapter_for(config.model_type)
    except UnsupportedArchitectureError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    if config.model_type != manifest["model_type"]:
        raise CheckpointError(f"{path}: config.json is a {config.model_type!r} model, the manifest says {manifest['model_type']!r}")
    dense = tensors_of(DENSE_FILE)
    model, dtype = _build_model(path, manifest, config, adapter, {k: tuple(v.shape) for k, v in dense.items()})
    if manifest["bridges"]:
        from tensorpress.methods.structural.depth import place_bridges

        bridges, n_blocks = manifest["bridges"], len(adapter.blocks(model))
        if not all(0 <= i < n_blocks for i in bridges):
            raise CheckpointError(f"{path}: manifest lists bridges {bridges} for a model of {n_blocks} blocks")
        place_bridges(adapter, model, bridges)
    part_tensors = tensors_of(PARTS_FILE) if manifest["layers"] else {}
    expected_missing = set(manifest["aliases"])
    rebuilt = {}
    for name, entry in manifest["layers"].items():
        layer = rebuilt[name] = _rebuild_layer(path, name, entry, part_tensors, dtype)
        if isinstance(layer, CompressedEmbedding):  # a scaled embedding's factor comes from the model it replaces
            layer.scale = embed_scale_of(model.get_submodule(name))
        model.set_submodule(name, layer)
        expected_missing.update(f"{name}.{k}" for k in layer.state_dict() if k.startswith("parts."))
    for head, table in manifest.get("tied_heads", {}).items():
        model.set_submodule(head, TiedHead(rebuilt[table]))
    try:
        missing, unexpected = model.load_state_dict(dense, strict=False)
    except RuntimeError as exc:  # a tensor of the wrong shape
        raise CheckpointError(f"{path}: tensors do not fit the model ({str(exc)[:300]})") from None
    if unexpected or set(missing) - expected_missing:
        raise CheckpointError(
            f"{path}: tensors do not fit the model: missing {sorted(set(missing) - expected_missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    state = model.state_dict()
    for alias, target in manifest["aliases"].items():
        if alias not in state or target not in dense or state[alias].shape != dense[target].shape:
            raise CheckpointError(f"{path}: alias {alias!r} -> {target!r} names no tensor of the model of that shape")
        if state[alias].data_ptr() != state[target].data_ptr():
            state[alias].copy_(dense[target])
    with untrusted(f"{path}: tokenizer files"):
        tokenizer = AutoTokenizer.from_pretrained(path)
    info = {"base_model": manifest.get("base_model"), "checkpoint": str(path), "manifest": manifest}
    return LoadedModel(model, tokenizer, adapter, str(path), info)


def _load_packed_model_dir(path: Path) -> LoadedModel:
    """A packed Hugging Face directory: unpack to a temporary directory and load from there."""
    from tensorpress.io.pack import unpack
    from tensorpress.models import load_model

    with tempfile.TemporaryDirectory(prefix="tensorpress-unpacked-") as tmp:
        unpack(path, Path(tmp) / "model")
        lm = load_model(Path(tmp) / "model")
        for p in lm.model.parameters():  # weights may be memory-mapped from the temporary files
            p.data = p.data.clone()
        for b in lm.model.buffers():
            b.data = b.data.clone()
    lm.spec = str(path)
    lm.info.update({"source": "packed", "path": str(path)})
    return lm


def checkpoint_bytes(path: str | os.PathLike) -> int:
    """Total size on disk of a checkpoint directory."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
