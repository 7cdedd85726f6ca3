"""Depth search (EvoPress' block removal): which ``blocks`` decoder blocks to remove.

The candidates are one bit per block (kept or removed; the last block always stays, as in
``drop_blocks``), the budget the number of blocks kept, the fitness the same KL on calibration
windows as the per-layer search (a removed block passes its input on). Seeds: the blocks that
change the residual stream least (``drop_blocks``' angular-distance ranking) and the run of
blocks just before the last. The result is a ``drop_blocks`` recipe with the chosen
``indices``, an ordinary smaller model.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from tensorpress.data import TokenWindows
from tensorpress.engine.structural import BlockRunner
from tensorpress.errors import CalibrationError, SearchError
from tensorpress.methods.structural.depth import block_distances
from tensorpress.models import LoadedModel
from tensorpress.recipe import Recipe
from tensorpress.search.evolve import Outcome, Schedule, evolve
from tensorpress.search.executor import make_executor
from tensorpress.search.fitness import prepare

DEPTH_STATE_FILE = "depth-state.json"


def search_depth(lm: LoadedModel, blocks: int, calib: TokenWindows, *, schedule: Schedule | None = None, pool: int = 8,
                 samples: int = 32, workers: int | None = 0, ray_address: str | None = None,
                 state_dir: str | os.PathLike | None = None, resume: bool = False, on_generation=None) -> tuple[Recipe, Outcome, dict[str, float]]:
    """The ``drop_blocks`` recipe removing ``blocks`` blocks with the lowest KL on ``pool``
    calibration windows, the search's outcome and its timings."""
    schedule = schedule or Schedule()
    n = len(lm.adapter.blocks(lm.model))
    if not 1 <= blocks < n:
        raise SearchError(f"cannot remove {blocks} of the model's {n} blocks; accepted: 1 to {n - 1} (the last one stays)")
    if calib is None or len(calib.input_ids) < pool:
        raise CalibrationError(f"the depth search scores candidates on {pool} calibration windows; pass at least that many")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    distance = block_distances(BlockRunner(lm, lm.model, 8), calib.input_ids[:samples], 1)
    ranked = sorted(range(n - 1), key=lambda i: distance[i])
    seeds = {"angular distance": tuple(1 if i in ranked[:blocks] else 0 for i in range(n)),
             "last blocks": tuple(1 if n - 1 - blocks <= i < n - 1 else 0 for i in range(n))}
    costs = [[1, 0] for _ in range(n - 1)] + [[1]]  # blocks kept; the last block has no removed level
    pieces = prepare(lm, None, None, TokenWindows(calib.input_ids[:pool], calib.source, calib.seed))
    executor = make_executor(pieces, workers, ray_address)
    del pieces
    timings["prepare_seconds"] = time.perf_counter() - t0
    try:
        state = Path(state_dir) / DEPTH_STATE_FILE if state_dir is not None else None
        if state is not None:
            state.parent.mkdir(parents=True, exist_ok=True)
        outcome = evolve(executor, costs, n - blocks, seeds, schedule, state_path=state, resume=resume,
                         identity={"depth": blocks, "pool": pool}, on_generation=on_generation)
    finally:
        executor.close()
    timings["search_seconds"] = outcome.seconds
    drop = [i for i, c in enumerate(outcome.choice) if c == 1]
    recipe = Recipe(name=f"depth-search-{blocks}", description=f"the {blocks} blocks whose removal costs the least KL "
                    f"on {pool} calibration windows (evolutionary search)",
                    stages=[{"method": "drop_blocks", "blocks": blocks, "indices": drop, "samples": 1}])
    return recipe, outcome, timings
