"""Checkpoints: safetensors + JSON only, written atomically.

A checkpoint is a folder. It is written under a temporary name, every file fsync'ed, and then
swapped in by renames, so a crash at any moment leaves either the old or the new checkpoint
whole — never a half-written one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from vtfuse.models.base import CONFIG_FILE
from vtfuse.weights import CheckpointError, pickle_files, pickle_refusal

STATE_TENSORS, STATE_JSON = "training_state.safetensors", "training_state.json"


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_dir():  # e.g. an LM's tokenizer files
            _fsync_tree(path)
        elif path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextmanager
def atomic_folder(target: str | Path) -> Iterator[Path]:
    """Yield a temporary folder to write into; on success it replaces `target` atomically.

    The previous `target` is kept (as `target.old`) until the new one is complete.
    """
    target = Path(target)
    temporary = target.with_name(f".{target.name}.tmp")
    previous = target.with_name(f".{target.name}.old")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    try:
        yield temporary
        _fsync_tree(temporary)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if target.exists():  # else a crash mid-swap left only `previous`: keep it until the end
        shutil.rmtree(previous, ignore_errors=True)
        target.rename(previous)
    temporary.rename(target)
    _fsync_tree(target.parent)
    shutil.rmtree(previous, ignore_errors=True)


def recover(target: str | Path) -> Path | None:
    """The complete checkpoint at `target`, or the previous one if a crash hit mid-swap."""
    target = Path(target)
    previous = target.with_name(f".{target.name}.old")
    if target.exists():
        return target
    return previous if previous.exists() else None


def resolve_model_folder(path: str | Path) -> Path:
    """A run folder means its `best` checkpoint (or `last` if there is no best yet)."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        return path
    for name in ("best", "last"):
        folder = recover(path / name)
        if folder is not None:
            return folder
    found = pickle_files(path)
    if found:  # a model saved with torch.save, not by vtfuse
        raise CheckpointError(
            f"{path} is not a vtfuse model folder (no {CONFIG_FILE}); " + pickle_refusal(found[0])
        )
    raise CheckpointError(f"{path} is neither a vtfuse run folder nor a model folder")


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    plain = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), position, has_gauss, cached],
    }
    return tensors, plain


def set_rng_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))


Optimizer = torch.optim.Optimizer
OptimizerState = dict[str, Any]  # an optimiser's `state_dict()`: parameters by index


def optimizer_state(state: OptimizerState) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimiser state dict into tensors (for safetensors) and the rest (for JSON)."""
    tensors, plain = {}, {}
    for index, slots in state["state"].items():
        for name, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{name}"] = value.contiguous()
            else:
                plain[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": plain}


def read_optimizer_state(tensors: dict[str, torch.Tensor], plain: dict) -> OptimizerState:
    """The optimiser state dict `optimizer_state` split."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for key, value in plain["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def save_training_state(
    folder: Path,
    optimizer: Optimizer | OptimizerState,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    progress: dict[str, Any],
) -> None:
    """Everything beyond the weights that exact resumption needs. `optimizer`: the optimiser,
    or its whole state dict (under FSDP, gathered from the shards)."""
    whole = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    opt_tensors, opt_plain = optimizer_state(whole)
    rng_tensors, rng_plain = rng_state()
    save_file({**opt_tensors, **rng_tensors}, str(folder / STATE_TENSORS))
    plain = {
        "progress": progress,
        "optimizer": opt_plain,
        "scheduler": scheduler.state_dict(),
        "rng": rng_plain,
    }
    (folder / STATE_JSON).write_text(json.dumps(plain))


def load_training_state(
    folder: Path,
    optimizer: Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    restore: Callable[[Optimizer, OptimizerState], None] = Optimizer.load_state_dict,
) -> dict[str, Any]:
    """Restore the optimiser (through `restore`: under FSDP, into its shards), the scheduler
    and the random generators; → the saved progress."""
    for name in (STATE_TENSORS, STATE_JSON):
        if not (folder / name).is_file():
            raise CheckpointError(
                f"{folder}: no {name}, so training cannot resume exactly from it "
                "(every `last` checkpoint has it, as safetensors + JSON)"
            )
    tensors = load_file(str(folder / STATE_TENSORS))
    plain = json.loads((folder / STATE_JSON).read_text())
    restore(optimizer, read_optimizer_state(tensors, plain["optimizer"]))
    scheduler.load_state_dict(plain["scheduler"])
    set_rng_state(tensors, plain["rng"])
    return plain["progress"]
