"""The lowrank cache's calibrated projections are memoised per (model, ratio, calibration
tokens): the same tokens reuse them, other tokens recalibrate, even when only the ids' sum agrees."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from tensorpress import kv
from tensorpress.kv import lowrank
from tensorpress.kv.lowrank import token_digest


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama")


def _same_sum_pair() -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(1))
    b = a.flip(-1)  # the same tokens in reverse order: the same sum, other windows
    b[0, 0], b[0, 1] = b[0, 0] + 1, b[0, 1] - 1  # and two tokens changed, keeping the sum
    assert int(a.sum()) == int(b.sum()) and a.shape == b.shape and not torch.equal(a, b)
    return a, b


def test_token_digest_tells_sets_apart_by_their_tokens_not_their_sum():
    a, b = _same_sum_pair()
    assert token_digest(a) == token_digest(a.clone()) == token_digest(a.t().contiguous().t())
    assert token_digest(a) != token_digest(b)
    assert token_digest(a) != token_digest(a.reshape(8, 16))  # same bytes, other windows
    assert token_digest(a) != token_digest(a.to(torch.int32))


def test_calibration_sets_with_the_same_sum_get_their_own_projections(lm, monkeypatch):
    a, b = _same_sum_pair()
    calls = []
    real = lowrank.second_moments

    def counted(model, windows, *args, **kwargs):
        calls.append(windows)
        return real(model, windows, *args, **kwargs)

    monkeypatch.setattr(kv, "second_moments", counted)  # kv.cache looks it up in tensorpress.kv
    monkeypatch.setattr(kv, "_LOWRANK_MEMO", {})
    first = kv.cache("lowrank", lm, calibration=a, ratio=0.5)
    again = kv.cache("lowrank", lm, calibration=a.clone(), ratio=0.5)
    assert len(calls) == 1  # the same tokens (another tensor): memoised
    torch.testing.assert_close(again.layers[0].pk, first.layers[0].pk, rtol=0, atol=0)
    other = kv.cache("lowrank", lm, calibration=b, ratio=0.5)
    assert len(calls) == 2 and torch.equal(calls[1], b)  # recalibrated on b's own tokens
    differ = [not (torch.equal(x.pk, y.pk) and torch.equal(x.pv, y.pv)) for x, y in zip(first.layers, other.layers, strict=True)]
    assert any(differ)
    # and each set's projections are those computed from scratch on it
    fresh = lowrank.projections(real(lm.model, b), 0.5)
    for layer, (pk, pv) in zip(other.layers, fresh, strict=True):
        assert torch.equal(layer.pk, pk.to(layer.pk.dtype)) and torch.equal(layer.pv, pv.to(layer.pv.dtype))
