"""A model's tokenizer as GGUF metadata, the way llama.cpp's converter writes a byte-level BPE
vocabulary (``tokenizer.ggml.model = "gpt2"``) and BERT's WordPiece one (``"bert"``: llama.cpp's
WPM tokenizer, whose vocabulary marks word starts with ``▁`` where WordPiece marks continuations
with ``##``; see :func:`add_wordpiece`).

The token list is built here from the ``transformers`` tokenizer (every id below the embedding's
row count, holes as ``[PAD<id>]``, types NORMAL / CONTROL / USER_DEFINED / UNUSED); the merges,
special token ids and chat template come from ``gguf.SpecialVocab``, which reads them from the
files ``save_pretrained`` writes. ``gguf.BpeVocab`` is not used: it types every added token
CONTROL and stops at the tokenizer's own size.

``tokenizer.ggml.pre`` names the pre-tokenizer for llama.cpp, which then splits text with its
own built-in rules of that name. It is derived from the structure of ``tokenizer.json``'s
``pre_tokenizer`` (not from a hash of sample output, as the converter does); a structure not in
:data:`PRE_TOKENIZERS` is an ``ExportError``, because a wrong name tokenizes silently wrong.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import gguf

from tensorpress.errors import ExportError

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# pre-tokenizer steps (see _steps) -> the llama.cpp pre-tokenizer that splits text the same way
PRE_TOKENIZERS: dict[tuple[tuple[str, Any], ...], str] = {
    (("bytelevel", True),): "gpt-2",
    (("digits", True), ("bytelevel", True)): "smollm",  # SmolLM, StarCoder: digits one by one
    (("split", _LLAMA3_SPLIT), ("bytelevel", False)): "llama-bpe",
    (("split", _QWEN2_SPLIT), ("bytelevel", False)): "qwen2",
}


log = logging.getLogger(__name__)


def _steps(pre: dict[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    """A ``tokenizer.json`` pre-tokenizer as a tuple of comparable steps."""
    if pre is None:
        return ()
    kind = pre.get("type")
    if kind == "Sequence":
        return tuple(step for inner in pre.get("pretokenizers", []) for step in _steps(inner))
    if kind == "ByteLevel" and not pre.get("add_prefix_space", False):
        return (("bytelevel", bool(pre.get("use_regex", True))),)
    if kind == "Digits":
        return (("digits", bool(pre.get("individual_digits", False))),)
    if kind == "Split" and pre.get("behavior") == "Isolated" and not pre.get("invert", False):
        return (("split", (pre.get("pattern") or {}).get("Regex")),)
    return ((str(kind), json.dumps(pre, sort_keys=True)),)


def pre_tokenizer_name(spec: dict[str, Any]) -> str:
    """``tokenizer.ggml.pre`` for a tokenizer whose ``tokenizer.json`` is ``spec``."""
    steps = _steps(spec.get("pre_tokenizer"))
    if steps not in PRE_TOKENIZERS:
        raise ExportError(f"the tokenizer's pre-tokenizer {[s[0] for s in steps]} is none that tensorpress can name "
                          f"for llama.cpp (recognised: {sorted(PRE_TOKENIZERS.values())}); llama.cpp would split "
                          "text differently from the model's tokenizer")
    return PRE_TOKENIZERS[steps]


def _byte_level_spec(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"GGUF export needs a fast (tokenizers) tokenizer; got {type(tokenizer).__name__}")
    spec = json.loads(backend.to_str())
    model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        raise ExportError("GGUF export writes byte-level BPE tokenizers (GPT-2 style: Llama 3, Qwen2, SmolLM); "
                          f"this one is {model.get('type')} with a {decoder.get('type')} decoder "
                          "(SentencePiece-style vocabularies are not exported yet)")
    return spec


def _looks_special(token: str) -> bool:
    # added tokens some models forget to flag special; llama.cpp must treat them as control tokens
    return (token.startswith("<|") and token.endswith("|>")) or token in ("<pad>", "<mask>")


def token_list(tokenizer: Any, n_vocab: int) -> tuple[list[str], list[int]]:
    """Tokens in id order for an embedding of ``n_vocab`` rows, and their GGUF token types."""
    vocab = tokenizer.get_vocab()
    added = tokenizer.get_added_vocab()
    beyond = sorted(token for token, i in vocab.items() if i >= n_vocab)
    if any(token not in added for token in beyond):
        raise ExportError(f"the tokenizer has ids up to {max(vocab.values())}, the embedding only {n_vocab} rows")
    if beyond:  # e.g. the <|endoftext|> transformers' GGUF tokenizer rebuild appends: no row to embed it
        log.warning("added tokens without an embedding row are not written: %s", ", ".join(beyond[:5]))
    by_id = {i: token for token, i in vocab.items() if i < n_vocab}
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(token)
        if token not in added:
            types.append(gguf.TokenType.NORMAL)
        elif decoder[i].special or _looks_special(token):
            types.append(gguf.TokenType.CONTROL)
        else:
            types.append(gguf.TokenType.USER_DEFINED)
    return tokens, types


def _added_specials(tokenizer: Any) -> dict[str, bool]:
    """Whether encoding adds BOS / EOS, from what the tokenizer does (written explicitly: where
    the key is absent, llama.cpp picks a default per vocabulary type)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    extra = len(full) > len(plain)
    return {"bos": extra and full[0] == tokenizer.bos_token_id, "eos": extra and full[-1] == tokenizer.eos_token_id}


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Any, config: Any, n_vocab: int) -> str:
    """Write ``tokenizer`` (with ``config``'s special token ids as a fallback) to ``writer``;
    returns the pre-tokenizer name written."""
    spec = _byte_level_spec(tokenizer)
    pre = pre_tokenizer_name(spec)
    tokens, types = token_list(tokenizer, n_vocab)
    with tempfile.TemporaryDirectory(prefix="tensorpress-vocab-") as tmp:
        tokenizer.save_pretrained(tmp)
        config.to_json_file(Path(tmp) / "config.json")
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=n_vocab)
    if not special.merges:
        raise ExportError("the BPE tokenizer has no merges; llama.cpp could not tokenize with it")
    special.add_special_token.update(_added_specials(tokenizer))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special.add_to_gguf(writer, quiet=True)
    return pre


def _wordpiece_spec(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"GGUF export needs a fast (tokenizers) tokenizer; got {type(tokenizer).__name__}")
    spec = json.loads(backend.to_str())
    model, pre, norm = spec.get("model") or {}, spec.get("pre_tokenizer") or {}, spec.get("normalizer") or {}
    if (model.get("type") != "WordPiece" or model.get("continuing_subword_prefix", "##") != "##"
            or pre.get("type") != "BertPreTokenizer" or norm.get("type") != "BertNormalizer"):
        raise ExportError("a BERT GGUF export writes llama.cpp's WPM vocabulary, which splits and normalizes text as "
                          "BERT's own WordPiece tokenizer does (BertNormalizer, BertPreTokenizer, '##' continuations); "
                          f"this tokenizer is {model.get('type')} with a {pre.get('type')} pre-tokenizer and a "
                          f"{norm.get('type')} normalizer")
    return spec


def add_wordpiece(writer: gguf.GGUFWriter, tokenizer: Any, config: Any, n_vocab: int) -> str:
    """Write a BERT WordPiece tokenizer as llama.cpp's WPM vocabulary: ``##x`` becomes ``x``,
    any other normal token ``▁x``; the lower-casing and accent stripping of its normalizer,
    [CLS] as the token prepended (BOS) and [SEP] as the one appended. Returns the pre-tokenizer
    name written (WPM has one set of rules, ``default``)."""
    norm = _wordpiece_spec(tokenizer)["normalizer"]
    tokens, types = token_list(tokenizer, n_vocab)
    tokens = [t if kind == gguf.TokenType.CONTROL else t[2:] if t.startswith("##") else "\u2581" + t
              for t, kind in zip(tokens, types)]
    lowercase = bool(norm.get("lowercase", True))
    strip = norm.get("strip_accents")
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_type_count(getattr(config, "type_vocab_size", 1) or 1)
    # llama.cpp's keys (the gguf package has no writer method for them yet)
    writer.add_bool("tokenizer.ggml.normalizer.lowercase", lowercase)
    writer.add_bool("tokenizer.ggml.normalizer.strip_accents", lowercase if strip is None else bool(strip))
    ids = {"cls": tokenizer.cls_token_id, "sep": tokenizer.sep_token_id, "unk": tokenizer.unk_token_id,
           "pad": tokenizer.pad_token_id, "mask": tokenizer.mask_token_id}
    missing = [name for name in ("cls", "sep", "unk") if ids[name] is None]
    if missing:
        raise ExportError(f"a BERT tokenizer needs {', '.join(missing)} tokens for llama.cpp's WPM vocabulary")
    # llama.cpp's WPM prepends its BOS and appends its SEP; without these keys it assumes BERT's ids 101/102
    writer.add_bos_token_id(ids["cls"])
    writer.add_sep_token_id(ids["sep"])
    writer.add_unk_token_id(ids["unk"])
    if ids["pad"] is not None:
        writer.add_pad_token_id(ids["pad"])
    if ids["mask"] is not None:
        writer.add_mask_token_id(ids["mask"])
    full = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(full[0] == ids["cls"])
    writer.add_add_sep_token(full[-1] == ids["sep"])
    writer.add_add_eos_token(False)
    return "default"
