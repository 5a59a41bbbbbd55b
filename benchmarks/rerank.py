"""How should the matching head's score and the dual encoder's combine when re-ranking?

    python benchmarks/rerank.py --data DIR RUN [RUN ...] [--out F]

Scores each retrieval run on `DIR/retrieval_test.jsonl` four ways: the dual encoder alone
(cosine), and its top 16 per query re-ranked by the matching head's log-odds plus w × the
cosine for w = 0 (the head alone), 1 (ALBEF's and BLIP's sum of the match logit and the
cosine) and the model's contrastive scale s (the two log-likelihoods summed; vtfuse's
`Pipeline.rerank`). Only inference: the runs are trained models (e.g. a quickstart's
`runs/retrieval`, or `benchmarks/warm_start_gain.py`'s). Writes `benchmarks/results/rerank.json`.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

from vtfuse.evaluation import EvalOptions, evaluate
from vtfuse.pipeline import Pipeline

RESULTS = Path(__file__).parent / "results" / "rerank.json"
KEYS = ("i2t_r1", "t2i_r1")


def score_run(run: Path, data: Path) -> dict:
    """R@1 both ways for the dual encoder and each re-ranking."""
    pipe = Pipeline.load(run)
    scale = pipe.model.scale.item()
    figures: dict = {"run": str(run), "scale": scale}
    for name, weight in (("head", 0.0), ("head + cosine", 1.0), ("head + s · cosine", scale)):
        pipe.rerank = functools.partial(Pipeline.rerank, pipe, contrastive_weight=weight)
        metrics = evaluate(
            run, data / "retrieval_test.jsonl", EvalOptions(progress=False), pipe=pipe
        )
        figures[name] = {key: metrics[f"itm_{key}"] for key in KEYS}
    figures["dual encoder"] = {key: metrics[key] for key in KEYS}  # the same in every pass
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a quickstart's data/ folder")
    parser.add_argument("runs", type=Path, nargs="+", help="trained retrieval runs")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    results = []
    for run in args.runs:
        results.append(score_run(run, args.data))
        shown = {k: v for k, v in results[-1].items() if isinstance(v, dict)}
        print(run, json.dumps(shown), flush=True)
    report = {"command": "python benchmarks/rerank.py --data DIR RUN [RUN ...]", "runs": results}
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
