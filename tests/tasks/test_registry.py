"""The task registry: what each task reads from a JSONL line, and adding a task in one place."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from PIL import Image

from tests.helpers import save_tiny_lm
from vtfuse.config import TextConfig, VisionConfig
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


def _spelled_task_names(path) -> list[str]:
    """Where `path` spells a task's name as a string, other than as a field of a record or a
    response (a dict key, a subscript, a `.get` argument: "caption" is also a JSONL field)."""
    import ast

    tree = ast.parse(path.read_text())
    fields = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            fields |= {id(key) for key in node.keys if key is not None}
        elif isinstance(node, ast.Subscript):
            fields.add(id(node.slice))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "get" and node.args:
            fields.add(id(node.args[0]))
    return [
        f"{path.name}:{node.lineno}: {node.value!r}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and node.value in set(task_names())
        and id(node) not in fields
    ]


def test_no_task_name_is_spelled_outside_the_task_registry():
    """Code names a task through its spec (`CAPTION.name`), so renaming or adding one is one
    file. The one exception: `ModelConfig.task`'s default (the config sits below the tasks)."""
    from pathlib import Path

    import vtfuse

    package = Path(vtfuse.__file__).parent
    spelled = [
        where
        for path in sorted(package.rglob("*.py"))
        if "tasks" not in path.relative_to(package).parts and path.name != "config.py"
        for where in _spelled_task_names(path)
    ]
    assert spelled == []
    assert _spelled_task_names(package / "tasks" / "vqa.py")  # the scan finds a spelled name


# -- every task with every text side it has ---------------------------------------------------
TINY_VISION = VisionConfig(image_size=24, channels=(8, 8, 16), dim=32, depth=0, heads=2)
TINY_TEXT = TextConfig(dim=32, depth=1, heads=2, max_length=48)
OWN_TEXT_SIDES = ("transformer", "lstm", "gru")
PRETRAINED_LMS = ("gpt2", "bert")  # a causal LM; a BERT-style encoder (as a decoder: BLIP's)


def _text_sides() -> list[tuple[str, str]]:
    from vtfuse.models import LM_TASKS, TASKS

    own = [(task, side) for task in TASKS.names() for side in OWN_TEXT_SIDES]
    return own + [(task, lm) for task in LM_TASKS.names() for lm in PRETRAINED_LMS]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from vtfuse.data.synth import SynthSpec, generate

    out = tmp_path_factory.mktemp("scenes")
    generate(out, SynthSpec(images=16, seed=3, size=24, questions_per_kind=1), progress=False)
    return out


@pytest.fixture(scope="module")
def tiny_lms(tmp_path_factory):
    return {
        family: save_tiny_lm(family, tmp_path_factory.mktemp(family)) for family in PRETRAINED_LMS
    }


@pytest.mark.parametrize(("task", "side"), _text_sides())
def test_every_task_trains_saves_reloads_and_predicts_with_each_text_side(
    scenes, tiny_lms, tmp_path, task, side
):
    """A few steps of training, the run's best model reloaded from disk, and `vtfuse eval`'s
    predictions for every test line (a joint model: as a captioner and as a retriever)."""
    from vtfuse.config import LMConfig, ModelConfig, TrainConfig
    from vtfuse.evaluation import EvalOptions, evaluate
    from vtfuse.training import train

    files = task_spec(task).capabilities[0]  # the joint model learns from caption files
    if side in OWN_TEXT_SIDES:
        model = ModelConfig(task, TINY_VISION, replace(TINY_TEXT, encoder=side))
    else:
        model = ModelConfig(task, TINY_VISION, TINY_TEXT, lm=LMConfig(name=str(tiny_lms[side])))
    run = tmp_path / "run"
    train(
        task,
        scenes / f"{files}_train.jsonl",
        run,
        scenes / f"{files}_val.jsonl",
        model,
        TrainConfig(epochs=1, batch_size=8, save_every=0),
        progress=False,
        log=lambda _: None,
    )
    saved = json.loads((run / "best" / "config.json").read_text())["model"]
    assert (saved["task"], saved["text"]["encoder"], bool(saved["lm"]["name"])) == (
        task,
        side if side in OWN_TEXT_SIDES else "transformer",
        side not in OWN_TEXT_SIDES,
    )
    predictions = tmp_path / "predictions.jsonl"
    metrics = evaluate(
        run, scenes / f"{files}_test.jsonl", EvalOptions(progress=False), predictions
    )
    lines = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert metrics["examples"] == len(lines) > 0 and metrics["skipped"] == 0
    capabilities = task_spec(task).capabilities
    for line in lines:  # a joint model's: {"caption": ..., "retrieval": ...}
        predicted = line["prediction"] if len(capabilities) > 1 else {task: line["prediction"]}
        assert set(predicted) == set(capabilities)
        assert all(isinstance(text, str) for text in predicted.values())
