"""Captioning on ONNX Runtime: `vtfuse export RUN --onnx OUT` and `--runtime onnx`.

Two graphs, exported from the static decoding step (`vtfuse.generation.static`):

* `image.onnx`: uint8 images (B, 3, H, W) → every fusion step's image keys and values
  (L, B, H, N, hd), once per image;
* `step.onnx`: (token (B,), position (), self_k, self_v, image_k, image_v) → next-token logits
  (B, V) and the position's self-attention keys and values (L, B, H, 1, hd), which
  `OnnxDecoder` writes into its caches (numpy arrays it hands the graph without a copy); and
  `step.int8.onnx`,
  the same with its matrix products dynamically quantised by ONNX Runtime (int8 weights,
  per-channel scales; `--weights int8`): a step reads a quarter of the bytes.

`OnnxDecoder` runs them behind the `IncrementalDecoder` protocol, so greedy decoding, sampling
and beam search are vtfuse's own loops, unchanged. The export folder is a whole model folder
(config.json, weights, tokenizer) plus the graphs and `onnx.json`, so the pipeline still has
the PyTorch model for what the graphs do not do (attention maps, other tasks).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vtfuse.generation.static import (
    ExportedDecoder,
    ImageKeys,
    StaticCache,
    StaticDecoder,
    copy_model_files,
)
from vtfuse.weights import CheckpointError

OPSET = 17
FORMAT = 2  # 2: the step returns this position's keys and values, not whole caches
MANIFEST = "onnx.json"
IMAGE_GRAPH = "image.onnx"
STEP_GRAPHS = {"fp32": "step.onnx", "int8": "step.int8.onnx"}  # by --weights
STEP_INPUTS = ["token", "position", "self_k", "self_v", "image_k", "image_v"]
EXTRA = 'pip install -c constraints.txt -e ".[onnx]"'


def onnxruntime() -> Any:
    """The onnxruntime module, or an error that names the extra that installs it."""
    try:
        import onnxruntime
    except ImportError:
        raise ImportError(f"ONNX Runtime is not installed: {EXTRA}") from None
    return onnxruntime


def has_graphs(folder: str | Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def installed() -> bool:
    try:
        onnxruntime()
    except ImportError:
        return False
    return True


def export_onnx(model: nn.Module, out: str | Path, model_folder: str | Path | None = None) -> Path:
    """Write `model`'s caption decoding as ONNX graphs into `out`, beside a copy of the files
    of the folder it was loaded from (`model_folder`, if given). Returns `out`."""
    import warnings

    try:
        import onnx  # noqa: F401  (the exporter writes the graphs with it)
    except ImportError:
        raise ImportError(f"exporting to ONNX needs the onnx package: {EXTRA}") from None
    static = StaticDecoder(model).eval()  # raises, naming why, for a model without one
    out = Path(out)
    copy_model_files(model_folder, out)
    size = model.config.vision.image_size
    images = torch.zeros(2, 3, size, size, dtype=torch.uint8)
    batch = {0: "batch"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        _, cache = static.start(images)
        torch.onnx.export(
            ImageKeys(static),
            (images,),
            out / IMAGE_GRAPH,
            input_names=["images"],
            output_names=["image_k", "image_v"],
            dynamic_axes={"images": batch, "image_k": {1: "batch"}, "image_v": {1: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
        arguments = (torch.ones(2, dtype=torch.long), torch.tensor(0), cache.self_k)
        arguments += (cache.self_v, cache.image_k, cache.image_v)
        cached = {name: {1: "batch"} for name in [*STEP_INPUTS[2:], "step_k", "step_v"]}
        torch.onnx.export(
            static,
            arguments,
            out / STEP_GRAPHS["fp32"],
            input_names=STEP_INPUTS,
            output_names=["logits", "step_k", "step_v"],
            dynamic_axes={"token": batch, "logits": batch, **cached},
            opset_version=OPSET,
            dynamo=False,
        )
    _quantise(out / STEP_GRAPHS["fp32"], out / STEP_GRAPHS["int8"])
    manifest = {"format": FORMAT, "opset": OPSET, **static.describe()}
    manifest["source"] = str(model_folder or "")
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def _quantise(graph: Path, to: Path) -> None:
    """ONNX Runtime's dynamic quantisation: 8-bit weights with per-channel scales, activations
    quantised on the fly (the scheme of `vtfuse.quantisation` for PyTorch). The weights are
    unsigned (U8U8): with signed ones, x86 CPUs without VNNI (AVX2 only) multiply through
    VPMADDUBSW, whose 16-bit sums saturate (ONNX Runtime's quantisation guide) — measured on
    such a CPU, a random test model's first-step logits were off by 3.83 (its largest 9.58)
    against 0.17 unsigned and 0.49 with signed 7-bit weights (`reduce_range`)."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level, _ = root.level, root.setLevel(logging.ERROR)  # its advice to pre-process first
    try:
        quantize_dynamic(graph, to, per_channel=True, weight_type=QuantType.QUInt8)
    finally:
        root.setLevel(level)


class OnnxDecoder(ExportedDecoder):
    """The caption decoder on ONNX Runtime, as an `IncrementalDecoder` (`start`, `step`)."""

    runtime = "ONNX"
    device = torch.device("cpu")

    def __init__(self, folder: str | Path, weights: str = "fp32", threads: int = 0):
        folder = Path(folder)
        if not has_graphs(folder):
            raise CheckpointError(
                f"{folder}: no ONNX graphs ({MANIFEST}); write them with "
                f"`vtfuse export RUN --onnx {folder}`"
            )
        runtime = onnxruntime()
        self.manifest = json.loads((folder / MANIFEST).read_text())
        if (found := self.manifest.get("format", 1)) != FORMAT:
            raise CheckpointError(
                f"{folder / MANIFEST}: graphs of format {found}, this "
                f"vtfuse reads format {FORMAT}; export them again with `vtfuse export RUN --onnx`"
            )
        options = runtime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.graph_optimization_level = runtime.GraphOptimizationLevel.ORT_ENABLE_ALL
        cpu = ["CPUExecutionProvider"]
        self.image = runtime.InferenceSession(str(folder / IMAGE_GRAPH), options, providers=cpu)
        step = str(folder / STEP_GRAPHS[weights])
        self.step_graph = runtime.InferenceSession(step, options, providers=cpu)

    def image_keys(self, images: Tensor) -> tuple[Tensor, Tensor]:
        image_k, image_v = self.image.run(None, {"images": images.cpu().numpy()})
        return torch.from_numpy(image_k), torch.from_numpy(image_v)

    def run_step(self, column: Tensor, caches: StaticCache) -> tuple[Tensor, Tensor, Tensor]:
        """One step on ONNX Runtime; the caches go in as numpy views, not copies."""
        feed = {"token": column.numpy(), "position": torch.tensor(caches.length).numpy()}
        for name in STEP_INPUTS[2:]:
            feed[name] = getattr(caches, name).contiguous().numpy()
        return tuple(map(torch.from_numpy, self.step_graph.run(None, feed)))
