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

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tensorpress import __version__
from tensorpress.errors import CheckpointError, CodingError, OutputExistsError, UnsupportedArchitectureError
from tensorpress.models import LoadedModel, adapter_for
from tensorpress.parts import CompressedLinear, part_from_state

log = logging.getLogger(__name__)

FORMAT = "tensorpress-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DENSE_FILE = "dense.safetensors"
PARTS_FILE = "parts.safetensors"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def replace_dir(tmp: Path, target: Path) -> None:
    """Move the finished directory ``tmp`` to ``target``, replacing what was there, so that the
    target name only ever holds a complete directory."""
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary directory
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
    os.rename(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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


def _fsync_dir_files(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb+") as f:
                os.fsync(f.fileno())


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
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{path} exists and is not a directory; it will not be replaced")
    path.parent.mkdir(parents=True, exist_ok=True)
    from tensorpress.methods.structural.depth import bridge_indices

    model = lm.model
    layers = {n: m for n, m in model.named_modules() if isinstance(m, CompressedLinear)}
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
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
            "files": files,
            **(extra or {}),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        _fsync_dir_files(tmp)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved checkpoint %s", path)
    return path


def load_manifest(path: Path, name: str, fmt: str, max_version: int, what: str) -> dict[str, Any]:
    """The JSON manifest ``path/name`` after checking its ``format`` and ``format_version``
    (``what`` names the kind of directory in the errors)."""
    mpath = path / name
    if not mpath.is_file():
        raise CheckpointError(f"{path} is not a {what}: {name} is missing")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{mpath} is corrupt: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise CheckpointError(f"{mpath} is not a {fmt} manifest (format {found!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > max_version:
        raise CheckpointError(
            f"{path} has {what} format version {version!r}, newer than this tensorpress "
            f"{__version__} reads (up to {max_version}); upgrade tensorpress to load it"
        )
    return manifest


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a checkpoint, after checking format and version."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path} is not a directory")
    return load_manifest(path, MANIFEST, FORMAT, FORMAT_VERSION, "tensorpress checkpoint")


def verify_files(path: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists exists with its recorded size and sha256."""
    for name, entry in manifest.get("files", {}).items():
        fpath = path / name
        if not fpath.is_file():
            raise CheckpointError(f"{path}: file {name} listed in the manifest is missing")
        size = fpath.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(f"{path}: {name} is {size} bytes, the manifest says {entry['bytes']} (truncated or replaced)")
        digest = sha256_file(fpath)
        if digest != entry["sha256"]:
            raise CheckpointError(f"{path}: {name} does not match its sha256 in the manifest (corrupt or tampered with)")
    for required in (DENSE_FILE, "config.json"):
        if required not in manifest.get("files", {}):
            raise CheckpointError(f"{path}: the manifest lists no {required}")


def _model_class(name: str):
    import transformers

    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise CheckpointError(f"manifest names model class {name!r}, which is not a transformers model class")
    return cls


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(file)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{file} cannot be read as safetensors ({exc})") from None


def _packed_tensor_source(path: Path):
    """For a losslessly packed checkpoint: its manifest and a reader of its weight files."""
    from tensorpress.lossless.pack import read_pack_manifest, read_tensors, verify_copied_files

    packed = read_pack_manifest(path)
    verify_copied_files(path, packed)
    manifest = read_manifest(path)
    return manifest, lambda name: read_tensors(path, name, packed)


def load_checkpoint(path: str | os.PathLike) -> LoadedModel:
    """Rebuild the (compressed) model a checkpoint holds, after verifying every file.

    A losslessly packed directory (``tensorpress pack``) loads too: a packed checkpoint is
    decoded in memory, a packed Hugging Face directory through a temporary unpacked copy."""
    from transformers import AutoConfig, AutoTokenizer

    from tensorpress.lossless.pack import is_packed

    path = Path(path)
    if is_packed(path):
        if not (path / MANIFEST).is_file():
            return _load_packed_model_dir(path)
        manifest, tensors_of = _packed_tensor_source(path)
    else:
        manifest = read_manifest(path)
        verify_files(path, manifest)

        def tensors_of(name: str) -> dict[str, torch.Tensor]:
            return _load_tensors(path / name)

    config = AutoConfig.from_pretrained(path)
    try:
        adapter = adapter_for(config.model_type)
    except UnsupportedArchitectureError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    cls = _model_class(manifest["model_class"])
    dtype = getattr(torch, manifest.get("dtype", "float32"))
    model = cls(config).to(dtype).eval()
    if manifest.get("bridges"):
        from tensorpress.methods.structural.depth import place_bridges

        bridges, n_blocks = manifest["bridges"], len(adapter.blocks(model))
        if not all(isinstance(i, int) and 0 <= i < n_blocks for i in bridges):
            raise CheckpointError(f"{path}: manifest lists bridges {bridges} for a model of {n_blocks} blocks")
        place_bridges(adapter, model, bridges)
    part_tensors = tensors_of(PARTS_FILE) if manifest["layers"] else {}
    expected_missing = set(manifest.get("aliases", {}))
    for name, entry in manifest["layers"].items():
        parts = []
        for i, p in enumerate(entry["parts"]):
            try:
                tensors = {t: part_tensors[f"{name}.parts.{i}.{t}"] for t in p["tensors"]}
                parts.append(part_from_state(p["kind"], tensors, p["meta"]))
            except (KeyError, ValueError, CodingError) as exc:
                raise CheckpointError(f"{path}: part {i} of layer {name} cannot be rebuilt ({exc})") from None
        bias = torch.zeros(entry["shape"][0], dtype=dtype) if entry["bias"] else None
        layer = CompressedLinear(parts, bias)
        model.set_submodule(name, layer)
        expected_missing.update(f"{name}.{k}" for k in layer.state_dict() if k.startswith("parts."))
    dense = tensors_of(DENSE_FILE)
    missing, unexpected = model.load_state_dict(dense, strict=False)
    if unexpected or set(missing) - expected_missing:
        raise CheckpointError(
            f"{path}: tensors do not fit the model: missing {sorted(set(missing) - expected_missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    state = model.state_dict()
    for alias, target in manifest.get("aliases", {}).items():
        if state[alias].data_ptr() != state[target].data_ptr():
            state[alias].copy_(dense[target])
    tokenizer = AutoTokenizer.from_pretrained(path)
    info = {"base_model": manifest.get("base_model"), "checkpoint": str(path), "manifest": manifest}
    return LoadedModel(model, tokenizer, adapter, str(path), info)


def _load_packed_model_dir(path: Path) -> LoadedModel:
    """A packed Hugging Face directory: unpack to a temporary directory and load from there."""
    from tensorpress.lossless.pack import unpack
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
