"""`--precision auto`: train under bf16 autocast when that makes this model's step faster here.

Whether bf16 autocast pays depends on the shapes as much as on the size. Measured on a 2-core
CPU with AMX (`benchmarks/precision.py`, samples/s bf16 ÷ fp32): the default 1.15 M captioner
(81 image tokens, captions of ~40 words) 1.27×, the default 1.19 M VQA model (short questions)
0.73×, a 0.84 M captioner over 9 image tokens 0.79×, the small (7.7 M) and base (61 M)
captioners 1.29× and 2.12×. A size alone does not say which, so `auto` does what cuDNN's
autotuner does for convolution algorithms: it times the model's own forward and backward pass
on its first training batch in both precisions and keeps the faster (from `MIN_PARAMETERS` up).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from vtfuse.models.base import TaskModel
from vtfuse.runtime import PRECISIONS, autocast, bf16_is_fast
from vtfuse.training.distributed import Distributed

# Below this many parameters `auto` trains in fp32 without timing anything. The default models
# (1.2 M) are here on purpose: the default captioner's step is 1.27–1.44× faster under bf16 and
# its own captions as good, but in a quickstart the classifier warm-started from a captioner
# trained in bf16 reached 0.930 against 0.978 (in a controlled pair, 0.953 against 0.960:
# benchmarks/warm_start_precision.py; README, Performance), so they keep fp32's numbers until
# more seeds settle it. Every model from 4 M up that was measured (7.7 M, 61 M) trained as well
# in bf16, by the loss, and faster. Tiny models (tests) stay deterministic.
MIN_PARAMETERS = 4_000_000
# bf16 must beat fp32's step by this much: autocast rounds every product, so a model whose two
# steps time the same (within the noise of a few steps) keeps fp32's numbers.
MIN_SPEEDUP = 1.1
TIMED_STEPS = 3  # per precision, after one untimed warm-up each


def choose_precision(
    requested: str,
    model: TaskModel,
    first_batch: Callable[[], dict[str, torch.Tensor]],
    device: torch.device,
    parallel: Distributed | None = None,
    label_smoothing: float = 0.0,
    sharded: bool = False,
) -> tuple[str, float | None]:
    """The precision a run trains in, and the measured speed-up of bf16 over fp32 (None when
    nothing was measured). "fp32" and "bf16" are taken as asked; "auto" is fp32 on hardware
    without bf16 matrix units (`bf16_is_fast`) and for models under `MIN_PARAMETERS`, else bf16
    if its step is at least `MIN_SPEEDUP`× faster on `first_batch()`. A `sharded` (FSDP) model
    may not fit one device whole, so it is not timed: bf16, as every model over 4 M parameters
    measured. Every process of a torchrun job takes the same choice (the speed-ups are averaged
    over the ranks)."""
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r}; choose one of: {', '.join(PRECISIONS)}")
    if requested != "auto":
        return requested, None
    if not bf16_is_fast(device) or model.num_parameters() < MIN_PARAMETERS:
        return "fp32", None
    if sharded:
        return "bf16", None
    speedup = step_speedup(model, first_batch(), device, label_smoothing)
    if parallel is not None and parallel.enabled:
        speedup = parallel.sum(torch.tensor([speedup])).item() / parallel.world
    return ("bf16" if speedup >= MIN_SPEEDUP else "fp32"), speedup


def step_speedup(
    model: TaskModel,
    batch: dict[str, torch.Tensor],
    device: torch.device,
    label_smoothing: float = 0.0,
    steps: int = TIMED_STEPS,
) -> float:
    """fp32's median time for a forward and backward pass ÷ bf16 autocast's, on one batch,
    the two alternating. Leaves the model as it was: no optimiser step, gradients cleared, the
    random streams (dropout) restored."""
    batch = {key: value.to(device) for key, value in batch.items()}
    seconds: dict[str, list[float]] = {"fp32": [], "bf16": []}
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for round_ in range(steps + 1):
            for precision, times in seconds.items():
                elapsed = _time_pass(model, batch, device, precision, label_smoothing)
                if round_:  # the first round warms up both
                    times.append(elapsed)
    model.zero_grad(set_to_none=True)
    return statistics.median(seconds["fp32"]) / statistics.median(seconds["bf16"])


def _time_pass(
    model: TaskModel,
    batch: dict[str, torch.Tensor],
    device: torch.device,
    precision: str,
    label_smoothing: float,
) -> float:
    _synchronize(device)
    start = time.perf_counter()
    with autocast(device, precision):
        loss = model.training_loss(batch, label_smoothing)
    loss.backward()
    _synchronize(device)
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def _synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work (a CPU's is done when the call returns)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
