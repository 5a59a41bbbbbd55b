"""`vtfuse compare` end to end on a tiny budget, its refusals, and its aggregation."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from tests.helpers import has_tool
from vtfuse.cli.main import main
from vtfuse.compare import aggregate, main_metrics, mean_and_std, parse_fusions
from vtfuse.fusion import FUSIONS

TINY = {  # a smaller cousin of test_cli's TINY_MODEL: 24-pixel images, one epoch
    "model": {
        "vision": {"image_size": 24, "channels": [8, 8, 16], "dim": 16, "depth": 0, "heads": 2},
        "text": {"dim": 16, "depth": 1, "heads": 2, "max_length": 48},
    },
    "train": {"epochs": 1, "batch_size": 32, "lr": 0.003},
}
BUDGET = ("--max-minutes-each", "1", "--no-progress")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("compare")
    assert main(["synth", "--out", str(root), "--images", "20", "--size", "24"]) == 0
    (root / "tiny.json").write_text(json.dumps(TINY))
    return root


def own_data(data: Path, task: str, out: Path) -> list[str]:
    """`vtfuse compare` arguments on the fixture's files, with the tiny config."""
    return [
        "compare",
        *("--task", task, "--out", str(out), "--config", str(data / "tiny.json"), *BUDGET),
        *("--train", str(data / f"{task}_train.jsonl"), "--val", str(data / f"{task}_val.jsonl")),
        *("--test", str(data / f"{task}_test.jsonl")),
    ]


def built_in_data(data: Path, task: str, out: Path) -> list[str]:
    """`vtfuse compare` arguments generating a dozen built-in scenes, with the tiny config."""
    return [
        "compare",
        *("--task", task, "--out", str(out), "--config", str(data / "tiny.json"), *BUDGET),
        *("--images", "12"),
    ]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_two_strategies_two_seeds_write_csv_md_png_json(data, tmp_path, capsys):
    out = tmp_path / "cmp"
    fusions = ["cross_attention", "weighted_sum"]
    args = [*own_data(data, "vqa", out), "--fusions", ",".join(fusions), "--seeds", "2"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "[compare 1/4] cross_attention, seed 0" in printed
    assert "[compare 4/4] weighted_sum, seed 1" in printed
    assert "| fusion | accuracy |" in printed  # the table, printed at the end

    rows = read_csv(out / "compare.csv")
    assert [r["fusion"] for r in rows] == fusions
    for row in rows:
        metrics = [c for c in row if c.endswith(("_mean", "_std"))]
        assert {"accuracy_mean", "accuracy_std", "pointing_accuracy_mean"} <= set(metrics)
        assert {"accuracy_relational_mean", "accuracy_non-relational_std"} <= set(metrics)
        assert all(math.isfinite(float(row[c])) for c in metrics)
        assert all(float(row[c]) >= 0 for c in metrics if c.endswith("_std"))
        assert 0.0 <= float(row["accuracy_mean"]) <= 1.0
        assert 0 < int(row["trainable_parameters"]) <= int(row["parameters"])
        assert float(row["latency_ms_per_image"]) > 0
        assert float(row["samples_per_s"]) > 0
        assert row["seeds"] == "2"
    assert int(rows[0]["parameters"]) != int(rows[1]["parameters"])  # different fusion modules

    raw = json.loads((out / "compare.json").read_text())
    assert [[run["seed"] for run in raw["runs"][f]] for f in fusions] == [[0, 1], [0, 1]]
    for fusion in fusions:
        for seed in (0, 1):
            run = out / "runs" / fusion / f"seed{seed}"
            assert (run / "best").is_dir()
            assert json.loads((run / "run.json").read_text())["model"]["fusion"]["name"] == fusion

    markdown = (out / "compare.md").read_text()
    assert "| weighted_sum |" in markdown and " ± " in markdown
    assert "sample standard deviation" in markdown and "at most 1 min" in markdown
    assert "Command: `vtfuse compare --task vqa" in markdown
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_comparisons_run_apart_join_into_one(data, tmp_path, capsys):
    """Two processes, one strategy each (as on two cores), joined: the same table and summary
    as the parts', one row per strategy; parts that overlap or differ are refused."""
    parts = []
    for fusion in ("cross_attention", "concat"):
        parts.append(tmp_path / fusion)
        assert main([*own_data(data, "vqa", parts[-1]), "--fusions", fusion, "--seeds", "2"]) == 0
    joined = tmp_path / "joined"
    assert main(["compare", "--join", *map(str, parts), "--out", str(joined)]) == 0
    raw = json.loads((joined / "compare.json").read_text())
    assert list(raw["runs"]) == ["cross_attention", "concat"] and len(raw["parts"]) == 2
    for part in parts:
        own = json.loads((part / "compare.json").read_text())
        fusion = next(iter(own["runs"]))
        assert raw["runs"][fusion] == own["runs"][fusion]
        assert raw["summary"][fusion] == own["summary"][fusion]  # the summary is stored
        mean, std = own["summary"][fusion]["accuracy"]
        assert f"| {fusion} | {mean:.3f} ± {std:.3f} |" in (joined / "compare.md").read_text()
    assert [r["fusion"] for r in read_csv(joined / "compare.csv")] == ["cross_attention", "concat"]
    capsys.readouterr()
    assert main(["compare", "--join", str(parts[0]), str(parts[0]), "--out", str(joined)]) == 2
    assert "appear in more than one part" in capsys.readouterr().err
    assert main(["compare", "--out", str(joined)]) == 2
    assert "--task and --max-minutes-each are needed" in capsys.readouterr().err


def test_captioning_on_the_built_in_scenes(data, tmp_path):
    out = tmp_path / "cap"
    assert (
        main([*built_in_data(data, "caption", out), "--fusions", "similarity", "--seeds", "1"]) == 0
    )
    assert (out / "data" / "caption_test.jsonl").is_file()
    (row,) = read_csv(out / "compare.csv")
    expected = {"cider", "bleu4", "object_f1"}  # pointing: only once a caption names a colour
    expected |= {"meteor"} if has_tool("java") else set()
    assert {f"{m}_mean" for m in expected} <= set(row)
    assert not any(c.startswith(("bleu1", "rouge")) for c in row)  # main metrics only


def test_caption_warm_start_trains_a_captioner_first(data, tmp_path, capsys):
    out = tmp_path / "warm"
    args = [*built_in_data(data, "vqa", out), "--fusions", "resampler", "--seeds", "1"]
    assert main([*args, "--caption-warm-start"]) == 0
    captioner = out / "runs" / "resampler" / "seed0-captioner"
    assert f"warm start from {captioner / 'best'}" in capsys.readouterr().out
    vqa = json.loads((out / "runs" / "resampler" / "seed0" / "run.json").read_text())
    assert vqa["task"] == "vqa" and vqa["train_config"]["init_from"] == str(captioner)
    assert json.loads((captioner / "run.json").read_text())["task"] == "caption"


def test_retrieval_strategies_are_compared_by_recall(data, tmp_path):
    out = tmp_path / "ret"
    args = [*built_in_data(data, "retrieval", out), "--fusions", "concat,cross_attention"]
    assert main([*args, "--seeds", "1", "--caption-warm-start"]) == 0
    rows = read_csv(out / "compare.csv")
    assert [r["fusion"] for r in rows] == ["concat", "cross_attention"]
    for row in rows:
        assert 0 <= float(row["t2i_r1_mean"]) <= 1 and 0 <= float(row["itm_i2t_r1_mean"]) <= 1
        assert float(row["latency_ms_per_image"]) > 0


def test_unknown_fusion_is_refused_naming_the_choices(data, tmp_path, capsys):
    out = tmp_path / "x"
    assert main([*built_in_data(data, "vqa", out), "--fusions", "cross_attention,nope"]) == 2
    error = capsys.readouterr().err
    assert "unknown fusion strategy 'nope'" in error
    assert all(name in error for name in FUSIONS.names())
    assert not (out / "data").exists()  # refused before generating anything


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--task", "caption", "--caption-warm-start"],
            "--caption-warm-start is for --task vqa or retrieval",
        ),
        (["--task", "vqa", "--seeds", "0"], "--seeds must be at least 1"),
        (["--task", "vqa", "--train", "t.jsonl"], "give all of --train, --val and --test"),
    ],
)
def test_bad_combinations_are_refused(tmp_path, capsys, extra, message):
    args = ["compare", "--out", str(tmp_path / "x"), "--max-minutes-each", "1", *extra]
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_parse_fusions_all_is_every_registered_strategy():
    assert parse_fusions("all") == tuple(FUSIONS.names())
    assert parse_fusions(" similarity , resampler,similarity") == ("similarity", "resampler")


def test_aggregate_mean_and_sample_std_over_seeds():
    seeds = [
        {"accuracy": 0.5, "latency": 2.0},
        {"accuracy": 0.7, "latency": 4.0, "extra": 1.0},
        {"accuracy": 0.9, "latency": 9.0},
    ]
    summary = aggregate(seeds)
    assert list(summary) == ["accuracy", "latency"]  # only keys every seed has
    assert summary["accuracy"] == pytest.approx((0.7, 0.2))  # sample std: sqrt(0.08 / 2)
    assert summary["latency"] == pytest.approx((5.0, math.sqrt(13.0)))  # (9 + 1 + 16) / 2
    assert mean_and_std([0.25]) == (0.25, 0.0)


def test_main_metrics_spread_accuracy_by_type_and_drop_the_rest():
    vqa = {
        "accuracy": 0.5,
        "accuracy_by_type": {"relational": 0.25, "non-relational": 0.75},
        "pointing_accuracy": 0.4,
        "examples": 10,
        "skipped": 0,
    }
    assert main_metrics("vqa", vqa) == {
        "accuracy": 0.5,
        "accuracy_relational": 0.25,
        "accuracy_non-relational": 0.75,
        "pointing_accuracy": 0.4,
    }
    caption = {"bleu1": 0.9, "bleu4": 0.3, "meteor": None, "cider": 1.2, "examples": 4}
    assert main_metrics("caption", caption) == {"cider": 1.2, "bleu4": 0.3}
