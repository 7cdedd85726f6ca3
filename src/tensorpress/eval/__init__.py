"""Perplexity, KL/agreement, encoder fidelity, size and time."""

from tensorpress.eval.evaluate import EvalReport, evaluate
from tensorpress.eval.size import SizeReport, size_report

__all__ = ["EvalReport", "SizeReport", "evaluate", "size_report"]
