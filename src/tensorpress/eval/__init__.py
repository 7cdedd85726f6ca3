"""Perplexity, KL/agreement, encoder fidelity, size and time."""

from tensorpress.eval.evaluate import EvalReport, evaluate
from tensorpress.eval.kv import LongContextReport, PasskeyTrial, long_context, passkey
from tensorpress.eval.size import SizeReport, size_report
from tensorpress.eval.tasks import TASKS, TaskResult, tasks

__all__ = ["TASKS", "EvalReport", "LongContextReport", "PasskeyTrial", "SizeReport", "TaskResult", "evaluate", "long_context",
           "passkey", "size_report", "tasks"]
