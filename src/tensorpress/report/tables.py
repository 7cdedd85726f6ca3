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


def tasks_table(results: dict[str, Any]) -> Table:
    """Task accuracy (``tp.eval.tasks``): acc and acc_norm with standard errors, and against the
    reference its accuracy delta and the share of flipped answers."""
    table = Table(title="tasks (log-likelihood, lm-eval's multiple-choice protocol)", header_style="bold")
    for col in ("task", "n", "acc", "acc_norm", "Δ acc vs reference", "flips"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for name, r in results.items():
        norm = "-" if r.acc_norm is None else f"{r.acc_norm:.2%} ± {r.acc_norm_stderr:.2%}"
        table.add_row(name, str(r.n), f"{r.acc:.2%} ± {r.acc_stderr:.2%}", norm,
                      "-" if r.acc_delta is None else f"{r.acc_delta:+.2%}", "-" if r.flips is None else f"{r.flips:.2%}")
    return table


def experts_table(rows: list[dict[str, Any]]) -> Table:
    """Per expert (over its blocks): calibration tokens routed to it (fewest, most), bits per
    weight and exact storage; ``rows`` from ``CompressionResult.experts()``."""
    by_expert: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        by_expert.setdefault(row["expert"], []).append(row)
    table = Table(title=f"{len(by_expert)} experts in {len({r['block'] for r in rows})} blocks", header_style="bold")
    for col in ("expert", "tokens (fewest, most)", "bits/weight", "MB"):
        table.add_column(col, justify="right")
    for expert, mine in sorted(by_expert.items()):
        tokens = [r["tokens"] for r in mine if r["tokens"] is not None]
        bits, weights = sum(r["bits"] for r in mine), sum(r["weights"] for r in mine)
        table.add_row(str(expert), f"{min(tokens):,}, {max(tokens):,}" if tokens else "-", f"{bits / weights:.3f}",
                      f"{bits / 8e6:.3f}")
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


def packed_table(manifest: dict[str, Any], per_tensor: bool = False) -> Table:
    """Coded size against the field-wise Shannon bound, per packed file (or per tensor): all
    per-value columns in bits; the bound is the coded field's empirical entropy plus the raw bits."""
    table = Table(title="lossless coding", header_style="bold")
    for col in ("file" if not per_tensor else "tensor", "codec", "values", "original MB", "coded MB", "ratio",
                "bits/value", "coded-field entropy", "raw bits", "Shannon bound", "gap"):
        table.add_column(col, justify="left" if col in ("file", "tensor", "codec") else "right")

    def row(name: str, stats: list[dict[str, Any]], codec: str) -> None:
        n = sum(t["numel"] for t in stats)
        orig = sum(t["original_bits"] for t in stats)
        coded = sum(t["coded_bits"] for t in stats)
        bound = sum(t["bound_bits"] for t in stats)
        entropy = sum(t["coded_stream_entropy_bits"] for t in stats)
        raw = sum(t["raw_bits"] for t in stats)

        def per_value(bits: float) -> str:
            return _fmt(bits / n if n else None, ".3f")

        table.add_row(name, codec, f"{n:,}", f"{orig / 8e6:.3f}", f"{coded / 8e6:.3f}", _fmt(orig / coded if coded else None, ".3f"),
                      per_value(coded), per_value(entropy), per_value(raw), per_value(bound),
                      _fmt(coded / bound - 1 if bound else None, "+.2%"))

    for rel, entry in manifest["files"].items():
        if entry.get("tensors") is None:
            continue
        if per_tensor:
            for name, t in entry["tensors"].items():
                row(name, [t], t["codec"])
        else:
            codecs = sorted({t["codec"] for t in entry["tensors"].values()})
            row(rel, list(entry["tensors"].values()), ", ".join(codecs))
    return table
