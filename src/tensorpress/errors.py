"""Typed errors for user mistakes.

Every error raised because of what a user passed in (a path, a name, a recipe value, a
checkpoint) is a subclass of :class:`TensorpressError`. The message names the bad value and
what would be accepted; the CLI prints it on one line and exits non-zero.
"""

from __future__ import annotations


class TensorpressError(Exception):
    """Base class of all user-facing tensorpress errors."""


class ModelNotFoundError(TensorpressError):
    """A model path, hub id or built-in name that cannot be resolved."""


class UnsupportedArchitectureError(TensorpressError):
    """A model whose architecture has no adapter."""


class RecipeError(TensorpressError):
    """A recipe that does not parse or does not validate."""


class CalibrationError(TensorpressError):
    """Calibration or evaluation data that is missing, empty or too short."""


class InvalidWeightError(TensorpressError):
    """A weight that cannot be compressed (NaN, Inf, bad shape)."""


class CheckpointError(TensorpressError):
    """A checkpoint that is missing, corrupt, tampered with or from a newer format."""


class OutputExistsError(TensorpressError):
    """An output path that already exists and may not be overwritten."""


class ExportError(TensorpressError):
    """A model that the asked export format cannot represent."""


class MissingDependencyError(TensorpressError):
    """An optional package that a requested feature needs is not installed."""


class CodingError(TensorpressError):
    """Coded (lossless) data that is corrupt, truncated, or not in a format this version reads."""


class CacheConfigError(TensorpressError):
    """A KV cache asked for with an unknown name, bad settings, or settings beyond the model's limits."""


class ReportError(TensorpressError):
    """Runs, bench files or checkpoints a report cannot be made from (none readable, a bad output path)."""


class SearchError(TensorpressError):
    """A search asked for with an infeasible budget, an unknown menu entry, or a level database or
    search state that belongs to another model, calibration or menu."""
