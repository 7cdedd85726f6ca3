from typing import ClassVar, Literal

import pytest
import torch

import tensorpress as tp
from conftest import ALL_ARCHS, CAUSAL_ARCHS, tiny_model
from tensorpress.engine.linears import weight_of
from tensorpress.errors import CalibrationError, InvalidWeightError, RecipeError
from tensorpress.methods import LayerInput, MethodConfig, register_method
from tensorpress.models.adapters import ROUTER_ROLES
from tensorpress.parts import CompressedLinear, DensePart


@register_method
class _RecordStats(MethodConfig):
    """Test-only method: keeps the weight dense and records the statistics it was handed."""

    name: ClassVar[str] = "test_record_stats"
    needs: ClassVar[frozenset[str]] = frozenset({"xtx", "act_sq"})
    seen: ClassVar[dict] = {}
    method: Literal["test_record_stats"] = "test_record_stats"

    def apply(self, layer: LayerInput):
        _RecordStats.seen[layer.name] = layer.stats
        return [DensePart(layer.weight)]


def _out(lm, ids):
    o = lm.model(input_ids=ids)
    return o.logits if lm.causal else o.last_hidden_state


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_rtn_compresses_every_block_linear_of_every_architecture(arch):
    lm = tiny_model(arch)
    ids = torch.randint(3, 300, (2, 24))
    before = _out(lm, ids)
    original_weights = {n: p.clone() for n, p in lm.model.named_parameters()}
    result = tp.compress(lm, tp.Recipe(stages=[{"method": "rtn", "bits": 8, "group_size": 32}]))
    # the original is untouched
    assert all(torch.equal(p, original_weights[n]) for n, p in lm.model.named_parameters())
    compressed = [n for n, m in result.model.model.named_modules() if isinstance(m, CompressedLinear)]
    n_blocks = lm.model.config.num_hidden_layers
    routers = lm.adapter.linears_with(*ROUTER_ROLES)  # mixture-of-experts routers: kept unless named
    assert len(compressed) == len(result.layers) == n_blocks * (len(lm.adapter.block_linears()) - len(routers))
    assert not any(n.endswith(tuple(routers)) for n in compressed)
    assert not any("embed" in n or "lm_head" in n for n in compressed)
    after = _out(result.model, ids)
    rel = ((after - before).norm() / before.norm()).item()
    assert rel < 0.02, rel  # 8-bit, groups of 32: outputs barely move
    assert result.bits_per_weight == 8 + (16 + 8) / 32  # codes + a float16 scale and an 8-bit zero per 32


def test_fewer_bits_cost_more_quality_and_targets_select_layers():
    lm = tiny_model("llama")
    ids = torch.randint(3, 300, (2, 24))
    ref = _out(lm, ids)
    errs = []
    for bits in (8, 4, 2):
        res = tp.compress(lm, tp.Recipe(stages=[{"method": "rtn", "bits": bits, "group_size": 16}]))
        errs.append((_out(res.model, ids) - ref).norm().item())
    assert errs[0] < errs[1] < errs[2]
    only_mlp = tp.compress(lm, tp.Recipe(stages=[{"method": "rtn", "targets": ["re:.*mlp\\..*"], "ignore": ["down_proj"]}]))
    assert sorted({n.split(".", 3)[3] for n in only_mlp.layers}) == ["mlp.gate_proj", "mlp.up_proj"]


def test_stats_are_those_of_the_sequentially_compressed_model():
    """Block i's statistics come from block i's real inputs (the model's own hidden states)."""
    lm = tiny_model("llama")
    calib = tp.data.TokenWindows(torch.randint(3, 300, (3, 16)), "random")
    _RecordStats.seen.clear()
    tp.compress(lm, tp.Recipe(stages=[{"method": "test_record_stats"}]), calib, batch_size=2)
    # direct capture of q_proj inputs in the uncompressed model
    captured = {}
    names = [f"model.layers.{i}.{rel}" for i in range(2) for rel in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]
    hooks = [
        lm.model.get_submodule(name).register_forward_hook(
            lambda m, a, o, name=name: captured.setdefault(name, []).append(a[0].reshape(-1, a[0].shape[-1]).double()))
        for name in names
    ]
    with torch.no_grad():
        lm.model(input_ids=calib.input_ids)
    for h in hooks:
        h.remove()
    for name in names:  # v_proj shares q_proj's input
        x = torch.cat(captured[name])
        stats = _RecordStats.seen[name]
        assert stats["tokens"] == 48
        torch.testing.assert_close(stats["xtx"], x.T @ x, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(stats["act_sq"], x.square().sum(0), rtol=1e-4, atol=1e-4)


def test_methods_that_need_statistics_require_calibration():
    with pytest.raises(CalibrationError, match="need calibration data"):
        tp.compress(tiny_model("llama"), tp.Recipe(stages=[{"method": "test_record_stats"}]))


def test_nan_or_inf_weight_is_refused_by_name():
    lm = tiny_model("llama")
    with torch.no_grad():
        lm.model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
        lm.model.model.layers[1].mlp.up_proj.weight[1, 0] = float("inf")
    with pytest.raises(InvalidWeightError, match=r"model.layers.1.mlp.up_proj: the weight has 2 NaN/Inf"):
        tp.compress(lm, tp.recipes.get("rtn-w4g128"))


def test_targets_that_match_nothing_are_an_error():
    with pytest.raises(RecipeError, match=r"stage 1 \(rtn\): targets \['nothing_here'\].*match no linear.*model.layers.0.self_attn.q_proj"):
        tp.compress(tiny_model("llama"), tp.Recipe(stages=[{"method": "rtn", "targets": ["nothing_here"]}]))


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_two_stages_compose_and_conv1d_is_handled(arch):
    lm = tiny_model(arch)
    recipe = tp.Recipe(stages=[{"method": "rtn", "bits": 8, "group_size": None}, {"method": "rtn", "bits": 4}])
    res = tp.compress(lm, recipe)
    name, report = next(iter(res.layers.items()))
    module = res.model.model.get_submodule(name)
    assert report.parts == ["int4 g128 asym"] and module.weight.shape == weight_of(lm.model.get_submodule(name)).shape


def test_calibrated_compression_runs_on_every_causal_architecture():
    for arch in CAUSAL_ARCHS:
        lm = tiny_model(arch)
        calib = tp.data.TokenWindows(torch.randint(3, 300, (2, 16)), "random")
        _RecordStats.seen.clear()
        res = tp.compress(lm, tp.Recipe(stages=[{"method": "test_record_stats"}]), calib)
        assert len(_RecordStats.seen) == len(res.layers), arch
        ids = torch.randint(3, 300, (1, 16))
        torch.testing.assert_close(_out(res.model, ids), _out(lm, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path", ["syrk", "torch"])
@pytest.mark.parametrize("width", [40, 1000])
def test_gram_matrix_of_one_triangle_matches_the_full_product(monkeypatch, path, width):
    """Both ways of accumulating X^T X (BLAS syrk into the lower triangle; torch products, over
    the upper triangle when wide) give the full symmetric sum, also when read twice."""
    from tensorpress.engine import blas
    from tensorpress.engine import stats as stats_mod

    if path == "syrk" and not blas.syrk_available():
        pytest.skip("torch's BLAS has no ssyrk here")
    if path == "torch":
        monkeypatch.setattr(stats_mod, "syrk_lower", lambda x, out: False)
    x = torch.randn(3, 50, width)
    stats = stats_mod.InputStats(width, frozenset({"xtx"}), torch.device("cpu"))
    for batch in x:
        stats.update(batch)
    flat = x.reshape(-1, width).double()
    first = stats.as_dict()["xtx"]
    torch.testing.assert_close(first, flat.T @ flat, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(stats.as_dict()["xtx"], first, rtol=0, atol=0)
    stats.update(x[0])  # a batch after reading keeps the sum whole
    torch.testing.assert_close(stats.as_dict()["xtx"], flat.T @ flat + x[0].double().T @ x[0].double(), rtol=1e-5, atol=1e-3)


def test_input_stats_sum_what_is_asked_and_only_that():
    from tensorpress.engine.stats import InputStats

    x = torch.randn(2, 30, 12)
    stats = InputStats(12, frozenset({"act_sum", "act_sq"}), torch.device("cpu"))
    for batch in x:
        stats.update(batch)
    got = stats.as_dict()
    flat = x.reshape(-1, 12).double()
    assert set(got) == {"tokens", "act_sum", "act_sq"} and got["tokens"] == 60
    torch.testing.assert_close(got["act_sum"], flat.sum(0), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(got["act_sq"], flat.square().sum(0), rtol=1e-6, atol=1e-5)


def test_syrk_writes_only_the_lower_triangle():
    from tensorpress.engine.blas import syrk_available, syrk_lower

    if not syrk_available():
        pytest.skip("torch's BLAS has no ssyrk here")
    x = torch.randn(70, 9)
    out = torch.full((9, 9), 7.0)
    assert syrk_lower(x, out)
    torch.testing.assert_close(torch.tril(out), torch.tril(x.T @ x), rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.triu(out, 1), torch.triu(torch.full((9, 9), 7.0), 1))
    assert not syrk_lower(x.double(), out.double())  # not float32: the caller multiplies itself
    assert not syrk_lower(x.T, out)  # not contiguous


def test_dense_cache_gives_the_same_outputs_and_is_dropped_after():
    from tensorpress.parts.linear import dense_weights_cached

    lm = tiny_model("opt")
    res = tp.compress(lm, tp.recipes.get("rtn-w4g128"))
    ids = torch.randint(3, 300, (2, 16))
    plain = res.model.model(input_ids=ids).logits
    with dense_weights_cached(res.model.model):
        cached = res.model.model(input_ids=ids).logits
    torch.testing.assert_close(cached, plain, rtol=1e-5, atol=1e-5)
    assert all(m._dense_cache is None for m in res.model.model.modules() if isinstance(m, CompressedLinear))


def test_head_stages_take_calibration_free_methods_only():
    lm = tiny_model("llama")
    with pytest.raises(RecipeError, match="LM head 'lm_head'.*rtn"):
        tp.compress(lm, tp.Recipe(stages=[{"method": "gptq", "bits": 4, "ignore": []}]), None)
    # a stage that selects the head alone is a valid stage (it matches no block linear)
    res = tp.compress(lm, tp.Recipe(stages=[{"method": "rtn", "bits": 8, "targets": ["lm_head"], "ignore": []}]))
    assert list(res.layers) == ["lm_head"]
    assert isinstance(res.model.model.lm_head, CompressedLinear)


def test_inputs_original_compresses_each_linear_from_the_uncompressed_models_activations(text_path):
    """With inputs: original a linear's parts do not depend on what the other linears get: the
    same as when it is the only one compressed; with the default they do (later blocks see the
    compressed blocks' outputs)."""
    lm = tiny_model("llama")
    calib = tp.data.calibration(lm, source=str(text_path), samples=4, seq_len=32)
    name = "model.layers.1.mlp.down_proj"

    def parts_of(recipe):
        result = tp.compress(lm, recipe, calib)
        return torch.cat([p.dense().flatten() for p in result.model.model.get_submodule(name).parts])

    everything = {"stages": [{"method": "gptq", "bits": 2, "group_size": 64}]}
    alone = {"stages": [{"method": "gptq", "bits": 2, "group_size": 64, "targets": [name]}]}
    assert torch.equal(parts_of({**everything, "inputs": "original"}), parts_of({**alone, "inputs": "original"}))
    assert not torch.equal(parts_of(everything), parts_of(alone))
    assert tp.recipes.resolve({**everything, "inputs": "original"}).to_dict()["inputs"] == "original"
    with pytest.raises(tp.errors.RecipeError, match="inputs"):
        tp.recipes.resolve({**everything, "inputs": "teacher"})
