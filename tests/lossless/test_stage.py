"""The ``lossless`` recipe stage: quantization codes stored entropy-coded, counted exactly."""

from __future__ import annotations

import pytest
import torch

import tensorpress as tp
from conftest import tiny_model
from tensorpress.errors import CheckpointError, RecipeError
from tensorpress.io.pack import pack
from tensorpress.parts import CodebookPart, CompressedLinear, QuantizedPart
from tensorpress.parts.quant_math import compute_grid, quantize_with_grid


def _compress(recipe):
    lm = tiny_model("llama")
    return tp.compress(lm, tp.recipes.get(recipe) if isinstance(recipe, str) else recipe)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _coded_layers(model):
    """Names of the linears whose codes are stored coded (a small layer whose codes would code
    to more than their packed width keeps them packed)."""
    return [n for n, m in model.named_modules() if isinstance(m, CompressedLinear) and m.parts[0].codes_coded]


def test_coding_changes_no_output_and_lowers_bits():
    plain, coded = _compress("rtn-w4g128"), _compress("rtn-w4g128-coded")
    ids = torch.randint(3, 300, (2, 12))
    assert torch.equal(_logits(plain.model.model, ids), _logits(coded.model.model, ids))
    assert coded.bits_per_weight < plain.bits_per_weight
    part = coded.model.model.get_submodule(_coded_layers(coded.model.model)[0]).parts[0]
    assert "coded" in part.describe()
    scales_bits = part.scales.numel() * 16 + part.zeros.numel() * 4
    assert part.nbits() == len(part._coded_codes) * 8 + scales_bits  # header and table included


def test_coded_checkpoint_reloads_exactly_and_is_smaller(tmp_path):
    plain, coded = _compress("rtn-w4g128"), _compress("rtn-w4g128-coded")
    plain.save(tmp_path / "plain")
    coded.save(tmp_path / "coded")
    parts_plain = (tmp_path / "plain" / "parts.safetensors").stat().st_size
    parts_coded = (tmp_path / "coded" / "parts.safetensors").stat().st_size
    assert parts_coded < parts_plain
    again = tp.load_compressed(tmp_path / "coded")
    ids = torch.randint(3, 300, (1, 9))
    assert torch.equal(_logits(again.model, ids), _logits(coded.model.model, ids))
    assert _coded_layers(again.model) == _coded_layers(coded.model.model)  # still counted coded after a reload
    # packing an already-coded checkpoint leaves the coded codes as bytes, and still round-trips
    manifest = pack(tmp_path / "coded", tmp_path / "packed")
    coded_keys = {f"{name}.parts.0.codes" for name in _coded_layers(coded.model.model)}
    codecs = {v["codec"] for k, v in manifest["files"]["parts.safetensors"]["tensors"].items() if k in coded_keys}
    assert codecs and not any(c.startswith("codes") for c in codecs)
    assert torch.equal(_logits(tp.load_compressed(tmp_path / "packed").model, ids), _logits(coded.model.model, ids))


def test_corrupt_coded_codes_are_an_error_naming_the_layer(tmp_path):
    from safetensors.torch import load_file, save_file

    from tensorpress.io.checkpoint import sha256_file

    coded = _compress("rtn-w4g128-coded")
    coded.save(tmp_path / "c")
    parts = load_file(tmp_path / "c" / "parts.safetensors")
    key = f"{_coded_layers(coded.model.model)[0]}.parts.0.codes"
    parts[key][-3] ^= 0x40
    save_file(parts, tmp_path / "c" / "parts.safetensors")
    import json

    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    entry = manifest["files"]["parts.safetensors"]
    entry["sha256"], entry["bytes"] = sha256_file(tmp_path / "c" / "parts.safetensors"), (tmp_path / "c" / "parts.safetensors").stat().st_size
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=key.rpartition(".parts.")[0]):
        tp.load_compressed(tmp_path / "c")


def test_codebook_parts_are_coded_too():
    g = torch.Generator().manual_seed(0)
    codes = (torch.randn(64, 96, generator=g) * 2 + 8).round().clamp(0, 15).to(torch.uint8)
    part = CodebookPart(codes, torch.randn(1, 16, generator=g))
    before = part.nbits()
    part.entropy_code()
    assert part.nbits() < before
    tensors, meta = part.state()
    again = CodebookPart.from_state(tensors, meta)
    assert torch.equal(again.codes, codes) and again.nbits() == part.nbits()


def test_stage_needs_an_earlier_quantizer():
    recipe = tp.Recipe.model_validate({"name": "x", "stages": [{"method": "lossless"}]})
    with pytest.raises(RecipeError, match="after a quantization stage"):
        _compress(recipe)


def test_quantized_part_round_trips_coded_with_asymmetric_zeros():
    w = torch.randn(32, 256)
    grid = compute_grid(w, bits=3, group_size=64, symmetric=False)
    part = QuantizedPart(quantize_with_grid(w, grid), grid)
    part.entropy_code()
    tensors, meta = part.state()
    assert meta["codes_coding"] == "tplc"
    again = QuantizedPart.from_state(tensors, meta)
    assert torch.equal(again.dense(), part.dense()) and again.nbits() == part.nbits()
