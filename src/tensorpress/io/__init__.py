"""Checkpoint format and exports."""

from tensorpress.io.checkpoint import (
    FORMAT_VERSION,
    checkpoint_bytes,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
    verify,
)
from tensorpress.io.export import export, export_hf

__all__ = ["FORMAT_VERSION", "checkpoint_bytes", "export", "export_hf", "load_checkpoint", "read_manifest", "save_checkpoint", "verify"]
