import pytest
import torch
from conftest import tiny_model, wide_model

import tensorpress as tp
from tensorpress.errors import RecipeError
from tensorpress.methods.quant.mixed import fisher_diagonals, width_costs
from tensorpress.search import greedy_choice


def allocate_bits(costs, numel, target):
    """The target_bits allocation: the greedy choice under target x weights bits."""
    return greedy_choice(costs, target * sum(numel.values()))


def test_greedy_allocation_meets_the_budget_and_favours_sensitive_layers():
    costs = {
        "a": {2: (100.0, 200), 4: (1.0, 400)},  # very sensitive
        "b": {2: (2.0, 200), 4: (1.0, 400)},  # barely
    }
    numel = {"a": 100, "b": 100}
    assert allocate_bits(costs, numel, 3.0) == {"a": 4, "b": 2}
    assert allocate_bits(costs, numel, 4.0) == {"a": 4, "b": 4}
    assert allocate_bits(costs, numel, 2.0) == {"a": 2, "b": 2}
    with pytest.raises(ValueError, match="below the cheapest choice"):
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


def test_allocation_orders_named_candidates_by_storage():
    costs = {"a": {"q6_k": (1.0, 656), "q2_k": (100.0, 262)}, "b": {"q2_k": (2.0, 262), "q6_k": (1.0, 656)}}
    assert allocate_bits(costs, {"a": 100, "b": 100}, 4.6) == {"a": "q6_k", "b": "q2_k"}
    assert allocate_bits(costs, {"a": 100, "b": 100}, 2.7) == {"a": "q2_k", "b": "q2_k"}


def test_format_costs_are_the_types_exact_bits_with_llama_cpps_fallback():
    from tensorpress.methods.quant.mixed import format_costs

    w = torch.randn(8, 512)
    costs = format_costs(w, torch.ones(512), ["q2_k", "q3_k", "q4_k", "q6_k"], mse=False)
    assert [costs[f][1] for f in ("q2_k", "q3_k", "q4_k", "q6_k")] == [8 * 512 * b for b in (2.625, 3.4375, 4.5, 6.5625)]
    assert costs["q2_k"][0] > costs["q3_k"][0] > costs["q4_k"][0] > costs["q6_k"][0]
    # rows of 96 are off the 256 grid: q2_k and q3_k both fall back to Q4_0 (costed once), q6_k to Q8_0
    narrow = format_costs(torch.randn(8, 96), torch.ones(96), ["q2_k", "q3_k", "q6_k"], mse=False)
    assert sorted(narrow) == ["q2_k", "q6_k"] and narrow["q2_k"][1] == 8 * 96 * 4.5 and narrow["q6_k"][1] == 8 * 96 * 8.5


def test_format_choices_allocate_llama_cpp_types_that_export_exactly(tmp_path, text_path):
    from collections import Counter

    from tensorpress.io.headers import gguf_header
    from tensorpress.parts import BlockPart

    lm = wide_model("llama")
    with torch.no_grad():  # one layer far more sensitive than the others
        lm.model.model.layers[1].mlp.gate_proj.weight[:, :8] *= 30
    calib = tp.data.calibration(lm, text_path, samples=4, seq_len=32)
    formats = ["q2_k", "q3_k", "q4_k", "q6_k"]
    res = tp.compress(lm, tp.Recipe(stages=[{"method": "gptq", "target_bits": 3.6, "format_choices": formats,
                                             "sensitivity": "activations"}]), calib)
    assert 3.3 < res.bits_per_weight <= 3.6
    chosen = {name: layer.parts[0] for name, layer in res.model.model.named_modules() if hasattr(layer, "parts")}
    assert all(isinstance(p, BlockPart) for p in chosen.values()) and len(chosen) == 14
    kinds = Counter(p.fmt.name for p in chosen.values())
    assert set(kinds) <= set(formats) and len(kinds) > 1
    assert chosen["model.layers.1.mlp.gate_proj"].fmt.name == "q6_k"
    stage = res.recipe.stages[0]
    assert stage.target_bits is None and stage.format_choices is None and len(stage.format_overrides) == 14
    # the GGUF holds every chosen type as it is (export checks each tensor bit for bit)
    types = Counter(k for k, _ in gguf_header(tp.io.export(res, tmp_path / "m.gguf", format="gguf"))["tensors"].values())
    assert {k.lower(): n for k, n in types.items() if k.lower() in formats} == dict(kinds)
    again = tp.load_compressed(res.save(tmp_path / "ckpt"))  # the resolved recipe loads back
    ids = torch.randint(3, 300, (1, 12))
    with torch.no_grad():
        assert torch.equal(again.model(ids).logits, res.model.model(ids).logits)


def test_format_choices_settings_are_checked():
    with pytest.raises(RecipeError, match="set target_bits"):
        tp.Recipe(stages=[{"method": "rtn", "format_choices": ["q4_k", "q6_k"]}])
    with pytest.raises(RecipeError, match="drop bits"):
        tp.Recipe(stages=[{"method": "rtn", "target_bits": 4, "format_choices": ["q4_k", "q6_k"], "bits": 4}])
    with pytest.raises(RecipeError, match="q7_k"):
        tp.Recipe(stages=[{"method": "rtn", "target_bits": 4, "format_choices": ["q4_k", "q7_k"]}])
