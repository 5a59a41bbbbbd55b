"""Commands that use a trained model: `eval`, `caption`, `ask`, `predict`, `retrieve`,
`classify` and `attention`."""

from __future__ import annotations

import argparse
from pathlib import Path

from vtfuse.cli.commands import (
    allow_pickle_arg,
    command,
    given_roots,
    image_arg,
    image_root_arg,
    inference_args,
    load_pipeline,
    progress_arg,
)
from vtfuse.tasks import CAPTION, CLASSIFY


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
    allow_pickle_arg(p)
    image_root_arg(p)
    inference_args(p)
    progress_arg(p)


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
        image_roots=given_roots(args),
        weights=args.weights,
        runtime=args.runtime,
        device=args.device,
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
    inference_args(p)
    allow_pickle_arg(p)


def _shot(text: str) -> tuple[str, str]:
    image, separator, caption = text.partition(":")
    if not separator or not caption.strip():
        raise argparse.ArgumentTypeError(f"expected IMAGE:CAPTION, got {text!r}")
    return image, caption


@command(CAPTION.name, "caption images with a trained model")(_caption_args)
def run_caption(args: argparse.Namespace) -> int:
    from vtfuse.pipeline import Sampling

    pipe = load_pipeline(args)
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
    image_arg(p)
    p.add_argument("question", help="the question, quoted")
    p.add_argument("--top-k", type=int, default=5, help="how many answers to list")
    inference_args(p)
    allow_pickle_arg(p)


@command("ask", "answer a question about an image")(_ask_args)
def run_ask(args: argparse.Namespace) -> int:

    for answer, probability in load_pipeline(args).ask(args.image, args.question, args.top_k):
        print(f"{probability:7.2%}  {answer}")
    return 0


# -- attention --------------------------------------------------------------------------------
def _predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder or model folder of a pair classifier (--task classify)")
    image_arg(p)
    p.add_argument("--text", required=True, help="the text paired with the image")
    p.add_argument("--top-k", type=int, default=5, help="how many labels to list")
    inference_args(p)
    allow_pickle_arg(p)


@command("predict", "label an image+text pair with a pair classifier")(_predict_args)
def run_predict(args: argparse.Namespace) -> int:

    pipe = load_pipeline(args)
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
    inference_args(p)
    allow_pickle_arg(p)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@command("retrieve", "rank images for a text, or texts for an image")(_retrieve_args)
def run_retrieve(args: argparse.Namespace) -> int:

    pipe = load_pipeline(args)
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
    inference_args(p)
    allow_pickle_arg(p)


@command(CLASSIFY.name, "zero-shot classification with a retrieval model")(_classify_args)
def run_classify(args: argparse.Namespace) -> int:
    from vtfuse.pipeline import check_template

    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    check_template(args.template)  # before the model loads
    pipe = load_pipeline(args)
    for label, probability in pipe.classify(args.image, labels, args.template):
        print(f"{probability:6.1%}  {label}")
    return 0


def _attention_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder or model folder")
    image_arg(p)
    p.add_argument("--question", help="for a VQA model: the question whose tokens to show")
    p.add_argument(
        "--layer",
        type=int,
        help="fusion layer to show (negative counts from the end; default: mean of all layers)",
    )
    p.add_argument("--out", required=True, help="PNG file to write")
    inference_args(p)
    allow_pickle_arg(p)


@command("attention", "draw where the model looked, one panel per token")(_attention_args)
def run_attention(args: argparse.Namespace) -> int:

    pipe = load_pipeline(args)
    path, text = pipe.draw_attention(args.image, args.out, args.question, args.layer)
    print(f"{text}\nwrote {path}")
    return 0
