"""WebDataset shards, for data that does not fit in memory.

`write_shards` packs a JSONL file into tar shards of `shard_size` records each: per record the
files' own bytes — the image (`.image`), or a clip's video file (`.video`) or frames
(`.frame000000`, ...) — and its JSON fields. `ShardDataset` streams them back — shards split
between DataLoader workers, optionally shuffled per epoch (shard order, then a buffer) — and
decodes each record's picture once per epoch, a clip's sampled frames only (`data/clips.py`);
its examples (captions, questions, statements) are the same as the in-memory datasets build
(the task's `items`, `vtfuse.tasks`).
"""

from __future__ import annotations

import io
import json
import random
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from vtfuse.data.clips import load_frames, load_video
from vtfuse.data.images import ImageLoadError
from vtfuse.data.items import Truncation
from vtfuse.data.jsonl import DataError, Record
from vtfuse.data.tokenizer import AnyTokenizer
from vtfuse.tasks import read_jsonl, task_spec

INDEX = "index.json"
FRAME = "frame"  # a clip's frames are stored as frame000000, frame000001, ...


def _webdataset():
    try:
        import webdataset
    except ImportError:
        raise ImportError("shards need the webdataset package: pip install webdataset") from None
    return webdataset


def is_shard_folder(path: str | Path) -> bool:
    return (Path(path) / INDEX).is_file()


def write_shards(
    jsonl: str | Path,
    task: str,
    out: str | Path,
    shard_size: int = 1000,
    roots: Sequence[str | Path] = (),
) -> dict:
    """Pack `jsonl` into `out/shard-NNNNNN.tar` plus `out/index.json`; returns the index.
    `roots`: folders besides the JSONL's own its images may come from (see safe_image_path)."""
    if shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1, got {shard_size}")
    records = read_jsonl(jsonl, task, roots=roots)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pattern = str(out / "shard-%06d.tar")
    with _webdataset().ShardWriter(pattern, maxcount=shard_size, verbose=0) as sink:
        for number, record in enumerate(records):
            fields = {**record.fields, "source": record.where}
            sample = {"__key__": f"{number:09d}", "json": json.dumps(fields)}
            sink.write({**sample, **_picture_files(record)})
    index = {
        "task": task,
        "records": len(records),
        "shards": sorted(p.name for p in out.glob("shard-*.tar")),
        "source": str(Path(jsonl).resolve()),
    }
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return index


def _picture_files(record: Record) -> dict[str, bytes]:
    """The bytes of a record's image, video file or frames, under their keys in the shard."""
    source = record.visual
    names = [source.kind]  # "image" or "video": one file, its kind its key
    if source.kind == "frames":
        names = [f"{FRAME}{i:06d}" for i in range(len(source.paths))]
    files = {}
    for name, path in zip(names, source.paths, strict=True):
        try:
            files[name] = path.read_bytes()
        except OSError as error:
            raise DataError(f"{record.where}: cannot read {source.kind}: {error}") from None
    return files


def decode_picture(sample: dict, fields: dict, size: int, frames: int) -> Tensor:
    """A shard sample's picture as the in-memory bank holds it (`ImageBank.add_visual`): uint8
    (3, size, size), or (frames, 3, size, size) for a clip model."""
    if "video" in sample:  # PyAV reads a file: the bytes go to a temporary one, then away
        suffix = Path(fields.get("video", "clip.mp4")).suffix
        with tempfile.NamedTemporaryFile(suffix=suffix) as video:
            video.write(sample["video"])
            video.flush()
            return load_video(video.name, size, frames)[0]
    keys = sorted(key for key in sample if key.startswith(FRAME)) or ["image"]
    return load_frames([io.BytesIO(sample[key]) for key in keys], size, frames)[0]


def read_index(folder: str | Path, task: str) -> dict:
    path = Path(folder) / INDEX
    try:
        index = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: cannot read the shard index: {error}") from None
    if index.get("task") != task:
        raise DataError(f"{path}: shards of task {index.get('task')!r}, not {task!r}")
    return index


def _samples(folder: Path, shards: list[str]) -> Iterator[tuple[Record, dict]]:
    wds = _webdataset()
    urls = [str(folder / name) for name in shards]
    # the shards are split between workers here, by ShardDataset: not again by webdataset
    samples = wds.WebDataset(urls, shardshuffle=False, empty_check=False, workersplitter=None)
    for sample in samples:
        record = Record(json.loads(sample["json"]), Path(sample["__url__"]), int(sample["__key__"]))
        yield record, sample


class ShardTruncation(Truncation):
    """Names a cut text by the JSONL file and line its record was packed from."""

    def where(self, record: Record) -> str:
        return record.fields.get("source", record.where)


def shard_records(folder: str | Path, task: str) -> list[Record]:
    """Every record's fields, without decoding images (to build a vocabulary, count items)."""
    index = read_index(folder, task)
    return [record for record, _ in _samples(Path(folder), index["shards"])]


class ShardDataset(IterableDataset):
    """A task's examples streamed from shards; call `set_epoch` before each epoch."""

    def __init__(
        self,
        folder: str | Path,
        task: str,
        tokenizer: AnyTokenizer,
        max_length: int,
        image_size: int,
        shuffle: bool = True,
        seed: int = 0,
        frames: int = 1,
        buffer: int = 1000,
    ):
        self.folder, self.task = Path(folder), task
        self.index = read_index(folder, task)
        self.tokenizer, self.max_length, self.image_size = tokenizer, max_length, image_size
        self.frames = frames  # a clip model's frames per clip (VisionConfig.frames)
        self.shuffle, self.seed, self.buffer, self.epoch = shuffle, seed, buffer, 0
        self._length = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        """Examples per epoch (counted once, from the records' text)."""
        if self._length is None:
            items, uncounted = task_spec(self.task).items, Truncation(self.max_length)
            self._length = sum(
                len(items(r, self.tokenizer, uncounted))
                for r in shard_records(self.folder, self.task)
            )
        return self._length

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        rng = random.Random(self.seed * 1000 + self.epoch)
        shards = list(self.index["shards"])
        if self.shuffle:
            rng.shuffle(shards)
        worker = get_worker_info()
        if worker is not None:
            shards = shards[worker.id :: worker.num_workers]
        examples = self._examples(shards)
        yield from self._shuffled(examples, rng) if self.shuffle else examples

    def _examples(self, shards: list[str]) -> Iterator[dict[str, torch.Tensor]]:
        """Each record's examples; texts cut to max_length are reported once per pass."""
        spec, cut = task_spec(self.task), ShardTruncation(self.max_length)
        for record, sample in _samples(self.folder, shards):
            try:
                image = decode_picture(sample, record.fields, self.image_size, self.frames)
            except ImageLoadError as error:
                raise DataError(f"{record.fields.get('source', record.where)}: {error}") from None
            for ids, label in spec.items(record, self.tokenizer, cut):
                item = {"image_id": record.line, "images": image, "tokens": torch.tensor(ids)}
                if label is not None:
                    item["answers"] = torch.tensor(label)
                yield item
        cut.warn(spec.reads)

    def _shuffled(self, examples: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        """A shuffle buffer: keep `buffer` examples, emit a random one as each arrives."""
        pool: list[dict] = []
        for example in examples:
            pool.append(example)
            if len(pool) >= self.buffer:
                yield pool.pop(rng.randrange(len(pool)))
        rng.shuffle(pool)
        yield from pool
