"""``CodebookPart``: non-uniform quantization, each weight an index into a table of levels.

``W_hat[r, c] = codebook[row_table(r), codes[r, c]] * scale[r, c // group]``:

* ``codebook`` float16 ``(T, K)``: ``T = 1`` (one table for the tensor, as SqueezeLLM's
  per-tensor k-means) or ``T = out`` (one per output row); ``K = 2**bits`` levels;
* ``scales`` float16 ``(out, G)`` or none: NF4 stores normalised levels in ``[-1, 1]`` and one
  absmax scale per group; k-means tables hold the weight values themselves.

``nbits`` counts ``bits`` per code, 16 per level and 16 per scale.
"""

from __future__ import annotations

from typing import Any

import torch

from tensorpress.parts.base import Part, dtype_bits, register_part
from tensorpress.parts.coded import CodesStorage
from tensorpress.parts.meta import CodebookMeta
from tensorpress.parts.quant_math import effective_group, expand_groups, num_groups

# The 16 levels of NF4 (Dettmers et al., QLoRA): quantiles of a standard normal, rescaled to
# [-1, 1], with an exact zero.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


@register_part
class CodebookPart(CodesStorage, Part):
    kind = "codebook"
    meta_schema = CodebookMeta

    def __init__(
        self,
        codes: torch.Tensor,
        codebook: torch.Tensor,
        scales: torch.Tensor | None = None,
        group_size: int | None = None,
    ) -> None:
        super().__init__(*codes.shape)
        levels = codebook.shape[1]
        if levels & (levels - 1) or not 2 <= levels <= 256:
            raise ValueError(f"a codebook needs a power-of-two number of levels in 2..256, got {levels}")
        if codebook.shape[0] not in (1, codes.shape[0]):
            raise ValueError(f"codebook has {codebook.shape[0]} tables; expected 1 or {codes.shape[0]}")
        self.bits = levels.bit_length() - 1
        self.group_size = group_size
        self.register_buffer("codes", codes.to(torch.uint8).contiguous())
        self.register_buffer("codebook", codebook.to(torch.float16).contiguous())
        self.register_buffer("scales", None if scales is None else scales.to(torch.float16).contiguous())

    def dense(self) -> torch.Tensor:
        table = self.codebook.float()
        if table.shape[0] == 1:
            w = table[0][self.codes.long()]
        else:
            w = torch.gather(table, 1, self.codes.long())
        if self.scales is not None:
            group = effective_group(self.in_features, self.group_size)
            w = w * expand_groups(self.scales.float(), self.in_features, group)
        return w

    def nbits(self) -> int:
        total = self.codes_nbits() + self.codebook.numel() * dtype_bits(self.codebook.dtype)
        if self.scales is not None:
            total += self.scales.numel() * dtype_bits(self.scales.dtype)
        return total

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        codes, coding = self.codes_state()
        tensors = {"codes": codes, "codebook": self.codebook}
        if self.scales is not None:
            tensors["scales"] = self.scales
        return tensors, {"shape": list(self.shape), "group_size": self.group_size, "bits": self.bits, **coding}

    @classmethod
    def code_bits(cls, meta: dict[str, Any]) -> dict[str, int]:
        return {"codes": int(meta["bits"])} if "bits" in meta and not meta.get("codes_coding") else {}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> CodebookPart:
        out_f, in_f = meta["shape"]
        codebook = tensors["codebook"]
        bits = codebook.shape[1].bit_length() - 1
        codes, coded = cls.codes_from_state(tensors["codes"], meta, bits, (out_f, in_f))
        scales = tensors.get("scales")
        groups = (out_f, num_groups(in_f, meta["group_size"]))
        if scales is not None and (tuple(scales.shape) != groups or scales.dtype != torch.float16):
            raise ValueError(f"scales are {scales.dtype} {tuple(scales.shape)}, groups of {meta['group_size']} need float16 {groups}")
        if codebook.shape[0] not in (1, out_f) or codebook.shape[1] != 1 << bits:
            raise ValueError(f"a codebook of shape {tuple(codebook.shape)} fits no {out_f}-row weight of {bits}-bit codes")
        part = cls(codes, codebook, scales, meta["group_size"])
        part._coded_codes = coded
        return part

    def describe(self) -> str:
        tables = "per-tensor" if self.codebook.shape[0] == 1 else "per-row"
        scaled = "" if self.scales is None else (" g" + str(self.group_size) if self.group_size else " per-channel")
        return f"codebook{self.bits} {tables}{scaled}{' coded' if self.codes_coded else ''}"
