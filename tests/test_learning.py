"""Learning, not just running: on Sort-of-CLEVR scenes written by a generator apart from the
built-in scenes, a small model trained with the library's default schedule uses the image —
clearly better than the same model with every image blanked — and the diagnostics say so."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from vtfuse.config import ModelConfig, TextConfig, TrainConfig, VisionConfig
from vtfuse.data.sort_of_clevr import (
    COLOURS,
    NON_RELATIONAL,
    RELATIONAL,
    SortOfClevrSpec,
    answer,
    generate,
    sample_scene,
)
from vtfuse.evaluation import evaluate
from vtfuse.evaluation.evaluate import EvalOptions
from vtfuse.training import train
from vtfuse.training.trainer import blindness_warning

# Smaller than the defaults (one core, a minute), otherwise the library's own choices: the
# default learning rate, schedule, batch order, fusion and vision encoder.
VISION = VisionConfig(channels=(16, 32, 64), dim=64, depth=1, heads=4)
TEXT = TextConfig(dim=64, depth=2, heads=4, max_length=64)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sort_of_clevr")
    generate(out, SortOfClevrSpec(train=240, val=24, test=40, seed=3), progress=False)
    return out


def test_the_generator_follows_the_papers_specification(scenes):
    """75 × 75 px, six objects of six colours, 10 + 10 questions an image, answers from the
    geometry; every question kind asked; same seed, same data."""
    import random

    lines = [json.loads(line) for line in (scenes / "vqa_train.jsonl").read_text().splitlines()]
    assert len(lines) == 240 * 20
    per_image = Counter((line["image"], line["type"]) for line in lines)
    assert set(per_image.values()) == {10}
    assert {line["kind"] for line in lines} == {*NON_RELATIONAL, *RELATIONAL}
    answers = {line["kind"]: set() for line in lines}
    for line in lines:
        answers[line["kind"]].add(line["answer"])
    assert answers["shape"] == answers["closest"] == {"circle", "square"}
    assert answers["horizontal"] == {"left", "right"}
    assert answers["count"] <= {str(n) for n in range(1, 7)}
    caption = json.loads((scenes / "caption_train.jsonl").read_text().splitlines()[0])
    assert len(caption["objects"]) == 6 and caption["caption"].count(" at the ") == 6

    from PIL import Image

    assert Image.open(scenes / lines[0]["image"]).size == (75, 75)
    spec = SortOfClevrSpec()
    objects = sample_scene(random.Random(0), spec)
    assert sorted(o.colour for o in objects) == sorted(COLOURS)
    red = next(o for o in objects if o.colour == "red")
    nearest = min(
        (o for o in objects if o is not red), key=lambda o: math.dist((o.x, o.y), (red.x, red.y))
    )
    assert answer("closest", red, objects, spec.size) == nearest.shape
    assert answer("horizontal", red, objects, spec.size) == ("left" if red.x < 37.5 else "right")


@pytest.mark.slow
def test_a_captioner_trained_with_the_default_schedule_uses_the_image(scenes, tmp_path):
    """Each caption names six colours, shapes and places in an order only the image tells.
    With the default learning rate and warm-up, a small captioner uses the image within a
    minute: its validation loss falls far below its loss with every image blanked (the
    trainer's `val_blind_loss`), and its held-out captions score a higher CIDEr than its
    blind ones."""
    config = replace(TrainConfig(), epochs=30, batch_size=16, save_every=0)
    model = ModelConfig(vision=VISION, text=TEXT)
    result = train(
        "caption",
        scenes / "caption_train.jsonl",
        tmp_path / "run",
        scenes / "caption_val.jsonl",
        model,
        config,
        progress=False,
        log=lambda _: None,
    )
    last = result.history[-1]
    assert last["val_loss"] < 0.75 * last["val_blind_loss"], last
    assert blindness_warning(last) is None
    test, best = scenes / "caption_test.jsonl", tmp_path / "run" / "best"
    seeing = evaluate(best, test, EvalOptions(progress=False))
    blind = evaluate(best, test, EvalOptions(blind=True, progress=False))
    assert seeing["cider"] > blind["cider"] + 0.3, (seeing["cider"], blind["cider"])


def test_the_trainer_warns_when_the_image_is_not_used():
    assert blindness_warning({"val_loss": 0.80, "val_blind_loss": 0.801}) is not None
    assert blindness_warning({"val_loss": 0.80, "val_blind_loss": 0.79}) is not None
    assert blindness_warning({"val_loss": 0.40, "val_blind_loss": 0.80}) is None
    assert blindness_warning({"train_loss": 0.40}) is None  # no validation data: nothing said
