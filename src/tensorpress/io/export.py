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
