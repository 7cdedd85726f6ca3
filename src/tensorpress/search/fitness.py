"""Fitness of a candidate mix: KL divergence to the uncompressed model on a pool of windows.

A candidate gives every block linear one level (an index into its menu entries). Scoring runs
the model block by block with each linear's weight swapped for that level's dense weight (a
pointer swap, no copy), then the final norm and the head, and compares the next-token
distributions with the uncompressed model's, computed once per pool window:
``KL(p_ref || p_cand)`` averaged over every position of the window.

Blocks run in order, so a candidate that differs from the current parent first in block ``b``
starts from the parent's hidden states entering ``b`` (kept per pool window) and recomputes
only blocks ``b..L-1``; each window is its own call, so a window's result is the same whatever
else is scored with it, in this process or in a Ray worker.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from tensorpress.data import TokenWindows
from tensorpress.engine.capture import capture_block_inputs, device_of
from tensorpress.models import LoadedModel
from tensorpress.progress import track

Choice = tuple[int, ...]


@dataclass
class Pieces:
    """Everything an ``Evaluator`` is built from, in a form Ray's object store shares without
    copies (numpy arrays) where it is large: the working model (its block linears get their
    weights from ``levels``), the block linears in model order with their block index, every
    level's weight in the module's own layout, each pool window's first-block call and the
    reference log-probabilities."""

    model: nn.Module
    blocks_path: str
    norm_path: str | None
    head_path: str
    softcap: float | None
    layers: list[str]
    block_of: list[int]
    levels: dict[str, list[np.ndarray]]
    calls: list[tuple[torch.Tensor, tuple, dict]]
    reference: list[np.ndarray]  # (seq, vocab) float32 log-probabilities per window
    # depth search: ``layers`` are the blocks and level 1 removes a block (0 keeps it)
    depth: bool = False


def _module_layout(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    return weight.T.contiguous() if isinstance(module, Conv1D) else weight.contiguous()


def _name_of(model: nn.Module, module: nn.Module | None) -> str | None:
    if module is None:
        return None
    return next(n for n, m in model.named_modules() if m is module)


def prepare(lm: LoadedModel, layers: list[str] | None, weights: dict[str, list[torch.Tensor]] | None, windows: TokenWindows,
            label: str = "reference log-probabilities") -> Pieces:
    """The pieces of an evaluator for ``lm`` over the pool ``windows``; ``weights[layer]`` are
    float32 ``(out, in)`` weights, one per level. ``layers`` None: a depth search (the blocks,
    kept or removed)."""
    model = lm.model
    prefix = lm.adapter.blocks_path(model) + "."
    depth = layers is None
    if depth:
        layers = [f"{prefix}{i}" for i in range(len(lm.adapter.blocks(model)))]
        weights = {}
    block_of = []
    for name in layers:
        index = name.removeprefix(prefix).partition(".")[0]
        if not name.startswith(prefix) or not index.isdigit():
            raise ValueError(f"{name} is not a block linear under {prefix!r}")
        block_of.append(int(index))
    levels = {name: [_module_layout(model.get_submodule(name), w).numpy() for w in weights[name]] for name in weights}
    calls = capture_block_inputs(lm, model, windows, batch_size=1)
    reference = []
    with torch.inference_mode():
        for row in track(list(windows.input_ids), label):
            logits = model(input_ids=row[None].to(device_of(model))).logits[0]
            reference.append(torch.log_softmax(logits.float(), dim=-1).numpy())
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    # a copy: scoring swaps its linears' weights
    return Pieces(copy.deepcopy(model), lm.adapter.blocks_path(model), _name_of(model, lm.adapter.final_norm(model)),
                  _name_of(model, model.get_output_embeddings()), getattr(config, "final_logit_softcapping", None),
                  list(layers), block_of, levels, calls, reference, depth)


def kl_to_reference(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over positions of KL(p_ref || softmax(logits)); ``reference`` holds log-probabilities."""
    logq = torch.log_softmax(logits.float(), dim=-1)
    per_position = (reference.exp() * (reference - logq)).sum(-1)
    return float(per_position.double().mean())


class Evaluator:
    """Scores candidates on pool windows, reusing the current parent's hidden states."""

    def __init__(self, pieces: Pieces) -> None:
        self.pieces = pieces
        model = pieces.model
        model.eval()
        self.blocks = model.get_submodule(pieces.blocks_path)
        self.norm = model.get_submodule(pieces.norm_path) if pieces.norm_path else None
        self.head = model.get_submodule(pieces.head_path)
        self.modules = [] if pieces.depth else [model.get_submodule(n) for n in pieces.layers]
        with warnings.catch_warnings():  # arrays from Ray's object store are read-only; they are only read
            warnings.simplefilter("ignore", UserWarning)
            self.levels = [[torch.from_numpy(a) for a in pieces.levels.get(n, [])] for n in pieces.layers]
            self.reference = [torch.from_numpy(r) for r in pieces.reference]
        self.by_block: dict[int, list[int]] = {}
        for k, b in enumerate(pieces.block_of):
            self.by_block.setdefault(b, []).append(k)
        self.parent: Choice | None = None
        self.parent_kl: list[float] = []
        # states[b][w]: hidden states entering block b for pool window w, under the parent
        self.states: list[list[torch.Tensor]] = [[c[0] for c in pieces.calls]]
        self.kept: dict[Choice, tuple[int, list[list[torch.Tensor]], list[float]]] = {}

    @property
    def pool(self) -> int:
        return len(self.pieces.calls)

    def _first_block(self, choice: Choice) -> int:
        if self.parent is None:
            return 0
        changed = [self.pieces.block_of[k] for k, (a, b) in enumerate(zip(choice, self.parent)) if a != b]
        return min(changed) if changed else len(self.blocks)

    def _set_block(self, b: int, choice: Choice) -> None:
        if self.pieces.depth:
            return
        for k in self.by_block.get(b, ()):
            self.modules[k].weight.data = self.levels[k][choice[k]]

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            hidden = self.norm(hidden)
        logits = self.head(hidden)
        if self.pieces.softcap:
            logits = torch.tanh(logits / self.pieces.softcap) * self.pieces.softcap
        return logits[0]

    def score(self, choice: Choice, windows: list[int], keep: bool = False) -> list[float]:
        """KL of ``choice`` on each of the pool ``windows``; with ``keep`` (all windows), the
        hidden states are kept so that ``adopt(choice)`` makes it the parent without rerunning."""
        choice = tuple(choice)
        if self.parent is not None and choice == self.parent:
            return [self.parent_kl[w] for w in windows]
        first = self._first_block(choice)
        if keep and sorted(windows) != list(range(self.pool)):
            raise ValueError("keep=True scores the whole pool")
        if first >= len(self.blocks):
            return [self.parent_kl[w] for w in windows]
        hidden = [self.states[first][w] for w in windows]
        new_states: list[list[torch.Tensor]] = []
        calls = self.pieces.calls
        with torch.inference_mode():
            for b in range(first, len(self.blocks)):
                self._set_block(b, choice)
                block = self.blocks[b]
                if not (self.pieces.depth and choice[b] == 1):  # a removed block passes its input on
                    out = []
                    for h, w in zip(hidden, windows):
                        _, args, kwargs = calls[w]
                        y = block(h, *args, **kwargs)
                        out.append(y[0] if isinstance(y, tuple) else y)
                    hidden = out
                if keep and b + 1 < len(self.blocks):
                    new_states.append(hidden)
            kl = [kl_to_reference(self.reference[w], self._logits(h)) for h, w in zip(hidden, windows)]
        if keep:  # only the best kept since the last adoption: the one that may become the parent
            best = next(iter(self.kept.values()), None)
            if best is None or sum(kl) < sum(best[2]):
                self.kept = {choice: (first, new_states, kl)}
        return kl

    def take(self, choice: Choice) -> tuple[int, list[list[torch.Tensor]], list[float]]:
        """The kept states of ``choice`` (scored with ``keep``), to adopt in other workers."""
        return self.kept[tuple(choice)]

    def adopt(self, choice: Choice, kept: tuple[int, list[list[torch.Tensor]], list[float]] | None = None) -> None:
        """Make ``choice`` the parent, from its kept states (this worker's, or ``kept``)."""
        choice = tuple(choice)
        first, new_states, kl = kept if kept is not None else self.kept[choice]
        self.states = self.states[: first + 1] + [list(s) for s in new_states]
        self.parent, self.parent_kl = choice, list(kl)
        self.kept = {}
