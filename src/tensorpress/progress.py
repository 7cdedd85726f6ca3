"""Progress bars for long work, shown with rich on a terminal and silent elsewhere.

Library code reports progress through :func:`track`; whether bars are drawn is decided by
:func:`progress_bars` (a context manager, so the previous setting always comes back) and by
whether stderr is a terminal.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tensorpress.switch import Switch

T = TypeVar("T")

_BARS: Switch[bool | None] = Switch(None)  # None: draw bars when stderr is a terminal


def progress_bars(enabled: bool | None):
    """Context manager: draw progress bars (True), never (False), or on a terminal (None)."""
    return _BARS.set(enabled)


def _active() -> bool:
    return sys.stderr.isatty() if _BARS.value is None else _BARS.value


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    if not _active():
        yield from items
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        yield from bar.track(items, total=total, description=description)
