"""Files handed to tensorpress are untrusted: names that leave the directory, edited manifests
and configs, truncated files and hostile headers end in a typed error, and nothing is written
outside the output; what tensorpress writes follows the umask."""

from __future__ import annotations

import json
import os
import stat
import struct

import numpy as np
import pytest
import torch
from conftest import save_hf_dir, tiny_model
from typer.testing import CliRunner

import tensorpress as tp
from tensorpress import cli
from tensorpress.errors import CheckpointError
from tensorpress.io.files import confined
from tensorpress.io.headers import gguf_header, safetensors_header
from tensorpress.io.pack import PACK_MANIFEST, pack, unpack

runner = CliRunner()


def _tree(root) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    lm = tiny_model("llama")
    result = tp.compress(lm, tp.recipes.get("rtn-w4g128"))
    return result.save(tmp_path_factory.mktemp("ckpt") / "c")


@pytest.fixture(scope="module")
def packed_hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed")
    hf = save_hf_dir(tiny_model("llama"), root / "hf")
    pack(hf, root / "packed")
    return root / "packed"


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("hostile", ["../../escaped.json", "/tmp/tensorpress-escaped.json", "a/../../escaped.json"])
def test_planted_names_in_a_packed_directory_write_nothing_outside(tmp_path, packed_hf, hostile):
    work = tmp_path / "work"
    packed = _copy(packed_hf, work / "inner" / "packed")
    manifest = json.loads((packed / PACK_MANIFEST).read_text())
    entry = manifest["files"].pop("config.json")
    manifest["files"][hostile] = entry  # the original's bytes, under a name that leaves the output
    (packed / PACK_MANIFEST).write_text(json.dumps(manifest))
    before = _tree(tmp_path)
    with pytest.raises(CheckpointError, match="not a relative path inside the directory"):
        unpack(packed, work / "inner" / "out")
    with pytest.raises(CheckpointError, match="not a relative path inside the directory"):
        tp.load_compressed(packed)  # a packed Hugging Face directory loads through unpack
    assert _tree(tmp_path) == before
    assert not os.path.exists("/tmp/tensorpress-escaped.json")


def test_a_stored_name_that_leaves_the_directory_is_refused(tmp_path, packed_hf):
    packed = _copy(packed_hf, tmp_path / "p")
    manifest = json.loads((packed / PACK_MANIFEST).read_text())
    manifest["files"]["config.json"]["stored"] = "../../../../etc/passwd"
    (packed / PACK_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"files\.config\.json\.stored.*not a relative path"):
        unpack(packed, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_symlinks_out_of_the_directory_are_refused(tmp_path, checkpoint):
    ckpt = _copy(checkpoint, tmp_path / "c")
    outside = tmp_path / "outside.json"
    outside.write_text((ckpt / "config.json").read_text())
    (ckpt / "config.json").unlink()
    (ckpt / "config.json").symlink_to(outside)
    with pytest.raises(CheckpointError, match="leads outside the directory"):
        tp.load_compressed(ckpt)
    assert confined(tmp_path, "c/manifest.json", "x") == tmp_path / "c" / "manifest.json"


def test_a_file_listed_under_another_files_name_is_refused(tmp_path, packed_hf):
    packed = _copy(packed_hf, tmp_path / "p")
    manifest = json.loads((packed / PACK_MANIFEST).read_text())
    manifest["files"]["config.json/x"] = dict(manifest["files"]["tokenizer.json"])
    (packed / PACK_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="lies inside 'config.json', which is listed as a file"):
        unpack(packed, tmp_path / "out")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.pop("layers"), r"layers: Field required"),
        (lambda m: m.update(dtype="float13"), r"dtype: Input should be 'float32', 'float16' or 'bfloat16'"),
        (lambda m: m["files"].update({"dense.safetensors": {"sha256": "x", "bytes": 1}}), r"files\.dense\.safetensors\.sha256"),
        (lambda m: next(iter(m["layers"].values())).update(shape=[64, "64"]), r"shape\.1: Input should be a valid integer"),
        (lambda m: next(iter(m["layers"].values())).update(weight_bits=1), r"holds \d+ bits, the manifest says 1"),
        (lambda m: next(iter(m["layers"].values()))["parts"][0].update(nbits=7), r"the manifest says \[64, 64\] in 7 bits"),
        (lambda m: next(iter(m["layers"].values()))["parts"][0]["meta"].update(bits=3), r"part 0 of layer .*q_proj"),
        (lambda m: next(iter(m["layers"].values()))["parts"][0].update(kind="evil"), r"unknown part kind 'evil'"),
        (lambda m: m["layers"].update({"model.layers.9.mlp.up_proj": next(iter(m["layers"].values()))}), r"not a module"),
        (lambda m: m.update(aliases={"not.a.tensor": "model.norm.weight"}), r"alias 'not.a.tensor' -> 'model.norm.weight' names no"),
        (lambda m: m.update(aliases={"lm_head.weight": "nothing"}), r"does not hold the tensors the config describes"),
    ],
)
def test_edited_manifests_are_checkpoint_errors_naming_the_field(tmp_path, checkpoint, edit, message):
    ckpt = _copy(checkpoint, tmp_path / "c")
    manifest = json.loads((ckpt / "manifest.json").read_text())
    edit(manifest)
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=message):
        tp.load_compressed(ckpt)


def test_a_config_asking_for_more_weights_than_the_files_hold_is_refused(tmp_path, checkpoint):
    ckpt = _copy(checkpoint, tmp_path / "c")
    manifest = json.loads((ckpt / "manifest.json").read_text())
    config = json.loads((ckpt / "config.json").read_text())
    config["num_hidden_layers"] = 100_000  # 100k blocks would be allocated before loading fails
    (ckpt / "config.json").write_text(json.dumps(config))
    manifest["files"]["config.json"] = {"sha256": tp.io.files.sha256_file(ckpt / "config.json"),
                                        "bytes": (ckpt / "config.json").stat().st_size}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="does not hold the tensors the config describes"):
        tp.load_compressed(ckpt)
    hf = save_hf_dir(tiny_model("llama"), tmp_path / "hf")
    (hf / "config.json").write_text(json.dumps({**json.loads((hf / "config.json").read_text()), "num_hidden_layers": 100_000}))
    with pytest.raises(CheckpointError, match="describes a model of .* weights, but its safetensors files hold"):
        tp.load_model(hf)


def test_written_files_follow_the_umask(tmp_path, checkpoint):
    lm = tiny_model("llama")
    result = tp.compress(lm, tp.recipes.get("rtn-w4g128"))
    previous = os.umask(0o022)
    try:
        result.save(tmp_path / "shared")
        pack(tmp_path / "shared", tmp_path / "shared-packed")
        tp.io.export_hf(result.model, tmp_path / "shared-hf")
        os.umask(0o077)
        result.save(tmp_path / "private")
    finally:
        os.umask(previous)
    for folder in ("shared", "shared-packed", "shared-hf"):
        paths = [tmp_path / folder, *(tmp_path / folder).rglob("*")]
        assert {p.name for p in paths} >= {"config.json"}
        for p in paths:
            mode = stat.S_IMODE(p.stat().st_mode)
            assert mode == (0o755 if p.is_dir() else 0o644), (p, oct(mode))
    for p in [tmp_path / "private", *(tmp_path / "private").rglob("*")]:
        assert stat.S_IMODE(p.stat().st_mode) == (0o700 if p.is_dir() else 0o600), p


def test_verify_and_inspect_exit_nonzero_on_a_truncated_checkpoint(tmp_path, checkpoint, capsys):
    cli.out.width = 200
    ckpt = _copy(checkpoint, tmp_path / "c")
    good = runner.invoke(cli.app, ["verify", str(ckpt)])
    assert good.exit_code == 0 and "all 5 files match" in good.output.replace("\n", " "), good.output
    parts = ckpt / "parts.safetensors"
    parts.write_bytes(parts.read_bytes()[:-100])
    for args in (["verify", str(ckpt)], ["inspect", str(ckpt)]):
        with pytest.raises(SystemExit) as info:
            cli.main(args)
        assert info.value.code == 2
        assert "1 of 5 files fail verification (parts.safetensors:" in capsys.readouterr().err.replace("\n", "")
    assert runner.invoke(cli.app, ["inspect", str(ckpt), "--no-verify"]).exit_code == 0


def test_verify_decodes_every_tensor_of_a_packed_directory(tmp_path, packed_hf, capsys):
    packed = _copy(packed_hf, tmp_path / "p")
    assert set(tp.io.verify(packed).values()) == {None}
    container = packed / "model.safetensors.tplc"
    data = bytearray(container.read_bytes())
    data[-50] ^= 0xFF
    container.write_bytes(bytes(data))
    found = tp.io.verify(packed)
    assert "does not match its sha256" in found["model.safetensors"] and found["config.json"] is None


def test_compress_exits_nonzero_when_the_reloaded_checkpoint_differs(tmp_path, capsys, monkeypatch, text_path):
    model_dir = save_hf_dir(tiny_model("llama"), tmp_path / "m")
    from tensorpress.eval import quality

    monkeypatch.setattr(quality, "max_output_difference", lambda *a: 0.5)
    with pytest.raises(SystemExit) as info:
        cli.main(["compress", str(model_dir), "-r", "rtn-w8", "-o", str(tmp_path / "o"), "--no-eval"])
    assert info.value.code == 2
    assert "differ from the in-memory compressed model's by up to 0.5" in capsys.readouterr().err.replace("\n", "")


def test_safetensors_headers_are_checked_against_the_file(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(4, 3), "b": torch.ones(2, dtype=torch.int8)}, str(path))
    header = safetensors_header(path)
    assert header["a"]["shape"] == [4, 3]
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    bad = json.loads(raw[8:8 + n])
    bad["a"]["shape"] = [4, 4]
    blob = json.dumps(bad).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])
    with pytest.raises(CheckpointError, match=r"tensor 'a': shape \[4, 4\] of F32 does not fill its 48 bytes"):
        safetensors_header(path)
    path.write_bytes(raw[:-1])
    with pytest.raises(CheckpointError, match="data_offsets"):
        safetensors_header(path)
    path.write_bytes(struct.pack("<Q", 1 << 62) + raw[8:])
    with pytest.raises(CheckpointError, match="header length"):
        safetensors_header(path)


def _tiny_gguf(path):
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("t", np.arange(64, dtype=np.float32).reshape(2, 32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_headers_are_walked_with_bounds(tmp_path):
    path = _tiny_gguf(tmp_path / "m.gguf")
    header = gguf_header(path)
    assert header["tensors"] == {"t": ("F32", (32, 2))} and header["metadata"]["general.architecture"] == "llama"
    raw = path.read_bytes()
    path.write_bytes(raw[:-8])
    with pytest.raises(CheckpointError, match="run past the end of the file"):
        gguf_header(path)
    path.write_bytes(raw[:8] + struct.pack("<QQ", 1 << 40, 1) + raw[24:])
    with pytest.raises(CheckpointError, match="more than the limits"):
        gguf_header(path)
    path.write_bytes(b"GGUF" + struct.pack("<I", 9) + raw[8:])
    with pytest.raises(CheckpointError, match="GGUF version 9"):
        gguf_header(path)
    path.write_bytes(raw[:60])
    with pytest.raises(CheckpointError, match="truncated GGUF"):
        tp.load_model(path)  # refused before transformers reads it
