"""``tp.evaluate``: quality, size and time of a (compressed) model in one report."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

from tensorpress.data import DEFAULT_TEXT, TextSource, TokenWindows, evaluation
from tensorpress.errors import TensorpressError
from tensorpress.eval.quality import causal_quality, encoder_quality, wrap_for_encoder
from tensorpress.eval.size import size_report
from tensorpress.io import checkpoint_bytes
from tensorpress.models import LoadedModel


@dataclass
class EvalReport:
    model: str
    reference: str | None
    data: str
    windows: int
    seq_len: int
    tokens: int
    bits_per_weight_linears: float
    bits_per_weight_model: float
    params: int
    model_bytes: float  # exact storage from the parts' bit counts
    size_on_disk: int | None = None  # bytes of the checkpoint directory, when there is one
    perplexity: float | None = None
    reference_perplexity: float | None = None
    kl: float | None = None
    top1_agreement: float | None = None
    cosine_similarity: float | None = None
    hidden_mse: float | None = None
    compression_seconds: float | None = None
    eval_seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Fields as a dict; NaN (e.g. bits/weight of linears when none is compressed) -> None,
        so the JSON is valid for strict parsers."""
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(self).items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


def _as_loaded(model: Any) -> tuple[LoadedModel, float | None]:
    if isinstance(model, LoadedModel):
        manifest = model.info.get("manifest") or {}
        seconds = model.info.get("compression_seconds", (manifest.get("timings") or {}).get("total_seconds"))
        return model, seconds
    if hasattr(model, "model") and isinstance(model.model, LoadedModel):  # a CompressionResult
        return model.model, model.timings.get("total_seconds")
    raise TypeError(f"expected a LoadedModel or CompressionResult, got {type(model).__name__}")


def evaluate(
    model: Any,
    reference: LoadedModel | None = None,
    data: TokenWindows | TextSource | str | os.PathLike | None = None,
    *,
    seq_len: int = 512,
    windows: int | None = 40,
    batch_size: int = 1,
    reference_cache: dict | None = None,
) -> EvalReport:
    """Evaluate ``model`` (a ``LoadedModel`` or ``CompressionResult``).

    ``data`` is token windows, or text (a ``TextSource``, a path, ``hf:...``) from whose last
    40 % ``windows`` consecutive windows of ``seq_len`` tokens are taken (protocol P1);
    default: the shared WikiText-2 file. KL, agreement and encoder fidelity need ``reference``.
    ``reference_cache`` (a dict, causal models): keep the reference's outputs across calls on
    the same windows, so it runs once for many evaluated models (memory: tokens x vocab floats).
    """
    lm, compression_seconds = _as_loaded(model)
    start = time.perf_counter()
    if isinstance(data, TokenWindows):
        win = data
    else:
        win = evaluation(lm, DEFAULT_TEXT if data is None else data, seq_len=seq_len, windows=windows)
    size = size_report(lm.model)
    checkpoint = lm.info.get("checkpoint")
    report = EvalReport(
        model=lm.info.get("checkpoint") or lm.spec,
        reference=reference.spec if reference is not None else None,
        data=f"{win.source} ({win.note})" if win.note else win.source,
        windows=win.samples,
        seq_len=win.seq_len,
        tokens=0,
        bits_per_weight_linears=size.bits_per_weight_linears,
        bits_per_weight_model=size.bits_per_weight_model,
        params=size.model_weights,
        model_bytes=size.model_bytes,
        size_on_disk=checkpoint_bytes(checkpoint) if checkpoint else None,
        compression_seconds=compression_seconds,
    )
    if lm.causal:
        q = causal_quality(lm.model, win, reference.model if reference else None, batch_size, reference_cache)
        report.tokens = q.tokens
        report.perplexity, report.reference_perplexity = q.perplexity, q.reference_perplexity
        report.kl, report.top1_agreement = q.kl, q.top1_agreement
    else:
        if reference is None:
            raise TensorpressError("encoder fidelity is measured against a reference: pass reference=")
        ids = wrap_for_encoder(win, lm.tokenizer)
        q = encoder_quality(lm.model, reference.model, ids, batch_size=max(batch_size, 8))
        report.tokens = q.tokens
        report.cosine_similarity, report.hidden_mse = q.cosine_similarity, q.hidden_mse
    report.eval_seconds = time.perf_counter() - start
    return report
