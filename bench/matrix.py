"""The method x architecture table of the README, generated from a test run (not by hand).

Runs ``tests/test_builtin_recipes.py`` (every built-in recipe's method combination on a tiny
model of every supported family: compress, save, reload with identical outputs) and the KV-cache
test that puts every cache on every causal family, with pytest's JUnit XML report, then reads
each case's outcome:

* ✅ the case passed and it is not a refusal: the method works on that family;
* an error label: the case passed by asserting the typed error of ``REFUSALS`` (the reason is
  printed under the table);
* ❌ the case failed.

``--write PATH`` replaces the table between ``<!-- matrix:start -->`` and ``<!-- matrix:end -->``
in PATH (the README). ``make matrix`` runs it.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "src")]

TESTS = ["tests/test_builtin_recipes.py::test_builtin_recipe_compresses_saves_and_reloads",
         "tests/kv/test_caches.py::test_every_cache_on_every_causal_family",
         "tests/kv/test_caches.py::test_full_budget_gives_the_uncompressed_attention"]
START, END = "<!-- matrix:start -->", "<!-- matrix:end -->"
# the refusals' message fragments (tests/test_builtin_recipes.py REFUSALS), said in full
REASONS = {
    "prune_heads needs separate q, k and v projections": "prune_heads needs separate q, k and v projections; this family fuses them",
    "slicegpt does not apply to": "slicegpt's rotation needs pre-norm RMSNorm blocks: LayerNorm (GPT-2, OPT, GPT-NeoX, Cohere, StableLM), norms "
                                  "after each branch (Gemma 2/3, OLMo 2), (1 + w) norms and scaled embeddings (Gemma), or "
                                  "normalisation after the residual sum (BERT) do not commute with it; nor does a mixture "
                                  "of experts' router and experts (Mixtral, Qwen2/3-MoE, OLMoE) take the rotation yet",
    "cannot lose whole heads by a config change": "prune_heads: the attention derives its head width from the hidden size "
                                                  "(OPT, BERT), a norm spans all heads (OLMo 2, OLMoE) or q/k norms "
                                                  "hold one row per head (Cohere, StableLM)",
    "its FFN is a mixture of experts": "prune_ffn: a mixture of experts' FFN channels are per expert (expert pruning is "
                                       "a later step)",
    "replace 'linear' needs one attention kind in every layer": "drop_blocks' linear bridges: the model mixes sliding-window "
                                                                "and global layers, and the cache's layer kinds go by position",
    "sensitivity 'fisher' needs a causal language model's loss": "Fisher sensitivities need a next-token loss, which an encoder has not",
    "targets ['lm_head'] minus ignore": "a bare encoder has no LM head to quantize",
}


def run(xml: Path) -> None:
    subprocess.run([sys.executable, "-m", "pytest", *TESTS, "-q", "-p", "no:cacheprovider", f"--junitxml={xml}"],
                   cwd=ROOT, check=False)


def outcomes(xml: Path) -> dict[str, str]:
    """``{test id: passed | failed | skipped: <message>}``."""
    out = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = case.get("name", "")
        failed = case.find("failure") is not None or case.find("error") is not None
        skipped = case.find("skipped")
        out[name] = "failed" if failed else f"skipped: {skipped.get('message', '')}" if skipped is not None else "passed"
    return out


def table(results: dict[str, str]) -> tuple[str, list[str]]:
    from conftest import ALL_ARCHS
    from test_builtin_recipes import REFUSED

    import tensorpress as tp

    rows: dict[str, dict[str, str]] = {}
    notes: dict[str, str] = {}
    for test, outcome in results.items():
        m = re.fullmatch(r"test_builtin_recipe_compresses_saves_and_reloads\[(.+)-([a-z0-9_]+)\]", test)
        if m:
            recipe, arch = m.groups()
            stages = tp.recipes.get(recipe).stages
            label = " + ".join(s.method for s in stages)
            if any(getattr(s, "replace", None) == "linear" for s in stages):
                label += " (linear bridge)"
            if any(getattr(s, "target_bits", None) is not None or getattr(s, "allocation", None) == "greedy" for s in stages):
                label += " (allocated by Fisher sensitivity)"
            refused = REFUSED.get((recipe, arch))
        else:
            m = (re.fullmatch(r"test_every_cache_on_every_causal_family\[([a-z0-9]+)-([a-z0-9_]+)\]", test)
                 or re.fullmatch(r"test_full_budget_gives_the_uncompressed_attention\[([a-z0-9]+)\]()", test))
            if not m:
                continue
            name, arch = m.group(1), m.group(2) or "llama"
            label, refused = f"KV cache: {name}", None
        cell = rows.setdefault(label, {})
        if outcome == "failed":
            mark = "❌"
        elif refused is not None:
            key = refused[1]
            notes.setdefault(key, f"E{len(notes) + 1}")
            mark = notes[key]
        elif outcome.startswith("skipped"):
            key = outcome.removeprefix("skipped: ").removeprefix("Skipped: ").removeprefix("refused: ")
            notes.setdefault(key, f"E{len(notes) + 1}")
            mark = notes[key]
        else:
            mark = "✅"
        if cell.get(arch) not in ("❌",):  # a family's cell: the worst of the recipes that stand for the combination
            cell[arch] = mark if cell.get(arch) in (None, "✅") else cell[arch]
    archs = [a for a in ALL_ARCHS if any(a in r for r in rows.values())]
    lines = ["| method | " + " | ".join(archs) + " |", "| --- |" + " --- |" * len(archs)]
    for label in sorted(rows, key=lambda k: (k.startswith("KV"), k)):
        lines.append(f"| {label} | " + " | ".join(rows[label].get(a, "·") for a in archs) + " |")
    legend = [f"{code}: {REASONS.get(text, text)}" for text, code in notes.items()]
    return "\n".join(lines), legend


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--xml", type=Path, help="read this JUnit XML instead of running the tests")
    p.add_argument("--write", type=Path, help="replace the table in this file (between the matrix markers)")
    args = p.parse_args(argv)
    xml = args.xml
    if xml is None:
        xml = Path(tempfile.mkdtemp(prefix="tp-matrix-")) / "junit.xml"
        run(xml)
    body, legend = table(outcomes(xml))
    text = (f"{body}\n\n" + "\n".join(f"- {line}" for line in legend) + "\n\n· = not run on that family (the recipe's "
            "method combination is covered by another recipe there)." if legend else body)
    print(text)
    if args.write:
        doc = args.write.read_text(encoding="utf-8")
        if START not in doc or END not in doc:
            raise SystemExit(f"{args.write} has no {START} ... {END} markers")
        head, rest = doc.split(START, 1)
        _, tail = rest.split(END, 1)
        args.write.write_text(f"{head}{START}\n{text}\n{END}{tail}", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
