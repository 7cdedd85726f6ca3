"""compressed-tensors and GPTQ checkpoint exports: the files decode, by each format's own
documented formula, to exactly the weights tensorpress evaluated, and transformers loads them."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file
from typer.testing import CliRunner

import tensorpress as tp
from tensorpress.cli import app, main
from tensorpress.errors import ExportError
from tensorpress.io import gptq_format
from tensorpress.parts import CompressedLinear

pytest.importorskip("compressed_tensors")

W4_G32 = {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True}
W4_G32_ASYM = {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False}
W8_ROW = {"method": "rtn", "bits": 8, "group_size": None, "symmetric": True}
W4_G64 = {"method": "rtn", "bits": 4, "group_size": 64, "symmetric": True}  # 160 inputs of down_proj: 64 + 64 + 32
W3_G32 = {"method": "rtn", "bits": 3, "group_size": 32, "symmetric": True}
W2_G32_ASYM = {"method": "rtn", "bits": 2, "group_size": 32, "symmetric": False}
TORCH = {"f16": torch.float16, "f32": torch.float32}


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def compress(lm, *stages):
    return tp.compress(lm, tp.Recipe(stages=list(stages))).model


def layers(lm) -> dict[str, CompressedLinear]:
    return {n: m for n, m in lm.model.named_modules() if isinstance(m, CompressedLinear)}


def config_of(path) -> dict:
    return json.loads((path / "config.json").read_text())["quantization_config"]


# -- compressed-tensors ------------------------------------------------------------------------

def ct_decode(tensors: dict[str, torch.Tensor], prefix: str, scheme) -> torch.Tensor:
    """One layer decoded by compressed-tensors' own decompressor, in the dtype of its scales."""
    from compressed_tensors.compressors.pack_quantized.base import (
        PackedQuantizationCompressor,
    )

    local = {k.removeprefix(prefix + "."): v for k, v in tensors.items() if k.startswith(prefix + ".")}
    return PackedQuantizationCompressor.decompress(local, scheme)["weight"]


def ct_schemes(path) -> dict:
    from compressed_tensors.quantization import QuantizationConfig

    config = QuantizationConfig.model_validate(config_of(path))
    return {target: scheme for scheme in config.config_groups.values() for target in scheme.targets}


CT_CASES = [(W4_G32, "f32"), (W4_G32, "f16"), (W4_G32_ASYM, "f32"), (W8_ROW, "f16"), (W2_G32_ASYM, "f16")]


@pytest.mark.parametrize("stage,dtype", CT_CASES, ids=[f"w{s['bits']}-{s['group_size']}-{'sym' if s['symmetric'] else 'asym'}-{d}"
                                                      for s, d in CT_CASES])
def test_compressed_tensors_decode_to_tensorpress_weights_exactly(tmp_path, llama, stage, dtype):
    lm = compress(llama, stage)
    out = tp.io.export(lm, tmp_path / "ct", format="compressed-tensors", dtype=dtype)
    tensors = load_file(out / "model.safetensors")
    schemes = ct_schemes(out)
    for name, layer in layers(lm).items():
        assert f"{name}.weight" not in tensors
        assert tensors[f"{name}.weight_packed"].dtype == torch.int32
        assert (f"{name}.weight_zero_point" in tensors) == (not stage["symmetric"])
        decoded = ct_decode(tensors, name, schemes[name])
        assert decoded.dtype == TORCH[dtype]
        # compressed-tensors multiplies in the scales' type: one rounding of the exact product
        assert torch.equal(decoded, layer.dense().to(TORCH[dtype])), name
    config = config_of(out)
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert config["quantization_status"] == "compressed"
    assert config["ignore"] == ["lm_head"]
    (group,) = config["config_groups"].values()
    weights = group["weights"]
    assert (weights["num_bits"], weights["symmetric"], weights["group_size"]) == (
        stage["bits"], stage["symmetric"], stage["group_size"])
    assert weights["strategy"] == ("channel" if stage["group_size"] is None else "group")


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_transformers_loads_the_compressed_tensors_directory(tmp_path, llama, dtype):
    from transformers import AutoModelForCausalLM

    lm = compress(llama, W4_G32)
    out = tp.io.export(lm, tmp_path / "ct", format="compressed-tensors", dtype=dtype)
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        theirs = loaded(ids).logits.float()  # (the first forward pass decompresses the weights)
        ours = lm.model(ids).logits.float()
    modules = dict(loaded.named_modules())
    for name, layer in layers(lm).items():
        assert torch.equal(modules[name].weight.detach(), layer.dense().to(TORCH[dtype])), name
    if dtype == "f32":
        assert torch.equal(theirs, ours)
    else:  # the same weights, computed in float16
        assert (theirs - ours).abs().max() < 2e-2 * ours.abs().max()


def test_mixed_schemes_get_a_config_group_each_and_dense_layers_are_ignored(tmp_path, llama, caplog):
    lm = compress(llama,
                  {**W4_G32, "targets": ["self_attn.*"]},
                  {**W8_ROW, "targets": ["up_proj", "gate_proj"]},
                  {"method": "magnitude", "sparsity": 0.5, "targets": ["down_proj"]})
    with caplog.at_level(logging.WARNING):
        out = tp.io.export(lm, tmp_path / "ct", format="compressed-tensors", dtype="f32")
    assert "written dense" in caplog.text
    config = config_of(out)
    targets = {g["weights"]["num_bits"]: g["targets"] for g in config["config_groups"].values()}
    assert sorted(targets) == [4, 8]
    assert all("self_attn" in t for t in targets[4]) and all("mlp" in t for t in targets[8])
    assert config["ignore"] == ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    tensors = load_file(out / "model.safetensors")
    down = layers(lm)["model.layers.0.mlp.down_proj"]
    assert torch.equal(tensors["model.layers.0.mlp.down_proj.weight"], down.dense())  # pruned: written dense, exact


def test_block_formats_export_through_their_integer_grid(tmp_path, llama):
    lm = compress(llama, {"method": "rtn", "format": "q4_0"})
    out = tp.io.export(lm, tmp_path / "ct", format="compressed-tensors", dtype="f32")
    tensors, schemes = load_file(out / "model.safetensors"), ct_schemes(out)
    for name, layer in layers(lm).items():
        assert torch.equal(ct_decode(tensors, name, schemes[name]), layer.dense()), name
    assert schemes[name].weights.group_size == 32 and schemes[name].weights.symmetric


def test_what_compressed_tensors_cannot_hold_is_refused_and_nothing_is_written(tmp_path, llama):
    cases = [
        (W4_G64, "f16", "do not divide its rows of 160"),  # down_proj: 160 inputs, groups of 64
        (W4_G32, "bf16", "not all bfloat16 numbers"),
        ({"method": "rtn", "format": "q4_1"}, "f32", "minima are not whole multiples"),
    ]
    for stage, dtype, message in cases:
        with pytest.raises(ExportError, match=message):
            tp.io.export(compress(llama, stage), tmp_path / "ct", format="compressed-tensors", dtype=dtype)
        assert not list(tmp_path.iterdir())


def test_a_sum_of_parts_is_refused_by_name(tmp_path, llama):
    from tensorpress.parts import DensePart

    lm = compress(llama, W4_G32)
    layer = layers(lm)["model.layers.1.self_attn.v_proj"]
    layer.parts.append(DensePart(torch.zeros(layer.out_features, layer.in_features)))
    for fmt in ("compressed-tensors", "gptq"):
        with pytest.raises(ExportError, match=r"model\.layers\.1\.self_attn\.v_proj .*sum of 2 parts"):
            tp.io.export(lm, tmp_path / fmt, format=fmt)


def test_an_uncompressed_model_is_refused(tmp_path, llama):
    with pytest.raises(ExportError, match="no layer is quantized"):
        tp.io.export(llama, tmp_path / "ct", format="compressed-tensors")


def test_gpt2_conv1d_layers_are_refused_but_export_as_hf(tmp_path):
    from transformers import AutoModelForCausalLM

    lm = compress(tiny_model("gpt2"), W4_G32)
    with pytest.raises(ExportError, match="Conv1D"):
        tp.io.export(lm, tmp_path / "ct", format="compressed-tensors")
    out = tp.io.export(lm, tmp_path / "hf", format="hf")  # Conv1D weights written transposed, as GPT-2 stores them
    ids = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(out)(ids).logits, lm.model(ids).logits)


# -- GPTQ ---------------------------------------------------------------------------------------

def unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ's layout, written out: word ``i`` of a column holds codes ``i*p .. i*p+p-1``, the
    first in the lowest bits."""
    per = 32 // bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    codes = [(w >> (bits * k)) & ((1 << bits) - 1) for k in range(per)]
    return torch.stack(codes, dim=1).reshape(words.shape[0] * per, words.shape[1])


def gptq_decode(tensors: dict[str, torch.Tensor], name: str, bits: int, v1: bool) -> torch.Tensor:
    q = unpack_rows(tensors[f"{name}.qweight"], bits)  # (in, out)
    z = unpack_rows(tensors[f"{name}.qzeros"].T.contiguous(), bits).T  # (G, out)
    if v1:
        z = z + 1
    g = tensors[f"{name}.g_idx"].long()
    scales = tensors[f"{name}.scales"].float()
    return (scales[g] * (q - z[g]).float()).T


GPTQ_CASES = [(W4_G32, True), (W4_G64, True), (W8_ROW, True), (W4_G32_ASYM, False), (W2_G32_ASYM, False)]


@pytest.mark.parametrize("stage,v1", GPTQ_CASES, ids=[f"w{s['bits']}-{s['group_size']}-{'sym' if s['symmetric'] else 'asym'}"
                                                     for s, _ in GPTQ_CASES])
def test_gptq_decodes_to_tensorpress_weights_exactly(tmp_path, llama, stage, v1):
    lm = compress(llama, stage)
    out = tp.io.export(lm, tmp_path / "gptq", format="gptq", dtype="f32")
    tensors = load_file(out / "model.safetensors")
    for name, layer in layers(lm).items():
        assert tensors[f"{name}.qweight"].dtype == torch.int32
        assert torch.equal(gptq_decode(tensors, name, stage["bits"], v1), layer.dense()), name
    config = config_of(out)
    assert config == json.loads((out / "quantize_config.json").read_text())
    assert config["checkpoint_format"] == ("gptq" if v1 else "gptq_v2")
    assert (config["bits"], config["sym"], config["desc_act"]) == (stage["bits"], stage["symmetric"], False)
    assert config["group_size"] == (-1 if stage["group_size"] is None else stage["group_size"])
    assert config["dynamic"] is None


def test_gptq_uneven_last_group_is_held_by_g_idx(tmp_path, llama):
    lm = compress(llama, W4_G64)
    out = tp.io.export(lm, tmp_path / "gptq", format="gptq", dtype="f16")
    tensors = load_file(out / "model.safetensors")
    g_idx = tensors["model.layers.0.mlp.down_proj.g_idx"]
    assert g_idx.tolist() == [c // 64 for c in range(160)]
    assert tensors["model.layers.0.mlp.down_proj.scales"].shape == (3, 64)
    assert tensors["model.layers.0.mlp.down_proj.scales"].dtype == torch.float16


def test_gptq_other_grids_and_dense_layers_go_in_dynamic(tmp_path, llama):
    lm = compress(llama,
                  {**W4_G32, "targets": ["self_attn.*", "up_proj", "gate_proj"]},
                  {**W8_ROW, "targets": ["layers.1.mlp.down_proj"]})
    lm.model.model.layers[0].mlp.down_proj = torch.nn.Linear(160, 64, bias=False)
    out = tp.io.export(lm, tmp_path / "gptq", format="gptq", dtype="f32")
    config = config_of(out)
    assert (config["bits"], config["group_size"]) == (4, 32)
    assert config["dynamic"] == {r"+:^model\.layers\.1\.mlp\.down_proj$": {"bits": 8, "group_size": -1},
                                 r"-:^model\.layers\.0\.mlp\.down_proj$": {}}
    (names,) = config["modules_in_block_to_quantize"]  # what transformers' loader reads instead
    assert "model.layers.0.mlp.down_proj" not in names and len(names) == 13
    tensors = load_file(out / "model.safetensors")
    assert torch.equal(gptq_decode(tensors, "model.layers.1.mlp.down_proj", 8, True),
                       layers(lm)["model.layers.1.mlp.down_proj"].dense())


def test_gptq_refuses_three_bits(tmp_path, llama):
    lm = compress(llama, W3_G32)
    with pytest.raises(ExportError, match="not 3-bit"):
        tp.io.export(lm, tmp_path / "gptq", format="gptq")
    tp.io.export(lm, tmp_path / "ct", format="compressed-tensors", dtype="f32")  # compressed-tensors packs 3 bits


def test_the_check_catches_a_wrong_nibble_order(tmp_path, llama, monkeypatch):
    lm = compress(llama, W4_G32)
    honest = gptq_format.pack_int32

    def reversed_nibbles(codes, bits):
        per = 32 // bits
        n, m = codes.shape
        return honest(codes.reshape(n // per, per, m).flip(1).reshape(n, m), bits)

    monkeypatch.setattr(gptq_format, "pack_int32", reversed_nibbles)
    out = tp.io.export(lm, tmp_path / "gptq", format="gptq", dtype="f32")
    tensors = load_file(out / "model.safetensors")
    name, layer = next(iter(layers(lm).items()))
    assert not torch.equal(gptq_decode(tensors, name, 4, True), layer.dense())


def test_gptq_loads_in_transformers_when_gptqmodel_is_installed(tmp_path, llama):
    pytest.importorskip("gptqmodel")
    pytest.importorskip("optimum")
    from transformers import AutoModelForCausalLM

    lm = compress(llama, W4_G32)
    out = tp.io.export(lm, tmp_path / "gptq", format="gptq", dtype="f16")
    from transformers import GPTQConfig

    # gptqmodel's pure-torch layer: its default CPU kernel takes only some shapes (and compiles first)
    loaded = AutoModelForCausalLM.from_pretrained(out, device_map="cpu",
                                                  quantization_config=GPTQConfig(bits=4, backend="torch")).eval()
    ids = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        theirs = loaded(ids).logits.float()
        ours = lm.model(ids).logits.float()
    assert (theirs - ours).abs().max() < 2e-2 * ours.abs().max()


# -- the CLI -------------------------------------------------------------------------------------

def test_cli_exports_both_formats(tmp_path, llama, capsys):
    lm = compress(llama, W4_G32)
    ckpt = tmp_path / "ckpt"
    tp.io.save_checkpoint(lm, ckpt)
    runner = CliRunner()
    for fmt in ("compressed-tensors", "gptq"):
        result = runner.invoke(app, ["export", str(ckpt), str(tmp_path / fmt), "--format", fmt, "--dtype", "f32"])
        assert result.exit_code == 0, result.output
        assert "weights" in result.output and "MB" in result.output
        assert config_of(tmp_path / fmt)["quant_method"] == ("gptq" if fmt == "gptq" else "compressed-tensors")
    with pytest.raises(SystemExit) as info:
        main(["export", str(ckpt), str(tmp_path / "x"), "--format", "gptq", "--requantize"])
    assert info.value.code == 2 and "--requantize applies to --format gguf only" in capsys.readouterr().err


def test_exports_after_running_with_packed_kernels(tmp_path, llama):
    """A model that ran with the packed kernels holds their caches (native pointers); every export
    still copies it (the compressed layers map straight to dense ones, uncopied)."""
    from tensorpress.parts.kernels import packed_kernels

    lm = compress(llama, W4_G32)
    ids = torch.randint(0, 100, (1, 8))
    with packed_kernels(True), torch.no_grad():
        before = lm.model(ids).logits
    assert any(getattr(p, "_packed", None) is not None for p in lm.model.modules())
    for fmt in ("hf", "compressed-tensors", "gptq"):
        tp.io.export(lm, tmp_path / fmt, format=fmt)
    with packed_kernels(True), torch.no_grad():
        assert torch.equal(lm.model(ids).logits, before)  # the model itself is untouched
