"""The field's metrics: COCO caption metrics (pycocoevalcap), VQA accuracy, and two measures
of whether a caption or a glance is grounded in the image (object F1, pointing accuracy)."""

from __future__ import annotations

import contextlib
import io
import shutil
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vtfuse.data.tokenizer import normalise_answer
from vtfuse.evaluation.vqa_answers import vqa_soft_score


def caption_metrics(
    predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> dict[str, float | None]:
    """BLEU-1..4 (Papineni et al. 2002), METEOR (Denkowski & Lavie 2014), ROUGE-L (Lin 2004) and
    CIDEr (Vedantam et al. 2015) as the COCO caption evaluation computes them: PTB-tokenised,
    every reference of an image used. METEOR and the tokenizer run on Java; without Java, the
    tokenizer falls back to vtfuse's and METEOR is reported as None."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    ids = range(len(predictions))
    gts = {i: [{"caption": r} for r in references[i]] for i in ids}
    res = {i: [{"caption": predictions[i]}] for i in ids}
    java = shutil.which("java") is not None
    gts, res = _tokenise(gts, java), _tokenise(res, java)
    res = {i: [c if c.strip() else "<empty>"] for i, (c,) in res.items()}  # scorers need a word
    with contextlib.redirect_stdout(io.StringIO()):  # the scorers print their internals
        bleu, _ = Bleu(4).compute_score(gts, res)
        scores: dict[str, float | None] = {f"bleu{n + 1}": float(b) for n, b in enumerate(bleu)}
        scores["meteor"] = _meteor(gts, res) if java else None
        scores["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
        scores["cider"] = float(Cider().compute_score(gts, res)[0])
    return scores


def _tokenise(captions: dict[int, list[dict[str, str]]], java: bool) -> dict[int, list[str]]:
    if java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        return PTBTokenizer().tokenize(captions)
    warnings.warn(
        "java not found: PTB tokenizer replaced by vtfuse's, METEOR skipped", stacklevel=3
    )
    return {i: [normalise_answer(c["caption"]) for c in caps] for i, caps in captions.items()}


def _meteor(gts: dict[int, list[str]], res: dict[int, list[str]]) -> float:
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    try:
        return float(scorer.compute_score(gts, res)[0])
    finally:
        with contextlib.suppress(Exception):
            scorer.close()


def vqa_accuracy(
    predictions: Sequence[str],
    answers: Sequence[str],
    types: Sequence[str | None],
    human_answers: Sequence[Sequence[str] | None] | None = None,
) -> dict:
    """VQA accuracy, overall and per question `type`. Where an example has its annotators'
    answers (VQAv2's ten, `"answers"` in the JSONL), the official soft score with the official
    normalisation (`vqa_answers`); otherwise exact match after normalisation."""
    humans = human_answers or [None] * len(predictions)
    by_type: dict[str, list[float]] = defaultdict(list)
    overall = []
    for prediction, answer, kind, annotators in zip(
        predictions, answers, types, humans, strict=True
    ):
        if annotators:
            score = vqa_soft_score(prediction, annotators)
        else:
            score = float(normalise_answer(prediction) == normalise_answer(answer))
        overall.append(score)
        if kind is not None:
            by_type[kind].append(score)
    return {
        "accuracy": sum(overall) / max(1, len(overall)),
        "accuracy_by_type": {k: sum(v) / len(v) for k, v in sorted(by_type.items())},
    }


def classification_metrics(
    predictions: Sequence[str], labels: Sequence[str], classes: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, macro-F1 (the unweighted mean over classes), each class's precision, recall,
    F1 and support, and the confusion matrix (rows: true class, columns: predicted)."""
    names = list(dict.fromkeys([*classes, *labels]))  # a label unseen in training counts too
    index = {name: i for i, name in enumerate(names)}
    confusion = np.zeros((len(names), len(names)), dtype=np.int64)
    for predicted, true in zip(predictions, labels, strict=True):
        confusion[index[true], index[predicted]] += 1
    per_class = {}
    for i, name in enumerate(names):
        hits, said, actual = confusion[i, i], confusion[:, i].sum(), confusion[i].sum()
        precision = hits / said if said else 0.0
        recall = hits / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {
            "precision": float(precision),
            "recall": float(recall),
            "f1": float(f1),
            "support": int(actual),
        }
    present = [c for c in per_class.values() if c["support"]]
    return {
        "accuracy": float(np.trace(confusion) / max(1, confusion.sum())),
        "macro_f1": float(np.mean([c["f1"] for c in present])) if present else 0.0,
        "per_class": per_class,
        "classes": names,
        "confusion": confusion.tolist(),
    }


def retrieval_metrics(
    similarity: Tensor, image_of_text: Sequence[int], ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@K both ways and median ranks for an (images, texts) similarity matrix, counted
    as the COCO / Flickr30k protocol does when an image has several captions: an image query
    ranks at its best-placed caption; a text query, at its image. A rank is 1 + the wrong
    candidates scoring at least as high (ties count against the query)."""
    images = torch.arange(similarity.shape[0], device=similarity.device)
    owner = torch.as_tensor(image_of_text, device=similarity.device)  # (T,)
    mine = owner[None, :] == images[:, None]  # (I, T): text t describes image i
    best_own = similarity.masked_fill(~mine, float("-inf")).max(dim=1).values  # (I,)
    image_ranks = 1 + ((similarity >= best_own[:, None]) & ~mine).sum(dim=1)
    own = similarity.gather(0, owner[None, :])  # (1, T): each text with its image
    text_ranks = 1 + ((similarity >= own) & ~mine).sum(dim=0)
    metrics = {}
    for direction, ranks in (("i2t", image_ranks), ("t2i", text_ranks)):
        for k in ks:
            metrics[f"{direction}_r{k}"] = (ranks <= k).float().mean().item()
        # VSE++'s convention (Faghri et al. 2018): floor of the median 0-based rank, plus 1
        metrics[f"{direction}_median_rank"] = float(
            np.floor(np.median(ranks.cpu().numpy() - 1)) + 1
        )
    return metrics


Fact = tuple[str, ...]


def object_f1(
    captions: Sequence[str],
    scenes: Sequence[Iterable[Fact]],
    parse: Callable[[str], set[Fact]],
) -> dict[str, float]:
    """Micro-averaged precision/recall/F1 of the facts the captions state against the facts
    of their scenes (for the synthetic data: (colour, shape, position) per object)."""
    true_pos = stated = actual = 0
    for caption, scene in zip(captions, scenes, strict=True):
        facts, truth = parse(caption), set(scene)
        true_pos += len(facts & truth)
        stated += len(facts)
        actual += len(truth)
    precision = true_pos / stated if stated else 0.0
    recall = true_pos / actual if actual else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"object_f1": f1, "object_precision": precision, "object_recall": recall}
