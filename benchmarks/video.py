"""Does a clip model learn motion that a single frame cannot show? 4 frames, 1 frame, blind.

    python benchmarks/video.py [--clips 1500] [--minutes 6] [--epochs 13] [--data DIR]
                               [--runs DIR] [--out benchmarks/results/video.json]

Runs the README's commands ("Video clips"), one after the other, each with OMP_NUM_THREADS=1:

    vtfuse synth --out D --clips 1500 --seed 0
    clip.json: {"model": {"vision": {"depth": 0, "channels": [16, 32, 64]},
                          "text": {"depth": 2, "max_length": 48}},
                "train": {"epochs": 13, "batch_size": 32, "lr": 0.001}}
    for F in 4 1:
        vtfuse train --task vqa --train D/vqa_train.jsonl --val D/vqa_val.jsonl \\
            --out RUNS/vqa-Ff --config clip.json --frames F --max-minutes 6
        vtfuse eval RUNS/vqa-Ff --data D/vqa_test.jsonl
    vtfuse eval RUNS/vqa-4f --data D/vqa_test.jsonl --blind

(`eval RUN` scores the run's best checkpoint.) Stored per row: the test accuracy overall and by
question kind ("which way does X move?": `direction`, chance 0.25; "does X move?": `moving`),
the training epochs, steps and minutes from the run's `log.jsonl` (whether the time cap
stopped it), the last validation accuracy, and the test questions by kind (with the share of
"yes" among the "does it move" ones: the level of always answering "yes").
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from joint import read_log  # the same log.jsonl reading (run as benchmarks/video.py)

MODEL = {
    "vision": {"depth": 0, "channels": [16, 32, 64]},
    "text": {"depth": 2, "max_length": 48},
}
KINDS = {"direction": "which_way", "moving": "does_it_move"}  # the data's `type` → stored name


def vtfuse(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "vtfuse", *args],
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def shown(args: list[str]) -> str:
    """The command as the README writes it (`vtfuse ...`), for the result file."""
    return shlex.join(["vtfuse", *args])


def dataset(folder: Path, clips: int) -> Path:
    if not (folder / "vqa_test.jsonl").exists():
        print(f"[video] synth --clips {clips} --seed 0 into {folder}", flush=True)
        vtfuse("synth", "--out", str(folder), "--clips", str(clips), "--seed", "0")
    return folder


def questions(path: Path) -> dict[str, float]:
    """How many questions of each kind a split holds, and the share of "yes" among the
    "does it move" ones."""
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kinds = Counter(line.get("type") for line in lines)
    moving = [line["answer"] for line in lines if line.get("type") == "moving"]
    return {
        "questions": len(lines),
        **{stored: kinds[kind] for kind, stored in KINDS.items()},
        "does_it_move_yes": round(moving.count("yes") / len(moving), 3) if moving else None,
    }


def train(data: Path, runs: Path, frames: int, minutes: float) -> dict:
    run = runs / f"vqa-{frames}f"
    args = [
        "train",
        "--task",
        "vqa",
        "--train",
        str(data / "vqa_train.jsonl"),
        "--val",
        str(data / "vqa_val.jsonl"),
        "--out",
        str(run),
        "--config",
        str(runs / "clip.json"),
        "--frames",
        str(frames),
        "--max-minutes",
        f"{minutes:g}",
    ]
    print(f"[video] {shown(args)}", flush=True)
    started = time.monotonic()
    vtfuse(*args, "--no-progress")
    result = {
        "train_command": shown(args),
        **read_log(run),
        "wall_minutes": round((time.monotonic() - started) / 60, 2),
    }
    print(
        f"[video] {frames} frame(s): {result['epochs']} epochs, {result['steps']} steps, "
        f"{result['minutes']:.2f} min{' (stopped by the cap)' if result['stopped_by_cap'] else ''}",
        flush=True,
    )
    return result


def evaluate(data: Path, runs: Path, frames: int, blind: bool) -> dict:
    metrics = runs / f"vqa-{frames}f{'-blind' if blind else ''}.json"
    args = ["eval", str(runs / f"vqa-{frames}f"), "--data", str(data / "vqa_test.jsonl")]
    args += ["--blind"] if blind else []
    print(f"[video] {shown(args)}", flush=True)
    vtfuse(*args, "--metrics", str(metrics), "--no-progress")
    scores = json.loads(metrics.read_text())
    by_kind = scores.get("accuracy_by_type", {})
    found = {
        "accuracy": scores["accuracy"],
        **{stored: by_kind.get(kind) for kind, stored in KINDS.items()},
    }
    print(f"[video] {frames} frame(s){', blind' if blind else ''}: {found}", flush=True)
    return {"eval_command": shown(args), **found, "eval": scores}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=1500, help="clips for vtfuse synth")
    parser.add_argument("--minutes", type=float, default=6.0, help="--max-minutes of each run")
    parser.add_argument("--epochs", type=int, default=13, help="train.epochs in clip.json")
    parser.add_argument("--data", type=Path, help="dataset folder (default: a cache by size)")
    parser.add_argument("--runs", type=Path, help="run folders (default: a temporary folder)")
    parser.add_argument("--out", type=Path, help="result JSON (default benchmarks/results/...)")
    args = parser.parse_args(argv)
    data = dataset(args.data or Path(tempfile.gettempdir()) / f"clips-{args.clips}", args.clips)
    out = args.out or Path(__file__).parent / "results" / "video.json"
    config = {"model": MODEL, "train": {"epochs": args.epochs, "batch_size": 32, "lr": 0.001}}
    rows, training = [], {}
    with tempfile.TemporaryDirectory() as scratch:
        runs = args.runs or Path(scratch)
        runs.mkdir(parents=True, exist_ok=True)
        (runs / "clip.json").write_text(json.dumps(config, indent=2) + "\n")
        for frames in (4, 1):
            name = f"{frames} frame{'s' if frames > 1 else ''}"
            training[name] = train(data, runs, frames, args.minutes)
            rows.append({"name": name, "frames": frames, "blind": False})
            rows[-1] |= evaluate(data, runs, frames, blind=False)
        rows.append({"name": "4 frames, clips blanked", "frames": 4, "blind": True})
        rows[-1] |= evaluate(data, runs, 4, blind=True)
    for row in rows:  # the training of the model each row scores
        trained = training["4 frames" if row["frames"] == 4 else "1 frame"]
        row |= {key: trained[key] for key in ("epochs", "minutes", "stopped_by_cap")}
    report = {
        "command": shlex.join(
            ["python", "benchmarks/video.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "clips": args.clips,
        "minutes_cap": args.minutes,
        "environment": {"OMP_NUM_THREADS": "1"},
        "config": config,
        "checkpoint": "best",
        "data": {
            split: questions(data / f"vqa_{split}.jsonl") for split in ("train", "val", "test")
        },
        "runs": rows,
        "training": training,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("| model | epochs | minutes | accuracy | which way | does it move |")
    for row in rows:
        scores = (row["accuracy"], row["which_way"], row["does_it_move"])
        print(
            f"| {row['name']} | {row['epochs']} | {row['minutes']:.1f} | "
            + " | ".join("—" if v is None else f"{v:.3f}" for v in scores)
            + " |"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
