"""A GGUF file as a compressed model: its quantized tensors kept as ``BlockPart``s (the file's own
codes and scales, exact bits) instead of dequantized.

``tp.load_model("x.gguf")`` keeps meaning the uncompressed reference (transformers dequantizes
every tensor). ``tp.load_compressed("x.gguf")`` loads that model, then replaces each linear
whose tensor is in a block type tensorpress holds (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL,
Q2_K–Q6_K) by a ``CompressedLinear`` of one ``BlockPart`` decoded from the file's bytes — so a
file llama.cpp's own quantizer made can be evaluated against its reference, inspected and
re-exported. Each part must reproduce the weight transformers read, bit for bit (q/k rows of the
llama architecture put back in transformers' order first); a tensor that does not stays dense,
with a warning. Float tensors (and types tensorpress has no part for) stay dense.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from tensorpress.errors import CheckpointError
from tensorpress.io.gguf import ARCHITECTURES, T, rope_rows
from tensorpress.io.gguf_blocks import bit_equal, decode_blocks
from tensorpress.io.headers import gguf_header
from tensorpress.models import LoadedModel
from tensorpress.parts import BlockPart, CompressedEmbedding, CompressedLinear, TiedHead
from tensorpress.parts.block_math import FORMATS, BlockGrid
from tensorpress.parts.linear import embed_scale_of

log = logging.getLogger(__name__)


def is_gguf(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_file() and p.suffix.lower() == ".gguf"


def _rows(grid: BlockGrid, order: torch.Tensor) -> BlockGrid:
    def pick(t):
        return None if t is None else t[order].contiguous()

    return BlockGrid(grid.fmt, pick(grid.d), pick(grid.sc), pick(grid.m), pick(grid.mn))


def load_gguf_compressed(path: str | os.PathLike) -> LoadedModel:
    """The model of a GGUF file with its block-quantized linears as ``BlockPart``s."""
    from tensorpress.models import load_model

    path = Path(path)
    gguf_header(path)  # bounds and types first: the reader below trusts them
    lm = load_model(path)
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # noqa: BLE001 - a third-party parser of an untrusted file
        raise CheckpointError(f"{path}: cannot be read ({type(exc).__name__}: {str(exc)[:200]})") from None
    config = lm.model.config
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        log.warning("%s: a %s model; its tensors stay dense (block parts for %s)",
                    path, config.model_type, ", ".join(ARCHITECTURES))
        return lm
    names = gguf.get_tensor_name_map(arch.arch, config.num_hidden_layers)
    tensors = {t.name: t for t in reader.tensors}
    kept = dense = 0
    model = lm.model
    head = model.get_output_embeddings()
    table = model.get_input_embeddings()
    tied = head is not None and table is not None and getattr(head, "weight", None) is table.weight
    for module_name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear | nn.Embedding | Conv1D) or (tied and module is head):
            continue
        found = names.get_type_and_name(f"{module_name}.weight", try_suffixes=(".weight",))
        tensor = tensors.get(found[1]) if found else None
        if tensor is None:
            continue
        fmt = FORMATS.get(tensor.tensor_type.name.lower())
        if fmt is None:
            continue
        weight = module.weight.detach()
        if isinstance(module, Conv1D):  # GPT-2 keeps (in, out); the file holds (out, in)
            weight = weight.T
        shape = tuple(weight.shape)  # (out, in), and (vocab, dim) for the embeddings
        try:
            codes, grid = decode_blocks(np.asarray(tensor.data), fmt, shape)
            if arch.permute_qk and found[0] in (T.ATTN_Q, T.ATTN_K):
                heads = config.num_attention_heads if found[0] == T.ATTN_Q else config.num_key_value_heads
                order = torch.argsort(rope_rows(shape[0], heads))
                codes, grid = codes[order].contiguous(), _rows(grid, order)
            part = BlockPart(codes, grid)
        except ValueError as exc:
            raise CheckpointError(f"{path}: tensor {tensor.name} ({tensor.tensor_type.name}): {exc}") from None
        if not bit_equal(part.dense(), weight):
            log.warning("%s: %s does not decode to the weight transformers read; kept dense", path, tensor.name)
            dense += 1
            continue
        if isinstance(module, nn.Embedding):
            compressed = CompressedEmbedding([part], module.padding_idx, module.weight.dtype, embed_scale_of(module))
            model.set_submodule(module_name, compressed)
            if tied:  # llama.cpp's output reads token_embd: so does the head here
                name = next(n for n, m in model.named_modules() if m is head)
                model.set_submodule(name, TiedHead(compressed))
        else:
            bias = None if module.bias is None else module.bias.detach().clone()
            model.set_submodule(module_name, CompressedLinear([part], bias))
        kept += 1
    log.info("%s: %d tensors kept in their block types, %d dense", path, kept, dense)
    lm.info = {**lm.info, "source": "gguf-compressed"}
    return lm
