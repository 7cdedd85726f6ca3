"""Export to a plain Hugging Face model directory (``save_pretrained`` + tokenizer).

Structurally pruned models are ordinary ``transformers`` models and export as they are.
Compressed linears are materialised as dense ``nn.Linear`` weights (dequantized): the export
then loads anywhere, at the original size of those layers.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

from torch import nn

from tensorpress.errors import ExportError
from tensorpress.io.files import atomic_dir, check_output
from tensorpress.models import LoadedModel
from tensorpress.parts import CompressedLinear


def dense_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ``CompressedLinear`` replaced by an ``nn.Linear``."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, CompressedLinear):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight.data.copy_(module.dense())
            if module.bias is not None:
                linear.bias.data.copy_(module.bias.float())
            model.set_submodule(name, linear)
    return model


def export_hf(lm: LoadedModel, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``lm`` as a Hugging Face directory that ``from_pretrained`` loads (atomic)."""
    path = Path(path)
    check_output(path, overwrite)
    from tensorpress.methods.structural.depth import bridge_indices

    bridges = bridge_indices(lm.adapter.blocks(lm.model))
    if bridges:
        raise ExportError(f"{lm.spec}: blocks {bridges} are linear bridges (drop_blocks with "
                          "replace 'linear'), which plain transformers cannot load; save a tensorpress checkpoint instead, "
                          "or prune with replace 'none'")
    model = dense_copy(lm.model)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    with atomic_dir(path, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
    return path


EXPORT_FORMATS = ("hf", "gguf")


def export(lm, path: str | os.PathLike, *, format: str = "hf", overwrite: bool = False,  # noqa: A002 - the CLI's name
           dtype: str | None = None, requantize: bool = False) -> Path:
    """Write ``lm`` (a ``LoadedModel`` or a ``CompressionResult``) in ``format``: ``"hf"`` a
    Hugging Face directory (compressed linears dequantized), ``"gguf"`` a llama.cpp file whose
    quantized tensors hold tensorpress' codes bit for bit (``dtype``: the type of uncompressed
    weights, ``requantize``: see ``export_gguf``). Atomic: a failed export leaves nothing."""
    lm = getattr(lm, "model", lm) if not isinstance(lm, LoadedModel) else lm
    if not isinstance(lm, LoadedModel):
        raise ExportError(f"export takes a LoadedModel or a CompressionResult, not {type(lm).__name__}")
    if format == "hf":
        if dtype is not None or requantize:
            raise ExportError("dtype and requantize apply to format 'gguf' only")
        return export_hf(lm, path, overwrite=overwrite)
    if format == "gguf":
        from tensorpress.io.gguf import export_gguf

        return export_gguf(lm, path, dtype=dtype or "f16", overwrite=overwrite, requantize=requantize)
    raise ExportError(f"unknown export format {format!r}; accepted: {', '.join(EXPORT_FORMATS)} "
                      "(compressed-tensors and gptq checkpoints are not written yet)")
