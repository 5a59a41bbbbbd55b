"""Metrics: VQA accuracy, object F1, COCO caption metrics, pointing accuracy, attention peaks."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from tests.helpers import require_tool
from vtfuse.data.synth import parse_caption
from vtfuse.evaluation.grounding import inside, pointing_hits
from vtfuse.evaluation.metrics import (
    caption_metrics,
    object_f1,
    retrieval_metrics,
    vqa_accuracy,
)
from vtfuse.evaluation.vqa_answers import normalise_vqa_answer, vqa_soft_score
from vtfuse.visualisation.maps import peak_point, select_layer, to_grid

KEYS = {"bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider"}
REFERENCES = [
    [
        "a red square at the top left and a blue circle on the right.",
        "there is a red square at the top left, a blue circle on the right.",
    ],
    ["a green circle in the center."],
    ["an orange triangle at the bottom and a purple square at the top."],
    ["a yellow square on the left and a red circle at the bottom right."],
]
WRONG = [
    "a blue triangle at the bottom.",
    "a red square on the left.",
    "a green circle in the center and a square.",
    "a circle.",
]


# -- VQA accuracy ------------------------------------------------------------------------------
def test_vqa_accuracy_by_type():
    result = vqa_accuracy(
        ["Circle", "2", "square ", "left", "top"],
        ["circle", "3", "square", "right", "top"],
        ["non-relational", "relational", "relational", None, "non-relational"],
    )
    assert result["accuracy"] == pytest.approx(3 / 5)
    assert result["accuracy_by_type"] == {"non-relational": 1.0, "relational": 0.5}
    assert list(result["accuracy_by_type"]) == ["non-relational", "relational"]


def test_vqa_accuracy_edge_cases():
    assert vqa_accuracy([], [], []) == {"accuracy": 0.0, "accuracy_by_type": {}}
    assert vqa_accuracy(["no"], ["yes"], [None]) == {"accuracy": 0.0, "accuracy_by_type": {}}
    with pytest.raises(ValueError):
        vqa_accuracy(["a", "b"], ["a"], [None, None])


# -- object F1 ---------------------------------------------------------------------------------
def test_object_f1_exact_numbers():
    captions = [
        "a red square at the top left and a blue circle on the right.",  # 1 of 2 stated is true
        "there is a green square in the center.",  # true, but misses one object
    ]
    scenes = [
        [("red", "square", "top left"), ("green", "circle", "bottom")],
        [("green", "square", "center"), ("blue", "circle", "top right")],
    ]
    result = object_f1(captions, scenes, parse_caption)
    # true positives 2, stated 3, actual 4
    assert result["object_precision"] == pytest.approx(2 / 3)
    assert result["object_recall"] == pytest.approx(1 / 2)
    assert result["object_f1"] == pytest.approx(4 / 7)


def test_object_f1_perfect_and_empty():
    scene = [("red", "square", "top left")]
    assert object_f1(["a red square at the top left."], [scene], parse_caption) == {
        "object_f1": 1.0,
        "object_precision": 1.0,
        "object_recall": 1.0,
    }
    assert object_f1(["nothing here."], [scene], parse_caption) == {
        "object_f1": 0.0,
        "object_precision": 0.0,
        "object_recall": 0.0,
    }
    assert object_f1([], [], parse_caption) == {
        "object_f1": 0.0,
        "object_precision": 0.0,
        "object_recall": 0.0,
    }
    # any fact type works: here one of two stated facts is true and one of two true facts stated
    assert object_f1(["x"], [[("a",), ("b",)]], lambda _: {("a",), ("c",)}) == pytest.approx(
        {"object_f1": 0.5, "object_precision": 0.5, "object_recall": 0.5}
    )


# -- caption metrics (java: PTB tokenizer and METEOR) ------------------------------------------
@pytest.fixture(scope="module")
def java() -> None:
    """The PTB tokenizer and METEOR run on Java (without it, see the test below)."""
    require_tool("java")


@pytest.fixture(scope="module")
def perfect(java):
    return caption_metrics([refs[0] for refs in REFERENCES], REFERENCES)


@pytest.fixture(scope="module")
def wrong(java):
    return caption_metrics(WRONG, REFERENCES)


def test_identical_captions_score_perfectly(perfect):
    assert set(perfect) == KEYS
    assert all(isinstance(v, float) for v in perfect.values())
    for n in range(1, 5):
        assert perfect[f"bleu{n}"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["meteor"] > 0.95
    assert perfect["rouge_l"] == pytest.approx(1.0)
    assert perfect["cider"] > 1.0


def test_wrong_captions_score_lower_on_every_metric(perfect, wrong):
    assert set(wrong) == KEYS
    assert isinstance(wrong["meteor"], float)
    for key in KEYS:
        assert wrong[key] < perfect[key], key
        assert wrong[key] >= 0.0
    assert wrong["bleu1"] < 0.5 and wrong["cider"] < 1.0


def test_caption_metrics_without_java(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.warns(UserWarning, match="java not found"):
        scores = caption_metrics([refs[0] for refs in REFERENCES], REFERENCES)
    assert set(scores) == KEYS
    assert scores["meteor"] is None
    assert scores["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert scores["cider"] > 1.0
    with pytest.warns(UserWarning):
        empty = caption_metrics(["", "", "", ""], REFERENCES)  # empty captions are scored, as zero
    assert empty["cider"] == 0.0 and empty["rouge_l"] == 0.0
    assert empty["bleu1"] < 1e-6


# -- pointing accuracy and attention peaks -----------------------------------------------------
def one_hot_map(grid, cell):
    rows, cols = grid
    weights = torch.full((rows * cols,), 0.01)
    weights[cell[0] * cols + cell[1]] = 1.0
    return weights / weights.sum()


def test_peak_point_coordinates():
    grid, size = (3, 4), (80, 60)  # 4 columns of 20 px, 3 rows of 20 px
    assert peak_point(one_hot_map(grid, (0, 0)), grid, size) == (10.0, 10.0)
    assert peak_point(one_hot_map(grid, (1, 2)), grid, size) == (50.0, 30.0)
    assert peak_point(one_hot_map(grid, (2, 3)), grid, size) == (70.0, 50.0)
    # non-square image, square grid: x scales with the width, y with the height
    assert peak_point(one_hot_map((3, 3), (2, 0)), (3, 3), (90, 30)) == (15.0, 25.0)


def test_inside_includes_the_border():
    assert inside((5, 5), [5, 5, 10, 10]) and inside((10, 7), [5, 5, 10, 10])
    assert not inside((10.1, 7), [5, 5, 10, 10]) and not inside((7, 4.9), [5, 5, 10, 10])


def test_pointing_hits():
    grid, size = (3, 3), (90, 90)  # cell centres at 15, 45, 75
    boxes = [
        {"label": "Red", "box": [0, 0, 30, 30]},  # top-left cell (labels are compared lower-cased)
        {"label": "blue", "box": [60, 60, 90, 90]},  # bottom-right cell
        {"label": "blue", "box": [60, 0, 90, 30]},  # a second blue object, top-right
    ]
    words = ["a", "red", "square", "and", "blue", "blue", "circle", "green"]
    maps = torch.stack(
        [
            one_hot_map(grid, (1, 1)),
            one_hot_map(grid, (0, 0)),  # red → inside the red box: hit
            one_hot_map(grid, (0, 0)),
            one_hot_map(grid, (1, 1)),
            one_hot_map(grid, (0, 2)),  # blue → inside the second blue box: hit
            one_hot_map(grid, (1, 0)),  # blue → in no blue box: miss
            one_hot_map(grid, (2, 2)),
            one_hot_map(grid, (2, 2)),  # green has no box: not counted
        ]
    )
    assert pointing_hits(words, maps, boxes, grid, size) == (2, 3)
    assert pointing_hits(["square"], maps[:1], boxes, grid, size) == (0, 0)
    # words beyond the maps are ignored (a caption cut short)
    assert pointing_hits(words, maps[:2], boxes, grid, size) == (1, 1)


def test_pointing_hits_uses_the_original_image_size():
    grid = (2, 2)
    box = [{"label": "red", "box": [100, 0, 200, 50]}]  # top-right quarter of a 200 × 100 image
    top_right = one_hot_map(grid, (0, 1))[None]
    assert pointing_hits(["red"], top_right, box, grid, (200, 100)) == (1, 1)
    assert pointing_hits(["red"], top_right, box, grid, (100, 200)) == (0, 1)


def test_select_layer_and_grid():
    attention = torch.arange(2 * 3 * 2 * 4, dtype=torch.float32).reshape(2, 3, 2, 4)  # (T, L, H, N)
    last = select_layer(attention, -1)
    assert last.shape == (2, 4)
    torch.testing.assert_close(last, attention[:, 2].mean(dim=1))
    torch.testing.assert_close(select_layer(attention, 0), attention[:, 0].mean(dim=1))
    every_layer = sum(attention[:, i].mean(dim=1) for i in range(3)) / 3
    torch.testing.assert_close(select_layer(attention), every_layer)  # the default
    with pytest.raises(ValueError, match="layer 3 does not exist"):
        select_layer(attention, 3)
    with pytest.raises(ValueError, match="layer -4 does not exist"):
        select_layer(attention, -4)
    grids = to_grid(last, (2, 2))
    assert grids.shape == (2, 2, 2)
    assert grids[1, 1, 0] == last[1, 2]


@pytest.mark.parametrize(
    "answer, normalised",
    [
        ("Two dogs.", "2 dogs"),  # number word, final period, case
        ("the dog", "dog"),  # article
        ("an apple", "apple"),
        ("dont", "don't"),  # contraction restored
        ("wouldntve", "wouldn't've"),  # every way of dropping the apostrophes
        ("were", "were"),  # a word that is not a dropped contraction stays
        ("1,000", "1000"),  # a digit-comma deletes every mark
        ("x-ray", "x ray"),  # a mark between letters becomes a space
        ("yes !", "yes"),  # a mark next to a space is deleted
        ("2.5", "2.5"),  # a period before a digit stays
        ("none", "0"),
    ],
)
def test_official_vqa_normalisation(answer, normalised):
    assert normalise_vqa_answer(answer) == normalised


def test_official_vqa_soft_score_by_hand():
    humans = ["cat"] * 6 + ["kitten"] * 3 + ["dog"]
    assert vqa_soft_score("Cat.", humans) == 1.0
    # kitten: 3 of 10 humans; leaving one of them out leaves 2 (2/3), any other 3 (1)
    assert vqa_soft_score("a kitten", humans) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert vqa_soft_score("dog", humans) == pytest.approx(9 * (1 / 3) / 10)
    assert vqa_soft_score("bird", humans) == 0.0
    scores = vqa_accuracy(["two", "bird"], ["2", "cat"], ["number", "other"], [["2"] * 10, humans])
    assert scores["accuracy"] == 0.5 and scores["accuracy_by_type"] == {"number": 1.0, "other": 0.0}


def brute_force_ranks(similarity, owner):
    """Rank of each query's first correct candidate in a sorted list (ties: correct last)."""
    images, texts = similarity.shape
    i2t = []
    for i in range(images):
        order = sorted(range(texts), key=lambda t: (-similarity[i, t].item(), owner[t] == i))
        i2t.append(1 + next(r for r, t in enumerate(order) if owner[t] == i))
    t2i = []
    for t in range(texts):
        order = sorted(range(images), key=lambda i: (-similarity[i, t].item(), i == owner[t]))
        t2i.append(1 + order.index(owner[t]))
    return i2t, t2i


def test_retrieval_recall_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    owner = [i for i in range(12) for _ in range(1 + i % 3)]  # 1 to 3 captions per image
    similarity = torch.randn(12, len(owner), generator=g).round(decimals=1)  # with ties
    metrics = retrieval_metrics(similarity, owner, ks=(1, 3, 5))
    i2t, t2i = brute_force_ranks(similarity, owner)
    for k in (1, 3, 5):
        assert metrics[f"i2t_r{k}"] == pytest.approx(sum(r <= k for r in i2t) / len(i2t))
        assert metrics[f"t2i_r{k}"] == pytest.approx(sum(r <= k for r in t2i) / len(t2i))
    assert metrics["t2i_median_rank"] == np.floor(np.median(np.array(t2i) - 1)) + 1
    perfect = retrieval_metrics(torch.eye(3)[:, [0, 0, 1, 2]], [0, 0, 1, 2])
    assert perfect["i2t_r1"] == perfect["t2i_r1"] == 1.0 and perfect["i2t_median_rank"] == 1


def test_caption_metrics_are_pycocoevalcaps_own_numbers(java):
    """The scorers called directly, as the COCO caption evaluation does, on the same input."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    predictions = [*WRONG[: len(REFERENCES) - 1], REFERENCES[-1][0]]
    ours = caption_metrics(predictions, REFERENCES)
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize(
        {i: [{"caption": r} for r in refs] for i, refs in enumerate(REFERENCES)}
    )
    res = tokenizer.tokenize({i: [{"caption": p}] for i, p in enumerate(predictions)})
    bleu, _ = Bleu(4).compute_score(gts, res)
    expected = {f"bleu{n + 1}": b for n, b in enumerate(bleu)}
    expected["rouge_l"] = Rouge().compute_score(gts, res)[0]
    expected["cider"] = Cider().compute_score(gts, res)[0]
    meteor = Meteor()
    expected["meteor"] = meteor.compute_score(gts, res)[0]
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=1e-9), key
