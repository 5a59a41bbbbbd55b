"""Weight files under vtfuse's pickle rule: safetensors, and pickle files (torch.save) only when
the user allows them (`--allow-pickle`), then read with torch.load(weights_only=True) — for
vtfuse's own model folders and for the pretrained LMs and vision towers they name.

Below the models and the encoders: both load weights through here."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

WEIGHTS_FILE = "model.safetensors"
# torch.save / pickle weight files: pytorch_model.bin, *.pt, *.pth, *.ckpt, ...
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message names the file or field."""


def pickle_files(folder: str | Path) -> list[Path]:
    """The files in `folder` that `torch.save` (pickle) writes: pytorch_model.bin, *.pt..."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)


def pickle_refusal(path: Path) -> str:
    """Why a pickle file is not loaded, and how to opt in."""
    return (
        f"{path} is a pickle file (torch.save), and vtfuse loads weights only from "
        f"safetensors ({WEIGHTS_FILE}) with a JSON config: unpickling a file can run any code "
        "its author put in it. If you trust this file, pass --allow-pickle (in Python: "
        "allow_pickle=True): its tensors are then read with torch.load(weights_only=True), "
        "which refuses anything but tensors and plain containers"
    )


def pickle_note(folder: Path) -> str:
    """For a folder that is not what was asked for: the pickle file it holds, if any."""
    found = pickle_files(folder)
    return f" (it holds {found[0].name}, a pickle file: vtfuse reads safetensors)" if found else ""


def weights_file(folder: str | Path, allow_pickle: bool = False) -> Path:
    """The weights of a model folder: model.safetensors; without it, a pickle file (e.g.
    pytorch_model.bin) only if `allow_pickle`, else CheckpointError saying why."""
    folder = Path(folder)
    safe = folder / WEIGHTS_FILE
    if safe.is_file():
        return safe
    found = pickle_files(folder)
    if not found:
        raise CheckpointError(
            f"{folder}: no {WEIGHTS_FILE} (vtfuse loads weights from safetensors only)"
        )
    if not allow_pickle:
        raise CheckpointError(f"{folder}: no {WEIGHTS_FILE}; " + pickle_refusal(found[0]))
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise CheckpointError(f"{folder}: no {WEIGHTS_FILE} and several pickle files ({names})")
    return found[0]


def read_weights(path: str | Path, allow_pickle: bool = False) -> dict[str, Tensor]:
    """Tensors by name from a safetensors file or, with `allow_pickle`, from a pickle file
    read by `torch.load(weights_only=True)` (a flat {name: tensor} or {"state_dict": ...})."""
    path = Path(path)
    if path.suffix.lower() not in PICKLE_SUFFIXES:
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"{path}: not a readable safetensors file: {error}") from None
    if not allow_pickle:
        raise CheckpointError(pickle_refusal(path))
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise CheckpointError(
            f"{path}: torch.load(weights_only=True) refused it: {first_line}"
        ) from None
    return _tensors_by_name(loaded, path)


def from_pretrained(loader: Any, name_or_path: str, allow_pickle: bool = False, **options):
    """`loader.from_pretrained(name_or_path, **options)` (a `transformers` Auto class) under
    vtfuse's pickle rule: safetensors only (`use_safetensors=True`) unless `allow_pickle`, so
    a pretrained LM or vision tower whose folder or hub repo holds only pytorch_model.bin is
    refused, naming the file, instead of unpickled. With `allow_pickle`, transformers' own
    choice (`use_safetensors=None`: safetensors if there, else the pickle file, which it reads
    with torch.load(weights_only=True)); `False` would ignore safetensors weights."""
    use_safetensors = None if allow_pickle else True
    try:
        return loader.from_pretrained(name_or_path, use_safetensors=use_safetensors, **options)
    except OSError:
        pickled = None if allow_pickle else _pretrained_pickle_file(name_or_path)
        if pickled is None:
            raise
        refusal = pickle_refusal(pickled)
        raise CheckpointError(f"{name_or_path}: no safetensors weights; {refusal}") from None


def _pretrained_pickle_file(name_or_path: str) -> Path | None:
    """The pickle weights a pretrained model offers when it has no safetensors: a local
    folder's pickle file, or a hub repo's pytorch_model.bin (asked without downloading it)."""
    folder = Path(name_or_path)
    if folder.is_dir():
        has_safetensors = any(folder.glob("*.safetensors")) or any(
            folder.glob("*.safetensors.index.json")
        )
        found = pickle_files(folder)
        return None if has_safetensors or not found else found[0]
    from transformers.utils import WEIGHTS_INDEX_NAME, WEIGHTS_NAME, has_file

    for name in (WEIGHTS_NAME, WEIGHTS_INDEX_NAME):
        try:
            if has_file(name_or_path, name):
                return Path(name_or_path) / name
        except OSError:  # not a repo, or the hub cannot be asked: transformers' error stands
            return None
    return None


def _tensors_by_name(loaded: Any, path: Path) -> dict[str, Tensor]:
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]  # a Lightning-style checkpoint
    if not isinstance(loaded, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in loaded.items()
    ):
        raise CheckpointError(
            f"{path}: expected a mapping of weight names to tensors, got {_describe(loaded)}"
        )
    return loaded


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        kinds = sorted({type(v).__name__ for v in value.values()})
        return f"a dict of {len(value)} entries ({', '.join(kinds)})"
    return type(value).__name__
