"""Structural methods: depth and width pruning that leave an ordinary, smaller model."""

from tensorpress.methods.structural.base import StructuralMethod, is_structural
from tensorpress.methods.structural.depth import DropBlocks
from tensorpress.methods.structural.slicegpt import SliceGPT
from tensorpress.methods.structural.vocab import TrimVocab
from tensorpress.methods.structural.width import PruneFFN, PruneHeads

__all__ = ["DropBlocks", "PruneFFN", "PruneHeads", "SliceGPT", "TrimVocab", "StructuralMethod", "is_structural"]
