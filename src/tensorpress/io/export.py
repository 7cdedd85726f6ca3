"""Export to a plain Hugging Face model directory (``save_pretrained`` + tokenizer).

Structurally pruned models are ordinary ``transformers`` models and export as they are.
Compressed linears are materialised as dense ``nn.Linear`` weights (dequantized): the export
then loads anywhere, at the original size of those layers.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from tensorpress.errors import ExportError
from tensorpress.io.files import atomic_dir, check_output
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
            memo[id(module)] = nn.Embedding(module.num_embeddings, module.embedding_dim, module.padding_idx,
                                            _weight=weight.to(module.out_dtype))
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


def check_loadable(lm: LoadedModel) -> None:
    """Refuse a model that plain transformers cannot rebuild from its config."""
    from tensorpress.methods.structural.depth import bridge_indices

    bridges = bridge_indices(lm.adapter.blocks(lm.model))
    if bridges:
        raise ExportError(f"{lm.spec}: blocks {bridges} are linear bridges (drop_blocks with "
                          "replace 'linear'), which plain transformers cannot load; save a tensorpress checkpoint instead, "
                          "or prune with replace 'none'")


def export_hf(lm: LoadedModel, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``lm`` as a Hugging Face directory that ``from_pretrained`` loads (atomic)."""
    path = Path(path)
    check_output(path, overwrite)
    check_loadable(lm)
    model = dense_copy(lm.model)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    with atomic_dir(path, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
    return path


EXPORT_FORMATS = ("hf", "gguf", "compressed-tensors", "gptq")


def export(lm, path: str | os.PathLike, *, format: str = "hf", overwrite: bool = False,  # noqa: A002 - the CLI's name
           dtype: str | None = None, requantize: bool = False) -> Path:
    """Write ``lm`` (a ``LoadedModel`` or a ``CompressionResult``) in ``format``: ``"hf"`` a
    Hugging Face directory (compressed linears dequantized), ``"gguf"`` a llama.cpp file,
    ``"compressed-tensors"`` (vLLM, llm-compressor) or ``"gptq"`` a quantized Hugging Face
    directory; in the last three the quantized tensors hold tensorpress' codes and scales bit
    for bit. ``dtype``: the float type of everything else (f16 unless given; for the quantized
    directories also the type of the scales, which must hold them exactly), ``requantize``: see
    ``export_gguf``. Atomic: a failed export leaves nothing."""
    lm = getattr(lm, "model", lm) if not isinstance(lm, LoadedModel) else lm
    if not isinstance(lm, LoadedModel):
        raise ExportError(f"export takes a LoadedModel or a CompressionResult, not {type(lm).__name__}")
    if format == "hf":
        if dtype is not None or requantize:
            raise ExportError("dtype and requantize do not apply to format 'hf' (a dequantized directory at the "
                              "model's own type)")
        return export_hf(lm, path, overwrite=overwrite)
    if format == "gguf":
        from tensorpress.io.gguf import export_gguf

        return export_gguf(lm, path, dtype=dtype or "f16", overwrite=overwrite, requantize=requantize)
    if requantize:
        raise ExportError("requantize applies to format 'gguf' only")
    if format == "compressed-tensors":
        from tensorpress.io.ct_format import export_compressed_tensors

        return export_compressed_tensors(lm, path, dtype=dtype, overwrite=overwrite)
    if format == "gptq":
        from tensorpress.io.gptq_format import export_gptq

        return export_gptq(lm, path, dtype=dtype, overwrite=overwrite)
    raise ExportError(f"unknown export format {format!r}; accepted: {', '.join(EXPORT_FORMATS)}")
