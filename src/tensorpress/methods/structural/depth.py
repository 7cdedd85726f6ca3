"""``drop_blocks``: depth pruning — remove whole decoder blocks that change their input least.

A block's importance is the angular distance between the residual stream entering and leaving
it, ``arccos(cos(h_in, h_out)) / pi`` averaged over calibration tokens (ShortGPT's block
influence is ``1 - cos``, the same ranking). ``mode: individual`` removes the ``blocks`` least
important blocks; ``mode: consecutive`` removes the run of ``blocks`` consecutive blocks whose
ends are closest (Gromov et al.: ``h_l`` against ``h_{l+n}``). The last block is never removed
(the model's final hidden state is read after its final norm, so it has no comparable output).
The config's layer count (and per-layer lists such as ``layer_types``) and every attention
module's ``layer_idx`` are updated, so the KV cache and ``from_pretrained`` see a plain model.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from tensorpress.errors import RecipeError
from tensorpress.methods.base import register_method
from tensorpress.methods.structural.base import StructuralMethod
from tensorpress.progress import track


def block_distances(model: nn.Module, windows: torch.Tensor, batch_size: int, gap: int) -> list[float]:
    """Mean angular distance between the hidden states entering block ``i`` and block ``i + gap``
    (the final entry: the model's last hidden state), for every ``i``; accumulated batch by
    batch so only one batch's hidden states are held."""
    sums: list[float] = []
    tokens = 0
    with torch.inference_mode():
        for start in track(range(0, len(windows), batch_size), "measuring block distances",
                           total=-(-len(windows) // batch_size)):
            states = model(input_ids=windows[start:start + batch_size], output_hidden_states=True).hidden_states
            flat = [h.reshape(-1, h.shape[-1]).double() for h in states]
            pairs = len(flat) - gap
            if not sums:
                sums = [0.0] * pairs
            for i in range(pairs):
                cos = torch.nn.functional.cosine_similarity(flat[i], flat[i + gap], dim=-1).clamp(-1, 1)
                sums[i] += float(torch.arccos(cos).sum() / torch.pi)
            tokens += flat[0].shape[0]
    return [v / tokens for v in sums]


def remove_blocks(lm: Any, model: nn.Module, drop: list[int]) -> None:
    """Remove the blocks at ``drop`` (indices) from ``model`` and its config, in place."""
    path = lm.adapter.blocks_path(model)
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    blocks = lm.adapter.blocks(model)
    kept = [b for i, b in enumerate(blocks) if i not in set(drop)]
    setattr(parent, attr, nn.ModuleList(kept))
    for new_index, block in enumerate(kept):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    config = model.config
    old = config.num_hidden_layers
    config.num_hidden_layers = len(kept)
    for key, value in list(vars(config).items()):  # per-layer lists (layer_types, ...)
        if isinstance(value, list) and len(value) == old and key != "architectures":
            setattr(config, key, [v for i, v in enumerate(value) if i not in set(drop)])


@register_method
class DropBlocks(StructuralMethod):
    name: ClassVar[str] = "drop_blocks"
    summary: ClassVar[str] = "depth pruning: remove the blocks that change the residual stream least (angular distance)"
    needs: ClassVar[frozenset[str]] = frozenset({"act_sq"})  # marks the recipe as calibrated

    method: Literal["drop_blocks"] = "drop_blocks"
    blocks: int = Field(2, ge=1, description="number of blocks to remove")
    mode: Literal["individual", "consecutive"] = Field(
        "individual", description="individual = the least important blocks anywhere; consecutive = the best run of adjacent blocks"
    )

    def transform(self, lm: Any, model: nn.Module, calib: Any, batch_size: int) -> dict[str, Any]:
        n_blocks = len(lm.adapter.blocks(model))
        if self.blocks >= n_blocks:
            raise RecipeError(f"drop_blocks: cannot remove {self.blocks} of the model's {n_blocks} blocks (the last one stays)")
        windows = self.windows(calib).input_ids
        candidates = n_blocks - 1  # the last block's output is only seen after the final norm
        if self.mode == "individual":
            distance = block_distances(model, windows, batch_size, 1)
            scores = {i: distance[i] for i in range(candidates)}
            drop = sorted(sorted(scores, key=scores.get)[: self.blocks])
        else:
            if candidates - self.blocks + 1 < 1:
                raise RecipeError(f"drop_blocks: no run of {self.blocks} blocks fits before the last block")
            distance = block_distances(model, windows, batch_size, self.blocks)
            scores = {i: distance[i] for i in range(candidates - self.blocks + 1)}
            first = min(scores, key=scores.get)
            drop = list(range(first, first + self.blocks))
        remove_blocks(lm, model, drop)
        return {"removed_blocks": drop, "distances": {str(k): round(v, 5) for k, v in scores.items()}, "blocks_left": n_blocks - len(drop)}
