"""MiniCache: cross-layer merging of the middle-to-deep layers' states.

Adjacent layers ``(a, a+1)`` from layer ``start`` on are paired. When the upper layer of a pair
has attended, the tokens both layers received in that call are merged: each token's key (and
value) directions in the two layers are interpolated on the sphere (SLERP at ``t``), stored once,
and each layer keeps only its own magnitude. The ``retain`` fraction of tokens whose directions
differ most between the two layers (angular distance of keys plus values) stays unmerged in both.
Works after rotary embedding: both layers rotate a token by the same position, so their rotated
directions are comparable and the merged direction is rotated consistently.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from tensorpress.kv.base import CacheSettings, KVLayer, TokenStore, gather_tokens


class MiniCacheSettings(CacheSettings):
    start: int | None = Field(None, ge=0, description="first merged layer (default: half the depth)")
    t: float = Field(0.6, ge=0.0, le=1.0, description="SLERP position between the lower (0) and upper (1) layer")
    retain: float = Field(0.05, ge=0.0, le=1.0, description="fraction of tokens kept unmerged per call")


def slerp(ua: torch.Tensor, ub: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of unit vectors along the last axis."""
    cos = (ua * ub).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    theta = torch.arccos(cos)
    sin = torch.sin(theta)
    safe = sin > 1e-4
    wa = torch.where(safe, torch.sin((1 - t) * theta) / sin.clamp_min(1e-4), torch.full_like(sin, 1 - t))
    wb = torch.where(safe, torch.sin(t * theta) / sin.clamp_min(1e-4), torch.full_like(sin, t))
    out = wa * ua + wb * ub
    return out / out.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def merge_pair(ka, kb, va, vb, t: float, retain: float):
    """Split the tokens of two layers (each (B, H, n, d)) into merged and retained ones.

    Returns (merged index (B, H, m), retained index (B, H, n-m), key directions (B, H, m, d),
    key norms (B, H, m, 2), value directions, value norms)."""
    n = ka.shape[2]
    ka, kb, va, vb = ka.float(), kb.float(), va.float(), vb.float()
    nka, nkb, nva, nvb = (x.norm(dim=-1, keepdim=True).clamp_min(1e-12) for x in (ka, kb, va, vb))
    uka, ukb, uva, uvb = ka / nka, kb / nkb, va / nva, vb / nvb
    distance = torch.arccos((uka * ukb).sum(-1).clamp(-1, 1)) + torch.arccos((uva * uvb).sum(-1).clamp(-1, 1))
    kept = min(n, math.ceil(retain * n))
    order = distance.argsort(dim=-1, descending=True)
    retained, merged = order[..., :kept].sort(-1).values, order[..., kept:].sort(-1).values
    kdir = slerp(gather_tokens(uka, merged), gather_tokens(ukb, merged), t)
    vdir = slerp(gather_tokens(uva, merged), gather_tokens(uvb, merged), t)
    knorm = torch.cat([torch.gather(nka[..., 0], 2, merged)[..., None], torch.gather(nkb[..., 0], 2, merged)[..., None]], -1)
    vnorm = torch.cat([torch.gather(nva[..., 0], 2, merged)[..., None], torch.gather(nvb[..., 0], 2, merged)[..., None]], -1)
    return merged, retained, kdir, knorm, vdir, vnorm


class PairStore:
    """The merged tokens of a layer pair: one direction per token and head, two magnitudes."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.kdir = self.vdir = self.knorm = self.vnorm = self.index = None

    def add(self, kdir, knorm, vdir, vnorm, index) -> None:
        new = [kdir.to(self.dtype), knorm.to(self.dtype), vdir.to(self.dtype), vnorm.to(self.dtype), index.to(torch.int32)]
        if self.kdir is None:
            self.kdir, self.knorm, self.vdir, self.vnorm, self.index = new
        else:
            old = [self.kdir, self.knorm, self.vdir, self.vnorm, self.index]
            self.kdir, self.knorm, self.vdir, self.vnorm, self.index = (torch.cat([o, x], dim=2) for o, x in zip(old, new, strict=True))

    def read(self, which: int, dtype: torch.dtype):
        if self.kdir is None:
            return None
        k = self.kdir.to(dtype) * self.knorm[..., which:which + 1].to(dtype)
        v = self.vdir.to(dtype) * self.vnorm[..., which:which + 1].to(dtype)
        return k, v, self.index.long()

    def held(self):
        return [self.kdir, self.knorm, self.vdir, self.vnorm, self.index]


class MiniCacheLayer(KVLayer):
    """role "plain" (not merged), "lower" or "upper" of a pair sharing ``pair``."""

    def __init__(self, settings: MiniCacheSettings, layer_idx: int, cache=None, role: str = "plain",
                 pair: PairStore | None = None, partner: MiniCacheLayer | None = None):
        super().__init__(settings, layer_idx, cache)
        self.role, self.pair, self.partner = role, pair, partner
        self.clear()

    def clear(self) -> None:
        # plain layers: every token, in order; paired layers: the retained tokens, with positions
        self.kept = TokenStore(self.store_dtype, positions=self.role != "plain")
        self.fresh: tuple[torch.Tensor, torch.Tensor, int] | None = None
        if self.role == "lower" and self.pair is not None:
            self.pair.__init__(self.store_dtype)

    def append(self, keys, values, start):
        if self.role == "plain":
            self.kept.add(keys, values, start)
            return self.kept.keys, self.kept.values, None
        keys_s, values_s = keys.to(self.store_dtype), values.to(self.store_dtype)
        self.fresh = (keys_s, values_s, start)
        parts = []
        merged = self.pair.read(0 if self.role == "lower" else 1, self.dtype)
        if merged is not None:
            parts.append(merged)
        if len(self.kept):
            parts.append((self.kept.keys.to(self.dtype), self.kept.values.to(self.dtype), self.kept.index.long()))
        b, h, n, _ = keys.shape
        pos = torch.arange(start, start + n, device=keys.device).expand(b, h, n)
        parts.append((keys_s.to(self.dtype), values_s.to(self.dtype), pos))
        if len(parts) == 1:
            return keys_s, values_s, None
        return tuple(torch.cat(p, dim=2) for p in zip(*parts, strict=True))

    def after_attention(self, step, query, mask, scaling) -> None:
        if self.role != "upper" or self.partner.fresh is None or self.fresh is None:
            return
        (ka, va, start), (kb, vb, start_b) = self.partner.fresh, self.fresh
        assert start == start_b, "paired layers saw different tokens"
        s = self.settings
        merged, retained, kdir, knorm, vdir, vnorm = merge_pair(ka, kb, va, vb, s.t, s.retain)
        self.pair.add(kdir, knorm, vdir, vnorm, merged + start)
        for layer, k, v in ((self.partner, ka, va), (self, kb, vb)):
            if retained.shape[2]:
                layer.kept.extend(gather_tokens(k, retained), gather_tokens(v, retained), retained + start)
            layer.fresh = None

    def held(self):
        kept = self.kept.held()
        fresh = list(self.fresh[:2]) if self.fresh is not None else []
        pair = self.pair.held() if self.role == "lower" else []  # counted once, by the lower layer
        return [*kept, *fresh, *pair]


def build_layers(settings: MiniCacheSettings, num_layers: int) -> list[MiniCacheLayer]:
    start = num_layers // 2 if settings.start is None else settings.start
    layers: list[MiniCacheLayer] = []
    i = 0
    while i < num_layers:
        if i >= start and i + 1 < num_layers:
            pair = PairStore(torch.float16)
            lower = MiniCacheLayer(settings, i, role="lower", pair=pair)
            upper = MiniCacheLayer(settings, i + 1, role="upper", pair=pair, partner=lower)
            layers += [lower, upper]
            i += 2
        else:
            layers.append(MiniCacheLayer(settings, i))
            i += 1
    return layers
