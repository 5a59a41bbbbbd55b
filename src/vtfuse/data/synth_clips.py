"""Built-in synthetic video clips: a few shapes on a plain background, one or two of which move a
few pixels per frame (left, right, up or down), with motion questions ("Which way does the red
circle move?" → left), captions ("the red circle moves left.") and true/false statements —
deterministic for a seed. `vtfuse synth --clips N` writes them.

A mover's path is centred on a uniformly drawn point whatever its direction, so no single frame
tells which way it goes (near an edge it hints at the axis): a model must compare frames.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from vtfuse.data.clips import write_video
from vtfuse.data.synth import (
    COLOURS,
    SceneObject,
    SplitFiles,
    check_shapes,
    render,
    split_of,
)
from vtfuse.tasks import CAPTION, CLASSIFY, RETRIEVAL, VQA

DIRECTIONS: dict[str, tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}


@dataclass(frozen=True)
class ClipSpec:
    clips: int = 1500
    seed: int = 0
    size: int = 72
    length: int = 8  # frames per clip
    min_objects: int = 2
    max_objects: int = 3
    max_movers: int = 2  # each clip has 1 to max_movers moving objects
    # of the side per frame (±20 %): 4 px at 72 px, an 8 px token between the frames a 4-frame
    # model samples of 8 (at half that speed, 6-minute models barely learned the direction)
    speed: float = 1 / 18
    shapes: tuple[str, ...] = ("square", "circle")
    video: bool = False  # write each clip as an .mp4 (needs PyAV) instead of a frame folder


@dataclass(frozen=True)
class Mover:
    """One object of a clip: where its path is centred, and how it moves ("" = stays still)."""

    colour: str
    shape: str
    center: tuple[float, float]  # the middle of its path
    radius: float
    direction: str = ""
    speed: float = 0.0  # pixels per frame

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    def at(self, frame: int, length: int) -> SceneObject:
        """Where it is in `frame` of `length`, as something `render` draws."""
        dx, dy = DIRECTIONS.get(self.direction, (0, 0))
        step = (frame - (length - 1) / 2) * self.speed
        x, y = self.center[0] + dx * step, self.center[1] + dy * step
        return SceneObject(self.colour, self.shape, 0, 0, (x, y), self.radius)

    def sweep(self, length: int, margin: float = 2.0) -> tuple[float, float, float, float]:
        """The box its whole path covers, grown by `margin`."""
        first, last = self.at(0, length).center, self.at(length - 1, length).center
        r = self.radius + margin
        return (
            min(first[0], last[0]) - r,
            min(first[1], last[1]) - r,
            max(first[0], last[0]) + r,
            max(first[1], last[1]) + r,
        )


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def sample_clip(rng: random.Random, spec: ClipSpec) -> list[Mover]:
    """Objects of distinct colours whose paths do not cross; 1 to `max_movers` of them move."""
    count = rng.randint(spec.min_objects, spec.max_objects)
    moving = rng.randint(1, min(spec.max_movers, count))
    while True:  # a crowded draw starts again (rare at the default sizes)
        placed: list[Mover] = []
        for index, colour in enumerate(rng.sample(list(COLOURS), count)):
            radius = spec.size * rng.uniform(0.09, 0.12)
            direction = rng.choice(list(DIRECTIONS)) if index < moving else ""
            speed = spec.size * spec.speed * rng.uniform(0.8, 1.2) if direction else 0.0
            travel = speed * (spec.length - 1) / 2  # from the path's centre to either end
            dx, dy = DIRECTIONS.get(direction, (0, 0))
            for _ in range(100):
                x = rng.uniform(radius + abs(dx) * travel, spec.size - radius - abs(dx) * travel)
                y = rng.uniform(radius + abs(dy) * travel, spec.size - radius - abs(dy) * travel)
                mover = Mover(colour, rng.choice(spec.shapes), (x, y), radius, direction, speed)
                box = mover.sweep(spec.length)
                if not any(_overlap(box, other.sweep(spec.length)) for other in placed):
                    placed.append(mover)
                    break
            else:
                break
        if len(placed) == count:
            rng.shuffle(placed)
            return placed


def frames_of(movers: list[Mover], spec: ClipSpec) -> list[Image.Image]:
    return [render([m.at(t, spec.length) for m in movers], spec.size) for t in range(spec.length)]


def _motion(direction: str) -> str:
    return f"moves {direction}" if direction else "stays still"


def clip_captions(movers: list[Mover]) -> list[str]:
    """What moves ("the red circle moves left."), and, where something stays still, a second
    phrasing that says so too."""
    moving = [f"the {m.name} {_motion(m.direction)}" for m in movers if m.direction]
    captions = [" and ".join(moving) + "."]
    if len(moving) < len(movers):
        everything = [f"the {m.name} {_motion(m.direction)}" for m in movers]
        captions.append(", ".join(everything[:-1]) + f" and {everything[-1]}.")
    return captions


def motion_questions(movers: list[Mover], rng: random.Random) -> list[dict]:
    """ "Which way does X move?" for every mover (type "direction"), and one "Does X move?"
    (type "moving"), its answer yes or no with equal chance where the clip allows."""
    lines = [
        {
            "question": f"Which way does the {m.name} move?",
            "answer": m.direction,
            "type": "direction",
        }
        for m in movers
        if m.direction
    ]
    still = [m for m in movers if not m.direction]
    pool = still if still and rng.random() < 0.5 else [m for m in movers if m.direction]
    subject = rng.choice(pool)
    answer = "yes" if subject.direction else "no"
    lines.append({"question": f"Does the {subject.name} move?", "answer": answer, "type": "moving"})
    return lines


def motion_statements(movers: list[Mover], rng: random.Random) -> list[dict]:
    """Statements about how objects move, true or false with equal chance."""
    pairs = []
    for mover in rng.sample(movers, min(2, len(movers))):
        true = rng.random() < 0.5
        motions = ["", *DIRECTIONS]
        said = mover.direction if true else rng.choice([d for d in motions if d != mover.direction])
        text = f"the {mover.name} {_motion(said)}."
        pairs.append({"text": text, "label": "true" if true else "false"})
    return pairs


def generate_clips(
    out: str | Path, spec: ClipSpec = ClipSpec(), progress: bool = True
) -> dict[str, int]:
    """Write clips (frame folders `clips/NNNNNN/TT.png`, or `clips/NNNNNN.mp4` with `video`) and
    `{task}_{split}.jsonl` for the caption, VQA, retrieval and classify tasks; return counts."""
    if not 1 <= spec.min_objects <= spec.max_objects <= len(COLOURS):
        raise ValueError(f"objects per clip must satisfy 1 <= min <= max <= {len(COLOURS)}")
    if spec.length < 2:
        raise ValueError(f"a clip needs at least 2 frames to show motion, got {spec.length}")
    if spec.video and spec.size % 2:
        raise ValueError(f"--video needs an even --size (MPEG-4 frames), got {spec.size}")
    check_shapes(spec.shapes)
    out = Path(out)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    rng = random.Random(spec.seed)
    with SplitFiles(out) as files:
        for i in tqdm(range(spec.clips), desc="synth clips", unit="clip", disable=not progress):
            movers = sample_clip(rng, spec)
            frames = frames_of(movers, spec)
            if spec.video:
                name = f"clips/{i:06d}.mp4"
                write_video(out / name, frames)
                visual: dict = {"video": name}
            else:
                (out / f"clips/{i:06d}").mkdir(exist_ok=True)
                names = [f"clips/{i:06d}/{t:02d}.png" for t in range(spec.length)]
                for frame, frame_name in zip(frames, names, strict=True):
                    frame.save(out / frame_name)
                visual = {"frames": names}
            motion = [
                {"colour": m.colour, "shape": m.shape, "motion": _motion(m.direction)}
                for m in movers
            ]
            described = clip_captions(movers)
            lines = {
                CAPTION.name: [{**visual, "captions": described, "motion": motion}],
                RETRIEVAL.name: [{**visual, "captions": described}],
                CLASSIFY.name: [{**visual, **pair} for pair in motion_statements(movers, rng)],
                VQA.name: [{**visual, **q} for q in motion_questions(movers, rng)],
            }
            files.write(split_of(i, spec.clips), lines)
    return files.counts
