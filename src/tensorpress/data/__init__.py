"""Calibration and evaluation token sources."""

from __future__ import annotations

import os

from tensorpress.data.generated import generated_windows
from tensorpress.data.sources import (
    CALIB_FRACTION,
    DEFAULT_TEXT,
    TextSource,
    TokenWindows,
    as_text_source,
    calibration_windows,
    check_context,
    context_length,
    evaluation_windows,
    hf_dataset,
    text_file,
)
from tensorpress.errors import CalibrationError


def calibration(
    lm,
    source: str | os.PathLike | TextSource = "generated",
    samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
) -> TokenWindows:
    """Calibration windows for ``lm``.

    ``source`` is ``"generated"`` (sampled from the model, seeded), a path to a UTF-8 text
    file, a ``TextSource``, or ``"hf:<dataset>[:<config>]:<split>"``.
    """
    if samples < 1 or seq_len < 2:
        raise CalibrationError(f"need samples >= 1 and seq_len >= 2, got samples={samples}, seq_len={seq_len}")
    text = None if source == "generated" else as_text_source(source)  # a bad source is named first
    check_context(lm.model, seq_len, "calibration")
    if text is None:
        return generated_windows(lm, samples, seq_len, seed)
    return calibration_windows(text.tokens(lm.tokenizer), samples, seq_len, seed, text.name)


def evaluation(
    lm, source: str | os.PathLike | TextSource, seq_len: int = 512, windows: int | None = 40
) -> TokenWindows:
    """Evaluation windows: consecutive, from the last 40 % of the text's tokens (P1)."""
    text = as_text_source(source)
    check_context(lm.model, seq_len, "evaluation")
    return evaluation_windows(text.tokens(lm.tokenizer), seq_len, windows, text.name)


__all__ = [
    "CALIB_FRACTION",
    "DEFAULT_TEXT",
    "TextSource",
    "TokenWindows",
    "calibration",
    "calibration_windows",
    "check_context",
    "context_length",
    "evaluation",
    "evaluation_windows",
    "hf_dataset",
    "text_file",
]
