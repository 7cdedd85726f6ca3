"""Statistics for a mixture-of-experts block's experts.

A hook on an expert's linear sees the tokens the router sent to that expert (``models/experts``),
so each expert's statistics are its routed tokens' without more work. An expert that received
fewer than the recipe's ``experts.min_tokens`` (default 1: no token at all; ``None``: its input
width, below which ``XᵀX`` is singular) is *starved*; ``experts.few_tokens`` says what it gets
instead:

* ``weighted`` (default): statistics over *all* calibration tokens, each weighted by the
  router's probability for this expert (softmax of its logits): the inputs it would see if it
  were chosen in proportion to how much the router likes it. For ``down_proj`` the inputs are
  ``act(gate(x)) * up(x)`` of every token, weighted the same way.
* ``rtn``: the stage's grid by round-to-nearest (no statistics), with a warning naming the expert
  and its token count; only for quantizer stages.

Counting runs one pass of the block (with a hook on the router) per stage that needs statistics;
the weighted statistics one more, only when an expert is starved.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tensorpress.engine.capture import run_block
from tensorpress.engine.linears import in_features
from tensorpress.engine.stats import InputStats
from tensorpress.errors import RecipeError
from tensorpress.methods import METHODS
from tensorpress.methods.quant.rtn import QuantSettings
from tensorpress.models.experts import ExpertLinears, RouterLinear
from tensorpress.recipe import ExpertPolicy

log = logging.getLogger(__name__)


def moe_modules(block: nn.Module, adapter: Any) -> tuple[RouterLinear, ExpertLinears]:
    moe = block.get_submodule(adapter.moe.block)
    return moe.get_submodule(adapter.moe.router), moe.get_submodule(adapter.moe.experts)


def _run_hooked(block: nn.Module, calls: list, handle: Any) -> None:
    """Run ``block`` on every call (outputs discarded), then remove the hook ``handle``."""
    try:
        run_block(block, calls)
    finally:
        handle.remove()


def routed_tokens(block: nn.Module, adapter: Any, calls: list) -> list[int]:
    """How many calibration tokens the router sends to each expert of ``block``."""
    router, experts = moe_modules(block, adapter)
    counts = torch.zeros(len(experts), dtype=torch.long)

    def count(module: nn.Module, args: Any, out: Any) -> None:
        counts.add_(torch.bincount(out[2].reshape(-1).cpu(), minlength=len(experts))[: len(experts)])

    _run_hooked(block, calls, router.register_forward_hook(count))
    return counts.tolist()


def weighted_stats(block: nn.Module, adapter: Any, calls: list, starved: list[int], needs: frozenset[str]) -> dict[int, tuple[InputStats, InputStats]]:
    """For each starved expert, the statistics of its gate/up input and of its down_proj input
    over every token, weighted by the router's probability of that expert."""
    router, experts = moe_modules(block, adapter)
    out: dict[int, tuple[InputStats, InputStats]] = {}
    for e in starved:
        expert = experts[e]
        device = expert.gate_proj.weight.device
        out[e] = (InputStats(in_features(expert.gate_proj), needs, device),
                  InputStats(in_features(expert.down_proj), needs, device))

    def gather(module: nn.Module, args: Any) -> None:
        x = args[0].reshape(-1, args[0].shape[-1])
        probs = torch.softmax(nn.functional.linear(x, router.proj.weight).float(), dim=-1)
        for e, (inputs, mids) in out.items():
            expert = experts[e]
            inputs.update(x, probs[:, e])
            mids.update(experts.act_fn(expert.gate_proj(x)) * expert.up_proj(x), probs[:, e])

    _run_hooked(block, calls, router.register_forward_pre_hook(gather))
    return out


@dataclass
class ExpertPlan:
    """One block's starved experts under one stage: substitute statistics or a fallback stage."""

    adapter: Any
    tokens: list[int]
    starved: dict[int, int] = field(default_factory=dict)  # expert -> routed tokens
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)  # linear (relative) -> substitute statistics
    fallback: Any = None  # the RTN stage for starved experts (policy rtn)

    def stats_for(self, rel: str, stats: dict[str, Any]) -> dict[str, Any]:
        return self.stats.get(rel, stats)

    def stage_for(self, rel: str, stage: Any) -> Any:
        e = self.adapter.expert_of(rel)
        return self.fallback if self.fallback is not None and e in self.starved else stage


def plan_experts(block: nn.Module, block_name: str, adapter: Any, calls: list, stage: Any, rels: list[str],
                 policy: ExpertPolicy, index: int) -> ExpertPlan | None:
    """Count the tokens routed to each expert of ``block`` whose linears ``stage`` compresses and
    decide for the starved ones; None when the block has no experts among ``rels``."""
    experts_hit = {adapter.expert_of(r) for r in rels} - {None}
    if not experts_hit or not calls:
        return None
    _, experts = moe_modules(block, adapter)
    tokens = routed_tokens(block, adapter, calls)
    plan = ExpertPlan(adapter, tokens)
    for e in sorted(experts_hit):
        need = policy.min_tokens if policy.min_tokens is not None else in_features(experts[e].gate_proj)
        if tokens[e] < need:
            plan.starved[e] = tokens[e]
    if not plan.starved:
        return plan
    names = ", ".join(f"{block_name}.{adapter.moe.block}.{adapter.moe.experts}.{e} ({n} tokens)" for e, n in plan.starved.items())
    if policy.few_tokens == "rtn":
        plan.fallback = rtn_fallback(stage, index)
        log.warning("stage %d (%s): experts with too few calibration tokens are rounded to nearest instead: %s",
                    index + 1, stage.name, names)
        return plan
    log.info("stage %d (%s): experts with too few calibration tokens get all tokens weighted by router probability: %s",
             index + 1, stage.name, names)
    prefix = f"{adapter.moe.block}.{adapter.moe.experts}"
    for e, (inputs, mids) in weighted_stats(block, adapter, calls, sorted(plan.starved), stage.needs).items():
        plan.stats[f"{prefix}.{e}.gate_proj"] = plan.stats[f"{prefix}.{e}.up_proj"] = inputs.as_dict()
        plan.stats[f"{prefix}.{e}.down_proj"] = mids.as_dict()
    return plan


def rtn_fallback(stage: Any, index: int) -> Any:
    """The stage's grid without statistics: an ``rtn`` stage with its bits, groups and format."""
    keys = ("bits", "group_size", "symmetric", "format", "format_overrides", "bits_overrides", "mse", "targets", "ignore")
    if not isinstance(stage, QuantSettings) or getattr(stage, "bits", None) is None:
        raise RecipeError(f"stage {index + 1} ({stage.name}): experts.few_tokens 'rtn' needs a quantizer stage (it rounds "
                          "starved experts to the stage's grid); use few_tokens 'weighted'")
    rtn = METHODS["rtn"]
    return rtn.model_validate({"method": "rtn", **{k: getattr(stage, k) for k in keys if hasattr(stage, k) and k in rtn.model_fields}})
