"""Data parallelism and its equivalences, on CPU with gloo: 2 processes × batch B step as one
process × batch 2B; K accumulated batches of B step as one batch of K·B; a non-finite step is
skipped, and too many stop the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vtfuse.cli.main import main
from vtfuse.config import ModelConfig, TextConfig, TrainConfig, VisionConfig
from vtfuse.data.dataset import collate, load_records, read_jsonl, task_dataset
from vtfuse.data.synth import SynthSpec, generate
from vtfuse.models.base import load_pretrained
from vtfuse.models.vqa import VQAModel
from vtfuse.training import train
from vtfuse.training.trainer import TrainingDiverged

TINY = {
    "model": {
        "vision": {"image_size": 24, "channels": [8, 8, 16], "dim": 32, "depth": 0, "heads": 2},
        "text": {"dim": 32, "depth": 1, "heads": 2},
    }
}
MODEL = ModelConfig(
    vision=VisionConfig(image_size=24, channels=(8, 8, 16), dim=32, depth=0, heads=2),
    text=TextConfig(dim=32, depth=1, heads=2),
)


@pytest.fixture(scope="module")
def questions(tmp_path_factory) -> Path:
    """64 VQA lines: whole batches of 16 for one process, of 8 for each of two."""
    root = tmp_path_factory.mktemp("ddp")
    generate(root, SynthSpec(images=24, size=24, seed=5), progress=False)
    lines = (root / "vqa_train.jsonl").read_text().splitlines()[:64]
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    (root / "tiny.json").write_text(json.dumps(TINY))
    return root


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "last" / "model.safetensors")


def assert_same_model(a: Path, b: Path, data: Path) -> None:
    """The same weights (each matrix within 0.1 % of its norm) and the same answers. Not
    bit-equal: the two runs sum in different orders, and where a gradient is zero in exact
    arithmetic (key biases, conv biases before a GroupNorm, some key weights) Adam turns the
    rounding noise into steps of size lr — without changing what the model computes."""
    first, second = weights(a), weights(b)
    assert first.keys() == second.keys()
    for name in first:
        if first[name].dim() >= 2:
            error = (first[name] - second[name]).norm() / first[name].norm()
            assert error < 1e-3, (name, error.item())
    models = [load_pretrained(run / "last")[0] for run in (a, b)]
    records = load_records(read_jsonl(data, "vqa")[:16], 24, progress=False)
    batch = collate(
        [task_dataset("vqa", records, load_pretrained(a / "last")[1], 48)[i] for i in range(16)]
    )
    with torch.no_grad():
        answers = [
            m(batch["images"], batch["tokens"], batch["token_mask"], batch["image_index"])[0]
            for m in models
        ]
    torch.testing.assert_close(answers[0], answers[1], atol=1e-4, rtol=1e-4)


def test_two_processes_step_as_one_with_twice_the_batch(questions, tmp_path):
    base = ["train", "--task", "vqa", "--train", str(questions / "train.jsonl")]
    base += ["--config", str(questions / "tiny.json"), "--epochs", "2", "--lr", "0.003"]
    base += ["--no-progress"]
    assert main([*base, "--out", str(tmp_path / "one"), "--batch-size", "16"]) == 0
    two = [*base, "--out", str(tmp_path / "two"), "--batch-size", "8", "--nproc", "2"]
    assert main(two) == 0
    assert_same_model(tmp_path / "one", tmp_path / "two", questions / "train.jsonl")
    log = (tmp_path / "two" / "log.jsonl").read_text().splitlines()
    assert json.loads(log[-1])["step"] == 8  # 64 examples / (8 × 2) per epoch, 2 epochs


def test_accumulated_batches_step_as_one_big_batch(questions, tmp_path):
    config = TrainConfig(epochs=2, lr=3e-3, save_every=0)
    runs = {"big": (16, 1), "accumulated": (4, 4)}
    for name, (batch, accumulate) in runs.items():
        settings = TrainConfig(**{**config.__dict__, "batch_size": batch, "grad_accum": accumulate})
        train(
            "vqa",
            questions / "train.jsonl",
            tmp_path / name,
            None,
            MODEL,
            settings,
            progress=False,
            log=lambda _: None,
        )
    assert_same_model(tmp_path / "big", tmp_path / "accumulated", questions / "train.jsonl")


def test_non_finite_steps_are_skipped_then_stop_the_run(questions, tmp_path, monkeypatch):
    real = VQAModel.training_loss
    calls = {"n": 0}

    def sometimes_nan(self, batch, label_smoothing=0.0):
        calls["n"] += 1
        loss = real(self, batch, label_smoothing)
        return loss * float("nan") if calls["n"] in (2, 3) else loss

    monkeypatch.setattr(VQAModel, "training_loss", sometimes_nan)
    config = TrainConfig(epochs=1, batch_size=8, save_every=0)
    result = train(
        "vqa",
        questions / "train.jsonl",
        tmp_path / "a",
        None,
        MODEL,
        config,
        progress=False,
        log=lambda _: None,
    )
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert sum("skipped" in entry for entry in log) == 2 and result.step == 8 - 2
    assert torch.isfinite(torch.stack(list(weights(tmp_path / "a").values())[:1])).all()

    monkeypatch.setattr(
        VQAModel, "training_loss", lambda self, b, s=0.0: real(self, b, s) * float("nan")
    )
    stopping = TrainConfig(epochs=1, batch_size=8, save_every=0, max_bad_steps=3)
    with pytest.raises(TrainingDiverged, match="3 steps in a row"):
        train(
            "vqa",
            questions / "train.jsonl",
            tmp_path / "b",
            None,
            MODEL,
            stopping,
            progress=False,
            log=lambda _: None,
        )
