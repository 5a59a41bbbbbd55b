"""Command-line flags made from the config dataclasses: a new config field is a new flag.

Every field of `TrainConfig` becomes `--field-name`, and every field of the model's parts
(`VisionConfig`, `TextConfig`, `FusionConfig`, `LMConfig`) `--part-field-name` (e.g.
`--text-dropout`, `--vision-image-size`), with the field's type, its default shown, and its
comment in `vtfuse/config.py` as the help — as open_clip and torchtune override their configs.
A flag overrides the config file (or the resumed run's config) only when it is given.

Fields the CLI sets another way are left out here (`HANDWRITTEN`): chosen through a hand-written
flag with more to it (`--vision` also sets a pretrained encoder's input size, `--lm` the
fusion), filled from the data (vocab_size, num_answers), or shared by several commands
(`--image-root`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import re
import types
import typing
from dataclasses import dataclass
from typing import Any

from vtfuse.config import FusionConfig, LMConfig, ModelConfig, TextConfig, TrainConfig, VisionConfig

MODEL_PARTS = {"vision": VisionConfig, "text": TextConfig, "fusion": FusionConfig, "lm": LMConfig}

# (part, field) → how the CLI sets it instead ("" for TrainConfig, "model" for ModelConfig)
HANDWRITTEN = {
    ("", "image_roots"): "--image-root",
    ("model", "task"): "--task",
    ("model", "num_answers"): "filled from the training data",
    ("model", "losses"): "--losses",
    ("model", "loss_weights"): "--loss-weights",
    ("vision", "name"): "--vision",
    ("vision", "frames"): "--frames",
    ("vision", "freeze_backbone"): "--freeze",
    ("text", "vocab_size"): "filled from the tokenizer",
    ("text", "encoder"): "--text-encoder",
    ("text", "rnn_layers"): "--rnn-layers",
    ("text", "rnn_hidden"): "--rnn-hidden",
    ("text", "bidirectional"): "--bidirectional",
    ("fusion", "name"): "--fusion",
    ("fusion", "score"): "--score",
    ("lm", "name"): "--lm",
    ("lm", "xattn_every"): "--xattn-every",
    ("lm", "resampler_latents"): "--resampler",
    ("lm", "freeze"): "--freeze",
}


@dataclass(frozen=True)
class ConfigFlag:
    part: str  # "" for a TrainConfig field, else the ModelConfig part ("vision", "text", ...)
    field: str
    hint: Any  # the field's type
    default: Any
    help: str

    @property
    def flag(self) -> str:
        name = self.field.replace("_", "-")
        return f"--{self.part}-{name}" if self.part else f"--{name}"

    @property
    def dest(self) -> str:
        return f"set:{self.part}.{self.field}"  # apart from every hand-written flag's dest


@functools.cache
def config_flags() -> tuple[ConfigFlag, ...]:
    """One flag per settable field: TrainConfig's, then each model part's (read from the
    sources once a process: every `vtfuse` command builds the train parser)."""
    flags = []
    for part, cls in {"": TrainConfig, **MODEL_PARTS}.items():
        hints, comments = typing.get_type_hints(cls), field_comments(cls)
        flags += [
            ConfigFlag(part, f.name, hints[f.name], f.default, comments.get(f.name, ""))
            for f in dataclasses.fields(cls)
            if (part, f.name) not in HANDWRITTEN
        ]
    return tuple(flags)


_FIELD = re.compile(r"^\s+(\w+): [^=]+=.*?(?:#\s*(.*))?$")


def field_comments(cls: type) -> dict[str, str]:
    """Each field's comment in the class source: the one after it on its line, else the lines
    of comment just above it."""
    comments, above = {}, []
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("#").strip())
            continue
        match = _FIELD.match(line)
        if match:
            comments[match.group(1)] = match.group(2) or " ".join(above)
        above = []
    return comments


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    train = parser.add_argument_group("training (TrainConfig; --config file values are defaults)")
    groups = {"": train}
    for part, cls in MODEL_PARTS.items():
        groups[part] = parser.add_argument_group(f"model: {part} ({cls.__name__})")
    for flag in config_flags():
        groups[flag.part].add_argument(flag.flag, dest=flag.dest, **_argument(flag))


def _argument(flag: ConfigFlag) -> dict[str, Any]:
    """argparse keywords for a field of type bool, int, float, str, a Literal, an optional
    number or a tuple (given comma-separated)."""
    hint, shown = flag.hint, flag.default if flag.default != "" else '""'
    help_text = flag.help.replace("%", "%%")
    keywords: dict[str, Any] = {"default": None, "metavar": flag.field.upper()}
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (hint,) = (arg for arg in typing.get_args(hint) if arg is not type(None))
    if hint is bool:
        keywords["action"] = argparse.BooleanOptionalAction
        del keywords["metavar"]
    elif typing.get_origin(hint) is typing.Literal:
        keywords["choices"] = typing.get_args(hint)
        del keywords["metavar"]
    elif typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        keywords["type"] = _comma_separated(item)
        keywords["metavar"] = f"{item.__name__.upper()},..."
        shown = ",".join(map(str, flag.default))
    else:
        keywords["type"] = hint
    keywords["help"] = f"{help_text} (default: {shown!s})" if help_text else f"default: {shown}"
    return keywords


def _comma_separated(item: type):
    def parse(text: str) -> tuple:
        try:
            return tuple(item(value) for value in text.split(",") if value.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {item.__name__}s separated by commas, got {text!r}"
            ) from None

    return parse


def apply_config_flags(
    args: argparse.Namespace, model: ModelConfig, train: TrainConfig
) -> tuple[ModelConfig, TrainConfig]:
    """`model` and `train` with every config flag that was given set on them."""
    given: dict[str, dict[str, Any]] = {}
    for flag in config_flags():
        value = getattr(args, flag.dest, None)
        if value is not None:
            given.setdefault(flag.part, {})[flag.field] = value
    train = dataclasses.replace(train, **given.pop("", {}))
    parts = {part: dataclasses.replace(getattr(model, part), **v) for part, v in given.items()}
    return dataclasses.replace(model, **parts), train
