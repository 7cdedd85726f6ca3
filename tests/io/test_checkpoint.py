import json

import pytest
import torch

import tensorpress as tp
from conftest import ALL_ARCHS, tiny_model
from tensorpress.errors import CheckpointError, OutputExistsError
from tensorpress.io import checkpoint_bytes, read_manifest
from tensorpress.io.checkpoint import MANIFEST
from tensorpress.parts import CompressedLinear


def _compress(arch="llama", recipe="rtn-w4g128"):
    lm = tiny_model(arch)
    return lm, tp.compress(lm, tp.recipes.get(recipe))


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_reload_reproduces_outputs_exactly(tmp_path, arch):
    _, result = _compress(arch)
    result.save(tmp_path / "ckpt")
    again = tp.load_compressed(tmp_path / "ckpt")
    ids = torch.randint(3, 300, (2, 20))
    a, b = result.model.model(input_ids=ids), again.model(input_ids=ids)
    key = "logits" if again.causal else "last_hidden_state"
    assert torch.equal(getattr(a, key), getattr(b, key))
    assert again.info["base_model"] == f"tiny-{arch}"
    manifest = read_manifest(tmp_path / "ckpt")
    assert manifest["recipe"]["name"] == "rtn-w4g128"
    assert set(manifest["layers"]) == set(result.layers)


def test_tied_embeddings_stay_tied_and_are_stored_once(tmp_path):
    _, result = _compress("gpt2")
    assert result.model.model.config.tie_word_embeddings
    result.save(tmp_path / "c")
    manifest = read_manifest(tmp_path / "c")
    assert manifest["aliases"] == {"lm_head.weight": "transformer.wte.weight"}
    again = tp.load_compressed(tmp_path / "c")
    assert again.model.lm_head.weight.data_ptr() == again.model.transformer.wte.weight.data_ptr()


def test_nbits_matches_bytes_on_disk(tmp_path):
    lm, result = _compress("llama", "rtn-w3g128")
    result.save(tmp_path / "c")
    manifest = read_manifest(tmp_path / "c")
    parts_bytes = manifest["files"]["parts.safetensors"]["bytes"]
    header = int.from_bytes((tmp_path / "c" / "parts.safetensors").read_bytes()[:8], "little") + 8
    exact = sum(r.weight_bits for r in result.layers.values()) / 8
    n_tensors = sum(len(p["tensors"]) for e in manifest["layers"].values() for p in e["parts"])
    # the payload is the exact bit count rounded up to whole bytes per tensor, plus the header
    assert exact <= parts_bytes - header < exact + n_tensors
    assert checkpoint_bytes(tmp_path / "c") == sum(f["bytes"] for f in manifest["files"].values()) + (tmp_path / "c" / MANIFEST).stat().st_size


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    _, first = _compress()
    _, second = _compress(recipe="rtn-w3g128")
    ids = torch.randint(3, 300, (2, 20))
    first_logits, second_logits = _logits(first.model.model, ids), _logits(second.model.model, ids)
    assert not torch.equal(first_logits, second_logits)
    out = tmp_path / "c"
    first.save(out)
    with pytest.raises(OutputExistsError, match="already exists; pass overwrite=True"):
        second.save(out)
    assert torch.equal(_logits(tp.load_compressed(out).model, ids), first_logits)  # the refusal changed nothing
    second.save(out, overwrite=True)
    assert read_manifest(out)["recipe"]["name"] == "rtn-w3g128"
    assert torch.equal(_logits(tp.load_compressed(out).model, ids), second_logits)  # the new checkpoint, whole
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no temporary or old directory left


def test_interrupted_save_leaves_nothing_under_the_target_name(tmp_path, monkeypatch):
    _, result = _compress()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("tensorpress.io.checkpoint.save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        result.save(tmp_path / "c")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def saved(tmp_path):
    _, result = _compress()
    return result.save(tmp_path / "c")


def test_truncated_tensor_file_is_detected(saved):
    f = saved / "parts.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="parts.safetensors is .* bytes, the manifest says .*truncated"):
        tp.load_compressed(saved)


def test_tampered_file_is_detected(saved):
    f = saved / "dense.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="dense.safetensors does not match its sha256"):
        tp.load_compressed(saved)


def test_missing_manifest_and_missing_directory(saved, tmp_path):
    (saved / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="not a tensorpress checkpoint: manifest.json is missing"):
        tp.load_compressed(saved)
    with pytest.raises(CheckpointError, match="is not a directory"):
        tp.load_compressed(tmp_path / "absent")


def test_newer_format_version_is_refused(saved):
    manifest = json.loads((saved / MANIFEST).read_text())
    manifest["format_version"] = 99
    (saved / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="format version 99, newer than .* upgrade tensorpress"):
        tp.load_compressed(saved)


def test_corrupt_manifest_and_foreign_model_class(saved):
    manifest = json.loads((saved / MANIFEST).read_text())
    manifest["model_class"] = "os.system"
    (saved / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="not a transformers model class"):
        tp.load_compressed(saved)
    (saved / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        tp.load_compressed(saved)


def test_deleted_tensor_file_is_detected(saved):
    (saved / "parts.safetensors").unlink()
    with pytest.raises(CheckpointError, match="parts.safetensors listed in the manifest is missing"):
        tp.load_compressed(saved)


def _snr_db(x: torch.Tensor, ref: torch.Tensor) -> float:
    return 10 * torch.log10(ref.pow(2).mean() / (x - ref).pow(2).mean()).item()


# bits of the head, and the least SNR of its weight and of its output against the float head's
# (measured: 20.8 / 20.9 dB at 4 bits, 44.6 / 44.8 dB at 8)
HEAD_RECIPES = {"rtn-w4g128-head": (4, 18.0), "rtn-w4g128-head8": (8, 40.0)}


@pytest.mark.parametrize("recipe", sorted(HEAD_RECIPES))
def test_quantized_head_is_untied_from_the_embeddings_and_reloads(tmp_path, recipe):
    bits, min_snr = HEAD_RECIPES[recipe]
    lm = tiny_model("gpt2")  # tied embeddings
    embedding = lm.model.transformer.wte.weight.detach().clone()
    result = tp.compress(lm, tp.recipes.get(recipe))
    model = result.model.model
    assert isinstance(model.lm_head, CompressedLinear) and "lm_head" in result.layers
    assert model.lm_head.parts[0].bits == bits
    assert not model.config.tie_word_embeddings
    assert torch.equal(model.transformer.wte.weight, embedding)  # the lookup table is untouched
    ids = torch.randint(3, 300, (2, 20))
    with torch.no_grad():
        run = model(input_ids=ids, output_hidden_states=True)
        hidden, out = run.hidden_states[-1], run.logits  # (2, 20, 64): the final norm's output
        # the head computes with its own dequantized weight, which is the embedding matrix at
        # `bits`. (Both SNRs: a biased rounding costs the weight 6 dB but the output almost
        # nothing, since the normed hidden states have near-zero mean.)
        torch.testing.assert_close(out, hidden @ model.lm_head.dense().T)
        assert _snr_db(model.lm_head.dense(), embedding) > min_snr
        assert _snr_db(out, hidden @ embedding.T) > min_snr
    result.save(tmp_path / "c")
    assert read_manifest(tmp_path / "c")["aliases"] == {}
    again = tp.load_compressed(tmp_path / "c")
    assert torch.equal(again.model(input_ids=ids).logits, out)
    assert torch.equal(again.model.transformer.wte.weight, embedding)
