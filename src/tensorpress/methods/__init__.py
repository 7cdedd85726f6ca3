"""The math of each method family; importing this package registers every method."""

from tensorpress.methods import quant  # noqa: F401  (registers rtn)
from tensorpress.methods.base import METHODS, LayerInput, MethodConfig, matches, register_method

__all__ = ["METHODS", "LayerInput", "MethodConfig", "matches", "register_method"]
