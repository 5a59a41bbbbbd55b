"""Inference weights fp32 against bf16 and int8 on trained models: quality held, decoding speed.

    python benchmarks/weights.py --quickstart vtfuse-quickstart [--out FILE.json] [--repeats 5]

Reads a quickstart's output folder (`vtfuse quickstart --out DIR`: its `runs/caption`,
`runs/vqa` and `data/`), and for each weight precision of `vtfuse.quantisation` loads the
models as `--weights P` does and measures:

- quality on the quickstart's test files, as `vtfuse eval --weights P` scores them: CIDEr,
  BLEU-4 and object F1 of the captioner (greedy), accuracy of the VQA model; and how many
  captions are word for word the fp32 model's;
- speed: greedy captioning at batch 1 (one image a call, up to 16 distinct test images, after
  one warm-up) and at batch 32, as medians of `--repeats` alternating rounds, so a busy
  machine slows every precision alike. Speed-ups are fp32 ÷ bf16 (int8) time per image.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from vtfuse.evaluation import EvalOptions, evaluate
from vtfuse.pipeline import Pipeline
from vtfuse.quantisation import WEIGHTS
from vtfuse.tasks import read_jsonl


def quality(folder: Path, weights: str, scratch: Path) -> dict[str, float]:
    options = EvalOptions(progress=False, weights=weights)
    caption = evaluate(
        folder / "runs" / "caption",
        folder / "data" / "caption_test.jsonl",
        options,
        predictions_path=scratch / f"captions_{weights}.jsonl",
    )
    vqa = evaluate(folder / "runs" / "vqa", folder / "data" / "vqa_test.jsonl", options)
    return {
        "caption_cider": caption["cider"],
        "caption_bleu4": caption["bleu4"],
        "caption_object_f1": caption["object_f1"],
        "vqa_accuracy": vqa["accuracy"],
    }


def same_captions(scratch: Path, weights: str) -> float:
    """Share of `weights`' captions that are word for word fp32's."""

    def read(weights: str) -> list[str]:
        path = scratch / f"captions_{weights}.jsonl"
        return [json.loads(line)["prediction"] for line in path.read_text().splitlines()]

    reference = read("fp32")
    return sum(a == b for a, b in zip(read(weights), reference, strict=True)) / len(reference)


def images(folder: Path, count: int, pipe: Pipeline) -> torch.Tensor:
    records = read_jsonl(folder / "data" / "caption_test.jsonl", "caption")
    paths = list(dict.fromkeys(r.image_path for r in records))[:count]
    return pipe.images_to_tensor(paths)


def seconds_per_image(pipe: Pipeline, batch: torch.Tensor, size: int) -> float:
    """One greedy pass over `batch` in chunks of `size` images; seconds per image."""
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(batch), size):
            pipe.generate(batch[i : i + size])
    return (time.perf_counter() - start) / len(batch)


def speed(folder: Path, repeats: int) -> dict[str, dict[str, float]]:
    pipes = {w: Pipeline.load(folder / "runs" / "caption", "cpu", weights=w) for w in WEIGHTS}
    one, many = (images(folder, count, pipes["fp32"]) for count in (17, 64))
    return timings(pipes, one, many, repeats)


def timings(
    pipes: dict[str, Pipeline], one: torch.Tensor, many: torch.Tensor, repeats: int
) -> dict[str, dict[str, float]]:
    """Greedy ms an image of each pipeline at batch 1 (`one[1:]`, one image a call) and 32
    (`many`): medians of `repeats` alternating rounds after a warm-up round (first-call
    allocations are not latency)."""
    for pipe in pipes.values():
        seconds_per_image(pipe, one[:1], 1)
        seconds_per_image(pipe, many[:32], 32)
    times = {name: {"b1": [], "b32": []} for name in pipes}
    for _ in range(repeats):
        for name, pipe in pipes.items():
            times[name]["b1"].append(seconds_per_image(pipe, one[1:], 1))
            times[name]["b32"].append(seconds_per_image(pipe, many, 32))
    return {
        name: {f"ms_per_image_{k}": 1000 * statistics.median(v) for k, v in rows.items()}
        for name, rows in times.items()
    }


def against_fp32(results: dict[str, dict], weights: str, same: float) -> dict[str, float]:
    """What `weights` changes: captions word for word fp32's, relative change of each score,
    speed-ups over fp32."""
    fp32, other = results["fp32"], results[weights]
    return {
        "captions_word_for_word": same,
        **{
            f"{k}_relative_change": other[k] / fp32[k] - 1
            for k in ("caption_cider", "caption_object_f1", "vqa_accuracy")
        },
        **{
            f"speedup_{b}": fp32[f"ms_per_image_{b}"] / other[f"ms_per_image_{b}"]
            for b in ("b1", "b32")
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quickstart", type=Path, required=True, help="a quickstart's --out")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "weights.json"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        scratch = Path(folder)
        results = {w: quality(args.quickstart, w, scratch) for w in WEIGHTS}
        word_for_word = {w: same_captions(scratch, w) for w in WEIGHTS if w != "fp32"}
    timing = speed(args.quickstart, args.repeats)
    for weights in WEIGHTS:
        results[weights] |= timing[weights]
    report = {
        "command": shlex.join(["python", "benchmarks/weights.py", *sys.argv[1:]]),
        "threads": torch.get_num_threads(),
        "results": results,
    }
    for weights, same in word_for_word.items():
        report[f"{weights}_vs_fp32"] = against_fp32(results, weights, same)
        print(weights, json.dumps(report[f"{weights}_vs_fp32"], indent=2))
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
