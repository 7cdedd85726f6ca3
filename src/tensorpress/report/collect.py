"""What a report is made of: every run, checkpoint and bench file named on the command line, read
into one shape (:class:`Entry`), and the problems met on the way (a run from an older format, a
file that is no result), which the report lists instead of stopping.

Accepted inputs:

- a run directory (``run.json``, written by ``tensorpress compress`` / ``eval``), or a folder of them;
- a tensorpress checkpoint (``manifest.json``): size and per-layer bits and errors, no quality;
- ``bench/quality.py`` JSON (one entry per row) and ``bench/kv.py ppl`` JSON (KV-cache rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tensorpress.errors import CheckpointError
from tensorpress.io.files import read_json
from tensorpress.io.runs import MAX_RUN_BYTES, RunFormatError, is_run, read_run


@dataclass
class Layer:
    name: str
    bits_per_weight: float
    output_error: float | None = None  # relative, on the calibration inputs
    weight_error: float | None = None


@dataclass
class Entry:
    """One compressed (or reference) model as the report shows it."""

    label: str
    source: str  # the file or folder it was read from
    kind: str  # compress, eval, checkpoint, bench-quality
    model: str | None = None
    recipe: str | None = None
    bits_per_weight: float | None = None  # of the compressed linears
    bits_per_weight_model: float | None = None  # of every parameter
    model_mb: float | None = None  # exact storage, 10^6 bytes
    perplexity: float | None = None
    reference_perplexity: float | None = None
    kl: float | None = None
    top1: float | None = None
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> acc, acc_norm, flips, n, ...
    # a search run: (generation, pool KL of the parent) and the seed the search started from
    search: list[tuple[int, float]] = field(default_factory=list)
    search_seed: tuple[str, float] | None = None
    layers: list[Layer] = field(default_factory=list)
    protocol: str = ""
    machine: str = ""
    command: str = ""
    created: str = ""

    @property
    def mean_acc(self) -> float | None:
        accs = [t["acc"] for t in self.tasks.values() if _num(t.get("acc")) is not None]
        return sum(accs) / len(accs) if accs else None

    @property
    def mean_flips(self) -> float | None:
        flips = [t["flips"] for t in self.tasks.values() if _num(t.get("flips")) is not None]
        return sum(flips) / len(flips) if flips else None


@dataclass
class KvRow:
    method: str
    ratio: float  # bytes of the full 16-bit cache over this cache's
    perplexity: float | None
    kl: float | None
    top1: float | None
    source: str


@dataclass
class Collection:
    entries: list[Entry] = field(default_factory=list)
    kv: list[KvRow] = field(default_factory=list)
    kv_protocol: str = ""
    problems: list[str] = field(default_factory=list)


def _num(value: Any) -> float | None:
    """A finite number from untrusted JSON, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items() if not isinstance(v, (dict, list)))
    return str(value)


def _machine_text(m: Any) -> str:
    if not isinstance(m, dict):
        return _text(m)
    parts = [str(m.get("processor", "")), f"{m.get('cpu_count')} CPUs" if m.get("cpu_count") else "",
             f"torch {m['torch']} ({m.get('torch_threads')} threads)" if m.get("torch") else "",
             str(m.get("platform", "")),
             f"load {m.get('load_avg') or m.get('load_avg_at_start')}" if (m.get("load_avg") or m.get("load_avg_at_start")) else ""]
    return ", ".join(p for p in parts if p)


def _tasks(raw: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(raw, dict):
        return {}
    out = {}
    for name, fig in raw.items():
        if isinstance(fig, dict) and _num(fig.get("acc")) is not None:
            out[str(name)] = {k: _num(v) if k != "task" else v for k, v in fig.items()}
    return out


def _layers(layers: Any, errors: Any) -> list[Layer]:
    """Per-layer bits from a manifest's or result's ``layers`` (shape, weight_bits) and errors
    from the result's own fields or a manifest's ``layer_errors``."""
    if not isinstance(layers, dict):
        return []
    errors = errors if isinstance(errors, dict) else {}
    out = []
    for name, e in layers.items():
        if not isinstance(e, dict):
            continue
        shape, bits = e.get("shape"), _num(e.get("weight_bits"))
        if not (isinstance(shape, list) and len(shape) == 2 and all(_num(s) for s in shape)) or bits is None:
            continue
        err = errors.get(name) if isinstance(errors.get(name), dict) else {}
        out.append(Layer(str(name), bits / (shape[0] * shape[1]),
                         _num(e.get("output_error", err.get("output"))), _num(e.get("weight_error", err.get("weight")))))
    return out


def _evaluation(entry: Entry, ev: Any) -> None:
    if not isinstance(ev, dict):
        return
    entry.perplexity, entry.reference_perplexity = _num(ev.get("perplexity")), _num(ev.get("reference_perplexity"))
    entry.kl, entry.top1 = _num(ev.get("kl")), _num(ev.get("top1_agreement"))
    entry.bits_per_weight = _num(ev.get("bits_per_weight_linears")) or entry.bits_per_weight
    entry.bits_per_weight_model = _num(ev.get("bits_per_weight_model"))
    mb = _num(ev.get("model_bytes"))
    entry.model_mb = mb / 1e6 if mb is not None else None
    if not entry.protocol and ev.get("data"):
        entry.protocol = f"{ev.get('windows')} windows x {ev.get('seq_len')} tokens of {ev.get('data')}"


def _from_run(folder: Path) -> Entry:
    record = read_run(folder)
    kind = str(record.get("kind", "run"))
    comp = record.get("compression") if isinstance(record.get("compression"), dict) else {}
    recipe = comp.get("recipe", {}).get("name") if isinstance(comp.get("recipe"), dict) else record.get("recipe")
    entry = Entry(label=str(record.get("label") or folder.name), source=str(folder), kind=kind,
                  model=_text(record.get("model") or comp.get("base_model")) or None, recipe=_text(recipe) or None,
                  bits_per_weight=_num(comp.get("bits_per_weight")), command=_text(record.get("command")),
                  machine=_machine_text(record.get("machine")), created=_text(record.get("created")),
                  protocol=_text(record.get("protocol")))
    _evaluation(entry, record.get("evaluation"))
    entry.tasks = _tasks(record.get("tasks"))
    entry.layers = _layers(comp.get("layers") or record.get("layers"), record.get("layer_errors"))
    _search(entry, record.get("search"))
    return entry


def _search(entry: Entry, found: Any) -> None:
    """The fitness per generation of a search run, from untrusted JSON (bad rows skipped)."""
    if not isinstance(found, dict):
        return
    rows = found.get("generations") if isinstance(found.get("generations"), list) else []
    for row in rows:
        if isinstance(row, dict) and isinstance(row.get("generation"), int) and _num(row.get("fitness")) is not None:
            entry.search.append((row["generation"], _num(row["fitness"])))
    seeds = found.get("seeds_kl") if isinstance(found.get("seeds_kl"), dict) else {}
    name = _text(found.get("seed"))
    if name in seeds and _num(seeds[name]) is not None:
        entry.search_seed = (name, _num(seeds[name]))


def _from_checkpoint(folder: Path) -> Entry:
    from tensorpress.io import read_manifest

    manifest = read_manifest(folder)
    layers = _layers(manifest.get("layers"), manifest.get("layer_errors"))
    raw = manifest.get("layers") if isinstance(manifest.get("layers"), dict) else {}
    # _layers kept the entries with a valid shape and bit count: the totals are theirs
    numel = sum(raw[layer.name]["shape"][0] * raw[layer.name]["shape"][1] for layer in layers)
    bits = sum(raw[layer.name]["weight_bits"] for layer in layers)
    recipe = manifest.get("recipe") if isinstance(manifest.get("recipe"), dict) else {}
    return Entry(label=folder.name, source=str(folder), kind="checkpoint", model=_text(manifest.get("base_model")),
                 recipe=_text(recipe.get("name")) or None, bits_per_weight=bits / numel if numel else None,
                 layers=layers, created=_text(manifest.get("created")),
                 protocol=f"calibration: {_text(manifest.get('calibration')) or 'none'}")


def _from_json(file: Path, found: Collection) -> None:
    data = read_json(file, MAX_RUN_BYTES, "result file", RunFormatError)
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise RunFormatError(f"{file}: not a bench result (no 'rows' list); the report reads run directories, "
                             "checkpoints and the JSON of bench/quality.py and bench/kv.py")
    command, mach = _text(data.get("command")), _machine_text(data.get("machine"))
    proto = data.get("protocol") if isinstance(data.get("protocol"), dict) else {}
    if data.get("section") == "ppl":  # bench/kv.py ppl
        found.kv_protocol = (f"{proto.get('windows')} windows x {proto.get('context')} tokens of {proto.get('data')}, "
                             f"reference {proto.get('reference')}; {command}; {mach}")
        for row in data["rows"]:
            if isinstance(row, dict) and _num(row.get("ratio_vs_full")) is not None:
                found.kv.append(KvRow(str(row.get("method")), _num(row["ratio_vs_full"]), _num(row.get("perplexity")),
                                      _num(row.get("kl")), _num(row.get("top1_agreement")), str(file)))
        return
    if "section" in data:
        raise RunFormatError(f"{file}: bench/kv.py section {data['section']!r} holds no quality figures (the report reads 'ppl')")
    protocol = (f"{proto.get('name', '')} {proto.get('eval_windows')} windows x {proto.get('seq_len')} tokens of "
                f"{proto.get('data')}; calibration {_text(proto.get('calibration'))}").strip()
    model = _text(proto.get("model")) or None
    for row in data["rows"]:
        if not isinstance(row, dict) or not isinstance(row.get("method"), str):
            continue
        entry = Entry(label=row["method"], source=str(file), kind="bench-quality", model=model,
                      recipe=None if row["method"] == "uncompressed" else row["method"], protocol=protocol,
                      command=command, machine=mach, created=_text(data.get("date")))
        _evaluation(entry, row)
        entry.tasks = _tasks(row.get("tasks"))
        found.entries.append(entry)


def collect(paths: list[str | Path]) -> Collection:
    """Read every path; a path that cannot be read becomes a line in ``problems``."""
    found = Collection()
    for raw in paths:
        path = Path(raw)
        try:
            if is_run(path):
                found.entries.append(_from_run(path))
            elif path.is_dir() and (path / "manifest.json").is_file():
                found.entries.append(_from_checkpoint(path))
            elif path.is_dir():
                subs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
                if not subs:
                    found.problems.append(f"{path}: an empty folder (no run directories, no checkpoint)")
                for sub in subs:
                    if is_run(sub) or (sub / "manifest.json").is_file():
                        found_sub = collect([sub])
                        found.entries += found_sub.entries
                        found.problems += found_sub.problems
                    else:
                        found.problems.append(f"{sub}: neither a run directory ({'run.json'}) nor a checkpoint")
            elif path.is_file() and path.suffix == ".json":
                _from_json(path, found)
            elif not path.exists():
                found.problems.append(f"{path}: no such file or folder")
            else:
                found.problems.append(f"{path}: not a run directory, checkpoint or bench JSON file")
        except CheckpointError as exc:  # RunFormatError, or a checkpoint that fails its checks
            found.problems.append(str(exc))
    return found
