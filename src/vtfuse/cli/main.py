"""The `vtfuse` command: one small function per subcommand."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from vtfuse.attention import SCORES
from vtfuse.cli.config_flags import add_config_flags, apply_config_flags
from vtfuse.config import ConfigError, ModelConfig, RunConfig, TrainConfig, load_run_config
from vtfuse.encoders import VISION_ENCODERS
from vtfuse.encoders.context import CONTEXTUALISERS, RecurrentContext
from vtfuse.encoders.vision import vision_preset
from vtfuse.fusion import FUSIONS
from vtfuse.tasks import task_names, task_spec

Command = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Command, str]] = {}


def command(name: str, help_text: str):
    """Register `add_arguments` for subcommand `name`; the decorated function runs it."""

    def register(add_arguments):
        def wrap(run: Command) -> Command:
            COMMANDS[name] = (add_arguments, run, help_text)
            return run

        return wrap

    return register


def _allow_pickle_arg(
    p: argparse.ArgumentParser,
    what: str = "the model folder (and the pretrained LM or vision tower its config names)",
) -> None:
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help=f"let {what} hold pickle weights (pytorch_model.bin, *.pt, ...) instead of "
        "model.safetensors, read with torch.load(weights_only=True): only for files you trust",
    )


def _image_root_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--image-root",
        dest="image_roots",
        action="append",
        metavar="DIR",
        help="a folder, besides each JSONL file's own, that its image paths may lead into "
        "(absolute, or through '..'); repeatable. Without it such paths are refused",
    )


def _given_roots(args: argparse.Namespace) -> tuple[str, ...]:
    """--image-root folders as absolute paths (a run resumed from elsewhere still finds them)."""
    return tuple(str(Path(root).resolve()) for root in args.image_roots or ())


# -- synth ------------------------------------------------------------------------------------
def _synth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="folder to write images and JSONL splits into")
    p.add_argument(
        "--style",
        choices=("scenes", "sort-of-clevr"),
        default="scenes",
        help="scenes: vtfuse's own (3 × 3 layout, all four tasks); sort-of-clevr: the paper's "
        "specification (Santoro et al. 2017: 75 px, 6 objects anywhere, 10 non-relational and "
        "10 relational questions an image, captions), written by a separate generator",
    )
    p.add_argument(
        "--images",
        type=int,
        help="number of scenes (default 3000; sort-of-clevr: training images, default 9800)",
    )
    p.add_argument(
        "--eval-images",
        type=int,
        default=200,
        help="--style sort-of-clevr: images in each of the validation and test splits",
    )
    p.add_argument(
        "--clips",
        type=int,
        help="write N video clips of moving shapes instead of still scenes: motion questions "
        "('which way does the red circle move?'), captions, statements",
    )
    p.add_argument("--clip-length", type=int, default=8, help="with --clips: frames per clip")
    p.add_argument(
        "--video",
        action="store_true",
        help="with --clips: one .mp4 per clip instead of a folder of PNG frames (pip install "
        '"vtfuse[video]")',
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same data)")
    p.add_argument("--size", type=int, default=72, help="image side in pixels")
    p.add_argument(
        "--min-objects", type=int, help="fewest objects in a scene (default 3; a clip: 2)"
    )
    p.add_argument("--max-objects", type=int, help="most objects in a scene (default 5; a clip: 3)")
    p.add_argument(
        "--shapes", default="square,circle", help="comma-separated: square,circle,triangle"
    )
    p.add_argument(
        "--questions-per-kind",
        type=int,
        default=5,
        help="questions per image of each kind (non-relational, relational)",
    )


@command("synth", "generate the built-in synthetic scenes (or clips), captions and questions")(
    _synth_args
)
def run_synth(args: argparse.Namespace) -> int:
    from vtfuse.data.synth import SynthSpec, generate
    from vtfuse.data.synth_clips import ClipSpec, generate_clips

    if args.style == "sort-of-clevr":
        return _synth_sort_of_clevr(args)
    shapes = tuple(s.strip() for s in args.shapes.split(",") if s.strip())
    given = (("min_objects", args.min_objects), ("max_objects", args.max_objects))
    objects = {name: value for name, value in given if value is not None}
    if args.clips is not None:
        if args.images is not None:
            raise ValueError("--images (still scenes) and --clips (video clips): give one")
        clip_spec = ClipSpec(
            args.clips,
            args.seed,
            args.size,
            args.clip_length,
            shapes=shapes,
            video=args.video,
            **objects,
        )
        counts = generate_clips(args.out, clip_spec)
    else:
        if args.video:
            raise ValueError("--video writes clips: give --clips N")
        spec = SynthSpec(
            images=3000 if args.images is None else args.images,
            seed=args.seed,
            size=args.size,
            shapes=shapes,
            questions_per_kind=args.questions_per_kind,
            **objects,
        )
        counts = generate(args.out, spec)
    for name, count in counts.items():
        print(f"  {args.out}/{name}.jsonl  {count} examples")
    return 0


def _synth_sort_of_clevr(args: argparse.Namespace) -> int:
    from vtfuse.data.sort_of_clevr import SortOfClevrSpec, generate

    if args.clips is not None:
        raise ValueError("--style sort-of-clevr writes still images: leave out --clips")
    train = 9800 if args.images is None else args.images
    spec = SortOfClevrSpec(train=train, val=args.eval_images, test=args.eval_images, seed=args.seed)
    for name, count in generate(args.out, spec).items():
        print(f"  {args.out}/{name}.jsonl  {count} examples")
    return 0


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
    _allow_pickle_arg(
        p, "the --lm, --text-encoder and --vision models and the --init-from and --resume folders"
    )
    _image_root_arg(p)
    p.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars"
    )


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
    task = args.task or ("joint" if losses is not None or weights is not None else None)
    if task is None:
        raise ValueError(f"give --task ({', '.join(task_names())})")
    if task != "joint" and (losses is not None or weights is not None):
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
    if task == "joint":
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
        from vtfuse.training.trainer import read_run_file

        saved = read_run_file(args.out)
        base = RunConfig(saved["model"], saved["train_config"])
    train_config = base.train
    if args.image_roots:
        train_config = dataclasses.replace(train_config, image_roots=_given_roots(args))
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


@command("train", "train a captioning, VQA, retrieval, classify or joint model")(_train_args)
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


# -- eval -------------------------------------------------------------------------------------
def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder (its best checkpoint) or model folder")
    p.add_argument("--data", required=True, help="labelled JSONL file to score on")
    p.add_argument("--predictions", help="write the input lines plus 'prediction' here (JSONL)")
    p.add_argument("--metrics", help="write the metrics here (JSON)")
    p.add_argument("--batch-size", type=int, default=64, help="examples per batch")
    p.add_argument("--beam-size", type=int, default=1, help="captioning beam width (1 = greedy)")
    p.add_argument("--max-length", type=int, help="longest caption in tokens")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam score / length^penalty")
    p.add_argument(
        "--layer", type=int, help="fusion layer for pointing accuracy (default: mean of all)"
    )
    p.add_argument("--blind", action="store_true", help="blank every image (the blind baseline)")
    p.add_argument(
        "--blind-text", action="store_true", help="VQA / classify: empty texts (image only)"
    )
    p.add_argument("--confusion-png", help="classify: draw the confusion matrix here")
    p.add_argument(
        "--skip-bad", action="store_true", help="skip examples with a bad image or image path"
    )
    _allow_pickle_arg(p)
    _image_root_arg(p)
    p.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars"
    )


@command("eval", "score a trained model on a labelled JSONL file")(_eval_args)
def run_eval(args: argparse.Namespace) -> int:
    from vtfuse.evaluation import EvalOptions, evaluate, format_table

    options = EvalOptions(
        args.batch_size,
        args.beam_size,
        args.max_length,
        args.length_penalty,
        args.layer,
        args.blind,
        args.skip_bad,
        args.progress,
        blind_text=args.blind_text,
        confusion_png=args.confusion_png,
        allow_pickle=args.allow_pickle,
        image_roots=_given_roots(args),
    )
    metrics = evaluate(args.run, args.data, options, args.predictions, args.metrics)
    print(format_table(metrics, f"{args.data}{' (blind)' if args.blind else ''}"))
    return 0


# -- caption / ask ----------------------------------------------------------------------------
def _caption_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder or model folder of a captioning model")
    p.add_argument(
        "images",
        nargs="+",
        help="image files (a clip model: also video files or folders of frames)",
    )
    p.add_argument("--beam-size", type=int, default=1, help="beam width (1 = greedy)")
    p.add_argument("--max-length", type=int, help="longest caption in tokens")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam score / length^penalty")
    p.add_argument(
        "--temperature", type=float, help="sample words at this temperature (default: greedy)"
    )
    p.add_argument("--top-p", type=float, help="sample from the top-p nucleus (Holtzman et al.)")
    p.add_argument("--seed", type=int, help="sampling seed: the same seed, the same captions")
    p.add_argument(
        "--shots",
        nargs="+",
        type=_shot,
        metavar="IMAGE:CAPTION",
        help="in-context examples before each image (a captioner trained with --lm)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    _allow_pickle_arg(p)


def _shot(text: str) -> tuple[str, str]:
    image, separator, caption = text.partition(":")
    if not separator or not caption.strip():
        raise argparse.ArgumentTypeError(f"expected IMAGE:CAPTION, got {text!r}")
    return image, caption


@command("caption", "caption images with a trained model")(_caption_args)
def run_caption(args: argparse.Namespace) -> int:
    from vtfuse.pipeline import Pipeline, Sampling

    pipe = Pipeline.load(args.run, args.device, args.allow_pickle)
    sampling = None
    if args.temperature is not None or args.top_p is not None:
        sampling = Sampling(args.temperature or 1.0, args.top_p or 1.0, args.seed)
    if args.shots:
        captions = [
            pipe.caption_with_shots(image, args.shots, args.max_length, sampling)
            for image in args.images
        ]
    else:
        captions = pipe.caption(
            args.images, args.beam_size, args.max_length, args.length_penalty, sampling
        )
    for image, caption in zip(args.images, captions, strict=True):
        print(f"{image}\t{caption}")
    return 0


def _ask_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder or model folder of a VQA model")
    p.add_argument(
        "image", help="image file (a clip model: also a video file or a folder of frames)"
    )
    p.add_argument("question", help="the question, quoted")
    p.add_argument("--top-k", type=int, default=5, help="how many answers to list")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    _allow_pickle_arg(p)


@command("ask", "answer a question about an image")(_ask_args)
def run_ask(args: argparse.Namespace) -> int:
    from vtfuse.pipeline import Pipeline

    for answer, probability in Pipeline.load(args.run, args.device, args.allow_pickle).ask(
        args.image, args.question, args.top_k
    ):
        print(f"{probability:7.2%}  {answer}")
    return 0


# -- attention --------------------------------------------------------------------------------
def _predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder or model folder of a pair classifier (--task classify)")
    p.add_argument(
        "image", help="image file (a clip model: also a video file or a folder of frames)"
    )
    p.add_argument("--text", required=True, help="the text paired with the image")
    p.add_argument("--top-k", type=int, default=5, help="how many labels to list")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    _allow_pickle_arg(p)


@command("predict", "label an image+text pair with a pair classifier")(_predict_args)
def run_predict(args: argparse.Namespace) -> int:
    from vtfuse.pipeline import Pipeline

    pipe = Pipeline.load(args.run, args.device, args.allow_pickle)
    for label, probability in pipe.predict(args.image, args.text, args.top_k):
        print(f"{probability:6.1%}  {label}")
    return 0


def _retrieve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder or model folder of a retrieval model")
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--query", help="text → the images it best describes (with --images)")
    query.add_argument("--image", help="image → the texts that best describe it (with --texts)")
    p.add_argument("--images", help="folder of candidate images")
    p.add_argument("--texts", help="file of candidate texts, one per line")
    p.add_argument("--top-k", type=int, default=5, help="how many results to list")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    _allow_pickle_arg(p)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@command("retrieve", "rank images for a text, or texts for an image")(_retrieve_args)
def run_retrieve(args: argparse.Namespace) -> int:
    from vtfuse.pipeline import Pipeline

    pipe = Pipeline.load(args.run, args.device, args.allow_pickle)
    if args.query:
        if not args.images:
            raise ValueError("--query needs --images DIR, the candidates")
        paths = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise FileNotFoundError(f"no images in {args.images}")
        for index, score in pipe.retrieve_images(args.query, paths, args.top_k):
            print(f"{score:.4f}\t{paths[index]}")
        return 0
    if not args.texts:
        raise ValueError("--image needs --texts FILE, the candidates (one per line)")
    texts = [line.strip() for line in Path(args.texts).read_text().splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"{args.texts}: no texts")
    for index, score in pipe.retrieve_texts(args.image, texts, args.top_k):
        print(f"{score:.4f}\t{texts[index]}")
    return 0


def _classify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder or model folder of a retrieval model")
    p.add_argument("image", help="image file")
    p.add_argument("--labels", required=True, help='comma-separated: "a red circle,a blue square"')
    p.add_argument(
        "--template", default="{}", help='prompt around each label, e.g. "a photo of {}"'
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    _allow_pickle_arg(p)


@command("classify", "zero-shot classification with a retrieval model")(_classify_args)
def run_classify(args: argparse.Namespace) -> int:
    from vtfuse.pipeline import Pipeline, check_template

    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    check_template(args.template)  # before the model loads
    pipe = Pipeline.load(args.run, args.device, args.allow_pickle)
    for label, probability in pipe.classify(args.image, labels, args.template):
        print(f"{probability:6.1%}  {label}")
    return 0


def _attention_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder or model folder")
    p.add_argument(
        "image", help="image file (a clip model: also a video file or a folder of frames)"
    )
    p.add_argument("--question", help="for a VQA model: the question whose tokens to show")
    p.add_argument(
        "--layer",
        type=int,
        help="fusion layer to show (negative counts from the end; default: mean of all layers)",
    )
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    _allow_pickle_arg(p)


@command("attention", "draw where the model looked, one panel per token")(_attention_args)
def run_attention(args: argparse.Namespace) -> int:
    from vtfuse.pipeline import Pipeline

    pipe = Pipeline.load(args.run, args.device, args.allow_pickle)
    path, text = pipe.draw_attention(args.image, args.out, args.question, args.layer)
    print(f"{text}\nwrote {path}")
    return 0


# -- quickstart -------------------------------------------------------------------------------
def _quickstart_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out", default="vtfuse-quickstart", help="folder for data, runs and the report"
    )
    p.add_argument(
        "--images", type=int, default=None, help="number of synthetic scenes (default: preset)"
    )
    p.add_argument(
        "--minutes", type=float, default=None, help="training budget per model (default: preset)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument(
        "--tiny", action="store_true", help="a seconds-long smoke run (numbers meaningless)"
    )
    p.add_argument(
        "--pretrained",
        action="store_true",
        help="also train EfficientNet-Lite0 + MiniLM (frozen, ImageNet and sentence weights from "
        "their packages) with gated cross-attention, and report it beside the default",
    )
    p.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars"
    )


@command("quickstart", "synth → train captioner and VQA → eval → attention pictures → report")(
    _quickstart_args
)
def run_quickstart(args: argparse.Namespace) -> int:
    from vtfuse.quickstart import QuickstartPlan, pretrained_parts, run, run_pretrained

    plan = QuickstartPlan.tiny() if args.tiny else QuickstartPlan()
    overrides = {
        k: v for k, v in (("images", args.images), ("minutes", args.minutes)) if v is not None
    }
    plan = dataclasses.replace(plan, seed=args.seed, progress=args.progress, **overrides)
    if args.pretrained:
        run_pretrained(Path(args.out), plan, pretrained_parts(plan))
        return 0
    metrics = run(Path(args.out), plan)
    print(json.dumps({"wall_seconds": metrics["wall_seconds"]}))
    return 0


# -- data -------------------------------------------------------------------------------------
def _data_args(p: argparse.ArgumentParser) -> None:
    from vtfuse.data.importers import IMPORTERS

    actions = p.add_subparsers(dest="data_action", required=True, metavar="ACTION")
    imp = actions.add_parser(
        "import", help="a dataset in its official format → vtfuse JSONL, one file per split"
    )
    imp.add_argument("format", choices=IMPORTERS.names(), help="the source's format")
    imp.add_argument("--out", required=True, help="folder for <split>.jsonl (or data.jsonl)")
    imp.add_argument(
        "--annotations",
        nargs="+",
        type=Path,
        default=[],
        help="caption or answer annotations (Karpathy split file, captions_*.json, VQAv2 "
        "annotations, the CSV/TSV file, or the hf dataset name or saved folder)",
    )
    imp.add_argument("--questions", type=Path, help="VQAv2 questions file")
    imp.add_argument("--images", type=Path, help="image root (COCO: 2014 or 2017 file names)")
    imp.add_argument("--image-column", default="image", help="csv/tsv/hf: the image column")
    imp.add_argument("--text-column", default="caption", help="csv/tsv/hf: the text column")
    imp.add_argument("--split", default="", help="hf: import only this split")
    imp.add_argument("--copy-images", action="store_true", help="copy images into OUT/images")
    imp.add_argument("--strict", action="store_true", help="stop at the first malformed record")
    shard = actions.add_parser(
        "shard", help="JSONL (a file, or every *.jsonl in a folder) → WebDataset tar shards"
    )
    shard.add_argument("source", type=Path, help="a JSONL file, or a folder of them")
    shard.add_argument("--task", choices=task_names(), required=True)
    shard.add_argument("--out", type=Path, required=True, help="shard folder (one per file)")
    shard.add_argument("--shard-size", type=int, default=1000, help="records per shard")
    _image_root_arg(shard)


@command("data", "import datasets in their official formats; pack JSONL into shards")(_data_args)
def run_data(args: argparse.Namespace) -> int:
    return {"import": _run_import, "shard": _run_shard}[args.data_action](args)


def _run_shard(args: argparse.Namespace) -> int:
    from vtfuse.data.shards import write_shards

    if args.source.is_dir():
        jobs = [(f, args.out / f.stem) for f in sorted(args.source.glob("*.jsonl"))]
        if not jobs:
            raise FileNotFoundError(f"no *.jsonl files in {args.source}")
    else:
        jobs = [(args.source, args.out)]
    for source, out in jobs:
        index = write_shards(source, args.task, out, args.shard_size, _given_roots(args))
        print(f"  {out}  {index['records']} records in {len(index['shards'])} shard(s)")
    return 0


def _run_import(args: argparse.Namespace) -> int:
    from vtfuse.data.importers import ImportOptions, import_dataset, outside_image_root

    options = ImportOptions(
        annotations=args.annotations,
        questions=args.questions,
        images=args.images,
        image_column=args.image_column,
        text_column=args.text_column,
        split=args.split,
        strict=args.strict,
        out=Path(args.out),
    )
    written, skipped = import_dataset(args.format, options, args.copy_images)
    for path, count in written:
        print(f"  {path}  {count} examples")
    root = outside_image_root([path for path, _ in written])
    if root is not None:
        print(
            f"the images lie outside {args.out}, under {root}: give --image-root {root} to "
            "vtfuse train, eval and data shard (or import with --copy-images)"
        )
    print(f"skipped {len(skipped)} record(s)" + (":" if skipped else ""))
    for reason in skipped[:20]:
        print(f"  {reason}")
    if len(skipped) > 20:
        print(f"  ... and {len(skipped) - 20} more")
    return 0


# -- serve ------------------------------------------------------------------------------------
def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder or model folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--max-batch", type=int, default=16, help="requests batched together at most")
    p.add_argument(
        "--max-wait-ms", type=float, default=5.0, help="how long a request waits for company"
    )
    p.add_argument(
        "--max-queue", type=int, default=256, help="waiting requests before answering 503"
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    _allow_pickle_arg(p)


@command("serve", "an HTTP API and a web page over a trained model")(_serve_args)
def run_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        raise ImportError('vtfuse serve needs: pip install -e ".[serve]"') from None
    from vtfuse.pipeline import Pipeline
    from vtfuse.serving import ServeSettings, create_app
    from vtfuse.training.checkpoint import resolve_model_folder

    folder = resolve_model_folder(args.run)
    settings = ServeSettings(args.max_batch, args.max_wait_ms, args.max_queue)
    app = create_app(Pipeline.load(folder, args.device, args.allow_pickle), settings, folder)
    print(f"serving {folder} on http://{args.host}:{args.port}/  (API docs: /docs)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


# -- compare ----------------------------------------------------------------------------------
def _compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", choices=("caption", "vqa", "retrieval"), help="what to compare on")
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
    _image_root_arg(p)
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
    p.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars"
    )


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
        **({"image_roots": _given_roots(args)} if args.image_roots else {}),
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vtfuse", description="Vision-text cross-attention fusion."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add_arguments, run, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(handler=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["vtfuse", *argv])
    from vtfuse.data.images import ImageLoadError
    from vtfuse.data.jsonl import DataError
    from vtfuse.models.base import CheckpointError

    try:
        return args.handler(args)
    except (
        DataError,
        ImageLoadError,
        ConfigError,
        CheckpointError,
        FileNotFoundError,
        ValueError,
    ) as error:
        print(f"vtfuse {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
