"""The menu of a search: the candidate compressions of every block linear, as named recipes.

A menu entry is an ordinary recipe whose stages compress the block linears (no structural
stages, no allocation of its own): the level database runs it once on the whole model, and the
search picks, per layer, the entry whose parts that layer keeps. Default entries are GPTQ at
2, 3, 4, 5, 6 and 8 bits in groups of 128 (the grid of ``gptq-w3g128``), SparseGPT 50 % and 2:4
with the kept weights at 4 bits, and GPTQ 3-bit plus an EoRA rank-16 correction; SVD-LLM entries
(``svd-llm-r25`` ... : the fraction of each layer's parameters kept) are known but not in the
default, their float16 factors cost more bits than any budget below 8 bits/weight allows.
``GGUF_MENU`` (``gguf-q2_k`` ... ``gguf-q8_0``: GPTQ on llama.cpp's grids, block linears only;
the built-in recipes ``gptq-q4_k_m`` etc. also type the token table) is the default of a
GGUF-size search.
``SPARSITY_MENU`` (SparseGPT at 40 ... 80 % unstructured, kept weights float16) is the
per-layer sparsity search of EvoPress: with the mask counted as one bit per weight, a budget in
bits is a budget of average sparsity.
"""

from __future__ import annotations

from typing import Any

from tensorpress.errors import RecipeError, SearchError
from tensorpress.methods.structural.base import is_structural
from tensorpress.recipe import Recipe, builtin_names, resolve

# the settings of the built-in gptq-w3g128 (act_order with static groups, clipping search)
_GPTQ = {"method": "gptq", "group_size": 128, "symmetric": False, "act_order": True, "mse": True, "damp": 0.01}


def _gptq(bits: int) -> dict[str, Any]:
    return {"description": f"GPTQ {bits}-bit asymmetric, groups of 128 (as gptq-w3g128)",
            "stages": [{**_GPTQ, "bits": bits}]}


MENU_RECIPES: dict[str, dict[str, Any]] = {
    **{f"gptq-w{b}g128": _gptq(b) for b in (2, 3, 4, 5, 6, 8)},
    "sparsegpt-50-w4g128": {"description": "SparseGPT 50 % unstructured, kept weights at 4 bits in groups of 128",
                            "stages": [{"method": "sparsegpt", "sparsity": 0.5, "bits": 4, "group_size": 128}]},
    "sparsegpt-2-4-w4g128": {"description": "SparseGPT 2:4, kept weights at 4 bits in groups of 128",
                             "stages": [{"method": "sparsegpt", "sparsity": 0.5, "pattern": "2:4", "bits": 4,
                                         "group_size": 128}]},
    "gptq-w3g128-eora-r16": {"description": "GPTQ 3-bit groups of 128, then EoRA rank 16 (int8 factors)",
                             "stages": [{**_GPTQ, "bits": 3}, {"method": "eora", "rank": 16, "factor_bits": 8}]},
    **{f"gguf-{t}": {"description": f"GPTQ on llama.cpp's {t.upper()} grid (rows off its blocks in llama.cpp's "
                                    "fallback type); exports to GGUF bit for bit",
                     "stages": [{"method": "gptq", "format": t, "mse": True, "act_order": True, "damp": 0.01}]}
       for t in ("q2_k", "q3_k", "q4_0", "q4_k", "q5_k", "q6_k", "q8_0")},
    **{f"sparsegpt-{s}": {"description": f"SparseGPT {s} % unstructured, kept weights float16, mask bits counted",
                          "stages": [{"method": "sparsegpt", "sparsity": s / 100}]} for s in range(30, 90, 10)},
    **{f"svd-llm-r{int(r * 100)}": {"description": f"SVD-LLM keeping {int(r * 100)} % of each layer's parameters",
                                   "stages": [{"method": "svd_llm", "keep": r}]} for r in (0.25, 0.5, 0.75)},
}
DEFAULT_MENU = ("gptq-w2g128", "gptq-w3g128", "gptq-w4g128", "gptq-w5g128", "gptq-w6g128", "gptq-w8g128",
                "sparsegpt-50-w4g128", "sparsegpt-2-4-w4g128", "gptq-w3g128-eora-r16")
GPTQ_MENU = DEFAULT_MENU[:6]  # the bits-only search
GGUF_MENU = ("gguf-q2_k", "gguf-q3_k", "gguf-q4_k", "gguf-q5_k", "gguf-q6_k", "gguf-q8_0")  # --gguf-size
SPARSITY_MENU = tuple(f"sparsegpt-{s}" for s in range(40, 90, 10))


def menu_entry(name: str) -> Recipe:
    """The recipe of one menu entry: a name above, a built-in recipe or a YAML path."""
    if name in MENU_RECIPES:
        return Recipe.from_dict({"name": name, **MENU_RECIPES[name]}, source=f"menu entry {name}")
    try:
        recipe = resolve(name)
    except RecipeError:
        raise SearchError(
            f"unknown menu entry {name!r}; known: {', '.join(MENU_RECIPES)}, the built-in recipes "
            f"({', '.join(builtin_names())}) or a recipe YAML path"
        ) from None
    return recipe


def check_entry(name: str, recipe: Recipe) -> None:
    """Refuse a recipe the level database cannot hold: structural stages change the model's
    shape (search depth with the block-removal search instead) and an allocation of its own
    would make the entry's layers depend on each other."""
    for stage in recipe.stages:
        if is_structural(stage):
            raise SearchError(f"menu entry {name!r}: structural stage {stage.name} changes the model's shape; "
                              "menu entries compress the block linears (no drop_blocks, prune_*, slicegpt, trim_vocab)")
        if getattr(stage, "target_bits", None) is not None or stage.wants_allocation():
            raise SearchError(f"menu entry {name!r}: stage {stage.name} allocates across layers itself; give a "
                              "fixed setting per entry (the search does the allocation)")


def parse_menu(spec: str | list[str] | tuple[str, ...] | None) -> dict[str, Recipe]:
    """``{name: recipe}`` from a comma-separated list (or a list) of entries; None: the default."""
    names = DEFAULT_MENU if spec is None else [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec)]
    names = [n for n in names if n]
    if len(names) < 2:
        raise SearchError(f"a menu needs at least two entries to choose between, got {names!r}")
    if len(set(names)) != len(names):
        raise SearchError(f"menu entries repeat: {names!r}")
    menu = {}
    for name in names:
        recipe = menu_entry(name)
        check_entry(name, recipe)
        menu[name] = recipe
    return menu
