import pytest
import torch

import tensorpress as tp
from conftest import tiny_model
from tensorpress.errors import RecipeError
from tensorpress.methods import LayerInput, METHODS
from tensorpress.methods.lowrank.lowrank_math import channel_scales, hessian_root, truncate
from tensorpress.methods import LayerInput
from tensorpress.methods.lowrank.svd import SVD
from tensorpress.search import greedy_choice
from tensorpress.parts import CompressedLinear, DensePart, LowRankPart, QuantizedPart


def _correlated_inputs(n=2000, d=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) * torch.logspace(0, -2, d)[None, :]  # few strong directions
    scales = torch.logspace(1, -1, d)  # and very unequal channel magnitudes
    return (torch.randn(n, d, generator=g) @ mix) * scales[None, :]


def test_rank_k_matrix_is_reconstructed_exactly_at_rank_k():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 6, generator=g) @ torch.randn(6, 30, generator=g)
    x = _correlated_inputs(d=30)
    for root in (None, hessian_root(x.T.double() @ x.double())):
        a, b = truncate(w, 6, root)
        assert a.shape == (40, 6) and b.shape == (6, 30)
        torch.testing.assert_close(a @ b, w, rtol=1e-4, atol=1e-4)
    part = LowRankPart(*truncate(w, 6), factor_bits=32)
    torch.testing.assert_close(part.dense(), w, rtol=1e-4, atol=1e-4)
    x = torch.randn(3, 30)
    torch.testing.assert_close(part(x), x @ w.T, rtol=1e-4, atol=1e-4)  # two thin matmuls


def test_whitened_truncation_has_lower_output_error_on_correlated_inputs():
    x = _correlated_inputs()
    w = torch.randn(64, 48)
    xtx = x.T.double() @ x.double()

    def output_error(a, b):
        return ((w - a @ b) @ x.T).norm().item()

    plain = output_error(*truncate(w, 12))
    whitened = output_error(*truncate(w, 12, hessian_root(xtx)))
    scaled = output_error(*truncate(w, 12, channel_scales(x.abs().mean(0))))
    assert whitened < 0.7 * plain, (whitened, plain)
    assert whitened <= scaled * 1.0001 and scaled < plain  # ASVD's diagonal scaling sits in between
    # and whitening is optimal: the error is that of the best rank-12 approximation of W L (X^T X = L L^T)
    s = torch.linalg.svdvals(w.double() @ torch.linalg.cholesky(xtx))
    optimum = s[12:].square().sum().sqrt().item()
    assert output_error(*truncate(w, 12, hessian_root(xtx, damp=1e-8))) == pytest.approx(optimum, rel=1e-3)
    assert whitened == pytest.approx(optimum, rel=0.01)  # the default damping costs little


@pytest.mark.parametrize("bits", [32, 16, 8])
def test_lowrank_part_storage_and_exact_bits(bits):
    a, b = torch.randn(20, 4), torch.randn(4, 30)
    part = LowRankPart(a, b, bits)
    expected = 4 * 50 * bits + (2 * 4 * 16 if bits == 8 else 0)
    assert part.nbits() == expected
    err = (part.dense() - a @ b).abs().max().item()
    assert err < {32: 1e-5, 16: 1e-2, 8: 0.2}[bits]
    tensors, meta = part.state()
    again = LowRankPart.from_state(tensors, meta)
    assert torch.equal(again.dense(), part.dense()) and again.nbits() == part.nbits()
    with pytest.raises(ValueError, match="factor_bits must be one of"):
        LowRankPart(a, b, 4)


def test_svd_methods_on_a_model_save_reload_and_stay_dense_when_rank_saves_nothing(tmp_path, text_path):
    lm = tiny_model("llama")
    calib = tp.data.calibration(lm, text_path, samples=4, seq_len=32)
    ids = calib.input_ids[:2]
    ref = lm.model(input_ids=ids).logits
    errors = {}
    for method in ("svd", "asvd", "svd_llm"):
        res = tp.compress(lm, tp.Recipe(stages=[{"method": method, "keep": 0.6}]), calib)
        kinds = {r.parts[0].split()[0] for r in res.layers.values()}
        assert kinds == {"lowrank"}
        errors[method] = (res.model.model(input_ids=ids).logits - ref).norm().item()
    assert errors["svd_llm"] < errors["svd"]
    res.save(tmp_path / "ck")
    again = tp.load_compressed(tmp_path / "ck")
    assert torch.equal(again.model(input_ids=ids).logits, res.model.model(input_ids=ids).logits)
    # a rank at or above in*out/(in+out) would store more than the dense weight: kept dense
    res = tp.compress(lm, tp.Recipe(stages=[{"method": "svd", "rank": 10_000}]))
    assert all(r.parts == ["dense float32"] for r in res.layers.values())
    with pytest.raises(Exception, match="only one of rank, keep, target_reduction"):
        tp.Recipe(stages=[{"method": "svd", "rank": 4, "keep": 0.5}])


def test_greedy_rank_allocation_meets_the_budget_and_favours_steep_spectra():
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(64, 64))
    v, _ = torch.linalg.qr(torch.randn(64, 64))
    steep = u @ torch.diag(torch.logspace(0, -6, 64)) @ v.T  # energy in a few directions: cheap to truncate
    flat = u @ v.T  # no direction matters more: truncation costs a lot
    stage = SVD(target_reduction=0.35, sensitivity="relative")
    layers = [LayerInput(name, w, w, None, {}) for name, w in (("steep", steep), ("flat", flat))]
    options, budget = stage.allocation_options(layers)
    assert budget == pytest.approx(0.65 * 2 * 64 * 64)
    ranks = greedy_choice(options, budget)
    spent = sum(64 * 64 if r >= 32 else r * 128 for r in ranks.values())
    assert spent <= 0.65 * 2 * 64 * 64
    assert ranks["flat"] >= 32 and ranks["steep"] < 32  # the flat layer stays dense
    resolved = stage.with_allocation(ranks)
    assert resolved.target_reduction is None and resolved.rank_for("flat", (64, 64)) == 32


@pytest.mark.parametrize("allocation", ["greedy", "uniform"])
def test_target_reduction_in_a_recipe(text_path, allocation):
    lm = tiny_model("llama")
    calib = tp.data.calibration(lm, text_path, samples=4, seq_len=32)
    recipe = tp.Recipe(stages=[{"method": "svd_llm", "target_reduction": 0.3, "allocation": allocation}])
    assert recipe.needs_calibration
    res = tp.compress(lm, recipe, calib)
    total = sum(lm.model.get_submodule(n).weight.numel() for n in res.layers)
    kept = 0
    for name in res.layers:
        (part,) = res.model.model.get_submodule(name).parts
        kept += part.rank * sum(part.shape) if isinstance(part, LowRankPart) else part.weight.numel()
    assert kept <= 0.7 * total + 1e-9 and kept > 0.5 * total  # the budget is met, and used
    assert res.recipe.stages[0].target_reduction is None and res.recipe.stages[0].rank_overrides


def test_eora_rank_zero_is_a_noop_and_eora_beats_plain_svd_compensation(text_path):
    lm = tiny_model("llama")
    calib = tp.data.calibration(lm, text_path, samples=6, seq_len=32)
    ids = calib.input_ids
    ref = lm.model(input_ids=ids).logits
    base = [{"method": "rtn", "bits": 2, "group_size": 16}]

    def error(stages):
        res = tp.compress(lm, tp.Recipe(stages=base + stages), calib)
        return res, (res.model.model(input_ids=ids).logits - ref).norm().item()

    quantized, e_q = error([])
    noop, e_0 = error([{"method": "eora", "rank": 0}])
    assert e_0 == e_q and noop.bits_per_weight == quantized.bits_per_weight
    eora, e_eora = error([{"method": "eora", "rank": 8}])
    plain, e_plain = error([{"method": "eora", "rank": 8, "whiten": False}])
    assert e_eora < e_plain < e_q
    parts = next(iter(eora.layers.values())).parts
    assert parts[0].startswith("int2") and parts[1] == "lowrank r8 fp16"
    assert eora.bits_per_weight > quantized.bits_per_weight  # the factors are counted
    with pytest.raises(RecipeError, match="not compressed by an earlier stage"):
        tp.compress(lm, tp.Recipe(stages=[{"method": "eora", "rank": 4}]), calib)


def test_quantized_plus_lowrank_beats_quantization_alone_on_the_layer_output():
    x = _correlated_inputs(n=3000, d=64, seed=1)
    w = torch.randn(48, 64) + 3 * torch.randn(48, 2) @ torch.randn(2, 64)  # a strong low-rank component
    xtx = x.T.double() @ x.double()
    stats = {"xtx": xtx, "tokens": x.shape[0]}
    layer = LayerInput("l", w, w, None, stats)
    qlr = METHODS["qlr"](bits=2, group_size=16, rank=4, iterations=3).apply(layer)
    gptq = METHODS["gptq"](bits=2, group_size=16).apply(layer)
    assert isinstance(qlr[0], QuantizedPart) and isinstance(qlr[1], LowRankPart)

    def out_err(parts):
        return ((w - sum(p.dense() for p in parts)) @ x.T).norm().item()

    assert out_err(qlr) < 0.8 * out_err(gptq)
    linear = CompressedLinear(qlr)
    torch.testing.assert_close(linear(x[:5]), x[:5] @ linear.dense().T, rtol=1e-4, atol=1e-3)
    # a drop-in for the dense layer: against it (a DensePart of w), the two parts' layer output
    # is closer than GPTQ's, and adding their residual as a third part gives the layer back
    dense = CompressedLinear([DensePart(w)])
    ref = dense(x)
    torch.testing.assert_close(ref, x @ w.T, rtol=1e-4, atol=1e-3)

    def rel_err(layer):
        return ((layer(x) - ref).norm() / ref.norm()).item()

    assert rel_err(linear) < 0.8 * rel_err(CompressedLinear(gptq))  # measured 0.056 vs 0.371
    assert rel_err(CompressedLinear([*qlr, DensePart(w - linear.dense())])) < 1e-5  # measured 2.4e-7


def test_fisher_component_costs_reduce_to_half_the_energy_under_a_flat_fisher():
    from tensorpress.methods.lowrank.lowrank_math import fisher_component_costs, hessian_root

    g = torch.Generator().manual_seed(7)
    w = torch.randn(12, 20, generator=g)
    costs = fisher_component_costs(w, torch.ones(12, 20))
    assert torch.allclose(costs, 0.5 * torch.linalg.svdvals(w.double()).square(), rtol=1e-4)
    # a Fisher that only cares about output row 0 makes components living there the costly ones
    fisher = torch.zeros(12, 20)
    fisher[0] = 1.0
    x = torch.randn(200, 20, generator=g)
    weighted = fisher_component_costs(w, fisher, hessian_root((x.T @ x).double()))
    assert weighted.shape == (12,) and (weighted >= 0).all() and weighted.sum() > 0
