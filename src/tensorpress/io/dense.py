"""A compressed model as the plain ``transformers`` model it stands for: each
``CompressedLinear`` (and quantized embedding) replaced by the dense layer transformers builds
at its name. Shared by every export (``export``, ``hf_quant``) and by the cost measurements."""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from tensorpress.errors import ExportError
from tensorpress.models import LoadedModel
from tensorpress.parts import CompressedEmbedding, CompressedLinear, TiedHead


def source_classes(model: nn.Module) -> dict[str, type]:
    """The class transformers builds at each module name of ``model``'s architecture (what a
    ``CompressedLinear`` replaced: ``nn.Linear``, or GPT-2's ``Conv1D``), from a weightless
    instance of the same class and config."""
    with torch.device("meta"):
        reference = type(model)(copy.deepcopy(model.config))
    return {name: type(module) for name, module in reference.named_modules()}


def dense_copy(model: nn.Module, classes: dict[str, type] | None = None) -> nn.Module:
    """A copy of ``model`` with every ``CompressedLinear`` replaced by the layer transformers
    has there (``nn.Linear``; GPT-2's ``Conv1D``, which stores the weight transposed). The
    compressed layers themselves are not copied (nor their kernel caches): each maps straight
    to its dense replacement."""
    compressed = [(n, m) for n, m in model.named_modules() if isinstance(m, CompressedLinear)]
    if classes is None:  # (callers that already built them pass ``source_classes(model)``)
        classes = source_classes(model) if compressed else {}
    memo = {}
    for name, module in compressed:
        weight = module.dense()
        if isinstance(module, CompressedEmbedding):
            memo[id(module)] = _dense_embedding(module, weight, classes.get(name, nn.Embedding))
            continue
        if classes.get(name) is Conv1D:
            layer = Conv1D(module.out_features, module.in_features)
            layer.weight.data.copy_(weight.T)
            if module.bias is None:
                layer.bias = None
        else:
            layer = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            layer.weight.data.copy_(weight)
        if module.bias is not None:
            layer.bias.data.copy_(module.bias.float())
        memo[id(module)] = layer
    for module in model.modules():
        if isinstance(module, TiedHead) and id(module.table) in memo:  # tied again, to the dense table
            head = nn.Linear(module.in_features, module.out_features, bias=False)
            head.weight = memo[id(module.table)].weight
            memo[id(module)] = head
    return copy.deepcopy(model, memo)


def _dense_embedding(module: CompressedEmbedding, weight: torch.Tensor, cls: type) -> nn.Module:
    """The embedding transformers has where ``module`` is: ``nn.Embedding``, or a scaled
    embedding class (``embed_scale``: Gemma 3's), rebuilt with the factor ``module`` kept."""
    if module.scale is None:
        return nn.Embedding(module.num_embeddings, module.embedding_dim, module.padding_idx,
                            _weight=weight.to(module.out_dtype))
    try:
        layer = cls(module.num_embeddings, module.embedding_dim, module.padding_idx, embed_scale=module.scale)
    except TypeError as exc:
        raise ExportError(f"the scaled embedding class {cls.__name__} cannot be rebuilt with its scale ({exc})") from None
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer.to(module.out_dtype)


def check_loadable(lm: LoadedModel) -> None:
    """Refuse a model that plain transformers cannot rebuild from its config."""
    from tensorpress.methods.structural.depth import bridge_indices

    bridges = bridge_indices(lm.adapter.blocks(lm.model))
    if bridges:
        raise ExportError(f"{lm.spec}: blocks {bridges} are linear bridges (drop_blocks with "
                          "replace 'linear'), which plain transformers cannot load; save a tensorpress checkpoint instead, "
                          "or prune with replace 'none'")
