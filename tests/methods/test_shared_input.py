"""Linears that read the same input (q/k/v) compressed together give what they get one by one."""

import pytest
import torch

from tensorpress.methods import METHODS, LayerInput


def _layers(seed: int = 0) -> list[LayerInput]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 64, generator=g) * torch.linspace(0.2, 3.0, 64)  # uneven input channels
    xtx = (x.T @ x).double()
    stats = {"xtx": xtx, "tokens": 512}
    return [
        LayerInput(name, w, w, None, stats)
        for name, w in (("blk.q", torch.randn(32, 64, generator=g)), ("blk.k", torch.randn(16, 64, generator=g)), ("blk.v", torch.randn(16, 64, generator=g)))
    ]


def _dense(parts) -> torch.Tensor:
    return sum(p.dense() for p in parts)


@pytest.mark.parametrize(
    "settings",
    [
        {"method": "gptq", "bits": 4, "group_size": 32},
        {"method": "gptq", "bits": 3, "group_size": None, "act_order": False, "symmetric": True},
        {"method": "sparsegpt", "sparsity": 0.5},
        {"method": "sparsegpt", "sparsity": 0.5, "pattern": "2:4"},
        {"method": "sparsegpt", "sparsity": 0.5, "bits": 4, "group_size": 32},
    ],
)
def test_stacked_matches_one_by_one(settings):
    stage = METHODS[settings["method"]](**settings)
    layers = _layers()
    together = stage.apply_shared(layers)
    assert together is not None and len(together) == 3
    for layer, parts in zip(layers, together, strict=True):
        alone = stage.apply(layer)
        assert [p.describe() for p in parts] == [p.describe() for p in alone]
        assert sum(p.nbits() for p in parts) == sum(p.nbits() for p in alone)
        # the same algorithm per row; the lazy block update's GEMM may round differently for a
        # different number of rows, so compare the weights, not bit patterns
        torch.testing.assert_close(_dense(parts), _dense(alone), rtol=1e-3, atol=1e-3)


def test_sparsegpt_thresholds_each_stacked_matrix_on_its_own():
    stage = METHODS["sparsegpt"](method="sparsegpt", sparsity=0.5)
    layers = _layers()
    layers[1] = LayerInput("blk.k", layers[1].weight * 100, layers[1].weight * 100, None, layers[1].stats)  # far larger saliencies
    for parts in stage.apply_shared(layers):
        mask = parts[0].mask if hasattr(parts[0], "mask") else parts[0].dense() != 0
        assert mask.float().mean().item() == pytest.approx(0.5, abs=0.02)  # one threshold overall would spare k


def test_no_sharing_when_widths_differ_or_a_subclass_makes_other_parts():
    layers = _layers()
    mixed = METHODS["gptq"](method="gptq", bits=4, bits_overrides={"k": 3})
    assert mixed.apply_shared(layers) is None
    assert METHODS["spqr"](method="spqr", bits=3).apply_shared(layers) is None
    assert METHODS["sparsegpt"](method="sparsegpt", sparsity=0.5, sparsity_overrides={"v": 0.6}).apply_shared(layers) is None
