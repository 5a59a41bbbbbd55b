"""Image loading and preprocessing with Pillow and tensors (no torchvision)."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

MEAN, STD = 0.5, 0.5  # images are scaled to [-1, 1]


class ImageLoadError(ValueError):
    """An image that is missing or cannot be decoded."""


MAX_PIXELS = 100_000_000  # larger images are refused: a decompression bomb, or a mistake


def load_image(path: str | Path | BinaryIO) -> Image.Image:
    """Open an image as RGB whatever its mode (palette, grey, 16-bit, RGBA, CMYK...), turned
    upright as its EXIF orientation says (as a camera's viewer shows it)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise ImageLoadError(
                    f"image {path} has {width}×{height} pixels, over the limit of {MAX_PIXELS}"
                )
            image.load()
            return _rgb(ImageOps.exif_transpose(image))
    except FileNotFoundError:
        raise ImageLoadError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise ImageLoadError(f"cannot decode image {path}: {error}") from None
    except Image.DecompressionBombError as error:
        raise ImageLoadError(f"image {path} refused: {error}") from None


def _rgb(image: Image.Image) -> Image.Image:
    """16-bit greyscale ("I;16", "I") is scaled to 8 bits first: Pillow's own conversion
    would clip everything above 255 to white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") else max(1.0, float(array.max()))
        image = Image.fromarray((array / peak * 255).round().clip(0, 255).astype(np.uint8))
    return image.convert("RGB")


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
