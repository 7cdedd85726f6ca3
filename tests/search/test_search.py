"""The budget search: level database, fitness, evolution, executors, the reproducing recipe."""

from __future__ import annotations

import json
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tensorpress as tp
from tensorpress.data import TokenWindows
from tensorpress.errors import SearchError
from tensorpress.search import Schedule, build_levels, greedy_choice, open_levels, parse_budget, parse_menu, search
from tensorpress.search.evolve import mutate
from tensorpress.search.fitness import Evaluator, kl_to_reference, prepare
from tensorpress.search.run import STATE_FILE

from conftest import sample_text, tiny_model

MENU = "gptq-w2g128,gptq-w4g128,gptq-w8g128,sparsegpt-50-w4g128"
SMALL = Schedule(generations=4, offspring=4, stages=((1, 2),), seed=3)


def peaked(seed: int = 0):
    """A tiny llama whose weights are scaled up, so its next-token distributions are far from
    uniform and compression errors show in the KL."""
    lm = tiny_model("llama", seed)
    with torch.no_grad():
        for p in lm.model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return lm


@pytest.fixture(scope="module")
def lm():
    return peaked()


@pytest.fixture(scope="module")
def calib(lm, tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "t.txt"
    path.write_text(sample_text(), encoding="utf-8")
    return tp.data.calibration(lm, source=str(path), samples=8, seq_len=32, seed=0)


@pytest.fixture(scope="module")
def levels(lm, calib, tmp_path_factory):
    return tmp_path_factory.mktemp("levels") / "db"


def run(lm, calib, levels, tmp_path, **kw):
    kw.setdefault("schedule", SMALL)
    kw.setdefault("inputs", "original")  # the shared database: levels that recipes reproduce exactly
    return search(lm, kw.pop("budget", "4.0bpw"), calib, levels, menu=kw.pop("menu", MENU), pool=4,
                  state_dir=tmp_path / "state", **kw)


def test_search_result_is_reproduced_bit_for_bit_by_its_recipe(lm, calib, levels, tmp_path):
    result = run(lm, calib, levels, tmp_path)
    assert result.linear_bits <= result.budget_bits
    assert result.fitness <= min(result.seeds.values())  # never worse than its best seed
    assert len(set(result.choices.values())) >= 2  # a mix, not a uniform recipe
    db = open_levels(levels)
    weights = db.dense_weights()
    again = tp.compress(lm, tp.Recipe.from_dict(json.loads(json.dumps(result.recipe.to_dict()))), calib)
    for k, name in enumerate(db.layers):
        level = db.entries.index(result.choices[name])
        assert torch.equal(again.model.model.get_submodule(name).dense(), weights[name][level]), name
        assert again.layers[name].weight_bits == db.levels[name][level].bits
    assert sum(r.weight_bits for r in again.layers.values()) == result.linear_bits
    # the pool KL the search reports is the compressed model's KL on those windows
    with torch.inference_mode():
        kls = []
        for row in calib.input_ids[:4]:
            ref = torch.log_softmax(lm.model(input_ids=row[None]).logits[0].float(), -1)
            kls.append(kl_to_reference(ref, again.model.model(input_ids=row[None]).logits[0]))
    assert sum(kls) / len(kls) == pytest.approx(result.fitness, rel=1e-4)


def test_level_database_is_reused_and_resumed(lm, calib, levels, tmp_path):
    seen = []
    build_levels(lm, parse_menu("gptq-w2g128,gptq-w4g128"), calib, levels, inputs="original",
                 on_entry=lambda n, s, reused: seen.append((n, reused)))
    assert seen == [("gptq-w2g128", True), ("gptq-w4g128", True)]
    # an interrupted build keeps the entries it finished
    def stop(name, seconds, reused):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_levels(lm, parse_menu("gptq-w2g128,rtn-w3g128"), calib, tmp_path / "db", on_entry=stop)
    seen.clear()
    db = build_levels(lm, parse_menu("gptq-w2g128,rtn-w3g128"), calib, tmp_path / "db",
                      on_entry=lambda n, s, reused: seen.append((n, reused)))
    assert seen == [("gptq-w2g128", True), ("rtn-w3g128", False)] and db.entries == ["gptq-w2g128", "rtn-w3g128"]
    other = peaked(seed=1)
    with pytest.raises(SearchError, match="another model"):
        build_levels(other, parse_menu("gptq-w2g128,gptq-w4g128"), calib, levels, inputs="original")
    fewer = TokenWindows(calib.input_ids[:6], calib.source, calib.seed)
    with pytest.raises(SearchError, match="other calibration windows"):
        build_levels(lm, parse_menu("gptq-w2g128,gptq-w4g128"), fewer, levels, inputs="original")
    # levels of the other inputs are not mixed in (nor silently rebuilt)
    with pytest.raises(SearchError, match="original inputs.*--level-inputs original"):
        build_levels(lm, parse_menu("gptq-w2g128,gptq-w4g128"), calib, levels, inputs="compressed")
    with pytest.raises(SearchError, match="expected one of compressed, original"):
        build_levels(lm, parse_menu("gptq-w2g128,gptq-w4g128"), calib, tmp_path / "x", inputs="sequential")


def test_levels_from_compressed_inputs_are_the_uniform_recipes(lm, calib, tmp_path):
    """Default levels: each entry is the usual sequential compression; the searched mix is
    compressed again from its recipe at exactly the searched size, and the database assembles
    the scored mix itself."""
    result = search(lm, "4.0bpw", calib, tmp_path / "db", menu=MENU, pool=4, schedule=SMALL, state_dir=tmp_path / "st")
    assert result.levels_inputs == "compressed" and not result.exact and result.recipe.inputs == "compressed"
    db = open_levels(tmp_path / "db")
    assert db.inputs == "compressed"
    weights = db.dense_weights(["gptq-w4g128"])
    uniform = tp.compress(lm, "gptq-w4g128", calib)
    for name in db.layers:
        assert torch.equal(uniform.model.model.get_submodule(name).dense(), weights[name][0]), name
    again = tp.compress(lm, tp.Recipe.from_dict(json.loads(json.dumps(result.recipe.to_dict()))), calib)
    assert sum(r.weight_bits for r in again.layers.values()) == result.linear_bits
    choice = [db.entries.index(result.choices[n]) for n in db.layers]
    scored = db.assemble(lm, choice)
    assert tp.evaluate(scored, data=calib).bits_per_weight_linears == pytest.approx(result.bits_per_weight)
    with torch.inference_mode():
        kls = [kl_to_reference(torch.log_softmax(lm.model(input_ids=row[None]).logits[0].float(), -1),
                               scored.model(input_ids=row[None]).logits[0]) for row in calib.input_ids[:4]]
    assert sum(kls) / 4 == pytest.approx(result.fitness, rel=1e-4)


def test_evaluator_scores_the_original_model_at_zero_and_reuses_parent_states(lm, calib):
    names = [n for n, m in lm.model.named_modules() if n.startswith("model.layers.") and isinstance(m, torch.nn.Linear)]
    original = {n: lm.model.get_submodule(n).weight.detach().float().clone() for n in names}
    noisy = {n: w + 0.05 * w.std() * torch.randn_like(w) for n, w in original.items()}
    pieces = prepare(lm, names, {n: [original[n], noisy[n]] for n in names}, TokenWindows(calib.input_ids[:3], "t"))
    ev = Evaluator(pieces)
    zero = (0,) * len(names)
    assert max(ev.score(zero, [0, 1, 2], keep=True)) < 1e-6  # our tail reproduces the model's logits
    ev.adopt(zero)
    child = tuple(1 if k >= len(names) // 2 else 0 for k in range(len(names)))  # changes start in block 1
    fresh = Evaluator(prepare(lm, names, {n: [original[n], noisy[n]] for n in names}, TokenWindows(calib.input_ids[:3], "t")))
    assert ev.score(child, [2, 0]) == fresh.score(child, [2, 0])  # from cached states = from scratch
    assert min(ev.score(child, [0, 1, 2])) > 1e-6


def test_budgets_out_of_range_and_bad_menus_are_clear_errors(lm, calib, levels, tmp_path):
    with pytest.raises(SearchError, match="below the smallest menu choice.*feasible"):
        run(lm, calib, levels, tmp_path, budget="1.5bpw")
    with pytest.raises(SearchError, match="above the uncompressed size"):
        run(lm, calib, levels, tmp_path, budget="40bpw")
    with pytest.raises(SearchError, match="unknown menu entry 'gptq-w9'.*known: gptq-w2g128"):
        run(lm, calib, levels, tmp_path, menu="gptq-w9,gptq-w4g128")
    with pytest.raises(SearchError, match="structural"):
        parse_menu("drop-blocks-2,gptq-w4g128")
    with pytest.raises(SearchError, match="allocates across layers"):
        parse_menu("gptq-mixed-2.5,gptq-w4g128")
    with pytest.raises(SearchError, match="not understood"):
        parse_budget("three bits")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(SearchError, match="not a level database"):
        build_levels(lm, parse_menu("gptq-w2g128,gptq-w4g128"), calib, tmp_path / "junk")
    (tmp_path / "junk" / "levels.json").write_text('{"format": "tensorpress-levels", "version": 99, "entries": {}}')
    with pytest.raises(SearchError, match="version 99"):
        open_levels(tmp_path / "junk")


def test_budget_units():
    assert parse_budget("3bpw").unit == "bpw" and parse_budget(2.5).value == 2.5
    assert parse_budget("60MB").value == 60e6 and parse_budget("1MiB").value == 2**20
    b = parse_budget("9.5bpw-model")
    assert b.linear_bits(100, 500, 200) == pytest.approx(9.5 * 200 - 500)


def test_whole_model_and_byte_budgets_hold(lm, calib, levels, tmp_path):
    result = run(lm, calib, levels, tmp_path, budget="12bpw-model")
    assert (result.linear_bits + result.rest_bits) / result.model_numel <= 12
    size = (result.linear_bits + result.rest_bits) / 8
    again = run(lm, calib, levels, tmp_path / "b", budget=f"{int(size)}B")
    assert (again.linear_bits + again.rest_bits) / 8 <= int(size)


def test_interrupted_search_resumes_to_the_same_result(lm, calib, levels, tmp_path):
    whole = run(lm, calib, levels, tmp_path / "whole", schedule=Schedule(generations=6, offspring=4, stages=((1, 2),), seed=5))

    def stop(entry):
        if entry["generation"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(lm, calib, levels, tmp_path / "cut", schedule=Schedule(generations=6, offspring=4, stages=((1, 2),), seed=5),
            on_generation=stop)
    assert json.loads((tmp_path / "cut" / "state" / STATE_FILE).read_text())["generation"] == 3
    resumed = run(lm, calib, levels, tmp_path / "cut", schedule=Schedule(generations=6, offspring=4, stages=((1, 2),), seed=5),
                  resume=True)
    assert resumed.choices == whole.choices and resumed.fitness == whole.fitness
    assert [g["fitness"] for g in resumed.log] == [g["fitness"] for g in whole.log]
    with pytest.raises(SearchError, match="state of another search"):
        run(lm, calib, levels, tmp_path / "cut", budget="5bpw", resume=True)


def test_ray_workers_give_the_in_process_result(lm, calib, levels, tmp_path):
    pytest.importorskip("ray")
    local = run(lm, calib, levels, tmp_path / "local", workers=0)
    one = run(lm, calib, levels, tmp_path / "one", workers=1)
    two = run(lm, calib, levels, tmp_path / "two", workers=2)
    assert one.executor == two.executor == "ray" and local.executor == "in-process"
    assert local.choices == one.choices == two.choices
    assert [g["fitness"] for g in local.log] == [g["fitness"] for g in one.log] == [g["fitness"] for g in two.log]


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.3, 1.0))
def test_mutations_stay_within_the_budget(seed, fraction):
    rng = random.Random(seed)
    costs = [sorted(rng.sample(range(10, 200), 4)) for _ in range(12)]
    low, high = sum(c[0] for c in costs), sum(c[-1] for c in costs)
    budget = low + fraction * (high - low)
    parent = tuple(greedy_choice({k: {lv: (1.0 / c, c) for lv, c in enumerate(cs)} for k, cs in enumerate(costs)}, budget).values())
    for _ in range(20):
        child = mutate(parent, costs, budget, rng)
        assert sum(costs[k][lv] for k, lv in enumerate(child)) <= budget


def test_greedy_takes_the_best_error_per_bit():
    costs = {"a": {0: (10.0, 1), 1: (0.0, 3)}, "b": {0: (4.0, 1), 1: (0.0, 3)}}
    assert greedy_choice(costs, 4) == {"a": 1, "b": 0}
    with pytest.raises(ValueError, match="below the cheapest"):
        greedy_choice(costs, 1)


def test_cli_search_writes_a_recipe_that_compress_reproduces(tmp_path, text_path, capsys):
    from typer.testing import CliRunner

    from conftest import save_hf_dir
    from tensorpress.cli import app, main
    from tensorpress.errors import OutputExistsError
    from tensorpress.io import read_manifest

    model_dir = save_hf_dir(peaked(), tmp_path / "tiny")
    common = ["--calib", str(text_path), "--samples", "8", "--calib-seq-len", "32"]
    args = ["search", str(model_dir), "--budget", "4.0bpw", "--menu", "gptq-w2g128,gptq-w4g128,gptq-w8g128", *common,
            "--pool", "4", "--generations", "2", "--offspring", "3", "--stages", "1:2", "--workers", "0",
            "-o", str(tmp_path / "s"), "--levels", str(tmp_path / "lv"), "--data", str(text_path), "--windows", "2",
            "--seq-len", "32", "--runs", str(tmp_path / "runs")]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    # the run is recorded, and the report draws the search's fitness per generation
    from tensorpress.report.collect import collect
    from tensorpress.report.page import write_report

    found = collect([tmp_path / "runs"])
    assert not found.problems and len(found.entries[0].search) == 2 and found.entries[0].search_seed is not None
    write_report(found, tmp_path / "report")
    assert (tmp_path / "report" / "search.png").stat().st_size > 1000
    found = json.loads((tmp_path / "s" / "search.json").read_text())
    assert found["bits_per_weight"] <= 4.0 and len(found["generations"]) == 2
    again = CliRunner().invoke(app, ["compress", str(model_dir), "-r", str(tmp_path / "s" / "recipe.yaml"), *common,
                                     "-o", str(tmp_path / "c"), "--no-eval", "--no-record"])
    assert again.exit_code == 0, again.output
    searched, compressed = read_manifest(tmp_path / "s" / "model"), read_manifest(tmp_path / "c")
    assert {n: e["weight_bits"] for n, e in searched["layers"].items()} == \
        {n: e["weight_bits"] for n, e in compressed["layers"].items()}
    # a second search in the same folder must be resumed or moved elsewhere; an infeasible budget names the range
    assert isinstance(CliRunner().invoke(app, args).exception, OutputExistsError)
    low = [a if a != "4.0bpw" else "1.0bpw" for a in args]
    low[low.index(str(tmp_path / "s"))] = str(tmp_path / "t")
    with pytest.raises(SystemExit) as info:
        main(low)
    assert info.value.code == 2 and "feasible" in capsys.readouterr().err


def test_depth_search_removes_the_blocks_that_cost_least(calib):
    import transformers as T

    from conftest import make_tokenizer, tiny_config
    from tensorpress.models import LoadedModel
    from tensorpress.models.adapters import adapter_for
    from tensorpress.search import search_depth

    config = tiny_config("llama")
    config.num_hidden_layers = 5
    torch.manual_seed(0)
    lm5 = LoadedModel(T.AutoModelForCausalLM.from_config(config).eval(), make_tokenizer(), adapter_for("llama"), "tiny5")
    with torch.no_grad():
        for p in lm5.model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    recipe, outcome, _ = search_depth(lm5, 2, calib, schedule=SMALL, pool=4, samples=4)
    assert outcome.fitness <= min(outcome.seeds.values())
    drop = recipe.stages[0].indices
    assert len(drop) == 2 and 4 not in drop  # the last block stays
    smaller = tp.compress(lm5, recipe, calib)
    assert smaller.model.model.config.num_hidden_layers == 3
    with torch.inference_mode():
        kls = [kl_to_reference(torch.log_softmax(lm5.model(input_ids=row[None]).logits[0].float(), -1),
                               smaller.model.model(input_ids=row[None]).logits[0]) for row in calib.input_ids[:4]]
    assert sum(kls) / 4 == pytest.approx(outcome.fitness, rel=1e-4)


def test_gguf_size_search_writes_a_file_of_the_counted_size(lm, calib, tmp_path):
    from tensorpress.io.gguf import export_gguf

    menu = "gguf-q4_0,gguf-q8_0"
    db = build_levels(lm, parse_menu(menu), calib, tmp_path / "db")
    sizes, rest = db.gguf_bytes()
    low, high = rest + sum(min(s) for s in sizes.values()), rest + sum(max(s) for s in sizes.values())
    budget = parse_budget(f"{(low + high) // 2}B", gguf=True)
    result = search(lm, budget, calib, tmp_path / "db", menu=menu, pool=4, schedule=SMALL, state_dir=tmp_path / "st")
    assert low < result.gguf_bytes <= (low + high) // 2 and len(set(result.choices.values())) == 2
    compressed = tp.compress(lm, result.recipe, calib)
    path = export_gguf(compressed.model, tmp_path / "mix.gguf")
    assert result.gguf_bytes - 64 <= path.stat().st_size <= result.gguf_bytes  # an upper bound, within two alignment units
    with pytest.raises(SearchError, match=r"below the smallest menu choice .* MB of GGUF file"):
        search(lm, parse_budget(f"{low - 1}B", gguf=True), calib, tmp_path / "db", menu=menu, pool=4, schedule=SMALL)
    with pytest.raises(SearchError, match="no llama.cpp type of its own"):
        search(lm, parse_budget(f"{high}B", gguf=True), calib, tmp_path / "db", menu="gguf-q4_0,gptq-w4g128", pool=4,
               schedule=SMALL)
    with pytest.raises(SearchError, match="GGUF size '3.0bpw' is not understood"):
        parse_budget("3.0bpw", gguf=True)


def test_cli_gguf_size_search_writes_the_gguf(tmp_path, text_path):
    from typer.testing import CliRunner

    from conftest import save_hf_dir
    from tensorpress.cli import app

    model_dir = save_hf_dir(peaked(), tmp_path / "tiny")
    lm = tp.load_model(str(model_dir))
    calib = tp.data.calibration(lm, source=str(text_path), samples=8, seq_len=32, seed=0)
    sizes, rest = build_levels(lm, parse_menu("gguf-q4_0,gguf-q8_0"), calib, tmp_path / "lv").gguf_bytes()
    budget = rest + sum(min(s) + max(s) for s in sizes.values()) // 2
    args = ["search", str(model_dir), "--gguf-size", f"{budget}B", "--menu", "gguf-q4_0,gguf-q8_0", "--calib", str(text_path),
            "--samples", "8", "--calib-seq-len", "32", "--pool", "4", "--generations", "1", "--offspring", "2",
            "--stages", "1:1", "--workers", "0", "-o", str(tmp_path / "s"), "--levels", str(tmp_path / "lv"),
            "--no-eval", "--no-record"]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    found = json.loads((tmp_path / "s" / "search.json").read_text())
    assert found["gguf_bytes"] - 64 <= found["gguf_file_bytes"] <= found["gguf_bytes"] <= budget
    assert (tmp_path / "s" / "model.gguf").stat().st_size == found["gguf_file_bytes"]


def test_coded_entries_count_their_coded_bits(lm, calib, levels, tmp_path):
    menu = "gptq-w2g128,gptq-w4g128,gptq-w3g128-coded"
    with pytest.raises(SearchError, match="entropy-coded.*--level-inputs original"):
        search(lm, "3.5bpw", calib, tmp_path / "db", menu=menu, pool=4, schedule=SMALL)
    result = run(lm, calib, levels, tmp_path, budget="3.5bpw", menu=menu)
    db = open_levels(levels, menu.split(","))
    coded, plain = db.levels[db.layers[0]][2].bits, tp.compress(lm, "gptq-w3g128", calib).layers[db.layers[0]].weight_bits
    assert coded <= plain  # priced at its coded size (never above the plain codes' size)
    again = tp.compress(lm, result.recipe, calib)
    assert sum(r.weight_bits for r in again.layers.values()) == result.linear_bits <= result.budget_bits


def test_named_menus_hold_what_they_say():
    from tensorpress.search import GGUF_MENU, SPARSITY_MENU

    sparsity = parse_menu(SPARSITY_MENU)
    assert [r.stages[0].sparsity for r in sparsity.values()] == [0.4, 0.5, 0.6, 0.7, 0.8]
    gguf = parse_menu(GGUF_MENU)
    assert [r.stages[0].format for r in gguf.values()] == ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0"]
