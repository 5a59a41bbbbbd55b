"""Pointing accuracy: does a word's attention peak fall inside the box of the object it names?

The pointing game (Zhang et al. 2016, "Top-down neural attention by excitation backprop"),
applied to cross-attention: for every word that equals a box label, the peak of that word's
attention (mean over heads, and over layers unless one is chosen) must land inside a box with
that label.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from vtfuse.visualisation.maps import peak_point


def inside(point: tuple[float, float], box: Sequence[float]) -> bool:
    x, y = point
    x0, y0, x1, y1 = box
    return x0 <= x <= x1 and y0 <= y <= y1


def pointing_hits(
    words: Sequence[str],
    maps: Tensor,
    boxes: Sequence[dict[str, Any]],
    grid: tuple[int, int],
    image_size: tuple[int, int],
) -> tuple[int, int]:
    """`maps` (T, N): attention of each word. Returns (hits, object-naming words)."""
    by_label: dict[str, list[Sequence[float]]] = {}
    for item in boxes:
        by_label.setdefault(item["label"].lower(), []).append(item["box"])
    hits = total = 0
    for word, weights in zip(words, maps, strict=False):
        if word in by_label:
            total += 1
            point = peak_point(weights, grid, image_size)
            hits += any(inside(point, box) for box in by_label[word])
    return hits, total
