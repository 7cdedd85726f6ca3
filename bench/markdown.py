"""A Markdown table of a ``bench/quality.py`` JSON file, for the READMEs (so their figures are
copied by a program, not by hand), with the protocol, command, machine and date under it.

    .venv/bin/python bench/markdown.py bench/results/quality-smollm2-135m-tasks.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(data: dict) -> str:
    rows = data["rows"]
    tasks = data.get("protocol", {}).get("tasks", {}).get("names") or []
    head = ["recipe", "perplexity", "Δ ppl", "KL (nats/token)", "top-1", "bits/w linears", "bits/w model"]
    head += ["mean acc", "flips", *tasks] if tasks else []
    out = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for r in rows:
        cells = [r["method"], fmt(r.get("perplexity"), ".2f"), fmt(r.get("perplexity_change"), "+.1%"), fmt(r.get("kl"), ".4f"),
                 fmt(r.get("top1_agreement"), ".1%"), fmt(r.get("bits_per_weight_linears"), ".3f"),
                 fmt(r.get("bits_per_weight_model"), ".3f")]
        if tasks:
            t = r.get("tasks") or {}
            cells += [fmt(r.get("mean_acc"), ".1%"), fmt(r.get("mean_flips"), ".1%")]
            cells += [fmt(t.get(n, {}).get("acc"), ".0%") for n in tasks]
        out.append("| " + " | ".join(cells) + " |")
    p = data.get("protocol", {})
    m = data.get("machine", {})
    calib = p.get("calibration", {})
    protocol = (f"Protocol {p.get('name')}: {p.get('eval_windows')} windows x {p.get('seq_len')} tokens of "
                f"`{Path(p.get('data', '')).name}`; calibration {calib.get('samples')} windows, seed {calib.get('seed')}")
    if tasks:
        protocol += f"; tasks: first {p['tasks']['limit']} validation questions each, {p['tasks']['scoring']}"
    machine = (f"Command: `{data.get('command')}`. Machine: {m.get('processor')}, {m.get('cpu_count')} CPUs, "
               f"torch {m.get('torch')}; {data.get('date')}.")
    out += ["", protocol + ".", machine]
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", type=Path)
    args = p.parse_args()
    print(table(json.loads(args.json.read_text(encoding="utf-8"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
