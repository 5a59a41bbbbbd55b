"""Load on `vtfuse serve`: N requests at concurrency C on localhost, micro-batching on vs off,
or (`--runtimes torch,compiled,onnx`) with batching on, each decoding runtime.

    python benchmarks/serve_load.py RUN [--requests 200] [--concurrency 16] [--out FILE.json]
    python benchmarks/serve_load.py RUN --runtimes torch,compiled,onnx --concurrency 64 --out F

RUN is a run or model folder (the quickstart's `runs/caption` or `runs/vqa`). Prints, for
batching on (max batch 16, 5 ms wait) and off (max batch 1): throughput, latency p50/p95/p99
and errors, and the ratio of the two throughputs. Figures depend on the machine: compare the
two rows of one run, not runs on different days. A captioner's ONNX graphs and compiled packages
are exported into a temporary folder when RUN has none (`vtfuse export --onnx / --compiled`).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import shlex
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import uvicorn
from PIL import Image

from vtfuse.generation.compiled import export_compiled, packages_for
from vtfuse.generation.onnx import export_onnx, has_graphs
from vtfuse.generation.static import copy_model_files
from vtfuse.models.factory import load_pretrained
from vtfuse.pipeline import Pipeline
from vtfuse.serving import ServeSettings, create_app
from vtfuse.training.checkpoint import resolve_model_folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(app) -> tuple[uvicorn.Server, str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    return server, f"http://127.0.0.1:{port}"


def images(count: int) -> list[bytes]:
    """Distinct small PNGs (a colour each), so no two requests are the same."""
    encoded = []
    for i in range(count):
        buffer = io.BytesIO()
        Image.new("RGB", (72, 72), (i * 37 % 256, i * 91 % 256, i * 53 % 256)).save(buffer, "PNG")
        encoded.append(buffer.getvalue())
    return encoded


async def load(url: str, task: str, requests: int, concurrency: int) -> dict[str, float]:
    pictures = images(requests)
    latencies: list[float] = []
    errors = 0
    gate = asyncio.Semaphore(concurrency)
    path = "/v1/caption" if task == "caption" else "/v1/ask"
    fields = {} if task == "caption" else {"question": "what colour is the circle?"}

    async def one(client: httpx.AsyncClient, i: int) -> None:
        nonlocal errors
        async with gate:
            began = time.perf_counter()
            response = await client.post(
                url + path, files={"image": ("x.png", pictures[i], "image/png")}, data=fields
            )
            latencies.append(time.perf_counter() - began)
            errors += response.status_code != 200

    async with httpx.AsyncClient(timeout=120) as client:
        began = time.perf_counter()
        await asyncio.gather(*(one(client, i) for i in range(requests)))
        wall = time.perf_counter() - began
    quantiles = statistics.quantiles(latencies, n=100)
    return {
        "throughput": requests / wall,
        "p50_ms": 1000 * quantiles[49],
        "p95_ms": 1000 * quantiles[94],
        "p99_ms": 1000 * quantiles[98],
        "errors": errors,
    }


def serve_and_load(pipe: Pipeline, folder: Path, batch: int, args) -> dict[str, float]:
    """Serve `pipe` with micro-batches of up to `batch`, warm it up, then time the load."""
    settings = ServeSettings(max_batch=batch, max_wait_ms=5.0 if batch > 1 else 0.0)
    app = create_app(pipe, settings, folder)
    server, url = start(app)
    asyncio.run(load(url, pipe.task, 16, args.concurrency))  # warm-up
    row = asyncio.run(load(url, pipe.task, args.requests, args.concurrency))
    row["mean_batch"] = app.state.batcher.stats.mean_batch
    row["runtime"] = pipe.runtime
    server.should_exit = True
    return row


def deployable(folder: Path, runtimes: set[str], scratch: Path) -> Path:
    """`folder` if it has what `runtimes` read; else a copy in `scratch` with the ONNX graphs
    and compiled packages they need exported there."""
    onnx = "onnx" in runtimes and not has_graphs(folder)
    compiled = "compiled" in runtimes and packages_for(folder) is None
    if not (onnx or compiled):
        return folder
    model = load_pretrained(folder)[0]
    copy_model_files(folder, scratch)
    if onnx:
        export_onnx(model, scratch)
    if compiled:
        export_compiled(model, scratch, copy=False)
    return scratch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="run or model folder")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--out", type=Path, help="also write the rows to this JSON file")
    parser.add_argument(
        "--runtimes", default="", help="e.g. torch,compiled,onnx: batching on, each"
    )
    args = parser.parse_args()
    folder = resolve_model_folder(args.run)
    with tempfile.TemporaryDirectory() as scratch:
        if args.runtimes:
            variants = {runtime: (runtime, 16) for runtime in args.runtimes.split(",")}
            folder = deployable(folder, set(variants), Path(scratch))
        else:
            variants = {"batching on": ("torch", 16), "batching off": ("torch", 1)}
        rows = {}
        for name, (runtime, batch) in variants.items():
            pipe = Pipeline.load(folder, runtime=runtime)
            rows[name] = serve_and_load(pipe, folder, batch, args)
    first, second = list(rows)[:2]
    print(f"{pipe.task} model {args.run}: {args.requests} requests, concurrency {args.concurrency}")
    print(f"{'':14}{'req/s':>8}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'errors':>8}{'batch':>7}")
    for name, row in rows.items():
        print(
            f"{name:14}{row['throughput']:8.1f}{row['p50_ms']:9.0f}{row['p95_ms']:9.0f}"
            f"{row['p99_ms']:9.0f}{row['errors']:8d}{row['mean_batch']:7.1f}"
        )
    ratio = rows[first]["throughput"] / rows[second]["throughput"]
    print(f"throughput ratio, {first} / {second}: {ratio:.2f}")
    if args.out:
        command = ["python", "benchmarks/serve_load.py", *sys.argv[1:]]
        result = {"command": shlex.join(command), "model": args.run, "task": pipe.task}
        result |= {"requests": args.requests, "concurrency": args.concurrency}
        result |= {"rows": rows, "throughput_ratio": ratio}
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
