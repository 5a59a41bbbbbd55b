"""Dual-stream cross-attention: text queries, image keys and values — plain and Flamingo-gated."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vtfuse.attention import MultiHeadAttention
from vtfuse.config import FusionConfig
from vtfuse.feedforward import MLP
from vtfuse.fusion.base import FUSIONS, Fusion, FusionCall


@FUSIONS.register("cross_attention")
class CrossAttentionFusion(Fusion):
    """text ← text + CrossAttn(LN(text), image)   (Vaswani et al. 2017, decoder sub-layer 2)."""

    reads_image_mask = True

    def __init__(
        self, dim: int, heads: int, image_dim: int, config: FusionConfig, dropout: float = 0.0
    ):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = self.make_attention(dim, heads, image_dim, config, dropout)

    def make_attention(
        self, dim: int, heads: int, image_dim: int, config: FusionConfig, dropout: float
    ) -> MultiHeadAttention:
        return MultiHeadAttention(
            dim, heads, context_dim=image_dim, score=config.score or "dot", dropout=dropout
        )

    def attend(self, text: Tensor, image: Tensor, call: FusionCall) -> tuple[Tensor, Tensor | None]:
        """CrossAttn(LN(text), image) without the residual: (B, T, dim), weights (B, H, T, N);
        with `call.image_mask`, each word attends only the image tokens it may (interleaved
        images: the tokens of its latest image)."""
        return self.attn(
            self.norm(text),
            image,
            cache=call.cache,
            need_weights=call.need_weights,
            context_index=call.image_index,
            mask=None if call.image_mask is None else call.image_mask[:, None],
        )

    def fuse(
        self, text: Tensor, image: Tensor, call: FusionCall
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        attended, weights = self.attend(text, image, call)
        return self.combine(text, attended), image, weights

    def combine(self, text: Tensor, attended: Tensor) -> Tensor:
        """How the attended image joins the text: a plain residual."""
        return text + attended


@FUSIONS.register("gated_cross_attention")
class GatedCrossAttentionFusion(CrossAttentionFusion):
    """Flamingo's gated cross-attention dense block (Alayrac et al. 2022, Fig. 4):

        text ← text + tanh(α_attn) · CrossAttn(LN(text), image)
        text ← text + tanh(α_ff)   · FF(LN(text))

    with α_attn = α_ff = 0 at initialisation, so the block returns its input exactly and a
    (pretrained) language model around it starts unchanged; the gates open as training asks.
    """

    def __init__(
        self, dim: int, heads: int, image_dim: int, config: FusionConfig, dropout: float = 0.0
    ):
        super().__init__(dim, heads, image_dim, config, dropout)
        self.attn_gate = nn.Parameter(torch.zeros(()))
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = MLP(dim, dropout=dropout)
        self.ff_gate = nn.Parameter(torch.zeros(()))

    def combine(self, text: Tensor, attended: Tensor) -> Tensor:
        text = text + self.attn_gate.tanh() * attended
        return text + self.ff_gate.tanh() * self.ff(self.norm_ff(text))
