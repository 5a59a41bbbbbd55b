"""Retrieval and matching: the contrastive loss by hand, hard negatives never positive,
learning to retrieve, re-ranking, and the command line end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import RETRIEVAL_CONFIG
from vtfuse.cli.main import main
from vtfuse.data.tokenizer import Tokenizer
from vtfuse.fusion import FUSIONS
from vtfuse.models.factory import create_model
from vtfuse.models.retrieval import RetrievalModel
from vtfuse.pipeline import Pipeline

CONFIG = RETRIEVAL_CONFIG
COLOURS = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]])


def model(seed: int = 0) -> RetrievalModel:
    torch.manual_seed(seed)
    return create_model(CONFIG)


def solid(colours: torch.Tensor) -> torch.Tensor:
    return colours[:, :, None, None].expand(-1, 3, 24, 24).to(torch.uint8).contiguous()


def test_contrastive_loss_equals_the_formula():
    m = model().eval()
    images, tokens = solid(COLOURS[:3]), torch.randint(4, 20, (5, 6))
    owner = torch.tensor([0, 0, 1, 2, 2])  # images with two captions have two positives
    batch = {"images": images, "tokens": tokens, "image_index": owner}
    losses = m.losses(batch)
    with torch.no_grad():
        image_emb, _ = m.embed_images(images)
        logits = m.scale * m.embed_texts(tokens) @ image_emb.T
        t2i = F.cross_entropy(logits, owner)
        i2t = (
            sum(-logits.T[i].log_softmax(0)[owner == i].mean() for i in range(3)) / 3
        )  # each image: the mean log-likelihood of its own captions
    torch.testing.assert_close(losses["itc"], (t2i + i2t) / 2)
    assert m.scale.item() == pytest.approx(1 / 0.07)


def test_hard_negatives_are_never_positives():
    m = model().train()
    owner = torch.tensor([0, 0, 1, 2, 2, 3])
    drawn_images, drawn_texts = [], []
    original = m.match_logits

    def spy(tokens, mask, image_tokens, image_index, need_weights=False):
        drawn_images.append(image_index[len(owner) : 2 * len(owner)])
        drawn_texts.append(tokens[2 * len(owner) :])
        return original(tokens, mask, image_tokens, image_index, need_weights)

    m.match_logits = spy
    tokens = torch.arange(6)[:, None] + 4  # text i is token i + 4: traceable
    batch = {"images": solid(COLOURS), "tokens": tokens, "image_index": owner}
    for _ in range(20):
        m.losses(batch)
    for images in drawn_images:
        assert (images != owner).all()
    for texts in drawn_texts:  # the negative text of pair i describes another image
        assert (owner[texts[:, 0] - 4] != owner).all()


def test_the_training_losses_name_each_term_beside_their_sum():
    m = model().eval()
    batch = {"images": solid(COLOURS[:3]), "tokens": torch.randint(4, 20, (5, 6))}
    batch["image_index"] = torch.tensor([0, 0, 1, 2, 2])
    with torch.no_grad():
        losses, terms = m.training_losses(batch), m.losses(batch)
    assert list(losses) == ["loss", "loss_itc", "loss_itm"]
    torch.testing.assert_close(losses["loss"], terms["itc"] + terms["itm"])
    torch.testing.assert_close(m.training_loss(batch), losses["loss"])


def test_a_single_image_batch_has_no_matching_loss():
    batch = {"images": solid(COLOURS[:1]), "tokens": torch.randint(4, 20, (3, 5))}
    batch["image_index"] = torch.zeros(3, dtype=torch.long)
    assert set(model().losses(batch)) == {"itc"}


def test_it_learns_to_retrieve_and_match():
    """Four colours, a word for each: after training, every colour word retrieves its image
    first and the matching head tells a true pair from a false one."""
    m = model().train()
    optimiser = torch.optim.AdamW(m.parameters(), lr=3e-3)
    words = torch.tensor([[4], [5], [6], [7]])
    batch = {"images": solid(COLOURS), "tokens": words, "image_index": torch.arange(4)}
    first = None
    for _ in range(120):
        loss = m.training_loss(batch)
        first = first if first is not None else loss.item()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    m.eval()
    with torch.no_grad():
        image_emb, image_tokens = m.embed_images(solid(COLOURS))
        similarity = image_emb @ m.embed_texts(words).T
        assert similarity.argmax(0).tolist() == [0, 1, 2, 3]
        true_pairs, _ = m.match_logits(words, None, image_tokens, torch.arange(4))
        false_pairs, _ = m.match_logits(words, None, image_tokens, torch.tensor([1, 2, 3, 0]))
    assert (true_pairs.argmax(-1) == 1).all() and (false_pairs.argmax(-1) == 0).all()
    assert loss.item() < first / 4


def test_rerank_sums_the_matching_heads_log_odds_and_the_contrastive_logit():
    m = model()
    words = Tokenizer.build(["red", "green", "blue"])
    pipe = Pipeline(m, words, torch.device("cpu"))
    texts = ["red", "green", "blue"]
    similarity = torch.tensor([[0.9, 0.5, 0.1], [0.2, 0.8, 0.3]])  # 2 images, 3 texts
    image_tokens = m.encode_image(solid(COLOURS[:2])).detach()
    match = {(0, 0): -1.0, (1, 0): 0.5, (0, 1): 2.0, (1, 1): 0.0, (2, 0): 0.0, (2, 1): 0.0}

    def scores(texts_, image_tokens_, pairs, batch_size=256):
        return torch.tensor([match[(t, i)] for t, i in pairs.tolist()])

    pipe.match_scores = scores
    with torch.no_grad():
        m.logit_scale.fill_(0.0)  # s = 1: score = log-odds + cosine
    by_image, by_text = pipe.rerank(similarity, texts, image_tokens, k=2)
    # image 0's top 2 by similarity are texts 0 and 1: -1 + 0.9 < 0.5 + 0.5
    assert by_image[0].argsort(descending=True).tolist()[:2] == [1, 0]
    assert by_image[0, 2] < by_image[0].topk(2).values.min()  # outside the top k: below
    # text 0's candidates are images 0 and 1: -1 + 0.9 < 2 + 0.2
    assert by_text[:, 0].argmax().item() == 1
    with torch.no_grad():
        m.logit_scale.fill_(math.log(10.0))  # s = 10: -1 + 9 > 0.5 + 5
    by_image, _ = pipe.rerank(similarity, texts, image_tokens, k=2)
    assert by_image[0].argsort(descending=True).tolist()[:2] == [0, 1]


def test_retrieval_through_the_command_line(tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["synth", "--out", str(data), "--images", "40", "--size", "24"]) == 0
    vision = {"image_size": 24, "channels": [8, 8, 16], "dim": 32, "depth": 0, "heads": 2}
    text = {"dim": 32, "depth": 2, "heads": 2, "max_length": 16}
    tiny = {"model": {"vision": vision, "text": text}, "train": {"epochs": 2, "batch_size": 16}}
    (tmp_path / "tiny.json").write_text(json.dumps(tiny))
    run = tmp_path / "run"
    args = ["train", "--task", "retrieval", "--train", str(data / "retrieval_train.jsonl")]
    args += ["--val", str(data / "retrieval_val.jsonl"), "--out", str(run)]
    assert main([*args, "--config", str(tmp_path / "tiny.json"), "--no-progress"]) == 0
    epochs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    for entry in epochs:  # each term beside the loss, in training and in validation
        assert {"train_loss", "train_loss_itc", "train_loss_itm", "val_itc"} <= set(entry)
    metrics_file = tmp_path / "metrics.json"
    test = str(data / "retrieval_test.jsonl")
    assert (
        main(["eval", str(run), "--data", test, "--metrics", str(metrics_file), "--no-progress"])
        == 0
    )
    metrics = json.loads(metrics_file.read_text())
    for key in ("i2t_r1", "t2i_r5", "i2t_median_rank", "itm_i2t_r1", "itm_t2i_r1"):
        assert 0 <= metrics[key] <= (1 if "_r" in key and "rank" not in key else math.inf), key
    capsys.readouterr()
    images = data / "images"
    assert (
        main(
            [
                "retrieve",
                str(run),
                "--query",
                "a red circle",
                "--images",
                str(images),
                "--top-k",
                "3",
            ]
        )
        == 0
    )
    assert len(capsys.readouterr().out.strip().splitlines()) == 3
    texts = tmp_path / "texts.txt"
    texts.write_text("a red circle.\na blue square.\n")
    image = str(next(images.glob("*.png")))
    assert main(["retrieve", str(run), "--image", image, "--texts", str(texts)]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2
    assert (
        main(
            [
                "classify",
                str(run),
                image,
                "--labels",
                "red,blue,green",
                "--template",
                "a {} circle.",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and sum(float(x.split("%")[0]) for x in lines) == pytest.approx(
        100, abs=0.5
    )
    for template in ("no slot", "{} {}", "{x}{}", "{"):
        assert main(["classify", str(run), image, "--labels", "red", "--template", template]) == 2


@pytest.mark.parametrize("fusion", FUSIONS.names())
def test_every_fusion_strategy_serves_retrieval(fusion):
    """The matching head reads the image through any strategy; the dual encoder through none."""
    from dataclasses import replace

    from vtfuse.config import FusionConfig

    torch.manual_seed(0)
    m = create_model(replace(CONFIG, fusion=FusionConfig(name=fusion))).train()
    batch = {"images": solid(COLOURS), "tokens": torch.randint(4, 20, (6, 5))}
    batch["image_index"] = torch.tensor([0, 0, 1, 2, 3, 3])
    losses = m.losses(batch)
    assert set(losses) == {"itc", "itm"} and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert m.match_head.weight.grad.abs().sum() > 0
    with torch.no_grad():  # the dual encoder's text side never sees the image
        text_only = m.embed_texts(batch["tokens"])
        assert torch.equal(text_only, m.embed_texts(batch["tokens"]))
    _, weights = m.match_logits(
        batch["tokens"],
        None,
        m.encode_image(batch["images"]),
        batch["image_index"],
        need_weights=True,
    )
    assert weights and weights[0].shape[-1] == m.grid_size[0] * m.grid_size[1]
