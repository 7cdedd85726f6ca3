"""Budget search benchmark (issue: tensorpress search), protocol P1 (../shared/data/README.md).

Builds (or reuses) the level database of the default menu on P1's 128 x 512 calibration
windows (``--level-inputs``: each entry the usual sequential compression, or every block from
the original model's inputs), then compares, on P1's evaluation windows (never the calibration data):

* at the exact size of uniform GPTQ w3g128: that uniform recipe, the Fisher-greedy
  ``target_bits`` allocation of GPTQ widths, the search over GPTQ bits alone and the search
  across all menu methods;
* at 2.5 bits/weight: the best uniform recipes at or below it and the search across methods;
* blocks removed: the angular-distance choice against the depth search;
* (``--rows ...,sparsity``) per-layer SparseGPT sparsity at an average of 60 %: uniform, OWL and
  the search over 40 ... 80 % levels.

Each searched mix is evaluated twice: as scored (the database's layers assembled) and compressed
again from its recipe (``tp.compress``: what ``tensorpress search`` saves; with levels from the
original inputs the two are the same model, which is checked layer by layer). Prints a table and writes JSON with the protocol, command and machine.
Run ``.venv/bin/python bench/search.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import tensorpress as tp
from tensorpress.search import (
    DEFAULT_MENU,
    GPTQ_MENU,
    SPARSITY_MENU,
    Schedule,
    build_levels,
    open_levels,
    parse_menu,
    search,
    search_depth,
)
from tensorpress.search.menu import menu_entry

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent / "../shared/data/wikitext2-valid.txt"
console = Console(width=None if sys.stdout.isatty() else 160)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="P1 text (calibration: first 60 %%, evaluation: last 40 %%)")
    p.add_argument("--levels", type=Path, default=Path("out/levels-smollm2-135m"), help="level database folder (reused)")
    p.add_argument("--level-inputs", choices=("compressed", "original"), default="compressed")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--windows", type=int, default=40, help="P1 evaluation windows")
    p.add_argument("--pool", type=int, default=8, help="calibration windows of the search's fitness")
    p.add_argument("--generations", type=int, default=40)
    p.add_argument("--offspring", type=int, default=16)
    p.add_argument("--stages", default="1:4,3:2", help="WINDOWS:SURVIVORS of the selection stages before the last")
    p.add_argument("--workers", type=int, default=0, help="Ray workers (0: in-process)")
    p.add_argument("--rows", default="w3,gptq,across,2.5,depth", help="which comparisons: w3 (uniform and target_bits), "
                   "gptq (GPTQ-only search), across (all-method search at the w3 size), 2.5, depth (blocks removed), "
                   "sparsity (per-layer SparseGPT sparsity against uniform and OWL)")
    p.add_argument("--depth-blocks", default="4", help="comma list: blocks removed in the depth comparison")
    p.add_argument("--sparsity", type=int, choices=(50, 60, 70), default=60,
                   help="average sparsity (%%) of the sparsity comparison: uniform SparseGPT, OWL, searched")
    p.add_argument("--out", type=Path, default=HERE / "results" / "search-smollm2-135m.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows_wanted = set(args.rows.split(","))
    stages = tuple(tuple(int(x) for x in item.split(":")) for item in args.stages.split(",") if item)
    schedule = Schedule(generations=args.generations, offspring=args.offspring, stages=stages, seed=args.seed)
    lm = tp.load_model(args.model)
    calib = tp.data.calibration(lm, source=args.data, samples=args.samples, seq_len=512, seed=args.seed)
    evalw = tp.data.evaluation(lm, args.data, seq_len=512, windows=args.windows)
    cache: dict = {}
    rows: list[dict] = []

    def evaluate(name: str, model, extra: dict) -> None:
        report = tp.evaluate(model, reference=lm, data=evalw, reference_cache=cache)
        row = {"method": name, "perplexity": report.perplexity, "reference_perplexity": report.reference_perplexity,
               "kl": report.kl, "top1": report.top1_agreement, "bits_per_weight": report.bits_per_weight_linears,
               "bits_per_weight_model": report.bits_per_weight_model, "eval_seconds": report.eval_seconds, **extra}
        rows.append(row)
        console.print(f"{name}: KL {report.kl:.4f}, ppl {report.perplexity:.2f}, {report.bits_per_weight_linears:.4f} bits/w",
                      highlight=False)

    t0 = time.perf_counter()
    db = build_levels(lm, parse_menu(None), calib, args.levels, inputs=args.level_inputs,
                      on_entry=lambda n, s, r: console.print(f"levels: {n} {'reused' if r else 'built'} ({s:.0f} s to build)"))
    build = {e: db.index["entries"][e]["seconds"] for e in db.entries}
    console.print(f"level database: {sum(build.values()):.0f} s to build ({len(build)} entries), "
                  f"{time.perf_counter() - t0:.0f} s here")
    dense = db.dense_weights() if db.exact else None  # to check that each recipe reproduces the searched layers
    w3_bits = db.bits(db.uniform("gptq-w3g128"))
    w3_bpw = w3_bits / db.numel
    searches: dict[str, dict] = {}

    def run_search(name: str, budget, menu) -> None:
        result = search(lm, budget, calib, args.levels, menu=list(menu), schedule=schedule, pool=args.pool,
                        inputs=args.level_inputs, workers=args.workers, name=name)
        used = result.to_dict()["entries_used"]
        found = {"search_seconds": result.timings["search_seconds"], "pool_kl": result.fitness, "seed": result.seed_name,
                 "seed_pool_kl": result.seeds[result.seed_name], "entries_used": used, "generations": len(result.log),
                 "evaluations": result.evaluations}
        searches[name] = result.to_dict()
        mdb = open_levels(args.levels, list(menu), lm)
        if not mdb.exact:
            evaluate(f"{name} (as scored: database layers)", mdb.assemble(lm, [mdb.entries.index(result.choices[n])
                                                                                  for n in mdb.layers]), found)
        t = time.perf_counter()
        compressed = tp.compress(lm, result.recipe, calib)
        seconds = time.perf_counter() - t
        if sum(r.weight_bits for r in compressed.layers.values()) != result.linear_bits:
            raise SystemExit(f"{name}: the recipe's compression has another size than the searched mix")
        searches[name]["recompress_seconds"] = seconds
        if dense is not None and set(menu) <= set(db.entries):
            same = sum(torch.equal(compressed.model.model.get_submodule(layer).dense(), dense[layer][db.entries.index(entry)])
                       for layer, entry in result.choices.items())
            console.print(f"{name}: recipe reproduces {same} of {len(result.choices)} layers bit for bit")
            searches[name]["layers_bit_identical"] = same
        evaluate(f"{name} (its recipe compressed: the saved model)", compressed,
                 {"compress_seconds": seconds, **(found if db.exact else {"entries_used": used})})
        del compressed

    if "w3" in rows_wanted:
        evaluate(f"gptq-w3g128 (uniform, level database: inputs {db.inputs})", tp.load_compressed(db.checkpoint("gptq-w3g128")), {})
        if db.exact:  # otherwise that entry is the built-in recipe's compression
            t = time.perf_counter()
            evaluate("gptq-w3g128 (uniform, the built-in recipe)", tp.compress(lm, "gptq-w3g128", calib),
                     {"compress_seconds": time.perf_counter() - t})
        base = menu_entry("gptq-w3g128").stages[0]
        greedy = tp.Recipe(name="gptq-target-bits", description="Fisher-greedy target_bits over GPTQ 2/3/4/5/6/8 bits g128",
                           stages=[base.model_copy(update={"bits": 3, "target_bits": w3_bpw, "bit_choices": [2, 3, 4, 5, 6, 8]})])
        t = time.perf_counter()
        result = tp.compress(lm, greedy, calib)
        evaluate("gptq target_bits (Fisher greedy)", result, {"compress_seconds": time.perf_counter() - t})
    if "gptq" in rows_wanted:
        run_search("search: GPTQ bits only", repr(w3_bpw), GPTQ_MENU)
    if "across" in rows_wanted:
        run_search("search: across methods", repr(w3_bpw), DEFAULT_MENU)
    if "2.5" in rows_wanted:
        for entry in ("gptq-w2g128",):
            evaluate(f"{entry} (uniform, inputs {db.inputs})", tp.load_compressed(db.checkpoint(entry)), {})
        t = time.perf_counter()
        evaluate("gptq-w2g64 (uniform)", tp.compress(lm, "gptq-w2g64", calib), {"compress_seconds": time.perf_counter() - t})
        run_search("search 2.5 bpw: across methods", "2.5bpw", DEFAULT_MENU)

    if "sparsity" in rows_wanted:
        sparsity = int(args.sparsity)
        sdb = build_levels(lm, parse_menu(SPARSITY_MENU), calib, args.levels, inputs=args.level_inputs,
                           on_entry=lambda n, s, r: console.print(f"levels: {n} {'reused' if r else 'built'} ({s:.0f} s)"))
        build.update({e: sdb.index["entries"][e]["seconds"] for e in sdb.entries})
        uniform = f"sparsegpt-{sparsity}"
        evaluate(f"{uniform} (uniform, inputs {sdb.inputs})", tp.load_compressed(sdb.checkpoint(uniform)), {})
        t = time.perf_counter()
        owl = {"name": f"sparsegpt-{sparsity}-owl", "stages": [{"method": "sparsegpt", "sparsity": sparsity / 100,
                                                               "allocation": "owl"}]}
        evaluate(f"sparsegpt-{sparsity} OWL (lambda 0.08, M 5)", tp.compress(lm, owl, calib),
                 {"compress_seconds": time.perf_counter() - t})
        run_search(f"search: sparsity {sparsity} % average", repr(sdb.bits(sdb.uniform(uniform)) / sdb.numel), SPARSITY_MENU)

    if "depth" in rows_wanted:
        for blocks in (int(b) for b in args.depth_blocks.split(",")):
            t = time.perf_counter()
            evaluate(f"drop-blocks-{blocks} (angular distance)",
                     tp.compress(lm, {"stages": [{"method": "drop_blocks", "blocks": blocks, "samples": 32}]}, calib),
                     {"compress_seconds": time.perf_counter() - t})
            recipe, outcome, timings = search_depth(lm, blocks, calib, schedule=schedule, pool=args.pool, workers=args.workers)
            searches[f"depth {blocks}"] = {"removed": recipe.stages[0].indices, "fitness_kl": outcome.fitness,
                                           "seeds_kl": outcome.seeds, "generations": outcome.log, "timings": timings}
            evaluate(f"depth search: {blocks} blocks removed", tp.compress(lm, recipe, calib),
                     {"search_seconds": outcome.seconds, "pool_kl": outcome.fitness, "seed": outcome.seed_name,
                      "seed_pool_kl": outcome.seeds[outcome.seed_name], "removed": recipe.stages[0].indices,
                      "generations": len(outcome.log), "evaluations": outcome.evaluations})

    table = Table(title=f"{args.model}: P1, {evalw.samples} x 512 evaluation windows; calibration {calib.describe()}")
    for col in ("method", "bits/w", "KL", "ppl", "top-1", "pool KL", "search s", "entries used"):
        table.add_column(col, justify="left" if col in ("method", "entries used") else "right")
    for r in rows:
        used = ", ".join(f"{k} {v}" for k, v in sorted(r.get("entries_used", {}).items(), key=lambda kv: -kv[1]))
        used = used or (f"removed {r['removed']}" if "removed" in r else "")
        table.add_row(r["method"], f"{r['bits_per_weight']:.4f}", f"{r['kl']:.4f}", f"{r['perplexity']:.2f}",
                      f"{r['top1']:.1%}", f"{r['pool_kl']:.4f}" if "pool_kl" in r else "-",
                      f"{r['search_seconds']:.0f}" if "search_seconds" in r else "-", used or "-")
    console.print(table)
    protocol = {"name": "P1", "data": str(args.data), "evaluation_windows": evalw.samples, "seq_len": 512,
                "calibration": calib.describe(), "pool": f"first {args.pool} calibration windows",
                "schedule": {"generations": args.generations, "offspring": args.offspring, "stages": stages},
                "workers": args.workers, "level_inputs": args.level_inputs}
    payload = {"protocol": protocol, "command": shlex.join([sys.executable, *sys.argv]),
               "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(), "torch": torch.__version__},
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "levels_build_seconds": build, "w3_bits_per_weight": w3_bpw, "rows": rows, "searches": searches}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1), encoding="utf-8")
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
