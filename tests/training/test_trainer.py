"""The training loop on tiny synthetic data: loss falls, checkpoints are whole, resume continues."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vtfuse.config import ModelConfig, TextConfig, TrainConfig, VisionConfig
from vtfuse.data.synth import SynthSpec, generate
from vtfuse.training import train
from vtfuse.training.optim import warmup_cosine, warmup_cosine_on_the_clock

VISION = VisionConfig(image_size=24, channels=(8, 8, 16), dim=32, depth=1, heads=2)
TEXT = TextConfig(dim=32, depth=1, heads=2, max_length=48)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate(out, SynthSpec(images=40, seed=1, size=24), progress=False)
    return out


def run(
    data: Path,
    out: Path,
    task: str = "caption",
    resume: bool = False,
    text: TextConfig = TEXT,
    **overrides,
):
    config = TrainConfig(
        **{"epochs": 2, "batch_size": 16, "lr": 3e-3, "save_every": 0, **overrides}
    )
    return train_model(data, out, task, config, resume, text)


def train_model(data, out, task, config, resume=False, text: TextConfig = TEXT):
    return train(
        task,
        data / f"{task}_train.jsonl",
        out,
        data / f"{task}_val.jsonl",
        ModelConfig(task=task, vision=VISION, text=text),
        config,
        resume=resume,
        progress=False,
        log=lambda _: None,
    )


def losses(out: Path) -> list[float]:
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [entry["loss"] for entry in lines if "loss" in entry]


@pytest.mark.parametrize("task", ["caption", "vqa"])
def test_loss_falls_and_best_and_last_are_written(data, tmp_path, task):
    result = run(data, tmp_path / task, task, epochs=4, batch_size=8)
    assert result.finished and result.epoch == 4
    history = result.history
    assert min(h["val_loss"] for h in history[1:]) < history[0]["val_loss"]
    for name in ("best", "last"):
        folder = tmp_path / task / name
        assert (folder / "model.safetensors").is_file()
        assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    assert (tmp_path / task / "last" / "training_state.safetensors").is_file()
    assert not list((tmp_path / task).glob(".*.tmp"))


def test_each_loss_term_is_logged_beside_the_loss(data, tmp_path):
    """A model whose loss has terms (retrieval: itc + itm) logs each, every 50 steps and every
    epoch; a captioner logs its one loss as before."""
    run(data, tmp_path / "retrieval", "retrieval", epochs=25, batch_size=16)
    lines = (tmp_path / "retrieval" / "log.jsonl").read_text().splitlines()
    log = [json.loads(line) for line in lines]
    steps = [entry for entry in log if "loss" in entry]
    assert steps and all({"loss_itc", "loss_itm"} <= set(entry) for entry in steps)
    for entry in steps:
        assert entry["loss"] == pytest.approx(entry["loss_itc"] + entry["loss_itm"], rel=1e-5)
    epochs = [entry for entry in log if "train_loss" in entry]
    assert all({"train_loss_itc", "train_loss_itm"} <= set(entry) for entry in epochs)
    result = run(data, tmp_path / "caption", "caption", epochs=1)
    assert set(result.history[0]) == {
        "step",
        "epoch",
        "minutes",
        "train_loss",
        "val_loss",
        "val_blind_loss",
    }


def test_loss_falls_over_a_few_steps_on_one_batch(data, tmp_path):
    """Many passes over 16 captions: the loss must drop well below its starting value."""
    result = run(data, tmp_path / "overfit", "caption", epochs=60, batch_size=64, lr=3e-3)
    first, last = result.history[0]["train_loss"], result.history[-1]["train_loss"]
    assert last < 0.6 * first


def test_same_seed_same_weights(data, tmp_path):
    run(data, tmp_path / "a", seed=7)
    run(data, tmp_path / "b", seed=7)
    run(data, tmp_path / "c", seed=8)
    a, b, c = (load_file(str(tmp_path / n / "last" / "model.safetensors")) for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_resume_after_a_stop_continues_from_the_saved_step(data, tmp_path, dropout):
    """Stop mid-run (max_minutes tiny), resume: same step count and weights as one straight run.
    With dropout the masks must continue too: the random generators are part of the state, and
    nothing but the model may draw from the global one (a DataLoader does, for its workers'
    seeds, unless it is given its own generator)."""
    text = dataclasses.replace(TEXT, dropout=dropout)
    straight = run(data, tmp_path / "straight", epochs=3, text=text)
    stopped = run(data, tmp_path / "resumed", epochs=3, max_minutes=1e-9, text=text)
    assert not stopped.finished and stopped.step == 1
    state = json.loads((tmp_path / "resumed" / "last" / "training_state.json").read_text())
    assert state["progress"]["step"] == 1
    resumed = run(data, tmp_path / "resumed", epochs=3, resume=True, text=text)
    assert resumed.finished and resumed.step == straight.step
    a = load_file(str(tmp_path / "straight" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "last" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_resume_without_a_checkpoint_is_an_error(data, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run(data, tmp_path / "nothing", resume=True)


def test_warmup_then_cosine_schedule():
    schedule = warmup_cosine(100, TrainConfig(warmup_ratio=0.1, min_lr_ratio=0.1))
    assert schedule(0) == pytest.approx(0.1)
    assert schedule(9) == pytest.approx(1.0)
    assert schedule(55) == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-6)
    assert schedule(100) == pytest.approx(0.1)
    assert all(schedule(s) >= schedule(s + 1) for s in range(10, 100))


def test_the_clock_schedule_warms_up_and_decays_over_the_budget():
    config = TrainConfig(max_minutes=1.0, warmup_ratio=0.1, min_lr_ratio=0.1)
    now = [0.0]
    schedule = warmup_cosine_on_the_clock(lambda: now[0], config)
    at = {}
    for seconds in (3.0, 6.0, 33.0, 60.0, 90.0):
        now[0] = seconds
        at[seconds] = schedule(12345)  # the step does not matter, the clock does
    assert at[3.0] == pytest.approx(0.5) and at[6.0] == pytest.approx(1.0)
    assert at[33.0] == pytest.approx(0.1 + 0.9 * 0.5) and at[60.0] == pytest.approx(0.1)
    assert at[90.0] == pytest.approx(0.1)  # past the budget: stays at the floor


def test_a_time_budget_without_epochs_trains_until_it_is_spent(data, tmp_path):
    """Epochs 0 and a budget: as many epochs as fit, ending validated, annealed and finished —
    not stopped half-way down the schedule like a fixed epoch count cut by the clock."""
    config = TrainConfig(epochs=0, max_minutes=0.1, batch_size=16, lr=3e-3, save_every=0)
    assert config.on_the_clock and config.epoch_count is None
    result = train_model(data, tmp_path / "budget", "vqa", config)
    assert result.finished and result.epoch >= 2  # 40 tiny images: many passes in 6 s
    assert 0.1 <= result.history[-1]["minutes"] < 0.2 and "val_loss" in result.history[-1]
    state = json.loads((tmp_path / "budget" / "last" / "training_state.json").read_text())
    assert state["scheduler"]["_last_lr"][0] == pytest.approx(3e-3 * config.min_lr_ratio)
    assert state["progress"]["seconds"] >= 6.0
    assert TrainConfig().epoch_count == 10 and not TrainConfig().on_the_clock


KILLED_RUN = """
import os, signal, sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {root!r})
import tests.training.test_trainer as t
real, steps = torch.optim.AdamW.step, {{"n": 0}}

def step(self, *args, **kwargs):
    steps["n"] += 1
    if steps["n"] == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)  # no handler, no goodbye
    return real(self, *args, **kwargs)

torch.optim.AdamW.step = step
t.run(t.Path({data!r}), t.Path({out!r}), "vqa", epochs=3, save_every=2)
"""


INTERRUPTED_WRITE = """
import errno, os, signal, sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {root!r})
import tests.training.test_trainer as t
from vtfuse.training import checkpoint
real, saves = checkpoint.save_file, {{"n": 0}}

def save_file(tensors, path):
    saves["n"] += 1
    if saves["n"] == 2:  # the second `last` (step 4): half its optimiser state on disk, then...
        with open(path, "wb") as handle:
            handle.write(b"\\0" * 1000)
        if {disk_full!r}:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        os.kill(os.getpid(), signal.SIGKILL)
    return real(tensors, path)

checkpoint.save_file = save_file
t.run(t.Path({data!r}), t.Path({out!r}), "vqa", epochs=3, save_every=2)
"""


@pytest.mark.parametrize("disk_full", [False, True], ids=["killed", "disk-full"])
def test_an_interrupted_checkpoint_write_leaves_the_previous_one(data, tmp_path, disk_full):
    """The second `last` checkpoint (step 4) is cut off mid-write, by SIGKILL or a full disk:
    the step-2 checkpoint is still whole, loads, and --resume from it ends bit for bit where a
    run never interrupted ends."""
    import subprocess
    import sys

    from vtfuse.models.factory import load_pretrained

    straight = run(data, tmp_path / "straight", "vqa", epochs=3, save_every=2)
    script = INTERRUPTED_WRITE.format(
        root=str(Path(__file__).parents[2]),
        disk_full=disk_full,
        data=str(data),
        out=str(tmp_path / "cut"),
    )
    cut = subprocess.run([sys.executable, "-c", script], capture_output=True, check=False)
    if disk_full:
        assert cut.returncode == 1 and b"No space left on device" in cut.stderr
    else:
        assert cut.returncode == -9, cut.stderr.decode()[-2000:]
    state = json.loads((tmp_path / "cut" / "last" / "training_state.json").read_text())
    assert state["progress"]["step"] == 2
    load_pretrained(tmp_path / "cut" / "last")
    resumed = run(data, tmp_path / "cut", "vqa", epochs=3, save_every=2, resume=True)
    assert resumed.step == straight.step
    a = load_file(str(tmp_path / "straight" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_a_run_killed_with_sigkill_resumes_to_identical_weights(data, tmp_path):
    """SIGKILL at step 7 (the last checkpoint: step 6); --resume; the weights end bit for
    bit as those of a run never interrupted."""
    import subprocess
    import sys

    straight = run(data, tmp_path / "straight", "vqa", epochs=3, save_every=2)
    script = KILLED_RUN.format(
        root=str(Path(__file__).parents[2]), kill_at=7, data=str(data), out=str(tmp_path / "killed")
    )
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, check=False)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    state = json.loads((tmp_path / "killed" / "last" / "training_state.json").read_text())
    assert state["progress"]["step"] == 6
    resumed = run(data, tmp_path / "killed", "vqa", epochs=3, save_every=2, resume=True)
    assert resumed.step == straight.step
    a = load_file(str(tmp_path / "straight" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "last" / "model.safetensors"))
    assert all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize(
    ("asked", "fast", "speedup", "used"),
    [
        ("auto", False, 2.0, "fp32"),
        ("auto", True, 2.0, "bf16"),
        ("auto", True, 0.8, "fp32"),
        ("fp32", True, 2.0, "fp32"),
        ("bf16", False, 0.8, "bf16"),
    ],
)
def test_the_precision_used_is_recorded_and_bf16_trains(
    data, tmp_path, monkeypatch, asked, fast, speedup, used
):
    """`auto` picks bf16 on bf16 hardware when it times bf16's step faster (the timing stands in
    for, and the tiny model passes with the parameter floor at 0); run.json records the
    precision used, and a bf16 run learns as fp32 does."""
    monkeypatch.setattr("vtfuse.training.precision.MIN_PARAMETERS", 0)
    monkeypatch.setattr("vtfuse.training.precision.bf16_is_fast", lambda device: fast)
    monkeypatch.setattr("vtfuse.training.precision.step_speedup", lambda *a, **k: speedup)
    result = run(data, tmp_path / asked, "caption", epochs=4, batch_size=8, precision=asked)
    recorded = json.loads((tmp_path / asked / "run.json").read_text())["train_config"]["precision"]
    assert recorded == used
    history = result.history
    assert min(h["val_loss"] for h in history[1:]) < 0.9 * history[0]["val_loss"]


@pytest.mark.parametrize(
    ("task", "given", "used"),
    [
        ("caption", {}, (32, 1e-3)),
        ("vqa", {}, (64, 3e-4)),
        ("classify", {}, (64, 3e-4)),
        ("caption", {"batch_size": 8, "lr": 5e-4}, (8, 5e-4)),
        ("vqa", {"lr": 1e-4}, (64, 1e-4)),
    ],
)
def test_the_task_sets_the_batch_size_and_lr_left_open(data, tmp_path, task, given, used):
    """TrainConfig leaves them None; the run trains, and records, the task's own unless told."""
    config = TrainConfig(epochs=1, save_every=0, **given)
    train_model(data, tmp_path, task, config)
    recorded = json.loads((tmp_path / "run.json").read_text())["train_config"]
    assert (recorded["batch_size"], recorded["lr"]) == used
