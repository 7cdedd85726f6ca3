"""Packing whole directories: Hugging Face model directories and tensorpress checkpoints are
packed, unpacked and loaded bit-exactly; corruption is reported with the file and tensor."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import save_hf_dir, tiny_model
from typer.testing import CliRunner

import tensorpress as tp
from tensorpress import cli
from tensorpress.errors import (
    CheckpointError,
    CodingError,
    ModelNotFoundError,
    OutputExistsError,
)
from tensorpress.io.pack import PACK_MANIFEST, pack, read_tensors, summary, unpack

runner = CliRunner()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    lm = tiny_model("llama")
    lm.model.to(torch.bfloat16)  # bfloat16 on disk, like most released checkpoints
    return save_hf_dir(lm, tmp_path_factory.mktemp("hf") / "tiny-llama")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    lm = tiny_model("llama")
    result = tp.compress(lm, tp.recipes.get("rtn-w4g128"))
    return result.save(tmp_path_factory.mktemp("ckpt") / "w4")


def _logits(lm, ids):
    with torch.no_grad():
        return lm.model(input_ids=ids).logits


def test_hf_directory_round_trips_byte_identically(tmp_path, hf_dir):
    manifest = pack(hf_dir, tmp_path / "packed")
    assert (tmp_path / "packed" / "model.safetensors.tplc").is_file()
    assert not (tmp_path / "packed" / "model.safetensors").exists()
    total = summary(manifest)
    assert total["coded_bits"] < total["original_bits"] * 0.75  # bfloat16 exponents carry ~3 of 8 bits
    # tiny tensors: each pays its header and frequency table (~0.4 kB); real models are within 0.1 %
    assert total["coded_bits"] <= total["bound_bits"] * 1.05
    identical = unpack(tmp_path / "packed", tmp_path / "unpacked")
    assert identical == {"model.safetensors": True}
    for name in ("config.json", "tokenizer.json"):
        assert (tmp_path / "unpacked" / name).read_bytes() == (hf_dir / name).read_bytes()


def test_load_compressed_reads_a_packed_hf_directory(tmp_path, hf_dir):
    pack(hf_dir, tmp_path / "packed")
    packed = tp.load_compressed(tmp_path / "packed")
    original = tp.load_model(hf_dir)  # both as load_model gives them: float32
    ids = torch.randint(3, 300, (1, 12))
    assert torch.equal(_logits(packed, ids), _logits(original, ids))
    assert packed.info["source"] == "packed"


def test_checkpoint_codes_are_coded_below_their_width_and_reload_exactly(tmp_path, checkpoint):
    manifest = pack(checkpoint, tmp_path / "packed")
    tensors = manifest["files"]["parts.safetensors"]["tensors"]
    codes = {k: v for k, v in tensors.items() if k.endswith(".codes")}
    assert codes and all(v["codec"] == "codes4:symbols" for v in codes.values())
    coded = sum(v["coded_bits"] for v in codes.values())
    assert coded < sum(v["numel"] for v in codes.values()) * 4
    assert coded <= sum(v["bound_bits"] for v in codes.values()) * 1.05  # tiny tensors: header and table
    original = tp.load_compressed(checkpoint)
    packed = tp.load_compressed(tmp_path / "packed")
    ids = torch.randint(3, 300, (2, 16))
    assert torch.equal(_logits(original, ids), _logits(packed, ids))
    assert unpack(tmp_path / "packed", tmp_path / "unpacked") == {"dense.safetensors": True, "parts.safetensors": True}
    unpacked = tp.load_compressed(tmp_path / "unpacked")  # verifies against its own manifest
    assert torch.equal(_logits(unpacked, ids), _logits(original, ids))


def test_corrupt_container_is_reported_with_file_and_tensor(tmp_path, hf_dir):
    manifest = pack(hf_dir, tmp_path / "packed")
    stored = tmp_path / "packed" / "model.safetensors.tplc"
    data = bytearray(stored.read_bytes())
    data[-100] ^= 0x01
    stored.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors.tplc does not match its sha256"):
        read_tensors(tmp_path / "packed", "model.safetensors")
    # the file checksum updated too (tampering, not bit rot): the tensor check still catches it
    entry = manifest["files"]["model.safetensors"]
    from tensorpress.io.checkpoint import sha256_file

    entry["stored_sha256"] = sha256_file(stored)
    (tmp_path / "packed" / PACK_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CodingError, match=r"model\.safetensors\.tplc: tensor .+"):
        read_tensors(tmp_path / "packed", "model.safetensors")
    with pytest.raises(CodingError):
        unpack(tmp_path / "packed", tmp_path / "unpacked")
    assert not (tmp_path / "unpacked").exists()  # nothing half-written


def test_truncated_container_and_tampered_config_are_detected(tmp_path, hf_dir):
    pack(hf_dir, tmp_path / "packed")
    config = tmp_path / "packed" / "config.json"
    config.write_text(config.read_text().replace("llama", "llamb"))
    with pytest.raises(CheckpointError, match="config.json"):
        tp.load_compressed(tmp_path / "packed")
    pack(hf_dir, tmp_path / "packed2")
    stored = tmp_path / "packed2" / "model.safetensors.tplc"
    stored.write_bytes(stored.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="sha256"):
        tp.load_compressed(tmp_path / "packed2")


def test_bad_sources_and_existing_outputs_are_clear_errors(tmp_path, hf_dir):
    with pytest.raises(ModelNotFoundError, match="GGUF"):
        pack("smollm2-135m", tmp_path / "x")
    with pytest.raises(ModelNotFoundError, match="no \\*.safetensors"):
        pack(tmp_path, tmp_path / "y")
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputExistsError):
        pack(hf_dir, tmp_path / "exists")
    pack(hf_dir, tmp_path / "p")
    with pytest.raises(CodingError, match="already packed"):
        pack(tmp_path / "p", tmp_path / "pp")


def test_cli_pack_inspect_unpack(tmp_path, checkpoint, monkeypatch):
    # tables on one line per row. (rich keeps a set width in `_width`, None = the terminal's:
    # patching the `width` property instead would pin the terminal's width after the test)
    monkeypatch.setattr(cli.out, "_width", 220)
    packed, unpacked = tmp_path / "packed", tmp_path / "unpacked"
    result = runner.invoke(cli.app, ["pack", str(checkpoint), str(packed)])
    assert result.exit_code == 0, result.output
    assert "Shannon bound" in result.output and "parts.safetensors" in result.output
    inspected = runner.invoke(cli.app, ["inspect", str(packed), "--tensors"])
    assert inspected.exit_code == 0, inspected.output
    assert "model.layers.0.self_attn.q_proj.parts.0.codes" in inspected.output and "int4 g128" in inspected.output
    result = runner.invoke(cli.app, ["unpack", str(packed), str(unpacked)])
    assert result.exit_code == 0 and "byte-identical" in result.output
