"""Image loading and preprocessing with Pillow and tensors (no torchvision)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

MEAN, STD = 0.5, 0.5  # images are scaled to [-1, 1]


class ImageLoadError(ValueError):
    """An image that is missing or cannot be decoded."""


def load_image(path: str | Path) -> Image.Image:
    """Open an image as RGB whatever its mode (palette, grey, RGBA, CMYK...)."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except FileNotFoundError:
        raise ImageLoadError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise ImageLoadError(f"cannot decode image {path}: {error}") from None


def image_to_uint8(image: Image.Image, size: int) -> Tensor:
    """Resize (bilinear, aspect ratio not kept, so boxes scale per axis) → uint8 (3, size, size)."""
    resized = image.convert("RGB").resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1)


def normalise(images: Tensor) -> Tensor:
    """uint8 (B, 3, H, W) → float in [-1, 1]."""
    return (images.float() / 255.0 - MEAN) / STD


def blank_like(images: Tensor) -> Tensor:
    """A mid-grey image of the same shape: the blind baseline's input."""
    return torch.full_like(images, 128)
