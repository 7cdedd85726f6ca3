"""Width pruning with a refit: ``prune_ffn`` (feed-forward channels) and ``prune_heads``
(attention heads, whole KV groups so GQA stays consistent: a KV head goes with its query heads).

``prune_ffn``:

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

``prune_heads`` (Llama family): the same walk with ``o_proj`` as the output linear; a KV group's
score is the sum of its query heads' channel scores; q/k/v lose the group's rows, ``o_proj`` its
columns (refit), and the config gets the new head counts and an explicit ``head_dim``.
"""

from __future__ import annotations

from collections.abc import Callable
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


class _Narrowed(nn.Module):
    """The refit output linear for the rest of the pass that pruned it: the calls parked at it
    computed the input linears before the pruning, so their input still has every channel."""

    def __init__(self, keep: torch.Tensor, linear: nn.Module) -> None:
        super().__init__()
        self.keep = keep
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.index_select(-1, self.keep))


def prune_block_inputs(
    lm: Any, model: nn.Module, calib: Any, batch_size: int, out_rel: str, what: str,
    choose: Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]],
    damp: float, refit: bool,
) -> None:
    """Walk the blocks with the calibration inputs (each block sees the already pruned ones);
    in each, measure the Gram matrix of ``out_rel``'s input, let ``choose(block, w_out, gram)``
    return the input channels of ``out_rel`` to keep and the rows to keep of other linears, slice
    them, and refit ``out_rel`` on the kept channels.

    One pass per block (``engine/lockstep.py``): every calibration batch stops at ``out_rel``
    until its statistics are complete, the block is pruned, and the batches go on through the
    refit linear, giving the pruned block's outputs for the next block."""
    from tensorpress.engine.linears import weight_of
    from tensorpress.engine.lockstep import lockstep_pass
    from tensorpress.engine.sequential import capture_block_inputs

    calls = capture_block_inputs(lm, model, calib, batch_size)
    blocks = lm.adapter.blocks(model)
    for block in track(blocks, f"pruning {what} of {len(blocks)} blocks"):

        def prune(members: list[str], stats: dict[str, Any], block: nn.Module = block) -> dict[str, nn.Module]:
            out_lin = block.get_submodule(out_rel)
            w_out = weight_of(out_lin).double()
            keep, rows = choose(block, w_out, stats["xtx"])
            bias = None if out_lin.bias is None else out_lin.bias.detach()
            new_w, new_b = refit_output(w_out, bias, stats["xtx"], stats["act_sum"], stats["tokens"], keep, damp, refit)
            for rel, kept_rows in rows.items():
                _select_rows(block.get_submodule(rel), kept_rows)
            _set_input_weight(out_lin, new_w, new_b)
            return {out_rel: _Narrowed(keep, out_lin)}

        calls = lockstep_pass(block, calls, {0: [out_rel]}, frozenset({"xtx", "act_sum"}), prune)


def channel_scores(w_out: torch.Tensor, gram: torch.Tensor, importance: str) -> torch.Tensor:
    """Importance of each input channel of the output linear: ``||W_out[:, c]||``, times the
    channel's activation norm ``||X_c||`` when ``importance == "activation"``."""
    scores = w_out.norm(dim=0)
    return scores * torch.diagonal(gram).sqrt() if importance == "activation" else scores


class _ChannelPruning(StructuralMethod):
    needs: ClassVar[frozenset[str]] = frozenset({"xtx"})

    refit: bool = Field(True, description="least-squares refit of the output projection on calibration activations")
    damp: float = Field(0.01, gt=0, le=1, description="ridge added to the refit's Gram matrix, relative to its mean diagonal")
    importance: Literal["activation", "magnitude"] = Field(
        "activation", description="activation = ||X_c|| * ||W_out[:, c]||; magnitude = ||W_out[:, c]|| only"
    )


@register_method
class PruneFFN(_ChannelPruning):
    name: ClassVar[str] = "prune_ffn"
    summary: ClassVar[str] = "width pruning: remove the least important FFN channels of every block and refit the output projection"

    method: Literal["prune_ffn"] = "prune_ffn"
    ratio: float = Field(0.2, gt=0, lt=1, description="fraction of the FFN intermediate channels removed in every block")
    multiple_of: int = Field(8, ge=1, description="keep a multiple of this many channels")

    def transform(self, lm: Any, model: nn.Module, calib: Any, batch_size: int) -> dict[str, Any]:
        adapter = lm.adapter
        in_rels, out_rels = adapter.linear_groups[2], adapter.linear_groups[3]
        if len(out_rels) != 1:
            raise RecipeError(f"prune_ffn: expected one FFN output linear, the adapter lists {out_rels}")
        size_key = next((k for k in _SIZE_KEYS if hasattr(model.config, k)), None)
        if size_key is None:
            raise RecipeError(f"prune_ffn: {model.config.model_type} config has none of {_SIZE_KEYS}")
        from tensorpress.engine.linears import in_features  # the engine imports the methods

        inter = in_features(adapter.blocks(model)[0].get_submodule(out_rels[0]))
        keep_n = max(self.multiple_of, round((1 - self.ratio) * inter / self.multiple_of) * self.multiple_of)
        if keep_n >= inter:
            raise RecipeError(f"prune_ffn: ratio {self.ratio} keeps all {inter} channels (multiple_of {self.multiple_of})")
        shares = []

        def choose(block, w_out, gram):
            scores = channel_scores(w_out, gram, self.importance)
            keep = torch.sort(torch.argsort(scores, descending=True)[:keep_n]).values
            shares.append(round(float(scores[keep].sum() / scores.sum()), 4))
            return keep, {rel: keep for rel in in_rels}

        prune_block_inputs(lm, model, self.windows(calib), batch_size, out_rels[0], "FFN channels", choose, self.damp, self.refit)
        setattr(model.config, size_key, keep_n)
        return {"channels_kept": keep_n, "channels_before": inter, "score_share_kept": shares}


@register_method
class PruneHeads(_ChannelPruning):
    name: ClassVar[str] = "prune_heads"
    summary: ClassVar[str] = "width pruning of attention: remove whole KV groups (a KV head with its query heads) and refit o_proj"

    method: Literal["prune_heads"] = "prune_heads"
    ratio: float = Field(0.25, gt=0, lt=1, description="fraction of the KV groups (and so of the query heads) removed in every block")

    def transform(self, lm: Any, model: nn.Module, calib: Any, batch_size: int) -> dict[str, Any]:
        config = model.config
        rels = lm.adapter.linear_groups[0]
        if lm.adapter.family != "llama" or len(rels) != 3:
            raise RecipeError(f"prune_heads supports Llama-family models (separate q/k/v, explicit head_dim); not {config.model_type}")
        q_rel, k_rel, v_rel = rels
        (o_rel,) = lm.adapter.linear_groups[1]
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        per_group = heads // kv_heads
        keep_groups = round((1 - self.ratio) * kv_heads)
        if not 1 <= keep_groups < kv_heads:
            raise RecipeError(f"prune_heads: ratio {self.ratio} of {kv_heads} KV groups keeps {keep_groups}; need at least 1 and fewer than all")
        removed = []

        def choose(block, w_out, gram):
            scores = channel_scores(w_out, gram, self.importance).reshape(kv_heads, per_group * head_dim).sum(1)
            groups = torch.sort(torch.argsort(scores, descending=True)[:keep_groups]).values
            removed.append(sorted(set(range(kv_heads)) - set(groups.tolist())))
            q_channels = torch.cat([torch.arange(g * per_group * head_dim, (g + 1) * per_group * head_dim) for g in groups.tolist()])
            kv_channels = torch.cat([torch.arange(g * head_dim, (g + 1) * head_dim) for g in groups.tolist()])
            return q_channels, {q_rel: q_channels, k_rel: kv_channels, v_rel: kv_channels}

        prune_block_inputs(lm, model, self.windows(calib), batch_size, o_rel, "attention heads", choose, self.damp, self.refit)
        config.num_attention_heads = keep_groups * per_group
        config.num_key_value_heads = keep_groups
        config.head_dim = head_dim
        return {"kv_groups_kept": keep_groups, "kv_groups_before": kv_heads, "query_heads_kept": keep_groups * per_group,
                "removed_kv_groups": removed}
