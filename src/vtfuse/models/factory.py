"""Building a task model from its config (`create_model`) and loading a saved one
(`load_pretrained`): the registered model of the config's task and text side, and config.json's
format read and checked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vtfuse.config import FORMAT_VERSION, ConfigError, ModelConfig, TextConfig, from_dict
from vtfuse.data.tokenizer import AnyTokenizer, Tokenizer, load_tokenizer
from vtfuse.models.base import CONFIG_FILE, CONFIG_HEADER, LM_TASKS, TASKS, UPGRADES, TaskModel
from vtfuse.tasks import JOINT, task_spec
from vtfuse.weights import CheckpointError, pickle_note, weights_file


def read_checkpoint_config(folder: str | Path) -> tuple[ModelConfig, int]:
    """config.json's model config and the format its weights were written in. A checkpoint
    of a format this version cannot read, a field it does not know or a value of the wrong
    type raises an error naming the field."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{folder} is not a vtfuse model folder: no {CONFIG_FILE}{pickle_note(Path(folder))}"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    version = data.get("format_version")
    if version != FORMAT_VERSION and version not in UPGRADES:
        raise CheckpointError(
            f"{path}: field 'format_version' is {version!r} (written by vtfuse "
            f"{data.get('vtfuse_version', '?')}); this vtfuse reads formats "
            f"{sorted({*UPGRADES, FORMAT_VERSION})}"
        )
    unknown = sorted(set(data) - set(CONFIG_HEADER))
    if unknown or not isinstance(data.get("model"), dict):
        problem = (
            f"unknown field(s) {', '.join(unknown)}"
            if unknown
            else "field 'model' must be an object"
        )
        raise ConfigError(f"{path}: {problem}{_written_by(data)}")
    try:
        return from_dict(ModelConfig, data["model"], where=f"{path}: model"), version
    except ConfigError as error:
        raise ConfigError(f"{error}{_written_by(data)}") from None


def _written_by(data: dict[str, Any]) -> str:
    """ " (written by vtfuse X; this is vtfuse Y)" when the versions differ."""
    from vtfuse import __version__

    written = data.get("vtfuse_version")
    if written is None or written == __version__:
        return ""
    return f" (written by vtfuse {written}; this is vtfuse {__version__})"


def create_model(config: ModelConfig, allow_pickle: bool = False) -> TaskModel:
    """The task's model; with `config.lm.name`, the task's model around that pretrained LM.
    A pretrained LM or vision tower it names is loaded from safetensors only, unless
    `allow_pickle` (see `from_pretrained`)."""
    if config.lm.name and config.text.encoder != TextConfig.encoder:
        raise ValueError(
            f"text.encoder {config.text.encoder!r} chooses vtfuse's own text side, which the "
            f"pretrained lm.name {config.lm.name!r} replaces: give one of the two"
        )
    if (config.losses or config.loss_weights) and config.task != JOINT.name:
        raise ValueError(
            f"losses and loss_weights choose the terms of the joint model (task "
            f"{JOINT.name!r}); task {config.task!r} has its own loss"
        )
    task_spec(config.task)  # an unknown task is named as such
    if config.lm.name and config.task in TASKS and config.task not in LM_TASKS:
        raise ValueError(
            f"task {config.task!r} has no model around a pretrained LM (lm.name); its text side "
            f"is text.encoder (transformer, lstm, gru). Tasks with one: "
            f"{', '.join(LM_TASKS.names())}"
        )
    task = (LM_TASKS if config.lm.name else TASKS).get(config.task)
    return task(config, allow_pickle=allow_pickle)


def load_pretrained(
    folder: str | Path, device: str | torch.device = "cpu", allow_pickle: bool = False
) -> tuple[TaskModel, AnyTokenizer]:
    """Load a model folder written by `save_pretrained`: config.json and model.safetensors.
    A folder with a pickle file instead (pytorch_model.bin, *.pt, ...) is refused unless
    `allow_pickle`, and then read with `torch.load(weights_only=True)`; so are the weights of
    a pretrained LM or vision tower the config names."""
    folder = Path(folder)
    config, version = read_checkpoint_config(folder)
    weights = weights_file(folder, allow_pickle)
    try:
        model = create_model(config, allow_pickle)
    except ValueError as error:  # e.g. an unknown task, or sizes that do not fit together
        raise CheckpointError(f"{folder / CONFIG_FILE}: {error}") from None
    missing, unexpected = model.load_weights(weights, allow_pickle, version)
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not match its config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    tokenizer = load_tokenizer(folder)
    _check_vocabulary(config, tokenizer, folder)
    return model.to(device).eval(), tokenizer


def _check_vocabulary(config: ModelConfig, tokenizer: AnyTokenizer, folder: Path) -> None:
    """A word vocabulary larger than the embedding would index past it at the first rare word."""
    if isinstance(tokenizer, Tokenizer) and len(tokenizer) > config.text.vocab_size:
        raise CheckpointError(
            f"{folder}: {Tokenizer.FILE} has {len(tokenizer)} words but {CONFIG_FILE}'s "
            f"model.text.vocab_size is {config.text.vocab_size}"
        )
