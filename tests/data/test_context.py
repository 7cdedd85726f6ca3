"""Windows longer than the model's context are refused with the model's limit (the tiny models
take 256 positions), wherever windows are made or used."""

import pytest
import torch

import tensorpress as tp
from conftest import tiny_model
from tensorpress.data import context_length
from tensorpress.errors import CalibrationError
from tensorpress.eval.quality import causal_quality, encoder_quality

TOO_LONG = r"seq_len=300 does not fit the model's context of 256 tokens \(config.max_position_embeddings\); accepted: 2 <= seq_len <= 256"


def _windows(seq_len, n=1):
    return tp.data.TokenWindows(torch.randint(3, 300, (n, seq_len)), "random")


@pytest.mark.parametrize("arch", ["gpt2", "opt", "llama", "bert"])
def test_the_context_is_read_from_every_family_config(arch):
    assert context_length(tiny_model(arch).model) == 256  # gpt2's n_positions included


def test_evaluation_longer_than_the_context_is_a_calibration_error(text_path):
    lm = tiny_model("gpt2")  # learned positions: 300 tokens would index past the table
    with pytest.raises(CalibrationError, match="^evaluation " + TOO_LONG):
        tp.evaluate(lm, data=_windows(300))
    with pytest.raises(CalibrationError, match="^evaluation " + TOO_LONG):
        tp.evaluate(lm, data=text_path, seq_len=300)
    with pytest.raises(CalibrationError, match="^evaluation " + TOO_LONG):
        causal_quality(tiny_model("llama").model, _windows(300))
    bert = tiny_model("bert")
    with pytest.raises(CalibrationError, match="^evaluation " + TOO_LONG):
        encoder_quality(bert.model, bert.model, _windows(300).input_ids)
    with pytest.raises(CalibrationError, match=r"evaluation seq_len=1 does not fit .* accepted: 2 <= seq_len"):
        tp.data.evaluation(lm, text_path, seq_len=1)


def test_a_reference_with_a_shorter_context_is_checked_too():
    lm, short = tiny_model("llama"), tiny_model("llama")
    short.model.config.max_position_embeddings = 128
    with pytest.raises(CalibrationError, match=r"seq_len=200 does not fit the model's context of 128 tokens"):
        tp.evaluate(lm, reference=short, data=_windows(200))


def test_calibration_longer_than_the_context_is_refused_before_any_work(text_path):
    lm = tiny_model("gpt2")
    with pytest.raises(CalibrationError, match="^calibration " + TOO_LONG):
        tp.data.calibration(lm, text_path, samples=2, seq_len=300)
    with pytest.raises(CalibrationError, match="^calibration " + TOO_LONG):
        tp.data.calibration(lm, "generated", samples=2, seq_len=300)
    with pytest.raises(CalibrationError, match="^calibration " + TOO_LONG):
        tp.compress(lm, "gptq-w4g128", _windows(300, n=2))


def test_windows_of_exactly_the_context_work(text_path):
    lm = tiny_model("gpt2")
    report = tp.evaluate(lm, reference=lm, data=text_path, seq_len=256, windows=1)
    assert report.seq_len == 256 and report.tokens == 255
    calib = tp.data.calibration(lm, text_path, samples=2, seq_len=256)
    assert tp.compress(lm, tp.Recipe(stages=[{"method": "gptq", "bits": 8, "group_size": 32}]), calib).layers
