"""`vtfuse eval`: run a trained model over a labelled JSONL file and score it."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from vtfuse.data.bank import LoadedData, load_records
from vtfuse.data.images import blank_like
from vtfuse.data.items import TextTruncated
from vtfuse.data.synth import canonical_position, parse_caption
from vtfuse.evaluation.grounding import pointing_hits
from vtfuse.evaluation.metrics import (
    caption_metrics,
    classification_metrics,
    object_f1,
    retrieval_metrics,
    vqa_accuracy,
)
from vtfuse.pipeline import Pipeline
from vtfuse.registry import Registry
from vtfuse.tasks import CAPTION, CLASSIFY, RETRIEVAL, VQA, read_jsonl, task_spec, warn_long_texts
from vtfuse.visualisation.maps import select_layer
from vtfuse.visualisation.plot import save_confusion_matrix


@dataclass(frozen=True)
class EvalOptions:
    batch_size: int = 64
    beam_size: int = 1  # captioning; pointing accuracy needs greedy attention, so beam 1
    max_length: int | None = None
    length_penalty: float = 1.0
    layer: int | None = None  # fusion layer pointing accuracy reads (None: mean of all)
    blind: bool = False  # replace every image by a blank one (the blind baseline)
    skip_bad: bool = False
    progress: bool = True
    rerank_k: int = 16  # retrieval: candidates the matching head re-scores per query
    blind_text: bool = False  # classify / VQA: an empty text (the image-only baseline)
    confusion_png: str | None = None  # classify: draw the confusion matrix here
    allow_pickle: bool = False  # load a model folder's pickle weights (see load_pretrained)
    image_roots: tuple[str, ...] = ()  # folders besides the JSONL's own images may come from
    weights: str = "fp32"  # the linear layers' precision (see vtfuse.quantisation)
    runtime: str = "auto"  # what decodes captions (see vtfuse.generation.runtimes.choose_runtime)
    device: str = "auto"  # see vtfuse.runtime.resolve_device


EVALUATORS: Registry[Callable[..., tuple[dict[str, Any], list[str]]]] = Registry("evaluator")


def _batches(n: int, size: int, desc: str, progress: bool):
    for start in tqdm(
        range(0, n, size), desc=desc, unit="batch", disable=not progress, leave=False
    ):
        yield start, min(n, start + size)


def _point(pipe: Pipeline, words: list[str], maps, record, image_size) -> tuple[int, int]:
    return pointing_hits(words, maps, record.fields["boxes"], pipe.model.grid_size, image_size)


def _pointing(hits: int, total: int) -> dict[str, float]:
    return {"pointing_accuracy": hits / total} if total else {}


@EVALUATORS.register(CAPTION.name)
def evaluate_captions(pipe: Pipeline, data: LoadedData, options: EvalOptions):
    records, bank = data.records, data.bank
    with_boxes = any("boxes" in r.fields for r in records)
    need_weights = with_boxes and options.beam_size == 1
    predictions: list[str] = []
    hits = total = 0
    for start, end in _batches(len(records), options.batch_size, "captioning", options.progress):
        ids = data.image_ids[start:end]
        images = torch.stack([bank.tensors[i] for i in ids]).to(pipe.device)
        generated = pipe.generate(
            images,
            options.beam_size,
            options.max_length,
            options.length_penalty,
            need_weights,
            options.blind,
        )
        for row, tokens in enumerate(generated.tokens):
            predictions.append(pipe.tokenizer.decode(tokens))
            record = records[start + row]
            if need_weights and "boxes" in record.fields:
                words = pipe.tokenizer.pieces(tokens)
                maps = select_layer(generated.attention[row], options.layer)
                h, n = _point(pipe, words, maps, record, bank.original_sizes[ids[row]])
                hits, total = hits + h, total + n
    metrics: dict[str, Any] = caption_metrics(predictions, [r.captions for r in records])
    if all("objects" in r.fields for r in records):
        metrics.update(scene_object_f1(predictions, [r.fields["objects"] for r in records]))
    metrics.update(_pointing(hits, total))
    return metrics, predictions


def _classified(
    pipe: Pipeline, data: LoadedData, options: EvalOptions, text_field: str
) -> tuple[list[str], int, int]:
    """Each record's predicted class (answer or label), and the pointing hits and trials."""
    records, bank = data.records, data.bank
    predictions: list[str] = []
    hits = total = 0
    for start, end in _batches(len(records), options.batch_size, "classifying", options.progress):
        chunk = records[start:end]
        ids = data.image_ids[start:end]
        rows = {image_id: row for row, image_id in enumerate(dict.fromkeys(ids))}
        images = torch.stack([bank.tensors[i] for i in rows]).to(pipe.device)
        image_index = torch.tensor([rows[i] for i in ids], device=pipe.device)
        texts = ["" if options.blind_text else r.fields[text_field] for r in chunk]
        tokens, mask = pipe.encode_texts(texts)
        need_weights = any("boxes" in r.fields for r in chunk) and not options.blind_text
        probs, weights = pipe.answer_probabilities(
            images, tokens, mask, image_index, need_weights, options.blind
        )
        predictions += [pipe.tokenizer.answers[i] for i in probs.argmax(-1).tolist()]
        for row, record in enumerate(chunk):
            if need_weights and "boxes" in record.fields:
                length = int(mask[row].sum())
                words = pipe.tokenizer.pieces(tokens[row, :length].tolist())
                per_layer = torch.stack([w[row, :, :length] for w in weights]).permute(2, 0, 1, 3)
                maps = select_layer(per_layer.cpu(), options.layer)  # (T, N)
                h, n = _point(pipe, words, maps, record, bank.original_sizes[ids[row]])
                hits, total = hits + h, total + n
    return predictions, hits, total


@EVALUATORS.register(VQA.name)
def evaluate_answers(pipe: Pipeline, data: LoadedData, options: EvalOptions):
    records = data.records
    predictions, hits, total = _classified(pipe, data, options, "question")
    metrics = vqa_accuracy(
        predictions,
        [r.fields["answer"] for r in records],
        [r.fields.get("type") for r in records],
        [r.fields.get("answers") for r in records],
    )
    metrics.update(_pointing(hits, total))
    return metrics, predictions


@EVALUATORS.register(CLASSIFY.name)
def evaluate_pairs(pipe: Pipeline, data: LoadedData, options: EvalOptions):
    """Accuracy, macro-F1, per-class precision/recall/F1 and the confusion matrix (saved as a
    picture with `options.confusion_png`)."""
    predictions, hits, total = _classified(pipe, data, options, "text")
    labels = [r.fields["label"] for r in data.records]
    metrics = classification_metrics(predictions, labels, pipe.tokenizer.answers)
    if options.confusion_png:
        save_confusion_matrix(metrics["confusion"], metrics["classes"], options.confusion_png)
    metrics.update(_pointing(hits, total))
    return metrics, predictions


@EVALUATORS.register(RETRIEVAL.name)
def evaluate_retrieval(pipe: Pipeline, data: LoadedData, options: EvalOptions):
    """Every image against every caption of the file: Recall@1/5/10 both ways and median
    ranks by the dual encoder, then again after the matching head re-ranks the top
    `options.rerank_k` (the `itm_` metrics). Each record's prediction: its image's best text."""
    rows = {image_id: row for row, image_id in enumerate(dict.fromkeys(data.image_ids))}
    texts, owner = [], []
    for record, image_id in zip(data.records, data.image_ids, strict=True):
        texts += record.captions
        owner += [rows[image_id]] * len(record.captions)
    images = torch.stack([data.bank.tensors[i] for i in rows]).to(pipe.device)
    if options.blind:
        images = blank_like(images)
    image_embeddings, image_tokens = pipe.embed_images(images, options.batch_size)
    similarity = image_embeddings @ pipe.embed_texts(texts).T  # (I, T)
    metrics = retrieval_metrics(similarity, owner)
    by_image, by_text = pipe.rerank(similarity, texts, image_tokens, options.rerank_k)
    metrics.update({f"itm_{k}": v for k, v in _directional(by_image, by_text, owner).items()})
    best = by_image.argmax(dim=1).tolist()
    return metrics, [texts[best[rows[i]]] for i in data.image_ids]


def _directional(by_image, by_text, owner) -> dict[str, float]:
    """Image→text metrics from the matrix re-ranked per image, text→image per text."""
    from_images, from_texts = retrieval_metrics(by_image, owner), retrieval_metrics(by_text, owner)
    return {k: (from_images if k.startswith("i2t") else from_texts)[k] for k in from_images}


def _score(
    pipe: Pipeline, data: LoadedData, options: EvalOptions, task: str
) -> tuple[dict[str, Any], list[Any]]:
    """The metrics and per-record predictions of `task`'s evaluator."""
    if not task_spec(task).generates:  # texts the model reads (references are only scored)
        max_length = pipe.model.config.text.max_length
        warn_long_texts(task, data.records, pipe.tokenizer, max_length)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TextTruncated)  # counted once, above
        return EVALUATORS.get(task)(pipe, data, options)


def evaluate(
    model_path: str | Path,
    data_path: str | Path,
    options: EvalOptions = EvalOptions(),
    predictions_path: str | Path | None = None,
    metrics_path: str | Path | None = None,
    pipe: Pipeline | None = None,
) -> dict[str, Any]:
    """Score the model at `model_path` (a run or model folder) on `data_path`. A model with
    several capabilities (a joint model: caption and retrieval) is scored as each, its
    metrics and each record's predictions nested under the task's name."""
    pipe = pipe or Pipeline.load(
        model_path,
        options.device,
        allow_pickle=options.allow_pickle,
        weights=options.weights,
        runtime=options.runtime,
    )
    records = read_jsonl(data_path, pipe.task, roots=options.image_roots)
    vision = pipe.model.config.vision
    data = load_records(
        records, vision.image_size, options.skip_bad, options.progress, vision.frames
    )
    tasks = pipe.model.capabilities
    scored = {task: _score(pipe, data, options, task) for task in tasks}
    if len(tasks) == 1:
        metrics, predictions = scored[tasks[0]]
    else:
        metrics = {task: task_metrics for task, (task_metrics, _) in scored.items()}
        by_task = [task_predictions for _, task_predictions in scored.values()]
        predictions = [dict(zip(tasks, row, strict=True)) for row in zip(*by_task, strict=True)]
    metrics = {**metrics, "examples": len(data.records), "skipped": len(data.skipped)}
    if predictions_path:
        with Path(predictions_path).open("w") as handle:
            for record, prediction in zip(data.records, predictions, strict=True):
                handle.write(json.dumps({**record.fields, "prediction": prediction}) + "\n")
    if metrics_path:
        Path(metrics_path).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _flat(metrics: dict[str, Any], prefix: str = ""):
    for key, value in metrics.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}/")
        elif key == "confusion" and "classes" in metrics:
            names = metrics["classes"]
            yield f"{prefix}confusion (predicted: {' '.join(names)})", ""
            yield from (
                (f"{prefix}  true {n}", " ".join(map(str, r)))
                for n, r in zip(names, value, strict=True)
            )
        elif key != "classes":
            yield f"{prefix}{key}", value


def format_table(metrics: dict[str, Any], title: str = "") -> str:
    """Metrics as an aligned two-column table (nested dicts flattened with '/'; a confusion
    matrix one row per true class)."""
    rows = list(_flat(metrics))
    width = max(len(k) for k, _ in rows)
    lines = [title] if title else []
    for key, value in rows:
        shown = (
            "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)
        )
        lines.append(f"  {key:<{width}}  {shown}")
    return "\n".join(lines)


def scene_object_f1(predictions: list[str], scenes: list[list[dict]]) -> dict[str, float]:
    """`object_f1` against each line's `objects` (colour, shape, position): the colour and shape
    words are the ones the data's own objects use, so any scene vocabulary is scored (a
    caption names "gray" only if some scene has a gray object)."""
    colours = {o["colour"] for scene in scenes for o in scene}
    shapes = {o["shape"] for scene in scenes for o in scene}
    truth = [
        [(o["colour"], o["shape"], canonical_position(o["position"])) for o in scene]
        for scene in scenes
    ]
    metrics = object_f1(predictions, truth, lambda c: parse_caption(c, colours, shapes))
    # which part of a fact goes wrong: an object's shape, or its place
    for name, keep in (("colour_shape", (0, 1)), ("colour_place", (0, 2))):
        part = [[tuple(fact[i] for i in keep) for fact in scene] for scene in truth]
        parse = lambda c, keep=keep: {  # noqa: E731
            tuple(fact[i] for i in keep) for fact in parse_caption(c, colours, shapes)
        }
        metrics[f"object_f1_{name}"] = object_f1(predictions, part, parse)["object_f1"]
    return metrics
