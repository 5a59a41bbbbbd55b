"""`vtfuse train`: its flags, made into configs, and the torchrun relaunch for --nproc."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import subprocess
import sys
from pathlib import Path

from vtfuse.attention import SCORES
from vtfuse.cli.commands import (
    allow_pickle_arg,
    command,
    given_roots,
    image_root_arg,
    progress_arg,
)
from vtfuse.cli.config_flags import add_config_flags, apply_config_flags
from vtfuse.config import ModelConfig, RunConfig, TrainConfig, load_run_config
from vtfuse.encoders import VISION_ENCODERS
from vtfuse.encoders.context import CONTEXTUALISERS, RecurrentContext
from vtfuse.encoders.vision import vision_preset
from vtfuse.fusion import FUSIONS
from vtfuse.tasks import JOINT, task_names, task_spec


# -- train ------------------------------------------------------------------------------------
def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--task",
        choices=task_names(),
        help="what to train: "
        + "; ".join(f"{name}, {task_spec(name).help}" for name in task_names())
        + " (joint is the default when --losses is given)",
    )
    p.add_argument(
        "--losses",
        type=_names,
        metavar="TERMS",
        help="--task joint: the loss terms, comma-separated, among itc (image-text "
        "contrastive), itm (image-text matching, hard negatives), lm (captioning); default all "
        "three. The model captions and retrieves whichever it was trained on",
    )
    p.add_argument(
        "--loss-weights",
        type=_weights,
        metavar="W",
        help="with --losses: one weight per term, comma-separated (default 1 each): "
        "loss = Σ w_k · L_k",
    )
    p.add_argument(
        "--train", required=True, help="training JSONL file, or a shard folder (vtfuse data shard)"
    )
    p.add_argument("--val", help="validation JSONL file (picks the best checkpoint)")
    p.add_argument("--out", required=True, help="run folder for checkpoints and logs")
    p.add_argument("--config", help='JSON file {"model": {...}, "train": {...}}; flags override it')
    p.add_argument(
        "--vision",
        help=f"vision encoder: {', '.join(VISION_ENCODERS.names())}, or a Hugging Face vision "
        "model (hub name or folder: ViT, CLIP, SigLIP, DINOv2); a pretrained one sets its input "
        "size (efficientnet-lite0: 224 px, 32 px per token, 7×7 tokens)",
    )
    p.add_argument(
        "--fusion", choices=FUSIONS.names(), help="fusion strategy (default cross_attention)"
    )
    p.add_argument("--score", choices=SCORES.names(), help="attention score")
    p.add_argument(
        "--lm",
        help="a pretrained transformers text model (hub name, local folder, or minilm) as the "
        "caption decoder (causal) or the VQA question encoder: fusion blocks are inserted "
        "between its layers (default fusion: gated_cross_attention, which starts as the LM)",
    )
    p.add_argument(
        "--text-encoder",
        metavar="NAME",
        help=f"vtfuse's own text side, one of {', '.join(CONTEXTUALISERS.names())} (transformer, "
        "the default: self-attention in every block; lstm or gru: one recurrent stack under "
        "the fusion blocks); any other NAME is a pretrained text model, as --lm",
    )
    p.add_argument(
        "--rnn-layers",
        type=int,
        metavar="N",
        help="with --text-encoder lstm|gru: stacked layers (default 1)",
    )
    p.add_argument(
        "--rnn-hidden",
        type=int,
        metavar="H",
        help="with --text-encoder lstm|gru: hidden size per direction (default: the text width)",
    )
    p.add_argument(
        "--bidirectional",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with --text-encoder lstm|gru: also read right to left (vqa, classify, retrieval; "
        "a caption decoder must not see later words)",
    )
    p.add_argument(
        "--frames",
        type=int,
        metavar="F",
        help="frames per video clip: F > 1 makes a clip model (each frame encoded, a learned "
        "temporal embedding added, all frames' tokens fused); default 1, still images",
    )
    p.add_argument("--xattn-every", type=int, help="with --lm: a fusion block every k layers")
    p.add_argument(
        "--resampler",
        type=int,
        metavar="M",
        help="with --lm: a Perceiver Resampler turns each image into M tokens for the blocks",
    )
    p.add_argument(
        "--freeze",
        type=_freeze_parts,
        help="pretrained parts whose weights stay fixed: lm, vision, lm,vision (the default) "
        "or none",
    )
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="data-parallel processes: launches torchrun --nproc-per-node N (DDP; gloo on CPU)",
    )
    add_config_flags(p)
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last checkpoint"
    )
    allow_pickle_arg(
        p, "the --lm, --text-encoder and --vision models and the --init-from and --resume folders"
    )
    image_root_arg(p)
    progress_arg(p)


FREEZABLE = ("lm", "vision")


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _weights(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(weight) for weight in _names(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,0.5,1, got {text!r}") from None


def _task_and_losses(args: argparse.Namespace, model: ModelConfig) -> ModelConfig:
    """`model` with the task (--task; joint when only --losses is given) and the joint model's
    loss terms and weights, checked (`vtfuse.models.joint.loss_weights`)."""
    from vtfuse.models.joint import loss_weights

    losses, weights = args.losses, args.loss_weights
    task = args.task or (JOINT.name if losses is not None or weights is not None else None)
    if task is None:
        raise ValueError(f"give --task ({', '.join(task_names())})")
    if task != JOINT.name and (losses is not None or weights is not None):
        raise ValueError(
            f"--losses and --loss-weights choose the joint model's terms: use --task joint "
            f"(or leave --task out); --task {task} has its own loss"
        )
    if weights is not None and losses is None and not model.losses:
        raise ValueError("--loss-weights needs --losses, the terms they weigh")
    if losses is not None:  # new terms: their weights are the given ones (or 1 each)
        model = dataclasses.replace(model, losses=losses, loss_weights=weights or ())
    elif weights is not None:
        model = dataclasses.replace(model, loss_weights=weights)
    if task == JOINT.name:
        loss_weights(model.losses, model.loss_weights)  # a clear error before any data loads
    return dataclasses.replace(model, task=task)


def _freeze_parts(text: str) -> set[str]:
    parts = set() if text == "none" else {p.strip() for p in text.split(",")}
    unknown = parts - set(FREEZABLE)
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown part(s) {', '.join(sorted(unknown))}; choose from lm, vision or none"
        )
    return parts


def configs_from_args(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig]:
    """The config file (or, on --resume, the run's own), then the flags given on top."""
    base = RunConfig()
    run_file = Path(args.out) / "run.json"
    if args.config:
        base = load_run_config(args.config)
    elif args.resume and run_file.is_file():
        from vtfuse.training.setup import read_run_file

        saved = read_run_file(args.out)
        base = RunConfig(saved["model"], saved["train_config"])
    train_config = base.train
    if args.image_roots:
        train_config = dataclasses.replace(train_config, image_roots=given_roots(args))
    model = _task_and_losses(args, base.model)
    if args.vision:
        preset = vision_preset(args.vision)
        vision = dataclasses.replace(model.vision, name=args.vision, **preset)
        model = dataclasses.replace(model, vision=vision)
    if args.frames is not None:
        vision = dataclasses.replace(model.vision, frames=args.frames)
        model = dataclasses.replace(model, vision=vision)
    fusion = {k: v for k, v in (("name", args.fusion), ("score", args.score)) if v}
    lm_name, model = _text_side(args, model)
    if lm_name:
        lm = {"name": lm_name}
        if args.xattn_every is not None:
            lm["xattn_every"] = args.xattn_every
        if args.resampler is not None:
            lm["resampler_latents"] = args.resampler
        model = dataclasses.replace(model, lm=dataclasses.replace(model.lm, **lm))
        fusion.setdefault("name", "gated_cross_attention")  # the fused LM starts as the LM
    elif args.xattn_every is not None or args.resampler is not None:
        raise ValueError("--xattn-every and --resampler shape a pretrained LM: give --lm too")
    if fusion:
        model = dataclasses.replace(model, fusion=dataclasses.replace(model.fusion, **fusion))
    if args.freeze is not None:
        lm = dataclasses.replace(model.lm, freeze="lm" in args.freeze)
        vision = dataclasses.replace(model.vision, freeze_backbone="vision" in args.freeze)
        model = dataclasses.replace(model, lm=lm, vision=vision)
    return apply_config_flags(args, model, train_config)  # after --vision's preset: they win


RNN_FLAGS = {"rnn_layers": "--rnn-layers", "rnn_hidden": "--rnn-hidden"}


def _text_side(args: argparse.Namespace, model: ModelConfig) -> tuple[str | None, ModelConfig]:
    """The pretrained LM named by --lm (or by a --text-encoder that is not one of vtfuse's own),
    and the model with the --text-encoder, --rnn-* and --bidirectional choices applied."""
    encoder, lm_name = args.text_encoder, args.lm
    if encoder is not None and encoder not in CONTEXTUALISERS:
        if lm_name and lm_name != encoder:
            raise ValueError(f"--lm {lm_name} and --text-encoder {encoder}: give one text model")
        encoder, lm_name = None, encoder
    if encoder is not None and lm_name:
        raise ValueError(
            f"--text-encoder {encoder} is vtfuse's own text side, which --lm {lm_name} "
            "replaces: give one of the two"
        )
    text = {"encoder": encoder, "bidirectional": args.bidirectional}
    text.update({field: getattr(args, field) for field in RNN_FLAGS})
    text = {k: v for k, v in text.items() if v is not None}
    model = dataclasses.replace(model, text=dataclasses.replace(model.text, **text))
    shaping = [flag for field, flag in RNN_FLAGS.items() if getattr(args, field) is not None]
    shaping += ["--bidirectional"] if args.bidirectional is not None else []
    if shaping and not issubclass(CONTEXTUALISERS.get(model.text.encoder), RecurrentContext):
        raise ValueError(
            f"{', '.join(shaping)} shape a recurrent text encoder: give --text-encoder lstm or gru"
        )
    return lm_name, model


def _torchrun(processes: int, argv: list[str]) -> int:
    """Run this very command (`argv`) under torchrun, `processes` times, and wait for them."""
    keep = [a for i, a in enumerate(argv) if a != "--nproc" and argv[i - 1 : i] != ["--nproc"]]
    keep = [a for a in keep if not a.startswith("--nproc=")]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command = [*launcher, f"--nproc-per-node={processes}", "-m", "vtfuse", *keep]
    return subprocess.run(command, check=False).returncode


@command("train", f"train a model for one of the tasks: {', '.join(task_names())}")(_train_args)
def run_train(args: argparse.Namespace) -> int:
    from vtfuse.training import train

    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _torchrun(args.nproc, shlex.split(args.command_line)[1:])
    model, config = configs_from_args(args)
    result = train(
        model.task,
        args.train,
        args.out,
        args.val,
        model,
        config,
        args.resume,
        args.progress,
        allow_pickle=args.allow_pickle,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"{'finished' if result.finished else 'stopped'} at step {result.step}; "
            f"best checkpoint: {args.out}/best"
        )
    return 0
