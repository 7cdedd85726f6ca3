import pytest
import torch

import tensorpress as tp
from conftest import tiny_model
from tensorpress.methods.quant.codebook_math import quantize_kmeans, quantize_nf4, weighted_kmeans_1d
from tensorpress.parts import CodebookPart
from tensorpress.parts.codebook import NF4_LEVELS
from tensorpress.parts.quant_math import dequantize, quantize_rtn


def _w(out_f=32, in_f=128, seed=0):
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))


def test_nf4_codes_are_the_nearest_levels_and_round_trip():
    w = _w()
    codes, codebook, scales = quantize_nf4(w, 32)
    part = CodebookPart(codes, codebook, scales, 32)
    normed = w / scales.float().repeat_interleave(32, dim=1)
    levels = torch.tensor(NF4_LEVELS)
    best = (normed[..., None] - levels).abs().argmin(-1)
    assert (codes.long() == best).float().mean() > 0.999  # ties at midpoints may go either way
    tensors, meta = part.state()
    assert torch.equal(CodebookPart.from_state(tensors, meta).dense(), part.dense())
    assert part.nbits() == 32 * 128 * 4 + 16 * 16 + 32 * 4 * 16


def test_nf4_beats_uniform_int4_absmax_on_gaussian_weights():
    w = _w(64, 256, seed=3)
    nf4 = CodebookPart(*quantize_nf4(w, 64)[:2], quantize_nf4(w, 64)[2], 64).dense()
    codes, grid = quantize_rtn(w, 4, 64, symmetric=True)
    assert (nf4 - w).pow(2).mean() < (dequantize(codes, grid) - w).pow(2).mean()


def test_weighted_kmeans_finds_clusters_and_respects_weights():
    values = torch.cat([torch.full((50,), -2.0), torch.full((50,), 1.0), torch.full((50,), 5.0)])[None]
    centroids = weighted_kmeans_1d(values + 0.01 * torch.randn(1, 150), torch.ones(150), 4)
    assert torch.allclose(centroids[0, [0, -1]], torch.tensor([-2.0, 5.0]), atol=0.05)
    # weighted: a heavy point pulls its centroid
    v = torch.tensor([[0.0, 1.0]])
    c = weighted_kmeans_1d(v, torch.tensor([1.0, 1.0]), 2)
    assert torch.allclose(c, torch.tensor([[0.0, 1.0]]))


@pytest.mark.parametrize("per_row", [False, True])
def test_kmeans_beats_uniform_at_the_same_bits(per_row):
    w = _w(16, 256, seed=1) ** 3  # heavy-tailed, where non-uniform levels pay off
    codes, codebook = quantize_kmeans(w, 3, None, per_row)
    part = CodebookPart(codes, codebook)
    rtn_codes, grid = quantize_rtn(w, 3, None, symmetric=False)
    assert (part.dense() - w).pow(2).mean() < (dequantize(rtn_codes, grid) - w).pow(2).mean()
    assert part.codebook.shape == ((16, 8) if per_row else (1, 8))


def test_codebook_methods_end_to_end(tmp_path, text_path):
    lm = tiny_model("qwen2")
    calib = tp.data.calibration(lm, text_path, samples=4, seq_len=32)
    for stage in ({"method": "nf4"}, {"method": "kmeans", "bits": 3}):
        res = tp.compress(lm, tp.Recipe(stages=[stage]), calib)
        res.save(tmp_path / stage["method"])
        again = tp.load_compressed(tmp_path / stage["method"])
        ids = torch.randint(3, 300, (1, 16))
        assert torch.equal(again.model(input_ids=ids).logits, res.model.model(input_ids=ids).logits)
        assert next(iter(res.layers.values())).parts[0].startswith("codebook")
