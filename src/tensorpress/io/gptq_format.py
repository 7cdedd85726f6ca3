"""Export to GPTQ checkpoints (``quant_method: gptq``: transformers through gptqmodel, vLLM,
and most GPU runtimes).

Per quantized linear ``name`` of ``out`` x ``in`` weights at ``b`` bits (``p = 32 / b`` codes
per int32; 2, 4 and 8 bits):

* ``name.qweight`` int32 ``(in / p, out)``: code of input ``c`` of output ``r`` in word
  ``c // p`` of column ``r``, bits ``b * (c % p)`` upward;
* ``name.qzeros`` int32 ``(G, out / p)``: zero points packed the same way along outputs —
  stored as ``z - 1`` in ``checkpoint_format: gptq`` (v1, the original AutoGPTQ layout) and as
  ``z`` in ``gptq_v2``;
* ``name.scales`` ``(G, out)`` at the export's float type;
* ``name.g_idx`` int32 ``(in,)``: the group of each input, ``c // group`` (so a shorter last
  group, as in 576 inputs in groups of 128, is held exactly);

and ``W[r, c] = scales[g, r] * (q[c, r] - z[g, r])`` with ``g = g_idx[c]``. Symmetric grids
(zero ``2**(b-1)``) are written as v1; asymmetric ones as v2, since v1's ``z - 1`` cannot hold a
zero point of 0. One ``bits`` / ``group_size`` for the checkpoint: layers on another grid are
listed in the config's ``dynamic`` overrides (gptqmodel's per-module settings, ``+:`` regexes),
linears left uncompressed as ``-:`` entries and, for transformers' loader (optimum, which does
not read ``dynamic``), by ``modules_in_block_to_quantize`` naming every quantized linear.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from pathlib import Path

import torch

from tensorpress.io.hf_quant import IntGrid, float_dtype, plan, write_checkpoint
from tensorpress.models import LoadedModel

log = logging.getLogger(__name__)

BITS = (2, 4, 8)


def _accepts(grid: IntGrid) -> str | None:
    if grid.bits not in BITS:
        return (f"GPTQ checkpoints pack {', '.join(map(str, BITS))}-bit codes into int32 words, not {grid.bits}-bit ones "
                "(3-bit GPTQ packs across words, which is not written); quantize with bits 2, 4 or 8")
    per = 32 // grid.bits
    out_f, in_f = grid.shape
    if in_f % per or out_f % per:
        return f"its {out_f} x {in_f} weight does not pack {per} codes to an int32 along both dimensions"
    return None


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``codes`` (integers in ``[0, 2**bits)``, ``(n, m)``) along dim 0: int32
    ``(n * bits / 32, m)``, code ``i`` of a column in word ``i // p`` at bit ``bits * (i % p)``."""
    per = 32 // bits
    n, m = codes.shape
    c = codes.to(torch.int64).reshape(n // per, per, m)
    shifts = (torch.arange(per, dtype=torch.int64) * bits).view(1, per, 1)
    words = (c << shifts).sum(dim=1)  # < 2**32: fits int64; the top bit becomes int32's sign
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def _scheme(grid: IntGrid) -> tuple[int, int, bool]:
    return grid.bits, -1 if grid.per_channel else grid.group, grid.symmetric


def export_gptq(lm: LoadedModel, path: str | os.PathLike, *, dtype: str | None = None,
                overwrite: bool = False) -> Path:
    """Write ``lm`` as a GPTQ checkpoint directory whose codes and scales are tensorpress' own,
    checked to decode to its weights bit for bit."""
    torch_dtype = float_dtype(dtype)
    planned = plan(lm, "GPTQ", torch_dtype, _accepts)
    schemes = {name: _scheme(grid) for name, grid in planned.grids.items()}
    (bits, group, _), _ = Counter(schemes.values()).most_common(1)[0]
    symmetric = all(s for _, _, s in schemes.values())
    tensors = {}
    for name, grid in planned.grids.items():
        in_f = grid.shape[1]
        zeros = grid.zeros.T.contiguous()  # (G, out)
        if symmetric:
            zeros = zeros - 1  # v1: the original layout stores z - 1 (all zeros are 2**(b-1) here)
        tensors[name] = {
            "qweight": pack_int32(grid.codes.T.contiguous(), grid.bits),
            "qzeros": pack_int32(zeros.T.contiguous(), grid.bits).T.contiguous(),
            "scales": grid.scales.T.to(torch_dtype).contiguous(),
            "g_idx": (torch.arange(in_f) // grid.group).to(torch.int32),
        }
    dynamic: dict[str, dict] = {}
    for name, (b, g, _) in sorted(schemes.items()):
        if (b, g) != (bits, group):
            dynamic[f"+:^{re.escape(name)}$"] = {"bits": b, "group_size": g}
    for name in sorted((set(planned.plain) - set(planned.grids) | set(planned.dense)) - {planned.head}):
        dynamic[f"-:^{re.escape(name)}$"] = {}
    if any(k.startswith("+:") for k in dynamic):
        log.warning("layers on other grids than %d-bit groups of %s are listed in the config's dynamic overrides, which "
                    "gptqmodel's own loader reads and transformers' GPTQ loader (optimum) ignores", bits, group)
    from tensorpress import __version__

    config = {"quant_method": "gptq", "bits": bits, "group_size": group, "sym": symmetric, "desc_act": False,
              "checkpoint_format": "gptq" if symmetric else "gptq_v2", "format": "gptq" if symmetric else "gptq_v2",
              "pack_dtype": "int32", "lm_head": False, "true_sequential": True, "damp_percent": 0.01,
              "static_groups": False, "dynamic": dynamic or None,
              "meta": {"quantizer": [f"tensorpress:{__version__}"]}}
    if any(k.startswith("-:") for k in dynamic):  # optimum converts every block linear unless told which
        config["modules_in_block_to_quantize"] = [sorted(planned.grids)]
    return write_checkpoint(lm, Path(path), overwrite=overwrite, dtype=torch_dtype, quantized=tensors,
                            quantization_config=config, classes=planned.classes, extra_files={"quantize_config.json": config})
