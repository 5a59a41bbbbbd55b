"""Dual-stream cross-attention: text queries, image keys and values."""

from __future__ import annotations

from torch import Tensor, nn

from vtfuse.attention import KVCache, MultiHeadAttention
from vtfuse.fusion.base import FUSIONS


@FUSIONS.register("cross_attention")
class CrossAttentionFusion(nn.Module):
    """text ← text + CrossAttn(LN(text), image)   (Vaswani et al. 2017, decoder sub-layer 2)."""

    def __init__(
        self, dim: int, heads: int, image_dim: int, score: str = "dot", dropout: float = 0.0
    ):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(
            dim, heads, context_dim=image_dim, score=score, dropout=dropout
        )

    def forward(
        self,
        text: Tensor,
        image: Tensor,
        *,
        cache: KVCache | None = None,
        need_weights: bool = False,
        image_index: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        attended, weights = self.attn(
            self.norm(text),
            image,
            cache=cache,
            need_weights=need_weights,
            context_index=image_index,
        )
        return text + attended, weights
