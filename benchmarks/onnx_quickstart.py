"""The quickstart's captioner on each decoding path: the same tokens, and how fast.

    python benchmarks/onnx_quickstart.py --quickstart vtfuse-quickstart [--out F.json] [--repeats 5]

Exports the captioner of a quickstart's output folder (`runs/caption`) with
`vtfuse export --onnx` and `--compiled` (into one folder), then captions every test image
(`data/caption_test.jsonl`, greedy and beam 4, batches of 32) on each path — PyTorch eager fp32
(the reference), PyTorch's static step (`vtfuse.generation.static`), the step compiled ahead of
time (AOTInductor, `--runtime compiled`), ONNX Runtime fp32 and int8, PyTorch int8 — and
reports:

- how many captions are token for token the eager fp32 ones (greedy and beam);
- CIDEr and object F1 of the greedy captions;
- greedy speed at batch 1 (16 distinct test images, one a call) and 32, medians of `--repeats`
  alternating rounds after a warm-up, and each path's speed over eager fp32.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from vtfuse.evaluation.evaluate import scene_object_f1
from vtfuse.evaluation.metrics import caption_metrics
from vtfuse.generation.compiled import export_compiled
from vtfuse.generation.onnx import export_onnx
from vtfuse.generation.static import StaticDecoder
from vtfuse.models.factory import load_pretrained
from vtfuse.pipeline import Pipeline
from vtfuse.tasks import CAPTION, read_jsonl
from vtfuse.training.checkpoint import resolve_model_folder

sys.path.insert(0, str(Path(__file__).parent))
from weights import timings

# path → (runtime, weights); "static" is the PyTorch model decoding through its static step
PATHS = {
    "torch fp32": ("torch", "fp32"),
    "torch static": ("torch", "fp32"),
    "torch int8": ("torch", "int8"),
    "compiled fp32": ("compiled", "fp32"),
    "onnx fp32": ("onnx", "fp32"),
    "onnx int8": ("onnx", "int8"),
}


def pipelines(folder: Path) -> dict[str, Pipeline]:
    pipes = {
        path: Pipeline.load(folder, "cpu", weights=weights, runtime=runtime)
        for path, (runtime, weights) in PATHS.items()
    }
    pipes["torch static"].decoder = StaticDecoder(pipes["torch static"].model)
    return pipes


def captions(pipe: Pipeline, images: torch.Tensor, beam: int) -> list[list[int]]:
    tokens = []
    with torch.inference_mode():
        for start in range(0, len(images), 32):
            tokens += pipe.generate(images[start : start + 32], beam_size=beam).tokens
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quickstart", type=Path, required=True, help="a quickstart's --out")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "onnx_quickstart.json"
    )
    args = parser.parse_args()
    records = read_jsonl(args.quickstart / "data" / "caption_test.jsonl", CAPTION.name)
    source = resolve_model_folder(args.quickstart / "runs" / "caption")
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        model, _ = load_pretrained(source)
        folder = export_onnx(model, Path(scratch) / "export", source)
        export_seconds = time.perf_counter() - started
        started = time.perf_counter()
        export_compiled(model, folder, copy=False)
        compile_seconds = time.perf_counter() - started
        started = time.perf_counter()
        Pipeline.load(folder, "cpu", runtime="compiled")  # what a later process pays instead
        load_seconds = time.perf_counter() - started
        pipes = pipelines(folder)
        images = pipes["torch fp32"].images_to_tensor([r.image_path for r in records])
        results: dict[str, dict] = {}
        reference = {}
        for path, pipe in pipes.items():
            greedy, beam = captions(pipe, images, 1), captions(pipe, images, 4)
            reference = reference or {"greedy": greedy, "beam": beam}
            texts = [pipe.tokenizer.decode(t) for t in greedy]
            metrics = caption_metrics(texts, [r.captions for r in records])
            objects = scene_object_f1(texts, [r.fields["objects"] for r in records])
            results[path] = {
                "same_tokens_greedy": sum(map(list.__eq__, greedy, reference["greedy"]))
                / len(greedy),
                "same_tokens_beam4": sum(map(list.__eq__, beam, reference["beam"])) / len(beam),
                "cider": metrics["cider"],
                "object_f1": objects["object_f1"],
            }
        timing = timings(pipes, images[:17], images[:64], args.repeats)
    eager = timing["torch fp32"]
    for path in results:
        results[path] |= timing[path]
        for batch in ("b1", "b32"):
            key = f"ms_per_image_{batch}"
            results[path][f"speedup_{batch}"] = eager[key] / timing[path][key]
    report = {
        "command": shlex.join(["python", "benchmarks/onnx_quickstart.py", *sys.argv[1:]]),
        "threads": torch.get_num_threads(),
        "test_images": len(records),
        "export_seconds": export_seconds,
        "compile_seconds": compile_seconds,
        "compiled_load_seconds": load_seconds,
        "results": results,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
