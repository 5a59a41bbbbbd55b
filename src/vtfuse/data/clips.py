"""Video clips: frame sampling, and decoding a clip — a video file, a list of frame images or a
folder of them — to uint8 frames.

A clip model reads `vision.frames` frames of every clip, sampled uniformly: the clip's L frames
are cut into that many equal segments and each segment's middle frame is taken (the sampling of
Temporal Segment Networks, Wang et al. 2016). A clip shorter than `frames` has some of its
frames repeated, in order; a still image is a clip of one frame, so a clip model reads it as
`frames` copies of itself. A still-image model (`frames` 1) reads a clip's middle frame.

Frame lists and folders need nothing beyond Pillow; video files are decoded with PyAV
(`pip install "vtfuse[video]"`), which bundles FFmpeg's libraries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from vtfuse.data.images import ImageLoadError, image_to_uint8, load_image

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg")
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
INSTALL_HINT = 'decoding video files needs PyAV: pip install "vtfuse[video]" (or: pip install av)'

Frame = str | Path | Image.Image
Visual = Frame | Sequence[Frame]  # a still image, a video file, a folder of frames, a frame list
# uint8 (count, 3, size, size), or (3, size, size) for count 1; the frames' (width, height)
Decoded = tuple[Tensor, tuple[int, int]]


class VideoLoadError(ImageLoadError):
    """A video file that is missing or cannot be decoded (or PyAV is not installed)."""


def sample_indices(length: int, count: int) -> list[int]:
    """`count` frame indices spread uniformly over a clip of `length` frames: the middle of each
    of `count` equal segments. Non-decreasing; `length` < `count` repeats frames (2 → 4 gives
    0, 0, 1, 1); `length` == `count` takes every frame; `count` 1 takes the middle frame."""
    if length < 1 or count < 1:
        raise ValueError(f"cannot sample {count} frame(s) from a clip of {length}")
    return [min(length - 1, int((i + 0.5) * length / count)) for i in range(count)]


def _shaped(clip: Tensor) -> Tensor:
    """Sampled frames (count, 3, H, W) as a model of `count` frames reads them: a still-image
    model (count 1) reads one (3, H, W)."""
    return clip[0] if len(clip) == 1 else clip


def frame_files(folder: str | Path) -> list[Path]:
    """The frame images of a folder, in name order (zero-padded names keep time order)."""
    folder = Path(folder)
    found = sorted(p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
    if not found:
        raise ImageLoadError(f"no frame images ({', '.join(FRAME_SUFFIXES)}) in folder {folder}")
    return found


def load_frames(frames: Sequence[Frame], size: int, count: int) -> Decoded:
    """A clip given as its frames (paths or PIL images): only the `count` sampled frames are
    decoded (each once) → (Decoded: those frames, the first one's original size)."""
    if not frames:
        raise ImageLoadError("a clip needs at least one frame")
    indices = sample_indices(len(frames), count)
    decoded: dict[int, Image.Image] = {}
    for i in dict.fromkeys(indices):
        frame = frames[i]
        decoded[i] = frame if isinstance(frame, Image.Image) else load_image(frame)
    clip = torch.stack([image_to_uint8(decoded[i], size) for i in indices])
    return _shaped(clip), decoded[indices[0]].size


def load_video(path: str | Path, size: int, count: int) -> Decoded:
    """A video file's first video stream, `count` frames sampled uniformly → (Decoded: those
    frames, their original size). Only the sampled frames are kept, resized as they are
    decoded, so a long video costs time, not memory. The frame count comes from the container
    (or, if it does not say, a first pass); if decoding finds another number (metadata can be
    wrong), the video is read again with indices sampled from the true count."""
    try:
        import av
    except ImportError:
        raise VideoLoadError(f"cannot read video {path}: {INSTALL_HINT}") from None
    path = Path(path)
    if not path.is_file():
        raise VideoLoadError(f"video not found: {path}")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoLoadError(f"video {path} has no video stream")
            length = container.streams.video[0].frames
        if length < 1:
            length = _decode(av, path, [], size).length
        decoded = _decode(av, path, sample_indices(max(length, 1), count), size)
        if decoded.length != length and decoded.length > 0:
            decoded = _decode(av, path, sample_indices(decoded.length, count), size)
    except VideoLoadError:
        raise
    except (av.FFmpegError, OSError, ValueError) as error:
        raise VideoLoadError(f"cannot decode video {path}: {error}") from None
    if decoded.length < 1:
        raise VideoLoadError(f"video {path} has no frames")
    return _shaped(decoded.clip), decoded.frame_size


@dataclass
class _Decoded:
    clip: Tensor  # the frames kept, in the order asked (empty if some were not reached)
    length: int  # frames decoded in all
    frame_size: tuple[int, int] = (0, 0)  # (width, height)


def _decode(av: Any, path: Path, indices: list[int], size: int) -> _Decoded:
    """Decode `path` once, keeping the frames at `indices`, resized to uint8 (3, size, size)."""
    wanted, kept = set(indices), {}
    result = _Decoded(torch.empty(0), 0)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            if result.length in wanted:
                image = frame.to_image()
                result.frame_size = image.size
                kept[result.length] = image_to_uint8(image, size)
            result.length += 1
    if indices and all(i in kept for i in indices):
        result.clip = torch.stack([kept[i] for i in indices])
    return result


def is_still(source: Visual) -> bool:
    """Whether `source` is one still image (not a video file, frame folder or frame list)."""
    if isinstance(source, Image.Image):
        return True
    if isinstance(source, Sequence) and not isinstance(source, str):
        return False
    path = Path(source)
    return not path.is_dir() and path.suffix.lower() not in VIDEO_SUFFIXES


def load_visual(source: Visual, size: int, frames: int = 1) -> Tensor:
    """What a model with `frames` frames per clip reads (see the module's docstring): uint8
    (3, size, size) for `frames` 1, else (frames, 3, size, size). `source`: a still image (path
    or PIL image), a video file (by its suffix: VIDEO_SUFFIXES), a folder of frame images, or a
    list of frames. Paths given here are trusted: no data-folder check (that is for JSONL)."""
    if is_still(source):
        return load_frames([source], size, frames)[0]
    if isinstance(source, Sequence) and not isinstance(source, str):
        return load_frames(list(source), size, frames)[0]
    if Path(source).is_dir():
        return load_frames(frame_files(source), size, frames)[0]
    return load_video(source, size, frames)[0]


def write_video(path: str | Path, frames: Sequence[Image.Image], fps: int = 8) -> Path:
    """Frames (PIL images of one even size) → an MPEG-4 video at `path`, with FFmpeg's own
    `mpeg4` encoder (in every PyAV build, unlike libx264) at a high bit rate: the synthetic
    clips' colours survive. Needs PyAV."""
    try:
        import av
    except ImportError:
        raise VideoLoadError(f"cannot write video {path}: {INSTALL_HINT}") from None
    width, height = frames[0].size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.bit_rate = 4_000_000
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_image(image.convert("RGB"))))
        container.mux(stream.encode())  # flush
    return Path(path)
