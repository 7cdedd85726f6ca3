"""``trim_vocab``: drop the embedding and LM-head rows of tokens a deployment never uses.

The kept vocabulary is every token the user's corpus (``corpus``: a UTF-8 text file; default:
the calibration windows) tokenizes to, the tokenizer's special and added tokens, the byte
alphabet of a byte-level BPE (so any text stays encodable), and, for BPE, every token a kept
token is merged from (so the merges that fire on the corpus all survive). Token ids are
renumbered in their old order; the tokenizer's vocabulary, merges, added tokens and post-processor
are remapped to match, so text of the corpus tokenizes to exactly the same tokens as before, and
the model's logits on it are the old logits restricted to the kept rows. Byte-level BPE and
WordPiece tokenizers (``tokenizer.json``) are supported; for WordPiece every single-character
token is kept too (``keep_alphabet``), so words outside the corpus still encode.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from tensorpress.errors import CalibrationError, RecipeError
from tensorpress.methods.base import register_method
from tensorpress.methods.structural.base import StructuralMethod

_SPECIAL_CONFIG_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "sep_token_id", "cls_token_id")


def _merge_pairs(merges: list) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in merges]


def kept_tokens(spec: dict[str, Any], used_ids: set[int], alphabet: bool = True) -> set[str]:
    """Token strings to keep (see the module docstring), from the parsed ``tokenizer.json``."""
    model = spec["model"]
    vocab: dict[str, int] = model["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    keep = {by_id[i] for i in used_ids if i in by_id}
    keep |= {t["content"] for t in spec.get("added_tokens", []) if t["content"] in vocab}
    for key in ("unk_token",):
        if model.get(key) in vocab:
            keep.add(model[key])
    if model["type"] == "BPE":
        pre = json.dumps(spec.get("pre_tokenizer"))
        if "ByteLevel" in pre:
            from tokenizers import pre_tokenizers

            keep |= {c for c in pre_tokenizers.ByteLevel.alphabet() if c in vocab}
        elif model.get("byte_fallback"):
            keep |= {t for t in vocab if t.startswith("<0x") and t.endswith(">") and len(t) == 6}
        parents = {}
        for a, b in _merge_pairs(model["merges"]):
            parents.setdefault(a + b, (a, b))
        stack = list(keep)
        while stack:  # every token a kept token is merged from
            pair = parents.get(stack.pop())
            if pair:
                for part in pair:
                    if part not in keep:
                        keep.add(part)
                        stack.append(part)
    elif model["type"] == "WordPiece":
        if alphabet:  # single characters (and their continuations): unseen words still encode
            keep |= {t for t in vocab if len(t) == 1 or (t.startswith("##") and len(t) == 3)}
    else:
        raise RecipeError(f"trim_vocab supports BPE and WordPiece tokenizers, not {model['type']}")
    return keep


def remap_tokenizer_json(spec: dict[str, Any], old_to_new: dict[int, int]) -> dict[str, Any]:
    """``tokenizer.json`` with only the kept tokens, renumbered."""
    spec = json.loads(json.dumps(spec))
    model = spec["model"]
    model["vocab"] = {t: old_to_new[i] for t, i in model["vocab"].items() if i in old_to_new}
    kept = model["vocab"]
    if model["type"] == "BPE":
        pairs = [(a, b) for a, b in _merge_pairs(model["merges"]) if a in kept and b in kept and a + b in kept]
        as_strings = bool(model["merges"]) and isinstance(model["merges"][0], str)
        model["merges"] = [f"{a} {b}" if as_strings else [a, b] for a, b in pairs]
    spec["added_tokens"] = [dict(t, id=old_to_new[t["id"]]) for t in spec.get("added_tokens", []) if t["id"] in old_to_new]

    def fix(node: Any) -> Any:  # post-processors carry special token ids
        if isinstance(node, dict):
            if "ids" in node and "tokens" in node:
                node["ids"] = [kept[t] for t in node["tokens"]]
            for key in ("sep", "cls"):
                if isinstance(node.get(key), list) and len(node[key]) == 2 and node[key][0] in kept:
                    node[key] = [node[key][0], kept[node[key][0]]]
            for value in node.values():
                fix(value)
        elif isinstance(node, list):
            for value in node:
                fix(value)
        return node

    fix(spec.get("post_processor"))
    return spec


def _used_ids(lm: Any, corpus: str | None, calib: Any) -> set[int]:
    if corpus is None:
        return set(calib.input_ids.unique().tolist())
    path = Path(corpus).expanduser()
    if not path.is_file():
        raise CalibrationError(f"trim_vocab: corpus {path} is not a file")
    text = path.read_text(encoding="utf-8")
    return set(lm.tokenizer(text, add_special_tokens=True)["input_ids"])


@register_method
class TrimVocab(StructuralMethod):
    name: ClassVar[str] = "trim_vocab"
    summary: ClassVar[str] = "drop embedding/LM-head rows of tokens absent from a corpus, remapping the tokenizer"
    needs: ClassVar[frozenset[str]] = frozenset({"act_sq"})  # marks the recipe as calibrated (token windows)

    method: Literal["trim_vocab"] = "trim_vocab"
    corpus: str | None = Field(None, description="UTF-8 text whose tokens are kept (default: the calibration windows)")
    keep_alphabet: bool = Field(True, description="WordPiece: also keep every single-character token, so unseen words encode instead of becoming [UNK]")

    def transform(self, lm: Any, model: nn.Module, calib: Any, runner: Any) -> dict[str, Any]:
        from transformers import AutoTokenizer

        tokenizer = lm.tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise RecipeError("trim_vocab needs a fast tokenizer (tokenizer.json)")
        spec = json.loads(backend.to_str())
        keep = kept_tokens(spec, _used_ids(lm, self.corpus, calib), self.keep_alphabet)
        vocab = spec["model"]["vocab"]
        old_ids = sorted(vocab[t] for t in keep)
        emb = model.get_input_embeddings()
        old_ids = [i for i in old_ids if i < emb.weight.shape[0]]
        old_to_new = {old: new for new, old in enumerate(old_ids)}
        index = torch.tensor(old_ids)
        head = model.get_output_embeddings()
        tied = head is not None and head.weight is emb.weight
        emb.weight = nn.Parameter(emb.weight.data[index].clone())
        emb.num_embeddings = len(old_ids)
        if head is not None:
            if tied:
                head.weight = emb.weight
            else:
                head.weight = nn.Parameter(head.weight.data[index].clone())
            if getattr(head, "bias", None) is not None:
                head.bias = nn.Parameter(head.bias.data[index].clone())
            head.out_features = len(old_ids)
        before = model.config.vocab_size
        model.config.vocab_size = len(old_ids)
        for cfg in (model.config, getattr(model, "generation_config", None)):
            for key in _SPECIAL_CONFIG_KEYS:
                value = getattr(cfg, key, None) if cfg is not None else None
                if isinstance(value, int):
                    setattr(cfg, key, old_to_new.get(value))
                elif isinstance(value, list):
                    setattr(cfg, key, [old_to_new[v] for v in value if v in old_to_new])
        with tempfile.TemporaryDirectory(prefix="tensorpress-vocab-") as tmp:
            tokenizer.save_pretrained(tmp)
            for stale in ("vocab.txt", "merges.txt", "vocab.json"):  # the slow files would disagree
                (Path(tmp) / stale).unlink(missing_ok=True)
            (Path(tmp) / "tokenizer.json").write_text(json.dumps(remap_tokenizer_json(spec, old_to_new)), encoding="utf-8")
            new_tokenizer = AutoTokenizer.from_pretrained(tmp, use_fast=True)
        return {"tokenizer": new_tokenizer, "vocab_before": before, "vocab_after": len(old_ids)}
