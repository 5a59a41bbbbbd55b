"""`vtfuse serve` under load and faults: a separate server process, C clients for S seconds,
then clients that misbehave, each followed by a check that the server still answers.

    python benchmarks/serve_faults.py RUN [--clients 200] [--seconds 60] [--max-batch 16]
        [--max-wait-ms 5] [--max-queue 256] [--slow-seconds 10]
        [--out benchmarks/results/serve_faults.json]

RUN is a run or model folder of a captioning or VQA model (a joint one captions). The server
is `python -m vtfuse serve RUN` in its own process (its memory read from /proc/PID/status,
every 0.5 s); it inherits the environment, so `OMP_NUM_THREADS=1 python benchmarks/...` sets
its threads. Load: every client POSTs /v1/caption (or /v1/ask) with its own small PNG in a
loop and waits Retry-After on a 503; "unexpected" is any answer but 200 and 503 +
Retry-After, or no answer. Faults, each followed by GET /healthz and a normal request:
  disconnect      headers and half a multipart body on a raw socket, then close (×20)
  disconnect_wait the whole body, then close before the answer (×20)
  slow_loris      a body sent a few bytes a second for --slow-seconds, normal requests
                  meanwhile (their latency against a quiet baseline), then the rest of it
  model_raises    the model call raises: no request reaches that in-band, so a second
                  server, in this process (create_app), on a Pipeline whose model call is
                  patched to raise; the answer must be a JSON error, the next one a 200
  truncated_png, truncated_jpeg, not_an_image, text_body   bad bodies: 415 expected
The clients share the machine with the server: figures are of this machine, this day.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import logging
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import uvicorn
from PIL import Image

from vtfuse.pipeline import Pipeline
from vtfuse.serving import ServeSettings, create_app
from vtfuse.training.checkpoint import resolve_model_folder

QUESTION = "what colour is the circle?"
BOUNDARY = "vtfuse-serve-faults"
RETRY = "503 + Retry-After"


# -- the server ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(args: argparse.Namespace, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "vtfuse",
        "serve",
        args.run,
        "--port",
        str(port),
        "--max-batch",
        str(args.max_batch),
        "--max-wait-ms",
        str(args.max_wait_ms),
        "--max-queue",
        str(args.max_queue),
    ]


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"no answer from {url}/healthz in {timeout:.0f} s")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def memory_mib(pid: int) -> dict[str, float | None]:
    """VmRSS (now) and VmHWM (the peak since the process started), in MiB; None once the
    process is gone."""
    values: dict[str, float | None] = {"VmRSS": None, "VmHWM": None}
    status = Path(f"/proc/{pid}/status")
    if not status.exists():
        return values
    for line in status.read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = round(int(rest.split()[0]) / 1024, 1)
    return values


class ServerLog:
    """The server's stdout and stderr, in a file; `since_mark()` → the tracebacks since the
    last mark (each as its last line, the exception)."""

    def __init__(self):
        self.path = Path(tempfile.mkdtemp(prefix="serve_faults_")) / "server.log"
        self.offset = 0

    def text(self) -> str:
        return self.path.read_text(errors="replace")

    def since_mark(self) -> list[str]:
        text = self.text()
        new, self.offset = text[self.offset :], len(text)
        return exceptions(new)


def exceptions(text: str) -> list[str]:
    """The exception line that ends each traceback in `text`."""
    found, inside = [], False
    for line in text.splitlines():
        if line.startswith("Traceback"):
            inside = True
        elif inside and line and not line.startswith((" ", "\t")):
            found.append(line.strip())
            inside = False
    return found


# -- requests -----------------------------------------------------------------------------------
def png(i: int, size: int = 72) -> bytes:
    """A small PNG of its own colour."""
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (i * 37 % 256, i * 91 % 256, i * 53 % 256)).save(buffer, "PNG")
    return buffer.getvalue()


def noisy(kind: str, size: int = 160) -> bytes:
    """A picture of noise (so its file is large enough to cut) as PNG or JPEG."""
    image = Image.frombytes("RGB", (size, size), os.urandom(size * size * 3))
    buffer = io.BytesIO()
    image.save(buffer, kind)
    return buffer.getvalue()


class Endpoint:
    """The path and form fields of a normal request for the model's task."""

    def __init__(self, capabilities: list[str]):
        if "caption" in capabilities:
            self.path, self.fields = "/v1/caption", {}
        elif "vqa" in capabilities:
            self.path, self.fields = "/v1/ask", {"question": QUESTION}
        else:
            raise SystemExit(f"needs a caption or vqa model, not one for {capabilities}")

    async def post(self, client: httpx.AsyncClient, url: str, image: bytes) -> httpx.Response:
        files = {"image": ("x.png", image, "image/png")}
        return await client.post(url + self.path, files=files, data=self.fields)

    def multipart(self, image: bytes, kind: str = "image/png") -> bytes:
        parts = [
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
            for k, v in self.fields.items()
        ]
        parts.append(
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; "
            f'name="image"; filename="x.png"\r\nContent-Type: {kind}\r\n\r\n'.encode()
            + image
            + b"\r\n"
        )
        return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()

    def head(self, port: int, length: int) -> bytes:
        return (
            f"POST {self.path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            f"Content-Length: {length}\r\nConnection: close\r\n\r\n"
        ).encode()


def status_of(response: httpx.Response) -> str:
    if response.status_code == 503 and "retry-after" in response.headers:
        return RETRY
    return str(response.status_code)


def percentiles_ms(latencies: list[float]) -> dict[str, float | None]:
    if len(latencies) < 2:
        value = round(1000 * latencies[0], 1) if latencies else None
        return {"p50_ms": value, "p95_ms": value, "p99_ms": value}
    q = statistics.quantiles(latencies, n=100)
    return {f"p{p}_ms": round(1000 * q[p - 1], 1) for p in (50, 95, 99)}


async def healthy(client: httpx.AsyncClient, url: str, endpoint: Endpoint) -> bool:
    """GET /healthz and a normal request both answer 200."""
    try:
        health = await client.get(url + "/healthz")
        normal = await endpoint.post(client, url, png(7))
    except httpx.HTTPError:
        return False
    return health.status_code == 200 and normal.status_code == 200


# -- load ---------------------------------------------------------------------------------------
async def sample_memory(pid: int, stop: asyncio.Event, samples: list[float]) -> None:
    while not stop.is_set():
        rss = memory_mib(pid)["VmRSS"]
        if rss is not None:
            samples.append(rss)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=0.5)


async def load(url: str, endpoint: Endpoint, clients: int, seconds: float, pid: int) -> dict:
    answers: list[tuple[float, str]] = []  # (latency in s, status)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    end = time.perf_counter() + seconds

    async def one_client(client: httpx.AsyncClient, image: bytes) -> None:
        while time.perf_counter() < end:
            began = time.perf_counter()
            try:
                response = await endpoint.post(client, url, image)
                status = status_of(response)
            except httpx.HTTPError as error:
                response, status = None, type(error).__name__
            answers.append((time.perf_counter() - began, status))
            if status == RETRY:
                wait = float(response.headers["retry-after"])
                await asyncio.sleep(min(wait, max(0.0, end - time.perf_counter())))

    finished, samples = asyncio.Event(), []
    start_memory = memory_mib(pid)
    sampler = asyncio.create_task(sample_memory(pid, finished, samples))
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        before = (await client.get(url + "/v1/model")).json()
        began = time.perf_counter()
        await asyncio.gather(*(one_client(client, png(i)) for i in range(clients)))
        wall = time.perf_counter() - began
        after = (await client.get(url + "/v1/model")).json()
    finished.set()
    await sampler
    end_memory = memory_mib(pid)
    counts = Counter(status for _, status in answers)
    ok = [latency for latency, status in answers if status == "200"]
    batches = after["batches"] - before["batches"]
    batched = after["mean_batch"] * after["batches"] - before["mean_batch"] * before["batches"]
    return {
        "requests": len(answers),
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(answers) / wall, 2),
        "ok_per_s": round(len(ok) / wall, 2),
        **percentiles_ms(ok),
        "by_status": dict(counts),
        "unexpected_errors": sum(n for s, n in counts.items() if s not in ("200", RETRY)),
        "mean_batch": round(batched / batches, 2) if batches else None,
        "rss_start_mib": start_memory["VmRSS"],
        "rss_end_mib": end_memory["VmRSS"],
        "rss_peak_sampled_mib": max(samples, default=end_memory["VmRSS"]),
        "hwm_end_mib": end_memory["VmHWM"],
        "rss_samples_mib": samples,
    }


# -- faults -------------------------------------------------------------------------------------
async def disconnect(port: int, endpoint: Endpoint, whole_body: bool, times: int = 20) -> dict:
    """Clients that leave: half the body (the server is reading it) or all of it (the server
    is computing the answer), then close."""
    body = endpoint.multipart(png(3))
    sent = body if whole_body else body[: len(body) // 2]
    for _ in range(times):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(endpoint.head(port, len(body)) + sent)
        await writer.drain()
        if whole_body:
            await asyncio.sleep(0.001)
        writer.close()
        await writer.wait_closed()
    await asyncio.sleep(0.5)  # the server notices
    return {"times": times, "answered": None, "expected": "no answer (the client left)"}


async def read_status(reader: asyncio.StreamReader) -> int | None:
    line = await reader.readline()
    parts = line.split()
    return int(parts[1]) if len(parts) > 1 else None


async def slow_loris(
    url: str, port: int, endpoint: Endpoint, client: httpx.AsyncClient, seconds: float
) -> dict:
    """A body dribbled at 4 bytes every 0.5 s for `seconds`, then the rest; meanwhile one
    client's normal requests, one after another (latency against a quiet baseline)."""

    async def normal_latencies(until: Callable[[], bool], at_most: int = 10**9) -> list:
        found = []
        while not until() and len(found) < at_most:
            began = time.perf_counter()
            response = await endpoint.post(client, url, png(len(found)))
            found.append((time.perf_counter() - began, response.status_code))
        return found

    baseline = await normal_latencies(lambda: False, at_most=10)
    body = endpoint.multipart(png(5))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(endpoint.head(port, len(body)))
    done = False

    async def dribble() -> tuple[int, int | None, float]:
        nonlocal done
        began, sent = time.perf_counter(), 0
        while time.perf_counter() - began < seconds and sent < len(body) - 1:
            writer.write(body[sent : sent + 4])
            await writer.drain()
            sent += 4
            await asyncio.sleep(0.5)
        done = True
        writer.write(body[sent:])
        await writer.drain()
        status = await asyncio.wait_for(read_status(reader), timeout=60)
        writer.close()
        return sent, status, time.perf_counter() - began

    (slow_sent, slow_status, slow_time), during = await asyncio.gather(
        dribble(), normal_latencies(lambda: done)
    )
    return {
        "answered": slow_status,
        "expected": [200],
        "dribbled_bytes": slow_sent,
        "body_bytes": len(body),
        "slow_request_s": round(slow_time, 1),
        "normal_during": len(during),
        "normal_during_all_200": all(status == 200 for _, status in during),
        "baseline_p50_ms": percentiles_ms([t for t, _ in baseline])["p50_ms"],
        "during_p50_ms": percentiles_ms([t for t, _ in during])["p50_ms"],
        "during_max_ms": round(1000 * max((t for t, _ in during), default=0), 1),
    }


async def bad_body(client: httpx.AsyncClient, url: str, endpoint: Endpoint, kind: str) -> dict:
    if kind == "text_body":
        response = await client.post(
            url + endpoint.path, content=b"hello", headers={"content-type": "text/plain"}
        )
    else:
        data = {
            "truncated_png": lambda: noisy("PNG")[:-2000],
            "truncated_jpeg": lambda: noisy("JPEG")[:-2000],
            "not_an_image": lambda: b"this is text, not a picture\n" * 20,
        }[kind]()
        response = await endpoint.post(client, url, data)
    return {"answered": response.status_code, "expected": [415], **error_body(response)}


def error_body(response: httpx.Response) -> dict:
    try:
        return {"json_error": response.json().get("error")}
    except (json.JSONDecodeError, AttributeError):
        return {"json_error": None, "body": response.text[:200]}


class Raising:
    """A stand-in for a model call that raises while `on`, else calls the real one."""

    def __init__(self, real: Callable):
        self.real, self.on, self.calls = real, False, 0

    def __call__(self, *args, **kwargs):
        if self.on:
            self.calls += 1
            raise RuntimeError("injected fault: the model call failed")
        return self.real(*args, **kwargs)


class Captured(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        info = record.exc_info
        self.records.append(f"{info[0].__name__}: {info[1]}" if info else record.getMessage())


async def model_raises(folder: Path, args: argparse.Namespace, endpoint: Endpoint) -> dict:
    """A server in this process on a Pipeline whose model call raises: 4 requests at once
    while it raises, then one after."""
    pipe = Pipeline.load(folder, "cpu")
    name = "generate" if endpoint.path == "/v1/caption" else "answer_probabilities"
    raising = Raising(getattr(pipe, name))
    setattr(pipe, name, raising)
    settings = ServeSettings(args.max_batch, args.max_wait_ms, args.max_queue)
    app = create_app(pipe, settings, folder)
    captured = Captured()
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(captured)
    logger.propagate = False
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        await asyncio.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(timeout=60) as client:
            raising.on = True
            failed = await asyncio.gather(*(endpoint.post(client, url, png(i)) for i in range(4)))
            raising.on = False
            after = await healthy(client, url, endpoint)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        logger.removeHandler(captured)
        logger.propagate = True
    return {
        "answered": sorted({r.status_code for r in failed}),
        "expected": "a JSON error (4xx or 5xx), not a dropped connection",
        "json_errors": sorted({str(error_body(r)["json_error"]) for r in failed}),
        "model_calls_failed": raising.calls,
        "server_logged": captured.records,
        "healthy_after": after,
        "note": f"in-process create_app with Pipeline.{name} patched to raise",
    }


async def faults(url: str, port: int, endpoint: Endpoint, log: ServerLog, args) -> list[dict]:
    found = []

    async def record(name: str, outcome: dict, client: httpx.AsyncClient) -> None:
        outcome["healthy_after"] = await healthy(client, url, endpoint)
        outcome["server_logged"] = log.since_mark()
        found.append({"fault": name, **outcome})
        print(f"  {name}: {outcome.get('answered')}, healthy after: {outcome['healthy_after']}")

    log.since_mark()
    async with httpx.AsyncClient(timeout=60) as client:
        await record("disconnect", await disconnect(port, endpoint, whole_body=False), client)
        await record("disconnect_wait", await disconnect(port, endpoint, whole_body=True), client)
        slow = await slow_loris(url, port, endpoint, client, args.slow_seconds)
        await record("slow_loris", slow, client)
        for kind in ("truncated_png", "truncated_jpeg", "not_an_image", "text_body"):
            await record(kind, await bad_body(client, url, endpoint, kind), client)
    return found


def passed(fault: dict) -> bool:
    expected = fault["expected"]
    if fault["fault"] == "model_raises":
        answered = all(400 <= s < 600 for s in fault["answered"])
        return answered and None not in fault.get("json_errors", []) and fault["healthy_after"]
    if fault["fault"] == "slow_loris" and not fault["normal_during_all_200"]:
        return False
    answered = not isinstance(expected, list) or fault["answered"] in expected
    return answered and fault["healthy_after"]


# -- the run ------------------------------------------------------------------------------------
async def measure(args: argparse.Namespace, port: int, pid: int, log: ServerLog) -> dict:
    url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(timeout=60) as client:
        info = (await client.get(url + "/v1/model")).json()
        endpoint = Endpoint(info["capabilities"])
        for i in range(8):  # warm-up
            await endpoint.post(client, url, png(1000 + i))
    print(f"load: {args.clients} clients for {args.seconds:g} s on {endpoint.path}")
    figures = await load(url, endpoint, args.clients, args.seconds, pid)
    load_log = log.since_mark()
    print("faults:")
    found = await faults(url, port, endpoint, log, args)
    folder = resolve_model_folder(args.run)
    found.append({"fault": "model_raises", **await model_raises(folder, args, endpoint)})
    print(f"  model_raises: {found[-1]['answered']}, healthy after: {found[-1]['healthy_after']}")
    for fault in found:
        fault["passed"] = passed(fault)
    return {
        "model": {k: info[k] for k in ("task", "capabilities", "parameters")},
        "endpoint": endpoint.path,
        "load": {**figures, "server_logged": load_log},
        "faults": found,
        "memory_after_mib": memory_mib(pid),
    }


def report(result: dict) -> None:
    load = result["load"]
    print(f"\n{result['model']['task']} model, {result['endpoint']}: {result['settings']}")
    print(
        f"load: {load['requests']} requests in {load['wall_s']} s = {load['requests_per_s']}/s "
        f"(200: {load['ok_per_s']}/s); p50 {load['p50_ms']} ms, p95 {load['p95_ms']} ms, "
        f"p99 {load['p99_ms']} ms; mean batch {load['mean_batch']}"
    )
    print(f"  by status: {load['by_status']}; unexpected errors: {load['unexpected_errors']}")
    print(
        f"  RSS MiB: start {load['rss_start_mib']}, peak {load['rss_peak_sampled_mib']}, "
        f"end {load['rss_end_mib']} (VmHWM {load['hwm_end_mib']})"
    )
    print(f"{'fault':17}{'answered':>12}{'healthy':>9}{'passed':>8}  server log")
    for fault in result["faults"]:
        logged = Counter(fault["server_logged"])
        text = "; ".join(f"{n}× {line[:60]}" for line, n in logged.items()) or "-"
        print(
            f"{fault['fault']:17}{fault['answered']!s:>12}{fault['healthy_after']!s:>9}"
            f"{fault['passed']!s:>8}  {text}"
        )
    slow = next(f for f in result["faults"] if f["fault"] == "slow_loris")
    print(
        f"slow loris: {slow['normal_during']} normal requests meanwhile, p50 "
        f"{slow['during_p50_ms']} ms (quiet: {slow['baseline_p50_ms']} ms), "
        f"max {slow['during_max_ms']} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="run or model folder (caption or vqa)")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--max-queue", type=int, default=256, help="waiting requests before 503")
    parser.add_argument("--slow-seconds", type=float, default=10, help="the slow-loris upload")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serve_faults.json"))
    args = parser.parse_args()
    port, log = free_port(), ServerLog()
    command = serve_command(args, port)
    print(f"server: {shlex.join(command)}  (log: {log.path})")
    with log.path.open("w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
        try:
            wait_healthy(f"http://127.0.0.1:{port}", process)
            result = asyncio.run(measure(args, port, process.pid, log))
        finally:
            alive = process.poll() is None
            stop(process)
    result = {
        "command": shlex.join(["python", "benchmarks/serve_faults.py", *sys.argv[1:]]),
        "server_command": shlex.join(["python", *command[1:]]),
        "settings": {
            "clients": args.clients,
            "seconds": args.seconds,
            "max_batch": args.max_batch,
            "max_wait_ms": args.max_wait_ms,
            "max_queue": args.max_queue,
            "slow_seconds": args.slow_seconds,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "cpus": os.cpu_count(),
        },
        **result,
        "server_alive_at_end": alive,
        "server_exit_code": process.returncode,  # -15: the SIGTERM that ended it
        "server_tracebacks": exceptions(log.text()),
        "server_log": str(log.path),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    report(result)
    print(f"→ {args.out}")


if __name__ == "__main__":
    main()
