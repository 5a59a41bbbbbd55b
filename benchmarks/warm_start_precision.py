"""Does a captioner trained under bf16 autocast warm-start a classifier as well as an fp32 one?

    python benchmarks/warm_start_precision.py --data DIR [--seeds 0,1] [--out F]

DIR is a quickstart's `data/` folder (`vtfuse quickstart` writes it). For each seed and each
precision, trains the quickstart's captioner (the library's defaults) for a fixed number of
epochs with `--precision fp32` or `bf16`, then the pair classifier warm-started from it
(`--init-from`, fp32, the same seed and epochs for both), two trainings at a time on one core
each; the epochs, not the clock, bound each run, so the machine's load does not change the
figures. Writes each captioner's validation loss and each classifier's validation accuracy
curve to `benchmarks/results/warm_start_precision.json`.

Why: `--precision auto` could train the default captioner in bf16 (its step is 1.27-1.44×
faster), and the captioner's own validation loss does not move, but the quickstart's classifier
warm-started from a bf16-trained captioner once reached 0.93 against 0.98-0.99.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "warm_start_precision.json"
CAPTION_EPOCHS = 20  # 3000 steps: twice the quickstart's 3 minutes, each captioner on its plateau
CLASSIFY_EPOCHS = 18  # 1350 steps, as many as the quickstart's 3 minutes give


def train(task: str, data: Path, out: Path, epochs: int, seed: int, *flags: str) -> list[str]:
    return [
        sys.executable, "-m", "vtfuse", "train", "--task", task,
        "--train", str(data / f"{task}_train.jsonl"), "--val", str(data / f"{task}_val.jsonl"),
        "--out", str(out), "--epochs", str(epochs), "--seed", str(seed), "--no-progress", *flags,
    ]  # fmt: skip


def finished(command: list[str]) -> bool:
    """Whether the run this command writes is already in its folder, all its epochs done (a
    `--runs` folder from an earlier call is reused)."""
    log = Path(command[command.index("--out") + 1]) / "log.jsonl"
    epochs = int(command[command.index("--epochs") + 1])
    return log.exists() and any(
        json.loads(line).get("epoch") == epochs and "val_loss" in line
        for line in log.read_text().splitlines()
    )


def run_pairs(commands: list[list[str]]) -> None:
    """Two at a time, one core each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    commands = [command for command in commands if not finished(command)]
    for start in range(0, len(commands), 2):
        processes = [
            subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL)
            for c in commands[start : start + 2]
        ]
        for process, command in zip(processes, commands[start : start + 2], strict=True):
            if process.wait():
                raise SystemExit(f"failed: {' '.join(command)}")


def validation_curve(run: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    keep = ("step", "epoch", "val_loss", "val_accuracy")
    return [{k: line[k] for k in keep if k in line} for line in lines if "val_loss" in line]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a quickstart's data/ folder")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--runs", type=Path, help="run folders (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory() as scratch:
        runs = args.runs or Path(scratch)
        cases = [(seed, precision) for seed in seeds for precision in ("fp32", "bf16")]
        captioner = {case: runs / f"caption_{case[1]}_seed{case[0]}" for case in cases}
        classifier = {case: runs / f"classify_{case[1]}_seed{case[0]}" for case in cases}
        run_pairs(
            [
                train("caption", args.data, captioner[c], CAPTION_EPOCHS, c[0], "--precision", c[1])
                for c in cases
            ]
        )
        warm = {c: ("--precision", "fp32", "--init-from", str(captioner[c])) for c in cases}
        run_pairs(
            [
                train("classify", args.data, classifier[c], CLASSIFY_EPOCHS, c[0], *warm[c])
                for c in cases
            ]
        )
        results = [
            {
                "seed": seed,
                "captioner_precision": precision,
                "captioner_curve": validation_curve(captioner[seed, precision]),
                "classifier_curve": validation_curve(classifier[seed, precision]),
            }
            for seed, precision in cases
        ]
    for result in results:
        caption, classify = result["captioner_curve"][-1], result["classifier_curve"][-1]
        result["captioner_val_loss"] = caption["val_loss"]
        result["classifier_val_accuracy"] = classify["val_accuracy"]
        print(
            f"seed {result['seed']} captioner {result['captioner_precision']}: caption val loss "
            f"{caption['val_loss']:.4f}, classifier val accuracy {classify['val_accuracy']:.4f}"
        )
    report = {
        "command": f"python benchmarks/warm_start_precision.py --data DIR --seeds {args.seeds}",
        "caption_epochs": CAPTION_EPOCHS,
        "classify_epochs": CLASSIFY_EPOCHS,
        "runs": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
