"""The allocation layer: per-layer, per-method choices under one budget.

``search`` (``run.py``) builds a level database of menu entries (``levels.py``), seeds from
uniform and greedy allocations (``greedy.py``) and runs EvoPress' evolutionary search
(``evolve.py``) with KL fitness (``fitness.py``) in-process or on Ray workers (``executor.py``);
``search_depth`` (``depth.py``) chooses the blocks to remove the same way; ``allocate.py``
resolves the recipes' own allocations (``target_bits``, ``target_reduction``, OWL).
"""

from tensorpress.search.budget import Budget, parse_budget
from tensorpress.search.depth import search_depth
from tensorpress.search.evolve import Schedule
from tensorpress.search.greedy import greedy_choice
from tensorpress.search.levels import LevelDB, build_levels, open_levels
from tensorpress.search.menu import (
    DEFAULT_MENU,
    GGUF_MENU,
    GPTQ_MENU,
    MENU_RECIPES,
    SPARSITY_MENU,
    parse_menu,
)
from tensorpress.search.run import SearchResult, mix_recipe, search

__all__ = ["DEFAULT_MENU", "GGUF_MENU", "GPTQ_MENU", "MENU_RECIPES", "SPARSITY_MENU", "Budget", "LevelDB", "Schedule", "SearchResult", "build_levels",
           "greedy_choice", "mix_recipe", "open_levels", "parse_budget", "parse_menu", "search", "search_depth"]
