"""Export to a plain Hugging Face model directory (``save_pretrained`` + tokenizer).

Structurally pruned models are ordinary ``transformers`` models and export as they are.
Compressed linears are materialised as dense ``nn.Linear`` weights (dequantized): the export
then loads anywhere, at the original size of those layers.
"""

from __future__ import annotations

import os
from pathlib import Path

from tensorpress.errors import ExportError
from tensorpress.io.dense import check_loadable, dense_copy, source_classes
from tensorpress.models.experts import fuse_experts
from tensorpress.io.files import atomic_dir, check_output
from tensorpress.models import LoadedModel

__all__ = ["EXPORT_FORMATS", "check_loadable", "dense_copy", "export", "export_hf", "source_classes"]


def export_hf(lm: LoadedModel, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``lm`` as a Hugging Face directory that ``from_pretrained`` loads (atomic)."""
    path = Path(path)
    check_output(path, overwrite)
    check_loadable(lm)
    model = dense_copy(lm.model)
    if lm.adapter.moe is not None:  # experts back into the fused tensors transformers loads
        fuse_experts(lm.adapter.blocks(model), lm.adapter.moe)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    with atomic_dir(path, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
    return path


EXPORT_FORMATS = ("hf", "gguf", "compressed-tensors", "gptq")


def export(lm, path: str | os.PathLike, *, format: str = "hf", overwrite: bool = False,  # noqa: A002 - the CLI's name
           dtype: str | None = None, requantize: bool = False) -> Path:
    """Write ``lm`` (a ``LoadedModel`` or a ``CompressionResult``) in ``format``: ``"hf"`` a
    Hugging Face directory (compressed linears dequantized), ``"gguf"`` a llama.cpp file,
    ``"compressed-tensors"`` (vLLM, llm-compressor) or ``"gptq"`` a quantized Hugging Face
    directory; in the last three the quantized tensors hold tensorpress' codes and scales bit
    for bit. ``dtype``: the float type of everything else (f16 unless given; for the quantized
    directories also the type of the scales, which must hold them exactly), ``requantize``: see
    ``export_gguf``. Atomic: a failed export leaves nothing."""
    lm = getattr(lm, "model", lm) if not isinstance(lm, LoadedModel) else lm
    if not isinstance(lm, LoadedModel):
        raise ExportError(f"export takes a LoadedModel or a CompressionResult, not {type(lm).__name__}")
    if format == "hf":
        if dtype is not None or requantize:
            raise ExportError("dtype and requantize do not apply to format 'hf' (a dequantized directory at the "
                              "model's own type)")
        return export_hf(lm, path, overwrite=overwrite)
    if format == "gguf":
        from tensorpress.io.gguf import export_gguf

        return export_gguf(lm, path, dtype=dtype or "f16", overwrite=overwrite, requantize=requantize)
    if requantize:
        raise ExportError("requantize applies to format 'gguf' only")
    if format == "compressed-tensors":
        from tensorpress.io.ct_format import export_compressed_tensors

        return export_compressed_tensors(lm, path, dtype=dtype, overwrite=overwrite)
    if format == "gptq":
        from tensorpress.io.gptq_format import export_gptq

        return export_gptq(lm, path, dtype=dtype, overwrite=overwrite)
    raise ExportError(f"unknown export format {format!r}; accepted: {', '.join(EXPORT_FORMATS)}")
