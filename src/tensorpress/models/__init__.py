"""Model loading and per-architecture adapters."""

from tensorpress.models.adapters import (
    ADAPTERS,
    Adapter,
    adapter_for,
    supported_model_types,
)
from tensorpress.models.loading import BUILTIN_MODELS, LoadedModel, load_model

__all__ = [
    "ADAPTERS",
    "BUILTIN_MODELS",
    "Adapter",
    "LoadedModel",
    "adapter_for",
    "load_model",
    "supported_model_types",
]
