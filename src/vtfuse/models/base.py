"""The base of every task model: a vision encoder, a config, and save/load in the
`from_pretrained` / `save_pretrained` style (a folder with config.json, model.safetensors and
tokenizer.json)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import Tensor, nn

from vtfuse.config import FORMAT_VERSION, ModelConfig, from_dict, to_dict
from vtfuse.data.images import normalise
from vtfuse.data.tokenizer import Tokenizer
from vtfuse.encoders.vision import create_vision_encoder
from vtfuse.registry import Registry

TASKS: Registry[TaskModel] = Registry("task")
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
EMBEDDING_STD = 0.3


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message names the file or field."""


class TaskModel(nn.Module):
    task: str

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.vision = create_vision_encoder(config.vision)

    def init_weights(self) -> None:
        """Linear weights N(0, 0.02) and zero biases, as GPT-2; embeddings N(0, 0.3).

        Measured on the synthetic VQA task: with GPT-2's N(0, 0.02) embeddings the first
        self-attention layer averages the words into one another (its output outweighs the
        tiny embeddings) and training sits on a plateau at chance for epochs; with N(0, 0.3)
        each word keeps its identity and the loss falls from the first steps."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=EMBEDDING_STD)

    def encode_image(self, images: Tensor) -> Tensor:
        """uint8 images (I, 3, H, W) → image tokens (I, h·w, dim)."""
        return self.vision(normalise(images))

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.vision.grid_size

    def training_loss(self, batch: dict[str, Tensor], label_smoothing: float = 0.0) -> Tensor:
        raise NotImplementedError

    def validation_metrics(self, batch: dict[str, Tensor]) -> dict[str, float]:
        """Per-batch means reported during training (`loss` picks the best checkpoint)."""
        return {"loss": self.training_loss(batch).item()}

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def save_pretrained(self, folder: str | Path, tokenizer: Tokenizer) -> None:
        from vtfuse import __version__

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        header = {"format_version": FORMAT_VERSION, "vtfuse_version": __version__}
        (folder / CONFIG_FILE).write_text(
            json.dumps({**header, "model": to_dict(self.config)}, indent=2)
        )
        save_model(self, str(folder / WEIGHTS_FILE))  # handles the tied embedding / LM head
        tokenizer.save(folder)


def read_model_config(folder: str | Path) -> ModelConfig:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a vtfuse model folder: no {CONFIG_FILE}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: field 'format_version' is {version!r} (written by vtfuse "
            f"{data.get('vtfuse_version', '?')}); this vtfuse reads format {FORMAT_VERSION}"
        )
    return from_dict(ModelConfig, data.get("model", {}), where=f"{path}: model")


def create_model(config: ModelConfig) -> TaskModel:
    return TASKS.get(config.task)(config)


def load_pretrained(
    folder: str | Path, device: str | torch.device = "cpu"
) -> tuple[TaskModel, Tokenizer]:
    """Load a model folder written by `save_pretrained` (weights from safetensors only)."""
    folder = Path(folder)
    model = create_model(read_model_config(folder))
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(
            f"{folder}: no {WEIGHTS_FILE} (vtfuse loads weights from safetensors only)"
        )
    missing, unexpected = load_model(model, str(weights), strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not match its config: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    return model.to(device).eval(), Tokenizer.load(folder)
