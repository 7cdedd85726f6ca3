import pytest
import torch

import tensorpress as tp
from conftest import tiny_model
from tensorpress.engine.linears import weight_of
from tensorpress.parts import DensePart


def _outlier_model(arch):
    """A tiny model whose activations have a few large channels, as real LLMs do."""
    lm = tiny_model(arch)
    with torch.no_grad():
        emb = lm.model.get_input_embeddings().weight
        emb[:, :4] *= 20
    return lm


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2", "gpt_neox"])
def test_scaling_alone_is_exact(arch, text_path):
    lm = _outlier_model(arch)
    calib = tp.data.calibration(lm, text_path, samples=4, seq_len=32)
    res = tp.compress(lm, tp.Recipe(stages=[{"method": "awq", "quantize": False}]), calib)
    ids = torch.randint(3, 300, (2, 24))
    torch.testing.assert_close(res.model.model(input_ids=ids).logits, lm.model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    first = next(iter(res.layers))
    scaled = res.model.model.get_submodule(first)
    assert isinstance(scaled.parts[0], DensePart)
    assert not torch.allclose(scaled.dense(), weight_of(lm.model.get_submodule(first)))  # really rescaled


def test_awq_beats_rtn_and_composes_with_gptq(text_path):
    lm = _outlier_model("llama")
    calib = tp.data.calibration(lm, text_path, samples=8, seq_len=32)
    win = tp.data.evaluation(lm, text_path, seq_len=32, windows=4)

    def kl(stages):
        return tp.evaluate(tp.compress(lm, tp.Recipe(stages=stages), calib), reference=lm, data=win).kl

    rtn = kl([{"method": "rtn", "bits": 3, "group_size": 32}])
    awq = kl([{"method": "awq", "bits": 3, "group_size": 32}])
    gptq = kl([{"method": "gptq", "bits": 3, "group_size": 32}])
    both = kl([{"method": "awq", "bits": 3, "group_size": 32, "quantize": False}, {"method": "gptq", "bits": 3, "group_size": 32}])
    assert awq < rtn
    assert both < rtn and gptq < rtn
