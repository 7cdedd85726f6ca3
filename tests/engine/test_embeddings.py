"""Quantized input embeddings (a row lookup of a quantized table), the tied head that reads the
same table, and llama.cpp's file-type mixes (``file_type:``)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers as T
from conftest import make_tokenizer, tiny_model

import tensorpress as tp
from tensorpress.errors import CheckpointError, RecipeError
from tensorpress.io.headers import gguf_header
from tensorpress.methods.quant.file_types import tensor_format, use_more_bits
from tensorpress.models import LoadedModel, adapter_for
from tensorpress.parts import (
    BlockPart,
    CompressedEmbedding,
    CompressedLinear,
    QuantizedPart,
    TiedHead,
)
from tensorpress.parts.block_math import (
    block_format,
    fit_block_grid,
    format_for_width,
    quantize_to_blocks,
)
from tensorpress.parts.quant_math import compute_grid, quantize_with_grid

TABLE = {"method": "rtn", "format": "q8_0", "targets": ["model.embed_tokens"], "ignore": []}
LINEARS = {"method": "rtn", "format": "q4_0"}


def tied_llama() -> LoadedModel:
    config = T.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256, vocab_size=320, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LoadedModel(T.AutoModelForCausalLM.from_config(config).eval(), make_tokenizer(), adapter_for("llama"), "tied")


IDS = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(3))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def test_parts_decode_single_rows_as_the_whole_weight():
    w = torch.randn(50, 64)
    grid = compute_grid(w, 4, 32, False)
    quantized = QuantizedPart(quantize_with_grid(w, grid), grid)
    bgrid = fit_block_grid(w, block_format("q8_0"))
    blocks = BlockPart(quantize_to_blocks(w, bgrid), bgrid)
    rows = torch.tensor([7, 0, 49, 7])
    for part in (quantized, blocks):
        assert torch.equal(part.dense_rows(rows), part.dense()[rows])


def test_a_tied_table_is_compressed_once_and_the_head_reads_it():
    lm = tied_llama()
    result = tp.compress(lm, tp.Recipe(stages=[LINEARS, {**TABLE, "targets": ["re:.*embed.*|lm_head"]}]))
    model = result.model.model
    table, head = model.model.embed_tokens, model.lm_head
    assert isinstance(table, CompressedEmbedding) and isinstance(head, TiedHead) and head.table is table
    assert model.config.tie_word_embeddings
    assert "lm_head" not in result.layers and result.layers["model.embed_tokens"].parts == ["q8_0 (8.5 b/w)"]
    assert torch.equal(table(IDS), table.dense()[IDS])
    hidden = model.model(IDS).last_hidden_state
    assert torch.equal(logits(model), hidden @ table.dense().T)
    # the original model is untouched
    assert isinstance(lm.model.model.embed_tokens, torch.nn.Embedding)
    assert lm.model.lm_head.weight is lm.model.model.embed_tokens.weight


def test_an_untied_head_and_table_are_compressed_apart():
    lm = tiny_model("llama")
    result = tp.compress(lm, tp.Recipe(stages=[{**TABLE, "targets": ["model.embed_tokens", "lm_head"]}]))
    model = result.model.model
    assert isinstance(model.model.embed_tokens, CompressedEmbedding)
    assert isinstance(model.lm_head, CompressedLinear) and not isinstance(model.lm_head, CompressedEmbedding)
    assert set(result.layers) == {"model.embed_tokens", "lm_head"}


def test_default_targets_never_take_the_embeddings():
    for arch in ("llama", "gpt2"):  # gpt2's table (wte) escapes the default ignore
        result = tp.compress(tiny_model(arch), tp.Recipe(stages=[{"method": "rtn", "ignore": []}]))
        assert not any(isinstance(m, CompressedEmbedding) for m in result.model.model.modules()), arch


def test_embeddings_take_calibration_free_methods_only(text_path):
    lm = tied_llama()
    calib = tp.data.calibration(lm, source=text_path, samples=2, seq_len=16, seed=0)
    with pytest.raises(RecipeError, match="input embeddings 'model.embed_tokens'"):
        tp.compress(lm, tp.Recipe(stages=[{"method": "gptq", "targets": ["re:.*embed.*"], "ignore": []}]), calib)


def test_checkpoint_round_trip_keeps_the_tie(tmp_path):
    result = tp.compress(tied_llama(), tp.Recipe(stages=[LINEARS, {**TABLE, "targets": ["re:.*embed.*|lm_head"]}]))
    path = result.save(tmp_path / "ckpt")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["tied_heads"] == {"lm_head": "model.embed_tokens"}
    assert manifest["layers"]["model.embed_tokens"]["role"] == "embedding"
    back = tp.load_compressed(path)
    assert isinstance(back.model.lm_head, TiedHead) and back.model.lm_head.table is back.model.model.embed_tokens
    assert torch.equal(logits(back.model), logits(result.model.model))


def test_a_checkpoint_whose_tie_names_no_table_is_refused(tmp_path):
    result = tp.compress(tied_llama(), tp.Recipe(stages=[LINEARS, {**TABLE, "targets": ["re:.*embed.*|lm_head"]}]))
    path = result.save(tmp_path / "ckpt")
    manifest_path = path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["tied_heads"] = {"lm_head": "model.layers.0.self_attn.q_proj"}
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="tied head 'lm_head'"):
        tp.load_compressed(path)


def test_gguf_export_writes_the_table_once_and_reads_it_back(tmp_path):
    result = tp.compress(tied_llama(), tp.Recipe(stages=[LINEARS, {**TABLE, "targets": ["re:.*embed.*|lm_head"]}]))
    path = tp.io.export(result, tmp_path / "m.gguf", format="gguf")
    tensors = gguf_header(path)["tensors"]
    assert tensors["token_embd.weight"][0] == "Q8_0" and "output.weight" not in tensors
    back = tp.load_compressed(path)  # GGUF in: the file's Q8_0 table as a part, the head tied to it
    table = back.model.model.embed_tokens
    assert isinstance(table, CompressedEmbedding) and isinstance(back.model.lm_head, TiedHead)
    assert torch.equal(table.dense(), result.model.model.model.embed_tokens.dense())
    assert torch.equal(logits(back.model), logits(result.model.model))
    again = tp.io.export(back, tmp_path / "again.gguf", format="gguf")
    import gguf
    import numpy as np

    first, second = ({t.name: np.asarray(t.data).tobytes() for t in gguf.GGUFReader(p).tensors} for p in (path, again))
    assert first == second  # every tensor's bytes (the metadata names another source model)


def test_hf_export_writes_the_dequantized_table_tied(tmp_path):
    result = tp.compress(tied_llama(), tp.Recipe(stages=[LINEARS, {**TABLE, "targets": ["re:.*embed.*|lm_head"]}]))
    out = tp.io.export(result, tmp_path / "hf", format="hf")
    loaded = T.AutoModelForCausalLM.from_pretrained(out)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(logits(loaded), logits(result.model.model))
    deep = copy.deepcopy(result.model.model)  # a model holding a TiedHead deep-copies with its tie
    assert deep.lm_head.table is deep.model.embed_tokens


# -- llama.cpp's file-type mixes ------------------------------------------------------------------

# What llama-cpp-python 0.3.36's quantizer wrote for SmolLM2-135M (30 blocks, 9 query and 3 KV
# heads, rows of 576 and 1536, tied embeddings), read from its files' headers.
SMOLLM2 = {
    "q4_0": {"attn_v": "Q4_0", "ffn_down": "Q4_0", "attn_q": "Q4_0", "token_embd": "Q8_0"},
    "q2_k": {"attn_v": "Q4_0", "ffn_down": "Q3_K", "attn_output": "Q4_0", "ffn_up": "Q4_0", "token_embd": "Q8_0"},
    "q3_k_m": {"attn_v": ["Q5_1"] * 2 + ["Q5_0"] * 28, "ffn_down": ["Q5_K"] + ["Q4_K"] * 29, "attn_output": "Q5_0",
               "attn_q": "Q4_0", "token_embd": "Q8_0"},
    "q4_k_s": {"attn_v": ["Q5_1"] * 4 + ["Q5_0"] * 26, "ffn_down": ["Q5_K"] * 3 + ["Q4_K"] * 27, "attn_k": "Q5_0"},
    "q4_k_m": {"attn_v": [("Q8_0" if i in (0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29) else "Q5_0") for i in range(30)],
               "ffn_down": [("Q6_K" if i in (0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29) else "Q4_K") for i in range(30)],
               "ffn_gate": "Q5_0", "token_embd": "Q8_0"},
    "q5_k_m": {"attn_q": "Q5_1", "ffn_down": [("Q6_K" if use_more_bits(i, 30) else "Q5_K") for i in range(30)]},
    "q6_k": {"attn_v": "Q8_0", "ffn_down": "Q6_K", "token_embd": "Q8_0"},
}
WIDTH = {"attn_q": 576, "attn_k": 576, "attn_v": 576, "attn_output": 576, "ffn_gate": 576, "ffn_up": 576,
         "ffn_down": 1536, "token_embd": 576}


@pytest.mark.parametrize("file_type", sorted(SMOLLM2))
def test_file_type_mix_matches_llama_cpps_choice_on_smollm2(file_type):
    for role, expected in SMOLLM2[file_type].items():
        for layer in range(30):
            want = expected[layer] if isinstance(expected, list) else expected
            chosen = tensor_format(file_type, role, layer, 30, in_features=WIDTH[role], n_gqa=3, tied=True)
            written = format_for_width(block_format(chosen), WIDTH[role]).name
            assert written.upper() == want, (file_type, role, layer)


def test_file_type_resolves_per_tensor_and_fixes_the_grid():
    lm = tied_llama()
    result = tp.compress(lm, tp.Recipe(stages=[{"method": "rtn", "file_type": "q4_k_m"},
                                               {"method": "rtn", "file_type": "q4_k_m", "targets": ["re:.*embed.*|lm_head"],
                                                "ignore": []}]))
    stage = result.recipe.stages[0]
    assert stage.file_type is None and stage.format == "q4_k"
    formats = {name: parts[0] for name, parts in ((n, r.parts) for n, r in result.layers.items())}
    # 64-wide rows are off the 256 grid: llama.cpp's fallbacks (q4_k -> q5_0, q6_k -> q8_0); both blocks of 2 "use more bits"
    assert formats["model.layers.0.self_attn.q_proj"].startswith("q5_0")
    assert formats["model.layers.1.self_attn.v_proj"].startswith("q8_0")
    assert formats["model.embed_tokens"].startswith("q8_0")
    with pytest.raises(RecipeError, match="file_type: q4_k_m chooses every tensor"):
        tp.Recipe(stages=[{"method": "rtn", "file_type": "q4_k_m", "format": "q4_0"}])
    with pytest.raises(RecipeError, match="file_type: q4_k_m chooses every tensor"):
        tp.Recipe(stages=[{"method": "spqr", "file_type": "q4_k_m", "bits": 3}])
