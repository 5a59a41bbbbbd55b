"""WebDataset shards: packed from JSONL, streamed back, trained on with the same losses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import require_module
from vtfuse.cli.main import main
from vtfuse.config import ModelConfig, TextConfig, TrainConfig, VisionConfig
from vtfuse.data.bank import load_records
from vtfuse.data.jsonl import DataError
from vtfuse.data.shards import ShardDataset, shard_records, write_shards
from vtfuse.data.synth import SynthSpec, generate
from vtfuse.data.tokenizer import Tokenizer
from vtfuse.tasks import read_jsonl, task_dataset
from vtfuse.training import train

MODEL = ModelConfig(
    vision=VisionConfig(image_size=24, channels=(8, 8, 16), dim=32, depth=0, heads=2),
    text=TextConfig(dim=32, depth=1, heads=2, max_length=48),
)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    generate(root, SynthSpec(images=24, size=24, seed=3), progress=False)
    return root


@pytest.mark.parametrize("task", ["caption", "vqa"])
def test_streamed_examples_equal_the_in_memory_ones(data, tmp_path, task):
    jsonl = data / f"{task}_train.jsonl"
    index = write_shards(jsonl, task, tmp_path / "shards", shard_size=5)
    records = read_jsonl(jsonl, task)
    assert index["records"] == len(records) and len(index["shards"]) == -(-len(records) // 5)
    texts = [r.fields.get("question", "") for r in records] + [
        c for r in records if task == "caption" for c in r.captions
    ]
    tokenizer = Tokenizer.build(texts, answers=[r.fields.get("answer", "x") for r in records])
    memory = task_dataset(task, load_records(records, 24, progress=False), tokenizer, 48)
    stream = ShardDataset(tmp_path / "shards", task, tokenizer, 48, 24, shuffle=False)
    streamed = list(stream)
    assert len(streamed) == len(memory) == len(stream)
    for i, item in enumerate(streamed):
        expected = memory[i]
        assert torch.equal(item["images"], expected["images"])
        assert torch.equal(item["tokens"], expected["tokens"])
        if task == "vqa":
            assert item["answers"] == expected["answers"]
    assert [r.fields for r in shard_records(tmp_path / "shards", task)] == [
        {**r.fields, "source": r.where} for r in records
    ]


def test_shuffled_streams_differ_by_epoch_and_keep_every_example(data, tmp_path):
    write_shards(data / "caption_train.jsonl", "caption", tmp_path / "s", shard_size=4)
    tokenizer = Tokenizer.build(["a"])
    stream = ShardDataset(tmp_path / "s", "caption", tokenizer, 48, 24, shuffle=True, buffer=8)
    orders = []
    for epoch in (0, 1):
        stream.set_epoch(epoch)
        orders.append([item["image_id"] for item in stream])
    assert orders[0] != orders[1] and sorted(orders[0]) == sorted(orders[1])


def test_training_from_shards_gives_the_jsonl_loss_curve(data, tmp_path):
    write_shards(data / "caption_train.jsonl", "caption", tmp_path / "shards", shard_size=7)
    config = TrainConfig(epochs=2, batch_size=8, lr=3e-3, shuffle=False, save_every=0)
    curves = []
    for name, source in (("jsonl", data / "caption_train.jsonl"), ("shards", tmp_path / "shards")):
        train(
            "caption",
            source,
            tmp_path / name,
            None,
            MODEL,
            config,
            progress=False,
            log=lambda _: None,
        )
        log = [
            json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()
        ]
        curves.append([entry["train_loss"] for entry in log])
    assert len(curves[0]) == 2 and curves[0] == curves[1]


def test_the_command_line_shards_a_folder_and_trains_on_it(data, tmp_path, capsys):
    folder = tmp_path / "jsonl"
    folder.mkdir()
    for split in ("train", "val"):
        lines = (data / f"vqa_{split}.jsonl").read_text().replace('"images/', f'"{data}/images/')
        (folder / f"{split}.jsonl").write_text(lines)
    shard = ["data", "shard", str(folder), "--task", "vqa", "--out", str(tmp_path / "s")]
    assert main(shard) == 2  # absolute image paths: their folder must be allowed
    assert "train.jsonl:1: image path" in capsys.readouterr().err
    assert main([*shard, "--image-root", str(data / "images")]) == 0
    assert "records in 1 shard(s)" in capsys.readouterr().out
    tiny = {
        "model": {
            "vision": {"image_size": 24, "channels": [8, 8, 16], "dim": 32, "depth": 0, "heads": 2},
            "text": {"dim": 32, "depth": 1, "heads": 2},
        }
    }
    (tmp_path / "tiny.json").write_text(json.dumps(tiny))
    args = [
        "train",
        "--task",
        "vqa",
        "--train",
        str(tmp_path / "s" / "train"),
        "--val",
        str(folder / "val.jsonl"),
    ]
    args += [
        "--out",
        str(tmp_path / "run"),
        "--config",
        str(tmp_path / "tiny.json"),
        "--epochs",
        "1",
        "--no-progress",
        "--image-root",  # the validation file's absolute paths
        str(data / "images"),
    ]
    assert main(args) == 0
    wrong = ["train", "--task", "caption", "--train", str(tmp_path / "s" / "train")]
    assert (
        main([*wrong, "--out", str(tmp_path / "run2"), "--config", str(tmp_path / "tiny.json")])
        == 2
    )
    assert "shards of task 'vqa', not 'caption'" in capsys.readouterr().err


def test_streamed_over_long_texts_are_cut_with_one_warning_naming_the_source(data, tmp_path):
    from vtfuse.data.items import TextTruncated

    jsonl = data / "caption_train.jsonl"
    write_shards(jsonl, "caption", tmp_path / "s", shard_size=4)
    tokenizer = Tokenizer.build([c for r in read_jsonl(jsonl, "caption") for c in r.captions])
    stream = ShardDataset(tmp_path / "s", "caption", tokenizer, 6, 24, shuffle=False)
    with pytest.warns(TextTruncated) as caught:
        items = list(stream)
    cut = [str(w.message) for w in caught if issubclass(w.category, TextTruncated)]
    assert len(cut) == 1 and f"(the first: {jsonl}:1)" in cut[0]
    assert max(len(item["tokens"]) for item in items) == 6


def test_a_missing_image_is_named_when_sharding(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"image": "nope.png", "caption": "x"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: cannot read image"):
        write_shards(tmp_path / "bad.jsonl", "caption", tmp_path / "out")


def test_worker_processes_split_the_shards(data, tmp_path):
    from torch.utils.data import DataLoader

    from vtfuse.data.items import collate

    write_shards(data / "caption_train.jsonl", "caption", tmp_path / "s", shard_size=3)
    stream = ShardDataset(tmp_path / "s", "caption", Tokenizer.build(["a"]), 48, 24, shuffle=True)
    loader = DataLoader(stream, batch_size=4, collate_fn=collate, num_workers=2)
    seen = [len(batch["tokens"]) for batch in loader]
    assert sum(seen) == len(stream)  # every example once, across both workers


@pytest.mark.parametrize("video", [False, True], ids=["frame folders", "mp4 files"])
@pytest.mark.parametrize("task", ["caption", "vqa", "classify"])
def test_streamed_clips_equal_the_in_memory_ones(tmp_path, task, video):
    """Clips packed as their frames (or their video file) stream back as the in-memory bank
    holds them: the same 4 sampled frames of every clip, the same texts."""
    if video:
        require_module("av")
    from vtfuse.data.synth_clips import ClipSpec, generate_clips

    generate_clips(tmp_path, ClipSpec(clips=10, size=24, length=6, video=video), progress=False)
    jsonl = tmp_path / f"{task}_train.jsonl"
    write_shards(jsonl, task, tmp_path / "shards", shard_size=3)
    records = read_jsonl(jsonl, task)
    texts = [r.fields.get("question", r.fields.get("text", "")) for r in records]
    texts += [c for r in records if task == "caption" for c in r.captions]
    answers = [str(r.fields.get("answer", r.fields.get("label", "x"))) for r in records]
    tokenizer = Tokenizer.build(texts, answers=answers)
    loaded = load_records(records, 24, progress=False, frames=4)
    memory = task_dataset(task, loaded, tokenizer, 48)
    stream = ShardDataset(tmp_path / "shards", task, tokenizer, 48, 24, shuffle=False, frames=4)
    streamed = list(stream)
    assert len(streamed) == len(memory) > 0
    for i, item in enumerate(streamed):
        assert item["images"].shape == (4, 3, 24, 24)
        assert torch.equal(item["images"], memory[i]["images"])
        assert torch.equal(item["tokens"], memory[i]["tokens"])
        if "answers" in memory[i]:
            assert item["answers"] == memory[i]["answers"]


def test_a_clip_model_trains_on_streamed_clips(tmp_path, capsys):
    """`vtfuse data shard` packs clip lines; `vtfuse train --frames 4` streams them."""
    from vtfuse.data.synth_clips import ClipSpec, generate_clips

    generate_clips(tmp_path / "d", ClipSpec(clips=12, size=24, length=6), progress=False)
    shards = tmp_path / "shards"
    assert (
        main(
            [
                "data",
                "shard",
                str(tmp_path / "d" / "vqa_train.jsonl"),
                "--task",
                "vqa",
                "--out",
                str(shards),
                "--shard-size",
                "4",
            ]
        )
        == 0
    )
    config = tmp_path / "tiny.json"
    config.write_text(
        json.dumps(
            {
                "model": {
                    "vision": {
                        "image_size": 24,
                        "channels": [8, 8, 16],
                        "dim": 32,
                        "depth": 0,
                        "heads": 2,
                    },
                    "text": {"dim": 32, "depth": 1, "heads": 2},
                }
            }
        )
    )
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--task",
                "vqa",
                "--train",
                str(shards),
                "--frames",
                "4",
                "--config",
                str(config),
                "--epochs",
                "1",
                "--out",
                str(run),
                "--no-progress",
            ]
        )
        == 0
    )
    assert json.loads((run / "best" / "config.json").read_text())["model"]["vision"]["frames"] == 4
