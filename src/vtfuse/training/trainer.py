"""The training loop: read it top to bottom.

AdamW (weight decay on every parameter of two or more dimensions — matrices, embeddings,
position tables — none on norms and biases, as nanoGPT does), linear warm-up then cosine
decay, gradient clipping, validation every epoch, `best` and `last` checkpoints written
atomically, and exact resumption from `last`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from vtfuse.config import ModelConfig, TrainConfig, from_dict, to_dict
from vtfuse.data.bank import ImageTextDataset, load_records
from vtfuse.data.images import blank_like
from vtfuse.data.items import collate
from vtfuse.data.shards import ShardDataset, is_shard_folder, shard_records
from vtfuse.data.tokenizer import AnyTokenizer, Tokenizer, normalise_answer
from vtfuse.grad_checkpointing import set_grad_checkpointing
from vtfuse.models.base import TaskModel, create_model, load_pretrained, warm_start
from vtfuse.runtime import autocast, resolve_device, seed_everything
from vtfuse.tasks import read_jsonl, task_dataset, task_spec
from vtfuse.training.checkpoint import (
    atomic_folder,
    load_training_state,
    recover,
    resolve_model_folder,
    save_training_state,
)
from vtfuse.training.distributed import (
    DataParallel,
    Distributed,
    GlobalBatchSampler,
    examples_per_rank,
)

RUN_FILE, LOG_FILE = "run.json", "log.jsonl"


def build_tokenizer(task: str, records, model_config: ModelConfig) -> AnyTokenizer:
    """A pretrained LM's own tokenizer, or a word vocabulary built from the training text;
    for VQA, with the answers seen in training."""
    spec = task_spec(task)
    answers = sorted({normalise_answer(r.fields[spec.label]) for r in records if spec.label})
    if model_config.lm.name:
        from vtfuse.models.pretrained_lm import load_lm_tokenizer

        return load_lm_tokenizer(model_config.lm.name, answers)
    texts = (text for record in records for text in spec.texts(record))
    return Tokenizer.build(texts, answers=answers)


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """Weight decay on every tensor of two or more dimensions — weight matrices and convolution
    kernels, and also the token embeddings and the learned position tables — and none on
    vectors (norms' gains and biases, scalar temperatures and gates).

    The fused AdamW (one kernel over all tensors; transformers' Trainer default too) where the
    parameters' device has it: on this project's 2-core CPU benchmark it steps a 7.7M-parameter
    captioner in 12 ms against 35 ms for the per-tensor loop."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98), fused=fused)


def warmup_cosine(total_steps: int, config: TrainConfig) -> Callable[[int], float]:
    """lr multiplier: linear warm-up to 1, then cosine decay to `min_lr_ratio` (Loshchilov &
    Hutter 2017, without restarts)."""
    warmup = max(1, round(total_steps * config.warmup_ratio))

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return cosine_decay(min(1.0, (step - warmup) / max(1, total_steps - warmup)), config)

    return multiplier


def cosine_decay(progress: float, config: TrainConfig) -> float:
    """From 1 at progress 0 to `min_lr_ratio` at progress 1 along half a cosine."""
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine


def warmup_cosine_on_the_clock(
    elapsed: Callable[[], float], config: TrainConfig
) -> Callable[[int], float]:
    """The same schedule over the time budget instead of the steps: progress is the share of
    `max_minutes` spent (`elapsed()`, in seconds), so a run ends annealed whatever its speed —
    a budget cut by a fixed step count would stop a slow machine mid-decay, or leave a fast
    one idle. The first `warmup_ratio` of the budget warms up."""
    budget = 60 * config.max_minutes

    def multiplier(step: int) -> float:
        spent = min(1.0, elapsed() / budget)
        if spent < config.warmup_ratio:
            return max(spent / config.warmup_ratio, 1e-3)
        decaying = (spent - config.warmup_ratio) / max(1e-9, 1 - config.warmup_ratio)
        return cosine_decay(decaying, config)

    return multiplier


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


def write_run_file(
    out: Path,
    task: str,
    train_path: str,
    val_path: str | None,
    model_config: ModelConfig,
    train_config: TrainConfig,
) -> None:
    data = {
        "task": task,
        "train": str(Path(train_path).resolve()),
        "val": str(Path(val_path).resolve()) if val_path else None,
        "model": to_dict(model_config),
        "train_config": to_dict(train_config),
    }
    (out / RUN_FILE).write_text(json.dumps(data, indent=2) + "\n")


def read_run_file(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no {RUN_FILE}: not a vtfuse run folder")
    data = json.loads(path.read_text())
    data["model"] = from_dict(ModelConfig, data["model"], where=f"{path}: model")
    data["train_config"] = from_dict(
        TrainConfig, data["train_config"], where=f"{path}: train_config"
    )
    return data


SINGLE_PROCESS = Distributed()
Batch = dict[str, torch.Tensor]


def micro_batches_per_epoch(examples: int, config: TrainConfig, parallel: Distributed) -> int:
    """Batches each process reads per epoch (several make one step with `grad_accum`)."""
    mine = examples_per_rank(examples, config.batch_size, parallel.world)
    return math.ceil(mine / config.batch_size)


def steps_of(batches: Iterable[Batch], size: int) -> Iterator[list[Batch]]:
    """Consecutive groups of `size` micro-batches, one optimiser step each (the last of an
    epoch may be shorter)."""
    batches = iter(batches)
    while group := list(itertools.islice(batches, size)):
        yield group


def share_the_step(model: TaskModel, micro_batches: list[Batch], parallel: Distributed) -> None:
    """Give every micro-batch of a step `targets_per_batch`: the mean, over the step's
    micro-batches and ranks, of the targets they score (`TaskModel.scored_targets`). The losses
    that average over what a batch happens to hold (caption tokens, answerable questions)
    divide their sum by it, so K micro-batches on N ranks step as one batch of them all."""
    counts = [model.scored_targets(batch) for batch in micro_batches]
    if any(count is None for count in counts):
        return
    total = parallel.sum(torch.stack(counts).sum().float())
    per_batch = total / (len(micro_batches) * parallel.world)
    for batch in micro_batches:
        batch["targets_per_batch"] = per_batch


def epoch_batches(
    train_set: ImageTextDataset | ShardDataset,
    epoch: int,
    skip: int,
    config: TrainConfig,
    parallel: Distributed = SINGLE_PROCESS,
) -> Iterable[dict[str, torch.Tensor]]:
    """This process's batches of one epoch after the first `skip` (resuming mid-epoch). In
    memory: the examples of an image stand together in a seeded shuffled order, or in file
    order without `shuffle`, each process taking its slice of every global batch
    (`GlobalBatchSampler`). Streamed: the shards' order, shuffled the same way."""
    if isinstance(train_set, ShardDataset):
        train_set.set_epoch(epoch)
        loader = DataLoader(
            train_set,
            batch_size=config.batch_size,
            collate_fn=collate,
            num_workers=config.num_workers,
        )
        return itertools.islice(loader, skip, None)
    sampler = GlobalBatchSampler(
        train_set.image_ids,
        config.batch_size,
        parallel,
        config.shuffle,
        config.seed,
        skip,
        per_image=config.examples_per_image,
    )
    sampler.set_epoch(epoch)
    return DataLoader(
        train_set,
        batch_size=config.batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=config.num_workers,
    )


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
    quickstart's scenes a pair classifier trained 1.5 minutes from scratch stayed at chance
    (0.50) where one started from a captioner reached 0.99 (README: "What the quickstart
    does")."""
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


def _engine(config: TrainConfig) -> type:
    """How a step runs over the processes: DDP (or one process), or FSDP with --fsdp."""
    if not config.fsdp:
        return DataParallel
    from vtfuse.training.fsdp import FullyShardedParallel

    return FullyShardedParallel


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
    out = Path(out)
    config = config or TrainConfig()
    started = time.monotonic()
    seed_everything(config.seed)
    device = resolve_device(config.device)
    parallel = Distributed.from_environment(device)
    device = parallel.device(device)
    say = log if parallel.main else (lambda message: None)  # one voice: rank 0's
    model_config = dataclasses.replace(model_config or ModelConfig(), task=task)

    # -- data -----------------------------------------------------------------------------
    streaming = is_shard_folder(train_path)
    if streaming and parallel.enabled:
        raise ValueError(
            "training from shards runs in one process for now; use JSONL with torchrun"
        )
    train_records = (
        shard_records(train_path, task)
        if streaming
        else read_jsonl(train_path, task, roots=config.image_roots)
    )
    last_dir = recover(out / "last") if resume else None
    if resume and last_dir is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {out}/last to resume from")
    if last_dir is not None:
        model, tokenizer = load_pretrained(last_dir, device, allow_pickle)
        model_config = model.config
    else:
        tokenizer = build_tokenizer(task, train_records, model_config)
        text = dataclasses.replace(model_config.text, vocab_size=len(tokenizer))
        model_config = dataclasses.replace(
            model_config, text=text, num_answers=len(tokenizer.answers)
        )
        if model_config.lm.name and model_config.lm.image_token_id < 0:
            # each caption's start token opens its image: few-shot prompts interleave them
            lm = dataclasses.replace(model_config.lm, image_token_id=tokenizer.bos_id)
            model_config = dataclasses.replace(model_config, lm=lm)
        model = create_model(model_config, allow_pickle)
        if config.init_from:
            source = resolve_model_folder(config.init_from)
            copied = warm_start(model, tokenizer, source, allow_pickle)
            say(
                f"warm start from {source}: {copied.tensors} weights and {copied.words} word "
                f"embeddings copied, {len(copied.left)} source weights had no match"
            )
        model = model.to(device)
    if config.grad_checkpointing:
        parts = set_grad_checkpointing(model)
        say(f"gradient checkpointing in: {', '.join(parts) or 'nothing (no part supports it)'}")
    model.train()
    size, max_length = model_config.vision.image_size, model_config.text.max_length
    frames = model_config.vision.frames
    if streaming:  # decoded as they stream, once per epoch
        train_set = ShardDataset(
            train_path, task, tokenizer, max_length, size, config.shuffle, config.seed, frames
        )
    else:
        loaded = load_records(train_records, size, config.skip_bad, progress, frames)
        train_set = task_dataset(task, loaded, tokenizer, max_length)
        if loaded.skipped:
            say(
                f"skipped {len(loaded.skipped)} training example(s) with a bad image, "
                f"e.g. {loaded.skipped[0]}"
            )
    val_loader = None
    if val_path:
        val_records = read_jsonl(val_path, task, roots=config.image_roots)
        val_loaded = load_records(val_records, size, config.skip_bad, progress, frames)
        val_loader = DataLoader(
            task_dataset(task, val_loaded, tokenizer, max_length),
            batch_size=config.eval_batch_size,
            collate_fn=collate,
        )

    # -- optimisation -----------------------------------------------------------------------
    accumulate = config.grad_accum
    batches_per_epoch = micro_batches_per_epoch(len(train_set), config, parallel)
    steps_per_epoch = math.ceil(batches_per_epoch / accumulate)
    epochs = config.epoch_count  # None: as many as the time budget allows
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best_val_loss": float("inf")}
    state["seconds"] = 0.0  # spent in earlier processes of this run (before a --resume)

    def elapsed() -> float:
        """Seconds this run has spent: in earlier processes and in this one."""
        return state["seconds"] + time.monotonic() - started

    engine = _engine(config)(model, parallel, device)  # before the optimiser: FSDP swaps params
    optimizer = make_optimizer(model, config)
    schedule = (
        warmup_cosine(steps_per_epoch * epochs, config)
        if epochs
        else warmup_cosine_on_the_clock(elapsed, config)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    if last_dir is not None:
        # a state saved before "seconds" existed keeps the 0.0 above
        state |= load_training_state(last_dir, optimizer, scheduler, engine.load_optimizer_state)
        say(f"resumed from {last_dir} at step {state['step']} (epoch {state['epoch'] + 1})")
    elif parallel.main:
        out.mkdir(parents=True, exist_ok=True)
        write_run_file(
            out, task, str(train_path), str(val_path) if val_path else None, model_config, config
        )
        (out / LOG_FILE).write_text("")
    total, trainable = model.num_parameters(), model.num_parameters(trainable_only=True)
    processes = f" × {parallel.world} processes" if parallel.enabled else ""
    processes += " (FSDP)" if config.fsdp else ""
    say(
        f"{task} model: {total / 1e6:.2f}M parameters ({trainable / 1e6:.2f}M trainable), "
        f"{len(train_set)} training examples, "
        + (
            f"{steps_per_epoch * epochs} steps"
            if epochs
            else f"{config.max_minutes:g} minutes (the schedule follows the clock)"
        )
        + f" on {device}{processes}"
    )

    def save(name: str, whole: TaskModel | None) -> None:
        """Write checkpoint `name` from `whole` (`engine.full_model()`: None off rank 0); every
        rank calls this (`last` gathers the optimiser's state)."""
        optimizer_state = engine.optimizer_state(optimizer) if name == "last" else None
        if whole is None:
            return
        with atomic_folder(out / name) as folder:
            trained = {"step": state["step"], "epoch": state["epoch"]}
            whole.save_pretrained(folder, tokenizer, trained)
            if optimizer_state is not None:
                save_training_state(
                    folder, optimizer_state, scheduler, {**state, "seconds": elapsed()}
                )

    def write_log(entry: dict[str, Any]) -> None:
        if parallel.main:
            with (out / LOG_FILE).open("a") as handle:
                handle.write(json.dumps(entry) + "\n")

    history: list[dict[str, Any]] = []
    stopped, spent, bad_steps = False, False, 0
    with _StopFlag() as stop:
        while (epochs is None or state["epoch"] < epochs) and not (stopped or spent):
            epoch = state["epoch"]
            loader = epoch_batches(train_set, epoch, state["batch_in_epoch"], config, parallel)
            bar = tqdm(
                loader,
                total=batches_per_epoch - state["batch_in_epoch"],
                desc=f"epoch {epoch + 1}" + (f"/{epochs}" if epochs else ""),
                unit="batch",
                disable=not (progress and parallel.main),
                leave=False,
            )
            tick, seen = time.monotonic(), 0
            for micro_batches in steps_of(bar, accumulate):
                micro_batches = [
                    {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                    for batch in micro_batches
                ]
                share_the_step(model, micro_batches, parallel)
                for i, batch in enumerate(micro_batches):
                    state["batch_in_epoch"] += 1
                    last = i == len(micro_batches) - 1
                    # micro-batches before the last of a step keep their gradients to themselves
                    with engine.accumulating() if not last else nullcontext():
                        with autocast(device, config.precision):
                            losses = engine.step(batch, config.label_smoothing)
                        loss = losses["loss"]  # beside it, its terms (see training_losses)
                        (loss / len(micro_batches)).backward()
                    seen += batch["tokens"].shape[0] * parallel.world
                # the global gradient norm (clipped if asked): non-finite → skip the step
                limit = config.grad_clip if config.grad_clip > 0 else math.inf
                norm = engine.clip_grad_norm(limit)
                if torch.isfinite(norm):
                    optimizer.step()
                    scheduler.step()
                    state["step"] += 1
                    bad_steps = 0
                else:
                    bad_steps += 1
                    state["skipped_steps"] = state.get("skipped_steps", 0) + 1
                    write_log({"step": state["step"], "skipped": "non-finite gradient"})
                    if bad_steps >= config.max_bad_steps:
                        raise TrainingDiverged(
                            f"{bad_steps} steps in a row had a non-finite loss or gradient "
                            f"(step {state['step']}); lower --lr, or try --precision fp32. "
                            f"The last good checkpoint is in {out / 'last'}"
                        )
                optimizer.zero_grad(set_to_none=True)
                rate = seen / max(1e-9, time.monotonic() - tick)
                bar.set_postfix(loss=f"{loss.item():.4f}", samples_per_s=f"{rate:.0f}")
                if state["step"] % 50 == 0:
                    write_log(
                        {
                            "step": state["step"],
                            "epoch": epoch + 1,
                            **{name: value.item() for name, value in losses.items()},
                            "lr": scheduler.get_last_lr()[0],
                            "samples_per_s": rate,
                        }
                    )
                out_of_time = config.max_minutes > 0 and elapsed() > 60 * config.max_minutes
                if parallel.any(out_of_time or stop.raised):  # one collective a step
                    if epochs is None and not parallel.any(stop.raised):
                        spent = True  # the planned end: validated and saved as an epoch's
                        break
                    reason = "time limit" if out_of_time else "signal"
                    say(f"stopping at step {state['step']} ({reason}); resume with --resume")
                    stopped = True
                    break
                if config.save_every and state["step"] % config.save_every == 0:
                    save("last", engine.full_model())
            bar.close()
            if not (stopped or spent):
                state["epoch"] += 1
                state["batch_in_epoch"] = 0
            entry: dict[str, Any] = {
                "step": state["step"],
                "epoch": epoch + 1,
                "minutes": round(elapsed() / 60, 3),
                **{f"train_{name}": value.item() for name, value in losses.items()},
            }
            whole = engine.full_model()  # every rank, together; the model on rank 0
            if val_loader is not None and not stopped and whole is not None:
                entry.update(validate(whole, val_loader, device, config.precision))
                if entry["val_loss"] < state["best_val_loss"]:
                    state["best_val_loss"] = entry["val_loss"]
                    save("best", whole)
            elif val_loader is None and not stopped:
                save("best", whole)  # no validation data: the latest weights are the best known
            history.append(entry)
            write_log(entry)
            say(
                "  ".join(
                    f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in entry.items()
                )
            )
            if warning := blindness_warning(entry, task, bool(config.init_from)):
                say(f"warning: {warning}")
            save("last", whole)
    if parallel.any(parallel.main and recover(out / "best") is None):
        save("best", engine.full_model())
    say(f"run folder: {out}  ({time.monotonic() - started:.0f}s)")
    parallel.close()
    return TrainResult(
        out, state["step"], state["epoch"], not stopped, state["best_val_loss"], history
    )
