"""What a task is, in one place: a `TaskSpec` per task, one file each, registered by name.

A spec says what a JSONL line of the task must hold (its check), what the model reads from it
and what it predicts (the items a line becomes), and which field holds the classes to learn.
Data loading, the trainer, evaluation and the CLI ask the registry (`task_spec`, `task_names`)
instead of keeping tables of their own, and name a task through its spec (`CAPTION.name`): no
task name is spelled outside this package. Adding a task is adding a file here that registers
one, and its model (`vtfuse.models`, registered under the spec's name).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vtfuse.data.bank import ImageTextDataset, LoadedData
from vtfuse.data.items import Truncation
from vtfuse.data.jsonl import Record, read_records
from vtfuse.data.tokenizer import AnyTokenizer
from vtfuse.tasks.caption import CAPTION
from vtfuse.tasks.classify import CLASSIFY
from vtfuse.tasks.joint import JOINT
from vtfuse.tasks.retrieval import RETRIEVAL
from vtfuse.tasks.spec import (
    TaskSpec,
    ranked_tasks,
    register,
    task_names,
    task_spec,
    with_task_schedule,
)
from vtfuse.tasks.vqa import VQA

__all__ = [
    "CAPTION",
    "CLASSIFY",
    "JOINT",
    "RETRIEVAL",
    "VQA",
    "TaskSpec",
    "ranked_tasks",
    "read_jsonl",
    "register",
    "task_dataset",
    "task_names",
    "task_spec",
    "with_task_schedule",
]


def read_jsonl(
    path: str | Path, task: str, labelled: bool = True, roots: Sequence[str | Path] = ()
) -> list[Record]:
    """Read and validate a dataset file of `task`; a bad line raises DataError naming
    file:line. `labelled=False` reads lines without their targets (captions, answers,
    labels), for prediction. `roots`: folders besides the file's own its images may come from
    (see `vtfuse.data.jsonl.safe_image_path`)."""
    return read_records(path, task_spec(task).check, labelled, roots)


def task_dataset(
    task: str, data: LoadedData, tokenizer: AnyTokenizer, max_length: int
) -> ImageTextDataset:
    """The examples of `task` over decoded records: each record's items share its image.
    Texts longer than `max_length` tokens are cut, with one TextTruncated warning."""
    spec, cut = task_spec(task), Truncation(max_length)
    items = [
        (image_id, ids, label)
        for record, image_id in zip(data.records, data.image_ids, strict=True)
        for ids, label in spec.items(record, tokenizer, cut)
    ]
    cut.warn(spec.reads)
    return ImageTextDataset(data.bank, items)


def warn_long_texts(
    task: str, records: list[Record], tokenizer: AnyTokenizer, max_length: int
) -> None:
    """One TextTruncated warning if any of the records' model inputs exceed `max_length`."""
    spec, cut = task_spec(task), Truncation(max_length)
    for record in records:
        spec.items(record, tokenizer, cut)
    cut.warn(spec.reads)
