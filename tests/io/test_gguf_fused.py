"""GGUF export of the fused-projection architectures llama.cpp runs: GPT-2 (``Conv1D`` weights,
learned positions) and GPT-NeoX (per-head fused q/k/v, partial rotary, parallel residual).

As in ``test_gguf_export``, the checks are written independently of the exporter: llama.cpp's
tensor names from a table, GPT-2's weights transposed by hand, GPT-NeoX's q/k/v regrouped the way
llama.cpp's converter does it (``reshape(n_head, 3, head_dim, n_embd)``, then q, k, v concatenated).
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from conftest import make_tokenizer, tiny_model
from transformers.pytorch_utils import Conv1D

import tensorpress as tp
from tensorpress.errors import ExportError
from tensorpress.io import gguf as gguf_export
from tensorpress.io.export import dense_copy
from tensorpress.io.gguf import export_gguf
from tensorpress.models import LoadedModel, adapter_for
from tensorpress.parts import CompressedLinear

W4 = {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True}
W8 = {"method": "rtn", "bits": 8, "group_size": 32, "symmetric": True}
Q4_1 = {"method": "rtn", "format": "q4_1"}
TORCH = {"f32": torch.float32, "f16": torch.float16}


def names(arch: str, blocks: int = 2) -> dict[str, str]:
    """llama.cpp tensor name -> transformers module."""
    if arch == "gpt2":
        out = {"token_embd": "transformer.wte", "position_embd": "transformer.wpe", "output_norm": "transformer.ln_f",
               "output": "lm_head"}
        block = {"attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj", "ffn_norm": "ln_2",
                 "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}
        prefix = "transformer.h"
    else:
        out = {"token_embd": "gpt_neox.embed_in", "output_norm": "gpt_neox.final_layer_norm", "output": "lm_head"}
        block = {"attn_norm": "input_layernorm", "attn_qkv": "attention.query_key_value",
                 "attn_output": "attention.dense", "ffn_norm": "post_attention_layernorm",
                 "ffn_up": "mlp.dense_h_to_4h", "ffn_down": "mlp.dense_4h_to_h"}
        prefix = "gpt_neox.layers"
    for b in range(blocks):
        out.update({f"blk.{b}.{k}": f"{prefix}.{b}.{v}" for k, v in block.items()})
    return out


def regroup_qkv(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's converter on GPT-NeoX's query_key_value (weight or bias): per-head q|k|v rows
    to all q rows, then all k rows, then all v rows."""
    per_head = t.reshape(n_head, 3, -1, *t.shape[1:])
    return torch.cat([per_head[:, i].reshape(-1, *t.shape[1:]) for i in range(3)])


def expected_tensor(lm: LoadedModel, module_name: str, suffix: str, dtype: str) -> torch.Tensor:
    module = lm.model.get_submodule(module_name)
    if isinstance(module, CompressedLinear) and suffix == "weight":
        value = module.dense()
    else:
        value = getattr(module, suffix).detach()
        if isinstance(module, Conv1D) and suffix == "weight":
            value = value.T
        value = value.float() if value.dim() == 1 else value.to(TORCH[dtype]).float()
    if lm.model.config.model_type == "gpt_neox" and module_name.endswith("query_key_value"):
        value = regroup_qkv(value, lm.model.config.num_attention_heads)
    return value


def check_file(path, lm: LoadedModel, dtype: str) -> dict[str, str]:
    """Every tensor of the file equals the model's weight as llama.cpp lays it out; returns
    ``{gguf name: ggml type}``."""
    table = names(lm.model.config.model_type)
    types = {}
    for t in gguf.GGUFReader(path).tensors:
        base, suffix = t.name.rsplit(".", 1)
        values = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)))
        expected = expected_tensor(lm, table[base], suffix, dtype)
        assert values.shape == expected.shape, t.name
        assert torch.equal(values, expected), f"{t.name} ({t.tensor_type.name}) differs from the model's weight"
        types[t.name] = t.tensor_type.name
    return types


def compressed(lm, stage):
    return tp.compress(lm, tp.Recipe(stages=[stage])).model


@pytest.fixture(scope="module")
def models():
    return {arch: tiny_model(arch) for arch in ("gpt2", "gpt_neox")}


CASES = [("gpt2", None, "f32", "F32"), ("gpt2", W4, "f16", "Q4_0"), ("gpt2", Q4_1, "f32", "Q4_1"),
         ("gpt_neox", None, "f16", "F16"), ("gpt_neox", W8, "f32", "Q8_0"), ("gpt_neox", W4, "f16", "Q4_0")]


@pytest.mark.parametrize("arch,stage,dtype,qtype", CASES, ids=[f"{c[0]}-{c[3]}" for c in CASES])
def test_tensors_equal_tensorpress_weights_exactly(tmp_path, models, arch, stage, dtype, qtype):
    lm = models[arch] if stage is None else compressed(models[arch], stage)
    types = check_file(export_gguf(lm, tmp_path / "m.gguf", dtype=dtype), lm, dtype)
    linears = [n for n in types if n.endswith(".weight") and any(k in n for k in ("attn_qkv", "attn_output", "ffn_"))
               and "norm" not in n]
    assert len(linears) == 8  # 4 per block
    assert {types[n] for n in linears} == {qtype}
    assert all(t == "F32" for n, t in types.items() if "norm" in n or n.endswith(".bias"))
    # GPT-2's head is tied to token_embd (llama.cpp falls back to it); GPT-NeoX's is its own
    assert ("output.weight" in types) == (arch == "gpt_neox")
    assert ("position_embd.weight" in types) == (arch == "gpt2")


def test_metadata(tmp_path, models):
    reader = gguf.GGUFReader(export_gguf(models["gpt_neox"], tmp_path / "n.gguf"))
    field = {k: reader.fields[k].contents() for k in reader.fields}
    config = models["gpt_neox"].model.config
    assert field["general.architecture"] == "gptneox"
    assert field["gptneox.rope.dimension_count"] == 4  # a quarter of the 16-wide heads rotate
    assert field["gptneox.use_parallel_residual"] is True
    assert field["gptneox.feed_forward_length"] == config.intermediate_size
    assert abs(field["gptneox.attention.layer_norm_epsilon"] - config.layer_norm_eps) < 1e-9
    reader = gguf.GGUFReader(export_gguf(models["gpt2"], tmp_path / "g.gguf"))
    field = {k: reader.fields[k].contents() for k in reader.fields}
    assert field["general.architecture"] == "gpt2"
    assert field["gpt2.context_length"] == 256 and field["gpt2.feed_forward_length"] == 256  # n_inner None: 4 x 64
    assert "gpt2.rope.freq_base" not in field and "gpt2.attention.head_count_kv" not in field


def test_a_tied_gpt_neox_head_is_written_as_output(tmp_path):
    import transformers as T

    config = T.GPTNeoXConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                             max_position_embeddings=256, vocab_size=320, tie_word_embeddings=True)
    torch.manual_seed(0)
    lm = LoadedModel(T.AutoModelForCausalLM.from_config(config).eval(), make_tokenizer(), adapter_for("gpt_neox"), "tied")
    lm = tp.compress(lm, tp.Recipe(stages=[{**W4, "targets": ["re:.*"], "ignore": []}])).model
    reader = gguf.GGUFReader(export_gguf(lm, tmp_path / "t.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    # llama.cpp's gptneox has no fallback to token_embd: the one quantized table is written twice
    assert tensors["output.weight"].tensor_type == tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_0
    assert np.array_equal(np.array(tensors["output.weight"].data), np.array(tensors["token_embd.weight"].data))


def test_the_check_catches_a_missing_qkv_regrouping(tmp_path, models, monkeypatch):
    lm = compressed(models["gpt_neox"], W4)
    monkeypatch.setattr(gguf_export, "head_qkv_rows", lambda n_heads, head_dim: torch.arange(3 * n_heads * head_dim))
    with pytest.raises(AssertionError, match="attn_qkv"):
        check_file(export_gguf(lm, tmp_path / "m.gguf"), lm, "f16")


def test_the_check_catches_an_untransposed_conv1d(tmp_path, models, monkeypatch):
    lm = models["gpt2"]  # dense Conv1D weights (a square c_proj keeps its shape, so the values must tell)
    real = gguf_export._named_weights

    def untransposed(model):
        for name, value in real(model):
            yield name, value.T if name.endswith("attn.c_proj.weight") else value

    monkeypatch.setattr(gguf_export, "_named_weights", untransposed)
    with pytest.raises(AssertionError, match="attn_output"):
        check_file(export_gguf(lm, tmp_path / "m.gguf", dtype="f32"), lm, "f32")


def test_transformers_reads_a_gpt2_file_back_to_the_same_model(tmp_path):
    """transformers' GGUF loader sizes GPT-2's position table from context_length as n_ctx, not
    n_positions, so this model keeps them equal (1024, as every released GPT-2 has them)."""
    import transformers as T

    config = T.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=1024, vocab_size=320, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    lm = LoadedModel(T.AutoModelForCausalLM.from_config(config).eval(), make_tokenizer(), adapter_for("gpt2"), "g")
    lm = compressed(lm, W4)
    path = export_gguf(lm, tmp_path / "m.gguf", dtype="f32")
    back = tp.load_model(str(path))
    ids = torch.tensor([lm.tokenizer("the engine walks every block 12 times.")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(back.model(ids).logits, dense_copy(lm.model)(ids).logits)
    # and as a compressed model: the Conv1D layers come back as the file's Q4_0 blocks
    again = tp.load_compressed(str(path))
    layers = [m for m in again.model.modules() if isinstance(m, CompressedLinear)]
    assert len(layers) == 8 and all(m.parts[0].fmt.name == "q4_0" for m in layers)
    with torch.no_grad():
        assert torch.equal(again.model(ids).logits, back.model(ids).logits)


def test_a_family_llama_cpp_has_no_layout_for_is_named(tmp_path):
    with pytest.raises(ExportError, match="this is a 'opt' model"):
        export_gguf(tiny_model("opt"), tmp_path / "o.gguf")


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
def test_a_narrowed_ffn_exports_with_its_width(tmp_path, models, arch):
    """Structural results llama.cpp's format can express (every block as narrow) are written."""
    lm = models[arch]
    calib = tp.data.calibration(lm, source="generated", samples=8, seq_len=48, seed=0)
    lm = tp.compress(lm, tp.Recipe(stages=[{"method": "prune_ffn", "ratio": 0.3}]), calib).model
    path = export_gguf(lm, tmp_path / "n.gguf", dtype="f32")
    check_file(path, lm, "f32")
    reader = gguf.GGUFReader(path)
    width = lm.info["structure"][0]["channels_kept"]
    assert reader.fields[f"{reader.fields['general.architecture'].contents()}.feed_forward_length"].contents() == width


# --- BERT: an encoder, written for llama.cpp's embeddings with its WordPiece vocabulary ---------

BERT_NAMES = {"token_embd": "embeddings.word_embeddings", "position_embd": "embeddings.position_embeddings",
              "token_types": "embeddings.token_type_embeddings", "token_embd_norm": "embeddings.LayerNorm"}
for _b in range(2):
    BERT_NAMES.update({f"blk.{_b}.{k}": f"encoder.layer.{_b}.{v}" for k, v in {
        "attn_q": "attention.self.query", "attn_k": "attention.self.key", "attn_v": "attention.self.value",
        "attn_output": "attention.output.dense", "attn_output_norm": "attention.output.LayerNorm",
        "ffn_up": "intermediate.dense", "ffn_down": "output.dense", "layer_output_norm": "output.LayerNorm"}.items()})


def wordpiece_bert() -> LoadedModel:
    """A tiny BERT with a WordPiece tokenizer built as BERT's is (BertNormalizer, BertPreTokenizer,
    [CLS] ... [SEP])."""
    import transformers as T
    from conftest import sample_text, tiny_config
    from tokenizers import (
        Tokenizer,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator([sample_text(2000, seed=1)], trainers.WordPieceTrainer(vocab_size=320, special_tokens=specials,
                                                                                   show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer = T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                                          pad_token="[PAD]", mask_token="[MASK]")
    torch.manual_seed(0)
    model = T.AutoModel.from_config(tiny_config("bert")).eval()
    return LoadedModel(model, tokenizer, adapter_for("bert"), "tiny-bert-wordpiece")


@pytest.mark.parametrize("stage,dtype,qtype", [(None, "f32", "F32"), (W4, "f16", "Q4_0"), (W8, "f32", "Q8_0")])
def test_bert_tensors_equal_tensorpress_weights_exactly(tmp_path, stage, dtype, qtype):
    lm = wordpiece_bert()
    lm = lm if stage is None else compressed(lm, stage)
    reader = gguf.GGUFReader(export_gguf(lm, tmp_path / "b.gguf", dtype=dtype))
    types = {}
    for t in reader.tensors:
        base, suffix = t.name.rsplit(".", 1)
        values = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)))
        expected = expected_tensor(lm, BERT_NAMES[base], suffix, dtype)
        assert torch.equal(values, expected), t.name
        types[t.name] = t.tensor_type.name
    linears = [n for n in types if n.endswith(".weight") and "norm" not in n and n.startswith("blk.")]
    assert len(linears) == 12 and {types[n] for n in linears} == {qtype}
    assert len(types) == 3 + 2 + 2 * (6 * 2 + 2 * 2)  # no pooler: llama.cpp's BERT has no tensor for it
    field = {k: reader.fields[k].contents() for k in reader.fields}
    assert field["bert.attention.causal"] is False and field["tokenizer.ggml.model"] == "bert"
    assert field["tokenizer.ggml.token_type_count"] == 2


def test_bert_vocabulary_is_written_for_llama_cpps_wordpiece():
    """WordPiece's ``##`` continuations become bare pieces and word starts get ``▁`` (llama.cpp's
    WPM vocabulary); control tokens stay as they are; [CLS] is prepended, [SEP] appended."""
    import tempfile

    lm = wordpiece_bert()
    with tempfile.TemporaryDirectory() as tmp:
        path = export_gguf(lm, f"{tmp}/b.gguf")
        reader = gguf.GGUFReader(path)
        field = {k: reader.fields[k].contents() for k in reader.fields}
    tokens = field["tokenizer.ggml.tokens"]
    vocab = lm.tokenizer.get_vocab()
    for token, i in vocab.items():
        if token.startswith("[") and token.endswith("]"):
            assert tokens[i] == token
        elif token.startswith("##"):
            assert tokens[i] == token[2:]
        else:
            assert tokens[i] == "\u2581" + token
    assert field["tokenizer.ggml.bos_token_id"] == lm.tokenizer.cls_token_id == 2
    assert field["tokenizer.ggml.seperator_token_id"] == lm.tokenizer.sep_token_id == 3
    assert field["tokenizer.ggml.add_bos_token"] is True and field["tokenizer.ggml.add_sep_token"] is True
    assert field["tokenizer.ggml.normalizer.lowercase"] is True


def test_a_bert_without_a_wordpiece_tokenizer_is_refused(tmp_path):
    with pytest.raises(ExportError, match="WPM vocabulary"):
        export_gguf(tiny_model("bert"), tmp_path / "b.gguf")  # the tiny test BERT has a byte-level BPE tokenizer
    assert list(tmp_path.iterdir()) == []
