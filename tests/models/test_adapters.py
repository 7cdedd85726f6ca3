import pytest
import torch
import transformers as T

from conftest import ALL_ARCHS, tiny_model
from tensorpress.engine.linears import in_features, is_linear, weight_of
from tensorpress.errors import UnsupportedArchitectureError
from tensorpress.models import adapter_for, supported_model_types


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_adapter_finds_blocks_linears_norm_embeddings_and_head(arch):
    lm = tiny_model(arch)
    adapter, model = lm.adapter, lm.model
    blocks = adapter.blocks(model)
    assert len(blocks) == model.config.num_hidden_layers
    hidden = model.config.hidden_size
    for block in blocks:
        names = adapter.block_linears()
        assert len(names) == len(set(names))
        for rel in names:
            module = block.get_submodule(rel)
            assert is_linear(module), rel
            assert weight_of(module).shape[1] == in_features(module)
        # the first group reads the block's (normed) input: hidden-size wide
        assert all(in_features(block.get_submodule(r)) == hidden for r in adapter.linear_groups[0])
    norm = adapter.final_norm(model)
    if arch == "bert":
        assert norm is None  # post-norm: each block ends with its own LayerNorm
    else:
        assert norm.weight.shape == (hidden,) and not is_linear(norm)
    assert model.get_input_embeddings().weight.shape[1] == hidden
    if lm.causal:
        assert model.get_output_embeddings().weight.shape[0] == model.config.vocab_size
    # the base model runs embeddings + blocks
    out = adapter.base(model)(input_ids=torch.randint(0, 300, (1, 8)))
    assert out.last_hidden_state.shape == (1, 8, hidden)


def test_every_linear_of_a_block_is_covered():
    """No linear inside a block is forgotten by any adapter."""
    for arch in ALL_ARCHS:
        lm = tiny_model(arch)
        block = lm.adapter.blocks(lm.model)[0]
        found = {n for n, m in block.named_modules() if is_linear(m)}
        assert found == set(lm.adapter.block_linears()), arch


def test_unsupported_architecture_lists_the_supported_ones():
    with pytest.raises(UnsupportedArchitectureError) as info:
        adapter_for("t5")
    message = str(info.value)
    assert "'t5' is not supported" in message
    for model_type in ("llama", "gpt2", "opt", "gpt_neox", "bert", "qwen2", "mistral"):
        assert model_type in message
    assert supported_model_types() == sorted(supported_model_types())


def test_mismatched_model_for_adapter_is_an_error():
    model = T.AutoModelForCausalLM.from_config(tiny_model("gpt2").model.config)
    with pytest.raises(UnsupportedArchitectureError, match="block list"):
        adapter_for("llama").blocks(model)
