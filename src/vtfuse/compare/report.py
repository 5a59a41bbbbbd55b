"""What a comparison reports: each strategy's seeds summarised (mean ± sample std), written
as CSV, a markdown table and a bar chart of the task's headline metric."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vtfuse.tasks import task_spec

COSTS = ("parameters", "trainable_parameters", "samples_per_s", "latency_ms_per_image")
Summary = dict[str, tuple[float, float]]  # metric → (mean, sample std) over seeds


@dataclass(frozen=True)
class RunResult:
    """One (strategy, seed): its scores and costs, as written to compare.json."""

    fusion: str
    seed: int
    run: str
    metrics: dict[str, float]
    parameters: int
    trainable_parameters: int
    samples_per_s: float
    latency_ms_per_image: float
    train_seconds: float


# -- summaries ---------------------------------------------------------------------------------
def mean_and_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1); the std of a single value is 0."""
    mean = math.fsum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


def aggregate(per_seed: Sequence[dict[str, float]]) -> Summary:
    """(mean, sample std) of every key present in all seeds, in first-seed order."""
    keys = [k for k in per_seed[0] if all(k in seed for seed in per_seed)]
    return {key: mean_and_std([seed[key] for seed in per_seed]) for key in keys}


def summarise(runs: Sequence[RunResult]) -> Summary:
    """One strategy's seeds: its metrics, then its costs, each as (mean, sample std)."""
    costs = [{name: float(getattr(r, name)) for name in COSTS} for r in runs]
    return {**aggregate([r.metrics for r in runs]), **aggregate(costs)}


def metric_columns(summaries: dict[str, Summary]) -> list[str]:
    """Every metric some strategy has, in first-seen order (costs excluded)."""
    keys = dict.fromkeys(k for s in summaries.values() for k in s if k not in COSTS)
    return list(keys)


# -- outputs -----------------------------------------------------------------------------------
def write_csv(path: Path, summaries: dict[str, Summary], seeds: int) -> None:
    """One row per strategy: `<metric>_mean`, `<metric>_std`, then the costs (means)."""
    metrics = metric_columns(summaries)
    header = ["fusion", *[f"{m}_{s}" for m in metrics for s in ("mean", "std")], *COSTS, "seeds"]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for fusion, summary in summaries.items():
            cells: list[str] = []
            for metric in metrics:  # a metric one strategy lacks is left empty
                cells += [f"{v:.6g}" for v in summary[metric]] if metric in summary else ["", ""]
            costs = [_cost(name, summary[name][0]) for name in COSTS]
            writer.writerow([fusion, *cells, *costs, seeds])


def _cost(name: str, value: float) -> str:
    return str(round(value)) if name.endswith("parameters") else f"{value:.4g}"


def _count(value: float) -> str:
    """12345 → "12.3k", 4567890 → "4.57M"."""
    if value >= 1e6:
        return f"{value / 1e6:.3g}M"
    return f"{value / 1e3:.3g}k" if value >= 1e3 else f"{value:.0f}"


def markdown_table(summaries: dict[str, Summary]) -> str:
    metrics = metric_columns(summaries)
    header = [*metrics, "parameters", "trainable", "train samples/s", "latency ms/image"]
    lines = [f"| fusion | {' | '.join(header)} |", f"|---|{'---:|' * len(header)}"]
    for fusion, summary in summaries.items():
        cells = [
            f"{summary[m][0]:.3f} ± {summary[m][1]:.3f}" if m in summary else "n/a" for m in metrics
        ]
        cells += [
            _count(summary["parameters"][0]),
            _count(summary["trainable_parameters"][0]),
            f"{summary['samples_per_s'][0]:.0f}",
            f"{summary['latency_ms_per_image'][0]:.1f}",
        ]
        lines.append(f"| {fusion} | {' | '.join(cells)} |")
    return "\n".join(lines)


def write_markdown(
    path: Path, summaries: dict[str, Summary], raw: dict[str, Any], conditions: list[str]
) -> str:
    """compare.md: the conditions, then the table; returns the table."""
    table = markdown_table(summaries)
    command = raw.get("command", "")
    lines = [
        f"# vtfuse compare: {raw['task']}",
        "",
        *conditions,
        "",
        f"Metrics on the test file (greedy): mean ± sample standard deviation (n − 1) over "
        f"{raw['seeds']} seed(s). Costs are means over seeds: parameters, training samples/s, and "
        "inference latency in ms per image at batch size 1. Per-seed numbers: compare.json.",
        "",
        *([f"Command: `{command}`", ""] if command else []),
        table,
        "",
    ]
    path.write_text("\n".join(lines))
    return table


def plot(path: Path, summaries: dict[str, Summary], task: str) -> None:
    """Bar chart of the headline metric per strategy with std error bars; for VQA one group of
    bars per question type (after the overall accuracy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    headline = task_spec(task).headline
    groups = [headline, *(m for m in metric_columns(summaries) if m.startswith("accuracy_"))]
    labels = ["all questions" if g == "accuracy" and len(groups) > 1 else g for g in groups]
    labels = [label.removeprefix("accuracy_") for label in labels]
    fusions = list(summaries)
    width = 0.8 / len(fusions)
    figure, axes = plt.subplots(figsize=(max(6.0, 0.5 * len(groups) * len(fusions) + 2), 4))
    for i, fusion in enumerate(fusions):
        offset = (i - (len(fusions) - 1) / 2) * width
        summary = summaries[fusion]
        means = [summary.get(g, (math.nan, 0.0))[0] for g in groups]
        stds = [summary.get(g, (0.0, 0.0))[1] for g in groups]
        axes.bar(
            [x + offset for x in range(len(groups))],
            means,
            width,
            yerr=stds,
            capsize=3,
            label=fusion,
        )
    axes.set_xticks(range(len(groups)), labels)
    axes.set_ylabel(f"test {headline} (mean ± std over seeds)")
    axes.legend(title="fusion", fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
