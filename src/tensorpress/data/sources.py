"""Token sources for calibration and evaluation.

Text sources (a UTF-8 file, or a Hugging Face dataset split) are tokenized as one string with
the model's own tokenizer, then cut into windows following protocol P1: calibration windows are
drawn at random (``random.Random(seed)``) from the first ``calib_fraction`` (60 %) of the tokens,
evaluation windows are consecutive and non-overlapping from the remaining tail, so one file can
feed both without overlap.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tensorpress.errors import CalibrationError, MissingDependencyError

log = logging.getLogger(__name__)

CALIB_FRACTION = 0.6  # protocol P1: calibration from the first 60 %, evaluation from the rest
DEFAULT_TEXT = Path("../shared/data/wikitext2-valid.txt")


@dataclass
class TextSource:
    """Some text and where it came from."""

    text: str
    name: str
    _cache: dict[int, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    def tokens(self, tokenizer: Any) -> torch.Tensor:
        """All tokens of the text (1-D int64), without special tokens; cached per tokenizer."""
        key = id(tokenizer)
        if key not in self._cache:
            # verbose=False: a whole file is longer than model_max_length on purpose (it is cut into windows)
            ids = tokenizer(self.text, add_special_tokens=False, verbose=False)["input_ids"]
            self._cache[key] = torch.tensor(ids, dtype=torch.long)
        return self._cache[key]


@dataclass
class TokenWindows:
    """A batch of equal-length token windows, ``input_ids`` of shape ``(n, seq_len)``."""

    input_ids: torch.Tensor
    source: str
    seed: int | None = None
    note: str = ""

    def __post_init__(self) -> None:
        if self.input_ids.ndim != 2 or self.input_ids.shape[0] == 0:
            raise CalibrationError(f"token windows must be a non-empty (n, seq_len) tensor, got {tuple(self.input_ids.shape)}")

    @property
    def samples(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def batches(self, batch_size: int) -> list[torch.Tensor]:
        return list(self.input_ids.split(batch_size))

    def describe(self) -> str:
        seed = "" if self.seed is None else f", seed {self.seed}"
        return f"{self.samples} x {self.seq_len} tokens from {self.source}{seed}"


def text_file(path: str | os.PathLike, encoding: str = "utf-8") -> TextSource:
    """A UTF-8 text file as a token source."""
    path = Path(path)
    if not path.is_file():
        hint = ""
        if path == DEFAULT_TEXT:
            hint = " (the default is the shared WikiText-2 file; pass --data PATH to use another text file)"
        raise CalibrationError(f"text file not found: {path}{hint}")
    try:
        text = path.read_text(encoding=encoding)
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"{path} is not valid {encoding} text ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise CalibrationError(f"{path} is empty: calibration and evaluation need text")
    return TextSource(text, str(path))


def hf_dataset(spec: str) -> TextSource:
    """``hf:<dataset>[:<config>]:<split>`` through ``datasets`` (installed, data present)."""
    parts = spec.removeprefix("hf:").split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise CalibrationError(f"bad dataset spec {spec!r}; expected 'hf:<dataset>[:<config>]:<split>'")
    try:
        import datasets
    except ImportError:
        raise MissingDependencyError(
            f"{spec!r} needs the 'datasets' package: pip install 'tensorpress[datasets]'"
        ) from None
    name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # datasets raises many unrelated types for "not available"
        raise CalibrationError(f"cannot load dataset {spec!r}: {type(exc).__name__}: {exc}") from None
    if "text" not in ds.column_names:
        raise CalibrationError(f"dataset {spec!r} has no 'text' column (columns: {ds.column_names})")
    return TextSource("\n\n".join(ds["text"]), spec)


def as_text_source(source: str | os.PathLike | TextSource) -> TextSource:
    if isinstance(source, TextSource):
        return source
    source = os.fspath(source)
    if source.startswith("hf:"):
        return hf_dataset(source)
    return text_file(source)


def context_length(model: Any) -> int | None:
    """The most tokens ``model`` (a ``transformers`` model) reads at once: its (text) config's
    ``max_position_embeddings``, which every supported family has (GPT-2's ``n_positions`` is
    mapped to it); ``None`` when the config gives no limit."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    limit = getattr(config, "max_position_embeddings", None)
    return limit if isinstance(limit, int) and limit > 0 else None


def check_context(model: Any, seq_len: int, what: str) -> None:
    """Refuse windows of ``seq_len`` tokens that ``model`` cannot read: beyond its context a
    learned position table is indexed out of range (GPT-2, OPT, BERT) and rotary models run
    outside what they were trained on; fewer than 2 tokens predict nothing."""
    limit = context_length(model)
    if seq_len < 2 or (limit is not None and seq_len > limit):
        context = f"the model's context of {limit} tokens (config.max_position_embeddings)" if limit else "no model limit"
        raise CalibrationError(
            f"{what} seq_len={seq_len} does not fit {context}; accepted: 2 <= seq_len"
            + (f" <= {limit}" if limit else "")
        )


def _split_point(n: int, fraction: float) -> int:
    return int(n * fraction)


def calibration_windows(
    tokens: torch.Tensor, samples: int, seq_len: int, seed: int, source: str,
    fraction: float = CALIB_FRACTION,
) -> TokenWindows:
    """``samples`` random windows from the first ``fraction`` of ``tokens`` (protocol P1)."""
    head = tokens[: _split_point(len(tokens), fraction)]
    if len(head) <= seq_len:
        raise CalibrationError(
            f"{source}: found {len(tokens)} tokens, of which the first {fraction:.0%} "
            f"({len(head)}) are used for calibration; a window of {seq_len} tokens needs more than "
            f"{seq_len}. Use more text or a shorter --seq-len"
        )
    rng = random.Random(seed)
    starts = [rng.randint(0, len(head) - seq_len - 1) for _ in range(samples)]
    ids = torch.stack([head[s : s + seq_len] for s in starts])
    return TokenWindows(ids, source, seed, f"random windows from the first {fraction:.0%}")


def evaluation_windows(
    tokens: torch.Tensor, seq_len: int, max_windows: int | None, source: str,
    fraction: float = CALIB_FRACTION,
) -> TokenWindows:
    """Consecutive non-overlapping windows from the tokens after ``fraction`` (protocol P1)."""
    tail = tokens[_split_point(len(tokens), fraction) :]
    n = len(tail) // seq_len
    if n == 0:
        raise CalibrationError(
            f"{source}: found {len(tokens)} tokens, of which the last {1 - fraction:.0%} "
            f"({len(tail)}) are used for evaluation; one window needs {seq_len}. Use more text "
            "or a shorter --seq-len"
        )
    if max_windows is not None:
        n = min(n, max_windows)
    ids = tail[: n * seq_len].reshape(n, seq_len)
    return TokenWindows(ids, source, None, f"consecutive windows from the last {1 - fraction:.0%}")
