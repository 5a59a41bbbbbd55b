"""Is vtfuse's training bound by compute or by its data pipeline? The pipeline's stages and the
training step, each alone, on the built-in synthetic scenes (caption task).

    python benchmarks/data_pipeline.py               # 2000 scenes, 5 repeats
    python benchmarks/data_pipeline.py --quick       # 500 scenes, 3 repeats: about a minute
    python benchmarks/data_pipeline.py --data DIR    # reuse scenes from `vtfuse synth --out DIR`

The scenes are written to a temporary folder by `python -m vtfuse synth`. Measured, each the
median over the repeats after a warm-up:

  (i)   decoding every training image once into the in-memory `ImageBank` (`load_records`, as
        the trainer does before its first step): images/s;
  (ii)  one epoch of the training DataLoader, built by the trainer's own `epoch_batches` (seeded
        grouped shuffle, `collate`, the quickstart captioner's batch size) with no model, with
        num_workers 0 and 2: samples/s. A new DataLoader per epoch, as in the trainer, so the
        workers' start-up is counted;
  (iii) the training step of the quickstart's captioner (its model config and batch size:
        forward, backward, gradient clipping, AdamW from `make_optimizer`, the scheduler) on
        batches read beforehand: samples/s;
  (iv)  one epoch streamed from WebDataset shards (`python -m vtfuse data shard`; each image
        decoded again every epoch) through `ShardDataset` and `epoch_batches`, with num_workers
        0 and 2: samples/s. Skipped, with a message, if `webdataset` is not installed.

A sample is one caption (the scenes have two per image). The ratio loader samples/s ÷ training
samples/s says how much faster data arrives than the model consumes it: ≫ 1 means the training
is compute-bound. The loader and the model are measured apart: in a real run with workers, the
workers' processes compete with the training step for the same cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from vtfuse.data.bank import load_records
from vtfuse.data.shards import ShardDataset
from vtfuse.models.factory import create_model
from vtfuse.quickstart import QuickstartPlan
from vtfuse.runtime import autocast, seed_everything
from vtfuse.tasks import read_jsonl, task_dataset, with_task_schedule
from vtfuse.training.batches import epoch_batches
from vtfuse.training.optim import make_optimizer, warmup_cosine
from vtfuse.training.precision import choose_precision
from vtfuse.training.setup import build_tokenizer

TASK = "caption"
WORKERS = (0, 2)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_rate(run: Callable[[], int], warmup: int, repeats: int) -> float:
    """Median over `repeats` runs (after `warmup` untimed ones) of units done per second; `run`
    returns how many units it did."""
    for _ in range(warmup):
        run()
    rates = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        done = run()
        synchronize()
        rates.append(done / (time.perf_counter() - start))
    return statistics.median(rates)


def vtfuse(*arguments: str) -> None:
    subprocess.run([sys.executable, "-m", "vtfuse", *arguments], check=True, capture_output=True)


def synthesise(folder: Path, images: int) -> float:
    start = time.perf_counter()
    vtfuse("synth", "--out", str(folder), "--images", str(images))
    return time.perf_counter() - start


def epoch_samples(train_set, config) -> Callable[[], int]:
    """One epoch of the trainer's DataLoader, no model: → samples read."""

    def run() -> int:
        return sum(batch["tokens"].shape[0] for batch in epoch_batches(train_set, 0, 0, config))

    return run


def training_steps(model, config, batches: list[dict], steps: int, dev) -> Callable[[], int]:
    """The trainer's step on `steps` batches read beforehand: → samples trained on."""
    optimizer = make_optimizer(model, config)
    total = max(steps, len(batches))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, config))
    cycle = itertools.cycle(batches)
    model.train()

    def run() -> int:
        samples = 0
        for _ in range(steps):
            batch = {k: v.to(dev, non_blocking=True) for k, v in next(cycle).items()}
            with autocast(dev, config.precision):
                loss = model.training_loss(batch, config.label_smoothing)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            samples += batch["tokens"].shape[0]
        return samples

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="500 scenes, 3 repeats")
    parser.add_argument("--images", type=int, help="scenes to synthesise (2000; quick 500)")
    parser.add_argument("--data", type=Path, help="an existing `vtfuse synth` folder to use")
    parser.add_argument("--repeats", type=int, help="timed runs per measurement (5; quick 3)")
    parser.add_argument("--steps", type=int, help="training steps per timed run (10; quick 5)")
    parser.add_argument("--shard-size", type=int, default=100, help="records per shard")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    images = args.images or (500 if args.quick else 2000)
    repeats = args.repeats or (3 if args.quick else 5)
    steps = args.steps or (5 if args.quick else 10)
    dev = device()
    cores = len(os.sched_getaffinity(0))
    print(
        f"device {dev}, {torch.get_num_threads()} threads, {cores} core(s) available, "
        f"torch {torch.__version__}"
    )
    # the loader's advice when it gets more workers than cores: known, and printed above
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    with tempfile.TemporaryDirectory(prefix="vtfuse-data-pipeline-") as temporary:
        data = args.data
        if data is None:
            data = Path(temporary) / "scenes"
            seconds = synthesise(data, images)
            print(f"synthesised {images} scenes into {data} in {seconds:.1f} s")
        results = run(data, Path(temporary), repeats, steps, args.shard_size, dev)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def run(data: Path, temporary: Path, repeats: int, steps: int, shard_size: int, dev) -> dict:
    stage = QuickstartPlan().caption
    config = dataclasses.replace(with_task_schedule(stage.train, stage.model.task), seed=0)
    records = read_jsonl(data / f"{TASK}_train.jsonl", TASK)
    tokenizer = build_tokenizer(TASK, records, stage.model)
    text = dataclasses.replace(stage.model.text, vocab_size=len(tokenizer))
    model_config = dataclasses.replace(stage.model, task=TASK, text=text)
    size, max_length = model_config.vision.image_size, model_config.text.max_length
    print(
        f"{len(records)} training images; quickstart captioner: {model_config.vision.name} "
        f"vision at {size} px, text dim {text.dim} × {text.depth} layers, fusion "
        f"{model_config.fusion.name}, batch {config.batch_size}; median of {repeats} repeats "
        "after a warm-up\n"
    )
    rows: dict[str, float] = {}

    # (i) decoding into the ImageBank
    loaded = None

    def decode() -> int:
        nonlocal loaded
        loaded = load_records(records, size, progress=False)
        return len(loaded.bank.tensors)

    rows["decode images into ImageBank (images/s)"] = median_rate(decode, 1, repeats)
    train_set = task_dataset(TASK, loaded, tokenizer, max_length)

    # (i b) a VQA file: one line a question, each image named by many lines
    questions = read_jsonl(data / "vqa_train.jsonl", "vqa")

    def decode_questions() -> int:
        load_records(questions, size, progress=False)
        return len(questions)

    vqa_rate = median_rate(decode_questions, 1, repeats)

    # (ii) the in-memory DataLoader, no model
    loaders: dict[str, float] = {}
    for workers in WORKERS:
        loader_config = dataclasses.replace(config, num_workers=workers)
        name = f"in-memory DataLoader, {workers} workers"
        loaders[name] = median_rate(epoch_samples(train_set, loader_config), 1, repeats)

    # (iii) the training step
    seed_everything(config.seed)
    model = create_model(model_config).to(dev)
    batches = list(itertools.islice(epoch_batches(train_set, 0, 0, config), steps))
    # the trainer's choice of precision ("auto": fp32 on a CPU and for a model this small)
    first = {name: tensor.to(dev) for name, tensor in batches[0].items()}
    precision, _ = choose_precision(config.precision, model, lambda: first, dev)
    config = dataclasses.replace(config, precision=precision)
    step = training_steps(model, config, batches, steps, dev)
    training = median_rate(step, 1, repeats)

    # (iv) streaming from WebDataset shards
    if importlib.util.find_spec("webdataset") is None:
        print("webdataset is not installed: skipping the shard measurements\n")
    else:
        shards = temporary / "shards"
        train_jsonl = str(data / f"{TASK}_train.jsonl")
        vtfuse(
            "data",
            "shard",
            train_jsonl,
            "--task",
            TASK,
            "--out",
            str(shards),
            "--shard-size",
            str(shard_size),
        )
        count = len(list(shards.glob("shard-*.tar")))
        stream = ShardDataset(shards, TASK, tokenizer, max_length, size, config.shuffle, 0)
        for workers in WORKERS:
            loader_config = dataclasses.replace(config, num_workers=workers)
            name = f"WebDataset shards ({count}), {workers} workers"
            loaders[name] = median_rate(epoch_samples(stream, loader_config), 1, repeats)

    width = 44
    print(f"{'stage':{width}s} {'rate':>12s}  {'÷ training':>10s}")
    decode_rate = rows["decode images into ImageBank (images/s)"]
    print(f"{'decode images into ImageBank':{width}s} {decode_rate:8.0f} img/s")
    print(f"{'load VQA lines into ImageBank':{width}s} {vqa_rate:8.0f} lines/s")
    for name, rate in loaders.items():
        print(f"{name:{width}s} {rate:8.0f} smp/s  {rate / training:9.1f}x")
    print(f"{'training step (quickstart captioner)':{width}s} {training:8.0f} smp/s  {1:9.1f}x")
    decode_seconds = len(records) / decode_rate
    epoch_seconds = len(train_set) / training
    print(
        f"\ndecoding the bank once takes {decode_seconds:.1f} s, "
        f"{decode_seconds / epoch_seconds:.1%} of one training epoch ({epoch_seconds:.1f} s)"
    )
    default = loaders[f"in-memory DataLoader, {config.num_workers} workers"]
    verdict = "compute-bound" if default / training > 5 else "NOT clearly compute-bound"
    print(
        f"the trainer's default loader (in memory, {config.num_workers} workers) delivers "
        f"{default / training:.0f}x the samples/s the training step consumes: {verdict}"
    )
    return {
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "training_images": len(records),
        "training_samples": len(train_set),
        "batch_size": config.batch_size,
        "decode_images_per_s": decode_rate,
        "vqa_questions": len(questions),
        "vqa_lines_per_s": vqa_rate,
        "loader_samples_per_s": loaders,
        "training_samples_per_s": training,
        "loader_over_training": {name: rate / training for name, rate in loaders.items()},
    }


if __name__ == "__main__":
    main()
