"""Training throughput with 1 process and with N data-parallel processes (torchrun, DDP).

    python benchmarks/ddp_scaling.py DATA/vqa_train.jsonl [--processes 2] [--seconds 45]

Trains the quickstart's model shape for a fixed time each way, with the same per-process batch,
and prints the samples/s the training log reports (every process's samples counted) and their
ratio. One process gets all the machine's threads; N processes get 1/N each (torchrun's default).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

MODEL = {"model": {"vision": {"depth": 0, "pool": 3}, "text": {"depth": 2, "max_length": 48}}}


def throughput(task: str, data: str, processes: int, seconds: float, batch: int) -> float:
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "model.json"
        config.write_text(json.dumps(MODEL))
        out = Path(folder) / "run"
        command = [sys.executable, "-m", "vtfuse", "train", "--task", task, "--train", data]
        command += ["--out", str(out), "--config", str(config), "--batch-size", str(batch)]
        command += ["--epochs", "100", "--max-minutes", str(seconds / 60), "--no-progress"]
        command += ["--nproc", str(processes)]
        subprocess.run(command, check=True, capture_output=True)
        rates = [
            entry["samples_per_s"]
            for line in (out / "log.jsonl").read_text().splitlines()
            if "samples_per_s" in (entry := json.loads(line))
        ]
    return rates[-1] if rates else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data", help="training JSONL")
    parser.add_argument("--task", default="vqa")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=45)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    one = throughput(args.task, args.data, 1, args.seconds, args.batch_size)
    many = throughput(args.task, args.data, args.processes, args.seconds, args.batch_size)
    print(f"{args.task}, batch {args.batch_size} per process, {args.seconds:g} s each")
    print(f"  1 process:   {one:8.0f} samples/s")
    print(f"  {args.processes} processes: {many:8.0f} samples/s   ratio {many / one:.2f}")


if __name__ == "__main__":
    main()
