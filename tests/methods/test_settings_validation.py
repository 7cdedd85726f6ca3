"""Settings that cannot work are refused when the recipe is built (or, where the answer depends
on a layer's shape, when the layer is reached), with a RecipeError that names the stage, the
value and what is accepted."""

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

import tensorpress as tp
from conftest import tiny_model
from tensorpress.errors import RecipeError
from tensorpress.methods import METHODS


def _recipe(**stage):
    return tp.Recipe.from_dict({"name": "t", "stages": [stage]})


@pytest.mark.parametrize(
    "stage, setting, pattern",
    [
        ({"method": "rtn", "targets": ["re:(q_proj"]}, "targets", "re:(q_proj"),
        ({"method": "rtn", "ignore": ["lm_head", "re:*embed"]}, "ignore", "re:*embed"),
        ({"method": "rtn", "bits_overrides": {"re:[down": 8}}, "bits_overrides", "re:[down"),
        ({"method": "wanda", "sparsity_overrides": {"re:mlp\\": 0.3}}, "sparsity_overrides", "re:mlp\\"),
        ({"method": "svd", "rank": 4, "rank_overrides": {"re:(?P<x": 2}}, "rank_overrides", "re:(?P<x"),
    ],
)
def test_an_invalid_regex_names_the_stage_setting_pattern_and_regex_error(stage, setting, pattern):
    with pytest.raises(RecipeError) as info:
        tp.Recipe.from_dict({"name": "t", "stages": [{"method": "rtn"}, stage]})
    message = str(info.value)
    assert message.startswith(f"recipe: stage 2 ({stage['method']}): {setting}: {pattern!r} is not a valid regular expression (")
    assert "position" in message  # the re module's own explanation follows


def test_an_invalid_regex_in_a_yaml_file_or_a_config_object(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("stages:\n  - method: gptq\n    targets: ['re:layers.(0|1']\n")
    with pytest.raises(RecipeError, match=r"stage 1 \(gptq\): targets: 're:layers.\(0\|1' is not a valid regular expression \(missing \)"):
        tp.recipes.resolve(path)
    # a config built directly is a pydantic model: its own ValidationError, with the same message
    with pytest.raises(ValidationError, match="is not a valid regular expression"):
        METHODS["rtn"](targets=["re:("])


def test_valid_regexes_and_globs_are_accepted():
    stage = _recipe(method="rtn", targets=[r"re:.*layers\.[01]\..*"], bits_overrides={"re:.*(q|k)_proj": 8, "mlp.*": 3}).stages[0]
    assert stage.bits_for("model.layers.0.self_attn.k_proj") == 8 and stage.bits_for("model.layers.1.mlp.up_proj") == 3


@pytest.mark.parametrize(
    "stage, message",
    [
        ({"method": "svd", "rank": 0}, r"rank: Input should be greater than or equal to 1 \(got 0\), accepted: rank >= 1"),
        ({"method": "svd_llm", "rank_overrides": {"down_proj": 0}}, r"rank_overrides.down_proj: .*\(got 0\), accepted: each value >= 1"),
        ({"method": "asvd", "keep": 0}, r"keep: Input should be greater than 0 \(got 0\), accepted: 0 < keep <= 1"),
        ({"method": "qlr", "rank": 0}, r"rank: .*\(got 0\), accepted: rank >= 1"),
        ({"method": "svd", "target_reduction": 1.0}, r"target_reduction: .*\(got 1.0\), accepted: 0 < target_reduction < 1"),
        ({"method": "magnitude", "sparsity": 0}, r"sparsity: Input should be greater than 0 \(got 0\), accepted: 0 < sparsity < 1"),
        ({"method": "wanda", "sparsity": 1.0}, r"sparsity: Input should be less than 1 \(got 1.0\), accepted: 0 < sparsity < 1"),
        ({"method": "sparsegpt", "sparsity_overrides": {"q_proj": 0.0}}, r"sparsity_overrides.q_proj: .*\(got 0.0\), accepted: 0 < each value < 1"),
        ({"method": "sparsegpt", "sparsity_overrides": {"q_proj": 1}}, r"sparsity_overrides.q_proj: .*\(got 1\), accepted: 0 < each value < 1"),
        ({"method": "rtn", "bit_choices": [1, 4]}, r"bit_choices.0: .*\(got 1\), accepted: 2 <= each value <= 8"),
        ({"method": "svd", "rank": 4, "keep": 0.5}, r"stage 1 \(svd\): give only one of rank, keep, target_reduction \(got rank, keep\)$"),
    ],
)
def test_settings_that_leave_nothing_or_keep_everything_are_refused_with_the_range(stage, message):
    with pytest.raises(RecipeError, match=message):
        _recipe(**stage)


def test_edge_settings_inside_the_ranges_still_compress():
    lm = tiny_model("llama")
    res = tp.compress(lm, _recipe(method="svd", rank=1, targets=["q_proj"]))
    assert {r.parts[0] for r in res.layers.values()} == {"lowrank r1 fp16"}
    res = tp.compress(lm, _recipe(method="magnitude", sparsity=0.99, sparsity_overrides={"down_proj": 0.01}))
    parts = {n: res.model.model.get_submodule(n).parts[0] for n in res.layers}
    assert parts["model.layers.0.mlp.up_proj"].sparsity == pytest.approx(0.99, abs=1e-3)
    assert parts["model.layers.0.mlp.down_proj"].sparsity == pytest.approx(0.01, abs=1e-3)


def test_a_keep_that_rounds_a_layer_to_rank_zero_names_the_layer_and_its_smallest_keep():
    lm = tiny_model("llama")
    # q_proj is 64 x 64: rank = keep x 32, so keep must be at least 1/32 = 0.03125
    with pytest.raises(RecipeError, match=r"svd: keep=0.031 leaves rank 0 for model.layers.0.self_attn.q_proj \(64 x 64: "
                                          r"rank = keep x 32.0\); accepted for this layer: 0.032 <= keep <= 1"):
        tp.compress(lm, _recipe(method="svd", keep=0.031, targets=["q_proj"]))
    res = tp.compress(lm, _recipe(method="svd", keep=0.032, targets=["q_proj"]))
    assert {r.parts[0] for r in res.layers.values()} == {"lowrank r1 fp16"}


def test_a_uniform_target_reduction_that_leaves_rank_zero_gives_the_largest_accepted():
    lm = tiny_model("llama")
    # k/v are 32 x 64 (break-even rank 21.3): (1 - t) x 21.3 >= 1 needs t <= 0.953
    with pytest.raises(RecipeError, match=r"svd: target_reduction=0.96 with allocation 'uniform' leaves rank 0 for 4 of 14 "
                                          r"layers \(e.g. model.layers.0.self_attn.k_proj\).*accepted: 0 < target_reduction <= 0.953"):
        tp.compress(lm, _recipe(method="svd", target_reduction=0.96, allocation="uniform"))
    res = tp.compress(lm, _recipe(method="svd", target_reduction=0.953, allocation="uniform"))
    assert all(r.parts[0].startswith("lowrank r1 ") for n, r in res.layers.items() if n.endswith(("k_proj", "v_proj")))


def test_eora_rank_zero_stays_a_noop_stage():
    # eora adds a correction to an earlier stage's parts: rank 0 adds nothing and removes nothing
    assert _recipe(method="eora", rank=0).stages[0].rank == 0


def test_owl_settings_that_would_leave_a_block_unpruned_are_refused():
    lm = tiny_model("llama")
    calib = tp.data.TokenWindows(torch.randint(3, 300, (2, 16)), "random")
    # two blocks: owl puts one at sparsity - owl_lambda, here below 0
    with pytest.raises(RecipeError, match=r"wanda: owl with sparsity=0.05 and owl_lambda=0.08 leaves 7 layer\(s\) "
                                          r"\(e.g. model.layers.\d.\w+.\w+\) at sparsity 0.*owl_lambda < sparsity / 2 = 0.025"):
        tp.compress(lm, _recipe(method="wanda", sparsity=0.05, allocation="owl", owl_lambda=0.08), calib)
    res = tp.compress(lm, _recipe(method="wanda", sparsity=0.05, allocation="owl", owl_lambda=0.024), calib)
    assert all(0 < s < 1 for s in res.recipe.stages[0].sparsity_overrides.values())


def test_a_recipe_is_accepted_as_a_name_a_path_a_dict_or_a_recipe(tmp_path):
    lm = tiny_model("llama")
    by_name = tp.compress(lm, "rtn-w8")
    assert by_name.recipe.name == "rtn-w8" and by_name.layers
    path = tmp_path / "mine.yaml"
    path.write_text(tp.recipes.get("rtn-w8").to_yaml())
    for recipe in (path, str(path), tp.recipes.get("rtn-w8").to_dict()):
        assert tp.compress(lm, recipe).bits_per_weight == by_name.bits_per_weight
    recipe = tp.recipes.get("rtn-w8")
    assert tp.recipes.resolve(recipe) is recipe


@pytest.mark.parametrize("bad", [3, ["rtn"], None, b"rtn-w8"])
def test_anything_else_is_a_recipe_error_saying_what_is_accepted(bad):
    with pytest.raises(RecipeError, match=r"expected a recipe: a tp.Recipe, a built-in recipe name .*, a YAML path, "
                                          rf"or a dict with 'stages'; got {type(bad).__name__}"):
        tp.compress(tiny_model("llama"), bad)


def test_unknown_names_missing_files_and_bad_dicts_are_recipe_errors(tmp_path):
    lm = tiny_model("llama")
    with pytest.raises(RecipeError, match=r"unknown recipe 'gptq-w4g12'; did you mean 'gptq-w4g128'.*\? built-in recipes: .*\(a recipe file is given by its path"):
        tp.compress(lm, "gptq-w4g12")
    with pytest.raises(RecipeError, match="recipe file not found"):
        tp.compress(lm, Path(tmp_path / "nope.yml"))
    with pytest.raises(RecipeError, match="missing 'stages'"):
        tp.compress(lm, {"name": "x"})
