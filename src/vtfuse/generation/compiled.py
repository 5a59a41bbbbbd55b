"""Captioning through compiled code: `vtfuse export RUN --compiled OUT` and `--runtime compiled`.

`torch.export` traces the static decoding step (`vtfuse.generation.static`) and the image's keys
and values, each with a dynamic batch dimension; AOTInductor (`torch._inductor`) compiles each
graph ahead of time into a shared library with the weights beside it, packaged as a `.pt2`:

* `image.pt2`: uint8 images (B, 3, H, W) → every fusion step's image keys and values;
* `step.pt2`: (token (B,), position (), self_k, self_v, image_k, image_v) → next-token logits
  and this position's keys and values — the same signature as the ONNX step.

Why ahead of time rather than `torch.compile` at the first call: loading a package takes
milliseconds, so only the process that compiles pays for it (tens of seconds; the manifest
records how long), while `torch.compile` re-traces the step in every new process (about 4 s
of a warm cache for the small benchmark captioner) and checks its guards at every call. The
packages are compiled for this machine's device and torch version, which the manifest records
and the loader checks.

`--runtime compiled` (or `--compile`) on a model folder without packages compiles them once
into `<folder>/compiled/` and loads them from there afterwards; the manifest keeps the
SHA-256 of the folder's weights, so packages of weights since retrained are compiled again.
Greedy decoding, sampling and beam search are vtfuse's own loops (`CompiledDecoder` is an
`IncrementalDecoder`), so the tokens are the eager decoder's.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from vtfuse.generation.static import (
    ExportedDecoder,
    ImageKeys,
    StaticCache,
    StaticDecoder,
    copy_model_files,
)
from vtfuse.weights import WEIGHTS_FILE, CheckpointError

FORMAT = 1
MANIFEST = "compiled.json"
IMAGE_PACKAGE = "image.pt2"
STEP_PACKAGE = "step.pt2"
CACHE = "compiled"  # where `--runtime compiled` keeps the packages it compiled for a folder
MAX_BATCH = 4096  # the largest batch (beams included) the packages are compiled for


def has_packages(folder: str | Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def packages_for(folder: str | Path) -> Path | None:
    """The folder holding `folder`'s compiled packages: itself (an export) or its cache."""
    for candidate in (Path(folder), Path(folder) / CACHE):
        if has_packages(candidate):
            return candidate
    return None


def fingerprint(model_folder: str | Path | None) -> str:
    """SHA-256 of a model folder's weights file ("" without one); hashed once per file state
    (`auto` and the loader both ask when a folder has a cache)."""
    path = Path(model_folder) / WEIGHTS_FILE if model_folder else None
    if path is None or not path.is_file():
        return ""
    stat = path.stat()
    return _sha256(path.resolve(), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def export_compiled(
    model: nn.Module, out: str | Path, model_folder: str | Path | None = None, copy: bool = True
) -> Path:
    """Compile `model`'s caption decoding ahead of time into `out` (with a copy of the files of
    `model_folder`, if given and `copy`). Returns `out`."""
    static = StaticDecoder(model).eval()  # raises, naming why, for a model without one
    require_compiler()
    out = Path(out)
    copy_model_files(model_folder if copy else None, out)
    device = next(model.parameters()).device
    size = model.config.vision.image_size
    images = torch.zeros(2, 3, size, size, dtype=torch.uint8, device=device)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    started = time.perf_counter()
    with torch.no_grad():
        _, cache = static.start(images)
        token, position = (
            torch.ones(2, dtype=torch.long, device=device),
            torch.tensor(0, device=device),
        )
        step_inputs = (token, position, cache.self_k, cache.self_v, cache.image_k, cache.image_v)
        cached = {1: batch}
        _compile(ImageKeys(static), (images,), ({0: batch},), out / IMAGE_PACKAGE)
        step_shapes = ({0: batch}, None, cached, cached, cached, cached)
        _compile(static, step_inputs, step_shapes, out / STEP_PACKAGE)
    manifest = {
        "format": FORMAT,
        "torch": torch.__version__,
        "device": device.type,
        "compile_seconds": round(time.perf_counter() - started, 1),
        "weights_sha256": fingerprint(model_folder),
        "source": str(model_folder or ""),
        **static.describe(),
    }
    _write_atomically(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return out


def require_compiler() -> None:
    """AOTInductor writes C++ and builds it: say so, before tracing, if there is no compiler."""
    from torch._inductor import cpp_builder

    try:
        cpp_builder.get_cpp_compiler()
    except Exception as error:  # torch's InvalidCxxCompiler names what it looked for
        raise RuntimeError(
            "compiling the caption decoder (AOTInductor) needs a C++ compiler: install g++ or "
            "clang++, or name one in CXX; or decode with --runtime torch (or onnx)"
        ) from error


def _compile(module: nn.Module, inputs: tuple, shapes: tuple, package: Path) -> None:
    """torch.export → AOTInductor → `package`, written under a temporary name then renamed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # export's notices about tensor constants
        program = torch.export.export(module, inputs, dynamic_shapes=shapes)
        partial = package.with_name(f".{os.getpid()}.{package.name}")  # must end in .pt2
        torch._inductor.aoti_compile_and_package(program, package_path=str(partial))
    os.replace(partial, package)


def _write_atomically(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        f.write(text)
    os.replace(f.name, path)


def _build(manifest: dict) -> tuple:
    """What packages only run on: their format, torch version and device type."""
    return manifest.get("format"), manifest.get("torch"), manifest.get("device")


def _this_build(device: torch.device) -> tuple:
    return FORMAT, torch.__version__, device.type


def current_packages(model_folder: Path, device: torch.device) -> Path | None:
    """The folder of `model_folder`'s packages if they were built by this torch for `device`
    (and, in its cache, from its current weights); else None."""
    found = packages_for(model_folder)
    if found is None:
        return None
    manifest = json.loads((found / MANIFEST).read_text())
    if _build(manifest) != _this_build(device):
        return None
    if found != model_folder and manifest.get("weights_sha256") != fingerprint(model_folder):
        return None
    return found


def ensure_compiled(model: nn.Module, model_folder: Path) -> Path:
    """The folder of `model_folder`'s packages, compiling them into `<model_folder>/compiled/`
    first if it has none for its current weights, this torch and the model's device."""
    device = next(model.parameters()).device
    if (found := current_packages(model_folder, device)) is not None:
        return found
    cache = model_folder / CACHE
    print(
        f"compiling the caption decoder ahead of time into {cache} (once: later runs load it)",
        file=sys.stderr,
    )
    return export_compiled(model, cache, model_folder, copy=False)


class CompiledDecoder(ExportedDecoder):
    """The compiled caption decoder, as an `IncrementalDecoder` (`start`, `step`)."""

    runtime = "compiled"

    def __init__(self, folder: str | Path, device: torch.device):
        folder = Path(folder)
        if not has_packages(folder):
            raise CheckpointError(
                f"{folder}: no compiled packages ({MANIFEST}); write them with "
                f"`vtfuse export RUN --compiled {folder}`"
            )
        self.manifest = json.loads((folder / MANIFEST).read_text())
        if (built := _build(self.manifest)) != (this := _this_build(device)):
            raise CheckpointError(
                f"{folder / MANIFEST}: packages built for format {built[0]}, torch {built[1]}, "
                f"{built[2]}; this is format {this[0]}, torch {this[1]}, {this[2]}: compile "
                f"them again with `vtfuse export RUN --compiled {folder}`"
            )
        load = torch._inductor.aoti_load_package
        self.image_package = load(str(folder / IMAGE_PACKAGE))
        self.step_graph = load(str(folder / STEP_PACKAGE))
        self.device = device

    def image_keys(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.image_package(images.to(self.device).contiguous())

    def run_step(self, column: Tensor, caches: StaticCache) -> tuple[Tensor, Tensor, Tensor]:
        """One step. The packages read their inputs as the contiguous tensors they were traced
        with (a column of beam search's token matrix is strided, so it is copied)."""
        position = torch.tensor(caches.length, device=column.device)
        kv = (caches.self_k, caches.self_v, caches.image_k, caches.image_v)
        inputs = (column, position, *kv)
        return tuple(self.step_graph(*(t.contiguous() for t in inputs)))
