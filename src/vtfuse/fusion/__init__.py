"""Fusion strategies: how text tokens take in the image. Each is a registered module.

Interface: ``Strategy(dim, heads, image_dim, config: FusionConfig, dropout)``; calling it as
``fusion(text (B, T, dim), image (I, N, image_dim), cache=, need_weights=, image_index=)``
returns the updated text tokens and, when asked, the attention over image tokens
(B, heads, T, N). `image_index` (B,) maps each text row to its image row (I ≤ B: an image asked
several questions is encoded once); None means one image per row. `cache` is a KVCache the
strategy may fill once per image and reuse at every generation step.

| name                    | how text meets the image                                        |
|-------------------------|-----------------------------------------------------------------|
| cross_attention         | text queries attend to image keys/values (the default)          |
| gated_cross_attention   | the same, plus a feed-forward, each through tanh(α), α₀ = 0      |
| similarity              | cosine text–image similarities are the attention logits          |
| resampler               | M learned latents read the image; the text reads the latents     |
| weighted_sum            | late fusion: the mean image vector, mixed in by learned weights  |
"""

from vtfuse.fusion.base import FUSIONS
from vtfuse.fusion.cross_attention import CrossAttentionFusion, GatedCrossAttentionFusion
from vtfuse.fusion.resampler import ResamplerFusion
from vtfuse.fusion.similarity import SimilarityFusion
from vtfuse.fusion.weighted_sum import WeightedSumFusion

__all__ = [
    "FUSIONS",
    "CrossAttentionFusion",
    "GatedCrossAttentionFusion",
    "ResamplerFusion",
    "SimilarityFusion",
    "WeightedSumFusion",
]
