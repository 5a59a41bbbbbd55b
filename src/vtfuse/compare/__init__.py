"""`vtfuse compare`: fusion strategies side by side, on the same data, budget and seeds.

Why: a fusion strategy is only better than another if it wins under equal conditions, and a
single seed on a few CPU minutes is noise. So every chosen strategy is trained with
`vtfuse.training.train` on the same files, with the same schedule and time budget, once per seed
(0 … N−1), and scored on the same test file with `vtfuse.evaluation.evaluate` (greedy decoding).

What is measured, per run:

* the task's main metrics — captioning: CIDEr, BLEU-4, METEOR, object F1, pointing accuracy;
  VQA: accuracy, accuracy per question type (`accuracy_<type>`), pointing accuracy (object F1
  and pointing accuracy only when the data has scenes and boxes, METEOR only with Java);
* its costs — total and trainable parameters; training samples/s (the mean of the rates the
  training log reports every 50 steps, or, for runs too short for that, samples seen / wall
  time of the whole `train` call); inference latency in ms per image at batch size 1
  (`Pipeline.caption` or `Pipeline.ask` over up to 32 test images, after one warm-up call,
  images already decoded).

Seeds are summarised as mean ± *sample* standard deviation (n − 1; 0 for a single seed) and
written as `compare.csv`, `compare.md`, a bar chart `compare.png`, and the raw per-seed numbers
in `compare.json`.

Every run uses the library's defaults (`ModelConfig()`, `TrainConfig()` planned on the clock of
its budget) on the built-in scenes and on your data alike, unless a `--config` file says
otherwise: the table then shows what a user gets. With `caption_warm_start` (VQA or retrieval),
each (strategy, seed) first trains a captioner with the same strategy and budget, and the model
starts from it (`TrainConfig.init_from`).
"""

from vtfuse.compare.report import RunResult, aggregate, mean_and_std
from vtfuse.compare.runs import (
    CompareSpec,
    DataFiles,
    compare,
    join,
    main_metrics,
    parse_fusions,
    synthetic_data,
)

__all__ = [
    "CompareSpec",
    "DataFiles",
    "RunResult",
    "aggregate",
    "compare",
    "join",
    "main_metrics",
    "mean_and_std",
    "parse_fusions",
    "synthetic_data",
]
