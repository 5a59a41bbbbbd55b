"""Typed configuration: one frozen dataclass per component, serialised to JSON next to the weights.

Configs are never mutated; derive a new one with `dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

DEFAULT_EPOCHS = 10  # `TrainConfig.epochs` 0 without a time budget
FORMAT_VERSION = 5  # bump when a saved checkpoint can no longer be read by this code

C = TypeVar("C")


class ConfigError(ValueError):
    """A configuration file or dictionary that does not fit the schema."""


@dataclass(frozen=True)
class VisionConfig:
    name: str = "cnn"  # registered: cnn, resnet, vgg, vit, efficientnet-lite0; or a HF model
    image_size: int = 72  # images are resized to image_size × image_size
    patch_size: int = 8  # ViT patch side; the CNN downsamples by the same factor
    channels: tuple[int, ...] = (32, 64, 128)  # CNN stage widths (each stage halves the size)
    pool: int = 1  # average each pool × pool block of tokens into one: fewer, coarser tokens
    dim: int = 128  # width of the image tokens
    # Transformer layers over the image tokens; None: the encoder's own `default_depth` (0 after
    # a CNN, 1 for ViT), written into the model's saved config when it is built
    depth: int | None = None
    heads: int = 4  # attention heads of those layers
    mlp_ratio: float = 4.0  # their MLP's hidden width ÷ dim
    dropout: float = 0.0  # dropout in those layers (attention weights, MLP)
    freeze_backbone: bool = True  # a pretrained encoder (efficientnet-lite0) keeps its weights
    # cnn/resnet/vgg: add to each token a linear embedding of its own pixels and their x, y
    # coordinates, so colour and place reach the fusion from the first step (ConvStemEncoder)
    pixel_shortcut: bool = True
    frames: int = 1  # frames read per video clip (1: still images; a clip gives its middle frame)


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 0  # filled from the tokenizer when a model is built
    dim: int = 128  # width of the text tokens
    depth: int = 3  # blocks of self-attention → fusion → MLP (after lstm/gru: fusion → MLP)
    heads: int = 4  # attention heads (self-attention and fusion)
    mlp_ratio: float = 4.0  # the MLP's hidden width ÷ dim
    max_length: int = 64  # longest token sequence (positions are learned)
    # Dropout on the attention weights and in the MLPs of the text blocks. None: the task
    # model's own default (`TaskModel.default_text_dropout`: 0.1 in a caption decoder, 0 in a
    # text encoder), written into the saved config when the model is built
    dropout: float | None = None
    # How the words meet each other (see vtfuse.encoders.context): "transformer", self-attention
    # in every block; "lstm" or "gru", one recurrent stack under the blocks instead.
    encoder: str = "transformer"
    rnn_layers: int = 1  # lstm/gru: stacked recurrent layers
    rnn_hidden: int = 0  # lstm/gru: hidden size per direction (0: `dim`)
    bidirectional: bool = False  # lstm/gru: also read right to left (not in a caption decoder)


@dataclass(frozen=True)
class FusionConfig:
    name: str = "cross_attention"  # registered fusion strategy (see vtfuse.fusion)
    score: str = ""  # "dot", "cosine" or "neg_distance"; "" = the strategy's own default
    latents: int = 16  # resampler: learned latent queries (the text sees this many tokens)
    relation_side: int = 6  # relation: image pooled to ≤ side × side objects (side⁴ pairs)


@dataclass(frozen=True)
class LMConfig:
    """A pretrained language model as the text side (empty `name`: vtfuse's own Transformer)."""

    name: str = ""  # transformers causal LM: hub name, local folder, or "minilm" (packaged)
    xattn_every: int = 1  # a fusion block before every k-th decoder layer
    resampler_latents: int = 0  # > 0: a Perceiver Resampler gives the blocks this many tokens
    freeze: bool = True  # keep the LM's own weights; train only what is new
    image_token_id: int = -1  # interleaved images: the token opening each (-1: one image)
    attend_to_all_images: bool = False  # interleaved: every image so far, not just the latest


@dataclass(frozen=True)
class ModelConfig:
    task: str = "caption"  # registered task model: caption, vqa, retrieval, classify, joint
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    num_answers: int = 0  # VQA: size of the answer vocabulary (filled from the training data)
    # joint: the loss terms (itc, itm, lm) and their weights; () = all three, each weight 1
    losses: tuple[str, ...] = ()
    loss_weights: tuple[float, ...] = ()


@dataclass(frozen=True)
class TrainConfig:
    # Passes over the training data; 0: as many as the time budget (max_minutes) allows, the
    # learning-rate schedule laid over the minutes; without a budget, 10
    epochs: int = 0
    # Examples per step (per process) and the peak learning rate. None: the task's own
    # (`TaskSpec.batch_size`, `TaskSpec.lr`: 32 and 1e-3 for captioning, 64 and 3e-4 for the
    # rest; see vtfuse/tasks), written into the run's config
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float = 0.05  # AdamW's, on weight matrices and embeddings (not on vectors)
    warmup_ratio: float = 0.05  # share of all steps spent warming the learning rate up
    min_lr_ratio: float = 0.05  # cosine decay ends at lr * min_lr_ratio
    grad_clip: float = 1.0  # max global gradient norm (0 disables)
    grad_accum: int = 1  # batches per optimiser step (gradients summed, scaled by 1/k)
    max_bad_steps: int = 10  # consecutive non-finite steps (each skipped) before the run stops
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    seed: int = 0  # random seed (weights, data order)
    # Time budget in minutes (0: none). Alone (epochs 0), the run is planned on it: warm-up and
    # cosine decay follow the clock and training ends, validated, when it is spent. With epochs
    # set, a stop: the `last` checkpoint is saved and --resume goes on
    max_minutes: float = 0.0
    save_every: int = 500  # also write the `last` checkpoint every N steps
    device: str = "auto"  # "auto", "cpu", "cuda" or "cuda:N"
    # bf16: autocast (weights, gradients and optimiser state stay fp32); auto: for a model of
    # 4M parameters or more on a GPU or CPU with bf16 matrix units, bf16 when its first batch
    # trains faster under it (timed), else fp32 (vtfuse.training.precision). The run's config
    # records the one used
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    num_workers: int = 0  # data-loading worker processes
    shuffle: bool = True  # shuffle the examples every epoch; False: file (or shard) order
    # at most this many examples of one image stand together in a batch (0: all of them):
    # more images a batch, a less noisy vision gradient (see data.items.grouped_order)
    examples_per_image: int = 4
    skip_bad: bool = False  # skip (and count) examples whose image is missing or corrupt
    eval_batch_size: int = 128  # examples per validation batch
    # Warm start from a vtfuse run or model folder (e.g. VQA from a captioner): weights with
    # matching names and shapes, and shared words' embeddings, are copied
    init_from: str = ""
    image_roots: tuple[str, ...] = ()  # folders besides the JSONL's own images may come from
    # recompute activations in the backward pass (text blocks, vision layers, a pretrained
    # LM's layers): less memory, slower steps
    grad_checkpointing: bool = False
    # under torchrun (--nproc N): shard weights, gradients and optimiser state over the
    # processes (FSDP2) instead of replicating them (DDP); checkpoints gathered whole on rank 0
    fsdp: bool = False

    @property
    def on_the_clock(self) -> bool:
        """Planned on the time budget: `max_minutes` given and no epoch count."""
        return self.epochs == 0 and self.max_minutes > 0

    @property
    def epoch_count(self) -> int | None:
        """The passes to make; None when the time budget decides."""
        return None if self.on_the_clock else self.epochs or DEFAULT_EPOCHS

    @property
    def length(self) -> str:
        """How long a run trains, in words."""
        if self.on_the_clock:
            return f"{self.max_minutes:g} min of training (as many epochs as fit)"
        cap = f"at most {self.max_minutes:g} min, " if self.max_minutes > 0 else ""
        return f"{cap}{self.epoch_count} epoch(s)"


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def to_dict(config: Any) -> dict[str, Any]:
    """A dataclass as plain JSON-ready data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def from_dict(cls: type[C], data: dict[str, Any], where: str = "") -> C:
    """Build `cls` from a dict, refusing unknown fields and wrong types with the field's path."""
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}"
        )
    values = {name: _coerce(hints[name], value, f"{where}.{name}") for name, value in data.items()}
    return cls(**values)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    origin = typing.get_origin(hint)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        return tuple(_coerce(item, v, where) for v in value)
    if origin in (typing.Union, types.UnionType):  # X | None: None, or checked as an X
        (kind,) = (arg for arg in typing.get_args(hint) if arg is not type(None))
        return None if value is None else _coerce(kind, value, where)
    if origin is Literal:
        if value not in typing.get_args(hint):
            choices = ", ".join(map(repr, typing.get_args(hint)))
            raise ConfigError(f"{where}: expected one of {choices}, got {value!r}")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not (
        isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def save_json(path: str | Path, data: Any) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def load_run_config(path: str | Path) -> RunConfig:
    """Read a `{"model": {...}, "train": {...}}` file (either part may be left out)."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON: {error}") from None
    return from_dict(RunConfig, data, where=str(path))
