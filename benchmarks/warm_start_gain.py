"""Is a captioner built with the CNN's quieter start as good a warm start for retrieval?

    python benchmarks/warm_start_gain.py --data DIR --gain G --seed S --runs RUNS
    python benchmarks/warm_start_gain.py --merge RUNS_A/result.json RUNS_B/result.json [--out F]

DIR is a quickstart's `data/` folder (`vtfuse synth --out DIR` writes the same). Trains the
default captioner for a fixed number of epochs with the CNN's output layer starting at `G` ×
PyTorch's scale (`vision.CNN_BRANCH_GAIN`: 0.3 is the library's, 1 the scale before it), then
the default retrieval model warm-started from it (`--init-from`: the captioner's weights, so
the gain acts only through the captioner), and scores both on the test split. Epochs, not the
clock, bound each run: runs side by side or on a slower day give the same figures.
`--merge` joins the runs' `result.json` into `benchmarks/results/warm_start_gain.json`.

Why: after the quieter start the quickstart's retrieval R@1 fell from 0.98 to 0.89-0.91, on a
slower day of the machine (fewer steps in its time caps); this separates the two.
`results/warm_start_gain.json` holds runs of the retrieval model that mean-pooled its image
tokens (before e75ffe7); `results/warm_start_gain_attention_pool.json` the same commands with
its attention pool (`--out` names the file).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from learning import mean_std
from steps_to_look import cnn_branch_gain

from vtfuse.config import ModelConfig, TrainConfig
from vtfuse.evaluation import EvalOptions, evaluate
from vtfuse.training import train

RESULTS = Path(__file__).parent / "results" / "warm_start_gain.json"
CAPTION_EPOCHS = 6  # 900 steps: about the quickstart captioner's 3 minutes on a slow day
RETRIEVAL_EPOCHS = 5  # 375 steps
RETRIEVAL_KEYS = ("i2t_r1", "t2i_r1", "itm_i2t_r1", "itm_t2i_r1")
CAPTION_KEYS = ("object_f1", "pointing_accuracy")


def stage(task: str, data: Path, out: Path, epochs: int, seed: int, init_from: str = "") -> dict:
    """`vtfuse train --task T --epochs E --seed S [--init-from RUN]`, then `vtfuse eval`."""
    config = TrainConfig(epochs=epochs, seed=seed, init_from=init_from)
    train(
        task,
        data / f"{task}_train.jsonl",
        out,
        data / f"{task}_val.jsonl",
        ModelConfig(task=task),
        config,
        progress=False,
    )
    return evaluate(out, data / f"{task}_test.jsonl", EvalOptions(progress=False))


def run(data: Path, gain: float, seed: int, runs: Path) -> dict:
    with cnn_branch_gain(gain):  # the retrieval model's CNN is the captioner's, copied
        caption = stage("caption", data, runs / "caption", CAPTION_EPOCHS, seed)
        retrieval = stage(
            "retrieval", data, runs / "retrieval", RETRIEVAL_EPOCHS, seed, str(runs / "caption")
        )
    result = {
        "gain": gain,
        "seed": seed,
        "caption_epochs": CAPTION_EPOCHS,
        "retrieval_epochs": RETRIEVAL_EPOCHS,
        "caption": {key: caption[key] for key in CAPTION_KEYS},
        "retrieval": {key: retrieval[key] for key in RETRIEVAL_KEYS},
    }
    (runs / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def merge(parts: list[Path], out: Path) -> None:
    """The runs' figures, ordered by gain and seed, in one file."""
    runs = []
    for part in parts:
        result = json.loads(part.read_text())
        result["caption"] = {key: result["caption"][key] for key in CAPTION_KEYS}
        result["retrieval"] = {key: result["retrieval"][key] for key in RETRIEVAL_KEYS}
        runs.append(result)
    runs.sort(key=lambda result: (result["gain"], result["seed"]))
    command = "python benchmarks/warm_start_gain.py --data DIR --gain G --seed S --runs RUNS"
    summary = {
        f"gain {gain}": {
            key: mean_std([r[part][key] for r in runs if r["gain"] == gain])
            for part, keys in (("caption", CAPTION_KEYS), ("retrieval", RETRIEVAL_KEYS))
            for key in keys
        }
        for gain in sorted({r["gain"] for r in runs})
    }
    report = {"command": command, "summary": summary, "runs": runs}
    out.write_text(json.dumps(report, indent=1) + "\n")
    for result in runs:
        figures = {**result["caption"], **result["retrieval"]}
        shown = ", ".join(f"{key} {value:.3f}" for key, value in figures.items())
        print(f"gain {result['gain']} seed {result['seed']}: {shown}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="a quickstart's data/ folder")
    parser.add_argument("--gain", type=float, default=0.3, help="the CNN output layer's start")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=Path, help="folder for the two runs and result.json")
    parser.add_argument("--merge", type=Path, nargs="+", help="only join these result.json")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.merge:
        merge(args.merge, args.out)
    elif args.data is None or args.runs is None:
        parser.error("--data and --runs are needed to train")
    else:
        print(json.dumps(run(args.data, args.gain, args.seed, args.runs), indent=1))


if __name__ == "__main__":
    main()
