"""The base of every task model: a vision encoder, a config, and save/load in the
`from_pretrained` / `save_pretrained` style (a folder with config.json, model.safetensors and
tokenizer.json)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from vtfuse.config import FORMAT_VERSION, ModelConfig, to_dict
from vtfuse.data.images import normalise
from vtfuse.data.tokenizer import AnyTokenizer
from vtfuse.encoders.vision import create_vision_encoder
from vtfuse.linear import Linear
from vtfuse.registry import Registry
from vtfuse.tasks import TaskSpec, task_spec
from vtfuse.weights import (
    WEIGHTS_FILE,
    CheckpointError,
    read_weights,
)

# Each task's model, registered under its spec's name (`vtfuse.tasks`): one reading text with
# vtfuse's own text side (`text.encoder`: transformer, lstm, gru), and, for the tasks that have
# one, one around a pretrained LM (`lm.name`)
TASKS: Registry[TaskModel] = Registry("task")
LM_TASKS: Registry[TaskModel] = Registry("task with a pretrained LM (lm.name)")


def task_model(spec: TaskSpec, pretrained_lm: bool = False):
    """Register a model class as the model of the task `spec` (around a pretrained LM, with
    `pretrained_lm`); its `task` is the spec's name."""

    def add(cls: type[TaskModel]) -> type[TaskModel]:
        cls.task = spec.name
        return (LM_TASKS if pretrained_lm else TASKS).register(spec.name)(cls)

    return add


CONFIG_FILE = "config.json"
CONFIG_HEADER = ("format_version", "vtfuse_version", "model", "trained")  # config.json's keys


class TaskModel(nn.Module):
    task: ClassVar[str]  # the task spec's name, set where the class registers (`task_model`)
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
        self.config = dataclasses.replace(
            config, task=self.task, vision=self.vision.config, text=text
        )

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
        model captions and retrieves (the task spec's `serves`)."""
        return task_spec(self.task).capabilities

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


def _with_zeros_for_missing(
    model: nn.Module, saved: dict[str, Tensor], part: Callable[[str], bool]
) -> dict[str, Tensor]:
    """`saved` plus zeros for each of `model`'s weights in `part` that it lacks: the upgrade of
    a format that gained a branch which, at zero, leaves the old computation."""
    added = {
        name: torch.zeros_like(tensor)
        for name, tensor in model.state_dict().items()
        if part(name) and name not in saved
    }
    return {**saved, **added}


def _from_format_3(model: nn.Module, saved: dict[str, Tensor]) -> dict[str, Tensor]:
    """Format 3 → 4: the CNN encoders gained a pixel shortcut (see `ConvStemEncoder`). An old
    model's is zero, so the upgraded model computes what it did."""
    return _with_zeros_for_missing(model, saved, lambda name: ".pixel_shortcut." in name)


def _from_format_4(model: nn.Module, saved: dict[str, Tensor]) -> dict[str, Tensor]:
    """Format 4 → 5: the retrieval model's image embedding gained an attention pool over the
    mean token (`models.retrieval.AttentionPool`). An old model's is zero, which leaves the
    mean, so the upgraded model computes what it did."""
    return _with_zeros_for_missing(model, saved, lambda name: name.startswith("image_pool."))


# UPGRADES[v] turns weights written in format v into format v + 1; older formats are refused
UPGRADES = {2: _from_format_2, 3: _from_format_3, 4: _from_format_4}


def _shape_mismatches(own: dict[str, Tensor], saved: dict[str, Tensor]) -> list[str]:
    """ "name: (file shape) in the file, (model shape) from the config" for each weight both
    have with different shapes."""
    return [
        f"{name}: {tuple(tensor.shape)} in the file, {tuple(own[name].shape)} from the config"
        for name, tensor in saved.items()
        if name in own and own[name].shape != tensor.shape
    ]
