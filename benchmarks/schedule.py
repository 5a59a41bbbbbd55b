"""Which training schedule lets the default model learn the quickstart's scenes in minutes?

    python benchmarks/schedule.py [--data DIR] [--epochs 6] [--jobs 2] [--out FILE.json]

The quickstart used to train a recipe of its own: 3 × 3 image tokens (one per cell of the
scenes' layout), learning rate 1e-3 at batch 32. With the library's defaults its captioner
learned several times more slowly. This script finds out which part of the recipe did the work:
the default captioner (`ModelConfig(task="caption")`: 9 × 9 image tokens) trained for a fixed
number of epochs on the quickstart's scenes (`vtfuse synth --images 3000 --seed 0`) under
each schedule below, then scored on the test split (object F1: the scene's objects named with
the right colour, shape and place; CIDEr). Then the pair classifier, warm-started from the
(32, 1e-3) captioner, under its old default schedule and under the captioner's: the
classifier, like the VQA model (benchmarks/blindness.py), stays blind at 1e-3.

Fixed epochs, not minutes, so the runs compare by examples seen whatever the machine's load;
`--jobs` runs go side by side, one core each (`OMP_NUM_THREADS=1`, pinned with `taskset` where
it exists).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CAPTION_RUNS = {  # name → flags over the defaults
    "batch 64, lr 3e-4": ["--batch-size", "64", "--lr", "3e-4"],
    "batch 64, lr 3e-4, 3 × 3 tokens": ["--batch-size", "64", "--lr", "3e-4", "--vision-pool", "3"],
    "batch 64, lr 1e-3": ["--batch-size", "64", "--lr", "1e-3"],
    "batch 32, lr 1e-3": ["--batch-size", "32", "--lr", "1e-3"],
}
WARM_FROM = "batch 32, lr 1e-3"
CLASSIFY_RUNS = {
    "batch 64, lr 3e-4": ["--batch-size", "64", "--lr", "3e-4"],
    "batch 32, lr 1e-3": ["--batch-size", "32", "--lr", "1e-3"],
}


def vtfuse(args: list[str], core: int | None = None) -> None:
    pin = ["taskset", "-c", str(core)] if core is not None and shutil.which("taskset") else []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [*pin, sys.executable, "-m", "vtfuse", *args]
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)


def train_and_score(
    task: str, flags: list[str], data: Path, run: Path, epochs: int, core: int
) -> dict:
    files = ["--train", str(data / f"{task}_train.jsonl"), "--val", str(data / f"{task}_val.jsonl")]
    vtfuse(
        ["train", "--task", task, *files, "--out", str(run), "--epochs", str(epochs),
         "--no-progress", *flags],
        core,
    )  # fmt: skip
    metrics = run / "test_metrics.json"
    vtfuse(
        ["eval", str(run / "best"), "--data", str(data / f"{task}_test.jsonl"),
         "--metrics", str(metrics), "--no-progress"],
        core,
    )  # fmt: skip
    scores = json.loads(metrics.read_text())
    keys = ("object_f1", "cider") if task == "caption" else ("accuracy",)
    curve = [
        {k: entry[k] for k in ("epoch", "step", "val_loss", "val_accuracy") if k in entry}
        for line in (run / "log.jsonl").read_text().splitlines()
        if "val_loss" in (entry := json.loads(line))
    ]
    return {"flags": flags, **{key: scores[key] for key in keys}, "curve": curve}


def run_all(task: str, runs: dict[str, list[str]], data: Path, folder: Path, args) -> dict:
    def one(item: tuple[int, tuple[str, list[str]]]) -> tuple[str, dict]:
        index, (name, flags) = item
        run = folder / f"{task}-{index}"
        return name, train_and_score(task, flags, data, run, args.epochs, index % args.jobs)

    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(pool.map(one, enumerate(runs.items())))
    for name, result in results.items():
        scores = ", ".join(
            f"{k} {result[k]:.3f}" for k in ("object_f1", "cider", "accuracy") if k in result
        )
        print(f"{task:8s} {name:34s} {scores}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="a `vtfuse synth` folder (default: made)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side, a core each")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "schedule.json"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vtfuse-schedule-") as scratch:
        folder = Path(scratch)
        data = args.data or folder / "scenes"
        if args.data is None:
            vtfuse(["synth", "--out", str(data), "--images", "3000", "--seed", "0"])
        captions = run_all("caption", CAPTION_RUNS, data, folder, args)
        warm = folder / f"caption-{list(CAPTION_RUNS).index(WARM_FROM)}"
        classify_runs = {
            name: [*flags, "--init-from", str(warm)] for name, flags in CLASSIFY_RUNS.items()
        }
        pairs = run_all("classify", classify_runs, data, folder, args)
    result = {
        "command": shlex.join(["python", "benchmarks/schedule.py", *sys.argv[1:]]),
        "epochs": args.epochs,
        "caption": captions,
        "classify_warm_started_from": WARM_FROM,
        "classify": pairs,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
