"""Structural pruning: smaller ordinary models (depth and FFN width) that reload and export."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T

import tensorpress as tp
from conftest import CAUSAL_ARCHS, MOE_ARCHS, make_tokenizer, tiny_config, tiny_model
from tensorpress.errors import RecipeError
from tensorpress.io import export_hf
from tensorpress.methods.structural.width import refit_output
from tensorpress.models import LoadedModel, adapter_for


def _deep_llama(layers: int = 5) -> LoadedModel:
    config = tiny_config("llama")
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config).eval()
    return LoadedModel(model, make_tokenizer("causal"), adapter_for("llama"), "tiny-llama-deep")


def _recipe(*stages):
    return tp.Recipe.model_validate({"name": "s", "stages": list(stages)})


def _calib(lm, samples=8):
    return tp.data.calibration(lm, source="generated", samples=samples, seq_len=48, seed=0)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("mode", ["individual", "consecutive"])
def test_drop_blocks_gives_a_plain_smaller_model(tmp_path, mode):
    lm = _deep_llama(5)
    result = tp.compress(lm, _recipe({"method": "drop_blocks", "blocks": 2, "mode": mode}), _calib(lm))
    info = result.model.info["structure"][0]
    removed = info["removed_blocks"]
    assert len(removed) == 2 and 4 not in removed  # the last block stays
    if mode == "consecutive":
        assert removed[1] == removed[0] + 1
    model = result.model.model
    assert model.config.num_hidden_layers == 3 and len(model.model.layers) == 3
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
    export_hf(result.model, tmp_path / "hf")
    plain = T.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(3, 300, (1, 9))
    assert torch.equal(_logits(plain, ids), _logits(model, ids))
    cached = plain.generate(ids, max_new_tokens=6, do_sample=False)  # the KV cache indexes the renumbered layers
    assert cached.shape == (1, 15)


def test_linear_bridges_fit_the_removed_runs_and_reload(tmp_path):
    """replace: linear puts one fitted affine map per run of removed blocks: on the calibration
    data the stream leaving the run is closer to the original than with the run simply removed;
    the model generates (a bridge holds no KV cache), reloads from a tensorpress checkpoint with
    identical logits, and export to a plain Hugging Face directory is refused."""
    lm = _deep_llama(6)
    calib = _calib(lm)
    with torch.no_grad():
        original = lm.model(input_ids=calib.input_ids, output_hidden_states=True).hidden_states
    recipe = {"method": "drop_blocks", "blocks": 2, "mode": "consecutive"}
    bridged = tp.compress(lm, _recipe({**recipe, "replace": "linear"}), calib)
    removed = tp.compress(lm, _recipe(recipe), calib)
    run = bridged.model.info["structure"][0]["removed_blocks"]
    assert run == removed.model.info["structure"][0]["removed_blocks"] and bridged.model.info["structure"][0]["bridges"] == [run[0]]
    model = bridged.model.model
    assert len(model.model.layers) == 5 and model.config.num_hidden_layers == 5
    seen = []  # the stream leaving the run: the bridge's output vs the run's input as is
    hook = model.model.layers[run[0]].register_forward_hook(lambda m, args, out: seen.append(out))
    with torch.no_grad():
        model(input_ids=calib.input_ids)
    hook.remove()
    leaving = seen[0]
    target = original[run[-1] + 1]
    assert (leaving - target).square().mean() < 0.8 * (original[run[0]] - target).square().mean()
    attention = [layer.self_attn.layer_idx for layer in model.model.layers if hasattr(layer, "self_attn")]
    assert attention == [0, 1, 2, 3]
    ids = torch.randint(3, 300, (1, 9))
    assert model.generate(ids, max_new_tokens=6, do_sample=False).shape == (1, 15)
    bridged.save(tmp_path / "ckpt")
    again = tp.load_compressed(tmp_path / "ckpt")
    assert torch.equal(_logits(again.model, ids), _logits(model, ids))
    manifest_path = tmp_path / "ckpt" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["bridges"] = [9]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(tp.errors.CheckpointError, match="bridges"):
        tp.load_compressed(tmp_path / "ckpt")
    with pytest.raises(tp.errors.ExportError, match="linear bridges"):
        export_hf(bridged.model, tmp_path / "hf")
    with pytest.raises(RecipeError, match="needs one attention kind in every layer"):
        gemma = tiny_model("gemma3_text")  # a sliding-window and a global layer
        tp.compress(gemma, _recipe({**recipe, "blocks": 1, "replace": "linear"}), _calib(gemma))
    # later stages: quantization skips the bridge; another structural stage is refused
    quantized = tp.compress(lm, _recipe({**recipe, "replace": "linear"}, {"method": "rtn", "bits": 8, "group_size": 16}), calib)
    assert len(quantized.layers) == 4 * 7 and not any(f"layers.{run[0]}." in name for name in quantized.layers)
    with pytest.raises(RecipeError, match="last structural stage"):
        tp.compress(lm, _recipe({**recipe, "replace": "linear"}, {"method": "prune_ffn", "ratio": 0.25}), calib)


def test_drop_blocks_removes_the_block_that_changes_least():
    lm = _deep_llama(4)
    with torch.no_grad():  # block 1 adds (almost) nothing to the residual stream
        lm.model.model.layers[1].self_attn.o_proj.weight.mul_(1e-4)
        lm.model.model.layers[1].mlp.down_proj.weight.mul_(1e-4)
    result = tp.compress(lm, _recipe({"method": "drop_blocks", "blocks": 1}), _calib(lm))
    assert result.model.info["structure"][0]["removed_blocks"] == [1]


def test_refit_lowers_the_output_error_and_the_bias_absorbs_the_removed_mean():
    g = torch.Generator().manual_seed(0)
    tokens, inter, out_f = 600, 40, 12
    x = torch.randn(tokens, inter, generator=g) @ (torch.eye(inter) + 0.4 * torch.randn(inter, inter, generator=g))
    x[:, 5] = 3.0  # a channel that is constant: its contribution is a bias
    w, b = torch.randn(out_f, inter, generator=g), torch.randn(out_f, generator=g)
    keep = torch.tensor([i for i in range(inter) if i % 3 and i != 5])
    gram, total = (x.T @ x).double(), x.sum(0).double()
    target = x @ w.T + b
    errors = {}
    for refit in (False, True):
        new_w, new_b = refit_output(w, b, gram, total, tokens, keep, 1e-6, refit)
        errors[refit] = (x[:, keep] @ new_w.T + new_b - target).square().mean()
    assert errors[True] < 0.7 * errors[False]
    w_only = torch.zeros_like(w)
    w_only[:, 5] = w[:, 5]  # only the constant channel matters: dropping it loses nothing
    new_w, new_b = refit_output(w_only, b, gram, total, tokens, keep, 1e-6, False)
    assert torch.allclose(x[:, keep] @ new_w.T + new_b, x @ w_only.T + b, atol=1e-4)


@pytest.mark.parametrize("arch", [a for a in CAUSAL_ARCHS if a not in MOE_ARCHS])  # MoE: refused, test_builtin_recipes
def test_prune_ffn_shrinks_every_block_and_reloads(tmp_path, arch):
    lm = tiny_model(arch)
    result = tp.compress(lm, _recipe({"method": "prune_ffn", "ratio": 0.3}), _calib(lm))
    info = result.model.info["structure"][0]
    assert info["channels_kept"] < info["channels_before"] and info["channels_kept"] % 8 == 0
    assert sum(p.numel() for p in result.model.model.parameters()) < sum(p.numel() for p in lm.model.parameters())
    result.save(tmp_path / "ckpt")
    again = tp.load_compressed(tmp_path / "ckpt")
    ids = torch.randint(3, 300, (1, 10))
    assert torch.equal(_logits(again.model, ids), _logits(result.model.model, ids))
    export_hf(result.model, tmp_path / "hf")
    plain = T.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert torch.equal(_logits(plain, ids), _logits(result.model.model, ids))


@pytest.mark.parametrize("method", ["prune_ffn", "prune_heads"])
def test_width_pruning_measures_each_block_through_the_pruned_earlier_ones(monkeypatch, method):
    """One pass per block: the Gram matrix a block's refit uses (over its kept channels) is
    exactly that of the final pruned model's inputs to that linear, whatever the batching."""
    from tensorpress.methods.structural import width

    lm = _deep_llama(3)
    calib = _calib(lm, samples=5)
    seen = []
    real = width.refit_output

    def record(weight, bias, gram, total, tokens, keep, damp, refit):
        seen.append((gram[keep][:, keep].clone(), tokens))
        return real(weight, bias, gram, total, tokens, keep, damp, refit)

    monkeypatch.setattr(width, "refit_output", record)
    out_rel = "mlp.down_proj" if method == "prune_ffn" else "self_attn.o_proj"
    result = tp.compress(lm, _recipe({"method": method, "ratio": 0.34}), calib, batch_size=2)
    model = result.model.model
    grams = [torch.zeros_like(g) for g, _ in seen]

    def measure(i, x):
        x = x.reshape(-1, x.shape[-1]).double()
        grams[i] += x.T @ x

    hooks = [block.get_submodule(out_rel).register_forward_pre_hook(lambda m, args, i=i: measure(i, args[0]))
             for i, block in enumerate(model.model.layers)]
    with torch.no_grad():
        model(input_ids=calib.input_ids)
    for h in hooks:
        h.remove()
    assert len(seen) == 3 and all(tokens == 5 * 48 for _, tokens in seen)
    for (expected, _), got in zip(seen, grams, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)


def test_structural_then_quantized_recipe_and_ordering(tmp_path):
    lm = _deep_llama(3)
    result = tp.compress(lm, _recipe({"method": "prune_ffn", "ratio": 0.25}, {"method": "rtn", "bits": 4}), _calib(lm))
    assert result.layers and all(r.shape[0] * r.shape[1] > 0 for r in result.layers.values())
    assert result.model.model.config.intermediate_size == 120
    with pytest.raises(RecipeError, match="must come before"):
        tp.compress(lm, _recipe({"method": "rtn", "bits": 4}, {"method": "drop_blocks", "blocks": 1}), _calib(lm))
    with pytest.raises(RecipeError, match="cannot remove"):
        tp.compress(lm, _recipe({"method": "drop_blocks", "blocks": 3}), _calib(lm))


def test_export_of_a_quantized_model_loads_with_transformers(tmp_path):
    lm = tiny_model("llama")
    result = tp.compress(lm, tp.recipes.get("rtn-w4g128"))
    export_hf(result.model, tmp_path / "hf")
    plain = T.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(3, 300, (1, 8))
    assert torch.allclose(_logits(plain, ids), _logits(result.model.model, ids), atol=1e-5)


def test_cli_export(tmp_path):
    from typer.testing import CliRunner

    from tensorpress.cli import app

    lm = _deep_llama(3)
    tp.compress(lm, _recipe({"method": "drop_blocks", "blocks": 1}), _calib(lm)).save(tmp_path / "ckpt")
    result = CliRunner().invoke(app, ["export", str(tmp_path / "ckpt"), str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    assert T.AutoConfig.from_pretrained(tmp_path / "hf").num_hidden_layers == 2


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_prune_heads_removes_whole_kv_groups(tmp_path, arch):
    lm = tiny_model(arch)  # 4 query heads in 2 KV groups
    result = tp.compress(lm, _recipe({"method": "prune_heads", "ratio": 0.5}), _calib(lm))
    config = result.model.model.config
    assert (config.num_attention_heads, config.num_key_value_heads) == (2, 1)
    attn = result.model.model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape[0] == 2 * config.head_dim and attn.k_proj.weight.shape[0] == config.head_dim
    assert attn.o_proj.weight.shape[1] == 2 * config.head_dim
    export_hf(result.model, tmp_path / "hf")
    plain = T.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(3, 300, (1, 10))
    assert torch.equal(_logits(plain, ids), _logits(result.model.model, ids))
    assert plain.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 14)


def test_prune_heads_refuses_other_families_and_impossible_ratios():
    lm = tiny_model("gpt2")
    with pytest.raises(RecipeError, match="separate q, k and v projections; gpt2 computes them in one fused linear"):
        tp.compress(lm, _recipe({"method": "prune_heads", "ratio": 0.5}), _calib(lm))
    lm = tiny_model("opt")
    with pytest.raises(RecipeError, match="cannot lose whole heads by a config change"):
        tp.compress(lm, _recipe({"method": "prune_heads", "ratio": 0.5}), _calib(lm))
    lm = tiny_model("llama")
    with pytest.raises(RecipeError, match="keeps 0"):
        tp.compress(lm, _recipe({"method": "prune_heads", "ratio": 0.9}), _calib(lm))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_slicegpt_rotation_alone_leaves_the_output_unchanged(arch):
    lm = tiny_model(arch)
    result = tp.compress(lm, _recipe({"method": "slicegpt", "slicing": 0.0}), _calib(lm))
    assert result.model.info["structure"][0]["hidden_after"] == 64
    ids = torch.randint(3, 300, (2, 12))
    assert torch.allclose(_logits(result.model.model, ids), _logits(lm.model, ids), atol=1e-4, rtol=1e-4)


def test_slicegpt_slices_the_stream_and_exports(tmp_path):
    lm = tiny_model("llama")
    result = tp.compress(lm, _recipe({"method": "slicegpt", "slicing": 0.25}), _calib(lm))
    info = result.model.info["structure"][0]
    assert info["hidden_after"] == 48 and 0 < info["variance_kept"] < 1
    model = result.model.model
    assert model.config.hidden_size == 48 and model.get_input_embeddings().weight.shape == (320, 48)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in lm.model.parameters()) + 320 * 64  # head untied
    export_hf(result.model, tmp_path / "hf")
    plain = T.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(3, 300, (1, 10))
    assert torch.equal(_logits(plain, ids), _logits(model, ids))
    with pytest.raises(RecipeError, match="slicegpt does not apply to gpt2: its LayerNorms subtract the mean"):
        gpt2 = tiny_model("gpt2")
        tp.compress(gpt2, _recipe({"method": "slicegpt", "slicing": 0.25}), _calib(gpt2))
    with pytest.raises(RecipeError, match="slicegpt does not apply to gemma3_text: its norms after each branch"):
        gemma = tiny_model("gemma3_text")
        tp.compress(gemma, _recipe({"method": "slicegpt", "slicing": 0.25}), _calib(gemma))


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_trim_vocab_keeps_the_corpus_tokenization_and_its_logits(tmp_path, arch, text_path):
    lm = tiny_model(arch)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the model compresses weights while the engine walks every block", encoding="utf-8")
    calib = tp.data.calibration(lm, source=text_path, samples=2, seq_len=16, seed=0)
    result = tp.compress(lm, _recipe({"method": "trim_vocab", "corpus": str(corpus)}), calib)
    info = result.model.info["structure"][0]
    assert info["vocab_after"] < info["vocab_before"] == 320
    new_tok, old_tok = result.model.tokenizer, lm.tokenizer
    text = corpus.read_text()
    old_ids, new_ids = old_tok(text)["input_ids"], new_tok(text)["input_ids"]
    assert [old_tok.convert_ids_to_tokens(i) for i in old_ids] == [new_tok.convert_ids_to_tokens(i) for i in new_ids]
    keep = torch.tensor([old_tok.convert_tokens_to_ids(new_tok.convert_ids_to_tokens(i)) for i in range(info["vocab_after"])])
    with torch.no_grad():
        if arch == "bert":
            a = result.model.model(input_ids=torch.tensor([new_ids])).last_hidden_state
            b = lm.model(input_ids=torch.tensor([old_ids])).last_hidden_state
            assert torch.allclose(a, b, atol=1e-5)
        else:
            a = _logits(result.model.model, torch.tensor([new_ids]))
            b = _logits(lm.model, torch.tensor([old_ids]))[..., keep]
            assert torch.allclose(a, b, atol=1e-5)
    # text outside the corpus still encodes, without unknown tokens: both tiny tokenizers (the
    # bert one too) are byte-level BPE, whose byte alphabet is kept, so it decodes back exactly
    unseen = new_tok("unseen words still encode", add_special_tokens=False)["input_ids"]
    assert new_tok.unk_token_id not in unseen
    assert new_tok.decode(unseen) == "unseen words still encode"
    result.save(tmp_path / "ckpt")
    again = tp.load_compressed(tmp_path / "ckpt")
    assert again.tokenizer(text)["input_ids"] == new_ids
