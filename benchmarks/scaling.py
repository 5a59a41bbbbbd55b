"""Cost curves of vtfuse's captioner: how the training step and caption decoding grow with the
number of image tokens, the caption length and the batch size, for `cross_attention` fusion and
the `resampler` (16 latents).

    python benchmarks/scaling.py                     # 7 repeats per point
    python benchmarks/scaling.py --quick             # 3 repeats per point: a minute or two
    python benchmarks/scaling.py --out DIR           # scaling.png/.json/.csv (default results/)

The model is fixed and small (hidden 256, 4 decoder layers of self-attention → fusion → MLP,
4 heads, vocabulary 1000, random weights); the vision encoder is a ViT with patch 8 and depth 0
(`--vision-depth` to add layers): only the patch embedding, so the image-token axis (16, 64,
256, 1024 tokens from 32, 64, 128, 256 px images) measures the fusion's cost, not a ViT's.
Axes, each varied from the base point (64 image tokens, 24-token captions, batch 8):

    image tokens 16, 64, 256, 1024    caption length 8, 16, 32, 64    batch 1, 8, 32

Training: one step (forward, backward, AdamW with vtfuse's `make_optimizer`) on random tokens of
the caption length; reported in ms/step. Decoding: greedy decoding's loop (`model.start` then one
`model.step` per token, argmax fed back, exactly caption-length tokens), timed in parts: the
image encoding (`start`) apart, and the decoding after it in ms per caption, split into its
first step (which fills the cross-attention K/V cache — and, for the resampler, resamples the
image into the latents) and the later steps (ms per token per caption). Each figure is the
median over the repeats after warm-up; within an axis every (point, fusion) runs once per
repeat, in turn, so a shared machine's changing load falls on all points alike. Printed last:
each fusion's cost at 1024 image tokens over its cost at 16 (decoding, its later steps alone,
training) — the resampler's text reads 16 latents whatever the image's size, so its later
decoding steps should stay flat while cross-attention's grow.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from vtfuse.config import FusionConfig, ModelConfig, TextConfig, TrainConfig, VisionConfig
from vtfuse.models.factory import create_model
from vtfuse.training.optim import make_optimizer

FUSIONS = ("cross_attention", "resampler")
HIDDEN, LAYERS, HEADS, VOCAB, PATCH, LATENTS = 256, 4, 4, 1000, 8, 16
IMAGE_SIZES = (32, 64, 128, 256)  # → (size / 8)² = 16, 64, 256, 1024 image tokens
CAPTION_LENGTHS = (8, 16, 32, 64)
BATCHES = (1, 8, 32)


@dataclass(frozen=True)
class Point:
    image_size: int = 64
    caption: int = 24  # tokens trained on, and generated
    batch: int = 8

    @property
    def image_tokens(self) -> int:
        return (self.image_size // PATCH) ** 2


BASE = Point()
AXES: dict[str, tuple[str, list[Point]]] = {
    "image_tokens": ("image tokens", [Point(image_size=s) for s in IMAGE_SIZES]),
    "caption_length": ("caption length (tokens)", [Point(caption=n) for n in CAPTION_LENGTHS]),
    "batch": ("batch size", [Point(batch=b) for b in BATCHES]),
}


def axis_value(axis: str, point: Point) -> int:
    return {
        "image_tokens": point.image_tokens,
        "caption_length": point.caption,
        "batch": point.batch,
    }[axis]


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build(fusion: str, point: Point, vision_depth: int, dev: torch.device):
    config = ModelConfig(
        task="caption",
        vision=VisionConfig(
            name="vit",
            image_size=point.image_size,
            patch_size=PATCH,
            dim=HIDDEN,
            depth=vision_depth,
            heads=HEADS,
        ),
        text=TextConfig(
            vocab_size=VOCAB,
            dim=HIDDEN,
            depth=LAYERS,
            heads=HEADS,
            max_length=max(CAPTION_LENGTHS) + 8,
        ),
        fusion=FusionConfig(name=fusion, latents=LATENTS),
    )
    torch.manual_seed(0)
    return create_model(config).to(dev)


def inputs(point: Point, dev: torch.device) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(point.batch * 1000 + point.caption)
    shape = (point.batch, 3, point.image_size, point.image_size)
    images = torch.randint(0, 256, shape, generator=generator).to(torch.uint8)
    tokens = torch.randint(3, VOCAB, (point.batch, point.caption + 1), generator=generator)
    tokens[:, 0] = 1  # <bos>; the caption's tokens are the targets
    return {"images": images.to(dev), "tokens": tokens.to(dev)}


def training_job(model, data) -> Callable[[], dict[str, float]]:
    optimizer = make_optimizer(model, TrainConfig(lr=1e-4))

    def step() -> dict[str, float]:
        model.train()
        synchronize()
        start = time.perf_counter()
        model.training_loss(data).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize()
        return {"train": time.perf_counter() - start}

    return step


def decoding_job(model, data, steps: int) -> Callable[[], dict[str, float]]:
    """vtfuse.generation.greedy's loop with exactly `steps` tokens, its parts timed apart."""
    images = data["images"]

    def decode() -> dict[str, float]:
        model.eval()
        with torch.inference_mode():
            synchronize()
            start = time.perf_counter()
            image, caches = model.start(images)
            synchronize()
            encoded = time.perf_counter()
            current = torch.full((images.shape[0], 1), 1, dtype=torch.long, device=images.device)
            first = encoded
            for i in range(steps):
                logits, _ = model.step(current, image, caches)
                current = logits.argmax(-1, keepdim=True)
                if i == 0:
                    synchronize()
                    first = time.perf_counter()
            synchronize()
            end = time.perf_counter()
        return {
            "encode": encoded - start,
            "decode": end - encoded,
            "first_step": first - encoded,
            "later_steps": end - first,
        }

    return decode


def measure(
    points: list[Point], args, dev: torch.device
) -> dict[Point, dict[str, dict[str, float]]]:
    """Per point and fusion: the median seconds of each timed part. All the axis's models are
    built first and, after their warm-up, run in turn once per repeat, so a load that comes and
    goes on a shared machine falls on every point alike instead of bending the curve."""
    jobs = {}
    for point in points:
        data = inputs(point, dev)
        for fusion in FUSIONS:
            model = build(fusion, point, args.vision_depth, dev)
            jobs[point, fusion] = (
                training_job(model, data),
                decoding_job(model, data, point.caption),
            )
    for train, decode in jobs.values():
        for _ in range(args.warmup):
            train(), decode()
    samples: dict[tuple[Point, str], list[dict[str, float]]] = {key: [] for key in jobs}
    for _ in range(args.repeats):
        for key, (train, decode) in jobs.items():
            samples[key].append({**train(), **decode()})
    medians: dict[Point, dict[str, dict[str, float]]] = {point: {} for point in points}
    for (point, fusion), runs in samples.items():
        medians[point][fusion] = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
    return medians


def row(axis: str, point: Point, fusion: str, seconds: dict[str, float]) -> dict:
    batch = point.batch
    return {
        "axis": axis,
        "value": axis_value(axis, point),
        "fusion": fusion,
        "image_tokens": point.image_tokens,
        "image_size": point.image_size,
        "caption_tokens": point.caption,
        "batch": batch,
        "train_ms_per_step": 1000 * seconds["train"],
        "train_samples_per_s": batch / seconds["train"],
        "encode_ms_per_image": 1000 * seconds["encode"] / batch,
        "decode_ms_per_caption": 1000 * seconds["decode"] / batch,
        "first_step_ms_per_caption": 1000 * seconds["first_step"] / batch,
        "later_step_ms_per_token": (
            1000 * seconds["later_steps"] / batch / max(1, point.caption - 1)
        ),
    }


COLUMNS = (
    ("train_ms_per_step", "train ms/step"),
    ("encode_ms_per_image", "encode ms/img"),
    ("decode_ms_per_caption", "decode ms/caption"),
    ("first_step_ms_per_caption", "1st step ms/cap"),
    ("later_step_ms_per_token", "later ms/token"),
)


def print_table(axis: str, rows: list[dict]) -> None:
    label = AXES[axis][0]
    header = f"  {label:>24s}  {'fusion':15s}" + "".join(f"{name:>19s}" for _, name in COLUMNS)
    print(header)
    for r in rows:
        cells = "".join(f"{r[key]:19.3f}" for key, _ in COLUMNS)
        print(f"  {r['value']:>24d}  {r['fusion']:15s}{cells}")


def ratios(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per fusion, each cost at 1024 image tokens over the cost at 16 (others at the base)."""
    by_tokens = {(r["fusion"], r["image_tokens"]): r for r in rows if r["axis"] == "image_tokens"}
    low, high = (Point(image_size=s).image_tokens for s in (IMAGE_SIZES[0], IMAGE_SIZES[-1]))
    keys = ("decode_ms_per_caption", "later_step_ms_per_token", "train_ms_per_step")
    return {
        fusion: {key: by_tokens[fusion, high][key] / by_tokens[fusion, low][key] for key in keys}
        for fusion in FUSIONS
    }


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"cross_attention": "tab:blue", "resampler": "tab:orange"}
    figure, panels = plt.subplots(1, len(AXES), figsize=(5 * len(AXES), 4.2))
    for panel, (axis, (label, points)) in zip(panels, AXES.items(), strict=True):
        for fusion in FUSIONS:
            mine = [r for r in rows if r["axis"] == axis and r["fusion"] == fusion]
            xs = [r["value"] for r in mine]
            panel.plot(
                xs,
                [r["train_ms_per_step"] for r in mine],
                "o-",
                color=colours[fusion],
                label=f"{fusion}: training ms/step",
            )
            panel.plot(
                xs,
                [r["decode_ms_per_caption"] for r in mine],
                "s--",
                color=colours[fusion],
                label=f"{fusion}: decoding ms/caption",
            )
        panel.set_xscale("log", base=2)
        panel.set_yscale("log")
        panel.set_xticks([axis_value(axis, p) for p in points])
        panel.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        panel.minorticks_off()
        panel.set_xlabel(label)
        panel.set_ylabel("ms (log scale)")
        panel.grid(True, which="major", alpha=0.3)
        panel.set_title(f"by {label}")
    panels[0].legend(fontsize=7, loc="upper left")
    figure.suptitle(textwrap.fill(title, 150), fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats, 1 warm-up per point")
    parser.add_argument("--repeats", type=int, help="timed runs per point (median); 7, quick 3")
    parser.add_argument("--warmup", type=int, help="untimed runs per point first; 2, quick 1")
    parser.add_argument("--vision-depth", type=int, default=0, help="ViT layers (0: patches only)")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results", help="output folder"
    )
    args = parser.parse_args()
    if args.repeats is None:
        args.repeats = 3 if args.quick else 7
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be at least 1 and --warmup at least 0")
    dev = device()
    setting = (
        f"hidden {HIDDEN}, {LAYERS} decoder layers, {HEADS} heads, vocab {VOCAB}, ViT patch "
        f"{PATCH} depth {args.vision_depth}, resampler {LATENTS} latents; base point: "
        f"{BASE.image_tokens} image tokens, {BASE.caption}-token captions, batch {BASE.batch}"
    )
    print(f"device {dev}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(setting)
    print(f"median of {args.repeats} repeats after {args.warmup} warm-up(s)\n")

    # the process's first runs are slow (allocator, thread pool): spend them on the base point
    measure([BASE], argparse.Namespace(**{**vars(args), "repeats": 1}), dev)
    rows = []
    for axis, (label, points) in AXES.items():
        print(f"by {label}:", flush=True)
        measured = measure(points, args, dev)
        mine = [row(axis, p, f, measured[p][f]) for p in points for f in FUSIONS]
        print_table(axis, mine)
        print(flush=True)
        rows += mine

    found = ratios(rows)
    low, high = Point(image_size=IMAGE_SIZES[0]), Point(image_size=IMAGE_SIZES[-1])
    print(f"cost at {high.image_tokens} image tokens / cost at {low.image_tokens}:")
    print(f"  {'fusion':15s} {'decoding':>10s} {'later steps':>12s} {'training':>10s}")
    for fusion, r in found.items():
        print(
            f"  {fusion:15s} {r['decode_ms_per_caption']:9.2f}x "
            f"{r['later_step_ms_per_token']:11.2f}x {r['train_ms_per_step']:9.2f}x"
        )
    at_high = {
        r["fusion"]: r
        for r in rows
        if r["axis"] == "image_tokens" and r["value"] == high.image_tokens
    }
    versus = (
        at_high["cross_attention"]["decode_ms_per_caption"]
        / at_high["resampler"]["decode_ms_per_caption"]
    )
    print(
        f"decoding at {high.image_tokens} image tokens, cross_attention / resampler: {versus:.2f}x"
    )

    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "setting": setting,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "rows": rows,
        "ratio_1024_over_16": found,
        "decode_1024_cross_attention_over_resampler": versus,
    }
    (args.out / "scaling.json").write_text(json.dumps(report, indent=2) + "\n")
    with (args.out / "scaling.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args.out / "scaling.png", f"vtfuse captioner cost curves ({dev}): {setting}")
    print(f"wrote {args.out / 'scaling.png'}, scaling.json, scaling.csv")


if __name__ == "__main__":
    main()
