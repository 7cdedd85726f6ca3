"""``prune_ffn``: width pruning of the feed-forward intermediate channels, with a refit.

Block by block (each from the calibration inputs that went through the already pruned blocks):
channel ``c`` of the FFN's intermediate layer is scored by ``||X_c|| * ||W_out[:, c]||`` (its
activation norm on calibration data times the norm of the output weights it feeds), the lowest
fraction ``ratio`` of channels is removed from the input linears (rows, and biases) and from the
output linear (columns), and the output linear is refit by least squares so the block's FFN
output on the calibration inputs stays as close as possible with the channels that remain:
``W' = W H_{:,k} (H_kk + damp)^-1`` with ``H`` the (centred, when the layer has a bias) Gram
matrix of the intermediate activations; a bias absorbs the mean of what was removed. Every
block keeps the same number of channels (a config holds one intermediate size), rounded to a
multiple of ``multiple_of``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn
from transformers.pytorch_utils import Conv1D

from tensorpress.errors import RecipeError
from tensorpress.methods.base import register_method
from tensorpress.methods.structural.base import StructuralMethod
from tensorpress.progress import track

_SIZE_KEYS = ("intermediate_size", "ffn_dim", "n_inner")


def _select_rows(module: nn.Module, keep: torch.Tensor) -> None:
    """Keep only the output features ``keep`` of a linear (its rows; Conv1D: columns)."""
    if isinstance(module, Conv1D):
        module.weight = nn.Parameter(module.weight.data[:, keep].clone())
        module.nf = len(keep)
    else:
        module.weight = nn.Parameter(module.weight.data[keep].clone())
        module.out_features = len(keep)
    if module.bias is not None:
        module.bias = nn.Parameter(module.bias.data[keep].clone())


def _set_input_weight(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Replace a linear's weight by ``weight`` (out, new_in) and its bias."""
    dtype = module.weight.dtype
    if isinstance(module, Conv1D):
        module.weight = nn.Parameter(weight.T.contiguous().to(dtype))
    else:
        module.weight = nn.Parameter(weight.contiguous().to(dtype))
        module.in_features = weight.shape[1]
    if bias is not None:
        module.bias = nn.Parameter(bias.to(dtype))


def _weight(module: nn.Module) -> torch.Tensor:
    return (module.weight.T if isinstance(module, Conv1D) else module.weight).detach().double()


def refit_output(weight: torch.Tensor, bias: torch.Tensor | None, gram: torch.Tensor, total: torch.Tensor, tokens: int,
                 keep: torch.Tensor, damp: float, refit: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """New ``(weight, bias)`` of the output linear using only input channels ``keep``.

    ``gram`` = sum x x^T and ``total`` = sum x over ``tokens`` calibration inputs (float64).
    Without ``refit`` the columns are simply dropped (the bias still absorbs the removed mean)."""
    w = weight.double()
    mean = total / max(tokens, 1)
    if not refit:
        new_w = w[:, keep]
    else:
        h = gram / max(tokens, 1)
        if bias is not None:
            h = h - torch.outer(mean, mean)  # with a bias, fit the centred activations
        h_kk = h[keep][:, keep]
        h_kk = h_kk + damp * torch.diagonal(h_kk).mean().clamp(min=1e-12) * torch.eye(len(keep), dtype=h.dtype)
        new_w = torch.linalg.solve(h_kk, (w @ h[:, keep]).T).T
    new_b = None
    if bias is not None:
        new_b = bias.double() + w @ mean - new_w @ mean[keep]
    return new_w.float(), None if new_b is None else new_b.float()


@register_method
class PruneFFN(StructuralMethod):
    name: ClassVar[str] = "prune_ffn"
    summary: ClassVar[str] = "width pruning: remove the least important FFN channels of every block and refit the output projection"
    needs: ClassVar[frozenset[str]] = frozenset({"xtx"})

    method: Literal["prune_ffn"] = "prune_ffn"
    ratio: float = Field(0.2, gt=0, lt=1, description="fraction of the FFN intermediate channels removed in every block")
    refit: bool = Field(True, description="least-squares refit of the output projection on calibration activations")
    damp: float = Field(0.01, gt=0, le=1, description="ridge added to the refit's Gram matrix, relative to its mean diagonal")
    multiple_of: int = Field(8, ge=1, description="keep a multiple of this many channels")
    importance: Literal["activation", "magnitude"] = Field(
        "activation", description="activation = ||X_c|| * ||W_out[:, c]||; magnitude = ||W_out[:, c]|| only"
    )

    def transform(self, lm: Any, model: nn.Module, calib: Any, batch_size: int) -> dict[str, Any]:
        from tensorpress.engine.sequential import capture_block_inputs, run_block

        adapter = lm.adapter
        in_rels, out_rels = adapter.linear_groups[2], adapter.linear_groups[3]
        if len(out_rels) != 1:
            raise RecipeError(f"prune_ffn: expected one FFN output linear, the adapter lists {out_rels}")
        size_key = next((k for k in _SIZE_KEYS if hasattr(model.config, k)), None)
        if size_key is None:
            raise RecipeError(f"prune_ffn: {model.config.model_type} config has none of {_SIZE_KEYS}")
        blocks = adapter.blocks(model)
        first_out = blocks[0].get_submodule(out_rels[0])
        inter = _weight(first_out).shape[1]
        keep_n = max(self.multiple_of, round((1 - self.ratio) * inter / self.multiple_of) * self.multiple_of)
        if keep_n >= inter:
            raise RecipeError(f"prune_ffn: ratio {self.ratio} keeps all {inter} channels (multiple_of {self.multiple_of})")
        windows = calib.input_ids[: self.samples] if self.samples else calib.input_ids
        calls = capture_block_inputs(lm, model, dataclasses.replace(calib, input_ids=windows), batch_size)
        errors = []
        for i, block in enumerate(track(blocks, f"pruning FFN channels of {len(blocks)} blocks")):
            out_lin = block.get_submodule(out_rels[0])
            gram = torch.zeros(inter, inter, dtype=torch.float64)
            total = torch.zeros(inter, dtype=torch.float64)
            count = [0]

            def hook(_module, args, gram=gram, total=total, count=count):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                gram.addmm_(x.T, x)
                total.add_(x.sum(0))
                count[0] += x.shape[0]

            handle = out_lin.register_forward_pre_hook(hook)
            try:
                run_block(block, calls)
            finally:
                handle.remove()
            w_out = _weight(out_lin)
            scores = w_out.norm(dim=0)
            if self.importance == "activation":
                scores = scores * torch.diagonal(gram).sqrt()
            keep = torch.sort(torch.argsort(scores, descending=True)[:keep_n]).values
            bias = None if out_lin.bias is None else out_lin.bias.detach()
            new_w, new_b = refit_output(w_out, bias, gram, total, count[0], keep, self.damp, self.refit)
            for rel in in_rels:
                _select_rows(block.get_submodule(rel), keep)
            _set_input_weight(out_lin, new_w, new_b)
            errors.append(float(scores[keep].sum() / scores.sum()))
            if i + 1 < len(blocks):
                calls = run_block(block, calls)
        setattr(model.config, size_key, keep_n)
        return {"channels_kept": keep_n, "channels_before": inter, "score_share_kept": [round(e, 4) for e in errors]}
