"""How many steps until a VQA model trained from scratch looks, and at what: one variant at a time.

    python benchmarks/steps_to_look.py TRAIN.jsonl VAL.jsonl --name NAME [--kinds shape,...]
        [--steps 1000] [--every 250] [--model '{"vision": {"depth": 1}}']
        [--train-config '{"batch_size": 32}'] [--cnn-branch-gain 0.3] [--seed 0] [--order-seed 0]

Trains vtfuse's default VQA model on TRAIN's questions (of `--kinds` only, when given; every
setting the library's default, the model's fields overridden by `--model`, a JSON object of
ModelConfig parts) for `--steps` steps, the learning-rate schedule laid over those steps, and
every `--every` steps records on VAL: the accuracy per question kind (the lines' `"kind"`, else
their `"type"`), the gradient norm reaching the vision encoder, the image tokens' spread across
images and the attention entropy (see `blindness.py`). Counted in steps, not minutes, so the
machine's load does not change the figures. Appends the curve to
`benchmarks/results/steps_to_look.json` under NAME.

Used for the default `vision.depth` (no Transformer layer after a CNN): on the "what shape is
the red object?" questions of `vtfuse synth --style sort-of-clevr` (`--kinds shape`), depth 0
against 1: `--name shape_depth0 --model '{"vision": {"depth": 0}}'` and the same with 1.

And for the CNN's initial scale beside the pixel shortcut (`vision.CNN_BRANCH_GAIN`): on the
built-in scenes (`vtfuse synth --out DATA`, what `vtfuse compare` trains on), `--name
scenes_gain1_s1 --steps 1200 --every 300 --cnn-branch-gain 1 --seed 1`, the same with 0.3,
for seeds 0, 1, 2. `--seed` seeds the initial weights and `--order-seed` the batch order, to
tell a slow start from a slow draw.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from blindness import grad_norm, probe
from torch.utils.data import DataLoader

from vtfuse.config import ModelConfig, TrainConfig
from vtfuse.data.bank import load_records
from vtfuse.data.items import collate
from vtfuse.encoders import vision
from vtfuse.models.factory import create_model
from vtfuse.runtime import seed_everything
from vtfuse.tasks import read_jsonl, task_dataset, with_task_schedule
from vtfuse.training.batches import epoch_batches
from vtfuse.training.optim import make_optimizer, warmup_cosine
from vtfuse.training.setup import build_tokenizer

RESULTS = Path(__file__).parent / "results" / "steps_to_look.json"


def kind_of(record) -> str:
    """A question's kind: its line's `"kind"`, else its `"type"` (the built-in scenes')."""
    return record.fields.get("kind", record.fields.get("type", ""))


def of_kinds(records: list, kinds: str) -> list:
    """The records whose kind is one of the comma-separated `kinds` (all when empty)."""
    wanted = set(filter(None, kinds.split(",")))
    return [r for r in records if not wanted or kind_of(r) in wanted]


def model_config(overrides: dict, vocabulary: int, answers: int) -> ModelConfig:
    base = ModelConfig()
    parts = {
        part: dataclasses.replace(getattr(base, part), **overrides.get(part, {}))
        for part in ("vision", "text", "fusion")
    }
    parts["text"] = dataclasses.replace(parts["text"], vocab_size=vocabulary)
    return dataclasses.replace(base, task="vqa", num_answers=answers, **parts)


@contextlib.contextmanager
def cnn_branch_gain(gain: float) -> Iterator[None]:
    """Models built inside start their CNN output layer at `gain` (the library's is restored
    after)."""
    default, vision.CNN_BRANCH_GAIN = vision.CNN_BRANCH_GAIN, gain
    try:
        yield
    finally:
        vision.CNN_BRANCH_GAIN = default


def run(args: argparse.Namespace) -> list[dict]:
    order_seed = args.seed if args.order_seed is None else args.order_seed
    config = with_task_schedule(TrainConfig(), "vqa")
    config = dataclasses.replace(config, seed=order_seed, **json.loads(args.train_config))
    seed_everything(args.seed)
    records = of_kinds(read_jsonl(args.train, "vqa"), args.kinds)
    tokenizer = build_tokenizer("vqa", records, ModelConfig())
    overrides = json.loads(args.model)
    with cnn_branch_gain(args.cnn_branch_gain):
        model = create_model(model_config(overrides, len(tokenizer), len(tokenizer.answers)))
    model.train()
    size, length = model.config.vision.image_size, model.config.text.max_length

    def dataset(rows):
        return task_dataset("vqa", load_records(rows, size, False, False, 1), tokenizer, length)

    train_set = dataset(records)
    val_records = of_kinds(read_jsonl(args.val, "vqa"), args.kinds)
    loader = DataLoader(dataset(val_records), batch_size=256, collate_fn=collate)
    kinds = [kind_of(record) for record in val_records]
    optimizer = make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(args.steps, config))
    curve, step = [], 0
    for epoch in range(math.ceil(args.steps * config.batch_size / len(train_set)) + 1):
        for batch in epoch_batches(train_set, epoch, 0, config):
            model.training_loss(batch).backward()
            vision_grad = grad_norm(model, True)
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % args.every == 0:
                entry = {"step": step, "vision_grad": vision_grad, **probe(model, loader, kinds)}
                curve.append({k: round(v, 4) for k, v in entry.items()})
                print(json.dumps({"name": args.name, **curve[-1]}), flush=True)
            if step == args.steps:
                return curve
    return curve


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("train", type=Path)
    parser.add_argument("val", type=Path)
    parser.add_argument("--name", required=True, help="the variant's key in the result file")
    parser.add_argument("--kinds", default="", help="question kinds to keep, comma-separated")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--model", default="{}", help="ModelConfig overrides, a JSON object")
    parser.add_argument(
        "--train-config", default="{}", help="TrainConfig overrides, e.g. '{\"batch_size\": 32}'"
    )
    parser.add_argument(
        "--cnn-branch-gain",
        type=float,
        default=vision.CNN_BRANCH_GAIN,
        help="the CNN output layer's initial scale beside the pixel shortcut (1: PyTorch's)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the initial weights")
    parser.add_argument(
        "--order-seed", type=int, default=None, help="seeds the batch order (default: --seed)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    curve = run(args)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    command = ["python benchmarks/steps_to_look.py", args.train.name, args.val.name]
    command += ["--name", args.name, *(["--kinds", args.kinds] if args.kinds else [])]
    command += ["--steps", str(args.steps), "--every", str(args.every)]
    command += ["--model", f"'{args.model}'", "--seed", str(args.seed)]
    command += [] if args.order_seed is None else ["--order-seed", str(args.order_seed)]
    command += [] if args.train_config == "{}" else ["--train-config", f"'{args.train_config}'"]
    command += ["--cnn-branch-gain", str(args.cnn_branch_gain)]
    results[args.name] = {"command": " ".join(command), "seed": args.seed, "curve": curve}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out} ({args.name})")


if __name__ == "__main__":
    main()
