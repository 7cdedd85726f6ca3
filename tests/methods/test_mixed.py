import pytest
import torch

import tensorpress as tp
from conftest import tiny_model
from tensorpress.errors import RecipeError
from tensorpress.methods.quant.mixed import allocate_bits, fisher_diagonals, width_costs


def test_greedy_allocation_meets_the_budget_and_favours_sensitive_layers():
    costs = {
        "a": {2: (100.0, 200), 4: (1.0, 400)},  # very sensitive
        "b": {2: (2.0, 200), 4: (1.0, 400)},  # barely
    }
    numel = {"a": 100, "b": 100}
    assert allocate_bits(costs, numel, 3.0) == {"a": 4, "b": 2}
    assert allocate_bits(costs, numel, 4.0) == {"a": 4, "b": 4}
    assert allocate_bits(costs, numel, 2.0) == {"a": 2, "b": 2}
    with pytest.raises(ValueError, match="below the narrowest width"):
        allocate_bits(costs, numel, 1.5)


def test_width_costs_fall_with_bits_and_count_scales():
    w = torch.randn(32, 64)
    costs = width_costs(w, torch.ones(64), [2, 3, 4], 32, False)
    assert costs[2][0] > costs[3][0] > costs[4][0]
    assert costs[3][1] == 32 * 64 * 3 + 32 * 2 * (16 + 3)


def test_target_bits_in_a_recipe(text_path):
    lm = tiny_model("llama")
    with torch.no_grad():  # make one layer far more sensitive than the others
        lm.model.model.layers[1].mlp.gate_proj.weight[:, :8] *= 30
    calib = tp.data.calibration(lm, text_path, samples=4, seq_len=32)
    recipe = tp.Recipe(stages=[{"method": "rtn", "group_size": 32, "target_bits": 3.2, "bit_choices": [2, 3, 4], "sensitivity": "activations"}])
    assert recipe.needs_calibration
    res = tp.compress(lm, recipe, calib)
    assert 2.9 < res.bits_per_weight <= 3.2
    widths = res.recipe.stages[0].bits_overrides
    assert set(widths.values()) <= {2, 3, 4} and len(set(widths.values())) > 1
    assert widths["model.layers.1.mlp.gate_proj"] == 4
    with pytest.raises(RecipeError, match="below the narrowest width"):
        tp.compress(lm, tp.Recipe(stages=[{"method": "rtn", "target_bits": 1.5, "bit_choices": [2, 3]}]), calib)


def test_bits_overrides_by_pattern():
    lm = tiny_model("llama")
    res = tp.compress(lm, tp.Recipe(stages=[{"method": "rtn", "bits": 3, "bits_overrides": {"down_proj": 8, "re:.*q_proj": 2}}]))
    parts = {name.rsplit(".", 1)[-1]: r.parts[0] for name, r in res.layers.items()}
    assert parts["down_proj"].startswith("int8") and parts["q_proj"].startswith("int2") and parts["up_proj"].startswith("int3")


def test_fisher_diagonals_are_mean_squared_per_window_gradients():
    lm = tiny_model("qwen2")
    windows = torch.randint(3, 300, (3, 12))
    names = ["model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"]
    weights = {n: lm.model.get_submodule(n).weight for n in names}
    fisher = fisher_diagonals(lm.model, weights, windows)
    expected = {n: torch.zeros_like(w) for n, w in weights.items()}
    for row in windows:
        lm.model.zero_grad()
        for w in weights.values():
            w.requires_grad_(True)
        lm.model(input_ids=row[None], labels=row[None]).loss.backward()
        for n, w in weights.items():
            expected[n] += w.grad.square() / len(windows)
    for n in names:
        torch.testing.assert_close(fisher[n], expected[n])
        assert fisher[n].abs().sum() > 0


def test_fisher_allocation_in_a_recipe_and_its_limits(text_path):
    lm = tiny_model("gpt2")  # Conv1D weights: the Fisher is transposed to (out, in)
    calib = tp.data.calibration(lm, text_path, samples=3, seq_len=32)
    recipe = tp.Recipe(stages=[{"method": "rtn", "group_size": 32, "target_bits": 3.5, "bit_choices": [2, 3, 4, 8]}])
    assert recipe.stages[0].sensitivity == "fisher"
    res = tp.compress(lm, recipe, calib)
    assert 3.0 < res.bits_per_weight <= 3.5
    assert len(set(res.recipe.stages[0].bits_overrides.values())) > 1
    before = dict(lm.model.named_parameters())
    after = dict(res.model.model.named_parameters())
    assert "transformer.wte.weight" in after
    kept = [n for n in after if n in before and n.rsplit(".", 1)[0] not in res.layers]
    assert kept and all(after[n].requires_grad == before[n].requires_grad for n in kept)  # flags restored
    encoder = tiny_model("bert")
    calib = tp.data.TokenWindows(torch.randint(3, 300, (2, 16)), "random")
    with pytest.raises(RecipeError, match="sensitivity 'fisher' needs a causal language model"):
        tp.compress(encoder, tp.Recipe(stages=[{"method": "rtn", "target_bits": 3.5}]), calib)
