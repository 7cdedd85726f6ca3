"""Pruning: masks, N:M patterns, SparseGPT's error compensation, OWL allocation, storage."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import tensorpress as tp
from conftest import tiny_model
from tensorpress.methods import METHODS, LayerInput
from tensorpress.methods.sparse.prune import _owl
from tensorpress.methods.sparse.prune_math import drop_smallest, keep_mask, sparsegpt
from tensorpress.parts import MaskedPart
from tensorpress.parts.masked import decode_nm, encode_nm, nm_index_bits
from tensorpress.parts.quant_math import compute_grid, quantize_with_grid


@settings(max_examples=40, deadline=None)
@given(m=st.integers(2, 8), data=st.data())
def test_nm_masks_keep_exactly_n_in_every_group(m, data):
    n = data.draw(st.integers(1, m - 1))
    rows, groups = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 5))
    seed = data.draw(st.integers(0, 10_000))
    scores = torch.rand(rows, groups * m, generator=torch.Generator().manual_seed(seed))
    mask = keep_mask(scores, 0.0, (n, m))
    assert (mask.reshape(rows, groups, m).sum(-1) == n).all()
    assert torch.equal(decode_nm(encode_nm(mask, n, m), n, m, mask.shape), mask)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_drop_smallest_is_a_stable_sorts_first_k(data):
    # few distinct values, so ties at the k-th value are the rule, not the exception
    rows, cols = data.draw(st.integers(1, 7)), data.draw(st.integers(1, 9))
    values = torch.tensor(data.draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0, -1.0]), min_size=rows * cols, max_size=rows * cols)))
    values = values.reshape(rows, cols)
    k = data.draw(st.integers(1, rows * cols))
    expected = torch.ones(rows * cols, dtype=torch.bool)
    expected[torch.sort(values.reshape(-1), stable=True).indices[:k]] = False
    mask = drop_smallest(values, k)
    assert mask.shape == values.shape and int((~mask).sum()) == k
    assert torch.equal(mask.reshape(-1), expected)


def _correlated_inputs(n_in=48, tokens=1000, seed=0):
    """Mildly correlated inputs with uneven channel scales, like a transformer's activations."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.eye(n_in) + 0.3 * torch.randn(n_in, n_in, generator=g)
    x = torch.randn(tokens, n_in, generator=g) @ mixing * (torch.rand(n_in, generator=g) * 2 + 0.2)
    return x, (x.T @ x).double()


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_sparsegpt_output_error_beats_magnitude_and_wanda(pattern):
    x, xtx = _correlated_inputs()
    w = torch.randn(32, 48, generator=torch.Generator().manual_seed(1))
    pruned, mask, _ = sparsegpt(w, xtx, 0.5, pattern, block_size=16)
    assert (pruned[~mask] == 0).all() and abs(mask.float().mean().item() - 0.5) < 0.02
    if pattern:
        assert (mask.reshape(32, 12, 4).sum(-1) == 2).all()
    norms = x.square().sum(0).sqrt()
    errors = {}
    for name, scores, per in (("magnitude", w.abs(), "layer"), ("wanda", w.abs() * norms, "row")):
        m = keep_mask(scores, 0.5, pattern, per=per)
        errors[name] = (x @ (w - w * m).T).square().sum()
    ours = (x @ (w - pruned).T).square().sum()
    same_mask_without_update = (x @ (w - w * mask).T).square().sum()
    assert ours < 0.8 * same_mask_without_update
    assert ours < errors["wanda"] < errors["magnitude"]


def test_sparsegpt_with_zero_sparsity_and_no_bits_is_the_identity():
    _, xtx = _correlated_inputs(16, 100)
    w = torch.randn(8, 16)
    pruned, mask, grid = sparsegpt(w, xtx, 0.0)
    assert mask.all() and grid is None and torch.allclose(pruned, w, atol=1e-5)


def test_sparsegpt_joint_quantization_keeps_zeros_and_grid():
    _, xtx = _correlated_inputs()
    w = torch.randn(32, 48)
    pruned, mask, grid = sparsegpt(w, xtx, 0.5, bits=4, group_size=16)
    assert (pruned[~mask] == 0).all()
    codes = quantize_with_grid(pruned, grid)
    part = MaskedPart(mask, pattern=None, codes=codes, grid=grid)
    assert torch.allclose(part.dense(), pruned, atol=1e-5)


@pytest.mark.parametrize("kind", ["fp16-unstructured", "fp16-2:4", "int4-4:8"])
def test_masked_part_saves_exactly_what_nbits_counts(kind):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(24, 64, generator=g)
    pattern = None if "unstructured" in kind else tuple(int(v) for v in kind.split("-")[1].split(":"))
    mask = keep_mask(w.abs(), 0.5, pattern, per="row")
    if kind.startswith("int4"):
        grid = compute_grid(w * mask, 4, 32, False)
        part = MaskedPart(mask, pattern=pattern, codes=quantize_with_grid(w, grid), grid=grid)
        value_bits = mask.sum().item() * 4 + grid.scales.numel() * 16 + grid.zeros.numel() * 4
    else:
        part = MaskedPart(mask, w, pattern=pattern)
        value_bits = mask.sum().item() * 16
    mask_bits = 24 * 64 if pattern is None else 24 * (64 // pattern[1]) * nm_index_bits(*pattern)
    assert part.nbits() == mask_bits + value_bits
    tensors, meta = part.state()
    stored = sum(t.numel() * t.element_size() * 8 for t in tensors.values())
    assert stored - part.nbits() < 8 * len(tensors)  # only the byte padding of each packed tensor
    again = MaskedPart.from_state(tensors, meta)
    assert torch.equal(again.dense(), part.dense()) and torch.equal(again.mask, mask)


def test_owl_keeps_the_average_and_spares_outlier_blocks():
    g = torch.Generator().manual_seed(3)
    layers = []
    for i in range(4):
        w = torch.randn(16, 32, generator=g)
        if i == 2:
            w[:, :3] *= 30  # block 2 has many outliers
        layers.append(LayerInput(f"model.layers.{i}.mlp.up_proj", w, w, None, {"act_sq": torch.ones(32, dtype=torch.float64)}))
    sparsity = _owl(layers, 0.6, 0.08, 5.0)
    values = list(sparsity.values())
    assert abs(sum(values) / len(values) - 0.6) < 1e-6
    assert sparsity["model.layers.2.mlp.up_proj"] == min(values) and max(values) - min(values) <= 0.16 + 1e-9


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValidationError, match="N:M"):
        METHODS["wanda"](method="wanda", pattern="2-4")
    with pytest.raises(ValidationError, match="wanda or sparsegpt"):
        METHODS["magnitude"](method="magnitude", allocation="owl")
    with pytest.raises(ValidationError, match="cannot be used with pattern"):
        METHODS["wanda"](method="wanda", pattern="2:4", allocation="owl")
    with pytest.raises(ValueError, match="divisible"):
        keep_mask(torch.rand(2, 6), 0.5, (2, 4))


@pytest.mark.parametrize("recipe", ["sparsegpt-2-4", "wanda-60-owl"])
def test_pruned_model_reloads_with_identical_logits(tmp_path, recipe):
    lm = tiny_model("llama")
    calib = tp.data.calibration(lm, source="generated", samples=4, seq_len=32, seed=0)
    result = tp.compress(lm, tp.recipes.get(recipe), calib)
    result.save(tmp_path / "p")
    again = tp.load_compressed(tmp_path / "p")
    ids = torch.randint(3, 300, (2, 12))
    with torch.no_grad():
        assert torch.equal(again.model(input_ids=ids).logits, result.model.model(input_ids=ids).logits)
    parts = [p for m in again.model.modules() for p in getattr(m, "parts", []) if isinstance(p, MaskedPart)]
    assert parts and all(p.sparsity > 0.3 for p in parts)


def test_global_magnitude_meets_the_average_with_uneven_layers(tmp_path):
    lm = tiny_model("llama")
    with torch.no_grad():
        lm.model.model.layers[0].mlp.up_proj.weight.mul_(10)  # one layer of large weights
    recipe = tp.Recipe.model_validate({"name": "g", "stages": [{"method": "magnitude", "sparsity": 0.5, "allocation": "global"}]})
    result = tp.compress(lm, recipe)
    parts = {n: m.parts[0] for n, m in result.model.model.named_modules() if hasattr(m, "parts")}
    total = sum(p.mask.numel() for p in parts.values())
    assert abs(sum(p.mask.numel() - p.kept for p in parts.values()) / total - 0.5) < 0.01
    assert parts["model.layers.0.mlp.up_proj"].sparsity < 0.1  # its large weights mostly survive the global threshold
