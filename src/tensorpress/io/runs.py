"""Run directories: what ``tensorpress compress`` and ``eval`` measured, one folder per run,
for ``tensorpress report`` to read back.

A run is a folder ``<runs>/<UTC time>-<kind>-<label>/`` holding ``run.json``: the format name
and version, the kind of run, the command line, the machine, the time, and the figures (the
compression result with its per-layer bits and errors, the evaluation report, task results).
It is written through a temporary file and an atomic rename, so a reader sees a whole file or
none. The file is untrusted input when read: JSON only, its format and version checked, every
field the report uses checked for type there.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import sys
from pathlib import Path
from typing import Any

from tensorpress import __version__
from tensorpress.errors import CheckpointError
from tensorpress.io.files import read_json

RUN_FORMAT = "tensorpress-run"
RUN_VERSION = 1
RUN_FILE = "run.json"
MAX_RUN_BYTES = 64 << 20  # a run file is figures, not tensors
RUNS_ENV = "TENSORPRESS_RUNS"  # default folder of run directories (the CLI's --runs)


class RunFormatError(CheckpointError):
    """A run file that is not JSON, not a run, or from a format version this tensorpress does not read."""


def machine() -> dict[str, Any]:
    """What the figures were measured on (timings are only as quiet as the machine)."""
    import torch

    load = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    return {"processor": platform.processor() or platform.machine(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "tensorpress": __version__, "load_avg": load}


def _finite(value: Any) -> Any:
    """JSON-safe figures: NaN and infinities (a bits/weight of nothing) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _label(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:60] or "run"


def record_run(runs: str | os.PathLike, kind: str, label: str, payload: dict[str, Any],
               command: list[str] | None = None) -> Path:
    """Write a new run directory under ``runs`` and return it; ``payload`` holds the figures."""
    now = datetime.datetime.now(datetime.timezone.utc)
    root = Path(runs)
    root.mkdir(parents=True, exist_ok=True)
    base = f"{now.strftime('%Y%m%d-%H%M%S')}-{_label(kind)}-{_label(label)}"
    folder, n = root / base, 1
    while True:
        try:
            folder.mkdir()
            break
        except FileExistsError:
            n += 1
            folder = root / f"{base}-{n}"
    record = {"format": RUN_FORMAT, "version": RUN_VERSION, "kind": kind, "label": label,
              "created": now.isoformat(timespec="seconds"),
              "command": list(sys.argv if command is None else command), "machine": machine(), **payload}
    tmp = folder / f".{RUN_FILE}.tmp"
    tmp.write_text(json.dumps(_finite(record), indent=1, allow_nan=False, default=str) + "\n", encoding="utf-8")
    tmp.replace(folder / RUN_FILE)
    return folder


def is_run(path: Path) -> bool:
    return path.is_dir() and (path / RUN_FILE).is_file()


def read_run(path: str | os.PathLike) -> dict[str, Any]:
    """The record of run directory ``path``; ``RunFormatError`` for anything but a run of a
    version this tensorpress reads."""
    file = Path(path) / RUN_FILE
    if not file.is_file():
        raise RunFormatError(f"{path} is not a run directory: {RUN_FILE} is missing")
    record = read_json(file, MAX_RUN_BYTES, "run file", RunFormatError)
    if not isinstance(record, dict) or record.get("format") != RUN_FORMAT:
        raise RunFormatError(f"{file} is not a tensorpress run (format {record.get('format') if isinstance(record, dict) else None!r})")
    version = record.get("version")
    if not isinstance(version, int) or version != RUN_VERSION:
        raise RunFormatError(f"{file}: run format version {version!r}; this tensorpress ({__version__}) reads "
                             f"version {RUN_VERSION} (re-run the command with this version to record it again)")
    return record
