"""`vtfuse data import FORMAT`: datasets in their official formats → vtfuse JSONL.

Each importer reads its source into `Imported` — examples per split, and every record it had
to skip with the reason — and `write_splits` writes `DIR/<split>.jsonl` (`DIR/data.jsonl`
where the source has no split). Image paths are kept (written relative to DIR), not copied,
unless asked. Images outside DIR are then reached through `..`, which the loader refuses unless
their folder is allowed with `--image-root` (`outside_image_root` finds it, the command says
so). A malformed record is reported and skipped; with `strict` it stops the import, naming the
file and the record.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vtfuse.data.jsonl import DataError, ImagePathRefused, safe_image_path
from vtfuse.registry import Registry
from vtfuse.tasks import CAPTION

IMPORTERS: Registry[Callable[..., Imported]] = Registry("dataset format")
NO_SPLIT = "data"


@dataclass
class ImportOptions:
    annotations: list[Path] = field(default_factory=list)  # caption / VQA annotation files
    questions: Path | None = None  # VQAv2 questions file
    images: Path | None = None  # image root
    image_column: str = "image"  # csv / tsv / hf
    text_column: str = CAPTION.reads  # the caption task's field
    split: str = ""  # hf: which split ("" = all)
    strict: bool = False
    out: Path = Path(".")  # the output folder (hf writes the dataset's images under it)


@dataclass
class Imported:
    splits: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    strict: bool = False

    def add(self, split: str, example: dict[str, Any]) -> None:
        self.splits.setdefault(split, []).append(example)

    def skip(self, where: str, reason: str) -> None:
        message = f"{where}: {reason}"
        if self.strict:
            raise DataError(message + " (without --strict such records are skipped)")
        self.skipped.append(message)


# -- images ------------------------------------------------------------------------------------
_TRAILING_NUMBER = re.compile(r"(\d+)$")


class ImageFinder:
    """Finds an image by file name, or a COCO image by its id whatever the naming: the 2014
    `COCO_val2014_000000000042.jpg` and the 2017 `000000000042.jpg` styles both match id 42."""

    def __init__(self, root: Path | None):
        self.root = root
        self._by_name: dict[str, Path] | None = None
        self._by_id: dict[int, Path] = {}

    def _index(self) -> None:
        if self._by_name is not None:
            return
        self._by_name = {}
        if self.root is None:
            return
        for path in sorted(self.root.rglob("*")):
            if path.suffix.lower() not in (".jpg", ".jpeg", ".png", ".webp", ".bmp"):
                continue
            self._by_name.setdefault(path.name, path)
            match = _TRAILING_NUMBER.search(path.stem)
            if match:
                self._by_id.setdefault(int(match.group(1)), path)

    def by_name(self, name: str, subfolder: str = "") -> Path | None:
        if self.root is None:
            return None
        direct = self.root / subfolder / name
        if direct.is_file():
            return direct
        self._index()
        return self._by_name.get(Path(name).name)

    def by_coco_id(self, image_id: int, name: str = "") -> Path | None:
        found = self.by_name(name) if name else None
        if found is None:
            self._index()
            found = self._by_id.get(int(image_id))
        return found


def _load_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error.msg}, line {error.lineno})") from None


def _split_from_name(path: Path) -> str:
    """captions_train2017.json → train; v2_OpenEnded_mscoco_val2014_questions.json → val."""
    for split in ("train", "val", "test"):
        if re.search(rf"(^|[_\-.]){split}", path.stem):
            return split
    return NO_SPLIT


def _one(options: ImportOptions, flag: str = "--annotations") -> Path:
    if len(options.annotations) != 1:
        raise DataError(f"this format reads one {flag} file, got {len(options.annotations)}")
    return options.annotations[0]


# -- caption formats ---------------------------------------------------------------------------
def _karpathy(options: ImportOptions, dataset: str) -> Imported:
    """The Karpathy split files: images with their split and all reference sentences."""
    path = _one(options)
    data = _load_json(path)
    result = Imported(strict=options.strict)
    finder = ImageFinder(options.images)
    for i, image in enumerate(data.get("images", []) if isinstance(data, dict) else []):
        where = f"{path}: images[{i}]"
        if not isinstance(image, dict) or "filename" not in image:
            result.skip(where, "no 'filename'")
            continue
        captions = [s.get("raw", "").strip() for s in image.get("sentences", [])]
        captions = [c for c in captions if c]
        if not captions:
            result.skip(where, f"{image['filename']} has no sentences")
            continue
        if dataset == "coco":
            found = finder.by_coco_id(image.get("cocoid", -1), image["filename"])
        else:
            found = finder.by_name(image["filename"], image.get("filepath", ""))
        if found is None:
            result.skip(where, f"image {image['filename']} not found under {options.images}")
            continue
        split = {"restval": "train"}.get(image.get("split", ""), image.get("split") or NO_SPLIT)
        result.add(split, {"image": found, "captions": captions})
    return result


@IMPORTERS.register("coco-karpathy")
def import_coco_karpathy(options: ImportOptions) -> Imported:
    return _karpathy(options, "coco")


@IMPORTERS.register("flickr30k-karpathy")
def import_flickr30k_karpathy(options: ImportOptions) -> Imported:
    return _karpathy(options, "flickr30k")


@IMPORTERS.register("coco")
def import_coco(options: ImportOptions) -> Imported:
    """Official `captions_<split><year>.json`: the split comes from each file's name."""
    result = Imported(strict=options.strict)
    finder = ImageFinder(options.images)
    if not options.annotations:
        raise DataError("coco reads one or more --annotations captions_*.json files")
    for path in options.annotations:
        data = _load_json(path)
        names = {im.get("id"): im.get("file_name", "") for im in data.get("images", [])}
        captions: dict[int, list[str]] = {}
        for i, annotation in enumerate(data.get("annotations", [])):
            caption = annotation.get("caption") if isinstance(annotation, dict) else None
            if not isinstance(caption, str) or "image_id" not in annotation:
                result.skip(f"{path}: annotations[{i}]", "needs 'image_id' and a 'caption'")
                continue
            captions.setdefault(annotation["image_id"], []).append(caption.strip())
        for image_id, texts in captions.items():
            found = finder.by_coco_id(image_id, names.get(image_id, ""))
            if found is None:
                result.skip(f"{path}: image {image_id}", f"not found under {options.images}")
                continue
            result.add(_split_from_name(path), {"image": found, "captions": texts})
    return result


@IMPORTERS.register("vqav2")
def import_vqav2(options: ImportOptions) -> Imported:
    """Official questions + annotations: every human answer kept in "answers", the most
    common one in "answer", the annotation's answer type in "type"."""
    if options.questions is None:
        raise DataError("vqav2 needs --questions FILE and --annotations FILE")
    path = _one(options)
    questions = _load_json(options.questions).get("questions", [])
    annotations = {a.get("question_id"): a for a in _load_json(path).get("annotations", [])}
    result = Imported(strict=options.strict)
    finder = ImageFinder(options.images)
    split = _split_from_name(options.questions)
    for i, question in enumerate(questions):
        where = f"{options.questions}: questions[{i}]"
        annotation = annotations.get(question.get("question_id"))
        if not isinstance(question.get("question"), str) or annotation is None:
            result.skip(where, "no question text, or no annotation for its question_id")
            continue
        answers = [a.get("answer", "") for a in annotation.get("answers", [])]
        if not answers:
            result.skip(where, "its annotation has no answers")
            continue
        found = finder.by_coco_id(question.get("image_id", -1))
        if found is None:
            result.skip(where, f"image {question.get('image_id')} not found under {options.images}")
            continue
        example = {
            "image": found,
            "question": question["question"],
            "answer": Counter(answers).most_common(1)[0][0],
            "answers": answers,
            "type": annotation.get("answer_type", "other"),
            "question_id": question["question_id"],
        }
        result.add(split, example)
    return result


def _table(options: ImportOptions, delimiter: str) -> Imported:
    path = _one(options)
    root = options.images or path.parent
    result = Imported(strict=options.strict)
    try:
        handle = path.open(newline="", encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    with handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        missing = {options.image_column, options.text_column} - set(reader.fieldnames or [])
        if missing:
            raise DataError(
                f"{path}: no column(s) {', '.join(sorted(missing))}; it has "
                f"{', '.join(reader.fieldnames or [])} (choose with --image-column/--text-column)"
            )
        for row in reader:
            where = f"{path}:{reader.line_num}"
            image, text = row.get(options.image_column), row.get(options.text_column)
            if not image or not text or not text.strip():
                result.skip(where, "empty image or text")
                continue
            found = root / image
            if not found.is_file():
                result.skip(where, f"image {found} not found")
                continue
            result.add(NO_SPLIT, {"image": found, "caption": text.strip()})
    _merge_captions_per_image(result)
    return result


def _merge_captions_per_image(result: Imported) -> None:
    """Several rows of one image become one example with all its captions."""
    for split, examples in result.splits.items():
        by_image: dict[Path, list[str]] = {}
        for example in examples:
            by_image.setdefault(example["image"], []).append(example["caption"])
        result.splits[split] = [{"image": p, "captions": c} for p, c in by_image.items()]


@IMPORTERS.register("csv")
def import_csv(options: ImportOptions) -> Imported:
    return _table(options, ",")


@IMPORTERS.register("tsv")
def import_tsv(options: ImportOptions) -> Imported:
    return _table(options, "\t")


@IMPORTERS.register("hf")
def import_hf(options: ImportOptions) -> Imported:
    """A Hugging Face `datasets` dataset (hub name or a folder saved with `save_to_disk`).
    Its images live inside the dataset, so they are written out as PNG files under
    DIR/images/."""
    try:
        import datasets
    except ImportError:
        raise ImportError("the hf format needs: pip install datasets") from None
    source = str(_one(options, "--annotations (the dataset name or folder)"))
    loaded = (
        datasets.load_from_disk(source) if Path(source).is_dir() else datasets.load_dataset(source)
    )
    splits = loaded if isinstance(loaded, datasets.DatasetDict) else {NO_SPLIT: loaded}
    result = Imported(strict=options.strict)
    images = options.out / "images"
    images.mkdir(parents=True, exist_ok=True)
    for split, table in splits.items():
        if options.split and split != options.split:
            continue
        name = {"validation": "val"}.get(split, split)
        for i, row in enumerate(table):
            where = f"{source}[{split}][{i}]"
            image, text = row.get(options.image_column), row.get(options.text_column)
            texts = [text] if isinstance(text, str) else text
            if image is None or not texts or not all(isinstance(t, str) for t in texts):
                result.skip(where, f"needs '{options.image_column}' and '{options.text_column}'")
                continue
            path = images / f"{name}_{i:07d}.png"
            image.convert("RGB").save(path)
            result.add(name, {"image": path, "captions": [t.strip() for t in texts]})
    return result


# -- writing -----------------------------------------------------------------------------------
def _portable(path: Path, out: Path, copy_to: Path | None) -> str:
    if copy_to is not None and not path.resolve().is_relative_to(out.resolve()):
        target = copy_to / path.name
        if not target.exists():
            shutil.copy2(path, target)
        path = target
    return Path(os.path.relpath(path.resolve(), out.resolve())).as_posix()


def write_splits(
    imported: Imported, out: Path, copy_images: bool = False
) -> Iterator[tuple[Path, int]]:
    """Write `out/<split>.jsonl` for each split; yields (file, examples)."""
    out.mkdir(parents=True, exist_ok=True)
    copy_to = out / "images" if copy_images else None
    if copy_to is not None:
        copy_to.mkdir(exist_ok=True)
    for split, examples in sorted(imported.splits.items()):
        path = out / f"{split}.jsonl"
        with path.open("w") as handle:
            for example in examples:
                line = {**example, "image": _portable(example["image"], out, copy_to)}
                handle.write(json.dumps(line) + "\n")
        yield path, len(examples)


def import_dataset(
    format_name: str, options: ImportOptions, copy_images: bool = False
) -> tuple[list[tuple[Path, int]], list[str]]:
    """Run importer `format_name` and write its splits to `options.out`: the files written
    and the records skipped, each with its reason."""
    imported = IMPORTERS.get(format_name)(options)
    if not imported.splits:
        skipped = len(imported.skipped)
        raise DataError(f"{format_name}: no example could be imported ({skipped} skipped)")
    return list(write_splits(imported, options.out, copy_images)), imported.skipped


def outside_image_root(files: list[Path]) -> Path | None:
    """The folder to allow (`--image-root`) for the written files' images that lie outside
    their own folder — the deepest one holding them all — or None if all lie inside."""
    outside = []
    for path in files:
        with path.open() as lines:
            for number, line in enumerate(lines, start=1):
                written = json.loads(line)["image"]
                try:
                    safe_image_path(written, path.parent, (), f"{path}:{number}")
                except ImagePathRefused:
                    outside.append(str((path.parent / written).resolve().parent))
    return Path(os.path.commonpath(outside)) if outside else None
