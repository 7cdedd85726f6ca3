"""What compress checks before it spends time: every pattern selects something, weights and
calibration statistics are finite."""

import pytest
import torch

import tensorpress as tp
from conftest import tiny_model
from tensorpress.engine import sequential
from tensorpress.errors import CalibrationError, InvalidWeightError, RecipeError


def _recipe(**stage):
    return tp.Recipe(stages=[stage])


def _calib(n=2, seq_len=16):
    return tp.data.TokenWindows(torch.randint(3, 300, (n, seq_len)), "random")


@pytest.mark.parametrize(
    "stage, setting, pattern, near",
    [
        ({"method": "rtn", "bits_overrides": {"down_prj": 8}}, "bits_overrides", "down_prj", "'down_proj', 'mlp.down_proj'"),
        ({"method": "magnitude", "sparsity_overrides": {"re:.*gate_prj": 0.3}}, "sparsity_overrides", "re:.*gate_prj", "'gate_proj'"),
        ({"method": "svd", "rank": 4, "rank_overrides": {"self_attn.q_pro": 2}}, "rank_overrides", "self_attn.q_pro", "'self_attn.q_proj'"),
        ({"method": "rtn", "targets": ["q_proj", "k_projj"]}, "targets", "k_projj", "'k_proj'"),
        ({"method": "rtn", "ignore": ["lm_head", "up_prj"]}, "ignore", "up_prj", "'up_proj'"),
    ],
)
def test_a_pattern_that_matches_nothing_is_named_with_near_matches(stage, setting, pattern, near):
    with pytest.raises(RecipeError) as info:
        tp.compress(tiny_model("llama"), _recipe(**stage))
    message = str(info.value)
    assert message.startswith(f"stage 1 ({stage['method']}): {setting} pattern {pattern!r} matches none of ")
    assert f"near matches: {near}" in message and "names look like 'model.layers.0.self_attn.q_proj'" in message


def test_an_override_for_a_linear_the_stage_does_not_select_is_an_error():
    with pytest.raises(RecipeError, match=r"bits_overrides pattern 'q_proj' matches none of the linears this stage selects"):
        tp.compress(tiny_model("llama"), _recipe(method="rtn", targets=["mlp.*"], bits_overrides={"q_proj": 8}))


def test_a_container_name_in_ignore_suggests_the_glob_for_its_linears():
    with pytest.raises(RecipeError, match=r"ignore pattern 'mlp' matches none of the model's linears .*'mlp' names modules "
                                          r"holding linears: 'mlp.\*' selects them"):
        tp.compress(tiny_model("llama"), _recipe(method="rtn", ignore=["mlp"]))


def test_a_target_that_ignore_cancels_is_an_error():
    with pytest.raises(RecipeError, match=r"targets pattern 'lm_head' matches only linears that ignore \['lm_head', "
                                          r"'re:.\*embed.\*'\] excludes \(e.g. 'lm_head'\)"):
        tp.compress(tiny_model("llama"), _recipe(method="rtn", targets=["q_proj", "lm_head"]))


@pytest.mark.parametrize("arch", ["bert", "gpt2", "opt"])
def test_default_ignore_patterns_and_patterns_that_match_are_fine(arch):
    # bert has no LM head and no architecture has a linear named like 're:.*embed.*': defaults never fail
    lm = tiny_model(arch)
    last = lm.adapter.block_linears()[-1]
    stage = {"method": "rtn", "bits": 4, "ignore": ["lm_head", "re:.*embed.*", last], "bits_overrides": {"re:.*[.]0[.].*": 8}}
    res = tp.compress(lm, _recipe(**stage))
    assert not any(name.endswith(last) for name in res.layers)
    assert all(r.parts[0].startswith("int8" if ".0." in name else "int4") for name, r in res.layers.items())


def test_nan_weights_are_refused_by_name_before_any_statistics_pass(monkeypatch):
    lm = tiny_model("llama")
    with torch.no_grad():
        lm.model.model.layers[1].self_attn.o_proj.weight[3, 4] = float("nan")

    def no_capture(*args, **kwargs):
        raise AssertionError("calibration ran before the weights were checked")

    monkeypatch.setattr(sequential, "capture_block_inputs", no_capture)
    with pytest.raises(InvalidWeightError, match=r"^model.layers.1.self_attn.o_proj: the weight has 1 NaN/Inf value\(s\) out of 4096"):
        tp.compress(lm, "gptq-w4g128", _calib())


def test_a_non_finite_head_is_refused_when_selected_and_ignored_otherwise():
    lm = tiny_model("llama")
    with torch.no_grad():
        lm.model.lm_head.weight[0, 0] = float("-inf")
    with pytest.raises(InvalidWeightError, match=r"^lm_head: the weight has 1 NaN/Inf"):
        tp.compress(lm, "rtn-w4g128-head")
    res = tp.compress(lm, "rtn-w4g128")  # the head is not compressed: its values are not the recipe's business
    assert "lm_head" not in res.layers


@pytest.mark.parametrize(
    "stage",
    [
        {"method": "gptq", "bits": 4, "group_size": 32},  # true-sequential (lockstep) statistics
        {"method": "gptq", "bits": 4, "group_size": 32, "sequential": False},  # whole-block statistics
        {"method": "awq", "bits": 4, "group_size": 32},  # statistics read by input_scales before apply
    ],
)
def test_non_finite_calibration_statistics_name_the_layer_before_the_method_runs(stage):
    lm = tiny_model("llama")
    with torch.no_grad():  # not a linear: the weights pass, the activations of block 1 overflow
        lm.model.model.layers[1].input_layernorm.weight[5] = float("inf")
    with pytest.raises(CalibrationError, match=r"^model.layers.1.self_attn.q_proj.*: the calibration statistic '\w+' has \d+ "
                                               r"NaN/Inf value\(s\): the activations reaching this layer overflow or are NaN"):
        tp.compress(lm, _recipe(**stage), _calib())
