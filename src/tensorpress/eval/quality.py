"""Quality against data and against a reference model, on the same token windows.

Causal models: perplexity ``exp(mean next-token NLL)`` over every predicted token, and, against
the reference, the mean KL divergence ``KL(P_ref || P_model)`` of the next-token distributions
and the top-1 agreement (how often both models' most likely next token is the same).
Encoders: cosine similarity of mean-pooled sentence embeddings and the MSE of the last hidden
states, against the reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from tensorpress.data import TokenWindows, check_context
from tensorpress.progress import track


@dataclass
class CausalQuality:
    perplexity: float
    reference_perplexity: float | None
    kl: float | None
    top1_agreement: float | None
    tokens: int


@dataclass
class EncoderQuality:
    cosine_similarity: float
    hidden_mse: float
    tokens: int


def _check_fits(seq_len: int, *models: nn.Module | None) -> None:
    for model in models:
        if model is not None:
            check_context(model, seq_len, "evaluation")


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits.float()


@torch.inference_mode()
def causal_quality(
    model: nn.Module,
    windows: TokenWindows,
    reference: nn.Module | None = None,
    batch_size: int = 1,
    reference_cache: dict | None = None,
) -> CausalQuality:
    """``reference_cache``: a dict that keeps the reference's next-token log-probabilities
    (float32, ``tokens x vocab`` per batch: 40 x 512 tokens of a 49k vocabulary take 4 GB) so
    evaluating several models against one reference on the same windows runs it once."""
    _check_fits(windows.seq_len, model, reference)
    nll = ref_nll = kl = agree = 0.0
    tokens = 0
    batches = windows.batches(batch_size)
    device = next(model.parameters()).device
    for ids in track(batches, "evaluating", total=len(batches)):
        ids = ids.to(device)
        targets = ids[:, 1:].reshape(-1)
        logp = torch.log_softmax(_logits(model, ids)[:, :-1], dim=-1).flatten(0, 1)  # (tokens, vocab)
        nll += -logp.gather(1, targets[:, None]).sum().item()
        tokens += targets.numel()
        if reference is not None:
            key = (id(reference), ids.shape, hash(ids.cpu().numpy().tobytes()))
            ref_logp = None if reference_cache is None else reference_cache.get(key)
            if ref_logp is None:
                ref_logp = torch.log_softmax(_logits(reference, ids)[:, :-1], dim=-1).flatten(0, 1)
                if reference_cache is not None:
                    reference_cache[key] = ref_logp
            ref_nll += -ref_logp.gather(1, targets[:, None]).sum().item()
            kl += (ref_logp.exp() * (ref_logp - logp)).sum().item()
            agree += (ref_logp.argmax(-1) == logp.argmax(-1)).sum().item()
    if reference is None:
        return CausalQuality(math.exp(nll / tokens), None, None, None, tokens)
    return CausalQuality(math.exp(nll / tokens), math.exp(ref_nll / tokens), kl / tokens, agree / tokens, tokens)


def wrap_for_encoder(windows: TokenWindows, tokenizer) -> torch.Tensor:
    """Windows of plain tokens -> ``[CLS] tokens [SEP]`` of the same total length."""
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    ids = windows.input_ids
    if cls is None or sep is None:
        return ids
    n = ids.shape[0]
    return torch.cat([torch.full((n, 1), cls), ids[:, : ids.shape[1] - 2], torch.full((n, 1), sep)], dim=1)


@torch.inference_mode()
def encoder_quality(
    model: nn.Module, reference: nn.Module, input_ids: torch.Tensor, batch_size: int = 8
) -> EncoderQuality:
    _check_fits(input_ids.shape[1], model, reference)
    cos_sum = mse_sum = 0.0
    n = 0
    device = next(model.parameters()).device
    batches = list(input_ids.split(batch_size))
    for ids in track(batches, "evaluating", total=len(batches)):
        ids = ids.to(device)
        h = model(input_ids=ids).last_hidden_state.float()  # (batch, seq, hidden)
        h_ref = reference(input_ids=ids).last_hidden_state.float()
        # Every position is a real token (no padding), so mean pooling is a plain mean.
        cos_sum += torch.cosine_similarity(h.mean(1), h_ref.mean(1), dim=-1).sum().item()
        mse_sum += (h - h_ref).square().mean(dim=(1, 2)).sum().item()
        n += ids.shape[0]
    return EncoderQuality(cos_sum / n, mse_sum / n, int(input_ids.numel()))


@torch.inference_mode()
def max_output_difference(model_a: nn.Module, model_b: nn.Module, input_ids: torch.Tensor) -> float:
    """Largest absolute difference between two models' outputs (logits, or last hidden states
    for encoders) on the same tokens: 0.0 means bit-identical."""

    def out(m: nn.Module) -> torch.Tensor:
        o = m(input_ids=input_ids)
        return o.logits if hasattr(o, "logits") and o.logits is not None else o.last_hidden_state

    return (out(model_a) - out(model_b)).abs().max().item()


@dataclass
class RequantizeCost:
    layers: list[str]  # the layers a GGUF export with requantize changes
    quality: CausalQuality | None  # the model as llama.cpp will hold it, against the model itself


def requantize_cost(lm, windows: TokenWindows | None, dtype: str = "f16") -> RequantizeCost:
    """What ``requantize`` costs a GGUF export of ``lm``: its layers without an exact ggml type,
    re-quantized with llama.cpp's rounding (or written dequantized at ``dtype``), measured as
    ``KL(P_lm || P_written)`` and top-1 agreement on ``windows`` (no model run without such
    layers, or without windows)."""
    from tensorpress.io.dense import dense_copy
    from tensorpress.io.gguf import DTYPES
    from tensorpress.io.gguf_layers import requantized_weights

    changed = requantized_weights(lm.model, DTYPES[dtype])
    if not changed or windows is None:
        return RequantizeCost(sorted(changed), None)
    written = dense_copy(lm.model)
    for name, weight in changed.items():
        layer = written.get_submodule(name)
        with torch.no_grad():  # nn.Linear (out, in); GPT-2's Conv1D (in, out)
            layer.weight.copy_(weight if layer.weight.shape == weight.shape else weight.T)
    return RequantizeCost(sorted(changed), causal_quality(written, windows, reference=lm.model))
