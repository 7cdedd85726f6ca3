"""``tp.search``: the best mix of menu entries per layer for a budget, and the recipe that makes it.

Steps: the level database (built once, reused), the feasible range of the budget, the seeds
(every uniform entry that fits, and the greedy allocation over Fisher-weighted layer errors,
``Σ F ⊙ (W − Ŵ)²`` with ``F`` the diagonal empirical Fisher of the LM loss, as AutoQuantize
prices a layer's choice), the evolutionary search (``evolve``), and the result: the chosen entry
per layer, the recipe that ``tp.compress`` turns into the searched model (exactly the scored
one when the levels were made from the original model's inputs, ``levels.py``), and the log.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers.pytorch_utils import Conv1D

from tensorpress.data import TokenWindows
from tensorpress.engine.linears import weight_of
from tensorpress.errors import CalibrationError, SearchError
from tensorpress.io.gguf import aligned_bytes
from tensorpress.methods.quant.mixed import fisher_diagonals
from tensorpress.models import LoadedModel
from tensorpress.recipe import Recipe
from tensorpress.search.budget import Budget, parse_budget, rest_of_model
from tensorpress.search.evolve import Outcome, Schedule, evolve
from tensorpress.search.executor import make_executor
from tensorpress.search.fitness import Choice, prepare
from tensorpress.search.greedy import greedy_choice
from tensorpress.search.levels import LevelDB, build_levels
from tensorpress.search.menu import GGUF_MENU, parse_menu

log = logging.getLogger(__name__)

STATE_FILE = "search-state.json"


@dataclass
class SearchResult:
    """What a search found: ``choices`` (layer -> menu entry), ``recipe`` (reproduces it),
    the pool KL of the result and of every seed, and the storage of the result."""

    choices: dict[str, str]
    recipe: Recipe
    fitness: float
    seeds: dict[str, float]
    seed_name: str
    budget: str
    budget_bits: float
    linear_bits: int
    linear_numel: int
    rest_bits: int
    model_numel: int
    log: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    executor: str = ""
    evaluations: int = 0
    levels_inputs: str = "compressed"
    gguf_bytes: int | None = None  # a GGUF-size search: the predicted size of the exported file

    @property
    def exact(self) -> bool:
        """Whether ``recipe`` compresses into exactly the model the search scored (levels from
        the original inputs), or into its sequential re-compression (levels from compressed ones)."""
        return self.levels_inputs == "original"

    @property
    def bits_per_weight(self) -> float:
        return self.linear_bits / self.linear_numel

    def to_dict(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for entry in self.choices.values():
            counts[entry] = counts.get(entry, 0) + 1
        return {"budget": self.budget, "budget_bits": self.budget_bits, "bits_per_weight": self.bits_per_weight,
                "linear_bits": self.linear_bits, "model_bits_per_parameter": (self.linear_bits + self.rest_bits) / self.model_numel,
                "model_bytes": (self.linear_bits + self.rest_bits) / 8, "fitness_kl": self.fitness,
                "seeds_kl": self.seeds, "seed": self.seed_name, "entries_used": counts, "choices": self.choices,
                "generations": self.log, "timings": self.timings, "executor": self.executor,
                "evaluations": self.evaluations, "levels_inputs": self.levels_inputs, "exact": self.exact,
                "gguf_bytes": self.gguf_bytes,
                "recipe": self.recipe.to_dict()}


def mix_recipe(db: LevelDB, choice: Choice, menu: dict[str, Recipe], name: str, description: str = "") -> Recipe:
    """One stage per stage of every chosen entry, each targeting exactly the layers that chose
    it, with the statistics from the inputs the levels were made with (``db.inputs``)."""
    by_entry: dict[str, list[str]] = {}
    for layer, level in zip(db.layers, choice):
        by_entry.setdefault(db.entries[level], []).append(layer)
    stages = []
    for entry in db.entries:
        if entry in by_entry:
            stages += [stage.model_copy(update={"targets": list(by_entry[entry])}) for stage in menu[entry].stages]
    return Recipe(name=name, description=description, stages=stages, inputs=db.inputs)


def fisher_errors(lm: LoadedModel, db: LevelDB, weights: dict[str, list[torch.Tensor]], windows: torch.Tensor) -> dict[str, dict[int, float]]:
    """``{layer: {level: Σ F ⊙ (W − Ŵ_level)²}}``, ``F`` the diagonal Fisher on ``windows``."""
    if not lm.causal:
        raise SearchError("the Fisher-weighted seed needs a causal language model's loss")
    model = lm.model
    modules = {name: model.get_submodule(name) for name in db.layers}
    fisher = fisher_diagonals(model, {n: m.weight for n, m in modules.items()}, windows)
    out = {}
    for name, module in modules.items():
        f = fisher[name].T if isinstance(module, Conv1D) else fisher[name]  # Conv1D keeps (in, out)
        original = weight_of(module)
        out[name] = {lv: float((f * (original - w).square()).sum()) for lv, w in enumerate(weights[name])}
    return out


def _feasible(costs: list[list[int]], dense: int, budget: Budget, budget_bits: float, describe) -> float:
    """The budget for the linears, after checking it lies between every layer at its cheapest
    entry and the uncompressed size (``dense``); ``describe(bits)`` spells a size."""
    low, high = sum(min(c) for c in costs), sum(max(c) for c in costs)
    feasible = f"feasible: {describe(low)} to {describe(min(high, dense))}"
    if budget_bits < low:
        raise SearchError(f"budget {budget.text} is below the smallest menu choice ({describe(low)}, every layer at its "
                          f"cheapest entry); {feasible}")
    if budget_bits > dense:
        raise SearchError(f"budget {budget.text} is above the uncompressed size ({describe(dense)}); {feasible}")
    return min(budget_bits, high)


def search(
    lm: LoadedModel,
    budget: str | float | Budget,
    calib: TokenWindows,
    levels_dir: str | os.PathLike,
    *,
    menu: str | list[str] | None = None,
    schedule: Schedule | None = None,
    pool: int = 8,
    fisher_samples: int = 16,
    inputs: str = "compressed",
    workers: int | None = 0,
    ray_address: str | None = None,
    state_dir: str | os.PathLike | None = None,
    resume: bool = False,
    name: str = "searched",
    on_generation: Any = None,
    on_entry: Any = None,
) -> SearchResult:
    """Search the per-layer mix of ``menu`` entries with the lowest KL to ``lm`` on ``pool``
    calibration windows within ``budget``; the levels are built in (or reused from)
    ``levels_dir`` from ``inputs`` (see ``levels.py``), the search state kept in ``state_dir``
    (``resume`` continues it)."""
    timings: dict[str, float] = {}
    schedule = schedule or Schedule()
    budget = budget if isinstance(budget, Budget) else parse_budget(budget)
    if calib is None or len(calib.input_ids) < max(pool, 1):
        raise CalibrationError(f"the search scores candidates on {pool} calibration windows; pass at least that many")
    entries = parse_menu(GGUF_MENU if menu is None and budget.unit == "gguf" else menu)
    coded = [name for name, recipe in entries.items() if any(stage.method == "lossless" for stage in recipe.stages)]
    if coded and inputs != "original":
        # a coded size depends on the codes, which a sequential re-compression of the mix changes
        raise SearchError(f"menu entries {coded} are entropy-coded: their sizes depend on the codes, so the mix is only "
                          "held to the budget when its recipe reproduces the levels exactly; search them on levels "
                          "from the original inputs (inputs='original', CLI: --level-inputs original)")
    t0 = time.perf_counter()
    db = build_levels(lm, entries, calib, levels_dir, inputs=inputs, on_entry=on_entry)
    timings["levels_seconds"] = time.perf_counter() - t0
    rest_bits, rest_numel = rest_of_model(lm.model, db.layers)
    model_numel = db.numel + rest_numel
    gguf_rest, budget_rest = None, rest_bits
    if budget.unit == "gguf":  # costs: each layer's tensor in the GGUF file, everything else measured once
        sizes, gguf_rest = db.gguf_bytes()
        costs = [[8 * b for b in sizes[n]] for n in db.layers]
        budget_rest = 8 * gguf_rest
        dense = 8 * sum(aligned_bytes(2 * o * i) for o, i in db.shapes.values())  # as float16 tensors
    else:
        costs = [[lv.bits for lv in db.levels[n]] for n in db.layers]
        dense = sum(lm.model.get_submodule(n).weight.element_size() * 8 * o * i for n, (o, i) in db.shapes.items())

    def describe(bits: float) -> str:
        return budget.describe(bits, db.numel, budget_rest, model_numel)

    budget_bits = _feasible(costs, dense, budget, budget.linear_bits(db.numel, budget_rest, model_numel), describe)

    def cost(choice: Choice) -> int:
        return sum(c[lv] for c, lv in zip(costs, choice))

    t0 = time.perf_counter()
    weights = db.dense_weights()
    timings["load_levels_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    seeds: dict[str, Choice] = {f"uniform {e}": db.uniform(e) for e in db.entries if cost(db.uniform(e)) <= budget_bits}
    if lm.causal:
        errors = fisher_errors(lm, db, weights, calib.input_ids[:fisher_samples])
        options = {n: {lv: (errors[n][lv], costs[k][lv]) for lv in range(len(db.entries))} for k, n in enumerate(db.layers)}
        picked = greedy_choice(options, budget_bits)
        seeds["fisher greedy"] = tuple(int(picked[n]) for n in db.layers)
    timings["seed_seconds"] = time.perf_counter() - t0
    if not seeds:
        raise SearchError(f"no seed fits budget {budget.text}")

    t0 = time.perf_counter()
    pieces = prepare(lm, db.layers, weights, TokenWindows(calib.input_ids[:pool], calib.source, calib.seed))
    del weights
    executor = make_executor(pieces, workers, ray_address)
    del pieces
    timings["prepare_seconds"] = time.perf_counter() - t0
    identity = {"levels": str(Path(levels_dir).resolve()), "entries": db.entries, "fingerprint": db.index["fingerprint"],
                "calibration_sha256": db.index["calibration_sha256"], "pool": pool, "inputs": db.inputs}
    state_path = Path(state_dir) / STATE_FILE if state_dir is not None else None
    if state_path is not None:
        state_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        outcome: Outcome = evolve(executor, costs, budget_bits, seeds, schedule, state_path=state_path, resume=resume,
                                  identity=identity, on_generation=on_generation)
    finally:
        executor.close()
    timings["search_seconds"] = outcome.seconds
    bits = db.bits(outcome.choice)
    spelled = describe(cost(outcome.choice))
    recipe = mix_recipe(db, outcome.choice, entries, name,
                        f"searched mix of {', '.join(db.entries)} for {budget.text} ({spelled}); pool KL {outcome.fitness:.4f}")
    return SearchResult(dict(zip(db.layers, (db.entries[c] for c in outcome.choice))), recipe, outcome.fitness,
                        outcome.seeds, outcome.seed_name, budget.text, budget_bits, bits, db.numel, rest_bits,
                        model_numel, outcome.log, timings, executor.kind, outcome.evaluations, db.inputs,
                        None if gguf_rest is None else gguf_rest + cost(outcome.choice) // 8)
