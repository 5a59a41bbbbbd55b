"""Evaluation: the field's metrics and `evaluate`, which runs a model over a dataset file."""

from vtfuse.evaluation.evaluate import EvalOptions, evaluate, format_table
from vtfuse.evaluation.metrics import caption_metrics, object_f1, vqa_accuracy

__all__ = [
    "EvalOptions",
    "caption_metrics",
    "evaluate",
    "format_table",
    "object_f1",
    "vqa_accuracy",
]
