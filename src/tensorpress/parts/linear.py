"""``CompressedLinear``: a linear layer whose weight is a sum of parts."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from tensorpress.parts.base import Part, dtype_bits


class CompressedLinear(nn.Module):
    """``y = sum(part(x) for part in parts) + bias``, a drop-in for ``nn.Linear``."""

    def __init__(self, parts: list[Part], bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if not parts:
            raise ValueError("a CompressedLinear needs at least one part")
        shapes = {p.shape for p in parts}
        if len(shapes) != 1:
            raise ValueError(f"parts disagree on the weight shape: {sorted(shapes)}")
        self.out_features, self.in_features = parts[0].shape
        self.parts = nn.ModuleList(parts)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._dense_cache: torch.Tensor | None = None  # set by cache_dense(): calibration passes

    @property
    def weight(self) -> torch.Tensor:
        """The effective dense weight (float32), for code that inspects ``.weight``."""
        return self.dense()

    def dense(self) -> torch.Tensor:
        total = self.parts[0].dense()
        for part in self.parts[1:]:
            total = total + part.dense()
        return total

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._dense_cache is not None:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return nn.functional.linear(x, self._dense_cache.to(x.dtype), bias)
        y = None
        for part in self.parts:  # (iterating a ModuleList is cheaper than indexing it: decode calls this per token)
            out = part(x)
            y = out if y is None else y + out
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def cache_dense(self, on: bool) -> None:
        """Compute with a dense weight materialised once (``on``) or from the parts again."""
        self._dense_cache = self.dense() if on else None

    def weight_nbits(self) -> int:
        """Storage of the weight's parts, in bits."""
        return sum(p.nbits() for p in self.parts)

    def bias_nbits(self) -> int:
        return 0 if self.bias is None else self.bias.numel() * dtype_bits(self.bias.dtype)

    def extra_repr(self) -> str:
        kinds = " + ".join(p.describe() for p in self.parts)
        return f"in_features={self.in_features}, out_features={self.out_features}, parts=[{kinds}]"


class CompressedEmbedding(CompressedLinear):
    """An input embedding table held as parts, a drop-in for ``nn.Embedding``: row ``i`` of the
    ``(num_embeddings, embedding_dim)`` weight (``out`` x ``in`` of the parts) is token ``i``'s
    vector, and a lookup decodes only the rows it reads. Quantized along each row, as llama.cpp
    quantizes ``token_embd``. ``scale``: the factor a scaled embedding (transformers'
    ``embed_scale``, Gemma 3's sqrt(hidden)) multiplies every looked-up row by, kept from the
    module it replaces (it is no weight: models rebuild it from their config)."""

    def __init__(self, parts: list[Part], padding_idx: int | None = None, dtype: torch.dtype = torch.float32,
                 scale: float | None = None) -> None:
        super().__init__(parts, None)
        self.padding_idx = padding_idx
        self.out_dtype = dtype  # what the replaced nn.Embedding returned
        self.scale = scale

    @property
    def num_embeddings(self) -> int:
        return self.out_features

    @property
    def embedding_dim(self) -> int:
        return self.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        unique, inverse = torch.unique(flat, return_inverse=True)
        rows = self.parts[0].dense_rows(unique)
        for part in self.parts[1:]:
            rows = rows + part.dense_rows(unique)
        rows = rows[inverse].reshape(*ids.shape, self.in_features).to(self.out_dtype)
        # as the scaled module does: the scale in the output type, then the product
        return rows if self.scale is None else rows * torch.tensor(self.scale).to(self.out_dtype)

    def extra_repr(self) -> str:
        kinds = " + ".join(p.describe() for p in self.parts)
        scale = "" if self.scale is None else f", scale={self.scale:g}"
        return f"num_embeddings={self.out_features}, embedding_dim={self.in_features}{scale}, parts=[{kinds}]"


def embed_scale_of(module: nn.Module) -> float | None:
    """The ``embed_scale`` a scaled embedding module multiplies its rows by (None: plain)."""
    scale = getattr(module, "embed_scale", None)
    if scale is None:
        return None
    return float(scale.item() if isinstance(scale, torch.Tensor) else scale)


class TiedHead(nn.Module):
    """An output head tied to a ``CompressedEmbedding``: ``logits = x @ table.T`` with the
    table's own parts (nothing stored twice; the model's config keeps ``tie_word_embeddings``).
    The table is referenced, not registered, so it is saved once, as the embedding."""

    def __init__(self, table: CompressedEmbedding) -> None:
        super().__init__()
        self.__dict__["table"] = table

    @property
    def in_features(self) -> int:
        return self.table.in_features

    @property
    def out_features(self) -> int:
        return self.table.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.table.dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.table.dense().to(x.dtype))

    def extra_repr(self) -> str:
        return f"tied to the embedding table ({self.out_features} x {self.in_features})"


@contextlib.contextmanager
def dense_weights_cached(module: nn.Module) -> Iterator[None]:
    """Inside the context, every ``CompressedLinear`` under ``module`` computes with a dense
    weight materialised once, instead of rebuilding it from its parts on every call: for code
    that runs the same layers on many batches (the engine's calibration passes). Costs one dense
    copy of those weights while it lasts."""
    layers = [m for m in module.modules() if isinstance(m, CompressedLinear)]
    for layer in layers:
        layer.cache_dense(True)
    try:
        yield
    finally:
        for layer in layers:
            layer.cache_dense(False)
