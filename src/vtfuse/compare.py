"""`vtfuse compare`: every chosen fusion strategy on the same data, budget and seeds.

For each strategy and seed a model is trained (`vtfuse.training.train`) and scored on the test
file (`vtfuse.evaluation.evaluate`); the costs are measured alongside: parameters, training
samples/s (from the run's log) and inference latency per image (batch size 1, after a warm-up
call). Results are the mean ± sample standard deviation over seeds, written as CSV, markdown,
a bar chart and the raw per-seed JSON.

With `caption_warm_start` (VQA only) each strategy first trains a captioner with the same
strategy and the VQA model starts from it — the quickstart's recipe, without which a VQA model
trained for a few CPU minutes stays near chance whatever its fusion.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from vtfuse.config import FusionConfig, ModelConfig, TrainConfig
from vtfuse.data.dataset import read_jsonl
from vtfuse.evaluation import EvalOptions, evaluate
from vtfuse.fusion import FUSIONS
from vtfuse.pipeline import Pipeline
from vtfuse.training import train

MAIN_METRIC = {"caption": "cider", "vqa": "accuracy"}


@dataclass(frozen=True)
class DataFiles:
    train: Path
    val: Path
    test: Path
    caption_train: Path | None = None  # for the caption warm start
    caption_val: Path | None = None


@dataclass(frozen=True)
class CompareSpec:
    task: str
    fusions: tuple[str, ...]
    model: ModelConfig
    train: TrainConfig  # max_minutes is each model's budget
    seeds: int = 3
    caption_warm_start: bool = False
    caption_train: TrainConfig | None = None  # the warm-start captioner's schedule (None: `train`)
    progress: bool = True


def parse_fusions(text: str) -> tuple[str, ...]:
    """ "all" or a comma list of registered strategies."""
    if text == "all":
        return tuple(FUSIONS.names())
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    for name in names:
        FUSIONS.get(name)  # raises, naming the choices
    if not names:
        raise ValueError("--fusions: give 'all' or a comma-separated list of strategies")
    return names


def flatten_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Numeric metrics only; `accuracy_by_type` becomes `accuracy_<type>` columns."""
    flat = {}
    for key, value in metrics.items():
        if key in ("examples", "skipped"):
            continue
        if isinstance(value, dict):
            flat.update({f"accuracy_{k}": float(v) for k, v in value.items()})
        elif isinstance(value, int | float):
            flat[key] = float(value)
    return flat


def mean_and_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1); the std of a single value is 0."""
    mean = math.fsum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


def aggregate(per_seed: list[dict[str, float]]) -> dict[str, tuple[float, float]]:
    """(mean, sample std) of every key present in all seeds."""
    keys = [k for k in per_seed[0] if all(k in seed for seed in per_seed)]
    return {key: mean_and_std([seed[key] for seed in per_seed]) for key in keys}


def training_speed(run_dir: Path, examples_per_second: float) -> float:
    """Mean samples/s over the run's log lines that report it (one every 50 steps); shorter
    runs fall back to `examples_per_second` measured around the whole run."""
    rates = [
        entry["samples_per_s"]
        for line in (run_dir / "log.jsonl").read_text().splitlines()
        if "samples_per_s" in (entry := json.loads(line))
    ]
    return math.fsum(rates) / len(rates) if rates else examples_per_second


def latency_ms(pipe: Pipeline, test: Path, count: int = 16) -> float:
    """Milliseconds per image at batch size 1: a caption, or one question answered."""
    records = read_jsonl(test, pipe.task)[: count + 1]

    def infer(record) -> None:
        if pipe.task == "caption":
            pipe.caption([record.image_path])
        else:
            pipe.ask(record.image_path, record.fields["question"])

    infer(records[0])  # warm-up
    start = time.perf_counter()
    for record in records[1:]:
        infer(record)
    return 1000 * (time.perf_counter() - start) / max(1, len(records) - 1)


def _train(task: str, train_file, val_file, out: Path, spec: CompareSpec, config, fusion: str):
    model = replace(spec.model, fusion=FusionConfig(name=fusion, latents=spec.model.fusion.latents))
    train(task, train_file, out, val_file, model, config, progress=spec.progress)
    return out


def run_one(spec: CompareSpec, files: DataFiles, fusion: str, seed: int, out: Path) -> dict:
    """Train and score one strategy with one seed; return its metrics and costs."""
    run_dir = out / "runs" / fusion / f"seed{seed}"
    config = replace(spec.train, seed=seed)
    if spec.caption_warm_start:
        caption_config = replace(spec.caption_train or spec.train, seed=seed)
        captioner = _train(
            "caption",
            files.caption_train,
            files.caption_val,
            run_dir / "caption",
            spec,
            caption_config,
            fusion,
        )
        config = replace(config, init_from=str(captioner))
    started = time.monotonic()
    task_dir = _train(spec.task, files.train, files.val, run_dir / spec.task, spec, config, fusion)
    train_seconds = time.monotonic() - started
    steps = json.loads((task_dir / "log.jsonl").read_text().splitlines()[-1])["step"]
    pipe = Pipeline.load(task_dir)
    metrics = evaluate(task_dir, files.test, EvalOptions(progress=spec.progress), pipe=pipe)
    return {
        **flatten_metrics(metrics),
        "parameters": float(pipe.model.num_parameters()),
        "trainable_parameters": float(pipe.model.num_parameters(trainable_only=True)),
        "samples_per_s": training_speed(task_dir, steps * config.batch_size / train_seconds),
        "latency_ms_per_image": latency_ms(pipe, files.test),
        "train_seconds": train_seconds,
    }


def compare(spec: CompareSpec, files: DataFiles, out: Path, command: str = "") -> Path:
    """Run every (strategy, seed); write compare.{csv,md,png,json} into `out`."""
    if spec.caption_warm_start and (spec.task != "vqa" or files.caption_train is None):
        raise ValueError("--caption-warm-start is for --task vqa and needs caption data")
    out.mkdir(parents=True, exist_ok=True)
    raw: dict[str, list[dict]] = {}
    for fusion in spec.fusions:
        for seed in range(spec.seeds):
            print(f"[compare] {fusion}, seed {seed + 1}/{spec.seeds}", flush=True)
            raw.setdefault(fusion, []).append(run_one(spec, files, fusion, seed, out))
    (out / "compare.json").write_text(json.dumps(raw, indent=2) + "\n")
    results = {fusion: aggregate(runs) for fusion, runs in raw.items()}
    write_csv(out / "compare.csv", results, spec.seeds)
    table = write_markdown(out / "compare.md", results, spec, command)
    plot(out / "compare.png", results, spec.task)
    print(table)
    return out


def _columns(results: dict[str, dict[str, tuple[float, float]]]) -> list[str]:
    first = next(iter(results.values()))
    return [key for key in first if all(key in r for r in results.values())]


def write_csv(path: Path, results: dict[str, dict[str, tuple[float, float]]], seeds: int) -> None:
    columns = _columns(results)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["fusion", *[f"{c}_{s}" for c in columns for s in ("mean", "std")], "seeds"]
        )
        for fusion, values in results.items():
            writer.writerow([fusion, *[f"{v:.6g}" for c in columns for v in values[c]], seeds])


def _cell(mean: float, std: float, key: str) -> str:
    if key.endswith("parameters"):
        return f"{mean / 1e6:.2f}M"
    if key in ("samples_per_s", "latency_ms_per_image", "train_seconds"):
        return f"{mean:.0f}" if key != "latency_ms_per_image" else f"{mean:.1f}"
    return f"{mean:.3f} ± {std:.3f}"


def write_markdown(path: Path, results, spec: CompareSpec, command: str) -> str:
    columns = _columns(results)
    lines = [
        f"| fusion | {' | '.join(columns)} |",
        f"|---|{'---|' * len(columns)}",
        *[
            f"| {fusion} | {' | '.join(_cell(*values[c], c) for c in columns)} |"
            for fusion, values in results.items()
        ],
    ]
    table = "\n".join(lines)
    header = (
        f"# vtfuse compare: {spec.task}\n\n"
        f"{spec.seeds} seed(s), at most {spec.train.max_minutes:g} min of training per model"
        f"{' (plus as long for its captioner)' if spec.caption_warm_start else ''}; "
        "mean ± sample standard deviation over seeds. Latency: ms per image at batch size 1.\n"
        + (f"\nCommand: `{command}`\n" if command else "")
    )
    path.write_text(f"{header}\n{table}\n")
    return table


def plot(path: Path, results, task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = _columns(results)
    metrics = [c for c in columns if c.startswith("accuracy_")] or [MAIN_METRIC[task]]
    metrics = [m for m in metrics if m in columns]
    fusions = list(results)
    width = 0.8 / max(1, len(metrics))
    figure, axes = plt.subplots(figsize=(max(6, 1.4 * len(fusions)), 4))
    for i, metric in enumerate(metrics):
        means = [results[f][metric][0] for f in fusions]
        stds = [results[f][metric][1] for f in fusions]
        positions = [x + i * width for x in range(len(fusions))]
        axes.bar(positions, means, width, yerr=stds, capsize=3, label=metric)
    axes.set_xticks([x + width * (len(metrics) - 1) / 2 for x in range(len(fusions))])
    axes.set_xticklabels(fusions, rotation=20, ha="right")
    axes.set_ylabel("test score (mean ± std over seeds)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
