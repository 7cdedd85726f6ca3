"""Finding the package's compiled C libraries (built by ``setup.py``, loaded with ctypes)."""

from __future__ import annotations

import ctypes
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path


def find_library(directory: Path, name: str) -> ctypes.CDLL | None:
    """The compiled library ``name`` (e.g. ``_rans``) next to the module in ``directory``, or
    ``None`` when this install has none (built without a C compiler)."""
    candidates = [directory / f"{name}{suffix}" for suffix in EXTENSION_SUFFIXES]
    found = next((c for c in candidates if c.is_file()), None)
    return None if found is None else ctypes.CDLL(str(found))


def looked_for(name: str) -> list[str]:
    """The file names ``find_library`` tries, for error messages."""
    return [f"{name}{suffix}" for suffix in EXTENSION_SUFFIXES]
