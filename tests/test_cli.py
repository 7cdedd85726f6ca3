import json

import pytest
from typer.testing import CliRunner

import tensorpress as tp
from conftest import save_hf_dir, tiny_model
from tensorpress import cli
from tensorpress.cli import app, main

runner = CliRunner()


@pytest.fixture(autouse=True)
def _wide_console():
    """Tables fit on one line per row, so their text can be searched."""
    previous = cli.out.width
    cli.out.width = 200
    yield
    cli.out.width = previous


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_hf_dir(tiny_model("llama"), tmp_path_factory.mktemp("m") / "tiny-llama")


def _run_main(capsys, *args):
    with pytest.raises(SystemExit) as info:
        main(list(args))
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


def test_version_recipes_and_methods():
    assert runner.invoke(app, ["--version"]).output.strip() == f"tensorpress {tp.__version__}"
    listing = runner.invoke(app, ["recipes"]).output
    assert "rtn-w4g128" in listing and "rtn-w8" in listing
    methods = runner.invoke(app, ["methods"], terminal_width=200).output
    assert "rtn" in methods and "group_size" in methods and "128" in methods


def test_compress_inspect_eval_end_to_end(tmp_path, model_dir, text_path):
    out = tmp_path / "ckpt"
    report_json = tmp_path / "report.json"
    result = runner.invoke(app, [
        "compress", str(model_dir), "--recipe", "rtn-w4g128", "--out", str(out),
        "--data", str(text_path), "--windows", "2", "--seq-len", "32", "--json", str(report_json),
    ], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "perplexity" in result.output and "bits / weight" in result.output
    payload = json.loads(report_json.read_text())
    assert payload["reload_max_diff"] == 0.0
    evaluation = payload["evaluation"]
    assert evaluation["windows"] == 2 and evaluation["seq_len"] == 32 and evaluation["kl"] > 0
    assert 4.0 < evaluation["bits_per_weight_linears"] < 4.5 and evaluation["size_on_disk"] > 0

    inspected = runner.invoke(app, ["inspect", str(out)], terminal_width=200)
    assert inspected.exit_code == 0
    assert "model.layers.0.self_attn.q_proj" in inspected.output and "int4 g128 asym" in inspected.output

    evaluated = runner.invoke(app, ["eval", str(out), "--data", str(text_path), "--windows", "2", "--seq-len", "32"], terminal_width=200)
    assert evaluated.exit_code == 0, evaluated.output
    assert f"reference: {model_dir}" in evaluated.output and "top-1 agreement" in evaluated.output


def test_user_errors_print_one_line_and_exit_nonzero(capsys, tmp_path, model_dir):
    code, out, err = _run_main(capsys, "compress", "no/such/model.gguf", "--no-eval", "--out", str(tmp_path / "x"))
    assert code == 2
    last = err.splitlines()[-1]
    assert last.startswith("error: no such model 'no/such/model.gguf'") and sum(l.startswith("error") for l in err.splitlines()) == 1
    assert "Traceback" not in err

    code, _, err = _run_main(capsys, "compress", str(model_dir), "--recipe", "nope", "--no-eval")
    assert code == 2 and "unknown recipe 'nope'" in err

    (tmp_path / "exists").mkdir()
    code, _, err = _run_main(capsys, "compress", str(model_dir), "--out", str(tmp_path / "exists"), "--no-eval")
    assert code == 2 and "already exists; pass --overwrite" in err

    code, _, err = _run_main(capsys, "inspect", str(tmp_path))
    assert code == 2 and "manifest.json is missing" in err


def test_debug_shows_the_traceback(capsys, tmp_path):
    code, _, err = _run_main(capsys, "--debug", "inspect", str(tmp_path))
    assert code == 2 and "Traceback" in err and "CheckpointError" in err


def test_bad_recipe_file_names_stage_and_field(capsys, tmp_path, model_dir):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - method: rtn\n    bits: 12\n")
    code, _, err = _run_main(capsys, "compress", str(model_dir), "--recipe", str(recipe), "--no-eval", "--out", str(tmp_path / "o"))
    assert code == 2 and "stage 1 (rtn): bits: Input should be less than or equal to 8 (got 12)" in err
    assert not (tmp_path / "o").exists()
