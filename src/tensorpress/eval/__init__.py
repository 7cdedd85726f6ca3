"""Perplexity, KL/agreement, encoder fidelity, size and time."""

from tensorpress.eval.evaluate import EvalReport, evaluate
from tensorpress.eval.kv import LongContextReport, PasskeyTrial, long_context, passkey
from tensorpress.eval.size import SizeReport, size_report

__all__ = ["EvalReport", "LongContextReport", "PasskeyTrial", "SizeReport", "evaluate", "long_context", "passkey",
           "size_report"]
