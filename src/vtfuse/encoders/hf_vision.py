"""Hugging Face vision towers as image tokenisers: ViT, CLIP and SigLIP vision models, DINOv2,
and CNN backbones (ResNet, ConvNeXt), whose last feature map gives one token per place.

`--vision NAME_OR_PATH` (a hub name or a local folder, anything not in the registry) loads the
model through `AutoModel`; a CLIP or SigLIP checkpoint gives its vision half. Preprocessing is
vtfuse's own (Pillow resize, tensors): images arrive in [-1, 1] and are renormalised with the
tower's mean and std from its `preprocessor_config.json` (0.5, as ViT's, when it has none).
The patch tokens of the last layer — the [CLS] and register tokens dropped — are projected
to `vision.dim`; then positions and `depth` layers as for the built-ins.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from vtfuse.config import VisionConfig
from vtfuse.encoders.vision import VISION_ENCODERS, VisionEncoder, pretrained
from vtfuse.weights import from_pretrained


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError('a Hugging Face vision tower needs: pip install "vtfuse[hf]"') from None
    return transformers


def tower_config(name_or_path: str):
    """The vision part of a checkpoint's config (CLIP and SigLIP hold it in `vision_config`)."""
    try:
        config = _transformers().AutoConfig.from_pretrained(name_or_path)
    except OSError as error:
        registered = ", ".join(VISION_ENCODERS.names())
        raise ValueError(
            f"vision encoder {name_or_path!r} is neither registered ({registered}) nor a "
            f"Hugging Face model folder or hub name that loads: {error}"
        ) from None
    return getattr(config, "vision_config", None) or config


def is_convolutional(config) -> bool:
    """A CNN backbone (ResNet, ConvNeXt, RegNet...): stages of feature maps, not patches."""
    return hasattr(config, "hidden_sizes") and not hasattr(config, "hidden_size")


def tower_preset(name_or_path: str) -> dict[str, int]:
    """The VisionConfig fields a tower fixes: its input size and its tokens' stride — a ViT's
    patch size, or a CNN's total downsampling (×4 in its stem, ×2 in each later stage: 32
    for the usual four, so 224 px gives a 7 × 7 feature map)."""
    return _preset(tower_config(name_or_path))


def _preset(config) -> dict[str, int]:
    if is_convolutional(config):
        return {"image_size": 224, "patch_size": 4 * 2 ** (len(config.hidden_sizes) - 1)}
    return {"image_size": int(config.image_size), "patch_size": int(config.patch_size)}


def load_vision_tower(name_or_path: str, allow_pickle: bool = False) -> nn.Module:
    """The tower's weights, from safetensors (pickle ones only if `allow_pickle`: see
    `vtfuse.weights.from_pretrained`)."""
    model = from_pretrained(_transformers().AutoModel, name_or_path, allow_pickle)
    vision = getattr(model, "vision_model", None)  # CLIPModel, SiglipModel: the image half
    if vision is not None and hasattr(model, "text_model"):
        return vision
    return model


def tower_normalisation(name_or_path: str) -> tuple[list[float], list[float]]:
    """(mean, std) the tower was trained with, from its preprocessor config if it is local or
    cached; ViT's 0.5 / 0.5 otherwise."""
    mean, std = [0.5] * 3, [0.5] * 3
    try:
        path = _transformers().utils.cached_file(
            name_or_path, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False
        )
    except OSError:
        path = None
    if path and Path(path).is_file():
        settings = json.loads(Path(path).read_text())
        mean, std = settings.get("image_mean", mean), settings.get("image_std", std)
    return list(mean), list(std)


class HuggingFaceVisionEncoder(VisionEncoder):
    """A pretrained transformers vision model, frozen by default (`vision.freeze_backbone`)."""

    def __init__(self, config: VisionConfig, allow_pickle: bool = False):
        tower = tower_config(config.name)
        preset = _preset(tower)
        fixed = ("patch_size",) if is_convolutional(tower) else ("image_size", "patch_size")
        if any(getattr(config, key) != preset[key] for key in fixed):
            raise ValueError(
                f"{config.name} takes {preset['image_size']} px images in patches of "
                f"{preset['patch_size']}: set vision.image_size and vision.patch_size to those "
                f"(--vision sets them), got {config.image_size} and {config.patch_size}"
            )
        super().__init__(config)
        self.frozen = config.freeze_backbone
        weights = load_vision_tower(config.name, allow_pickle)
        self.tower = pretrained(weights).requires_grad_(not self.frozen)
        self.patches = (config.image_size // config.patch_size) ** 2
        mean, std = tower_normalisation(config.name)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        width = tower.hidden_sizes[-1] if is_convolutional(tower) else tower.hidden_size
        self.project = nn.Linear(width, config.dim)

    def tokenise(self, images: Tensor) -> Tensor:
        pixels = ((images + 1) / 2 - self.mean) / self.std  # [-1, 1] → the tower's own scale
        hidden = self.tower(pixel_values=pixels).last_hidden_state
        if hidden.dim() == 4:  # a CNN's last feature map (B, C, h, w): one token per place
            return self.project(hidden.flatten(2).transpose(1, 2))
        return self.project(hidden[:, -self.patches :])  # a ViT's patch tokens come last

    def train(self, mode: bool = True) -> HuggingFaceVisionEncoder:
        super().train(mode)
        if self.frozen:
            self.tower.eval()
        return self
