"""KV-cache compression: caches that plug into ``transformers``' ``generate``.

```python
cache = tp.kv.cache("kivi", lm, bits=2, group_size=32, residual=128)
out = lm.model.generate(**inputs, past_key_values=cache, max_new_tokens=64)
cache.nbytes()          # bytes held by the cache's tensors, metadata included
```

Names: ``full`` (uncompressed reference, 16-bit), ``kivi``, ``gear`` (quantized), ``h2o``,
``snapkv``, ``knorm``, ``streaming`` (eviction), ``mikv`` (mixed precision instead of eviction),
``minicache`` (cross-layer merging) and ``lowrank`` (channel projection; needs ``calibration``).
``ratio`` is the fraction kept (tokens for eviction, channels for ``lowrank``). One cache serves
one batch: make a new one per ``generate`` call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import ValidationError

from tensorpress.errors import CacheConfigError
from tensorpress.kv.base import CacheSettings, EvictionSettings, FullLayer, KVCache, KVLayer, Rotary, install, rotary_frequencies
from tensorpress.kv.evict import (
    H2OLayer,
    H2OSettings,
    KNormLayer,
    MiKVLayer,
    MiKVSettings,
    SnapKVLayer,
    SnapKVSettings,
    StreamingLayer,
    StreamingSettings,
)
from tensorpress.kv.lowrank import LowRankLayer, LowRankSettings, projections, second_moments, token_digest
from tensorpress.kv.merge import MiniCacheSettings, build_layers
from tensorpress.kv.quant import GearLayer, GearSettings, KiviLayer, QuantSettings


@dataclass(frozen=True)
class Method:
    settings: type[CacheSettings]
    layer: type[KVLayer] | None  # None: built by a special function (minicache, lowrank)
    summary: str


METHODS: dict[str, Method] = {
    "full": Method(CacheSettings, FullLayer, "uncompressed reference"),
    "kivi": Method(QuantSettings, KiviLayer, "keys per channel, values per token, residual in full precision"),
    "gear": Method(GearSettings, GearLayer, "KIVI + low-rank error + sparse outliers"),
    "h2o": Method(H2OSettings, H2OLayer, "evict by accumulated attention (heavy hitters + recent)"),
    "snapkv": Method(SnapKVSettings, SnapKVLayer, "evict by pooled attention of the prompt's last queries"),
    "knorm": Method(EvictionSettings, KNormLayer, "keep the keys with the smallest L2 norm"),
    "streaming": Method(StreamingSettings, StreamingLayer, "attention sinks + recent window"),
    "mikv": Method(MiKVSettings, MiKVLayer, "H2O's choice at full precision, the rest at low precision"),
    "minicache": Method(MiniCacheSettings, None, "merge adjacent deep layers' states (SLERP)"),
    "lowrank": Method(LowRankSettings, None, "project keys/values on calibrated principal directions"),
}


def names() -> list[str]:
    return list(METHODS)


def settings_for(name: str, **settings: Any) -> CacheSettings:
    if name not in METHODS:
        raise CacheConfigError(f"unknown KV cache {name!r}; known: {', '.join(METHODS)}")
    try:
        return METHODS[name].settings(**settings)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'settings'}: {err['msg']}" for err in e.errors())
        raise CacheConfigError(f"bad settings for KV cache {name!r}: {problems}") from None


def _check_limits(name: str, s: CacheSettings, config: Any) -> None:
    limit = getattr(config, "max_position_embeddings", None)
    if not limit:
        return
    for field in ("residual", "window", "sinks"):
        value = getattr(s, field, None)
        if value is not None and value > limit:
            raise CacheConfigError(f"{name}: {field}={value} is longer than the model's context ({limit} tokens)")
    if name == "streaming" and s.window + s.sinks == 0:
        raise CacheConfigError("streaming: window + sinks is 0, the cache would keep nothing")


def _calibration_ids(calibration: Any) -> torch.Tensor:
    ids = getattr(calibration, "input_ids", calibration)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.numel() == 0:
        raise CacheConfigError("calibration must be token windows (tp.data.calibration(...)) or an "
                               f"(n, seq_len) tensor of token ids, got {type(calibration).__name__}")
    return ids


def cache(name: str, lm: Any, calibration: Any = None, **settings: Any) -> KVCache:
    """A fresh compressed cache for ``lm`` (a :class:`~tensorpress.LoadedModel` or a
    ``transformers`` model); switches the model to tensorpress' attention function, which is
    plain SDPA whenever no tensorpress cache is in use."""
    model = lm if isinstance(lm, torch.nn.Module) else getattr(lm, "model", lm)
    causal = None if isinstance(lm, torch.nn.Module) else getattr(lm, "causal", None)
    if causal is False or not hasattr(model, "generate") or not hasattr(model, "config"):
        raise CacheConfigError(f"{type(model).__name__} is not a causal language model; KV caches need one")
    config = model.config.get_text_config(decoder=True)
    s = settings_for(name, **settings)
    _check_limits(name, s, config)
    install(model)
    num_layers = config.num_hidden_layers
    method = METHODS[name]
    if name == "minicache":
        layers = build_layers(s, num_layers)
    elif name == "lowrank":
        if calibration is None:
            raise CacheConfigError("the lowrank cache needs calibration data: pass calibration=tp.data.calibration(lm, ...)")
        ids = _calibration_ids(calibration)
        key = (id(model), s.ratio, token_digest(ids))  # a digest, not a sum: sets with equal sums differ
        bases = _LOWRANK_MEMO.get(key)
        if bases is None:
            bases = projections(second_moments(model, ids), s.ratio)
            _LOWRANK_MEMO.clear()
            _LOWRANK_MEMO[key] = bases
        layers = [LowRankLayer(s, i, basis=bases[i]) for i in range(num_layers)]
    elif getattr(s, "pre_rope", False):
        rotary = Rotary(rotary_frequencies(model))  # one table shared by every layer
        layers = [method.layer(s, i, rotary=rotary) for i in range(num_layers)]
    else:
        layers = [method.layer(s, i) for i in range(num_layers)]
    return KVCache(name, s, layers)


# Calibrated projections of the last (model, ratio, calibration) asked for: building a cache per
# generate call must not recalibrate each time.
_LOWRANK_MEMO: dict[tuple, list] = {}


def factory(name: str, lm: Any, calibration: Any = None, **settings: Any) -> Callable[[], KVCache]:
    """A function making fresh caches with these settings (validated now)."""
    settings_for(name, **settings)
    return lambda: cache(name, lm, calibration=calibration, **settings)


__all__ = ["KVCache", "METHODS", "cache", "factory", "names", "settings_for"]
