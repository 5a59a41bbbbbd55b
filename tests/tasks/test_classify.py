"""Image+text pair classification: metrics by hand, the synthetic statements, end to end."""

from __future__ import annotations

import json

import pytest

from vtfuse.cli.main import main
from vtfuse.evaluation.metrics import classification_metrics


def test_classification_metrics_by_hand():
    labels = ["cat", "cat", "dog", "dog", "dog", "bird"]
    predicted = ["cat", "dog", "dog", "dog", "cat", "cat"]
    m = classification_metrics(predicted, labels, ["bird", "cat", "dog"])
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["confusion"] == [[0, 1, 0], [0, 1, 1], [0, 1, 2]]  # rows: bird, cat, dog
    cat, dog, bird = (m["per_class"][k] for k in ("cat", "dog", "bird"))
    assert (cat["precision"], cat["recall"]) == pytest.approx((1 / 3, 1 / 2))
    assert cat["f1"] == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    assert (dog["precision"], dog["recall"]) == pytest.approx((2 / 3, 2 / 3))
    assert (bird["f1"], bird["support"]) == (0.0, 1)
    assert m["macro_f1"] == pytest.approx((cat["f1"] + dog["f1"] + bird["f1"]) / 3)
    unseen = classification_metrics(["cat"], ["fish"], ["cat"])  # a label unseen in training
    assert unseen["classes"] == ["cat", "fish"] and unseen["accuracy"] == 0


def test_pair_classification_end_to_end(tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["synth", "--out", str(data), "--images", "40", "--size", "24"]) == 0
    lines = [json.loads(x) for x in (data / "classify_train.jsonl").read_text().splitlines()]
    assert {x["label"] for x in lines} == {"true", "false"} and all(x["text"] for x in lines)
    tiny = {
        "model": {
            "vision": {"image_size": 24, "channels": [8, 8, 16], "dim": 32, "depth": 0, "heads": 2},
            "text": {"dim": 32, "depth": 1, "heads": 2},
        },
        "train": {"epochs": 2, "batch_size": 16},
    }
    (tmp_path / "tiny.json").write_text(json.dumps(tiny))
    run = tmp_path / "run"
    args = ["train", "--task", "classify", "--train", str(data / "classify_train.jsonl")]
    args += ["--val", str(data / "classify_val.jsonl"), "--out", str(run)]
    assert main([*args, "--config", str(tmp_path / "tiny.json"), "--no-progress"]) == 0
    assert "val_accuracy" in (run / "log.jsonl").read_text()
    test, metrics, picture = data / "classify_test.jsonl", tmp_path / "m.json", tmp_path / "c.png"
    evaluation = ["eval", str(run), "--data", str(test), "--metrics", str(metrics), "--no-progress"]
    assert main([*evaluation, "--confusion-png", str(picture)]) == 0
    out = capsys.readouterr().out
    scores = json.loads(metrics.read_text())
    assert {"accuracy", "macro_f1", "per_class", "confusion"} <= set(scores)
    assert sum(map(sum, scores["confusion"])) == scores["examples"]
    assert "true false" in out or "true true" in out  # the printed matrix
    assert picture.read_bytes()[:4] == b"\x89PNG"
    for blind in ("--blind", "--blind-text"):
        assert main([*evaluation, blind]) == 0
    image = str(next((data / "images").glob("*.png")))
    capsys.readouterr()
    assert main(["predict", str(run), image, "--text", "the red object is a circle."]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert len(rows) == 2 and {r.split()[-1] for r in rows} == {"true", "false"}


def test_synthetic_statements_need_the_image(tmp_path):
    """Every wording of a statement is true in some scenes and false in others about equally
    often, so text alone cannot beat chance: the best text-only rule (each wording's majority
    label in training) scores near 0.5 on the test split."""
    from collections import Counter, defaultdict

    from vtfuse.data.synth import SynthSpec, generate

    generate(tmp_path, SynthSpec(images=1500, size=24, seed=3), progress=False)

    def read(split):
        return [json.loads(line) for line in (tmp_path / f"classify_{split}.jsonl").open()]

    by_predicate = defaultdict(Counter)  # "a circle.", "at the top left.", ...
    for line in read("train"):
        by_predicate[line["text"].split(" is ", 1)[1]][line["label"]] += 1
    for predicate, labels in by_predicate.items():
        assert min(labels["true"], labels["false"]) > 0.35 * sum(labels.values()), predicate
    majority = {
        predicate: labels.most_common(1)[0][0] for predicate, labels in by_predicate.items()
    }
    test = read("test")
    text_only = sum(majority.get(t["text"].split(" is ", 1)[1]) == t["label"] for t in test)
    assert text_only / len(test) < 0.58
