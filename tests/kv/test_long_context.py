"""Long-context perplexity and passkey evaluation on a tiny model."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import tiny_model

import tensorpress as tp
from tensorpress.errors import CalibrationError
from tensorpress.eval.kv import passkey_passed


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


def test_passkey_trials_are_seeded_and_a_random_model_fails_them(lm):
    trials = tp.eval.passkey(lm.model, lm.tokenizer, tp.kv.factory("snapkv", lm, ratio=0.5), [300], trials=3, seed=4)
    again = tp.eval.passkey(lm.model, lm.tokenizer, None, [300], trials=3, seed=4)
    assert [t.key for t in trials] == [t.key for t in again] and len({t.key for t in trials}) == 3
    assert all(abs(t.length - 300) < 40 and t.answer and t.key not in t.answer for t in trials)
    assert not any(t.passed for t in trials + again)  # the negative control: random weights retrieve nothing


class _Replying(torch.nn.Module):
    """A stand-in for a causal LM whose greedy continuation is ``reply(key)``, with the key read
    back from the prompt: a model that retrieves (or garbles) the key as told."""

    def __init__(self, tokenizer, reply):
        super().__init__()
        self.tokenizer, self.reply, self.caches = tokenizer, reply, []

    def generate(self, input_ids, attention_mask, max_new_tokens, do_sample, pad_token_id, past_key_values=None):
        assert input_ids.shape == attention_mask.shape and not do_sample
        self.caches.append(past_key_values)
        key = re.search(r"The pass key is ([0-9]+)\.", self.tokenizer.decode(input_ids[0])).group(1)
        new = self.tokenizer(self.reply(key), add_special_tokens=False, return_tensors="pt").input_ids
        return torch.cat([input_ids, new[:, :max_new_tokens]], dim=1)


@pytest.mark.parametrize(("reply", "passed"), [
    (lambda key: f" {key}.", True),
    (lambda key: f" The key is {key}", True),
    (lambda key: "".join(f"{c}{d}" for c, d in zip("abcde", key, strict=True)), False),  # a1b2c3d4e5
    (lambda key: f" {key}0", False),  # a longer number that merely starts with the key
    (lambda key: f" {key[:-1]}", False),  # cut short
    (lambda key: f" {int(key) + 1}", False),  # another number
], ids=["number", "sentence", "scattered", "run-on", "cut-short", "other-number"])
def test_passkey_scores_what_the_model_answers(lm, reply, passed):
    model = _Replying(lm.tokenizer, reply)
    trials = tp.eval.passkey(model, lm.tokenizer, tp.kv.factory("full", lm), [200], trials=3, seed=1, new_tokens=24)
    assert [t.passed for t in trials] == [passed] * 3
    assert [t.answer for t in trials] == [reply(t.key).strip() for t in trials]
    assert len(model.caches) == 3 and len({id(c) for c in model.caches}) == 3  # a fresh cache per trial
    model.caches.clear()
    tp.eval.passkey(model, lm.tokenizer, None, [200], trials=1, new_tokens=24)
    assert model.caches == [None]  # no cache asked for: generate's own


@pytest.mark.parametrize(("answer", "passed"), [
    ("12345", True), (" 12345.", True), ("The pass key is 12345", True), ("12345 is the pass key", True),
    ("a1b2c3d4e5", False), ("123456", False), ("1234", False), ("1 2345", False), ("12 345", False),
    ("54321", False), ("7 then 12345", False), ("", False), ("no digits here", False),
])
def test_passkey_answer_passes_when_its_first_number_is_the_key(answer, passed):
    assert passkey_passed(answer, "12345") is passed


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
