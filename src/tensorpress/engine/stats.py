"""Calibration statistics of a linear's inputs, accumulated by forward hooks.

Only what a stage's method declares in ``needs`` is collected. Each batch's products are
computed in float32 (fast) and summed in float64 (exact enough for any number of batches), on
the device of the block.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from tensorpress.engine.blas import syrk_lower
from tensorpress.engine.linears import in_features, out_features

# Above this width, X^T X is accumulated blockwise over its upper triangle only: (k+1)/2k of the
# full product's FLOPs for k equal column blocks (k = 3 for 1536 inputs: 67 %; measured fastest).
_GRAM_BLOCK = 512


def _gram_upper(x: torch.Tensor) -> Iterator[tuple[slice, slice, torch.Tensor]]:
    """Blocks ``(rows, cols, x[:, rows]^T x[:, cols])`` of the upper triangle of ``x^T x``."""
    n = x.shape[1]
    edges = list(range(0, n, _GRAM_BLOCK)) + [n]
    for a in range(len(edges) - 1):
        rows = slice(edges[a], edges[a + 1])
        xa_t = x[:, rows].T
        for b in range(a, len(edges) - 1):
            cols = slice(edges[b], edges[b + 1])
            yield rows, cols, xa_t @ x[:, cols]


class InputStats:
    """Running sums over the calibration tokens that pass through one linear."""

    def __init__(self, in_features: int, needs: frozenset[str], device: torch.device) -> None:
        self.needs = needs
        self.tokens = 0
        # what ``xtx`` holds: "empty", "lower" (BLAS syrk, through a float32 scratch), "upper"
        # (blockwise torch products) or "full"; one triangle is mirrored by ``as_dict``
        self._triangle = "empty"
        self._scratch: torch.Tensor | None = None
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float64, device=device) if "xtx" in needs else None
        self.act_sq = torch.zeros(in_features, dtype=torch.float64, device=device) if "act_sq" in needs else None
        self.act_abs = torch.zeros(in_features, dtype=torch.float64, device=device) if "act_abs" in needs else None
        self.act_sum = torch.zeros(in_features, dtype=torch.float64, device=device) if "act_sum" in needs else None

    def update(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Add the rows of ``x`` (any leading shape; the last dimension is the input), each
        counted ``weights`` times if given (one weight per row: then ``tokens`` is their sum)."""
        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
        if weights is None:
            self.tokens += x.shape[0]
            root = x
        else:
            w = weights.reshape(-1, 1).float()
            self.tokens += float(w.sum())
            root, x = x * w.sqrt(), x * w  # sums of squares and products take sqrt(w) per factor
        if self.xtx is not None:
            self._add_gram(root)
        if self.act_sq is not None:
            self.act_sq += root.square().sum(dim=0).double()
        if self.act_abs is not None:
            self.act_abs += x.abs().sum(dim=0).double()
        if self.act_sum is not None:
            self.act_sum += x.sum(dim=0).double()

    def _add_gram(self, x: torch.Tensor) -> None:
        n = x.shape[1]
        if self._triangle in ("empty", "lower") and x.device.type == "cpu":
            if self._scratch is None:
                self._scratch = torch.zeros(n, n)  # its strict upper triangle is never written
            if syrk_lower(x.contiguous(), self._scratch):
                self.xtx += self._scratch.double()  # (explicit: a mixed-dtype in-place add is 3x slower)
                self._triangle = "lower"
                return
        # (syrk_lower only refuses what no batch of this layer can change: a layer that started on
        # it stays on it)
        if n <= _GRAM_BLOCK or self._triangle == "full":
            self.xtx += (x.T @ x).double()
            self._triangle = "full"
        else:
            self._triangle = "upper"
            for rows, cols, block in _gram_upper(x):
                self.xtx[rows, cols] += block.double()

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tokens": self.tokens}
        if self.xtx is not None:
            if self._triangle == "upper":
                # one triangle was accumulated; mirror it once (linears sharing this input ask
                # for it once each)
                self.xtx = torch.triu(self.xtx) + torch.triu(self.xtx, diagonal=1).T
            elif self._triangle == "lower":
                self.xtx = torch.tril(self.xtx) + torch.tril(self.xtx, diagonal=-1).T
            self._triangle = "full"
            self._scratch = None
            out["xtx"] = self.xtx
        if self.act_sq is not None:
            out["act_sq"] = self.act_sq
        if self.act_abs is not None:
            out["act_abs"] = self.act_abs
        if self.act_sum is not None:
            out["act_sum"] = self.act_sum
        return out


class _Sink(nn.Module):
    """Stands in for a linear whose output nobody needs during a statistics pass: it feeds
    its input to the statistics and returns zeros of the right shape without the matmul."""

    def __init__(self, linear: nn.Module, stats: InputStats | None) -> None:
        super().__init__()
        self.out_features = out_features(linear)
        self.stats = stats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stats is not None:
            self.stats.update(x.detach())
        return x.new_zeros(*x.shape[:-1], self.out_features)


class StatsHooks:
    """Collects ``InputStats`` for named linears of a block while the block runs; a context
    manager.

    * Linears that read the same input (``shared``: name -> key of its input-sharing group, e.g.
      q/k/v) share one ``InputStats``, hooked on the first of them: the sums are computed once.
    * Linears named in ``skip`` are swapped for sinks for the duration: their outputs only feed
      the block's output, which a statistics pass throws away, so their matmul is not computed.
    """

    def __init__(
        self,
        block: nn.Module,
        names: list[str],
        needs: frozenset[str],
        shared: dict[str, Any] | None = None,
        skip: list[str] | None = None,
    ) -> None:
        self.block = block
        self.names = names
        self.needs = needs
        self.shared = shared or {}
        self.skip = skip or []
        self.stats: dict[str, InputStats] = {}
        self._handles: list[Any] = []
        self._swapped: dict[str, nn.Module] = {}

    def __enter__(self) -> StatsHooks:
        feeders: dict[str, InputStats] = {}  # the first linear of each input-sharing group
        by_group: dict[Any, InputStats] = {}
        for name in self.names:
            key = self.shared.get(name, name)
            if key not in by_group:
                module = self.block.get_submodule(name)
                device = next(iter(module.state_dict().values())).device
                by_group[key] = feeders[name] = InputStats(in_features(module), self.needs, device)
            self.stats[name] = by_group[key]
        for name, stats in feeders.items():
            if name not in self.skip:
                module = self.block.get_submodule(name)
                self._handles.append(module.register_forward_hook(lambda m, args, out, s=stats: s.update(args[0].detach())))
        for name in self.skip:
            module = self.block.get_submodule(name)
            self._swapped[name] = module
            self.block.set_submodule(name, _Sink(module, feeders.get(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for name, module in self._swapped.items():
            self.block.set_submodule(name, module)
        self._swapped.clear()
