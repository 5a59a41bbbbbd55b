"""Heatmaps of where the model looked, one panel per token, overlaid on the image."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image
from torch import Tensor


def save_attention_figure(
    image: Image.Image,
    words: list[str],
    grids: Tensor,
    path: str | Path,
    title: str | None = None,
    columns: int = 6,
) -> Path:
    """`grids` (T, h, w): the attention of each of the T `words` over the image tokens."""
    panels = len(words) + 1
    columns = min(columns, panels)
    rows = math.ceil(panels / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.4 * rows), squeeze=False)
    width, height = image.size
    pixels = np.asarray(image)
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(pixels)
    axes.flat[0].set_title("image", fontsize=9)
    for ax, word, grid in zip(axes.flat[1:], words, grids, strict=False):
        heat = grid.float().numpy()
        heat = heat / max(float(heat.max()), 1e-12)
        ax.imshow(pixels)
        # extent stretches the h × w grid over the image; bilinear smooths the cell edges
        ax.imshow(
            heat, cmap="jet", alpha=0.5, extent=(0, width, height, 0), interpolation="bilinear"
        )
        ax.set_title(word, fontsize=9)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def save_confusion_matrix(confusion: list[list[int]], classes: list[str], path: str | Path) -> Path:
    """The confusion matrix as a picture: rows the true class, columns the predicted one."""
    counts = np.asarray(confusion)
    size = max(3.0, 0.6 * len(classes) + 1.5)
    figure, axis = plt.subplots(figsize=(size, size))
    axis.imshow(counts, cmap="Blues")
    axis.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    axis.set_yticks(range(len(classes)), classes)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    for (row, column), count in np.ndenumerate(counts):
        dark = count > counts.max() / 2
        axis.text(
            column, row, str(count), ha="center", va="center", color="white" if dark else "black"
        )
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
