"""The vtfuse dataset format (JSONL, one example a line) and the PyTorch datasets built on it.

    captioning: {"image": "images/1.png", "caption": "..."} or {"image": ..., "captions": [...]}
    VQA:        {"image": ..., "question": "...", "answer": "...", "type": "relational"}
    classify:   {"image": ..., "text": "...", "label": "..."}   (image+text pair → label)
    grounding:  "boxes": [{"label": "red", "box": [x0, y0, x1, y1]}]   (optional, pixels)

A video clip may stand in for the image: `"video": "clips/1.mp4"` or `"frames": ["clips/1/f0.png",
"clips/1/f1.png", ...]` (in time order); a clip model samples its `vision.frames` frames from it
(see vtfuse.data.clips), a still-image model its middle frame.

Image, video and frame paths are relative to the JSONL file's folder, and must stay inside it:
an absolute path, or one that leaves the folder (through `..` or a symbolic link), is refused
unless it lies under a folder the user allows (`--image-root DIR`, `image_roots`). Every error
names the file and line.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset
from tqdm import tqdm

from vtfuse.data.clips import load_frames, load_video
from vtfuse.data.images import ImageLoadError
from vtfuse.data.tokenizer import AnyTokenizer, Tokenizer


class DataError(ValueError):
    """A dataset line that does not fit the format; the message names file and line."""


class ImagePathRefused(DataError):
    """An image path leading outside the data's folder and every allowed image root."""


ALLOW_HINT = "allow a folder with --image-root DIR (image_roots=[...] in Python)"


def image_roots(folders: Sequence[str | Path]) -> tuple[Path, ...]:
    """The folders (besides each JSONL file's own) images may be read from, resolved."""
    roots = tuple(Path(folder).resolve() for folder in folders)
    for given, root in zip(folders, roots, strict=True):
        if not root.is_dir():
            raise DataError(f"--image-root {given}: no such folder")
    return roots


def safe_image_path(
    written: str, folder: Path, roots: Sequence[Path], where: str, what: str = "image"
) -> Path:
    """The image file (or `what`: a video, a frame) a JSONL line names, if it lies (symbolic
    links followed) under the line's `folder` — for a relative path — or under one of the
    resolved `roots`; else ImagePathRefused naming `where` and the path as written. `roots`
    come from the user, never from the data: a file that could allow itself more would allow
    nothing."""
    path = folder / written
    try:
        target = path.resolve()
    except (ValueError, OSError) as error:  # an embedded NUL byte, a symbolic-link loop
        raise ImagePathRefused(f"{where}: {what} path {written!r} is not usable: {error}") from None
    allowed = [*([] if Path(written).is_absolute() else [folder.resolve()]), *roots]
    if any(target.is_relative_to(root) for root in allowed):
        return path
    raise ImagePathRefused(
        f"{where}: {what} path {written!r} {_escape(written)}; images must lie under "
        f"the JSONL file's folder ({folder}) unless allowed: {ALLOW_HINT}"
    )


def _escape(written: str) -> str:
    """How a refused path leaves the data folder, for the message."""
    if Path(written).is_absolute():
        return "is absolute"
    depth = 0
    for part in Path(written).parts:
        depth += -1 if part == ".." else part != "."
        if depth < 0:
            return "leaves the data folder through '..'"
    return "leads outside the data folder through a symbolic link"


VISUAL_FIELDS = ("image", "video", "frames")  # one of them gives a line's picture


@dataclass(frozen=True)
class VisualSource:
    """What a line shows: a still image, a video file, or a clip's frames (paths checked)."""

    kind: Literal["image", "video", "frames"]
    paths: tuple[Path, ...]

    @property
    def key(self) -> tuple:
        """The same picture, however its paths are written: decoded once per bank."""
        return (self.kind, *(path.resolve() for path in self.paths))


@dataclass
class Record:
    """One JSONL line: its fields as written, where it came from, and the folders besides its
    own that its image may come from (`image_roots`)."""

    fields: dict[str, Any]
    file: Path
    line: int
    roots: tuple[Path, ...] = ()

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    @property
    def image_path(self) -> Path:
        """The image file, checked by `safe_image_path` (ImagePathRefused if outside); a
        clip's line ("video" or "frames") raises DataError: it has no single image."""
        if "image" not in self.fields:
            raise DataError(f"{self.where}: a video clip, where a still image is needed")
        return self._checked(self.fields["image"], "image")

    @property
    def visual(self) -> VisualSource:
        """The line's image, video or frames, each path checked by `safe_image_path`."""
        if "video" in self.fields:
            return VisualSource("video", (self._checked(self.fields["video"], "video"),))
        if "frames" in self.fields:
            return VisualSource(
                "frames", tuple(self._checked(f, "frame") for f in self.fields["frames"])
            )
        return VisualSource("image", (self.image_path,))

    def _checked(self, written: str, what: str) -> Path:
        return safe_image_path(written, self.file.parent, self.roots, self.where, what)

    @property
    def captions(self) -> list[str]:
        if "captions" in self.fields:
            return list(self.fields["captions"])
        return [self.fields["caption"]]


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


def _check_visual(fields: dict[str, Any]) -> str | None:
    """Exactly one of "image" (a path), "video" (a path) or "frames" (a list of paths)."""
    given = [name for name in VISUAL_FIELDS if name in fields]
    if not given:
        return "missing field 'image' (or 'video', or 'frames')"
    if len(given) > 1:
        return f"give one of 'image', 'video' and 'frames', not {' and '.join(given)}"
    if given == ["frames"]:
        if not _is_str_list(fields["frames"]):
            return "field 'frames' must be a non-empty list of path strings"
    elif not isinstance(fields[given[0]], str):
        return f"'{given[0]}' must be a path string"
    return None


def _check_boxes(boxes: Any) -> str | None:
    if not isinstance(boxes, list):
        return "field 'boxes' must be a list"
    for i, item in enumerate(boxes):
        box = item.get("box") if isinstance(item, dict) else None
        if not isinstance(item, dict) or not isinstance(item.get("label"), str):
            return f"boxes[{i}] needs a string 'label'"
        if not (isinstance(box, list) and len(box) == 4):
            return f"boxes[{i}].box must be [x0, y0, x1, y1]"
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in box):
            return f"boxes[{i}].box must hold four numbers"
    return None


def _check_caption(fields: dict[str, Any], labelled: bool) -> str | None:
    if "captions" in fields:
        if not _is_str_list(fields["captions"]):
            return "field 'captions' must be a non-empty list of strings"
        if not all(c.strip() for c in fields["captions"]):
            return "field 'captions' holds an empty caption"
    elif "caption" in fields:
        if not isinstance(fields["caption"], str):
            return "field 'caption' must be a string"
        if not fields["caption"].strip():
            return "field 'caption' is empty"
    elif labelled:
        return "missing field 'caption' (or 'captions')"
    return None


def _check_vqa(fields: dict[str, Any], labelled: bool) -> str | None:
    if not isinstance(fields.get("question"), str):
        return (
            "missing field 'question'"
            if "question" not in fields
            else "'question' must be a string"
        )
    if not fields["question"].strip():
        return "field 'question' is empty"
    if labelled and not isinstance(fields.get("answer"), str):
        return "missing field 'answer'" if "answer" not in fields else "'answer' must be a string"
    if "answers" in fields and not _is_str_list(fields["answers"]):
        return "field 'answers' must be a non-empty list of strings"
    if "type" in fields and not isinstance(fields["type"], str):
        return "field 'type' must be a string"
    return None


def _check_classify(fields: dict[str, Any], labelled: bool) -> str | None:
    if not isinstance(fields.get("text"), str):
        return "missing field 'text'" if "text" not in fields else "'text' must be a string"
    if not fields["text"].strip():
        return "field 'text' is empty"
    if labelled and not isinstance(fields.get("label"), str):
        return "missing field 'label'" if "label" not in fields else "'label' must be a string"
    return None


TASK_CHECKS: dict[str, Callable[[dict[str, Any], bool], str | None]] = {
    "caption": _check_caption,
    "vqa": _check_vqa,
    "retrieval": _check_caption,  # images with their captions
    "classify": _check_classify,  # image + text → label
    "joint": _check_caption,  # captioned images: captioning and retrieval from one file
}


def read_jsonl(
    path: str | Path, task: str, labelled: bool = True, roots: Sequence[str | Path] = ()
) -> list[Record]:
    """Read and validate a dataset file; a bad line raises DataError naming file:line.
    `roots`: folders besides the file's own its images may come from (see safe_image_path)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset file not found: {path}")
    allowed = image_roots(roots)
    check = TASK_CHECKS[task]
    records = []
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(
                    f"{path}:{number}: not UTF-8 text ({error.reason} at byte {error.start})"
                ) from None
            if not text.strip():
                continue
            try:
                fields = json.loads(text)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{path}:{number}: not valid JSON ({error.msg}, column {error.colno})"
                ) from None
            if not isinstance(fields, dict):
                raise DataError(
                    f"{path}:{number}: expected a JSON object, got {type(fields).__name__}"
                )
            problem = _check_visual(fields) or check(fields, labelled)
            if problem is None and "boxes" in fields:
                problem = _check_boxes(fields["boxes"])
            if problem:
                raise DataError(f"{path}:{number}: {problem}")
            records.append(Record(fields, path, number, allowed))
    if not records:
        raise DataError(f"{path}: no examples")
    return records


@dataclass
class ImageBank:
    """Decoded pictures, each stored once, shared by all its examples: uint8 (3, size, size),
    or for a clip model (`frames` > 1) its sampled frames (frames, 3, size, size) — a still
    image as `frames` copies of itself, so every entry has one shape and batches stack."""

    size: int
    frames: int = 1  # the model's vision.frames
    tensors: list[Tensor] = field(default_factory=list)
    original_sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height)
    index: dict[Any, int] = field(default_factory=dict)

    def add_visual(self, source: VisualSource) -> int:
        """The row of an image, video or frame list, decoded (and sampled) on first sight."""
        key = source.key
        if key not in self.index:
            if source.kind == "video":
                tensor, original = load_video(source.paths[0], self.size, self.frames)
            else:  # a still image is a clip of one frame
                tensor, original = load_frames(list(source.paths), self.size, self.frames)
            self.index[key] = len(self.tensors)
            self.tensors.append(tensor)
            self.original_sizes.append(original)
        return self.index[key]


@dataclass
class LoadedData:
    records: list[Record]  # the records kept, in input order
    image_ids: list[int]  # per kept record, its image in the bank
    bank: ImageBank
    skipped: list[str]  # one message per record skipped for a bad image or image path


def load_records(
    records: list[Record],
    image_size: int,
    skip_bad: bool = False,
    progress: bool = True,
    frames: int = 1,
) -> LoadedData:
    """Decode each record's image (or clip: `frames` sampled, see ImageBank) once. A bad image,
    video or frame, or a path outside the allowed folders, raises DataError naming the line,
    or with `skip_bad` drops the record and keeps the reason."""
    bank = ImageBank(image_size, frames)
    kept, image_ids, skipped = [], [], []
    for record in tqdm(
        records, desc="loading images", unit="ex", disable=not progress, leave=False
    ):
        try:
            image_ids.append(bank.add_visual(record.visual))
        except (ImageLoadError, ImagePathRefused) as error:
            refused = isinstance(error, ImagePathRefused)
            message = str(error) if refused else f"{record.where}: {error}"
            if not skip_bad:
                kind = ImagePathRefused if refused else DataError
                raise kind(message + " (use --skip-bad to skip such examples)") from None
            skipped.append(message)
            continue
        kept.append(record)
    if not kept:
        raise DataError("no example has a readable image")
    return LoadedData(kept, image_ids, bank, skipped)


class ImageTextDataset(Dataset):
    """Items are (image id, token ids, label); the image tensor is shared through the bank."""

    def __init__(self, bank: ImageBank, items: list[tuple[int, list[int], int | None]]):
        self.bank, self.items = bank, items

    def __len__(self) -> int:
        return len(self.items)

    @property
    def image_ids(self) -> list[int]:
        return [item[0] for item in self.items]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        image_id, ids, label = self.items[i]
        item = {
            "image_id": image_id,
            "images": self.bank.tensors[image_id],
            "tokens": torch.tensor(ids),
        }
        if label is not None:
            item["answers"] = torch.tensor(label)
        return item


Item = tuple[list[int], int | None]  # token ids, and the answer class (VQA) or None


class TextTruncated(UserWarning):
    """Texts longer than the model's text.max_length tokens were cut to fit."""


@dataclass
class Truncation:
    """Cuts token sequences to the model's `max_length`, counting the texts cut and where the
    first came from, for one summary warning instead of one per line."""

    max_length: int
    count: int = 0
    first: str = ""

    def fit(self, ids: list[int], limit: int, where: str) -> list[int]:
        """`ids` cut to `limit` tokens (`max_length`, less the positions the model adds)."""
        if len(ids) > limit:
            self.count += 1
            self.first = self.first or where
        return ids[:limit]

    def where(self, record: Record) -> str:
        return record.where

    def warn(self, texts: str = "text") -> None:
        """One warning, if any text was cut: how many, and the first's file:line."""
        if self.count:
            warnings.warn(
                f"{self.count} {texts}(s) longer than the model's text.max_length of "
                f"{self.max_length} tokens truncated to fit (the first: {self.first})",
                TextTruncated,
                stacklevel=2,
            )


TEXTS = {
    "caption": "caption",
    "vqa": "question",
    "retrieval": "caption",
    "classify": "text",
    "joint": "caption",
}


def caption_items(record: Record, tokenizer: AnyTokenizer, cut: Truncation) -> list[Item]:
    """One item per reference caption: <bos> words <eos> (a caption cut short has no <eos>)."""
    return [
        (
            cut.fit(
                tokenizer.encode(caption, bos=True, eos=True), cut.max_length, cut.where(record)
            ),
            None,
        )
        for caption in record.captions
    ]


def vqa_items(record: Record, tokenizer: AnyTokenizer, cut: Truncation) -> list[Item]:
    """One item per question; an answer outside the training answers gets label -1 (ignored
    by the loss, always wrong in accuracy). One position is left for [CLS]."""
    question = tokenizer.encode(record.fields["question"])
    question = cut.fit(question, cut.max_length - 1, cut.where(record))
    return [(question, tokenizer.answer_id(record.fields.get("answer", "")))]


def retrieval_items(record: Record, tokenizer: AnyTokenizer, cut: Truncation) -> list[Item]:
    """One item per caption, as an encoder reads it: no <bos>/<eos>, a slot for [CLS]."""
    return [
        (
            cut.fit(tokenizer.encode(caption), cut.max_length - 1, cut.where(record))
            or [tokenizer.unk_id],
            None,
        )
        for caption in record.captions
    ]


def encoder_view(tokens: Tensor, token_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Batched caption items (`caption_items`: <bos> words <eos> <pad>...) as an encoder reads
    them (`retrieval_items`: the words, a slot left for [CLS]): <bos> dropped, <eos> masked
    out as padding → tokens (B, T - 1) and token_mask. vtfuse's word vocabulary."""
    if token_mask is None:
        token_mask = tokens != Tokenizer.pad_id
    words = tokens[:, 1:]
    return words, token_mask[:, 1:] & (words != Tokenizer.eos_id)


def classify_items(record: Record, tokenizer: AnyTokenizer, cut: Truncation) -> list[Item]:
    """The pair's text as an encoder reads it, and its label's class (-1: unseen label)."""
    text = cut.fit(tokenizer.encode(record.fields["text"]), cut.max_length - 1, cut.where(record))
    return [(text, tokenizer.answer_id(record.fields.get("label", "")))]


ITEMS: dict[str, Callable[[Record, AnyTokenizer, Truncation], list[Item]]] = {
    "caption": caption_items,
    "vqa": vqa_items,
    "retrieval": retrieval_items,
    "classify": classify_items,
    "joint": caption_items,  # the encoder reads them through `encoder_view`
}


def task_dataset(
    task: str, data: LoadedData, tokenizer: AnyTokenizer, max_length: int
) -> ImageTextDataset:
    """The examples of `task` over decoded records: each record's items share its image.
    Texts longer than `max_length` tokens are cut, with one TextTruncated warning."""
    items_of, cut = ITEMS[task], Truncation(max_length)
    items = [
        (image_id, ids, label)
        for record, image_id in zip(data.records, data.image_ids, strict=True)
        for ids, label in items_of(record, tokenizer, cut)
    ]
    cut.warn(TEXTS[task])
    return ImageTextDataset(data.bank, items)


def warn_long_texts(
    task: str, records: list[Record], tokenizer: AnyTokenizer, max_length: int
) -> None:
    """One TextTruncated warning if any of the records' model inputs exceed `max_length`."""
    items_of, cut = ITEMS[task], Truncation(max_length)
    for record in records:
        items_of(record, tokenizer, cut)
    cut.warn(TEXTS[task])


def grouped_order(
    image_ids: list[int], generator: torch.Generator, per_group: int = 0
) -> list[int]:
    """A shuffled order of examples in groups of one image's examples, at most `per_group` a
    group (0: all of them), so a batch encodes each of its images once however many of its
    questions or captions it holds.

    Why cap the groups: a batch of 64 questions drawn 20 to an image shows the vision encoder
    3 images a step, and its gradient is that noisy. Measured (VQA from scratch on 9800
    Sort-of-CLEVR images, default model, 10 minutes on one core, seed 0; issue 15's note):
    whole groups learned place (0.99) but shape stalled at 0.60 (overall 0.66); groups of 4
    (16 images a batch, 1.4× the time a step) learned shape to 1.000 by step 3000, overall
    0.85; examples shuffled one by one (64 images a step, 3.6× the time) reached 0.59."""
    if per_group < 0:
        raise ValueError(f"examples_per_image must be 0 (all) or more, got {per_group}")
    by_image: dict[int, list[int]] = {}
    for example, image_id in enumerate(image_ids):
        by_image.setdefault(image_id, []).append(example)
    groups: list[list[int]] = []
    for examples in by_image.values():
        permutation = torch.randperm(len(examples), generator=generator).tolist()
        shuffled = [examples[j] for j in permutation]
        size = per_group or len(shuffled)
        groups += [shuffled[i : i + size] for i in range(0, len(shuffled), size)]
    shuffled_groups = torch.randperm(len(groups), generator=generator).tolist()
    return [example for g in shuffled_groups for example in groups[g]]


def pad_tokens(sequences: list[Tensor] | list[list[int]]) -> tuple[Tensor, Tensor]:
    """Right-pad token sequences with 0 → tokens (B, T) and token_mask (B, T), True on the
    sequences' own tokens (0 is <pad> in vtfuse's vocabulary, a real token in an LM's)."""
    tokens = torch.zeros(len(sequences), max(len(s) for s in sequences), dtype=torch.long)
    mask = torch.zeros(tokens.shape, dtype=torch.bool)
    for row, sequence in enumerate(sequences):
        tokens[row, : len(sequence)] = torch.as_tensor(sequence)
        mask[row, : len(sequence)] = True
    return tokens, mask


def collate(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Stack each distinct image (or clip) once (`images`, (I, 3, H, W) or (I, frames, 3, H,
    W), with `image_index` mapping every example to its image's row and `image_ids` naming each
    row's image in the bank); right-pad token sequences
    with 0 (<pad>) and add `token_mask`."""
    rows: dict[int, int] = {}
    for item in items:
        rows.setdefault(item["image_id"], len(rows))
    firsts = {item["image_id"]: item["images"] for item in reversed(items)}
    batch = {
        "images": torch.stack([firsts[image_id] for image_id in rows]),
        "image_index": torch.tensor([rows[item["image_id"]] for item in items]),
        "image_ids": torch.tensor(list(rows)),  # each image row's id in the bank
    }
    batch["tokens"], batch["token_mask"] = pad_tokens([item["tokens"] for item in items])
    if "answers" in items[0]:
        batch["answers"] = torch.stack([it["answers"] for it in items])
    return batch
