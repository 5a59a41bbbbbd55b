"""The training loop: read it top to bottom.

`train` sets the run up (`vtfuse.training.setup`), then for each epoch: its steps (each the
micro-batches of one optimiser step, `optimise`), then validation, the `best` and `last`
checkpoints (atomic), and a log line. AdamW with warm-up and cosine decay
(`vtfuse.training.optim`), gradient clipping, non-finite steps skipped, exact resumption from
`last`; the time budget and SIGINT/SIGTERM stop it cleanly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from vtfuse.config import ModelConfig, TrainConfig
from vtfuse.data.images import blank_like
from vtfuse.models.base import TaskModel
from vtfuse.runtime import autocast
from vtfuse.tasks import task_spec, with_task_schedule
from vtfuse.training.batches import Batch, epoch_batches, share_the_step, steps_of
from vtfuse.training.checkpoint import atomic_folder, recover, save_training_state
from vtfuse.training.setup import LOG_FILE, Run, setup


class TrainingDiverged(ValueError):
    """Too many steps in a row with a non-finite loss or gradient."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    epoch: int
    finished: bool  # all epochs done (False when stopped by --max-minutes or a signal)
    best_val_loss: float
    history: list[dict[str, Any]] = field(default_factory=list)


class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks, so it can save before exiting."""

    def __init__(self):
        self.raised = False
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # only the main thread may set handlers
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@torch.no_grad()
def validate(
    model: TaskModel, loader: DataLoader, device: torch.device, precision: str
) -> dict[str, float]:
    """The validation metrics (`val_loss`, ...) and the same with every image blanked
    (`val_blind_loss`, ...): the gap between the two is how much the model uses the image."""
    model.eval()
    totals: dict[str, float] = {}
    count = 0
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        blind = {**batch, "images": blank_like(batch["images"])}
        with autocast(device, precision):
            metrics = {f"val_{k}": v for k, v in model.validation_metrics(batch).items()}
            metrics |= {f"val_blind_{k}": v for k, v in model.validation_metrics(blind).items()}
        size = batch["tokens"].shape[0]
        for name, value in metrics.items():
            totals[name] = totals.get(name, 0.0) + value * size
        count += size
    model.train()
    return {name: value / count for name, value in totals.items()}


BLIND_TOLERANCE = 0.01  # validation loss within 1 % of the blind one: the image is not used


def blindness_warning(entry: dict[str, Any], task: str = "", warm: bool = False) -> str | None:
    """A warning when the model scores no better with the images than with them blanked: the
    fusion has not (yet) learned to look. None while it does look.

    A model that answers, matches or classifies from scratch (`task` not caption, not `warm`)
    is told of the warm start: one answer or label per example is a sparse signal, and on the
    quickstart's scenes a pair classifier trained 3 minutes from scratch stayed at chance
    (0.498) where one started from a captioner reached 0.978 (README: "What the warm start
    buys", benchmarks/results/quickstart_defaults.json)."""
    loss, blind = entry.get("val_loss"), entry.get("val_blind_loss")
    if loss is None or blind is None or blind - loss > BLIND_TOLERANCE * abs(blind):
        return None
    warning = (
        f"the model does not use the image yet: validation loss {loss:.4f}, {blind:.4f} with "
        "every image blanked (README: 'Training on your own data: does the model look?')"
    )
    if task and not task_spec(task).generates and not warm:
        warning += (
            "; a captioner trained first on the same images, given as --init-from RUN, "
            "often teaches it to look sooner"
        )
    return warning


def train(
    task: str,
    train_path: str | Path,
    out: str | Path,
    val_path: str | Path | None = None,
    model_config: ModelConfig | None = None,
    config: TrainConfig | None = None,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    allow_pickle: bool = False,
) -> TrainResult:
    """Train a `task` model on a JSONL file; everything lands in the run folder `out`.
    `allow_pickle`: `--resume` and `init_from`, and the pretrained LM or vision tower the
    model config names, may read pickle weights (see load_pretrained)."""
    model_config = dataclasses.replace(model_config or ModelConfig(), task=task)
    config = with_task_schedule(config or TrainConfig(), task)
    run = setup(
        task, train_path, Path(out), val_path, model_config, config,
        resume, progress, log, allow_pickle,
    )  # fmt: skip
    history: list[dict[str, Any]] = []
    ending = None  # "stopped" (time limit or signal: resume later) or "spent" (the budget's end)
    with _StopFlag() as stop:
        while ending is None and (run.epochs is None or run.state["epoch"] < run.epochs):
            epoch = run.state["epoch"]
            losses, ending = train_epoch(run, stop)
            if ending is None:
                run.state["epoch"] += 1
                run.state["batch_in_epoch"] = 0
            history.append(end_epoch(run, epoch, losses, stopped=ending == "stopped"))
    if run.parallel.any(run.parallel.main and recover(run.out / "best") is None):
        save(run, "best", run.engine.full_model())
    run.say(f"run folder: {run.out}  ({time.monotonic() - run.clock.started:.0f}s)")
    run.parallel.close()
    state = run.state
    return TrainResult(
        run.out, state["step"], state["epoch"], ending != "stopped", state["best_val_loss"], history
    )


def train_epoch(run: Run, stop: _StopFlag) -> tuple[dict[str, torch.Tensor], str | None]:
    """The rest of this epoch's steps → the last step's losses, and why the epoch ended early:
    None (it did not), "spent" (the time budget's planned end) or "stopped" (a time limit
    with epochs set, or a signal)."""
    config, state = run.config, run.state
    epoch = state["epoch"]
    bar = tqdm(
        epoch_batches(run.train_set, epoch, state["batch_in_epoch"], config, run.parallel),
        total=run.batches_per_epoch - state["batch_in_epoch"],
        desc=f"epoch {epoch + 1}" + (f"/{run.epochs}" if run.epochs else ""),
        unit="batch",
        disable=not (run.show_progress and run.parallel.main),
        leave=False,
    )
    tick, seen, losses = time.monotonic(), 0, {}
    for micro_batches in steps_of(bar, config.grad_accum):
        losses = optimise(run, micro_batches)
        seen += sum(batch["tokens"].shape[0] for batch in micro_batches) * run.parallel.world
        rate = seen / max(1e-9, time.monotonic() - tick)
        bar.set_postfix(loss=f"{losses['loss'].item():.4f}", samples_per_s=f"{rate:.0f}")
        if state["step"] % 50 == 0:
            scalars = {name: value.item() for name, value in losses.items()}
            lr = run.scheduler.get_last_lr()[0]
            entry = {"step": state["step"], "epoch": epoch + 1, **scalars, "lr": lr}
            write_log(run, entry | {"samples_per_s": rate})
        out_of_time = config.max_minutes > 0 and run.clock.elapsed() > 60 * config.max_minutes
        if run.parallel.any(out_of_time or stop.raised):  # one collective a step
            bar.close()
            if run.epochs is None and not run.parallel.any(stop.raised):
                return losses, "spent"  # the planned end: validated and saved as an epoch's
            reason = "time limit" if out_of_time else "signal"
            run.say(f"stopping at step {state['step']} ({reason}); resume with --resume")
            return losses, "stopped"
        if config.save_every and state["step"] % config.save_every == 0:
            save(run, "last", run.engine.full_model())
    bar.close()
    return losses, None


def optimise(run: Run, micro_batches: list[Batch]) -> dict[str, torch.Tensor]:
    """One optimiser step over its micro-batches (gradients summed, each loss ÷ their count);
    a non-finite gradient norm skips the step, `max_bad_steps` in a row end the run. → the
    last micro-batch's losses (`loss` and its terms, see `training_losses`)."""
    config, state, engine = run.config, run.state, run.engine
    micro_batches = [
        {k: v.to(run.device, non_blocking=True) for k, v in batch.items()}
        for batch in micro_batches
    ]
    share_the_step(run.model, micro_batches, run.parallel)
    for i, batch in enumerate(micro_batches):
        state["batch_in_epoch"] += 1
        last = i == len(micro_batches) - 1
        # micro-batches before the last of a step keep their gradients to themselves
        with engine.accumulating() if not last else nullcontext():
            with autocast(run.device, config.precision):
                losses = engine.step(batch, config.label_smoothing)
            (losses["loss"] / len(micro_batches)).backward()
    norm = engine.clip_grad_norm(config.grad_clip if config.grad_clip > 0 else math.inf)
    if torch.isfinite(norm):
        run.optimizer.step()
        run.scheduler.step()
        state["step"] += 1
        run.bad_steps = 0
    else:
        skip_step(run)
    run.optimizer.zero_grad(set_to_none=True)
    return losses


def skip_step(run: Run) -> None:
    state = run.state
    run.bad_steps += 1
    state["skipped_steps"] = state.get("skipped_steps", 0) + 1
    write_log(run, {"step": state["step"], "skipped": "non-finite gradient"})
    if run.bad_steps >= run.config.max_bad_steps:
        raise TrainingDiverged(
            f"{run.bad_steps} steps in a row had a non-finite loss or gradient "
            f"(step {state['step']}); lower --lr, or try --precision fp32. "
            f"The last good checkpoint is in {run.out / 'last'}"
        )


def end_epoch(
    run: Run, epoch: int, losses: dict[str, torch.Tensor], stopped: bool
) -> dict[str, Any]:
    """Validate (unless stopped), keep the best weights, log the epoch, save `last`."""
    entry: dict[str, Any] = {
        "step": run.state["step"],
        "epoch": epoch + 1,
        "minutes": round(run.clock.elapsed() / 60, 3),
        **{f"train_{name}": value.item() for name, value in losses.items()},
    }
    whole = run.engine.full_model()  # every rank, together; the model on rank 0
    if run.val_loader is not None and not stopped and whole is not None:
        entry.update(validate(whole, run.val_loader, run.device, run.config.precision))
        if entry["val_loss"] < run.state["best_val_loss"]:
            run.state["best_val_loss"] = entry["val_loss"]
            save(run, "best", whole)
    elif run.val_loader is None and not stopped:
        save(run, "best", whole)  # no validation data: the latest weights are the best known
    write_log(run, entry)
    run.say(
        "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in entry.items())
    )
    if warning := blindness_warning(entry, run.task, bool(run.config.init_from)):
        run.say(f"warning: {warning}")
    save(run, "last", whole)
    return entry


def save(run: Run, name: str, whole: TaskModel | None) -> None:
    """Write checkpoint `name` from `whole` (`engine.full_model()`: None off rank 0); every
    rank calls this (`last` gathers the optimiser's state)."""
    optimizer_state = run.engine.optimizer_state(run.optimizer) if name == "last" else None
    if whole is None:
        return
    state = run.state
    with atomic_folder(run.out / name) as folder:
        whole.save_pretrained(
            folder, run.tokenizer, {"step": state["step"], "epoch": state["epoch"]}
        )
        if optimizer_state is not None:
            progress = {**state, "seconds": run.clock.elapsed()}
            save_training_state(folder, optimizer_state, run.scheduler, progress)


def write_log(run: Run, entry: dict[str, Any]) -> None:
    if run.parallel.main:
        with (run.out / LOG_FILE).open("a") as handle:
            handle.write(json.dumps(entry) + "\n")
