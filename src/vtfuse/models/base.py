"""The base of every task model: a vision encoder, a config, and save/load in the
`from_pretrained` / `save_pretrained` style (a folder with config.json, model.safetensors and
tokenizer.json)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from vtfuse.config import FORMAT_VERSION, ConfigError, ModelConfig, TextConfig, from_dict, to_dict
from vtfuse.data.images import normalise
from vtfuse.data.tokenizer import AnyTokenizer, Tokenizer, load_tokenizer
from vtfuse.encoders.vision import create_vision_encoder
from vtfuse.linear import Linear
from vtfuse.registry import Registry
from vtfuse.weights import (
    WEIGHTS_FILE,
    CheckpointError,
    pickle_note,
    read_weights,
    weights_file,
)

TASKS: Registry[TaskModel] = Registry("task")
CONFIG_FILE = "config.json"
CONFIG_HEADER = ("format_version", "vtfuse_version", "model", "trained")  # config.json's keys


class TaskModel(nn.Module):
    task: str
    # `text.dropout` when the config leaves it None
    default_text_dropout: ClassVar[float] = 0.0

    def __init__(self, config: ModelConfig, *, allow_pickle: bool = False):
        """`allow_pickle`: a pretrained vision tower (or LM) may load from pickle weights."""
        super().__init__()
        self.vision = create_vision_encoder(config.vision, allow_pickle=allow_pickle)
        text = config.text
        if text.dropout is None:
            text = dataclasses.replace(text, dropout=self.default_text_dropout)
        # as the parts are built: their defaults (vision.depth, text.dropout) written in, so a
        # saved model keeps them whatever later versions default to. Subclasses build from it.
        self.config = dataclasses.replace(config, vision=self.vision.config, text=text)

    def init_weights(self) -> None:
        """Linear weights N(0, 1/fan_in) (LeCun et al. 1998) and zero biases; token embeddings
        N(0, 1/dim), scaled by √dim on input (Vaswani et al. 2017, §3.4) so a tied output layer
        starts with unit-scale logits while every word enters the residual stream at unit scale.

        Measured on the synthetic VQA task, with dim 128: GPT-2's N(0, 0.02) — tuned for widths
        of 768 and more — leaves the attention logits ~20× smaller than N(0, 1/fan_in), the
        cross-attention stays uniform over the image and training sits at chance for thousands
        of steps; with small embeddings the first self-attention's output drowns each word's
        identity, and "red" cannot learn to look at red."""
        for module in _own_modules(self):
            if isinstance(module, (nn.Linear, Linear)):
                nn.init.normal_(module.weight, mean=0.0, std=module.in_features**-0.5)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=module.embedding_dim**-0.5)

    def encode_image(self, images: Tensor) -> Tensor:
        """uint8 images (I, 3, H, W) → image tokens (I, h·w, dim); for a clip model
        (vision.frames F > 1) also clips (I, F, 3, H, W) → (I, F·h·w, dim) (see
        `VisionEncoder.encode`)."""
        return self.vision.encode(normalise(images))

    @property
    def visual_dims(self) -> int:
        """Dimensions of a batch of what one row sees: 4, images (B, 3, H, W); for a clip model
        5, clips (B, F, 3, H, W). (A model reading several per row takes one more.)"""
        return 4 if self.config.vision.frames == 1 else 5

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.vision.grid_size

    @property
    def capabilities(self) -> tuple[str, ...]:
        """The tasks this model can be used for (pipelines, evaluators): its own; a joint
        model (`vtfuse.models.joint`) captions and retrieves."""
        return (self.task,)

    @property
    def leaves_parameters_unused(self) -> bool:
        """Some trainable parameters get no gradient from the training loss (DDP must look)."""
        return False

    def training_loss(self, batch: dict[str, Tensor], label_smoothing: float = 0.0) -> Tensor:
        raise NotImplementedError

    def scored_targets(self, batch: dict[str, Tensor]) -> Tensor | None:
        """How many targets the training loss averages over in `batch` when that number varies
        from batch to batch (caption tokens, answerable questions); None when it does not.
        The trainer gives every micro-batch the step's mean of these (`targets_per_batch`) to
        divide by, so unequal micro-batches and ranks step as one batch of them all."""
        return None

    def training_losses(
        self, batch: dict[str, Tensor], label_smoothing: float = 0.0
    ) -> dict[str, Tensor]:
        """`loss`, the training loss, and beside it the terms it is made of (`loss_itc`,
        ...; each unweighted), which the training log records."""
        return {"loss": self.training_loss(batch, label_smoothing)}

    def validation_metrics(self, batch: dict[str, Tensor]) -> dict[str, float]:
        """Per-batch means reported during training (`loss` picks the best checkpoint)."""
        return {"loss": self.training_loss(batch).item()}

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def save_pretrained(
        self, folder: str | Path, tokenizer: AnyTokenizer, trained: dict | None = None
    ) -> None:
        """config.json (with `trained`: e.g. the step and epoch), the weights, the tokenizer."""
        from vtfuse import __version__

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        header = {"format_version": FORMAT_VERSION, "vtfuse_version": __version__}
        config = {**header, "model": to_dict(self.config), "trained": trained or {}}
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        self.save_weights(folder / WEIGHTS_FILE)
        tokenizer.save(folder)

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """What a checkpoint holds: every trainable parameter, once (a tied LM head is its
        embedding's alias), and the buffers of modules that train (batch-norm statistics).
        Frozen pretrained weights are left out: they load from where they came from, the
        LM's hub name or folder, the packaged EfficientNet weights."""
        trains = {
            name
            for name, module in self.named_modules()
            if any(p.requires_grad for p in module.parameters(recurse=False))
        }
        buffers = {id(b) for b in self.buffers()}
        kept, seen = {}, set()
        for name, tensor in self.state_dict(keep_vars=True).items():
            owner = name.rpartition(".")[0]
            keep = tensor.requires_grad or (id(tensor) in buffers and owner in trains)
            if keep and id(tensor) not in seen:
                kept[name] = tensor.detach()
                seen.add(id(tensor))
        return kept

    def save_weights(self, path: Path) -> None:
        save_file({n: t.contiguous() for n, t in self.trainable_state_dict().items()}, str(path))

    def load_weights(
        self, path: Path, allow_pickle: bool = False, format_version: int = FORMAT_VERSION
    ) -> tuple[list[str], list[str]]:
        """Load saved weights (see `read_weights`) written in `format_version` (an older format
        is upgraded, see `UPGRADES`); returns the (missing, unexpected) names. A weight whose
        shape differs from this model's raises CheckpointError naming it."""
        saved, expected = read_weights(path, allow_pickle), set(self.trainable_state_dict())
        for version in range(format_version, FORMAT_VERSION):
            saved = UPGRADES[version](self, saved)
        aliases = _tied_names(self)  # a file written with the other name of a tied weight
        saved = {
            aliases.get(n, n) if aliases.get(n) in expected else n: t for n, t in saved.items()
        }
        mismatched = _shape_mismatches(self.state_dict(), saved)
        if mismatched:
            shown = "; ".join(mismatched[:5]) + (
                f"; and {len(mismatched) - 5} more" if len(mismatched) > 5 else ""
            )
            raise CheckpointError(
                f"{path} does not match its config: {len(mismatched)} weight(s) have another "
                f"shape than the config builds: {shown}"
            )
        self.load_state_dict(saved, strict=False)
        return sorted(expected - set(saved)), sorted(set(saved) - expected)


def _own_modules(root: nn.Module):
    """`root`'s modules, without descending into pretrained ones (`encoders.pretrained`)."""
    yield root
    for child in root.children():
        if not getattr(child, "vtfuse_pretrained", False):
            yield from _own_modules(child)


def _tied_names(model: nn.Module) -> dict[str, str]:
    """Each name of a shared tensor → the name `state_dict` lists first for it."""
    first: dict[int, str] = {}
    aliases = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        aliases[name] = first.setdefault(id(tensor), name)
    return {n: f for n, f in aliases.items() if n != f}


def _from_format_2(model: nn.Module, saved: dict[str, Tensor]) -> dict[str, Tensor]:
    """Format 2 → 3: `vtfuse.linear.Linear` weights became (in, out), were (out, in); the
    position table moved into the text side's contextualiser (`vtfuse.encoders.context`)."""
    renamed = {"text.position_embedding.weight": "text.context.position_embedding.weight"}
    saved = {renamed.get(n, n): t for n, t in saved.items()}
    names = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, Linear)}
    return {n: t.t().contiguous() if n in names else t for n, t in saved.items()}


def _from_format_3(model: nn.Module, saved: dict[str, Tensor]) -> dict[str, Tensor]:
    """Format 3 → 4: the CNN encoders gained a pixel shortcut (see `ConvStemEncoder`). An old
    model's is zero, so the upgraded model computes what it did."""
    added = {
        name: torch.zeros_like(tensor)
        for name, tensor in model.state_dict().items()
        if ".pixel_shortcut." in name and name not in saved
    }
    return {**saved, **added}


# UPGRADES[v] turns weights written in format v into format v + 1; older formats are refused
UPGRADES = {2: _from_format_2, 3: _from_format_3}


def _shape_mismatches(own: dict[str, Tensor], saved: dict[str, Tensor]) -> list[str]:
    """ "name: (file shape) in the file, (model shape) from the config" for each weight both
    have with different shapes."""
    return [
        f"{name}: {tuple(tensor.shape)} in the file, {tuple(own[name].shape)} from the config"
        for name, tensor in saved.items()
        if name in own and own[name].shape != tensor.shape
    ]


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
    """The task's model; with `config.lm.name`, the task around that pretrained LM
    (registered as "<task>_lm"). A pretrained LM or vision tower it names is loaded from
    safetensors only, unless `allow_pickle` (see `from_pretrained`)."""
    if config.lm.name and config.text.encoder != TextConfig.encoder:
        raise ValueError(
            f"text.encoder {config.text.encoder!r} chooses vtfuse's own text side, which the "
            f"pretrained lm.name {config.lm.name!r} replaces: give one of the two"
        )
    if (config.losses or config.loss_weights) and config.task != "joint":
        raise ValueError(
            f"losses and loss_weights choose the terms of the joint model (task 'joint'); "
            f"task {config.task!r} has its own loss"
        )
    task = TASKS.get(f"{config.task}_lm" if config.lm.name else config.task)
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


@dataclass
class WarmStart:
    """What `warm_start` copied."""

    tensors: int  # weights copied whole (same name, same shape)
    words: int  # token-embedding rows copied for words both vocabularies share
    left: list[str]  # the source's weights that found no same-named, same-shaped target


def _fusion_block_key(name: str) -> tuple[int, str] | None:
    """A fusion block inserted in a pretrained LM, named by its layer and its own parameter:
    "lm.bert.encoder.layer.2.fusion.attn.to_q.weight" (a BERT decoder) and
    "lm.encoder.layer.2.fusion.attn.to_q.weight" (the same BERT as an encoder) → (2, ...)."""
    if not name.startswith("lm.") or ".fusion." not in name:
        return None
    path, parameter = name.split(".fusion.", 1)
    return int(path.rsplit(".", 1)[1]), parameter


def _shared_words(tokenizer: AnyTokenizer, source: AnyTokenizer) -> list[tuple[int, int]]:
    """(row, source row) of the words two word vocabularies share (an LM's tokenizer: none)."""
    if not (isinstance(tokenizer, Tokenizer) and isinstance(source, Tokenizer)):
        return []
    return [
        (row, source.word_ids[word])
        for row, word in enumerate(tokenizer.words)
        if word in source.word_ids
    ]


def warm_start(
    model: TaskModel, tokenizer: AnyTokenizer, folder: str | Path, allow_pickle: bool = False
) -> WarmStart:
    """Initialise `model` from another vtfuse model, e.g. a VQA model from a captioner, as
    captioning pretraining does for VirTex (Desai & Johnson 2021) and BLIP: every weight with
    the same name and shape is copied, and the token embedding row by row for the words the
    two vocabularies share. The rest (a VQA answer head, say) keeps its initialisation."""
    source, source_tokenizer = load_pretrained(folder, allow_pickle=allow_pickle)
    target, weights = model.state_dict(), source.state_dict()
    by_block = {_fusion_block_key(name): name for name in target if _fusion_block_key(name)}
    embedding, tied_head = "text.token_embedding.weight", "lm_head.weight"
    tensors, left = 0, []
    with torch.no_grad():
        for name, weight in weights.items():
            if name in (embedding, tied_head):
                continue
            to = name if name in target else by_block.get(_fusion_block_key(name), name)
            if to in target and target[to].shape == weight.shape:
                target[to].copy_(weight)
                tensors += 1
            else:
                left.append(name)
        shared = _shared_words(tokenizer, source_tokenizer)  # both: vtfuse's own text side
        if shared and weights[embedding].shape[1] == target[embedding].shape[1]:
            rows, from_rows = (list(column) for column in zip(*shared, strict=True))
            target[embedding][rows] = weights[embedding][from_rows].to(target[embedding].dtype)
        else:
            shared = []
    if tensors == 0:
        raise CheckpointError(
            f"{folder}: no weight matches this model by name and shape; nothing to start from"
        )
    return WarmStart(tensors, len(shared), left)
