"""A process-wide setting changed only through a context manager that restores it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Switch(Generic[T]):
    def __init__(self, default: T) -> None:
        self.value = default

    @contextlib.contextmanager
    def set(self, value: T) -> Iterator[None]:
        previous, self.value = self.value, value
        try:
            yield
        finally:
            self.value = previous
