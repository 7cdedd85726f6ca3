"""``drop_blocks``: depth pruning — remove whole decoder blocks that change their input least.

A block's importance is the angular distance between the residual stream entering and leaving
it, ``arccos(cos(h_in, h_out)) / pi`` averaged over calibration tokens (ShortGPT's block
influence is ``1 - cos``, the same ranking). ``mode: individual`` removes the ``blocks`` least
important blocks; ``mode: consecutive`` removes the run of ``blocks`` consecutive blocks whose
ends are closest (Gromov et al.: ``h_l`` against ``h_{l+n}``). The last block is never removed
(the model's final hidden state is read after its final norm, so it has no comparable output).
The config's layer count (and per-layer lists such as ``layer_types``) and every attention
module's ``layer_idx`` are updated, so the KV cache and ``from_pretrained`` see a plain model.

``replace: linear`` puts a :class:`LinearBridge` where each run of removed blocks
was: ``h -> h M + c``, fitted by ridge least squares on calibration data from the residual stream
entering the run to the one leaving it (the map of what the run did that a linear function of its
input explains). The bridge has no attention, so it takes no KV cache slot; the result is a
tensorpress model (its checkpoints reload with ``tp.load_compressed``), not a plain
``transformers`` one, and export to a Hugging Face directory refuses it.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from tensorpress.errors import RecipeError
from tensorpress.methods.base import register_method
from tensorpress.methods.structural.base import StructuralMethod


def block_distances(runner: Any, windows: torch.Tensor, gap: int) -> list[float]:
    """Mean angular distance between the hidden states entering block ``i`` and block ``i + gap``
    (the final entry: the model's last hidden state), for every ``i``; accumulated batch by
    batch so only one batch's hidden states are held."""
    sums: list[float] = []
    tokens = 0
    for states in runner.hidden_states(windows, "measuring block distances"):
        flat = [h.reshape(-1, h.shape[-1]).double() for h in states]
        pairs = len(flat) - gap
        if not sums:
            sums = [0.0] * pairs
        for i in range(pairs):
            cos = torch.nn.functional.cosine_similarity(flat[i], flat[i + gap], dim=-1).clamp(-1, 1)
            sums[i] += float(torch.arccos(cos).sum() / torch.pi)
        tokens += flat[0].shape[0]
    return [v / tokens for v in sums]


class LinearBridge(nn.Module):
    """Stands where a run of decoder blocks was: the residual stream mapped by one affine map
    (``map``: a ``width x width`` linear with bias). Called like a decoder block."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.map = nn.Linear(width, width)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.map(hidden_states)


def bridge_indices(blocks: nn.ModuleList) -> list[int]:
    return [i for i, block in enumerate(blocks) if isinstance(block, LinearBridge)]


def renumber_attention(blocks: nn.ModuleList) -> None:
    """Number the attention modules' ``layer_idx`` 0, 1, ... over the blocks that have them (a
    bridge holds no KV cache)."""
    index = 0
    for block in blocks:
        if isinstance(block, LinearBridge):
            continue
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = index
        index += 1


def place_bridges(adapter: Any, model: nn.Module, indices: list[int]) -> None:
    """Put empty bridges at ``indices`` of the model's blocks (loading a checkpoint)."""
    blocks = adapter.blocks(model)
    for i in indices:
        blocks[i] = LinearBridge(model.config.hidden_size).to(next(model.parameters()).dtype)
    renumber_attention(blocks)


def remove_blocks(lm: Any, model: nn.Module, drop: list[int], bridges: dict[int, nn.Module] | None = None) -> None:
    """Remove the blocks at ``drop`` (indices) from ``model`` and its config, in place; a block
    index in ``bridges`` gets that module in its place instead."""
    bridges = bridges or {}
    gone = set(drop) - set(bridges)
    path = lm.adapter.blocks_path(model)
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    blocks = lm.adapter.blocks(model)
    kept = nn.ModuleList([bridges.get(i, b) for i, b in enumerate(blocks) if i not in gone])
    setattr(parent, attr, kept)
    renumber_attention(kept)
    config = model.config
    old = config.num_hidden_layers
    config.num_hidden_layers = len(kept)
    for key, value in list(vars(config).items()):  # per-layer lists (layer_types, ...)
        if isinstance(value, list) and len(value) == old and key != "architectures":
            setattr(config, key, [v for i, v in enumerate(value) if i not in gone])


def _runs(indices: list[int]) -> list[list[int]]:
    """Sorted indices grouped into runs of consecutive ones."""
    runs: list[list[int]] = []
    for i in sorted(indices):
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def fit_bridges(runner: Any, model: nn.Module, windows: torch.Tensor, runs: list[list[int]], damp: float) -> dict[int, LinearBridge]:
    """One :class:`LinearBridge` per run of blocks, keyed by the run's first index: the ridge
    least-squares affine map from the hidden states entering the run to those leaving it."""
    width = model.config.hidden_size
    # per run: [x 1]^T [x 1] and [x 1]^T (y - x), float64, accumulated batch by batch
    grams = {run[0]: torch.zeros(width + 1, width + 1, dtype=torch.float64) for run in runs}
    cross = {run[0]: torch.zeros(width + 1, width, dtype=torch.float64) for run in runs}
    for states in runner.hidden_states(windows, "fitting linear bridges"):
        for run in runs:
            x = states[run[0]].reshape(-1, width).double()
            y = states[run[-1] + 1].reshape(-1, width).double()  # never the last entry: the last block stays
            xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
            grams[run[0]] += xa.T @ xa
            cross[run[0]] += xa.T @ (y - x)
    dtype = next(model.parameters()).dtype
    out = {}
    for first, gram in grams.items():
        # each channel's ridge relative to its own energy (the residual stream has a few channels
        # orders of magnitude larger than the rest); the offset is not shrunk
        ridge = damp * torch.diagonal(gram).clamp(min=1e-12)
        ridge[width] = 0.0
        reg = torch.diag(ridge)
        solution = torch.linalg.solve(gram + reg, cross[first])  # (width + 1, width): [W; c]
        bridge = LinearBridge(width)
        with torch.no_grad():
            bridge.map.weight.copy_((torch.eye(width, dtype=solution.dtype) + solution[:width]).T.to(dtype))
            bridge.map.bias.copy_(solution[width].to(dtype))
        out[first] = bridge.to(dtype)
    return out


@register_method
class DropBlocks(StructuralMethod):
    name: ClassVar[str] = "drop_blocks"
    summary: ClassVar[str] = "depth pruning: remove the blocks that change the residual stream least (angular distance)"
    needs: ClassVar[frozenset[str]] = frozenset({"act_sq"})  # marks the recipe as calibrated

    method: Literal["drop_blocks"] = "drop_blocks"
    blocks: int = Field(2, ge=1, description="number of blocks to remove")
    indices: list[int] | None = Field(None, description="remove exactly these blocks (0-based; e.g. chosen by "
                                      "tensorpress search --depth); blocks must then equal their number")
    mode: Literal["individual", "consecutive"] = Field(
        "individual", description="individual = the least important blocks anywhere; consecutive = the best run of adjacent blocks"
    )
    replace: Literal["none", "linear"] = Field(
        "none", description="none = remove the blocks (a plain smaller model); linear = a least-squares linear map of the residual "
        "stream in place of each run of removed blocks (tensorpress checkpoints only, no Hugging Face export; not for models "
        "that mix attention kinds per layer)"
    )
    damp: float = Field(0.01, gt=0, le=1, description="replace=linear: ridge of the fit, relative to each input channel's energy")

    def transform(self, lm: Any, model: nn.Module, calib: Any, runner: Any) -> dict[str, Any]:
        n_blocks = len(lm.adapter.blocks(model))
        kinds = set(getattr(model.config, "layer_types", None) or ())
        if self.replace == "linear" and len(kinds) > 1:
            # the cache builds its layers by position from layer_types while the attention
            # layers are renumbered past the bridges: a sliding layer would get a global cache
            raise RecipeError(f"drop_blocks: replace 'linear' needs one attention kind in every layer; "
                              f"{model.config.model_type} mixes {sorted(kinds)} (use replace 'none')")
        if self.blocks >= n_blocks:
            raise RecipeError(f"drop_blocks: cannot remove {self.blocks} of the model's {n_blocks} blocks (the last one stays)")
        windows = self.windows(calib).input_ids
        candidates = n_blocks - 1  # the last block's output is only seen after the final norm
        if self.indices is not None:
            bad = [i for i in self.indices if not 0 <= i < candidates]
            if bad or len(set(self.indices)) != len(self.indices) or len(self.indices) != self.blocks:
                raise RecipeError(f"drop_blocks: indices {self.indices} must be {self.blocks} distinct blocks in "
                                  f"0..{candidates - 1} (the last block stays)")
            drop, scores = sorted(self.indices), {}
        elif self.mode == "individual":
            distance = block_distances(runner, windows, 1)
            scores = {i: distance[i] for i in range(candidates)}
            drop = sorted(sorted(scores, key=scores.get)[: self.blocks])
        else:
            if candidates - self.blocks + 1 < 1:
                raise RecipeError(f"drop_blocks: no run of {self.blocks} blocks fits before the last block")
            distance = block_distances(runner, windows, self.blocks)
            scores = {i: distance[i] for i in range(candidates - self.blocks + 1)}
            first = min(scores, key=scores.get)
            drop = list(range(first, first + self.blocks))
        bridges = fit_bridges(runner, model, windows, _runs(drop), self.damp) if self.replace == "linear" else None
        remove_blocks(lm, model, drop, bridges)
        return {"removed_blocks": drop, "distances": {str(k): round(v, 5) for k, v in scores.items()},
                "blocks_left": n_blocks - len(drop), "bridges": sorted(bridges or {})}
