"""Low-rank channel projection (MatryoshkaKV / CSKV-style): keys and values are stored as their
coordinates on principal directions found on calibration data, per layer and KV head.

The directions are the eigenvectors of the uncentred second moment ``E[x x^T]`` of the states on
calibration text. The rank is chosen per layer (keys and values separately) for a channel budget
``ratio`` of the full head dimension: components are taken greedily by the share of their
layer's energy they capture, which is optimal for the summed relative residual energy since each
layer's eigenvalues are sorted.

Keys are projected after rotary embedding (the cache receives rotated keys). RoPE rotates each
channel pair by a position-dependent angle, which spreads a key's energy within its pair across
positions; the second moment over many positions sees that, so the projection stays valid at any
position, at some cost in rank compared with projecting before rotation.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Iterable

import torch
from pydantic import Field

from tensorpress.errors import CacheConfigError
from tensorpress.kv.base import CacheSettings, KVCache, KVLayer
from tensorpress.progress import track


class LowRankSettings(CacheSettings):
    ratio: float = Field(0.5, gt=0.0, le=1.0, description="fraction of key+value channels kept over all layers")


class MomentLayer(KVLayer):
    """Calibration only: accumulates ``sum x x^T`` per KV head of the states it sees and keeps nothing."""

    def __init__(self, settings, layer_idx, cache=None):
        super().__init__(settings, layer_idx, cache)
        self.mk = self.mv = None

    def append(self, keys, values, start):
        k, v = keys.double(), values.double()
        mk = torch.einsum("bhnd,bhne->hde", k, k)
        mv = torch.einsum("bhnd,bhne->hde", v, v)
        self.mk = mk if self.mk is None else self.mk + mk
        self.mv = mv if self.mv is None else self.mv + mv
        return keys, values, None

    def held(self):
        return []

    def clear(self) -> None:
        pass


def second_moments(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 4):
    """Per layer: (keys (H, d, d), values (H, dv, dv)) second moments on ``windows`` (n, seq_len)."""
    num_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    settings = CacheSettings(dtype="float32")
    totals = None
    for lo in track(range(0, windows.shape[0], batch_size), "KV calibration", total=-(-windows.shape[0] // batch_size)):
        cache = KVCache("moments", settings, [MomentLayer(settings, i) for i in range(num_layers)])
        with torch.no_grad():
            model(input_ids=windows[lo:lo + batch_size], past_key_values=cache, use_cache=True)
        moments = [(layer.mk, layer.mv) for layer in cache.layers]
        totals = moments if totals is None else [(a + c, b + d) for (a, b), (c, d) in zip(totals, moments, strict=True)]
    return totals


def allocate_ranks(spectra: list[torch.Tensor], budget: int, cost: Iterable[int]) -> list[int]:
    """Greedy ranks for matrices with eigenvalue spectra ``spectra[i]`` (H, d) descending per head:
    component j of matrix i captures ``sum_h lambda_hj / sum_h trace_h`` of its energy and costs
    ``cost[i]`` channels. Every matrix keeps at least one component."""
    cost = list(cost)
    gains = [(s.sum(0) / s.sum().clamp_min(1e-30)).tolist() for s in spectra]
    ranks = [1] * len(spectra)
    left = budget - sum(cost)
    heap = [(-g[1], i) for i, g in enumerate(gains) if len(g) > 1]
    heapq.heapify(heap)
    while heap and left > 0:
        _, i = heapq.heappop(heap)
        if cost[i] > left:
            continue
        ranks[i] += 1
        left -= cost[i]
        if ranks[i] < len(gains[i]):
            heapq.heappush(heap, (-gains[i][ranks[i]], i))
    return ranks


def token_digest(ids: torch.Tensor) -> str:
    """sha256 of token ids (their shape, dtype and values): what identifies a calibration set in
    the projection memo, since different sets give different projections whatever they share
    (the same sum, the same shape)."""
    ids = ids.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{tuple(ids.shape)} {ids.dtype}\n".encode())
    digest.update(ids.numpy().tobytes())
    return digest.hexdigest()


def projections(moments, ratio: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, (keys (H, d, rk), values (H, dv, rv)) orthonormal bases for a channel budget ``ratio``."""
    bases, spectra, costs = [], [], []
    for mk, mv in moments:
        for m in (mk, mv):
            evals, evecs = torch.linalg.eigh(m)  # ascending
            spectra.append(evals.flip(-1).clamp_min(0))
            bases.append(evecs.flip(-1))
            costs.append(m.shape[0])  # one channel in each KV head
    total = sum(c * s.shape[-1] for c, s in zip(costs, spectra, strict=True))
    ranks = allocate_ranks(spectra, int(round(ratio * total)), costs)
    out = []
    for i in range(0, len(bases), 2):
        out.append((bases[i][..., :ranks[i]].float().contiguous(), bases[i + 1][..., :ranks[i + 1]].float().contiguous()))
    return out


class LowRankLayer(KVLayer):
    """Stores ``x @ P`` (coordinates on the layer's principal directions) and returns ``c @ P^T``."""

    def __init__(self, settings: LowRankSettings, layer_idx: int, cache=None,
                 basis: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__(settings, layer_idx, cache)
        if basis is None:
            raise CacheConfigError("the lowrank cache needs calibration: pass calibration=<token windows>")
        self.pk, self.pv = (b.to(self.store_dtype) for b in basis)
        self.clear()

    def clear(self) -> None:
        self.ck: torch.Tensor | None = None  # (B, H, T, rk)
        self.cv: torch.Tensor | None = None

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        if self.pk.shape[0] != self.heads or self.pk.shape[1] != self.head_dim:
            raise CacheConfigError(f"calibrated projections are for {self.pk.shape[0]} heads of {self.pk.shape[1]} "
                                   f"channels, the model gives {self.heads} x {self.head_dim}")

    def append(self, keys, values, start):
        pk, pv = self.pk.to(self.dtype), self.pv.to(self.dtype)
        ck = torch.einsum("bhnd,hdr->bhnr", keys, pk).to(self.store_dtype)
        cv = torch.einsum("bhnd,hdr->bhnr", values, pv).to(self.store_dtype)
        self.ck = ck if self.ck is None else torch.cat([self.ck, ck], dim=2)
        self.cv = cv if self.cv is None else torch.cat([self.cv, cv], dim=2)
        old = self.ck.shape[2] - keys.shape[2]
        # Earlier tokens come back from their coordinates; this call's own tokens attend as a
        # full cache in the storage dtype would hold them.
        k_old = torch.einsum("bhnr,hdr->bhnd", self.ck[:, :, :old].to(self.dtype), pk)
        v_old = torch.einsum("bhnr,hdr->bhnd", self.cv[:, :, :old].to(self.dtype), pv)
        k_new, v_new = keys.to(self.store_dtype).to(self.dtype), values.to(self.store_dtype).to(self.dtype)
        return torch.cat([k_old, k_new], dim=2), torch.cat([v_old, v_new], dim=2), None

    def held(self):
        return [self.ck, self.cv, self.pk, self.pv]

    def ranks(self) -> tuple[int, int]:
        return self.pk.shape[-1], self.pv.shape[-1]
