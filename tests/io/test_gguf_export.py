"""GGUF export: the file read back with ``gguf.GGUFReader`` and ``gguf.quants.dequantize`` (and
through transformers' GGUF loader) holds exactly the weights tensorpress measured.

The checks here are written independently of the exporter: tensor names from a table of
llama.cpp's names, the Q/K row order undone with the inverse of llama.cpp's converter's
permutation, nibble order from a hand-computed block. ``test_the_check_catches_*`` plant a wrong
nibble order and a missing permutation in the exporter and require the checks to fail.
"""

from __future__ import annotations

import json
import logging

import gguf
import numpy as np
import pytest
import torch
from conftest import tiny_model, wide_model
from typer.testing import CliRunner

import tensorpress as tp
from tensorpress.cli import app, main
from tensorpress.errors import ExportError, OutputExistsError
from tensorpress.io import gguf as gguf_export
from tensorpress.io import gguf_blocks
from tensorpress.io.export import dense_copy
from tensorpress.io.gguf import export_gguf
from tensorpress.parts import CompressedLinear, QuantizedPart
from tensorpress.parts.quant_math import QuantGrid

W8 = {"method": "rtn", "bits": 8, "group_size": 32, "symmetric": True}
W4 = {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True}
W4_G64 = {"method": "rtn", "bits": 4, "group_size": 64, "symmetric": True}
W8_ROW = {"method": "rtn", "bits": 8, "group_size": None, "symmetric": True}
W4_ASYM = {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False}
W3 = {"method": "rtn", "bits": 3, "group_size": 32, "symmetric": True}
TORCH = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}

# llama.cpp tensor name -> transformers module (the tiny models have 2 blocks)
GGUF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
for _b in range(2):
    GGUF_NAMES.update({
        f"blk.{_b}.attn_norm": f"model.layers.{_b}.input_layernorm",
        f"blk.{_b}.ffn_norm": f"model.layers.{_b}.post_attention_layernorm",
        f"blk.{_b}.attn_q": f"model.layers.{_b}.self_attn.q_proj",
        f"blk.{_b}.attn_k": f"model.layers.{_b}.self_attn.k_proj",
        f"blk.{_b}.attn_v": f"model.layers.{_b}.self_attn.v_proj",
        f"blk.{_b}.attn_output": f"model.layers.{_b}.self_attn.o_proj",
        f"blk.{_b}.ffn_gate": f"model.layers.{_b}.mlp.gate_proj",
        f"blk.{_b}.ffn_up": f"model.layers.{_b}.mlp.up_proj",
        f"blk.{_b}.ffn_down": f"model.layers.{_b}.mlp.down_proj",
        f"blk.{_b}.attn_q_norm": f"model.layers.{_b}.self_attn.q_norm",
        f"blk.{_b}.attn_k_norm": f"model.layers.{_b}.self_attn.k_norm",
    })


@pytest.fixture(scope="module")
def models():
    return {arch: tiny_model(arch) for arch in ("llama", "mistral", "qwen2", "qwen3")}


def compressed(lm, *stages):
    return tp.compress(lm, tp.Recipe(stages=list(stages))).model


def read(path):
    """``{name: (ggml type name, float32 tensor as the file's rows)}`` through gguf's reader."""
    reader = gguf.GGUFReader(path)
    return reader, {t.name: (t.tensor_type.name, torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type))))
                    for t in reader.tensors}


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's converter: its ``reshape(n_heads, 2, d/2, ...).swapaxes(1, 2)`` put each
    head's rows in the order x0 y0 x1 y1 ...; read them as (n_heads, d/2, 2) and swap back."""
    return w.reshape(n_heads, -1, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def check_file(path, lm, dtype: str) -> dict[str, str]:
    """Assert that every tensor of the GGUF at ``path`` equals ``lm``'s weight exactly:
    compressed linears as tensorpress dequantizes them, dense weights at ``dtype`` (1-D ones at
    float32). Returns ``{gguf name: ggml type}``."""
    config = lm.model.config
    _, tensors = read(path)
    modules = dict(lm.model.named_modules())
    types = {}
    for full, (qtype, values) in tensors.items():
        base, suffix = full.rsplit(".", 1)
        module = modules[GGUF_NAMES[base]]
        if isinstance(module, CompressedLinear) and suffix == "weight":
            expected = module.dense()
        else:
            param = getattr(module, suffix).detach()
            expected = param.float() if param.dim() == 1 else param.to(TORCH[dtype]).float()
        if config.model_type in ("llama", "mistral") and base.endswith(("attn_q", "attn_k")):
            heads = config.num_attention_heads if base.endswith("attn_q") else config.num_key_value_heads
            values = unpermute(values, heads)
        assert values.shape == expected.shape, full
        assert torch.equal(values, expected), f"{full} ({qtype}) differs from the model's weight"
        types[full] = qtype
    return types


CASES = [("llama", W4, "f16", "Q4_0"), ("llama", W8, "bf16", "Q8_0"), ("mistral", W4_G64, "f32", "Q4_0"),
         ("qwen2", W8_ROW, "f16", "Q8_0"), ("qwen3", W4, "bf16", "Q4_0")]


@pytest.mark.parametrize("arch,stage,dtype,qtype", CASES, ids=[f"{c[0]}-{c[3]}-{c[2]}" for c in CASES])
def test_tensors_equal_tensorpress_weights_exactly(tmp_path, models, arch, stage, dtype, qtype):
    lm = compressed(models[arch], stage)
    types = check_file(export_gguf(lm, tmp_path / "m.gguf", dtype=dtype), lm, dtype)
    linears = {name: t for name, t in types.items() if ".attn_" in name and "norm" not in name or ".ffn_" in name and "norm" not in name}
    assert len(linears) == 14 + (6 if arch == "qwen2" else 0)  # 7 per block (+ q/k/v biases)
    assert {t for name, t in linears.items() if name.endswith(".weight")} == {qtype}
    assert types["token_embd.weight"] == types["output.weight"] == dtype.upper()
    assert all(t == "F32" for name, t in types.items() if "norm" in name or name.endswith(".bias"))


def test_uncompressed_model_exports_at_dtype(tmp_path, models):
    lm = models["llama"]
    types = check_file(export_gguf(lm, tmp_path / "ref.gguf", dtype="f32"), lm, "f32")
    assert set(types.values()) == {"F32"} and len(types) == 21


def test_tied_embeddings_omit_the_output_tensor(tmp_path):
    import transformers as T
    from conftest import make_tokenizer

    from tensorpress.models import LoadedModel, adapter_for

    config = T.Qwen2Config(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256, vocab_size=320, tie_word_embeddings=True)
    torch.manual_seed(0)
    lm = LoadedModel(T.AutoModelForCausalLM.from_config(config).eval(), make_tokenizer(), adapter_for("qwen2"), "tied")
    lm = compressed(lm, W4)
    reader, _ = read(export_gguf(lm, tmp_path / "tied.gguf"))
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names and "token_embd.weight" in names
    check_file(tmp_path / "tied.gguf", lm, "f16")


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_transformers_reads_the_file_back_to_the_same_model(tmp_path, models, arch):
    """A second, independent reader: transformers' GGUF loader (llama.cpp's names, metadata,
    its own inverse permutation and tokenizer rebuild), as ``tp.load_model`` uses it."""
    lm = compressed(models[arch], W4)
    back = tp.load_model(str(export_gguf(lm, tmp_path / "m.gguf", dtype="f32")))
    text = "the engine walks every block 12 times."
    ids = lm.tokenizer(text)["input_ids"]
    assert back.tokenizer(text)["input_ids"] == ids
    with torch.no_grad():
        ids = torch.tensor([ids])
        assert torch.equal(back.model(ids).logits, dense_copy(lm.model)(ids).logits)


def _field(reader, key):
    return reader.fields[key].contents()


def test_metadata_and_tokenizer(tmp_path, models):
    lm = compressed(models["llama"], W4)
    lm.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    try:
        reader, _ = read(export_gguf(lm, tmp_path / "m.gguf"))
    finally:
        lm.tokenizer.chat_template = None
    expected = {
        "general.architecture": "llama", "llama.block_count": 2, "llama.context_length": 256,
        "llama.embedding_length": 64, "llama.feed_forward_length": 160, "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2, "llama.rope.freq_base": 10000.0, "llama.rope.dimension_count": 16,
        "llama.attention.key_length": 16, "llama.vocab_size": 320, "general.file_type": gguf.LlamaFileType.MOSTLY_Q4_0,
        "general.quantization_version": gguf.GGML_QUANT_VERSION, "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    }
    assert {key: _field(reader, key) for key in expected} == expected
    assert _field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    tok = lm.tokenizer
    assert _field(reader, "tokenizer.ggml.tokens") == tok.convert_ids_to_tokens(list(range(320)))
    assert _field(reader, "tokenizer.ggml.token_type")[:4] == [3, 3, 3, 1]  # <unk> <s> </s> are control tokens
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    assert _field(reader, "tokenizer.ggml.merges") == [" ".join(pair) for pair in merges] and len(merges) > 10


def test_qwen2_metadata_has_no_llama_keys(tmp_path, models):
    reader, _ = read(export_gguf(compressed(models["qwen2"], W8), tmp_path / "q.gguf"))
    assert _field(reader, "general.architecture") == "qwen2"
    assert _field(reader, "qwen2.attention.head_count_kv") == 2 and _field(reader, "general.file_type") == 7
    assert not any(key.startswith("llama.") for key in reader.fields)
    assert "qwen2.rope.dimension_count" not in reader.fields and "qwen2.vocab_size" not in reader.fields


def test_q4_0_nibble_order_by_hand():
    """Block of codes 0..15, 15..0 (4-bit symmetric, zero 8): byte j holds element j low and j+16 high."""
    codes = torch.cat([torch.arange(16), torch.arange(15, -1, -1)]).to(torch.uint8)[None]
    scales = torch.tensor([[0.5]], dtype=torch.float16)
    grid = gguf_blocks.block_grid(codes, scales, torch.full((1, 1), 8.0), 32)
    data = gguf_blocks.encode(gguf_blocks.Q4_0, grid)
    assert data.tobytes() == bytes([0x00, 0x38]) + bytes(j | ((15 - j) << 4) for j in range(16))  # d = 0.5 = 0x3800


def test_q4_1_for_an_asymmetric_grid_whose_minima_are_float16(tmp_path, models):
    lm = compressed(models["llama"], W4)
    layer = lm.model.model.layers[0].mlp.up_proj
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (160, 64), generator=gen, dtype=torch.uint8)
    scales = (2.0 ** -torch.randint(4, 9, (160, 2), generator=gen)).to(torch.float16)  # -zero*scale is exact
    zeros = torch.randint(0, 16, (160, 2), generator=gen, dtype=torch.uint8)
    layer.parts[0] = QuantizedPart(codes, QuantGrid(scales, zeros, 4, 32, False))
    types = check_file(export_gguf(lm, tmp_path / "m.gguf"), lm, "f16")
    assert types["blk.0.ffn_up.weight"] == "Q4_1" and types["blk.0.ffn_down.weight"] == "Q4_0"


@pytest.mark.parametrize("stage,grid", [(W4_ASYM, "int4 g32 asym"), (W3, "int3 g32 sym")])
def test_grids_without_a_type_of_their_own_are_refused(tmp_path, models, stage, grid):
    lm = compressed(models["llama"], stage)
    with pytest.raises(ExportError) as info:
        export_gguf(lm, tmp_path / "m.gguf")
    message = str(info.value)
    assert message.startswith(f"model.layers.0.self_attn.q_proj ({grid}) has no exact llama.cpp type")
    assert "`bits: 4, symmetric: true, group_size: 32` (Q4_0)" in message and "13 more layers" in message
    assert "requantize=True" in message and "exactly as" in message
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_requantize_widens_exactly_or_requantizes(tmp_path, models, caplog):
    lm = compressed(models["llama"], W3)
    with caplog.at_level(logging.WARNING, logger="tensorpress.io.gguf_layers"):
        types = check_file(export_gguf(lm, tmp_path / "w3.gguf", requantize=True), lm, "f16")
    assert types["blk.1.ffn_down.weight"] == "Q4_0"  # 3-bit codes, same weights, in 4-bit blocks
    assert "model.layers.1.mlp.down_proj" in caplog.text and "written exactly as Q4_0" in caplog.text
    types = check_file(export_gguf(compressed(models["llama"], W4_ASYM), tmp_path / "a.gguf", requantize=True),
                       compressed(models["llama"], W4_ASYM), "f16")
    assert types["blk.0.attn_q.weight"] == "Q8_0"

    lm = compressed(models["llama"], {**W4, "group_size": 48})  # blocks would straddle groups: not exact
    export_gguf(lm, tmp_path / "g48.gguf", requantize=True)
    _, tensors = read(tmp_path / "g48.gguf")
    qtype, values = tensors["blk.0.ffn_up.weight"]
    weight = lm.model.model.layers[0].mlp.up_proj.dense()
    assert qtype == "Q8_0" and not torch.equal(values, weight)
    assert (values - weight).abs().max() <= weight.abs().max() / 127  # llama.cpp's own Q8_0 rounding


def test_requantize_cost_is_the_written_files_kl(tmp_path, models, text_path):
    """The KL ``requantize`` reports is that of the file: transformers reading the float32
    export back runs the same model the cost was measured on."""
    from tensorpress.eval.quality import causal_quality, requantize_cost

    windows = tp.data.evaluation(models["llama"], text_path, seq_len=64, windows=3)
    exact = requantize_cost(compressed(models["llama"], W3), windows)  # widened to Q4_0: nothing changes
    assert exact.layers == [] and exact.quality is None
    lm = compressed(models["llama"], {**W4, "group_size": 48})
    cost = requantize_cost(lm, windows, dtype="f32")
    assert len(cost.layers) == 14 and "model.layers.0.mlp.up_proj" in cost.layers
    assert cost.quality.kl > 0 and cost.quality.top1_agreement > 0.5
    back = tp.load_model(str(export_gguf(lm, tmp_path / "g48.gguf", dtype="f32", requantize=True)))
    measured = causal_quality(back.model, windows, reference=lm.model)
    assert measured.kl == pytest.approx(cost.quality.kl, rel=1e-4, abs=1e-9)
    assert measured.perplexity == pytest.approx(cost.quality.perplexity, rel=1e-5)


def test_cli_requantize_prints_its_cost(tmp_path, models, text_path):
    ckpt = tp.compress(models["llama"], tp.Recipe(stages=[{**W4, "group_size": 48}])).save(tmp_path / "ckpt")
    done = CliRunner().invoke(app, ["export", str(ckpt), str(tmp_path / "m.gguf"), "--format", "gguf", "--requantize",
                                    "--data", str(text_path), "--cost-windows", "2"], terminal_width=250)
    assert done.exit_code == 0, done.output
    assert "--requantize changed 14 layers" in done.output and "KL " in done.output and "top-1 agreement" in done.output
    ckpt = tp.compress(models["llama"], tp.Recipe(stages=[W3])).save(tmp_path / "w3")
    done = CliRunner().invoke(app, ["export", str(ckpt), str(tmp_path / "w3.gguf"), "--format", "gguf", "--requantize",
                                    "--data", str(text_path)], terminal_width=250)
    assert done.exit_code == 0, done.output
    assert "changed no weights" in done.output


def test_the_check_catches_a_missing_permutation(tmp_path, models, monkeypatch):
    lm = compressed(models["llama"], W4)
    monkeypatch.setattr(gguf_export, "rope_rows", lambda n_rows, n_heads: torch.arange(n_rows))
    with pytest.raises(AssertionError, match="attn_q.weight"):
        check_file(export_gguf(lm, tmp_path / "m.gguf"), lm, "f16")


def test_the_check_catches_a_wrong_nibble_order(tmp_path, models, monkeypatch):
    lm = compressed(models["llama"], W4)
    swapped = lambda v: (v[..., 16:] | (v[..., :16] << 4)).to(torch.uint8).numpy()
    monkeypatch.setattr(gguf_blocks, "_nibbles", swapped)
    with pytest.raises(ExportError, match="does not decode to the layer's weights bit for bit"):
        export_gguf(lm, tmp_path / "m.gguf")  # the exporter's own check
    monkeypatch.setattr("tensorpress.io.gguf_layers.bit_equal", lambda a, b: True)
    with pytest.raises(AssertionError, match="differs from the model's weight"):
        check_file(export_gguf(lm, tmp_path / "m.gguf"), lm, "f16")  # and the test's, independently


def test_output_path_rules(tmp_path, models):
    lm = models["llama"]
    target = tmp_path / "m.gguf"
    export_gguf(lm, target, dtype="f32")
    with pytest.raises(OutputExistsError, match="already exists"):
        export_gguf(lm, target)
    export_gguf(lm, target, overwrite=True)
    assert gguf.GGUFReader(target).tensors[0].tensor_type.name == "F16"
    with pytest.raises(OutputExistsError, match="is a directory"):
        export_gguf(lm, tmp_path)
    with pytest.raises(ExportError, match="accepted: f32, f16, bf16"):
        export_gguf(lm, tmp_path / "x.gguf", dtype="q4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no temporary files left


def test_cli_export_gguf_and_hf(tmp_path, models, capsys):
    result = tp.compress(models["llama"], tp.Recipe(stages=[W4]))
    ckpt = result.save(tmp_path / "ckpt")
    runner = CliRunner()
    done = runner.invoke(app, ["export", str(ckpt), str(tmp_path / "m.gguf"), "--format", "gguf"], terminal_width=200)
    assert done.exit_code == 0, done.output
    assert "14 Q4_0" in done.output and "load it with llama.cpp" in done.output
    check_file(tmp_path / "m.gguf", tp.load_compressed(ckpt), "f16")
    done = runner.invoke(app, ["export", str(ckpt), str(tmp_path / "hf")], terminal_width=200)
    assert done.exit_code == 0 and (tmp_path / "hf" / "config.json").is_file()

    with pytest.raises(SystemExit) as info:
        main(["export", str(ckpt), str(tmp_path / "hf2"), "--dtype", "bf16"])
    assert info.value.code == 2 and "--dtype does not apply to --format hf" in capsys.readouterr().err
    bad = tp.compress(models["llama"], tp.Recipe(stages=[W3])).save(tmp_path / "w3")
    with pytest.raises(SystemExit) as info:
        main(["export", str(bad), str(tmp_path / "w3.gguf"), "--format", "gguf"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "int3 g32 sym" in err and "--requantize" in err and "Traceback" not in err


def test_pre_tokenizer_names_from_tokenizer_structure():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    from tensorpress.io.gguf_vocab import (
        _LLAMA3_SPLIT,
        _QWEN2_SPLIT,
        pre_tokenizer_name,
    )

    def name(pre):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre
        return pre_tokenizer_name(json.loads(tok.to_str()))

    def split(regex):
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])

    assert name(pre_tokenizers.ByteLevel(add_prefix_space=False)) == "gpt-2"
    assert name(pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                         pre_tokenizers.ByteLevel(add_prefix_space=False)])) == "smollm"
    assert name(split(_LLAMA3_SPLIT)) == "llama-bpe" and name(split(_QWEN2_SPLIT)) == "qwen2"
    with pytest.raises(ExportError, match="llama.cpp would split text differently"):
        name(pre_tokenizers.ByteLevel(add_prefix_space=True))  # a leading space llama.cpp would not add
    with pytest.raises(ExportError, match="Whitespace"):
        name(pre_tokenizers.Whitespace())


# --- block formats (quantizers run with ``format:``): llama.cpp's own types, K-quants included ---

ALL_FORMATS = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "iq4_nl", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]


@pytest.fixture(scope="module")
def wide_llama():
    """Rows of 256 and 512 weights: every linear splits into the K formats' 256-weight blocks."""
    return wide_model("llama")


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_every_block_format_is_written_as_its_own_type_exactly(tmp_path, wide_llama, fmt):
    lm = compressed(wide_llama, {"method": "rtn", "format": fmt, "mse": fmt.endswith("_k")})
    types = check_file(export_gguf(lm, tmp_path / "m.gguf"), lm, "f16")
    linears = {t for name, t in types.items() if name.startswith("blk.") and "norm" not in name}
    assert linears == {fmt.upper()}
    reader, _ = read(tmp_path / "m.gguf")
    expected_label = {"q3_k": "MOSTLY_Q3_K_S", "q4_k": "MOSTLY_Q4_K_S", "q5_k": "MOSTLY_Q5_K_S"}.get(fmt, f"MOSTLY_{fmt.upper()}")
    assert _field(reader, "general.file_type") == gguf.LlamaFileType[expected_label]


def test_gptq_k_quant_mix_exports_exactly(tmp_path, wide_llama, text_path):
    """GPTQ on the two-level grid, with llama.cpp's q4_k_m choice of q6_k for v_proj and down_proj."""
    calib = tp.data.calibration(wide_llama, text_path, samples=4, seq_len=32)
    stage = {"method": "gptq", "format": "q4_k", "format_overrides": {"v_proj": "q6_k", "down_proj": "q6_k"}}
    lm = tp.compress(wide_llama, tp.Recipe(stages=[stage]), calib).model
    types = check_file(export_gguf(lm, tmp_path / "m.gguf"), lm, "f16")
    assert {t for n, t in types.items() if n.endswith(("attn_v.weight", "ffn_down.weight"))} == {"Q6_K"}
    assert {t for n, t in types.items() if n.endswith(("attn_q.weight", "attn_k.weight", "ffn_up.weight"))} == {"Q4_K"}


def test_rows_off_the_256_grid_take_llama_cpps_fallback_type(tmp_path, models):
    lm = compressed(models["llama"], {"method": "rtn", "format": "q4_k"})  # rows of 64 and 160
    types = check_file(export_gguf(lm, tmp_path / "m.gguf"), lm, "f16")
    assert {t for name, t in types.items() if name.startswith("blk.") and "norm" not in name} == {"Q5_0"}


@pytest.mark.parametrize("fmt,field", [("q4_k", "_k_scales"), ("q3_k", "_q3_scales"), ("q6_k", "_halves")])
def test_the_check_catches_a_wrong_k_layout(tmp_path, wide_llama, monkeypatch, fmt, field):
    lm = compressed(wide_llama, {"method": "rtn", "format": fmt})
    right = getattr(gguf_blocks, field)
    monkeypatch.setattr(gguf_blocks, field, lambda *a: right(*a)[:, ::-1].copy())  # bytes in reverse order
    with pytest.raises(ExportError, match="does not decode to the layer's weights bit for bit"):
        export_gguf(lm, tmp_path / "m.gguf")
    monkeypatch.setattr("tensorpress.io.gguf_layers.bit_equal", lambda a, b: True)
    with pytest.raises(AssertionError, match="differs from the model's weight"):
        check_file(export_gguf(lm, tmp_path / "m.gguf"), lm, "f16")


def test_tp_io_export_dispatches_by_format(tmp_path, models):
    result = tp.compress(models["llama"], tp.Recipe(stages=[{"method": "rtn", "format": "q4_0"}]))
    path = tp.io.export(result, tmp_path / "m.gguf", format="gguf")  # a CompressionResult is accepted too
    assert set(check_file(path, result.model, "f16").values()) >= {"Q4_0"}
    hf = tp.io.export(result.model, tmp_path / "hf", format="hf")
    assert (hf / "config.json").is_file()
    with pytest.raises(ExportError, match="accepted: hf, gguf, compressed-tensors, gptq"):
        tp.io.export(result, tmp_path / "x", format="onnx")
    with pytest.raises(ExportError, match="do not apply to format 'hf'"):
        tp.io.export(result, tmp_path / "y", format="hf", dtype="f16")
    with pytest.raises(ExportError, match="not str"):
        tp.io.export("out/w4", tmp_path / "z")


@pytest.mark.parametrize("fmt", ["q4_0", "q5_1", "iq4_nl", "q3_k", "q4_k", "q6_k"])
def test_a_gguf_file_loads_back_as_the_same_compressed_model(tmp_path, wide_llama, fmt):
    """GGUF in: the file's codes and scales become BlockParts again (q/k rows unpermuted), the
    same weights bit for bit, the same bits/weight; re-exporting writes the same tensor bytes."""
    lm = compressed(wide_llama, {"method": "rtn", "format": fmt})
    path = export_gguf(lm, tmp_path / "m.gguf", dtype="f32")
    back = tp.load_compressed(path)
    ours = {n: m for n, m in lm.model.named_modules() if isinstance(m, CompressedLinear)}
    theirs = {n: m for n, m in back.model.named_modules() if isinstance(m, CompressedLinear)}
    assert set(ours) == set(theirs) and len(ours) == 14
    for name, module in ours.items():
        part = theirs[name].parts[0]
        assert part.fmt.name == fmt and part.nbits() == module.parts[0].nbits()
        assert torch.equal(part.codes, module.parts[0].codes), name
        assert torch.equal(theirs[name].dense(), module.dense()), name
    again = export_gguf(back, tmp_path / "again.gguf", dtype="f32")
    first, second = gguf.GGUFReader(path), gguf.GGUFReader(again)
    assert all(np.array_equal(a.data, b.data) for a, b in zip(first.tensors, second.tensors, strict=True))


def test_cli_inspects_and_evaluates_a_gguf_file(tmp_path, models, text_path):
    result = tp.compress(models["llama"], tp.Recipe(stages=[{"method": "rtn", "format": "q4_k"}]))
    path = tp.io.export(result, tmp_path / "k.gguf", format="gguf")
    runner = CliRunner()
    shown = runner.invoke(app, ["inspect", str(path)], terminal_width=200)
    assert shown.exit_code == 0, shown.output
    row = next(line for line in shown.output.splitlines() if "Q5_0" in line)  # q4_k's fallback on 64/160-wide rows
    assert "14" in row and "5.5" in row
    per_tensor = runner.invoke(app, ["inspect", str(path), "--tensors"], terminal_width=200).output
    assert "blk.0.attn_q.weight" in per_tensor
    evaluated = runner.invoke(app, ["eval", str(path), "--no-reference", "--data", str(text_path), "--windows", "2",
                                    "--seq-len", "32", "--json", str(tmp_path / "r.json")], terminal_width=200)
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads((tmp_path / "r.json").read_text())
    dequantized = tp.load_model(str(path))  # the same weights, every tensor dense
    own = tp.evaluate(dequantized, data=tp.data.evaluation(dequantized, text_path, seq_len=32, windows=2))
    assert report["perplexity"] == pytest.approx(own.perplexity, rel=1e-6)
    assert report["bits_per_weight_linears"] == 5.5  # the file's Q5_0 blocks, counted as parts
