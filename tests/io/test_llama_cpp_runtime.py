"""The exported GGUF in llama.cpp itself (llama-cpp-python, `make runtimes`; skipped without it).

llama.cpp quantizes activations to 8 bits inside its quantized matmuls, so its logits agree with
tensorpress' to about a percent, not exactly: the test compares next-token distributions (KL and
top-1) and requires the float32 export to match far more closely than any quantized one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import wide_model

import tensorpress as tp

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make runtimes)")


@pytest.fixture(scope="module")
def wide():
    return wide_model("llama", scale=4.0)


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


@pytest.mark.parametrize("fmt", [None, "q4_0"])
@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
def test_llama_cpp_runs_gpt2_and_gpt_neox_exports(tmp_path, arch, fmt):
    """GPT-2 (Conv1D weights transposed, learned positions) and GPT-NeoX (q/k/v regrouped,
    partial rotary, parallel residual) run in llama.cpp as in tensorpress."""
    wide = wide_model(arch, scale=4.0)
    lm = wide if fmt is None else tp.compress(wide, tp.Recipe(stages=[{"method": "rtn", "format": fmt}])).model
    path = tp.io.export(lm, tmp_path / "m.gguf", format="gguf", dtype="f32")
    ids = torch.randint(3, 300, (48,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ours = log_probs(lm.model(torch.tensor([ids])).logits[0].numpy())
        dense = log_probs(wide.model(torch.tensor([ids])).logits[0].numpy())
    theirs = llama_cpp_log_probs(path, ids)
    divergence = kl(ours, theirs)
    assert divergence < (1e-5 if fmt is None else 2e-3), divergence
    if fmt is not None:
        assert kl(dense, theirs) > 10 * divergence


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


# llama_ftype values (llama.h)
FTYPES = {"q4_0": 2, "q2_k": 10, "q3_k_m": 12, "q4_k_s": 14, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}


def llama_cpp_quantize(src, dst, ftype: int) -> None:
    import ctypes

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0


@pytest.fixture(scope="module")
def mixed_widths():
    """16 blocks (so the _M mixes' choice by block index shows), rows of 320 (off the 256 grid:
    llama.cpp's fallbacks) and 512, a tied head."""
    import transformers as T
    from conftest import make_tokenizer

    from tensorpress.models import LoadedModel, adapter_for

    config = T.LlamaConfig(hidden_size=320, intermediate_size=512, num_hidden_layers=16, num_attention_heads=5,
                           num_key_value_heads=1, max_position_embeddings=256, vocab_size=320, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LoadedModel(T.AutoModelForCausalLM.from_config(config).eval(), make_tokenizer(), adapter_for("llama"), "mixed")


@pytest.mark.parametrize("file_type", sorted(FTYPES))
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_file_type_recipes_give_every_tensor_llama_cpps_type(tmp_path, mixed_widths, file_type, tied):
    """``file_type: X`` quantizes each tensor onto the type llama.cpp's own quantizer gives it in
    an X file: the two files have the same tensor types and the same size."""
    from tensorpress.io.headers import gguf_header

    lm = mixed_widths
    if not tied:
        lm = tp.LoadedModel(copy_untied(lm.model), lm.tokenizer, lm.adapter, "mixed-untied")
    reference = tp.io.export(lm, tmp_path / "f16.gguf", format="gguf", dtype="f16")
    llama_cpp_quantize(reference, tmp_path / "theirs.gguf", FTYPES[file_type])
    recipe = tp.Recipe(stages=[{"method": "rtn", "file_type": file_type},
                               {"method": "rtn", "file_type": file_type, "targets": ["re:.*embed.*|lm_head"], "ignore": []}])
    ours = tp.io.export(tp.compress(lm, recipe), tmp_path / "ours.gguf", format="gguf", dtype="f16")
    types = {path: {k: v[0] for k, v in gguf_header(path)["tensors"].items()} for path in (ours, tmp_path / "theirs.gguf")}
    assert types[ours] == types[tmp_path / "theirs.gguf"]
    assert ("output.weight" in types[ours]) == (not tied)
    assert ours.stat().st_size == (tmp_path / "theirs.gguf").stat().st_size


def copy_untied(model):
    import copy

    model = copy.deepcopy(model)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone() * 0.5)
    return model


def llama_cpp_hidden(path, text: str) -> tuple[list[int], np.ndarray]:
    """llama.cpp's tokens and per-token output states (no pooling) of an encoder GGUF."""
    llm = llama_cpp.Llama(model_path=str(path), embedding=True, n_ctx=256, n_threads=2, verbose=False,
                          pooling_type=llama_cpp.LLAMA_POOLING_TYPE_NONE)
    try:
        return llm.tokenize(text.encode()), np.array(llm.embed(text, normalize=False))
    finally:
        llm.close()


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.mark.parametrize("fmt", [None, "q8_0", "q4_0"])
def test_llama_cpp_runs_a_bert_export_as_tensorpress_does(tmp_path, fmt):
    """The real all-MiniLM-L6-v2 (its WordPiece vocabulary as llama.cpp's WPM one): the same
    tokens, and per-token states as tensorpress computes them (float32: up to llama.cpp's
    tanh GELU against BERT's erf one)."""
    try:
        base = tp.load_model("minilm-l6")
    except tp.errors.ModelNotFoundError as exc:
        pytest.skip(str(exc))
    lm = base if fmt is None else tp.compress(base, tp.Recipe(stages=[{"method": "rtn", "format": fmt}])).model
    path = tp.io.export(lm, tmp_path / "m.gguf", format="gguf", dtype="f32")
    text = "Compression keeps a model's answers while its weights shrink, unbelievably: 4 bits per weight."
    ids, theirs = llama_cpp_hidden(path, text)
    assert ids == lm.tokenizer(text)["input_ids"]
    with torch.no_grad():
        ours = lm.model(torch.tensor([ids])).last_hidden_state[0].numpy()
        dense = base.model(torch.tensor([ids])).last_hidden_state[0].numpy()
    agreement = _cosines(ours, theirs)
    assert agreement.min() > (0.9999 if fmt is None else 0.999), agreement.min()
    if fmt == "q4_0":  # it runs the quantized model, not the float one
        assert (1 - _cosines(dense, theirs)).mean() > 5 * (1 - agreement).mean()
