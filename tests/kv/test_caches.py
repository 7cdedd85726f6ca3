"""KV caches on tiny models: exactness when nothing is dropped, byte accounting, budgets,
generation with transformers, and clear errors."""

from __future__ import annotations

import pytest
import torch
from conftest import CAUSAL_ARCHS, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import tensorpress.kv as kv
from tensorpress.errors import CacheConfigError
from tensorpress.eval.kv import tensor_bytes
from tensorpress.kv.base import Rotary, rotary_frequencies
from tensorpress.kv.lowrank import allocate_ranks
from tensorpress.kv.merge import merge_pair, slerp
from tensorpress.kv.quant import QBlocks, pack_last, unpack_last

CALIB = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(1))

# Settings under which a cache keeps every token exactly.
LOSSLESS = {
    "full": {},
    "kivi": {"bits": 16, "residual": 0, "group_size": 8},
    "gear": {"bits": 16, "residual": 0, "group_size": 8, "block": 8, "rank": 0, "outliers": 0.0},
    "h2o": {"ratio": 1.0},
    "snapkv": {"ratio": 1.0},
    "knorm": {"ratio": 1.0},
    "streaming": {"window": 200},
    "mikv": {"ratio": 1.0},
    "minicache": {"retain": 1.0, "start": 0},
    "lowrank": {"ratio": 1.0},
}
# Settings that compress, small enough to matter on 40 tokens.
LOSSY = {
    "kivi": {"bits": 2, "residual": 8, "group_size": 8},
    "gear": {"bits": 2, "residual": 0, "group_size": 8, "block": 16, "rank": 2, "outliers": 0.02},
    "h2o": {"ratio": 0.3, "window": 4},
    "snapkv": {"ratio": 0.3, "window": 4, "observe": 4},
    "knorm": {"ratio": 0.3, "window": 4},
    "streaming": {"window": 8, "sinks": 2},
    "mikv": {"ratio": 0.3, "window": 4, "group_size": 8},
    "minicache": {"start": 0, "retain": 0.1},
    "lowrank": {"ratio": 0.5},
}


def make(name, lm, **s):
    return kv.cache(name, lm, calibration=CALIB if name == "lowrank" else None, **s)


def chunked(lm, ids, cache, chunk=10):
    with torch.no_grad():
        return torch.cat([lm.model(ids[:, lo:lo + chunk], past_key_values=cache, use_cache=True).logits
                          for lo in range(0, ids.shape[1], chunk)], dim=1)


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(0))


def test_every_method_is_registered():
    assert set(kv.names()) == set(LOSSLESS) == set(LOSSY) | {"full"}


@pytest.mark.parametrize("name", list(LOSSLESS))
def test_full_budget_gives_the_uncompressed_attention(lm, ids, name):
    with torch.no_grad():
        reference = lm.model(ids).logits
    out = chunked(lm, ids, make(name, lm, dtype="float32", **LOSSLESS[name]))
    assert torch.allclose(out, reference, atol=2e-5, rtol=1e-4), (out - reference).abs().max()


def test_sixteen_bits_is_the_full_cache(lm, ids):
    full = chunked(lm, ids, make("full", lm))
    assert torch.equal(chunked(lm, ids, make("kivi", lm, bits=16, residual=0, group_size=8)), full)


@pytest.mark.parametrize("name", list(LOSSY))
def test_compressing_caches_change_the_output_and_hold_fewer_bytes(lm, ids, name):
    full = make("full", lm)
    reference = chunked(lm, ids, full)
    cache = make(name, lm, **LOSSY[name])
    out = chunked(lm, ids, cache)
    assert not torch.allclose(out, reference, atol=1e-4)
    assert cache.nbytes() < full.nbytes() == cache.dense_nbytes()
    # Later chunks only see the past through the cache; the first chunk is exact.
    assert torch.allclose(out[:, :10], reference[:, :10], atol=1e-5)


@pytest.mark.parametrize("name", list(LOSSY))
def test_nbytes_is_every_tensor_the_cache_holds(lm, ids, name):
    cache = make(name, lm, **LOSSY[name])
    chunked(lm, ids, cache)
    assert cache.nbytes() > 0
    assert cache.nbytes() == tensor_bytes(cache.layers)


@pytest.mark.parametrize("name", ["h2o", "snapkv", "knorm", "mikv"])
def test_eviction_keeps_the_budget(lm, ids, name):
    cache = make(name, lm, ratio=0.25, window=2)
    chunked(lm, ids, cache, chunk=8)
    for layer in cache.layers:
        assert len(layer.store) == round(0.25 * 40)
        index = layer.store.index
        assert (index[..., -2:] == torch.tensor([38, 39], dtype=torch.int32)).all()  # recent window kept
        assert (index.diff(dim=-1) > 0).all()  # chronological, no duplicates
    if name == "mikv":  # the rest is kept at low precision, not dropped
        assert all(layer.low_precision_tokens() == 30 for layer in cache.layers)


def test_streaming_keeps_sinks_and_window(lm, ids):
    cache = make("streaming", lm, window=6, sinks=3)
    chunked(lm, ids, cache, chunk=7)
    expected = torch.tensor([0, 1, 2, 34, 35, 36, 37, 38, 39], dtype=torch.int32)
    for layer in cache.layers:
        assert (layer.store.index == expected).all()


def test_kivi_keeps_a_residual_window_in_full_precision(lm, ids):
    cache = make("kivi", lm, bits=4, residual=8, group_size=8)
    chunked(lm, ids, cache, chunk=5)
    for layer in cache.layers:
        assert 8 <= layer.res_keys.shape[2] < 16
        assert layer.res_keys.shape[2] + layer.quantized_tokens() == 40


@pytest.mark.parametrize("name", ["kivi", "gear"])
@pytest.mark.parametrize("pre_rope", [False, True])
def test_sink_tokens_stay_exact_while_the_rest_is_quantized(lm, ids, name, pre_rope):
    settings = {"bits": 2, "residual": 8, "group_size": 8, "sinks": 3, "pre_rope": pre_rope}
    if name == "gear":
        settings.update(block=8, rank=1, outliers=0.01)
    full, cache = make("full", lm, dtype="float32"), make(name, lm, dtype="float32", **settings)
    chunked(lm, ids, full, chunk=2)  # the sinks arrive over two calls
    chunked(lm, ids, cache, chunk=2)
    for exact, layer in zip(full.layers, cache.layers, strict=True):
        assert len(layer.sinks) == 3
        assert torch.equal(layer.sinks.keys, exact.store.keys[:, :, :3])
        assert torch.equal(layer.sinks.values, exact.store.values[:, :, :3])
        assert len(layer.sinks) + layer.quantized_tokens() + layer.res_keys.shape[2] == 40
        assert layer.quantized_tokens() > 0
    if not pre_rope:  # (pre_rope layers also share the rotation tables, a workspace nbytes leaves out)
        assert cache.nbytes() == tensor_bytes(cache.layers)
    # Sinks taken from a longer first chunk own their storage (a view would keep the chunk alive).
    cache = make(name, lm, dtype="float32", **settings)
    chunked(lm, ids, cache, chunk=10)
    for t in (cache.layers[0].sinks.keys, cache.layers[0].sinks.values):
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    # At 16 bits the same bookkeeping (sinks first, then the store, then the residual, with the
    # rotation of each token's own position) gives the uncompressed attention.
    lossless = dict(settings, bits=16)
    if name == "gear":
        lossless.update(rank=0, outliers=0.0)
    with torch.no_grad():
        reference = lm.model(ids).logits
    out = chunked(lm, ids, make(name, lm, dtype="float32", **lossless), chunk=2)
    assert torch.allclose(out, reference, atol=2e-5, rtol=1e-4), (out - reference).abs().max()


def test_key_bits_set_the_keys_width_apart_from_the_values(lm, ids):
    caches = {kb: make("kivi", lm, bits=2, key_bits=kb, residual=0, group_size=8, dtype="float32") for kb in (2, 8)}
    full = make("full", lm, dtype="float32")
    chunked(lm, ids, full, chunk=8)
    errors = {}
    for kb, cache in caches.items():
        chunked(lm, ids, cache, chunk=8)
        layer, exact = cache.layers[0], full.layers[0]
        assert layer.qkeys.bits == kb and layer.qvalues.bits == 2
        k, v = layer.read_quantized(torch.float32)
        n = k.shape[2]
        errors[kb] = ((k - exact.store.keys[:, :, :n]).abs().max(), (v - exact.store.values[:, :, :n]).abs().max())
        assert cache.nbytes() == tensor_bytes(cache.layers)
    assert errors[8][0] < errors[2][0] / 20  # 8-bit keys: steps 85x finer
    assert torch.equal(errors[8][1], errors[2][1])  # values untouched by key_bits
    assert caches[8].nbytes() > caches[2].nbytes()


def test_sink_tokens_do_not_enter_any_key_group(lm):
    """Kept aside, the first tokens take no part in the first key group's per-channel ranges: a
    first token far off the others' range no longer coarsens their quantization."""
    torch.manual_seed(0)
    keys = torch.randn(1, 2, 16, 8)
    keys[:, :, 0] *= 50.0
    errors = {}
    for sinks in (0, 1):
        cache = kv.cache("kivi", lm, bits=2, residual=0, group_size=8, sinks=sinks, dtype="float32")
        layer = cache.layers[0]
        layer.lazy_initialization(keys, keys)
        layer.append(keys, keys, 0)
        stored, _ = layer.read_quantized(torch.float32)
        errors[sinks] = (stored - keys[:, :, sinks:sinks + stored.shape[2]]).abs()[:, :, 1:7].max()
    assert errors[1] < errors[0] / 5


@pytest.mark.parametrize("name", ["full", "kivi", "h2o", "snapkv", "mikv", "minicache", "streaming"])
@pytest.mark.parametrize("sample", [False, True])
def test_generate_with_batches_of_one_and_two(lm, name, sample):
    s = dict(LOSSLESS[name])
    prompts = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(prompts)
    mask[1, :4] = 0  # left padding in the second row
    prompts[1, :4] = 0
    for batch in (1, 2):
        p, m = prompts[:batch], mask[:batch]
        kwargs = dict(max_new_tokens=6, do_sample=sample, pad_token_id=0, top_k=5)
        torch.manual_seed(0)
        expected = lm.model.generate(p, attention_mask=m, **kwargs)
        torch.manual_seed(0)
        got = lm.model.generate(p, attention_mask=m, past_key_values=make(name, lm, dtype="float32", **s), **kwargs)
        assert got.shape == (batch, 18)
        assert torch.equal(got, expected)
    lossy = make(name, lm, **LOSSY.get(name, {}))
    assert lm.model.generate(prompts, attention_mask=mask, past_key_values=lossy, max_new_tokens=4,
                             do_sample=sample, pad_token_id=0).shape == (2, 16)


@pytest.mark.parametrize("name, bad, fragment", [
    ("h2o", {"ratio": 0.0}, "ratio"),
    ("kivi", {"bits": 1}, "bits"),
    ("kivi", {"key_bits": 5}, "key_bits must be one of"),
    ("kivi", {"residual": 10_000}, "longer than the model's context"),
    ("kivi", {"sinks": 10_000}, "sinks=10000 is longer than the model's context"),
    ("streaming", {"window": 0, "sinks": 0}, "keep nothing"),
    ("kivi", {"group_size": 12}, "multiple of 8"),
    ("snapkv", {"kernel": 4}, "odd"),
    ("h2o", {"budget": 3}, "budget"),
    ("nope", {}, "unknown KV cache 'nope'"),
])
def test_bad_settings_raise_clear_errors(lm, name, bad, fragment):
    with pytest.raises(CacheConfigError, match=fragment):
        kv.cache(name, lm, **bad)


def test_lowrank_needs_calibration_and_encoders_are_refused(lm):
    with pytest.raises(CacheConfigError, match="calibration"):
        kv.cache("lowrank", lm)
    with pytest.raises(CacheConfigError, match="not a causal language model"):
        kv.cache("full", tiny_model("bert"))


def test_beam_search_is_refused(lm, ids):
    with pytest.raises(CacheConfigError, match="beam search"):
        lm.model.generate(ids[:1, :8], past_key_values=make("h2o", lm), num_beams=2, max_new_tokens=3, pad_token_id=0)


def test_model_without_tensorpress_cache_is_unchanged(lm, ids):
    kv.cache("full", lm)  # switches the attention function
    with torch.no_grad():
        plain = lm.model(ids).logits
    lm.model.set_attn_implementation("sdpa")
    with torch.no_grad():
        assert torch.allclose(lm.model(ids).logits, plain, atol=1e-6)


# -- the math, without a model --------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8]), rows=st.integers(1, 4), groups=st.integers(1, 4), seed=st.integers(0, 99))
def test_pack_unpack_round_trip(bits, rows, groups, seed):
    codes = torch.randint(0, 2**bits, (rows, 8 * groups), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    planes = pack_last(codes, bits)
    assert sum(p.numel() for p in planes) * 8 == codes.numel() * bits  # exactly `bits` per code
    assert torch.equal(unpack_last(planes, bits), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantization_error_within_half_a_step(bits):
    x = torch.randn(5, 3, 8, 16)
    q = QBlocks.quantize(x, bits, dim=2)
    step = q.scale.float()
    assert ((q.dequantize(torch.float32) - x).abs() <= step / 2 + 1e-3 * step + 1e-3).all()


def test_gear_correction_beats_plain_quantization():
    torch.manual_seed(0)
    base = torch.randn(1, 2, 64, 16) @ torch.randn(16, 16) * 0.3  # correlated channels, low rank-ish error
    base[0, 0, 5, 3] = 40.0  # an outlier that would stretch its group
    errors, outlier = {}, {}
    configs = {"kivi": ("kivi", {}), "gear-r4": ("gear", {"rank": 4, "outliers": 0.01, "block": 64}),
               "gear-full": ("gear", {"rank": 32, "outliers": 0.01, "block": 64})}
    for label, (name, s) in configs.items():
        layer = kv.METHODS[name].layer(kv.settings_for(name, bits=2, group_size=16, residual=0, dtype="float32", **s), 0)
        layer.update(base, base)
        k, _, _ = layer.append(base[:, :, :0], base[:, :, :0], 64)
        errors[label] = (k - base).pow(2).mean().item()
        outlier[label] = (k[0, 0, 5, 3] - 40.0).abs().item()
        if name == "gear":  # 2 x 64 x 16 entries per block: positions fit in 16 bits
            assert all(fix.where.dtype == torch.int16 for fix in layer.fix_k + layer.fix_v)
    assert errors["gear-r4"] < 0.7 * errors["kivi"]
    assert errors["gear-full"] < 1e-4 * errors["kivi"]  # full rank: only float16 rounding is left
    assert outlier["gear-r4"] < 0.05  # kept exactly (float16 of the difference)


def test_gear_outlier_positions_stay_exact_beyond_16_bits():
    """A block of 2 x 512 x 64 entries needs 32-bit positions; the outliers land where they were."""
    layer = kv.METHODS["gear"].layer(kv.settings_for("gear", bits=2, block=512, rank=0, outliers=0.001, dtype="float32"), 0)
    x = torch.randn(1, 2, 512, 64, generator=torch.Generator().manual_seed(0))
    x[0, 1, 500, 60] = 30.0  # flat position 65020, past the int16 range
    fix = layer._correction(x, torch.zeros_like(x))
    assert fix.where.dtype == torch.int32
    fixed = layer._apply_all(torch.zeros_like(x), [fix])
    assert fixed[0, 1, 500, 60] == 30.0
    assert torch.equal(fixed.reshape(-1)[fix.where.long()], x.reshape(-1)[fix.where.long()].half().float())


def test_merge_pair_retains_the_most_different_tokens():
    torch.manual_seed(0)
    a = torch.randn(1, 1, 10, 8)
    b = a.clone()
    b[0, 0, 7] = -a[0, 0, 7]  # opposite direction: the one token to retain
    merged, retained, kdir, knorm, _, _ = merge_pair(a, b, a, b, t=0.5, retain=0.1)
    assert retained.tolist() == [[[7]]]
    assert merged.shape[-1] == 9
    rebuilt = kdir * knorm[..., :1]
    assert torch.allclose(rebuilt, a[:, :, merged[0, 0]], atol=1e-5)  # identical directions merge exactly


def test_slerp_endpoints():
    u, v = torch.nn.functional.normalize(torch.randn(2, 6), dim=-1)
    assert torch.allclose(slerp(u, v, 0.0), u, atol=1e-6)
    assert torch.allclose(slerp(u, v, 1.0), v, atol=1e-6)


def test_rank_allocation_respects_the_budget_and_favours_energy():
    flat = torch.ones(2, 8)  # two heads, eight equal components
    steep = torch.tensor([[8.0, 4, 2, 1, 0.5, 0.2, 0.1, 0.0]] * 2)
    ranks = allocate_ranks([flat, steep], budget=2 * 8, cost=[2, 2])
    # Shares of energy: flat 1/8 per component; steep 0.51, 0.25, 0.127, 0.063, ... The eight
    # components go to the largest shares: steep's first three, then flat's (0.125 each).
    assert ranks == [5, 3]
    assert allocate_ranks([flat, steep], budget=2 * 16, cost=[2, 2]) == [8, 8]


# -- keys quantized before rotary embedding (pre_rope) ------------------------------------------


def test_rotary_matches_the_models_embedding_and_inverts_it(lm):
    rope = lm.model.model.rotary_emb
    x = torch.randn(2, 2, 12, lm.model.config.head_dim, generator=torch.Generator().manual_seed(3))
    positions = torch.arange(5, 17)[None]
    cos, sin = rope(x, positions)
    expected, _ = apply_rotary_pos_emb(x, x, cos, sin)
    rotary = Rotary(rotary_frequencies(lm.model))
    assert torch.allclose(rotary.apply(x, 5), expected, atol=1e-5)
    assert torch.allclose(rotary.apply(rotary.apply(x, 5), 5, inverse=True), x, atol=1e-5)


def test_partial_rotary_leaves_the_other_channels_alone():
    rotary = Rotary(torch.tensor([1.0, 0.1]))  # rotates 4 of 8 channels
    x = torch.randn(1, 1, 6, 8)
    out = rotary.apply(x, 3)
    assert torch.equal(out[..., 4:], x[..., 4:])
    assert not torch.allclose(out[..., :4], x[..., :4])


def _key_projection(lm, ids, layer=0):
    """Keys of one layer before rotary embedding, (B, kv_heads, T, d)."""
    seen = []
    attn = lm.model.model.layers[layer].self_attn
    handle = attn.k_proj.register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        with torch.no_grad():
            lm.model(ids)
    finally:
        handle.remove()
    b, t, _ = seen[0].shape
    return seen[0].view(b, t, -1, lm.model.config.head_dim).transpose(1, 2)


@pytest.mark.parametrize("name", ["kivi", "gear"])
def test_stored_keys_are_the_keys_before_rotation(lm, ids, name):
    settings = {"bits": 8, "residual": 0, "group_size": 8}
    if name == "gear":
        settings.update(block=8, rank=0, outliers=0.0)
    cache = kv.cache(name, lm, pre_rope=True, dtype="float32", **settings)
    with torch.no_grad():
        lm.model(ids, past_key_values=cache, use_cache=True)
    layer = cache.layers[0]
    assert layer.quantized_tokens() == 40
    stored, _ = layer.read_quantized(torch.float32)
    keys = _key_projection(lm, ids)
    step = (keys.amax() - keys.amin()) / 255  # 8-bit step bound over any group's range
    assert (stored - keys).abs().max() <= step
    # Without pre_rope the store holds rotated keys, far from the projection.
    plain = kv.cache(name, lm, dtype="float32", **settings)
    with torch.no_grad():
        lm.model(ids, past_key_values=plain, use_cache=True)
    rotated, _ = plain.layers[0].read_quantized(torch.float32)
    assert (rotated - keys).abs().max() > 10 * step


@pytest.mark.parametrize("name", ["kivi", "gear"])
def test_pre_rope_cache_attends_over_the_rotated_keys(lm, ids, name):
    settings = {"bits": 8, "residual": 8, "group_size": 8}
    if name == "gear":
        settings.update(block=8, rank=1, outliers=0.01)
    with torch.no_grad():
        reference = lm.model(ids).logits
    out = []
    cache = kv.cache(name, lm, pre_rope=True, **settings)
    with torch.no_grad():
        for lo in range(0, 40, 10):
            out.append(lm.model(ids[:, lo:lo + 10], past_key_values=cache, use_cache=True).logits)
    out = torch.cat(out, dim=1)
    assert (out - reference).abs().max() < 0.05  # 8-bit error only, no stray rotation
    assert cache.nbytes() < cache.dense_nbytes()


def test_pre_rope_needs_rotary_embeddings():
    gpt2 = tiny_model("gpt2")
    with pytest.raises(CacheConfigError, match="no rotary position embedding"):
        kv.cache("kivi", gpt2, pre_rope=True)


@pytest.mark.parametrize("keys", ["channel", "token"])
def test_mikv_low_precision_tokens_are_the_evicted_states_quantized(lm, ids, keys):
    full = make("full", lm, dtype="float32")
    chunked(lm, ids, full, chunk=8)
    cache = make("mikv", lm, ratio=0.25, window=2, bits=4, group_size=8, keys=keys, dtype="float32")
    chunked(lm, ids, cache, chunk=8)
    layer = cache.layers[0]  # its keys depend on the tokens only, not on what the cache kept
    b, h = layer.batch, layer.heads
    if keys == "channel":  # (n/G, B, H, G, d): G evicted tokens per group; fewer still waiting
        assert layer.lo_keys.dim == 3 and len(layer.pending) < 8
    else:  # (n, B, H, d/G, G)
        assert layer.lo_keys.dim == 4 and len(layer.pending) == 0
    lo = layer.lo_keys.dequantize(torch.float32).permute(1, 2, 0, 3, 4).reshape(b, h, -1, layer.head_dim)
    pos = layer.lo_index.permute(1, 2, 0).long()
    exact = torch.gather(full.layers[0].store.keys, 2, pos[..., None].expand(-1, -1, -1, layer.head_dim))
    step = (exact.amax() - exact.amin()) / 15
    assert lo.shape == exact.shape and 0 < (lo - exact).abs().max() <= step / 2 + 1e-3
    # Pending tokens are exact, and every evicted token is in one of the two stores.
    if len(layer.pending):
        waiting = torch.gather(full.layers[0].store.keys, 2, layer.pending.index.long()[..., None].expand(-1, -1, -1, layer.head_dim))
        assert torch.equal(layer.pending.keys, waiting)
    assert layer.low_precision_tokens() + len(layer.store) == 40


@pytest.mark.parametrize("arch", [a for a in CAUSAL_ARCHS if a != "llama"])
@pytest.mark.parametrize("name", list(LOSSLESS))
def test_every_cache_on_every_causal_family(ids, arch, name):
    """Each cache on each family: at a budget that keeps everything it gives the uncompressed
    attention (sliding-window layers included), or a typed error says why not."""
    model = tiny_model(arch)
    with torch.no_grad():
        reference = model.model(ids).logits
    try:
        cache = make(name, model, dtype="float32", **LOSSLESS[name])
    except CacheConfigError as exc:  # recorded as the family's refusal
        pytest.skip(f"refused: {exc}")
    out = chunked(model, ids, cache)
    assert torch.allclose(out, reference, atol=5e-5, rtol=1e-4), (out - reference).abs().max()
