"""``slicegpt``: rotate the residual stream onto its principal directions and slice off the
least used ones (SliceGPT, Ashkboos et al. 2024), for pre-norm RMSNorm models (the adapter's
``norm_kind``, no ``post_norms``, plain norm weights, no embedding scale tied to the width).

Computational invariance: once every RMSNorm's scale is folded into the linears that read its
output (q/k/v, gate/up, lm_head), an RMSNorm commutes with any orthogonal ``Q``
(``rms(xQ) = rms(x)``). Rotating the embeddings (``E Q``), every linear that reads the residual
stream (``W Q``) and every linear that writes to it (``Q^T W``) then leaves the model's output
unchanged. With ``Q`` the eigenvectors of the residual stream's covariance on calibration data
(summed over block inputs, each normalised to unit trace), dropping its last columns removes the
directions carrying the least signal; the residual width becomes ``k``, and each RMSNorm's scale
becomes ``sqrt(d / k)`` so its output keeps its scale over the narrower stream.

One rotation serves every layer (the paper uses one per layer and adds a shortcut matrix to every
residual connection): the result is an ordinary model of the same family with a smaller
``hidden_size`` that plain ``transformers`` loads, at some cost in quality against per-layer
rotations.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from tensorpress.errors import RecipeError
from tensorpress.methods.base import register_method
from tensorpress.methods.structural.base import StructuralMethod

_ATTENTION_IN = ("attn_q", "attn_k", "attn_v", "attn_qkv")
_FFN_IN = ("ffn_gate", "ffn_up", "ffn_gate_up")


def _readers(adapter: Any) -> dict[str | None, list[str]]:
    """Each input norm of a block and the linears that read it (by the adapter's roles)."""
    out: dict[str | None, list[str]] = {}
    for roles in (_ATTENTION_IN, _FFN_IN):
        present = next((r for r in roles if adapter.linears_with(r)), None)
        out[None if present is None else adapter.input_norm(present)] = adapter.linears_with(*roles)
    return out


def _writers(adapter: Any) -> list[str]:
    return adapter.linears_with("attn_output", "ffn_down")


def refusal(adapter: Any, model_type: str) -> str | None:
    """Why SliceGPT's rotation does not apply to this architecture, or None."""
    if adapter.moe is not None:
        return "its FFN is a mixture of experts: the rotation would have to reach the router and every expert"
    if adapter.norm_kind != "rms":
        return "its LayerNorms subtract the mean, which a rotation of the residual stream does not commute with"
    if adapter.post_norms:
        return f"its norms after each branch ({', '.join(adapter.post_norms)}) sit between the rotated outputs and the residual sum"
    if adapter.norm_offset or adapter.scaled_embeddings:
        return "its norms act as (1 + w) and its embeddings are scaled by sqrt(hidden size), which slicing changes"
    if None in _readers(adapter) or len(_writers(adapter)) != 2 or adapter.final_norm_paths == ():
        return "the adapter names no input norm for each branch, or not one output per branch"
    return None


def residual_covariance(runner: Any, windows: torch.Tensor) -> torch.Tensor:
    """Sum over block inputs of the residual stream's (uncentred) covariance, each block's
    normalised to unit trace so that the growing norm of deep layers does not dominate."""
    per_layer: list[Any] = []
    for states in runner.hidden_states(windows, "measuring the residual stream"):
        for i, h in enumerate(states[:-1]):  # the last entry is after the final norm
            if len(per_layer) <= i:
                per_layer.append(runner.statistics(h.shape[-1], frozenset({"xtx"}), h.device))
            per_layer[i].update(h)
    grams = [stats.as_dict()["xtx"] for stats in per_layer]
    return sum(c / torch.trace(c).clamp(min=1e-30) for c in grams)


def _scale_columns(linear: nn.Linear, scale: torch.Tensor) -> None:
    linear.weight.data = (linear.weight.data.double() * scale[None, :]).to(linear.weight.dtype)


def fold_norms(adapter: Any, model: nn.Module, blocks: nn.ModuleList) -> None:
    """Fold every RMSNorm's scale into the linears reading it (and untie the LM head)."""
    for block in blocks:
        for norm_name, readers in _readers(adapter).items():
            norm = block.get_submodule(norm_name)
            gamma = norm.weight.data.double().clone()
            for rel in readers:
                _scale_columns(block.get_submodule(rel), gamma)
            norm.weight.data.fill_(1.0)
    head = model.get_output_embeddings()
    final = adapter.final_norm(model)
    if head.weight is model.get_input_embeddings().weight:  # tied: the head gets its own copy
        head.weight = nn.Parameter(head.weight.data.clone())
        model.config.tie_word_embeddings = False
    _scale_columns(head, final.weight.data.double().clone())
    final.weight.data.fill_(1.0)


def rotate_and_slice(adapter: Any, model: nn.Module, blocks: nn.ModuleList, q: torch.Tensor) -> None:
    """Apply ``Q`` (d x k, orthonormal columns) to every reader and writer of the residual
    stream, the embeddings and the LM head; set the RMSNorm scales for width ``k``."""
    d, k = q.shape
    emb = model.get_input_embeddings()
    emb.weight = nn.Parameter((emb.weight.data.double() @ q).to(emb.weight.dtype))
    emb.embedding_dim = k
    readers = [block.get_submodule(rel) for block in blocks for rels in _readers(adapter).values() for rel in rels]
    for linear in [*readers, model.get_output_embeddings()]:
        linear.weight = nn.Parameter((linear.weight.data.double() @ q).to(linear.weight.dtype))
        linear.in_features = k
    for block in blocks:
        for rel in _writers(adapter):
            linear = block.get_submodule(rel)
            linear.weight = nn.Parameter((q.T @ linear.weight.data.double()).to(linear.weight.dtype))
            if linear.bias is not None:
                linear.bias = nn.Parameter((linear.bias.data.double() @ q).to(linear.bias.dtype))
            linear.out_features = k
    scale = (d / k) ** 0.5
    for norm in [adapter.final_norm(model), *(block.get_submodule(n) for block in blocks for n in _readers(adapter))]:
        norm.weight = nn.Parameter(torch.full((k,), scale, dtype=norm.weight.dtype))


@register_method
class SliceGPT(StructuralMethod):
    name: ClassVar[str] = "slicegpt"
    summary: ClassVar[str] = "rotate the residual stream onto its principal directions (one rotation) and slice the least used (SliceGPT)"
    needs: ClassVar[frozenset[str]] = frozenset({"xtx"})

    method: Literal["slicegpt"] = "slicegpt"
    slicing: float = Field(0.2, ge=0, lt=1, description="fraction of the residual stream's dimensions removed (0 = rotation only)")
    multiple_of: int = Field(8, ge=1, description="keep a multiple of this many dimensions")

    def transform(self, lm: Any, model: nn.Module, calib: Any, runner: Any) -> dict[str, Any]:
        why = refusal(lm.adapter, model.config.model_type)
        if why is not None:
            raise RecipeError(f"slicegpt does not apply to {model.config.model_type}: {why}")
        config = model.config
        d = config.hidden_size
        k = d if self.slicing == 0 else max(self.multiple_of, round((1 - self.slicing) * d / self.multiple_of) * self.multiple_of)
        blocks = lm.adapter.blocks(model)
        windows = self.windows(calib).input_ids
        fold_norms(lm.adapter, model, blocks)
        cov = residual_covariance(runner, windows)  # the stream is unchanged by folding
        evals, evecs = torch.linalg.eigh(cov)
        order = torch.argsort(evals, descending=True)
        q = evecs[:, order[:k]]
        kept_share = float(evals[order[:k]].sum() / evals.sum())
        head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
        rotate_and_slice(lm.adapter, model, blocks, q)
        config.hidden_size = k
        config.head_dim = head_dim
        return {"hidden_before": d, "hidden_after": k, "variance_kept": round(kept_share, 5)}
