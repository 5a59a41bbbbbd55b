"""What decodes captions (`--runtime`): PyTorch eager, the compiled packages, or ONNX Runtime.

Each is an `IncrementalDecoder` driving vtfuse's own greedy, sampling and beam-search loops, so
the choice changes speed, not the tokens (tests: the same tokens as eager at fp32).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from vtfuse.generation import IncrementalDecoder
from vtfuse.generation.compiled import CompiledDecoder, current_packages, ensure_compiled
from vtfuse.generation.onnx import STEP_GRAPHS, OnnxDecoder, has_graphs, installed

RUNTIMES = ("auto", "torch", "compiled", "onnx")


def choose_runtime(asked: str, folder: Path, device: torch.device, weights: str) -> str:
    """ "torch" (eager), "compiled" (AOTInductor packages, fp32 weights; compiled into the
    folder the first time if it has none) or "onnx" (the folder's graphs, CPU). "auto" takes
    the fastest the folder already has: compiled packages built for this torch and device and
    fp32 weights, then ONNX graphs for `weights` on the CPU with onnxruntime installed, then
    eager PyTorch (README: Performance)."""
    if asked not in RUNTIMES:
        raise ValueError(f"unknown runtime {asked!r}; choose one of: {', '.join(RUNTIMES)}")
    graph = STEP_GRAPHS.get(weights)
    if asked == "auto":
        if weights == "fp32" and current_packages(folder, device) is not None:
            return "compiled"
        usable = has_graphs(folder) and device.type == "cpu" and graph is not None
        return "onnx" if usable and (folder / graph).is_file() and installed() else "torch"
    if asked == "onnx" and (device.type != "cpu" or graph is None):
        raise ValueError(
            f"--runtime onnx runs the exported graphs ({', '.join(STEP_GRAPHS)} weights) on "
            f"the CPU, not {weights} weights on {device.type}"
        )
    if asked == "compiled" and weights != "fp32":
        raise ValueError(
            f"--runtime compiled runs the fp32 weights it was compiled with, not {weights}: "
            "use --runtime torch (or onnx, for int8)"
        )
    return asked


def caption_decoder(
    runtime: str, model: nn.Module, folder: Path, device: torch.device, weights: str
) -> IncrementalDecoder | None:
    """The decoder `runtime` (as `choose_runtime` resolved it) gives `model` from `folder`;
    None: the model decodes itself (eager)."""
    if runtime == "onnx":
        return OnnxDecoder(folder, weights)
    if runtime == "compiled":
        return CompiledDecoder(ensure_compiled(model, folder), device)
    return None
