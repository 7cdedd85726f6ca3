import pytest

import tensorpress as tp
from tensorpress.errors import RecipeError
from tensorpress.methods import METHODS, matches


def test_builtin_recipes_load_and_are_listed():
    names = tp.recipes.builtin_names()
    assert {"rtn-w4g128", "rtn-w3g128", "rtn-w8"} <= set(names)
    recipe = tp.recipes.get("rtn-w4g128")
    assert recipe.stages[0].bits == 4 and recipe.stages[0].group_size == 128
    assert not recipe.needs_calibration


def test_recipe_yaml_round_trip(tmp_path):
    recipe = tp.Recipe(name="mine", stages=[{"method": "rtn", "bits": 3, "group_size": None}])
    path = tmp_path / "r.yaml"
    path.write_text(recipe.to_yaml())
    again = tp.Recipe.from_yaml(path)
    assert again.to_dict() == recipe.to_dict()
    assert again.stages[0].ignore == ["lm_head", "re:.*embed.*"]


@pytest.mark.parametrize(
    "stages, message",
    [
        ([{"method": "gptqq", "bits": 4}], r"stage 1: unknown method 'gptqq'; available methods: .*rtn"),
        ([{"method": "rtn", "bits": 9}], r"stage 1 \(rtn\): bits: Input should be less than or equal to 8 \(got 9\)"),
        ([{"method": "rtn", "bits": 1}], r"bits: Input should be greater than or equal to 2"),
        ([{"method": "rtn", "bitz": 4}], r"unknown setting 'bitz'; accepted: .*bits, group_size, symmetric"),
        ([{"method": "rtn", "group_size": 0}], r"group_size: Input should be greater than or equal to 1"),
        ([{"method": "rtn"}, {"method": "rtn", "symmetric": "maybe"}], r"stage 2 \(rtn\): symmetric"),
        (["rtn"], r"stage 1: expected a mapping"),
        ([], r"non-empty list of stages"),
    ],
)
def test_bad_stages_name_the_stage_field_and_allowed_values(stages, message):
    with pytest.raises(RecipeError, match=message):
        tp.Recipe.from_dict({"name": "bad", "stages": stages})


def test_malformed_yaml_and_unknown_top_level_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [method: rtn\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        tp.Recipe.from_yaml(bad)
    extra = tmp_path / "extra.yaml"
    extra.write_text("name: x\nstagez: []\n")
    with pytest.raises(RecipeError, match=r"unknown top-level field\(s\) \['stagez'\]"):
        tp.Recipe.from_yaml(extra)
    with pytest.raises(RecipeError, match="recipe file not found"):
        tp.Recipe.from_yaml(tmp_path / "missing.yaml")
    with pytest.raises(RecipeError, match="unknown recipe 'nope'; built-in recipes: "):
        tp.recipes.get("nope")


def test_patterns_glob_suffix_and_regex():
    name = "model.layers.3.mlp.down_proj"
    assert matches(name, ["down_proj"])
    assert matches(name, ["mlp.*"])
    assert matches(name, ["model.layers.*.mlp.down_proj"])
    assert matches(name, [r"re:.*mlp\..*"])
    assert not matches(name, ["up_proj", "re:mlp"])  # a regex must match the whole name
    stage = METHODS["rtn"](method="rtn", targets=["mlp.*"], ignore=["down_proj"])
    assert stage.selects("model.layers.0.mlp.up_proj") and not stage.selects(name)


def test_method_settings_are_listed_with_defaults():
    rows = {name: default for name, default, _ in METHODS["rtn"].settings()}
    assert rows["bits"] == "4" and rows["group_size"] == "128" and rows["symmetric"] == "False"
