"""Token eviction under a budget (H2O, SnapKV, key-norm, StreamingLLM) and MiKV, which keeps the
tokens eviction would drop at low precision instead.

All of them work after rotary embedding: a kept key keeps the rotation of its original position,
which is what the queries of later positions expect, so nothing is re-rotated. Selection is per
KV head (a head keeps the tokens its own query heads attend to, summed over the GQA group), and
every head keeps the same number of tokens so the states stay one tensor.

The budget after ``seen`` tokens is ``ratio * seen`` (at least ``window + sinks``); the current
call always attends over everything it was given, and eviction happens after attention, so the
budget holds between calls.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from tensorpress.kv.base import CacheSettings, EvictionSettings, KVLayer, Step, TokenStore, attention_received
from tensorpress.kv.quant import QBlocks, check_value_groups

INF = float("inf")


class H2OSettings(EvictionSettings):
    recent_fraction: float = Field(0.5, ge=0.0, le=1.0, description="share of the budget given to the newest tokens")


class SnapKVSettings(EvictionSettings):
    observe: int = Field(32, ge=1, description="last prompt queries whose attention selects the tokens")
    # 15 rather than the paper's 7: tokenizers that split numbers into digits make a 5-digit fact
    # 5+ tokens wide (smollm2-135m, passkey 4x at 2k: 18/20 with 7, 20/20 with 15; long-context KL
    # 0.8845 vs 0.8878)
    kernel: int = Field(15, ge=1, description="pooling width over neighbouring tokens (odd)")
    pooling: Literal["max", "avg"] = Field("max", description="how scores are pooled over the kernel")

    @field_validator("kernel")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError(f"kernel must be odd, got {v}")
        return v


class StreamingSettings(CacheSettings):
    window: int = Field(256, ge=0, description="most recent tokens kept")
    sinks: int = Field(4, ge=0, description="first tokens kept (attention sinks)")

    def budget(self, seen: int) -> int:
        return min(seen, self.window + self.sinks)


class MiKVSettings(H2OSettings):
    bits: int = Field(2, description="bits of the tokens eviction would drop (2, 3, 4 or 8)")
    group_size: int = Field(32, ge=8, description="quantization group: evicted tokens per key group (keys='channel'), "
                            "channels per group of a token's values (and keys, with keys='token')")
    keys: Literal["channel", "token"] = Field("channel", description="low-precision keys quantized per channel over "
                                              "group_size evicted tokens (KIVI's layout) or per token")

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if v not in (2, 3, 4, 8):
            raise ValueError(f"bits must be one of (2, 3, 4, 8), got {v}")
        return v


class EvictingLayer(KVLayer):
    """Kept tokens in a :class:`TokenStore`, one score per kept token and head; after attention,
    tokens beyond the budget with the lowest scores go (sinks and the recent window never do)."""

    keeps_scores = True  # False: scores are derived from the kept states when needed

    def __init__(self, settings, layer_idx, cache=None):
        super().__init__(settings, layer_idx, cache)
        self.clear()

    def clear(self) -> None:
        self.store = TokenStore(self.store_dtype)
        self.scores: torch.Tensor | None = None  # (B, H, T) float32

    def append(self, keys, values, start):
        self.store.add(keys, values, start)
        if self.keeps_scores:
            new = torch.full(keys.shape[:3], self.initial_score(), dtype=torch.float32, device=keys.device)
            self.scores = new if self.scores is None else torch.cat([self.scores, new], dim=2)
        return self.store.keys, self.store.values, self.store.index.long()

    def initial_score(self) -> float:
        return 0.0

    def current_scores(self) -> torch.Tensor:
        return self.scores.clone()

    def recent(self, budget: int) -> int:
        return self.settings.window

    def after_attention(self, step: Step, query, mask, scaling) -> None:
        self.score(step, query, mask, scaling)
        self.evict()

    def score(self, step: Step, query, mask, scaling) -> None:
        pass

    def evict(self) -> None:
        total, budget = len(self.store), self.settings.budget(self.seen)
        if total <= budget:
            return
        s = self.current_scores()
        sinks, recent = min(self.settings.sinks, budget), min(self.recent(budget), budget)
        if sinks:
            s[..., :sinks] = INF  # the store is chronological: the first entries are the sinks
        if recent:
            s[..., total - recent:] = INF
        keep = s.topk(budget, dim=-1).indices.sort(dim=-1).values
        self.dropped(keep)
        self.store.keep(keep)
        if self.keeps_scores:
            self.scores = torch.gather(self.scores, 2, keep)

    def dropped(self, keep: torch.Tensor) -> None:
        """Hook for MiKV: called with the kept indices before the store is cut."""

    def held(self):
        return [*self.store.held(), self.scores]


class H2OLayer(EvictingLayer):
    """Heavy hitters: the attention each token has received, accumulated over all queries so far."""

    def recent(self, budget: int) -> int:
        return max(self.settings.window, int(round(budget * self.settings.recent_fraction)))

    def score(self, step, query, mask, scaling) -> None:
        self.scores = self.scores + attention_received(query, step.keys, mask, scaling)


class SnapKVLayer(EvictingLayer):
    """SnapKV: when a prompt (or a chunk of one) arrives, the attention of its last ``observe``
    queries, pooled over neighbouring tokens, picks the tokens to keep; generated tokens enter
    with the highest score and leave oldest-first once the budget is reached."""

    def initial_score(self) -> float:
        return 1e9 + self.seen  # generated tokens: newer first, above any attention share

    def recent(self, budget: int) -> int:
        return max(self.settings.window, min(self.settings.observe, budget))

    def score(self, step, query, mask, scaling) -> None:
        if step.new == 1:
            return
        received = attention_received(query, step.keys, mask, scaling, last=self.settings.observe)
        k = self.settings.kernel
        pool = F.max_pool1d if self.settings.pooling == "max" else F.avg_pool1d
        pooled = pool(received.flatten(0, 1)[:, None], k, stride=1, padding=k // 2).view_as(received)
        self.scores = pooled


class KNormLayer(EvictingLayer):
    """Key-norm: tokens whose keys have the smallest L2 norm draw the most attention (Devoto et
    al., 2024); keep those."""

    keeps_scores = False

    def current_scores(self) -> torch.Tensor:
        return -self.store.keys.float().norm(dim=-1)


class StreamingLayer(EvictingLayer):
    """StreamingLLM: the first ``sinks`` tokens and the last ``window`` tokens."""

    keeps_scores = False

    def current_scores(self) -> torch.Tensor:
        return torch.zeros(self.store.index.shape, dtype=torch.float32, device=self.store.index.device)


class MiKVLayer(H2OLayer):
    """MiKV: H2O's choice decides precision instead of presence. Tokens that would be evicted are
    quantized and stay attendable: values per token in groups of ``group_size`` channels; keys per
    channel over groups of ``group_size`` evicted tokens (key outliers sit in fixed channels, so a
    per-token range would be stretched by them), evicted tokens waiting at storage precision until
    a group is complete, or per token like the values (``keys="token"``)."""

    def clear(self) -> None:
        super().clear()
        per_channel = self.settings.keys == "channel"
        self.lo_keys = QBlocks(self.settings.bits, dim=3 if per_channel else 4)
        self.lo_values = QBlocks(self.settings.bits, dim=4)
        self.lo_index: torch.Tensor | None = None  # (n, B, H) int32, quantized tokens
        self.pending = TokenStore(self.store_dtype)  # evicted, waiting for a whole key group

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        self.kgroup = check_value_groups(self.head_dim, self.settings.group_size)
        self.vgroup = check_value_groups(self.value_dim, self.settings.group_size)

    def low_precision_tokens(self) -> int:
        return (0 if self.lo_index is None else self.lo_index.shape[0]) + len(self.pending)

    def dropped(self, keep: torch.Tensor) -> None:
        total = len(self.store)
        mask = torch.ones(*keep.shape[:2], total, dtype=torch.bool, device=keep.device)
        mask.scatter_(2, keep, False)
        b, h = keep.shape[:2]
        gone = mask.nonzero()[:, 2].view(b, h, -1)  # same count per head; ascending order
        k = torch.gather(self.store.keys, 2, gone[..., None].expand(-1, -1, -1, self.head_dim))
        v = torch.gather(self.store.values, 2, gone[..., None].expand(-1, -1, -1, self.value_dim))
        pos = torch.gather(self.store.index, 2, gone)
        g = self.settings.group_size
        if self.settings.keys == "channel":
            self.pending.extend(k, v, pos)
            n = len(self.pending) // g * g
            if not n:
                return
            k, v, pos = self.pending.pop_front(n)
            qk = k.reshape(b, h, n // g, g, self.head_dim).permute(2, 0, 1, 3, 4)  # (n/G, B, H, G, d)
            self.lo_keys.extend(QBlocks.quantize(qk.contiguous(), self.settings.bits, dim=3))
        else:
            n = gone.shape[2]
            qk = k.permute(2, 0, 1, 3).reshape(n, b, h, self.head_dim // self.kgroup, self.kgroup)
            self.lo_keys.extend(QBlocks.quantize(qk.contiguous(), self.settings.bits, dim=4))
        v = v.permute(2, 0, 1, 3).reshape(n, b, h, self.value_dim // self.vgroup, self.vgroup)
        self.lo_values.extend(QBlocks.quantize(v.contiguous(), self.settings.bits, dim=4))
        pos = pos.permute(2, 0, 1)
        self.lo_index = pos.contiguous() if self.lo_index is None else torch.cat([self.lo_index, pos])

    def append(self, keys, values, start):
        hi_k, hi_v, hi_idx = super().append(keys, values, start)
        ks, vs, idx = [], [], []
        if self.lo_index is not None:
            ks.append(self.lo_keys.tokens(self.dtype))
            vs.append(self.lo_values.tokens(self.dtype))
            idx.append(self.lo_index.permute(1, 2, 0).long())
        if len(self.pending):
            ks.append(self.pending.keys.to(self.dtype))
            vs.append(self.pending.values.to(self.dtype))
            idx.append(self.pending.index.long())
        if not ks:
            return hi_k, hi_v, hi_idx
        # Full-precision tokens (new ones last) after the low-precision ones.
        return (torch.cat([*ks, hi_k.to(self.dtype)], dim=2), torch.cat([*vs, hi_v.to(self.dtype)], dim=2),
                torch.cat([*idx, hi_idx], dim=2))

    def score(self, step, query, mask, scaling) -> None:
        lo = self.low_precision_tokens()
        received = attention_received(query, step.keys, mask, scaling)
        self.scores = self.scores + received[..., lo:]  # only the full-precision tokens compete

    def held(self):
        return [*super().held(), *self.lo_keys.held(), *self.lo_values.held(), self.lo_index, *self.pending.held()]
