"""Does a model trained from scratch with default flags learn to look? Sort-of-CLEVR, 3 seeds.

    python benchmarks/learning.py [--images 9800] [--minutes 30] [--seeds 0,1,2]
                                  [--task vqa|caption] [--out benchmarks/results/learning_vqa.json]
    python benchmarks/learning.py --merge seed0.json seed1.json --out learning_vqa.json

Writes a Sort-of-CLEVR dataset with the paper's specification (`vtfuse synth --style
sort-of-clevr`: a generator apart from the quickstart's scenes), then for each seed runs the
README's command with nothing but a time cap and the seed:

    vtfuse train --task vqa --train vqa_train.jsonl --val vqa_val.jsonl --out RUN \\
        --max-minutes M --seed S

and `vtfuse eval` on the test split, with the image and blind (`--blind`: a blank image, the
floor a model that does not look stays at). Stored: the validation accuracy after every epoch
against training minutes (the learning curve), the test accuracy overall, relational and
non-relational (VQA) or object F1, CIDEr and BLEU-4 (captions), each seed and mean ± std.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEADLINE = {
    "vqa": ("accuracy", "accuracy_non-relational", "accuracy_relational"),
    "caption": ("object_f1", "object_f1_colour_shape", "object_f1_colour_place", "cider", "bleu4"),
}


def vtfuse(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "vtfuse", *args], check=True)


def dataset(folder: Path, images: int, seed: int) -> Path:
    if not (folder / "vqa_test.jsonl").exists():
        vtfuse(
            "synth",
            "--style",
            "sort-of-clevr",
            "--out",
            str(folder),
            "--images",
            str(images),
            "--seed",
            str(seed),
        )
    return folder


def evaluate(run: Path, test: Path, blind: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as scratch:
        metrics = Path(scratch) / "metrics.json"
        vtfuse(
            "eval",
            str(run / "best"),
            "--data",
            str(test),
            "--metrics",
            str(metrics),
            *(["--blind"] if blind else []),
            "--no-progress",
        )
        return json.loads(metrics.read_text())


def one_seed(
    task: str, data: Path, runs: Path, seed: int, minutes: float, flags: list[str]
) -> dict:
    run = runs / f"{task}_seed{seed}"
    started = time.monotonic()
    vtfuse(
        "train",
        "--task",
        task,
        "--train",
        str(data / f"{task}_train.jsonl"),
        "--val",
        str(data / f"{task}_val.jsonl"),
        "--out",
        str(run),
        "--max-minutes",
        str(minutes),
        "--seed",
        str(seed),
        "--no-progress",
        *flags,
    )
    wall = (time.monotonic() - started) / 60
    curve = [
        {
            k: entry[k]
            for k in ("epoch", "step", "minutes", "val_loss", "val_blind_loss", "val_accuracy")
            if k in entry
        }
        for line in (run / "log.jsonl").read_text().splitlines()
        if "val_loss" in (entry := json.loads(line))
    ]
    test = data / f"{task}_test.jsonl"
    return {
        "seed": seed,
        "train_minutes": round(wall, 2),
        "curve": curve,
        "test": evaluate(run, test, blind=False),
        "blind": evaluate(run, test, blind=True),
    }


def flat(metrics: dict) -> dict[str, float]:
    """`accuracy_by_type: {"relational": ...}` → `accuracy_relational`, beside the rest."""
    by_type = metrics.get("accuracy_by_type", {})
    return {**metrics, **{f"accuracy_{kind}": value for kind, value in by_type.items()}}


def mean_std(values: list[float]) -> str:
    """'mean ± sample std' at three decimals (std 0 for one value)."""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def summary(results: list[dict], task: str) -> dict[str, str]:
    table = {}
    for key in HEADLINE[task]:
        for side in ("test", "blind"):
            scores = (flat(r[side]) for r in results)
            values = [score[key] for score in scores if key in score]
            if values:
                table[f"{side}/{key}"] = mean_std(values)
    return table


def resummarise(path: Path) -> None:
    """Recompute a stored result's summary from its seeds (after a change to `summary`)."""
    report = json.loads(path.read_text())
    report["summary"] = summary(report["seeds"], report["task"])
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["summary"], indent=2))


def merge(parts: list[Path], out: Path) -> None:
    """One result from runs of single seeds made side by side (`--seeds 0` and `--seeds 1` as
    two processes): their seeds together, the summary recomputed."""
    reports = [json.loads(part.read_text()) for part in parts]
    first = reports[0]
    for report in reports[1:]:
        for key in ("task", "train_images", "minutes_cap", "train_flags"):
            if report[key] != first[key]:
                raise SystemExit(f"cannot merge: {key} differs ({first[key]} vs {report[key]})")
    seeds = [seed for report in reports for seed in report["seeds"]]
    merged = {
        **first,
        "command": " && ".join(report["command"] for report in reports),
        "summary": summary(seeds, first["task"]),
        "seeds": seeds,
    }
    out.write_text(json.dumps(merged, indent=2) + "\n")
    print(json.dumps(merged["summary"], indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=tuple(HEADLINE), default="vqa")
    parser.add_argument("--images", type=int, default=9800, help="training images")
    parser.add_argument("--minutes", type=float, default=30.0, help="training time cap per seed")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--data", type=Path, help="dataset folder (default: a cache by size)")
    parser.add_argument("--runs", type=Path, help="run folders (default: a temporary folder)")
    parser.add_argument("--out", type=Path, help="result JSON (default benchmarks/results/...)")
    parser.add_argument(
        "--train-flags",
        default="",
        help='more `vtfuse train` flags, e.g. "--epochs 40" (default: none, the defaults)',
    )
    parser.add_argument("--resummarise", type=Path, help="only recompute this file's summary")
    parser.add_argument(
        "--merge", type=Path, nargs="+", help="only join these results' seeds into --out"
    )
    args = parser.parse_args()
    if args.resummarise:
        return resummarise(args.resummarise)
    if args.merge:
        if args.out is None:
            parser.error("--merge needs --out")
        return merge(args.merge, args.out)
    seeds = [int(s) for s in args.seeds.split(",")]
    data = dataset(
        args.data or Path(tempfile.gettempdir()) / f"sort-of-clevr-{args.images}",
        args.images,
        seed=1234,
    )
    out = args.out or Path(__file__).parent / "results" / f"learning_{args.task}.json"
    with tempfile.TemporaryDirectory() as scratch:
        runs = args.runs or Path(scratch)
        results = []
        for seed in seeds:
            flags = args.train_flags.split()
            results.append(one_seed(args.task, data, runs, seed, args.minutes, flags))
            print(json.dumps({"seed": seed, **summary([results[-1]], args.task)}), flush=True)
    report = {
        "command": shlex.join(["python", "benchmarks/learning.py", *sys.argv[1:]]),
        "task": args.task,
        "train_images": args.images,
        "minutes_cap": args.minutes,
        "train_flags": args.train_flags,
        "summary": summary(results, args.task),
        "seeds": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["summary"], indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
