"""The machinery every compressed KV cache shares.

A cache is a ``transformers`` :class:`~transformers.Cache` whose layers are :class:`KVLayer`
objects. ``transformers`` calls ``layer.update(keys, values)`` with the new tokens' states (after
rotary embedding, shape ``(batch, kv_heads, new_tokens, head_dim)``) and attends over what it
returns. Eviction and merging mean the returned keys are no longer the contiguous sequence
``0 .. seen-1`` that ``transformers``' masks assume, so the model runs with a small attention
function of ours (registered as ``"tensorpress_kv"``) that

- builds the causal/padding mask from the logical positions of the tokens a layer returned
  (padding masks come from ``transformers`` over the logical length ``seen + new`` and are
  gathered at those positions), and
- hands the queries back to the layer after attention, for methods that score tokens by the
  attention they receive (H2O, SnapKV, MiKV).

Outside a tensorpress cache the function is plain SDPA, so a model switched to it behaves as before.

Every layer reports ``nbytes()``: the bytes of the tensors it holds (codes, scales, zeros,
indices, kept states, factors), so a cache's size is measured, not computed from a formula.
"""

from __future__ import annotations

import contextvars
from abc import abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from transformers.cache_utils import Cache, CacheLayerMixin

from tensorpress.errors import CacheConfigError

ATTENTION_NAME = "tensorpress_kv"
STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class CacheSettings(BaseModel):
    """Settings every cache takes. ``dtype`` is how full-precision states are stored (the
    uncompressed reference is a 16-bit cache, as in serving)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"


class EvictionSettings(CacheSettings):
    """Token budget: ``ratio`` of the tokens seen so far is kept (at least ``window + sinks``)."""

    ratio: float = Field(0.25, gt=0.0, le=1.0, description="fraction of the tokens kept")
    window: int = Field(32, ge=0, description="most recent tokens always kept")
    sinks: int = Field(0, ge=0, description="first tokens always kept (attention sinks)")

    def budget(self, seen: int) -> int:
        return min(seen, max(int(round(self.ratio * seen)), self.window + self.sinks, 1))


@dataclass
class Step:
    """What a layer returned for the current forward call, for the attention function."""

    layer: KVLayer
    start: int  # logical position of the first new token (= tokens seen before this call)
    new: int  # new tokens in this call
    keys: torch.Tensor  # (B, H, K, d), the object the model attends over
    index: torch.Tensor | None  # (B|1, H|1, K) logical positions; None = 0..K-1 in order


_STEP: contextvars.ContextVar[Step | None] = contextvars.ContextVar("tensorpress_kv_step", default=None)


def nbytes_of(tensors: Iterable[torch.Tensor | None]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class KVLayer(CacheLayerMixin):
    """One decoder layer's cache. Subclasses store states in ``append`` and list what they hold
    in ``held``; the new tokens must come last in what ``append`` returns (the attention mask
    relies on it)."""

    is_compileable = False
    is_croppable = False
    supports_early_init = False
    is_sliding = False

    def __init__(self, settings: CacheSettings, layer_idx: int, cache: KVCache | None = None):
        super().__init__()
        self.settings = settings
        self.layer_idx = layer_idx
        self.cache = cache
        self.seen = 0
        self.store_dtype = STORE_DTYPES[settings.dtype]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch, self.heads, _, self.head_dim = key_states.shape
        self.value_dim = value_states.shape[-1]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[0] != self.batch:
            raise CacheConfigError(f"cache was filled with batch size {self.batch}, got {key_states.shape[0]}; "
                                   "make a new cache per batch")
        start, new = self.seen, key_states.shape[-2]
        keys, values, index = self.append(key_states, value_states, start)
        self.seen += new
        keys, values = keys.to(self.dtype), values.to(self.dtype)
        _STEP.set(Step(self, start, new, keys, index))
        return keys, values

    @abstractmethod
    def append(self, keys: torch.Tensor, values: torch.Tensor, start: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store the new states; return (keys, values, logical index) to attend over now."""

    def after_attention(self, step: Step, query: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> None:
        """Called with the queries once attention is computed (scoring and eviction)."""

    @abstractmethod
    def held(self) -> Iterable[torch.Tensor | None]:
        """Every tensor this layer keeps between calls."""

    @abstractmethod
    def clear(self) -> None:
        """Drop all stored states."""

    def nbytes(self) -> int:
        return nbytes_of(self.held())

    def dense_nbytes(self) -> int:
        """What an uncompressed cache in the storage dtype would hold for the tokens seen."""
        if not self.is_initialized:
            return 0
        itemsize = torch.empty((), dtype=self.store_dtype).element_size()
        return self.batch * self.heads * self.seen * (self.head_dim + self.value_dim) * itemsize

    # -- transformers' Cache protocol -------------------------------------------------------------
    def get_seq_length(self) -> int:
        return self.seen  # logical length: positions and masks continue from here

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.clear()
        self.seen = 0
        self.is_initialized = False

    def _unsupported(self, what: str):
        raise CacheConfigError(f"{type(self).__name__} does not support {what}; use greedy or sampling "
                               "generation with one cache per batch")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._unsupported("beam search (reorder_cache)")

    def crop(self, tokens_to_remove: int) -> None:
        self._unsupported("cropping (assisted generation)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._unsupported("repeating the batch (num_return_sequences > 1)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._unsupported("selecting batch entries")

    def offload(self):
        pass

    def prefetch(self):
        pass


class KVCache(Cache):
    """A ``transformers`` cache made of :class:`KVLayer` objects, with byte accounting."""

    def __init__(self, name: str, settings: CacheSettings, layers: list[KVLayer]):
        super().__init__(layers=layers)
        self.name = name
        self.settings = settings
        for layer in layers:
            layer.cache = self

    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds, metadata (scales, zeros, indices, factors) included."""
        return sum(layer.nbytes() for layer in self.layers)

    def dense_nbytes(self) -> int:
        """Bytes an uncompressed cache in the same storage dtype would hold for the same tokens."""
        return sum(layer.dense_nbytes() for layer in self.layers)

    def compression(self) -> float:
        """Measured bytes ratio against the uncompressed cache (``dense_nbytes / nbytes``)."""
        held = self.nbytes()
        return self.dense_nbytes() / held if held else float("nan")

    def __repr__(self) -> str:
        return f"KVCache({self.name}, {self.settings!r}, layers={len(self.layers)})"


# -- attention --------------------------------------------------------------------------------------


def step_mask(step: Step, attention_mask: torch.Tensor | None, q_len: int) -> torch.Tensor | None:
    """Boolean mask (True = attend) for the current step, broadcastable to (B, H, q, K); None = all."""
    k_len = step.keys.shape[-2]
    device = step.keys.device
    if attention_mask is None or attention_mask.dtype != torch.bool:
        if q_len == 1:
            return None
        # Stored tokens all precede the new ones, which come last and in order: a causal tail.
        old = k_len - q_len
        return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=old)
    mask = attention_mask[:, 0]  # (B, q, L) over logical positions 0..start+q-1
    if step.index is None:
        gathered = mask[:, None, :, -k_len:]
    else:
        _b, h, k = step.index.shape[0], step.index.shape[1], step.index.shape[2]
        batch = mask.shape[0]
        idx = step.index.expand(batch, h, k)[:, :, None, :].expand(batch, h, q_len, k)
        gathered = torch.gather(mask[:, None].expand(batch, h, q_len, mask.shape[-1]), 3, idx)
    # A query that may see nothing (a left-pad position) attends to everything instead of
    # producing NaN; its output is never used.
    empty = ~gathered.any(dim=-1, keepdim=True)
    return gathered | empty


def expand_heads(mask: torch.Tensor | None, groups: int) -> torch.Tensor | None:
    if mask is None or mask.dim() < 4 or mask.shape[1] == 1 or groups == 1:
        return mask
    return mask.repeat_interleave(groups, dim=1)


def attention_received(query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None, scaling: float,
                       last: int | None = None, chunk_bytes: int = 64 << 20) -> torch.Tensor:
    """Attention probability each key receives, summed over queries (the last ``last`` only, if
    given) and over the query heads sharing its KV head: ``(B, kv_heads, K)`` float32."""
    b, hq, q, d = query.shape
    hkv, k = keys.shape[1], keys.shape[2]
    groups = hq // hkv
    first = 0 if last is None else max(q - last, 0)
    kt = keys.float().reshape(b * hkv, k, d).transpose(1, 2)  # (B*Hkv, d, K)
    total = torch.zeros(b, hkv, k, dtype=torch.float32, device=keys.device)
    rows = max(1, chunk_bytes // max(1, b * hq * k * 4))
    for lo in range(first, q, rows):
        hi = min(q, lo + rows)
        n = hi - lo
        # Query heads g*j .. g*j+g-1 share KV head j (transformers' repeat_kv order).
        qs = query[:, :, lo:hi].float().reshape(b * hkv, groups * n, d)
        logits = torch.bmm(qs, kt).mul_(scaling).view(b, hkv, groups, n, k)
        if mask is not None:
            m = mask[..., lo:hi, :]
            m = m.view(m.shape[0], m.shape[1], 1, n, k) if m.dim() == 4 else m.view(1, 1, 1, n, k)
            logits.add_(torch.zeros(m.shape, dtype=logits.dtype, device=logits.device).masked_fill_(~m, float("-inf")))
        total += torch.softmax(logits, dim=-1).sum(dim=(2, 3))
    return total


def tensorpress_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                          **kwargs: Any):
    """``transformers`` attention interface: SDPA over what a tensorpress cache layer returned."""
    step = _STEP.get()
    if step is None or step.keys is not key or step.layer.layer_idx != getattr(module, "layer_idx", None):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    _STEP.set(None)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    q_len = query.shape[2]
    mask = step_mask(step, attention_mask, q_len)
    groups = query.shape[1] // key.shape[1]
    # Nothing stored before and no padding: plain causal attention, without materialising a mask.
    causal = mask is not None and mask.dim() == 2 and key.shape[2] == q_len
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=None if causal else expand_heads(mask, groups),
                                         is_causal=causal, scale=scaling, enable_gqa=groups > 1)
    step.layer.after_attention(step, query, mask, scaling)
    return out.transpose(1, 2).contiguous(), None


def install(model: torch.nn.Module) -> None:
    """Register the attention function (once) and switch ``model`` to it."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if ATTENTION_NAME not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, tensorpress_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)
    if model.config._attn_implementation != ATTENTION_NAME:
        model.set_attn_implementation(ATTENTION_NAME)
        if model.config._attn_implementation != ATTENTION_NAME:
            raise CacheConfigError(f"{type(model).__name__} cannot switch its attention implementation, so "
                                   "tensorpress KV caches cannot drive it (it needs transformers' AttentionInterface)")


# -- rotary embedding ------------------------------------------------------------------------------


def rotary_frequencies(model: torch.nn.Module) -> torch.Tensor:
    """The rotary frequencies (``inv_freq``, (rotary_dim/2,)) of a model's attention."""
    found = [m.inv_freq for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]
    if not found:
        raise CacheConfigError(f"{type(model).__name__} has no rotary position embedding (no module with "
                               "inv_freq); pre_rope needs one")
    if any(f.shape != found[0].shape or not torch.equal(f, found[0]) for f in found[1:]):
        raise CacheConfigError(f"{type(model).__name__} uses several different rotary embeddings; pre_rope "
                               "supports models with one")
    return found[0].detach().float().cpu()


class Rotary:
    """Undo and redo a rotate-half rotary embedding on cached keys, token ``t`` at angle
    ``t * inv_freq`` over the first ``2 * len(inv_freq)`` channels.

    Undoing uses the same tables as redoing, so the round trip is exact up to float32 rounding
    whatever the model's own position ids were (left padding shifts them by a constant per row,
    which only turns the stored keys by a fixed angle per channel pair)."""

    def __init__(self, inv_freq: torch.Tensor):
        self.inv_freq = inv_freq.float()
        self.dims = 2 * inv_freq.numel()
        self.cos: torch.Tensor | None = None  # (T, dims) float32
        self.sin: torch.Tensor | None = None

    def _tables(self, end: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cos is None or self.cos.shape[0] < end or self.cos.device != device:
            n = max(end, 256, 0 if self.cos is None else 2 * self.cos.shape[0])
            angle = torch.arange(n, dtype=torch.float32)[:, None] * self.inv_freq[None]
            angle = torch.cat([angle, angle], dim=-1)
            self.cos, self.sin = angle.cos().to(device), angle.sin().to(device)
        return self.cos, self.sin

    def apply(self, x: torch.Tensor, start: int, inverse: bool = False) -> torch.Tensor:
        """Rotate ``x`` (..., T, d), token i at position ``start + i``, back if ``inverse``; float32 out."""
        n, d = x.shape[-2], x.shape[-1]
        if self.dims > d:
            raise CacheConfigError(f"rotary embedding spans {self.dims} channels but the head dimension is {d}")
        cos, sin = self._tables(start + n, x.device)
        cos, sin = cos[start:start + n], sin[start:start + n]
        x = x.float()
        r = x[..., :self.dims]
        half = self.dims // 2
        turned = torch.cat([-r[..., half:], r[..., :half]], dim=-1)  # rotate_half
        out = r * cos - turned * sin if inverse else r * cos + turned * sin
        return torch.cat([out, x[..., self.dims:]], dim=-1) if self.dims < d else out


# -- token stores --------------------------------------------------------------------------------


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x`` (B, H, T, d) at token indices ``idx`` (B, H, K) -> (B, H, K, d)."""
    return torch.gather(x, 2, idx[..., None].expand(*idx.shape, x.shape[-1]))


class TokenStore:
    """Kept tokens of one layer in the storage dtype, with their logical positions per head."""

    def __init__(self, dtype: torch.dtype, positions: bool = True):
        self.dtype = dtype
        self.positions = positions  # False: tokens stay 0..T-1 in order, no index is kept
        self.keys: torch.Tensor | None = None  # (B, H, T, d)
        self.values: torch.Tensor | None = None
        self.index: torch.Tensor | None = None  # (B, H, T) int32 logical positions

    def __len__(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def add(self, keys: torch.Tensor, values: torch.Tensor, start: int) -> None:
        b, h, n, _ = keys.shape
        self.extend(keys, values, torch.arange(start, start + n, dtype=torch.int32, device=keys.device).expand(b, h, n))

    def extend(self, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor) -> None:
        """Append tokens with their logical positions ``pos`` (B, H, n)."""
        pos = pos.to(torch.int32)
        keys, values = keys.to(self.dtype), values.to(self.dtype)
        if self.keys is None:
            self.keys, self.values = keys, values
            self.index = pos.contiguous() if self.positions else None
        else:
            self.keys = torch.cat([self.keys, keys], dim=2)
            self.values = torch.cat([self.values, values], dim=2)
            self.index = torch.cat([self.index, pos], dim=2) if self.positions else None

    def pop_front(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Remove the first ``n`` tokens and return their (keys, values, positions)."""
        out = (self.keys[:, :, :n], self.values[:, :, :n], self.index[:, :, :n])
        self.keys = self.keys[:, :, n:].contiguous()
        self.values = self.values[:, :, n:].contiguous()
        self.index = self.index[:, :, n:].contiguous()
        return out

    def keep(self, idx: torch.Tensor) -> None:
        """Keep tokens ``idx`` (B, H, K), sorted so the order stays chronological."""
        idx = idx.sort(dim=-1).values
        self.keys = gather_tokens(self.keys, idx)
        self.values = gather_tokens(self.values, idx)
        self.index = torch.gather(self.index, 2, idx)

    def held(self) -> list[torch.Tensor | None]:
        return [self.keys, self.values, self.index]

    def clear(self) -> None:
        self.keys = self.values = self.index = None


class FullLayer(KVLayer):
    """The uncompressed reference: every token in the storage dtype."""

    def __init__(self, settings: CacheSettings, layer_idx: int, cache: KVCache | None = None):
        super().__init__(settings, layer_idx, cache)
        self.clear()

    def append(self, keys, values, start):
        self.store.add(keys, values, start)
        return self.store.keys, self.store.values, None

    def held(self):
        return self.store.held()

    def clear(self) -> None:
        self.store = TokenStore(self.store_dtype, positions=False)
