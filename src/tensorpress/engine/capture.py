"""The first block's inputs for each calibration batch, and a block run on them: how the engine
(and the structural transforms) walk a model block by block."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache

from tensorpress.data import TokenWindows
from tensorpress.engine.lockstep import BlockCall
from tensorpress.models import LoadedModel


def _strip_caches(value: Any) -> Any:
    return None if isinstance(value, Cache) else value


def capture_block_inputs(lm: LoadedModel, model: nn.Module, windows: TokenWindows, batch_size: int) -> list[BlockCall]:
    """Inputs of the first block for each batch of windows.

    The block list is swapped for a list holding only the first block, so the base model runs
    its embeddings, that one block and its final norm; a pre-hook records the block's call.
    """
    adapter = lm.adapter
    blocks_path = adapter.blocks_path(model)
    parent_path, _, attr = blocks_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    blocks = adapter.blocks(model)
    base = adapter.base(model)
    calls: list[BlockCall] = []

    def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kwargs = {k: _strip_caches(v) for k, v in kwargs.items()}
        hidden = args[0] if args else kwargs.pop("hidden_states")
        calls.append((hidden.detach(), tuple(_strip_caches(a) for a in args[1:]), kwargs))

    call_kwargs = {"use_cache": False} if "use_cache" in inspect.signature(base.forward).parameters else {}
    handle = blocks[0].register_forward_pre_hook(record, with_kwargs=True)
    setattr(parent, attr, nn.ModuleList([blocks[0]]))
    try:
        with torch.inference_mode():
            for batch in windows.batches(batch_size):
                base(input_ids=batch.to(device_of(model)), **call_kwargs)
    finally:
        setattr(parent, attr, blocks)
        handle.remove()
    return calls


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def run_block(block: nn.Module, calls: list[BlockCall]) -> list[BlockCall]:
    """Run a block on every captured call; the outputs become the next block's hidden states."""
    outputs = []
    with torch.inference_mode():
        for hidden, args, kwargs in calls:
            out = block(hidden, *args, **kwargs)
            out = out[0] if isinstance(out, tuple) else out
            outputs.append((out, args, kwargs))
    return outputs
