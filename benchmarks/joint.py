"""Does the joint model (ITC + ITM + LM) beat single-task models at the same budget?

    python benchmarks/joint.py [--images 3000] [--minutes 4] [--data DIR] [--runs DIR]
                               [--out benchmarks/results/joint.json] [--taskset CPUS]

Runs the README's commands ("Joint training"), one after the other, each with
OMP_NUM_THREADS=1 (one core; `--taskset 0` also pins them to CPU 0), every flag at its default
but the time budget (the schedule is planned on the clock):

    vtfuse synth --out D --images 3000
    vtfuse train --task caption --train D/caption_train.jsonl --val D/caption_val.jsonl \\
        --max-minutes 4 --out RUNS/caption
    vtfuse train --task retrieval --train D/retrieval_train.jsonl \\
        --val D/retrieval_val.jsonl --max-minutes 4 --out RUNS/retrieval
    vtfuse train --losses itc,itm,lm --loss-weights 1,1,1 --train D/caption_train.jsonl \\
        --val D/caption_val.jsonl --max-minutes 4 --out RUNS/joint
    vtfuse eval RUNS/RUN/last --data D/caption_test.jsonl --metrics RUN.json   # each run

Stored per run, from its `log.jsonl`: the seconds it trained (the trainer's clock at its last
epoch line), steps, epochs (fractional when `--max-minutes` stopped it mid-epoch: the completed
epochs plus the partial one's steps over an epoch's), whether the cap stopped it, examples per
second (the mean of the step lines' `samples_per_s`: training alone, validation not counted),
the last validation's losses by term (`val_loss`, `val_itc`, `val_itm`, `val_lm`, ...) and the
validation curve; from `vtfuse eval` on the test split (by the final weights, `RUN/last`):
CIDEr, object F1, pointing accuracy, R@1 image→text and text→image and both re-ranked by the
matching head (`itm_`), beside the full metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# name: (task flags, data files' prefix), as in the README's block
RUNS = {
    "caption": (["--task", "caption"], "caption"),
    "retrieval": (["--task", "retrieval"], "retrieval"),
    "joint": (["--losses", "itc,itm,lm", "--loss-weights", "1,1,1"], "caption"),
}
HEADLINE = {
    "caption": ("cider", "object_f1", "pointing_accuracy"),
    "retrieval": ("i2t_r1", "t2i_r1", "itm_i2t_r1", "itm_t2i_r1"),
}


def pinned(cpus: str) -> list[str]:
    """`taskset -c CPUS` before a command, or nothing (no CPUS, or no taskset here)."""
    if not cpus:
        return []
    if shutil.which("taskset") is None:
        print(f"[joint] taskset not found: runs are not pinned to CPU {cpus}", flush=True)
        return []
    return ["taskset", "-c", cpus]


def vtfuse(*args: str, prefix: list[str] | None = None) -> None:
    """`python -m vtfuse ARGS` on one intra-op thread, after `prefix` (`taskset -c 0`)."""
    subprocess.run(
        [*(prefix or []), sys.executable, "-m", "vtfuse", *args],
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def shown(prefix: list[str], args: list[str]) -> str:
    """The command as the README writes it (`vtfuse ...`), for the result file."""
    return shlex.join([*prefix, "vtfuse", *args])


def dataset(folder: Path, images: int) -> Path:
    if not (folder / "caption_test.jsonl").exists():
        print(f"[joint] synth --images {images} into {folder}", flush=True)
        vtfuse("synth", "--out", str(folder), "--images", str(images))
    return folder


def read_log(run: Path) -> dict:
    """Steps, epochs (fractional if stopped mid-epoch), seconds, speed and the validation
    losses of a run, from its `log.jsonl`: step lines carry `samples_per_s` (every 50 steps),
    epoch lines `minutes`, and `val_*` unless the time cap ended the epoch early."""
    entries = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line]
    epochs = [entry for entry in entries if "minutes" in entry]
    rates = [entry["samples_per_s"] for entry in entries if "samples_per_s" in entry]
    validated = [entry for entry in epochs if "val_loss" in entry]
    last = epochs[-1]
    capped = "val_loss" not in last  # the trainer validates every epoch it completes
    trained = float(validated[-1]["epoch"]) if validated else 0.0
    if capped and validated:
        per_epoch = validated[0]["step"] / validated[0]["epoch"]
        trained += (last["step"] - validated[-1]["step"]) / per_epoch
    return {
        "seconds": round(last["minutes"] * 60, 1),
        "minutes": last["minutes"],
        "stopped_by_cap": capped,
        "steps": last["step"],
        "epochs": round(trained, 2) if validated or not capped else None,
        "epochs_completed": int(validated[-1]["epoch"]) if validated else 0,
        "examples_per_s": round(statistics.mean(rates), 1) if rates else None,
        "final_val": {k: v for k, v in (validated or [{}])[-1].items() if k.startswith("val_")},
        "curve": [
            {k: v for k, v in entry.items() if k in ("epoch", "step", "minutes") or "val_" in k}
            for entry in epochs
        ],
    }


def headline(metrics: dict) -> dict[str, float]:
    """The table's metrics, from a single-task model's flat metrics or a joint model's nested
    ones (`{"caption": {...}, "retrieval": {...}}`)."""
    found = {}
    for task, keys in HEADLINE.items():
        part = metrics.get(task) if isinstance(metrics.get(task), dict) else metrics
        found |= {key: part[key] for key in keys if key in part}
    return found


def train(prefix: list[str], name: str, data: Path, runs: Path, minutes: float) -> dict:
    flags, files = RUNS[name]
    run = runs / name
    args = [
        "train",
        *flags,
        "--train",
        str(data / f"{files}_train.jsonl"),
        "--val",
        str(data / f"{files}_val.jsonl"),
        "--max-minutes",
        f"{minutes:g}",
        "--out",
        str(run),
    ]
    print(f"[joint] {shown(prefix, args)}", flush=True)
    started = time.monotonic()
    vtfuse(*args, "--no-progress", prefix=prefix)
    wall = time.monotonic() - started
    result = {
        "name": name,
        "train_command": shown(prefix, args),
        **read_log(run),
        "wall_seconds": round(wall, 1),
    }
    print(
        f"[joint] {name}: {result['seconds']:.0f} s, {result['steps']} steps "
        f"({result['epochs']} epochs), {result['examples_per_s']} examples/s, "
        f"{result['final_val']}",
        flush=True,
    )
    return result


def evaluate(prefix: list[str], result: dict, data: Path, runs: Path) -> None:
    name = result["name"]
    metrics = runs / f"{name}.json"
    args = [
        "eval",
        str(runs / name / "last"),
        "--data",
        str(data / "caption_test.jsonl"),
        "--metrics",
        str(metrics),
    ]
    print(f"[joint] {shown(prefix, args)}", flush=True)
    vtfuse(*args, "--no-progress", prefix=prefix)
    scores = json.loads(metrics.read_text())
    result |= {"eval_command": shown(prefix, args), "test": headline(scores), "eval": scores}
    print(f"[joint] {name} on the test split: {result['test']}", flush=True)


def table(results: list[dict]) -> str:
    """The README's rows, to compare by eye."""

    def cell(value: float | None, digits: int) -> str:
        return "—" if value is None else f"{value:.{digits}f}"

    lines = [
        "| run | trained | steps (epochs) | CIDEr | object F1 | pointing | i→t R@1 | t→i R@1 "
        "| R@1 re-ranked by ITM (i→t / t→i) |"
    ]
    for r in results:
        t = r["test"].get
        epochs = r["epochs"]
        lines.append(
            f"| {r['name']} | {r['seconds']:.0f} s{' (cap)' if r['stopped_by_cap'] else ''} "
            f"| {r['steps']} ({epochs}) | {cell(t('cider'), 2)} | {cell(t('object_f1'), 3)} "
            f"| {cell(t('pointing_accuracy'), 3)} | {cell(t('i2t_r1'), 3)} "
            f"| {cell(t('t2i_r1'), 3)} | {cell(t('itm_i2t_r1'), 3)} "
            f"/ {cell(t('itm_t2i_r1'), 3)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=3000, help="scenes for vtfuse synth")
    parser.add_argument("--minutes", type=float, default=4.0, help="--max-minutes of every run")
    parser.add_argument("--data", type=Path, help="dataset folder (default: a cache by size)")
    parser.add_argument("--runs", type=Path, help="run folders (default: a temporary folder)")
    parser.add_argument("--out", type=Path, help="result JSON (default benchmarks/results/...)")
    parser.add_argument(
        "--taskset", default="", help="CPUs to pin every command to (default: not pinned)"
    )
    args = parser.parse_args(argv)
    data = dataset(
        args.data or Path(tempfile.gettempdir()) / f"joint_data-{args.images}", args.images
    )
    out = args.out or Path(__file__).parent / "results" / "joint.json"
    prefix = pinned(args.taskset)
    with tempfile.TemporaryDirectory() as scratch:
        runs = args.runs or Path(scratch)
        runs.mkdir(parents=True, exist_ok=True)
        results = [train(prefix, name, data, runs, args.minutes) for name in RUNS]
        for result in results:
            evaluate(prefix, result, data, runs)
    report = {
        "command": shlex.join(
            ["python", "benchmarks/joint.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "train_images": args.images,
        "minutes_cap": args.minutes,
        "environment": {"OMP_NUM_THREADS": "1", "taskset": args.taskset or None},
        "test_file": "caption_test.jsonl",
        "checkpoint": "last",
        "runs": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(results))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
