"""The subcommand registry (`@command`) and the flags several subcommands share, declared once."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from vtfuse.generation.runtimes import RUNTIMES
from vtfuse.quantisation import WEIGHTS

if TYPE_CHECKING:
    from vtfuse.pipeline import Pipeline

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


def allow_pickle_arg(
    p: argparse.ArgumentParser,
    what: str = "the model folder (and the pretrained LM or vision tower its config names)",
) -> None:
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help=f"let {what} hold pickle weights (pytorch_model.bin, *.pt, ...) instead of "
        "model.safetensors, read with torch.load(weights_only=True): only for files you trust",
    )


def image_root_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--image-root",
        dest="image_roots",
        action="append",
        metavar="DIR",
        help="a folder, besides each JSONL file's own, that its image paths may lead into "
        "(absolute, or through '..'); repeatable. Without it such paths are refused",
    )


def given_roots(args: argparse.Namespace) -> tuple[str, ...]:
    """--image-root folders as absolute paths (a run resumed from elsewhere still finds them)."""
    return tuple(str(Path(root).resolve()) for root in args.image_roots or ())


def image_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "image", help="image file (a clip model: also a video file or a folder of frames)"
    )


def inference_args(p: argparse.ArgumentParser) -> None:
    """Where a trained model runs, at which weight precision, and what decodes captions."""
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    weights_arg(p)
    p.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default="auto",
        help="what decodes captions: torch (PyTorch eager), compiled (the decoder compiled "
        "ahead of time by AOTInductor: `vtfuse export --compiled`, or compiled into the "
        "model folder's compiled/ the first time; fp32), onnx (the graphs `vtfuse export "
        "--onnx` wrote, on ONNX Runtime), or auto: the fastest the folder has (compiled, "
        "then onnx, then torch)",
    )
    p.add_argument(
        "--compile",
        dest="runtime",
        action="store_const",
        const="compiled",
        help="the same as --runtime compiled",
    )


def load_pipeline(args: argparse.Namespace, path: str | Path | None = None) -> Pipeline:
    """The model at `path` (default: the RUN argument) as the inference flags ask."""
    from vtfuse.pipeline import Pipeline

    return Pipeline.load(
        path or args.run, args.device, args.allow_pickle, args.weights, args.runtime
    )


def weights_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--weights",
        choices=WEIGHTS,
        default="fp32",
        help="precision of the linear layers for inference: fp32 as trained; bf16 (half the "
        "bytes, products in bf16; a CPU with AVX-512 BF16 or AMX, or CUDA); or int8 "
        "(dynamically quantised, per-channel weight scales; CPU): README Performance",
    )


def progress_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars"
    )
