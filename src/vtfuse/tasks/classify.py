"""Image-text pair classification: {"image": ..., "text": "...", "label": "..."} (e.g. does the
text hold for the image?). The labels seen in training are the classes."""

from __future__ import annotations

from typing import Any

from vtfuse.tasks.fields import check_label, check_text
from vtfuse.tasks.spec import TaskSpec, register, text_to_class


def check_classify(fields: dict[str, Any], labelled: bool) -> str | None:
    return check_text(fields, "text") or check_label(fields, "label", labelled)


CLASSIFY = register(
    TaskSpec(
        "classify",
        check_classify,
        text_to_class("text", "label"),
        reads="text",
        label="label",
        help="classify an image-text pair (the labels seen in training are the classes)",
    )
)
