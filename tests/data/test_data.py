import importlib.util
import random

import pytest
import torch

import tensorpress as tp
from conftest import tiny_model
from tensorpress.data import calibration_windows, evaluation_windows
from tensorpress.errors import CalibrationError, MissingDependencyError


def test_calibration_windows_follow_p1():
    tokens = torch.arange(10_000)
    win = calibration_windows(tokens, samples=16, seq_len=64, seed=0, source="t")
    assert win.input_ids.shape == (16, 64)
    rng = random.Random(0)
    starts = [rng.randint(0, 6000 - 64 - 1) for _ in range(16)]
    assert win.input_ids[:, 0].tolist() == starts  # drawn with random.Random(seed)
    assert int(win.input_ids.max()) < 6000  # only from the first 60 %
    assert torch.equal(win.input_ids, calibration_windows(tokens, 16, 64, 0, "t").input_ids)
    assert not torch.equal(win.input_ids, calibration_windows(tokens, 16, 64, 1, "t").input_ids)


def test_evaluation_windows_are_consecutive_from_the_last_40_percent():
    tokens = torch.arange(10_000)
    win = evaluation_windows(tokens, seq_len=100, max_windows=5, source="t")
    assert win.input_ids.shape == (5, 100)
    assert win.input_ids[0, 0].item() == 6000
    assert torch.equal(win.input_ids.reshape(-1), torch.arange(6000, 6500))
    assert evaluation_windows(tokens, 100, None, "t").samples == 40


def test_text_file_calibration_and_too_short_text(tmp_path, text_path):
    lm = tiny_model("llama")
    win = tp.data.calibration(lm, source=text_path, samples=4, seq_len=32, seed=0)
    assert win.input_ids.shape == (4, 32) and win.source == str(text_path)
    short = tmp_path / "short.txt"
    short.write_text("only a few words here")
    with pytest.raises(CalibrationError, match=r"found \d+ tokens, of which the first 60% \(\d+\) .* window of 32"):
        tp.data.calibration(lm, source=short, samples=4, seq_len=32)
    with pytest.raises(CalibrationError, match=r"found \d+ tokens, of which the last 40%"):
        tp.data.evaluation(lm, short, seq_len=32)


def test_empty_missing_and_undecodable_text(tmp_path):
    lm = tiny_model("llama")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(CalibrationError, match="is empty"):
        tp.data.calibration(lm, source=empty)
    with pytest.raises(CalibrationError, match="text file not found"):
        tp.data.calibration(lm, source=tmp_path / "nope.txt")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(CalibrationError, match="not valid utf-8"):
        tp.data.calibration(lm, source=latin)
    with pytest.raises(CalibrationError, match="samples >= 1"):
        tp.data.calibration(lm, samples=0)


def test_generated_calibration_is_seeded_and_leaves_global_rng_alone():
    lm = tiny_model("llama")
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = tp.data.calibration(lm, "generated", samples=3, seq_len=16, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    b = tp.data.calibration(lm, "generated", samples=3, seq_len=16, seed=7)
    c = tp.data.calibration(lm, "generated", samples=3, seq_len=16, seed=8)
    assert a.input_ids.shape == (3, 16)
    assert torch.equal(a.input_ids, b.input_ids) and not torch.equal(a.input_ids, c.input_ids)
    assert (a.input_ids[:, 0] == lm.tokenizer.bos_token_id).all()


def test_generated_calibration_needs_a_causal_model():
    with pytest.raises(CalibrationError, match="needs a causal language model"):
        tp.data.calibration(tiny_model("bert"), "generated", samples=2, seq_len=8)


def test_hf_dataset_spec_is_validated():
    with pytest.raises(CalibrationError, match="expected 'hf:<dataset>"):
        tp.data.hf_dataset("hf:onlyname")


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets is installed")
def test_hf_dataset_without_datasets_says_how_to_install():
    with pytest.raises(MissingDependencyError, match=r"needs the 'datasets' package: pip install"):
        tp.data.calibration(tiny_model("llama"), "hf:wikitext:wikitext-2-raw-v1:validation")


def test_windows_start_with_bos_when_the_tokenizer_starts_texts_with_it(text_path):
    """A tokenizer that puts BOS before every text (Gemma, Llama 2) gets windows of BOS and
    ``seq_len - 1`` text tokens, the text tokens being P1's windows of that length; one that
    adds none gets P1's windows unchanged."""
    from tokenizers import processors

    from conftest import make_tokenizer

    lm = tiny_model("llama")
    plain_eval = tp.data.evaluation(lm, text_path, seq_len=32, windows=3)
    plain_calib = tp.data.calibration(lm, text_path, samples=3, seq_len=32, seed=0)
    tok = make_tokenizer()
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    assert tok("a")["input_ids"][0] == bos
    lm.tokenizer = tok
    text = tp.data.text_file(text_path)
    tokens = text.tokens(tok)
    win = tp.data.evaluation(lm, text, seq_len=32, windows=3)
    assert win.input_ids.shape == (3, 32) and (win.input_ids[:, 0] == bos).all()
    assert torch.equal(win.input_ids[:, 1:], evaluation_windows(tokens, 31, 3, "t").input_ids)
    cal = tp.data.calibration(lm, text, samples=3, seq_len=32, seed=0)
    assert cal.input_ids.shape == (3, 32) and (cal.input_ids[:, 0] == bos).all()
    assert torch.equal(cal.input_ids[:, 1:], calibration_windows(tokens, 3, 31, 0, "t").input_ids)
    assert "BOS" in win.note and "BOS" not in plain_eval.note and (plain_calib.input_ids[:, 0] != bos).any()
