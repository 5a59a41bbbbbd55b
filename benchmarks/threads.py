"""What PyTorch's intra-op threads cost off the main thread: why `vtfuse serve` decodes with one.

    python benchmarks/threads.py RUN [--out benchmarks/results/threads.json]

Two measurements, each on the main thread and on a second thread (where the server's inference
thread runs the model), with 1 and with all of torch's threads:

- an in-place add over 200 000 floats, big enough that PyTorch splits it across its threads
  (one OpenMP parallel region): microseconds a call, mean of 3000;
- greedy captioning of a batch of 16 test images by RUN's captioner (e.g. the quickstart's
  `runs/caption`): milliseconds a batch, median of 5 after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from vtfuse.pipeline import Pipeline
from vtfuse.tasks import read_jsonl


def on_thread(job: Callable[[], float], threads: int, main: bool) -> float:
    """`job()` with `threads` PyTorch threads, on the main thread or a new one."""
    result: list[float] = []

    def run() -> None:
        torch.set_num_threads(threads)
        result.append(job())

    if main:
        before = torch.get_num_threads()
        run()
        torch.set_num_threads(before)
    else:
        worker = threading.Thread(target=run)
        worker.start()
        worker.join()
    return result[0]


def add_us(calls: int = 3000) -> float:
    x = torch.randn(200_000)
    x.add_(1.0)
    start = time.perf_counter()
    for _ in range(calls):
        x.add_(1.0)
    return (time.perf_counter() - start) / calls * 1e6


def caption_ms(pipe: Pipeline, images: torch.Tensor) -> Callable[[], float]:
    def job() -> float:
        times = []
        with torch.inference_mode():
            pipe.generate(images)
            for _ in range(5):
                start = time.perf_counter()
                pipe.generate(images)
                times.append(time.perf_counter() - start)
        return statistics.median(times) * 1000

    return job


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="a captioner's run or model folder")
    parser.add_argument("--test", type=Path, help="caption JSONL (default: beside the run)")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "threads.json"
    )
    args = parser.parse_args()
    pipe = Pipeline.load(args.run, "cpu", runtime="torch")
    test = args.test or Path(args.run).parent.parent / "data" / "caption_test.jsonl"
    records = read_jsonl(test, "caption")[:16]
    images = pipe.images_to_tensor([r.image_path for r in records])
    most = torch.get_num_threads()
    rows = {}
    for where in ("main", "second"):
        for threads in sorted({1, most}):
            key = f"{where} thread, {threads} torch thread{'s' if threads > 1 else ''}"
            rows[key] = {
                "add_us": on_thread(add_us, threads, where == "main"),
                "caption_batch16_ms": on_thread(caption_ms(pipe, images), threads, where == "main"),
            }
            print(
                f"{key:32s} add {rows[key]['add_us']:6.1f} us   batch of 16 "
                f"{rows[key]['caption_batch16_ms']:7.1f} ms",
                flush=True,
            )
    report = {"command": shlex.join(["python", "benchmarks/threads.py", *sys.argv[1:]])}
    report["rows"] = rows
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
