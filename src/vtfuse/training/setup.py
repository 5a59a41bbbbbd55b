"""Everything a training run needs before its first step, built once by `setup`: the device and
processes, the data, the model and tokenizer (new, warm-started or resumed), the optimiser and
schedule, and the run folder. The loop (`vtfuse.training.trainer`) only reads the `Run`."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from vtfuse.config import ModelConfig, TrainConfig, from_dict, to_dict
from vtfuse.data.bank import ImageTextDataset, load_records
from vtfuse.data.items import collate
from vtfuse.data.jsonl import Record
from vtfuse.data.shards import ShardDataset, is_shard_folder, shard_records
from vtfuse.data.tokenizer import AnyTokenizer, Tokenizer, normalise_answer
from vtfuse.grad_checkpointing import set_grad_checkpointing
from vtfuse.models.base import TaskModel
from vtfuse.models.factory import create_model, load_pretrained
from vtfuse.models.warm_start import warm_start
from vtfuse.runtime import resolve_device, seed_everything
from vtfuse.tasks import read_jsonl, task_dataset, task_spec
from vtfuse.training.batches import epoch_batches, micro_batches_per_epoch
from vtfuse.training.checkpoint import load_training_state, recover, resolve_model_folder
from vtfuse.training.distributed import DataParallel, Distributed
from vtfuse.training.optim import make_optimizer, warmup_cosine, warmup_cosine_on_the_clock
from vtfuse.training.precision import choose_precision

RUN_FILE, LOG_FILE = "run.json", "log.jsonl"


def build_tokenizer(task: str, records, model_config: ModelConfig) -> AnyTokenizer:
    """A pretrained LM's own tokenizer, or a word vocabulary built from the training text;
    for VQA, with the answers seen in training."""
    spec = task_spec(task)
    answers = sorted({normalise_answer(r.fields[spec.label]) for r in records if spec.label})
    if model_config.lm.name:
        from vtfuse.lm.load import load_lm_tokenizer

        return load_lm_tokenizer(model_config.lm.name, answers)
    texts = (text for record in records for text in spec.texts(record))
    return Tokenizer.build(texts, answers=answers)


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


def start_run_folder(
    out: Path,
    task: str,
    train_path: str | Path,
    val_path: str | Path | None,
    model_config: ModelConfig,
    config: TrainConfig,
) -> None:
    """A new run's folder: `run.json` (what it trains on, and how) and an empty log."""
    out.mkdir(parents=True, exist_ok=True)
    val = str(val_path) if val_path else None
    write_run_file(out, task, str(train_path), val, model_config, config)
    (out / LOG_FILE).write_text("")


@dataclass
class Clock:
    """Seconds a run has spent: in earlier processes (`before`, from a --resume) and this one."""

    started: float = dataclasses.field(default_factory=time.monotonic)
    before: float = 0.0

    def elapsed(self) -> float:
        return self.before + time.monotonic() - self.started


@dataclass
class Run:
    """A training run, set up: what the loop reads and the progress it writes (`state`: step,
    epoch, batch in the epoch, best validation loss; saved with `last` for --resume)."""

    task: str
    out: Path
    config: TrainConfig
    device: torch.device
    parallel: Distributed
    say: Callable[[str], None]  # rank 0's voice; silent on the other ranks
    show_progress: bool
    model: TaskModel
    tokenizer: AnyTokenizer
    train_set: ImageTextDataset | ShardDataset
    val_loader: DataLoader | None
    engine: Any  # DataParallel or FullyShardedParallel: how a step runs over the processes
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    epochs: int | None  # None: as many as the time budget allows
    batches_per_epoch: int
    clock: Clock
    state: dict[str, Any]
    bad_steps: int = 0  # non-finite steps in a row (each skipped)


def training_records(
    task: str, train_path: str | Path, config: TrainConfig, parallel: Distributed
) -> list[Record]:
    """The training set's records: from WebDataset shards (one process) or a JSONL file."""
    if not is_shard_folder(train_path):
        return read_jsonl(train_path, task, roots=config.image_roots)
    if parallel.enabled:
        raise ValueError(
            "training from shards runs in one process for now; use JSONL with torchrun"
        )
    return shard_records(train_path, task)


def setup(
    task: str,
    train_path: str | Path,
    out: Path,
    val_path: str | Path | None,
    model_config: ModelConfig,
    config: TrainConfig,
    resume: bool,
    progress: bool,
    log: Callable[[str], None],
    allow_pickle: bool,
) -> Run:
    clock = Clock()
    seed_everything(config.seed)
    parallel = Distributed.from_environment(resolve_device(config.device))
    device = parallel.device(resolve_device(config.device))
    say = log if parallel.main else (lambda message: None)
    records = training_records(task, train_path, config, parallel)
    last_dir = recover(out / "last") if resume else None
    if resume and last_dir is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {out}/last to resume from")
    if last_dir is not None:
        model, tokenizer = load_pretrained(last_dir, device, allow_pickle)
    else:
        model, tokenizer = new_model(task, records, model_config, config, allow_pickle, say)
    model.to(device).train()
    if config.grad_checkpointing:
        parts = set_grad_checkpointing(model)
        say(f"gradient checkpointing in: {', '.join(parts) or 'nothing (no part supports it)'}")
    train_set = training_set(task, train_path, records, model, tokenizer, config, progress, say)
    val_loader = validation_loader(task, val_path, model, tokenizer, config, progress)
    config = with_precision(model, train_set, config, device, parallel, say)

    epochs = config.epoch_count
    batches_per_epoch = micro_batches_per_epoch(len(train_set), config, parallel)
    steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum)
    engine = _engine(config)(model, parallel, device)  # before the optimiser: FSDP swaps params
    optimizer = make_optimizer(model, config)
    schedule = (
        warmup_cosine(steps_per_epoch * epochs, config)
        if epochs
        else warmup_cosine_on_the_clock(clock.elapsed, config)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best_val_loss": float("inf")}
    if last_dir is not None:
        state |= load_training_state(last_dir, optimizer, scheduler, engine.load_optimizer_state)
        clock.before = state.pop("seconds", 0.0)  # absent from states saved before it existed
        say(f"resumed from {last_dir} at step {state['step']} (epoch {state['epoch'] + 1})")
    elif parallel.main:
        start_run_folder(out, task, train_path, val_path, model.config, config)
    run = Run(
        task, out, config, device, parallel, say, progress, model, tokenizer, train_set,
        val_loader, engine, optimizer, scheduler, epochs, batches_per_epoch, clock, state,
    )  # fmt: skip
    say(describe(run, steps_per_epoch))
    return run


def new_model(
    task: str,
    records,
    model_config: ModelConfig,
    config: TrainConfig,
    allow_pickle: bool,
    say: Callable[[str], None],
) -> tuple[TaskModel, AnyTokenizer]:
    """A model sized to the training data's vocabulary (and answers), warm-started if asked."""
    tokenizer = build_tokenizer(task, records, model_config)
    text = dataclasses.replace(model_config.text, vocab_size=len(tokenizer))
    model_config = dataclasses.replace(model_config, text=text, num_answers=len(tokenizer.answers))
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
    return model, tokenizer


def training_set(
    task: str,
    train_path: str | Path,
    records,
    model: TaskModel,
    tokenizer: AnyTokenizer,
    config: TrainConfig,
    progress: bool,
    say: Callable[[str], None],
) -> ImageTextDataset | ShardDataset:
    """The training examples: decoded once into memory, or from shards as they stream."""
    size, max_length = model.config.vision.image_size, model.config.text.max_length
    frames = model.config.vision.frames
    if is_shard_folder(train_path):  # decoded as they stream, once per epoch
        return ShardDataset(
            train_path, task, tokenizer, max_length, size, config.shuffle, config.seed, frames
        )
    loaded = load_records(records, size, config.skip_bad, progress, frames)
    if loaded.skipped:
        say(
            f"skipped {len(loaded.skipped)} training example(s) with a bad image, "
            f"e.g. {loaded.skipped[0]}"
        )
    return task_dataset(task, loaded, tokenizer, max_length)


def validation_loader(
    task: str,
    val_path: str | Path | None,
    model: TaskModel,
    tokenizer: AnyTokenizer,
    config: TrainConfig,
    progress: bool,
) -> DataLoader | None:
    if not val_path:
        return None
    vision = model.config.vision
    records = read_jsonl(val_path, task, roots=config.image_roots)
    loaded = load_records(records, vision.image_size, config.skip_bad, progress, vision.frames)
    return DataLoader(
        task_dataset(task, loaded, tokenizer, model.config.text.max_length),
        batch_size=config.eval_batch_size,
        collate_fn=collate,
    )


def with_precision(
    model: TaskModel,
    train_set: ImageTextDataset | ShardDataset,
    config: TrainConfig,
    device: torch.device,
    parallel: Distributed,
    say: Callable[[str], None],
) -> TrainConfig:
    """`config` with the precision the run trains in: `--precision auto` times the model's
    first batch in fp32 and under bf16 autocast and keeps the faster
    (`vtfuse.training.precision`)."""

    def first_batch() -> dict[str, torch.Tensor]:
        return next(iter(epoch_batches(train_set, 0, 0, config, parallel)))

    precision, speedup = choose_precision(
        config.precision, model, first_batch, device, parallel, config.label_smoothing, config.fsdp
    )
    if speedup is not None:
        say(f"--precision auto: {precision} (a bf16 autocast step ran {speedup:.2f}× fp32's)")
    return dataclasses.replace(config, precision=precision)


def describe(run: Run, steps_per_epoch: int) -> str:
    """One line: the model's size, the data's, the plan and where it runs."""
    total = run.model.num_parameters()
    trainable = run.model.num_parameters(trainable_only=True)
    processes = f" × {run.parallel.world} processes" if run.parallel.enabled else ""
    processes += " (FSDP)" if run.config.fsdp else ""
    plan = (
        f"{steps_per_epoch * run.epochs} steps"
        if run.epochs
        else f"{run.config.max_minutes:g} minutes (the schedule follows the clock)"
    )
    return (
        f"{run.task} model: {total / 1e6:.2f}M parameters ({trainable / 1e6:.2f}M trainable), "
        f"{len(run.train_set)} training examples, {plan} at batch {run.config.batch_size}, lr "
        f"{run.config.lr:g}, on {run.device}{processes} ({run.config.precision})"
    )


def _engine(config: TrainConfig) -> type:
    """How a step runs over the processes: DDP (or one process), or FSDP with --fsdp."""
    if not config.fsdp:
        return DataParallel
    from vtfuse.training.fsdp import FullyShardedParallel

    return FullyShardedParallel
