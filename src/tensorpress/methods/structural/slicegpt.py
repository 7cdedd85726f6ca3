"""``slicegpt``: rotate the residual stream onto its principal directions and slice off the
least used ones (SliceGPT, Ashkboos et al. 2024), for Llama-family models (RMSNorm).

Computational invariance: once every RMSNorm's scale is folded into the linears that read its
output (q/k/v, gate/up, lm_head), an RMSNorm commutes with any orthogonal ``Q``
(``rms(xQ) = rms(x)``). Rotating the embeddings (``E Q``), every linear that reads the residual
stream (``W Q``) and every linear that writes to it (``Q^T W``) then leaves the model's output
unchanged. With ``Q`` the eigenvectors of the residual stream's covariance on calibration data
(summed over block inputs, each normalised to unit trace), dropping its last columns removes the
directions carrying the least signal; the residual width becomes ``k``, and each RMSNorm's scale
becomes ``sqrt(d / k)`` so its output keeps its scale over the narrower stream.

One rotation serves every layer (the paper uses one per layer and adds a shortcut matrix to every
residual connection): the result is an ordinary Llama-family model with a smaller
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
from tensorpress.progress import track

_READERS = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}
_WRITERS = ("self_attn.o_proj", "mlp.down_proj")


def residual_covariance(model: nn.Module, windows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Sum over block inputs of the residual stream's (uncentred) covariance, each block's
    normalised to unit trace so that the growing norm of deep layers does not dominate."""
    from tensorpress.engine.stats import InputStats  # the engine imports the methods

    per_layer: list[InputStats] = []
    with torch.inference_mode():
        for start in track(range(0, len(windows), batch_size), "measuring the residual stream",
                           total=-(-len(windows) // batch_size)):
            states = model(input_ids=windows[start:start + batch_size], output_hidden_states=True).hidden_states
            for i, h in enumerate(states[:-1]):  # the last entry is after the final norm
                if len(per_layer) <= i:
                    per_layer.append(InputStats(h.shape[-1], frozenset({"xtx"}), h.device))
                per_layer[i].update(h)
    grams = [stats.as_dict()["xtx"] for stats in per_layer]
    return sum(c / torch.trace(c).clamp(min=1e-30) for c in grams)


def _scale_columns(linear: nn.Linear, scale: torch.Tensor) -> None:
    linear.weight.data = (linear.weight.data.double() * scale[None, :]).to(linear.weight.dtype)


def fold_norms(model: nn.Module, blocks: nn.ModuleList) -> None:
    """Fold every RMSNorm's scale into the linears reading it (and untie the LM head)."""
    for block in blocks:
        for norm_name, readers in _READERS.items():
            norm = block.get_submodule(norm_name)
            gamma = norm.weight.data.double().clone()
            for rel in readers:
                _scale_columns(block.get_submodule(rel), gamma)
            norm.weight.data.fill_(1.0)
    head = model.get_output_embeddings()
    final = model.model.norm
    if head.weight is model.get_input_embeddings().weight:  # tied: the head gets its own copy
        head.weight = nn.Parameter(head.weight.data.clone())
        model.config.tie_word_embeddings = False
    _scale_columns(head, final.weight.data.double().clone())
    final.weight.data.fill_(1.0)


def rotate_and_slice(model: nn.Module, blocks: nn.ModuleList, q: torch.Tensor) -> None:
    """Apply ``Q`` (d x k, orthonormal columns) to every reader and writer of the residual
    stream, the embeddings and the LM head; set the RMSNorm scales for width ``k``."""
    d, k = q.shape
    emb = model.get_input_embeddings()
    emb.weight = nn.Parameter((emb.weight.data.double() @ q).to(emb.weight.dtype))
    emb.embedding_dim = k
    readers = [block.get_submodule(rel) for block in blocks for rels in _READERS.values() for rel in rels]
    for linear in [*readers, model.get_output_embeddings()]:
        linear.weight = nn.Parameter((linear.weight.data.double() @ q).to(linear.weight.dtype))
        linear.in_features = k
    for block in blocks:
        for rel in _WRITERS:
            linear = block.get_submodule(rel)
            linear.weight = nn.Parameter((q.T @ linear.weight.data.double()).to(linear.weight.dtype))
            if linear.bias is not None:
                linear.bias = nn.Parameter((linear.bias.data.double() @ q).to(linear.bias.dtype))
            linear.out_features = k
    scale = (d / k) ** 0.5
    for norm in [model.model.norm, *(block.get_submodule(n) for block in blocks for n in _READERS)]:
        norm.weight = nn.Parameter(torch.full((k,), scale, dtype=norm.weight.dtype))


@register_method
class SliceGPT(StructuralMethod):
    name: ClassVar[str] = "slicegpt"
    summary: ClassVar[str] = "rotate the residual stream onto its principal directions (one rotation) and slice the least used (SliceGPT)"
    needs: ClassVar[frozenset[str]] = frozenset({"xtx"})

    method: Literal["slicegpt"] = "slicegpt"
    slicing: float = Field(0.2, ge=0, lt=1, description="fraction of the residual stream's dimensions removed (0 = rotation only)")
    multiple_of: int = Field(8, ge=1, description="keep a multiple of this many dimensions")

    def transform(self, lm: Any, model: nn.Module, calib: Any, batch_size: int) -> dict[str, Any]:
        if lm.adapter.family != "llama" or not hasattr(model, "model") or not hasattr(model.model, "norm"):
            raise RecipeError(f"slicegpt supports Llama-family models (RMSNorm, separate q/k/v); not {model.config.model_type}")
        config = model.config
        d = config.hidden_size
        k = d if self.slicing == 0 else max(self.multiple_of, round((1 - self.slicing) * d / self.multiple_of) * self.multiple_of)
        blocks = lm.adapter.blocks(model)
        windows = self.windows(calib).input_ids
        fold_norms(model, blocks)
        cov = residual_covariance(model, windows, batch_size)  # the stream is unchanged by folding
        evals, evecs = torch.linalg.eigh(cov)
        order = torch.argsort(evals, descending=True)
        q = evecs[:, order[:k]]
        kept_share = float(evals[order[:k]].sum() / evals.sum())
        head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
        rotate_and_slice(model, blocks, q)
        config.hidden_size = k
        config.head_dim = head_dim
        return {"hidden_before": d, "hidden_after": k, "variance_kept": round(kept_share, 5)}
