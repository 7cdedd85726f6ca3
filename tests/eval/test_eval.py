import json
import math

import pytest
import torch

import tensorpress as tp
from conftest import tiny_model
from tensorpress.eval import size_report
from tensorpress.eval.quality import causal_quality


def test_perplexity_matches_a_direct_computation():
    lm = tiny_model("llama")
    win = tp.data.TokenWindows(torch.randint(3, 300, (3, 20)), "random")
    q = causal_quality(lm.model, win, batch_size=2)
    with torch.no_grad():
        logits = lm.model(input_ids=win.input_ids).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), win.input_ids[:, 1:].reshape(-1))
    assert q.tokens == 3 * 19
    assert math.isclose(q.perplexity, math.exp(nll.item()), rel_tol=1e-5)


def test_model_against_itself_has_zero_kl_and_full_agreement(text_path):
    lm = tiny_model("gpt2")
    report = tp.evaluate(lm, reference=lm, data=text_path, seq_len=32, windows=3)
    assert report.kl == pytest.approx(0.0, abs=1e-6)
    assert report.top1_agreement == 1.0
    assert report.perplexity == pytest.approx(report.reference_perplexity)
    assert (report.windows, report.seq_len, report.tokens) == (3, 32, 3 * 31)
    assert report.bits_per_weight_model == 32.0
    # nothing is compressed: no bits/weight of linears, written as null so the JSON stays strict
    assert math.isnan(report.bits_per_weight_linears)
    assert json.loads(report.to_json())["bits_per_weight_linears"] is None and "NaN" not in report.to_json()


def test_compression_shows_up_in_kl_agreement_and_size(text_path):
    lm = tiny_model("llama")
    r4 = tp.evaluate(tp.compress(lm, tp.recipes.get("rtn-w4g128")), reference=lm, data=text_path, seq_len=32, windows=3)
    r2 = tp.evaluate(tp.compress(lm, tp.Recipe(stages=[{"method": "rtn", "bits": 2}])), reference=lm, data=text_path, seq_len=32, windows=3)
    assert 0 < r4.kl < r2.kl
    assert r2.top1_agreement <= r4.top1_agreement <= 1.0
    assert r2.bits_per_weight_linears < r4.bits_per_weight_linears < 4.5
    assert r4.bits_per_weight_model < 32.0 and r4.compression_seconds is not None
    # the LoadedModel of a result carries its compression time too (the README's usage)
    res = tp.compress(lm, tp.recipes.get("rtn-w8"))
    assert tp.evaluate(res.model, data=text_path, seq_len=32, windows=1).compression_seconds == res.timings["total_seconds"]


def test_size_counts_tied_weights_once_and_parts_exactly():
    lm = tiny_model("gpt2")
    params = sum(p.numel() for p in lm.model.parameters())
    assert size_report(lm.model).model_weights == params
    assert size_report(lm.model).model_bits == params * 32
    res = tp.compress(lm, tp.Recipe(stages=[{"method": "rtn", "bits": 4, "group_size": 32}]))
    size = size_report(res.model.model)
    assert size.model_weights == params
    assert size.linear_bits == sum(r.weight_bits for r in res.layers.values())


def test_encoder_fidelity_against_reference(text_path):
    lm = tiny_model("bert")
    same = tp.evaluate(lm, reference=lm, data=text_path, seq_len=32, windows=3)
    assert same.cosine_similarity == pytest.approx(1.0, abs=1e-6) and same.hidden_mse == pytest.approx(0.0, abs=1e-10)
    r2 = tp.evaluate(tp.compress(lm, tp.Recipe(stages=[{"method": "rtn", "bits": 2}])), reference=lm, data=text_path, seq_len=32, windows=3)
    assert r2.cosine_similarity < 0.9999 and r2.hidden_mse > 0
    assert r2.perplexity is None


def test_reference_cache_runs_the_reference_once_with_identical_results(text_path):
    lm = tiny_model("llama")
    windows = tp.data.evaluation(lm, text_path, seq_len=32, windows=3)
    res = tp.compress(lm, tp.recipes.get("rtn-w3g128"))
    calls = []
    handle = lm.model.register_forward_hook(lambda m, a, o: calls.append(1))
    plain = tp.evaluate(res, reference=lm, data=windows)
    assert len(calls) == 3
    cache: dict = {}
    first = tp.evaluate(res, reference=lm, data=windows, reference_cache=cache)
    second = tp.evaluate(res, reference=lm, data=windows, reference_cache=cache)
    handle.remove()
    assert len(calls) == 6 and len(cache) == 3  # 3 without cache, then 3 for both cached calls
    for report in (first, second):
        assert (report.kl, report.top1_agreement, report.reference_perplexity) == (plain.kl, plain.top1_agreement, plain.reference_perplexity)
