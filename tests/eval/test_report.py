"""Per-layer errors, run directories and the HTML/Markdown report (opened in headless Chromium)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from typer.testing import CliRunner

import tensorpress as tp
from tensorpress.cli import app
from tensorpress.engine.result import layer_errors
from tensorpress.io.runs import RUN_FILE, RunFormatError, read_run, record_run
from tensorpress.report.collect import collect
from tensorpress.report.page import pareto_front, write_report

runner = CliRunner()


def test_layer_errors_are_relative_errors_of_weights_and_of_outputs():
    torch.manual_seed(0)
    x = torch.randn(200, 16) * torch.linspace(0.1, 3, 16)  # (tokens, in), uneven channels
    w = torch.randn(8, 16)
    new = w + 0.05 * torch.randn(8, 16)
    weight_error, output_error = layer_errors(w, new, (x.T @ x).double())
    assert weight_error == pytest.approx(float((new - w).square().sum() / w.square().sum()), rel=1e-5)
    direct = float(((new - w) @ x.T).square().sum() / (w @ x.T).square().sum())
    assert output_error == pytest.approx(direct, rel=1e-4)
    assert layer_errors(w, new[:, :8], None) == (None, None)  # a structural cut: no like-for-like error
    assert layer_errors(w, new, None)[1] is None


def test_compression_records_each_layers_error(text_path):
    lm = tiny_model("llama")
    calib = tp.data.calibration(lm, source=str(text_path), samples=4, seq_len=32)
    errs = {}
    for recipe in ("gptq-w4g128", "gptq-w2g64"):
        result = tp.compress(lm, recipe, calib)
        errs[recipe] = [r.output_error for r in result.layers.values()]
        assert all(e is not None and 0 < e < 2 for e in errs[recipe])
        assert all(r.weight_error is not None and r.weight_error > 0 for r in result.layers.values())
    assert sum(errs["gptq-w4g128"]) < sum(errs["gptq-w2g64"])  # fewer bits, larger output error
    rtn = tp.compress(lm, "rtn-w4g128")
    assert all(r.output_error is None and r.weight_error > 0 for r in rtn.layers.values())  # no calibration: no XtX


def test_run_files_are_checked_on_reading(tmp_path):
    folder = record_run(tmp_path, "eval", "a/b c", {"evaluation": {"perplexity": 3.0, "kl": float("nan")}},
                        command=["tensorpress", "eval"])
    assert folder.parent == tmp_path and "a_b_c" in folder.name
    record = read_run(folder)
    assert record["version"] == 1 and record["machine"]["cpu_count"] and record["command"] == ["tensorpress", "eval"]
    assert record["evaluation"] == {"perplexity": 3.0, "kl": None}  # strict JSON: NaN is null
    second = record_run(tmp_path, "eval", "a/b c", {})  # the same second: a folder of its own
    assert second != folder
    old = json.loads((folder / RUN_FILE).read_text())
    old["version"] = 0
    (folder / RUN_FILE).write_text(json.dumps(old))
    with pytest.raises(RunFormatError, match="run format version 0; this tensorpress .* reads version 1"):
        read_run(folder)
    (folder / RUN_FILE).write_text("{not json")
    with pytest.raises(RunFormatError, match="not valid JSON"):
        read_run(folder)


def test_pareto_front_keeps_runs_no_other_beats():
    points = [(2.0, 0.5), (3.0, 0.2), (3.5, 0.3), (4.0, 0.1), (8.0, 0.1)]
    assert pareto_front(points, lower_is_better=True) == [(2.0, 0.5), (3.0, 0.2), (4.0, 0.1)]
    assert pareto_front([(1.0, 0.3), (2.0, 0.2), (3.0, 0.6)], lower_is_better=False) == [(1.0, 0.3), (3.0, 0.6)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, text_path):
    """Two compress runs and one eval run recorded by the CLI, a bench JSON and unreadable inputs."""
    base = tmp_path_factory.mktemp("runs")
    lm = tiny_model("llama")
    plain = base / "plain"
    lm.model.save_pretrained(plain)
    lm.tokenizer.save_pretrained(plain)
    runs = base / "runs"
    for recipe in ("gptq-w4g128", "rtn-w2g64"):
        result = runner.invoke(app, ["compress", str(plain), "-r", recipe, "-o", str(base / recipe), "--calib", str(text_path),
                                     "--samples", "4", "--calib-seq-len", "32", "--data", str(text_path), "--windows", "2",
                                     "--seq-len", "32", "--runs", str(runs)], terminal_width=200)
        assert result.exit_code == 0, result.output
        assert "recorded run" in result.output
    result = runner.invoke(app, ["eval", str(base / "rtn-w2g64"), "--data", str(text_path), "--windows", "2",
                                 "--seq-len", "32", "--runs", str(runs)], terminal_width=200)
    assert result.exit_code == 0, result.output
    bench = base / "quality-tiny.json"
    bench.write_text(json.dumps({
        "protocol": {"name": "P1", "eval_windows": 2, "seq_len": 32, "data": "notes.txt", "model": "tiny"},
        "command": "bench/quality.py --model tiny", "machine": {"processor": "x86_64", "cpu_count": 2}, "date": "today",
        "rows": [{"method": "uncompressed", "perplexity": 300.0, "kl": None, "top1_agreement": None,
                  "bits_per_weight_linears": None, "model_bytes": 4e6},
                 {"method": "rtn-w3g128", "perplexity": 320.5, "reference_perplexity": 300.0, "kl": 0.0421,
                  "top1_agreement": 0.9, "bits_per_weight_linears": 3.25, "model_bytes": 1.5e6,
                  "tasks": {"arc_easy": {"acc": 0.5, "flips": 0.25, "n": 4}}}]}))
    kv = base / "kv-ppl.json"
    kv.write_text(json.dumps({
        "section": "ppl", "command": "bench/kv.py ppl", "machine": {"cpu_count": 2},
        "protocol": {"data": "notes.txt", "context": 2048, "windows": 4, "reference": "full cache, float16 storage"},
        "rows": [{"method": "full", "ratio_vs_full": 1.0, "perplexity": 20.0, "kl": 0.0, "top1_agreement": 1.0},
                 {"method": "kivi-4@4x", "ratio_vs_full": 3.9, "perplexity": 20.1, "kl": 0.002, "top1_agreement": 0.98},
                 {"method": "kivi-2@8x", "ratio_vs_full": 7.6, "perplexity": 21.0, "kl": 0.03, "top1_agreement": 0.93},
                 {"method": "snapkv@4x", "ratio_vs_full": 4.0, "perplexity": 22.5, "kl": 0.11, "top1_agreement": 0.9}]}))
    old = record_run(base / "old", "eval", "old", {})
    data = json.loads((old / RUN_FILE).read_text())
    data["version"] = 0
    (old / RUN_FILE).write_text(json.dumps(data))
    (base / "notes.json").write_text(json.dumps({"hello": 1}))
    return {"base": base, "runs": runs, "bench": bench, "old": old, "kv": kv}


def test_collect_reads_runs_checkpoints_and_bench_files_and_lists_what_it_cannot(runs):
    base = runs["base"]
    found = collect([runs["runs"], base / "gptq-w4g128", runs["bench"], runs["old"], base / "notes.json", base / "missing"])
    kinds = [e.kind for e in found.entries]
    assert kinds.count("compress") == 2 and kinds.count("eval") == 1 and "checkpoint" in kinds
    assert kinds.count("bench-quality") == 2
    gptq = next(e for e in found.entries if e.kind == "compress" and e.recipe == "gptq-w4g128")
    assert gptq.perplexity > 0 and gptq.kl > 0 and 4 < gptq.bits_per_weight < 4.6 and gptq.model_mb > 0
    assert gptq.layers and all(lay.output_error is not None for lay in gptq.layers)
    assert "tensorpress compress" in gptq.command and "CPUs" in gptq.machine and "windows x 32 tokens" in gptq.protocol
    ckpt = next(e for e in found.entries if e.kind == "checkpoint")
    assert ckpt.bits_per_weight == pytest.approx(gptq.bits_per_weight)
    assert [lay.output_error for lay in ckpt.layers] == [lay.output_error for lay in gptq.layers]  # from the manifest
    evaluated = next(e for e in found.entries if e.kind == "eval")
    assert evaluated.recipe == "rtn-w2g64" and evaluated.layers  # the checkpoint's layers
    assert len(found.problems) == 3
    assert any("run format version 0" in p for p in found.problems)
    assert any("notes.json: not a bench result" in p for p in found.problems)
    assert any("missing: no such file" in p for p in found.problems)


def test_report_html_and_markdown_show_the_same_numbers(runs, tmp_path):
    found = collect([runs["runs"], runs["bench"], runs["old"], runs["kv"]])
    assert [r.method for r in found.kv] == ["full", "kivi-4@4x", "kivi-2@8x", "snapkv@4x"]
    out = write_report(found, tmp_path / "report")
    page = (out / "index.html").read_text()
    md = (out / "report.md").read_text()
    for e in found.entries:
        for figure in (f"{e.perplexity:.3f}", f"{e.bits_per_weight:.3f}" if e.bits_per_weight else None):
            if figure:
                assert figure in page and figure in md
    assert "0.0421" in page and "0.0421" in md and "50.00%" in md  # the bench row's KL and task accuracy
    assert "run format version 0" in page and "run format version 0" in md
    assert "<script" not in page and 'src="http' not in page and "url(" not in page  # self-contained, nothing to fetch
    images = re.findall(r'<img src="data:image/png;base64,', page)
    files = sorted(p.name for p in out.glob("*.png"))
    assert len(images) == len(files) == 4 and {"pareto-bits.png", "pareto-mb.png", "layers.png", "kv.png"} == set(files)
    assert "bench/kv.py ppl" in page  # the KV plot's provenance
    assert all(f"]({name})" in md for name in files)
    again = write_report(found, out)  # a report folder is replaced without --overwrite
    assert again == out
    with pytest.raises(tp.errors.TensorpressError, match="not a report folder"):
        write_report(found, runs["runs"])  # a folder of other files is not replaced
    with pytest.raises(tp.errors.ReportError, match="nothing to report"):
        write_report(collect([runs["old"]]), tmp_path / "empty")


def test_report_command(runs, tmp_path):
    out = tmp_path / "r"
    result = runner.invoke(app, ["report", str(runs["runs"]), str(runs["old"]), "-o", str(out), "--layers", "nope"],
                           terminal_width=200)
    assert result.exit_code != 0 and "names no run" in str(result.exception)
    result = runner.invoke(app, ["report", str(runs["runs"]), str(runs["old"]), "-o", str(out)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "not read:" in result.output and "3 run(s)" in result.output and (out / "index.html").is_file()


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_report_page_renders_in_headless_chromium(runs, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    out = write_report(collect([runs["runs"], runs["bench"], runs["kv"]]), tmp_path / "report")
    problems: list[str] = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
            page.goto(Path(out / "index.html").as_uri(), wait_until="load")
            sizes = page.evaluate("[...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight, "
                                  "i.getBoundingClientRect().width])")
            shot = tmp_path / "page.png"
            page.screenshot(path=str(shot), full_page=True)
            title = page.title()
        finally:
            browser.close()
    assert problems == []
    assert title == "tensorpress report" and len(sizes) == 4
    assert all(done and w > 300 and h > 200 and shown > 300 for done, w, h, shown in sizes)
    assert shot.stat().st_size > 20_000
