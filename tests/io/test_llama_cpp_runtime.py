"""The exported GGUF in llama.cpp itself (llama-cpp-python, `make runtimes`; skipped without it).

llama.cpp quantizes activations to 8 bits inside its quantized matmuls, so its logits agree with
tensorpress' to about a percent, not exactly: the test compares next-token distributions (KL and
top-1) and requires the float32 export to match far more closely than any quantized one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tensorpress as tp

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make runtimes)")


@pytest.fixture(scope="module")
def wide(request):
    import transformers as T

    from conftest import make_tokenizer
    from tensorpress.models import LoadedModel, adapter_for

    config = T.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256, vocab_size=320)
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # larger weights than the default init: distributions far from uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return LoadedModel(model, make_tokenizer(), adapter_for("llama"), "wide")


def log_probs(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)


def llama_cpp_log_probs(path, ids: list[int]) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, n_threads=2, verbose=False)
    try:
        llm.eval(ids)
        return log_probs(np.array(llm.scores[: len(ids)]))
    finally:
        llm.close()


def kl(p: np.ndarray, q: np.ndarray) -> float:
    return float((np.exp(p) * (p - q)).sum(-1).mean())


@pytest.mark.parametrize("fmt", [None, "q8_0", "q4_0", "q4_k", "q6_k", "q3_k"])
def test_llama_cpp_runs_the_export_as_tensorpress_does(tmp_path, wide, fmt):
    lm = wide if fmt is None else tp.compress(wide, tp.Recipe(stages=[{"method": "rtn", "format": fmt}])).model
    path = tp.io.export(lm, tmp_path / "m.gguf", format="gguf", dtype="f32")
    ids = torch.randint(3, 300, (48,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ours = log_probs(lm.model(torch.tensor([ids])).logits[0].numpy())
    theirs = llama_cpp_log_probs(path, ids)
    divergence = kl(ours, theirs)
    agree = float((ours.argmax(-1) == theirs.argmax(-1)).mean())
    # float32: the same arithmetic up to summation order; quantized: llama.cpp's 8-bit activations
    assert divergence < (1e-5 if fmt is None else 2e-2), divergence
    assert agree >= (1.0 if fmt is None else 0.85), agree
    if fmt not in (None, "q8_0"):  # it runs the quantized model, not the float one (8-bit weights: too close to tell)
        dense = log_probs(wide.model(torch.tensor([ids])).logits[0].detach().numpy())
        assert kl(dense, theirs) > 2 * divergence


def test_llama_cpp_sees_a_missing_permutation(tmp_path, wide, monkeypatch):
    """The q/k row order is what llama.cpp itself needs: without it, the float32 file runs a
    different model there."""
    from tensorpress.io import gguf as gguf_export

    monkeypatch.setattr(gguf_export, "rope_rows", lambda n_rows, n_heads: torch.arange(n_rows))
    path = tp.io.export(wide, tmp_path / "m.gguf", format="gguf", dtype="f32")
    ids = torch.randint(3, 300, (48,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ours = log_probs(wide.model(torch.tensor([ids])).logits[0].numpy())
    assert kl(ours, llama_cpp_log_probs(path, ids)) > 1e-3
