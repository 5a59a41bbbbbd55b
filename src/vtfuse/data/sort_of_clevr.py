"""Sort-of-CLEVR as the paper specifies it (Santoro et al. 2017, §5.3 and Appendix D), written
apart from vtfuse's own scenes (`vtfuse.data.synth`) so that learning can be measured on data
the library's defaults were not shaped on.

Each 75 × 75 image holds 6 objects, one of each colour (red, green, blue, orange, gray,
yellow), each a square or a circle, placed anywhere on the canvas without overlapping: no
grid, no cells. Every image gets 10 non-relational questions (the object's shape; is it on the
left or the right; at the top or the bottom) and 10 relational ones (the shape of the object
closest to it; furthest from it; how many objects share its shape), each asked in one of
several English phrasings. Answers follow the paper's geometry exactly: left/right is the
object's centre against the image's middle, distances are between centres, and no
near-ambiguous question is dropped.

One caption an image lists every object's colour, shape and place on a 3 × 3 grid of place
words ("a gray square at the top left, ..."), objects in reading order; the scene's objects
ride along for `object_f1`.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm import tqdm

from vtfuse.data.synth import article

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 200, 0),
    "blue": (0, 0, 255),
    "orange": (255, 156, 0),
    "gray": (128, 128, 128),
    "yellow": (255, 230, 0),
}
SHAPES = ("square", "circle")

# Several phrasings per question kind; {c} is the colour. The answers never appear in them.
PHRASINGS: dict[str, tuple[str, ...]] = {
    "shape": (
        "what is the shape of the {c} object?",
        "what shape is the {c} thing?",
        "is the {c} object a circle or a square?",
        "tell me the shape of the {c} item.",
    ),
    "horizontal": (
        "is the {c} object on the left or the right of the image?",
        "which side of the picture is the {c} shape on?",
        "is the {c} item in the left half or the right half?",
    ),
    "vertical": (
        "is the {c} object at the top or the bottom of the image?",
        "is the {c} shape in the upper or the lower half of the picture?",
        "which half, top or bottom, holds the {c} item?",
    ),
    "closest": (
        "what is the shape of the object closest to the {c} object?",
        "which shape is nearest to the {c} thing?",
        "the object nearest the {c} one: circle or square?",
    ),
    "furthest": (
        "what is the shape of the object furthest from the {c} object?",
        "which shape is farthest away from the {c} thing?",
        "the object most distant from the {c} one: circle or square?",
    ),
    "count": (
        "how many objects have the same shape as the {c} object?",
        "how many things share the shape of the {c} one?",
        "count the objects shaped like the {c} item.",
    ),
}
NON_RELATIONAL = ("shape", "horizontal", "vertical")
RELATIONAL = ("closest", "furthest", "count")


@dataclass(frozen=True)
class Shape:
    colour: str
    shape: str
    x: float  # centre, pixels
    y: float
    half: float  # half side of a square, radius of a circle

    @property
    def box(self) -> list[float]:
        return [
            round(v, 1)
            for v in (
                self.x - self.half,
                self.y - self.half,
                self.x + self.half,
                self.y + self.half,
            )
        ]

    def place(self, size: int) -> str:
        """The 3 × 3 place words of the centre: "top left", "middle center", ... ."""
        rows, cols = ("top", "middle", "bottom"), ("left", "center", "right")
        return f"{rows[min(int(3 * self.y / size), 2)]} {cols[min(int(3 * self.x / size), 2)]}"


@dataclass(frozen=True)
class SortOfClevrSpec:
    train: int = 9800  # images (the paper's training set)
    val: int = 200
    test: int = 200
    seed: int = 0
    size: int = 75  # pixels a side
    half: float = 5.0  # object half-size (squares 10 × 10, circles of radius 5)
    questions_per_kind: int = 10  # per image: this many non-relational and relational each


def sample_scene(rng: random.Random, spec: SortOfClevrSpec) -> list[Shape]:
    """Six objects, one per colour, centres at least 3 half-sizes apart and inside the canvas."""
    objects: list[Shape] = []
    low, high = spec.half + 1, spec.size - spec.half - 2
    for colour in COLOURS:
        while True:
            x, y = rng.uniform(low, high), rng.uniform(low, high)
            if all(math.dist((x, y), (o.x, o.y)) > 3 * spec.half for o in objects):
                break
        objects.append(Shape(colour, rng.choice(SHAPES), x, y, spec.half))
    return objects


def render(objects: list[Shape], size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for o in objects:
        box = [o.x - o.half, o.y - o.half, o.x + o.half, o.y + o.half]
        if o.shape == "square":
            draw.rectangle(box, fill=COLOURS[o.colour])
        else:
            draw.ellipse(box, fill=COLOURS[o.colour])
    return image


def answer(kind: str, subject: Shape, objects: list[Shape], size: int) -> str:
    others = sorted(
        (o for o in objects if o is not subject),
        key=lambda o: math.dist((o.x, o.y), (subject.x, subject.y)),
    )
    if kind == "shape":
        return subject.shape
    if kind == "horizontal":
        return "left" if subject.x < size / 2 else "right"
    if kind == "vertical":
        return "top" if subject.y < size / 2 else "bottom"
    if kind == "closest":
        return others[0].shape
    if kind == "furthest":
        return others[-1].shape
    return str(sum(o.shape == subject.shape for o in objects))  # count


def questions(objects: list[Shape], rng: random.Random, spec: SortOfClevrSpec) -> list[dict]:
    lines = []
    for group, kinds in (("non-relational", NON_RELATIONAL), ("relational", RELATIONAL)):
        for _ in range(spec.questions_per_kind):
            subject, kind = rng.choice(objects), rng.choice(kinds)
            question = rng.choice(PHRASINGS[kind]).format(c=subject.colour)
            lines.append(
                {
                    "question": question,
                    "answer": answer(kind, subject, objects, spec.size),
                    "type": group,
                    "kind": kind,
                    "boxes": [{"label": subject.colour, "box": subject.box}],
                }
            )
    return lines


def caption(objects: list[Shape], size: int) -> str:
    """Every object, in reading order (by row of place, then x)."""
    rows = {"top": 0, "middle": 1, "bottom": 2}
    placed = sorted(
        ((o.place(size), o) for o in objects), key=lambda p: (rows[p[0].split()[0]], p[1].x)
    )
    return (
        ", ".join(f"{article(o.colour)} {o.colour} {o.shape} at the {place}" for place, o in placed)
        + "."
    )


def generate(
    out: str | Path, spec: SortOfClevrSpec = SortOfClevrSpec(), progress: bool = True
) -> dict[str, int]:
    """Write `images/` and `{vqa,caption}_{train,val,test}.jsonl` into `out`; return counts."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(spec.seed)
    counts: dict[str, int] = {}
    splits = (("train", spec.train), ("val", spec.val), ("test", spec.test))
    total = spec.train + spec.val + spec.test
    bar = tqdm(total=total, desc="sort-of-clevr", unit="img", disable=not progress)
    index = 0
    for split, images in splits:
        with (
            (out / f"vqa_{split}.jsonl").open("w") as vqa,
            (out / f"caption_{split}.jsonl").open("w") as captions,
        ):
            for _ in range(images):
                objects = sample_scene(rng, spec)
                name = f"images/{index:06d}.png"
                render(objects, spec.size).save(out / name)
                facts = [
                    {"colour": o.colour, "shape": o.shape, "position": o.place(spec.size)}
                    for o in objects
                ]
                boxes = [{"label": o.colour, "box": o.box} for o in objects]
                captions.write(
                    json.dumps(
                        {
                            "image": name,
                            "caption": caption(objects, spec.size),
                            "objects": facts,
                            "boxes": boxes,
                        }
                    )
                    + "\n"
                )
                for line in questions(objects, rng, spec):
                    vqa.write(json.dumps({"image": name, **line}) + "\n")
                counts[f"vqa_{split}"] = counts.get(f"vqa_{split}", 0) + 2 * spec.questions_per_kind
                counts[f"caption_{split}"] = counts.get(f"caption_{split}", 0) + 1
                index += 1
                bar.update()
    bar.close()
    return counts
