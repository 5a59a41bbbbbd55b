"""`vtfuse quickstart`: the whole loop offline on a laptop CPU.

synthetic scenes → train a captioner → train a VQA model, a retrieval model and a pair
classifier (is this statement about the image true?) from it →
evaluate each on the held-out test split, and again with blank images (the blind baseline) →
attention pictures → report.md and metrics.json.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from vtfuse.config import FusionConfig, LMConfig, ModelConfig, TextConfig, TrainConfig, VisionConfig
from vtfuse.data.synth import SynthSpec, generate
from vtfuse.evaluation import EvalOptions, evaluate, format_table
from vtfuse.pipeline import Pipeline
from vtfuse.tasks import CAPTION, CLASSIFY, RETRIEVAL, VQA, read_jsonl
from vtfuse.training import train


@dataclass(frozen=True)
class Stage:
    """One model to train: its architecture and its training schedule."""

    model: ModelConfig
    train: TrainConfig


def default_stage(task: str, minutes: float) -> Stage:
    """The library's defaults for `task` (model, and the task's batch size and learning rate),
    planned on a time budget: what `vtfuse train --task T --max-minutes M` does."""
    return Stage(ModelConfig(task=task), TrainConfig(max_minutes=minutes))


@dataclass(frozen=True)
class QuickstartPlan:
    """Every stage is the library's defaults on a time budget; nothing here is made for the
    scenes (benchmarks/schedule.py measured what the defaults needed to learn them)."""

    images: int = 3000
    seed: int = 0
    minutes: float | None = None  # cap on each model's training time (None: the stage's own)
    progress: bool = True
    # The stages that start from the captioner (`--init-from`: vision encoder, fusion blocks,
    # shared words). The VQA model learns from scratch; the retrieval model and the pair
    # classifier, which get one bit or one ranking an example instead of a word a token, look
    # sooner with it (from scratch at 289dc31's budgets, retrieval 4 minutes and classifier 3,
    # benchmarks/quickstart_defaults.py: re-ranked R@1 0.55 / 0.62 against 0.98 / 0.98, accuracy
    # 0.498 against 0.978).
    warm_start: tuple[str, ...] = (RETRIEVAL.name, CLASSIFY.name)
    # Minutes sized on a slow machine (2 cores, ~260 caption steps a minute): shorter budgets
    # ended the captioner (3 minutes), the pair classifier (3), the retrieval model (4) and the
    # VQA model (5: validation accuracy still +0.01 a minute) in the steep part of their
    # curves, where a run's figure depends on the day's speed
    caption: Stage = field(default_factory=lambda: default_stage(CAPTION.name, 4.0))
    # None: no such stage
    vqa: Stage | None = field(default_factory=lambda: default_stage(VQA.name, 6.0))
    retrieval: Stage | None = field(default_factory=lambda: default_stage(RETRIEVAL.name, 5.0))
    classify: Stage | None = field(default_factory=lambda: default_stage(CLASSIFY.name, 5.0))

    @property
    def summary(self) -> str:
        """What is trained: the caption model's parts (the VQA model shares them)."""
        model = self.caption.model
        text = f"{model.lm.name} (frozen)" if model.lm.name else "vtfuse Transformer (trained)"
        vision = model.vision
        grid = vision.image_size // vision.patch_size // vision.pool
        budget = [stage.train.length if stage else "none" for stage in (self.caption, self.vqa)]
        return (
            f"vision {vision.name} at {vision.image_size} px ({grid}×{grid} tokens), text "
            f"{text}, fusion {model.fusion.name}; training: captioner {budget[0]}, VQA "
            f"{budget[1]}"
        )

    @classmethod
    def tiny(cls) -> QuickstartPlan:
        """Seconds, not minutes: exercises every step; the numbers mean nothing."""
        small_vision = VisionConfig(channels=(8, 8, 16), dim=32, depth=0, heads=2)
        small_text = TextConfig(dim=32, depth=1, heads=2, max_length=48)
        schedule = TrainConfig(epochs=1, batch_size=16, lr=1e-3)
        return cls(
            images=30,
            caption=Stage(
                ModelConfig(task=CAPTION.name, vision=small_vision, text=small_text), schedule
            ),
            vqa=Stage(ModelConfig(task=VQA.name, vision=small_vision, text=small_text), schedule),
            retrieval=Stage(
                ModelConfig(task=RETRIEVAL.name, vision=small_vision, text=small_text), schedule
            ),
            classify=Stage(
                ModelConfig(task=CLASSIFY.name, vision=small_vision, text=small_text), schedule
            ),
        )


# 96 px → EfficientNet-Lite0's 3 × 3 grid of 1280-wide features: a small image keeps the frozen
# backbone's share of a CPU step small (MiniLM's is already several times the default model's).
PRETRAINED_VISION = VisionConfig(name="efficientnet-lite0", image_size=96, patch_size=32, depth=0)
PRETRAINED_TEXT = LMConfig(name="minilm", xattn_every=2)
# An example costs ~16× (a caption, through MiniLM and its 30k-word head) and ~6× (a question)
# what it costs the default model (measured, 2 CPU cores), so the pretrained stages get more
# minutes and still see only ~2 epochs.
PRETRAINED_MINUTES = 6.0


def pretrained_parts(plan: QuickstartPlan) -> QuickstartPlan:
    """`plan` with EfficientNet-Lite0 (ImageNet) and MiniLM-L6, both frozen, and Flamingo's
    gated cross-attention before every second MiniLM layer: only the blocks, the image
    projection, the answer head and the caption head's transform train."""

    def with_pretrained_parts(stage: Stage, batch_size: int) -> Stage:
        model = replace(
            stage.model,
            vision=replace(PRETRAINED_VISION, dim=stage.model.vision.dim),
            lm=PRETRAINED_TEXT,
            fusion=FusionConfig(name="gated_cross_attention"),
        )
        minutes = stage.train.max_minutes and PRETRAINED_MINUTES
        return Stage(model, replace(stage.train, batch_size=batch_size, max_minutes=minutes))

    return replace(
        plan,
        retrieval=None,  # a pretrained text encoder does not do retrieval yet
        classify=None,
        caption=with_pretrained_parts(plan.caption, 16),
        vqa=with_pretrained_parts(plan.vqa, 32),
    )


def _train_stage(
    task: str, stage: Stage, data: Path, runs: Path, plan: QuickstartPlan, init_from: str = ""
) -> Path:
    config = replace(stage.train, seed=plan.seed, init_from=init_from)
    if plan.minutes is not None:
        config = replace(config, max_minutes=plan.minutes)
    out = runs / task
    train(
        task,
        data / f"{task}_train.jsonl",
        out,
        data / f"{task}_val.jsonl",
        stage.model,
        config,
        progress=plan.progress,
    )
    return out


def _pictures(run: Path, data: Path, out: Path, task: str, count: int = 2) -> list[Path]:
    pipe = Pipeline.load(run)
    records = read_jsonl(data / f"{task}_test.jsonl", task)
    if task == VQA.name:  # one question of each kind
        kinds = ("non-relational", "relational")
        records = [next(r for r in records if r.fields.get("type") == kind) for kind in kinds]
    paths = []
    for i, record in enumerate(records[:count]):
        path, _ = pipe.draw_attention(
            record.image_path, out / f"{task}_{i}.png", record.fields.get("question")
        )
        paths.append(path)
    return paths


def _metric_row(
    name: str, metrics: dict[str, Any], blind: dict[str, Any], keys: list[str]
) -> list[str]:
    rows = []
    for key in keys:
        if key in metrics:
            seen, unseen = metrics[key], blind.get(key)
            rows.append(
                f"| {name} | {key} | {seen:.3f} | {'n/a' if unseen is None else f'{unseen:.3f}'} |"
            )
    return rows


RETRIEVAL_KEYS = ["i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"]


def write_report(out: Path, metrics: dict[str, Any], pictures: list[Path]) -> Path:
    lines = [
        "# vtfuse quickstart report",
        "",
        f"Synthetic scenes, held-out test split; trained and evaluated on this machine in "
        f"{metrics['wall_seconds']:.0f} s. *Blind* is the same model given a blank image: the gap "
        "is what looking at the image buys. BLEU is reported but means little on templated "
        "captions (a fixed caption scores high while seeing nothing); `object_f1` checks the "
        "facts each caption states against the scene.",
        "",
        "| model | metric | with image | blind |",
        "|---|---|---|---|",
        *_metric_rows(metrics),
        "",
        "## Where the model looked",
        "",
        "Each panel: one token and its cross-attention over the image (mean over fusion layers and "
        "over heads). For captions, the attention of the step that produced the token.",
        "",
        *[f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in pictures],
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _metric_rows(metrics: dict[str, Any]) -> list[str]:
    """The report's table: each model's scores with the image and blind."""
    blind = metrics["blind"]
    vqa_types = list(metrics.get(VQA.name, {}).get("accuracy_by_type", {}))

    def by_type(scores: dict[str, Any]) -> dict[str, Any]:
        kinds = scores.get("accuracy_by_type", {})
        return scores | {f"accuracy ({k})": v for k, v in kinds.items()}

    rows = [
        (CAPTION.name, metrics["caption"], blind["caption"],
         ["object_f1", "pointing_accuracy", "cider", "bleu4", "meteor", "rouge_l"]),
        (VQA.name, by_type(metrics.get(VQA.name, {})), by_type(blind.get(VQA.name, {})),
         ["accuracy", *[f"accuracy ({k})" for k in vqa_types], "pointing_accuracy"]),
        (CLASSIFY.name, metrics.get(CLASSIFY.name, {}), blind.get(CLASSIFY.name, {}),
         ["accuracy", "macro_f1", "pointing_accuracy"]),
        ("classify (text blanked)", metrics.get("blind_text", {}).get(CLASSIFY.name, {}), {},
         ["accuracy", "macro_f1"]),
        (RETRIEVAL.name, metrics.get(RETRIEVAL.name, {}), blind.get(RETRIEVAL.name, {}),
         [*RETRIEVAL_KEYS, *(f"itm_{k}" for k in RETRIEVAL_KEYS if k.endswith("r1"))]),
    ]  # fmt: skip
    return [line for row in rows for line in _metric_row(*row)]


def run(out: Path, plan: QuickstartPlan = QuickstartPlan()) -> dict[str, Any]:
    started = time.monotonic()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = out / "data"
    print(f"[1/5] synthesising {plan.images} scenes into {data}")
    generate(data, SynthSpec(images=plan.images, seed=plan.seed), progress=plan.progress)
    return train_evaluate_report(out, data, plan, started)


def train_evaluate_report(
    out: Path, data: Path, plan: QuickstartPlan, started: float | None = None
) -> dict[str, Any]:
    """Steps 2–5 on existing data: train the models, evaluate, draw, write the report."""
    started = time.monotonic() if started is None else started
    runs, pictures_dir = out / "runs", out / "pictures"
    print("[2/5] training the captioner")
    caption_run = _train_stage(CAPTION.name, plan.caption, data, runs, plan)
    warm = ", ".join(plan.warm_start) or "none"
    print(f"[3/5] training the VQA, retrieval and pair models (from the captioner: {warm})")
    trained = {"caption": caption_run}
    for task, stage in (
        (VQA.name, plan.vqa),
        (RETRIEVAL.name, plan.retrieval),
        (CLASSIFY.name, plan.classify),
    ):
        if stage is not None:
            init_from = str(caption_run) if task in plan.warm_start else ""
            trained[task] = _train_stage(task, stage, data, runs, plan, init_from=init_from)

    print("[4/5] evaluating on the test split, with and without the image")
    results: dict[str, Any] = {"blind": {}, "parameters": {}}
    for task, run_dir in trained.items():
        pipe = Pipeline.load(run_dir)
        test = data / f"{task}_test.jsonl"
        options = EvalOptions(progress=plan.progress)
        results[task] = evaluate(
            run_dir, test, options, out / f"{task}_predictions.jsonl", pipe=pipe
        )
        results["blind"][task] = evaluate(run_dir, test, replace(options, blind=True), pipe=pipe)
        if task == CLASSIFY.name:  # and the other blind baseline: the image without the text
            options = replace(options, blind_text=True, confusion_png=str(out / "confusion.png"))
            results["blind_text"] = {task: evaluate(run_dir, test, options, pipe=pipe)}
        results["parameters"][task] = {
            "total": pipe.model.num_parameters(),
            "trainable": pipe.model.num_parameters(trainable_only=True),
        }
        print(format_table(results[task], f"{task} (test)"))
        print(format_table(results["blind"][task], f"{task} (test, blind)"))

    print("[5/5] drawing attention")
    pictures = [
        picture
        for task in (CAPTION.name, VQA.name)
        if task in trained
        for picture in _pictures(trained[task], data, pictures_dir, task)
    ]
    results["wall_seconds"] = round(time.monotonic() - started, 1)
    (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    report = write_report(out, results, pictures)
    print(f"report: {report}\nmetrics: {out / 'metrics.json'}  ({results['wall_seconds']:.0f} s)")
    return results


SIDE_BY_SIDE = [  # (task, metric) rows of the pretrained-vs-default table
    (CAPTION.name, "object_f1"),
    (CAPTION.name, "cider"),
    (CAPTION.name, "bleu4"),
    (CAPTION.name, "meteor"),
    (CAPTION.name, "pointing_accuracy"),
    (VQA.name, "accuracy"),
    (VQA.name, "pointing_accuracy"),
    *((RETRIEVAL.name, key) for key in RETRIEVAL_KEYS),
    (CLASSIFY.name, "accuracy"),
    (CLASSIFY.name, "macro_f1"),
]


def run_pretrained(out: Path, default: QuickstartPlan, pretrained: QuickstartPlan) -> dict:
    """The default quickstart and the pretrained one on the same scenes, side by side."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = out / "data"
    print(f"synthesising {default.images} scenes into {data}")
    generate(data, SynthSpec(images=default.images, seed=default.seed), progress=default.progress)
    results = {}
    for name, plan in (("default", default), ("pretrained", pretrained)):
        print(f"== {name}: {plan.summary}")
        results[name] = train_evaluate_report(out / name, data, plan)
    (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    report = write_side_by_side(out, results, {"default": default, "pretrained": pretrained})
    print(report.read_text())
    return results


def write_side_by_side(out: Path, results: dict, plans: dict[str, QuickstartPlan]) -> Path:
    default, pretrained = results["default"], results["pretrained"]

    def value(metrics: dict, task: str, key: str, blind: bool = False) -> str:
        source = (metrics["blind"] if blind else metrics).get(task, {})
        return f"{source[key]:.3f}" if key in source else "n/a"

    def millions(metrics: dict, task: str) -> str:
        counts = metrics["parameters"][task]
        return f"{counts['total'] / 1e6:.2f}M ({counts['trainable'] / 1e6:.2f}M trainable)"

    lines = [
        "# vtfuse quickstart: pretrained parts beside the default",
        "",
        *[f"- **{name}**: {plan.summary}" for name, plan in plans.items()],
        "",
        "Same synthetic scenes, held-out test split, trained and evaluated on this machine. "
        "Blind: the same model given a blank image (what looking at the image buys).",
        "",
        "| task | metric | default | pretrained | default, blind | pretrained, blind |",
        "|---|---|---|---|---|---|",
        *[
            f"| {task} | {key} | {value(default, task, key)} | {value(pretrained, task, key)} "
            f"| {value(default, task, key, True)} | {value(pretrained, task, key, True)} |"
            for task, key in SIDE_BY_SIDE
        ],
        *[
            f"| {task} | parameters | {millions(default, task)} | {millions(pretrained, task)} "
            "| | |"
            for task in (CAPTION.name, VQA.name)
        ],
        f"| both | training + evaluation (s) | {default['wall_seconds']:.0f} "
        f"| {pretrained['wall_seconds']:.0f} | | |",
        "",
        "Per-model reports: `default/report.md`, `pretrained/report.md`.",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
