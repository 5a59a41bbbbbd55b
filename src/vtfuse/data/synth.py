"""Built-in synthetic data: Sort-of-CLEVR-like scenes (Santoro et al. 2017, §5.3) with captions,
relational and non-relational questions, and object boxes — deterministic for a seed.

Each scene puts distinct-coloured shapes in distinct cells of a 3 × 3 grid (with jitter), so
every object has an unambiguous position word. Captions list the objects in reading order.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm import tqdm

from vtfuse.tasks import CAPTION, CLASSIFY, RETRIEVAL, VQA

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (140, 60, 180),
    "orange": (240, 130, 20),
}
SHAPES = ("square", "circle", "triangle")
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "center", "right")
SPLITS = {"train": 0.8, "val": 0.1, "test": 0.1}
TASKS = (CAPTION.name, VQA.name, RETRIEVAL.name, CLASSIFY.name)


def position_name(row: int, col: int) -> str:
    """Grid cell → position words: "top left", "top", "left", "center", ... ."""
    vertical = "" if row == 1 else ROWS[row]
    horizontal = "" if col == 1 else COLUMNS[col]
    return f"{vertical} {horizontal}".strip() or "center"


POSITIONS = tuple(position_name(r, c) for r in range(3) for c in range(3))


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    row: int
    col: int
    center: tuple[float, float]
    radius: float

    @property
    def position(self) -> str:
        return position_name(self.row, self.col)

    @property
    def box(self) -> list[float]:
        x, y = self.center
        return [
            round(x - self.radius, 1),
            round(y - self.radius, 1),
            round(x + self.radius, 1),
            round(y + self.radius, 1),
        ]

    def to_json(self) -> dict:
        return {
            "colour": self.colour,
            "shape": self.shape,
            "position": self.position,
            "box": self.box,
        }


def sample_scene(
    rng: random.Random, size: int, num_objects: int, shapes: tuple[str, ...]
) -> list[SceneObject]:
    cell = size / 3
    cells = rng.sample(range(9), num_objects)
    colours = rng.sample(list(COLOURS), num_objects)
    objects = []
    for index, colour in zip(cells, colours, strict=True):
        row, col = divmod(index, 3)
        radius = cell * rng.uniform(0.24, 0.32)
        slack = cell / 2 - radius - 1
        x = (col + 0.5) * cell + rng.uniform(-slack, slack)
        y = (row + 0.5) * cell + rng.uniform(-slack, slack)
        objects.append(SceneObject(colour, rng.choice(shapes), row, col, (x, y), radius))
    return sorted(objects, key=lambda o: (o.row, o.col))  # reading order


def render(objects: list[SceneObject], size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), (245, 245, 245))
    draw = ImageDraw.Draw(image)
    for obj in objects:
        x, y, r = obj.center[0], obj.center[1], obj.radius
        fill = COLOURS[obj.colour]
        if obj.shape == "square":
            draw.rectangle([x - r, y - r, x + r, y + r], fill=fill)
        elif obj.shape == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
        else:
            draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)
    return image


def article(word: str) -> str:
    """The indefinite article before `word`: "an orange", "a red"."""
    return "an" if word[0] in "aeiou" else "a"


def _place(position: str) -> str:
    return (
        "in the center"
        if position == "center"
        else (f"on the {position}" if position in ("left", "right") else f"at the {position}")
    )


def captions(objects: list[SceneObject]) -> list[str]:
    """Two phrasings of the same facts, objects in reading order."""
    parts = [
        f"{article(obj.colour)} {obj.colour} {obj.shape} {_place(obj.position)}" for obj in objects
    ]
    listed = ", ".join(parts[:-1])
    first = f"{listed} and {parts[-1]}." if listed else f"{parts[-1]}."
    second = "there is " + ", ".join(parts) + "."
    return [first, second]


_CLAUSE = re.compile(r",|\band\b|;|\.")


def parse_caption(
    caption: str,
    colours: Iterable[str] = tuple(COLOURS),
    shapes: Iterable[str] = SHAPES,
) -> set[tuple[str, str, str]]:
    """The (colour, shape, position) facts a caption states; clauses without both a colour and a
    shape state nothing. The position is the clause's row and column words with "middle" and
    "center" left out, as `position_name` writes them ("middle center" → "center")."""
    colours, shapes = set(colours), set(shapes)
    facts = set()
    for clause in _CLAUSE.split(caption.lower()):
        words = clause.split()
        colour = next((w for w in words if w in colours), None)
        shape = next((w for w in words if w in shapes), None)
        if colour is None or shape is None:
            continue
        facts.add((colour, shape, canonical_position(" ".join(words))))
    return facts


def canonical_position(text: str) -> str:
    """Place words → the canonical form: "top left", "left", "center", ... ("at the middle
    center" → "center", "middle right" → "right")."""
    words = text.lower().split()
    vertical = next((w for w in words if w in ("top", "bottom")), "")
    horizontal = next((w for w in words if w in ("left", "right")), "")
    return f"{vertical} {horizontal}".strip() or "center"


def _distance(a: SceneObject, b: SceneObject) -> float:
    return math.dist(a.center, b.center)


def statements(
    objects: list[SceneObject], rng: random.Random, shapes: tuple[str, ...] = SHAPES
) -> list[dict]:
    """Image+text pairs to classify: statements about the scene, true or false with equal
    chance — an object's shape or its place, stated rightly or wrongly. Only the image can
    tell which: a wrong shape is drawn from the shapes the scenes use (`shapes`), so no
    wording is always false (naming a shape no scene has would be)."""
    pairs = []
    for obj in rng.sample(objects, min(2, len(objects))):
        true = rng.random() < 0.5
        if rng.random() < 0.5:
            shape = obj.shape if true else rng.choice([s for s in shapes if s != obj.shape])
            text = f"the {obj.colour} object is a {shape}."
        else:
            place = (
                obj.position if true else rng.choice([p for p in POSITIONS if p != obj.position])
            )
            text = f"the {obj.colour} object is at the {place}."
        box = {"label": obj.colour, "box": obj.box}
        pairs.append({"text": text, "label": "true" if true else "false", "boxes": [box]})
    return pairs


def questions(
    objects: list[SceneObject], rng: random.Random, per_kind: int, size: int
) -> list[dict]:
    """Non-relational and relational questions (Sort-of-CLEVR's kinds), in natural English.

    Questions whose answer would be ambiguous (an object in the middle column asked left or
    right; a nearest/furthest object less than 8 % of the image closer than the runner-up)
    are not asked.
    """
    margin = 0.08 * size
    non_relational, relational = [], []
    for obj in objects:
        c = obj.colour
        non_relational.append((f"What shape is the {c} object?", obj.shape, obj))
        if obj.col != 1:
            answer = "left" if obj.col == 0 else "right"
            non_relational.append((f"Is the {c} object on the left or on the right?", answer, obj))
        if obj.row != 1:
            answer = "top" if obj.row == 0 else "bottom"
            non_relational.append((f"Is the {c} object at the top or at the bottom?", answer, obj))
        others = sorted((o for o in objects if o is not obj), key=lambda o: _distance(obj, o))
        if len(others) >= 2:
            if _distance(obj, others[1]) - _distance(obj, others[0]) > margin:
                relational.append(
                    (f"What shape is the object closest to the {c} object?", others[0].shape, obj)
                )
            if _distance(obj, others[-1]) - _distance(obj, others[-2]) > margin:
                relational.append(
                    (
                        f"What shape is the object furthest from the {c} object?",
                        others[-1].shape,
                        obj,
                    )
                )
        count = sum(o.shape == obj.shape for o in objects)
        relational.append(
            (f"How many objects have the same shape as the {c} object?", str(count), obj)
        )
    chosen = [
        (q, "non-relational")
        for q in rng.sample(non_relational, min(per_kind, len(non_relational)))
    ]
    chosen += [(q, "relational") for q in rng.sample(relational, min(per_kind, len(relational)))]
    return [
        {
            "question": q,
            "answer": a,
            "type": kind,
            "boxes": [{"label": subject.colour, "box": subject.box}],
        }
        for (q, a, subject), kind in chosen
    ]


@dataclass(frozen=True)
class SynthSpec:
    images: int = 3000
    seed: int = 0
    size: int = 72
    min_objects: int = 3
    max_objects: int = 5
    shapes: tuple[str, ...] = ("square", "circle")
    questions_per_kind: int = 5  # per image, for each of non-relational and relational


def split_of(index: int, total: int) -> str:
    cut_train = round(total * SPLITS["train"])
    cut_val = cut_train + round(total * SPLITS["val"])
    return "train" if index < cut_train else "val" if index < cut_val else "test"


def check_shapes(shapes: tuple[str, ...]) -> None:
    unknown = set(shapes) - set(SHAPES)
    if unknown:
        raise ValueError(f"unknown shape(s) {sorted(unknown)}; choose from {SHAPES}")


class SplitFiles:
    """`{task}_{split}.jsonl` in `out`, one open file each; `write(split, lines)` adds one
    scene's (or clip's) lines for every task and counts them in `counts`."""

    def __init__(self, out: Path):
        self.files = {
            (task, split): (out / f"{task}_{split}.jsonl").open("w")
            for task in TASKS
            for split in SPLITS
        }
        self.counts: dict[str, int] = {}

    def write(self, split: str, lines: dict[str, list[dict]]) -> None:
        for task, examples in lines.items():
            for example in examples:
                self.files[task, split].write(json.dumps(example) + "\n")
            key = f"{task}_{split}"
            self.counts[key] = self.counts.get(key, 0) + len(examples)

    def __enter__(self) -> SplitFiles:
        return self

    def __exit__(self, *exception) -> None:
        for handle in self.files.values():
            handle.close()


def generate(
    out: str | Path, spec: SynthSpec = SynthSpec(), progress: bool = True
) -> dict[str, int]:
    """Write images and `{task}_{split}.jsonl` for the caption, VQA and retrieval tasks into
    `out`; return counts."""
    if not 1 <= spec.min_objects <= spec.max_objects <= min(9, len(COLOURS)):
        raise ValueError(
            f"objects per image must satisfy 1 <= min <= max <= {min(9, len(COLOURS))}"
        )
    check_shapes(spec.shapes)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(spec.seed)
    with SplitFiles(out) as files:
        for i in tqdm(range(spec.images), desc="synth", unit="img", disable=not progress):
            objects = sample_scene(
                rng, spec.size, rng.randint(spec.min_objects, spec.max_objects), spec.shapes
            )
            name = f"images/{i:06d}.png"
            render(objects, spec.size).save(out / name)
            scene = {
                "image": name,
                "objects": [o.to_json() for o in objects],
                "boxes": [{"label": o.colour, "box": o.box} for o in objects],
            }
            split = split_of(i, spec.images)
            described = captions(objects)
            lines = {CAPTION.name: [{**scene, "captions": described}]}
            lines[RETRIEVAL.name] = [{"image": name, "captions": described}]
            lines[CLASSIFY.name] = [
                {"image": name, **pair} for pair in statements(objects, rng, spec.shapes)
            ]
            lines[VQA.name] = [
                {"image": name, **q, "objects": scene["objects"]}
                for q in questions(objects, rng, spec.questions_per_kind, spec.size)
            ]
            files.write(split, lines)
    return files.counts
