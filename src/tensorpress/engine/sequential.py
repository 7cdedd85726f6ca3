"""The sequential (block-by-block) compression engine, for every architecture alike.

For each block, in order: (1) its inputs are the previous block's outputs (the first block's
are captured from the embeddings); (2) for each recipe stage that needs statistics, hooks on
the stage's linears accumulate them while the block runs on the calibration windows; (3) the
stage's method replaces each selected linear by a ``CompressedLinear``; (4) the compressed block
is run again to produce the next block's inputs. Peak memory is one block plus the calibration
activations. A recipe whose methods need no statistics skips calibration altogether.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from tensorpress.data import TokenWindows, check_context
from tensorpress.engine.capture import capture_block_inputs, device_of, run_block
from tensorpress.engine.checks import (
    check_finite,
    check_patterns,
    check_stats_finite,
    check_weights_finite,
)
from tensorpress.engine.experts import ExpertPlan, plan_experts
from tensorpress.engine.folding import can_fold_into, fold_scale
from tensorpress.engine.linears import bias_of, in_features, is_linear, weight_of
from tensorpress.engine.lockstep import BlockCall, lockstep_pass
from tensorpress.engine.result import CompressionResult, LayerReport, layer_errors
from tensorpress.engine.stats import StatsHooks
from tensorpress.engine.structural import BlockRunner
from tensorpress.errors import CalibrationError, RecipeError
from tensorpress.methods import LayerInput, MethodConfig
from tensorpress.methods.base import matches
from tensorpress.methods.quant.file_types import BASE as FILE_TYPE_BASE
from tensorpress.methods.quant.file_types import tensor_format
from tensorpress.methods.quant.mixed import fisher_diagonals
from tensorpress.methods.structural import is_structural
from tensorpress.methods.structural.depth import LinearBridge, bridge_indices
from tensorpress.models import LoadedModel
from tensorpress.models.adapters import ROUTER_ROLES
from tensorpress.parts import CompressedEmbedding, CompressedLinear, TiedHead
from tensorpress.parts.linear import dense_weights_cached, embed_scale_of
from tensorpress.progress import track
from tensorpress.recipe import Recipe, RecipeLike, resolve

log = logging.getLogger(__name__)

# resolves a recipe's cross-layer allocations on the (structurally transformed) model
Allocator = Callable[[LoadedModel, nn.Module, Recipe, "TokenWindows | None", int], Recipe]



@contextlib.contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - start


def stage_linears(lm: LoadedModel, block: nn.Module, block_name: str, stage: MethodConfig) -> list[str]:
    """Names (relative to the block) of the block's linears that ``stage`` selects (none in a
    linear bridge, which stays as fitted). A mixture-of-experts router is taken only by a
    targets pattern that names it: it is small, and every token's path depends on it."""
    if isinstance(block, LinearBridge):
        return []
    return [
        rel
        for rel in lm.adapter.block_linears()
        if is_linear(block.get_submodule(rel))
        and (_selects_table if lm.adapter.role_of(rel) in ROUTER_ROLES else MethodConfig.selects)(stage, f"{block_name}.{rel}")
    ]


def _head(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The LM head (``get_output_embeddings``) as ``(name, module)``, if the model has a linear one."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    if head is None or not is_linear(head):
        return None
    name = next((n for n, m in model.named_modules() if m is head), None)
    return None if name is None else (name, head)


def _embeddings(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The input embeddings (``get_input_embeddings``) as ``(name, module)``, if a plain table."""
    get = getattr(model, "get_input_embeddings", None)
    table = get() if get is not None else None
    if not isinstance(table, nn.Embedding):
        return None
    name = next((n for n, m in model.named_modules() if m is table), None)
    return None if name is None else (name, table)


def _outside(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers outside the blocks a stage may select: the LM head and the input embeddings."""
    return [found for found in (_head(model), _embeddings(model)) if found is not None]


def _tied(head: tuple[str, nn.Module] | None, table: tuple[str, nn.Module] | None) -> bool:
    return head is not None and table is not None and getattr(head[1], "weight", None) is table[1].weight


def _resolve_file_types(lm: LoadedModel, model: nn.Module, recipe: Recipe, head: tuple[str, nn.Module] | None,
                        table: tuple[str, nn.Module] | None) -> Recipe:
    """Replace each stage's ``file_type`` by the per-tensor formats llama.cpp's quantizer gives
    the tensors it selects (``file_types.tensor_format``: by the adapter's role, block index,
    row width, and for the embeddings and head whether they are tied)."""
    if not any(getattr(s, "file_type", None) for s in recipe.stages):
        return recipe
    prefix = lm.adapter.blocks_path(model)
    blocks = lm.adapter.blocks(model)
    config = model.config.get_text_config()
    heads = getattr(config, "num_attention_heads", 1) or 1
    n_gqa = heads // (getattr(config, "num_key_value_heads", None) or heads)
    stages = list(recipe.stages)
    for index, stage in enumerate(stages):
        file_type = getattr(stage, "file_type", None)
        if file_type is None:
            continue
        overrides: dict[str, str] = {}
        for i, block in enumerate(blocks):
            for rel in stage_linears(lm, block, f"{prefix}.{i}", stage):
                role = lm.adapter.role_of(rel)
                if role is None:
                    raise RecipeError(f"stage {index + 1} ({stage.name}): file_type needs each linear's role, and the "
                                      f"{lm.adapter.family} adapter gives {rel!r} none; use format instead")
                width = in_features(block.get_submodule(rel))
                overrides[f"re:{re.escape(f'{prefix}.{i}.{rel}')}"] = tensor_format(
                    file_type, role, i, len(blocks), in_features=width, n_gqa=n_gqa)
        for found, role, selects in ((head, "output", MethodConfig.selects), (table, "token_embd", _selects_table)):
            if found is not None and selects(stage, found[0]):
                overrides[f"re:{re.escape(found[0])}"] = tensor_format(
                    file_type, role, None, len(blocks), in_features=found[1].weight.shape[1], tied=_tied(head, table))
        stages[index] = stage.model_copy(update={"file_type": None, "format": FILE_TYPE_BASE[file_type],
                                                 "format_overrides": overrides})
        log.info("stage %d (%s): file_type %s gives %s", index + 1, stage.name, file_type,
                 dict(sorted(Counter(overrides.values()).items())))
    return recipe.model_copy(update={"stages": stages})


def _selects_table(stage: MethodConfig, name: str) -> bool:
    """The input embeddings (and routers) are taken only by a targets pattern that names them,
    not by the default ``*`` (all linears), whatever the ignore list says."""
    return stage.selects(name) and any(p != "*" and matches(name, [p]) for p in stage.targets)


def _head_stages(head: tuple[str, nn.Module] | None, recipe: Recipe, what: str = "LM head",
                 selects=MethodConfig.selects) -> list[MethodConfig]:
    """The stages that select the LM head, or the input embeddings (none by default:
    ``lm_head`` and ``re:.*embed.*`` are in the default ``ignore``, and the embeddings need a
    targets pattern of their own). Only methods that need no calibration statistics can take
    them: the engine gathers statistics for block linears only."""
    if head is None:
        return []
    chosen = [stage for stage in recipe.stages if selects(stage, head[0])]
    for stage in chosen:
        if stage.needs or stage.scales_inputs() or getattr(stage, "target_bits", None) is not None or stage.wants_allocation():
            raise RecipeError(
                f"stage {stage.name} selects the {what} {head[0]!r}, but it takes only methods that need no "
                "calibration statistics or allocation (e.g. rtn, nf4); add it to this stage's ignore and quantize it in a "
                "separate stage"
            )
    return chosen


def _compress_embeddings(
    model: nn.Module,
    table: tuple[str, nn.Module] | None,
    stages: list[MethodConfig],
    layers: dict[str, LayerReport],
    timings: dict[str, float],
) -> None:
    """Run ``stages`` on the input embeddings as on a linear of their ``(vocab, dim)`` weight
    (groups along each token's row, as llama.cpp quantizes ``token_embd``) and put a
    ``CompressedEmbedding`` of the result in their place. A head still tied to them becomes a
    ``TiedHead`` reading the same parts: one quantized table, as in a tied GGUF file."""
    if table is None or not stages:
        return
    name, module = table
    head = _head(model)
    tied = _tied(head, table)
    holder = nn.Module()
    holder.table = nn.Linear(module.embedding_dim, module.num_embeddings, bias=False)
    holder.table.weight = module.weight
    with _timed(timings, "methods_seconds"):
        for stage in stages:
            _apply_stage(holder, "table", name, stage, {}, {}, layers)
    compressed = CompressedEmbedding(list(holder.table.parts), module.padding_idx, module.weight.dtype,
                                     embed_scale_of(module))
    model.set_submodule(name, compressed)
    if tied:
        model.set_submodule(head[0], TiedHead(compressed))


def _compress_head(
    model: nn.Module,
    head: tuple[str, nn.Module] | None,
    stages: list[MethodConfig],
    layers: dict[str, LayerReport],
    timings: dict[str, float],
) -> None:
    """Run ``stages`` on the LM head. A head tied to the input embeddings is untied first: the
    embeddings keep the original matrix (a lookup table), the head gets the compressed copy, and
    the config says so (``tie_word_embeddings = False``) so that saved checkpoints reload untied."""
    if head is None or not stages:
        return
    name, module = head
    embeddings = model.get_input_embeddings()
    if embeddings is not None and getattr(module, "weight", None) is embeddings.weight:
        for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
            config.tie_word_embeddings = False
    originals: dict[str, torch.Tensor] = {}
    with _timed(timings, "methods_seconds"):
        for stage in stages:
            _apply_stage(model, name, name, stage, {}, originals, layers)


def compress(
    lm: LoadedModel,
    recipe: RecipeLike,
    calib: TokenWindows | None = None,
    *,
    batch_size: int = 8,
    inplace: bool = False,
    allocate: Allocator | None = None,
) -> CompressionResult:
    """Compress ``lm`` with ``recipe`` (a ``Recipe``, a built-in name, a YAML path or a dict with
    ``stages``: ``tp.recipes.resolve``); the original is left untouched unless ``inplace``.
    Stages that allocate across layers (``target_bits``, SVD-LLM's ``target_reduction``, OWL)
    are resolved by ``allocate(lm, model, recipe, calib, batch_size) -> recipe``, the allocation
    layer's (``tensorpress.search.allocate``; ``tp.compress`` passes it)."""
    start = time.perf_counter()
    recipe = resolve(recipe)
    if calib is not None:
        check_context(lm.model, calib.seq_len, "calibration")
    check_weights_finite(lm, lm.model, recipe.stages, _outside(lm.model))  # before any pass, on the original
    model = lm.model if inplace else copy.deepcopy(lm.model)
    model.eval()
    full_recipe = recipe
    timings: dict[str, float] = {}
    leading = next((i for i, s in enumerate(recipe.stages) if not is_structural(s)), len(recipe.stages))
    if any(is_structural(s) for s in recipe.stages[leading:]):
        raise RecipeError("structural stages (drop_blocks, prune_ffn, prune_heads, slicegpt, trim_vocab) must come before every other stage of a recipe")
    structural = recipe.stages[:leading]
    if structural and calib is None:
        raise CalibrationError(f"methods {[s.name for s in structural]} need calibration data: pass calib=tp.data.calibration(...)")
    structure: list[dict[str, Any]] = []
    tokenizer = lm.tokenizer
    for stage in structural:
        if bridge_indices(lm.adapter.blocks(model)):
            raise RecipeError(f"stage {stage.name} follows drop_blocks with replace 'linear': the other structural methods "
                              "need every block whole; make that drop_blocks the last structural stage")
        with _timed(timings, "structural_seconds"):
            done = stage.transform(lm, model, calib, BlockRunner(lm, model, batch_size))
        tokenizer = done.pop("tokenizer", tokenizer)  # trim_vocab remaps the tokenizer
        structure.append({"method": stage.name, **done})
    recipe = recipe.model_copy(update={"stages": recipe.stages[leading:]})
    head = _head(model)
    table = _embeddings(model)
    check_patterns(lm, model, recipe.stages, _outside(model))
    recipe = _resolve_file_types(lm, model, recipe, head, table)
    head_stages = _head_stages(head, recipe)
    table_stages = _head_stages(table, recipe, "input embeddings", _selects_table)
    if _tied(head, table) and head_stages and [id(s) for s in head_stages] == [id(s) for s in table_stages]:
        head_stages = []  # one table, compressed once as the embeddings; the head reads it
    needs_calib = any(stage.needs for stage in recipe.stages)  # block statistics, not only allocation
    if needs_calib and calib is None:
        names = [s.name for s in recipe.stages if s.needs]
        raise CalibrationError(f"methods {names} need calibration data: pass calib=tp.data.calibration(...)")

    calls: list[BlockCall] = []
    allocates = any(getattr(stage, "target_bits", None) is not None or stage.wants_allocation() for stage in recipe.stages)
    if allocates:
        if allocate is None:
            names = [s.name for s in recipe.stages if getattr(s, "target_bits", None) is not None or s.wants_allocation()]
            raise RecipeError(f"stages {names} allocate across layers: compress with tensorpress.compress (the "
                              "allocation layer, tensorpress.search) rather than the engine alone")
        with _timed(timings, "allocation_seconds"):
            recipe = allocate(lm, model, recipe, calib, batch_size)
    if needs_calib:
        with _timed(timings, "capture_seconds"):
            calls = capture_block_inputs(lm, model, calib, batch_size)

    prefix = lm.adapter.blocks_path(model)
    blocks = lm.adapter.blocks(model)
    layers: dict[str, LayerReport] = {}
    expert_tokens: dict[str, list[int]] = {}  # block -> calibration tokens routed to each expert
    from_original = recipe.inputs == "original" and needs_calib
    for i, block in enumerate(track(blocks, f"compressing {len(blocks)} blocks")):
        originals: dict[str, torch.Tensor] = {}
        outputs: list[BlockCall] | None = None  # the block's outputs, if a pass produced them
        # inputs "original": statistics and the next block's inputs from the block as it was
        source = copy.deepcopy(block) if from_original else block
        cached: dict[str, dict[str, Any]] | None = None  # inputs "original": statistics of all stages
        for index, stage in enumerate(recipe.stages):
            rels = stage_linears(lm, block, f"{prefix}.{i}", stage)
            if not rels:
                continue
            outputs = None
            name = f"{prefix}.{i}"
            plan = None
            if stage.needs:
                with _timed(timings, "expert_routing_seconds"):
                    plan = plan_experts(block, name, lm.adapter, calls, stage, rels, recipe.experts, index)
                if plan is not None:
                    expert_tokens.setdefault(name, plan.tokens)
            if stage.needs and not stage.scales_inputs() and stage.sequential and not from_original:
                outputs = _true_sequential(lm, block, name, stage, rels, calls, originals, layers, timings, plan)
                continue
            stats: dict[str, dict[str, Any]] = {}
            if stage.needs and from_original and plan is None:
                # every stage's statistics come from the same original block and inputs: one
                # pass collects them for all stages (copies, so that no stage sees another's edits)
                if cached is None:
                    with _timed(timings, "statistics_seconds"):
                        cached = _original_stats(lm, block, f"{prefix}.{i}", recipe.stages, source, calls)
                stats = {r: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in cached[r].items()} for r in rels}
            elif stage.needs:
                shared = {r: lm.adapter.group_of(r) for r in rels}
                # the last group's outputs only feed the block's output, unused here
                last = [r for r in lm.adapter.linear_groups[-1] if is_linear(block.get_submodule(r))]
                with _timed(timings, "statistics_seconds"), StatsHooks(
                    source, rels, stage.needs, shared, skip=last
                ) as hooks, dense_weights_cached(source):
                    run_block(source, calls)
                stats = {r: s.as_dict() for r, s in hooks.stats.items()}
                if plan is not None:  # starved experts: statistics of all tokens, weighted
                    stats = {r: plan.stats_for(r, st) for r, st in stats.items()}
                for rel, st in stats.items():
                    check_stats_finite(f"{name}.{rel}", st)
            with _timed(timings, "methods_seconds"):
                if stage.scales_inputs():
                    _scale_groups(lm, block, name, stage, rels, stats, plan)
                by_input: dict[Any, list[str]] = {}  # linears reading the same input share statistics
                for rel in rels:
                    by_input.setdefault(lm.adapter.group_of(rel), []).append(rel)
                for members in by_input.values():
                    chosen = plan.stage_for(members[0], stage) if plan is not None else stage
                    _apply_shared(block, name, members, chosen, stats.get(members[0], {}), originals, layers)
        if needs_calib and i + 1 < len(blocks):
            if from_original:
                with _timed(timings, "propagate_seconds"):
                    calls = run_block(source, calls)
            elif outputs is not None:
                calls = outputs
            else:
                with _timed(timings, "propagate_seconds"), dense_weights_cached(block):
                    calls = run_block(block, calls)
    _compress_head(model, head, head_stages, layers, timings)
    _compress_embeddings(model, table, table_stages, layers, timings)
    timings["total_seconds"] = time.perf_counter() - start

    info = dict(
        lm.info,
        base_model=lm.info.get("base_model", lm.spec),
        recipe=recipe.name,
        compression_seconds=timings["total_seconds"],
    )
    if structure:
        info["structure"] = structure
    compressed = LoadedModel(model, tokenizer, lm.adapter, lm.spec, info)
    used = calib.describe() if calib is not None and (needs_calib or allocates or structural) else ""
    # the recipe as run: structural stages, then the others with their allocations resolved
    resolved = full_recipe.model_copy(update={"stages": [*structural, *recipe.stages]})
    return CompressionResult(compressed, resolved, layers, timings, used, expert_tokens)


def _original_stats(lm: LoadedModel, block: nn.Module, name: str, stages: list[MethodConfig], source: nn.Module,
                    calls: list[BlockCall]) -> dict[str, dict[str, Any]]:
    """Statistics of every linear of ``block`` that a stage with needs selects, all the needs
    at once, from one pass of the original ``source`` block over ``calls``."""
    rels: list[str] = []
    needs: set[str] = set()
    for stage in stages:
        if stage.needs:
            picked = stage_linears(lm, block, name, stage)
            rels += [r for r in picked if r not in rels]
            needs |= set(stage.needs) if picked else set()
    shared = {r: lm.adapter.group_of(r) for r in rels}
    last = [r for r in lm.adapter.linear_groups[-1] if is_linear(block.get_submodule(r))]
    with StatsHooks(source, rels, frozenset(needs), shared, skip=last) as hooks, dense_weights_cached(source):
        run_block(source, calls)
    stats = {r: s.as_dict() for r, s in hooks.stats.items()}
    for rel, st in stats.items():
        check_stats_finite(f"{name}.{rel}", st)
    return stats


def _true_sequential(
    lm: LoadedModel,
    block: nn.Module,
    block_name: str,
    stage: MethodConfig,
    rels: list[str],
    calls: list[BlockCall],
    originals: dict[str, torch.Tensor],
    layers: dict[str, LayerReport],
    timings: dict[str, float],
    plan: ExpertPlan | None = None,
) -> list[BlockCall]:
    """Apply ``stage`` to the block's selected linears group by group in execution order, each
    group from statistics of inputs that already went through the compressed earlier groups;
    one lockstep pass over the calibration batches (``engine/lockstep.py``). Returns the
    compressed block's outputs."""
    groups: dict[int, list[str]] = {}
    for rel in rels:
        groups.setdefault(lm.adapter.group_of(rel), []).append(rel)
    spent = timings.get("methods_seconds", 0.0)

    def compress_group(members: list[str], stats: dict[str, Any]) -> None:
        chosen = stage
        if plan is not None:  # a starved expert: substitute statistics, or round to nearest
            stats, chosen = plan.stats_for(members[0], stats), plan.stage_for(members[0], stage)
        check_stats_finite(", ".join(f"{block_name}.{rel}" for rel in members), stats)
        with _timed(timings, "methods_seconds"):
            _apply_shared(block, block_name, members, chosen, stats, originals, layers)

    start = time.perf_counter()
    with dense_weights_cached(block):
        outputs = lockstep_pass(block, calls, groups, stage.needs, compress_group)
    passes = time.perf_counter() - start - (timings.get("methods_seconds", 0.0) - spent)
    timings["sequential_pass_seconds"] = timings.get("sequential_pass_seconds", 0.0) + passes
    return outputs


def whole_model_stats(
    lm: LoadedModel,
    model: nn.Module,
    per_block: dict[int, list[str]],
    needs: frozenset[str],
    windows: torch.Tensor,
    batch_size: int,
    label: str,
) -> dict[str, dict[str, Any]]:
    """Statistics of the named linears of every block (block index -> names relative to it),
    from the whole model (as it is) running on ``windows``; keyed by full module name."""
    prefix = lm.adapter.blocks_path(model)
    blocks = lm.adapter.blocks(model)
    with contextlib.ExitStack() as stack, torch.inference_mode():
        hooks = {
            i: stack.enter_context(StatsHooks(blocks[i], rels, needs, {r: lm.adapter.group_of(r) for r in rels}))
            for i, rels in per_block.items()
            if rels
        }
        for batch in track(list(windows.split(batch_size)), label):
            model(input_ids=batch.to(device_of(model)))
    stats = {f"{prefix}.{i}.{rel}": st.as_dict() for i, h in hooks.items() for rel, st in h.stats.items()}
    for name, st in stats.items():
        check_stats_finite(name, st)
    return stats


def fisher_importance(lm: LoadedModel, model: nn.Module, modules: dict[str, nn.Module], windows: torch.Tensor, who: str) -> dict[str, torch.Tensor]:
    """Diagonal Fisher information of the LM loss for each module's weight, (out, in)."""
    if not lm.causal:
        raise RecipeError(
            f"{who}: sensitivity 'fisher' needs a causal language model's loss; choose another "
            "sensitivity for this model"
        )
    importance = fisher_diagonals(model, {n: m.weight for n, m in modules.items()}, windows)
    # Conv1D keeps its weight as (in, out)
    return {n: f.T if isinstance(modules[n], Conv1D) else f for n, f in importance.items()}


def _scale_groups(
    lm: LoadedModel, block: nn.Module, block_name: str, stage: MethodConfig, rels: list[str], stats: dict[str, dict[str, Any]],
    plan: ExpertPlan | None = None,
) -> None:
    """Let ``stage`` choose a per-input-channel scale for each linear group whose input
    producer can absorb it, and fold it in exactly (``engine/folding.py``). All scales are
    chosen from the block as it was, then folded, before any linear is replaced."""
    selected = set(rels)
    chosen = []
    for gi, group in enumerate(lm.adapter.linear_groups):
        members = [r for r in group if is_linear(block.get_submodule(r))]
        producer_rel = lm.adapter.producer_of(gi)
        if not members or producer_rel is None or not selected.issuperset(members):
            continue
        if plan is not None and plan.stage_for(members[0], stage) is not stage:
            continue  # a starved expert rounded to nearest: no statistics to choose scales from
        modules = [block.get_submodule(r) for r in members]
        producer = block.get_submodule(producer_rel)
        if any(isinstance(m, CompressedLinear) for m in modules) or not can_fold_into(producer, in_features(modules[0])):
            continue
        inputs = [LayerInput(f"{block_name}.{r}", weight_of(m), weight_of(m), None, stats.get(r, {})) for r, m in zip(members, modules)]
        scale = stage.input_scales(inputs)
        if scale is not None:
            chosen.append((producer, modules, scale))
    for producer, modules, scale in chosen:
        fold_scale(producer, modules, scale, lm.adapter.norm_offset)


def _apply_shared(
    block: nn.Module,
    block_name: str,
    members: list[str],
    stage: MethodConfig,
    stats: dict[str, Any],
    originals: dict[str, torch.Tensor],
    layers: dict[str, LayerReport],
) -> None:
    """Apply ``stage`` to linears that read the same input (``stats`` is theirs), together when
    the method offers ``apply_shared`` for them, else one by one."""
    if len(members) < 2 or type(stage).apply_shared is MethodConfig.apply_shared:
        for rel in members:
            _apply_stage(block, rel, f"{block_name}.{rel}", stage, stats, originals, layers)
        return
    t = time.perf_counter()
    prepared = [_layer_input(block, rel, f"{block_name}.{rel}", stats, originals) for rel in members]
    shared = stage.apply_shared([layer for _, layer in prepared])
    if shared is None:  # not for these linears: one by one, from the inputs already built
        for rel, (module, layer) in zip(members, prepared, strict=True):
            start = time.perf_counter()
            _install(block, rel, module, layer, stage.apply(layer), layers, time.perf_counter() - start)
        return
    seconds = (time.perf_counter() - t) / len(members)  # one pass for all: its time split evenly
    for rel, (module, layer), parts in zip(members, prepared, shared, strict=True):
        _install(block, rel, module, layer, parts, layers, seconds)


def _layer_input(
    block: nn.Module, rel: str, full: str, stats: dict[str, Any], originals: dict[str, torch.Tensor]
) -> tuple[nn.Module, LayerInput]:
    """The linear ``rel`` of ``block`` and what a method sees of it (its weight checked finite)."""
    module = block.get_submodule(rel)
    weight = weight_of(module)
    check_finite(full, weight)
    current_parts = list(module.parts) if isinstance(module, CompressedLinear) else None
    return module, LayerInput(full, weight, originals.setdefault(rel, weight), current_parts, stats)


def _install(
    block: nn.Module,
    rel: str,
    module: nn.Module,
    layer: LayerInput,
    parts: list[Any],
    layers: dict[str, LayerReport],
    seconds: float,
) -> None:
    """Replace the linear ``rel`` of ``block`` by a ``CompressedLinear`` of ``parts`` and report it
    with its error against the weight before the recipe's first stage."""
    new = CompressedLinear(parts, bias_of(module)).to(layer.weight.device)
    block.set_submodule(rel, new)
    seconds += layers[layer.name].seconds if layer.name in layers else 0.0
    weight_error, output_error = layer_errors(layer.original, new.dense(), layer.stats.get("xtx"))
    layers[layer.name] = LayerReport(layer.name, tuple(layer.weight.shape), [p.describe() for p in parts],
                                     new.weight_nbits(), seconds, weight_error, output_error)


def _apply_stage(
    block: nn.Module,
    rel: str,
    full: str,
    stage: MethodConfig,
    stats: dict[str, Any],
    originals: dict[str, torch.Tensor],
    layers: dict[str, LayerReport],
) -> None:
    t = time.perf_counter()
    module, layer = _layer_input(block, rel, full, stats, originals)
    _install(block, rel, module, layer, stage.apply(layer), layers, time.perf_counter() - t)
