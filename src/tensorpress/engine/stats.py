"""Calibration statistics of a linear's inputs, accumulated by forward hooks.

Only what a stage's method declares in ``needs`` is collected. Sums are kept in float64 (the
Hessian ``X^T X`` feeds Cholesky factorisations later) on the device of the block.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tensorpress.engine.linears import in_features


class InputStats:
    """Running sums over the calibration tokens that pass through one linear."""

    def __init__(self, in_features: int, needs: frozenset[str], device: torch.device) -> None:
        self.needs = needs
        self.tokens = 0
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float64, device=device) if "xtx" in needs else None
        self.act_sq = torch.zeros(in_features, dtype=torch.float64, device=device) if "act_sq" in needs else None

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
        self.tokens += x.shape[0]
        # each batch's product in float32 (fast), the running sum in float64 (exact enough for
        # any number of batches)
        if self.xtx is not None:
            self.xtx += (x.T @ x).double()
        if self.act_sq is not None:
            self.act_sq += x.square().sum(dim=0).double()

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tokens": self.tokens}
        if self.xtx is not None:
            out["xtx"] = self.xtx
        if self.act_sq is not None:
            out["act_sq"] = self.act_sq
        return out


class StatsHooks:
    """Forward hooks that feed ``InputStats`` for a set of named linears; a context manager.

    Linears that read the same input (``shared``: name -> key of its input-sharing group, e.g.
    q/k/v) share one ``InputStats``, hooked on the first of them: the sums are computed once."""

    def __init__(self, modules: dict[str, nn.Module], needs: frozenset[str], shared: dict[str, int] | None = None) -> None:
        self.modules = modules
        self.needs = needs
        self.shared = shared or {}
        self.stats: dict[str, InputStats] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> StatsHooks:
        by_group: dict[Any, InputStats] = {}
        for name, module in self.modules.items():
            key = self.shared.get(name, name)
            if key in by_group:
                self.stats[name] = by_group[key]
                continue
            device = next(iter(module.state_dict().values())).device
            stats = InputStats(in_features(module), self.needs, device)
            self.stats[name] = by_group[key] = stats
            self._handles.append(module.register_forward_hook(lambda m, args, out, s=stats: s.update(args[0].detach())))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
