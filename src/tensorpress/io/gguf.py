"""Export to GGUF, the file format of llama.cpp, without re-quantizing what tensorpress chose.

Supported: the architectures as llama.cpp's ``convert_hf_to_gguf.py`` converts them — model
types ``llama`` and ``mistral`` (GGUF architecture ``llama``, q/k rows permuted), ``qwen2`` and
``qwen3`` (their own architectures, no permutation), ``gpt2`` (``Conv1D`` weights transposed,
learned positions) and ``gpt_neox`` (the fused q/k/v rows regrouped from per head to
``[q | k | v]``, partial rotary, parallel residual) — with byte-level BPE tokenizers (see
``gguf_vocab``). Anything else (OPT, which llama.cpp has no architecture for; BERT, whose
WordPiece vocabulary is not written) is an ``ExportError`` naming what is not supported.

Tensor types:

* uncompressed weights (and ``DensePart`` layers) at ``dtype`` (F32, F16 or BF16); 1-D tensors
  (norms, biases) always F32, as llama.cpp's converter writes them;
* a ``CompressedLinear`` of one ``QuantizedPart`` in the ggml block type whose grid is its own
  (``gguf_blocks``: Q8_0 for 8-bit symmetric grids, Q4_0 for 4-bit symmetric ones, Q4_1 for a
  4-bit asymmetric grid whose minima are float16 numbers), groups a multiple of 32. Every such
  tensor is decoded again with ``gguf.quants.dequantize`` and must equal ``part.dense()`` bit
  for bit, or the export fails;
* any other layer is an ``ExportError`` naming the layer, its grid and the recipe setting that
  makes it exportable, unless ``requantize=True``. Then a quantized layer that a wider ggml type
  holds exactly is written in it (a 3-bit grid as Q4_0, a 4-bit asymmetric or 5-7-bit grid as
  Q8_0: same weights, more bytes); one that none holds exactly (other part kinds, groups that
  are not multiples of 32) is re-quantized to Q8_0 with llama.cpp's own rounding
  (``gguf.quants.quantize``), or written dequantized at ``dtype`` when its rows are not a
  multiple of 32. Each such layer is logged (warning) with what it became.

The file is written to a temporary file beside ``path``, flushed to disk and renamed into
place; an existing ``path`` is replaced only with ``overwrite``.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, LlamaFileType
from torch import nn
from transformers.pytorch_utils import Conv1D

from tensorpress.errors import ExportError, OutputExistsError
from tensorpress.io.files import _fsync_dir, current_umask
from tensorpress.io.gguf_layers import (
    BF16,
    F16,
    F32,
    Choice,
    choose,
    dense_array,
    encoded,
    plan_layers,
)
from tensorpress.io.gguf_vocab import add_tokenizer, add_wordpiece
from tensorpress.models import LoadedModel
from tensorpress.parts import CompressedLinear

log = logging.getLogger(__name__)

DTYPES = {"f32": F32, "f16": F16, "bf16": BF16}
_Q = GGMLQuantizationType
# general.file_type (a label: llama.cpp reads each tensor's own type) by the type holding the most
# weights; a K type without its mix is labelled by the llama.cpp file type that uses it throughout
_FILE_TYPES = {F32: LlamaFileType.ALL_F32, F16: LlamaFileType.MOSTLY_F16, BF16: LlamaFileType.MOSTLY_BF16,
               _Q.Q4_0: LlamaFileType.MOSTLY_Q4_0, _Q.Q4_1: LlamaFileType.MOSTLY_Q4_1, _Q.Q8_0: LlamaFileType.MOSTLY_Q8_0,
               _Q.Q5_0: LlamaFileType.MOSTLY_Q5_0, _Q.Q5_1: LlamaFileType.MOSTLY_Q5_1, _Q.IQ4_NL: LlamaFileType.MOSTLY_IQ4_NL,
               _Q.Q2_K: LlamaFileType.MOSTLY_Q2_K, _Q.Q3_K: LlamaFileType.MOSTLY_Q3_K_S, _Q.Q4_K: LlamaFileType.MOSTLY_Q4_K_S,
               _Q.Q5_K: LlamaFileType.MOSTLY_Q5_K_S, _Q.Q6_K: LlamaFileType.MOSTLY_Q6_K}
T = gguf.MODEL_TENSOR


_LLAMA_BLOCK = (T.ATTN_NORM, T.ATTN_Q, T.ATTN_K, T.ATTN_V, T.ATTN_OUT, T.FFN_NORM, T.FFN_GATE, T.FFN_UP, T.FFN_DOWN)
_FUSED_BLOCK = (T.ATTN_NORM, T.ATTN_QKV, T.ATTN_OUT, T.FFN_NORM, T.FFN_UP, T.FFN_DOWN)
_BERT_BLOCK = (T.ATTN_Q, T.ATTN_K, T.ATTN_V, T.ATTN_OUT, T.ATTN_OUT_NORM, T.FFN_UP, T.FFN_DOWN, T.LAYER_OUT_NORM)


@dataclass(frozen=True)
class _Arch:
    name: str  # general.architecture
    arch: gguf.MODEL_ARCH
    # llama.cpp's llama graph rotates adjacent pairs where transformers rotates halves, so the
    # converter reorders each head's q/k rows; qwen2/qwen3 use llama.cpp's NeoX rope (halves).
    permute_qk: bool = False
    llama_keys: bool = False  # vocab_size and rope.dimension_count, which the converter writes for llama only
    layer_norm: bool = False  # LayerNorm with bias (layer_norm_epsilon), not RMSNorm
    # GPT-NeoX fuses q/k/v per head (rows [head, q|k|v, head_dim]); llama.cpp's graph splits the
    # fused output as [q | k | v] (rows [q|k|v, head, head_dim]), so the converter regroups the rows
    heads_qkv: bool = False
    output_required: bool = False  # llama.cpp has no fallback to token_embd when the head is tied
    block_tensors: tuple = _LLAMA_BLOCK
    top_tensors: tuple = (T.TOKEN_EMBD, T.OUTPUT_NORM)  # outside the blocks
    block_norms: tuple = (T.ATTN_NORM, T.FFN_NORM)  # whose biases a LayerNorm architecture needs
    skip: tuple = ()  # module prefixes the converter leaves out
    encoder: bool = False  # bidirectional attention, the tokenizer WordPiece (llama.cpp: embeddings)


_LLAMA = _Arch("llama", gguf.MODEL_ARCH.LLAMA, permute_qk=True, llama_keys=True)
ARCHITECTURES = {
    "llama": _LLAMA,
    "mistral": _LLAMA,  # the converter writes MistralForCausalLM as llama
    "qwen2": _Arch("qwen2", gguf.MODEL_ARCH.QWEN2),
    "qwen3": _Arch("qwen3", gguf.MODEL_ARCH.QWEN3),
    # Conv1D weights (in, out) are written (out, in), as the converter transposes them
    "gpt2": _Arch("gpt2", gguf.MODEL_ARCH.GPT2, layer_norm=True, block_tensors=_FUSED_BLOCK,
                  top_tensors=(T.TOKEN_EMBD, T.POS_EMBD, T.OUTPUT_NORM)),
    "gpt_neox": _Arch("gptneox", gguf.MODEL_ARCH.GPTNEOX, layer_norm=True, heads_qkv=True, output_required=True,
                      block_tensors=_FUSED_BLOCK),
    # an encoder: llama.cpp computes its embeddings (the pooler and masked-LM head are not written)
    "bert": _Arch("bert", gguf.MODEL_ARCH.BERT, layer_norm=True, block_tensors=_BERT_BLOCK,
                  top_tensors=(T.TOKEN_EMBD, T.TOKEN_TYPES, T.POS_EMBD, T.TOKEN_EMBD_NORM),
                  block_norms=(T.ATTN_OUT_NORM, T.LAYER_OUT_NORM), skip=("pooler.", "cls."), encoder=True),
}


@dataclass(frozen=True)
class _Shapes:
    hidden: int
    n_head: int
    n_kv: int
    head_dim: int
    ff: int
    vocab: int
    blocks: int
    positions: int
    token_types: int

    def expected(self, kind: gguf.MODEL_TENSOR) -> tuple[int, ...] | None:
        """The weight shape llama.cpp expects for a tensor of ``kind`` (every block alike)."""
        h, q, kv = self.hidden, self.n_head * self.head_dim, self.n_kv * self.head_dim
        return {
            T.TOKEN_EMBD: (self.vocab, h), T.OUTPUT: (self.vocab, h), T.OUTPUT_NORM: (h,), T.ATTN_NORM: (h,),
            T.FFN_NORM: (h,), T.ATTN_Q: (q, h), T.ATTN_K: (kv, h), T.ATTN_V: (kv, h), T.ATTN_OUT: (h, q),
            T.ATTN_QKV: (q + 2 * kv, h), T.POS_EMBD: (self.positions, h), T.TOKEN_TYPES: (self.token_types, h),
            T.TOKEN_EMBD_NORM: (h,), T.ATTN_OUT_NORM: (h,), T.LAYER_OUT_NORM: (h,),
            T.FFN_GATE: (self.ff, h), T.FFN_UP: (self.ff, h), T.FFN_DOWN: (h, self.ff),
            T.ATTN_Q_NORM: (self.head_dim,), T.ATTN_K_NORM: (self.head_dim,),
        }.get(kind)


@dataclass(frozen=True)
class _Tensor:
    name: str
    data: np.ndarray  # float32/float16 values, or the ggml bytes (uint8) of `qtype`
    qtype: GGMLQuantizationType
    numel: int


def export_gguf(lm: LoadedModel, path: str | os.PathLike, *, dtype: str = "f16", overwrite: bool = False,
                requantize: bool = False) -> Path:
    """Write ``lm`` (compressed or not) as a GGUF file that llama.cpp loads; see the module
    docstring for what is supported. ``dtype`` ("f16", "bf16" or "f32") is the type of the
    uncompressed weights; ``requantize`` allows layers without an exact ggml type of their own."""
    path = Path(path)
    if path.is_dir():
        raise OutputExistsError(f"{path} is a directory; name the .gguf file to write")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r} is not a GGUF export type; accepted: {', '.join(DTYPES)}")
    arch = _architecture(lm)
    shapes = _shapes(lm)
    tensors = _tensors(lm, arch, shapes, DTYPES[dtype], plan_layers(lm.model, DTYPES[dtype], requantize))
    writer = gguf.GGUFWriter(None, arch.name)
    _add_metadata(writer, lm, arch, shapes, _file_type(tensors, DTYPES[dtype]))
    if arch.encoder:
        add_wordpiece(writer, lm.tokenizer, lm.model.config, shapes.vocab)
    else:
        _check_pre_tokenizer(lm, add_tokenizer(writer, lm.tokenizer, lm.model.config, shapes.vocab))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for t in tensors:
        writer.add_tensor(t.name, t.data, raw_dtype=t.qtype)
    _write_atomic(writer, path)
    log.info("wrote %s: %s", path, ", ".join(f"{n} {q}" for q, n in sorted(Counter(t.qtype.name for t in tensors).items())))
    return path


def _architecture(lm: LoadedModel) -> _Arch:
    from tensorpress.methods.structural.depth import bridge_indices

    model_type = lm.model.config.model_type
    if model_type not in ARCHITECTURES:
        raise ExportError(f"{lm.spec}: GGUF export supports the model types {', '.join(ARCHITECTURES)}; "
                          f"this is a {model_type!r} model")
    bridges = bridge_indices(lm.adapter.blocks(lm.model))
    if bridges:
        raise ExportError(f"{lm.spec}: blocks {bridges} are linear bridges (drop_blocks with replace 'linear'), "
                          "which llama.cpp has no tensor for; prune with replace 'none' to export")
    return ARCHITECTURES[model_type]


def _check_pre_tokenizer(lm: LoadedModel, pre: str) -> None:
    """Warn when a model loaded from a GGUF file gets another pre-tokenizer name than that file
    had: transformers rebuilds some GGUF tokenizers with other splitting rules (SmolLM's
    "smollm" digit splitting comes back as plain GPT-2), and the export names what the
    tokenizer in memory does, which is what tensorpress evaluated with."""
    if lm.info.get("source") != "gguf":
        return
    from tensorpress.io.headers import gguf_header

    source = gguf_header(lm.info["path"])["metadata"].get("tokenizer.ggml.pre")
    if source is not None and source != pre:
        log.warning("%s: its GGUF file names the pre-tokenizer %r, the tokenizer transformers rebuilt from it splits "
                    "text as %r, which is written; llama.cpp will tokenize as tensorpress did, not as the source file",
                    lm.spec, source, pre)


def _shapes(lm: LoadedModel) -> _Shapes:
    config = lm.model.config
    n_head = config.num_attention_heads
    blocks = len(lm.adapter.blocks(lm.model))
    if blocks != config.num_hidden_layers:
        raise ExportError(f"{lm.spec}: the model has {blocks} blocks, its config says {config.num_hidden_layers}")
    # GPT-2 keeps the FFN width in n_inner (None: 4 x hidden)
    ff = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * config.hidden_size
    return _Shapes(
        hidden=config.hidden_size, n_head=n_head, n_kv=getattr(config, "num_key_value_heads", None) or n_head,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // n_head, ff=ff,
        vocab=lm.model.get_input_embeddings().weight.shape[0], blocks=blocks, positions=config.max_position_embeddings,
        token_types=getattr(config, "type_vocab_size", 0) or 0,
    )


def _rope(config) -> tuple[float, dict]:
    """``(rope_theta, scaling)``: transformers 5 keeps both in ``rope_parameters``, older
    versions in ``rope_theta`` and ``rope_scaling``."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear"):
        raise ExportError(f"rope scaling {kind!r} is not exported to GGUF yet (accepted: none or 'linear')")
    return float(theta), params if kind == "linear" else {}


def _rotary_fraction(config) -> float:
    """The fraction of each head's dimensions that rotate (GPT-NeoX rotates a quarter)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    return float(params.get("partial_rotary_factor", getattr(config, "rotary_pct", None) or 1.0))


def _add_metadata(w: gguf.GGUFWriter, lm: LoadedModel, arch: _Arch, s: _Shapes, file_type: LlamaFileType) -> None:
    """The hyperparameters, keyed and ordered as llama.cpp's converter writes them."""
    config = lm.model.config
    w.add_type("model")
    w.add_name(Path(str(lm.spec)).name.removesuffix(".gguf"))
    w.add_block_count(s.blocks)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(s.hidden)
    w.add_feed_forward_length(s.ff)
    w.add_head_count(s.n_head)
    if arch.layer_norm:  # GPT-2 (learned positions), GPT-NeoX (partial rotary), BERT (an encoder)
        w.add_layer_norm_eps(getattr(config, "layer_norm_epsilon", None) or config.layer_norm_eps)
        if arch.encoder:
            w.add_causal_attention(False)
            pooling = _pooling(lm)
            if pooling is not None:
                w.add_pooling_type(pooling)
        if arch.arch == gguf.MODEL_ARCH.GPTNEOX:
            theta, _ = _rope(config)
            w.add_rope_dimension_count(int(_rotary_fraction(config) * s.head_dim))
            w.add_rope_freq_base(theta)
            w.add_parallel_residual(bool(getattr(config, "use_parallel_residual", True)))
        w.add_file_type(file_type)
        return
    theta, scaling = _rope(config)
    w.add_head_count_kv(s.n_kv)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    if getattr(config, "head_dim", None) is not None:  # the converter writes these when config.json has head_dim
        w.add_key_length(s.head_dim)
        w.add_value_length(s.head_dim)
    w.add_file_type(file_type)
    if arch.llama_keys:
        w.add_vocab_size(s.vocab)
        w.add_rope_dimension_count(s.head_dim)
    if scaling:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
    window = getattr(config, "sliding_window", None)
    if window and window < config.max_position_embeddings and arch is _LLAMA:
        log.warning("%s: sliding window %d is not part of llama.cpp's llama architecture; it attends over the "
                    "whole context", lm.spec, window)


def _pooling(lm: LoadedModel) -> gguf.PoolingType | None:
    """The sentence-transformers pooling of the model's directory (``modules.json`` and its
    pooling module's ``config.json``), as the converter reads it; None where there is none."""
    import json

    folder = lm.info.get("path")
    if not folder or not (Path(folder) / "modules.json").is_file():
        return None
    try:
        modules = json.loads((Path(folder) / "modules.json").read_text(encoding="utf-8"))
        sub = next((m["path"] for m in modules if str(m.get("type", "")).endswith("Pooling")), None)
        settings = {} if sub is None else json.loads((Path(folder) / sub / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ExportError(f"{folder}: its sentence-transformers pooling settings cannot be read ({exc})") from None
    for key, kind in (("pooling_mode_mean_tokens", gguf.PoolingType.MEAN), ("pooling_mode_cls_token", gguf.PoolingType.CLS),
                      ("pooling_mode_lasttoken", gguf.PoolingType.LAST)):
        if settings.get(key):
            return kind
    return None


def _file_type(tensors: list[_Tensor], dtype: GGMLQuantizationType) -> LlamaFileType:
    """``general.file_type``: the block type holding the most weights, else ``dtype``."""
    blocks: Counter = Counter()
    for t in tensors:
        if t.qtype in _FILE_TYPES and t.qtype not in (F32, F16, BF16):
            blocks[t.qtype] += t.numel
    return _FILE_TYPES[blocks.most_common(1)[0][0] if blocks else dtype]


def _named_weights(model: nn.Module):
    """``(name, parameter or CompressedLinear)`` in module order, each storage once (a tied
    head is the embedding's parameter, so it is not listed); GPT-2's ``Conv1D`` weights
    transposed to ``(out, in)``, as llama.cpp (and every other layer here) holds them."""
    seen: set[int] = set()
    inside = None  # the prefix of the CompressedLinear whose parts are being walked past
    for name, module in model.named_modules():
        if inside is not None and name.startswith(inside):
            continue
        prefix = f"{name}." if name else ""
        if isinstance(module, CompressedLinear):
            inside = prefix
            yield f"{prefix}weight", module
            if module.bias is not None:
                yield f"{prefix}bias", module.bias
            continue
        for pname, param in module.named_parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                yield prefix + pname, param.T if isinstance(module, Conv1D) and pname == "weight" else param


def head_qkv_rows(n_heads: int, head_dim: int) -> torch.Tensor:
    """The row order llama.cpp's converter gives GPT-NeoX's fused q/k/v: the model's rows are
    ``[head, (q, k, v), head_dim]``, the file's ``[(q, k, v), head, head_dim]``. Row ``i`` of the
    file is row ``head_qkv_rows(...)[i]`` of the model."""
    return torch.arange(3 * n_heads * head_dim).reshape(n_heads, 3, head_dim).transpose(0, 1).reshape(-1)


def _row_order(arch: _Arch, kind: gguf.MODEL_TENSOR, n_rows: int, s: _Shapes) -> torch.Tensor | None:
    """Which model row each row of the file is (None: the same order)."""
    if arch.permute_qk and kind in (T.ATTN_Q, T.ATTN_K):
        return rope_rows(n_rows, s.n_head if kind == T.ATTN_Q else s.n_kv)
    if arch.heads_qkv and kind == T.ATTN_QKV:
        return head_qkv_rows(s.n_head, s.head_dim)
    return None


def rope_rows(n_rows: int, n_heads: int) -> torch.Tensor:
    """The row order llama.cpp's converter gives q/k of the llama architecture: within each
    head, rows ``[x_0 .. x_{d/2-1}, y_0 .. y_{d/2-1}]`` (transformers' halves) become
    ``[x_0, y_0, x_1, y_1, ...]`` (ggml's adjacent pairs). Row ``i`` of the file is row
    ``rope_rows(...)[i]`` of the model; whole rows move, so codes, scales and zeros with them."""
    half = n_rows // n_heads // 2
    return torch.arange(n_rows).reshape(n_heads, 2, half).transpose(1, 2).reshape(-1)


def _tensors(lm: LoadedModel, arch: _Arch, s: _Shapes, dtype: GGMLQuantizationType,
             choices: dict[int, Choice]) -> list[_Tensor]:
    names = gguf.get_tensor_name_map(arch.arch, s.blocks)
    out: list[_Tensor] = []
    outcomes: dict[str, list[str]] = {}
    for hf_name, value in _named_weights(lm.model):
        if hf_name.startswith(arch.skip):
            continue
        found = names.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise ExportError(f"{hf_name}: llama.cpp's {arch.name} architecture has no tensor for it")
        kind, name = found
        shape = (value.out_features, value.in_features) if isinstance(value, CompressedLinear) else tuple(value.shape)
        expected = s.expected(kind)
        if expected is not None and name.endswith(".bias"):
            expected = expected[:1]
        if expected != shape:
            raise ExportError(f"{hf_name} ({name}) has shape {shape}; llama.cpp's {arch.name} expects {expected} "
                              "from the config in every block (per-block widths cannot be written)")
        if id(value) in choices:
            data, qtype, outcome = encoded(hf_name.removesuffix(".weight"), value, choices[id(value)], dtype)
            if outcome:
                outcomes.setdefault(outcome, []).append(hf_name.removesuffix(".weight"))
        else:
            data, qtype = dense_array(value.dense() if isinstance(value, CompressedLinear) else value,
                                 F32 if len(shape) == 1 else dtype)
        order = _row_order(arch, kind, shape[0], s)
        if order is not None:
            data = data[order.numpy()]
        out.append(_Tensor(name, np.ascontiguousarray(data), qtype, int(np.prod(shape))))
    if arch.output_required and "output.weight" not in {t.name for t in out}:  # a tied head, written twice
        embd = next(t for t in out if t.name == "token_embd.weight")
        out.append(_Tensor("output.weight", embd.data, embd.qtype, embd.numel))
    _check_complete({t.name for t in out}, arch, s)
    for outcome, layers in outcomes.items():
        log.warning("%d layers %s: %s", len(layers), outcome, ", ".join(layers))
    return out


def _check_complete(written: set[str], arch: _Arch, s: _Shapes) -> None:
    def names(kinds):
        return [gguf.TENSOR_NAMES[k].format(bid=b) for b in range(s.blocks) for k in kinds]

    wanted = [f"{gguf.TENSOR_NAMES[k]}.weight" for k in arch.top_tensors]
    wanted += [f"{name}.weight" for name in names(arch.block_tensors)]
    if arch.layer_norm:  # llama.cpp requires every LayerNorm's bias
        wanted += [f"{gguf.TENSOR_NAMES[k]}.bias" for k in arch.top_tensors if k in (T.OUTPUT_NORM, T.TOKEN_EMBD_NORM)]
        wanted += [f"{n}.bias" for n in names(arch.block_norms)]
    missing = [name for name in wanted if name not in written]
    if missing:
        raise ExportError(f"the model has no tensor for the GGUF tensors {missing[:6]}{' ...' if len(missing) > 6 else ''}")


def _write_atomic(writer: gguf.GGUFWriter, path: Path) -> None:
    """Write to a temporary file beside ``path``, flush it to disk, rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it private; the output follows the umask
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise


def aligned_bytes(nbytes: int, alignment: int = gguf.GGUF_DEFAULT_ALIGNMENT) -> int:
    """Bytes a tensor of ``nbytes`` takes in a GGUF file: the writer pads each tensor's data to
    the file's alignment."""
    return -(-nbytes // alignment) * alignment


def native_tensor_bytes(layer: CompressedLinear) -> int | None:
    """Bytes of the ggml tensor an export writes for ``layer`` in its own type, without
    re-quantizing (None: the layer has no exact type of its own and export would refuse it)."""
    choice = choose(layer)
    if choice.qtype is None or not (choice.exact and choice.native):
        return None
    block, type_size = gguf.GGML_QUANT_SIZES[choice.qtype]
    return layer.out_features * (layer.in_features // block) * type_size


def gguf_file_bytes(lm: LoadedModel, dtype: str = "f16") -> int:
    """Size of the GGUF file ``export_gguf(lm, dtype=dtype)`` writes, measured by writing it to
    a temporary file (removed)."""
    with tempfile.TemporaryDirectory(prefix="tensorpress-gguf-size-") as tmp:
        path = export_gguf(lm, Path(tmp) / "model.gguf", dtype=dtype)
        return path.stat().st_size
