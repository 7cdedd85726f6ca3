"""What the quantized Hugging Face checkpoint exports share (``ct_format``, ``gptq_format``).

Both write a ``from_pretrained`` directory: ``config.json`` with a ``quantization_config``, the
tokenizer, and one ``model.safetensors`` in which each quantized linear's ``weight`` is replaced
by its format's packed integer tensors, everything else at the export's float type.

``plan`` decides, per compressed linear, whether its weight goes out as integer codes
(``int_grid.integer_grid`` found its grid and the format accepts it) or dense; a layer that
compresses its weight in a way the format cannot hold is an ``ExportError`` naming it, unless it
holds no quantized codes at all (pruned, low-rank, ...: written dense at the float type, exact,
logged). Scales are stored at the export's float type, as both formats' loaders expect, and only
where that type holds every scale exactly.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from tensorpress.errors import ExportError
from tensorpress.io.files import atomic_dir
from tensorpress.io.int_grid import IntGrid, integer_grid
from tensorpress.models import LoadedModel
from tensorpress.parts import (
    BlockPart,
    CompressedEmbedding,
    CompressedLinear,
    QuantizedPart,
)

log = logging.getLogger(__name__)

DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}


@dataclass(frozen=True)
class Planned:
    """The layers written as integer codes, by module name; the rest is written dense."""

    grids: dict[str, IntGrid]
    dense: list[str]  # compressed linears without codes of their own (pruned, low-rank, ...)
    plain: list[str]  # linears tensorpress left uncompressed
    head: str | None  # the output head's module name
    classes: dict[str, type]  # transformers' module class at each name (``dense.source_classes``)


def float_dtype(dtype: str | None) -> torch.dtype:
    try:
        return DTYPES[dtype or "f16"]
    except KeyError:
        raise ExportError(f"unknown dtype {dtype!r}; accepted: {', '.join(DTYPES)}") from None


def plan(lm: LoadedModel, fmt: str, dtype: torch.dtype, accepts: Callable[[IntGrid], str | None]) -> Planned:
    """Which linears of ``lm`` go out as codes. ``accepts(grid)`` returns why the format cannot
    hold that grid (None when it can). Refusals name the layer, why, and what would work."""
    from tensorpress.io.dense import source_classes

    if lm.adapter.moe is not None:
        raise ExportError(f"{lm.spec}: {fmt} export of mixture-of-experts models ({lm.adapter.family}) is not supported: "
                          "transformers keeps their experts as fused 3-D tensors, which this format's quantized "
                          "loaders do not take per expert; export as hf (dequantized) or keep the tensorpress checkpoint")
    classes = source_classes(lm.model)
    grids, dense, plain = {}, [], []
    for name, module in lm.model.named_modules():
        if isinstance(module, nn.Linear):
            plain.append(name)
        if not isinstance(module, CompressedLinear):
            continue
        if isinstance(module, CompressedEmbedding):  # neither format's loaders quantize embedding tables
            log.warning("%s: the quantized embedding table is written dense at the export's float type", name)
            continue
        coded = any(isinstance(p, QuantizedPart | BlockPart) for p in module.parts)
        grid = integer_grid(module)
        why = grid if isinstance(grid, str) else accepts(grid)
        if why is None and classes.get(name) is not nn.Linear:
            cls = classes.get(name)
            why = f"transformers builds a {getattr(cls, '__name__', 'different module')} there, not the nn.Linear the format quantizes"
        if why is None and dtype != torch.float32 and grid.scales_as(dtype) is None:
            why = (f"its scales are not all {str(dtype).removeprefix('torch.')} numbers (a {dtype_name(dtype)} export "
                   "would round them); export with dtype f32 (CLI: --dtype f32)"
                   + ("" if dtype == torch.bfloat16 else ", whose scales are exact"))
        if why is None:
            grids[name] = grid
        elif coded:
            kinds = " + ".join(p.describe() for p in module.parts)
            raise ExportError(f"{name} ({kinds}) cannot be written as a {fmt} checkpoint: {why}. Export it as gguf, "
                              "or as hf (dequantized), or compress it with one quantizer stage (rtn, gptq, awq) "
                              "whose grid the format holds")
        else:
            dense.append(name)
    if not grids:
        raise ExportError(f"{lm.spec}: no layer is quantized, so a {fmt} checkpoint would hold nothing quantized; "
                          "export it as hf instead")
    if dense:
        log.warning("%d compressed layers hold no integer codes and are written dense (exact, at full size): %s",
                    len(dense), ", ".join(dense[:4]) + (", ..." if len(dense) > 4 else ""))
    head = lm.model.get_output_embeddings()
    return Planned(grids, dense, plain, next((n for n, m in lm.model.named_modules() if m is head), None), classes)


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def write_checkpoint(lm: LoadedModel, path: Path, *, overwrite: bool, dtype: torch.dtype,
                     quantized: dict[str, dict[str, torch.Tensor]], quantization_config: dict,
                     classes: dict[str, type], extra_files: dict[str, dict] | None = None) -> Path:
    """Write ``lm`` as a ``from_pretrained`` directory in which the linears named in
    ``quantized`` hold the given tensors (``{name}.{key}``) instead of their ``weight``; every
    other tensor at ``dtype``. Atomic: a failed export leaves nothing."""
    from tensorpress.io.dense import check_loadable, dense_copy

    check_loadable(lm)
    model = dense_copy(lm.model, classes)
    state: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for key, tensor in model.state_dict().items():
        module = key.rsplit(".", 1)[0]
        if module in quantized and key.endswith(".weight"):
            continue
        ptr = tensor.data_ptr()
        if ptr in seen:  # a tied weight: stored once, as transformers saves it
            continue
        seen[ptr] = key
        state[key] = (tensor.to(dtype) if tensor.is_floating_point() else tensor).contiguous()
    _check_tied(model, quantized)
    for module, tensors in quantized.items():
        for key, tensor in tensors.items():
            state[f"{module}.{key}"] = tensor.contiguous()
    config = model.config
    config.quantization_config = quantization_config
    config.dtype = dtype
    with atomic_dir(path, overwrite=overwrite) as tmp:
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name, data in (extra_files or {}).items():
            (tmp / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


def _check_tied(model: nn.Module, quantized: dict[str, dict]) -> None:
    """A tied output head that is quantized while the embeddings are not would be re-tied to
    the embeddings by ``from_pretrained``: refuse instead of writing a file that loads wrong."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return
    head = model.get_output_embeddings()
    name = next((n for n, m in model.named_modules() if m is head), None)
    if name in quantized:
        raise ExportError(f"{name} is quantized but tied to the input embeddings (tie_word_embeddings), which "
                          "transformers would load in its place; leave the head uncompressed")
