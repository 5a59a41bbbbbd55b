"""Dynamic micro-batching: requests that arrive within a few milliseconds of each other share
one forward pass.

Each request is submitted with a *group* key — requests of one group can be batched together
(e.g. captions with the same beam size) — and awaits its own result. A single worker task
takes the first waiting request, gathers more of its group for up to `max_wait_ms` or until
`max_batch`, and runs the batch function on one inference thread, off the event loop. The
queue is bounded: when it is full, `submit` raises `Busy` at once (the app answers 503 +
Retry-After). A request whose group is `Alone()` runs by itself, without waiting for company,
but in the same queue, under the same bound and on the same worker as the batches.

The inference thread runs PyTorch with `threads` intra-op threads (default 1). PyTorch's
parallel regions (OpenMP) started from a thread other than the main one cost far more, and a
decoding step is a few dozen of them: on the 2-core benchmark machine an in-place add over
200 000 floats took 11.8 µs from the main thread with 2 PyTorch threads, 77.9 µs from a second
thread with 2 and 17.2 µs with 1, and the quickstart's captioner decoded a batch of 16 in 87.7,
233.0 and 110.7 ms (`benchmarks/threads.py`, `benchmarks/results/threads.json`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch


class Alone:
    """A group of one request (every instance differs from every other): for calls that do not
    batch, e.g. a retrieval over the request's own candidates."""

    __slots__ = ()


class Busy(RuntimeError):
    """The queue is full: come back later."""


@dataclass
class _Request:
    group: Hashable
    payload: Any
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


@dataclass
class BatchStats:
    batches: int = 0
    requests: int = 0

    @property
    def mean_batch(self) -> float:
        return self.requests / self.batches if self.batches else 0.0


class MicroBatcher:
    """`await batcher.submit(group, payload)` → that payload's result from
    `run(group, payloads) -> results`, computed in a batch with others of its group."""

    def __init__(
        self,
        run: Callable[[Hashable, Sequence[Any]], Sequence[Any]],
        max_batch: int = 16,
        max_wait_ms: float = 5.0,
        max_queue: int = 256,
        threads: int = 1,
    ):
        if max_batch < 1 or max_wait_ms < 0 or max_queue < 1 or threads < 1:
            raise ValueError(
                "need max_batch >= 1, max_wait_ms >= 0, max_queue >= 1 and threads >= 1"
            )
        self.run, self.max_batch, self.max_wait = run, max_batch, max_wait_ms / 1000
        self.max_queue, self.threads = max_queue, threads
        self._inference: ThreadPoolExecutor | None = None  # the inference thread, once needed
        self.waiting: list[_Request] = []
        self.stats = BatchStats()
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    async def submit(self, group: Hashable, payload: Any) -> Any:
        if len(self.waiting) >= self.max_queue:
            raise Busy(f"{len(self.waiting)} requests are waiting")
        self._ensure_worker()
        future = asyncio.get_running_loop().create_future()
        self.waiting.append(_Request(group, payload, future))
        self._wake.set()
        return await future

    def _ensure_worker(self) -> None:
        if self._worker is None or self._worker.done():
            self._wake = asyncio.Event()
            self._worker = asyncio.create_task(self._serve())

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        if self._inference is not None:
            self._inference.shutdown(wait=False)
            self._inference = None

    async def _serve(self) -> None:
        while True:
            if not self.waiting:
                self._wake.clear()
                await self._wake.wait()
            first = self.waiting[0]
            deadline = first.arrived + self.max_wait
            while (
                not isinstance(first.group, Alone)
                and len(self._group(first.group)) < self.max_batch
            ):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=left)
                except TimeoutError:
                    break
            batch = self._group(first.group)[: self.max_batch]
            for request in batch:
                self.waiting.remove(request)
            await self._run_batch(first.group, batch)

    def _thread(self) -> ThreadPoolExecutor:
        if self._inference is None:
            self._inference = ThreadPoolExecutor(
                1, "vtfuse-inference", initializer=torch.set_num_threads, initargs=(self.threads,)
            )
        return self._inference

    def _group(self, group: Hashable) -> list[_Request]:
        return [r for r in self.waiting if r.group == group]

    async def _run_batch(self, group: Hashable, batch: list[_Request]) -> None:
        self.stats.batches += 1
        self.stats.requests += len(batch)
        try:
            payloads = [r.payload for r in batch]
            loop = asyncio.get_running_loop()
            results = await loop.run_in_executor(self._thread(), self.run, group, payloads)
        except Exception as error:  # every request of the batch gets the error
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(error)
            return
        for request, result in zip(batch, results, strict=True):
            if not request.future.done():
                request.future.set_result(result)
