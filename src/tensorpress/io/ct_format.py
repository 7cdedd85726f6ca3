"""Export to compressed-tensors' ``pack-quantized`` checkpoints (what vLLM and llm-compressor
load, and transformers through its compressed-tensors quantizer).

Per quantized linear ``name`` (``W = (q - z) * s`` with ``q`` signed in ``[-2**(b-1), 2**(b-1))``):

* ``name.weight_packed`` int32 ``(out, ceil(in * b / 32))``: ``q + 2**(b-1)`` packed densely
  along rows by the package's own ``pack_to_int32``;
* ``name.weight_scale`` ``(out, G)`` at the export's float type (``G = 1``: per channel);
* ``name.weight_zero_point`` (asymmetric grids only): the signed zero points packed the same
  way along the output dimension, int32 ``(ceil(out * b / 32), G)``;
* ``name.weight_shape`` int64 ``(2,)``.

tensorpress' unsigned codes and zero points map onto these by subtracting ``2**(b-1)`` from
both, so ``(q - z) * s`` is unchanged. compressed-tensors needs groups that divide the rows (it
has no group index); one config group per distinct scheme, each targeting its layers by name;
the linears left uncompressed are listed in ``ignore``.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import torch

from tensorpress.io.hf_quant import IntGrid, float_dtype, plan, write_checkpoint
from tensorpress.models import LoadedModel

FORMAT = "pack-quantized"


def _accepts(grid: IntGrid) -> str | None:
    if not grid.divides:
        return (f"its groups of {grid.group} do not divide its rows of {grid.shape[1]} weights, and compressed-tensors "
                "has no uneven last group; quantize with a group_size that divides every layer's input width "
                "(or export as gptq, whose group index holds uneven groups)")
    return None


def _scheme(grid: IntGrid) -> tuple[int, bool, int | None]:
    """(bits, symmetric, group or None for per channel): layers with the same one share a config group."""
    return grid.bits, grid.symmetric, None if grid.per_channel else grid.group


def export_compressed_tensors(lm: LoadedModel, path: str | os.PathLike, *, dtype: str | None = None,
                              overwrite: bool = False) -> Path:
    """Write ``lm`` as a compressed-tensors ``pack-quantized`` directory whose integer codes
    and scales are tensorpress' own, checked to decode to its weights bit for bit."""
    from compressed_tensors import __version__ as ct_version
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
    )

    torch_dtype = float_dtype(dtype)
    planned = plan(lm, "compressed-tensors", torch_dtype, _accepts)
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    by_scheme: dict[tuple, list[str]] = defaultdict(list)
    for name, grid in planned.grids.items():
        offset = 1 << (grid.bits - 1)
        q = (grid.codes.to(torch.int16) - offset).to(torch.int8)
        entry = {"weight_packed": pack_to_int32(q, grid.bits),
                 "weight_scale": grid.scales.to(torch_dtype),
                 "weight_shape": torch.tensor(grid.shape, dtype=torch.int64)}
        if not grid.symmetric:
            z = (grid.zeros - offset).to(torch.int8)
            entry["weight_zero_point"] = pack_to_int32(z, grid.bits, packed_dim=0)
        tensors[name] = entry
        by_scheme[_scheme(grid)].append(name)
    groups = {}
    for i, ((bits, symmetric, group), names) in enumerate(sorted(by_scheme.items(), key=lambda kv: str(kv[0]))):
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric,
                                strategy="group" if group else "channel", group_size=group)
        groups[f"group_{i}"] = QuantizationScheme(targets=sorted(names), weights=args, format=FORMAT)
    ignore = [n for n in planned.plain if n not in planned.grids] + planned.dense
    config = QuantizationConfig(config_groups=groups, format=FORMAT, quantization_status="compressed",
                                ignore=sorted(set(ignore)))
    qconfig = {"version": ct_version, "quant_method": "compressed-tensors", "sparsity_config": {},
               **config.model_dump(mode="json", exclude={"quant_method"})}
    return write_checkpoint(lm, Path(path), overwrite=overwrite, dtype=torch_dtype, quantized=tensors,
                            quantization_config=qconfig, classes=planned.classes)

