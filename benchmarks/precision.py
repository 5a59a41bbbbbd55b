"""bf16 autocast against fp32 for vtfuse's training: speed, and whether the loss curve follows.

    python benchmarks/precision.py                   # 2000 scenes, 300 steps
    python benchmarks/precision.py --quick           # 500 scenes, 60 steps: under a minute
    python benchmarks/precision.py --out DIR         # precision.png/.json (default results/)
    python benchmarks/precision.py --data DIR        # reuse scenes from `vtfuse synth --out DIR`
    python benchmarks/precision.py --model small --noise   # precision_small.png/.json
    python benchmarks/precision.py --task vqa --model default --data DIR  # precision_vqa_default

`--model`: quickstart (its captioner, the default), default (`ModelConfig(task="caption")`,
`TrainConfig()`), small or base (run.py's matched ViT captioners, at batch 32): the figures
behind `--precision auto`'s timing its own step (`vtfuse.training.precision`). `--noise` adds a
third run, fp32 from the same weights with the batches in another order: the gap noise alone
makes, to hold the bf16 − fp32 gap against.

`--task vqa` trains the VQA model instead (answers as the tokenizer finds them in the data).

Trains the captioner (its model config, batch size, learning rate, AdamW from
`make_optimizer`, warm-up + cosine schedule over the fixed number of steps, gradient clipping)
on synthetic scenes written to a temporary folder by `python -m vtfuse synth`, twice from the
same initial weights and in the same data order (the trainer's `epoch_batches`): once in fp32
and once under the trainer's `autocast(device, "bf16")` (weights, gradients and optimiser
state stay fp32, as `vtfuse train --precision bf16` does). The two runs go step by step in
lockstep, each batch used by one then the other, so a busy machine slows both alike.

Recorded: the training loss at every step; the validation loss at the end (`caption_val.jsonl`,
the trainer's `validate`, each model under its own precision and both again in fp32); samples/s
(median over the steps after the first 5 of batch size / step time, the step timed from the
forward to the optimiser's update). Printed: the samples/s ratio bf16 / fp32, the final losses,
and the largest |bf16 − fp32| between the loss curves smoothed by a centred moving average.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch
from matched import SIZES, vtfuse_config
from torch.utils.data import DataLoader

from vtfuse.config import ModelConfig, TrainConfig
from vtfuse.data.bank import load_records
from vtfuse.data.items import collate
from vtfuse.models.factory import create_model
from vtfuse.quickstart import QuickstartPlan
from vtfuse.runtime import autocast, seed_everything
from vtfuse.tasks import read_jsonl, task_dataset, with_task_schedule
from vtfuse.training.batches import epoch_batches
from vtfuse.training.optim import make_optimizer, warmup_cosine
from vtfuse.training.setup import build_tokenizer
from vtfuse.training.trainer import validate

TASKS = ("caption", "vqa")
PRECISIONS = ("fp32", "bf16")
OTHER_ORDER = "fp32, other order"
WARMUP_STEPS = 5  # left out of the samples/s


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Run:
    """One model's training under one precision."""

    def __init__(self, model, config, precision: str, total_steps: int, dev: torch.device):
        self.model, self.config, self.precision, self.dev = model, config, precision, dev
        self.optimizer = make_optimizer(model, config)
        schedule = warmup_cosine(total_steps, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.losses: list[float] = []
        self.seconds: list[float] = []
        self.samples: list[int] = []
        self.skipped = 0

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        model, config = self.model, self.config
        model.train()
        synchronize()
        start = time.perf_counter()
        with autocast(self.dev, self.precision):
            loss = model.training_loss(batch, config.label_smoothing)
        loss.backward()
        limit = config.grad_clip if config.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), limit)
        if torch.isfinite(norm):  # as the trainer: a non-finite gradient skips the update
            self.optimizer.step()
            self.scheduler.step()
        else:
            self.skipped += 1
        self.optimizer.zero_grad(set_to_none=True)
        synchronize()
        self.seconds.append(time.perf_counter() - start)
        self.samples.append(batch["tokens"].shape[0])
        self.losses.append(loss.item())

    @property
    def samples_per_s(self) -> float:
        rates = [n / s for n, s in zip(self.samples, self.seconds, strict=True)]
        return statistics.median(rates[WARMUP_STEPS:] or rates)


def smooth(values: list[float], window: int) -> list[float]:
    """Centred moving average over `window` steps (fewer at the ends): no lag behind the curve."""
    before, after = (window - 1) // 2, window // 2
    return [
        statistics.fmean(values[max(0, i - before) : i + after + 1]) for i in range(len(values))
    ]


def batches(train_set, config, steps: int):
    """The trainer's batches, epoch after epoch, until `steps` of them."""
    epoch, given = 0, 0
    while given < steps:
        for batch in epoch_batches(train_set, epoch, 0, config):
            yield batch
            given += 1
            if given == steps:
                return
        epoch += 1


MODELS = ("quickstart", "default", "small", "base")


def model_and_schedule(name: str, task: str) -> tuple[ModelConfig, TrainConfig]:
    """quickstart: its model and schedule for `task`; default: `ModelConfig(task=task)` and
    `TrainConfig()`; small, base: run.py's matched captioners (ViT + Transformer decoder, their
    vocabulary size kept) at batch 32."""
    if name == "quickstart":
        stage = getattr(QuickstartPlan(), task)
        return stage.model, stage.train
    if name == "default":
        return ModelConfig(task=task), TrainConfig()
    if task != "caption":
        raise SystemExit(f"--model {name} is a captioner: use --task caption")
    return vtfuse_config(SIZES[name]), TrainConfig(batch_size=32)


def train_both(
    data: Path, task: str, name: str, steps: int, seed: int, noise: bool, dev: torch.device
) -> tuple[dict, dict]:
    model_config, config = model_and_schedule(name, task)
    config = dataclasses.replace(with_task_schedule(config, task), seed=seed)
    records = read_jsonl(data / f"{task}_train.jsonl", task)
    tokenizer = build_tokenizer(task, records, model_config)
    vocab = max(len(tokenizer), model_config.text.vocab_size)
    text = dataclasses.replace(model_config.text, vocab_size=vocab)
    answers = len(tokenizer.answers) if task == "vqa" else 0
    model_config = dataclasses.replace(model_config, task=task, text=text, num_answers=answers)
    size, max_length = model_config.vision.image_size, model_config.text.max_length
    train_set = task_dataset(
        task, load_records(records, size, progress=False), tokenizer, max_length
    )
    val_loaded = load_records(read_jsonl(data / f"{task}_val.jsonl", task), size, progress=False)
    val_loader = DataLoader(
        task_dataset(task, val_loaded, tokenizer, max_length),
        batch_size=config.eval_batch_size,
        collate_fn=collate,
    )
    seed_everything(seed)
    model = create_model(model_config).to(dev)
    runs = {
        precision: Run(copy.deepcopy(model), config, precision, steps, dev)
        for precision in PRECISIONS
    }
    if noise:  # the yardstick: fp32 again from the same weights, batches in another order
        runs[OTHER_ORDER] = Run(copy.deepcopy(model), config, "fp32", steps, dev)
    other_order = dataclasses.replace(config, seed=seed + 1)
    epochs = steps / math.ceil(len(train_set) / config.batch_size)
    setting = {
        "training_images": len(records),
        "training_samples": len(train_set),
        "validation_samples": len(val_loader.dataset),
        "steps": steps,
        "epochs": round(epochs, 2),
        "batch_size": config.batch_size,
        "lr": config.lr,
        "seed": seed,
        "task": task,
        "model_name": name,
        "parameters": model.num_parameters(),
        "model": dataclasses.asdict(model_config),
    }
    print(
        f"{name} {task} model ({model.num_parameters() / 1e6:.2f}M parameters), "
        f"{len(records)} training records ({len(train_set)} samples), batch "
        f"{config.batch_size}, lr {config.lr:g}: {steps} steps ({epochs:.1f} epochs) per precision"
    )
    every = max(1, steps // 10)
    ours, others = batches(train_set, config, steps), batches(train_set, other_order, steps)
    orders = zip(ours, others, strict=True)
    for number, (batch, other) in enumerate(orders, start=1):
        for precision, run in runs.items():
            chosen = other if precision == OTHER_ORDER else batch
            run.step({k: v.to(dev, non_blocking=True) for k, v in chosen.items()})
        if number % every == 0 or number == steps:
            losses = "  ".join(f"{p} {r.losses[-1]:.4f}" for p, r in runs.items())
            print(f"  step {number:4d}  loss {losses}", flush=True)
    validation = {}
    for precision, run in runs.items():
        own = validate(run.model, val_loader, dev, run.precision)["val_loss"]
        in_fp32 = validate(run.model, val_loader, dev, "fp32")["val_loss"]
        validation[precision] = {"val_loss": own, "val_loss_in_fp32": in_fp32}
    return runs, {"setting": setting, "validation": validation}


def noise(runs: dict[str, Run], smoothed: dict[str, list[float]], validation: dict) -> dict:
    """How far two fp32 runs from the same weights land when only the batch order differs: the
    yardstick for "bf16 trains as well"."""
    gaps = [abs(o - f) for o, f in zip(smoothed[OTHER_ORDER], smoothed["fp32"], strict=True)]
    return {
        "val_loss_difference": validation[OTHER_ORDER]["val_loss"] - validation["fp32"]["val_loss"],
        "max_abs_smoothed_loss_difference": max(gaps),
        "mean_abs_smoothed_loss_difference": statistics.fmean(gaps),
    }


def plot(runs: dict[str, Run], smoothed: dict[str, list[float]], window: int, path: Path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"fp32": "tab:blue", "bf16": "tab:red", OTHER_ORDER: "tab:grey"}
    styles = {
        "fp32": {"linewidth": 3.0},
        "bf16": {"linewidth": 1.2, "linestyle": "--"},
        OTHER_ORDER: {"linewidth": 1.0, "linestyle": ":"},
    }
    figure, (curves, gap) = plt.subplots(
        2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    for precision, run in runs.items():
        steps = range(1, len(run.losses) + 1)
        curves.plot(steps, run.losses, color=colours[precision], alpha=0.25, linewidth=0.8)
        curves.plot(
            steps,
            smoothed[precision],
            color=colours[precision],
            label=f"{precision} ({run.samples_per_s:.0f} samples/s)",
            **styles[precision],
        )
    curves.set_ylabel("training loss")
    curves.legend()
    curves.grid(True, alpha=0.3)
    curves.set_title(textwrap.fill(title, 90), fontsize=9)
    difference = [b - f for b, f in zip(smoothed["bf16"], smoothed["fp32"], strict=True)]
    gap.plot(range(1, len(difference) + 1), difference, color="black")
    gap.axhline(0, color="grey", linewidth=0.8)
    gap.set_ylabel("bf16 − fp32")
    gap.set_xlabel(f"step (curves smoothed over {window} steps; faint: each step)")
    gap.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="500 scenes, 60 steps")
    parser.add_argument("--images", type=int, help="scenes to synthesise (2000; quick 500)")
    parser.add_argument("--data", type=Path, help="an existing `vtfuse synth` folder to use")
    parser.add_argument("--steps", type=int, help="training steps per precision (300; quick 60)")
    parser.add_argument("--window", type=int, help="smoothing window in steps (25; quick 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task", choices=TASKS, default="caption")
    parser.add_argument("--model", choices=MODELS, default="quickstart", help="which model")
    parser.add_argument(
        "--noise",
        action="store_true",
        help="also fp32 with the batches in another order: how far apart noise alone puts them",
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results", help="output folder"
    )
    args = parser.parse_args()
    images = args.images or (500 if args.quick else 2000)
    steps = args.steps or (60 if args.quick else 300)
    window = args.window or (10 if args.quick else 25)
    if steps <= WARMUP_STEPS:
        parser.error(f"--steps must be more than {WARMUP_STEPS}")
    dev = device()
    print(f"device {dev}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    with tempfile.TemporaryDirectory(prefix="vtfuse-precision-") as temporary:
        data = args.data
        if data is None:
            data = Path(temporary) / "scenes"
            command = [sys.executable, "-m", "vtfuse", "synth", "--out", str(data)]
            subprocess.run([*command, "--images", str(images)], check=True, capture_output=True)
            print(f"synthesised {images} scenes into {data}")
        runs, report = train_both(data, args.task, args.model, steps, args.seed, args.noise, dev)

    smoothed = {precision: smooth(run.losses, window) for precision, run in runs.items()}
    gaps = [abs(b - f) for b, f in zip(smoothed["bf16"], smoothed["fp32"], strict=True)]
    worst = max(range(len(gaps)), key=gaps.__getitem__)
    speed = runs["bf16"].samples_per_s / runs["fp32"].samples_per_s
    validation = report["validation"]

    print(f"\n{'':28s} {'fp32':>10s} {'bf16':>10s} {'bf16/fp32':>10s}")
    rows = [
        ("samples/s", runs["fp32"].samples_per_s, runs["bf16"].samples_per_s, ".0f"),
        ("final training loss", runs["fp32"].losses[-1], runs["bf16"].losses[-1], ".4f"),
        (f"  smoothed ({window} steps)", smoothed["fp32"][-1], smoothed["bf16"][-1], ".4f"),
        (
            "validation loss (own)",
            validation["fp32"]["val_loss"],
            validation["bf16"]["val_loss"],
            ".4f",
        ),
        (
            "validation loss (in fp32)",
            validation["fp32"]["val_loss_in_fp32"],
            validation["bf16"]["val_loss_in_fp32"],
            ".4f",
        ),
    ]
    for name, fp32, bf16, form in rows:
        print(f"{name:28s} {fp32:10{form}} {bf16:10{form}} {bf16 / fp32:9.3f}x")
    print(f"samples/s ratio bf16 / fp32: {speed:.2f}x")
    print(
        f"max |bf16 − fp32| of the smoothed training loss: {gaps[worst]:.4f} at step {worst + 1} "
        f"({gaps[worst] / smoothed['fp32'][worst]:.2%} of fp32's); mean over steps "
        f"{statistics.fmean(gaps):.4f}"
    )
    if OTHER_ORDER in runs:
        report["noise"] = noise(runs, smoothed, validation)
        print(
            f"noise (fp32 against fp32 with the batches in another order): validation loss "
            f"{report['noise']['val_loss_difference']:+.4f}, max smoothed training-loss gap "
            f"{report['noise']['max_abs_smoothed_loss_difference']:.4f}; bf16 − fp32: "
            f"{validation['bf16']['val_loss'] - validation['fp32']['val_loss']:+.4f}"
        )
    skipped = {p: r.skipped for p, r in runs.items() if r.skipped}
    if skipped:
        print(f"steps skipped for a non-finite gradient: {skipped}")

    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        **report,
        "smoothing_window": window,
        "samples_per_s": {p: r.samples_per_s for p, r in runs.items()},
        "samples_per_s_ratio_bf16_over_fp32": speed,
        "final_loss": {p: r.losses[-1] for p, r in runs.items()},
        "final_smoothed_loss": {p: s[-1] for p, s in smoothed.items()},
        "max_abs_smoothed_loss_difference": gaps[worst],
        "max_difference_at_step": worst + 1,
        "mean_abs_smoothed_loss_difference": statistics.fmean(gaps),
        "skipped_steps": {p: r.skipped for p, r in runs.items()},
        "loss": {p: r.losses for p, r in runs.items()},
        "step_seconds": {p: r.seconds for p, r in runs.items()},
    }
    stem = "precision" if args.model == "quickstart" else f"precision_{args.model}"
    if args.task != "caption":
        stem = f"precision_{args.task}_{args.model}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    title = (
        f"vtfuse {args.model} {args.task} model, bf16 autocast vs fp32 ({dev}, "
        f"{torch.get_num_threads()} threads): samples/s bf16/fp32 {speed:.2f}x, max smoothed "
        f"|Δloss| {gaps[worst]:.3f}"
    )
    plot(runs, smoothed, window, args.out / f"{stem}.png", title)
    print(f"wrote {args.out / stem}.png and .json")


if __name__ == "__main__":
    main()
