"""``tensorpress report``: one self-contained HTML page and its Markdown twin from collected runs.

The page has no script and loads nothing: the plots are PNG files drawn with matplotlib (Agg)
and embedded as data URIs, the style sheet is inline. The Markdown twin shows the same tables
(the same formatted numbers, from the same rows) and links the PNG files written beside it;
``report.json`` holds every figure unformatted. The output folder is written atomically.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from tensorpress.errors import OutputExistsError, ReportError
from tensorpress.io.files import atomic_dir
from tensorpress.report.collect import Collection, Entry

REPORT_MARK = "report.json"  # present in a folder this module wrote: it may be replaced


def _f(value: float | None, spec: str) -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def runs_rows(entries: list[Entry]) -> tuple[list[str], list[list[str]]]:
    """The runs table, formatted once for both the page and the Markdown."""
    tasks = sorted({t for e in entries for t in e.tasks})
    head = ["#", "run", "model", "recipe", "bits/w linears", "bits/w model", "MB", "perplexity", "Δ ppl", "KL",
            "top-1", "mean acc", "flips", *tasks]
    rows = []
    for i, e in enumerate(entries, 1):
        dppl = e.perplexity / e.reference_perplexity - 1 if e.perplexity and e.reference_perplexity else None
        rows.append([str(i), e.label, e.model or "–", e.recipe or "–", _f(e.bits_per_weight, ".3f"),
                     _f(e.bits_per_weight_model, ".3f"), _f(e.model_mb, ".2f"), _f(e.perplexity, ".3f"),
                     _f(dppl, "+.2%"), _f(e.kl, ".4f"), _f(e.top1, ".2%"), _f(e.mean_acc, ".2%"), _f(e.mean_flips, ".2%"),
                     *[_f(e.tasks[t]["acc"], ".2%") if t in e.tasks else "–" for t in tasks]])
    return head, rows


def provenance_rows(entries: list[Entry]) -> tuple[list[str], list[list[str]]]:
    return (["#", "run", "protocol", "machine", "command", "when", "from"],
            [[str(i), e.label, e.protocol or "–", e.machine or "–", e.command or "–", e.created or "–", e.source]
             for i, e in enumerate(entries, 1)])


# --- plots -------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def pareto_front(points: list[tuple[float, float]], lower_is_better: bool) -> list[tuple[float, float]]:
    """The points no other point beats in both size (smaller) and quality, by increasing size."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], p[1] if lower_is_better else -p[1])):
        if not front or (y < front[-1][1] if lower_is_better else y > front[-1][1]):
            front.append((x, y))
    return front


METRICS: list[tuple[str, str, Callable[[Entry], float | None], bool, bool]] = [
    # key, axis label, getter, lower is better, log scale
    ("kl", "KL (nats/token)", lambda e: e.kl, True, True),
    ("perplexity", "perplexity", lambda e: e.perplexity, True, True),
    ("acc", "mean task accuracy", lambda e: e.mean_acc, False, False),
]
SIZES: list[tuple[str, str, Callable[[Entry], float | None]]] = [
    ("bits", "bits/weight (compressed linears)", lambda e: e.bits_per_weight),
    ("mb", "model storage (MB)", lambda e: e.model_mb),
]


def pareto_plot(entries: list[Entry], size: str) -> bytes | None:
    """Quality against size for every run with both, one panel per metric, the front drawn."""
    _, xlabel, getx = next(s for s in SIZES if s[0] == size)
    panels = []
    for key, label, gety, lower, log in METRICS:
        pts = [(getx(e), gety(e), i) for i, e in enumerate(entries, 1) if getx(e) is not None and gety(e) is not None]
        if key in ("kl", "perplexity"):
            pts = [p for p in pts if p[1] > 0]
        if pts:
            panels.append((label, pts, lower, log))
    if not panels:
        return None
    plt = _pyplot()
    models = sorted({entries[i - 1].model or "?" for _, pts, _, _ in panels for _, _, i in pts})
    colors = {m: plt.get_cmap("tab10")(k % 10) for k, m in enumerate(models)}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, (label, pts, lower, log) in zip(axes[0], panels, strict=True):
        for model in models:
            mine = [p for p in pts if (entries[p[2] - 1].model or "?") == model]
            if mine:
                ax.scatter([p[0] for p in mine], [p[1] for p in mine], s=28, color=colors[model], zorder=3,
                           label=_short(model) if len(models) > 1 else None)
        for x, y, i in pts:
            ax.annotate(f"{i}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        drawn = False
        for model in models:  # one front per model: runs of different models do not compete
            front = pareto_front([(p[0], p[1]) for p in pts if (entries[p[2] - 1].model or "?") == model], lower)
            if len(front) > 1:
                ax.step([p[0] for p in front], [p[1] for p in front], where="post", lw=1.1, zorder=2,
                        color=colors[model] if len(models) > 1 else "#d2691e", label=None if drawn else "Pareto front")
                drawn = True
        values = [p[1] for p in pts]
        if log and max(values) / min(values) > 20:  # a log axis only where the values span decades
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label + (" (lower is better)" if lower else " (higher is better)"))
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:  # one legend for the figure, under the panels: models' names are long
        fig.legend(handles, labels, loc="lower center", ncol=min(3, len(handles)), fontsize=8, frameon=False,
                   bbox_to_anchor=(0.5, -0.09 - 0.04 * ((len(handles) - 1) // 3)))
    fig.suptitle("quality against size; points numbered as in the runs table", fontsize=10)
    return _png(fig)


def _short(model: str, width: int = 48) -> str:
    """A model's name for a legend: its description up to the first parenthesis, shortened."""
    name = model.split(" (")[0].strip() or model
    return name if len(name) <= width else name[: width - 1] + "…"


_BLOCK = re.compile(r"^(.*?)\.(\d+)\.(.+)$")


def layers_plot(entry: Entry) -> bytes | None:
    """One run's bits per layer (bars) and relative output error (heat map: block x linear)."""
    if not entry.layers:
        return None
    plt = _pyplot()
    errors = [(lay, lay.output_error if lay.output_error is not None else lay.weight_error) for lay in entry.layers]
    use_output = any(lay.output_error is not None for lay in entry.layers)
    grid: dict[str, dict[int, float]] = {}
    for lay, err in errors:
        m = _BLOCK.match(lay.name)
        if m and err is not None and err > 0:
            grid.setdefault(m.group(3), {})[int(m.group(2))] = err
    fig, axes = plt.subplots(2 if grid else 1, 1, figsize=(11, 7.5 if grid else 3.8), squeeze=False)
    ax = axes[0][0]
    ax.bar(range(len(entry.layers)), [lay.bits_per_weight for lay in entry.layers], color="#1f6fb2", width=0.85)
    ax.set_ylabel("bits/weight")
    ax.set_xlabel(f"compressed linear, in model order ({len(entry.layers)})")
    ax.set_title(f"{entry.label}: bits per layer", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    if grid:
        import numpy as np

        roles = list(grid)
        blocks = sorted({b for r in grid.values() for b in r})
        values = np.full((len(roles), len(blocks)), np.nan)
        for i, role in enumerate(roles):
            for j, b in enumerate(blocks):
                if b in grid[role]:
                    values[i, j] = math.log10(grid[role][b])
        ax = axes[1][0]
        image = ax.imshow(values, aspect="auto", cmap="magma_r", interpolation="nearest")
        ax.set_yticks(range(len(roles)), roles, fontsize=8)
        step = max(1, len(blocks) // 16)
        ax.set_xticks(range(0, len(blocks), step), [str(b) for b in blocks[::step]], fontsize=8)
        ax.set_xlabel("block")
        what = "output error on the calibration inputs" if use_output else "weight error"
        ax.set_title(f"log10 relative {what}, ||ΔW X||² / ||W X||²" if use_output else f"log10 relative {what}",
                     fontsize=10)
        fig.colorbar(image, ax=ax, label="log10")
    fig.tight_layout()
    return _png(fig)


def search_plot(entries: list[Entry]) -> bytes | None:
    """Pool KL of each search's parent per generation, with the seed it started from."""
    runs = [(i, e) for i, e in enumerate(entries, 1) if e.search]
    if not runs:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, e in runs:
        line = ax.plot([g for g, _ in e.search], [f for _, f in e.search], marker=".", lw=1, label=f"#{i} {_short(e.label)}")
        if e.search_seed is not None:
            ax.axhline(e.search_seed[1], color=line[0].get_color(), ls="--", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("generation")
    ax.set_ylabel("KL to the original on the search pool (nats/token)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def kv_plot(found: Collection) -> bytes | None:
    rows = [r for r in found.kv if r.kl is not None or r.perplexity is not None]
    if not rows:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (label, get) in zip(axes, (("KL (nats/token)", lambda r: r.kl), ("perplexity", lambda r: r.perplexity)),
                                strict=True):
        families: dict[str, list] = {}
        for r in rows:
            if get(r) is not None:
                families.setdefault(r.method.split("@")[0].split("-")[0], []).append((r.ratio, get(r), r.method))
        for fam, pts in sorted(families.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=4, lw=1, label=fam)
        ax.set_xscale("log", base=2)
        if label.startswith("KL"):
            ax.set_yscale("symlog", linthresh=1e-4)
        ax.set_xlabel("cache bytes ratio vs the full 16-bit cache")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle("KV caches: compression ratio against long-context quality", fontsize=10)
    fig.tight_layout()
    return _png(fig)


# --- page --------------------------------------------------------------------------------------

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-size:12.5px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right;vertical-align:top}
th{background:#f3f5f8}td.l,th.l{text-align:left}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}
figcaption,.note{color:#555;font-size:12.5px}.problem{color:#a40000}
code{font-size:12px;word-break:break-all}
"""

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>{{ style }}</style></head><body>
<h1>{{ title }}</h1>
<p class="note">{{ runs|length }} run(s){% if kv %}, {{ kv }} KV-cache configuration(s){% endif %}; made by tensorpress {{ version }} on {{ created }}. Every figure was measured by the run it belongs to; the protocol, machine and command of each are next to the plots and in the provenance table.</p>
{% if problems %}<h2>Not read</h2><ul>{% for p in problems %}<li class="problem">{{ p }}</li>{% endfor %}</ul>{% endif %}
<h2>Runs</h2>
{{ table(runs_head, runs_rows) }}
{% for fig in figures %}
<h2>{{ fig.title }}</h2>
<figure><img src="data:image/png;base64,{{ fig.data }}" alt="{{ fig.title }}" width="{{ fig.width }}" height="{{ fig.height }}">
<figcaption>{{ fig.caption }}</figcaption></figure>
{% if fig.provenance %}<p class="note">measured: {% for line in fig.provenance %}<br>{{ line }}{% endfor %}</p>{% endif %}
{% endfor %}
<h2>Provenance</h2>
{{ table(prov_head, prov_rows) }}
</body></html>
"""


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    left = {"run", "model", "recipe", "protocol", "machine", "command", "when", "from"}

    def cls(col: str) -> str:
        return ' class="l"' if col in left else ""

    out = ["<table><thead><tr>", *(f"<th{cls(h)}>{html.escape(h)}</th>" for h in head), "</tr></thead><tbody>"]
    for row in rows:
        cells = [f"<td{cls(h)}>" + (f"<code>{html.escape(v)}</code>" if h == "command" else html.escape(v)) + "</td>"
                 for h, v in zip(head, row, strict=True)]
        out += ["<tr>", *cells, "</tr>"]
    out.append("</tbody></table>")
    return "".join(out)


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    def cell(v: str) -> str:
        """A cell's text as text: no table breaks, no links, images or HTML from a run's fields."""
        for ch in "\\|[]<>`*_":
            v = v.replace(ch, "\\" + ch)
        return v.replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _png_size(data: bytes) -> tuple[int, int]:
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _prov(entries: list[Entry], indices: list[int]) -> list[str]:
    return [f"#{i} {entries[i - 1].label}: {entries[i - 1].protocol or 'protocol not recorded'}; "
            f"{entries[i - 1].machine or 'machine not recorded'}; command: {entries[i - 1].command or 'not recorded'}"
            for i in indices]


def write_report(found: Collection, out: str | Path, *, layers_of: str | None = None, title: str = "tensorpress report",
                 overwrite: bool = False) -> Path:
    """Write ``index.html``, ``report.md``, ``report.json`` and the plots' PNG files to ``out``."""
    import datetime

    from jinja2 import Environment
    from markupsafe import Markup

    from tensorpress import __version__

    out = Path(out)
    if not found.entries and not found.kv:
        listed = "; ".join(found.problems) or "no inputs"
        raise ReportError(f"nothing to report: no input could be read ({listed})")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a folder; it will not be replaced")
    if out.is_dir() and any(out.iterdir()) and not (out / REPORT_MARK).is_file() and not overwrite:
        raise OutputExistsError(f"{out} holds files and is not a report folder; pass --overwrite to replace it")
    entries = found.entries
    focus = None
    if layers_of is not None:
        focus = next((e for e in entries if layers_of in (e.label, e.source, Path(e.source).name)), None)
        if focus is None:
            raise ReportError(f"--layers {layers_of!r} names no run; runs: {', '.join(e.label for e in entries)}")
        if not focus.layers:
            raise ReportError(f"--layers {layers_of!r}: that run records no per-layer figures (a compress run or checkpoint does)")
    else:
        with_layers = [e for e in entries if e.layers]
        focus = next((e for e in with_layers if any(lay.output_error is not None for lay in e.layers)),
                     with_layers[0] if with_layers else None)

    figures = []
    for size, name, unit in (("bits", "pareto-bits.png", "bits/weight"), ("mb", "pareto-mb.png", "MB")):
        data = pareto_plot(entries, size)
        if data is not None:
            getx = next(s[2] for s in SIZES if s[0] == size)
            idx = [i for i, e in enumerate(entries, 1) if getx(e) is not None]
            figures.append({"file": name, "png": data, "title": f"Quality against size ({unit})",
                            "caption": "Each point is a run (number as in the runs table), coloured by model; the line "
                                       "joins a model's runs that no other run of it beats in both size and quality.", "provenance": _prov(entries, idx)})
    if focus is not None:
        data = layers_plot(focus)
        if data is not None:
            i = entries.index(focus) + 1
            figures.append({"file": "layers.png", "png": data, "title": f"Per layer: run #{i} {focus.label}",
                            "caption": "Top: exact bits per weight of every compressed linear. Bottom: its relative error "
                                       "against the original weight (output error on the calibration inputs where the "
                                       "run collected them, else weight error), by block and linear.",
                            "provenance": _prov(entries, [i])})
    data = search_plot(entries)
    if data is not None:
        idx = [i for i, e in enumerate(entries, 1) if e.search]
        figures.append({"file": "search.png", "png": data, "title": "Searches",
                        "caption": "The parent's KL on the search's calibration pool after every generation; dashed: "
                                   "the seed it started from (the best uniform or greedy allocation). Quality in the "
                                   "runs table is measured on the evaluation windows instead.",
                        "provenance": _prov(entries, idx)})
    data = kv_plot(found)
    if data is not None:
        figures.append({"file": "kv.png", "png": data, "title": "KV caches",
                        "caption": "Measured bytes ratio of each cache against the full 16-bit cache, and the "
                                   "long-context quality it costs.", "provenance": [found.kv_protocol] if found.kv_protocol else []})

    runs_head, rows = runs_rows(entries)
    prov_head, prov = provenance_rows(entries)
    created = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    for fig in figures:
        fig["width"], fig["height"] = _png_size(fig["png"])
        fig["data"] = base64.b64encode(fig["png"]).decode("ascii")
    env = Environment(autoescape=True)
    env.globals["table"] = lambda head, body: Markup(_html_table(head, body))
    page = env.from_string(PAGE).render(title=title, style=Markup(STYLE), runs=entries,
                                        kv=len(found.kv), version=__version__, created=created,
                                        problems=found.problems, runs_head=runs_head, runs_rows=rows,
                                        figures=figures, prov_head=prov_head, prov_rows=prov)
    md = [f"# {title}", "", f"{len(entries)} run(s); made by tensorpress {__version__} on {created}.", ""]
    if found.problems:
        md += ["## Not read", "", *[f"- {p}" for p in found.problems], ""]
    md += ["## Runs", "", _md_table(runs_head, rows), ""]
    for fig in figures:
        md += [f"## {fig['title']}", "", f"![{fig['title']}]({fig['file']})", "", fig["caption"], ""]
        md += [f"- measured: {line}" for line in fig["provenance"]] + [""]
    md += ["## Provenance", "", _md_table(prov_head, prov), ""]
    figures_json = {"entries": [{**asdict(e), "mean_acc": e.mean_acc, "mean_flips": e.mean_flips} for e in entries],
                    "kv": [asdict(r) for r in found.kv], "problems": found.problems, "created": created,
                    "tensorpress_version": __version__}
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "index.html").write_text(page, encoding="utf-8")
        (tmp / "report.md").write_text("\n".join(md), encoding="utf-8")
        for fig in figures:
            (tmp / fig["file"]).write_bytes(fig["png"])
        (tmp / REPORT_MARK).write_text(json.dumps(figures_json, indent=1, default=str) + "\n", encoding="utf-8")
    return out
