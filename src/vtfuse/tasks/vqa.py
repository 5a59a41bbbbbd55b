"""Visual question answering: {"image": ..., "question": "...", "answer": "...", "type": "..."}
("answers": [...] optional, for the VQA soft score). The answer is a class: the answers seen in
training are the classes, and an unseen one is always wrong."""

from __future__ import annotations

from typing import Any

from vtfuse.data.jsonl import is_str_list
from vtfuse.tasks.fields import check_label, check_text
from vtfuse.tasks.spec import TaskSpec, register, text_to_class


def check_vqa(fields: dict[str, Any], labelled: bool) -> str | None:
    problem = check_text(fields, "question") or check_label(fields, "answer", labelled)
    if problem:
        return problem
    if "answers" in fields and not is_str_list(fields["answers"]):
        return "field 'answers' must be a non-empty list of strings"
    if "type" in fields and not isinstance(fields["type"], str):
        return "field 'type' must be a string"
    return None


VQA = register(
    TaskSpec(
        "vqa",
        check_vqa,
        text_to_class("question", "answer"),
        reads="question",
        label="answer",
        help="answer a question about an image (the answers seen in training are the classes)",
        metrics=("accuracy", "pointing_accuracy"),  # and accuracy_<type> after accuracy
        headline="accuracy",
    )
)
