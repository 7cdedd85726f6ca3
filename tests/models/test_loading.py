import json

import pytest
import torch
import transformers as T

import tensorpress as tp
from conftest import save_hf_dir, tiny_model
from tensorpress.errors import ModelNotFoundError, UnsupportedArchitectureError


def test_load_hf_directory(tmp_path):
    lm = tiny_model("qwen2")
    save_hf_dir(lm, tmp_path / "m")
    loaded = tp.load_model(tmp_path / "m")
    assert loaded.adapter.family == "llama" and loaded.causal
    ids = torch.randint(0, 300, (1, 12))
    torch.testing.assert_close(loaded.model(ids).logits, lm.model(ids).logits)
    assert loaded.info["source"] == "directory"


def test_load_hub_id_from_a_local_cache_laid_out_like_the_hub(tmp_path, monkeypatch):
    """The hub path stays real: a cache directory in the hub's layout, read offline."""
    lm = tiny_model("gpt2")
    cache = tmp_path / "hub"
    snapshot = cache / "models--tiny-org--tiny-gpt2" / "snapshots" / ("a" * 40)
    save_hf_dir(lm, snapshot)
    (cache / "models--tiny-org--tiny-gpt2" / "refs").mkdir()
    (cache / "models--tiny-org--tiny-gpt2" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("transformers.utils.hub.constants.HF_HUB_OFFLINE", True, raising=False)
    loaded = tp.load_model("tiny-org/tiny-gpt2")
    assert loaded.info["source"] == "hub" and loaded.model_type == "gpt2"
    with pytest.raises(ModelNotFoundError, match="'tiny-org/absent'.*could not be resolved"):
        tp.load_model("tiny-org/absent")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("./does/not/exist", "no such model './does/not/exist'"),
        ("model.gguf", "no such model 'model.gguf'"),
        ("smollm3-1b", "unknown model|no such model 'smollm3-1b'"),
    ],
)
def test_unknown_names_and_missing_paths(spec, message):
    with pytest.raises(ModelNotFoundError, match=message):
        tp.load_model(spec)


def test_directory_without_config_and_non_gguf_file(tmp_path):
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        tp.load_model(tmp_path)
    junk = tmp_path / "weights.gguf"
    junk.write_bytes(b"not a gguf file")
    with pytest.raises(ModelNotFoundError, match="not a GGUF file"):
        tp.load_model(junk)


def test_unsupported_architecture_directory(tmp_path):
    config = T.BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=2)
    T.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "bloom")
    with pytest.raises(UnsupportedArchitectureError, match="'bloom' is not supported; supported model types: .*llama"):
        tp.load_model(tmp_path / "bloom")


def test_trust_remote_code_is_off_by_default(tmp_path):
    lm = tiny_model("llama")
    save_hf_dir(lm, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig"}
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    (tmp_path / "m" / "evil.py").write_text("raise RuntimeError('remote code ran')\n")
    loaded = tp.load_model(tmp_path / "m")  # the auto_map is ignored: no code from the directory runs
    assert loaded.model_type == "llama"
