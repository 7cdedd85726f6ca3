"""The level database: every menu entry's compression of every block linear, computed once.

Each entry is one ``tp.compress`` of the whole model with the entry's recipe applied uniformly.
Where each block's calibration statistics come from is the database's ``inputs``:

* ``compressed`` (default; EvoPress makes its quantization levels so, one ordinary GPTQ run per
  width): the usual sequential compression, each block calibrated on the outputs of the entry's
  compressed earlier blocks. The levels are the best each entry does on its own; a searched mix
  is then compressed again from its recipe (each block calibrated on the mix's earlier blocks),
  so the scored model is a close proxy of the output, not the output itself.
* ``original``: every block calibrated on the original model's activations, so a layer's parts
  depend only on the original model, the calibration windows and the entry's settings, never on
  what other layers chose; the scored mix is exactly what its recipe (one stage per entry,
  ``inputs: original``) reproduces, at some quality cost (GPTQ w3g128 on smollm2-135m: KL 0.58
  against 0.40 sequentially).

Layout of a database directory::

    levels.json          index: model fingerprint, calibration hash, one record per entry
                         (its recipe, checkpoint folder, build seconds, per layer: shape, exact
                         bits of the parts, relative weight and output error)
    <entry>-<hash>/      the entry's checkpoint (manifest + safetensors, sha256-checked on load)

The index is rewritten atomically after every entry, so an interrupted build resumes with the
entries it finished; an index made for another model or calibration set is refused.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tensorpress.data import TokenWindows
from tensorpress.errors import CheckpointError, SearchError
from tensorpress.eval.tasks import fingerprint
from tensorpress.io import load_checkpoint
from tensorpress.io.files import read_json
from tensorpress.io.gguf import aligned_bytes, gguf_file_bytes, native_tensor_bytes
from tensorpress.models import LoadedModel
from tensorpress.parts import CompressedLinear
from tensorpress.recipe import Recipe
from tensorpress.search.allocate import compress
from tensorpress.search.menu import GGUF_MENU

log = logging.getLogger(__name__)

INDEX = "levels.json"
FORMAT = "tensorpress-levels"
VERSION = 1
MAX_INDEX_BYTES = 256 << 20


def windows_hash(windows: TokenWindows) -> str:
    """sha256 of the calibration token ids (shape included): the identity of the statistics."""
    ids = windows.input_ids.to(torch.int64).contiguous()
    return hashlib.sha256(f"{tuple(ids.shape)};".encode() + ids.numpy().tobytes()).hexdigest()


INPUTS = ("compressed", "original")


def recipe_key(recipe: Recipe, inputs: str = "original") -> str:
    """Identity of an entry's levels: its stages and where their statistics come from (databases
    of version 1 built before ``inputs`` existed were all ``original`` and keep their keys)."""
    text = json.dumps(recipe.to_dict()["stages"], sort_keys=True) + ("" if inputs == "original" else f";inputs={inputs}")
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class Level:
    """One menu entry's result on one layer."""

    entry: str
    bits: int  # exact storage of the layer's parts
    output_error: float | None
    weight_error: float | None


@dataclass
class LevelDB:
    """An opened level database: ``layers`` in model order (block by block, the adapter's order
    within a block), ``shapes`` per layer, ``levels[layer]`` one ``Level`` per entry in menu
    order."""

    path: Path
    index: dict[str, Any]
    entries: list[str]
    layers: list[str]
    shapes: dict[str, tuple[int, int]]
    levels: dict[str, list[Level]]
    inputs: str = "original"

    @property
    def exact(self) -> bool:
        """Whether a mix of these levels is exactly what its recipe reproduces."""
        return self.inputs == "original"

    @property
    def numel(self) -> int:
        return sum(o * i for o, i in self.shapes.values())

    def bits(self, choice: list[int] | tuple[int, ...]) -> int:
        """Exact storage of the linears' parts when layer ``k`` takes entry ``choice[k]``."""
        return sum(self.levels[name][c].bits for name, c in zip(self.layers, choice))

    def uniform(self, entry: str) -> tuple[int, ...]:
        return (self.entries.index(entry),) * len(self.layers)

    def checkpoint(self, entry: str) -> Path:
        return self.path / self.index["entries"][entry]["checkpoint"]

    def dense_weights(self, entries: list[str] | None = None) -> dict[str, list[torch.Tensor]]:
        """``{layer: [float32 (out, in) weight of each entry]}``, one checkpoint loaded at a time."""
        out: dict[str, list[torch.Tensor]] = {name: [] for name in self.layers}
        for entry in entries or self.entries:
            model = load_checkpoint(self.checkpoint(entry)).model
            for name in self.layers:
                module = model.get_submodule(name)
                if not isinstance(module, CompressedLinear):
                    raise SearchError(f"{self.checkpoint(entry)}: layer {name} is not compressed in entry {entry!r}")
                out[name].append(module.dense().float().contiguous())
            del model
        return out

    def gguf_bytes(self) -> tuple[dict[str, list[int]], int]:
        """``({layer: [GGUF bytes of each entry's tensor, alignment padding included]}, rest)``:
        a mix's GGUF file is at most ``rest`` plus its layers' bytes, and at most two alignment
        units less; ``rest`` (header, vocabulary, every other tensor) is measured by exporting the
        first entry. An entry whose layer has no
        exact ggml type (which export would refuse) is an error naming both."""
        out: dict[str, list[int]] = {name: [] for name in self.layers}
        rest = 0
        for k, entry in enumerate(self.entries):
            loaded = load_checkpoint(self.checkpoint(entry))
            for name in self.layers:
                module = loaded.model.get_submodule(name)
                nbytes = native_tensor_bytes(module) if isinstance(module, CompressedLinear) else None
                if nbytes is None:
                    raise SearchError(f"menu entry {entry!r}: layer {name} has no llama.cpp type of its own, so a GGUF "
                                      "size cannot hold it; a GGUF search takes entries on llama.cpp grids "
                                      f"(tensorpress.search.GGUF_MENU: {', '.join(GGUF_MENU)})")
                out[name].append(aligned_bytes(nbytes))
            if k == 0:
                # the header's own padding to the alignment can differ by one unit between files
                # of other tensor types (seen: 32 bytes), so one unit is added: the count is an
                # upper bound of the file, at most two alignment units above it
                rest = gguf_file_bytes(loaded) - sum(sizes[0] for sizes in out.values()) + aligned_bytes(1)
            del loaded
        return out, rest

    def assemble(self, lm: LoadedModel, choice: list[int] | tuple[int, ...]) -> LoadedModel:
        """A copy of ``lm`` whose layer ``k`` is entry ``choice[k]``'s compressed module from the
        database (the scored model itself, parts and exact sizes included)."""
        model = copy.deepcopy(lm.model)
        wanted: dict[str, list[str]] = {}
        for name, c in zip(self.layers, choice):
            wanted.setdefault(self.entries[c], []).append(name)
        for entry, names in wanted.items():
            source = load_checkpoint(self.checkpoint(entry)).model
            for name in names:
                parent, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, leaf, source.get_submodule(name))
            del source
        return dataclasses.replace(lm, model=model, info={**lm.info, "levels": str(self.path)})


def _check_index(index: Any, path: Path) -> dict[str, Any]:
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise SearchError(f"{path} is not a tensorpress level database (no {FORMAT} index)")
    if index.get("version") != VERSION:
        raise SearchError(f"{path}: level database version {index.get('version')!r}; this tensorpress reads version {VERSION}")
    if not isinstance(index.get("entries"), dict):
        raise SearchError(f"{path}: index has no entries table")
    return index


def _write_index(path: Path, index: dict[str, Any]) -> None:
    tmp = path / f".{INDEX}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=1, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path / INDEX)


def _folder(name: str, recipe: Recipe, inputs: str) -> str:
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '_', name)[:60]}-{recipe_key(recipe, inputs)}"


def build_levels(
    lm: LoadedModel,
    menu: dict[str, Recipe],
    calib: TokenWindows,
    path: str | os.PathLike,
    *,
    inputs: str = "compressed",
    batch_size: int = 8,
    on_entry: Any = None,
) -> LevelDB:
    """Compress ``lm`` once per menu entry into the database at ``path`` (created, or resumed:
    entries already built from the same recipe are kept, others rebuilt; a database of the
    other ``inputs`` is refused) and open it. ``on_entry(name, seconds, reused)`` is called after each entry."""
    if inputs not in INPUTS:
        raise SearchError(f"level inputs {inputs!r}: expected one of {', '.join(INPUTS)}")
    path = Path(path)
    model_id, calib_id = fingerprint(lm), windows_hash(calib)
    if (path / INDEX).is_file():
        index = _check_index(read_json(path / INDEX, MAX_INDEX_BYTES, "level index", CheckpointError), path)
        if index.get("fingerprint") != model_id:
            raise SearchError(f"{path} holds levels of another model ({index.get('model')!r}, different weights); "
                              "give a new database directory")
        if index.get("calibration_sha256") != calib_id:
            raise SearchError(f"{path} was built on other calibration windows ({index.get('calibration')!r}); "
                              f"this search uses {calib.describe()}: give a new database directory or the same --calib")
        other = sorted({e.get("inputs", "original") for e in index["entries"].values() if isinstance(e, dict)} - {inputs})
        if other:
            raise SearchError(f"{path} holds levels calibrated on {other[0]} inputs, this search asks for {inputs} ones; "
                              f"pass inputs {other[0]!r} (CLI: --level-inputs {other[0]}) or give a new database directory")
    elif path.exists() and any(path.iterdir()):
        raise SearchError(f"{path} exists and is not a level database; give an empty or new directory")
    else:
        path.mkdir(parents=True, exist_ok=True)
        index = {"format": FORMAT, "version": VERSION, "model": lm.spec, "fingerprint": model_id,
                 "calibration": calib.describe(), "calibration_sha256": calib_id, "entries": {}}
        _write_index(path, index)
    for name, recipe in menu.items():
        folder = _folder(name, recipe, inputs)
        done = index["entries"].get(name)
        if done is not None and done.get("checkpoint") == folder and (path / folder / "manifest.json").is_file():
            if on_entry:
                on_entry(name, done.get("seconds", 0.0), True)
            continue
        if done is not None:  # another recipe under this name: rebuilt
            shutil.rmtree(path / str(done.get("checkpoint", "")), ignore_errors=True)
        log.info("level database: compressing with %s", name)
        start = time.perf_counter()
        result = compress(lm, recipe.model_copy(update={"inputs": inputs}), calib, batch_size=batch_size)
        result.save(path / folder, overwrite=True)
        seconds = time.perf_counter() - start
        index["entries"][name] = {
            "recipe": recipe.to_dict(), "inputs": inputs, "checkpoint": folder, "seconds": seconds,
            "layers": {n: {"shape": list(r.shape), "bits": r.weight_bits, "output_error": r.output_error,
                           "weight_error": r.weight_error} for n, r in result.layers.items()},
        }
        _write_index(path, index)
        del result
        if on_entry:
            on_entry(name, seconds, False)
    return open_levels(path, list(menu), lm)


def open_levels(path: str | os.PathLike, entries: list[str] | None = None, lm: LoadedModel | None = None) -> LevelDB:
    """Open the database at ``path`` with ``entries`` (default: all, in index order); the
    layers are the block linears every entry compressed (an entry that missed one is an error)."""
    path = Path(path)
    if not (path / INDEX).is_file():
        raise SearchError(f"{path} is not a level database ({INDEX} is missing); build it with tensorpress search")
    index = _check_index(read_json(path / INDEX, MAX_INDEX_BYTES, "level index", CheckpointError), path)
    if lm is not None and index.get("fingerprint") != fingerprint(lm):
        raise SearchError(f"{path} holds levels of another model than {lm.spec!r}")
    entries = list(index["entries"]) if entries is None else entries
    missing = [e for e in entries if e not in index["entries"]]
    if missing:
        raise SearchError(f"{path} has no levels for {missing}; it has {list(index['entries'])}")
    if len(entries) < 2:
        raise SearchError(f"a search needs at least two menu entries, {path} gives {entries}")
    first = index["entries"][entries[0]]["layers"]
    layers = list(first)
    for entry in entries[1:]:
        other = index["entries"][entry]["layers"]
        if set(other) != set(layers):
            diff = sorted(set(layers) ^ set(other))[:5]
            raise SearchError(f"menu entries {entries[0]!r} and {entry!r} compress different layers (e.g. {diff}); "
                              "every entry must cover the same block linears")
    modes = {e: index["entries"][e].get("inputs", "original") for e in entries}
    if len(set(modes.values())) > 1 or not set(modes.values()) <= set(INPUTS):
        raise SearchError(f"{path}: the entries' levels come from different or unknown inputs ({modes}); "
                          f"a mix needs one of {', '.join(INPUTS)} for all")
    shapes = {n: tuple(first[n]["shape"]) for n in layers}
    levels = {n: [Level(e, int(index["entries"][e]["layers"][n]["bits"]), index["entries"][e]["layers"][n]["output_error"],
                        index["entries"][e]["layers"][n]["weight_error"]) for e in entries] for n in layers}
    return LevelDB(path, index, entries, layers, shapes, levels, modes[entries[0]])
