"""Every built-in recipe, run end to end on tiny random models of the supported architectures.

Each case compresses, checks that something changed (the outputs; and the compressed linears or
the model's shapes) while the original stayed as it was, that the reported bits/weight is what
the parts and the reloaded checkpoint hold (exactly the grid's storage for plain quantizers),
saves, reloads with ``tp.load_compressed`` and asserts the reloaded outputs equal the in-memory
ones bit for bit.

Which cases run (all ~490 would not fit the time a test file may take on two busy cores):

* llama: every recipe of ``tp.recipes.builtin_names()``, so a new recipe is covered at once;
* the other architectures: every structural recipe (they depend most on the architecture), for
  each combination of methods (``rtn``; ``gptq`` then ``eora``; ...) the first recipe by name
  that applies to the architecture (rtn-w2g64 stands for rtn-w3g128, which differs only in its
  numbers), and every refusal of ``REFUSALS``. A recipe with a new method or a new combination
  of stages runs on every architecture without editing this file.

The models are wide enough for the recipes' real settings: a width of 128 and an FFN of 256 give
groups of 128 whole (and several per row of the FFN output), the ranks of EoRA (up to 32) stay
below the layers' break-even rank, and 7 blocks let ``drop-blocks-6`` remove six.

Where a recipe cannot apply to an architecture, the case asserts the typed error and its
message (``REFUSALS``, each with the reason); any other error fails the case.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import pytest
import torch
import transformers as T

import tensorpress as tp
from conftest import ALL_ARCHS, MOE_ARCHS, make_tokenizer, tiny_config
from tensorpress.errors import RecipeError, TensorpressError
from tensorpress.methods.base import matches
from tensorpress.eval.size import size_report
from tensorpress.methods.structural import is_structural
from tensorpress.models import LoadedModel, adapter_for
from tensorpress.models.adapters import ROUTER_ROLES
from tensorpress.parts import CompressedLinear

WIDTH, FFN, DEPTH = 128, 256, 7
_SIZE_KEYS = {"gpt2": ("n_embd", "n_inner", "n_layer"), "opt": ("hidden_size", "ffn_dim", "num_hidden_layers")}
_UNIFORM_QUANTIZERS = {"rtn", "gptq", "awq"}  # parts whose storage is exactly the grid's

# SliceGPT's rotation needs pre-norm RMSNorm blocks with plain norm weights: the Llama family and Phi-3
NO_SLICEGPT = tuple(a for a in ALL_ARCHS if adapter_for(a).family not in ("llama", "phi3"))

# (recipes, architectures, error, text its message must hold): each with why it cannot apply
REFUSALS: list[tuple[tuple[str, ...], tuple[str, ...], type[TensorpressError], str]] = [
    # the rotation commutes with RMSNorm only (LayerNorm subtracts the mean; BERT normalises
    # after the residual sum); Gemma's (1 + w) norms, scaled embeddings and post-branch norms
    (("slicegpt-10", "slicegpt-20", "slicegpt-25"), NO_SLICEGPT, RecipeError, "slicegpt does not apply to"),
    # removing whole KV groups needs separate q/k/v (gpt2, gpt_neox and phi3 fuse them) ...
    (("prune-heads-33",), ("gpt2", "gpt_neox", "phi3"), RecipeError, "prune_heads needs separate q, k and v projections"),
    # ... and head counts the model reads from its config (OPT and BERT derive the head width,
    # OLMo 2's and OLMoE's q/k norms span all heads, Cohere's and StableLM's optional ones hold a row per head)
    (("prune-heads-33",), ("opt", "bert", "olmo2", "olmoe", "cohere", "stablelm"), RecipeError,
     "cannot lose whole heads by a config change"),
    # a channel of one expert is not a channel of another
    (("prune-ffn-10", "prune-ffn-20", "prune-ffn-30"), tuple(MOE_ARCHS), RecipeError, "its FFN is a mixture of experts"),
    # a bridge takes no cache layer, and the cache's layer kinds go by position: not for models
    # that mix sliding-window and global layers
    (("drop-blocks-2-linear", "drop-blocks-4-linear", "drop-blocks-6-linear"), ("gemma2", "gemma3_text"), RecipeError,
     "replace 'linear' needs one attention kind in every layer"),
    # the Fisher sensitivity is the gradient of the next-token loss, which an encoder has not
    (("gptq-mixed-2.5", "gptq-mixed-3.5", "svd-llm-budget-p10", "svd-llm-budget-p20", "svd-llm-budget-p30"), ("bert",),
     RecipeError, "sensitivity 'fisher' needs a causal language model's loss"),
    # a bare encoder (BertModel) has no LM head for the second stage to select
    (("rtn-w4g128-head8",), ("bert",), RecipeError, "targets ['lm_head'] minus ignore"),
]
REFUSED = {(name, arch): (error, text) for names, archs, error, text in REFUSALS for name in names for arch in archs}


def wide_config(arch: str):
    """conftest's tiny config of ``arch`` at WIDTH x FFN x DEPTH, rebuilt so that derived fields
    (``layer_types``) follow the depth."""
    base = tiny_config(arch)
    settings = base.to_dict()
    settings.pop("layer_types", None)
    settings.update(zip(_SIZE_KEYS.get(arch, ("hidden_size", "intermediate_size", "num_hidden_layers")), (WIDTH, FFN, DEPTH)))
    if arch == "opt":
        settings["word_embed_proj_dim"] = WIDTH
    if arch == "qwen3":
        settings["head_dim"] = WIDTH // 4
    return type(base)(**settings)


def _cases() -> list[tuple[str, str]]:
    names = tp.recipes.builtin_names()
    recipes = {name: tp.recipes.get(name) for name in names}
    structural = {n for n in names if any(is_structural(s) for s in recipes[n].stages)}
    cases = []
    for arch in ALL_ARCHS:
        chosen: dict[tuple[str, ...], str] = {}  # methods of the stages -> the first recipe that applies
        for name in names:
            if (name, arch) not in REFUSED:
                chosen.setdefault(tuple(s.method for s in recipes[name].stages), name)
        cases += [(name, arch) for name in names
                  if arch == "llama" or name in structural or name in chosen.values() or (name, arch) in REFUSED]
    return cases


@dataclass
class Subject:
    lm: LoadedModel
    calib: tp.data.TokenWindows
    ids: torch.Tensor
    reference: torch.Tensor  # the uncompressed model's outputs on ids


def outputs(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These matrices are too small for two threads to pay, on two cores shared with others."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def subjects(text_path):
    """One model per architecture for the whole file (compress works on a copy)."""
    cache: dict[str, Subject] = {}

    def get(arch: str) -> Subject:
        if arch not in cache:
            config = wide_config(arch)
            torch.manual_seed(0)
            model = (T.AutoModel if arch == "bert" else T.AutoModelForCausalLM).from_config(config).eval()
            lm = LoadedModel(model, make_tokenizer("encoder" if arch == "bert" else "causal"),
                             adapter_for(config.model_type), f"tiny-{arch}-{WIDTH}")
            calib = tp.data.calibration(lm, source=text_path, samples=4, seq_len=32, seed=0)
            ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
            cache[arch] = Subject(lm, calib, ids, outputs(lm.model, ids))
        return cache[arch]

    return get


# llama.cpp's bits per weight of the block formats (ggml-common.h: bytes * 8 / weights per block)
# and its fallback for rows that are not a multiple of 256
_FORMAT_BPW = {"q4_0": 4.5, "q4_1": 5.0, "q5_0": 5.5, "q5_1": 6.0, "q8_0": 8.5, "iq4_nl": 4.5,
               "q2_k": 2.625, "q3_k": 3.4375, "q4_k": 4.5, "q5_k": 5.5, "q6_k": 6.5625}
_FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}


def grid_bits(stage, shape: tuple[int, int], name: str = "") -> int:
    """Storage of a uniform quantization grid: codes, a float16 scale per group, zeros if
    asymmetric; for a llama.cpp format (the layer's override, as a resolved file_type gives
    them), its bits per weight (its fallback's off the 256 grid)."""
    out_f, in_f = shape
    if getattr(stage, "format", None) is not None:
        chosen = next((f for p, f in stage.format_overrides.items() if matches(name, [p])), stage.format)
        fmt = chosen if in_f % 256 == 0 or chosen not in _FALLBACK else _FALLBACK[chosen]
        return round(out_f * in_f * _FORMAT_BPW[fmt])
    groups = 1 if stage.group_size is None else math.ceil(in_f / stage.group_size)
    return out_f * in_f * stage.bits + out_f * groups * (16 + (0 if stage.symmetric else stage.bits))


def check_bits(recipe: tp.Recipe, result: tp.CompressionResult, reloaded: LoadedModel) -> None:
    """The reported bits/weight is what the parts hold, in memory and after reloading; at most a
    stage's ``target_bits`` (and close to it); for plain quantizers, exactly the grid's storage
    (a following lossless stage may only lower it)."""
    in_memory, again = size_report(result.model.model), size_report(reloaded.model)
    assert in_memory.linear_bits == again.linear_bits == sum(r.weight_bits for r in result.layers.values())
    assert in_memory.linear_weights == again.linear_weights == sum(r.numel for r in result.layers.values())
    assert result.bits_per_weight == in_memory.bits_per_weight_linears
    assert 0 < result.bits_per_weight < 32  # below the float32 weights it replaces
    for stage in recipe.stages:
        if getattr(stage, "target_bits", None) is not None:
            assert stage.target_bits - 0.1 <= result.bits_per_weight <= stage.target_bits
    stages = result.recipe.stages
    methods = {s.method for s in stages}
    if not methods <= _UNIFORM_QUANTIZERS | {"lossless"} or any(getattr(s, "bits_overrides", None) for s in stages):
        return
    for name, report in result.layers.items():
        quantizer = [s for s in stages if s.method != "lossless" and s.selects(name)][-1]
        expected = grid_bits(quantizer, report.shape, name)
        if "lossless" in methods:
            assert report.weight_bits <= expected, name
        else:
            assert report.weight_bits == expected, name


def check_changed(subject: Subject, result: tp.CompressionResult, out: torch.Tensor) -> None:
    """Not a no-op: the outputs moved, and the recipe's linears were replaced or the model reshaped;
    the original model is untouched."""
    assert torch.isfinite(out).all()
    assert not torch.equal(out, subject.reference)
    assert torch.equal(outputs(subject.lm.model, subject.ids), subject.reference)
    model = result.model.model
    stages = result.recipe.stages
    if all(is_structural(s) for s in stages):
        assert not result.layers and result.model.info["structure"]
        before = {k: v.shape for k, v in subject.lm.model.state_dict().items()}
        assert {k: v.shape for k, v in model.state_dict().items()} != before
        return
    compressed = {n for n, m in model.named_modules() if isinstance(m, CompressedLinear)}
    assert set(result.layers) == compressed
    prefix = result.model.adapter.blocks_path(model)
    blocks = result.model.adapter.blocks(model)
    routers = set(result.model.adapter.linears_with(*ROUTER_ROLES))  # kept unless a targets pattern names them
    wanted = {f"{prefix}.{i}.{rel}" for i in range(len(blocks)) for rel in result.model.adapter.block_linears()
              if rel not in routers}
    for stage in stages:
        if not is_structural(stage):
            assert {n for n in wanted if stage.selects(n)} <= compressed, stage.name


@pytest.mark.parametrize(("name", "arch"), _cases())
def test_builtin_recipe_compresses_saves_and_reloads(subjects, tmp_path, name, arch):
    subject = subjects(arch)
    recipe = tp.recipes.get(name)
    if (name, arch) in REFUSED:
        error, text = REFUSED[(name, arch)]
        with pytest.raises(error, match=re.escape(text)):
            tp.compress(subject.lm, recipe, subject.calib, batch_size=2)
        return
    result = tp.compress(subject.lm, recipe, subject.calib, batch_size=2)
    out = outputs(result.model.model, subject.ids)
    check_changed(subject, result, out)
    result.save(tmp_path / "ckpt")
    reloaded = tp.load_compressed(tmp_path / "ckpt")
    assert torch.equal(outputs(reloaded.model, subject.ids), out)
    if result.layers:
        check_bits(recipe, result, reloaded)


def test_refusals_name_builtin_recipes_and_supported_architectures():
    """A stale entry (a renamed recipe) would silently stop testing its refusal."""
    names = set(tp.recipes.builtin_names())
    assert {name for name, _ in REFUSED} <= names
    assert {arch for _, arch in REFUSED} <= set(ALL_ARCHS)
    assert set(REFUSED) <= set(_cases())
