"""Fusion strategies: how text tokens take in the image. Each is a registered module.

Interface: ``fusion(text (B, T, dim), image (I, N, image_dim), cache=, need_weights=,
image_index=)`` returns the updated text tokens and, when asked, the attention over image
tokens (B, heads, T, N). `image_index` (B,) maps each text row to its image row (I ≤ B: an
image asked several questions is encoded once); None means one image per row.
"""

from vtfuse.fusion.base import FUSIONS
from vtfuse.fusion.cross_attention import CrossAttentionFusion

__all__ = ["FUSIONS", "CrossAttentionFusion"]
