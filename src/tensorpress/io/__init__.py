"""Checkpoint format and exports."""

from tensorpress.io.checkpoint import (
    FORMAT_VERSION,
    checkpoint_bytes,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
)

__all__ = ["FORMAT_VERSION", "checkpoint_bytes", "load_checkpoint", "read_manifest", "save_checkpoint"]
