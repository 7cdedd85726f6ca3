"""True-sequential compression in one lockstep pass (engine/lockstep.py)."""

import threading
from typing import ClassVar, Literal

import pytest
import torch
from torch import nn

import tensorpress as tp
from conftest import tiny_model
from tensorpress.engine.lockstep import lockstep_pass
from tensorpress.methods import LayerInput, MethodConfig, register_method
from tensorpress.parts import CompressedLinear, DensePart, QuantizedPart
from tensorpress.parts.quant_math import quantize_rtn


@register_method
class _CoarseRecord(MethodConfig):
    """Test-only: records the statistics it was handed and quantizes to 2 bits (so the block
    really changes and later groups' inputs differ from the uncompressed ones)."""

    name: ClassVar[str] = "test_coarse_record"
    needs: ClassVar[frozenset[str]] = frozenset({"xtx"})
    seen: ClassVar[dict] = {}
    fail_on: ClassVar[str | None] = None
    method: Literal["test_coarse_record"] = "test_coarse_record"

    def apply(self, layer: LayerInput):
        if _CoarseRecord.fail_on and layer.name.endswith(_CoarseRecord.fail_on):
            raise RuntimeError(f"refusing {layer.name}")
        _CoarseRecord.seen[layer.name] = layer.stats["xtx"].clone()
        return [QuantizedPart(*quantize_rtn(layer.weight, 2, 16, False))]


def _inputs_in(model, names, ids):
    """X^T X of each named linear's inputs when ``model`` runs on ``ids``."""
    grams = {}

    def hook(module, args, out, name):
        x = args[0].reshape(-1, args[0].shape[-1]).double()
        grams[name] = grams.get(name, 0) + x.T @ x

    handles = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: hook(m, a, o, n)) for n in names]
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    return grams


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_each_group_sees_inputs_through_the_compressed_earlier_groups(batch_size):
    """o_proj's statistics come from q/k/v already compressed, down_proj's from gate/up already
    compressed, block 1's from the compressed block 0: exactly the inputs the final compressed
    model feeds them, whatever the batching."""
    lm = tiny_model("llama")
    calib = tp.data.TokenWindows(torch.randint(3, 300, (5, 16)), "random")
    _CoarseRecord.seen.clear()
    res = tp.compress(lm, tp.Recipe(stages=[{"method": "test_coarse_record"}]), calib, batch_size=batch_size)
    names = sorted(_CoarseRecord.seen)
    assert len(names) == len(res.layers)
    assert all(isinstance(res.model.model.get_submodule(n), CompressedLinear) for n in names)
    assert res.timings["sequential_pass_seconds"] > 0 and "propagate_seconds" not in res.timings
    actual = _inputs_in(res.model.model, names, calib.input_ids)
    original = _inputs_in(lm.model, names, calib.input_ids)
    for name in names:
        torch.testing.assert_close(_CoarseRecord.seen[name], actual[name], rtol=1e-4, atol=1e-3)
    # and the difference is real: o_proj's inputs in the uncompressed model are not those
    o_proj = "model.layers.0.self_attn.o_proj"
    assert not torch.allclose(original[o_proj], actual[o_proj], rtol=1e-3, atol=1e-2)


def test_a_failing_method_stops_the_pass_cleanly():
    lm = tiny_model("llama")
    calib = tp.data.TokenWindows(torch.randint(3, 300, (4, 16)), "random")
    before = threading.active_count()
    _CoarseRecord.fail_on = "layers.1.mlp.up_proj"
    try:
        with pytest.raises(RuntimeError, match="refusing model.layers.1.mlp.up_proj"):
            tp.compress(lm, tp.Recipe(stages=[{"method": "test_coarse_record"}]), calib, batch_size=1)
    finally:
        _CoarseRecord.fail_on = None
    assert threading.active_count() == before  # every worker thread was unwound and joined
    assert not any(isinstance(m, CompressedLinear) for m in lm.model.modules())  # the original is untouched


class _Branchy(nn.Module):
    """A block whose batches take different paths: ``b`` runs only for positive batches."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c, self.unused = (nn.Linear(4, 4) for _ in range(4))

    def forward(self, x):
        y = self.a(x)
        if x.sum() > 0:
            y = self.b(y)
        return (self.c(y),)


def _halve(block, seen):
    def compress_group(members, stats):
        for rel in members:
            seen[rel] = stats["tokens"]
            old = block.get_submodule(rel)
            block.set_submodule(rel, CompressedLinear([DensePart(old.weight * 0.5)], old.bias))
    return compress_group


def test_batches_taking_different_paths_and_unreached_groups():
    block = _Branchy()
    calls = [(torch.full((3, 4), s), (), {}) for s in (1.0, -1.0, 2.0)]
    seen: dict[str, int] = {}
    outputs = lockstep_pass(block, calls, {0: ["a"], 1: ["b"], 2: ["c"], 3: ["unused"]}, frozenset(), _halve(block, seen))
    assert seen == {"a": 9, "b": 6, "c": 9, "unused": 0}  # b only from the two positive batches
    assert all(isinstance(getattr(block, n), CompressedLinear) for n in "abc")
    with torch.no_grad():
        for (x, _, _), (y, _, _) in zip(calls, outputs):
            torch.testing.assert_close(y, block(x)[0])  # outputs are those of the compressed block


def test_an_error_inside_a_batch_is_raised_and_nothing_hangs():
    block = _Branchy()
    calls = [(torch.ones(2, 4), (), {}), (torch.ones(2, 5), (), {})]  # the second has the wrong width
    before = threading.active_count()
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        lockstep_pass(block, calls, {0: ["a"], 2: ["c"]}, frozenset(), _halve(block, {}))
    assert threading.active_count() == before
    assert not any(type(m).__name__ == "_Entry" for m in block.modules())  # the stand-ins were removed


def test_blockwise_order_takes_every_group_from_the_uncompressed_block():
    """``sequential: false`` (the reference implementations' order): inside a block every group's
    statistics come from the uncompressed block; the next block still sees compressed outputs."""
    lm = tiny_model("llama")
    calib = tp.data.TokenWindows(torch.randint(3, 300, (5, 16)), "random")
    _CoarseRecord.seen.clear()
    res = tp.compress(lm, tp.Recipe(stages=[{"method": "test_coarse_record", "sequential": False}]), calib)
    assert "propagate_seconds" in res.timings and "sequential_pass_seconds" not in res.timings
    original = _inputs_in(lm.model, sorted(_CoarseRecord.seen), calib.input_ids)
    o_proj = "model.layers.0.self_attn.o_proj"
    torch.testing.assert_close(_CoarseRecord.seen[o_proj], original[o_proj], rtol=1e-4, atol=1e-3)
    # block 1 is fed by the compressed block 0, not by the original one
    q1 = "model.layers.1.self_attn.q_proj"
    assert not torch.allclose(_CoarseRecord.seen[q1], original[q1], rtol=1e-3, atol=1e-2)
