"""Evaluation of KV caches: long-context perplexity with the cache carrying the context, and a
passkey retrieval test.

Long-context perplexity: each window of ``context`` tokens is fed in chunks of ``chunk`` tokens,
so every chunk attends to the earlier ones only through what the cache kept. All caches run in
lockstep with the uncompressed reference (``full``) over the same chunks, which gives the
perplexity of both and the KL divergence and top-1 agreement of each cache's next-token
distribution against the reference, without ever holding a window's logits.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from tensorpress.errors import CalibrationError
from tensorpress.progress import track

CacheMaker = Callable[[], Any]


@dataclass
class LongContextReport:
    method: str
    context: int
    chunk: int
    windows: int
    tokens_scored: int
    perplexity: float
    reference_perplexity: float
    kl: float  # mean KL(reference || cache) per scored token, nats
    top1_agreement: float
    cache_bytes: int  # at the end of a window, mean over windows
    dense_bytes: int
    compression: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Acc:
    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    tokens: int = 0
    nbytes: list[int] = field(default_factory=list)
    dense: list[int] = field(default_factory=list)
    seconds: float = 0.0


def tensor_bytes(root: Any) -> int:
    """Bytes of every distinct tensor reachable from ``root`` through attributes, lists and dicts;
    quantized tensor subclasses (quanto) count their packed storage, not their nominal shape."""
    seen: set[int] = set()

    def walk(obj: Any, depth: int) -> int:
        if depth > 8 or id(obj) in seen or isinstance(obj, (type, str, bytes, int, float, torch.dtype, torch.device)):
            return 0
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            inner = [getattr(obj, name) for name in ("_data", "_scale", "_shift") if hasattr(obj, name)]
            if inner:
                return sum(walk(t, depth + 1) for t in inner)
            return obj.numel() * obj.element_size()
        if isinstance(obj, (list, tuple)):
            return sum(walk(x, depth + 1) for x in obj)
        if isinstance(obj, dict):
            return sum(walk(x, depth + 1) for x in obj.values())
        if hasattr(obj, "__dict__"):
            return sum(walk(x, depth + 1) for x in vars(obj).values())
        return 0

    return walk(root, 0)


def cache_nbytes(cache: Any) -> int:
    """Bytes held by a cache: ``nbytes()`` for tensorpress caches, otherwise every tensor its
    layers reach (``transformers``' own caches)."""
    if hasattr(cache, "nbytes"):
        return int(cache.nbytes())
    return tensor_bytes(getattr(cache, "layers", cache))


def long_context(model: torch.nn.Module, makers: dict[str, CacheMaker], windows: torch.Tensor, chunk: int = 128,
                 reference: CacheMaker | None = None, dense_bytes: Callable[[Any], int] | None = None
                 ) -> list[LongContextReport]:
    """Perplexity, KL and top-1 agreement of each cache in ``makers`` against ``reference`` (a
    fresh full cache per window) on ``windows`` (n, context) token ids, fed ``chunk`` at a time.
    Tokens of the first chunk are not scored (no cache is involved yet)."""
    if windows.dim() != 2 or windows.shape[1] <= chunk:
        raise CalibrationError(f"windows must be (n, context) with context > chunk={chunk}, got {tuple(windows.shape)}")
    if reference is None:
        from tensorpress import kv

        reference = kv.factory("full", model)
    n, context = windows.shape
    ref_acc, accs = _Acc(), {name: _Acc() for name in makers}
    for w in track(range(n), "long-context windows", total=n):
        ids = windows[w:w + 1]
        ref_cache = reference()
        caches = {name: make() for name, make in makers.items()}
        for lo in range(0, context - 1, chunk):
            hi = min(context, lo + chunk)
            with torch.no_grad():
                t0 = time.perf_counter()
                ref_logits = model(input_ids=ids[:, lo:hi], past_key_values=ref_cache, use_cache=True).logits[0].float()
                ref_acc.seconds += time.perf_counter() - t0
            targets = ids[0, lo + 1:hi + 1]
            score = lo > 0  # the first chunk involves no cache yet: fed everywhere, not scored
            scored = slice(0, len(targets))
            if score:
                ref_logp = torch.log_softmax(ref_logits[scored], dim=-1)
                ref_acc.nll -= ref_logp.gather(1, targets[:, None]).sum().item()
                ref_acc.tokens += len(targets)
                ref_top = ref_logp.argmax(-1)
            for name, cache in caches.items():
                acc = accs[name]
                with torch.no_grad():
                    t0 = time.perf_counter()
                    logits = model(input_ids=ids[:, lo:hi], past_key_values=cache, use_cache=True).logits[0].float()
                    acc.seconds += time.perf_counter() - t0
                if not score:
                    continue
                logp = torch.log_softmax(logits[scored], dim=-1)
                acc.nll -= logp.gather(1, targets[:, None]).sum().item()
                acc.kl += (ref_logp.exp() * (ref_logp - logp)).sum().item()
                acc.agree += int((logp.argmax(-1) == ref_top).sum())
                acc.tokens += len(targets)
        for name, cache in caches.items():
            accs[name].nbytes.append(cache_nbytes(cache))
            accs[name].dense.append(dense_bytes(cache) if dense_bytes else _dense(cache, ref_cache))
        ref_acc.nbytes.append(cache_nbytes(ref_cache))
        ref_acc.dense.append(ref_acc.nbytes[-1])
    ref_ppl = math.exp(ref_acc.nll / max(ref_acc.tokens, 1))
    out = []
    for name, acc in [("full", ref_acc), *accs.items()]:
        nb = sum(acc.nbytes) / len(acc.nbytes)
        dense = sum(acc.dense) / len(acc.dense)
        ppl = ref_ppl if acc is ref_acc else math.exp(acc.nll / max(acc.tokens, 1))
        kl = 0.0 if acc is ref_acc else acc.kl / max(acc.tokens, 1)
        agree = 1.0 if acc is ref_acc else acc.agree / max(acc.tokens, 1)
        out.append(LongContextReport(name, context, chunk, n, acc.tokens, ppl, ref_ppl, kl, agree, int(nb), int(dense),
                                     dense / nb if nb else float("nan"), acc.seconds))
    return out


def _dense(cache: Any, ref_cache: Any) -> int:
    return int(cache.dense_nbytes()) if hasattr(cache, "dense_nbytes") else cache_nbytes(ref_cache)


# -- passkey retrieval ------------------------------------------------------------------------------

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
         "memorize it. I will quiz you about it.\n")
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass
class PasskeyTrial:
    length: int  # prompt tokens
    depth: float  # where the key sits, 0 = start of the filler, 1 = end
    key: str
    answer: str
    passed: bool


def passkey_prompt(tokenizer: Any, length: int, depth: float, key: str) -> torch.Tensor:
    """Token ids of a prompt of about ``length`` tokens with the key planted at ``depth``."""
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    fixed = len(tokenizer(INTRO + needle + QUESTION, add_special_tokens=False).input_ids)
    per = len(tokenizer(FILLER * 10, add_special_tokens=False).input_ids) / 10
    repeats = max(1, int((length - fixed) / per))
    before = int(round(repeats * depth))
    text = INTRO + FILLER * before + needle + FILLER * (repeats - before) + QUESTION
    return tokenizer(text, return_tensors="pt").input_ids


def passkey_passed(answer: str, key: str) -> bool:
    """Whether ``answer`` gives ``key``: its first run of consecutive digits is exactly the key.

    The model must write the key as one number: digits scattered among other characters
    (``"a1b2c3d4e5"``), split by spaces (``"1 2 3 4 5"``) or run on (``"123456"``) do not count,
    while words around the number do (``"The pass key is 12345."``). Tokenizers that split numbers
    into single digits decode them without spaces, so spaces between digits are the model's."""
    first = re.search(r"[0-9]+", answer)
    return first is not None and first.group() == key


def passkey(model: torch.nn.Module, tokenizer: Any, make_cache: CacheMaker | None, lengths: list[int],
            trials: int = 20, seed: int = 0, new_tokens: int = 8) -> list[PasskeyTrial]:
    """``trials`` seeded trials per length: a random 5-digit key at a random depth; passed when
    the greedy continuation's first number is the key (:func:`passkey_passed`)."""
    rng = random.Random(seed)
    plan = [(length, rng.uniform(0.0, 1.0), str(rng.randrange(10000, 100000))) for length in lengths for _ in range(trials)]
    out = []
    for length, depth, key in track(plan, "passkey trials", total=len(plan)):
        ids = passkey_prompt(tokenizer, length, depth, key)
        kwargs = {"past_key_values": make_cache()} if make_cache is not None else {}
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.eos_token_id, **kwargs)
        answer = tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
        out.append(PasskeyTrial(ids.shape[1], depth, key, answer.strip(), passkey_passed(answer, key)))
    return out
