"""The fusion registry and what every strategy shares."""

from __future__ import annotations

from torch import Tensor, nn

from vtfuse.registry import Registry

FUSIONS: Registry[nn.Module] = Registry("fusion strategy")


def gather_images(image: Tensor, image_index: Tensor | None) -> Tensor:
    """Image rows (I, ...) → one row per text row (B, ...); None means they already match."""
    return image if image_index is None else image.index_select(0, image_index)
