"""The cheap allocation: one option per item under a budget, greedily by error saved per cost.

Every item (a layer, a block) has options ``{option: (error, cost)}``; the allocation starts
each item at its cheapest option and repeatedly takes the single upgrade (an item's next more
expensive option) that removes the most error per unit of extra cost, skipping upgrades that no
longer fit, until none does. It resolves ``target_bits`` (GPTQ/RTN widths or llama.cpp types),
SVD-LLM's ``target_reduction`` (ranks) and seeds the evolutionary search.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable, Mapping

Options = Mapping[Hashable, tuple[float, float]]


def greedy_choice(costs: Mapping[Hashable, Options], budget: float) -> dict[Hashable, Hashable]:
    """``{item: option}`` with total cost at most ``budget`` (``ValueError`` when even the
    cheapest options exceed it). Equal gains go to the item given first."""
    items = list(costs)
    ladders = [sorted(costs[n], key=lambda k, o=costs[n]: o[k][1]) for n in items]
    at = [0] * len(items)  # position of each item's choice on its ladder
    spent = sum(costs[n][ladders[i][0]][1] for i, n in enumerate(items))
    if spent > budget:
        raise ValueError(f"the budget ({budget:.6g}) is below the cheapest choice for every item ({spent:.6g})")

    def upgrade(i: int) -> tuple[float, int, int, float] | None:
        options, ladder = costs[items[i]], ladders[i]
        here = options[ladder[at[i]]]
        step = next((j for j in range(at[i] + 1, len(ladder)) if options[ladder[j]][1] > here[1]), None)
        if step is None:
            return None
        extra = options[ladder[step]][1] - here[1]
        return (-(here[0] - options[ladder[step]][0]) / extra, i, step, extra)

    heap = [u for i in range(len(items)) if (u := upgrade(i)) is not None]
    heapq.heapify(heap)
    while heap:
        _, i, step, extra = heapq.heappop(heap)
        if spent + extra > budget:
            continue  # never fits again: the spending only grows
        spent += extra
        at[i] = step
        nxt = upgrade(i)
        if nxt is not None:
            heapq.heappush(heap, nxt)
    return {n: ladders[i][at[i]] for i, n in enumerate(items)}
