"""Alignment first: text tokens pool the image by their similarity to each image token."""

from __future__ import annotations

from vtfuse.attention import MultiHeadAttention
from vtfuse.config import FusionConfig
from vtfuse.fusion.base import FUSIONS
from vtfuse.fusion.cross_attention import CrossAttentionFusion


@FUSIONS.register("similarity")
class SimilarityFusion(CrossAttentionFusion):
    """The text–image similarity matrix is the attention (one head, no query projection):

        S(i, j) = τ · cos(LN(text_i), W_k image_j)        (τ learned; "cosine" score)
        text_i ← text_i + Σ_j softmax_j(S(i, j)) · W_v image_j

    Text states are compared with the image tokens as they are, in the spirit of alignment
    models (Karpathy & Fei-Fei 2015's region–word scores, CLIP's cosine logits), instead of
    through learned per-head queries. Another score ("dot", "neg_distance") can stand in.
    """

    def make_attention(
        self, dim: int, heads: int, image_dim: int, config: FusionConfig, dropout: float
    ) -> MultiHeadAttention:
        return MultiHeadAttention(
            dim,
            1,
            context_dim=image_dim,
            score=config.score or "cosine",
            dropout=dropout,
            project_query=False,
            project_output=False,
        )
