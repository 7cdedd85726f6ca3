"""Mixture-of-experts models: experts as linears (split from and fused back into transformers'
3-D parameters), each expert's statistics from its routed tokens, the policy for experts few
tokens reach, routers kept unless named, and the per-expert report."""

from __future__ import annotations

import logging
from typing import ClassVar, Literal

import pytest
import torch
import transformers as T
from conftest import MOE_ARCHS, make_tokenizer, tiny_config, tiny_model

import tensorpress as tp
from tensorpress.errors import ExportError, RecipeError, UnsupportedArchitectureError
from tensorpress.io.export import export, export_hf
from tensorpress.methods import LayerInput, MethodConfig, register_method
from tensorpress.methods.quant.rtn import RTN
from tensorpress.models import LoadedModel, adapter_for
from tensorpress.models.experts import ExpertLinears, RouterLinear
from tensorpress.parts import CompressedLinear, DensePart


class _Recorder(MethodConfig):
    """Keeps weights dense and records the statistics each linear was handed."""

    name: ClassVar[str] = "test_record_expert_stats"
    needs: ClassVar[frozenset[str]] = frozenset({"xtx", "act_sq"})
    seen: ClassVar[dict] = {}
    method: Literal["test_record_expert_stats"] = "test_record_expert_stats"

    def apply(self, layer: LayerInput):
        _Recorder.seen[layer.name] = layer.stats
        return [DensePart(layer.weight)]


register_method(_Recorder)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_experts_become_linears_with_the_same_outputs_and_fuse_back(arch, tmp_path):
    torch.manual_seed(0)
    plain = T.AutoModelForCausalLM.from_config(tiny_config(arch)).eval()
    ids = torch.randint(3, 300, (2, 12))
    reference = _logits(plain, ids)
    keys = set(plain.state_dict())
    lm = LoadedModel(plain, make_tokenizer(), adapter_for(arch), "tiny")  # splits in place
    block = lm.adapter.blocks(lm.model)[0]
    assert isinstance(block.mlp.experts, ExpertLinears) and isinstance(block.mlp.gate, RouterLinear)
    assert len(block.mlp.experts) == lm.adapter.num_experts == 4
    torch.testing.assert_close(_logits(lm.model, ids), reference, rtol=1e-5, atol=1e-5)
    assert lm.adapter.bind(lm.model) is lm.adapter  # idempotent
    # compressed, exported dense: transformers' own fused layout, the compressed model's outputs
    result = tp.compress(lm, tp.Recipe(stages=[{"method": "rtn", "bits": 4, "group_size": 32}]))
    out = _logits(result.model.model, ids)
    export_hf(result.model, tmp_path / "hf")
    again = T.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert set(again.state_dict()) == keys
    torch.testing.assert_close(_logits(again, ids), out, rtol=1e-4, atol=1e-4)


def _forced(lm: LoadedModel, expert: int) -> None:
    """Every token of every block goes to ``expert`` alone (weight 1), whatever its logits."""
    def hook(module, args, out):
        logits = out[0]
        n = logits.shape[0]
        return logits, torch.ones(n, 1, dtype=logits.dtype), torch.full((n, 1), expert, dtype=torch.long)

    for block in lm.adapter.blocks(lm.model):
        block.mlp.gate.register_forward_hook(hook)


def _moe_inputs(lm: LoadedModel, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """The input of each block's MoE module (every token), from the model as it is."""
    seen: dict[int, list[torch.Tensor]] = {}
    handles = [block.mlp.gate.register_forward_pre_hook(
        lambda m, a, i=i: seen.setdefault(i, []).append(a[0].reshape(-1, a[0].shape[-1]).double()))
        for i, block in enumerate(lm.adapter.blocks(lm.model))]
    with torch.no_grad():
        lm.model(input_ids=ids)
    for h in handles:
        h.remove()
    return {i: torch.cat(x) for i, x in seen.items()}


def test_expert_statistics_are_those_of_the_tokens_routed_to_it():
    """A router forced to expert 2: its statistics are every token's; the others got none and,
    by default, get all tokens weighted by the router's probability of them."""
    config = tiny_config("mixtral")
    config.num_experts_per_tok = 1
    torch.manual_seed(0)
    lm = LoadedModel(T.AutoModelForCausalLM.from_config(config).eval(), make_tokenizer(), adapter_for("mixtral"), "tiny")
    _forced(lm, 2)
    calib = tp.data.TokenWindows(torch.randint(3, 300, (3, 32)), "random")  # 96 tokens: more than the 64 inputs
    x = _moe_inputs(lm, calib.input_ids)[0]  # block 0's inputs do not depend on the recipe
    _Recorder.seen.clear()
    result = tp.compress(lm, tp.Recipe(stages=[{"method": "test_record_expert_stats"}]), calib, batch_size=2)
    assert result.expert_tokens["model.layers.0"] == [0, 0, 96, 0] == result.expert_tokens["model.layers.1"]
    seen = _Recorder.seen
    expert = lm.adapter.blocks(lm.model)[0].mlp.experts[2]
    routed = seen["model.layers.0.mlp.experts.2.gate_proj"]
    assert routed["tokens"] == 96
    torch.testing.assert_close(routed["xtx"], x.T @ x, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        h = (torch.nn.functional.silu(expert.gate_proj(x.float())) * expert.up_proj(x.float())).double()
    torch.testing.assert_close(seen["model.layers.0.mlp.experts.2.down_proj"]["xtx"], h.T @ h, rtol=1e-4, atol=1e-4)
    # expert 0 was never chosen: all 96 tokens, each weighted by softmax(router logits)[0]
    probs = torch.softmax(x.float() @ lm.adapter.blocks(lm.model)[0].mlp.gate.proj.weight.T, dim=-1)[:, 0].double()
    starved = seen["model.layers.0.mlp.experts.0.gate_proj"]
    assert starved["tokens"] == pytest.approx(probs.sum().item(), rel=1e-5)
    torch.testing.assert_close(starved["xtx"], (x * probs[:, None]).T @ x, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(starved["act_sq"], (x.square() * probs[:, None]).sum(0), rtol=1e-4, atol=1e-4)


def test_starved_experts_round_to_nearest_when_asked_with_a_warning(caplog):
    config = tiny_config("qwen2_moe")
    config.num_experts_per_tok = 1
    torch.manual_seed(0)
    lm = LoadedModel(T.AutoModelForCausalLM.from_config(config).eval(), make_tokenizer(), adapter_for("qwen2_moe"), "tiny")
    _forced(lm, 1)
    calib = tp.data.TokenWindows(torch.randint(3, 300, (4, 32)), "random")
    recipe = tp.Recipe(stages=[{"method": "gptq", "bits": 4, "group_size": 32}], experts={"few_tokens": "rtn"})
    with caplog.at_level(logging.WARNING, logger="tensorpress"):
        result = tp.compress(lm, recipe, calib, batch_size=2)
    assert "model.layers.0.mlp.experts.0 (0 tokens)" in caplog.text and "rounded to nearest" in caplog.text
    block = result.model.adapter.blocks(result.model.model)[0]
    original = lm.adapter.blocks(lm.model)[0]
    rtn = RTN(bits=4, group_size=32)
    for e in (0, 2, 3):
        want = rtn.apply(LayerInput("w", original.mlp.experts[e].up_proj.weight, original.mlp.experts[e].up_proj.weight, None, {}))
        assert torch.equal(block.mlp.experts[e].up_proj.dense(), want[0].dense())
    routed = block.mlp.experts[1].up_proj.dense()  # GPTQ from its 128 routed tokens: not the RTN grid
    assert not torch.equal(routed, rtn.apply(LayerInput("w", original.mlp.experts[1].up_proj.weight,
                                                        original.mlp.experts[1].up_proj.weight, None, {}))[0].dense())
    # the same recipe names its policy in the result; a stage that is no quantizer cannot round
    assert result.recipe.to_dict()["experts"] == {"min_tokens": 1, "few_tokens": "rtn"}
    with pytest.raises(RecipeError, match="few_tokens 'rtn' needs a quantizer stage"):
        tp.compress(lm, tp.Recipe(stages=[{"method": "sparsegpt", "sparsity": 0.5}], experts={"few_tokens": "rtn"}),
                    calib, batch_size=2)


def test_min_tokens_sets_what_counts_as_starved():
    lm = tiny_model("olmoe")
    calib = tp.data.TokenWindows(torch.randint(3, 300, (4, 32)), "random")
    _Recorder.seen.clear()
    result = tp.compress(lm, tp.Recipe(stages=[{"method": "test_record_expert_stats"}]), calib)
    tokens = result.expert_tokens["model.layers.0"]
    assert sum(tokens) == 2 * 4 * 32  # two experts per token
    for e, n in enumerate(tokens):  # the default: every expert a token reached keeps its routed statistics
        assert n > 0 and _Recorder.seen[f"model.layers.0.mlp.experts.{e}.gate_proj"]["tokens"] == n
    _Recorder.seen.clear()
    by_width = tp.compress(lm, tp.Recipe(stages=[{"method": "test_record_expert_stats"}], experts={"min_tokens": None}), calib)
    assert by_width.expert_tokens == result.expert_tokens
    for e, n in enumerate(tokens):  # below the 64 inputs: all 128 tokens, weighted (a probability mass below 128)
        seen = _Recorder.seen[f"model.layers.0.mlp.experts.{e}.gate_proj"]["tokens"]
        assert seen == n if n >= 64 else (isinstance(seen, float) and 0 < seen < 128)


def test_routers_are_kept_unless_a_stage_names_them(tmp_path):
    lm = tiny_model("qwen2_moe")
    ids = torch.randint(3, 300, (1, 12))
    kept = tp.compress(lm, tp.Recipe(stages=[{"method": "rtn", "bits": 4, "group_size": 32}]))
    assert not any(n.endswith(("mlp.gate.proj", "shared_expert_gate")) for n in kept.layers)
    assert any(".shared_expert." in n for n in kept.layers)  # the shared expert is compressed
    named = tp.compress(lm, tp.Recipe(stages=[{"method": "rtn", "bits": 8, "group_size": 32,
                                               "targets": ["re:.*mlp\\.gate\\.proj", "re:.*shared_expert_gate"]}]))
    assert sorted(named.layers) == [f"model.layers.{i}.mlp.{n}" for i in (0, 1) for n in ("gate.proj", "shared_expert_gate")]
    router = named.model.adapter.blocks(named.model.model)[0].mlp.gate
    assert isinstance(router.proj, CompressedLinear)
    out = _logits(named.model.model, ids)
    again = tp.load_compressed(named.save(tmp_path / "ckpt"))
    assert torch.equal(_logits(again.model, ids), out)


def test_per_expert_report_and_exports_that_cannot_hold_experts(tmp_path):
    lm = tiny_model("mixtral")
    calib = tp.data.TokenWindows(torch.randint(3, 300, (2, 16)), "random")
    result = tp.compress(lm, "gptq-w4g128", calib, batch_size=2)
    rows = result.experts()
    assert [(r["block"], r["expert"]) for r in rows] == [(b, e) for b in (0, 1) for e in range(4)]
    for row in rows:  # three 64x96 / 96x64 linears: 4-bit codes, a float16 scale and 4-bit zero per row and group
        assert row["weights"] == 3 * 64 * 96
        assert row["bits"] == 2 * (96 * 64 * 4 + 96 * 1 * 20) + 64 * 96 * 4 + 64 * 1 * 20
        assert row["bytes"] == row["bits"] / 8
    assert sum(r["tokens"] for r in rows if r["block"] == 0) == 2 * 2 * 16
    assert result.to_dict()["experts"] == rows
    assert tp.load_compressed(result.save(tmp_path / "ckpt")).info["manifest"]["expert_tokens"] == result.expert_tokens
    with pytest.raises(ExportError, match="mixture-of-experts models \\(mixtral\\) is not supported"):
        export(result, tmp_path / "ct", format="compressed-tensors")
    with pytest.raises(ExportError, match="mixtral"):
        export(result, tmp_path / "m.gguf", format="gguf")


def test_models_mixing_dense_and_expert_blocks_are_refused():
    config = tiny_config("qwen2_moe")
    config.mlp_only_layers = [0]
    model = T.AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(UnsupportedArchitectureError, match="block 0 has a dense FFN"):
        LoadedModel(model, make_tokenizer(), adapter_for("qwen2_moe"), "tiny")
