"""Fusion strategies: how text tokens take in the image. Each is a registered module.

Interface (see `Fusion`): ``Strategy(dim, heads, image_dim, config: FusionConfig, dropout)``
implementing ``fuse(text, image, call: FusionCall)``,
handed to the text side as a `FusionBuilder` (`fusion_builder(config)`);
a dual-stream strategy is the fusion step of every text block and returns the updated text,
the image stream for the next block, and, when asked, the attention over the image tokens
(B, heads, T, N). The single-stream `concat` instead projects the image tokens into the text
sequence and leaves the fusing to the blocks' self-attention.

| name                    | how text meets the image                                        |
|-------------------------|-----------------------------------------------------------------|
| concat                  | early fusion: image tokens join the sequence, one self-attention |
| weighted_sum            | late fusion: the mean image vector, mixed in by learned weights  |
| similarity              | cosine text–image similarities are the attention logits          |
| cross_attention         | text queries attend to image keys/values (the default)          |
| co_attention            | text reads the image and the image reads the text, every layer  |
| gated_cross_attention   | cross-attention plus a feed-forward, each through tanh(α), α₀ = 0 |
| resampler               | M learned latents read the image; the text reads the latents     |
| film                    | the words scale and shift each image channel, then attend to it  |
| relation                | pairs of image cells through an MLP g; the text reads the pairs |
"""

from vtfuse.fusion.base import FUSIONS, Fusion, FusionBuilder, FusionCall, fusion_builder
from vtfuse.fusion.co_attention import CoAttentionFusion
from vtfuse.fusion.concat import ConcatFusion
from vtfuse.fusion.cross_attention import CrossAttentionFusion, GatedCrossAttentionFusion
from vtfuse.fusion.film import FiLMFusion
from vtfuse.fusion.relation import RelationFusion
from vtfuse.fusion.resampler import ResamplerFusion
from vtfuse.fusion.similarity import SimilarityFusion
from vtfuse.fusion.weighted_sum import WeightedSumFusion

__all__ = [
    "FUSIONS",
    "CoAttentionFusion",
    "ConcatFusion",
    "CrossAttentionFusion",
    "FiLMFusion",
    "Fusion",
    "FusionBuilder",
    "FusionCall",
    "GatedCrossAttentionFusion",
    "RelationFusion",
    "ResamplerFusion",
    "SimilarityFusion",
    "WeightedSumFusion",
    "fusion_builder",
]
