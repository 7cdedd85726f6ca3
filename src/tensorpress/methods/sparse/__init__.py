"""Pruning methods (unstructured and N:M sparsity)."""

from tensorpress.methods.sparse.prune import Magnitude, SparseGPT, Wanda

__all__ = ["Magnitude", "SparseGPT", "Wanda"]
