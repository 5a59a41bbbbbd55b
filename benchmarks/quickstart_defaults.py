"""What does the quickstart's warm start buy? Its stages, every one from scratch.

    python benchmarks/quickstart_defaults.py [--out DIR] [--result FILE.json]

The quickstart trains the library's defaults on its scenes, each stage on a time budget, and
starts the retrieval model and the pair classifier from the captioner (`--init-from`). This
script trains the same stages on the same scenes (`vtfuse synth --images 3000 --seed 0`) and
budgets, every one from scratch (the VQA model, which the quickstart trains from scratch
already, is left out), then evaluates each as the quickstart does, with and
without the image. The quickstart's own figures are in `benchmarks/results/quickstart_metrics.json`.
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
from vtfuse.data.synth import SynthSpec, generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="output folder (default: a temporary one)")
    parser.add_argument(
        "--result",
        type=Path,
        default=Path(__file__).parent / "results" / "quickstart_defaults.json",
    )
    args = parser.parse_args()
    # no VQA stage: the quickstart trains it from scratch already
    plan = replace(quickstart.QuickstartPlan(progress=False), warm_start=(), vqa=None)
    stages = {"caption": plan.caption, "retrieval": plan.retrieval, "classify": plan.classify}
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or Path(scratch)
        data = out / "data"
        generate(data, SynthSpec(images=plan.images, seed=plan.seed), progress=False)
        metrics = quickstart.train_evaluate_report(out, data, plan)
    result = {
        "command": shlex.join(["python", "benchmarks/quickstart_defaults.py", *sys.argv[1:]]),
        "warm_start": list(plan.warm_start),
        "minutes": {task: stage.train.max_minutes for task, stage in stages.items() if stage},
        "metrics": metrics,
    }
    args.result.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.result}")


if __name__ == "__main__":
    main()
