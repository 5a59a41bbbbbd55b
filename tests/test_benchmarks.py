"""The speed benchmark compares like with like: vtfuse's captioner and transformers'
VisionEncoderDecoderModel are built at the same size, and every workload runs on both. The
joint-training and video benchmarks run the README's commands (here at tiny settings) and store
what its tables show."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.helpers import require_module

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
matched = require_module("matched")
run = require_module("run")
joint = require_module("joint")
video = require_module("video")
require_module("transformers")


@pytest.mark.parametrize("size", sorted(matched.SIZES))
def test_the_two_models_have_the_same_size(size):
    spec = matched.SIZES[size]
    ours = matched.parameters(matched.vtfuse_captioner(spec))
    theirs = matched.parameters(matched.hf_captioner(spec))
    assert abs(ours / theirs - 1) < 0.02, (ours, theirs)


def test_every_workload_does_the_same_work_on_both():
    """At a tiny size: both generate exactly `new_tokens` tokens per image (beams too), and
    both training steps change the weights."""
    tiny = replace(matched.SIZES["small"], name="tiny", image_size=16, hidden=32, layers=1)
    tiny = replace(tiny, heads=2, vocab=50, new_tokens=5)
    device = torch.device("cpu")
    for work in run.WORKLOADS:
        work = replace(work, batch=2)
        for name in run.MODELS:
            model = run.MODELS[name](tiny)
            job = run.JOBS[name](model, tiny, work, run.inputs(tiny, work.batch, device))
            run.prepare(name, model, work)
            before = [p.detach().clone() for p in model.parameters()]
            out = job()
            if work.train:
                after = list(model.parameters())
                moved = sum(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
                assert moved > len(before) // 2, name
            elif name == "vtfuse":
                assert [len(t) for t in out.tokens] == [tiny.new_tokens] * work.batch
            else:
                assert out.shape == (work.batch, tiny.new_tokens + 1)  # with the start token


def run_in_process(monkeypatch, tmp_path, module) -> list[list[str]]:
    """`module.vtfuse` runs the command in this process (no interpreter start-up each time,
    so a script's seven commands fit in seconds) and records it. PATH is emptied: without
    Java, captions are scored without METEOR and the PTB tokenizer, whose start-ups would
    double the joint test's time."""
    from vtfuse.cli.main import main as cli

    commands = []

    def in_process(*args, prefix=None):
        commands.append(list(args))
        assert cli(list(args)) == 0, args

    monkeypatch.setattr(module, "vtfuse", in_process)
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    return commands


@pytest.mark.filterwarnings("ignore:java not found")
def test_the_joint_benchmark_runs_the_readmes_commands(tmp_path, monkeypatch):
    commands = run_in_process(monkeypatch, tmp_path, joint)
    out = tmp_path / "joint.json"
    data, runs = str(tmp_path / "data"), str(tmp_path / "runs")
    tiny = ["--images", "30", "--minutes", "0.05", "--data", data, "--runs", runs]
    joint.main([*tiny, "--out", str(out)])
    trains = [c for c in commands if c[0] == "train"]
    assert [c[1:3] for c in trains] == [
        ["--task", "caption"],
        ["--task", "retrieval"],
        ["--losses", "itc,itm,lm"],
    ]
    assert all(c[c.index("--max-minutes") + 1] == "0.05" for c in trains)  # nothing else set
    assert not any("--batch-size" in c or "--config" in c or "--epochs" in c for c in trains)
    assert [c[1].endswith("last") for c in commands if c[0] == "eval"] == [True] * 3
    report = json.loads(out.read_text())
    caption, retrieval, both = report["runs"]
    assert {"cider", "object_f1"} <= caption["test"].keys()  # pointing: once it names objects
    keys = {"i2t_r1", "t2i_r1", "itm_i2t_r1", "itm_t2i_r1"}
    assert keys <= retrieval["test"].keys() and keys | {"cider", "object_f1"} <= both["test"].keys()
    assert {"val_itc", "val_itm", "val_lm"} <= both["final_val"].keys()
    assert caption["steps"] > 0 and both["steps"] > 0 and both["seconds"] <= 0.05 * 60 + 5


def test_the_joint_benchmark_counts_a_capped_epoch_in_part(tmp_path):
    """Three epochs of 15 steps, then the time cap at step 57: 3.8 epochs."""
    lines = [{"step": 15 * e, "epoch": e, "minutes": e / 10, "val_loss": 1 / e} for e in (1, 2, 3)]
    lines += [{"step": 50, "epoch": 4, "loss": 0.5, "samples_per_s": 400.0}]
    lines += [{"step": 57, "epoch": 4, "minutes": 0.42, "train_loss": 0.5}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    log = joint.read_log(tmp_path)
    assert (log["steps"], log["epochs"], log["epochs_completed"]) == (57, 3.8, 3)
    assert log["stopped_by_cap"] and log["seconds"] == 25.2 and log["examples_per_s"] == 400.0
    assert log["final_val"] == {"val_loss": 1 / 3}
    assert video.read_log(tmp_path)["epochs"] == 3.8


def test_the_video_benchmark_runs_the_readmes_commands(tmp_path, monkeypatch):
    commands = run_in_process(monkeypatch, tmp_path, video)
    out = tmp_path / "video.json"
    data, runs = str(tmp_path / "data"), str(tmp_path / "runs")
    tiny = ["--clips", "30", "--minutes", "2", "--epochs", "2", "--data", data, "--runs", runs]
    video.main([*tiny, "--out", str(out)])
    trains = [c for c in commands if c[0] == "train"]
    assert [c[c.index("--frames") + 1] for c in trains] == ["4", "1"]
    assert ["--blind" in c for c in commands if c[0] == "eval"] == [False, False, True]
    report = json.loads(out.read_text())
    assert [(row["frames"], row["blind"]) for row in report["runs"]] == [
        (4, False),
        (1, False),
        (4, True),
    ]
    for row in report["runs"]:
        assert {"accuracy", "which_way", "does_it_move", "epochs", "minutes"} <= row.keys()
        assert row["which_way"] is not None and row["does_it_move"] is not None
    assert report["config"]["train"]["epochs"] == 2 and report["data"]["test"]["questions"] > 0


def test_steps_to_look_records_its_variant_and_restores_the_default(tmp_path):
    """The onset benchmark trains the step count it is given, records the command that makes
    its curve again, and builds its model at `--cnn-branch-gain` without changing the
    library's default for anything built after it."""
    from vtfuse.compare.runs import synthetic_data
    from vtfuse.encoders import vision

    steps_to_look = require_module("steps_to_look")
    data = synthetic_data(tmp_path / "data", "vqa", 12, progress=False)
    out = tmp_path / "steps.json"
    tiny = '{"vision": {"channels": [8, 8, 16], "dim": 16}, "text": {"dim": 16, "depth": 1}}'
    flags = ["--steps", "2", "--every", "1", "--model", tiny, "--seed", "3", "--out", str(out)]
    data_flags = [str(data.train), str(data.val), *flags]
    steps_to_look.main([*data_flags, "--name", "full", "--cnn-branch-gain", "1"])
    assert vision.CNN_BRANCH_GAIN == 0.3
    steps_to_look.main([*data_flags, "--name", "default", "--order-seed", "4"])
    results = json.loads(out.read_text())
    curve = results["default"]["curve"]
    assert [point["step"] for point in curve] == [1, 2]
    assert {"accuracy_relational", "accuracy_non-relational"} <= curve[-1].keys()
    assert "--seed 3 --order-seed 4 --cnn-branch-gain 0.3" in results["default"]["command"]
    assert "--cnn-branch-gain 1.0" in results["full"]["command"]


def test_warm_start_gain_merges_runs_by_gain_and_seed(tmp_path):
    """The joined file holds each run's headline figures only, ordered by gain then seed."""
    warm_start_gain = require_module("warm_start_gain")
    parts = []
    for gain, seed, r1 in ((1.0, 1, 0.9), (0.3, 0, 0.8), (1.0, 0, 0.7)):
        caption = {"object_f1": 0.99, "pointing_accuracy": 0.8, "cider": 9.0}
        retrieval = {key: r1 for key in warm_start_gain.RETRIEVAL_KEYS} | {"examples": 300}
        part = tmp_path / f"{gain}_{seed}.json"
        part.write_text(
            json.dumps({"gain": gain, "seed": seed, "caption": caption, "retrieval": retrieval})
        )
        parts.append(part)
    out = tmp_path / "joined.json"
    warm_start_gain.main(["--merge", *map(str, parts), "--out", str(out)])
    runs = json.loads(out.read_text())["runs"]
    assert [(run["gain"], run["seed"]) for run in runs] == [(0.3, 0), (1.0, 0), (1.0, 1)]
    assert [run["retrieval"]["i2t_r1"] for run in runs] == [0.8, 0.7, 0.9]
    assert set(runs[0]["caption"]) == {"object_f1", "pointing_accuracy"}
    assert "examples" not in runs[0]["retrieval"]
