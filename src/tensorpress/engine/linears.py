"""The linear layers the engine can compress, whatever class implements them.

``nn.Linear`` stores its weight as ``(out, in)``; the ``Conv1D`` of GPT-2 stores ``(in, out)``
and computes ``x @ W + b``; an already ``CompressedLinear`` holds parts. These helpers give one
view of all three: the weight as float32 ``(out, in)`` and the bias.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from tensorpress.parts import CompressedLinear

LINEAR_TYPES = (nn.Linear, Conv1D, CompressedLinear)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, LINEAR_TYPES)


def weight_of(module: nn.Module) -> torch.Tensor:
    """Effective weight, float32 ``(out, in)`` (a copy, never a view of the module's storage)."""
    if isinstance(module, CompressedLinear):
        return module.dense()
    if isinstance(module, Conv1D):
        return module.weight.detach().T.float().clone()
    if isinstance(module, nn.Linear):
        return module.weight.detach().float().clone()
    raise TypeError(f"not a linear layer: {type(module).__name__}")


def bias_of(module: nn.Module) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    return None if bias is None else bias.detach()


def in_features(module: nn.Module) -> int:
    if isinstance(module, Conv1D):
        return module.weight.shape[0]
    return module.in_features


def out_features(module: nn.Module) -> int:
    if isinstance(module, Conv1D):
        return module.weight.shape[1]
    return module.out_features
