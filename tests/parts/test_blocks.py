"""Block formats (llama.cpp's types as tensorpress grids): exact storage, save/load, validation,
and the quantizers' ``format:`` setting (RTN, AWQ, GPTQ on a fixed two-level grid).

The reference for the weights is ggml's own dequantizer (``gguf.quants.dequantize``) applied to
the bytes ``io.gguf_blocks.encode_blocks`` writes: every format decodes to ``BlockPart.dense()``
bit for bit (tested in ``tests/io/test_gguf_export.py`` through whole files, and here per format).
"""

from __future__ import annotations

import pytest
import torch

import tensorpress as tp
from tensorpress.errors import RecipeError
from tensorpress.io.gguf_blocks import bit_equal, decoded, encode_blocks
from tensorpress.methods.quant.gptq_math import gptq
from tensorpress.parts import BlockPart, part_from_state
from tensorpress.parts.block_math import FORMATS, block_format, fit_block_grid, format_for_width, quantize_to_blocks

# llama.cpp's bits per weight of each type (ggml-common.h block sizes: bytes * 8 / weights)
LLAMA_BPW = {"q4_0": 4.5, "q4_1": 5.0, "q5_0": 5.5, "q5_1": 6.0, "q8_0": 8.5, "iq4_nl": 4.5,
             "q2_k": 2.625, "q3_k": 3.4375, "q4_k": 4.5, "q5_k": 5.5, "q6_k": 6.5625}


def weight(out_f=8, in_f=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.02
    w[0, 3] = 0.3  # an outlier: the extreme of its block
    return w


def part_of(w, name, mse=False):
    grid = fit_block_grid(w, block_format(name), mse)
    return BlockPart(quantize_to_blocks(w, grid), grid)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_format_is_ggml_bit_for_bit_and_sized_as_llama_cpp(name):
    w = weight()
    part = part_of(w, name)
    data, qtype = encode_blocks(part.codes, part.grid)
    assert bit_equal(decoded(data, qtype), part.dense())
    assert part.nbits() == LLAMA_BPW[name] * w.numel() == data.size * 8
    rel = float((part.dense() - w).norm() / w.norm())
    assert rel < {2: 0.45, 3: 0.25, 4: 0.12, 5: 0.06, 6: 0.03, 8: 0.01}[part.bits], rel


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_save_and_load_is_identical(name):
    part = part_of(weight(), name)
    tensors, meta = part.state()
    back = part_from_state("blocks", tensors, meta)
    assert meta == {"shape": [8, 512], "format": name}
    assert bit_equal(back.dense(), part.dense()) and back.nbits() == part.nbits()


def test_mse_search_lowers_the_error():
    w = weight(32, 512)
    for name in ("q4_0", "q3_k", "q4_k"):
        plain, searched = part_of(w, name), part_of(w, name, mse=True)
        assert (searched.dense() - w).norm() < (plain.dense() - w).norm(), name


def test_symmetric_formats_put_the_extreme_weight_on_a_level():
    """The weight of largest magnitude maps to the most negative level: reproduced exactly
    (up to the float16 rounding of d) in one-level formats."""
    w = weight()
    for name in ("q4_0", "q5_0", "q8_0"):
        dense = part_of(w, name).dense()
        assert abs(float(dense[0, 3]) - 0.3) < 0.3 * 1e-3, name


def test_loading_rejects_fields_that_do_not_fit():
    part = part_of(weight(), "q4_k")
    tensors, meta = part.state()
    bad = dict(tensors, d=tensors["d"][:, :1].contiguous())
    with pytest.raises(ValueError, match="needs d"):
        part_from_state("blocks", bad, meta)
    with pytest.raises(ValueError, match="stores no m"):
        part_from_state("blocks", dict(part_of(weight(), "q6_k").state()[0], m=tensors["m"]), {**meta, "format": "q6_k"})
    with pytest.raises(ValueError, match="blocks of 256"):
        part_from_state("blocks", tensors, {**meta, "shape": [8, 480]})
    with pytest.raises(ValueError, match="format"):
        part_from_state("blocks", tensors, {**meta, "format": "q4_k_m"})


def test_fallback_follows_llama_cpp_for_rows_off_the_256_grid():
    assert format_for_width(block_format("q4_k"), 576).name == "q5_0"
    assert format_for_width(block_format("q5_k"), 576).name == "q5_1"
    assert format_for_width(block_format("q6_k"), 576).name == "q8_0"
    assert format_for_width(block_format("q3_k"), 576).name == "q4_0"  # as llama-cpp-python 0.3.36 quantizes it
    assert format_for_width(block_format("q4_k"), 1536).name == "q4_k"
    assert format_for_width(block_format("q4_0"), 100) is None


def test_format_settings_conflict_and_refusals():
    with pytest.raises(RecipeError, match="fixes the grid; drop bits"):
        tp.Recipe(stages=[{"method": "rtn", "format": "q4_k", "bits": 3}])
    with pytest.raises(RecipeError, match="needs a format"):
        tp.Recipe(stages=[{"method": "gptq", "format_overrides": {"v_proj": "q6_k"}}])
    with pytest.raises(RecipeError, match="fixes the grid; drop group_size"):
        tp.Recipe(stages=[{"method": "spqr", "format": "q4_0", "group_size": 64}])


def test_rtn_format_on_a_model(tiny_llama):
    """Tiny model: 64 inputs (q/k/v/o, gate/up) and 160 (down) are no multiple of 256, so q4_k
    falls back to q5_0 everywhere, as llama.cpp does; an override gives v_proj q8_0."""
    recipe = tp.Recipe(stages=[{"method": "rtn", "format": "q4_k", "format_overrides": {"v_proj": "q8_0"}}])
    res = tp.compress(tiny_llama, recipe)
    formats = {name: m.parts[0].fmt.name for name, m in res.model.model.named_modules() if hasattr(m, "parts")}
    assert {f for n, f in formats.items() if "v_proj" in n} == {"q8_0"}
    assert {f for n, f in formats.items() if "v_proj" not in n} == {"q5_0"}


def _output_error(w, xtx, dense):
    d = dense - w
    return float(((d @ xtx) * d).sum())


@pytest.mark.parametrize("name", ["q4_0", "q4_k", "q3_k", "iq4_nl"])
def test_gptq_on_a_fixed_block_grid_beats_rounding(name):
    """GPTQ's column loop on the same fixed grid: same scales as RTN, codes chosen with error
    feedback, so the layer's output error on correlated inputs is lower."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2048, 256, generator=g) @ (torch.eye(256) + 0.3 * torch.randn(256, 256, generator=g))
    xtx = x.T @ x
    w = torch.randn(16, 256, generator=g) * 0.02
    grid = fit_block_grid(w, block_format(name))
    rtn = BlockPart(quantize_to_blocks(w, grid), grid)
    result = gptq(w, xtx, 4, None, True, fixed=grid)
    assert result.grid is grid
    ours = BlockPart(result.codes, grid)
    assert _output_error(w, xtx, ours.dense()) < 0.8 * _output_error(w, xtx, rtn.dense())
