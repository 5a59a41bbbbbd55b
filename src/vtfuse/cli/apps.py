"""`vtfuse quickstart` and `vtfuse serve`: the whole demo, and the HTTP API."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from vtfuse.cli.commands import (
    allow_pickle_arg,
    command,
    inference_args,
    load_pipeline,
    progress_arg,
)


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
    progress_arg(p)


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
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="PyTorch threads of the inference thread (1: parallel regions started off the "
        "main thread cost more than they save on small models; see vtfuse.serving.batching)",
    )
    inference_args(p)
    allow_pickle_arg(p)


@command("serve", "an HTTP API and a web page over a trained model")(_serve_args)
def run_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        raise ImportError('vtfuse serve needs: pip install -e ".[serve]"') from None
    from vtfuse.serving import ServeSettings, create_app
    from vtfuse.training.checkpoint import resolve_model_folder

    folder = resolve_model_folder(args.run)
    settings = ServeSettings(args.max_batch, args.max_wait_ms, args.max_queue, args.threads)
    pipe = load_pipeline(args, folder)
    app = create_app(pipe, settings, folder)
    print(
        f"serving {folder} ({args.weights} weights, {pipe.device}, captions decoded by "
        f"{pipe.runtime}{' (eager)' if pipe.runtime == 'torch' else ''}) on "
        f"http://{args.host}:{args.port}/  (API docs: /docs)"
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder (its best model) or model folder")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--onnx",
        metavar="OUT",
        help="write the caption decoder as ONNX graphs (the image's keys and values; one "
        "decoding step) into OUT, beside a copy of the model folder: `--runtime onnx` reads it",
    )
    what.add_argument(
        "--compiled",
        metavar="OUT",
        help="compile the caption decoder ahead of time (torch.export + AOTInductor, for this "
        "machine's device and torch) into OUT, beside a copy of the model folder: "
        "`--runtime compiled` reads it",
    )
    p.add_argument("--device", default="auto", help="--compiled: auto, cpu, cuda or cuda:N")
    allow_pickle_arg(p)


@command(
    "export",
    "export a captioner for deployment: compiled packages, or ONNX graphs for ONNX Runtime",
)(_export_args)
def run_export(args: argparse.Namespace) -> int:
    from vtfuse.generation.compiled import export_compiled
    from vtfuse.generation.onnx import OPSET, export_onnx
    from vtfuse.models.factory import load_pretrained
    from vtfuse.runtime import resolve_device
    from vtfuse.training.checkpoint import resolve_model_folder

    folder = resolve_model_folder(args.run)
    if args.onnx:
        model, _ = load_pretrained(folder, allow_pickle=args.allow_pickle)
        out = export_onnx(model, args.onnx, folder)
        print(f"wrote {out} (ONNX opset {OPSET}): vtfuse caption {out} IMAGE --runtime onnx")
        return 0
    model, _ = load_pretrained(folder, resolve_device(args.device), args.allow_pickle)
    print("compiling the caption decoder (torch.export + AOTInductor) ...", flush=True)
    out = export_compiled(model, args.compiled, folder)
    print(f"wrote {out}: vtfuse caption {out} IMAGE --runtime compiled")
    return 0
