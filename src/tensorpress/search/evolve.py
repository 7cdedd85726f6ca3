"""EvoPress' (1+λ) evolutionary search over per-layer levels, under an exact bits budget.

Each generation makes ``offspring`` children of the parent by level-switch mutations (a child
changes ``min(U{1..3}, U{1..3})`` layers to random other levels, then is repaired into the
budget: random other layers step down to their next cheaper level while it is over, then up to
their next dearer level while that still fits, so the budget is used and never exceeded).
Selection goes in stages: all children are scored on a few pool windows drawn afresh, the best
few on more, and the last survivors on the whole pool, where the parent's score is known; a
child replaces the parent only when it is better there. The search therefore never ends worse
than its seed on the pool, and the state after every generation (parent, generator state, log)
is saved so an interrupted search resumes where it stopped with the same result.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tensorpress.errors import CheckpointError, SearchError
from tensorpress.io.files import read_json
from tensorpress.progress import track

Choice = tuple[int, ...]
STATE_FORMAT = "tensorpress-search-state"
STATE_VERSION = 1


@dataclass(frozen=True)
class Schedule:
    """``stages``: (pool windows, survivors) of each selection stage before the last, which scores
    the survivors on the whole pool and keeps one."""

    generations: int = 40
    offspring: int = 16
    stages: tuple[tuple[int, int], ...] = ((1, 4), (3, 2))
    seed: int = 0

    def check(self, pool: int) -> None:
        if self.generations < 0 or self.offspring < 1:
            raise SearchError(f"generations must be >= 0 and offspring >= 1, got {self.generations} and {self.offspring}")
        last = self.offspring
        for windows, survivors in self.stages:
            if not 1 <= windows <= pool:
                raise SearchError(f"a selection stage scores 1 to {pool} windows (the pool), got {windows}")
            if not 1 <= survivors <= last:
                raise SearchError(f"a selection stage keeps 1 to {last} candidates (those it scores), got {survivors}")
            last = survivors


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def mutate(parent: Choice, costs: list[list[int]], budget: float, rng: random.Random) -> Choice:
    """A child of ``parent`` within ``budget`` (``costs[layer][level]``: exact bits)."""
    child = list(parent)
    n = len(child)
    changed: set[int] = set()
    for _ in range(min(rng.randint(1, 3), rng.randint(1, 3))):
        k = rng.randrange(n)
        others = [lv for lv in range(len(costs[k])) if lv != child[k]]
        if others:
            child[k] = rng.choice(others)
            changed.add(k)
    total = sum(costs[k][lv] for k, lv in enumerate(child))
    free = [k for k in range(n) if k not in changed] or list(range(n))

    def step(k: int, down: bool) -> int | None:
        here = costs[k][child[k]]
        ladder = [lv for lv in range(len(costs[k])) if (costs[k][lv] < here if down else costs[k][lv] > here)]
        if not ladder:
            return None
        return (max if down else min)(ladder, key=lambda lv: (costs[k][lv], -lv if down else lv))

    def moves(down: bool) -> list[tuple[int, int]]:
        # (layer, level) steps: down while over the budget, then up while they still fit
        out = []
        for pool in (free, range(n)) if down else (free,):
            for k in pool:
                lv = step(k, down)
                if lv is not None and (down or total + costs[k][lv] - costs[k][child[k]] <= budget):
                    out.append((k, lv))
            if out:
                break
        return out

    for down in (True, False):
        while not down or total > budget:
            options = moves(down)
            if not options:
                break
            k, lv = rng.choice(options)
            total += costs[k][lv] - costs[k][child[k]]
            child[k] = lv
    return tuple(child)


@dataclass
class Outcome:
    choice: Choice
    fitness: float  # mean KL on the whole pool
    seeds: dict[str, float]  # each seed's mean KL on the pool
    seed_name: str
    log: list[dict[str, Any]] = field(default_factory=list)
    evaluations: int = 0  # window scores computed
    seconds: float = 0.0


def _write_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(state, f, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _state(identity: dict[str, Any], generation: int, parent: Choice, parent_kl: list[float], rng: random.Random,
           seeds: dict[str, float], seed_name: str, log: list[dict[str, Any]], evaluations: int) -> dict[str, Any]:
    version, internal, gauss = rng.getstate()
    return {"format": STATE_FORMAT, "version": STATE_VERSION, "identity": identity, "generation": generation,
            "parent": list(parent), "fitness": _mean(parent_kl), "rng": [version, list(internal), gauss],
            "seeds": seeds, "seed_name": seed_name, "log": log, "evaluations": evaluations}


def evolve(
    executor: Any,
    costs: list[list[int]],
    budget: float,
    seeds: dict[str, Choice],
    schedule: Schedule,
    *,
    state_path: Path | None = None,
    resume: bool = False,
    identity: dict[str, Any] | None = None,
    on_generation: Callable[[dict[str, Any]], None] | None = None,
) -> Outcome:
    """Run the search; ``identity`` (budget, menu, levels ...) is stored with the state and must
    match on ``resume``."""
    pool = list(range(executor.pool))
    schedule.check(len(pool))
    # what a resumed search must share with the saved one (more generations may be asked for)
    identity = {"budget_bits": budget, "schedule": {k: v for k, v in asdict(schedule).items() if k != "generations"},
                "seeds": {n: list(c) for n, c in seeds.items()}, **(identity or {})}
    start = time.perf_counter()
    state = None
    if resume and state_path is not None and state_path.is_file():
        state = read_json(state_path, 1 << 28, "search state", CheckpointError)
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
            raise SearchError(f"{state_path} is not a search state this tensorpress reads")
        if state.get("identity") != json.loads(json.dumps(identity)):
            raise SearchError(f"{state_path} is the state of another search (budget, menu, levels or schedule differ); "
                              "run without --resume or give another output directory")
    if state is None:
        for name, choice in seeds.items():
            if sum(costs[k][lv] for k, lv in enumerate(choice)) > budget:
                raise SearchError(f"seed {name} exceeds the budget")
        rng = random.Random(schedule.seed)
        names = list(seeds)
        scores = executor.score([seeds[n] for n in names], pool, keep=True)
        seed_fitness = {n: _mean(s) for n, s in zip(names, scores)}
        best = min(names, key=lambda n: seed_fitness[n])
        parent, parent_kl = tuple(seeds[best]), scores[names.index(best)]
        executor.adopt(parent)
        log: list[dict[str, Any]] = []
        evaluations = len(names) * len(pool)
        done, seed_name = 0, best
        if state_path is not None:
            _write_state(state_path, _state(identity, 0, parent, parent_kl, rng, seed_fitness, seed_name, log, evaluations))
    else:
        rng = random.Random()
        version, internal, gauss = state["rng"]
        rng.setstate((version, tuple(internal), gauss))
        seed_fitness, seed_name = state["seeds"], state["seed_name"]
        log, evaluations, done = state["log"], state["evaluations"], state["generation"]
        parent = tuple(state["parent"])
        parent_kl = executor.score([parent], pool, keep=True)[0]  # the parent's hidden states, recomputed
        executor.adopt(parent)
        if abs(_mean(parent_kl) - state["fitness"]) > 1e-9 * max(1.0, state["fitness"]):
            raise SearchError(f"{state_path}: the parent scores {_mean(parent_kl)!r} now, {state['fitness']!r} when "
                              "saved (other levels or reference); start the search again without --resume")
    for generation in track(range(done, schedule.generations), f"searching ({schedule.offspring} children a generation)"):
        t0 = time.perf_counter()
        children: list[Choice] = []
        tries = 0
        while len(children) < schedule.offspring and tries < 20 * schedule.offspring:
            tries += 1
            child = mutate(parent, costs, budget, rng)
            if child != parent and child not in children:
                children.append(child)
        candidates = children
        for windows, survivors in schedule.stages:
            picked = sorted(rng.sample(pool, windows))
            scores = executor.score(candidates, picked)
            evaluations += len(candidates) * windows
            order = sorted(range(len(candidates)), key=lambda i: (_mean(scores[i]), i))
            candidates = [candidates[i] for i in order[:survivors]]
        final = executor.score(candidates, pool, keep=True) if candidates else []
        evaluations += len(candidates) * len(pool)
        best = min(range(len(candidates)), key=lambda i: (_mean(final[i]), i)) if candidates else None
        accepted = best is not None and _mean(final[best]) < _mean(parent_kl)
        if accepted:
            parent, parent_kl = candidates[best], final[best]
            executor.adopt(parent)
        entry = {"generation": generation + 1, "fitness": _mean(parent_kl), "accepted": accepted,
                 "best_child": _mean(final[best]) if best is not None else None, "children": len(children),
                 "evaluations": evaluations, "seconds": time.perf_counter() - t0}
        log.append(entry)
        if state_path is not None:
            _write_state(state_path, _state(identity, generation + 1, parent, parent_kl, rng, seed_fitness, seed_name,
                                            log, evaluations))
        if on_generation:
            on_generation(entry)
    return Outcome(parent, _mean(parent_kl), seed_fitness, seed_name, log, evaluations, time.perf_counter() - start)
