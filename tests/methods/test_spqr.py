import torch
from conftest import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

import tensorpress as tp
from tensorpress.methods import LayerInput
from tensorpress.methods.quant.gptq import GPTQ
from tensorpress.methods.quant.spqr import SpQR
from tensorpress.parts import CompressedLinear, SparsePart


@settings(max_examples=25, deadline=None)
@given(out_f=st.integers(1, 40), in_f=st.integers(1, 300), density=st.floats(0, 0.3), seed=st.integers(0, 99))
def test_sparse_part_round_trips_and_counts_its_indices(out_f, in_f, density, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    mask = torch.rand(out_f, in_f, generator=g) < density
    part = SparsePart.from_dense_mask(w, mask)
    assert torch.equal(part.dense(), torch.where(mask, w.half().float(), torch.zeros_like(w)))
    tensors, meta = part.state()
    again = SparsePart.from_state(tensors, meta)
    assert torch.equal(again.dense(), part.dense())
    col_bits = max(1, (in_f - 1).bit_length())
    count_bits = max(1, in_f.bit_length())
    assert part.nbits() == out_f * count_bits + int(mask.sum()) * (col_bits + 16)
    stored = sum(t.numel() * t.element_size() * 8 for t in tensors.values())
    assert 0 <= stored - part.nbits() < 8 * len(tensors)


def _layer(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 128, generator=g)
    w[torch.rand(48, 128, generator=g) < 0.01] *= 12  # a few large weights, as in real layers
    x = torch.randn(1024, 128, generator=g) * torch.linspace(0.3, 2.0, 128)
    h = (x.T @ x).double()
    return w, x, LayerInput("l", w, w, None, {"xtx": h, "tokens": 1024})


def test_outliers_cut_the_output_error_and_cost_their_bits():
    w, x, layer = _layer()
    plain = CompressedLinear(GPTQ(method="gptq", bits=3, group_size=32).apply(layer))
    spqr = CompressedLinear(SpQR(method="spqr", bits=3, group_size=32, outliers=0.01).apply(layer))
    err = lambda m: (x @ (m.dense() - w).T).pow(2).sum().item()
    assert err(spqr) < 0.8 * err(plain)
    sparse = spqr.parts[1]
    assert isinstance(sparse, SparsePart) and sparse.nnz == round(0.01 * w.numel())
    assert spqr.weight_nbits() == plain.weight_nbits() + sparse.nbits()


def test_spqr_recipe_saves_and_reloads(tmp_path, text_path):
    lm = tiny_model("llama")
    calib = tp.data.calibration(lm, text_path, samples=4, seq_len=32)
    res = tp.compress(lm, tp.Recipe(stages=[{"method": "spqr", "bits": 3, "group_size": 32, "outliers": 0.02}]), calib)
    res.save(tmp_path / "s")
    again = tp.load_compressed(tmp_path / "s")
    ids = torch.randint(3, 300, (1, 16))
    assert torch.equal(again.model(input_ids=ids).logits, res.model.model(input_ids=ids).logits)
    assert any(p.startswith("sparse") for p in next(iter(res.layers.values())).parts)


def test_spqr_base_on_a_llama_cpp_grid():
    """``format``: the base is a BlockPart on the type's own grid (fitted without the outliers),
    the outliers a sparse part beside it; outliers still cut GPTQ's error on the same grid."""
    from tensorpress.parts import BlockPart

    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 256, generator=g)
    w[torch.rand(48, 256, generator=g) < 0.01] *= 12
    x = torch.randn(2048, 256, generator=g) * torch.linspace(0.3, 2.0, 256)
    layer = LayerInput("l", w, w, None, {"xtx": (x.T @ x).double(), "tokens": 2048})
    err = lambda m: (x @ (m.dense() - w).T).pow(2).sum().item()
    for fmt in ("q3_k", "q4_0"):
        plain = CompressedLinear(GPTQ(method="gptq", format=fmt).apply(layer))
        spqr = CompressedLinear(SpQR(method="spqr", format=fmt, outliers=0.01).apply(layer))
        base, sparse = spqr.parts
        assert isinstance(base, BlockPart) and base.fmt.name == fmt and isinstance(sparse, SparsePart)
        assert err(spqr) < 0.8 * err(plain), fmt
        assert spqr.weight_nbits() == plain.weight_nbits() + sparse.nbits()
        # the base alone decodes on the format's grid: every code a level of it
        assert int(base.codes.max()) < (1 << base.fmt.bits)


def test_a_spqr_layer_is_refused_by_gguf_export_naming_its_outliers(tmp_path, text_path):
    import pytest

    from tensorpress.errors import ExportError

    lm = tiny_model("llama")
    calib = tp.data.calibration(lm, text_path, samples=4, seq_len=32)
    res = tp.compress(lm, tp.Recipe(stages=[{"method": "spqr", "format": "q4_0", "outliers": 0.01}]), calib)
    with pytest.raises(ExportError, match="SpQR's outliers are a sparse part"):
        tp.io.export(res, tmp_path / "s.gguf", format="gguf")
