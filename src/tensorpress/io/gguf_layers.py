"""How each linear of a model becomes a ggml tensor for GGUF export (see ``io.gguf``).

A ``CompressedLinear`` of one ``BlockPart`` (a quantizer run with ``format:``) is already in a
llama.cpp type and is written as it is. One of one ``QuantizedPart`` is written in the first ggml block type that
holds its grid exactly (``gguf_blocks``): natively when that type's code width is at most the
grid's (Q4_0 for 4-bit symmetric grids, Q4_1 for 4-bit asymmetric ones whose minima are float16
numbers, Q8_0 for 8-bit symmetric ones), otherwise — wider, same weights — only with
``requantize``. Layers no type holds exactly are refused, or with ``requantize`` re-quantized to
Q8_0 by ``gguf.quants.quantize`` (llama.cpp's rounding), or written dequantized where their rows
are not a multiple of 32. Uncompressed weights are written at the export's float type.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType
from torch import nn

from tensorpress.errors import ExportError
from tensorpress.io.gguf_blocks import (
    BLOCK,
    CANDIDATES,
    CODE_BITS,
    Q8_0,
    BlockGrid,
    bit_equal,
    bits_per_weight,
    block_grid,
    decoded,
    encode,
    encode_blocks,
    holds,
)
from tensorpress.parts import BlockPart, CompressedLinear, QuantizedPart, SparsePart
from tensorpress.parts.dense import DensePart

log = logging.getLogger(__name__)

F32, F16, BF16 = GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16
_TORCH = {F32: torch.float32, F16: torch.float16, BF16: torch.bfloat16}


@dataclass(frozen=True)
class Choice:
    qtype: GGMLQuantizationType | None  # what is written (None: dequantized at dtype)
    exact: bool  # from the codes, bit for bit
    native: bool  # in the type of the grid's own width: written without requantize
    grid: BlockGrid | None = None
    why: str = ""  # why the layer has no type of its own
    blocks: BlockPart | None = None  # a part already in a llama.cpp format: written as it is


def described(layer: CompressedLinear) -> str:
    return " + ".join(p.describe() for p in layer.parts)


def choose(layer: CompressedLinear) -> Choice:
    """How ``layer`` can be written: the first block type that holds it exactly, else the
    re-quantization fallback (with why it has no type of its own)."""
    fallback = Q8_0 if layer.in_features % BLOCK == 0 else None
    parts = list(layer.parts)
    if len(parts) == 1 and isinstance(parts[0], BlockPart):
        qtype = GGMLQuantizationType[parts[0].fmt.name.upper()]
        return Choice(qtype, True, True, blocks=parts[0])
    if len(parts) != 1 or not isinstance(parts[0], QuantizedPart):
        why = "only a layer of one quantized part has a ggml block type"
        if any(isinstance(p, SparsePart) for p in parts):
            why += " (SpQR's outliers are a sparse part beside the grid, which llama.cpp has no tensor for)"
        return Choice(fallback, False, False, why=why)
    part = parts[0]
    grid = block_grid(part.codes, part.scales, part.grid.zero_points(), part.group_size)
    if grid is None:
        group = part.group_size or part.in_features
        return Choice(fallback, False, False, why=f"groups of {group} weights along rows of {part.in_features} "
                       "do not split into ggml's 32-weight blocks")
    qtype = next((t for t in CANDIDATES if holds(t, grid)), None)
    if qtype is None:
        offsets = grid.offsets
        return Choice(Q8_0, False, False, grid, f"its code - zero spans [{int(offsets.min())}, {int(offsets.max())}], "
                       "wider than Q8_0's int8")
    if CODE_BITS[qtype] <= part.bits:
        return Choice(qtype, True, True, grid)
    if part.bits == 4:
        why = ("a 4-bit asymmetric grid is Q4_1 only when every group's minimum -zero*scale is a float16 exactly, "
               "and here it is not")
    else:
        why = f"ggml has no {part.bits}-bit 32-weight block type"
    return Choice(qtype, True, False, grid, why)


def refusal(name: str, layer: CompressedLinear, choice: Choice, dtype: GGMLQuantizationType) -> str:
    """The ``ExportError`` message for a layer without an exact type of its own: the layer, its
    grid, why, the recipe settings that export exactly, and what ``requantize`` would do."""
    if choice.exact:
        instead = f"writes it exactly as {choice.qtype.name} ({bits_per_weight(choice.qtype):.1f} bits/weight)"
    elif choice.qtype is not None:
        instead = "re-quantizes it to Q8_0 with llama.cpp's rounding (8.5 bits/weight)"
    else:
        instead = f"writes it dequantized as {dtype.name}"
    return (f"{name} ({described(layer)}) has no exact llama.cpp type: {choice.why}. To export it exactly, "
            f"compress it with {_exportable_setting(layer)} in the recipe; or pass requantize=True "
            f"(CLI: --requantize), which {instead}")


def _exportable_setting(layer: CompressedLinear) -> str:
    """The quantizer settings nearest to ``layer``'s that give a grid with a ggml type of its own."""
    part = layer.parts[0]
    bits = 8 if isinstance(part, QuantizedPart) and len(layer.parts) == 1 and part.bits > 4 else 4
    group = getattr(part, "group_size", None)
    fits = group is not None and group % BLOCK == 0 and layer.in_features % BLOCK == 0
    groups = f"group_size: {group}" if fits else "group_size: 32, 64 or 128 (any multiple of 32)"
    return (f"one quantizer stage (rtn, gptq, awq) with `bits: {bits}, symmetric: true, {groups}` "
            f"({'Q4_0' if bits == 4 else 'Q8_0'})")


def dense_array(t: torch.Tensor, dtype: GGMLQuantizationType) -> tuple[np.ndarray, GGMLQuantizationType]:
    t = t.detach().to(_TORCH[dtype]).contiguous()
    if dtype == BF16:  # numpy has no bfloat16: the raw 2-byte words, as ggml stores them
        return t.view(torch.int16).numpy().view(np.uint8), dtype
    return t.numpy(), dtype


def _dense_only(layer: CompressedLinear) -> bool:
    return all(isinstance(p, DensePart) for p in layer.parts)


def plan_layers(model: nn.Module, dtype: GGMLQuantizationType, requantize: bool) -> dict[int, Choice]:
    """How each compressed layer will be written (keyed by module id); without ``requantize``,
    an ``ExportError`` for the layers that have no exact type of their own."""
    choices: dict[int, Choice] = {}
    refused: list[tuple[str, CompressedLinear, Choice]] = []
    for name, module in model.named_modules():
        if isinstance(module, CompressedLinear) and not _dense_only(module):
            choice = choices[id(module)] = choose(module)
            if not choice.native and not requantize:
                refused.append((name, module, choice))
    if refused:
        name, module, choice = refused[0]
        others = [n for n, _, _ in refused[1:]]
        more = ""
        if others:
            more = f" ({len(others)} more layers likewise: {', '.join(others[:3])}{', ...' if len(others) > 3 else ''})"
        raise ExportError(refusal(name, module, choice, dtype) + more)
    return choices


def encoded(name: str, layer: CompressedLinear, choice: Choice,
            dtype: GGMLQuantizationType) -> tuple[np.ndarray, GGMLQuantizationType, str | None]:
    """The ggml tensor of a compressed layer, and what became of it where that is not its own
    grid's type (for the log). Exact encodings are decoded again and compared bit for bit."""
    kinds = described(layer)
    if choice.exact:
        if choice.blocks is not None:
            data, _ = encode_blocks(choice.blocks.codes, choice.blocks.grid)
        else:
            data = encode(choice.qtype, choice.grid)
        if not bit_equal(decoded(data, choice.qtype), layer.dense()):
            raise ExportError(f"{name} ({kinds}): its {choice.qtype.name} encoding does not decode to the "
                              "layer's weights bit for bit; not written")
        widened = f"({kinds}) written exactly as {choice.qtype.name} ({bits_per_weight(choice.qtype):g} bits/weight)"
        return data, choice.qtype, None if choice.native else widened
    weight = layer.dense()
    if choice.qtype is None:
        return *dense_array(weight, dtype), f"({kinds}) have no ggml block type: written dequantized as {dtype.name}"
    data = gguf.quants.quantize(weight.numpy(), Q8_0)
    error = float((decoded(data, Q8_0) - weight).norm() / weight.norm().clamp(min=1e-30))
    log.info("%s (%s): re-quantized to Q8_0, relative error %.2e", name, kinds, error)
    return data, Q8_0, f"({kinds}) re-quantized to Q8_0 by llama.cpp's rounding (8.5 bits/weight, not exact)"


def requantized_weights(model: nn.Module, dtype: GGMLQuantizationType) -> dict[str, torch.Tensor]:
    """``{module name: float32 (out, in) weight}`` as llama.cpp will hold it, for the layers
    ``requantize`` changes (re-quantized to Q8_0, or written dequantized at ``dtype``); layers
    written exactly, widened or not, are left out. What a GGUF export with ``requantize`` costs
    is the difference between ``model`` and ``model`` with these weights."""
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, CompressedLinear) or _dense_only(module):
            continue
        choice = choose(module)
        if choice.exact:
            continue
        if choice.qtype is None:
            out[name] = module.dense().to(_TORCH[dtype]).float()
        else:
            out[name] = decoded(gguf.quants.quantize(module.dense().numpy(), choice.qtype), choice.qtype)
    return out
