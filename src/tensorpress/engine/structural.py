"""The engine's side of the structural transforms (``methods/structural``): whatever runs the
model or walks its blocks. A transform gets a :class:`BlockRunner` and keeps to its math (which
blocks, channels or directions to keep, and the rewrite); the runner runs forward passes over
calibration windows, accumulates statistics and drives the block-by-block pruning walk, so
``methods/`` imports nothing from the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from tensorpress.engine.capture import capture_block_inputs
from tensorpress.engine.linears import in_features, weight_of
from tensorpress.engine.lockstep import lockstep_pass
from tensorpress.engine.stats import InputStats
from tensorpress.progress import track


class _Narrowed(nn.Module):
    """The refit output linear for the rest of the pass that pruned it: the calls parked at it
    computed the input linears before the pruning, so their input still has every channel."""

    def __init__(self, keep: torch.Tensor, linear: nn.Module) -> None:
        super().__init__()
        self.keep = keep
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.index_select(-1, self.keep))


class BlockRunner:
    """Runs ``model`` (the compression copy of ``lm.model``) for a structural transform, in
    batches of ``batch_size`` windows."""

    def __init__(self, lm: Any, model: nn.Module, batch_size: int) -> None:
        self.lm, self.model, self.batch_size = lm, model, batch_size

    def hidden_states(self, windows: torch.Tensor, label: str) -> Iterator[tuple[torch.Tensor, ...]]:
        """The residual stream entering every block (and the model's last hidden state), one
        batch of ``windows`` at a time, so only one batch's states are held."""
        batches = range(0, len(windows), self.batch_size)
        with torch.inference_mode():
            for start in track(batches, label, total=len(batches)):
                yield self.model(input_ids=windows[start:start + self.batch_size], output_hidden_states=True).hidden_states

    @staticmethod
    def statistics(width: int, needs: frozenset[str], device: torch.device) -> InputStats:
        """An accumulator of input statistics (``xtx``, ``act_sum``, ...) for ``width`` channels."""
        return InputStats(width, needs, device)

    @staticmethod
    def in_features(module: nn.Module) -> int:
        return in_features(module)

    def prune_block_inputs(
        self, calib: Any, out_rel: str, what: str,
        choose: Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]],
        rewrite: Callable[[nn.Module, torch.Tensor, dict[str, Any], torch.Tensor, dict[str, torch.Tensor]], None],
    ) -> None:
        """Walk the blocks with the calibration inputs (each block sees the already pruned ones);
        in each, measure the Gram matrix (and sum) of ``out_rel``'s input, let
        ``choose(block, w_out, gram)`` return the input channels of ``out_rel`` to keep and the
        rows to keep of other linears, and ``rewrite(block, w_out, stats, keep, rows)`` slice
        and refit them.

        One pass per block (``engine/lockstep.py``): every calibration batch stops at ``out_rel``
        until its statistics are complete, the block is pruned, and the batches go on through the
        refit linear, giving the pruned block's outputs for the next block."""
        calls = capture_block_inputs(self.lm, self.model, calib, self.batch_size)
        blocks = self.lm.adapter.blocks(self.model)
        for block in track(blocks, f"pruning {what} of {len(blocks)} blocks"):

            def prune(members: list[str], stats: dict[str, Any], block: nn.Module = block) -> dict[str, nn.Module]:
                out_lin = block.get_submodule(out_rel)
                w_out = weight_of(out_lin).double()
                keep, rows = choose(block, w_out, stats["xtx"])
                rewrite(block, w_out, stats, keep, rows)
                return {out_rel: _Narrowed(keep, out_lin)}

            calls = lockstep_pass(block, calls, {0: [out_rel]}, frozenset({"xtx", "act_sum"}), prune)
