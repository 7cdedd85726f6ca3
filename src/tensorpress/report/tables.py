"""Rich tables for reports: the CLI prints them, benchmarks reuse them."""

from __future__ import annotations

import math
from typing import Any

from rich.table import Table

from tensorpress.eval import EvalReport


def _fmt(value: Any, spec: str = ".4g") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def report_table(report: EvalReport, title: str = "result") -> Table:
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows: list[tuple[str, str]] = [
        ("bits / weight (compressed linears)", _fmt(report.bits_per_weight_linears, ".3f")),
        ("bits / weight (whole model)", _fmt(report.bits_per_weight_model, ".3f")),
        ("parameters", f"{report.params:,}"),
        ("exact storage (MB, from bit counts)", _fmt(report.model_bytes / 1e6, ".2f")),
    ]
    if report.size_on_disk is not None:
        rows.append(("size on disk (MB, checkpoint dir)", _fmt(report.size_on_disk / 1e6, ".2f")))
    if report.perplexity is not None:
        rows.append(("perplexity", _fmt(report.perplexity, ".3f")))
    if report.reference_perplexity is not None:
        rows.append(("perplexity of the reference", _fmt(report.reference_perplexity, ".3f")))
    if report.kl is not None:
        rows.append(("KL(reference || model), nats/token", _fmt(report.kl, ".4f")))
        rows.append(("top-1 agreement", _fmt(report.top1_agreement, ".2%")))
    if report.cosine_similarity is not None:
        rows.append(("embedding cosine similarity", _fmt(report.cosine_similarity, ".5f")))
        rows.append(("last hidden state MSE", _fmt(report.hidden_mse, ".3e")))
    if report.compression_seconds is not None:
        rows.append(("compression time (s)", _fmt(report.compression_seconds, ".1f")))
    rows.append(("evaluation time (s)", _fmt(report.eval_seconds, ".1f")))
    rows.append(("data", f"{report.data}: {report.windows} x {report.seq_len} tokens"))
    for name, value in rows:
        table.add_row(name, value)
    return table


def layers_table(manifest: dict[str, Any]) -> Table:
    table = Table(title=f"{len(manifest['layers'])} compressed layers", header_style="bold")
    for col, justify in (("layer", "left"), ("shape", "right"), ("parts", "left"), ("bits", "right"), ("bits/weight", "right")):
        table.add_column(col, justify=justify)
    for name, entry in manifest["layers"].items():
        out_f, in_f = entry["shape"]
        parts = " + ".join(p.get("describe", p["kind"]) for p in entry["parts"])
        bits = entry["weight_bits"]
        table.add_row(name, f"{out_f}x{in_f}", parts, f"{bits:,}", f"{bits / (out_f * in_f):.3f}")
    return table
