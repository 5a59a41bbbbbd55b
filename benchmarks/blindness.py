"""Why a fused VQA model stays blind: what the image side does during training, step by step.

    python benchmarks/blindness.py DATA [--lr 0.001 0.0003] [--steps 1600] [--every 200]

Trains vtfuse's default VQA model (every setting the library's default but the learning rate)
on `DATA/vqa_train.jsonl` (e.g. `vtfuse synth --style sort-of-clevr --images 2000`) and, every
`--every` steps, records on `DATA/vqa_val.jsonl`:

* accuracy overall and per question kind (`"kind"`, when the lines have it);
* `vision_grad`, `text_grad`: the gradient norm reaching the vision encoder and the rest,
  before clipping — does the loss still reach the pixels?
* `spread`: how much the image tokens depend on the image, the standard deviation across
  images at each grid position over the overall standard deviation (0: every image gives the
  same tokens, only the position embeddings left);
* `entropy`: the fusion's attention entropy over the image tokens, over its maximum log N
  (1: uniform, the words look nowhere in particular).

Counted in steps, not minutes, so what else runs on the machine does not change the figures.
Writes `benchmarks/results/blindness.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from vtfuse.config import ModelConfig, TrainConfig
from vtfuse.data.bank import load_records
from vtfuse.data.items import collate
from vtfuse.models.factory import create_model
from vtfuse.runtime import seed_everything
from vtfuse.tasks import read_jsonl, task_dataset, with_task_schedule
from vtfuse.training.batches import epoch_batches
from vtfuse.training.optim import make_optimizer, warmup_cosine
from vtfuse.training.setup import build_tokenizer


def grad_norm(model: torch.nn.Module, vision: bool) -> float:
    squares = [
        p.grad.pow(2).sum()
        for name, p in model.named_parameters()
        if p.grad is not None and name.startswith("vision.") == vision
    ]
    return math.sqrt(sum(squares).item()) if squares else 0.0


@torch.no_grad()
def probe(model, loader: DataLoader, kinds: list[str]) -> dict[str, float]:
    model.eval()
    right: list[bool] = []
    for batch in loader:
        logits, _ = model(
            batch["images"], batch["tokens"], batch["token_mask"], batch["image_index"]
        )
        right += (logits.argmax(-1) == batch["answers"]).tolist()
    first = next(iter(loader))
    tokens = model.encode_image(first["images"])  # (I, N, d)
    spread = (tokens.std(0).mean() / tokens.std()).item()
    _, maps = model(
        first["images"],
        first["tokens"],
        first["token_mask"],
        first["image_index"],
        need_weights=True,
    )
    entropy = [
        (-(m.clamp_min(1e-9).log() * m).sum(-1)).mean().item() / math.log(m.shape[-1]) for m in maps
    ]
    model.train()
    by_kind = defaultdict(list)
    for kind, ok in zip(kinds, right, strict=True):
        by_kind[kind].append(ok)
    result = {"accuracy": sum(right) / len(right)}
    result |= {f"accuracy_{k}": sum(v) / len(v) for k, v in sorted(by_kind.items()) if k}
    return result | {"spread": spread, "entropy": sum(entropy) / len(entropy)}


def run(data: Path, lr: float, steps: int, every: int, seed: int) -> list[dict]:
    config = dataclasses.replace(with_task_schedule(TrainConfig(), "vqa"), lr=lr, seed=seed)
    seed_everything(seed)
    records = read_jsonl(data / "vqa_train.jsonl", "vqa")
    tokenizer = build_tokenizer("vqa", records, ModelConfig())
    base = ModelConfig()
    model_config = dataclasses.replace(
        base,
        task="vqa",
        text=dataclasses.replace(base.text, vocab_size=len(tokenizer)),
        num_answers=len(tokenizer.answers),
    )
    model = create_model(model_config).train()
    size, length = model_config.vision.image_size, model_config.text.max_length
    train_set = task_dataset("vqa", load_records(records, size, False, False, 1), tokenizer, length)
    val_records = read_jsonl(data / "vqa_val.jsonl", "vqa")
    val_set = task_dataset(
        "vqa", load_records(val_records, size, False, False, 1), tokenizer, length
    )
    loader = DataLoader(val_set, batch_size=256, collate_fn=collate)
    kinds = [r.fields.get("kind", "") for r in val_records]
    optimizer = make_optimizer(model, config)
    per_epoch = math.ceil(len(train_set) / config.batch_size)
    schedule = warmup_cosine(per_epoch * config.epoch_count, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    log, step, epoch = [], 0, 0
    while step < steps:
        for batch in epoch_batches(train_set, epoch, 0, config):
            model.training_loss(batch).backward()
            norms = {"vision_grad": grad_norm(model, True), "text_grad": grad_norm(model, False)}
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % every == 0:
                entry = {"step": step, **norms, **probe(model, loader, kinds)}
                log.append(
                    {k: round(v, 4) if isinstance(v, float) else v for k, v in entry.items()}
                )
                print(json.dumps({"lr": lr, **log[-1]}), flush=True)
            if step >= steps:
                break
        epoch += 1
    return log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-3, 3e-4])
    parser.add_argument("--steps", type=int, default=1600)
    parser.add_argument("--every", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "blindness.json"
    )
    args = parser.parse_args()
    runs = {str(lr): run(args.data, lr, args.steps, args.every, args.seed) for lr in args.lr}
    report = {
        "command": "python benchmarks/blindness.py "
        + " ".join([str(args.data), "--lr", *map(str, args.lr), "--steps", str(args.steps)]),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
