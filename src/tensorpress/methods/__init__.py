"""The math of each method family; importing this package registers every method."""

from tensorpress.methods import lossless, lowrank, quant, sparse, structural  # noqa: F401  (registers the methods)
from tensorpress.methods.base import METHODS, LayerInput, MethodConfig, matches, register_method

__all__ = ["METHODS", "LayerInput", "MethodConfig", "matches", "register_method"]
