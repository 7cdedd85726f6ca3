"""Exact rewrites that move a per-channel scale from a group of linears into the module that
produces their input: ``y = W x = (W diag(s)) (x / s)``.

The producer can be a norm (its weight, and bias if any, divided by ``s``) or a plain linear
whose output rows are that input (rows and bias divided by ``s``; a ``CompressedLinear`` is
never rewritten). The adapter names the producer of each linear group.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from tensorpress.engine.linears import is_linear, out_features


def can_fold_into(producer: nn.Module, width: int) -> bool:
    """Whether ``producer``'s output channels (``width`` of them) can absorb a scale exactly."""
    if isinstance(producer, (nn.Linear, Conv1D)):
        return out_features(producer) == width
    if is_linear(producer):  # already compressed: its stored parts are not rewritten
        return False
    weight = getattr(producer, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.shape == (width,)


@torch.no_grad()
def fold_scale(producer: nn.Module, consumers: list[nn.Module], scale: torch.Tensor, norm_offset: float = 0.0) -> None:
    """Divide ``producer``'s outputs by ``scale`` and multiply the consumers' input columns by it.
    A norm whose weight acts as ``norm_offset + w`` (Gemma: ``1 + w``) gets
    ``w' = (norm_offset + w) / scale - norm_offset``."""
    if isinstance(producer, Conv1D):  # weight (in, out): output channels are columns
        producer.weight.div_(scale.to(producer.weight.dtype)[None, :])
    elif isinstance(producer, nn.Linear):
        producer.weight.div_(scale.to(producer.weight.dtype)[:, None])
    elif norm_offset:
        w = producer.weight
        w.copy_(((w.float() + norm_offset) / scale.float() - norm_offset).to(w.dtype))
    else:
        producer.weight.div_(scale.to(producer.weight.dtype))
    bias = getattr(producer, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.div_(scale.to(bias.dtype))
    for linear in consumers:
        if isinstance(linear, Conv1D):
            linear.weight.mul_(scale.to(linear.weight.dtype)[:, None])
        else:
            linear.weight.mul_(scale.to(linear.weight.dtype)[None, :])
