"""`vtfuse compare` end to end on a tiny budget, and its aggregation."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from vtfuse.cli.main import main
from vtfuse.compare import aggregate, flatten_metrics, parse_fusions
from vtfuse.fusion import FUSIONS

TINY = {
    "model": {
        "vision": {"image_size": 24, "channels": [8, 8, 16], "dim": 16, "depth": 0, "heads": 2},
        "text": {"dim": 16, "depth": 1, "heads": 2, "max_length": 48},
    },
    "train": {"epochs": 1, "batch_size": 32, "lr": 0.003},
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("compare")
    assert main(["synth", "--out", str(root), "--images", "20", "--size", "24"]) == 0
    (root / "tiny.json").write_text(json.dumps(TINY))
    return root


def compare_args(data: Path, task: str, out: Path) -> list[str]:
    return [
        "compare",
        "--task",
        task,
        *("--train", str(data / f"{task}_train.jsonl"), "--val", str(data / f"{task}_val.jsonl")),
        *("--test", str(data / f"{task}_test.jsonl"), "--config", str(data / "tiny.json")),
        *("--out", str(out), "--no-progress"),
    ]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_compare_two_strategies_two_seeds(data, tmp_path):
    out = tmp_path / "cmp"
    args = compare_args(data, "vqa", out)
    assert main([*args, "--fusions", "cross_attention,weighted_sum", "--seeds", "2"]) == 0
    rows = read_csv(out / "compare.csv")
    assert [r["fusion"] for r in rows] == ["cross_attention", "weighted_sum"]
    for row in rows:
        assert 0.0 <= float(row["accuracy_mean"]) <= 1.0
        assert float(row["accuracy_std"]) >= 0.0
        assert float(row["parameters_mean"]) > float(row["parameters_std"]) == 0.0
        assert float(row["latency_ms_per_image_mean"]) > 0
        assert float(row["samples_per_s_mean"]) > 0
        assert "pointing_accuracy_mean" in row and "accuracy_relational_mean" in row
        assert row["seeds"] == "2"
    raw = json.loads((out / "compare.json").read_text())
    assert [len(runs) for runs in raw.values()] == [2, 2]
    markdown = (out / "compare.md").read_text()
    assert "| weighted_sum |" in markdown and " ± " in markdown
    assert "Command: `vtfuse compare --task vqa" in markdown
    assert (out / "compare.png").stat().st_size > 0


def test_compare_captioning(data, tmp_path):
    out = tmp_path / "cap"
    args = [*compare_args(data, "caption", out), "--fusions", "similarity", "--seeds", "1"]
    assert main(args) == 0
    (row,) = read_csv(out / "compare.csv")
    assert {"cider_mean", "bleu4_mean", "object_f1_mean", "pointing_accuracy_mean"} <= set(row)


def test_caption_warm_start_starts_vqa_from_a_captioner(data, tmp_path, capsys):
    out = tmp_path / "warm"
    args = [
        *compare_args(data, "vqa", out),
        *("--caption-train", str(data / "caption_train.jsonl")),
        *("--caption-val", str(data / "caption_val.jsonl")),
        *("--fusions", "resampler", "--seeds", "1", "--caption-warm-start"),
    ]
    assert main(args) == 0
    assert "warm start from" in capsys.readouterr().out
    assert (out / "runs" / "resampler" / "seed0" / "caption" / "best").is_dir()


def test_unknown_fusion_is_refused_naming_the_choices(data, tmp_path, capsys):
    args = [*compare_args(data, "vqa", tmp_path / "x"), "--fusions", "cross_attention,nope"]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert "unknown fusion strategy 'nope'" in error and "weighted_sum" in error


def test_parse_fusions_all_is_every_registered_strategy():
    assert parse_fusions("all") == tuple(FUSIONS.names())
    assert parse_fusions(" similarity , resampler ") == ("similarity", "resampler")


def test_aggregate_mean_and_sample_std():
    runs = [{"accuracy": 0.5, "latency": 2.0}, {"accuracy": 0.7, "latency": 4.0, "extra": 1.0}]
    summary = aggregate(runs)
    assert set(summary) == {"accuracy", "latency"}  # only keys every seed has
    assert summary["accuracy"][0] == pytest.approx(0.6)
    assert summary["accuracy"][1] == pytest.approx(0.1414213, rel=1e-5)  # sample std
    assert aggregate([{"accuracy": 0.5}])["accuracy"] == (0.5, 0.0)


def test_flatten_metrics_spreads_accuracy_by_type():
    flat = flatten_metrics(
        {"accuracy": 0.5, "accuracy_by_type": {"relational": 0.25}, "examples": 10, "skipped": 0}
    )
    assert flat == {"accuracy": 0.5, "accuracy_relational": 0.25}
