"""The task registry: what each task reads from a JSONL line, and adding a task in one place."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from vtfuse.data.bank import load_records
from vtfuse.data.items import Item, Truncation, collate
from vtfuse.data.jsonl import DataError, Record
from vtfuse.data.tokenizer import Tokenizer
from vtfuse.tasks import TaskSpec, read_jsonl, register, task_dataset, task_names, task_spec
from vtfuse.tasks.fields import check_label, check_text
from vtfuse.tasks.spec import _SPECS

LINES = {
    "caption": {"caption": "a red square."},
    "vqa": {"question": "what colour is it?", "answer": "red"},
    "retrieval": {"captions": ["a red square.", "red."]},
    "classify": {"text": "the square is red.", "label": "yes"},
    "joint": {"caption": "a red square."},
}


def test_every_task_is_registered_with_a_line_it_reads():
    assert set(task_names()) == set(LINES)


@pytest.mark.parametrize("task", sorted(LINES))
def test_each_task_reads_its_lines_and_refuses_them_without_its_text(tmp_path, task):
    Image.new("RGB", (8, 8), (200, 30, 30)).save(tmp_path / "a.png")
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"image": "a.png", **LINES[task]}) + "\n")
    (record,) = read_jsonl(good, task)
    spec = task_spec(task)
    assert spec.texts(record)  # what the tokenizer learns from
    tokenizer = Tokenizer.build(spec.texts(record), answers=["red", "yes"])
    items = spec.items(record, tokenizer, Truncation(16))
    assert items and all(ids for ids, _ in items)
    labels = {label for _, label in items}
    assert labels == ({None} if not spec.label else {tokenizer.answer_id(LINES[task][spec.label])})

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "a.png", "other": "x"}) + "\n")
    with pytest.raises(DataError, match=rf"{bad}:1: missing field"):
        read_jsonl(bad, task)


def test_an_unknown_task_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown task 'ocr'; choose one of: caption, classify"):
        task_spec("ocr")


@pytest.fixture
def ocr_task():
    """A task that exists only in this test: read the text in an image, as a class."""

    def check(fields, labelled):
        return check_text(fields, "prompt") or check_label(fields, "reading", labelled)

    def items(record: Record, tokenizer, cut: Truncation) -> list[Item]:
        ids = cut.fit(tokenizer.encode(record.fields["prompt"]), cut.max_length, record.where)
        return [(ids, tokenizer.answer_id(record.fields.get("reading", "")))]

    spec = register(TaskSpec("ocr", check, items, reads="prompt", label="reading"))
    yield spec
    del _SPECS["ocr"]


def test_a_task_added_in_one_place_reads_checks_and_batches(tmp_path, ocr_task):
    """Nothing in the data code knows the new task: the registry is all it takes."""
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30)]):
        Image.new("RGB", (8, 8), colour).save(tmp_path / f"{i}.png")
    lines = [{"image": f"{i}.png", "prompt": "read it", "reading": f"r{i}"} for i in range(2)]
    path = tmp_path / "ocr.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    records = read_jsonl(path, "ocr")
    tokenizer = Tokenizer.build(
        [t for r in records for t in ocr_task.texts(r)], answers=["r0", "r1"]
    )
    dataset = task_dataset("ocr", load_records(records, 8, progress=False), tokenizer, 8)
    batch = collate([dataset[0], dataset[1]])
    assert batch["images"].shape == (2, 3, 8, 8)
    assert batch["answers"].tolist() == [tokenizer.answer_id("r0"), tokenizer.answer_id("r1")]

    path.write_text(json.dumps({"image": "0.png", "prompt": "read it"}) + "\n")
    with pytest.raises(DataError, match="missing field 'reading'"):
        read_jsonl(path, "ocr")
    assert read_jsonl(path, "ocr", labelled=False)  # for prediction: no target needed
