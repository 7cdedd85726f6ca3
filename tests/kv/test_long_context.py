"""Long-context perplexity and passkey evaluation on a tiny model."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import tensorpress as tp
from tensorpress.errors import CalibrationError


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama")


def test_long_context_against_the_full_cache(lm):
    windows = torch.randint(3, 300, (2, 48), generator=torch.Generator().manual_seed(0))
    makers = {"same": tp.kv.factory("full", lm), "streaming": tp.kv.factory("streaming", lm, window=8, sinks=2)}
    reports = {r.method: r for r in tp.eval.long_context(lm.model, makers, windows, chunk=12)}
    full, same, streaming = reports["full"], reports["same"], reports["streaming"]
    assert full.tokens_scored == same.tokens_scored == 2 * 35  # 3 chunks of 12 after the first, minus the last target
    assert same.perplexity == pytest.approx(full.perplexity, rel=1e-6)
    assert same.kl == pytest.approx(0.0, abs=1e-9) and same.top1_agreement == 1.0
    assert same.compression == pytest.approx(1.0)
    assert streaming.kl > 1e-4 and 4 < streaming.compression < 48 / 10  # 10 of 48 tokens, plus their positions
    # without the cache the answer would not depend on it: check against a direct forward pass
    with torch.no_grad():
        logits = lm.model(windows).logits[:, 12:-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 13:].reshape(-1))
    assert full.perplexity == pytest.approx(nll.exp().item(), rel=1e-3)


def test_long_context_rejects_windows_shorter_than_a_chunk(lm):
    with pytest.raises(CalibrationError, match="context > chunk"):
        tp.eval.long_context(lm.model, {}, torch.zeros(1, 8, dtype=torch.long), chunk=8)


def test_passkey_trials_are_seeded_and_scored(lm):
    trials = tp.eval.passkey(lm.model, lm.tokenizer, tp.kv.factory("snapkv", lm, ratio=0.5), [300], trials=3, seed=4)
    again = tp.eval.passkey(lm.model, lm.tokenizer, None, [300], trials=3, seed=4)
    assert [t.key for t in trials] == [t.key for t in again] and len({t.key for t in trials}) == 3
    assert all(abs(t.length - 300) < 40 and t.passed == t.answer.replace(" ", "").startswith(t.key) for t in trials)


def test_prompt_plants_the_key_at_the_requested_depth(lm):
    from tensorpress.eval.kv import passkey_prompt

    for depth in (0.0, 0.5, 1.0):
        text = lm.tokenizer.decode(passkey_prompt(lm.tokenizer, 200, depth, "12345")[0])
        where = text.replace(" ", "").find("12345")
        assert where > 0
    early = lm.tokenizer.decode(passkey_prompt(lm.tokenizer, 200, 0.1, "12345")[0]).replace(" ", "")
    late = lm.tokenizer.decode(passkey_prompt(lm.tokenizer, 200, 0.9, "12345")[0]).replace(" ", "")
    assert early.find("12345") < late.find("12345")


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "qwen3"])
def test_caches_drive_other_gqa_architectures(arch):
    model = tiny_model(arch)
    ids = torch.randint(3, 300, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model.model(ids).logits
        cache = tp.kv.cache("h2o", model, ratio=1.0, dtype="float32")
        out = torch.cat([model.model(ids[:, lo:lo + 10], past_key_values=cache, use_cache=True).logits for lo in (0, 10, 20)], 1)
    assert torch.allclose(out, reference, atol=2e-5, rtol=1e-4)
