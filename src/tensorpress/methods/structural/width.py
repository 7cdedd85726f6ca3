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

``prune_heads`` (separate q/k/v projections, head counts read from the config: the adapter's
roles and ``head_config``): the same walk with the attention output as the output linear; a KV group's
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


def rewrite_block(out_rel: str, damp: float, refit: bool) -> Callable[..., None]:
    """The rewrite of one block once its channels are chosen: the other linears keep the chosen
    rows, ``out_rel`` the chosen input channels, refit (``refit_output``) on the statistics."""

    def rewrite(block: nn.Module, w_out: torch.Tensor, stats: dict[str, Any], keep: torch.Tensor,
                rows: dict[str, torch.Tensor]) -> None:
        out_lin = block.get_submodule(out_rel)
        bias = None if out_lin.bias is None else out_lin.bias.detach()
        new_w, new_b = refit_output(w_out, bias, stats["xtx"], stats["act_sum"], stats["tokens"], keep, damp, refit)
        for rel, kept_rows in rows.items():
            _select_rows(block.get_submodule(rel), kept_rows)
        _set_input_weight(out_lin, new_w, new_b)

    return rewrite


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

    def transform(self, lm: Any, model: nn.Module, calib: Any, runner: Any) -> dict[str, Any]:
        adapter = lm.adapter
        in_rels, out_rels = adapter.linears_with("ffn_gate", "ffn_up"), adapter.linears_with("ffn_down")
        fused = adapter.linears_with("ffn_gate_up")  # rows [gate | up]: a channel is a row in each half
        if adapter.moe is not None:
            raise RecipeError(f"prune_ffn does not apply to {adapter.family}: its FFN is a mixture of experts (a channel "
                              "of one expert is not a channel of another); compress the experts with a quantizer, "
                              "sparsity or low-rank stage instead")
        if len(out_rels) != 1 or not (in_rels or fused):
            raise RecipeError(f"prune_ffn: needs FFN input linears and one FFN output linear; the {adapter.family} adapter "
                              f"names {in_rels + fused} and {out_rels}")
        size_key = next((k for k in _SIZE_KEYS if hasattr(model.config, k)), None)
        if size_key is None:
            raise RecipeError(f"prune_ffn: {model.config.model_type} config has none of {_SIZE_KEYS}")
        inter = runner.in_features(adapter.blocks(model)[0].get_submodule(out_rels[0]))
        keep_n = max(self.multiple_of, round((1 - self.ratio) * inter / self.multiple_of) * self.multiple_of)
        if keep_n >= inter:
            raise RecipeError(f"prune_ffn: ratio {self.ratio} keeps all {inter} channels (multiple_of {self.multiple_of})")
        shares = []

        def choose(block, w_out, gram):
            scores = channel_scores(w_out, gram, self.importance)
            keep = torch.sort(torch.argsort(scores, descending=True)[:keep_n]).values
            shares.append(round(float(scores[keep].sum() / scores.sum()), 4))
            return keep, {**{rel: keep for rel in in_rels}, **{rel: torch.cat([keep, keep + inter]) for rel in fused}}

        runner.prune_block_inputs(self.windows(calib), out_rels[0], "FFN channels", choose,
                                  rewrite_block(out_rels[0], self.damp, self.refit))
        setattr(model.config, size_key, keep_n)
        return {"channels_kept": keep_n, "channels_before": inter, "score_share_kept": shares}


@register_method
class PruneHeads(_ChannelPruning):
    name: ClassVar[str] = "prune_heads"
    summary: ClassVar[str] = "width pruning of attention: remove whole KV groups (a KV head with its query heads) and refit o_proj"

    method: Literal["prune_heads"] = "prune_heads"
    ratio: float = Field(0.25, gt=0, lt=1, description="fraction of the KV groups (and so of the query heads) removed in every block")

    def transform(self, lm: Any, model: nn.Module, calib: Any, runner: Any) -> dict[str, Any]:
        config, adapter = model.config, lm.adapter
        q, k, v, o = (adapter.linears_with(role) for role in ("attn_q", "attn_k", "attn_v", "attn_output"))
        if not all(len(r) == 1 for r in (q, k, v, o)):
            raise RecipeError(f"prune_heads needs separate q, k and v projections; {config.model_type} computes them in "
                              f"one fused linear ({', '.join(adapter.linears_with('attn_qkv'))})")
        if not adapter.head_config:
            raise RecipeError(f"prune_heads: {config.model_type}'s attention cannot lose whole heads by a config change "
                              "(its head width is derived from the hidden size, or a norm spans all heads), so a reload "
                              "would not rebuild the pruned model")
        (q_rel,), (k_rel,), (v_rel,), (o_rel,) = q, k, v, o
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

        runner.prune_block_inputs(self.windows(calib), o_rel, "attention heads", choose, rewrite_block(o_rel, self.damp, self.refit))
        config.num_attention_heads = keep_groups * per_group
        config.num_key_value_heads = keep_groups
        config.head_dim = head_dim
        return {"kv_groups_kept": keep_groups, "kv_groups_before": kv_heads, "query_heads_kept": keep_groups * per_group,
                "removed_kv_groups": removed}
