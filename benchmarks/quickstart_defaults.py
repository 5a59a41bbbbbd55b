"""Does the quickstart need its own recipe? Its four stages with the library's defaults.

    python benchmarks/quickstart_defaults.py [--out DIR] [--warm-start] [--result FILE.json]

The quickstart trains on its scenes with a recipe of its own: 3 × 3 image tokens (one per
cell of the scenes' layout), 2 text blocks, learning rate 1e-3 at batch 32, and every model
after the captioner started from it. This script trains the same four stages on the same
scenes (`vtfuse synth --images 3000 --seed 0`) and budgets (captioner 4 minutes, VQA 5,
retrieval 2, pair classifier 1.5) with nothing but the library's defaults (`ModelConfig(task)`,
`TrainConfig(max_minutes=M)`: the schedule planned on the clock) and, unless `--warm-start`,
each from scratch; then evaluates each as the quickstart does, with and without the image.
The quickstart's own figures are in `benchmarks/results/quickstart_metrics.json`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import vtfuse.quickstart as quickstart
from vtfuse.config import ModelConfig, TrainConfig
from vtfuse.data.synth import SynthSpec, generate

MINUTES = {"caption": 4.0, "vqa": 5.0, "retrieval": 2.0, "classify": 1.5}  # the quickstart's


def defaults_plan() -> quickstart.QuickstartPlan:
    def stage(task: str) -> quickstart.Stage:
        return quickstart.Stage(ModelConfig(task=task), TrainConfig(max_minutes=MINUTES[task]))

    return replace(
        quickstart.QuickstartPlan(progress=False),
        caption=stage("caption"),
        vqa=stage("vqa"),
        retrieval=stage("retrieval"),
        classify=stage("classify"),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="output folder (default: a temporary one)")
    parser.add_argument("--warm-start", action="store_true", help="start from the captioner")
    parser.add_argument(
        "--result",
        type=Path,
        default=Path(__file__).parent / "results" / "quickstart_defaults.json",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or Path(scratch)
        data = out / "data"
        generate(data, SynthSpec(images=3000, seed=0), progress=False)
        plan = replace(defaults_plan(), warm_start=args.warm_start)
        metrics = quickstart.train_evaluate_report(out, data, plan)
    result = {
        "command": shlex.join(["python", "benchmarks/quickstart_defaults.py", *sys.argv[1:]]),
        "warm_start": args.warm_start,
        "minutes": MINUTES,
        "metrics": metrics,
    }
    args.result.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.result}")


if __name__ == "__main__":
    main()
