"""The comparison's runs: every (strategy, seed) trained on the same files and budget, scored on
the same test file, and several comparisons joined into one (see `vtfuse.compare`)."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image

from vtfuse.compare.report import (
    RunResult,
    Summary,
    plot,
    summarise,
    write_csv,
    write_markdown,
)
from vtfuse.config import ModelConfig, TrainConfig
from vtfuse.data.images import load_image
from vtfuse.data.synth import SynthSpec, generate
from vtfuse.evaluation import EvalOptions, evaluate
from vtfuse.fusion import FUSIONS
from vtfuse.pipeline import Pipeline
from vtfuse.tasks import CAPTION, VQA, ranked_tasks, read_jsonl, task_spec, with_task_schedule
from vtfuse.training import train


@dataclass(frozen=True)
class DataFiles:
    train: Path
    val: Path
    test: Path
    caption_train: Path | None = None  # the warm-start captioner's data
    caption_val: Path | None = None


@dataclass(frozen=True)
class CompareSpec:
    """What to compare and under which conditions; invalid combinations are refused up front."""

    task: str
    fusions: tuple[str, ...]
    model: ModelConfig  # fusion.name is replaced by each strategy in turn
    train: TrainConfig  # max_minutes is every model's budget; seed is replaced by 0 … seeds−1
    seeds: int = 3
    caption_warm_start: bool = False
    caption_train: TrainConfig | None = None  # the warm-start captioner's schedule (None: train)
    progress: bool = True

    def __post_init__(self) -> None:
        if self.task not in ranked_tasks():
            raise ValueError(
                f"compare takes a task with ranking metrics: {', '.join(ranked_tasks())}; "
                f"not {self.task!r}"
            )
        if not self.fusions:
            raise ValueError(
                f"no fusion strategy given; choose among: {', '.join(FUSIONS.names())}"
            )
        for name in self.fusions:
            FUSIONS.get(name)  # raises "unknown fusion strategy 'x'; choose one of: ..."
        if self.seeds < 1:
            raise ValueError(f"--seeds must be at least 1, got {self.seeds}")
        if self.train.max_minutes <= 0:
            raise ValueError("a comparison needs a time budget: --max-minutes-each > 0")
        if self.caption_warm_start and task_spec(self.task).generates:
            raise ValueError("--caption-warm-start is for --task vqa or retrieval")


# -- set-up ------------------------------------------------------------------------------------
def parse_fusions(text: str) -> tuple[str, ...]:
    """ "all" (every registered strategy) or a comma list, repeats dropped; `CompareSpec`
    checks the names against the registry."""
    if text.strip() == "all":
        return tuple(FUSIONS.names())
    return tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))


def synthetic_data(folder: Path, task: str, images: int, progress: bool = True) -> DataFiles:
    """Generate the built-in scenes into `folder` (same seed, same data) and name the splits."""
    generate(folder, SynthSpec(images=images), progress=progress)
    return DataFiles(
        *(folder / f"{task}_{split}.jsonl" for split in ("train", "val", "test")),
        caption_train=folder / "caption_train.jsonl",
        caption_val=folder / "caption_val.jsonl",
    )


LATENCY_IMAGES = 32


# -- one run -----------------------------------------------------------------------------------
def main_metrics(task: str, metrics: dict[str, Any]) -> dict[str, float]:
    """The task's main metrics from `evaluate`'s output, `accuracy_by_type` spread into
    `accuracy_<type>`; metrics that are absent or None (METEOR without Java) are left out."""
    flat: dict[str, float] = {}
    for key in task_spec(task).metrics:
        if metrics.get(key) is not None:
            flat[key] = float(metrics[key])
        if key == "accuracy":
            for kind, value in metrics.get("accuracy_by_type", {}).items():
                flat[f"accuracy_{kind}"] = float(value)
    return flat


def training_speed(run_dir: Path, fallback: float) -> float:
    """Mean samples/s over the run's log lines that report it (one every 50 steps); `fallback`
    for runs too short to have one."""
    rates = [
        entry["samples_per_s"]
        for line in (run_dir / "log.jsonl").read_text().splitlines()
        if "samples_per_s" in (entry := json.loads(line))
    ]
    return math.fsum(rates) / len(rates) if rates else fallback


def latency_ms(
    pipe: Pipeline, test: Path, count: int = LATENCY_IMAGES, roots: tuple[str, ...] = ()
) -> float:
    """Milliseconds per image at batch size 1 — one caption, or one question answered — over up
    to `count` distinct test images, after one warm-up call; images are decoded beforehand."""
    records = read_jsonl(test, pipe.task, roots=roots)
    records = list({r.image_path: r for r in records}.values())[: count + 1]
    inputs = [(load_image(r.image_path), r.fields.get("question", "")) for r in records]

    def infer(image: Image.Image, question: str) -> None:
        if pipe.task == CAPTION.name:
            pipe.caption([image])
        elif pipe.task == VQA.name:
            pipe.ask(image, question)
        else:  # retrieval: the image's embedding (texts are embedded once, ahead)
            pipe.embed_images(pipe.images_to_tensor([image]))

    infer(*inputs[0])  # warm-up: first-call allocations are not latency
    timed = inputs[1:] or inputs
    start = time.perf_counter()
    for image, question in timed:
        infer(image, question)
    return 1000 * (time.perf_counter() - start) / len(timed)


def _train(
    task: str,
    files: tuple[Path, Path | None],
    out: Path,
    model: ModelConfig,
    config: TrainConfig,
    progress: bool,
) -> tuple[float, float]:
    """Train one model into `out`; return (samples/s, wall seconds)."""
    config = with_task_schedule(config, task)
    started = time.monotonic()
    result = train(task, files[0], out, files[1], model, config, progress=progress)
    seconds = time.monotonic() - started
    return training_speed(out, result.step * config.batch_size / seconds), seconds


def run_one(spec: CompareSpec, files: DataFiles, fusion: str, seed: int, out: Path) -> RunResult:
    """Train (after its captioner, with a warm start) and score one strategy with one seed."""
    run_dir = out / "runs" / fusion / f"seed{seed}"
    model = replace(spec.model, fusion=replace(spec.model.fusion, name=fusion))
    config = replace(spec.train, seed=seed)
    if spec.caption_warm_start:
        captioner = run_dir.with_name(f"seed{seed}-captioner")
        caption_config = replace(spec.caption_train or spec.train, seed=seed)
        _train(
            CAPTION.name,
            (files.caption_train, files.caption_val),
            captioner,
            model,
            caption_config,
            spec.progress,
        )
        config = replace(config, init_from=str(captioner))
    speed, seconds = _train(
        spec.task, (files.train, files.val), run_dir, model, config, spec.progress
    )
    pipe = Pipeline.load(run_dir)
    options = EvalOptions(progress=spec.progress, image_roots=spec.train.image_roots)
    metrics = evaluate(run_dir, files.test, options, pipe=pipe)
    return RunResult(
        fusion,
        seed,
        str(run_dir),
        main_metrics(spec.task, metrics),
        pipe.model.num_parameters(),
        pipe.model.num_parameters(trainable_only=True),
        speed,
        latency_ms(pipe, files.test, roots=spec.train.image_roots),
        round(seconds, 1),
    )


def _budget(spec: CompareSpec) -> str:
    train = with_task_schedule(spec.train, spec.task)
    line = f"Budget: {_length(train)} per model, seeds 0–{spec.seeds - 1}."
    if spec.caption_warm_start:
        captioner = with_task_schedule(spec.caption_train or spec.train, CAPTION.name)
        line += (
            " Each VQA model starts from a captioner with the same strategy and seed: "
            f"{_length(captioner)}."
        )
    return line


def _length(train: TrainConfig) -> str:
    return f"{train.length} at batch size {train.batch_size}"


# -- the whole comparison ----------------------------------------------------------------------
def compare(
    spec: CompareSpec, files: DataFiles, out: Path, command: str = ""
) -> dict[str, Summary]:
    """Run every (strategy, seed); write compare.{json,csv,md,png} into `out`; print the table."""
    if spec.caption_warm_start and files.caption_train is None:
        raise ValueError("--caption-warm-start needs caption data (--caption-train)")
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[RunResult]] = {}
    total = len(spec.fusions) * spec.seeds
    for index, (fusion, seed) in enumerate(
        ((f, s) for f in spec.fusions for s in range(spec.seeds)), start=1
    ):
        warm = " (captioner first, then VQA)" if spec.caption_warm_start else ""
        print(f"[compare {index}/{total}] {fusion}, seed {seed}{warm}", flush=True)
        runs.setdefault(fusion, []).append(run_one(spec, files, fusion, seed, out))
    raw = {
        "task": spec.task,
        "command": command,
        "max_minutes_each": spec.train.max_minutes,
        "seeds": spec.seeds,
        "caption_warm_start": spec.caption_warm_start,
        "runs": {f: [dataclasses.asdict(r) for r in results] for f, results in runs.items()},
    }
    conditions = [
        _budget(spec),
        f"Data: train `{files.train}`, val `{files.val}`, test `{files.test}`.",
    ]
    return write_results(out, raw, conditions)


def write_results(out: Path, raw: dict[str, Any], conditions: list[str]) -> dict[str, Summary]:
    """compare.json (the per-seed runs of `raw` and their summary), .csv, .md and .png; print
    the table."""
    runs = {f: [RunResult(**r) for r in results] for f, results in raw["runs"].items()}
    summaries = {fusion: summarise(results) for fusion, results in runs.items()}
    raw = {**raw, "summary": {f: {k: list(v) for k, v in s.items()} for f, s in summaries.items()}}
    (out / "compare.json").write_text(json.dumps(raw, indent=2) + "\n")
    write_csv(out / "compare.csv", summaries, raw["seeds"])
    table = write_markdown(out / "compare.md", summaries, raw, conditions)
    plot(out / "compare.png", summaries, raw["task"])
    print(f"\n{table}\n\nwrote {out}/compare.{{csv,md,png,json}}")
    return summaries


CONDITIONS = ("task", "max_minutes_each", "seeds", "caption_warm_start")  # equal in joined parts


def join(parts: Sequence[Path], out: Path, command: str = "") -> dict[str, Summary]:
    """One comparison from several run on the same data, budget and seeds with disjoint
    strategies (e.g. one process per core: `--fusions a,b` and `--fusions c,d`): their runs
    together, summarised again, written to `out` as `compare` writes them."""
    raws = [json.loads((Path(part) / "compare.json").read_text()) for part in parts]
    first = raws[0]
    for part, raw in zip(parts, raws, strict=True):
        for key in CONDITIONS:
            if raw[key] != first[key]:
                raise ValueError(f"{part}: {key} is {raw[key]}, not {first[key]} as in {parts[0]}")
        if shared := set(raw["runs"]) & {f for r in raws if r is not raw for f in r["runs"]}:
            raise ValueError(f"{part}: {sorted(shared)} appear in more than one part")
    out.mkdir(parents=True, exist_ok=True)
    joined = {
        **{key: first[key] for key in CONDITIONS},
        "command": command,
        "parts": [raw["command"] for raw in raws],
        "runs": {f: results for raw in raws for f, results in raw["runs"].items()},
    }
    budget = f"Budget: {first['max_minutes_each']:g} min per model, seeds 0–{first['seeds'] - 1}."
    conditions = [budget, "Joined from: " + "; ".join(f"`{r['command']}`" for r in raws) + "."]
    return write_results(out, joined, conditions)
