"""`vtfuse compare`: fusion strategies trained and scored side by side (see `vtfuse.compare`)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from vtfuse.cli.commands import (
    command,
    given_roots,
    image_root_arg,
    progress_arg,
)
from vtfuse.config import ModelConfig, TrainConfig, load_run_config
from vtfuse.fusion import FUSIONS
from vtfuse.tasks import ranked_tasks


# -- compare ----------------------------------------------------------------------------------
def _compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", choices=ranked_tasks(), help="what to compare on")
    p.add_argument(
        "--fusions",
        default="all",
        help=f"'all' or a comma list of strategies among: {', '.join(FUSIONS.names())}",
    )
    p.add_argument(
        "--max-minutes-each",
        type=float,
        help="training budget of every model, in minutes (each captioner gets as much again)",
    )
    p.add_argument(
        "--join",
        nargs="+",
        metavar="DIR",
        help="only join the results of comparisons run apart (same data, budget and seeds; "
        "other strategies, e.g. one process per core) into --out",
    )
    p.add_argument(
        "--out", required=True, help="folder for data, runs and compare.{csv,md,png,json}"
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds per strategy: 0, 1, ..., N-1")
    p.add_argument(
        "--epochs",
        type=int,
        help="passes over the training data (default: as many as the budget allows; given, "
        "the budget may stop earlier)",
    )
    p.add_argument(
        "--config",
        help='JSON file {"model": {...}, "train": {...}} for every run (default: the library '
        "defaults, on the built-in data as on yours)",
    )
    p.add_argument("--train", help="training JSONL (default: generate the built-in scenes)")
    p.add_argument(
        "--val", help="validation JSONL, picks each run's best checkpoint (with --train)"
    )
    p.add_argument("--test", help="test JSONL every strategy is scored on (with --train)")
    p.add_argument(
        "--images", type=int, default=3000, help="number of built-in scenes (without --train)"
    )
    image_root_arg(p)
    p.add_argument(
        "--caption-warm-start",
        action="store_true",
        help="--task vqa or retrieval: start each run from a captioner trained with the same "
        "strategy, seed and budget",
    )
    p.add_argument(
        "--caption-train", help="caption JSONL for --caption-warm-start on your own data"
    )
    p.add_argument(
        "--caption-val", help="caption validation JSONL for --caption-warm-start on your own data"
    )
    progress_arg(p)


@command("compare", "train and score fusion strategies on the same data, budget and seeds")(
    _compare_args
)
def run_compare(args: argparse.Namespace) -> int:
    from vtfuse.compare import (
        CompareSpec,
        DataFiles,
        compare,
        join,
        parse_fusions,
        synthetic_data,
    )

    if args.join:
        join([Path(part) for part in args.join], Path(args.out), args.command_line)
        return 0
    if args.task is None or args.max_minutes_each is None:
        raise ValueError("--task and --max-minutes-each are needed (unless --join)")

    own_data = [f for f in ("train", "val", "test") if getattr(args, f)]
    if own_data and len(own_data) < 3:
        raise ValueError("give all of --train, --val and --test, or none (built-in data)")
    if not own_data and (args.caption_train or args.caption_val):
        raise ValueError("--caption-train/--caption-val go with your own --train/--val/--test")
    if own_data and args.caption_warm_start and not args.caption_train:
        raise ValueError("--caption-warm-start on your own data needs --caption-train")
    if args.config:
        run_config = load_run_config(args.config)
        model, config, caption_config = run_config.model, run_config.train, run_config.train
    else:
        model, config, caption_config = ModelConfig(), TrainConfig(), TrainConfig()
    budget = {
        "max_minutes": args.max_minutes_each,
        **({"epochs": args.epochs} if args.epochs is not None else {}),
        **({"image_roots": given_roots(args)} if args.image_roots else {}),
    }
    spec = CompareSpec(  # checks the choices before any data is written
        args.task,
        parse_fusions(args.fusions),
        dataclasses.replace(model, task=args.task),
        dataclasses.replace(config, **budget),
        args.seeds,
        args.caption_warm_start,
        dataclasses.replace(caption_config, **budget),
        args.progress,
    )
    out = Path(args.out)
    if own_data:
        files = DataFiles(
            Path(args.train),
            Path(args.val),
            Path(args.test),
            Path(args.caption_train) if args.caption_train else None,
            Path(args.caption_val) if args.caption_val else None,
        )
    else:
        print(f"[compare] generating {args.images} built-in scenes into {out / 'data'}")
        files = synthetic_data(out / "data", args.task, args.images, args.progress)
    compare(spec, files, out, command=args.command_line)
    return 0
