"""Decoded pictures, each stored once and shared by its examples, and the dataset over them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset
from tqdm import tqdm

from vtfuse.data.clips import load_frames, load_video
from vtfuse.data.images import ImageLoadError
from vtfuse.data.jsonl import DataError, ImagePathRefused, Record, VisualSource


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
    # rows by `Record.visual_as_written`: resolving and checking a path costs more than decoding
    # a small image, and VQA files name each image once per question
    rows_as_written: dict[tuple, int] = field(default_factory=dict)

    def add_record(self, record: Record) -> int:
        """The row of a JSONL line's picture; its paths are checked once however many lines
        name it."""
        written = record.visual_as_written
        if written not in self.rows_as_written:
            self.rows_as_written[written] = self.add_visual(record.visual)
        return self.rows_as_written[written]

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
            image_ids.append(bank.add_record(record))
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
