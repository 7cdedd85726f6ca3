"""What the newer families need beyond the shared every-method tests: exact folding into Gemma's
``(1 + w)`` norms, scaled embeddings that survive quantization and export, and KV caches on
sliding-window layers."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from conftest import ALL_ARCHS, make_tokenizer, tiny_config, tiny_model

import tensorpress as tp
from tensorpress.engine.folding import can_fold_into, fold_scale
from tensorpress.engine.linears import in_features, is_linear
from tensorpress.io.export import export_hf
from tensorpress.models import LoadedModel, adapter_for
from tensorpress.parts import CompressedEmbedding


def _out(lm, ids):
    with torch.no_grad():
        o = lm.model(input_ids=ids)
    return o.logits if lm.causal else o.last_hidden_state


@pytest.mark.parametrize("arch", [a for a in ALL_ARCHS if adapter_for(a).producers])  # BERT normalises after the sum
def test_folding_a_scale_into_every_producer_leaves_the_outputs_unchanged(arch):
    """AWQ's rewrite ``W x = (W diag(s)) (x / s)`` through each producer the adapter names
    (norms, Gemma's ``1 + w`` ones included, and linears), exact up to float32 rounding."""
    lm = tiny_model(arch)
    ids = torch.randint(3, 300, (2, 12))
    before = _out(lm, ids)
    folded = 0
    g = torch.Generator().manual_seed(0)
    for block in lm.adapter.blocks(lm.model):
        for gi, group in enumerate(lm.adapter.linear_groups):
            producer_rel = lm.adapter.producer_of(gi)
            members = [block.get_submodule(r) for r in group if is_linear(block.get_submodule(r))]
            if producer_rel is None or not members:
                continue
            producer = block.get_submodule(producer_rel)
            if not can_fold_into(producer, in_features(members[0])):
                continue
            scale = torch.rand(in_features(members[0]), generator=g) * 1.5 + 0.5
            fold_scale(producer, members, scale, lm.adapter.norm_offset)
            folded += 1
    assert folded >= len(lm.adapter.blocks(lm.model))  # at least one group per block (OLMo 2: up_proj into down_proj only)
    torch.testing.assert_close(_out(lm, ids), before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["gemma", "gemma2", "gemma3_text"])
def test_gemma_norms_need_their_offset(arch):
    """Folding as into a plain norm (no ``1 +``) changes a Gemma model: the offset matters."""
    lm = tiny_model(arch)
    ids = torch.randint(3, 300, (1, 12))
    before = _out(lm, ids)
    block = lm.adapter.blocks(lm.model)[0]
    norm = block.get_submodule(lm.adapter.producer_of(0))
    members = [block.get_submodule(r) for r in lm.adapter.linear_groups[0]]
    fold_scale(norm, members, torch.full((64,), 2.0), norm_offset=0.0)
    assert (_out(lm, ids) - before).abs().max() > 1e-3


def test_gemma3_scaled_embeddings_survive_quantization_reload_and_export(tmp_path):
    """Gemma 3 multiplies looked-up rows by sqrt(hidden) inside its embedding module: the
    quantized table keeps that factor, through a checkpoint and a Hugging Face export."""
    lm = tiny_model("gemma3_text")
    ids = torch.randint(3, 300, (1, 16))
    stage = {"method": "rtn", "bits": 8, "group_size": 32, "targets": ["re:.*embed.*"], "ignore": []}
    result = tp.compress(lm, tp.Recipe(stages=[stage]))
    table = result.model.model.get_input_embeddings()
    assert isinstance(table, CompressedEmbedding) and table.scale == pytest.approx(64 ** 0.5)
    ref, got = _out(lm, ids), _out(result.model, ids)
    assert ((got - ref).norm() / ref.norm()) < 0.02  # 8-bit: close; without the factor it is far off
    table.scale = None
    assert ((_out(result.model, ids) - ref).norm() / ref.norm()) > 0.1
    table.scale = 8.0
    again = tp.load_compressed(result.save(tmp_path / "ckpt"))
    assert torch.equal(_out(again, ids), got)
    export_hf(result.model, tmp_path / "hf")
    plain = T.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, got)


def _sliding_gemma3() -> LoadedModel:
    config = tiny_config("gemma3_text")
    config.layer_types = ["sliding_attention", "sliding_attention"]  # window 8 on every layer
    torch.manual_seed(0)
    return LoadedModel(T.AutoModelForCausalLM.from_config(config).eval(), make_tokenizer(), adapter_for("gemma3_text"), "s")


def _decode(lm, cache, ids, prefill=24):
    with torch.no_grad():
        out = [lm.model(ids[:, :prefill], past_key_values=cache, use_cache=True).logits]
        for t in range(prefill, ids.shape[1]):
            out.append(lm.model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    return torch.cat(out, 1)


@pytest.mark.parametrize("name,settings", [("streaming", {"window": 8, "sinks": 0}), ("h2o", {"ratio": 0.2, "window": 8}),
                                           ("snapkv", {"ratio": 0.2, "window": 8})])
def test_eviction_that_covers_the_sliding_window_gives_the_full_caches_attention(name, settings):
    """On sliding-window layers nothing older than the window is attended: a cache that keeps
    the window gives the full cache's outputs (to float32 summation order); one that keeps less
    does not."""
    lm = _sliding_gemma3()
    ids = torch.randint(3, 300, (1, 40), generator=torch.Generator().manual_seed(1))
    full = _decode(lm, tp.kv.cache("full", lm), ids)
    assert (_decode(lm, tp.kv.cache(name, lm, **settings), ids) - full).abs().max() < 1e-5
    short = {**settings, "window": 3}
    if "ratio" in short:
        short["ratio"] = 0.05
    assert (_decode(lm, tp.kv.cache(name, lm, **short), ids) - full).abs().max() > 1e-3


def test_prune_ffn_cuts_phi3s_fused_gate_up_rows_consistently(text_path):
    """Phi-3 keeps gate and up in one linear (rows [gate | up]): a pruned channel loses its row
    in both halves, the same channels in each, and down_proj the matching column."""
    lm = tiny_model("phi3")
    calib = tp.data.calibration(lm, text_path, samples=4, seq_len=32)
    result = tp.compress(lm, tp.Recipe(stages=[{"method": "prune_ffn", "ratio": 0.25, "refit": False}]), calib)
    inter = lm.model.config.intermediate_size
    for before, after in zip(lm.adapter.blocks(lm.model), lm.adapter.blocks(result.model.model)):
        w0, w1 = before.mlp.gate_up_proj.weight, after.mlp.gate_up_proj.weight
        kept = w1.shape[0] // 2
        assert kept == result.model.model.config.intermediate_size < inter
        # which original rows each half kept: the gate half from the gate rows, the up half from the up rows
        gate_rows = [int(torch.nonzero((w0[:inter] == row).all(1))[0]) for row in w1[:kept]]
        up_rows = [int(torch.nonzero((w0[inter:] == row).all(1))[0]) for row in w1[kept:]]
        assert gate_rows == up_rows == sorted(gate_rows)
        assert torch.equal(after.mlp.down_proj.weight, before.mlp.down_proj.weight[:, gate_rows])


@pytest.mark.parametrize("parallel", [False, True])
def test_parallel_attention_and_ffn_share_one_group_and_its_norm(parallel):
    """StableLM with ``use_parallel_residual`` (as Cohere always) feeds attention and FFN from
    one norm: q/k/v and gate/up are then one group whose producer is that norm, and a scale
    folded into it is exact only when every reader takes it."""
    config = tiny_config("stablelm")
    config.use_parallel_residual = parallel
    torch.manual_seed(0)
    lm = LoadedModel(T.AutoModelForCausalLM.from_config(config).eval(), make_tokenizer(), adapter_for("stablelm"), "tiny")
    first = lm.adapter.linear_groups[0]
    assert ("mlp.gate_proj" in first) == parallel
    assert lm.adapter.producer_of(0) == "input_layernorm"
    ids = torch.randint(3, 300, (2, 12))
    before = _out(lm, ids)
    block = lm.adapter.blocks(lm.model)[0]
    norm = block.get_submodule("input_layernorm")
    attention = [block.get_submodule(r) for r in first if r.startswith("self_attn")]
    fold_scale(norm, attention, torch.full((64,), 2.0), lm.adapter.norm_offset)  # the attention's readers only
    changed = (_out(lm, ids) - before).abs().max().item()
    assert (changed > 1e-3) == parallel  # in parallel blocks the FFN read the same norm
    calib = tp.data.TokenWindows(torch.randint(3, 300, (4, 16)), "random")
    result = tp.compress(LoadedModel(T.AutoModelForCausalLM.from_config(config).eval(), make_tokenizer(),
                                     adapter_for("stablelm"), "tiny"), "awq-w4g128", calib, batch_size=2)
    assert len(result.layers) == 2 * 7
