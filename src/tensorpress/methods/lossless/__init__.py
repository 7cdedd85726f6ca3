"""Lossless recipe stages."""

from tensorpress.methods.lossless.entropy import EntropyCode

__all__ = ["EntropyCode"]
