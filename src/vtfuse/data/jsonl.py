"""The vtfuse dataset format: JSONL, one example a line, read and checked line by line.

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
What a line needs besides its picture is the task's own check (`vtfuse.tasks`); this module
knows pictures, paths and boxes, and reads a file with whichever check it is given.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal


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

    @property
    def visual_as_written(self) -> tuple:
        """What decides `visual`: the paths as written, the folder they are read against and
        the allowed roots. Lines that agree on it show the same picture, checked once."""
        paths = (self.fields.get(name) for name in VISUAL_FIELDS)  # frames: a list of paths
        written = tuple(tuple(path) if isinstance(path, list) else path for path in paths)
        return (self.file.parent, self.roots, written)

    def _checked(self, written: str, what: str) -> Path:
        return safe_image_path(written, self.file.parent, self.roots, self.where, what)

    @property
    def captions(self) -> list[str]:
        if "captions" in self.fields:
            return list(self.fields["captions"])
        return [self.fields["caption"]]


def is_str_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


def check_visual(fields: dict[str, Any]) -> str | None:
    """Exactly one of "image" (a path), "video" (a path) or "frames" (a list of paths)."""
    given = [name for name in VISUAL_FIELDS if name in fields]
    if not given:
        return "missing field 'image' (or 'video', or 'frames')"
    if len(given) > 1:
        return f"give one of 'image', 'video' and 'frames', not {' and '.join(given)}"
    if given == ["frames"]:
        if not is_str_list(fields["frames"]):
            return "field 'frames' must be a non-empty list of path strings"
    elif not isinstance(fields[given[0]], str):
        return f"'{given[0]}' must be a path string"
    return None


def check_boxes(boxes: Any) -> str | None:
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


Check = Callable[[dict[str, Any], bool], str | None]  # task fields, labelled? → problem or None


def read_records(
    path: str | Path, check: Check, labelled: bool = True, roots: Sequence[str | Path] = ()
) -> list[Record]:
    """Read and validate a dataset file, each line's task fields by `check` (a task's: see
    `vtfuse.tasks.read_jsonl`); a bad line raises DataError naming file:line. `roots`: folders
    besides the file's own its images may come from (see safe_image_path)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset file not found: {path}")
    allowed = image_roots(roots)
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
            problem = check_visual(fields) or check(fields, labelled)
            if problem is None and "boxes" in fields:
                problem = check_boxes(fields["boxes"])
            if problem:
                raise DataError(f"{path}:{number}: {problem}")
            records.append(Record(fields, path, number, allowed))
    if not records:
        raise DataError(f"{path}: no examples")
    return records
